package failure_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"testing"

	"mailbridge/bridge/failure"
	"mailbridge/bridge/mime"
	"mailbridge/upstream"
)

func TestClassifyOneRowPerKind(t *testing.T) {
	for _, tc := range []struct {
		err                  error
		kind                 failure.Kind
		temporary, retryable bool
		hint                 bool
	}{
		{&upstream.APIError{Status: 400, Code: "ErrorInvalidRecipients"}, failure.Content, false, false, true},
		{&upstream.APIError{Status: 403, Code: "ErrorSendAsDenied"}, failure.Sender, false, false, true},
		{&upstream.APIError{Status: 404, Code: "ErrorInvalidUser"}, failure.Mailbox, false, false, true},
		{&upstream.APIError{Status: 403, Code: "ErrorAccessDenied"}, failure.Permission, true, false, true},
		{&upstream.POP3AuthError{Reply: "-ERR Authentication failure"}, failure.Permission, true, false, true},
		{&upstream.TokenError{Status: 401, Code: "invalid_client", AADSTS: 7000215}, failure.Credentials, true, false, true},
		{&upstream.APIError{Status: 401, Code: "InvalidAuthenticationToken"}, failure.Credentials, true, false, true},
		{fmt.Errorf("wrapped: %w", &upstream.APIError{Status: 429, Code: "TooManyRequests"}), failure.Throttled, true, true, true},
		{&upstream.APIError{Status: 503}, failure.Unavailable, true, true, true},
		{&upstream.TokenError{Status: 503}, failure.Unavailable, true, true, true},
		{&upstream.APIError{Status: 409}, failure.Unavailable, true, false, false},
		{&net.OpError{Op: "dial", Err: errors.New("refused")}, failure.Network, true, true, true},
		{&upstream.TokenError{Err: errors.New("dial tcp: connection refused")}, failure.Network, true, true, true},
		{&upstream.APIError{Status: 413}, failure.TooLarge, false, false, false},
		{&upstream.APIError{Status: 400, Code: "ErrorMessageSizeExceeded"}, failure.TooLarge, false, false, false},
		{&failure.Error{Kind: failure.TooLarge, Reason: "over the limit"}, failure.TooLarge, false, false, false},
		{fmt.Errorf("graph sendMail: %w", context.DeadlineExceeded), failure.Timeout, true, false, true},
		{fmt.Errorf("%w: disk full", mime.ErrSpool), failure.Local, true, false, true},
		{failure.ErrQueueFull, failure.Local, true, false, true},
		{context.Canceled, failure.Shutdown, true, false, false},
	} {
		f := failure.Classify(tc.err)
		if f.Kind != tc.kind || f.Temporary != tc.temporary || f.Retryable != tc.retryable || (f.Hint != "") != tc.hint {
			t.Errorf("Classify(%v) = kind %s temporary %v retryable %v hint %q; want %s %v %v hint %v",
				tc.err, f.Kind, f.Temporary, f.Retryable, f.Hint, tc.kind, tc.temporary, tc.retryable, tc.hint)
		}
		if f.Reason != tc.err.Error() {
			t.Errorf("Classify(%v).Reason = %q", tc.err, f.Reason)
		}
	}
}

func TestClassifyKeepsGraphDetails(t *testing.T) {
	f := failure.Classify(fmt.Errorf("send: %w", &upstream.APIError{Status: 400, Code: "ErrorInvalidRecipients", RequestID: "r-1"}))
	if f.Upstream != "graph" || f.GraphStatus != 400 || f.Code != "ErrorInvalidRecipients" || f.RequestID != "r-1" {
		t.Errorf("got %+v", f)
	}
	// An invalid recipient is named as such; other 400s blame the content.
	if h := f.Hint; !strings.Contains(h, "recipient address is not valid") {
		t.Errorf("ErrorInvalidRecipients hint %q", h)
	}
	if h := failure.Classify(&upstream.APIError{Status: 400, Code: "ErrorMimeContentInvalid"}).Hint; !strings.Contains(h, "malformed") {
		t.Errorf("a 400 for the content: hint %q", h)
	}
	tok := failure.Classify(&upstream.TokenError{Status: 401, Code: "invalid_client", AADSTS: 7000222})
	if tok.Upstream != "token" || tok.AADSTS != 7000222 || tok.Code != "invalid_client" {
		t.Errorf("got %+v", tok)
	}
}

// Only a send whose outcome upstream says is unknown (written whole, no
// clear answer) may be a duplicate; the rest were not taken.
func TestPossibleDuplicate(t *testing.T) {
	for err, want := range map[error]bool{
		&upstream.OutcomeUnknownError{Err: errors.New("connection reset by peer")}: true,
		&upstream.OutcomeUnknownError{Err: &upstream.APIError{Status: 504}}:        true,
		errors.New("connection reset by peer"):                                     false,
		&net.OpError{Op: "dial", Err: errors.New("x")}:                             false,
		&net.OpError{Op: "write", Err: errors.New("broken pipe")}:                  false,
		&upstream.APIError{Status: 503}:                                            false,
		&upstream.TokenError{Status: 503}:                                          false,
		fmt.Errorf("%w: x", mime.ErrSpool):                                         false,
	} {
		if got := failure.Classify(err).PossibleDuplicate; got != want {
			t.Errorf("PossibleDuplicate(%v) = %v, want %v", err, got, want)
		}
	}
}

// Summary gives the cause in a few words, however deep it is wrapped.
func TestSummary(t *testing.T) {
	dns := &net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{Err: "no such host", Name: "login.microsoftonline.com"}}
	for err, want := range map[error]string{
		fmt.Errorf("graph sendMail: %w", &url.Error{Op: "Post", URL: "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token", Err: dns}): "lookup login.microsoftonline.com: no such host",
		&upstream.APIError{Status: 503, Code: "ServiceUnavailable"}:                                               "Graph answered HTTP 503 ServiceUnavailable",
		&upstream.OutcomeUnknownError{Err: &upstream.APIError{Status: 504}}:                                       "Graph answered HTTP 504 after taking the request (outcome unknown)",
		&upstream.TokenError{Status: 401, Code: "invalid_client", AADSTS: 7000215}:                                "sign-in refused: invalid_client, AADSTS7000215",
		fmt.Errorf("x: %w", &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connect: connection refused")}): "dial tcp: connect: connection refused",
	} {
		if got := failure.Summary(err); got != want {
			t.Errorf("Summary(%v) = %q, want %q", err, got, want)
		}
	}
}
