package outbox_test

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"mailbridge/bridge/account"
	"mailbridge/bridge/admin"
	"mailbridge/bridge/config"
	"mailbridge/bridge/deliver"
	"mailbridge/bridge/mime"
	"mailbridge/bridge/outbox"
	"mailbridge/upstream"
)

// recorder is a deliver function that records when each message came and
// answers with the error its script gives.
type recorder struct {
	mu     sync.Mutex
	at     []time.Time
	script func(n int) error
}

func (r *recorder) deliver(ctx context.Context, m *deliver.Message, log zerolog.Logger) (deliver.Delivery, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.at = append(r.at, time.Now())
	var err error
	if r.script != nil {
		err = r.script(len(r.at))
	}
	return deliver.Delivery{User: m.GraphUser, Path: "sendMail"}, err
}

func (r *recorder) times() []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]time.Time(nil), r.at...)
}

// startOutbox runs an outbox in a temporary directory with the deliver
// function of rec, until the test ends.
func startOutbox(t *testing.T, rec *recorder, ratePerSecond float64) *outbox.Outbox {
	t.Helper()
	store, err := outbox.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	acct := &account.Account{Config: config.AccountConfig{Name: "a", Mailbox: "a@example.com"}}
	o := outbox.New(store, outbox.Options{
		Deliver: rec.deliver, Account: func(string) *account.Account { return acct },
		Metrics: admin.NewMetrics(), Log: zerolog.New(zerolog.NewTestWriter(t)),
		MaxAge: time.Hour, RatePerSecond: ratePerSecond, Retry: deliver.RetryPolicy{Base: 10 * time.Millisecond, Max: 20 * time.Millisecond},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); o.Run(ctx, context.Background()) }()
	t.Cleanup(func() { cancel(); <-done })
	for range 3 {
		m := &deliver.Message{Account: acct, From: "a@example.com", GraphUser: "a@example.com", Content: mimeOf("Subject: x\r\n\r\nx\r\n")}
		if _, err := o.Submit(context.Background(), m, zerolog.Nop()); err != nil {
			t.Fatal(err)
		}
	}
	return o
}

func waitUntil(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(d); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
	}
}

func TestTemporaryFailureIsRetriedPermanentGoesToFailed(t *testing.T) {
	rec := &recorder{script: func(n int) error {
		switch n {
		case 1:
			return &upstream.APIError{Status: 503} // temporary: tried again
		case 2:
			return &upstream.APIError{Status: 400, Code: "ErrorInvalidRecipients"} // permanent
		}
		return nil
	}}
	o := startOutbox(t, rec, 1000)
	waitUntil(t, 10*time.Second, func() bool { n, _ := o.Depth(); return n == 0 })
	list, err := o.Store().List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].State != "failed" || list[0].Failure.Kind != "content" || list[0].Failure.GraphCode != "ErrorInvalidRecipients" {
		t.Fatalf("outbox holds %+v, want one failed message with kind content", list)
	}
	if n := len(rec.times()); n != 4 {
		t.Errorf("%d attempts, want 4 (one retried, one failed, two sent)", n)
	}
}

func mimeOf(s string) mime.View { return mime.View{mime.BytesPiece([]byte(s))} }

// A message with a null sender that fails for good gets no report: the
// only delivery attempted is the message's own.
func TestNoReportForNullSender(t *testing.T) {
	rec := &recorder{script: func(int) error { return &upstream.APIError{Status: 400, Code: "ErrorInvalidRecipients"} }}
	store, err := outbox.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	acct := &account.Account{Config: config.AccountConfig{Name: "a", Mailbox: "a@example.com"}}
	o := outbox.New(store, outbox.Options{Deliver: rec.deliver, Account: func(string) *account.Account { return acct },
		Metrics: admin.NewMetrics(), Log: zerolog.New(zerolog.NewTestWriter(t)), MaxAge: time.Hour, RatePerSecond: 100, Bounce: true,
		Notify: []string{"it@example.com"}})
	m := &deliver.Message{Account: acct, From: "", GraphUser: "a@example.com", Content: mimeOf("Subject: x\r\n\r\nx\r\n")}
	if _, err := o.Submit(context.Background(), m, zerolog.Nop()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); o.Run(ctx, context.Background()) }()
	defer func() { cancel(); <-done }()
	waitUntil(t, 10*time.Second, func() bool { return o.FailedCount() == 1 })
	if n := len(rec.times()); n != 1 {
		t.Errorf("%d deliveries attempted, want 1 (no report for a null sender)", n)
	}
	list, _ := store.List()
	if len(list) != 1 || list[0].Failure.NDRSent || list[0].Failure.NDRSkipped != "the message has a null sender" {
		t.Errorf("failed/ holds %+v", list)
	}
}

// Entries planted or damaged while the bridge was stopped are never
// delivered (a copy of a queued envelope under another name is not a
// second message): each goes to failed/ with its reason.
func TestCorruptEntriesGoToFailed(t *testing.T) {
	dir := t.TempDir()
	store, err := outbox.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	add := func(body string) *outbox.Envelope {
		env := &outbox.Envelope{Account: "a", From: "a@example.com", GraphUser: "a@example.com", Size: int64(len(body)), Received: time.Now(), NextAttempt: time.Now()}
		if err := store.Add(env, strings.NewReader(body), 0); err != nil {
			t.Fatal(err)
		}
		return env
	}
	good := add("Subject: good\r\n\r\nx\r\n")
	short := add("Subject: short\r\n\r\nthis body is cut\r\n")
	q := func(name string) string { return filepath.Join(dir, "queue", name) }
	data, _ := os.ReadFile(q(good.ID + ".json"))
	os.WriteFile(q("20260101T000000-0000000000000001.json"), data, 0o600) // a copy under another name
	os.WriteFile(q("20260101T000000-0000000000000002.json"), []byte("{not json"), 0o600)
	os.WriteFile(q("20260101T000000-0000000000000002.eml"), []byte("x"), 0o600)
	os.WriteFile(q("20260101T000000-0000000000000003.json"), nil, 0o600) // empty
	os.WriteFile(q("20260101T000000-0000000000000003.eml"), []byte("x"), 0o600)
	os.Truncate(q(short.ID+".eml"), 10)

	list, _ := store.List()
	corrupt := 0
	for _, e := range list {
		if e.State == "corrupt" {
			corrupt++
		}
	}
	if corrupt != 4 {
		t.Errorf("queue list shows %d corrupt entries, want 4: %+v", corrupt, list)
	}

	rec := &recorder{}
	store.Close()
	if store, err = outbox.Open(dir); err != nil {
		t.Fatal(err)
	}
	acct := &account.Account{Config: config.AccountConfig{Name: "a", Mailbox: "a@example.com"}}
	var logs strings.Builder
	var mu sync.Mutex
	o := outbox.New(store, outbox.Options{Deliver: rec.deliver, Account: func(string) *account.Account { return acct },
		Metrics: admin.NewMetrics(), Log: zerolog.New(syncWriter{&mu, &logs}), MaxAge: time.Hour, RatePerSecond: 100})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); o.Run(ctx, context.Background()) }()
	defer func() { cancel(); <-done }()
	waitUntil(t, 10*time.Second, func() bool { n, _ := o.Depth(); return n == 0 && o.FailedCount() == 4 })
	time.Sleep(300 * time.Millisecond) // a second rescan must not bring any back
	if n := len(rec.times()); n != 1 {
		t.Errorf("%d deliveries, want the good message alone, once", n)
	}
	list, _ = store.List()
	reasons := map[string]bool{}
	for _, e := range list {
		if e.State != "failed" || e.Failure == nil {
			t.Errorf("left %+v", e)
			continue
		}
		for _, want := range []string{"names another message", "cannot be read", "is empty", "has 10 bytes, its envelope says"} {
			if strings.Contains(e.Failure.Reason, want) {
				reasons[want] = true
			}
		}
	}
	if len(reasons) != 4 {
		t.Errorf("reasons found %v in %+v", reasons, list)
	}
	mu.Lock()
	defer mu.Unlock()
	if n := strings.Count(logs.String(), `"message":"outbox: corrupt entry moved to failed/"`); n != 4 {
		t.Errorf("%d corrupt entries logged, want 4", n)
	}
}

type syncWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (s syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
