package bridge_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"mailbridge/bridge/config"
	"net"
	"net/textproto"
	"runtime"
	"strings"
	"testing"
	"time"
)

// A line that starts with an unstuffed ".\r" keeps its CR (RFC 5321 §4.5.2
// removes only the dot), and bare CR and LF reach Graph as they came.
func TestDataIsByteExactForDotCRAndBareLineEnds(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	r := dialRaw(t, b.SMTPAddr())
	r.cmd(235, "AUTH PLAIN AHRtbWFzdGVyAGNvcnJlY3QgaG9yc2U=")
	r.cmd(250, "MAIL FROM:<orders@example.com>")
	r.cmd(250, "RCPT TO:<x@example.org>")
	r.cmd(354, "DATA")
	head := "From: orders@example.com\r\nTo: x@example.org\r\nSubject: dots\r\n\r\n"
	wire := head + ".\rX\r\n.\n\r\nbare\rcr and bare\nlf\r\n..stuffed\r\n.\r\r\nend\r\n.\r\n"
	want := head + "\rX\r\n\n\r\nbare\rcr and bare\nlf\r\n.stuffed\r\n\r\r\nend\r\n"
	r.conn.Write([]byte(wire))
	r.expect(250)
	sent := fake.Sent()
	if len(sent) != 1 {
		t.Fatalf("%d messages sent", len(sent))
	}
	if got := string(withoutAddedID(t, sent[0].MIME)); got != want {
		t.Errorf("Graph got\n%q\nwant\n%q", got, want)
	}
}

// Before login a client costs a few kilobytes however long the lines it
// sends: a command line over 4096 bytes is answered 500 5.5.2 and dropped,
// and after three of them the connection is closed.
func TestLongCommandLinesBeforeLogin(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, testConfig(fake))
	// One client: three long lines, then the bridge hangs up.
	c, err := net.Dial("tcp", b.SMTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(patience))
	br := bufio.NewReader(c)
	br.ReadString('\n') // greeting
	long := "EHLO " + strings.Repeat("x", 5000) + "\r\n"
	for i, want := range []string{"500 5.5.2 Line too long", "500 5.5.2 Line too long", "421 4.7.0 Too many long lines"} {
		c.Write([]byte(long))
		if l, _ := br.ReadString('\n'); !strings.HasPrefix(l, want) {
			t.Fatalf("long line %d: %q, want %q", i+1, l, want)
		}
	}
	if _, err := br.ReadString('\n'); err == nil {
		t.Error("the connection stayed open after three long lines")
	}
	if !strings.Contains(logs.String(), "connection closed: too many command lines over 4096 bytes") {
		t.Error("the closing is not logged")
	}
	// A line of 4096 bytes is still a command.
	r := dialRaw(t, b.SMTPAddr())
	r.cmd(250, "NOOP %s", strings.Repeat("y", 4000))

	// 100 clients each sending a 4 MiB line (after EHLO): the heap grows by
	// a few kilobytes per connection, not by the lines.
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	var conns []net.Conn
	chunk := bytes.Repeat([]byte("z"), 64<<10)
	for range 100 {
		c, err := net.Dial("tcp", b.SMTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(patience))
		bufio.NewReader(c).ReadString('\n')
		c.Write([]byte("EHLO attacker\r\nNOOP "))
		for range 64 { // 4 MiB without a line end
			c.Write(chunk)
		}
		conns = append(conns, c)
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapInuse) - int64(before.HeapInuse)
	if grown > 20<<20 {
		t.Errorf("heap grew by %d MB for 100 connections with 4 MiB lines, want a few kilobytes each", grown>>20)
	}
	t.Logf("heap grew by %d KB for %d connections with 4 MiB lines", grown>>10, len(conns))
}

// DATA keeps its deadline fresh while bytes arrive: a client sending a line
// every 200 ms with a 500 ms idle timeout gets its message through; one
// that stops gets a temporary 451 4.4.2 that names no internal address.
func TestSlowDataCompletesStalledDataGets451(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.SMTP.IdleTimeout = config.Duration{Duration: 500 * time.Millisecond}
	b, logs := startBridge(t, fake, cfg)
	r := dialRaw(t, b.SMTPAddr())
	r.cmd(235, "AUTH PLAIN AHRtbWFzdGVyAGNvcnJlY3QgaG9yc2U=")
	r.cmd(250, "MAIL FROM:<orders@example.com>")
	r.cmd(250, "RCPT TO:<x@example.org>")
	r.cmd(354, "DATA")
	r.conn.Write([]byte("From: orders@example.com\r\nTo: x@example.org\r\n\r\n"))
	for i := range 8 { // 1.6 s in all, over three idle timeouts
		time.Sleep(200 * time.Millisecond)
		fmt.Fprintf(r.conn, "line %d\r\n", i)
	}
	r.conn.Write([]byte(".\r\n"))
	r.expect(250)

	r2 := dialRaw(t, b.SMTPAddr())
	r2.cmd(235, "AUTH PLAIN AHRtbWFzdGVyAGNvcnJlY3QgaG9yc2U=")
	r2.cmd(250, "MAIL FROM:<orders@example.com>")
	r2.cmd(250, "RCPT TO:<x@example.org>")
	r2.cmd(354, "DATA")
	r2.conn.Write([]byte("From: orders@example.com\r\n"))
	msg := r2.expect(451) // and nothing more arrives
	if strings.Contains(msg, "127.0.0.1") || !strings.Contains(msg, "Timeout") {
		t.Errorf("stalled DATA answered %q", msg)
	}
	if !strings.Contains(logs.String(), "message not received: the client stopped sending within DATA for smtp.idle_timeout") {
		t.Error("the stall is not logged")
	}
	if n := len(fake.Sent()); n != 1 {
		t.Errorf("%d messages sent, want the slow one only", n)
	}
}

// Connections that never log in are closed after login_timeout, count in
// the active-sessions metric from the first byte, and cannot hold every
// slot: a new client finds room, the oldest idler is closed for it.
func TestIdleUnauthenticatedConnectionsCannotLockOut(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.SMTP.MaxSessions = 4 // 3 may be unauthenticated
	cfg.SMTP.LoginTimeout = config.Duration{Duration: 3 * time.Second}
	cfg.Admin.Listen = "127.0.0.1:0"
	b, logs := startBridge(t, fake, cfg)
	var idle []net.Conn
	for range 3 {
		c, err := net.Dial("tcp", b.SMTPAddr())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	waitFor(t, "three connections counted", func() bool {
		_, m := scrape(t, "http://"+b.AdminAddr()+"/metrics")
		return strings.Contains(m, `mailbridge_sessions_active{proto="smtp"} 3`+"\n")
	})
	time.Sleep(2100 * time.Millisecond) // older than a client's login
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n")); err != nil {
		t.Fatalf("a client that logs in is locked out: %v", err)
	}
	findLogLine(t, logs.String(), "connection closed: the oldest of too many that have not logged in, to make room")
	// The others are closed at login_timeout.
	idle[1].SetReadDeadline(time.Now().Add(patience))
	buf := make([]byte, 512)
	for {
		if _, err := idle[1].Read(buf); err != nil {
			break
		}
	}
	line := findLogLine(t, logs.String(), "connection closed: not logged in in time")
	if !strings.Contains(line, "smtp.login_timeout") {
		t.Errorf("login timeout logged as %s", line)
	}
}

// Bad base64 in an AUTH exchange is a syntax error (RFC 4954 §4: 501), not
// a temporary failure the client would retry for ever.
func TestBadBase64InAuthIs501(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	r := dialRaw(t, b.SMTPAddr())
	if msg := r.cmd(501, "AUTH PLAIN not*base64!"); !strings.Contains(msg, "5.5.2") {
		t.Errorf("bad base64 on the AUTH line: %q", msg)
	}
	r.cmd(334, "AUTH LOGIN")
	if msg := r.cmd(501, "%%%%"); !strings.Contains(msg, "5.5.2") {
		t.Errorf("bad base64 as a LOGIN answer: %q", msg)
	}
}

// The implicit-TLS listener gets the guard too (above TLS): an unstuffed
// ".\r" line keeps its CR there as well.
func TestImplicitTLSDataIsByteExact(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	clientTLS := localTLS(t, cfg)
	b, _ := startBridge(t, fake, cfg)
	conn, err := tls.Dial("tcp", b.SMTPTLSAddr(), clientTLS)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(patience))
	r := &rawSession{t: t, conn: conn, tp: textproto.NewConn(conn)}
	r.expect(220)
	r.cmd(250, "EHLO tls.test")
	r.cmd(235, "AUTH PLAIN AHRtbWFzdGVyAGNvcnJlY3QgaG9yc2U=")
	r.cmd(250, "MAIL FROM:<orders@example.com>")
	r.cmd(250, "RCPT TO:<x@example.org>")
	r.cmd(354, "DATA")
	conn.Write([]byte("From: orders@example.com\r\nTo: x@example.org\r\n\r\n.\rX\r\n.\r\n"))
	r.expect(250)
	if got := string(fake.Sent()[0].MIME); !strings.HasSuffix(got, "\r\n\r\n\rX\r\n") {
		t.Errorf("Graph got %q", got)
	}
}

// The guard passes untouched only the BDAT chunks go-smtp reads. A chunk
// of a real message arrives byte for byte, command-like lines and all; a
// size go-smtp refuses (501, nothing read), or a BDAT line sent as an AUTH
// response, leaves the guard bounding command lines, so what follows is
// still refused as too long instead of reaching go-smtp's 4 MB reader.
func TestBDATGuardAgreesWithGoSMTP(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, testConfig(fake))
	long := "NOOP " + strings.Repeat("x", 5000)

	r := dialRaw(t, b.SMTPAddr())
	r.cmd(235, "AUTH PLAIN AHRtbWFzdGVyAGNvcnJlY3QgaG9yc2U=")
	r.cmd(250, "MAIL FROM:<orders@example.com>")
	r.cmd(250, "RCPT TO:<x@example.org>")
	body := "From: orders@example.com\r\nTo: x@example.org\r\nSubject: chunks\r\n\r\n.\r\nBDAT 99\r\n" + long + "\r\n.\r\r\nend\r\n"
	half := len(body) / 2
	fmt.Fprintf(r.conn, "BDAT %d\r\n%s", half, body[:half])
	r.expect(250)
	fmt.Fprintf(r.conn, "BDAT %d LAST\r\n%s", len(body)-half, body[half:])
	r.expect(250)
	if sent := fake.Sent(); len(sent) != 1 || string(withoutAddedID(t, sent[0].MIME)) != body {
		t.Fatalf("the chunked message did not reach Graph byte for byte: %d sent", len(sent))
	}
	for _, bad := range []string{"BDAT 99999999999", "BDAT 4294967296 LAST", "BDAT 10 FIRST", "BDAT -5", "BDAT 1 LAST x", "BDAT\t10"} {
		r := dialRaw(t, b.SMTPAddr())
		r.cmd(501, "%s", bad)
		// The guard's refusal, not go-smtp's 4 MB line reader's.
		if msg := r.cmd(500, "%s", long); !strings.Contains(msg, "Line too long") {
			t.Errorf("a long line after %q: %q, want the guard's refusal", bad, msg)
		}
	}

	// A BDAT line as the answer to AUTH's 334 is no command to go-smtp.
	r2 := dialRaw(t, b.SMTPAddr())
	r2.cmd(334, "AUTH PLAIN")
	if msg := r2.cmd(501, "BDAT 10 LAST"); !strings.Contains(msg, "base64") {
		t.Errorf("BDAT as an AUTH response: %q", msg)
	}
	if msg := r2.cmd(500, "%s", long); !strings.Contains(msg, "Line too long") {
		t.Errorf("a long line after it: %q, want the guard's refusal", msg)
	}
}

// Connections that never log in, opened all at once from one address until
// every session slot is held, cannot keep a client elsewhere from logging
// in: at the limit, the oldest idler of the address with the most is
// closed for it. For SMTP, POP3 and IMAP.
func TestIdleFloodCannotTakeEverySlot(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.SMTP.MaxSessions, cfg.POP3.MaxSessions, cfg.IMAP.MaxSessions = 6, 6, 6
	b, logs := startBridge(t, fake, cfg)
	flood := func(addr string) {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
		for range 6 {
			c, err := d.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			c.SetReadDeadline(time.Now().Add(patience))
			if l, err := bufio.NewReader(c).ReadString('\n'); err != nil || strings.Contains(l, "Too many") {
				t.Fatalf("idler %s: %q %v", addr, l, err)
			}
		}
	}
	flood(b.SMTPAddr())
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n")); err != nil {
		t.Fatalf("SMTP: a client that logs in is locked out: %v", err)
	}
	flood(b.POP3Addr())
	p := dialPOP3(t, b.POP3Addr())
	p.login(userA, passwordA)
	flood(b.IMAPAddr())
	i := dialIMAP(t, b.IMAPAddr())
	i.login(userA, passwordA)
	// (On a slow machine the login policy may have closed an idler older
	// than two seconds already, leaving a slot free: how many the limit
	// closed is not the point, that nobody was refused is.)
	if n := len(linesWith(logs.String(), "session refused")); n != 0 {
		t.Errorf("%d sessions refused", n)
	}
}
