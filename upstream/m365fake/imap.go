package m365fake

import (
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapserver"
	"github.com/emersion/go-imap/v2/imapserver/imapmemserver"
	"github.com/emersion/go-sasl"
)

// The fake Outlook IMAP service: go-imap's server with its in-memory
// backend, one user per mailbox of the fake, logged in only with SASL
// XOAUTH2 and a token for Outlook's audience carrying IMAP.AccessAsApp and
// FullAccess on the mailbox, as Exchange Online does. Messages added with
// AddMessage (and those Graph delivers to a fake mailbox) appear in INBOX.

// imapState is the fake's IMAP side.
type imapState struct {
	mu       sync.Mutex
	ln       net.Listener
	srv      *imapserver.Server
	users    map[string]*imapmemserver.User // by primary address
	faults   []IMAPFault
	logins   int
	accepted int
}

// IMAPFault is an injected failure of the fake Outlook IMAP service.
type IMAPFault struct {
	// DropAfter closes the next session's connection after this many bytes
	// written after its login (0: no drop).
	DropAfter int
	// Stall keeps the next session's connection open but answers nothing
	// after its login.
	Stall bool
}

// IMAPGreeting is Outlook's IMAP greeting (the bracket is the server name
// in UTF-16LE, base64).
func IMAPGreeting() string {
	return "* OK The Microsoft Exchange IMAP4 service is ready. [" + serverNameTag() + "]"
}

// StartIMAP starts the fake Outlook IMAP service with implicit TLS on a free
// port of 127.0.0.1 and returns its address.
func (s *Server) StartIMAP() (string, error) {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{s.pki.server}, MinVersion: tls.VersionTLS12})
	if err != nil {
		return "", fmt.Errorf("fake outlook imap: %w", err)
	}
	srv := imapserver.New(&imapserver.Options{
		NewSession: func(c *imapserver.Conn) (imapserver.Session, *imapserver.GreetingData, error) {
			oc, _ := c.NetConn().(*outlookConn)
			return &imapSession{fake: s, conn: oc}, nil, nil
		},
		Caps: imap.CapSet{imap.CapIMAP4rev1: {}, imap.CapUIDPlus: {}, imap.CapMove: {}, imap.CapNamespace: {},
			imap.CapChildren: {}, imap.CapLiteralPlus: {}, imap.CapUnselect: {}, imap.CapIdle: {}},
		InsecureAuth: true, // implicit TLS
		Logger:       discardLogger{},
	})
	s.imap.mu.Lock()
	s.imap.ln, s.imap.srv = ln, srv
	s.imap.mu.Unlock()
	go srv.Serve(&outlookListener{Listener: ln, fake: s})
	return ln.Addr().String(), nil
}

// IMAPAddr is the address of the IMAP service started by StartIMAP.
func (s *Server) IMAPAddr() string {
	s.imap.mu.Lock()
	defer s.imap.mu.Unlock()
	if s.imap.ln == nil {
		return ""
	}
	return s.imap.ln.Addr().String()
}

// IMAPLogins counts successful XOAUTH2 logins to the IMAP service.
func (s *Server) IMAPLogins() int {
	s.imap.mu.Lock()
	defer s.imap.mu.Unlock()
	return s.imap.logins
}

// IMAPConnections counts the connections the IMAP service accepted.
func (s *Server) IMAPConnections() int {
	s.imap.mu.Lock()
	defer s.imap.mu.Unlock()
	return s.imap.accepted
}

// FailIMAP queues a fault for the next IMAP session that logs in.
func (s *Server) FailIMAP(f IMAPFault) {
	s.imap.mu.Lock()
	defer s.imap.mu.Unlock()
	s.imap.faults = append(s.imap.faults, f)
}

func (s *Server) closeIMAP() {
	s.imap.mu.Lock()
	srv := s.imap.srv
	s.imap.srv = nil
	s.imap.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
}

// imapUser returns the in-memory user of mailbox (a primary address),
// making it with an INBOX the first time.
func (s *Server) imapUser(mailbox string) *imapmemserver.User {
	s.imap.mu.Lock()
	defer s.imap.mu.Unlock()
	if s.imap.users == nil {
		s.imap.users = map[string]*imapmemserver.User{}
	}
	u := s.imap.users[mailbox]
	if u == nil {
		u = imapmemserver.NewUser(mailbox, "")
		u.Create("INBOX", nil)
		s.imap.users[mailbox] = u
	}
	return u
}

// addIMAPMessage puts raw into mailbox's INBOX.
func (s *Server) addIMAPMessage(mailbox string, raw []byte) {
	s.imapUser(mailbox).Append("INBOX", literal{bytes.NewReader(raw)}, &imap.AppendOptions{})
}

type literal struct{ *bytes.Reader }

func (l literal) Size() int64 { return l.Reader.Size() }

// imapSession is one client of the fake: nothing until XOAUTH2 logs it in
// to a mailbox, then go-imap's in-memory user session.
type imapSession struct {
	*imapmemserver.UserSession
	fake *Server
	conn *outlookConn
}

var _ imapserver.SessionSASL = (*imapSession)(nil)

func (sess *imapSession) AuthenticateMechanisms() []string { return []string{"PLAIN", "XOAUTH2"} }

func (sess *imapSession) Authenticate(mech string) (sasl.Server, error) {
	if !strings.EqualFold(mech, "XOAUTH2") {
		return nil, authFailed
	}
	return &xoauth2Server{login: func(resp []byte) error {
		mailbox, ok := sess.fake.checkXOAUTH2(base64.StdEncoding.EncodeToString(resp), "IMAP.AccessAsApp")
		if !ok {
			return authFailed
		}
		sess.UserSession = imapmemserver.NewUserSession(sess.fake.imapUser(mailbox))
		sess.fake.imap.mu.Lock()
		sess.fake.imap.logins++
		var f IMAPFault
		if len(sess.fake.imap.faults) > 0 {
			f, sess.fake.imap.faults = sess.fake.imap.faults[0], sess.fake.imap.faults[1:]
		}
		sess.fake.imap.mu.Unlock()
		if sess.conn != nil {
			sess.conn.arm(f)
		}
		return nil
	}}, nil
}

// Login refuses basic authentication, as Exchange Online does.
func (sess *imapSession) Login(username, password string) error { return authFailed }

func (sess *imapSession) Close() error {
	if sess.UserSession != nil {
		return sess.UserSession.Close()
	}
	return nil
}

// The methods of a logged-in session, which go-imap calls only after
// Authenticate succeeded.
func (sess *imapSession) Select(name string, o *imap.SelectOptions) (*imap.SelectData, error) {
	return sess.UserSession.Select(name, o)
}

// Idle reports changes while the client idles. go-imap's in-memory tracker
// wakes an idler only for updates queued after the idler registered, so a
// message added between "+ idling" and that registration would wait for
// DONE (seen once on a busy machine). The fake polls instead: first at
// once, then on a short tick, which loses nothing queued.
func (sess *imapSession) Idle(w *imapserver.UpdateWriter, stop <-chan struct{}) error {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if err := sess.UserSession.Poll(w, true); err != nil {
			return err
		}
		select {
		case <-stop:
			return nil
		case <-tick.C:
		}
	}
}

// authFailed is Outlook's answer to a refused login, whatever the cause.
var authFailed = &imap.Error{Type: imap.StatusResponseTypeNo, Text: "AUTHENTICATE failed."}

// xoauth2Server is the server side of SASL XOAUTH2: one response.
type xoauth2Server struct {
	login func(resp []byte) error
	done  bool
}

func (x *xoauth2Server) Next(response []byte) ([]byte, bool, error) {
	if x.done {
		return nil, true, sasl.ErrUnexpectedClientResponse
	}
	if response == nil {
		return []byte{}, false, nil // no initial response: ask for it
	}
	x.done = true
	return nil, true, x.login(response)
}

type discardLogger struct{}

func (discardLogger) Printf(string, ...any) {}

// outlookListener gives each connection Outlook's greeting and the
// session's faults.
type outlookListener struct {
	net.Listener
	fake *Server
}

func (l *outlookListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.fake.imap.mu.Lock()
	l.fake.imap.accepted++
	l.fake.imap.mu.Unlock()
	return &outlookConn{Conn: c}, nil
}

// outlookConn rewrites go-imap's greeting to Outlook's and applies a
// session's fault.
type outlookConn struct {
	net.Conn
	mu      sync.Mutex
	greeted bool
	fault   IMAPFault
	armed   bool
	written int
}

func (c *outlookConn) arm(f IMAPFault) {
	c.mu.Lock()
	c.fault, c.armed = f, true
	c.mu.Unlock()
}

func (c *outlookConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	greeted, f, armed := c.greeted, c.fault, c.armed
	c.greeted = true
	c.mu.Unlock()
	if !greeted && bytes.HasPrefix(p, []byte("* OK")) {
		if i := bytes.Index(p, []byte("\r\n")); i >= 0 {
			if _, err := io.WriteString(c.Conn, IMAPGreeting()+"\r\n"); err != nil {
				return 0, err
			}
			n, err := c.Conn.Write(p[i+2:])
			return n + i + 2, err
		}
	}
	if armed && f.Stall {
		return len(p), nil // swallowed: the client waits for ever
	}
	if armed && f.DropAfter > 0 {
		c.mu.Lock()
		left := f.DropAfter - c.written
		c.written += len(p)
		c.mu.Unlock()
		if left <= len(p) {
			if left > 0 {
				c.Conn.Write(p[:left])
			}
			c.Conn.Close()
			return 0, net.ErrClosed
		}
	}
	return c.Conn.Write(p)
}
