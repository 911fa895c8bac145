package bridge

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/emersion/go-smtp"

	"mailbridge/upstream"
)

// Replies the bridge gives on its own account.
var (
	errAuthRequired = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Authentication required"}
	errNullSender   = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "A sender address is required: Microsoft 365 sends as a mailbox"}
	errShuttingDown = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "The bridge is shutting down, try again later"}
)

func errSenderNotAllowed(addr, where string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1},
		Message: fmt.Sprintf("%s <%s> is not allowed for this account", where, addr)}
}

func errTooLarge(limit int64) *smtp.SMTPError {
	return &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
		Message: fmt.Sprintf("Message too large: Microsoft Graph sendMail takes at most %d bytes of MIME (4 MB as base64)", limit)}
}

// smtpReply turns any error of a message's delivery into the reply the
// client gets. It is the one place where errors become SMTP codes: texts
// name Microsoft's error code but never tenant details. The result is the
// *smtp.SMTPError itself, which go-smtp needs unwrapped.
func smtpReply(err error) *smtp.SMTPError {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se
	}
	var apiErr *upstream.APIError
	if errors.As(err, &apiErr) {
		return graphReply(apiErr)
	}
	var tokErr *upstream.TokenError
	if errors.As(err, &tokErr) {
		if tokErr.Temporary() {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 3},
				Message: "Microsoft sign-in is unavailable, try again later"}
		}
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
			Message: fmt.Sprintf("Microsoft 365 refused the bridge's sign-in (%s, AADSTS%d); the administrator must fix the app registration, see the bridge's log", tokErr.Code, tokErr.AADSTS)}
	}
	if errors.Is(err, errSpool) {
		return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "Cannot store the message now, try again later"}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2},
			Message: "Microsoft Graph did not accept the message in time, try again later"}
	}
	if errors.Is(err, context.Canceled) {
		return errShuttingDown
	}
	return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 1},
		Message: "Microsoft Graph could not be reached, try again later"}
}

func graphReply(e *upstream.APIError) *smtp.SMTPError {
	code := e.Code
	if code == "" {
		code = http.StatusText(e.Status)
	}
	reply := func(c int, ec smtp.EnhancedCode, format string) *smtp.SMTPError {
		return &smtp.SMTPError{Code: c, EnhancedCode: ec, Message: fmt.Sprintf(format, code, e.Status)}
	}
	switch {
	case e.Status == http.StatusTooManyRequests:
		return reply(451, smtp.EnhancedCode{4, 4, 5}, "Microsoft Graph is throttling this mailbox (%s, HTTP %d), try again later")
	case e.Temporary():
		return reply(451, smtp.EnhancedCode{4, 4, 0}, "Microsoft Graph is unavailable (%s, HTTP %d), try again later")
	case e.Status == http.StatusRequestEntityTooLarge || e.Code == "ErrorMessageSizeExceeded":
		return reply(552, smtp.EnhancedCode{5, 3, 4}, "Message too large for Microsoft 365 (%s, HTTP %d)")
	case e.Status == http.StatusUnauthorized, e.Status == http.StatusForbidden, e.Status == http.StatusNotFound:
		return reply(451, smtp.EnhancedCode{4, 7, 0}, "Microsoft Graph refused to send for this account (%s, HTTP %d); the administrator must fix it, see the bridge's log")
	case e.Status == http.StatusBadRequest:
		return reply(554, smtp.EnhancedCode{5, 6, 0}, "Microsoft Graph rejected the message content (%s, HTTP %d)")
	}
	return reply(451, smtp.EnhancedCode{4, 0, 0}, "Microsoft Graph answered %s (HTTP %d), try again later")
}

// adminHint says in one sentence what the administrator should do about a
// delivery error, for the log line that reports it; "" if nothing.
func adminHint(err error) string {
	var tokErr *upstream.TokenError
	if errors.As(err, &tokErr) {
		return tokErr.Hint()
	}
	var e *upstream.APIError
	if !errors.As(err, &e) {
		if errors.Is(err, errSpool) {
			return "the bridge cannot write to smtp.spool_dir (the temporary directory by default): check free space and permissions"
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return "Graph did not answer within smtp.send_timeout; check the network path to graph.microsoft.com"
		}
		var se *smtp.SMTPError
		if errors.As(err, &se) || errors.Is(err, context.Canceled) {
			return ""
		}
		return "Graph could not be reached: check the network, proxy (HTTPS_PROXY) and DNS, and graph_url"
	}
	switch {
	case e.Code == "ErrorSendAsDenied":
		return "the From address is neither the sending mailbox nor one of its aliases: send from the mailbox's address, set use_address_from_user = true, or grant Send As on that address"
	case e.Status == http.StatusForbidden && e.Code == "ErrorAccessDenied":
		return "grant Mail.Send as an Application permission (not Delegated) and click 'Grant admin consent' under API permissions; or an application access policy excludes this mailbox"
	case e.Status == http.StatusForbidden:
		return "Graph refused the app for this mailbox: check its API permissions, admin consent and any application access policy"
	case e.Code == "ErrorInvalidUser":
		return "the mailbox does not exist in this tenant: check mailbox (and tenant_id)"
	case e.Code == "MailboxNotEnabledForRESTAPI":
		return "the mailbox is inactive, soft-deleted or on-premises, or has no Exchange Online licence"
	case e.Status == http.StatusUnauthorized:
		return "Graph refused the access token: check that token_url, send_scope and graph_url belong to the same cloud"
	case e.Status == http.StatusTooManyRequests:
		return "Microsoft Graph is throttling this mailbox; the client will retry"
	case e.Temporary():
		return "Microsoft Graph is failing; the client will retry"
	case e.Status == http.StatusBadRequest:
		return "Graph refused the message's content; the client's message is malformed for Exchange"
	}
	return ""
}
