package bridge_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/mail"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/bridge/outbox"
	"mailbridge/upstream/m365fake"
)

// outboxConfig is testConfig with the outbox on, in a directory of the
// test's own.
func outboxConfig(t testing.TB, fake *m365fake.Server) *config.Config {
	cfg := testConfig(fake)
	on := true
	cfg.Outbox.EnabledSetting = &on
	cfg.Outbox.Dir = t.TempDir()
	cfg.Outbox.RatePerSecond = 10000
	return cfg
}

// startOutboxBridge starts a bridge whose outbox retries quickly
// (testOutboxRetry).
func startOutboxBridge(t testing.TB, fake *m365fake.Server, cfg *config.Config) (*bridge.Bridge, *logBuffer) {
	t.Helper()
	return startBridge(t, fake, cfg)
}

func numberedMessage(i int) []byte {
	return crlf(fmt.Sprintf("From: orders@example.com\nTo: x@example.org\nMessage-ID: <m%d@mailbridge.test>\nSubject: %d\n\nbody %d\n", i, i, i))
}

// waitDelivered waits until the fake has n messages and the outbox's queue
// is empty, then checks that each Message-ID arrived once, unchanged.
func waitDelivered(t testing.TB, fake *m365fake.Server, b *bridge.Bridge, want map[string][32]byte) {
	t.Helper()
	waitProgress(t, fmt.Sprintf("%d messages delivered", len(want)), func() int { return len(fake.Sent()) - queueLen(b) },
		func() bool { return len(fake.Sent()) >= len(want) && queueLen(b) == 0 })
	seen := map[string]int{}
	for _, m := range fake.Sent() {
		msg, err := mail.ReadMessage(bytes.NewReader(m.MIME))
		if err != nil {
			t.Fatal(err)
		}
		id := msg.Header.Get("Message-Id")
		seen[id]++
		if sha256.Sum256(m.MIME) != want[id] {
			t.Errorf("%s arrived changed", id)
		}
	}
	for id := range want {
		if seen[id] != 1 {
			t.Errorf("%s arrived %d times, want once", id, seen[id])
		}
	}
	if len(seen) != len(want) {
		t.Errorf("%d distinct messages arrived, want %d", len(seen), len(want))
	}
}

func queueLen(b *bridge.Bridge) int {
	entries, _ := os.ReadDir(filepath.Join(b.Outbox().Dir(), "queue"))
	return len(entries)
}

// readEnvelope reads the envelope of id in the outbox's sub ("queue" or
// "failed").
func readEnvelope(dir, sub, id string) (*outbox.Envelope, error) {
	data, err := os.ReadFile(filepath.Join(dir, sub, id+".json"))
	if err != nil {
		return nil, err
	}
	var env outbox.Envelope
	return &env, json.Unmarshal(data, &env)
}

func TestOutboxAbsorbsThrottlingAndOutage(t *testing.T) {
	fake := startFake(t)
	b, logs := startOutboxBridge(t, fake, outboxConfig(t, fake))
	fake.FailGraph(25, m365fake.Throttled("0.03"))
	fake.FailGraph(25, m365fake.Unavailable())
	want := map[string][32]byte{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
			for i := range 4 {
				n := w*10 + i
				msg := numberedMessage(n)
				reply, err := send(c, mailboxA, []string{"x@example.org"}, msg)
				if err != nil || !strings.Contains(reply, "queued as ") {
					t.Errorf("message %d: %q %v", n, reply, err)
				}
				mu.Lock()
				want[fmt.Sprintf("<m%d@mailbridge.test>", n)] = sha256.Sum256(msg)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	waitDelivered(t, fake, b, want)
	if n := fake.MaxConcurrent(mailboxA); n > 4 {
		t.Errorf("%d concurrent requests for one mailbox, Microsoft allows 4", n)
	}
	if !strings.Contains(logs.String(), "will retry") {
		t.Error("no retry was logged")
	}
}

func TestOutboxWaitsForTokenEndpoint(t *testing.T) {
	fake := startFake(t)
	fake.FailToken(6, m365fake.Fault{Status: 503}) // from the start-up check on
	b, logs := startOutboxBridge(t, fake, outboxConfig(t, fake))
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	msg := numberedMessage(1)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, msg); err != nil {
		t.Fatal(err)
	}
	waitDelivered(t, fake, b, map[string][32]byte{"<m1@mailbridge.test>": sha256.Sum256(msg)})
	if !strings.Contains(logs.String(), "Microsoft's sign-in service is busy") {
		t.Error("the token outage is not explained in the log")
	}
}

func TestOutboxPermanentFailureGoesToFailed(t *testing.T) {
	fake := startFake(t)
	b, logs := startOutboxBridge(t, fake, outboxConfig(t, fake))
	fake.FailGraph(1, m365fake.Fault{Status: 400, Code: "ErrorInvalidRecipients", Message: "At least one recipient is not valid."})
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	// Its Subject decodes to two lines: the report keeps it on one.
	msg := crlf("From: orders@example.com\nTo: x@example.org\nMessage-ID: <m1@mailbridge.test>\nSubject: =?utf-8?q?PO_4711=0D=0AX-Injected:_yes?=\n\nbody 1\n")
	reply, err := send(c, mailboxA, []string{"x@example.org"}, msg)
	if err != nil {
		t.Fatalf("the client did not get 250: %v", err)
	}
	_, id, _ := strings.Cut(reply, "queued as ")
	waitFor(t, "the message in failed/", func() bool {
		_, err := os.Stat(filepath.Join(b.Outbox().Dir(), "failed", id+".json"))
		return err == nil
	})
	var env outbox.Envelope
	data, _ := os.ReadFile(filepath.Join(b.Outbox().Dir(), "failed", id+".json"))
	if err := json.Unmarshal(data, &env); err != nil {
		t.Fatal(err)
	}
	if env.Failure == nil || env.Failure.GraphStatus != 400 || env.Failure.GraphCode != "ErrorInvalidRecipients" || env.Failure.RequestID == "" {
		t.Errorf("failure %+v", env.Failure)
	}
	if _, err := os.Stat(filepath.Join(b.Outbox().Dir(), "failed", id+".eml")); err != nil {
		t.Error("the message itself is not in failed/")
	}
	line := findLogLine(t, logs.String(), "message failed")
	if !strings.Contains(line, `"level":"error"`) || !strings.Contains(line, id) {
		t.Errorf("log line %s", line)
	}
	if queueLen(b) != 0 {
		t.Error("the message is still queued")
	}
	// The sender hears of it: a non-delivery report from the account's
	// mailbox, to the envelope sender, with the original's header.
	sent := fake.Sent()
	if len(sent) != 1 {
		t.Fatalf("%d messages reached Graph, want the report alone", len(sent))
	}
	ndr := sent[0]
	if ndr.User != mailboxA || ndr.From != mailboxA || !slices.Equal(ndr.Recipients, []string{mailboxA}) {
		t.Errorf("report sent as %s from %s to %v, want from and to %s", ndr.User, ndr.From, ndr.Recipients, mailboxA)
	}
	report := string(ndr.MIME)
	for _, want := range []string{
		"Content-Type: multipart/report; report-type=delivery-status;",
		"Auto-Submitted: auto-replied",
		"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mailbridge\r\n",
		"Final-Recipient: rfc822; x@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: x-graph; 400 ErrorInvalidRecipients",
		"Subject:    PO 4711 X-Injected: yes\r\n",
		"sent again unchanged, it would fail the same way",
		"Content-Type: text/rfc822-headers\r\n\r\nFrom: orders@example.com\r\nTo: x@example.org\r\nMessage-ID: <m1@mailbridge.test>\r\n",
		"Queue ID:   " + id,
	} {
		if !strings.Contains(report, want) {
			t.Errorf("the report lacks %q:\n%s", want, report)
		}
	}
	if strings.Contains(report, "\r\nX-Injected: yes") || strings.Contains(report, "queue retry") {
		t.Errorf("the report has a line from the Subject, or suggests a retry that would fail the same way:\n%s", report)
	}
	if !env.Failure.NDRSent || env.Failure.NDRRequestID != ndr.RequestID {
		t.Errorf("failed/ records the report as %+v, want sent with request-id %s", env.Failure, ndr.RequestID)
	}
}

// No report for an automatic message (Auto-Submitted), nor for a report:
// no loop can start.
func TestOutboxNoReportForAutomaticMessages(t *testing.T) {
	fake := startFake(t)
	b, logs := startOutboxBridge(t, fake, outboxConfig(t, fake))
	fake.FailGraph(2, m365fake.Fault{Status: 400, Code: "ErrorInvalidRecipients", Message: "At least one recipient is not valid."})
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	for _, msg := range [][]byte{
		crlf("From: orders@example.com\nTo: x@example.org\nAuto-Submitted: auto-generated\nSubject: auto\n\nx\n"),
		crlf("From: orders@example.com\nTo: x@example.org\nContent-Type: multipart/report; report-type=delivery-status; boundary=b\n\n--b\n\nx\n--b--\n"),
	} {
		if _, err := send(c, mailboxA, []string{"x@example.org"}, msg); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "both messages in failed/", func() bool { return strings.Count(logs.String(), `"message":"message failed"`) == 2 })
	if n := len(fake.Sent()); n != 0 {
		t.Errorf("%d reports sent for automatic messages", n)
	}
	for _, why := range []string{"the message is automatic (Auto-Submitted: auto-generated)", "the message is itself a report"} {
		if !strings.Contains(logs.String(), why) {
			t.Errorf("no log line says %q", why)
		}
	}
}

func TestOutboxDiskBound(t *testing.T) {
	fake := startFake(t)
	cfg := outboxConfig(t, fake)
	cfg.Outbox.MaxBytes = 300
	b, _ := startOutboxBridge(t, fake, cfg)
	fake.FailGraph(1000, m365fake.Unavailable()) // nothing leaves the outbox
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, numberedMessage(1)); err != nil {
		t.Fatal(err)
	}
	big := append(numberedMessage(2), bytes.Repeat([]byte("x"), 300)...)
	_, err := send(c, mailboxA, []string{"x@example.org"}, big)
	if code, ec := smtpCode(err); code != 452 || ec != (smtp.EnhancedCode{4, 3, 1}) {
		t.Fatalf("got %v, want 452 4.3.1", err)
	}
	tmp, _ := filepath.Glob(filepath.Join(b.Outbox().Dir(), "tmp", "*.eml"))
	queue, _ := os.ReadDir(filepath.Join(b.Outbox().Dir(), "queue"))
	if len(tmp) != 0 || len(queue) != 2 {
		t.Errorf("tmp has %d messages, queue %d files; want none and one message (2 files)", len(tmp), len(queue))
	}
}

func TestOutboxClientGoneInData(t *testing.T) {
	fake := startFake(t)
	b, _ := startOutboxBridge(t, fake, outboxConfig(t, fake))
	r := dialRaw(t, b.SMTPAddr())
	r.cmd(334, "AUTH LOGIN")
	r.cmd(334, "%s", "dG1tYXN0ZXI=")
	r.cmd(235, "%s", "Y29ycmVjdCBob3JzZQ==")
	r.cmd(250, "MAIL FROM:<%s>", mailboxA)
	r.cmd(250, "RCPT TO:<x@example.org>")
	r.cmd(354, "DATA")
	r.tp.PrintfLine("From: orders@example.com")
	r.tp.PrintfLine("Subject: half")
	r.conn.Close()
	time.Sleep(200 * time.Millisecond)
	entries, _ := os.ReadDir(filepath.Join(b.Outbox().Dir(), "queue"))
	tmp, _ := os.ReadDir(filepath.Join(b.Outbox().Dir(), "tmp"))
	if len(entries) != 0 || len(tmp) != 0 || len(fake.Sent()) != 0 {
		t.Errorf("queue %d, tmp %d, sent %d: want nothing", len(entries), len(tmp), len(fake.Sent()))
	}
}

func TestOutboxReplayedAfterRestart(t *testing.T) {
	fake := startFake(t)
	cfg := outboxConfig(t, fake)
	b1, _ := startOutboxBridge(t, fake, cfg)
	fake.FailGraph(10000, m365fake.Unavailable())
	want := map[string][32]byte{}
	c := dialAuth(t, b1.SMTPAddr(), userA, passwordA)
	for i := range 3 {
		msg := numberedMessage(i)
		if _, err := send(c, mailboxA, []string{"x@example.org"}, msg); err != nil {
			t.Fatal(err)
		}
		want[fmt.Sprintf("<m%d@mailbridge.test>", i)] = sha256.Sum256(msg)
	}
	c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b1.Shutdown(ctx)
	if n := queueLen(b1); n != 6 {
		t.Fatalf("%d files queued after the stop, want 3 messages", n)
	}
	// A crash after Graph's 202 but before the clean-up: the entry is
	// marked sent and must not go again.
	store := b1.Outbox()
	extra := &outbox.Envelope{Account: "tm-master", GraphUser: mailboxA, Size: 10, Received: time.Now(), NextAttempt: time.Now()}
	if err := store.Add(extra, bytes.NewReader([]byte("0123456789")), 0); err != nil {
		t.Fatal(err)
	}
	queued := filepath.Join(store.Dir(), "queue", extra.ID)
	os.Rename(queued+".json", queued+".sent")

	fake.ClearFaults()
	b2, _ := startOutboxBridge(t, fake, cfg)
	waitDelivered(t, fake, b2, want)
}

func TestOutboxMaxAge(t *testing.T) {
	fake := startFake(t)
	cfg := outboxConfig(t, fake)
	cfg.Outbox.MaxAge = config.Duration{Duration: 150 * time.Millisecond}
	b, _ := startOutboxBridge(t, fake, cfg)
	fake.FailGraph(10000, m365fake.Unavailable())
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	reply, err := send(c, mailboxA, []string{"x@example.org"}, numberedMessage(1))
	if err != nil {
		t.Fatal(err)
	}
	_, id, _ := strings.Cut(reply, "queued as ")
	waitFor(t, "the message in failed/", func() bool {
		env, err := readEnvelope(cfg.Outbox.Dir, "failed", id)
		return err == nil && strings.Contains(env.Failure.Reason, "max_age") && strings.Contains(env.Failure.Reason, "HTTP 503")
	})
}

// TestOutboxSoak sends 50 clients × 200 messages while the fake throttles,
// fails and drops connections at random; every message must arrive once,
// unchanged, and the outbox must end empty.
func TestOutboxSoak(t *testing.T) {
	clients, perClient := 50, 200
	if testing.Short() {
		clients, perClient = 10, 20
	}
	fake := startFake(t)
	cfg := outboxConfig(t, fake)
	cfg.SMTP.MaxSessions = 100
	cfg.Log.Level = "info"
	b, _ := startOutboxBridge(t, fake, cfg)
	rng := rand.New(rand.NewPCG(1, 2))
	for range clients * perClient / 5 {
		switch rng.IntN(3) {
		case 0:
			fake.FailGraph(1, m365fake.Throttled("0.01"))
		case 1:
			fake.FailGraph(1, m365fake.Unavailable())
		case 2:
			fake.FailGraph(1, m365fake.Fault{Drop: true})
		}
		fake.FailGraph(rng.IntN(4), m365fake.Fault{}) // some requests pass in between
	}
	soakStart := time.Now()
	want := make(map[string][32]byte, clients*perClient)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
			for i := range perClient {
				n := w*perClient + i
				msg := numberedMessage(n)
				if _, err := send(c, mailboxA, []string{"x@example.org"}, msg); err != nil {
					t.Errorf("message %d: %v", n, err)
					return
				}
				mu.Lock()
				want[fmt.Sprintf("<m%d@mailbridge.test>", n)] = sha256.Sum256(msg)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	t.Logf("accepted %d messages in %v; %d delivered so far", len(want), time.Since(soakStart), len(fake.Sent()))
	waitDelivered(t, fake, b, want)
	t.Logf("all delivered after %v", time.Since(soakStart))
	if n := fake.MaxConcurrent(mailboxA); n > 4 {
		t.Errorf("%d concurrent requests for one mailbox", n)
	}
}

// A wrong secret is known at start: with the outbox on, MAIL FROM gets 451
// and nothing is queued (it could only wait until max_age); once the
// secret is fixed and the configuration reloaded, messages are taken.
func TestWrongSecretRefusedAtMailUntilFixed(t *testing.T) {
	fake := startFake(t)
	cfg := outboxConfig(t, fake)
	cfg.Accounts[0].ClientSecret = "Wrong8Q~an.old.secret.value" // a wrong Value (a Secret ID is caught offline)
	b, logs := startOutboxBridge(t, fake, cfg)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	err := c.Mail(mailboxA, nil)
	if code, ec := smtpCode(err); code != 451 || ec != (smtp.EnhancedCode{4, 7, 0}) {
		t.Fatalf("MAIL FROM with a refused secret: %v, want 451 4.7.0", err)
	}
	if !strings.Contains(err.Error(), "AADSTS7000215") {
		t.Errorf("the reply does not name the refusal: %v", err)
	}
	line := findLogLine(t, logs.String(), "message refused at MAIL: Microsoft 365 refuses this account's sign-in")
	if !strings.Contains(line, `"hint":"the client secret is wrong`) {
		t.Errorf("refusal logged as %s", line)
	}
	if n := queueLen(b); n != 0 {
		t.Fatalf("%d files queued", n)
	}
	fixed := *cfg
	fixed.Accounts = slices.Clone(cfg.Accounts)
	fixed.Accounts[0].ClientSecret = secretA
	if err := b.Reload(&fixed); err != nil {
		t.Fatal(err)
	}
	c2 := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	msg := numberedMessage(1)
	reply, err := send(c2, mailboxA, []string{"x@example.org"}, msg)
	if err != nil || !strings.Contains(reply, "queued as") {
		t.Fatalf("after the fix: %q %v", reply, err)
	}
	waitDelivered(t, fake, b, map[string][32]byte{"<m1@mailbridge.test>": sha256.Sum256(msg)})
}

// A message queued by one run and delivered by the next ends in one
// "message sent" line that still names the session that received it, its
// Message-ID and its recipients.
func TestFinalLineAfterRestart(t *testing.T) {
	fake := startFake(t)
	cfg := outboxConfig(t, fake)
	b1, logs1 := startOutboxBridge(t, fake, cfg)
	fake.FailGraph(10000, m365fake.Unavailable())
	c := dialAuth(t, b1.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org", "y@example.org"}, numberedMessage(7)); err != nil {
		t.Fatal(err)
	}
	queued := findLogLine(t, logs1.String(), "message queued")
	session := regexp.MustCompile(`"session":"(\w+)"`).FindStringSubmatch(queued)[1]
	c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b1.Shutdown(ctx)
	fake.ClearFaults()
	_, logs2 := startOutboxBridge(t, fake, cfg)
	waitFor(t, "the delivery", func() bool { return strings.Contains(logs2.String(), `"message":"message sent"`) })
	line := findLogLine(t, logs2.String(), "message sent")
	for _, want := range []string{
		`"session":"` + session + `"`, `"remote":"127.0.0.1:`, `"account":"tm-master"`, `"queue_id":"`, `"message_id":"<m7@mailbridge.test>"`,
		`"from":"orders@example.com"`, `"rcpt":["x@example.org","y@example.org"]`, `"rcpt_count":2`, `"bytes":`, `"graph_user":"orders@example.com"`,
		`"graph_status":202`, `"request_id":"`, `"attempts":`, `"path":"sendMail"`, `"duration_ms":`,
	} {
		if !strings.Contains(line, want) {
			t.Errorf("final line lacks %s: %s", want, line)
		}
	}
	if !regexp.MustCompile(`"age_ms":\d+,`).MatchString(line) {
		t.Errorf("age_ms is not an integer: %s", line)
	}
	if strings.Count(logs2.String(), `"message":"message sent"`) != 1 {
		t.Error("more than one final line")
	}
}

// When outbox/failed cannot take a message (here a file stands where the
// directory should be), the message stays queued and fails again at each
// rescan, but its sender gets one report, not one per rescan; the log
// and /healthz say what is wrong.
func TestOutboxOneReportWhenFailedDirIsUnusable(t *testing.T) {
	fake := startFake(t)
	cfg := outboxConfig(t, fake)
	cfg.Admin.Listen = "127.0.0.1:0"
	b, logs := startOutboxBridge(t, fake, cfg)
	failedDir := filepath.Join(b.Outbox().Dir(), "failed")
	if err := os.Remove(failedDir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(failedDir, []byte("not a directory"), 0o600); err != nil {
		t.Fatal(err)
	}
	fake.RefuseRecipients("example.org") // the message, not its report (to orders@example.com)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, numberedMessage(1)); err != nil {
		t.Fatal(err)
	}
	// Three failed moves: three rescans, each failing the message again.
	waitFor(t, "three failed moves to failed/", func() bool {
		return len(linesWith(logs.String(), "outbox: cannot move the message to failed/")) >= 3
	})
	if n := len(fake.Sent()); n != 1 {
		t.Errorf("%d reports sent for one failed message, want 1", n)
	}
	if line := linesWith(logs.String(), "outbox: cannot move the message to failed/")[0]; !strings.Contains(line, `"hint":"outbox/failed cannot take the message`) {
		t.Errorf("the failed move is not explained: %s", line)
	}
	code, body := scrape(t, "http://"+b.AdminAddr()+"/healthz")
	if code != 503 || !strings.Contains(body, "could not be moved to outbox/failed") {
		t.Errorf("/healthz: %d %s", code, body)
	}
	if queueLen(b) == 0 {
		t.Error("the message left the queue though failed/ could not take it")
	}
}
