package bridge_test

import (
	"fmt"
	"io"
	"runtime"
	"strings"
	"testing"
	"time"
)

// BenchmarkIMAPFetch50MB fetches one 50 MB message, in each iteration once
// straight from the fake Outlook over TLS (an XOAUTH2 session of our own)
// and once through the bridge, and reports both throughputs, their ratio,
// the live heap above idle at its peak during the bridged fetches, and how
// much higher that peak is than during the direct ones (the bridge's own
// share: go-imap's fake holds each answer in memory either way).
func BenchmarkIMAPFetch50MB(b *testing.B) {
	fake := startFake(b)
	cfg := testConfig(fake)
	cfg.Log.Level = "info"
	br, _ := startBridge(b, fake, cfg)
	fake.AddMessage(mailboxA, bigMessage(50<<20))

	dc, dr := directIMAP(b, fake, br)
	fmt.Fprintf(dc, "D2 EXAMINE INBOX\r\n")
	readUntilTag(b, dr, "D2")
	c := dialIMAP(b, br.IMAPAddr())
	c.login(userA, passwordA)
	c.cmd("EXAMINE INBOX")
	n := 0
	fetch := func(w io.Writer, r interface {
		io.Reader
		ReadString(byte) (string, error)
	}) time.Duration {
		n++
		tag := fmt.Sprintf("B%d", n)
		t0 := time.Now()
		fmt.Fprintf(w, "%s FETCH 1 BODY.PEEK[]\r\n", tag)
		if got := readUntilTagDiscard(b, r, tag); got < 50<<20 {
			b.Fatalf("fetched %d bytes", got)
		}
		return time.Since(t0)
	}
	fetch(dc, dr)
	fetch(c.conn, c.r)
	runtime.GC()
	idle := heapNow()
	var tDirect, tBridge time.Duration
	var peak, peakDirect uint64
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		runtime.GC()
		b.StartTimer()
		hs := startHeapSampler()
		tDirect += fetch(dc, dr)
		peakDirect = max(peakDirect, hs.Stop())
		b.StopTimer()
		runtime.GC()
		b.StartTimer()
		hs = startHeapSampler()
		tBridge += fetch(c.conn, c.r)
		peak = max(peak, hs.Stop())
	}
	b.StopTimer()
	mb := float64(50*b.N) * (1 << 20) / 1e6
	b.ReportMetric(mb/tDirect.Seconds(), "direct-MB/s")
	b.ReportMetric(mb/tBridge.Seconds(), "bridge-MB/s")
	b.ReportMetric(tDirect.Seconds()/tBridge.Seconds(), "ratio")
	// go-imap's fake builds each 50 MB answer in memory: that is the same
	// for both paths, so the bridge's own share is the difference.
	b.ReportMetric(float64(int64(peak)-int64(idle))/(1<<20), "peak-heap-MB")
	b.ReportMetric(float64(int64(peak)-int64(peakDirect))/(1<<20), "bridge-heap-MB")
	b.ReportMetric(0, "ns/op")
}

// readUntilTagDiscard reads an answer up to its tagged line, literals
// included, and returns how many bytes it had.
func readUntilTagDiscard(t testing.TB, r interface {
	io.Reader
	ReadString(byte) (string, error)
}, tag string) int64 {
	t.Helper()
	var total int64
	for {
		l, err := r.ReadString('\n')
		total += int64(len(l))
		if err != nil {
			t.Fatalf("reading: %v", err)
		}
		if len(l) > len(tag) && l[:len(tag)+1] == tag+" " {
			return total
		}
		if i := strings.LastIndexByte(l, '{'); i >= 0 && len(l) > 3 && l[len(l)-3:] == "}\r\n" {
			var size int64
			fmt.Sscanf(l[i+1:len(l)-3], "%d", &size)
			m, err := io.CopyN(io.Discard, r, size)
			total += m
			if err != nil {
				t.Fatalf("literal: %v", err)
			}
		}
	}
}
