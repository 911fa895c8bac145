// Package imapserver is the IMAP side: the bridge answers the session
// itself until the client logs in (CAPABILITY, NOOP, LOGOUT, ID, STARTTLS,
// LOGIN, AUTHENTICATE PLAIN and LOGIN through the same SASL servers as SMTP
// and POP3), then logs in to Outlook with XOAUTH2 and relays every byte in
// both directions, uninterpreted: literals of any size, IDLE, COMPRESS,
// pipelined commands. Failures become IMAP replies in one place (reply).
//
// It may import bridge/account, bridge/admin, bridge/config,
// bridge/conntrack, bridge/failure and upstream.
package imapserver

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"mailbridge/bridge/account"
	"mailbridge/bridge/admin"
	"mailbridge/bridge/config"
	"mailbridge/bridge/conntrack"
	"mailbridge/bridge/failure"
	"mailbridge/upstream"
)

// Limits of the pre-login parser.
const (
	maxLine    = 8 << 10 // a command line before login
	maxLiteral = 8 << 10 // a literal before login (a user name or password)
	// maxCommand bounds a whole command before login, its lines and
	// literals together: however many literals a command chains, a
	// client that has not logged in holds at most this much.
	maxCommand  = 12 << 10
	relayBuffer = 64 << 10
)

// Options are what the IMAP server needs.
type Options struct {
	Config config.ProxyConfig
	// TLS is the STARTTLS (and implicit TLS) configuration; nil offers no
	// STARTTLS.
	TLS *tls.Config
	// TLSFailed, if set, is told of a STARTTLS handshake that failed.
	TLSFailed func(remote string, err error)
	Accounts  *account.Registry
	Conns     *conntrack.Tracker
	Metrics   *admin.Metrics
	Log       zerolog.Logger
	// Context is the parent of every session's context.
	Context context.Context
}

// Server is the IMAP server.
type Server struct {
	opts  Options
	log   zerolog.Logger
	slots chan struct{}
	conntrack.Sessions
}

// New returns the IMAP server of opts; Serve it on each listener.
func New(opts Options) *Server {
	return &Server{opts: opts, log: opts.Log.With().Str("proto", "imap").Logger(), slots: make(chan struct{}, max(opts.Config.MaxSessions, 1))}
}

// LimitListener wraps ln so that connections over imap.max_sessions are
// refused with BYE, once evict (if set) found no connection to close that
// had not logged in.
func (srv *Server) LimitListener(ln net.Listener, evict func() bool) net.Listener {
	return &conntrack.LimitListener{Listener: ln, Slots: srv.slots, Refusal: "* BYE [UNAVAILABLE] Too many IMAP sessions, try again later\r\n",
		Key: "imap.max_sessions", Log: srv.log, Evict: evict}
}

// Serve accepts IMAP clients on ln until it is closed.
func (srv *Server) Serve(ln net.Listener) {
	srv.Sessions.Serve(ln, srv.log, func(c net.Conn) { srv.newSession(c).serve() })
}

// session is one IMAP client: answered by the bridge until it logs in, then
// relayed to Outlook.
type session struct {
	srv     *Server
	conn    net.Conn
	state   *conntrack.State
	r       *bufio.Reader
	ctx     context.Context
	cancel  context.CancelFunc
	log     zerolog.Logger
	remote  string
	started time.Time
	isTLS   bool

	account *account.Account
	ended   string
	in, out int64 // bytes relayed: from the client, to the client
}

func (srv *Server) newSession(c net.Conn) *session {
	ctx, cancel := context.WithCancel(srv.opts.Context)
	_, isTLS := c.(*tls.Conn)
	remote := c.RemoteAddr().String()
	return &session{srv: srv, conn: c, state: srv.opts.Conns.StateOf(c), r: bufio.NewReaderSize(c, 4096), ctx: ctx, cancel: cancel,
		remote: remote, started: time.Now(), isTLS: isTLS,
		log: srv.log.With().Str("session", conntrack.SessionID()).Str("remote", remote).Logger()}
}

// capabilities is the bridge's own CAPABILITY before login.
func (s *session) capabilities() string {
	caps := []string{"IMAP4rev1"}
	if s.authAllowed() {
		caps = append(caps, "AUTH=PLAIN", "AUTH=LOGIN", "SASL-IR")
	} else {
		caps = append(caps, "LOGINDISABLED")
	}
	caps = append(caps, "ID", "LITERAL+")
	if s.srv.opts.TLS != nil && !s.isTLS {
		caps = append(caps, "STARTTLS")
	}
	return strings.Join(caps, " ")
}

// authAllowed reports whether passwords may be sent now: over TLS, on
// loopback, or where the administrator allowed plaintext.
func (s *session) authAllowed() bool {
	return s.isTLS || s.srv.opts.Config.PlaintextAuthAllowed(s.srv.opts.Config.Listen)
}

func (s *session) serve() {
	defer s.finish()
	s.log.Info().Msg("session started")
	s.srv.opts.Metrics.SessionStarted("imap")
	if s.write("* OK [CAPABILITY "+s.capabilities()+"] mailbridge IMAP ready") != nil {
		s.ended = "client gone"
		return
	}
	for s.ended == "" {
		tag, cmd, args, err := s.readCommand()
		if err != nil {
			s.ended = s.readFailure(err)
			return
		}
		if up := s.command(tag, cmd, args); up != nil {
			s.relay(up)
			return
		}
	}
}

func (s *session) finish() {
	s.conn.Close()
	s.cancel()
	ev := s.log.Info()
	if s.account != nil {
		ev = ev.Str("mailbox", s.account.Config.IMAPMailbox).Str("upstream", s.account.Config.IMAPUpstream)
	}
	ev.Int64("bytes_in", s.in).Int64("bytes_out", s.out).Int64("duration_ms", time.Since(s.started).Milliseconds()).
		Str("ended", s.ended).Msg("session ended")
}

var (
	errLineTooLong = errors.New("command line too long")
	errBadSyntax   = errors.New("bad command syntax")
)

func (s *session) readFailure(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, errLineTooLong):
		s.write("* BYE Command line too long")
		return "command line too long"
	case errors.As(err, &ne) && ne.Timeout():
		s.write("* BYE Idle timeout, closing")
		return "client idle timeout"
	case s.ctx.Err() != nil:
		s.write("* BYE The bridge is shutting down")
		return "bridge shutting down"
	}
	return "client gone"
}

func (s *session) write(lines ...string) error {
	s.conn.SetWriteDeadline(time.Now().Add(time.Minute))
	var b strings.Builder
	for _, l := range lines {
		b.WriteString(l)
		b.WriteString("\r\n")
	}
	_, err := io.WriteString(s.conn, b.String())
	return err
}

// readLine reads one line without its CRLF, waiting at most the login
// timeout's remainder or the idle timeout.
func (s *session) readLine() (string, error) {
	s.conn.SetReadDeadline(time.Now().Add(s.srv.opts.Config.IdleTimeout.Duration))
	line, err := s.r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) || len(line) > maxLine {
		return "", errLineTooLong
	}
	if err != nil {
		return "", err
	}
	return strings.TrimRight(string(line), "\r\n"), nil
}

// readCommand reads a command before login: a tag, a command name and its
// arguments as RFC 3501 §4 strings (atoms, quoted strings with escapes,
// and literals, synchronising or LITERAL+).
func (s *session) readCommand() (tag, cmd string, args []string, err error) {
	for {
		line, err := s.readLine()
		if err != nil {
			return "", "", nil, err
		}
		if strings.TrimSpace(line) == "" {
			continue
		}
		tag, rest, _ := strings.Cut(line, " ")
		name, rest, _ := strings.Cut(rest, " ")
		cmd = strings.ToUpper(name)
		args, err = s.parseArgs(rest, maxCommand-len(line))
		if errors.Is(err, errBadSyntax) {
			s.log.Debug().Str("command", cmd).Msg("command")
			s.write(tag + " BAD Invalid arguments")
			continue
		}
		if err != nil {
			return "", "", nil, err
		}
		if cmd == "LOGIN" || cmd == "AUTHENTICATE" {
			s.log.Debug().Str("command", cmd).Msg("command") // never the password
		} else {
			s.log.Debug().Str("command", cmd).Str("args", conntrack.Clip(strings.Join(args, " "))).Msg("command")
		}
		return tag, cmd, args, nil
	}
}

// parseArgs splits the rest of a command line into strings, reading the
// literals it announces (after "+ Ready" for a synchronising one); budget
// is how many more bytes the command may take (errLineTooLong past it).
func (s *session) parseArgs(rest string, budget int) ([]string, error) {
	var args []string
	for {
		rest = strings.TrimLeft(rest, " ")
		if rest == "" {
			return args, nil
		}
		switch {
		case rest[0] == '"':
			var b strings.Builder
			i := 1
			for ; i < len(rest) && rest[i] != '"'; i++ {
				if rest[i] == '\\' && i+1 < len(rest) {
					i++
				}
				b.WriteByte(rest[i])
			}
			if i >= len(rest) {
				return nil, errBadSyntax
			}
			args = append(args, b.String())
			rest = rest[i+1:]
		case rest[0] == '{' && strings.HasSuffix(rest, "}"):
			spec := strings.TrimSuffix(rest[1:], "}")
			sync := !strings.HasSuffix(spec, "+")
			spec = strings.TrimSuffix(spec, "+")
			var n int
			if _, err := fmt.Sscanf(spec, "%d", &n); err != nil || n < 0 || fmt.Sprint(n) != spec {
				return nil, errBadSyntax
			}
			if n > maxLiteral || n > budget {
				return nil, errLineTooLong
			}
			budget -= n
			if sync && s.write("+ Ready for literal data") != nil {
				return nil, io.ErrClosedPipe
			}
			buf := make([]byte, n)
			s.conn.SetReadDeadline(time.Now().Add(s.srv.opts.Config.IdleTimeout.Duration))
			if _, err := io.ReadFull(s.r, buf); err != nil {
				return nil, err
			}
			args = append(args, string(buf))
			line, err := s.readLine() // the command goes on after the literal
			if err != nil {
				return nil, err
			}
			if budget -= len(line); budget < 0 {
				return nil, errLineTooLong
			}
			rest = line
		default:
			end := strings.IndexByte(rest, ' ')
			if end < 0 {
				end = len(rest)
			}
			args = append(args, rest[:end])
			rest = rest[end:]
		}
	}
}

// command answers one command before login; it returns Outlook's session
// when the client has logged in.
func (s *session) command(tag, cmd string, args []string) *upstream.IMAPConn {
	switch cmd {
	case "CAPABILITY":
		s.write("* CAPABILITY "+s.capabilities(), tag+" OK CAPABILITY completed")
	case "NOOP":
		s.write(tag + " OK NOOP completed")
	case "LOGOUT":
		s.write("* BYE mailbridge IMAP signing off", tag+" OK LOGOUT completed")
		s.ended = "logout"
	case "ID":
		s.write(`* ID ("name" "mailbridge")`, tag+" OK ID completed")
	case "STARTTLS":
		s.startTLS(tag)
	case "LOGIN":
		if !s.authAllowed() {
			s.write(tag + " NO [PRIVACYREQUIRED] TLS required: send STARTTLS first")
			return nil
		}
		if len(args) != 2 {
			s.write(tag + " BAD LOGIN takes a user name and a password")
			return nil
		}
		return s.login(tag, args[0], args[1])
	case "AUTHENTICATE":
		if !s.authAllowed() {
			s.write(tag + " NO [PRIVACYREQUIRED] TLS required: send STARTTLS first")
			return nil
		}
		return s.authenticate(tag, args)
	default:
		s.write(tag + " BAD Command not valid before login")
	}
	return nil
}

func (s *session) startTLS(tag string) {
	cfg := s.srv.opts.TLS
	if cfg == nil || s.isTLS {
		s.write(tag + " BAD STARTTLS not available")
		return
	}
	if s.r.Buffered() > 0 {
		s.write(tag + " BAD Nothing may follow STARTTLS before the TLS negotiation")
		return
	}
	if s.write(tag+" OK Begin TLS negotiation now") != nil {
		s.ended = "client gone"
		return
	}
	tc := tls.Server(s.conn, cfg)
	tc.SetDeadline(time.Now().Add(30 * time.Second))
	if err := tc.Handshake(); err != nil {
		if s.srv.opts.TLSFailed != nil {
			s.srv.opts.TLSFailed(s.remote, err)
		}
		s.ended = "TLS handshake failed"
		return
	}
	tc.SetDeadline(time.Time{})
	s.conn, s.isTLS = tc, true
	s.r.Reset(tc)
}

// authenticate serves AUTHENTICATE PLAIN and LOGIN (RFC 3501 §6.2.2, with
// SASL-IR), through go-sasl's PLAIN server and the bridge's LOGIN server.
func (s *session) authenticate(tag string, args []string) *upstream.IMAPConn {
	if len(args) == 0 || len(args) > 2 {
		s.write(tag + " BAD AUTHENTICATE takes a mechanism and at most an initial response")
		return nil
	}
	var user, pass string
	var authed bool
	credentials := func(username, password string) error {
		user, pass, authed = username, password, true
		return nil
	}
	server := account.NewSASLServer(args[0], credentials)
	if server == nil {
		s.write(tag + " NO Unsupported authentication mechanism")
		return nil
	}
	var response []byte
	if len(args) == 2 {
		if args[1] == "=" { // RFC 4959: an empty initial response
			response = []byte{}
		} else if b, err := base64.StdEncoding.DecodeString(args[1]); err == nil {
			response = b
		} else {
			s.write(tag + " BAD Invalid base64 data")
			return nil
		}
	}
	for {
		challenge, done, err := server.Next(response)
		if err != nil {
			return s.loginFailed(tag, "", 0)
		}
		if done {
			break
		}
		if s.write("+ "+base64.StdEncoding.EncodeToString(challenge)) != nil {
			s.ended = "client gone"
			return nil
		}
		line, err := s.readLine()
		if err != nil {
			s.ended = s.readFailure(err)
			return nil
		}
		if line == "*" {
			s.write(tag + " BAD Authentication cancelled")
			return nil
		}
		if response, err = base64.StdEncoding.DecodeString(line); err != nil {
			s.write(tag + " BAD Invalid base64 data")
			return nil
		}
	}
	if !authed {
		return nil
	}
	return s.login(tag, user, pass)
}

func (s *session) loginFailed(tag, username string, delay time.Duration) *upstream.IMAPConn {
	if s.state.LoginFailed(s.log, username, delay) {
		s.write("* BYE Too many failed logins", tag+" NO [AUTHENTICATIONFAILED] Authentication failed")
		s.ended = "too many failed logins"
		return nil
	}
	s.write(tag + " NO [AUTHENTICATIONFAILED] Authentication failed")
	return nil
}

// login checks the local password, then logs in to Outlook for the
// account's mailbox; the client hears OK only when Outlook took the login.
func (s *session) login(tag, username, password string) *upstream.IMAPConn {
	ip, _, _ := net.SplitHostPort(s.remote)
	a, err := s.srv.opts.Accounts.Authenticate(s.ctx, "imap", ip, username, password)
	if errors.Is(err, account.ErrTooManyGuesses) {
		s.write(tag + " NO [UNAVAILABLE] Too many logins waiting for this account, try again later")
		return nil
	}
	if err != nil {
		return s.loginFailed(tag, username, account.RefusalDelay(err))
	}
	s.account = a
	s.state.MarkAuthenticated()
	s.log = s.log.With().Str("account", a.Config.Name).Logger()
	s.state.SetBusy(true)
	defer s.state.SetBusy(false)
	up, f, err := account.OpenMailbox(s.ctx, a, "imap", s.srv.opts.Config.UpstreamTimeout.Duration, s.log, a.IMAPDialer.Dial,
		func(c *upstream.IMAPConn) string { return c.Greeting })
	if err != nil {
		s.write(tag + " " + replyFor(f))
		s.account = nil
		return nil
	}
	if s.write(tag+" OK [CAPABILITY "+strings.Join(relayable(up.Capabilities), " ")+"] LOGIN completed") != nil {
		up.Conn.Close()
		s.ended = "client gone"
		return nil
	}
	s.srv.opts.Metrics.MailboxEvent(a.Config.Name, "imap", "login")
	return up
}

// relayable drops the capabilities that make no sense through the relay
// once logged in: logging in again (AUTH=, SASL-IR, LOGINDISABLED,
// UNAUTHENTICATE: the client's password is not Outlook's) and STARTTLS.
func relayable(caps []string) []string {
	return slices.DeleteFunc(slices.Clone(caps), func(c string) bool {
		u := strings.ToUpper(c)
		return strings.HasPrefix(u, "AUTH=") || u == "SASL-IR" || u == "LOGINDISABLED" || u == "STARTTLS" || u == "UNAUTHENTICATE"
	})
}

// replyFor is the one place where an upstream login failure becomes the
// client's tagged answer.
func replyFor(f failure.Failure) string {
	var notConnected *upstream.IMAPNotConnectedError
	switch {
	case errors.As(f.Err, &notConnected):
		return "NO [UNAVAILABLE] Outlook let the bridge in but cannot open this mailbox; the administrator must give the app FullAccess on it or turn IMAP on, see the bridge's log"
	case f.Upstream == "imap":
		return "NO [UNAVAILABLE] Outlook refused the bridge's login to this mailbox; the administrator must fix it, see the bridge's log"
	case f.Upstream == "token" && f.Kind == failure.Credentials:
		return "NO [UNAVAILABLE] Microsoft 365 refused the bridge's sign-in; the administrator must fix the app registration, see the bridge's log"
	case f.Upstream == "token":
		return "NO [UNAVAILABLE] Microsoft sign-in is unavailable, try again later"
	}
	return "NO [UNAVAILABLE] Outlook's IMAP service could not be reached, try again later"
}
