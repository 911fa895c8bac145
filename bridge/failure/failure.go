// Package failure classifies, once, every error that ends a delivery or a
// login upstream: Classify turns an error into a Failure whose Kind,
// Temporary and Retryable fields every caller reads (the SMTP and POP3
// replies, the metric's reason label, the outbox's keep-or-fail decision,
// the log's reason and hint) instead of re-deriving them.
//
// It imports only the upstream package (for Microsoft's error types) and
// bridge/mime (for the spool's error). The bridge's own refusals are
// *Error values made here.
package failure

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"

	"mailbridge/bridge/mime"
	"mailbridge/upstream"
)

// Kind names the cause of a failure, from a small set: it is the metric's
// reason label and the log's reason.
type Kind string

// The kinds of failure.
const (
	// Content: Graph or the bridge refused the message as it is.
	Content Kind = "content"
	// Sender: the account may not send as that address.
	Sender Kind = "sender"
	// Mailbox: the mailbox does not exist or has no Exchange Online.
	Mailbox Kind = "mailbox"
	// Permission: the app lacks a permission or consent for the mailbox.
	Permission Kind = "permission"
	// Credentials: Microsoft refused the app's sign-in (secret, tenant, ID).
	Credentials Kind = "credentials"
	// Throttled: Graph answered 429.
	Throttled Kind = "throttled"
	// Unavailable: Microsoft answered with a server error, or was busy.
	Unavailable Kind = "unavailable"
	// Network: no answer came (refused, reset, TLS, DNS).
	Network Kind = "network"
	// TooLarge: the message is over a limit.
	TooLarge Kind = "too_large"
	// Timeout: no answer within the configured time.
	Timeout Kind = "timeout"
	// Local: the bridge's own disk or outbox.
	Local Kind = "local"
	// Shutdown: the bridge is stopping; the work was interrupted.
	Shutdown Kind = "shutdown"
)

// Error is a failure the bridge decides itself (a message too large, an
// attachment that cannot be decoded, a full disk): its Kind and whether it
// is temporary are set where it is made.
type Error struct {
	Kind      Kind
	Temporary bool
	// Reason is the text the client may see: it never names internal
	// details.
	Reason string
	// Hint tells the administrator what to do; "" if nothing.
	Hint string
	// Err is the cause, for the log; may be nil.
	Err error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return e.Reason + ": " + e.Err.Error()
	}
	return e.Reason
}

func (e *Error) Unwrap() error { return e.Err }

// ErrQueueFull answers a message that would take the outbox over its disk
// bound.
var ErrQueueFull = &Error{Kind: Local, Temporary: true, Reason: "Outbox full, try again later",
	Hint: "Graph has not taken messages for a while: see the outbox's log lines; raise outbox.max_bytes if the disk allows"}

// Failure is what every caller needs to know of an error.
type Failure struct {
	Kind Kind
	// Temporary: the message may go later without the client changing it
	// (the outbox keeps it; SMTP answers 4xx). A refusal that only an
	// administrator can fix (credentials, permissions) is temporary.
	Temporary bool
	// Retryable: the same request may succeed if made again in a moment
	// (throttling, server errors, no answer).
	Retryable bool
	// Upstream is who answered: "graph", "token", "pop3", or "" for the
	// bridge itself and for no answer.
	Upstream    string
	GraphStatus int    // Graph's or the token endpoint's HTTP status; 0 if none
	Code        string // Graph's error code, or the OAuth2 error
	AADSTS      int    // the token endpoint's AADSTS number
	RequestID   string
	// Reason is one line on what happened, for the log (the error text).
	Reason string
	// Hint says in one sentence what an administrator should do; "" if
	// nothing.
	Hint string
	// PossibleDuplicate: the send's outcome is unknown (the request was
	// written whole, then no clear answer came): Graph may have taken the
	// message, so it is looked up in Sent Items before any resend.
	PossibleDuplicate bool
	// UntrustedCertificate: a Microsoft endpoint's certificate did not
	// verify (an unknown CA, or a TLS-inspecting proxy).
	UntrustedCertificate bool
	// Err is the error classified.
	Err error
}

// Classify reads err once and returns its Failure. A nil error gives the
// zero Failure.
func Classify(err error) Failure {
	if err == nil {
		return Failure{}
	}
	f := Failure{Reason: err.Error(), Err: err}
	var own *Error
	var apiErr *upstream.APIError
	var tokErr *upstream.TokenError
	var popErr *upstream.POP3AuthError
	var imapErr *upstream.IMAPAuthError
	var notConnected *upstream.IMAPNotConnectedError
	var verifyErr *tls.CertificateVerificationError
	var unknownCA x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var proxyErr *upstream.ProxyError
	switch {
	case errors.As(err, &proxyErr):
		f.Upstream, f.Kind, f.Temporary, f.Hint = "proxy", Network, true, proxyErr.Hint()
		f.GraphStatus = proxyErr.Status
		f.Retryable = proxyErr.Status == 0 || proxyErr.Status >= 500
	case errors.As(err, &verifyErr) || errors.As(err, &unknownCA) || errors.As(err, &hostErr):
		f.Kind, f.Temporary, f.UntrustedCertificate = Network, true, true
		f.Hint = CertificateHint
	case errors.As(err, &own):
		f.Kind, f.Temporary, f.Hint = own.Kind, own.Temporary, own.Hint
	case errors.As(err, &apiErr):
		classifyGraph(&f, apiErr)
	case errors.As(err, &tokErr):
		f.Upstream, f.GraphStatus, f.Code, f.AADSTS, f.Hint = "token", tokErr.Status, tokErr.Code, tokErr.AADSTS, tokErr.Hint()
		f.Temporary = true
		f.Kind, f.Retryable = Credentials, false
		if tokErr.Temporary() {
			f.Kind, f.Retryable = Unavailable, true
			if tokErr.Status == 0 {
				f.Kind = Network
			}
		}
	case errors.As(err, &popErr):
		f.Upstream, f.Kind, f.Temporary, f.Hint = "pop3", Permission, true, popErr.Hint()
	case errors.As(err, &imapErr):
		f.Upstream, f.Kind, f.Temporary, f.Hint = "imap", Permission, true, imapErr.Hint()
	case errors.As(err, &notConnected):
		f.Upstream, f.Kind, f.Temporary, f.Hint = "imap", Permission, true, notConnected.Hint()
	case errors.Is(err, mime.ErrSpool):
		f.Kind, f.Temporary = Local, true
		f.Hint = "the bridge cannot write to smtp.spool_dir (the temporary directory by default): check free space and permissions"
	case errors.Is(err, mime.ErrHeaderTooLong):
		f.Kind = Content
	case errors.Is(err, context.DeadlineExceeded):
		f.Kind, f.Temporary = Timeout, true
		f.Hint = "Graph did not answer within smtp.send_timeout; check the network path to graph.microsoft.com"
	case errors.Is(err, context.Canceled):
		f.Kind, f.Temporary = Shutdown, true
	default:
		f.Kind, f.Temporary, f.Retryable = Network, true, true
		f.Hint = "Graph could not be reached: check the network, proxy (HTTPS_PROXY) and DNS, and graph_url"
	}
	// Only a request that reached Graph whole and got no clear answer may
	// have sent the message: a connection never made, or one that broke
	// while the request was written, cannot have.
	f.PossibleDuplicate = upstream.IsOutcomeUnknown(err)
	return f
}

// classifyGraph fills f from an answer of Graph.
func classifyGraph(f *Failure, e *upstream.APIError) {
	f.Upstream, f.GraphStatus, f.Code, f.RequestID = "graph", e.Status, e.Code, e.RequestID
	f.Retryable = e.Temporary()
	f.Temporary = true
	switch {
	case e.Status == http.StatusTooManyRequests:
		f.Kind = Throttled
		f.Hint = "Microsoft Graph is throttling this mailbox: nothing to do, it is tried again"
	case e.Temporary():
		f.Kind = Unavailable
		f.Hint = "Microsoft Graph is failing: nothing to do, it is tried again"
	case e.Status == http.StatusRequestEntityTooLarge || e.Code == "ErrorMessageSizeExceeded":
		f.Kind, f.Temporary = TooLarge, false
	case e.Code == "ErrorSendAsDenied":
		f.Kind, f.Temporary = Sender, false
		f.Hint = "the From address is neither the sending mailbox nor one of its aliases: send from the mailbox's address, set use_address_from_user = true, or grant Send As on that address"
	case NoMailbox(e):
		f.Kind, f.Temporary = Mailbox, false
		if e.Code == "MailboxNotEnabledForRESTAPI" {
			f.Hint = "the mailbox is inactive, soft-deleted or on-premises, or has no Exchange Online licence"
		} else {
			f.Hint = "the mailbox does not exist in this tenant: check mailbox (and tenant_id)"
		}
	case e.Status == http.StatusNotFound:
		f.Kind = Mailbox
	case e.Status == http.StatusForbidden && e.Code == "ErrorAccessDenied":
		f.Kind = Permission
		f.Hint = "the app may not act on this mailbox: if it is scoped with RBAC for Applications, add the mailbox to its management scope (New-ManagementScope ... -RecipientRestrictionFilter) and check with Test-ServicePrincipalAuthorization; otherwise grant Mail.Send as an Application permission (not Delegated) and click 'Grant admin consent' (it then reaches every mailbox), or an application access policy excludes this mailbox"
	case e.Status == http.StatusForbidden:
		f.Kind = Permission
		f.Hint = "Graph refused the app for this mailbox: check its API permissions, admin consent and any application access policy"
	case e.Status == http.StatusUnauthorized:
		f.Kind = Credentials
		f.Hint = "Graph refused the access token: check that token_url, send_scope and graph_url belong to the same cloud"
	case e.Status == http.StatusBadRequest && e.Code == "ErrorInvalidRecipients":
		f.Kind, f.Temporary = Content, false
		f.Hint = "a recipient address is not valid for Exchange: check it in the sending program and send the message again"
	case e.Status == http.StatusBadRequest:
		f.Kind, f.Temporary = Content, false
		f.Hint = "Graph refused the message's content; the client's message is malformed for Exchange"
	default:
		f.Kind = Unavailable
	}
}

// NoMailbox reports whether Graph said that the user has no usable
// mailbox.
func NoMailbox(e *upstream.APIError) bool {
	return e.Status == http.StatusNotFound &&
		(e.Code == "ErrorInvalidUser" || e.Code == "MailboxNotEnabledForRESTAPI" || e.Code == "ResourceNotFound")
}

// IsAccessDenied reports whether err is Graph's 403 ErrorAccessDenied: a
// permission the app lacks.
func IsAccessDenied(err error) bool {
	var apiErr *upstream.APIError
	return errors.As(err, &apiErr) && apiErr.Status == http.StatusForbidden && strings.EqualFold(apiErr.Code, "ErrorAccessDenied")
}

// MailboxLoginHint explains a failed login to Outlook's POP3 or IMAP
// service (protocol "pop3" or "imap"), for the sessions' log lines and for
// `check`: one text for the three. token is the one the login used ("" if
// none was had); a token without the protocol's role says so.
func MailboxLoginHint(protocol string, err error, token string) string {
	f := Classify(err)
	role, port := "POP.AccessAsApp", "995"
	if protocol == "imap" {
		role, port = "IMAP.AccessAsApp", "993"
	}
	switch {
	case f.Upstream == protocol:
		if roles, ok := upstream.TokenRoles(token); ok && !slices.Contains(roles, role) {
			return RoleHint(role, "Office 365 Exchange Online")
		}
		return f.Hint
	case f.Upstream == "token", f.Upstream == "proxy", f.UntrustedCertificate:
		return f.Hint
	}
	return "Outlook's " + strings.ToUpper(protocol) + " service could not be reached: check the network, firewall (port " + port + ") and DNS, and " + protocol + ".upstream"
}

// RoleHint tells how to grant an application permission that a token
// lacks.
func RoleHint(role, api string) string {
	return fmt.Sprintf("add %s as an Application permission (%s) and click 'Grant admin consent'", role, api)
}

// CertificateHint explains a Microsoft endpoint whose certificate did not
// verify.
const CertificateHint = "the certificate of Microsoft's server was not trusted: this machine lacks the CA, or a TLS-inspecting proxy or firewall re-signs HTTPS; add that CA to the system's trusted roots (Windows: certutil -addstore Root ca.crt), or point SSL_CERT_FILE at a PEM file holding it"

// ReadWriteHint tells how to allow messages over sendMail's limit.
const ReadWriteHint = "grant Mail.ReadWrite as an Application permission (Microsoft Graph) and click 'Grant admin consent', or set large_messages = false (messages over 3 MB are then refused)"

// Summary is the cause of err in a few words, for a list where the whole
// error does not fit: Graph's status and code, the sign-in's AADSTS
// number, or the innermost network error ("lookup login.microsoftonline.com:
// no such host"); the whole error text otherwise.
func Summary(err error) string {
	if err == nil {
		return ""
	}
	var apiErr *upstream.APIError
	var tokErr *upstream.TokenError
	var own *Error
	switch {
	case errors.As(err, &own):
		return own.Reason
	case errors.As(err, &apiErr):
		s := fmt.Sprintf("Graph answered HTTP %d", apiErr.Status)
		if apiErr.Code != "" {
			s += " " + apiErr.Code
		}
		if upstream.IsOutcomeUnknown(err) {
			s += " after taking the request (outcome unknown)"
		}
		return s
	case errors.As(err, &tokErr) && tokErr.AADSTS != 0:
		return fmt.Sprintf("sign-in refused: %s, AADSTS%d", tokErr.Code, tokErr.AADSTS)
	case errors.As(err, &tokErr) && tokErr.Status != 0:
		return fmt.Sprintf("sign-in failed: HTTP %d %s", tokErr.Status, tokErr.Code)
	case errors.Is(err, context.DeadlineExceeded):
		return "no answer in time"
	}
	// The innermost error that still says something: net's errors name
	// the operation and the host.
	var opErr *net.OpError
	var dnsErr *net.DNSError
	switch {
	case errors.As(err, &dnsErr):
		return "lookup " + dnsErr.Name + ": " + dnsErr.Err
	case errors.As(err, &opErr):
		return opErr.Error()
	}
	return err.Error()
}
