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
}

func (s *Server) serveSendMail(w http.ResponseWriter, r *http.Request) {
	requestID := newGUID()
	w.Header().Set("request-id", requestID)
	if c := r.Header.Get("client-request-id"); c != "" {
		w.Header().Set("client-request-id", c)
	} else {
		w.Header().Set("client-request-id", requestID)
	}
	user := strings.ToLower(r.PathValue("user"))
	s.mu.Lock()
	s.inflight[user]++
	if s.inflight[user] > s.maxInflight[user] {
		s.maxInflight[user] = s.inflight[user]
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.inflight[user]--
		s.mu.Unlock()
	}()
	fail := func(status int, code, message string) { writeGraphError(w, requestID, status, code, message) }
	if f, ok := s.takeFault(&s.graphFaults); ok {
		if applyFault(w, r, f, func(f Fault) { fail(f.Status, f.Code, f.Message) }) {
			return
		}
	}

	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		fail(http.StatusUnauthorized, "InvalidAuthenticationToken", "Access token is empty.")
		return
	}
	c, err := s.verifyToken(tok, GraphAudience)
	if err != nil {
		fail(http.StatusUnauthorized, "InvalidAuthenticationToken", err.Error())
		return
	}
	if !slices.Contains(c.Roles, "Mail.Send") {
		fail(http.StatusForbidden, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxRequestBody+1))
	if err != nil {
		return // the client went away
	}
	if len(body) > maxRequestBody {
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(http.StatusRequestEntityTooLarge)
		io.WriteString(w, "<html><head><title>413 Request Entity Too Large</title></head><body>Request Entity Too Large</body></html>")
		return
	}
	s.mu.Lock()
	t := s.tenants[c.Tid]
	var mb *mailbox
	if t != nil {
		mb = t.mailboxes[user]
	}
	s.mu.Unlock()
	if mb == nil || mb.primary != user { // /users/{id} takes the UPN, not an alias
		fail(http.StatusNotFound, "ErrorInvalidUser", fmt.Sprintf("The requested user '%s' is invalid.", r.PathValue("user")))
		return
	}
	if ct, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type")); ct != "text/plain" {
		fail(http.StatusBadRequest, "RequestBodyRead", "Cannot read the request body: a MIME message must be sent as text/plain.")
		return
	}
	raw, err := base64.StdEncoding.DecodeString(string(stripLineBreaks(body)))
	if err != nil {
		fail(http.StatusBadRequest, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
		return
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil || len(raw) == 0 {
		fail(http.StatusBadRequest, "ErrorMimeContentInvalid", "MIME content does not contain all required information, malformed formatting, or empty.")
		return
	}
	sent := SentMessage{User: user, Tenant: c.Tid, MIME: raw, RequestID: requestID, Received: time.Now()}
	if from, err := mail.ParseAddress(msg.Header.Get("From")); err == nil {
		sent.From = strings.ToLower(from.Address)
		if sent.From != mb.primary && !slices.Contains(mb.aliases, sent.From) {
			fail(http.StatusForbidden, "ErrorSendAsDenied", "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.")
			return
		}
	} else {
		sent.From = mb.primary
	}
	for _, h := range []string{"To", "Cc", "Bcc"} {
		if msg.Header.Get(h) == "" {
			continue
		}
		list, err := msg.Header.AddressList(h)
		if err != nil {
			fail(http.StatusBadRequest, "ErrorInvalidRecipients", "At least one recipient is not valid., Recipient address is not valid.")
			return
		}
		for _, a := range list {
			sent.Recipients = append(sent.Recipients, strings.ToLower(a.Address))
		}
	}
	if len(sent.Recipients) == 0 {
		fail(http.StatusBadRequest, "ErrorInvalidRecipients", "At least one recipient is not valid., A message can't be sent because it contains no recipients.")
		return
	}
	dec := new(mime.WordDecoder)
	if subj, err := dec.DecodeHeader(msg.Header.Get("Subject")); err == nil {
		sent.Subject = subj
	}
	s.mu.Lock()
	s.sent = append(s.sent, sent)
	onSend := s.onSend
	s.mu.Unlock()
	s.deliverLocal(sent)
	if onSend != nil {
		onSend(sent)
	}
	w.WriteHeader(http.StatusAccepted)
}

func stripLineBreaks(b []byte) []byte {
	if bytes.IndexAny(b, "\r\n") < 0 {
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
