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
	waitFor(t, fmt.Sprintf("%d messages delivered", len(want)), func() bool { return len(fake.Sent()) >= len(want) && queueLen(b) == 0 })
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
	b, logs := startOutboxBridge(t, fake, outboxConfig(t, fake))
	fake.FailToken(6, m365fake.Fault{Status: 503})
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
	reply, err := send(c, mailboxA, []string{"x@example.org"}, numberedMessage(1))
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
	line := findLogLine(t, logs.String(), "message failed for good: moved to outbox/failed")
	if !strings.Contains(line, `"level":"error"`) || !strings.Contains(line, id) {
		t.Errorf("log line %s", line)
	}
	if queueLen(b) != 0 || len(fake.Sent()) != 0 {
		t.Error("the message is still queued or was sent")
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
	waitForLong(t, "every message delivered", 60*time.Second, func() bool { return len(fake.Sent()) >= len(want) && queueLen(b) == 0 })
	t.Logf("all delivered after %v", time.Since(soakStart))
	waitDelivered(t, fake, b, want)
	if n := fake.MaxConcurrent(mailboxA); n > 4 {
		t.Errorf("%d concurrent requests for one mailbox", n)
	}
}

func waitForLong(t testing.TB, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
