package m365fake

import (
	"encoding/json"
	"net/http"
	"net/mail"
	"strings"
	"time"
)

// Sent Items: Exchange files every message sendMail or a draft's /send
// took in the sending mailbox's Sent Items, a few seconds after the 202.
// The fake files it after SetSentItemsLag (none by default) and answers
// the look-up by Message-ID that the bridge makes after a send whose
// outcome it could not know:
//
//	GET /users/{id}/mailFolders/sentitems/messages?$filter=internetMessageId eq '<id>'&$select=...
//
// with any of the roles that list messages.

// ReadRoles are the application permissions that let an app list a
// mailbox's messages, least first.
var ReadRoles = []string{"Mail.ReadBasic.All", "Mail.ReadBasic", "Mail.Read", "Mail.ReadWrite"}

// sentItem is a message in a mailbox's Sent Items.
type sentItem struct {
	id                string
	internetMessageID string
	sent              time.Time
	visible           time.Time // when a look-up first sees it
}

// SetSentItemsLag makes messages sent from now on appear in Sent Items
// only d after Graph took them.
func (s *Server) SetSentItemsLag(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sentLag = d
}

// SentItems returns the Message-IDs in mailbox's Sent Items, visible or
// not yet, oldest first.
func (s *Server) SentItems(mailbox string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []string
	for _, it := range s.sentItems[strings.ToLower(mailbox)] {
		ids = append(ids, it.internetMessageID)
	}
	return ids
}

// SentItemLookups counts the look-ups in Sent Items for messageID that
// reached the fake.
func (s *Server) SentItemLookups(messageID string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lookups[messageID]
}

// fileSent puts a message Graph took into its sender's Sent Items, with
// the Message-ID Exchange gives one without.
func (s *Server) fileSent(sent SentMessage, msg *mail.Message) {
	id := strings.TrimSpace(msg.Header.Get("Message-Id"))
	if id == "" {
		id = "<" + strings.ToUpper(strings.ReplaceAll(newGUID(), "-", "")) + "@AM0PR03MB0097.eurprd03.prod.outlook.com>"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sentItems == nil {
		s.sentItems = map[string][]sentItem{}
	}
	now := time.Now()
	s.sentItems[sent.User] = append(s.sentItems[sent.User], sentItem{id: "AAMkAD" + newGUID(), internetMessageID: id, sent: now, visible: now.Add(s.sentLag)})
}

func (s *Server) serveListMessages(g *graphRequest) {
	if !strings.EqualFold(g.r.PathValue("folder"), "sentitems") {
		g.fail(http.StatusNotFound, "ErrorItemNotFound", "The specified object was not found in the store.")
		return
	}
	filter := g.r.URL.Query().Get("$filter")
	value, ok := parseEqFilter(filter, "internetMessageId")
	if !ok {
		g.fail(http.StatusBadRequest, "BadRequest", "Invalid filter clause: "+filter)
		return
	}
	s.mu.Lock()
	if s.lookups == nil {
		s.lookups = map[string]int{}
	}
	s.lookups[value]++
	now := time.Now()
	type item struct {
		ID                string `json:"id"`
		InternetMessageID string `json:"internetMessageId"`
		SentDateTime      string `json:"sentDateTime"`
	}
	out := []item{}
	for _, it := range s.sentItems[g.user] {
		if it.internetMessageID == value && !now.Before(it.visible) {
			out = append(out, item{it.id, it.internetMessageID, it.sent.UTC().Format("2006-01-02T15:04:05Z")})
		}
	}
	s.mu.Unlock()
	g.w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(g.w).Encode(map[string]any{"value": out})
}

// parseEqFilter reads an OData filter "field eq 'value'" (a ” inside the
// literal is one ').
func parseEqFilter(filter, field string) (string, bool) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(filter), field+" eq '")
	if !ok || !strings.HasSuffix(rest, "'") {
		return "", false
	}
	lit := rest[:len(rest)-1]
	if strings.Count(lit, "'")%2 != 0 || strings.Contains(strings.ReplaceAll(lit, "''", ""), "'") {
		return "", false
	}
	return strings.ReplaceAll(lit, "''", "'"), true
}

// acceptedFault carries out, after a message was taken, a fault queued
// with AfterAccept: the answer is lost (a gateway's 504, or a dropped
// connection). It reports whether it answered.
func (g *graphRequest) acceptedFault() bool {
	if g.after == nil {
		return false
	}
	return applyFault(g.w, g.r, *g.after, func(f Fault) { g.fail(f.Status, f.Code, f.Message) })
}

// GatewayTimeoutAfterAccept is the fault of a gateway in front of an
// Exchange server that took the message: 504 after acceptance.
func GatewayTimeoutAfterAccept() Fault {
	return Fault{Status: http.StatusGatewayTimeout, Code: "UnknownError", Message: "", AfterAccept: true}
}

// DropAfterAccept takes the message and closes the connection without an
// answer.
func DropAfterAccept() Fault { return Fault{Drop: true, AfterAccept: true} }

// RevealSentItems makes every message in Sent Items visible now, whatever
// the lag: Exchange has filed them at last.
func (s *Server) RevealSentItems() {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	for _, items := range s.sentItems {
		for i := range items {
			items[i].visible = now
		}
	}
}
