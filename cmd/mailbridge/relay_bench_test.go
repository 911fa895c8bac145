//go:build linux

package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"mailbridge/upstream/m365fake/outlookpop"
)

// BenchmarkServePOP3RelayCPU measures the bridge's own CPU on POP3
// downloads exactly: the bridge is the built binary (`mailbridge serve`)
// in a process of its own, and its CPU time is read from /proc before and
// after, while the fake Outlook (which writes each answer pre-stuffed in
// one write) and the client run in the test's process. The client reads in
// 256 KiB reads and checks the SHA-256 at the end.
//
//	go test ./cmd/mailbridge -run '^$' -bench ServePOP3RelayCPU -benchtime 10x
func BenchmarkServePOP3RelayCPU(b *testing.B) {
	const size = 50 << 20
	fake, path, env := fakeAndConfig(b, "127.0.0.1:0", "")
	fake.SetPOP3Writes(outlookpop.WritesBulk)
	msg := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.;\r\n"), size/66)
	msg = append([]byte("Subject: big\r\n\r\n"), msg...)
	fake.AddMessage(mailbox, msg)
	want := sha256.Sum256(append(msg, ".\r\n"...)) // no line starts with "."
	cmd, _, logs := startServe(b, path, env)
	m := regexp.MustCompile(`"proto":"pop3","listen":"([^"]+)"`).FindStringSubmatch(logs.String())
	if m == nil {
		b.Fatalf("no POP3 listener:\n%s", logs)
	}
	conn, err := net.Dial("tcp", m[1])
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * patience))
	r := bufio.NewReaderSize(conn, 256<<10)
	expect := func(cmd string) {
		if cmd != "" {
			fmt.Fprintf(conn, "%s\r\n", cmd)
		}
		if l, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(l, "+OK") {
			b.Fatalf("%q: %q %v", cmd, l, err)
		}
	}
	expect("")
	expect("USER tm")
	expect("PASS pw")
	buf := make([]byte, 256<<10)
	retr := func() {
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
	retr() // warm up
	cpu0, t0 := processCPUOf(b, cmd.Process.Pid), time.Now()
	b.ResetTimer()
	for range b.N {
		retr()
	}
	b.StopTimer()
	elapsed, cpu := time.Since(t0), processCPUOf(b, cmd.Process.Pid)-cpu0
	gib := float64(b.N) * float64(len(msg)) / (1 << 30)
	b.ReportMetric(gib*1024/elapsed.Seconds(), "MiB/s")
	b.ReportMetric(cpu.Seconds()/gib, "bridge-cpu-s/GiB")
	b.ReportMetric(0, "ns/op")
}

// processCPUOf reads the user and system CPU time of process pid from
// /proc/PID/stat (fields 14 and 15, in clock ticks of 1/100 s).
func processCPUOf(b *testing.B, pid int) time.Duration {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// The command name, in parentheses, may hold spaces: count after it.
	fields := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}
