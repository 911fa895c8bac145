package deliver

import (
	"context"
	"errors"
	"time"

	"github.com/rs/zerolog"

	"mailbridge/bridge/failure"
	"mailbridge/upstream"
)

// Exactly once: a send whose outcome is unknown (the request reached Graph
// whole, then the connection broke, the time ran out, or a gateway
// answered 500, 502 or 504) is never followed by a blind resend. The
// message is looked for by its Message-ID in the sending mailbox's Sent
// Items, where Exchange files every message it takes a few seconds after
// the 202; only when it is not there within the look-up window is it sent
// again.

// DefaultLookupWindow is how long a message whose send had an unknown
// outcome is looked for in Sent Items before it is sent again.
const DefaultLookupWindow = 2 * time.Minute

// lookupRetry spaces the look-ups within the window.
var lookupRetry = RetryPolicy{Base: time.Second, Max: 20 * time.Second}

// lookupSlack is how much earlier than its first attempt a copy in Sent
// Items may say it was sent: the bridge's clock may be ahead of
// Microsoft's. An older copy with the same Message-ID is another message
// of a program that reuses its IDs.
const lookupSlack = time.Hour

// ErrNoReadPermission is a look-up Graph refused with 403: the app has
// none of the permissions that list Sent Items.
var ErrNoReadPermission = errors.New("the app may not read Sent Items (Mail.ReadBasic.All, Mail.ReadBasic, Mail.Read or Mail.ReadWrite): the message cannot be looked up, and is sent again")

// ReadPermissionHint tells how to make delivery exactly once.
const ReadPermissionHint = "grant Mail.ReadBasic.All as an Application permission (Microsoft Graph) and click 'Grant admin consent' (or scope it to the sending mailboxes with RBAC for Applications): the bridge then looks in Sent Items before sending again, and sends each message exactly once"

// lookupResult is what a look-up in Sent Items concluded.
type lookupResult int

const (
	// notLooked: the look-up did not end (the time ran out, the bridge is
	// stopping, or Graph failed throughout): the outcome is still unknown.
	notLooked lookupResult = iota
	// found: the message is in Sent Items: it was sent.
	found
	// absent: it was not there within the whole window: send it again.
	absent
	// cannotLook: no permission, no Message-ID, or a reused one: send it
	// again, flagged as a possible duplicate.
	cannotLook
)

// lookUp looks for m in the Sent Items of the user that sent it, again
// and again with a back-off, until it is found or the window has passed
// (or ctx ends). An error says why it did not end.
func (d *Deliverer) lookUp(ctx context.Context, m *Message, users []string, del *Delivery, log zerolog.Logger) (lookupResult, error) {
	if m.MessageID == "" || m.IDReused {
		return cannotLook, nil
	}
	deadline := d.now().Add(d.opts.LookupWindow)
	since := m.FirstAttempt.Add(-lookupSlack)
	for n := 1; ; n++ {
		var err error
		for _, user := range users {
			var sent bool
			var cp upstream.SentCopy
			cp, sent, err = m.Account.Graph.FindSent(ctx, user, m.MessageID, since)
			del.Lookups++
			if sent {
				del.User = user
				log.Info().Str("graph_user", user).Str("sent_item_id", cp.ID).Int("lookups", del.Lookups).Bool("found_in_sent_items", true).
					Msg("the message whose send had an unknown outcome is in Sent Items: it was sent, and is not sent again")
				return found, nil
			}
			if failure.IsAccessDenied(err) {
				return cannotLook, ErrNoReadPermission
			}
			var apiErr *upstream.APIError
			if errors.As(err, &apiErr) && failure.NoMailbox(apiErr) {
				err = nil // the fallback user's turn
			}
			if err != nil {
				break
			}
		}
		if err != nil && !failure.Classify(err).Retryable {
			return notLooked, err
		}
		left := deadline.Sub(d.now())
		if left <= 0 {
			if err != nil {
				return notLooked, err
			}
			return absent, nil
		}
		if sleepCtx(ctx, min(lookupRetry.Wait(n, err), left)) != nil {
			return notLooked, ctx.Err()
		}
	}
}

// settle decides what to do with a message whose earlier send had an
// unknown outcome: done (it was found sent; del says so), or send it
// (again), with del.PossibleDuplicate set when it could not be looked up.
// An error means it is still unknown.
func (d *Deliverer) settle(ctx context.Context, m *Message, users []string, del *Delivery, log zerolog.Logger) (done bool, err error) {
	res, err := d.lookUp(ctx, m, users, del, log)
	switch res {
	case found:
		del.FoundInSentItems, del.OutcomeUnknown = true, false
		return true, nil
	case absent:
		del.OutcomeUnknown = false
		log.Warn().Int("lookups", del.Lookups).Dur("window", d.opts.LookupWindow).
			Msg("the message whose send had an unknown outcome is not in Sent Items after the look-up window: sending it again")
		return false, nil
	case cannotLook:
		del.OutcomeUnknown, del.PossibleDuplicate = false, true
		why := "the message has no Message-ID to look it up by"
		if m.IDReused {
			why = "its Message-ID was used by another message the bridge took recently"
		}
		ev := log.Warn().Bool("possible_duplicate", true)
		if errors.Is(err, ErrNoReadPermission) {
			why = ErrNoReadPermission.Error()
			ev = ev.Str("hint", ReadPermissionHint)
		}
		ev.Str("reason", why).Msg("the send had an unknown outcome and cannot be checked in Sent Items: sending it again")
		return false, nil
	}
	del.OutcomeUnknown = true
	return false, err
}

// candidates are the users whose Sent Items may hold m: the one its last
// attempt sent as, or else its Graph user and its fallback.
func candidates(m *Message, del *Delivery) []string {
	if del.User != "" && del.User != m.GraphUser {
		return []string{del.User}
	}
	if m.FallbackUser != "" && m.FallbackUser != m.GraphUser {
		return []string{m.GraphUser, m.FallbackUser}
	}
	return []string{m.GraphUser}
}
