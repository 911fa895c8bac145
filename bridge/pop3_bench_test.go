package bridge_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"runtime"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"mailbridge/upstream"
	"mailbridge/upstream/m365fake/outlookpop"
)

// heapSampler records the largest live heap seen while it runs.
type heapSampler struct {
	stop chan struct{}
	done chan struct{}
	peak atomic.Uint64
}

func heapNow() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

func startHeapSampler() *heapSampler {
	h := &heapSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			if v := heapNow(); v > h.peak.Load() {
				h.peak.Store(v)
			}
			select {
			case <-h.stop:
				return
			case <-t.C:
			}
		}
	}()
	return h
}

func (h *heapSampler) Stop() uint64 {
	close(h.stop)
	<-h.done
	return h.peak.Load()
}

// BenchmarkPOP3Retr50MB downloads one 50 MB message, in each iteration
// once straight from the fake Outlook over TLS (our own XOAUTH2 session)
// and once through the bridge, and reports both throughputs, their ratio,
// and the live heap above idle at its peak during the bridged downloads
// (the fake's copy of the message is part of idle). The fake writes each
// answer pre-stuffed in one write; the client reads line by line (it
// unstuffs), which caps both paths alike.
func BenchmarkPOP3Retr50MB(b *testing.B) {
	fake := startFake(b)
	cfg := testConfig(fake)
	cfg.Log.Level = "info"
	br, _ := startBridge(b, fake, cfg)
	fake.SetPOP3Writes(outlookpop.WritesBulk) // an upstream that does not cap the figure
	msg := bigMessage(50 << 20)
	want := sha256.Sum256(msg)
	fake.AddMessage(mailboxA, msg)
	msg = nil

	token, err := br.Accounts()[0].OutlookTokens.Token(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	up, err := (&upstream.POP3Dialer{Addr: fake.POP3Addr(), RootCAs: fake.CertPool()}).Dial(context.Background(), mailboxA, token)
	if err != nil {
		b.Fatal(err)
	}
	defer up.Conn.Close()
	direct := &popClient{t: b, conn: up.Conn, r: up.Reader}
	bridged := dialPOP3(b, br.POP3Addr())
	bridged.login(userA, passwordA)

	download := func(p *popClient) time.Duration {
		t0 := time.Now()
		if l := p.cmd("RETR 1"); l[0] != '+' {
			b.Fatal(l)
		}
		h := sha256.New()
		if err := p.body(nil, h); err != nil {
			b.Fatal(err)
		}
		d := time.Since(t0)
		if !bytes.Equal(h.Sum(nil), want[:]) {
			b.Fatal("the message arrived changed")
		}
		return d
	}
	download(direct) // warm up both paths
	download(bridged)
	runtime.GC()
	idle := heapNow()
	var tDirect, tBridge time.Duration
	var peak uint64
	b.ResetTimer()
	for range b.N {
		tDirect += download(direct)
		hs := startHeapSampler()
		tBridge += download(bridged)
		peak = max(peak, hs.Stop())
	}
	b.StopTimer()
	mb := float64(b.N) * 50
	b.ReportMetric(mb/tDirect.Seconds(), "direct-MB/s")
	b.ReportMetric(mb/tBridge.Seconds(), "bridge-MB/s")
	b.ReportMetric(tDirect.Seconds()/tBridge.Seconds(), "ratio")
	b.ReportMetric(float64(int64(peak)-int64(idle))/(1<<20), "peak-heap-MB-above-idle")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkPOP3Sessions runs 100 concurrent sessions, each downloading 20
// messages of 100 KB through the bridge and checking every byte; the fake
// writes each answer in one write.
func BenchmarkPOP3Sessions(b *testing.B) {
	fake := startFake(b)
	cfg := testConfig(fake)
	cfg.Log.Level = "info"
	cfg.POP3.MaxSessions = 200
	br, _ := startBridge(b, fake, cfg)
	fake.SetPOP3Writes(outlookpop.WritesBulk)
	const sessions, perSession, size = 100, 20, 100 << 10
	var msgs [][32]byte
	for i := range perSession {
		m := append([]byte(fmt.Sprintf("Subject: %d\r\n\r\n", i)), bytes.Repeat([]byte(fmt.Sprintf("%02d data line of a replication package..\r\n.\r\n", i)), size/48)...)
		msgs = append(msgs, sha256.Sum256(m))
		fake.AddMessage(mailboxA, m)
	}
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		var wg sync.WaitGroup
		for range sessions {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := dialPOP3(b, br.POP3Addr())
				p.login(userA, passwordA)
				for i := range perSession {
					p.cmd("RETR %d", i+1)
					h := sha256.New()
					if err := p.body(nil, h); err != nil {
						b.Error(err)
						return
					}
					if !bytes.Equal(h.Sum(nil), msgs[i][:]) {
						b.Errorf("message %d arrived changed", i+1)
					}
				}
				p.cmd("QUIT")
				p.conn.Close()
			}()
		}
		wg.Wait()
	}
	elapsed := time.Since(start)
	b.StopTimer()
	n := float64(b.N * sessions * perSession)
	b.ReportMetric(n/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(n*size/(1<<20)/elapsed.Seconds(), "MB/s")
	b.ReportMetric(float64(fake.TokenRequests(upstream.OutlookScope)), "token-requests")
	b.ReportMetric(0, "ns/op")
}
