package bridge_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/upstream"
	"mailbridge/upstream/m365fake"
)

// benchMessage is a 10 KB message, as a legacy client sends a typical
// order or report.
func benchMessage() []byte {
	var b bytes.Buffer
	b.WriteString("From: orders@example.com\r\nTo: supplier@example.org\r\nSubject: PO benchmark\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
	for b.Len() < 10*1024 {
		b.WriteString("Line of an order confirmation, quantity 42, part 4711-0815, delivery at the next port.\r\n")
	}
	return b.Bytes()
}

const benchClients = 16

// startBenchBridge starts a bridge logging at info level to nowhere, as a
// production bridge logs, stopped when the benchmark ends.
func startBenchBridge(b *testing.B, fake *m365fake.Server, cfg *config.Config) *bridge.Bridge {
	cfg.Log.Level = "info"
	if err := cfg.Complete(""); err != nil {
		b.Fatal(err)
	}
	br, err := bridge.New(cfg, bridge.Options{Logger: bridge.NewLogger(io.Discard, cfg.Log), RootCAs: fake.CertPool()})
	if err != nil {
		b.Fatal(err)
	}
	if err := br.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { br.Shutdown(context.Background()) })
	return br
}

// BenchmarkRelay relays 10 KB messages from 16 concurrent SMTP clients
// through the bridge to the fake Graph and reports messages/s, and the
// median latency of a message under that load (p50-loaded-ms). Before the
// timed part it measures, one message at a time, the median latency through
// the bridge (MAIL FROM to the reply to DATA) and of the same MIME posted
// straight to the fake with the bridge's Graph client: their difference is
// what the bridge adds (p50-added-ms). token-requests counts the token
// requests of the whole run.
func BenchmarkRelay(b *testing.B) {
	fake := startFake(b)
	cfg := testConfig(fake)
	br := startBenchBridge(b, fake, cfg)
	msg := benchMessage()

	// Latency, unloaded: one message at a time, straight to the fake Graph
	// with the bridge's own Graph client, then through the bridge.
	direct := br.Accounts()[0].Graph
	one := dialAuth(b, br.SMTPAddr(), userA, passwordA)
	const latencySamples = 300
	var directLat, bridgeLat []time.Duration
	for range latencySamples {
		t0 := time.Now()
		if _, err := direct.SendMail(context.Background(), mailboxA, bytes.NewReader(msg), int64(len(msg))); err != nil {
			b.Fatal(err)
		}
		directLat = append(directLat, time.Since(t0))
		t0 = time.Now()
		if _, err := send(one, mailboxA, []string{"supplier@example.org"}, msg); err != nil {
			b.Fatal(err)
		}
		bridgeLat = append(bridgeLat, time.Since(t0))
	}

	clients := make([]*smtp.Client, benchClients)
	for i := range clients {
		c, err := smtp.Dial(br.SMTPAddr())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		if err := c.Auth(sasl.NewPlainClient("", userA, passwordA)); err != nil {
			b.Fatal(err)
		}
		clients[i] = c
	}
	before := len(fake.Sent())
	b.ResetTimer()
	start := time.Now()
	loadedLat := runConcurrent(b, b.N, func(worker int) func() error {
		c := clients[worker]
		return func() error {
			_, err := send(c, mailboxA, []string{"supplier@example.org"}, msg)
			return err
		}
	})
	elapsed := time.Since(start)
	b.StopTimer()
	if got := len(fake.Sent()) - before; got != b.N {
		b.Fatalf("Graph received %d messages, want %d", got, b.N)
	}
	p50d, p50b := median(directLat), median(bridgeLat)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(float64(p50b.Microseconds())/1000, "p50-bridge-ms")
	b.ReportMetric(float64(p50d.Microseconds())/1000, "p50-direct-ms")
	b.ReportMetric(float64((p50b-p50d).Microseconds())/1000, "p50-added-ms")
	b.ReportMetric(float64(median(loadedLat).Microseconds())/1000, "p50-loaded-ms")
	b.ReportMetric(float64(fake.TokenRequests(upstream.GraphScope)), "token-requests")
	b.ReportMetric(0, "ns/op")
}

// runConcurrent runs n operations on benchClients workers and returns each
// operation's latency.
func runConcurrent(b *testing.B, n int, op func(worker int) func() error) []time.Duration {
	lat := make([]time.Duration, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	for w := range benchClients {
		wg.Add(1)
		do := op(w)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				t0 := time.Now()
				if err := do(); err != nil {
					failed.Store(fmt.Errorf("operation %d: %w", i, err))
					return
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
	return lat
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkOutbox accepts 10 KB messages from 16 concurrent SMTP clients
// into the outbox (each written and fsynced before its 250) and reports the
// acceptance rate, then the rate at which the worker drains them to the
// fake Graph (4 requests in flight per mailbox, as Microsoft allows; the
// per-account rate limit raised out of the way).
func BenchmarkOutbox(b *testing.B) {
	fake := startFake(b)
	cfg := outboxConfig(b, fake)
	cfg.Outbox.RatePerSecond = 1e6
	br := startBenchBridge(b, fake, cfg)
	msg := benchMessage()
	clients := make([]*smtp.Client, benchClients)
	for i := range clients {
		clients[i] = dialAuth(b, br.SMTPAddr(), userA, passwordA)
	}
	b.ResetTimer()
	start := time.Now()
	runConcurrent(b, b.N, func(worker int) func() error {
		c := clients[worker]
		return func() error {
			_, err := send(c, mailboxA, []string{"supplier@example.org"}, msg)
			return err
		}
	})
	accepted := time.Since(start)
	for len(fake.Sent()) < b.N {
		time.Sleep(time.Millisecond)
	}
	drained := time.Since(start)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/accepted.Seconds(), "accepted-msgs/s")
	b.ReportMetric(float64(b.N)/drained.Seconds(), "drained-msgs/s")
	b.ReportMetric(0, "ns/op")
}
