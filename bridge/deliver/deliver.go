// Package deliver sends a message through Microsoft Graph: sendMail for a
// message that fits one request, or a draft with attachments (by upload
// session from 3 MB) for a larger one; retries with Graph's Retry-After or
// backoff; the pacer that keeps uploads under Graph's 150 MB per 5 minutes;
// and the Submitter seam through which the SMTP server hands a message
// over, implemented here by direct delivery and by the outbox.
//
// It may import bridge/account, bridge/failure, bridge/mime and upstream.
package deliver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"time"

	"github.com/rs/zerolog"

	"mailbridge/bridge/account"
	"mailbridge/bridge/failure"
	"mailbridge/bridge/mime"
	"mailbridge/upstream"
)

// Graph is what delivery needs of Microsoft Graph: sendMail, and for a
// message over its limit a draft from MIME, attachments (in one request or
// an upload session), sending the draft, and deleting it when that fails;
// and a look in Sent Items after a send whose outcome is unknown.
// Refusals are *upstream.APIError, a token that could not be had
// *upstream.TokenError. *upstream.GraphClient is the real one.
type Graph interface {
	SendMail(ctx context.Context, user string, mime io.ReaderAt, size int64) (upstream.SendResult, error)
	CreateDraft(ctx context.Context, user string, mime io.ReaderAt, size int64) (string, error)
	AddAttachment(ctx context.Context, user, messageID string, a upstream.Attachment, content io.ReaderAt) error
	CreateUploadSession(ctx context.Context, user, messageID string, a upstream.Attachment) (*upstream.UploadSession, error)
	UploadChunk(ctx context.Context, s *upstream.UploadSession, content io.ReaderAt) (bool, error)
	CancelUpload(ctx context.Context, s *upstream.UploadSession) error
	SendDraft(ctx context.Context, user, messageID string) (upstream.SendResult, error)
	DeleteMessage(ctx context.Context, user, messageID string) error
	FindSent(ctx context.Context, user, internetMessageID string, since time.Time) (upstream.SentCopy, bool, error)
}

var _ Graph = (*upstream.GraphClient)(nil)

// Message is one message handed over for delivery: the account it came in
// on, its envelope, and its content as Graph must receive it.
type Message struct {
	Account    *account.Account
	From       string
	Recipients []string
	// GraphUser is the mailbox to send as; FallbackUser, if not "", is
	// tried when Graph says GraphUser has no mailbox.
	GraphUser, FallbackUser string
	Content                 mime.View
	// Session and Remote name the SMTP session that received the message,
	// for the log. MessageID is its Message-ID (the client's, or the one
	// the bridge added at DATA), by which it is looked up in Sent Items.
	Session, Remote, MessageID string
	// Subject is the message's Subject for the log, decoded and clipped.
	Subject string
	// IDReused: another message the bridge took recently had the same
	// Message-ID, so Sent Items cannot tell this one apart.
	IDReused bool
	// OutcomeUnknown: an earlier send of this message may have reached
	// Graph; it is looked up in Sent Items before it is sent again.
	OutcomeUnknown bool
	// FirstAttempt is when the bridge took the message: a copy in Sent
	// Items much older than that is another message.
	FirstAttempt time.Time
	// StaleDraft is a draft an earlier, interrupted attempt left at Graph:
	// it is deleted before the message goes again.
	StaleDraft string
	// OnDraft, if set, is told the id of the draft a large message's
	// attempt created, before anything is uploaded to it.
	OnDraft func(id string)

	planned *plannedSplit // Plan's split of Content, reused by the send
}

// plannedSplit is how a large message leaves: the parts taken out and the
// draft.
type plannedSplit struct {
	removed []*mime.Part
	draft   mime.View
}

// Size is the number of bytes of the message's content.
func (m *Message) Size() int64 { return m.Content.Size() }

// Delivery is the outcome of sending one message, for the log.
type Delivery struct {
	Result   upstream.SendResult
	User     string // the Graph user that finally sent (or last tried)
	Attempts int
	FellBack bool   // use_address_from_user fell back to the account mailbox
	Path     string // "sendMail", or "draft" for a large message
	// FoundInSentItems: an earlier send's outcome was unknown, and the
	// message was found in Sent Items instead of being sent again.
	FoundInSentItems bool
	// OutcomeUnknown: the send failed in a way that leaves open whether
	// Graph took the message, and no look-up settled it yet.
	OutcomeUnknown bool
	// PossibleDuplicate: the message was sent again after an unknown
	// outcome without a look-up (no read permission, no usable ID).
	PossibleDuplicate bool
	// Lookups counts the requests made to Sent Items.
	Lookups int
}

// Receipt is what a Submitter says of a message it took.
type Receipt struct {
	// QueueID is set when the message was queued rather than sent.
	QueueID string
	Delivery
}

// Submitter takes a message from the SMTP server: it sends it, or stores it
// durably to send later. An error means the message was not taken; its
// failure.Classify says why.
type Submitter interface {
	Submit(ctx context.Context, m *Message, log zerolog.Logger) (Receipt, error)
}

// RetryPolicy spaces the attempts at one message.
type RetryPolicy struct {
	Base, Max time.Duration
}

// DefaultRetry spaces the retries within one SMTP transaction.
var DefaultRetry = RetryPolicy{Base: 250 * time.Millisecond, Max: 8 * time.Second}

// Wait returns the pause before attempt n+1 (n counting from 1): Graph's
// Retry-After when it gave one, otherwise exponential backoff with jitter.
func (p RetryPolicy) Wait(n int, err error) time.Duration {
	var apiErr *upstream.APIError
	if errors.As(err, &apiErr) && apiErr.RetryAfter > 0 {
		return apiErr.RetryAfter
	}
	d := p.Base
	for i := 1; i < n && d < p.Max; i++ {
		d *= 2
	}
	d = min(d, p.Max)
	return d/2 + rand.N(d/2+1)
}

// Options configure a Deliverer.
type Options struct {
	// Retry spaces the retries of one request; zero means DefaultRetry.
	Retry RetryPolicy
	// SendTimeout bounds one message (sendMail) or one step of a large
	// message, retries included.
	SendTimeout time.Duration
	// UploadBytesPer5Min paces uploads per mailbox.
	UploadBytesPer5Min int64
	// SpoolDir holds decoded attachments; "" is the system's temporary
	// directory.
	SpoolDir string
	// MaxRequests bounds the Graph requests of one message (Plan); zero
	// means 50.
	MaxRequests int
	// LookupWindow is how long a message whose send had an unknown outcome
	// is looked for in Sent Items before it is sent again; zero means
	// DefaultLookupWindow.
	LookupWindow time.Duration
}

// Deliverer sends messages through Graph. It is safe for concurrent use.
type Deliverer struct {
	opts  Options
	pacer *uploadPacer
	slots *MailboxSlots
	now   func() time.Time
}

// New returns a Deliverer.
func New(opts Options) *Deliverer {
	if opts.Retry == (RetryPolicy{}) {
		opts.Retry = DefaultRetry
	}
	if opts.MaxRequests <= 0 {
		opts.MaxRequests = 50
	}
	if opts.UploadBytesPer5Min <= 0 {
		opts.UploadBytesPer5Min = 150 << 20
	}
	if opts.LookupWindow <= 0 {
		opts.LookupWindow = DefaultLookupWindow
	}
	return &Deliverer{opts: opts, pacer: newUploadPacer(opts.UploadBytesPer5Min, 5*time.Minute), slots: NewMailboxSlots(PerMailboxInFlight), now: time.Now}
}

// Slots returns the limit of Graph requests in flight per app and mailbox
// that every delivery through d keeps, direct or from the outbox.
func (d *Deliverer) Slots() *MailboxSlots { return d.slots }

var _ Submitter = (*Deliverer)(nil)

// Submit sends m now, retrying transient failures within the send timeout:
// direct delivery, for when the outbox is off. A send whose outcome is
// unknown is looked up in Sent Items within the send timeout; if that does
// not settle it, the Receipt says OutcomeUnknown and the caller answers
// 451 (the client's resend is looked up first).
func (d *Deliverer) Submit(ctx context.Context, m *Message, log zerolog.Logger) (Receipt, error) {
	sctx, cancel := context.WithTimeout(ctx, d.opts.SendTimeout)
	defer cancel()
	release, err := d.slots.Acquire(sctx, SlotKey(m))
	if err != nil {
		return Receipt{Delivery: Delivery{User: m.GraphUser}}, err
	}
	defer release()
	if m.FirstAttempt.IsZero() {
		m.FirstAttempt = d.now()
	}
	if m.Size() > upstream.MaxSendMailMIME {
		del, err := d.attemptLarge(ctx, m, log) // each step has its own send_timeout
		return Receipt{Delivery: del}, err
	}
	del := Delivery{User: m.GraphUser, Path: "sendMail", OutcomeUnknown: m.OutcomeUnknown}
	n, err := d.retry(sctx, func(ctx context.Context) error { return d.sendChecked(ctx, ctx, m, &del, log) })
	del.Attempts += n
	return Receipt{Delivery: del}, err
}

// sendChecked sends m (within sendCtx) unless an earlier send's outcome is
// unknown and Sent Items says it went; a send with an unknown outcome is
// looked up (within lookCtx) before sendChecked returns. Its error is the
// send's.
func (d *Deliverer) sendChecked(lookCtx, sendCtx context.Context, m *Message, del *Delivery, log zerolog.Logger) error {
	if del.OutcomeUnknown {
		done, err := d.settle(lookCtx, m, candidates(m, del), del, log)
		if done || err != nil {
			return err
		}
	}
	err := d.sendOnce(sendCtx, m, del)
	if !upstream.IsOutcomeUnknown(err) {
		return err
	}
	del.OutcomeUnknown = true
	log.Warn().Err(err).Str("graph_user", del.User).Bool("possible_duplicate", true).
		Msg("the send's outcome is unknown: looking in Sent Items before sending again")
	if done, lerr := d.settle(lookCtx, m, []string{del.User}, del, log); done {
		return nil
	} else if lerr != nil && !errors.Is(lerr, lookCtx.Err()) {
		log.Warn().Err(lerr).Msg("the look-up in Sent Items failed")
	}
	return err
}

// Attempt makes one attempt at m, for the outbox, which spaces the retries
// itself: one sendMail request, or the draft path of a large message
// (whose steps are retried within it, so that a throttled chunk does not
// start the upload over).
func (d *Deliverer) Attempt(ctx context.Context, m *Message, log zerolog.Logger) (Delivery, error) {
	release, err := d.slots.Acquire(ctx, SlotKey(m))
	if err != nil {
		return Delivery{User: m.GraphUser, OutcomeUnknown: m.OutcomeUnknown}, err
	}
	defer release()
	if m.FirstAttempt.IsZero() {
		m.FirstAttempt = d.now()
	}
	if m.Size() > upstream.MaxSendMailMIME {
		return d.attemptLarge(ctx, m, log)
	}
	del := Delivery{User: m.GraphUser, Path: "sendMail", OutcomeUnknown: m.OutcomeUnknown}
	// The look-ups have their own window; the send its send_timeout.
	sctx, cancel := context.WithTimeout(ctx, d.opts.SendTimeout)
	defer cancel()
	err = d.sendChecked(ctx, sctx, m, &del, log)
	return del, err
}

// SendTest sends msg as user through sendMail with the usual retries: the
// test message of `mailbridge check -send-test`.
func (d *Deliverer) SendTest(ctx context.Context, a *account.Account, user string, msg []byte) (Delivery, error) {
	m := &Message{Account: a, GraphUser: user, Content: mime.View{mime.BytesPiece(msg)}}
	r, err := d.Submit(ctx, m, zerolog.Nop())
	return r.Delivery, err
}

// sendOnce makes one sendMail request as del.User, and one more as the
// fallback user if Graph says del.User has no mailbox.
func (d *Deliverer) sendOnce(ctx context.Context, m *Message, del *Delivery) error {
	g := m.Account.Graph
	res, err := g.SendMail(ctx, del.User, m.Content, m.Size())
	if err != nil && d.fallBack(m, del, err) {
		del.Attempts++
		res, err = g.SendMail(ctx, del.User, m.Content, m.Size())
	}
	del.Result = res
	return err
}

// fallBack switches del to the fallback user when err says del.User has
// no mailbox, and reports whether it did.
func (d *Deliverer) fallBack(m *Message, del *Delivery, err error) bool {
	var apiErr *upstream.APIError
	if m.FallbackUser == "" || del.User == m.FallbackUser || !errors.As(err, &apiErr) || !failure.NoMailbox(apiErr) {
		return false
	}
	del.User, del.FellBack = m.FallbackUser, true
	return true
}

// retry runs op until it succeeds, fails for good, or the next try could
// not happen before ctx ends. It returns the number of tries.
func (d *Deliverer) retry(ctx context.Context, op func(ctx context.Context) error) (int, error) {
	for n := 1; ; n++ {
		err := op(ctx)
		if err == nil || !failure.Classify(err).Retryable || ctx.Err() != nil {
			return n, err
		}
		pause := d.opts.Retry.Wait(n, err)
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < pause {
			return n, err // give the client Graph's reason now
		}
		if sleepCtx(ctx, pause) != nil {
			return n, err
		}
	}
}

// sleepCtx waits for d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// errLargeNotAllowed refuses a message over sendMail's limit for an
// account that may not send it the large way.
func errLargeNotAllowed(reason, hint string) *failure.Error {
	return &failure.Error{Kind: failure.TooLarge, Hint: hint,
		Reason: fmt.Sprintf("Message over Graph sendMail's limit of %d bytes: %s", upstream.MaxSendMailMIME, reason)}
}

// ErrLargeMessagesOff refuses a message over sendMail's limit for an
// account with large_messages = false.
var ErrLargeMessagesOff = errLargeNotAllowed("large_messages is off for this account", "")
