package bridge_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/upstream/m365fake"
)

// imapClient is a hand-driven IMAP dialogue.
type imapClient struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
	n    int
}

func dialIMAP(t testing.TB, addr string) *imapClient {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	// One deadline for the whole dialogue, generous for a busy machine:
	// some tests move 40 MB through it.
	conn.SetDeadline(time.Now().Add(5 * patience))
	c := &imapClient{t: t, conn: conn, r: bufio.NewReaderSize(conn, 64<<10)}
	if l := c.line(); !strings.HasPrefix(l, "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=LOGIN SASL-IR ID LITERAL+") {
		t.Fatalf("greeting %q", l)
	}
	return c
}

func (c *imapClient) line() string {
	c.t.Helper()
	l, err := c.r.ReadString('\n')
	if err != nil {
		c.t.Fatalf("reading: %v (got %q)", err, l)
	}
	return strings.TrimRight(l, "\r\n")
}

// cmd sends a tagged command and returns the untagged lines and the tagged
// answer.
func (c *imapClient) cmd(format string, args ...any) ([]string, string) {
	c.t.Helper()
	c.n++
	tag := fmt.Sprintf("T%d", c.n)
	fmt.Fprintf(c.conn, tag+" "+format+"\r\n", args...)
	return c.until(tag)
}

func (c *imapClient) until(tag string) ([]string, string) {
	c.t.Helper()
	var untagged []string
	for {
		l := c.line()
		if strings.HasPrefix(l, tag+" ") {
			return untagged, l
		}
		untagged = append(untagged, l)
	}
}

func (c *imapClient) login(user, pass string) {
	c.t.Helper()
	if _, l := c.cmd("LOGIN %q %q", user, pass); !strings.Contains(l, " OK ") {
		c.t.Fatalf("LOGIN: %q", l)
	}
}

// fetchRaw sends FETCH n BODY.PEEK[] and returns the whole answer as it
// came.
func (c *imapClient) fetchRaw(n int) []byte {
	c.t.Helper()
	c.n++
	tag := fmt.Sprintf("T%d", c.n)
	fmt.Fprintf(c.conn, "%s FETCH %d BODY.PEEK[]\r\n", tag, n)
	return readUntilTag(c.t, c.r, tag)
}

// readUntilTag reads an answer, literals included, up to the tagged line.
func readUntilTag(t testing.TB, r *bufio.Reader, tag string) []byte {
	t.Helper()
	var out bytes.Buffer
	for {
		l, err := r.ReadString('\n')
		out.WriteString(l)
		if err != nil {
			t.Fatalf("reading: %v after %d bytes", err, out.Len())
		}
		if strings.HasPrefix(l, tag+" ") {
			return out.Bytes()
		}
		if i := strings.LastIndexByte(l, '{'); i >= 0 && strings.HasSuffix(l, "}\r\n") {
			n, _ := strconv.Atoi(strings.TrimSuffix(l[i+1:len(l)-3], "+"))
			if _, err := io.CopyN(&out, r, int64(n)); err != nil {
				t.Fatalf("literal: %v", err)
			}
		}
	}
}

// directIMAP logs in to the fake's IMAP service as the bridge would, for
// comparing what the bridge passes with what Outlook sends.
func directIMAP(t testing.TB, fake *m365fake.Server, b *bridge.Bridge) (*tls.Conn, *bufio.Reader) {
	t.Helper()
	tok, err := b.Accounts()[0].OutlookTokens.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	conn, err := tls.Dial("tcp", fake.IMAPAddr(), &tls.Config{RootCAs: fake.CertPool(), ServerName: "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	r := bufio.NewReaderSize(conn, 64<<10)
	r.ReadString('\n')
	ir := base64.StdEncoding.EncodeToString([]byte("user=" + mailboxA + "\x01auth=Bearer " + tok + "\x01\x01"))
	fmt.Fprintf(conn, "D1 AUTHENTICATE XOAUTH2 %s\r\n", ir)
	if l := readUntilTag(t, r, "D1"); !bytes.Contains(l, []byte("D1 OK")) {
		t.Fatalf("direct login: %q", l)
	}
	return conn, r
}

func TestIMAPLoginForms(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	for _, login := range []func(c *imapClient) string{
		func(c *imapClient) string { _, l := c.cmd("LOGIN %s %q", userA, passwordA); return l },
		func(c *imapClient) string { // synchronising literals
			fmt.Fprintf(c.conn, "L1 LOGIN {%d}\r\n", len(userA))
			if l := c.line(); !strings.HasPrefix(l, "+ ") {
				t.Fatalf("no continuation: %q", l)
			}
			fmt.Fprintf(c.conn, "%s {%d}\r\n", userA, len(passwordA))
			c.line()
			fmt.Fprintf(c.conn, "%s\r\n", passwordA)
			_, l := c.until("L1")
			return l
		},
		func(c *imapClient) string { // LITERAL+
			fmt.Fprintf(c.conn, "L1 LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n", len(userA), userA, len(passwordA), passwordA)
			_, l := c.until("L1")
			return l
		},
		func(c *imapClient) string { // AUTHENTICATE PLAIN with SASL-IR
			_, l := c.cmd("AUTHENTICATE PLAIN %s", plainB64(userA, passwordA))
			return l
		},
		func(c *imapClient) string { // AUTHENTICATE LOGIN, two steps
			fmt.Fprintf(c.conn, "A1 AUTHENTICATE LOGIN\r\n")
			c.line()
			fmt.Fprintf(c.conn, "%s\r\n", base64.StdEncoding.EncodeToString([]byte(userA)))
			c.line()
			fmt.Fprintf(c.conn, "%s\r\n", base64.StdEncoding.EncodeToString([]byte(passwordA)))
			_, l := c.until("A1")
			return l
		},
	} {
		c := dialIMAP(t, b.IMAPAddr())
		if l := login(c); !strings.Contains(l, "OK [CAPABILITY IMAP4 IMAP4rev1 ") || !strings.Contains(l, " IDLE ") || strings.Contains(l, "AUTH=") {
			t.Errorf("login answered %q, want OK with Outlook's capabilities less AUTH=", l)
		}
		if untagged, l := c.cmd("SELECT INBOX"); !strings.Contains(l, "OK") {
			t.Errorf("SELECT after login: %q %q", untagged, l)
		}
	}
	// * cancels; commands before login get BAD; no upstream connection.
	before := fake.IMAPConnections()
	c := dialIMAP(t, b.IMAPAddr())
	fmt.Fprintf(c.conn, "A2 AUTHENTICATE PLAIN\r\n")
	c.line()
	fmt.Fprintf(c.conn, "*\r\n")
	if _, l := c.until("A2"); !strings.Contains(l, "BAD") {
		t.Errorf("cancelled AUTHENTICATE: %q", l)
	}
	if _, l := c.cmd("SELECT INBOX"); !strings.Contains(l, "BAD") {
		t.Errorf("SELECT before login: %q", l)
	}
	if _, l := c.cmd("ID NIL"); !strings.Contains(l, "OK") {
		t.Errorf("ID: %q", l)
	}
	if _, l := c.cmd("LOGIN %s wrong", userA); !strings.Contains(l, "NO [AUTHENTICATIONFAILED]") {
		t.Errorf("wrong password: %q", l)
	}
	if _, l := c.cmd("LOGIN %s %q", userB, passwordB); !strings.Contains(l, "NO [AUTHENTICATIONFAILED]") {
		t.Errorf("an account without imap in protocols: %q", l)
	}
	if n := fake.IMAPConnections(); n != before {
		t.Errorf("%d upstream connections for refused logins", n-before)
	}
	if strings.Contains(logs.String(), passwordA) {
		t.Error("a password reached the log")
	}
}

// The third failed login on one connection ends it with BYE, as over SMTP
// and POP3 (conntrack.State.LoginFailed).
func TestIMAPClosesAfterThreeFailedLogins(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	c := dialIMAP(t, b.IMAPAddr())
	for i := 1; i <= 3; i++ {
		untagged, tagged := c.cmd("LOGIN %q %q", userA, "wrong")
		if !strings.Contains(tagged, "NO [AUTHENTICATIONFAILED]") || (i == 3) != (len(untagged) == 1 && untagged[0] == "* BYE Too many failed logins") {
			t.Fatalf("login %d: %q %q", i, untagged, tagged)
		}
	}
	if _, err := c.r.ReadByte(); err == nil {
		t.Error("the connection stayed open after the third failed login")
	}
	if n := strings.Count(logs.String(), `"failures":`); n != 3 || !strings.Contains(logs.String(), "session closed: too many failed logins on one connection") {
		t.Errorf("%d failure lines, or no closing line", n)
	}
}

func TestIMAPFetchIsByteExact(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	msgs := [][]byte{
		crlf("Subject: dots\n\n.\n..\n.x\n"),
		crlf("Subject: 8bit\nContent-Type: text/plain; charset=utf-8\n\nGrüße \xff\xfe raw bytes\n"),
		crlf("Subject: long line\n\n" + strings.Repeat("L", 200<<10) + "\n"),
		bigMessage(50 << 20),
	}
	for _, m := range msgs {
		fake.AddMessage(mailboxA, m)
	}
	c := dialIMAP(t, b.IMAPAddr())
	c.login(userA, passwordA)
	c.cmd("SELECT INBOX")
	dc, dr := directIMAP(t, fake, b)
	fmt.Fprintf(dc, "D2 SELECT INBOX\r\n")
	readUntilTag(t, dr, "D2")
	for i := 1; i <= 4; i++ {
		got := c.fetchRaw(i)
		fmt.Fprintf(dc, "T%d FETCH %d BODY.PEEK[]\r\n", c.n, i)
		want := readUntilTag(t, dr, fmt.Sprintf("T%d", c.n))
		if sha256.Sum256(got) != sha256.Sum256(want) || !bytes.Contains(got, msgs[i-1]) {
			t.Errorf("message %d: %d bytes through the bridge, %d direct, not the same", i, len(got), len(want))
		}
	}
}

func TestIMAPAppendIdlePipelining(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	c := dialIMAP(t, b.IMAPAddr())
	// Pipelined right after the login.
	fmt.Fprintf(c.conn, "P1 LOGIN %s %q\r\nP2 SELECT INBOX\r\nP3 NOOP\r\n", userA, passwordA)
	for _, tag := range []string{"P1", "P2", "P3"} {
		if _, l := c.until(tag); !strings.Contains(l, " OK") {
			t.Fatalf("%s: %q", tag, l)
		}
	}
	// APPEND of a 20 MB literal, synchronising and LITERAL+.
	msg := bigMessage(20 << 20)
	fmt.Fprintf(c.conn, "A1 APPEND INBOX {%d}\r\n", len(msg))
	if l := c.line(); !strings.HasPrefix(l, "+") {
		t.Fatalf("APPEND continuation: %q", l)
	}
	c.conn.Write(msg)
	c.conn.Write([]byte("\r\n"))
	if _, l := c.until("A1"); !strings.Contains(l, "OK") {
		t.Fatalf("APPEND: %q", l)
	}
	fmt.Fprintf(c.conn, "A2 APPEND INBOX {%d+}\r\n", len(msg))
	c.conn.Write(msg)
	c.conn.Write([]byte("\r\n"))
	if _, l := c.until("A2"); !strings.Contains(l, "OK") {
		t.Fatalf("APPEND LITERAL+: %q", l)
	}
	got := c.fetchRaw(2)
	if !bytes.Contains(got, msg) {
		t.Error("the appended message does not come back intact")
	}
	// IDLE: a message delivered meanwhile is pushed at once.
	fmt.Fprintf(c.conn, "I1 IDLE\r\n")
	if l := c.line(); !strings.HasPrefix(l, "+") {
		t.Fatalf("IDLE: %q", l)
	}
	fake.AddMessage(mailboxA, crlf("Subject: new\n\nnew mail\n"))
	c.conn.SetReadDeadline(time.Now().Add(patience))
	if l := c.line(); !strings.HasSuffix(l, " EXISTS") {
		t.Errorf("during IDLE: %q, want * n EXISTS", l)
	}
	fmt.Fprintf(c.conn, "DONE\r\n")
	if _, l := c.until("I1"); !strings.Contains(l, "OK") {
		t.Errorf("after DONE: %q", l)
	}
}

// An upstream that drops in the middle of a FETCH closes the client's
// connection: the client never gets the literal as complete.
func TestIMAPUpstreamDropMidFetch(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	fake.AddMessage(mailboxA, bigMessage(4<<20))
	fake.FailIMAP(m365fake.IMAPFault{DropAfter: 1 << 20})
	c := dialIMAP(t, b.IMAPAddr())
	c.login(userA, passwordA)
	c.cmd("SELECT INBOX")
	fmt.Fprintf(c.conn, "F1 FETCH 1 BODY[]\r\n")
	got, err := io.ReadAll(c.r)
	if err != nil {
		t.Fatalf("the bridge did not close the connection: %v", err)
	}
	if bytes.Contains(got, []byte("F1 OK")) || len(got) >= 4<<20 {
		t.Fatalf("the client got a complete answer (%d bytes) from a dropped upstream", len(got))
	}
	waitFor(t, "the session's end", func() bool { return strings.Contains(logs.String(), `"ended":"upstream`) })
}

// One Outlook token serves many IMAP and POP3 sessions.
func TestIMAPAndPOP3ShareOneToken(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	for range 5 {
		c := dialIMAP(t, b.IMAPAddr())
		c.login(userA, passwordA)
		c.cmd("LOGOUT")
		p := dialPOP3(t, b.POP3Addr())
		p.login(userA, passwordA)
		p.cmd("QUIT")
	}
	if n := b.Accounts()[0].OutlookTokens.Requests(); n != 1 {
		t.Errorf("%d Outlook token requests for 10 sessions, want 1", n)
	}
}

// A client that reads a 20 MB FETCH slowly holds the bridge's memory flat:
// the relay waits for it (backpressure) instead of buffering. The fake
// (go-imap) builds the whole answer in memory, so the bridged read is
// compared with the same slow read straight from the fake.
func TestIMAPSlowReaderMemoryFlat(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	fake.AddMessage(mailboxA, bigMessage(20<<20))
	slowRead := func(w io.Writer, r io.Reader) uint64 {
		runtime.GC()
		hs := startHeapSampler()
		fmt.Fprintf(w, "F1 FETCH 1 BODY.PEEK[]\r\n")
		buf := make([]byte, 256<<10)
		for total := 0; total < 20<<20; {
			n, err := r.Read(buf)
			if err != nil {
				t.Fatal(err)
			}
			total += n
			if total%(2<<20) < n {
				time.Sleep(50 * time.Millisecond) // a slow reader
			}
		}
		return hs.Stop()
	}
	dc, dr := directIMAP(t, fake, b)
	fmt.Fprintf(dc, "D2 EXAMINE INBOX\r\n")
	readUntilTag(t, dr, "D2")
	direct := slowRead(dc, dr)
	c := dialIMAP(t, b.IMAPAddr())
	c.login(userA, passwordA)
	c.cmd("EXAMINE INBOX")
	bridged := slowRead(c.conn, c.r)
	if grown := int64(bridged) - int64(direct); grown > 16<<20 {
		t.Errorf("the heap peaked %d MB higher through the bridge than straight from the fake, want under 16 MB", grown>>20)
	}
}

// Before login one command cannot chain literals without bound: past a
// few kilobytes in all, the bridge answers BYE and closes, however small
// each literal is.
func TestIMAPCommandBoundedBeforeLogin(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	c := dialIMAP(t, b.IMAPAddr())
	go func() { // 80 KB in literals of 8000 bytes each, within one command
		fmt.Fprint(c.conn, "a LOGIN")
		for range 10 {
			fmt.Fprintf(c.conn, " {8000+}\r\n%s", strings.Repeat("x", 8000))
		}
		fmt.Fprint(c.conn, "\r\n")
	}()
	if l := c.line(); l != "* BYE Command line too long" {
		t.Fatalf("after chained literals: %q, want BYE", l)
	}
	if l, err := c.r.ReadString('\n'); err == nil {
		t.Errorf("the connection stayed open: %q", l)
	}
	// A LOGIN with both arguments as literals of a normal size still works.
	c2 := dialIMAP(t, b.IMAPAddr())
	fmt.Fprintf(c2.conn, "b LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n", len(userA), userA, len(passwordA), passwordA)
	if _, l := c2.until("b"); !strings.Contains(l, "b OK") {
		t.Errorf("LOGIN with literals: %q", l)
	}
}

// A FETCH that takes longer than idle_timeout, because the client reads
// slowly (a satellite link), completes: bytes moving to the client are
// activity, though the client sends nothing meanwhile.
func TestIMAPFetchLongerThanIdleTimeoutCompletes(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.IMAP.IdleTimeout = config.Duration{Duration: 2 * time.Second}
	b, logs := startBridge(t, fake, cfg)
	msg := bigMessage(12 << 20)
	fake.AddMessage(mailboxA, msg)
	c := dialIMAP(t, b.IMAPAddr())
	c.conn.(*net.TCPConn).SetReadBuffer(128 << 10) // the bridge's writes wait on the reader (above one loopback MSS, or the window never reopens)
	c.login(userA, passwordA)
	c.cmd("EXAMINE INBOX")
	fmt.Fprintf(c.conn, "F1 FETCH 1 BODY.PEEK[]\r\n")
	head := c.line()
	var size int
	if _, err := fmt.Sscanf(head[strings.LastIndexByte(head, '{'):], "{%d}", &size); err != nil || size != len(msg) {
		t.Fatalf("FETCH answered %q, want a literal of %d bytes", head, len(msg))
	}
	got := make([]byte, 0, size)
	buf := make([]byte, 32<<10)
	for len(got) < size { // at most 32 KB each 20 ms: 8 s in all, four times idle_timeout
		n, err := c.r.Read(buf[:min(len(buf), size-len(got))])
		if err != nil {
			t.Fatalf("after %d of %d bytes: %v\n%s", len(got), size, err, linesWith(logs.String(), "session ended"))
		}
		got = append(got, buf[:n]...)
		time.Sleep(20 * time.Millisecond)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("the message arrived changed")
	}
	if _, l := c.until("F1"); !strings.HasPrefix(l, "F1 OK") {
		t.Fatalf("FETCH ended %q", l)
	}
}

// Outlook lets the app in but cannot open the mailbox (no FullAccess, or
// IMAP off for it): "authenticated but not connected". The bridge tells
// it apart at login, answers the client with a temporary NO, and names
// the two commands that fix it, in the log and in check.
func TestIMAPAuthenticatedButNotConnected(t *testing.T) {
	for name, breakIt := range map[string]func(*m365fake.Server){
		"imap off":      func(f *m365fake.Server) { f.DisableProtocol(mailboxA, "imap") },
		"no FullAccess": func(f *m365fake.Server) { f.AddMailbox(tenantA, "captain@example.com") },
	} {
		t.Run(name, func(t *testing.T) {
			fake := startFake(t)
			breakIt(fake)
			cfg := testConfig(fake)
			if name == "no FullAccess" {
				cfg.Accounts[0].IMAPMailbox = "captain@example.com"
			}
			b, logs := startBridge(t, fake, cfg)
			c := dialIMAP(t, b.IMAPAddr())
			_, l := c.cmd("LOGIN %s %q", userA, passwordA)
			if !strings.Contains(l, "NO [UNAVAILABLE] Outlook let the bridge in but cannot open this mailbox") {
				t.Errorf("login answered %q", l)
			}
			lines := linesWith(logs.String(), "upstream login failed")
			if len(lines) != 1 || !strings.Contains(lines[0], "authenticated but not connected") ||
				!strings.Contains(lines[0], "Add-MailboxPermission") || !strings.Contains(lines[0], "Set-CASMailbox") {
				t.Errorf("the log does not explain it in one line: %v", lines)
			}
			for _, r := range b.Check(context.Background(), "") {
				if r.Check == "imap" && (r.OK || !strings.Contains(r.Hint, "Add-MailboxPermission") || !strings.Contains(r.Hint, "Set-CASMailbox")) {
					t.Errorf("check's imap row: %+v", r)
				}
			}
		})
	}
}

// Outlook throttling a session answers its mailbox commands "NO Request is
// throttled. Suggested Backoff Time: …": the bridge logs in and passes the
// answer to the client as Outlook worded it.
func TestIMAPThrottlingPassesThrough(t *testing.T) {
	fake := startFake(t)
	fake.FailIMAP(m365fake.IMAPFault{Throttle: true})
	b, _ := startBridge(t, fake, testConfig(fake))
	c := dialIMAP(t, b.IMAPAddr())
	c.login(userA, passwordA)
	if _, l := c.cmd("SELECT INBOX"); !strings.HasSuffix(l, " NO Request is throttled. Suggested Backoff Time: 299609 milliseconds") {
		t.Errorf("SELECT while throttled: %q", l)
	}
	if _, l := c.cmd("NOOP"); !strings.Contains(l, " OK ") {
		t.Errorf("the session does not go on after the throttled command: %q", l)
	}
}
