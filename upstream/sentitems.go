package upstream

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strings"
	"sync/atomic"
	"time"
)

// OutcomeUnknownError is a send whose request reached Graph whole and then
// got no clear answer: the connection broke, the time ran out, or a
// gateway answered 500, 502 or 504. Graph may have taken the message; only
// a look in Sent Items (FindSent) tells.
type OutcomeUnknownError struct {
	Err error
}

func (e *OutcomeUnknownError) Error() string {
	return e.Err.Error() + " (after the whole request was sent: Graph may have taken the message)"
}

func (e *OutcomeUnknownError) Unwrap() error { return e.Err }

// IsOutcomeUnknown reports whether err is an OutcomeUnknownError.
func IsOutcomeUnknown(err error) bool {
	var u *OutcomeUnknownError
	return errors.As(err, &u)
}

// unknownOutcome reports whether err, from a request that was written
// whole (wrote), leaves open whether Graph acted on it. 429, 503 and the
// 4xx refusals say it did not: Graph documents 503 as "the service is
// temporarily unavailable", a refusal to process the request.
func unknownOutcome(wrote bool, err error) bool {
	if err == nil || !wrote {
		return false
	}
	var apiErr *APIError
	if errors.As(err, &apiErr) {
		switch apiErr.Status {
		case http.StatusInternalServerError, http.StatusBadGateway, http.StatusGatewayTimeout:
			return true
		}
		return false
	}
	var tokErr *TokenError
	return !errors.As(err, &tokErr)
}

// traceWritten returns ctx with a trace that sets *wrote once a request
// made with it was written whole.
func traceWritten(ctx context.Context, wrote *atomic.Bool) context.Context {
	return httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		WroteRequest: func(info httptrace.WroteRequestInfo) {
			if info.Err == nil {
				wrote.Store(true)
			}
		},
	})
}

// SentCopy is a message found in a mailbox's Sent Items.
type SentCopy struct {
	ID       string
	SentTime time.Time
}

// FindSent looks for a message with the Message-ID messageID (with its
// angle brackets) in user's Sent Items, sent at since or later:
// GET /users/{user}/mailFolders/sentitems/messages?$filter=internetMessageId eq '…'.
// A message is found there a few seconds after Graph took it. It needs
// one of Mail.ReadBasic.All, Mail.ReadBasic, Mail.Read or Mail.ReadWrite;
// without, Graph answers 403 ErrorAccessDenied.
func (g *GraphClient) FindSent(ctx context.Context, user, messageID string, since time.Time) (SentCopy, bool, error) {
	q := url.Values{}
	q.Set("$filter", "internetMessageId eq '"+strings.ReplaceAll(messageID, "'", "''")+"'")
	q.Set("$select", "id,internetMessageId,sentDateTime")
	u := g.userURL(user, "mailFolders", "sentitems", "messages") + "?" + strings.ReplaceAll(q.Encode(), "+", "%20")
	var answer struct {
		Value []struct {
			ID                string    `json:"id"`
			InternetMessageID string    `json:"internetMessageId"`
			SentDateTime      time.Time `json:"sentDateTime"`
		} `json:"value"`
	}
	if _, err := g.call(ctx, http.MethodGet, u, "", nil, 0, http.StatusOK, &answer); err != nil {
		return SentCopy{}, false, fmt.Errorf("look in Sent Items: %w", err)
	}
	for _, m := range answer.Value {
		// A program that reuses its Message-IDs has older copies there:
		// only one sent since this message's first attempt counts.
		if m.InternetMessageID == messageID && !m.SentDateTime.Before(since) {
			return SentCopy{ID: m.ID, SentTime: m.SentDateTime}, true, nil
		}
	}
	return SentCopy{}, false, nil
}
