package bridge_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/textproto"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"mailbridge/bridge/config"
	"mailbridge/bridge/mime"
	"mailbridge/upstream"
	"mailbridge/upstream/m365fake"
)

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile("../testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestSendWithAuthPlainReachesGraphByteExact(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	msg := readFixture(t, "8bit-attachment.eml")

	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	reply, err := send(c, "sales@example.com", []string{"captain@example.com"}, msg)
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	sent := fake.Sent()
	if len(sent) != 1 {
		t.Fatalf("fake Graph received %d messages, want 1", len(sent))
	}
	got := sent[0]
	if !bytes.Equal(got.MIME, msg) {
		t.Fatalf("Graph received %d bytes that differ from the %d sent (first difference at %d)", len(got.MIME), len(msg), firstDiff(got.MIME, msg))
	}
	if got.User != mailboxA || got.Tenant != tenantA {
		t.Errorf("sent as user %q in tenant %q, want %q in %q", got.User, got.Tenant, mailboxA, tenantA)
	}
	if want := "Bestellung Nr. 42 – Müller ÆØÅ 船舶"; got.Subject != want {
		t.Errorf("subject %q, want %q", got.Subject, want)
	}
	if !strings.Contains(reply, got.RequestID) {
		t.Errorf("reply %q does not carry Graph's request-id %s", reply, got.RequestID)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func TestAuthLoginForms(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	enc := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

	t.Run("three steps", func(t *testing.T) {
		r := dialRaw(t, b.SMTPAddr())
		if got := r.cmd(334, "AUTH LOGIN"); got != enc("Username:") {
			t.Errorf("first prompt %q, want base64 of Username:", got)
		}
		r.cmd(334, "%s", enc(userA))
		r.cmd(235, "%s", enc(passwordA))
		r.cmd(250, "MAIL FROM:<%s>", mailboxA)
	})
	t.Run("dotnet initial response, lower case", func(t *testing.T) {
		r := dialRaw(t, b.SMTPAddr())
		if got := r.cmd(334, "AUTH login %s", enc(userA)); got != enc("Password:") {
			t.Errorf("prompt %q, want base64 of Password:", got)
		}
		r.cmd(235, "%s", enc(passwordA))
		r.cmd(250, "MAIL FROM:<%s>", mailboxA)
	})
	t.Run("wrong password", func(t *testing.T) {
		r := dialRaw(t, b.SMTPAddr())
		r.cmd(334, "AUTH LOGIN")
		r.cmd(334, "%s", enc(userA))
		if got := r.cmd(535, "%s", enc("wrong")); !strings.HasPrefix(got, "5.7.8") {
			t.Errorf("reply %q, want 5.7.8", got)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		r := dialRaw(t, b.SMTPAddr())
		r.cmd(334, "AUTH LOGIN")
		r.cmd(501, "*")
		r.cmd(530, "MAIL FROM:<%s>", mailboxA)
	})
	t.Run("go-sasl LOGIN client", func(t *testing.T) {
		c, err := smtp.Dial(b.SMTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Auth(sasl.NewLoginClient(userB, passwordB)); err != nil {
			t.Fatalf("AUTH LOGIN: %v", err)
		}
	})
}

func TestBadPasswordIsRefusedAndLoggedWithoutIt(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	for _, tc := range []struct{ user, password string }{
		{userA, "not the password"},
		{"nobody", passwordA},
		{userA, passwordB}, // another account's password opens nothing
	} {
		c, err := smtp.Dial(b.SMTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		err = c.Auth(sasl.NewPlainClient("", tc.user, tc.password))
		if code, ec := smtpCode(err); code != 535 || ec != (smtp.EnhancedCode{5, 7, 8}) {
			t.Errorf("%s/%s: got %v, want 535 5.7.8", tc.user, tc.password, err)
		}
		c.Close()
	}
	out := logs.String()
	if !strings.Contains(out, `"message":"authentication failed: unknown user name or wrong password"`) || !strings.Contains(out, `"remote":"127.0.0.1:`) {
		t.Errorf("no failed-login line with the remote address in the log:\n%s", out)
	}
	for _, secret := range []string{"not the password", passwordA, passwordB} {
		if strings.Contains(out, secret) {
			t.Errorf("the log contains the password %q", secret)
		}
	}
}

func TestMailBeforeAuthIsRefused(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	r := dialRaw(t, b.SMTPAddr())
	if got := r.cmd(530, "MAIL FROM:<%s>", mailboxA); !strings.HasPrefix(got, "5.7.0") {
		t.Errorf("reply %q, want 5.7.0", got)
	}
	r.cmd(502, "RCPT TO:<someone@example.org>")
}

func TestSenderPolicy(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	msg := func(from string) []byte {
		return crlf("From: " + from + "\nTo: x@example.org\nSubject: policy\n\nbody\n")
	}
	for _, tc := range []struct {
		name     string
		account  [2]string
		mailFrom string
		msg      []byte
		code     int
	}{
		{"envelope sender not allowed", [2]string{userA, passwordA}, "ceo@example.com", msg("ceo@example.com"), 550},
		{"From header not allowed", [2]string{userA, passwordA}, mailboxA, msg("The CEO <ceo@example.com>"), 550},
		{"Sender header not allowed", [2]string{userA, passwordA}, mailboxA, crlf("From: orders@example.com\nSender: ceo@example.com\nTo: x@example.org\n\nbody\n"), 550},
		{"second From address not allowed", [2]string{userA, passwordA}, mailboxA, msg("orders@example.com, ceo@example.com"), 550},
		{"another account's mailbox", [2]string{userB, passwordB}, mailboxA, msg(mailboxA), 550},
		{"empty allow-list means the mailbox only", [2]string{userB, passwordB}, "other@fleet.example.net", msg("other@fleet.example.net"), 550},
		{"alias in allow-list, case folded", [2]string{userA, passwordA}, "Sales@Example.COM", msg("Sales Desk <SALES@example.com>"), 250},
		{"own mailbox", [2]string{userB, passwordB}, mailboxB, msg(mailboxB), 250},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(fake.Sent())
			c := dialAuth(t, b.SMTPAddr(), tc.account[0], tc.account[1])
			_, err := send(c, tc.mailFrom, []string{"x@example.org"}, tc.msg)
			code, ec := smtpCode(err)
			if tc.code == 250 {
				if err != nil {
					t.Fatalf("got %v, want success", err)
				}
				if len(fake.Sent()) != before+1 {
					t.Fatalf("Graph did not receive the message")
				}
				return
			}
			if code != tc.code || ec != (smtp.EnhancedCode{5, 7, 1}) {
				t.Fatalf("got %v, want %d 5.7.1", err, tc.code)
			}
			if len(fake.Sent()) != before {
				t.Fatalf("a refused message reached Graph")
			}
		})
	}
	if !strings.Contains(logs.String(), "sender refused") {
		t.Error("no log line for the refused senders")
	}
}

func TestEnvelopeOnlyRecipientsAreAddedAsBcc(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	msg := readFixture(t, "bcc-envelope.eml")
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	rcpts := []string{"purchasing@supplier.example", "agent@port.example", "Archive@Example.com", "auditor@example.org", "archive@example.com"}
	if _, err := send(c, mailboxA, rcpts, msg); err != nil {
		t.Fatal(err)
	}
	sent := fake.Sent()
	if len(sent) != 1 {
		t.Fatalf("Graph received %d messages, want 1", len(sent))
	}
	want := []string{"purchasing@supplier.example", "agent@port.example", "archive@example.com", "auditor@example.org"}
	if !slices.Equal(sent[0].Recipients, want) {
		t.Errorf("Graph's recipients %v, want each envelope recipient once: %v", sent[0].Recipients, want)
	}
	headerLen, _ := mime.SplitHeader(msg)
	wantMIME := append(append(append([]byte{}, msg[:headerLen]...), "Bcc: Archive@Example.com, auditor@example.org\r\n"...), msg[headerLen:]...)
	if !bytes.Equal(sent[0].MIME, wantMIME) {
		t.Errorf("Graph received\n%s\nwant the message with only a Bcc field added:\n%s", sent[0].MIME, wantMIME)
	}

	// A recipient only in the header is reported.
	c2 := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c2, mailboxA, []string{"purchasing@supplier.example"}, msg); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), `"addresses":["agent@port.example"]`) {
		t.Errorf("header-only recipient not logged as a warning:\n%s", logs.String())
	}
}

func TestExistingBccFieldIsMerged(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	msg := crlf("From: orders@example.com\nBcc: boss@example.com,\n  files@example.com\nTo: a@example.org\nSubject: merge\n\nbody\n")
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"a@example.org", "boss@example.com", "files@example.com", "late@example.org"}, msg); err != nil {
		t.Fatal(err)
	}
	sent := fake.Sent()[0]
	want := crlf("From: orders@example.com\nTo: a@example.org\nSubject: merge\nBcc: boss@example.com, files@example.com, late@example.org\n\nbody\n")
	if got := withoutAddedID(t, sent.MIME); !bytes.Equal(got, want) {
		t.Errorf("Graph received\n%q\nwant\n%q", got, want)
	}
}

func TestThrottledThenSent(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	fake.FailGraph(2, m365fake.Throttled("0.05"))
	fake.FailGraph(1, m365fake.Unavailable())
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n")); err != nil {
		t.Fatalf("got %v, want the message sent after the retries", err)
	}
	if n := len(fake.Sent()); n != 1 {
		t.Fatalf("Graph accepted %d messages, want exactly 1", n)
	}
	if !strings.Contains(logs.String(), `"attempts":4`) {
		t.Errorf("log does not show 4 attempts:\n%s", logs.String())
	}
}

func TestGraphOutageGivesTemporaryFailure(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.SMTP.SendTimeout = config.Duration{Duration: 300 * time.Millisecond}
	b, _ := startBridge(t, fake, cfg)
	fake.FailGraph(1000, m365fake.Unavailable())
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	_, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n"))
	if code, ec := smtpCode(err); code != 451 || ec[0] != 4 || ec[1] != 4 {
		t.Fatalf("got %v, want 451 4.4.x", err)
	}

	// Throttling longer than the time left is answered at once: with a
	// send_timeout far longer than the client's patience, a bridge that
	// waited would leave the client's read to time out.
	fake2 := startFake(t)
	cfg2 := testConfig(fake2)
	cfg2.SMTP.SendTimeout = config.Duration{Duration: 30 * time.Minute}
	b2, _ := startBridge(t, fake2, cfg2)
	fake2.FailGraph(1, m365fake.Throttled("3600"))
	conn, err := net.Dial("tcp", b2.SMTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(patience))
	c2 := smtp.NewClient(conn)
	defer c2.Close()
	if err := c2.Auth(sasl.NewPlainClient("", userA, passwordA)); err != nil {
		t.Fatal(err)
	}
	_, err = send(c2, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n"))
	if code, ec := smtpCode(err); code != 451 || ec != (smtp.EnhancedCode{4, 4, 5}) {
		t.Fatalf("got %v, want 451 4.4.5 at once for a Retry-After longer than send_timeout", err)
	}
}

func TestBadSecretGives451AndExplains(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.Accounts[0].ClientSecret = "Wrong8Q~an.old.secret.value" // a wrong Value (a Secret ID is caught offline)
	b, logs := startBridge(t, fake, cfg)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	_, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n"))
	if code, ec := smtpCode(err); code != 451 || ec != (smtp.EnhancedCode{4, 7, 0}) {
		t.Fatalf("got %v, want 451 4.7.0", err)
	}
	// Known at start: the sign-in was refused, so MAIL FROM is.
	line := findLogLine(t, logs.String(), "Microsoft 365 refuses this account's sign-in: its messages are refused (451) until it is fixed")
	for _, want := range []string{`"level":"error"`, `AADSTS7000215`, `"hint":"the client secret is wrong: copy the secret's Value (not its Secret ID)`, `"account":"tm-master"`} {
		if !strings.Contains(line, want) {
			t.Errorf("log line lacks %s:\n%s", want, line)
		}
	}
	findLogLine(t, logs.String(), "message refused at MAIL: Microsoft 365 refuses this account's sign-in")
	if n := b.Accounts()[0].GraphTokens.Requests(); n != 1 {
		t.Errorf("%d token requests, want 1 (a refusal is not retried per message)", n)
	}
}

func findLogLine(t testing.TB, logs, message string) string {
	t.Helper()
	for _, line := range strings.Split(logs, "\n") {
		if strings.Contains(line, `"message":"`+message+`"`) {
			return line
		}
	}
	t.Fatalf("no log line %q in:\n%s", message, logs)
	return ""
}

func TestGraphRefusalsMapToReplies(t *testing.T) {
	fake := startFake(t)
	fake.AddTenant("cccccccc-0000-0000-0000-00000000000c")
	fake.AddApp("cccccccc-0000-0000-0000-00000000000c", "c11e0000-0000-0000-0000-0000000000c2", "s", "Mail.Read") // Mail.Send not consented
	cfg := testConfig(fake)
	cfg.Accounts[1].Mailbox = "gone@fleet.example.net" // no such mailbox
	cfg.Accounts[1].AllowedSenders = []string{"*@fleet.example.net"}
	ha, _ := passwordHashes()
	cfg.Accounts = append(cfg.Accounts, config.AccountConfig{Name: "noconsent", Username: "noconsent", PasswordHash: ha,
		Mailbox: "x@c.example", TenantID: "cccccccc-0000-0000-0000-00000000000c", ClientID: "c11e0000-0000-0000-0000-0000000000c2", ClientSecret: "s",
		TokenURL: fake.TokenURL(), GraphURL: fake.GraphURL()})
	b, logs := startBridge(t, fake, cfg)

	cases := []struct {
		name       string
		user, from string
		msg        string
		code       int
		ec         smtp.EnhancedCode
		hint       string
	}{
		{"unknown mailbox", userB, "gone@fleet.example.net", "From: gone@fleet.example.net\nTo: a@example.org\n\nx\n", 451, smtp.EnhancedCode{4, 7, 0}, "the mailbox does not exist"},
		{"no admin consent", "noconsent", "x@c.example", "From: x@c.example\nTo: a@example.org\n\nx\n", 451, smtp.EnhancedCode{4, 7, 0}, "Grant admin consent"},
		{"content refused", userA, mailboxA, "From: orders@example.com\nTo: a@example.org\n\nx\n", 554, smtp.EnhancedCode{5, 6, 0}, "a recipient address is not valid"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			password := passwordA
			if tc.user == userB {
				password = passwordB
			}
			c := dialAuth(t, b.SMTPAddr(), tc.user, password)
			if tc.code == 554 {
				fake.FailGraph(1, m365fake.Fault{Status: 400, Code: "ErrorInvalidRecipients", Message: "At least one recipient is not valid., Recipient 'a@' is not resolved."})
			}
			_, err := send(c, tc.from, []string{"a@example.org"}, crlf(tc.msg))
			if code, ec := smtpCode(err); code != tc.code || ec != tc.ec {
				t.Fatalf("got %v, want %d %v", err, tc.code, tc.ec)
			}
			if tc.code == 554 && !strings.Contains(err.Error(), "ErrorInvalidRecipients") {
				t.Errorf("reply %q does not name Graph's error code", err)
			}
			if !strings.Contains(logs.String(), tc.hint) {
				t.Errorf("the log does not explain %q", tc.hint)
			}
		})
	}
}

func TestSecretsNeverLogged(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	b, logs := startBridge(t, fake, cfg)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n")); err != nil {
		t.Fatal(err)
	}
	r := dialRaw(t, b.SMTPAddr())
	r.cmd(334, "AUTH login %s", base64.StdEncoding.EncodeToString([]byte(userB)))
	r.cmd(235, "%s", base64.StdEncoding.EncodeToString([]byte(passwordB)))
	fake.FailGraph(1, Fault401())
	c2 := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c2, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n")); err != nil {
		t.Fatal(err)
	}
	token, err := b.Accounts()[0].GraphTokens.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := logs.String()
	if !strings.Contains(out, `"level":"debug"`) {
		t.Fatal("the test must run with debug logs")
	}
	secrets := map[string]string{
		"client secret A": secretA, "client secret B": secretB, "password A": passwordA, "password B": passwordB,
		"access token": token, "token signature": token[strings.LastIndexByte(token, '.')+1:],
		"PLAIN blob":     base64.StdEncoding.EncodeToString([]byte("\x00" + userA + "\x00" + passwordA)),
		"LOGIN password": base64.StdEncoding.EncodeToString([]byte(passwordB)),
		"body":           "\nhi\n",
	}
	for what, s := range secrets {
		if strings.Contains(out, s) {
			t.Errorf("the log contains the %s", what)
		}
	}
}

// Fault401 is Graph refusing a token that has been revoked.
func Fault401() m365fake.Fault {
	return m365fake.Fault{Status: 401, Code: "InvalidAuthenticationToken", Message: "Access token has expired or is not yet valid."}
}

func TestTwoAccountsOnTwoTenants(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			user, pass, from := userA, passwordA, mailboxA
			if i%2 == 1 {
				user, pass, from = userB, passwordB, mailboxB
			}
			c := dialAuth(t, b.SMTPAddr(), user, pass)
			if _, err := send(c, from, []string{"x@example.org"}, crlf("From: "+from+"\nTo: x@example.org\n\nhi\n")); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	byTenant := map[string]int{}
	for _, m := range fake.Sent() {
		byTenant[m.Tenant+" "+m.User]++
	}
	if byTenant[tenantA+" "+mailboxA] != 4 || byTenant[tenantB+" "+mailboxB] != 4 {
		t.Errorf("messages by tenant and user: %v, want 4 each for A and B", byTenant)
	}
	if n := fake.TokenRequests(upstream.GraphScope); n != 2 {
		t.Errorf("%d token requests, want 2 (one per app registration)", n)
	}
}

func TestOneTokenForManySessions(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	fake.FailToken(1, m365fake.Fault{Delay: 100 * time.Millisecond}) // a slow first token: sessions pile up behind it
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
			for range 3 {
				if _, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n")); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if n := len(fake.Sent()); n != 60 {
		t.Errorf("Graph accepted %d messages, want 60", n)
	}
	if n := b.Accounts()[0].GraphTokens.Requests(); n != 1 {
		t.Errorf("%d token requests for 60 messages in 20 sessions, want 1", n)
	}
}

func TestUseAddressFromUser(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.Accounts[0].UseAddressFromUser = true
	cfg.Accounts[0].AllowedSenders = []string{"*@example.com"}
	b, logs := startBridge(t, fake, cfg)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, "captain@example.com", []string{"x@example.org"}, crlf("From: captain@example.com\nTo: x@example.org\n\nhi\n")); err != nil {
		t.Fatal(err)
	}
	// sales@ is an alias of orders@, not a mailbox: Graph says so, and the
	// bridge falls back to the account's mailbox.
	if _, err := send(c, "sales@example.com", []string{"x@example.org"}, crlf("From: sales@example.com\nTo: x@example.org\n\nhi\n")); err != nil {
		t.Fatal(err)
	}
	sent := fake.Sent()
	if len(sent) != 2 || sent[0].User != "captain@example.com" || sent[1].User != mailboxA {
		t.Fatalf("Graph users %v, want captain@example.com then %s", users(sent), mailboxA)
	}
	if !strings.Contains(logs.String(), `"fell_back":true`) {
		t.Error("the fallback to the mailbox is not logged")
	}
}

func users(s []m365fake.SentMessage) []string {
	var out []string
	for _, m := range s {
		out = append(out, m.User)
	}
	return out
}

func TestTooLargeForSendMail(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	big := append(crlf("From: orders@example.com\nTo: x@example.org\n\n"), bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n"), upstream.MaxSendMailMIME/64+1)...)
	_, err := send(c, mailboxA, []string{"x@example.org"}, big)
	if code, ec := smtpCode(err); code != 552 || ec != (smtp.EnhancedCode{5, 3, 4}) {
		t.Fatalf("got %v, want 552 5.3.4", err)
	}
	if len(fake.Sent()) != 0 {
		t.Fatal("a message over the limit reached Graph")
	}
	// SIZE over sendMail's limit is taken when large messages are on (the
	// draft path sends it); over smtp.max_message_bytes it is refused
	// before the data.
	if err := c.Mail(mailboxA, &smtp.MailOptions{Size: upstream.MaxSendMailMIME + 1}); err != nil {
		t.Fatalf("MAIL FROM with SIZE over sendMail's limit, large messages on: %v", err)
	}
	c.Reset()
	if err := c.Mail(mailboxA, &smtp.MailOptions{Size: config.DefaultMaxMessageBytes + 1}); err == nil {
		t.Fatal("MAIL FROM with SIZE over smtp.max_message_bytes was accepted")
	} else if code, ec := smtpCode(err); code != 552 || ec != (smtp.EnhancedCode{5, 3, 4}) {
		t.Fatalf("SIZE over smtp.max_message_bytes: got %v, want 552 5.3.4", err)
	}
	// The session still works for a message that fits.
	c.Reset()
	if _, err := send(c, mailboxA, []string{"x@example.org"}, big[:upstream.MaxSendMailMIME-100]); err != nil {
		t.Fatalf("a message just under the limit: %v", err)
	}
}

func TestSizeOverSendMailRefusedWithoutLargeMessages(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	off := false
	cfg.Accounts[0].LargeMessagesSetting = &off
	b, logs := startBridge(t, fake, cfg)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	err := c.Mail(mailboxA, &smtp.MailOptions{Size: upstream.MaxSendMailMIME + 1})
	if code, ec := smtpCode(err); code != 552 || ec != (smtp.EnhancedCode{5, 3, 4}) {
		t.Fatalf("got %v, want 552 5.3.4", err)
	}
	line := findLogLine(t, logs.String(), "message refused at MAIL: SIZE is over sendMail's limit and large_messages is off")
	if !strings.Contains(line, `"hint":"set large_messages = true`) {
		t.Errorf("refusal logged as %s", line)
	}
}

func TestShutdownLetsDataFinishAndClosesIdle(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	idle := dialAuth(t, b.SMTPAddr(), userB, passwordB)
	busy := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	fake.FailGraph(1, m365fake.Fault{Delay: 700 * time.Millisecond}) // Graph is slow to accept
	result := make(chan error, 1)
	go func() {
		_, err := send(busy, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n"))
		result <- err
	}()
	waitFor(t, "the message to be in DATA", func() bool {
		_, busy := b.Connections()
		return busy > 0
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if err := <-result; err != nil {
		t.Fatalf("the message in DATA during shutdown failed: %v", err)
	}
	if len(fake.Sent()) != 1 {
		t.Fatal("the message in DATA did not reach Graph")
	}
	if err := idle.Noop(); err == nil {
		t.Fatal("the idle session is still open after shutdown")
	}
}

func TestSMTPSessionLimit(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.SMTP.MaxSessions = 2
	b, logs := startBridge(t, fake, cfg)
	dialAuth(t, b.SMTPAddr(), userA, passwordA)
	dialAuth(t, b.SMTPAddr(), userB, passwordB)
	r, err := net.Dial("tcp", b.SMTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	r.SetDeadline(time.Now().Add(patience))
	line, _ := bufio.NewReader(r).ReadString('\n')
	if !strings.HasPrefix(line, "421 4.3.2 ") {
		t.Errorf("third session greeted with %q, want 421 4.3.2", line)
	}
	if !strings.Contains(logs.String(), "smtp.max_sessions reached") {
		t.Error("the refusal is not logged")
	}
}

func TestMaxRecipientsRefusedAndLogged(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.SMTP.MaxRecipients = 2
	b, logs := startBridge(t, fake, cfg)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if err := c.Mail(mailboxA, nil); err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"a@example.org", "b@example.org"} {
		if err := c.Rcpt(r, nil); err != nil {
			t.Fatal(err)
		}
	}
	err := c.Rcpt("c@example.org", nil)
	if code, ec := smtpCode(err); code != 452 || ec != (smtp.EnhancedCode{4, 5, 3}) {
		t.Fatalf("third recipient: %v, want 452 4.5.3", err)
	}
	line := findLogLine(t, logs.String(), "recipient refused: smtp.max_recipients reached")
	if !strings.Contains(line, `"to":"c@example.org"`) || !strings.Contains(line, `"hint":`) {
		t.Errorf("refusal logged as %s", line)
	}
}

// With the outbox off, sessions sending as one mailbox share its four
// slots: Graph never sees a fifth request at once (it would answer 429
// MailboxConcurrency).
func TestSynchronousSessionsKeepFourPerMailbox(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	fake.FailGraph(8, m365fake.Fault{Delay: 200 * time.Millisecond}) // Graph is slow: the sessions overlap
	errs := make(chan error, 8)
	for i := range 8 {
		go func() {
			c, err := smtp.Dial(b.SMTPAddr())
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if err := c.Auth(sasl.NewPlainClient("", userA, passwordA)); err != nil {
				errs <- err
				return
			}
			_, err = send(c, mailboxA, []string{"x@example.org"}, crlf(fmt.Sprintf("From: orders@example.com\nTo: x@example.org\nSubject: %d\n\nhi\n", i)))
			errs <- err
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Errorf("send: %v", err)
		}
	}
	if n := fake.MaxConcurrent(mailboxA); n > 4 || n < 2 {
		t.Errorf("%d requests in flight at once for one mailbox, want at most 4 (and some overlap)", n)
	}
	if n := len(fake.Sent()); n != 8 {
		t.Errorf("%d messages reached Graph, want 8", n)
	}
}

// Envelope addresses are parsed as mailboxes: a second "@", a NUL or an
// 8-bit local part is refused, and an allow-list domain matches only the
// parsed domain.
func TestMalformedAddressesRefused(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.Accounts[0].AllowedSenders = []string{"*@example.com"}
	b, _ := startBridge(t, fake, cfg)
	r := dialRaw(t, b.SMTPAddr())
	r.cmd(235, "AUTH PLAIN AHRtbWFzdGVyAGNvcnJlY3QgaG9yc2U=")
	for _, bad := range []string{"ceo@evil.example@example.com", "orders\x00x@example.com", "müller@example.com"} {
		if msg := r.cmd(501, "MAIL FROM:<%s>", bad); !strings.Contains(msg, "5.1.7") {
			t.Errorf("MAIL FROM:<%q>: %q", bad, msg)
		}
	}
	r.cmd(250, "MAIL FROM:<orders@example.com>")
	if msg := r.cmd(553, "RCPT TO:<a@b@example.org>"); !strings.Contains(msg, "5.1.3") {
		t.Errorf("RCPT TO with two @: %q", msg)
	}
	r.cmd(250, "RCPT TO:<x@example.org>")
}

// At most three failed logins per connection; failures from other
// loopback addresses for the same account are slowed down by the
// account's count, and a success from one address does not reset the
// others.
func TestLoginThrottleCannotBeSidestepped(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	r := dialRaw(t, b.SMTPAddr())
	r.cmd(535, "AUTH PLAIN %s", plainB64(userA, "wrong1"))
	r.cmd(535, "AUTH PLAIN %s", plainB64(userA, "wrong2"))
	r.cmd(421, "AUTH PLAIN %s", plainB64(userA, "wrong3"))
	r.conn.SetReadDeadline(time.Now().Add(patience))
	if _, err := r.tp.ReadLine(); err == nil {
		t.Error("the connection stayed open after three failed logins")
	}
	findLogLine(t, logs.String(), "session closed: too many failed logins on one connection")

	// Three more failures from other loopback addresses: each waits longer
	// than the one before, as the account's count grows.
	for i := 2; i <= 4; i++ {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(i))}}
		c, err := d.Dial("tcp", b.SMTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(patience))
		tp := textproto.NewConn(c)
		tp.ReadResponse(220)
		tp.PrintfLine("EHLO other")
		tp.ReadResponse(250)
		tp.PrintfLine("AUTH PLAIN %s", plainB64(userA, "wrong"))
		if code, _, _ := tp.ReadResponse(535); code != 535 {
			t.Fatalf("from 127.0.0.%d: %d", i, code)
		}
		c.Close()
	}
	// The waits the throttle chose before each verdict, from the log
	// lines: testAuthFailDelay is 5 ms, doubled per failure of the
	// account, up to 30 times itself. From 127.0.0.1: none before the
	// first failure, then 5, 10; then the account has failed 3 times, so
	// other addresses wait 20, 40, then 80.
	delays := refusalDelays(t, logs.String())
	if !slices.Equal(delays, []int{0, 5, 10, 20, 40, 80}) {
		t.Errorf("refusals delayed by %v ms, want 0 5 10 from one address, then 20 40 80 from others", delays)
	}
	// The right password is never refused.
	dialAuth(t, b.SMTPAddr(), userA, passwordA)
}

func plainB64(user, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + pass))
}

// Guesses in parallel, once the account has failed, each wait before
// their verdict (the booking of those waits one after another is tested
// on an injected clock, in bridge/account: here the machine's load decides
// when each connection is admitted).
func TestParallelGuessesWaitBeforeTheirVerdict(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	r := dialRaw(t, b.SMTPAddr())
	r.cmd(535, "AUTH PLAIN %s", plainB64(userA, "wrong1"))
	var wg sync.WaitGroup
	var verdicts atomic.Int32
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 1, byte(i+1))}}
			c, err := d.Dial("tcp", b.SMTPAddr())
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(patience))
			tp := textproto.NewConn(c)
			tp.ReadResponse(220)
			tp.PrintfLine("EHLO guesser")
			tp.ReadResponse(250)
			tp.PrintfLine("AUTH PLAIN %s", plainB64(userA, fmt.Sprintf("guess%d", i)))
			code, msg, _ := tp.ReadResponse(0)
			if code != 535 && code != 454 { // 454: no verdict, the waits booked too far ahead
				t.Errorf("guess %d: %d %s", i, code, msg)
			}
			if code == 535 {
				verdicts.Add(1)
			}
		}()
	}
	wg.Wait()
	waits := refusalDelays(t, logs.String())
	if want := 1 + int(verdicts.Load()); len(waits) != want {
		t.Fatalf("%d refusals logged, want %d", len(waits), want)
	}
	// The first failure came at once (no failure before it); every guess
	// after it waited at least testAuthFailDelay before its verdict.
	for i, w := range waits[1:] {
		if w < int(testAuthFailDelay/time.Millisecond) {
			t.Errorf("guess %d got its verdict without waiting (%d ms): %v", i+1, w, waits)
		}
	}
}

// refusalDelays returns, in order, how long each refused login waited
// before its verdict, as its log line says (delay_ms).
func refusalDelays(t testing.TB, logs string) []int {
	t.Helper()
	var delays []int
	for _, line := range linesWith(logs, "authentication failed: unknown user name or wrong password") {
		var f struct {
			DelayMS int `json:"delay_ms"`
		}
		if err := json.Unmarshal([]byte(line), &f); err != nil {
			t.Fatal(err)
		}
		delays = append(delays, f.DelayMS)
	}
	return delays
}
