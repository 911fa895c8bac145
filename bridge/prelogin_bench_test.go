package bridge_test

import (
	"bufio"
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"mailbridge/bridge/config"
)

// BenchmarkPreLoginMemory reports the heap each connection that has not
// logged in costs the bridge: 200 idle ones per protocol, then 200 that
// flood it (long SMTP lines and an oversized BDAT, long POP3 lines, IMAP
// literals chained in one command) and stay open.
//
//	go test ./bridge -run '^$' -bench PreLoginMemory -benchtime 1x
func BenchmarkPreLoginMemory(b *testing.B) {
	const conns = 200
	fake := startFake(b)
	cfg := testConfig(fake)
	cfg.SMTP.MaxSessions, cfg.POP3.MaxSessions, cfg.IMAP.MaxSessions = 2*conns+10, 2*conns+10, 2*conns+10
	for _, d := range []*config.Duration{&cfg.SMTP.LoginTimeout, &cfg.POP3.LoginTimeout, &cfg.IMAP.LoginTimeout} {
		*d = config.Duration{Duration: time.Hour}
	}
	br, _ := startBridge(b, fake, cfg)
	floods := map[string]string{
		"smtp": "BDAT 99999999999\r\n" + strings.Repeat("NOOP "+strings.Repeat("x", 3000)+"\r\n", 2),
		"pop3": strings.Repeat("USER "+strings.Repeat("x", 3000)+"\r\n", 2),
		"imap": "a LOGIN" + strings.Repeat(" {8000+}\r\n"+strings.Repeat("x", 8000), 20) + "\r\n",
	}
	for _, proto := range []string{"smtp", "pop3", "imap"} {
		addr := map[string]string{"smtp": br.SMTPAddr(), "pop3": br.POP3Addr(), "imap": br.IMAPAddr()}[proto]
		for _, flood := range []bool{false, true} {
			runtime.GC()
			runtime.GC()
			before := heapNow()
			var open []net.Conn
			for range conns {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				c.SetDeadline(time.Now().Add(time.Minute))
				bufio.NewReader(c).ReadString('\n') // the greeting: the session is running
				if flood {
					c.Write([]byte(floods[proto]))
				}
				open = append(open, c)
			}
			time.Sleep(300 * time.Millisecond) // the sessions read what was sent
			runtime.GC()
			runtime.GC()
			after := heapNow()
			name := "idle"
			if flood {
				name = "flooding"
			}
			b.ReportMetric(float64(int64(after)-int64(before))/conns/1024, fmt.Sprintf("%s-%s-KB/conn", proto, name))
			for _, c := range open {
				c.Close()
			}
			for n, _ := br.Connections(); n > 0; n, _ = br.Connections() {
				time.Sleep(10 * time.Millisecond) // the sessions end
			}
		}
	}
	b.ReportMetric(0, "ns/op")
}
