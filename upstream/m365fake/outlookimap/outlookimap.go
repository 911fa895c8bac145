// Package outlookimap is the fake Outlook IMAP service of m365fake:
// go-imap's server with its in-memory backend behind implicit TLS on
// loopback, one user per mailbox, logged in only with SASL XOAUTH2 checked
// by the caller's Authorizer, and answering with Outlook's texts where
// public transcripts show them: the greeting, the capabilities before and
// after login, "OK AUTHENTICATE completed.", IDLE's continuation and
// LOGOUT's BYE. Faults drop or stall a session after its login.
package outlookimap

import (
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"net"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-imap/v2"
	"github.com/emersion/go-imap/v2/imapserver"
	"github.com/emersion/go-imap/v2/imapserver/imapmemserver"
	"github.com/emersion/go-sasl"
)

// Outlook's capabilities before and after login (imapsync#368,
// MailKit#1494).
const (
	CapsBeforeLogin = "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+"
	CapsAfterLogin  = "IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CLIENTACCESSRULES CLIENTNETWORKPRESENCELOCATION BACKENDAUTHENTICATE CHILDREN IDLE NAMESPACE LITERAL+"
)

// Authorizer checks a SASL XOAUTH2 response (base64) for an app holding
// role and returns the mailbox (a primary address) it names, whether the
// login succeeds, and whether the mailbox can then be opened: without
// FullAccess, or with IMAP disabled for the mailbox, Outlook completes the
// login and answers the first mailbox command "BAD User is authenticated
// but not connected.", then closes the connection.
type Authorizer func(xoauth2, role string) (mailbox string, ok, connected bool)

// Options configure the service.
type Options struct {
	Certificate tls.Certificate
	Authorize   Authorizer
	// NameTag is the bracket of the greeting: the server name in
	// UTF-16LE, base64.
	NameTag string
}

// Fault is an injected failure of the fake Outlook IMAP service.
type Fault struct {
	// DropAfter closes the next session's connection after this many bytes
	// written after its login (0: no drop).
	DropAfter int
	// Stall keeps the next session's connection open but answers nothing
	// after its login.
	Stall bool
	// Throttle answers the next session's mailbox commands (SELECT, LIST,
	// STATUS, APPEND) as Outlook does when it throttles: "NO Request is
	// throttled. Suggested Backoff Time: 299609 milliseconds"
	// (imapsync#198).
	Throttle bool
}

// Greeting is Outlook's IMAP greeting for the server name tag.
func Greeting(nameTag string) string {
	return "* OK The Microsoft Exchange IMAP4 service is ready. [" + nameTag + "]"
}

// Service is a running fake Outlook IMAP service.
type Service struct {
	opts     Options
	ln       net.Listener
	srv      *imapserver.Server
	mu       sync.Mutex
	users    map[string]*imapmemserver.User // by primary address
	faults   []Fault
	logins   int
	accepted int
}

// Start starts the service with implicit TLS on a free port of 127.0.0.1.
func Start(opts Options) (*Service, error) {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{opts.Certificate}, MinVersion: tls.VersionTLS12})
	if err != nil {
		return nil, fmt.Errorf("fake outlook imap: %w", err)
	}
	s := &Service{opts: opts, ln: ln, users: map[string]*imapmemserver.User{}}
	s.srv = imapserver.New(&imapserver.Options{
		NewSession: func(c *imapserver.Conn) (imapserver.Session, *imapserver.GreetingData, error) {
			oc, _ := c.NetConn().(*outlookConn)
			return &session{svc: s, conn: oc}, nil, nil
		},
		Caps: imap.CapSet{imap.CapIMAP4rev1: {}, imap.CapUIDPlus: {}, imap.CapMove: {}, imap.CapNamespace: {},
			imap.CapChildren: {}, imap.CapLiteralPlus: {}, imap.CapUnselect: {}, imap.CapIdle: {}},
		InsecureAuth: true, // implicit TLS
		Logger:       discardLogger{},
	})
	go s.srv.Serve(&outlookListener{Listener: ln, svc: s})
	return s, nil
}

// Addr is the service's address.
func (s *Service) Addr() string { return s.ln.Addr().String() }

// Close stops the service and its sessions.
func (s *Service) Close() { s.srv.Close() }

// Logins counts successful XOAUTH2 logins.
func (s *Service) Logins() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.logins
}

// Connections counts the connections the service accepted.
func (s *Service) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted
}

// Fail queues a fault for the next session that logs in.
func (s *Service) Fail(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, f)
}

// user returns the in-memory user of mailbox, making it with an INBOX the
// first time.
func (s *Service) user(mailbox string) *imapmemserver.User {
	s.mu.Lock()
	defer s.mu.Unlock()
	u := s.users[mailbox]
	if u == nil {
		u = imapmemserver.NewUser(mailbox, "")
		u.Create("INBOX", nil)
		s.users[mailbox] = u
	}
	return u
}

// Add puts raw into mailbox's INBOX.
func (s *Service) Add(mailbox string, raw []byte) {
	s.user(mailbox).Append("INBOX", literal{bytes.NewReader(raw)}, &imap.AppendOptions{})
}

type literal struct{ *bytes.Reader }

func (l literal) Size() int64 { return l.Reader.Size() }

// session is one client of the fake: nothing until XOAUTH2 logs it in
// to a mailbox, then go-imap's in-memory user session.
type session struct {
	*imapmemserver.UserSession
	svc          *Service
	conn         *outlookConn
	notConnected bool // logged in, but the mailbox cannot be opened
	throttled    bool // Fault.Throttle
}

// errThrottled is Outlook's answer to a command while it throttles.
var errThrottled = &imap.Error{Type: imap.StatusResponseTypeNo, Text: "Request is throttled. Suggested Backoff Time: 299609 milliseconds"}

// refusal is the answer a mailbox command gets instead of being carried
// out, nil if none.
func (sess *session) refusal() error {
	switch {
	case sess.notConnected:
		return errNotConnected
	case sess.throttled:
		return errThrottled
	}
	return nil
}

// errNotConnected is Outlook's answer to a mailbox command of a session
// that logged in but cannot open its mailbox; the connection then closes
// (outlookConn adds the BYE).
var errNotConnected = &imap.Error{Type: imap.StatusResponseTypeBad, Text: notConnectedText}

const notConnectedText = "User is authenticated but not connected."

// The mailbox commands, refused when the session is not connected.
func (sess *session) List(w *imapserver.ListWriter, ref string, patterns []string, o *imap.ListOptions) error {
	if err := sess.refusal(); err != nil {
		return err
	}
	return sess.UserSession.List(w, ref, patterns, o)
}

func (sess *session) Status(name string, o *imap.StatusOptions) (*imap.StatusData, error) {
	if err := sess.refusal(); err != nil {
		return nil, err
	}
	return sess.UserSession.Status(name, o)
}

func (sess *session) Append(name string, r imap.LiteralReader, o *imap.AppendOptions) (*imap.AppendData, error) {
	if err := sess.refusal(); err != nil {
		return nil, err
	}
	return sess.UserSession.Append(name, r, o)
}

var _ imapserver.SessionSASL = (*session)(nil)

func (sess *session) AuthenticateMechanisms() []string { return []string{"PLAIN", "XOAUTH2"} }

func (sess *session) Authenticate(mech string) (sasl.Server, error) {
	if !strings.EqualFold(mech, "XOAUTH2") {
		return nil, authFailed
	}
	return &xoauth2Server{login: func(resp []byte) error {
		mailbox, ok, connected := sess.svc.opts.Authorize(base64.StdEncoding.EncodeToString(resp), "IMAP.AccessAsApp")
		if !ok {
			return authFailed
		}
		sess.notConnected = !connected
		sess.UserSession = imapmemserver.NewUserSession(sess.svc.user(mailbox))
		sess.svc.mu.Lock()
		sess.svc.logins++
		var f Fault
		if len(sess.svc.faults) > 0 {
			f, sess.svc.faults = sess.svc.faults[0], sess.svc.faults[1:]
		}
		sess.svc.mu.Unlock()
		sess.throttled = f.Throttle
		if sess.conn != nil {
			sess.conn.arm(f)
		}
		return nil
	}}, nil
}

// Login refuses basic authentication, as Exchange Online does.
func (sess *session) Login(username, password string) error { return authFailed }

func (sess *session) Close() error {
	if sess.UserSession != nil {
		return sess.UserSession.Close()
	}
	return nil
}

// The methods of a logged-in session, which go-imap calls only after
// Authenticate succeeded.
func (sess *session) Select(name string, o *imap.SelectOptions) (*imap.SelectData, error) {
	if err := sess.refusal(); err != nil {
		return nil, err
	}
	return sess.UserSession.Select(name, o)
}

// Idle reports changes while the client idles. go-imap's in-memory tracker
// wakes an idler only for updates queued after the idler registered, so a
// message added between "+ idling" and that registration would wait for
// DONE (seen once on a busy machine). The fake polls instead: first at
// once, then on a short tick, which loses nothing queued.
func (sess *session) Idle(w *imapserver.UpdateWriter, stop <-chan struct{}) error {
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
	svc *Service
}

func (l *outlookListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.svc.mu.Lock()
	l.svc.accepted++
	l.svc.mu.Unlock()
	return &outlookConn{Conn: c, nameTag: l.svc.opts.NameTag}, nil
}

// outlookConn rewrites go-imap's texts to Outlook's and applies a
// session's fault.
type outlookConn struct {
	net.Conn
	nameTag string
	mu      sync.Mutex
	greeted bool
	fault   Fault
	armed   bool // logged in
	written int
	// closeAfter: the write just made ends the session (Outlook's BYE
	// after "not connected").
	closeAfter bool
}

func (c *outlookConn) arm(f Fault) {
	c.mu.Lock()
	c.fault, c.armed = f, true
	c.mu.Unlock()
}

// go-imap's lines that Outlook words otherwise.
var (
	capabilityOK   = regexp.MustCompile(`^(\S+) OK \[CAPABILITY [^\]]*\] .*$`)
	capabilityLine = regexp.MustCompile(`^\* CAPABILITY .*$`)
	tagged         = regexp.MustCompile(`^[^*+ ]\S* OK `)
)

// outlookTexts rewrites the whole lines of p (those that start at p's
// start or after a CRLF in it, and end in one) as Outlook words them.
func (c *outlookConn) outlookTexts(p []byte, greeted, loggedIn bool) []byte {
	var out []byte
	for len(p) > 0 {
		i := bytes.Index(p, []byte("\r\n"))
		if i < 0 {
			return append(out, p...)
		}
		line := string(p[:i])
		switch {
		case !greeted && strings.HasPrefix(line, "* OK"):
			line, greeted = Greeting(c.nameTag), true
		case capabilityLine.MatchString(line) && loggedIn:
			line = "* CAPABILITY " + CapsAfterLogin
		case capabilityLine.MatchString(line):
			line = "* CAPABILITY " + CapsBeforeLogin
		case capabilityOK.MatchString(line):
			line = capabilityOK.ReplaceAllString(line, "$1 OK AUTHENTICATE completed.")
		case line == "+ idling":
			line = "+ IDLE accepted, awaiting DONE command."
		case line == "* BYE Logging out":
			line = "* BYE Microsoft Exchange Server IMAP4 server signing off."
		case tagged.MatchString(line) && strings.HasSuffix(line, " completed"):
			line += "." // "A2 OK SELECT completed."
		case strings.HasSuffix(line, " BAD "+notConnectedText):
			line += "\r\n* BYE Connection closed. 14"
			c.closeAfter = true
		}
		out = append(append(out, line...), "\r\n"...)
		p = p[i+2:]
	}
	return out
}

func (c *outlookConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	greeted, f, armed := c.greeted, c.fault, c.armed
	c.greeted = true
	c.mu.Unlock()
	n := len(p)
	if !greeted || n <= 8<<10 { // a large write is a literal's data
		p = c.outlookTexts(p, greeted, armed)
	}
	if armed && f.Stall {
		return n, nil // swallowed: the client waits for ever
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
	if _, err := c.Conn.Write(p); err != nil {
		return 0, err
	}
	if c.closeAfter {
		c.Conn.Close()
	}
	return n, nil
}
