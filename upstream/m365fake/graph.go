package m365fake

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/mail"
	"slices"
	"strings"
	"time"
)

// maxRequestBody is Graph's limit on a request body (4 MB).
const maxRequestBody = 4 << 20

// SentMessage is a message Graph's sendMail accepted.
type SentMessage struct {
	User       string   // the {id} of /users/{id}/sendMail
	Tenant     string   // the tenant of the token
	MIME       []byte   // the decoded MIME message, byte for byte
	From       string   // the From: address, lower case
	Recipients []string // the To, Cc and Bcc addresses, lower case, in header order
	Subject    string   // decoded
	RequestID  string
	Received   time.Time
	// Attachments are those added to the draft a message was sent from.
	Attachments []SentAttachment
}

// graphRequest is one authenticated request to the fake Graph.
type graphRequest struct {
	w         http.ResponseWriter
	r         *http.Request
	requestID string
	user      string // lower case, as in the path
	claims    claims
	mailbox   *mailbox
	server    *Server
	after     *Fault // a fault for after the message is taken
}

func (g *graphRequest) fail(status int, code, message string) {
	writeGraphError(g.w, g.requestID, status, code, message)
}

// graph wraps a Graph endpoint: request-id headers, in-flight counting,
// injected faults for endpoint, the bearer token (Graph audience, role)
// and the user of the path (a primary address: /users/{id} takes the UPN,
// not an alias).
// MailboxConcurrency is how many Graph requests Exchange takes at once per
// app and mailbox; more are answered 429 ApplicationThrottled.
const MailboxConcurrency = 4

func (s *Server) graph(endpoint, role string, serve func(g *graphRequest)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		g := &graphRequest{w: w, r: r, requestID: newGUID(), user: strings.ToLower(r.PathValue("user")), server: s}
		w.Header().Set("request-id", g.requestID)
		if c := r.Header.Get("client-request-id"); c != "" {
			w.Header().Set("client-request-id", c)
		} else {
			w.Header().Set("client-request-id", g.requestID)
		}
		s.mu.Lock()
		s.inflight[g.user]++
		s.maxInflight[g.user] = max(s.maxInflight[g.user], s.inflight[g.user])
		over := s.inflight[g.user] > MailboxConcurrency
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			s.inflight[g.user]--
			s.mu.Unlock()
		}()
		if over { // as Exchange answers the fifth concurrent request
			w.Header().Set("Retry-After", "1")
			g.fail(http.StatusTooManyRequests, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.")
			return
		}
		if f, ok := s.takeEndpointFault(endpoint); ok && f.AfterAccept {
			g.after = &f
		} else if ok {
			if applyFault(w, r, f, func(f Fault) { g.fail(f.Status, f.Code, f.Message) }) {
				return
			}
		}
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok {
			g.fail(http.StatusUnauthorized, "InvalidAuthenticationToken", "Access token is empty.")
			return
		}
		c, err := s.verifyToken(tok, GraphAudience)
		if err != nil {
			g.fail(http.StatusUnauthorized, "InvalidAuthenticationToken", err.Error())
			return
		}
		g.claims = c
		s.mu.Lock()
		var rbac map[string][]string
		if t := s.tenants[c.Tid]; t != nil {
			g.mailbox = t.mailboxes[g.user]
			if a := t.apps[c.AppID]; a != nil {
				rbac = a.rbac
			}
		}
		s.mu.Unlock()
		// Entra's consent (the token's roles) covers every mailbox; an RBAC
		// assignment only its scope's.
		has := func(r string) bool { return slices.Contains(c.Roles, r) || slices.Contains(rbac[r], g.user) }
		allowed := has(role)
		if role == "" { // a read: any of the roles that list messages
			allowed = slices.ContainsFunc(ReadRoles, has)
		}
		if !allowed {
			g.fail(http.StatusForbidden, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
			return
		}
		if g.mailbox == nil || g.mailbox.primary != g.user {
			g.fail(http.StatusNotFound, "ErrorInvalidUser", fmt.Sprintf("The requested user '%s' is invalid.", r.PathValue("user")))
			return
		}
		serve(g)
	}
}

// readMIME reads a base64 MIME request body as sendMail and draft
// creation take it.
func (g *graphRequest) readMIME() ([]byte, *mail.Message, bool) {
	body, err := io.ReadAll(io.LimitReader(g.r.Body, maxRequestBody+1))
	if err != nil {
		return nil, nil, false // the client went away
	}
	if len(body) > maxRequestBody {
		g.w.Header().Set("Content-Type", "text/html")
		g.w.WriteHeader(http.StatusRequestEntityTooLarge)
		io.WriteString(g.w, "<html><head><title>413 Request Entity Too Large</title></head><body>Request Entity Too Large</body></html>")
		return nil, nil, false
	}
	if ct, _, _ := mime.ParseMediaType(g.r.Header.Get("Content-Type")); ct != "text/plain" {
		g.fail(http.StatusBadRequest, "RequestBodyRead", "Cannot read the request body: a MIME message must be sent as text/plain.")
		return nil, nil, false
	}
	raw, err := base64.StdEncoding.DecodeString(string(stripLineBreaks(body)))
	if err != nil {
		g.fail(http.StatusBadRequest, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
		return nil, nil, false
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil || len(raw) == 0 {
		g.fail(http.StatusBadRequest, "ErrorMimeContentInvalid", "MIME content does not contain all required information, malformed formatting, or empty.")
		return nil, nil, false
	}
	return raw, msg, true
}

// sentMessage checks a message about to be sent as Graph does (From, at
// least one recipient) and describes it.
func (g *graphRequest) sentMessage(raw []byte, msg *mail.Message) (SentMessage, bool) {
	sent := SentMessage{User: g.user, Tenant: g.claims.Tid, MIME: raw, RequestID: g.requestID, Received: time.Now()}
	if from, err := mail.ParseAddress(msg.Header.Get("From")); err == nil {
		sent.From = strings.ToLower(from.Address)
		if sent.From != g.mailbox.primary && !slices.Contains(g.mailbox.aliases, sent.From) {
			g.fail(http.StatusForbidden, "ErrorSendAsDenied", "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.")
			return sent, false
		}
	} else {
		sent.From = g.mailbox.primary
	}
	for _, h := range []string{"To", "Cc", "Bcc"} {
		if msg.Header.Get(h) == "" {
			continue
		}
		list, err := msg.Header.AddressList(h)
		if err != nil {
			g.fail(http.StatusBadRequest, "ErrorInvalidRecipients", "At least one recipient is not valid., Recipient address is not valid.")
			return sent, false
		}
		for _, a := range list {
			addr := strings.ToLower(a.Address)
			if g.server.refusesRecipient(addr) {
				g.fail(http.StatusBadRequest, "ErrorInvalidRecipients", "At least one recipient is not valid., Recipient '"+addr+"' is not valid.")
				return sent, false
			}
			sent.Recipients = append(sent.Recipients, addr)
		}
	}
	if len(sent.Recipients) == 0 {
		g.fail(http.StatusBadRequest, "ErrorInvalidRecipients", "At least one recipient is not valid., A message can't be sent because it contains no recipients.")
		return sent, false
	}
	dec := new(mime.WordDecoder)
	if subj, err := dec.DecodeHeader(msg.Header.Get("Subject")); err == nil {
		sent.Subject = subj
	}
	return sent, true
}

// record stores a sent message, files it in Sent Items and delivers it to
// the fake mailboxes among its recipients.
func (s *Server) record(sent SentMessage) {
	if msg, err := mail.ReadMessage(bytes.NewReader(sent.MIME)); err == nil {
		s.fileSent(sent, msg)
	}
	s.mu.Lock()
	s.sent = append(s.sent, sent)
	onSend := s.onSend
	s.mu.Unlock()
	s.deliverLocal(sent)
	if onSend != nil {
		onSend(sent)
	}
}

func (s *Server) serveSendMail(g *graphRequest) {
	raw, msg, ok := g.readMIME()
	if !ok {
		return
	}
	sent, ok := g.sentMessage(raw, msg)
	if !ok {
		return
	}
	s.record(sent)
	if !g.acceptedFault() {
		g.w.WriteHeader(http.StatusAccepted)
	}
}

func stripLineBreaks(b []byte) []byte {
	if !bytes.ContainsAny(b, "\r\n") {
		return b
	}
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c != '\r' && c != '\n' {
			out = append(out, c)
		}
	}
	return out
}

func writeGraphError(w http.ResponseWriter, requestID string, status int, code, message string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{
		"error": map[string]any{
			"code":    code,
			"message": message,
			"innerError": map[string]string{
				"date":              time.Now().UTC().Format("2006-01-02T15:04:05"),
				"request-id":        requestID,
				"client-request-id": requestID,
			},
		},
	})
}
