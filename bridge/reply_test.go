package bridge

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"

	"mailbridge/upstream"
)

func TestSMTPReply(t *testing.T) {
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
		{errTooLarge(10), 552, smtp.EnhancedCode{5, 3, 4}},
	} {
		got := smtpReply(tc.err)
		if got.Code != tc.code || got.EnhancedCode != tc.ec {
			t.Errorf("smtpReply(%v) = %d %v, want %d %v", tc.err, got.Code, got.EnhancedCode, tc.code, tc.ec)
		}
	}
	// The code names Graph's error, never the tenant.
	msg := smtpReply(&upstream.APIError{Status: 400, Code: "ErrorInvalidRecipients", Message: "tenant secret details"}).Message
	if want := "ErrorInvalidRecipients"; !strings.Contains(msg, want) || strings.Contains(msg, "tenant secret details") {
		t.Errorf("reply text %q", msg)
	}
}

func TestRetryableAndWait(t *testing.T) {
	p := retryPolicy{base: 100e6, max: 400e6}
	if w := p.wait(1, &upstream.APIError{Status: 429, RetryAfter: 7e9}); w != 7e9 {
		t.Errorf("Retry-After not honoured: %v", w)
	}
	for n := 1; n < 6; n++ {
		w := p.wait(n, errors.New("x"))
		hi := min(p.base<<(n-1), p.max)
		if w < hi/2 || w > hi {
			t.Errorf("attempt %d: wait %v outside [%v, %v]", n, w, hi/2, hi)
		}
	}
	if retryable(&upstream.APIError{Status: 400}) || retryable(context.Canceled) || !retryable(&upstream.APIError{Status: 503}) || !retryable(errors.New("reset")) {
		t.Error("retryable misclassifies")
	}
}
