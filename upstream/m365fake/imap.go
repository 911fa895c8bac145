package m365fake

import "mailbridge/upstream/m365fake/outlookimap"

// The fake Outlook IMAP service (package outlookimap), logged in with SASL
// XOAUTH2 and a token for Outlook's audience carrying IMAP.AccessAsApp and
// FullAccess on the mailbox, as Exchange Online does. Messages added with
// AddMessage (and those Graph delivers to a fake mailbox) appear in INBOX.

// IMAPFault is an injected failure of the fake Outlook IMAP service.
type IMAPFault = outlookimap.Fault

// IMAPGreeting is Outlook's IMAP greeting (the bracket is the server name
// in UTF-16LE, base64).
func IMAPGreeting() string { return outlookimap.Greeting(serverNameTag()) }

// StartIMAP starts the fake Outlook IMAP service with implicit TLS on a free
// port of 127.0.0.1 and returns its address.
func (s *Server) StartIMAP() (string, error) {
	svc, err := outlookimap.Start(outlookimap.Options{Certificate: s.pki.server, Authorize: s.authorizeIMAP, NameTag: serverNameTag()})
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	s.imap = svc
	for _, m := range s.added { // what was added before the service started
		svc.Add(m.mailbox, m.raw)
	}
	s.mu.Unlock()
	return svc.Addr(), nil
}

func (s *Server) imapService() *outlookimap.Service {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.imap
}

// IMAPAddr is the address of the IMAP service started by StartIMAP.
func (s *Server) IMAPAddr() string {
	if i := s.imapService(); i != nil {
		return i.Addr()
	}
	return ""
}

// IMAPLogins counts successful XOAUTH2 logins to the IMAP service.
func (s *Server) IMAPLogins() int { return s.imapService().Logins() }

// IMAPConnections counts the connections the IMAP service accepted.
func (s *Server) IMAPConnections() int { return s.imapService().Connections() }

// FailIMAP queues a fault for the next IMAP session that logs in.
func (s *Server) FailIMAP(f IMAPFault) { s.imapService().Fail(f) }

func (s *Server) closeIMAP() {
	if i := s.imapService(); i != nil {
		i.Close()
	}
}
