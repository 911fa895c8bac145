package outbox

import (
	"container/heap"
	"context"
	"errors"
	"mailbridge/bridge/account"
	"mailbridge/bridge/admin"
	"mailbridge/bridge/deliver"
	"mailbridge/bridge/failure"
	"mailbridge/bridge/mime"
	"math"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/time/rate"
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

// DefaultRetry spaces the attempts at a queued message: Graph's
// Retry-After when it gives one, else from 1 second doubling to 10
// minutes, with jitter.
var DefaultRetry = deliver.RetryPolicy{Base: time.Second, Max: 10 * time.Minute}

// DeliverFunc makes one attempt at a message (deliver.Deliverer.Attempt).
type DeliverFunc func(ctx context.Context, m *deliver.Message, log zerolog.Logger) (deliver.Delivery, error)

// Options are what an Outbox needs besides its store.
type Options struct {
	// Deliver makes one attempt at a message.
	Deliver DeliverFunc
	// Account returns the account in force of that name, nil if none.
	Account func(name string) *account.Account
	Metrics *admin.Metrics
	Log     zerolog.Logger
	// MaxAge is how long a message may wait before it goes to failed/.
	MaxAge time.Duration
	// MaxBytes bounds the queued messages on disk; 0 is no bound.
	MaxBytes int64
	// RatePerSecond bounds the deliveries started per account.
	RatePerSecond float64
	// Retry spaces the attempts; zero means DefaultRetry.
	Retry deliver.RetryPolicy
	// Bounce sends a non-delivery report for a message that failed for
	// good; Notify get a copy of each.
	Bounce bool
	Notify []string
	// Hint, if set, gives the fix for a failure of account a's delivery
	// (the hosts to open when Microsoft is out of reach); hint is the
	// failure's own.
	Hint func(a *account.Account, err error, hint string) string
}

// Outbox is the store and its delivery worker. Queued messages known in
// memory wait in a heap by next attempt; those whose mailbox has no free
// slot are parked until one of its deliveries ends.
type Outbox struct {
	store *Store
	opts  Options
	log   zerolog.Logger

	mu       sync.Mutex
	index    map[string]*indexed // queued messages known in memory, by ID
	ready    schedule
	parked   map[string][]*indexed // by Graph user
	inflight int
	perUser  map[string]int
	limiters map[string]*rate.Limiter // by account
	lastScan time.Time
	tracked  uint64 // how many entries track has added, ever (indexed.seq)
	// listedHook, in tests, runs in rescan once the directory is read.
	listedHook func()

	wake chan struct{}
	wg   sync.WaitGroup
	now  func() time.Time // the clock of the rate limits and the schedule

	reported     map[string]*FailureRecord // reports sent for messages not yet in failed/, by ID
	failedDirErr atomic.Pointer[error]     // the last move to failed/ that failed
}

type indexed struct {
	env      *Envelope
	modTime  time.Time
	inflight bool
	parked   bool
	heapIdx  int    // in ready; -1 when not there
	seq      uint64 // Outbox.tracked when it was added
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

// New returns the outbox of store; Run delivers its messages.
func New(store *Store, opts Options) *Outbox {
	if opts.Retry == (deliver.RetryPolicy{}) {
		opts.Retry = DefaultRetry
	}
	return &Outbox{
		store: store, opts: opts, log: opts.Log,
		index: map[string]*indexed{}, parked: map[string][]*indexed{}, perUser: map[string]int{}, limiters: map[string]*rate.Limiter{},
		wake: make(chan struct{}, 1), now: time.Now, reported: map[string]*FailureRecord{},
	}
}

// FailedCount returns the number of messages in failed/.
func (w *Outbox) FailedCount() int { n, _ := w.store.Failed(time.Now()); return n }

// Store returns the outbox's files.
func (w *Outbox) Store() *Store { return w.store }

var _ deliver.Submitter = (*Outbox)(nil)

// Submit writes the message to the outbox durably and returns its queue ID
// only then; the worker delivers it.
func (w *Outbox) Submit(ctx context.Context, m *deliver.Message, log zerolog.Logger) (deliver.Receipt, error) {
	env := &Envelope{
		Account: m.Account.Config.Name, From: m.From, Recipients: slices.Clone(m.Recipients),
		GraphUser: m.GraphUser, FallbackUser: m.FallbackUser, Size: m.Size(), Received: time.Now(), NextAttempt: time.Now(),
		Session: m.Session, Remote: m.Remote, MessageID: m.MessageID, IDReused: m.IDReused, Subject: m.Subject,
	}
	if err := w.store.Add(env, m.Content, w.opts.MaxBytes); err != nil {
		return deliver.Receipt{}, err
	}
	w.enqueue(env)
	return deliver.Receipt{QueueID: env.ID, Delivery: deliver.Delivery{User: m.GraphUser}}, nil
}

// Depth returns the number of queued messages known in memory and the age
// of the oldest.
func (w *Outbox) Depth() (int, time.Duration) {
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

// ErrInFlight is the refusal to change a message that is being delivered
// now.
var ErrInFlight = errors.New("the message is being delivered now: wait for the outcome")

// Retry makes a queued message due now, or puts a failed one back in the
// queue, while the worker runs. A message being delivered is left alone
// (ErrInFlight).
func (w *Outbox) Retry(id string) (requeued bool, err error) {
	if !validID(id) {
		return false, errNoMessage(id)
	}
	w.mu.Lock()
	if ix := w.index[id]; ix != nil {
		defer w.mu.Unlock()
		if ix.inflight {
			return false, ErrInFlight
		}
		ix.env.NextAttempt = time.Now()
		if ix.heapIdx >= 0 {
			heap.Fix(&w.ready, ix.heapIdx)
		}
		err := w.store.saveEnvelope("queue", ix.env)
		w.poke()
		return false, err
	}
	w.mu.Unlock()
	if _, err := w.store.readEnvelope("failed", id); err != nil {
		// Queued but not held in memory (beyond maxIndexed): the file
		// changes, and the next rescan sees it.
		return false, w.store.Retry(id)
	}
	if err := w.store.Retry(id); err != nil {
		return false, err
	}
	if env, err := w.store.readEnvelope("queue", id); err == nil {
		w.enqueue(env)
	}
	return true, nil
}

// Delete removes a queued or failed message while the worker runs. A
// message being delivered is left alone (ErrInFlight).
func (w *Outbox) Delete(id string) error {
	if !validID(id) {
		return errNoMessage(id)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if ix := w.index[id]; ix != nil {
		if ix.inflight {
			return ErrInFlight
		}
		w.untrack(ix)
	}
	return w.store.Delete(id)
}

// enqueue makes a message just added to the store known to the worker.
func (w *Outbox) enqueue(env *Envelope) {
	w.mu.Lock()
	// A message put back from failed/ may have been found by a rescan
	// already: one index entry, or it would be delivered twice.
	if _, known := w.index[env.ID]; !known && len(w.index) < maxIndexed {
		w.track(&indexed{env: env})
	}
	w.mu.Unlock()
	w.poke()
}

// untrack removes ix from the index, the schedule and the parked lists;
// w.mu is held.
func (w *Outbox) untrack(ix *indexed) {
	delete(w.index, ix.env.ID)
	if ix.heapIdx >= 0 {
		heap.Remove(&w.ready, ix.heapIdx)
	}
	if ix.parked {
		user := ix.env.GraphUser
		w.parked[user] = slices.DeleteFunc(w.parked[user], func(p *indexed) bool { return p == ix })
	}
}

// track adds ix to the index and the schedule; w.mu is held.
func (w *Outbox) track(ix *indexed) {
	w.tracked++
	ix.seq = w.tracked
	w.index[ix.env.ID] = ix
	heap.Push(&w.ready, ix)
}

func (w *Outbox) poke() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// Run dispatches due messages until ctx ends, then waits for the
// deliveries in progress, which end when deliverCtx does.
func (w *Outbox) Run(ctx, deliverCtx context.Context) {
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
func (w *Outbox) rescan() {
	w.lastScan = time.Now()
	// An entry added after the directory was read (a message accepted
	// meanwhile) is not in the listing, and not gone.
	w.mu.Lock()
	listed := w.tracked
	w.mu.Unlock()
	entries, err := os.ReadDir(w.store.path("queue"))
	if err != nil {
		w.log.Error().Err(err).Msg("outbox: cannot read the queue directory")
		return
	}
	if w.listedHook != nil {
		w.listedHook()
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
		// The index entry's fields change under w.mu as deliveries end:
		// decide while holding it.
		w.mu.Lock()
		known := w.index[id]
		skip := (known != nil && (known.inflight || known.modTime.Equal(info.ModTime()))) || (known == nil && len(w.index) >= maxIndexed)
		w.mu.Unlock()
		if skip {
			continue
		}
		env, err := w.store.readEnvelope("queue", id)
		var ce *corruptError
		if errors.As(err, &ce) {
			w.log.Error().Str("queue_id", id).Str("reason", "local").Str("error", ce.reason).
				Str("hint", "the entry was damaged or changed by hand: it goes to outbox/failed and is not delivered").Msg("outbox: corrupt entry moved to failed/")
			if err := w.store.quarantine(id, env, ce.reason); err != nil {
				w.log.Error().Err(err).Str("queue_id", id).Msg("outbox: cannot move a corrupt entry to failed/")
			}
			delete(present, id)
			continue
		}
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
		if present[id] || ix.inflight || ix.seq > listed {
			continue
		}
		w.untrack(ix)
	}
	w.mu.Unlock()
}

// dispatch starts deliveries of due messages, oldest first, within the
// limits per mailbox, per account and overall.
func (w *Outbox) dispatch(ctx context.Context) {
	now := w.now()
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
			lim = rate.NewLimiter(rate.Limit(w.opts.RatePerSecond), max(1, int(math.Ceil(w.opts.RatePerSecond))))
			w.limiters[ix.env.Account] = lim
		}
		if !lim.AllowN(now, 1) {
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
func (w *Outbox) deliver(ctx context.Context, env *Envelope) bool {
	log := w.log.With().Str("queue_id", env.ID).Str("account", env.Account).Str("session", env.Session).Str("remote", env.Remote).
		Str("message_id", env.MessageID).Str("subject", env.Subject).Str("from", env.From).Strs("rcpt", env.Recipients).Int("rcpt_count", len(env.Recipients)).
		Int64("bytes", env.Size).Logger()
	if age := time.Since(env.Received); age > w.opts.MaxAge {
		w.giveUp(ctx, log, w.opts.Account(env.Account), env, &FailureRecord{Kind: string(failure.Timeout), Reason: "not delivered within outbox.max_age (" + w.opts.MaxAge.String() + "); last error: " + env.LastError})
		return true
	}
	a := w.opts.Account(env.Account)
	if a == nil {
		w.giveUp(ctx, log, nil, env, &FailureRecord{Kind: string(failure.Local), Reason: "the account is no longer in the configuration",
			Hint: "put the account back in the configuration and run `mailbridge queue retry-failed`, or delete the message"})
		return true
	}
	f, err := os.Open(w.store.file("queue", env.ID, "eml"))
	if err != nil {
		log.Error().Err(err).Msg("outbox: message file missing; dropping the entry")
		w.store.Delete(env.ID)
		return true
	}
	defer f.Close()
	m := &deliver.Message{Account: a, From: env.From, Recipients: env.Recipients, GraphUser: env.GraphUser, FallbackUser: env.FallbackUser,
		Content: mime.View{mime.NewPiece(f, 0, env.Size)}, Session: env.Session, Remote: env.Remote, MessageID: env.MessageID,
		StaleDraft: env.DraftID, IDReused: env.IDReused, FirstAttempt: env.Received, Subject: env.Subject,
		// An attempt that was under way when the bridge died may have
		// reached Graph: Sent Items is looked at before it goes again.
		OutcomeUnknown: env.InFlight || env.OutcomeUnknown}
	env.InFlight = true
	if err := w.store.saveEnvelope("queue", env); err != nil {
		log.Error().Err(err).Msg("outbox: cannot mark the message in flight")
	}
	m.OnDraft = func(id string) { // kept, so that a crash leaves no draft behind
		env.DraftID = id
		if err := w.store.saveEnvelope("queue", env); err != nil {
			log.Error().Err(err).Msg("outbox: cannot record the draft")
		}
	}
	start := time.Now()
	d, err := w.opts.Deliver(ctx, m, log)
	// Closed before the entry is removed or moved: Windows can do neither
	// to an open file, which would stay behind in queue/.
	f.Close()
	env.Attempts++
	env.InFlight, env.DraftID = false, "" // the draft was sent, or deleted
	env.OutcomeUnknown = d.OutcomeUnknown
	if d.PossibleDuplicate {
		env.MaybeSent = true
	}
	fl := failure.Classify(err)
	status := d.Result.Status
	if fl.GraphStatus != 0 {
		status = fl.GraphStatus
	}
	ev := log.With().Str("graph_user", d.User).Int("graph_status", status).Str("request_id", d.Result.RequestID).
		Int("attempts", env.Attempts).Str("path", d.Path).Int64("duration_ms", time.Since(start).Milliseconds()).
		Int64("age_ms", time.Since(env.Received).Milliseconds()).Logger()
	if err == nil {
		if err := w.store.delivered(env); err != nil {
			ev.Error().Err(err).Msg("outbox: delivered, but the entry could not be removed")
		}
		done := ev.Info()
		if d.FoundInSentItems {
			done = done.Bool("found_in_sent_items", true)
		}
		if env.MaybeSent {
			done = done.Bool("possible_duplicate", true)
		}
		done.Msg("message sent")
		w.opts.Metrics.Final(admin.FinalMessage{Account: env.Account, Result: "sent", QueueID: env.ID, MessageID: env.MessageID, Subject: env.Subject,
			From: env.From, Recipients: env.Recipients, GraphStatus: status, RequestID: d.Result.RequestID}, env.Size)
		return true
	}
	if ctx.Err() != nil {
		ev.Info().Msg("outbox: delivery interrupted by shutdown; the message stays queued")
		env.Attempts--
		env.InFlight = true // the outcome is unknown: looked up at the next start
		if err := w.store.saveEnvelope("queue", env); err != nil {
			ev.Error().Err(err).Msg("outbox: cannot save the envelope")
		}
		return false
	}
	if !fl.Temporary {
		w.giveUp(ctx, ev, a, env, &FailureRecord{Kind: string(fl.Kind), Reason: fl.Reason, Hint: fl.Hint, At: time.Now(),
			GraphStatus: fl.GraphStatus, GraphCode: fl.Code, RequestID: fl.RequestID})
		return true
	}
	wait := w.opts.Retry.Wait(env.Attempts, err)
	env.NextAttempt = time.Now().Add(wait)
	env.LastError, env.LastReason, env.LastHint = err.Error(), failure.Summary(err), fl.Hint
	if w.opts.Hint != nil {
		env.LastHint = w.opts.Hint(a, err, fl.Hint)
	}
	e := ev.Warn().Err(err).Str("reason", string(fl.Kind)).Time("next_attempt", env.NextAttempt)
	if fl.Hint != "" {
		e = e.Str("hint", fl.Hint)
	}
	if fl.PossibleDuplicate {
		e = e.Bool("possible_duplicate", true)
	}
	e.Msg("message not sent yet: will retry")
	if err := w.store.saveEnvelope("queue", env); err != nil {
		ev.Error().Err(err).Msg("outbox: cannot save the envelope")
	}
	return false
}

// giveUp moves env to failed/ with rec, after sending its non-delivery
// report (a, the account, may be nil when it is gone), and logs the
// message's final line.
func (w *Outbox) giveUp(ctx context.Context, log zerolog.Logger, a *account.Account, env *Envelope, rec *FailureRecord) {
	if rec.At.IsZero() {
		rec.At = time.Now()
	}
	// At most one report per message, whatever the disk does: a message
	// that could not be moved to failed/ stays queued and fails again, and
	// its report was recorded on its envelope (or, the disk refusing
	// even that, here in memory).
	w.mu.Lock()
	prior := w.reported[env.ID]
	w.mu.Unlock()
	if prior == nil && env.Failure != nil && (env.Failure.NDRSent || env.Failure.NDRSkipped != "") {
		prior = env.Failure
	}
	if prior != nil {
		rec.NDRSent, rec.NDRRequestID, rec.NDRTo, rec.NDRSkipped = prior.NDRSent, prior.NDRRequestID, prior.NDRTo, prior.NDRSkipped
	} else {
		w.bounce(ctx, log, a, env, rec)
		w.mu.Lock()
		w.reported[env.ID] = rec
		w.mu.Unlock()
	}
	ev := log.Error().Str("reason", rec.Kind).Str("error", rec.Reason)
	if rec.Hint != "" {
		ev = ev.Str("hint", rec.Hint)
	}
	ev = ev.Bool("ndr_sent", rec.NDRSent)
	if rec.NDRRequestID != "" {
		ev = ev.Str("ndr_request_id", rec.NDRRequestID)
	}
	ev.Str("moved_to", "outbox/failed").Msg("message failed")
	w.opts.Metrics.Final(admin.FinalMessage{At: rec.At, Account: env.Account, Result: "failed", QueueID: env.ID, MessageID: env.MessageID, Subject: env.Subject,
		From: env.From, Recipients: env.Recipients, GraphStatus: rec.GraphStatus, RequestID: rec.RequestID,
		Reason: rec.Kind, Error: rec.Reason, Hint: rec.Hint}, env.Size)
	if err := w.store.fail(env, rec); err != nil {
		w.failedDirErr.Store(&err)
		log.Error().Err(err).Str("dir", w.store.path("failed")).
			Str("hint", "outbox/failed cannot take the message (a full disk, or a file where the directory should be): free space or make it a directory again; the message stays queued, and its report is not sent again").
			Msg("outbox: cannot move the message to failed/")
		return
	}
	w.failedDirErr.Store(nil)
	w.mu.Lock()
	delete(w.reported, env.ID)
	w.mu.Unlock()
}

// FailedDirError returns why the last move of a message to failed/
// failed, nil if it worked (or none was tried).
func (w *Outbox) FailedDirError() error {
	if p := w.failedDirErr.Load(); p != nil {
		return *p
	}
	return nil
}
