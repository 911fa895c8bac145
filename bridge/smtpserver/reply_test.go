package smtpserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"

	"mailbridge/bridge/deliver"
	"mailbridge/bridge/failure"
	"mailbridge/bridge/mime"
	"mailbridge/upstream"
)

func TestReplyFor(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code int
		ec   smtp.EnhancedCode
	}{
		{&upstream.APIError{Status: 429, Code: "TooManyRequests"}, 451, smtp.EnhancedCode{4, 4, 5}},
		{fmt.Errorf("wrapped: %w", &upstream.APIError{Status: 503}), 451, smtp.EnhancedCode{4, 4, 0}},
		{&upstream.APIError{Status: 504}, 451, smtp.EnhancedCode{4, 4, 0}},
		{&upstream.APIError{Status: 401, Code: "InvalidAuthenticationToken"}, 451, smtp.EnhancedCode{4, 7, 0}},
		{&upstream.APIError{Status: 403, Code: "ErrorSendAsDenied"}, 451, smtp.EnhancedCode{4, 7, 0}},
		{&upstream.APIError{Status: 404, Code: "ErrorInvalidUser"}, 451, smtp.EnhancedCode{4, 7, 0}},
		{&upstream.APIError{Status: 413}, 552, smtp.EnhancedCode{5, 3, 4}},
		{&upstream.APIError{Status: 400, Code: "ErrorMessageSizeExceeded"}, 552, smtp.EnhancedCode{5, 3, 4}},
		{&upstream.APIError{Status: 400, Code: "ErrorMimeContentInvalidBase64String"}, 554, smtp.EnhancedCode{5, 6, 0}},
		{&upstream.APIError{Status: 409}, 451, smtp.EnhancedCode{4, 0, 0}},
		{&upstream.TokenError{Status: 401, Code: "invalid_client", AADSTS: 7000215}, 451, smtp.EnhancedCode{4, 7, 0}},
		{&upstream.TokenError{Status: 503}, 451, smtp.EnhancedCode{4, 4, 3}},
		{&upstream.TokenError{Err: errors.New("dial tcp: connection refused")}, 451, smtp.EnhancedCode{4, 4, 3}},
		{fmt.Errorf("graph sendMail: %w", context.DeadlineExceeded), 451, smtp.EnhancedCode{4, 4, 2}},
		{&net.OpError{Op: "dial", Err: errors.New("refused")}, 451, smtp.EnhancedCode{4, 4, 1}},
		{context.Canceled, 421, smtp.EnhancedCode{4, 3, 2}},
		{fmt.Errorf("%w: no space", mime.ErrSpool), 452, smtp.EnhancedCode{4, 3, 1}},
		{failure.ErrQueueFull, 452, smtp.EnhancedCode{4, 3, 1}},
		{mime.ErrHeaderTooLong, 554, smtp.EnhancedCode{5, 6, 0}},
		{deliver.ErrLargeMessagesOff, 552, smtp.EnhancedCode{5, 3, 4}},
		{&failure.Error{Kind: failure.Content, Reason: "Attachment \"a\" cannot be decoded"}, 554, smtp.EnhancedCode{5, 6, 0}},
	} {
		got := replyFor(failure.Classify(tc.err))
		if got.Code != tc.code || got.EnhancedCode != tc.ec {
			t.Errorf("replyFor(%v) = %d %v, want %d %v", tc.err, got.Code, got.EnhancedCode, tc.code, tc.ec)
		}
	}
	// The code names Graph's error, never the tenant.
	msg := replyFor(failure.Classify(&upstream.APIError{Status: 400, Code: "ErrorInvalidRecipients", Message: "tenant secret details"})).Message
	if want := "ErrorInvalidRecipients"; !strings.Contains(msg, want) || strings.Contains(msg, "tenant secret details") {
		t.Errorf("reply text %q", msg)
	}
	// The bridge's own disk errors never reach the client.
	if msg := replyFor(failure.Classify(fmt.Errorf("%w: open /var/secret/x: no space", mime.ErrSpool))).Message; strings.Contains(msg, "/var") {
		t.Errorf("reply text %q", msg)
	}
}
