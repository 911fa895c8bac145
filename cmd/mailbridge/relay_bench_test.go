//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"mailbridge/upstream"
	"mailbridge/upstream/m365fake"
	"mailbridge/upstream/m365fake/outlookpop"
)

// BenchmarkServePOP3RelayCPU measures the bridge's own CPU on POP3
// downloads exactly: the bridge is the built binary (`mailbridge serve`)
// in a process of its own, and its CPU time is read from /proc before and
// after, while the fake Outlook (which writes each answer pre-stuffed in
// one write) and the client run in the test's process. The client reads in
// 256 KiB reads and checks the SHA-256 at the end; line-per-record has
// the fake send one line per TLS record, so the cost per record shows. The floor
// sub-benchmark measures the same for the least a relay can do (see
// floorRelay): the CPU that TLS and the sockets cost whoever relays.
//
//	go test ./cmd/mailbridge -run '^$' -bench ServePOP3RelayCPU -benchtime 10x
func BenchmarkServePOP3RelayCPU(b *testing.B) {
	for _, writes := range []struct {
		name string
		outlookpop.Writes
		size int
	}{{"bulk", outlookpop.WritesBulk, 50 << 20}, {"line-per-record", outlookpop.WritesLinePerRecord, 5 << 20}} {
		for _, relay := range []string{"bridge", "floor"} {
			b.Run(writes.name+"/"+relay, func(b *testing.B) { benchRelayCPU(b, "pop3", relay, writes.Writes, writes.size) })
		}
	}
}

// BenchmarkServeIMAPRelayCPU is BenchmarkServePOP3RelayCPU for an IMAP
// FETCH BODY.PEEK[] of the same message from the fake Outlook's IMAP.
//
//	go test ./cmd/mailbridge -run '^$' -bench ServeIMAPRelayCPU -benchtime 10x
func BenchmarkServeIMAPRelayCPU(b *testing.B) {
	benchRelayCPU(b, "imap", "bridge", outlookpop.WritesBulk, 50<<20)
}

func benchRelayCPU(b *testing.B, proto, relay string, writes outlookpop.Writes, size int) {
	extra := ""
	if proto == "imap" {
		extra = `protocols = ["pop3", "imap"]`
	}
	fake, path, env := fakeAndConfig(b, "127.0.0.1:0", extra)
	fake.SetPOP3Writes(writes)
	msg := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.;\r\n"), size/66)
	msg = append([]byte("Subject: big\r\n\r\n"), msg...)
	fake.AddMessage(mailbox, msg)
	if proto == "imap" {
		fake.AddApp(tenant, client, secret, "Mail.Send", "POP.AccessAsApp", "IMAP.AccessAsApp")
	}
	var pid int
	var addr string
	if relay == "bridge" {
		cmd, _, logs := startServe(b, path, env)
		m := regexp.MustCompile(`"proto":"` + proto + `","listen":"([^"]+)"`).FindStringSubmatch(logs.String())
		if m == nil {
			b.Fatalf("no %s listener:\n%s", proto, logs)
		}
		pid, addr = cmd.Process.Pid, m[1]
	} else {
		pid, addr = startFloorRelay(b, fake, env)
	}
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * patience))
	r := bufio.NewReaderSize(conn, 256<<10)
	var download func()
	if proto == "imap" {
		download = imapDownload(b, conn, r, msg)
	} else {
		download = pop3Download(b, conn, r, relay == "bridge", msg)
	}
	download() // warm up
	cpu0, sys0 := processCPUOf(b, pid)
	t0 := time.Now()
	b.ResetTimer()
	for range b.N {
		download()
	}
	b.StopTimer()
	elapsed := time.Since(t0)
	cpu1, sys1 := processCPUOf(b, pid)
	gib := float64(b.N) * float64(len(msg)) / (1 << 30)
	b.ReportMetric(gib*1024/elapsed.Seconds(), "MiB/s")
	b.ReportMetric((cpu1-cpu0).Seconds()/gib, "relay-cpu-s/GiB")
	b.ReportMetric((sys1-sys0).Seconds()/gib, "relay-sys-s/GiB")
	b.ReportMetric(0, "ns/op")
}

// pop3Download logs in (unless the relay is logged in already) and
// returns a function that downloads msg with RETR 1 in bulk reads and
// checks its SHA-256.
func pop3Download(b *testing.B, conn net.Conn, r *bufio.Reader, login bool, msg []byte) func() {
	want := sha256.Sum256(append(msg, ".\r\n"...)) // no line starts with "."
	expect := func(cmd string) {
		if cmd != "" {
			fmt.Fprintf(conn, "%s\r\n", cmd)
		}
		if l, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(l, "+OK") {
			b.Fatalf("%q: %q %v", cmd, l, err)
		}
	}
	expect("")
	if login {
		expect("USER tm")
		expect("PASS pw")
	}
	buf := make([]byte, 256<<10)
	return func() {
		expect("RETR 1")
		h := sha256.New()
		var tail []byte
		for !bytes.Equal(tail, []byte("\r\n.\r\n")) {
			k, err := r.Read(buf)
			h.Write(buf[:k])
			tail = append(tail, buf[:k]...)
			tail = tail[max(0, len(tail)-5):]
			if err != nil {
				b.Fatal(err)
			}
		}
		if !bytes.Equal(h.Sum(nil), want[:]) {
			b.Fatal("the message arrived changed")
		}
	}
}

// imapDownload logs in, selects INBOX and returns a function that fetches
// message 1 whole (its literal read in bulk) and checks its SHA-256.
func imapDownload(b *testing.B, conn net.Conn, r *bufio.Reader, msg []byte) func() {
	want := sha256.Sum256(msg)
	n := 0
	command := func(cmd string, each func(line string)) {
		n++
		tag := fmt.Sprintf("t%d", n)
		fmt.Fprintf(conn, "%s %s\r\n", tag, cmd)
		for {
			l, err := r.ReadString('\n')
			if err != nil {
				b.Fatalf("%q: %v", cmd, err)
			}
			if strings.HasPrefix(l, tag+" ") {
				if !strings.HasPrefix(l, tag+" OK") {
					b.Fatalf("%q: %q", cmd, l)
				}
				return
			}
			each(l)
		}
	}
	if l, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(l, "* OK") {
		b.Fatalf("greeting: %q %v", l, err)
	}
	command("LOGIN tm pw", func(string) {})
	command("SELECT INBOX", func(string) {})
	literal := regexp.MustCompile(`\{(\d+)\}\r\n$`)
	return func() {
		fetched := false
		command("FETCH 1 BODY.PEEK[]", func(l string) {
			m := literal.FindStringSubmatch(l)
			if m == nil {
				return
			}
			size, _ := strconv.ParseInt(m[1], 10, 64)
			h := sha256.New()
			if _, err := io.CopyN(h, r, size); err != nil {
				b.Fatal(err)
			}
			if !bytes.Equal(h.Sum(nil), want[:]) {
				b.Fatal("the message arrived changed")
			}
			fetched = true
		})
		if !fetched {
			b.Fatal("FETCH returned no message")
		}
	}
}

// startFloorRelay starts this test binary as floorRelay, logged in to the
// fake's POP3 with a token of its own, and returns its pid and address.
func startFloorRelay(b *testing.B, fake *m365fake.Server, env []string) (int, string) {
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: fake.CertPool()}}}
	token, err := upstream.NewTokenSources(hc).Get(upstream.Credentials{TokenURL: fake.TokenURL(), TenantID: tenant, ClientID: client, ClientSecret: secret}, upstream.OutlookScope).Token(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(env, "FLOOR_UPSTREAM="+fake.POP3Addr(), "FLOOR_MAILBOX="+mailbox, "FLOOR_TOKEN="+token)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		b.Fatalf("the floor relay did not start: %v", err)
	}
	return cmd.Process.Pid, strings.TrimSpace(strings.TrimPrefix(line, "listen "))
}

// processCPUOf reads the CPU time (user and system) and the system part
// alone of process pid from /proc/PID/stat (fields 14 and 15, in clock
// ticks of 1/100 s).
func processCPUOf(b *testing.B, pid int) (cpu, sys time.Duration) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond, time.Duration(stime) * 10 * time.Millisecond
}
