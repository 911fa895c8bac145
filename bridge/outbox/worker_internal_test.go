package outbox

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"mailbridge/bridge/account"
	"mailbridge/bridge/admin"
	"mailbridge/bridge/config"
	"mailbridge/bridge/deliver"
	"mailbridge/bridge/mime"
	"mailbridge/upstream"
)

// newTestOutbox returns an outbox in a temporary directory whose deliveries
// go to deliverFn, holding n small messages; nothing runs it.
func newTestOutbox(t *testing.T, n int, ratePerSecond float64, deliverFn DeliverFunc) *Outbox {
	t.Helper()
	store, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	acct := &account.Account{Config: config.AccountConfig{Name: "a", Mailbox: "a@example.com"}}
	w := New(store, Options{
		Deliver: deliverFn, Account: func(string) *account.Account { return acct },
		Metrics: admin.NewMetrics(), Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.ErrorLevel),
		MaxAge: time.Hour, RatePerSecond: ratePerSecond, Retry: deliver.RetryPolicy{Base: time.Millisecond, Max: time.Millisecond},
	})
	for i := range n {
		m := &deliver.Message{Account: acct, From: "a@example.com", GraphUser: fmt.Sprintf("u%d@example.com", i%16), MessageID: fmt.Sprintf("<%d@test>", i),
			Content: mime.View{mime.BytesPiece([]byte("Subject: x\r\n\r\nx\r\n"))}}
		if _, err := w.Submit(context.Background(), m, zerolog.Nop()); err != nil {
			t.Fatal(err)
		}
	}
	return w
}

// Rescans of the queue directory run while deliveries end and are retried,
// for sixteen mailboxes so that many are in flight at once:
// under -race this finds any index field read outside the lock. Every
// message is delivered exactly once.
func TestRescanWhileDelivering(t *testing.T) {
	const n = 200
	var mu sync.Mutex
	attempts, sent := map[string]int{}, map[string]int{}
	w := newTestOutbox(t, n, 1e6, func(ctx context.Context, m *deliver.Message, log zerolog.Logger) (deliver.Delivery, error) {
		mu.Lock()
		defer mu.Unlock()
		// Each message fails five times, so its entry changes on disk and goes
		// in and out of flight while the directory is read again.
		if attempts[m.MessageID]++; attempts[m.MessageID] <= 5 {
			return deliver.Delivery{}, &upstream.APIError{Status: 503}
		}
		sent[m.MessageID]++
		return deliver.Delivery{User: m.GraphUser, Path: "sendMail"}, nil
	})
	var rescans atomic.Int64
	stalled, last := 0, -1
	for {
		w.rescan()
		rescans.Add(1)
		w.dispatch(context.Background())
		depth, _ := w.Depth()
		if depth == 0 {
			break
		}
		// Progress, not a deadline: fail only when nothing has moved for
		// a long while.
		mu.Lock()
		moved := len(attempts) + len(sent)
		for _, a := range attempts {
			moved += a
		}
		mu.Unlock()
		if moved == last {
			if stalled++; stalled > 20000 {
				t.Fatalf("no delivery moved in %d rounds; %d queued", stalled, depth)
			}
			time.Sleep(time.Millisecond)
		} else {
			stalled, last = 0, moved
		}
	}
	w.wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if len(sent) != n {
		t.Fatalf("%d messages delivered, want %d", len(sent), n)
	}
	for id, c := range sent {
		if c != 1 {
			t.Errorf("%s delivered %d times", id, c)
		}
	}
	t.Logf("%d rescans while %d messages were delivered", rescans.Load(), n)
}

// A rate under one message a second spaces the attempts by its inverse:
// the values the limiter computes, on an injected clock.
func TestRateBelowOnePerSecondSpacesAttempts(t *testing.T) {
	var delivered atomic.Int64
	w := newTestOutbox(t, 3, 0.5, func(ctx context.Context, m *deliver.Message, log zerolog.Logger) (deliver.Delivery, error) {
		delivered.Add(1)
		return deliver.Delivery{User: m.GraphUser, Path: "sendMail"}, nil
	})
	now := time.Now().Add(time.Second) // every message is due
	w.now = func() time.Time { return now }
	for i, step := range []struct {
		advance time.Duration
		want    int64
	}{{0, 1}, {1999 * time.Millisecond, 1}, {time.Millisecond, 2}, {time.Second, 2}, {time.Second, 3}} {
		now = now.Add(step.advance)
		w.dispatch(context.Background())
		w.wg.Wait()
		if got := delivered.Load(); got != step.want {
			t.Fatalf("step %d (+%v): %d delivered, want %d at 0.5 a second", i, step.advance, got, step.want)
		}
	}
}

// A message found in flight at start-up (its outcome unknown) is handed
// over to be looked up before it is sent again; when that look-up could
// not be made and the message went again, it stays a possible duplicate
// until it is delivered, even when that send failed first.
func TestPossibleDuplicateSurvivesAFailedRetry(t *testing.T) {
	var attempts atomic.Int64
	var unknownAt []bool
	w := newTestOutbox(t, 1, 1e6, func(ctx context.Context, m *deliver.Message, log zerolog.Logger) (deliver.Delivery, error) {
		unknownAt = append(unknownAt, m.OutcomeUnknown)
		if attempts.Add(1) == 1 {
			// No read permission: sent again without a look-up, refused.
			return deliver.Delivery{PossibleDuplicate: true}, &upstream.APIError{Status: 429}
		}
		log.Info().Msg("attempt")
		return deliver.Delivery{User: m.GraphUser, Path: "sendMail"}, nil
	})
	var logs strings.Builder
	var mu sync.Mutex
	w.log = zerolog.New(zerolog.SyncWriter(writerFunc(func(p []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return logs.Write(p) })))
	for _, ix := range w.index { // as a crash mid-attempt leaves it
		ix.env.InFlight = true
		if err := w.store.saveEnvelope("queue", ix.env); err != nil {
			t.Fatal(err)
		}
	}
	for depth := 1; depth > 0 && attempts.Load() < 10; depth, _ = w.Depth() {
		w.dispatch(context.Background())
		w.wg.Wait()
		time.Sleep(2 * time.Millisecond) // the retry's back-off
	}
	mu.Lock()
	defer mu.Unlock()
	if attempts.Load() != 2 || !slices.Equal(unknownAt, []bool{true, false}) {
		t.Fatalf("%d attempts, outcome unknown at each: %v; want 2, [true false]", attempts.Load(), unknownAt)
	}
	if !strings.Contains(logs.String(), `"possible_duplicate":true,"message":"message sent"`) {
		t.Errorf("the delivery after a failed retry is not flagged:\n%s", logs.String())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// A message accepted while a rescan runs, after it read the directory, is
// not in the listing but is not gone: the rescan must keep it. It dropped
// it from the index (the next rescan found it again, 2 s later), so the
// queue's depth read 0 with a message waiting, and
// TestTemporaryFailureIsRetriedPermanentGoesToFailed failed under load.
func TestRescanKeepsAMessageAcceptedMeanwhile(t *testing.T) {
	w := newTestOutbox(t, 1, 1, nil)
	w.listedHook = func() {
		w.listedHook = nil
		acct := &account.Account{Config: config.AccountConfig{Name: "a", Mailbox: "a@example.com"}}
		m := &deliver.Message{Account: acct, From: "a@example.com", GraphUser: "a@example.com",
			Content: mime.View{mime.BytesPiece([]byte("Subject: meanwhile\r\n\r\nx\r\n"))}}
		if _, err := w.Submit(context.Background(), m, zerolog.Nop()); err != nil {
			t.Error(err)
		}
	}
	w.rescan()
	if n, _ := w.Depth(); n != 2 {
		t.Errorf("after the rescan the outbox holds %d messages in memory, want 2", n)
	}
}
