package bridge_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/textproto"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/rs/zerolog"
	"golang.org/x/crypto/bcrypt"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/bridge/deliver"
	"mailbridge/upstream/m365fake"
	"mailbridge/upstream/m365fake/m365test"
)

// Test tenants, apps and users of the fake Microsoft 365.
const (
	tenantA   = "aaaaaaaa-0000-0000-0000-00000000000a"
	clientA   = "c11e0000-0000-0000-0000-00000000000a"
	secretA   = "secret-A~value.abc123"
	tenantB   = "bbbbbbbb-0000-0000-0000-00000000000b"
	clientB   = "c11e0000-0000-0000-0000-00000000000b"
	secretB   = "secret-B~value.xyz789"
	mailboxA  = "orders@example.com"
	mailboxB  = "ops@fleet.example.net"
	userA     = "tmmaster"
	passwordA = "correct horse"
	userB     = "scanner"
	passwordB = "battery staple"
)

// startFake starts a fake Microsoft 365 with two tenants, each with an app
// allowed to send and a mailbox. It stops when the test ends.
func startFake(t testing.TB) *m365fake.Server {
	t.Helper()
	return m365test.Start(t,
		m365test.Tenant{ID: tenantA, ClientID: clientA, Secret: secretA, Roles: []string{"Mail.Send", "POP.AccessAsApp", "IMAP.AccessAsApp"},
			Mailboxes: []string{mailboxA, "captain@example.com"}, Aliases: map[string][]string{mailboxA: {"sales@example.com"}},
			FullAccess: []string{mailboxA}},
		m365test.Tenant{ID: tenantB, ClientID: clientB, Secret: secretB, Roles: []string{"Mail.Send", "POP.AccessAsApp"},
			Mailboxes: []string{mailboxB}, FullAccess: []string{mailboxB}})
}

var (
	hashOnce           sync.Once
	hashA, hashB       string
	testAuthFailDelay  = 5 * time.Millisecond
	testSendTimeout    = 10 * time.Second
	testShutdownPeriod = 5 * time.Second
	// Retries come quickly in tests.
	testRetry       = deliver.RetryPolicy{Base: 10 * time.Millisecond, Max: 50 * time.Millisecond}
	testOutboxRetry = deliver.RetryPolicy{Base: 10 * time.Millisecond, Max: 100 * time.Millisecond}
)

func passwordHashes() (string, string) {
	hashOnce.Do(func() {
		a, _ := bcrypt.GenerateFromPassword([]byte(passwordA), bcrypt.MinCost)
		b, _ := bcrypt.GenerateFromPassword([]byte(passwordB), bcrypt.MinCost)
		hashA, hashB = string(a), string(b)
	})
	return hashA, hashB
}

// testConfig returns a configuration with account A (tenant A) and account
// B (tenant B) pointing at fake, listening on a free loopback port.
func testConfig(fake *m365fake.Server) *config.Config {
	ha, hb := passwordHashes()
	cfg := config.Default()
	cfg.Log.Level = "debug"
	cfg.SMTP.Listen = "127.0.0.1:0"
	cfg.SMTP.SendTimeout = config.Duration{Duration: testSendTimeout}
	cfg.POP3.Listen = "127.0.0.1:0"
	cfg.POP3.Upstream = fake.POP3Addr()
	cfg.POP3.UpstreamTimeout = config.Duration{Duration: testSendTimeout}
	cfg.IMAP.Listen = "127.0.0.1:0"
	cfg.IMAP.Upstream = fake.IMAPAddr()
	cfg.IMAP.UpstreamTimeout = config.Duration{Duration: testSendTimeout}
	off := false
	cfg.Outbox.EnabledSetting = &off // the outbox's own tests turn it on
	cfg.Accounts = []config.AccountConfig{
		{
			Name: "tm-master", Username: userA, PasswordHash: ha, Mailbox: mailboxA,
			TenantID: tenantA, ClientID: clientA, ClientSecret: secretA,
			AllowedSenders: []string{mailboxA, "sales@example.com"},
			Protocols:      []string{"smtp", "pop3", "imap"},
			TokenURL:       fake.TokenURL(), GraphURL: fake.GraphURL(),
		},
		{
			Name: "scanner", Username: userB, PasswordHash: hb, Mailbox: mailboxB,
			TenantID: tenantB, ClientID: clientB, ClientSecret: secretB,
			TokenURL: fake.TokenURL(), GraphURL: fake.GraphURL(),
		},
	}
	return cfg
}

// logBuffer collects log lines for assertions while also passing them to
// the test's log.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	tw  io.Writer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	l.buf.Write(p)
	l.mu.Unlock()
	if l.tw != nil {
		l.tw.Write(p)
	}
	return len(p), nil
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// startBridge starts a bridge on cfg (completed here) that trusts fake's
// CA. It is shut down when the test ends.
func startBridge(t testing.TB, fake *m365fake.Server, cfg *config.Config) (*bridge.Bridge, *logBuffer) {
	t.Helper()
	return startBridgeWith(t, fake, cfg, nil)
}

// startBridgeWith is startBridge with options changed by tweak.
func startBridgeWith(t testing.TB, fake *m365fake.Server, cfg *config.Config, tweak func(*bridge.Options)) (*bridge.Bridge, *logBuffer) {
	t.Helper()
	if err := cfg.Complete(""); err != nil {
		t.Fatal(err)
	}
	logs := &logBuffer{}
	if tt, ok := t.(*testing.T); ok && testing.Verbose() {
		logs.tw = zerolog.NewTestWriter(tt)
	}
	opts := bridge.Options{Logger: bridge.NewLogger(logs, cfg.Log), RootCAs: fake.CertPool(), AuthFailureDelay: testAuthFailDelay,
		Retry: testRetry, OutboxRetry: testOutboxRetry, Version: "test",
		// Start waits for the credentials check, which tests look at,
		// however slow a busy machine makes it.
		SignInWait: patience}
	if tweak != nil {
		tweak(&opts)
	}
	b, err := bridge.New(cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), testShutdownPeriod)
		defer cancel()
		b.Shutdown(ctx)
		// Every line the bridge wrote is JSON that a strict parser takes.
		for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
			if key := duplicateKey(line); key != "" {
				t.Errorf("the log line repeats the key %q: %s", key, line)
			}
		}
	})
	return b, logs
}

// duplicateKey returns a key that the JSON object line has twice at its
// top level, "" if none (or if line is no JSON object).
func duplicateKey(line string) string {
	dec := json.NewDecoder(strings.NewReader(line))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return ""
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return ""
		}
		key, _ := tok.(string)
		if seen[key] {
			return key
		}
		seen[key] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return ""
		}
	}
	return ""
}

// dialAuth connects a go-smtp client and logs in with PLAIN.
func dialAuth(t testing.TB, addr, user, password string) *smtp.Client {
	t.Helper()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Auth(sasl.NewPlainClient("", user, password)); err != nil {
		t.Fatalf("AUTH PLAIN: %v", err)
	}
	return c
}

// send sends msg with an already authenticated client and returns the
// server's reply to the data, or its error.
func send(c *smtp.Client, from string, to []string, msg []byte) (string, error) {
	if err := c.Mail(from, nil); err != nil {
		return "", err
	}
	for _, r := range to {
		if err := c.Rcpt(r, nil); err != nil {
			return "", err
		}
	}
	w, err := c.Data()
	if err != nil {
		return "", err
	}
	if _, err := w.Write(msg); err != nil {
		return "", err
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return "", err
	}
	return resp.StatusText, nil
}

// smtpCode returns the reply code of an *smtp.SMTPError, or 0.
func smtpCode(err error) (int, smtp.EnhancedCode) {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code, se.EnhancedCode
	}
	return 0, smtp.EnhancedCode{}
}

// rawSession is a hand-driven SMTP dialogue, for what go-smtp's client
// does not send (.NET's AUTH LOGIN forms, commands out of order).
type rawSession struct {
	t    testing.TB
	conn net.Conn
	tp   *textproto.Conn
}

func dialRaw(t testing.TB, addr string) *rawSession {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(patience))
	t.Cleanup(func() { conn.Close() })
	r := &rawSession{t: t, conn: conn, tp: textproto.NewConn(conn)}
	r.expect(220)
	r.cmd(250, "EHLO test.local")
	return r
}

// cmd sends a line and checks the reply code; it returns the reply text.
func (r *rawSession) cmd(code int, format string, args ...any) string {
	r.t.Helper()
	if err := r.tp.PrintfLine(format, args...); err != nil {
		r.t.Fatal(err)
	}
	return r.expect(code)
}

func (r *rawSession) expect(code int) string {
	r.t.Helper()
	got, msg, err := r.tp.ReadResponse(0)
	if err != nil && got == 0 {
		r.t.Fatalf("reading reply: %v", err)
	}
	if got != code {
		r.t.Fatalf("got reply %d %q, want %d", got, msg, code)
	}
	return msg
}

// waitFor polls cond until it is true or the deadline passes.
// patience is how long a test waits for one thing that should come soon:
// generous, so that a busy machine is slow, not a failure.
const patience = 60 * time.Second

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(patience)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitProgress waits until done, for work whose length scales with the
// machine: it fails only when progress has not changed for patience.
func waitProgress(t testing.TB, what string, progress func() int, done func() bool) {
	t.Helper()
	last, since := progress(), time.Now()
	for !done() {
		if p := progress(); p != last {
			last, since = p, time.Now()
		} else if time.Since(since) > patience {
			t.Fatalf("waiting for %s: no progress for %v (at %d)", what, patience, p)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func crlf(s string) []byte { return []byte(strings.ReplaceAll(s, "\n", "\r\n")) }

func writeFile(t testing.TB, p, data string) {
	t.Helper()
	if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

// linesWith returns the log lines whose message is message, in order.
func linesWith(logs, message string) []string {
	var found []string
	for _, line := range strings.Split(logs, "\n") {
		if strings.Contains(line, `"message":"`+message) {
			found = append(found, line)
		}
	}
	return found
}

// addedMessageID matches the Message-ID field the bridge adds to a message
// that has none.
var addedMessageID = regexp.MustCompile(`Message-ID: (<[0-9]{14}\.[0-9a-f]{20}\.mailbridge@[a-z0-9.-]+>)\r\n`)

// withoutAddedID returns raw without the Message-ID field the bridge added,
// failing unless there is exactly one.
func withoutAddedID(t *testing.T, raw []byte) []byte {
	t.Helper()
	if n := len(addedMessageID.FindAllIndex(raw, -1)); n != 1 {
		t.Fatalf("%d Message-ID fields added by the bridge, want 1:\n%.600q", n, raw)
	}
	return addedMessageID.ReplaceAll(raw, nil)
}
