package smtpserver

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/emersion/go-smtp"

	"mailbridge/bridge/failure"
)

// Replies the bridge gives on its own account.
var (
	replyAuthRequired    = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Authentication required"}
	replyNullSender      = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "A sender address is required: Microsoft 365 sends as a mailbox"}
	replyShuttingDown    = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "The bridge is shutting down, try again later"}
	replyCannotStore     = &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "Cannot store the message now, try again later"}
	replyTimeout         = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Microsoft Graph did not accept the message in time, try again later"}
	replyUnreachable     = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 1}, Message: "Microsoft Graph could not be reached, try again later"}
	replySignInDown      = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 3}, Message: "Microsoft sign-in is unavailable, try again later"}
	replyDataTimeout     = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Timeout waiting for the message data, try again later"}
	replyDataBroken      = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Connection broken in the message data, try again later"}
	replyBadSender       = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 1, 7}, Message: "Bad sender address syntax"}
	replyBadRecipient    = &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 1, 3}, Message: "Bad recipient address syntax"}
	replyTooManyFailures = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Too many failed logins, closing connection"}
	// RFC 4954 §6: 454 4.7.0, a temporary authentication failure.
	replyTooManyGuesses    = &smtp.SMTPError{Code: 454, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Too many logins waiting for this account, try again later"}
	replyTooManyRecipients = &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 5, 3}, Message: "Too many recipients"}
	replyHeaderTooBig      = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "Message header over 1 MB or without an end"}
	// A send whose outcome stayed unknown: the client's resend is looked
	// up in Sent Items first, so sending it again is safe.
	replyOutcomeUnknown = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Microsoft Graph's answer was lost and the message is not in Sent Items yet; send it again later: the bridge will not send it twice"}
)

func replySenderNotAllowed(addr, where string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1},
		Message: fmt.Sprintf("%s <%s> is not allowed for this account", where, addr)}
}

func replyOverMaxSize(limit int64) *smtp.SMTPError {
	return &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
		Message: fmt.Sprintf("Message too large: this bridge takes at most %d bytes (smtp.max_message_bytes)", limit)}
}

// replyFor is the one place where a failure becomes the reply the client
// gets: texts name Microsoft's error code but never tenant details. The
// result is the *smtp.SMTPError itself, which go-smtp needs unwrapped.
func replyFor(f failure.Failure) *smtp.SMTPError {
	var own *failure.Error
	isOwn := errors.As(f.Err, &own)
	switch {
	case f.Upstream == "graph":
		return graphReply(f)
	case f.Upstream == "token" && f.Kind == failure.Credentials:
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
			Message: fmt.Sprintf("Microsoft 365 refused the bridge's sign-in (%s, AADSTS%d); the administrator must fix the app registration, see the bridge's log", f.Code, f.AADSTS)}
	case f.Upstream == "token":
		return replySignInDown
	case f.Kind == failure.TooLarge && isOwn:
		return &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4}, Message: own.Reason}
	case f.Kind == failure.Content && isOwn:
		return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: own.Reason}
	case f.Kind == failure.Content:
		return replyHeaderTooBig
	case f.Kind == failure.Local && isOwn:
		return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: own.Reason}
	case f.Kind == failure.Local:
		return replyCannotStore
	case f.Kind == failure.Timeout:
		return replyTimeout
	case f.Kind == failure.Shutdown:
		return replyShuttingDown
	}
	return replyUnreachable
}

// graphReply answers a refusal of Graph.
func graphReply(f failure.Failure) *smtp.SMTPError {
	code := f.Code
	if code == "" {
		code = http.StatusText(f.GraphStatus)
	}
	reply := func(c int, ec smtp.EnhancedCode, format string) *smtp.SMTPError {
		return &smtp.SMTPError{Code: c, EnhancedCode: ec, Message: fmt.Sprintf(format, code, f.GraphStatus)}
	}
	switch f.Kind {
	case failure.Throttled:
		return reply(451, smtp.EnhancedCode{4, 4, 5}, "Microsoft Graph is throttling this mailbox (%s, HTTP %d), try again later")
	case failure.TooLarge:
		return reply(552, smtp.EnhancedCode{5, 3, 4}, "Message too large for Microsoft 365 (%s, HTTP %d)")
	case failure.Credentials, failure.Permission, failure.Mailbox, failure.Sender:
		return reply(451, smtp.EnhancedCode{4, 7, 0}, "Microsoft Graph refused to send for this account (%s, HTTP %d); the administrator must fix it, see the bridge's log")
	case failure.Content:
		return reply(554, smtp.EnhancedCode{5, 6, 0}, "Microsoft Graph rejected the message content (%s, HTTP %d)")
	case failure.Unavailable:
		if f.Retryable {
			return reply(451, smtp.EnhancedCode{4, 4, 0}, "Microsoft Graph is unavailable (%s, HTTP %d), try again later")
		}
	}
	return reply(451, smtp.EnhancedCode{4, 0, 0}, "Microsoft Graph answered %s (HTTP %d), try again later")
}
