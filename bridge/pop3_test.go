package bridge_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode"

	pop3 "github.com/knadh/go-pop3"

	"mailbridge/bridge/config"
	"mailbridge/bridge/mime"
	"mailbridge/upstream"
	"mailbridge/upstream/m365fake"
)

// popClient is a raw POP3 client that reads multi-line answers itself,
// byte-exact and streaming (go-pop3's reader splits long lines).
type popClient struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
}

func dialPOP3(t testing.TB, addr string) *popClient {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	p := &popClient{t: t, conn: conn, r: bufio.NewReaderSize(conn, 4096)}
	if l := p.line(); !strings.HasPrefix(l, "+OK") {
		t.Fatalf("greeting %q", l)
	}
	return p
}

func newPOP3Client(t testing.TB, conn net.Conn) *popClient {
	return &popClient{t: t, conn: conn, r: bufio.NewReaderSize(conn, 4096)}
}

func (p *popClient) line() string {
	p.t.Helper()
	p.conn.SetReadDeadline(time.Now().Add(patience))
	l, err := p.r.ReadString('\n')
	if err != nil {
		p.t.Fatalf("reading answer: %v (got %q)", err, l)
	}
	return strings.TrimRight(l, "\r\n")
}

// cmd sends a command and returns the status line.
func (p *popClient) cmd(format string, args ...any) string {
	p.t.Helper()
	fmt.Fprintf(p.conn, format+"\r\n", args...)
	return p.line()
}

// login logs in with USER/PASS and fails the test unless it succeeds.
func (p *popClient) login(user, pass string) {
	p.t.Helper()
	if l := p.cmd("USER %s", user); !strings.HasPrefix(l, "+OK") {
		p.t.Fatalf("USER: %q", l)
	}
	if l := p.cmd("PASS %s", pass); !strings.HasPrefix(l, "+OK") {
		p.t.Fatalf("PASS: %q", l)
	}
}

// body reads a multi-line answer's body, writing the raw (still
// dot-stuffed) bytes to raw and the unstuffed message to msg; either may
// be nil. Only CRLF ends a line (RFC 1939 §3).
func (p *popClient) body(raw, msg io.Writer) error {
	if raw == nil {
		raw = io.Discard
	}
	if msg == nil {
		msg = io.Discard
	}
	atStart := true
	for {
		p.conn.SetReadDeadline(time.Now().Add(patience))
		frag, err := p.r.ReadSlice('\n')
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return err
		}
		raw.Write(frag)
		out := frag
		if atStart && len(frag) > 0 && frag[0] == '.' {
			if string(frag) == ".\r\n" {
				return nil
			}
			out = frag[1:]
		}
		msg.Write(out)
		atStart = bytes.HasSuffix(frag, []byte("\r\n"))
	}
}

// retr sends RETR n and returns the unstuffed message.
func (p *popClient) retr(n int) []byte {
	p.t.Helper()
	if l := p.cmd("RETR %d", n); !strings.HasPrefix(l, "+OK") {
		p.t.Fatalf("RETR %d: %q", n, l)
	}
	var msg bytes.Buffer
	if err := p.body(nil, &msg); err != nil {
		p.t.Fatalf("RETR %d: %v", n, err)
	}
	return msg.Bytes()
}

func TestPOP3LoginForms(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	fake.AddMessage(mailboxA, crlf("Subject: one\n\nbody\n"))
	enc := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

	t.Run("CAPA before login", func(t *testing.T) {
		p := dialPOP3(t, b.POP3Addr())
		p.cmd("CAPA")
		var caps []string
		for l := p.line(); l != "."; l = p.line() {
			caps = append(caps, l)
		}
		if got := strings.Join(caps, ","); got != "USER,UIDL,TOP,RESP-CODES,AUTH-RESP-CODE,SASL PLAIN LOGIN" {
			t.Errorf("CAPA %q", got)
		}
		if l := p.cmd("STAT"); !strings.HasPrefix(l, "-ERR") {
			t.Errorf("STAT before login: %q", l)
		}
		if l := p.cmd("QUIT"); !strings.HasPrefix(l, "+OK") {
			t.Errorf("QUIT: %q", l)
		}
	})
	t.Run("USER PASS with go-pop3", func(t *testing.T) {
		host, port, _ := net.SplitHostPort(b.POP3Addr())
		pn, _ := strconv.Atoi(port)
		c, err := pop3.New(pop3.Opt{Host: host, Port: pn}).NewConn()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Auth(userA, passwordA); err != nil {
			t.Fatalf("login: %v", err)
		}
		count, size, err := c.Stat()
		if err != nil || count != 1 || size != len("Subject: one\r\n\r\nbody\r\n") {
			t.Fatalf("STAT = %d %d %v", count, size, err)
		}
		ids, err := c.Uidl(0)
		if err != nil || len(ids) != 1 || ids[0].UID != fake.MailboxUIDs(mailboxA)[0] {
			t.Fatalf("UIDL = %v %v", ids, err)
		}
		if err := c.Quit(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("AUTH PLAIN with initial response", func(t *testing.T) {
		p := dialPOP3(t, b.POP3Addr())
		if l := p.cmd("AUTH PLAIN %s", enc("\x00"+userA+"\x00"+passwordA)); l != "+OK User successfully authenticated." {
			t.Fatalf("AUTH PLAIN: %q", l)
		}
		if l := p.cmd("STAT"); !strings.HasPrefix(l, "+OK 1 ") {
			t.Errorf("STAT: %q", l)
		}
	})
	t.Run("AUTH PLAIN two steps", func(t *testing.T) {
		p := dialPOP3(t, b.POP3Addr())
		if l := p.cmd("AUTH PLAIN"); l != "+ " {
			t.Fatalf("continuation %q", l)
		}
		if l := p.cmd("%s", enc("\x00"+userA+"\x00"+passwordA)); !strings.HasPrefix(l, "+OK") {
			t.Fatalf("AUTH PLAIN: %q", l)
		}
	})
	t.Run("AUTH LOGIN", func(t *testing.T) {
		p := dialPOP3(t, b.POP3Addr())
		if l := p.cmd("auth login"); l != "+ "+enc("Username:") {
			t.Fatalf("prompt %q", l)
		}
		p.cmd("%s", enc(userB))
		if l := p.cmd("%s", enc(passwordB)); !strings.HasPrefix(l, "+OK") {
			t.Fatalf("AUTH LOGIN: %q", l)
		}
		if l := p.cmd("STAT"); l != "+OK 0 0" {
			t.Errorf("account B sees %q, want its own empty mailbox", l)
		}
	})
	t.Run("AUTH cancelled", func(t *testing.T) {
		p := dialPOP3(t, b.POP3Addr())
		p.cmd("AUTH LOGIN")
		if l := p.cmd("*"); !strings.HasPrefix(l, "-ERR") {
			t.Fatalf("cancel: %q", l)
		}
	})
}

func TestPOP3BadLoginOpensNothingUpstream(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	ha, _ := passwordHashes()
	cfg.Accounts = append(cfg.Accounts, config.AccountConfig{Name: "smtp-only", Username: "smtponly", PasswordHash: ha, Mailbox: mailboxA,
		TenantID: tenantA, ClientID: clientA, ClientSecret: secretA, Protocols: []string{"smtp"}, TokenURL: fake.TokenURL(), GraphURL: fake.GraphURL()})
	b, logs := startBridge(t, fake, cfg)
	for _, tc := range [][2]string{{userA, "Wr0ng-Pa55"}, {"nobody", passwordA}, {userA, passwordB}, {"smtponly", passwordA}} {
		p := dialPOP3(t, b.POP3Addr())
		p.cmd("USER %s", tc[0])
		if l := p.cmd("PASS %s", tc[1]); l != "-ERR [AUTH] Authentication failed" {
			t.Errorf("%s/%s: %q", tc[0], tc[1], l)
		}
		if l := p.cmd("STAT"); !strings.HasPrefix(l, "-ERR") {
			t.Errorf("STAT after a failed login: %q", l)
		}
	}
	if n := fake.POP3Connections(); n != 0 {
		t.Errorf("%d upstream connections for failed local logins, want 0", n)
	}
	if n := fake.TokenRequests(upstream.OutlookScope); n != 0 {
		t.Errorf("%d token requests for failed local logins, want 0", n)
	}
	if strings.Contains(logs.String(), "Wr0ng-Pa55") {
		t.Error("the log contains a password")
	}
}

func TestPOP3AccountsAreIsolated(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	fake.AddMessage(mailboxA, crlf("Subject: for A\n\nA\n"))
	fake.AddMessage(mailboxB, crlf("Subject: for B\n\nB\n"))
	fake.AddMessage(mailboxB, crlf("Subject: for B too\n\nB\n"))
	for _, tc := range []struct{ user, pass, subject string }{{userA, passwordA, "for A"}, {userB, passwordB, "for B"}} {
		p := dialPOP3(t, b.POP3Addr())
		p.login(tc.user, tc.pass)
		got := p.retr(1)
		if !strings.Contains(string(got), "Subject: "+tc.subject+"\r\n") {
			t.Errorf("%s reads %q", tc.user, got)
		}
	}
}

// message fixtures for RETR.
func retrFixtures() map[string][]byte {
	var eight bytes.Buffer
	for i := range 256 {
		eight.WriteByte(byte(i))
	}
	return map[string][]byte{
		"dot lines":   crlf("Subject: dots\n\n.\n..\n.x\n...\nend\n.\n"),
		"200 KB line": append(crlf("Subject: long\n\n"), append(bytes.Repeat([]byte("L"), 200<<10), "\r\n"...)...),
		"8-bit, bare CR and LF": append(append(crlf("Subject: 8bit\nContent-Transfer-Encoding: 8bit\n\n"), eight.Bytes()...),
			"\r\nbare LF\n.not a line start\rbare CR\r\n"...),
	}
}

func TestPOP3RetrIsByteExact(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	fixtures := retrFixtures()
	var names []string
	for name, m := range fixtures {
		names = append(names, name)
		fake.AddMessage(mailboxA, m)
	}
	p := dialPOP3(t, b.POP3Addr())
	p.login(userA, passwordA)
	for i, name := range names {
		if got := p.retr(i + 1); !bytes.Equal(got, fixtures[name]) {
			t.Errorf("%s: got %d bytes that differ from the %d stored (at %d)", name, len(got), len(fixtures[name]), firstDiff(got, fixtures[name]))
		}
	}
	// TOP: the header and one body line.
	if l := p.cmd("TOP 1 1"); !strings.HasPrefix(l, "+OK") {
		t.Fatalf("TOP: %q", l)
	}
	var top bytes.Buffer
	p.body(nil, &top)
	want := fixtures[names[0]]
	if h, bodyStart := mime.SplitHeader(want); h == 0 || !bytes.HasPrefix(want, top.Bytes()) || top.Len() <= bodyStart {
		t.Errorf("TOP 1 1 = %q", top.Bytes())
	}
}

// TestPOP3WireBytesEqualUpstream compares the bytes a client receives
// through the bridge with those Outlook sends to a client of its own.
func TestPOP3WireBytesEqualUpstream(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	for _, m := range retrFixtures() {
		fake.AddMessage(mailboxA, m)
	}
	// Direct: our own XOAUTH2 session with the fake.
	token, err := b.Accounts()[0].OutlookTokens.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	up, err := (&upstream.POP3Dialer{Addr: fake.POP3Addr(), RootCAs: fake.CertPool()}).Dial(context.Background(), mailboxA, token)
	if err != nil {
		t.Fatal(err)
	}
	defer up.Conn.Close()
	direct := &popClient{t: t, conn: up.Conn, r: up.Reader}
	bridged := dialPOP3(t, b.POP3Addr())
	bridged.login(userA, passwordA)
	for _, cmd := range []string{"LIST", "UIDL", "RETR 1", "RETR 2", "RETR 3", "TOP 2 0", "CAPA"} {
		var viaDirect, viaBridge bytes.Buffer
		viaDirect.WriteString(direct.cmd("%s", cmd))
		direct.body(&viaDirect, nil)
		viaBridge.WriteString(bridged.cmd("%s", cmd))
		bridged.body(&viaBridge, nil)
		if !bytes.Equal(viaDirect.Bytes(), viaBridge.Bytes()) {
			t.Errorf("%s: the bridge's bytes differ from Outlook's (at %d)", cmd, firstDiff(viaDirect.Bytes(), viaBridge.Bytes()))
		}
	}
}

func TestPOP3LargeMessageSHA256(t *testing.T) {
	if testing.Short() {
		t.Skip("50 MB message")
	}
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	msg := bigMessage(50 << 20)
	want := sha256.Sum256(msg)
	fake.AddMessage(mailboxA, msg)
	p := dialPOP3(t, b.POP3Addr())
	p.login(userA, passwordA)
	if l := p.cmd("RETR 1"); !strings.HasPrefix(l, "+OK") {
		t.Fatal(l)
	}
	h := sha256.New()
	if err := p.body(nil, h); err != nil {
		t.Fatal(err)
	}
	if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
		t.Fatal("the 50 MB message arrived changed (SHA-256 differs)")
	}
}

// bigMessage makes a message of about size bytes: base64 lines, as a zip
// attachment would be, with dot lines and a long line among them.
func bigMessage(size int) []byte {
	var b bytes.Buffer
	b.Grow(size + 1024)
	b.WriteString("From: fleet@example.com\r\nSubject: replication package\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\n")
	line := []byte(base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0xfa, 0xce, 0x01}, 57)) + "\r\n")
	for i := 0; b.Len() < size; i++ {
		switch i % 10000 {
		case 17:
			b.WriteString(".\r\n..\r\n")
		case 9999:
			b.Write(bytes.Repeat([]byte("z"), 9000))
			b.WriteString("\r\n")
		default:
			b.Write(line)
		}
	}
	return b.Bytes()
}

func TestPOP3DeleCommitsOnlyOnQuit(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	for i := range 3 {
		fake.AddMessage(mailboxA, crlf(fmt.Sprintf("Subject: %d\n\nx\n", i)))
	}
	uids := fake.MailboxUIDs(mailboxA)

	// DELE, then the client drops the connection: nothing is deleted.
	p := dialPOP3(t, b.POP3Addr())
	p.login(userA, passwordA)
	if l := p.cmd("DELE 1"); !strings.HasPrefix(l, "+OK") {
		t.Fatal(l)
	}
	p.conn.Close()
	time.Sleep(100 * time.Millisecond)
	if got := fake.MailboxUIDs(mailboxA); len(got) != 3 {
		t.Fatalf("after DELE and a dropped connection the mailbox has %v, want all 3", got)
	}

	// DELE, RSET, DELE, QUIT: exactly the second deletion commits.
	p = dialPOP3(t, b.POP3Addr())
	p.login(userA, passwordA)
	p.cmd("DELE 1")
	p.cmd("RSET")
	p.cmd("DELE 2")
	if l := p.cmd("QUIT"); l != "+OK Microsoft Exchange Server 2016 POP3 server signing off." {
		t.Fatalf("QUIT: %q", l)
	}
	if got := fake.MailboxUIDs(mailboxA); len(got) != 2 || got[0] != uids[0] || got[1] != uids[2] {
		t.Fatalf("mailbox %v, want %v without %s", got, uids, uids[1])
	}
}

func TestPOP3UpstreamDropClosesClientWithoutOK(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	fake.AddMessage(mailboxA, bigMessage(1<<20))
	fake.AddMessage(mailboxA, crlf("Subject: 2\n\nx\n"))
	fake.FailPOP3(m365fake.POP3Fault{DropRetrAfter: 300 << 10})
	p := dialPOP3(t, b.POP3Addr())
	p.login(userA, passwordA)
	p.cmd("DELE 2")
	if l := p.cmd("RETR 1"); !strings.HasPrefix(l, "+OK") {
		t.Fatal(l)
	}
	if err := p.body(nil, nil); err == nil {
		t.Fatal("the client saw a complete message although Outlook dropped the connection")
	}
	fmt.Fprintf(p.conn, "QUIT\r\n")
	p.conn.SetReadDeadline(time.Now().Add(patience))
	if rest, _ := io.ReadAll(p.r); bytes.Contains(rest, []byte("+OK")) {
		t.Fatalf("the client got %q after the upstream failed", rest)
	}
	if len(fake.MailboxUIDs(mailboxA)) != 2 {
		t.Fatal("a deletion was committed")
	}
	waitFor(t, "the session's end logged as an upstream failure", func() bool { return strings.Contains(logs.String(), `"ended":"upstream failed"`) })
}

func TestPOP3UpstreamRefusalMapsToSysTemp(t *testing.T) {
	fake := startFake(t)
	fake.AddTenant("cccccccc-0000-0000-0000-00000000000c")
	fake.AddApp("cccccccc-0000-0000-0000-00000000000c", "c11e0000-0000-0000-0000-0000000000c1", "s", "Mail.Send")
	fake.AddMailbox("cccccccc-0000-0000-0000-00000000000c", "x@c.example")
	cfg := testConfig(fake)
	ha, _ := passwordHashes()
	cfg.Accounts = append(cfg.Accounts, config.AccountConfig{Name: "nopop", Username: "nopop", PasswordHash: ha, Mailbox: "x@c.example",
		TenantID: "cccccccc-0000-0000-0000-00000000000c", ClientID: "c11e0000-0000-0000-0000-0000000000c1", ClientSecret: "s", TokenURL: fake.TokenURL(), GraphURL: fake.GraphURL()})
	cfg.Accounts[1].POP3Mailbox = "other@fleet.example.net" // B has no access to it
	b, logs := startBridge(t, fake, cfg)
	for _, tc := range []struct{ user, pass, hint string }{
		{"nopop", passwordA, "add POP.AccessAsApp as an Application permission (Office 365 Exchange Online)"},
		{userB, passwordB, "FullAccess on the mailbox (Add-MailboxPermission)"},
	} {
		p := dialPOP3(t, b.POP3Addr())
		p.cmd("USER %s", tc.user)
		if l := p.cmd("PASS %s", tc.pass); !strings.HasPrefix(l, "-ERR [SYS/TEMP] ") {
			t.Errorf("%s: %q, want -ERR [SYS/TEMP]", tc.user, l)
		}
		line := findLogLine(t, logs.String(), "upstream login failed")
		if !strings.Contains(logs.String(), tc.hint) {
			t.Errorf("%s: the log does not explain %q:\n%s", tc.user, tc.hint, line)
		}
	}
	// Refused by Outlook for a good token (fault injection).
	fake.FailPOP3(m365fake.POP3Fault{RefuseAuth: true})
	p := dialPOP3(t, b.POP3Addr())
	p.cmd("USER %s", userA)
	if l := p.cmd("PASS %s", passwordA); !strings.HasPrefix(l, "-ERR [SYS/TEMP] ") {
		t.Errorf("refused login: %q", l)
	}
	// Bad client secret: the token is refused.
	cfg2 := testConfig(fake)
	cfg2.Accounts[0].ClientSecret = "nope"
	b2, logs2 := startBridge(t, fake, cfg2)
	p = dialPOP3(t, b2.POP3Addr())
	p.cmd("USER %s", userA)
	if l := p.cmd("PASS %s", passwordA); !strings.HasPrefix(l, "-ERR [SYS/TEMP] Microsoft 365 refused") {
		t.Errorf("bad secret: %q", l)
	}
	if !strings.Contains(logs2.String(), "AADSTS7000215") {
		t.Error("the log does not name AADSTS7000215")
	}
}

func TestPOP3OneTokenManySessionsAndNoSecretsLogged(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	fake.AddMessage(mailboxA, crlf("Subject: x\n\nx\n"))
	var wg sync.WaitGroup
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := dialPOP3(t, b.POP3Addr())
			p.login(userA, passwordA)
			p.retr(1)
			p.cmd("QUIT")
		}()
	}
	wg.Wait()
	if n := fake.TokenRequests(upstream.OutlookScope); n != 1 {
		t.Errorf("%d token requests for 20 sessions, want 1", n)
	}
	if n := fake.POP3Logins(); n != 20 {
		t.Errorf("%d upstream logins, want 20", n)
	}
	token, _ := b.Accounts()[0].OutlookTokens.Token(context.Background())
	waitFor(t, "20 sessions logged as ended", func() bool { return strings.Count(logs.String(), `"message":"session ended"`) >= 20 })
	out := logs.String()
	for what, s := range map[string]string{
		"password": passwordA, "secret": secretA, "token": token,
		"XOAUTH2 blob": base64.StdEncoding.EncodeToString([]byte("user=" + mailboxA + "\x01auth=Bearer " + token + "\x01\x01"))[:40],
	} {
		if strings.Contains(out, s) {
			t.Errorf("the log contains the %s", what)
		}
	}
	line := findLogLine(t, out, "session ended")
	for _, want := range []string{`"account":"tm-master"`, `"retr_count":1`, `"ended":"quit"`, `"upstream":"127.0.0.1:`} {
		if !strings.Contains(out, want) {
			t.Errorf("session line lacks %s: %s", want, line)
		}
	}
}

func TestPOP3LimitsAndTimeouts(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.POP3.MaxSessions = 2
	cfg.POP3.IdleTimeout = config.Duration{Duration: 300 * time.Millisecond}
	b, _ := startBridge(t, fake, cfg)
	p1, p2 := dialPOP3(t, b.POP3Addr()), dialPOP3(t, b.POP3Addr()) // both slots taken by logged-in clients
	p1.login(userA, passwordA)
	p2.login(userA, passwordA)
	c, err := net.Dial("tcp", b.POP3Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if l := newPOP3Client(t, c).line(); !strings.HasPrefix(l, "-ERR [SYS/TEMP]") {
		t.Errorf("third session: %q, want refused", l)
	}
	if l := p1.cmd("USER %s", strings.Repeat("u", 2000)); !strings.HasPrefix(l, "-ERR") {
		t.Errorf("long line: %q", l)
	}
	if l := p2.line(); !strings.Contains(l, "Idle timeout") {
		t.Errorf("idle client got %q", l)
	}
}

func TestPOP3ThroughSlowUpstream(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	fake.AddMessage(mailboxA, crlf("Subject: slow\n\nx\n"))
	fake.FailPOP3(m365fake.POP3Fault{Delay: 30 * time.Millisecond})
	p := dialPOP3(t, b.POP3Addr())
	p.login(userA, passwordA)
	if got := p.retr(1); !bytes.Equal(got, crlf("Subject: slow\n\nx\n")) {
		t.Errorf("got %q", got)
	}
}

// FuzzPOP3Command feeds arbitrary lines to the local POP3 server before
// login: every line gets one well-formed answer and the session survives.
func FuzzPOP3Command(f *testing.F) {
	for _, s := range []string{"CAPA", "USER x", "PASS y", "AUTH", "AUTH PLAIN", "AUTH LOGIN dXNlcg==", "AUTH PLAIN =", "STAT", "", " ", "QUIT x", "auth plain AHgAeQ==", "RETR 1", "AUTH XOAUTH2 abc"} {
		f.Add(s)
	}
	fake := startFake(f)
	b, _ := startBridge(f, fake, testConfig(fake))
	f.Fuzz(func(t *testing.T, line string) {
		if strings.ContainsAny(line, "\r\n") || len(line) > 1024 /* the command-line bound */ {
			return
		}
		p := dialPOP3(t, b.POP3Addr())
		l := p.cmd("%s", line)
		switch {
		case strings.HasPrefix(l, "+OK"), strings.HasPrefix(l, "-ERR"):
		case strings.HasPrefix(l, "+ "): // AUTH continuation: cancel it
			if l2 := p.cmd("*"); !strings.HasPrefix(l2, "-ERR") && !strings.HasPrefix(l2, "+ ") {
				t.Fatalf("%q then *: %q", line, l2)
			}
			return
		default:
			t.Fatalf("%q: answer %q", line, l)
		}
		// The bridge splits a command at any white space.
		cmd, arg := line, ""
		if i := strings.IndexFunc(line, unicode.IsSpace); i >= 0 {
			cmd, arg = line[:i], line[i:]
		}
		cmd = strings.ToUpper(cmd)
		if strings.HasPrefix(l, "+OK") && (cmd == "CAPA" || (cmd == "AUTH" && len(strings.Fields(arg)) == 0)) {
			for p.line() != "." {
			}
		}
		if cmd == "QUIT" {
			return
		}
		if l := p.cmd("NOOP"); !strings.HasPrefix(l, "-ERR") && !strings.HasPrefix(l, "+OK") {
			t.Fatalf("after %q the session answers NOOP with %q", line, l)
		}
	})
}

// stalledRetr starts a bridge with upstreamTimeout in front of a fake
// Outlook that answers the next RETR with "+OK" and nothing more, and
// returns the fake, the bridge's POP3 address and log, and a client logged
// in through the bridge.
func stalledRetr(t *testing.T, upstreamTimeout time.Duration) (*m365fake.Server, string, *logBuffer, *popClient) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.POP3.UpstreamTimeout = config.Duration{Duration: upstreamTimeout}
	b, logs := startBridge(t, fake, cfg)
	fake.AddMessage(mailboxA, crlf("Subject: x\n\nx\n"))
	fake.FailPOP3(m365fake.POP3Fault{StallRetr: true})
	p := dialPOP3(t, b.POP3Addr())
	p.login(userA, passwordA)
	return fake, b.POP3Addr(), logs, p
}

func TestPOP3StalledUpstreamEndsSession(t *testing.T) {
	fake, addr, logs, p := stalledRetr(t, 300*time.Millisecond)
	fmt.Fprintf(p.conn, "RETR 1\r\n")
	p.conn.SetReadDeadline(time.Now().Add(patience))
	got, err := io.ReadAll(p.r)
	if err != nil {
		t.Fatalf("the bridge did not close the connection: %v", err)
	}
	if bytes.Contains(got, []byte("\r\n.\r\n")) {
		t.Fatalf("the client saw a complete answer from a stalled upstream: %q", got)
	}
	waitFor(t, "the session's end", func() bool { return strings.Contains(logs.String(), `"ended":"upstream failed"`) })

	// A login that Outlook does not answer in time.
	fake.FailPOP3(m365fake.POP3Fault{Delay: time.Second})
	p = dialPOP3(t, addr)
	p.cmd("USER %s", userA)
	if l := p.cmd("PASS %s", passwordA); !strings.HasPrefix(l, "-ERR [SYS/TEMP] Outlook's POP3 service could not be reached") {
		t.Errorf("slow login: %q", l)
	}
}

// TestPOP3ClientSeesWhatArrived: while Outlook is slow to send the rest of
// an answer, what it sent (here its "+OK") reaches the client at once, not
// when a buffer fills or the answer ends.
func TestPOP3ClientSeesWhatArrived(t *testing.T) {
	_, _, _, p := stalledRetr(t, 10*time.Minute)
	if l := p.cmd("RETR 1"); l != "+OK" {
		t.Fatalf("RETR from a stalled Outlook: %q", l)
	}
}

// Passwords never reach the debug log, whatever the client sends: a PASS
// or AUTH after login, a tab instead of a space before login.
func TestPOP3PasswordsNeverLogged(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake)) // debug level
	p := dialPOP3(t, b.POP3Addr())
	p.cmd("USER %s", userA)
	p.cmd("PASS\tTabSecret-777")
	p.login(userA, passwordA)
	p.cmd("PASS PostLoginSecret-999")
	p.cmd("AUTH PLAIN %s", plainB64(userA, "AuthSecret-555"))
	p.cmd("APOP x ApopSecret-333")
	p.cmd("QUIT")
	waitFor(t, "the session's end", func() bool { return strings.Contains(logs.String(), `"ended":"quit"`) })
	for _, secret := range []string{"TabSecret-777", "PostLoginSecret-999", plainB64(userA, "AuthSecret-555"), "ApopSecret-333", passwordA} {
		if strings.Contains(logs.String(), secret) {
			t.Errorf("the log holds %q", secret)
		}
	}
	if !strings.Contains(logs.String(), `"command":"PASS"`) {
		t.Error("the PASS commands are not logged by their verb")
	}
}

func TestPOP3ThreeFailedLoginsClose(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	p := dialPOP3(t, b.POP3Addr())
	for i, want := range []string{"-ERR [AUTH] Authentication failed", "-ERR [AUTH] Authentication failed", "-ERR [AUTH] Too many failed logins"} {
		p.cmd("USER %s", userA)
		if l := p.cmd("PASS wrong%d", i); !strings.HasPrefix(l, want) {
			t.Fatalf("failure %d: %q, want %q", i+1, l, want)
		}
	}
	p.conn.SetReadDeadline(time.Now().Add(patience))
	if _, err := p.r.ReadString('\n'); err == nil {
		t.Error("the connection stayed open")
	}
}
