package bridge_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"mailbridge/bridge/admin"
	"mailbridge/bridge/config"
	"mailbridge/upstream/m365fake"
)

func scrape(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestMetricsAndHealth(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.Admin.Listen = "127.0.0.1:0"
	cfg.Accounts[1].ClientSecret = "wrong" // account B's sign-in will fail
	b, _ := startBridge(t, fake, cfg)
	base := "http://" + b.AdminAddr()

	// The bridge fetched each account's token at start: B's was refused.
	if code, body := scrape(t, base+"/healthz"); code != 503 || !strings.Contains(body, `account scanner: token request refused: invalid_client`) {
		t.Fatalf("healthz after start: %d %s", code, body)
	}
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	sentBytes := 0
	for i := range 2 {
		msg := crlf(fmt.Sprintf("From: orders@example.com\nTo: x@example.org\nMessage-ID: <m%d@example.com>\n\n0123456789\n", i))
		if _, err := send(c, mailboxA, []string{"x@example.org"}, msg); err != nil {
			t.Fatal(err)
		}
		sentBytes += len(msg)
	}
	send(c, "ceo@example.com", []string{"x@example.org"}, nil) // refused at MAIL FROM: not a message
	fake.AddMessage(mailboxA, crlf("Subject: m\n\n0123456789\n"))
	p := dialPOP3(t, b.POP3Addr())
	p.login(userA, passwordA)
	p.retr(1)
	p.cmd("QUIT")
	cB := dialAuth(t, b.SMTPAddr(), userB, passwordB)
	send(cB, mailboxB, []string{"x@example.org"}, crlf("From: ops@fleet.example.net\nTo: x@example.org\n\nx\n"))

	_, m := scrape(t, base+"/metrics")
	for _, want := range []string{
		`mailbridge_messages_total{account="tm-master",reason="",result="sent"} 2`,
		`mailbridge_messages_total{account="scanner",reason="credentials",result="refused"} 1`,
		fmt.Sprintf(`mailbridge_message_bytes_total{account="tm-master"} %d`, sentBytes),
		`mailbridge_upstream_responses_total{op="sendMail",status="202"} 2`,
		`mailbridge_upstream_responses_total{op="token",status="200"} 2`,
		`mailbridge_upstream_responses_total{op="token",status="401"} 1`,
		`mailbridge_upstream_request_duration_seconds_count{op="sendMail"} 2`,
		`mailbridge_sessions_total{proto="smtp"} 2`,
		`mailbridge_sessions_total{proto="pop3"} 1`,
		`mailbridge_pop3_retr_bytes_total{account="tm-master"} 29`,
	} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	code, body := scrape(t, base+"/healthz")
	var h struct {
		Status  string   `json:"status"`
		Reasons []string `json:"reasons"`
	}
	json.Unmarshal([]byte(body), &h)
	if code != 503 || h.Status != "unhealthy" || len(h.Reasons) != 1 || !strings.Contains(h.Reasons[0], "account scanner: token request refused: invalid_client") || !strings.Contains(h.Reasons[0], "fix: the client secret is wrong") {
		t.Errorf("healthz with a refused secret: %d %s", code, body)
	}
}

func TestOutboxMetrics(t *testing.T) {
	fake := startFake(t)
	cfg := outboxConfig(t, fake)
	cfg.Admin.Listen = "127.0.0.1:0"
	b, _ := startOutboxBridge(t, fake, cfg)
	fake.FailGraph(100000, m365fake.Unavailable())
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	send(c, mailboxA, []string{"x@example.org"}, numberedMessage(1))
	_, m := scrape(t, "http://"+b.AdminAddr()+"/metrics")
	for _, want := range []string{`mailbridge_outbox_messages 1`, `mailbridge_messages_total{account="tm-master",reason="",result="queued"} 1`} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if !strings.Contains(m, "mailbridge_outbox_oldest_age_seconds ") {
		t.Error("no outbox age")
	}
}

// /healthz turns 503 when a message failed within admin.failed_window, and
// 200 again once `queue delete` removed it; also when the oldest queued
// message is older than admin.max_queue_age.
func TestHealthTellsOfFailedAndStuckMessages(t *testing.T) {
	fake := startFake(t)
	cfg := outboxConfig(t, fake)
	cfg.Admin.Listen = "127.0.0.1:0"
	cfg.Admin.MaxQueueAge = config.Duration{Duration: 300 * time.Millisecond}
	b, _ := startOutboxBridge(t, fake, cfg)
	base := "http://" + b.AdminAddr()
	if code, body := scrape(t, base+"/healthz"); code != 200 {
		t.Fatalf("healthz at start: %d %s", code, body)
	}
	fake.FailGraph(1, m365fake.Fault{Status: 400, Code: "ErrorInvalidRecipients", Message: "At least one recipient is not valid."})
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	reply, err := send(c, mailboxA, []string{"x@example.org"}, numberedMessage(1))
	if err != nil {
		t.Fatal(err)
	}
	_, id, _ := strings.Cut(reply, "queued as ")
	waitFor(t, "the failure in /healthz", func() bool {
		code, body := scrape(t, base+"/healthz")
		return code == 503 && strings.Contains(body, "1 message(s) failed within admin.failed_window")
	})
	if _, m := scrape(t, base+"/metrics"); !strings.Contains(m, "mailbridge_outbox_failed 1\n") {
		t.Error("/metrics lacks mailbridge_outbox_failed 1")
	}
	if err := b.Outbox().Delete(id); err != nil {
		t.Fatal(err)
	}
	if code, body := scrape(t, base+"/healthz"); code != 200 {
		t.Fatalf("healthz after queue delete: %d %s", code, body)
	}
	// Graph is down: the message waits, and past max_queue_age health is red.
	fake.FailGraph(100000, m365fake.Unavailable())
	if _, err := send(c, mailboxA, []string{"x@example.org"}, numberedMessage(2)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the stuck queue in /healthz", func() bool {
		code, body := scrape(t, base+"/healthz")
		return code == 503 && strings.Contains(body, "1 message(s) queued, the oldest for") && strings.Contains(body, "admin.max_queue_age")
	})
}

// The admin listener closes silent keep-alive connections and caps how
// many are open.
func TestAdminIdleTimeoutAndCap(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.Admin.Listen = "127.0.0.1:0"
	cfg.Admin.IdleTimeout = config.Duration{Duration: 300 * time.Millisecond}
	b, _ := startBridge(t, fake, cfg)
	c, err := net.Dial("tcp", b.AdminAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(patience))
	fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	// The bridge closes it (EOF) long before the test's own deadline would
	// end the read (a timeout).
	c.SetDeadline(time.Now().Add(patience))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("reading the idle keep-alive connection: %v, want EOF (closed by admin.idle_timeout)", err)
	}
	// Idle connections up to the cap and beyond cannot make /healthz fail:
	// the longest idle is closed for a new one.
	for range admin.MaxConnections + 5 {
		c, err := net.Dial("tcp", b.AdminAddr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	code, body := scrape(t, "http://"+b.AdminAddr()+"/healthz")
	if !strings.Contains(body, `"status"`) {
		t.Errorf("/healthz with %d idle connections open: %d %q, want the health answer", admin.MaxConnections+5, code, body)
	}
}
