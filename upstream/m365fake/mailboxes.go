package m365fake

import (
	"encoding/base64"
	"slices"
	"strings"
	"unicode/utf16"

	"mailbridge/upstream/m365fake/outlookpop"
)

// The mailboxes behind Outlook's POP3 and IMAP services: one store of raw
// messages per service, fed by AddMessage and by what Graph sends to a
// fake mailbox, and the FullAccess grants (Add-MailboxPermission) that
// both services' XOAUTH2 logins need.

// POP3Fault is an injected failure of the fake Outlook POP3 service.
type POP3Fault = outlookpop.Fault

// StartPOP3 starts the fake Outlook POP3 service with implicit TLS on a free
// port of 127.0.0.1 and returns its address.
func (s *Server) StartPOP3() (string, error) {
	svc, err := outlookpop.Start(outlookpop.Options{Certificate: s.pki.server, Authorize: s.checkXOAUTH2, NameTag: serverNameTag()})
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	s.pop = svc
	for _, m := range s.added { // what was added before the service started
		svc.Add(m.mailbox, m.raw)
	}
	s.mu.Unlock()
	return svc.Addr(), nil
}

// addedMessage is a message put into a mailbox, kept for the services
// that start later.
type addedMessage struct {
	mailbox string
	raw     []byte
}

func (s *Server) pop3() *outlookpop.Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pop
}

func (s *Server) closePOP3() {
	if p := s.pop3(); p != nil {
		p.Close()
	}
}

// POP3Addr is the address of the POP3 service started by StartPOP3.
func (s *Server) POP3Addr() string {
	if p := s.pop3(); p != nil {
		return p.Addr()
	}
	return ""
}

// GrantMailboxAccess gives the app's service principal FullAccess on
// mailbox (Add-MailboxPermission), which POP3 and IMAP logins need.
func (s *Server) GrantMailboxAccess(tenantID, clientID, mailbox string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.access == nil {
		s.access = map[string]bool{}
	}
	s.access[tenantID+"/"+clientID+"/"+strings.ToLower(mailbox)] = true
}

// AddMessage puts a raw message into mailbox (a primary address), for POP3
// and IMAP, and returns its POP3 UID ("" without a POP3 service).
func (s *Server) AddMessage(mailbox string, raw []byte) string {
	mb := strings.ToLower(mailbox)
	// Under the lock, so that a service starting now gets it once.
	s.mu.Lock()
	defer s.mu.Unlock()
	s.added = append(s.added, addedMessage{mb, raw})
	uid := ""
	if s.pop != nil {
		uid = s.pop.Add(mb, raw)
	}
	if s.imap != nil {
		s.imap.Add(mb, raw) // the same mailbox, seen over IMAP
	}
	return uid
}

// MailboxUIDs returns the POP3 UIDs of the messages in mailbox, oldest
// first.
func (s *Server) MailboxUIDs(mailbox string) []string {
	if p := s.pop3(); p != nil {
		return p.UIDs(strings.ToLower(mailbox))
	}
	return nil
}

// FailPOP3 queues a fault for the next POP3 session.
func (s *Server) FailPOP3(f POP3Fault) { s.pop3().Fail(f) }

// SetPOP3Writes sets how the fake Outlook POP3 service writes RETR answers
// (outlookpop.WritesBulk: as fast as a server can).
func (s *Server) SetPOP3Writes(w outlookpop.Writes) { s.pop3().SetWrites(w) }

// POP3Connections counts the connections the POP3 service accepted.
func (s *Server) POP3Connections() int { return s.pop3().Connections() }

// POP3Logins counts successful XOAUTH2 logins to the POP3 service.
func (s *Server) POP3Logins() int { return s.pop3().Logins() }

// checkXOAUTH2 verifies a SASL XOAUTH2 response and returns the mailbox it
// opens.
func (s *Server) checkXOAUTH2(b64, role string) (string, bool) {
	mailbox, valid, connected := s.verifyXOAUTH2(b64, role, "pop3")
	return mailbox, valid && connected // Outlook refuses the POP3 login itself
}

// authorizeIMAP checks an IMAP XOAUTH2 login as Outlook does: a valid
// token for a mailbox opens the session, but without FullAccess on the
// mailbox, or with IMAP disabled for it, the session is "authenticated but
// not connected".
func (s *Server) authorizeIMAP(b64, role string) (mailbox string, ok, connected bool) {
	return s.verifyXOAUTH2(b64, role, "imap")
}

// DisableProtocol turns POP3 or IMAP ("pop3", "imap") off for mailbox, as
// Set-CASMailbox -PopEnabled/-ImapEnabled $false does.
func (s *Server) DisableProtocol(mailbox, proto string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.disabled == nil {
		s.disabled = map[string]bool{}
	}
	s.disabled[strings.ToLower(mailbox)+"/"+proto] = true
}

// verifyXOAUTH2 verifies a SASL XOAUTH2 response for role and returns the
// mailbox it names, whether the login is valid (token, role, mailbox), and
// whether the mailbox can be opened (FullAccess, proto not disabled).
func (s *Server) verifyXOAUTH2(b64, role, proto string) (string, bool, bool) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
	if err != nil {
		return "", false, false
	}
	parts := strings.Split(string(raw), "\x01")
	if len(parts) != 4 || parts[2] != "" || parts[3] != "" {
		return "", false, false
	}
	user, ok1 := strings.CutPrefix(parts[0], "user=")
	token, ok2 := strings.CutPrefix(parts[1], "auth=Bearer ")
	if !ok1 || !ok2 {
		return "", false, false
	}
	c, err := s.verifyToken(token, OutlookAudience)
	if err != nil || !slices.Contains(c.Roles, role) {
		return "", false, false
	}
	s.mu.Lock()
	t := s.tenants[c.Tid]
	var mb *mailbox
	if t != nil {
		mb = t.mailboxes[strings.ToLower(user)]
	}
	s.mu.Unlock()
	if mb == nil {
		return "", false, false
	}
	s.mu.Lock()
	granted := s.access[c.Tid+"/"+c.AppID+"/"+mb.primary] && !s.disabled[mb.primary+"/"+proto]
	s.mu.Unlock()
	return mb.primary, true, granted
}

// deliverLocal puts a message Graph sent into the fake mailboxes among its
// recipients, so that the demo can show the whole loop.
func (s *Server) deliverLocal(m SentMessage) {
	s.mu.Lock()
	var boxes []string
	for _, t := range s.tenants {
		for _, r := range m.Recipients {
			if mb := t.mailboxes[r]; mb != nil && !slices.Contains(boxes, mb.primary) {
				boxes = append(boxes, mb.primary)
			}
		}
	}
	s.mu.Unlock()
	for _, b := range boxes {
		s.AddMessage(b, m.MIME)
	}
}

func serverNameTag() string {
	u := utf16.Encode([]rune("AM0PR03CA0097.eurprd03.prod.outlook.com"))
	b := make([]byte, 0, 2*len(u))
	for _, c := range u {
		b = append(b, byte(c), byte(c>>8))
	}
	return base64.StdEncoding.EncodeToString(b)
}
