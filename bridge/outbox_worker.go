package bridge

import (
	"container/heap"
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/rs/zerolog"

	"mailbridge/upstream"
)

// Limits of the delivery worker.
const (
	// perMailboxInFlight is Microsoft's limit of concurrent requests per
	// app and mailbox.
	perMailboxInFlight = 4
	// maxInFlight bounds deliveries in progress at once.
	maxInFlight = 32
	// maxIndexed bounds the envelopes held in memory; the rest wait on disk
	// and are read as the ones in memory are delivered.
	maxIndexed = 10000
	// rescanEvery is how often the queue directory is read again, for
	// `mailbridge queue retry` and for what did not fit in memory.
	rescanEvery = 2 * time.Second
)

// outboxRetry spaces the attempts at a queued message: Graph's Retry-After
// when it gives one, else from 1 second doubling to 10 minutes, with jitter.
var outboxRetry = retryPolicy{base: time.Second, max: 10 * time.Minute}

// outboxWorker delivers queued messages through Graph. Queued messages
// known in memory wait in a heap by next attempt; those whose mailbox has
// no free slot are parked until one of its deliveries ends.
type outboxWorker struct {
	b      *Bridge
	store  *outboxStore
	log    zerolog.Logger
	maxAge time.Duration
	retry  retryPolicy

	mu       sync.Mutex
	index    map[string]*indexed // queued messages known in memory, by ID
	ready    schedule
	parked   map[string][]*indexed // by Graph user
	inflight int
	perUser  map[string]int
	limiters map[string]*rateLimiter // by account
	lastScan time.Time

	wake chan struct{}
	wg   sync.WaitGroup
}

type indexed struct {
	env      *Envelope
	modTime  time.Time
	inflight bool
	parked   bool
	heapIdx  int // in ready; -1 when not there
}

// schedule is a min-heap of queued messages by next attempt.
type schedule []*indexed

func (h schedule) Len() int           { return len(h) }
func (h schedule) Less(i, j int) bool { return h[i].env.NextAttempt.Before(h[j].env.NextAttempt) }
func (h schedule) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].heapIdx, h[j].heapIdx = i, j
}
func (h *schedule) Push(x any) {
	ix := x.(*indexed)
	ix.heapIdx = len(*h)
	*h = append(*h, ix)
}
func (h *schedule) Pop() any {
	old := *h
	ix := old[len(old)-1]
	*h = old[:len(old)-1]
	ix.heapIdx = -1
	return ix
}

func newOutboxWorker(b *Bridge, store *outboxStore, log zerolog.Logger) *outboxWorker {
	return &outboxWorker{
		b: b, store: store, log: log, maxAge: b.cfg.Outbox.MaxAge.Duration, retry: outboxRetry,
		index: map[string]*indexed{}, parked: map[string][]*indexed{}, perUser: map[string]int{}, limiters: map[string]*rateLimiter{},
		wake: make(chan struct{}, 1),
	}
}

// depth returns the number of queued messages known in memory and the age
// of the oldest.
func (w *outboxWorker) depth() (int, time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var oldest time.Time
	for _, ix := range w.index {
		if oldest.IsZero() || ix.env.Received.Before(oldest) {
			oldest = ix.env.Received
		}
	}
	if oldest.IsZero() {
		return 0, 0
	}
	return len(w.index), time.Since(oldest)
}

// enqueue makes a message just added to the store known to the worker.
func (w *outboxWorker) enqueue(env *Envelope) {
	w.mu.Lock()
	if len(w.index) < maxIndexed {
		w.track(&indexed{env: env})
	}
	w.mu.Unlock()
	w.poke()
}

// track adds ix to the index and the schedule; w.mu is held.
func (w *outboxWorker) track(ix *indexed) {
	w.index[ix.env.ID] = ix
	heap.Push(&w.ready, ix)
}

func (w *outboxWorker) poke() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// run dispatches due messages until ctx ends, then waits for the
// deliveries in progress, which end when deliverCtx does.
func (w *outboxWorker) run(ctx, deliverCtx context.Context) {
	defer w.wg.Wait()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if time.Since(w.lastScan) >= rescanEvery {
			w.rescan()
		}
		w.dispatch(deliverCtx)
		select {
		case <-ctx.Done():
			return
		case <-w.wake:
		case <-tick.C:
		}
	}
}

// rescan reads the queue directory: new entries (from start-up, from
// `mailbridge queue retry`, or beyond maxIndexed), changed envelopes, and
// entries deleted by `mailbridge queue delete`.
func (w *outboxWorker) rescan() {
	w.lastScan = time.Now()
	entries, err := os.ReadDir(w.store.path("queue"))
	if err != nil {
		w.log.Error().Err(err).Msg("outbox: cannot read the queue directory")
		return
	}
	present := map[string]bool{}
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		present[id] = true
		info, err := e.Info()
		if err != nil {
			continue
		}
		w.mu.Lock()
		known := w.index[id]
		full := len(w.index) >= maxIndexed
		w.mu.Unlock()
		if (known != nil && (known.inflight || known.modTime.Equal(info.ModTime()))) || (known == nil && full) {
			continue
		}
		env, err := w.store.readEnvelope("queue", id)
		if err != nil {
			continue
		}
		w.mu.Lock()
		switch cur := w.index[id]; {
		case cur == nil:
			w.track(&indexed{env: env, modTime: info.ModTime()})
		case !cur.inflight:
			cur.env, cur.modTime = env, info.ModTime()
			if cur.heapIdx >= 0 {
				heap.Fix(&w.ready, cur.heapIdx)
			}
		}
		w.mu.Unlock()
	}
	w.mu.Lock()
	for id, ix := range w.index {
		if present[id] || ix.inflight {
			continue
		}
		delete(w.index, id)
		if ix.heapIdx >= 0 {
			heap.Remove(&w.ready, ix.heapIdx)
		}
		if ix.parked {
			user := ix.env.GraphUser
			w.parked[user] = slices.DeleteFunc(w.parked[user], func(p *indexed) bool { return p == ix })
		}
	}
	w.mu.Unlock()
}

// dispatch starts deliveries of due messages, oldest first, within the
// limits per mailbox, per account and overall.
func (w *outboxWorker) dispatch(ctx context.Context) {
	now := time.Now()
	w.mu.Lock()
	var start, limited []*indexed
	for w.ready.Len() > 0 && w.inflight < maxInFlight && !w.ready[0].env.NextAttempt.After(now) {
		ix := heap.Pop(&w.ready).(*indexed)
		user := ix.env.GraphUser
		if w.perUser[user] >= perMailboxInFlight {
			ix.parked = true
			w.parked[user] = append(w.parked[user], ix)
			continue
		}
		lim := w.limiters[ix.env.Account]
		if lim == nil {
			lim = newRateLimiter(w.b.cfg.Outbox.RatePerSecond)
			w.limiters[ix.env.Account] = lim
		}
		if !lim.allow(now) {
			limited = append(limited, ix)
			continue
		}
		ix.inflight = true
		w.inflight++
		w.perUser[user]++
		start = append(start, ix)
	}
	for _, ix := range limited {
		heap.Push(&w.ready, ix)
	}
	w.mu.Unlock()
	for _, ix := range start {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			user := ix.env.GraphUser
			remove := w.deliver(ctx, ix.env)
			w.mu.Lock()
			w.inflight--
			w.perUser[user]--
			ix.inflight = false
			if remove {
				delete(w.index, ix.env.ID)
			} else {
				heap.Push(&w.ready, ix)
			}
			// The mailbox has a free slot: its oldest parked message
			// competes again (one per freed slot keeps this O(log n)).
			if q := w.parked[user]; len(q) > 0 {
				q[0].parked = false
				heap.Push(&w.ready, q[0])
				if w.parked[user] = q[1:]; len(q) == 1 {
					delete(w.parked, user)
				}
			}
			w.mu.Unlock()
			w.poke()
		}()
	}
}

// deliver makes one attempt at env and records the outcome on disk. It
// reports whether the message left the queue.
func (w *outboxWorker) deliver(ctx context.Context, env *Envelope) bool {
	log := w.log.With().Str("queue_id", env.ID).Str("account", env.Account).Str("from", env.From).Int("rcpt_count", len(env.Recipients)).Int64("bytes", env.Size).Logger()
	if age := time.Since(env.Received); age > w.maxAge {
		w.giveUp(log, env, &Failure{Reason: "not delivered within outbox.max_age (" + w.maxAge.String() + "); last error: " + env.LastError})
		return true
	}
	a := w.b.accountByName(env.Account)
	if a == nil {
		w.giveUp(log, env, &Failure{Reason: "the account is no longer in the configuration"})
		return true
	}
	f, err := os.Open(w.store.file("queue", env.ID, "eml"))
	if err != nil {
		log.Error().Err(err).Msg("outbox: message file missing; dropping the entry")
		w.store.Delete(env.ID)
		return true
	}
	defer f.Close()
	msg := view{piece{r: f, n: env.Size}}
	start := time.Now()
	sctx, cancel := context.WithTimeout(ctx, w.b.cfg.SMTP.SendTimeout.Duration)
	var d delivery
	if env.Size <= upstream.MaxSendMailMIME {
		// One attempt: the outbox spaces the retries itself.
		d = delivery{user: env.GraphUser, path: "sendMail"}
		err = sendOnce(sctx, a.Sender, &d, env.FallbackUser, msg, env.Size)
	} else {
		cancel()
		sctx, cancel = context.WithCancel(ctx)
		d, err = w.b.deliverLarge(sctx, a, log, env.GraphUser, env.FallbackUser, msg)
	}
	cancel()
	env.Attempts++
	ev := log.With().Str("graph_user", d.user).Int("graph_status", graphStatus(d, err)).Str("request_id", d.result.RequestID).
		Int("attempts", env.Attempts).Str("path", d.path).Int64("duration_ms", time.Since(start).Milliseconds()).
		Dur("age_ms", time.Since(env.Received)).Logger()
	if err == nil {
		if err := w.store.delivered(env); err != nil {
			ev.Error().Err(err).Msg("outbox: delivered, but the entry could not be removed")
		}
		ev.Info().Msg("message sent")
		w.b.metrics.message(env.Account, "sent", nil, env.Size)
		return true
	}
	if ctx.Err() != nil {
		ev.Info().Msg("outbox: delivery interrupted by shutdown; the message stays queued")
		env.Attempts--
		return false
	}
	if permanent(err) {
		f := &Failure{Reason: err.Error(), Hint: adminHint(err), At: time.Now()}
		var apiErr *upstream.APIError
		if errors.As(err, &apiErr) {
			f.GraphStatus, f.GraphCode, f.RequestID = apiErr.Status, apiErr.Code, apiErr.RequestID
		}
		w.giveUp(ev, env, f)
		return true
	}
	wait := w.retry.wait(env.Attempts, err)
	env.NextAttempt = time.Now().Add(wait)
	env.LastError = err.Error()
	e := ev.Warn().Err(err).Time("next_attempt", env.NextAttempt)
	if hint := adminHint(err); hint != "" {
		e = e.Str("hint", hint)
	}
	if unknownOutcome(err) {
		e = e.Bool("possible_duplicate", true)
	}
	e.Msg("message not sent yet: will retry")
	if err := w.store.saveEnvelope("queue", env); err != nil {
		ev.Error().Err(err).Msg("outbox: cannot save the envelope")
	}
	return false
}

func (w *outboxWorker) giveUp(log zerolog.Logger, env *Envelope, f *Failure) {
	if f.At.IsZero() {
		f.At = time.Now()
	}
	ev := log.Error().Str("reason", f.Reason)
	if f.Hint != "" {
		ev = ev.Str("hint", f.Hint)
	}
	ev.Msg("message failed for good: moved to outbox/failed")
	w.b.metrics.message(env.Account, "failed", errors.New(f.Reason), env.Size)
	if err := w.store.fail(env, f); err != nil {
		log.Error().Err(err).Msg("outbox: cannot move the message to failed/")
	}
}

// permanent reports whether an error of Graph means the message can never
// be sent as it is: content refused, sender not allowed, mailbox gone.
// Problems an administrator fixes (secret, consent) are not: the message
// waits, up to max_age.
func permanent(err error) bool {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code >= 500
	}
	var apiErr *upstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	switch {
	case apiErr.Status == http.StatusBadRequest, apiErr.Status == http.StatusRequestEntityTooLarge:
		return true
	case apiErr.Status == http.StatusForbidden && apiErr.Code == "ErrorSendAsDenied":
		return true
	case noMailbox(err):
		return true
	}
	return false
}

// unknownOutcome reports whether Graph may have taken the message although
// no answer came: a retry may then send it twice. An answer, a token that
// could not be had, or a connection never made rule that out.
func unknownOutcome(err error) bool {
	var apiErr *upstream.APIError
	var tokErr *upstream.TokenError
	var se *smtp.SMTPError
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Op == "dial" {
		return false
	}
	return !errors.As(err, &apiErr) && !errors.As(err, &tokErr) && !errors.As(err, &se) && !errors.Is(err, errSpool)
}

// rateLimiter is a token bucket: rate requests per second, bursts of rate.
type rateLimiter struct {
	rate   float64
	tokens float64
	last   time.Time
}

func newRateLimiter(rate float64) *rateLimiter { return &rateLimiter{rate: rate, tokens: rate} }

func (l *rateLimiter) allow(now time.Time) bool {
	if !l.last.IsZero() {
		l.tokens = min(l.rate, l.tokens+now.Sub(l.last).Seconds()*l.rate)
	}
	l.last = now
	if l.tokens < 1 {
		return false
	}
	l.tokens--
	return true
}
