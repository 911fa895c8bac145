package account

import (
	"context"
	"time"

	"github.com/rs/zerolog"

	"mailbridge/bridge/failure"
)

// OpenMailbox logs in to Outlook for a's mailbox, as POP3 and IMAP do
// after the local login: an Outlook token, then dial with it, within
// timeout. It logs the outcome, "logged in upstream" with Outlook's
// greeting or "upstream login failed" with the reason and the fix, and
// returns a failure classified for the protocol's reply.
func OpenMailbox[C any](ctx context.Context, a *Account, proto string, timeout time.Duration, log zerolog.Logger,
	dial func(ctx context.Context, mailbox, token string) (C, error), greeting func(C) string) (C, failure.Failure, error) {
	mailbox, addr := a.Config.POP3Mailbox, a.Config.POP3Upstream
	if proto == "imap" {
		mailbox, addr = a.Config.IMAPMailbox, a.Config.IMAPUpstream
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	token, err := a.OutlookTokens.Token(ctx)
	var up C
	if err == nil {
		up, err = dial(ctx, mailbox, token)
	}
	ev := log.Info()
	var f failure.Failure
	if err != nil {
		f = failure.Classify(err)
		ev = log.Error().Err(err).Str("reason", string(f.Kind)).Str("hint", failure.MailboxLoginHint(proto, err, token))
	}
	ev = ev.Str("mailbox", mailbox).Str("upstream", addr).Int64("duration_ms", time.Since(start).Milliseconds())
	if err != nil {
		ev.Msg("upstream login failed")
		return up, f, err
	}
	ev.Str("greeting", greeting(up)).Msg("logged in upstream")
	return up, f, nil
}
