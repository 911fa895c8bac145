package bridge

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"time"

	"mailbridge/upstream"
)

// MailSender sends a raw MIME message through Microsoft Graph as user.
// Implementations return *upstream.APIError for Graph's refusals and
// *upstream.TokenError when no token could be had. *upstream.GraphClient is
// the real one.
type MailSender interface {
	SendMail(ctx context.Context, user string, mime io.ReaderAt, size int64) (upstream.SendResult, error)
}

// retryPolicy spaces the attempts at one message.
type retryPolicy struct {
	base, max time.Duration
}

var defaultRetry = retryPolicy{base: 250 * time.Millisecond, max: 8 * time.Second}

// wait returns the pause before attempt n+1 (n counting from 1): Graph's
// Retry-After when it gave one, otherwise exponential backoff with jitter.
func (p retryPolicy) wait(n int, err error) time.Duration {
	var apiErr *upstream.APIError
	if errors.As(err, &apiErr) && apiErr.RetryAfter > 0 {
		return apiErr.RetryAfter
	}
	d := p.base
	for i := 1; i < n && d < p.max; i++ {
		d *= 2
	}
	d = min(d, p.max)
	return d/2 + rand.N(d/2+1)
}

// retryable reports whether err may go away if the same request is made
// again: throttling, server errors, token endpoint outages, network errors.
func retryable(err error) bool {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var apiErr *upstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.Temporary()
	}
	var tokErr *upstream.TokenError
	if errors.As(err, &tokErr) {
		return tokErr.Temporary()
	}
	return true // no answer: connection refused, reset, TLS handshake
}

// noMailbox reports whether Graph said that user has no usable mailbox.
func noMailbox(err error) bool {
	var apiErr *upstream.APIError
	return errors.As(err, &apiErr) && apiErr.Status == http.StatusNotFound &&
		(apiErr.Code == "ErrorInvalidUser" || apiErr.Code == "MailboxNotEnabledForRESTAPI" || apiErr.Code == "ResourceNotFound")
}

// delivery is the outcome of sending one message, for the log.
type delivery struct {
	result   upstream.SendResult
	user     string // the Graph user that finally sent (or last tried)
	attempts int
	fellBack bool   // use_address_from_user fell back to the account mailbox
	path     string // "sendMail", or "draft" for a large message
}

// retryOp runs op until it succeeds, fails for good, or the next try could
// not happen before ctx ends. It returns the number of tries.
func retryOp(ctx context.Context, policy retryPolicy, op func(ctx context.Context) error) (int, error) {
	for n := 1; ; n++ {
		err := op(ctx)
		if err == nil || !retryable(err) {
			return n, err
		}
		pause := policy.wait(n, err)
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) < pause {
			return n, err // give the client Graph's reason now
		}
		if sleepCtx(ctx, pause) != nil {
			return n, err
		}
	}
}

// deliver sends msg as user through sendMail, retrying transient failures
// until ctx ends, and falling back to fallbackUser (if not "") when Graph
// says user has no mailbox.
func deliver(ctx context.Context, sender MailSender, policy retryPolicy, user, fallbackUser string, msg io.ReaderAt, size int64) (delivery, error) {
	d := delivery{user: user, path: "sendMail"}
	n, err := retryOp(ctx, policy, func(ctx context.Context) error {
		return sendOnce(ctx, sender, &d, fallbackUser, msg, size)
	})
	d.attempts += n
	return d, err
}

// sendOnce makes one sendMail request as d.user, and one more as
// fallbackUser if Graph says d.user has no mailbox.
func sendOnce(ctx context.Context, sender MailSender, d *delivery, fallbackUser string, msg io.ReaderAt, size int64) error {
	res, err := sender.SendMail(ctx, d.user, msg, size)
	if err != nil && fallbackUser != "" && d.user != fallbackUser && noMailbox(err) {
		d.user, d.fellBack = fallbackUser, true
		d.attempts++
		res, err = sender.SendMail(ctx, d.user, msg, size)
	}
	d.result = res
	return err
}
