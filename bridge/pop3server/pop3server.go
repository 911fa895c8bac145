// Package pop3server is the POP3 side: the bridge answers the
// AUTHORIZATION state itself (USER/PASS, AUTH PLAIN and LOGIN through the
// same SASL servers as SMTP, STLS), then logs in to Outlook with XOAUTH2
// and relays every command and answer byte for byte, multi-line answers
// streamed with backpressure. Failures become POP3 replies in one place.
//
// It may import bridge/account, bridge/admin, bridge/config,
// bridge/conntrack, bridge/failure and upstream.
package pop3server

import (
	"bufio"
	"bytes"
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
	"unicode"

	"github.com/rs/zerolog"

	"mailbridge/bridge/account"
	"mailbridge/bridge/admin"
	"mailbridge/bridge/config"
	"mailbridge/bridge/conntrack"
	"mailbridge/bridge/failure"
	"mailbridge/upstream"
)

// maxCommand bounds a client's command line (RFC 2449 §4 allows 255
// octets; AUTH responses are longer).
const maxCommand = 1024

// capabilities is the bridge's own CAPA answer before login (RFC 2449).
var capabilities = []string{"USER", "UIDL", "TOP", "RESP-CODES", "AUTH-RESP-CODE", "SASL PLAIN LOGIN"}

// Options are what the POP3 server needs.
type Options struct {
	Config config.ProxyConfig
	// TLS is the STLS (and implicit TLS) configuration; nil offers no STLS.
	TLS *tls.Config
	// TLSFailed, if set, is told of an STLS handshake that failed.
	TLSFailed func(remote string, err error)
	Accounts  *account.Registry
	Conns     *conntrack.Tracker
	Metrics   *admin.Metrics
	Log       zerolog.Logger
	// Context is the parent of every session's context.
	Context context.Context
}

// Server is the POP3 server.
type Server struct {
	opts  Options
	log   zerolog.Logger
	slots chan struct{}
	conntrack.Sessions
}

// New returns the POP3 server of opts; Serve it on each listener.
func New(opts Options) *Server {
	return &Server{opts: opts, log: opts.Log.With().Str("proto", "pop3").Logger(), slots: make(chan struct{}, max(opts.Config.MaxSessions, 1))}
}

// LimitListener wraps ln so that connections over pop3.max_sessions are
// refused with -ERR [SYS/TEMP], once evict (if set) found no connection to
// close that had not logged in.
func (srv *Server) LimitListener(ln net.Listener, evict func() bool) net.Listener {
	return &conntrack.LimitListener{Listener: ln, Slots: srv.slots, Refusal: "-ERR [SYS/TEMP] Too many POP3 sessions, try again later\r\n",
		Key: "pop3.max_sessions", Log: srv.log, Evict: evict}
}

// Serve accepts POP3 clients on ln until it is closed.
func (srv *Server) Serve(ln net.Listener) {
	srv.Sessions.Serve(ln, srv.log, func(c net.Conn) { srv.newSession(c).serve() })
}

// session is one POP3 client: answered by the bridge until it logs in,
// then proxied to Outlook command by command.
type session struct {
	srv     *Server
	conn    net.Conn
	state   *conntrack.State
	r       *bufio.Reader
	w       *bufio.Writer
	ctx     context.Context
	cancel  context.CancelFunc
	log     zerolog.Logger
	remote  string
	started time.Time

	isTLS   bool   // implicit TLS, or after STLS
	user    string // from USER
	account *account.Account
	up      *upstream.POP3Conn
	upMore  func() bool // whether Outlook's bytes wait unread in the socket

	commands, retrCount, deleCount int
	retrBytes                      int64
	ended                          string
}

func (srv *Server) newSession(c net.Conn) *session {
	ctx, cancel := context.WithCancel(srv.opts.Context)
	remote := c.RemoteAddr().String()
	_, isTLS := c.(*tls.Conn)
	return &session{
		isTLS: isTLS,
		srv:   srv, conn: c, state: srv.opts.Conns.StateOf(c), ctx: ctx, cancel: cancel, remote: remote, started: time.Now(),
		r: bufio.NewReaderSize(c, 4096),
		// A small writer before login (a connection that has not logged
		// in costs a few kilobytes); multi-line answers bypass it.
		w:   bufio.NewWriterSize(c, 512),
		log: srv.log.With().Str("session", conntrack.SessionID()).Str("remote", remote).Logger(),
	}
}

func (s *session) serve() {
	defer s.finish()
	s.log.Info().Msg("session started")
	s.srv.opts.Metrics.SessionStarted("pop3")
	if s.reply("+OK mailbridge POP3 ready") != nil {
		s.ended = "client gone"
		return
	}
	for s.ended == "" {
		line, err := s.readCommand()
		if err != nil {
			s.ended = s.readFailure(err)
			return
		}
		s.commands++
		if s.up == nil {
			s.authorization(line)
		} else {
			s.transaction(line)
		}
	}
}

func (s *session) finish() {
	if s.up != nil {
		s.up.Conn.Close() // without QUIT: Outlook commits no deletion
	}
	s.conn.Close()
	s.cancel()
	ev := s.log.Info()
	if s.account != nil {
		ev = ev.Str("upstream", s.account.Config.POP3Upstream)
	}
	ev.Int("commands", s.commands).Int("retr_count", s.retrCount).Int64("retr_bytes", s.retrBytes).
		Int("dele_count", s.deleCount).Int64("duration_ms", time.Since(s.started).Milliseconds()).
		Str("ended", s.ended).Msg("session ended")
}

func (s *session) readFailure(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, errCommandTooLong):
		s.reply("-ERR Command line too long")
		return "command line too long"
	case errors.As(err, &ne) && ne.Timeout():
		s.reply("-ERR [SYS/TEMP] Idle timeout, closing")
		return "client idle timeout"
	case s.ctx.Err() != nil:
		return "bridge shutting down"
	}
	return "client gone"
}

var errCommandTooLong = errors.New("command line too long")

// readCommand reads one command line from the client, without its line
// ending, waiting at most the idle timeout.
func (s *session) readCommand() (string, error) {
	s.conn.SetReadDeadline(time.Now().Add(s.srv.opts.Config.IdleTimeout.Duration))
	line, err := s.r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) || len(line) > maxCommand+2 {
		return "", errCommandTooLong
	}
	if err != nil {
		return "", err
	}
	return string(bytes.TrimRight(line, "\r\n")), nil
}

// reply writes answer lines to the client.
func (s *session) reply(lines ...string) error {
	s.conn.SetWriteDeadline(time.Now().Add(time.Minute))
	for _, l := range lines {
		s.w.WriteString(l)
		s.w.WriteString("\r\n")
	}
	return s.w.Flush()
}

// authorization serves the bridge's own AUTHORIZATION state (RFC 1939 §4).
func (s *session) authorization(line string) {
	cmd, arg := s.parseCommand(line)
	tlsConfig := s.srv.opts.TLS
	if !s.isTLS && !s.srv.opts.Config.PlaintextAuthAllowed(s.srv.opts.Config.Listen) && (cmd == "USER" || cmd == "PASS" || cmd == "AUTH") {
		s.reply("-ERR [AUTH] TLS required: send STLS first")
		return
	}
	switch cmd {
	case "CAPA":
		caps := capabilities
		if tlsConfig != nil && !s.isTLS {
			caps = append(slices.Clone(caps), "STLS")
		}
		s.reply(slices.Concat([]string{"+OK Capability list follows"}, caps, []string{"."})...)
	case "STLS":
		if tlsConfig == nil || s.isTLS {
			s.reply("-ERR STLS not available")
			return
		}
		if s.r.Buffered() > 0 {
			s.reply("-ERR Nothing may follow STLS before the TLS negotiation")
			return
		}
		if s.reply("+OK Begin TLS negotiation") != nil {
			s.ended = "client gone"
			return
		}
		// RFC 2595 §4: a new TLS session, and the client starts over
		// (a USER given before it is forgotten).
		tc := tls.Server(s.conn, tlsConfig)
		tc.SetDeadline(time.Now().Add(30 * time.Second))
		if err := tc.Handshake(); err != nil {
			if s.srv.opts.TLSFailed != nil {
				s.srv.opts.TLSFailed(s.remote, err)
			} else {
				s.log.Warn().Err(err).Msg("STLS handshake failed")
			}
			s.ended = "TLS handshake failed"
			return
		}
		tc.SetDeadline(time.Time{})
		s.conn, s.isTLS, s.user = tc, true, ""
		s.r.Reset(tc)
		s.w.Reset(tc)
	case "USER":
		if arg == "" {
			s.reply("-ERR USER needs a user name")
			return
		}
		s.user = arg
		s.reply("+OK Send PASS")
	case "PASS":
		if s.user == "" {
			s.reply("-ERR Send USER first")
			return
		}
		user := s.user
		s.user = ""
		s.login(user, arg)
	case "AUTH":
		s.auth(arg)
	case "QUIT":
		s.reply("+OK mailbridge POP3 server signing off")
		s.ended = "quit"
	default:
		s.reply("-ERR Command not valid before login")
	}
}

// auth serves AUTH PLAIN and AUTH LOGIN (RFC 5034), with or without an
// initial response, and AUTH alone listing the mechanisms. The exchange is
// driven by the same SASL servers as SMTP's.
func (s *session) auth(arg string) {
	fields := strings.Fields(arg)
	if len(fields) > 2 {
		s.reply("-ERR AUTH takes a mechanism and at most an initial response")
		return
	}
	if len(fields) == 0 {
		s.reply("+OK", "PLAIN", "LOGIN", ".")
		return
	}
	var user, pass string
	var authed bool
	credentials := func(username, password string) error {
		user, pass, authed = username, password, true
		return nil
	}
	server := account.NewSASLServer(fields[0], credentials)
	if server == nil {
		s.reply("-ERR Unsupported authentication mechanism")
		return
	}
	var response []byte
	if len(fields) == 2 {
		if fields[1] == "=" { // RFC 5034 §4: an empty initial response
			response = []byte{}
		} else if b, err := base64.StdEncoding.DecodeString(fields[1]); err == nil {
			response = b
		} else {
			s.reply("-ERR Invalid base64 data")
			return
		}
	}
	for {
		challenge, done, err := server.Next(response)
		if err != nil {
			s.log.Warn().Msg("authentication failed: malformed SASL response")
			s.reply("-ERR [AUTH] Authentication failed")
			return
		}
		if done {
			break
		}
		if s.reply("+ "+base64.StdEncoding.EncodeToString(challenge)) != nil {
			s.ended = "client gone"
			return
		}
		line, err := s.readCommand()
		if err != nil {
			s.ended = s.readFailure(err)
			return
		}
		if line == "*" {
			s.reply("-ERR Authentication cancelled")
			return
		}
		if response, err = base64.StdEncoding.DecodeString(line); err != nil {
			s.reply("-ERR Invalid base64 data")
			return
		}
	}
	if authed {
		s.login(user, pass)
	}
}

// parseCommand splits a command line at the first run of white space and
// logs it at debug level: for PASS, AUTH and APOP only the verb, whatever
// the state, so that no password reaches the log.
func (s *session) parseCommand(line string) (cmd, arg string) {
	i := strings.IndexFunc(line, unicode.IsSpace)
	if i < 0 {
		cmd = line
	} else {
		cmd, arg = line[:i], strings.TrimLeftFunc(line[i:], unicode.IsSpace)
	}
	cmd = strings.ToUpper(cmd)
	switch cmd {
	case "PASS", "AUTH", "APOP":
		s.log.Debug().Str("command", cmd).Msg("command")
	default:
		s.log.Debug().Str("command", cmd).Str("arg", conntrack.Clip(arg)).Msg("command")
	}
	return cmd, arg
}

// login checks the local password, then opens the session with Outlook
// for the account's mailbox. The client is told +OK only when Outlook
// accepted the login.
func (s *session) login(username, password string) {
	ip, _, _ := net.SplitHostPort(s.remote)
	a, err := s.srv.opts.Accounts.Authenticate(s.ctx, "pop3", ip, username, password)
	if errors.Is(err, account.ErrTooManyGuesses) {
		s.reply("-ERR [SYS/TEMP] Too many logins waiting for this account, try again later")
		return
	}
	if err != nil {
		if s.state.LoginFailed(s.log, username, account.RefusalDelay(err)) {
			s.reply("-ERR [AUTH] Too many failed logins, closing connection")
			s.ended = "too many failed logins"
			return
		}
		s.reply("-ERR [AUTH] Authentication failed")
		return
	}
	s.account = a
	s.state.MarkAuthenticated()
	s.w.Flush()
	s.w = bufio.NewWriterSize(s.conn, 4<<10)
	s.log = s.log.With().Str("account", a.Config.Name).Logger()
	s.state.SetBusy(true)
	defer s.state.SetBusy(false)
	up, f, err := account.OpenMailbox(s.ctx, a, "pop3", s.srv.opts.Config.UpstreamTimeout.Duration, s.log, a.POP3Dialer.Dial,
		func(c *upstream.POP3Conn) string { return c.Greeting })
	if err != nil {
		s.reply(replyFor(f))
		s.account = nil
		return
	}
	s.up = up
	s.upMore = upstream.MoreArriving(up.Conn)
	// A bridge shutting down ends a session that waits on Outlook.
	context.AfterFunc(s.ctx, func() { up.Conn.Close() })
	s.srv.opts.Metrics.MailboxEvent(a.Config.Name, "pop3", "login")
	s.reply(up.AuthReply)
}

// replyFor is the one place where an upstream login failure becomes the
// client's -ERR line (RFC 3206 response codes).
func replyFor(f failure.Failure) string {
	switch {
	case f.Upstream == "pop3":
		return "-ERR [SYS/TEMP] Outlook refused the bridge's login to this mailbox; the administrator must fix it, see the bridge's log"
	case f.Upstream == "token" && f.Kind == failure.Credentials:
		return "-ERR [SYS/TEMP] Microsoft 365 refused the bridge's sign-in; the administrator must fix the app registration, see the bridge's log"
	case f.Upstream == "token":
		return "-ERR [SYS/TEMP] Microsoft sign-in is unavailable, try again later"
	}
	return "-ERR [SYS/TEMP] Outlook's POP3 service could not be reached, try again later"
}

// transaction proxies one command of the TRANSACTION state to Outlook and
// streams its answer back, byte for byte.
func (s *session) transaction(line string) {
	cmd, arg := s.parseCommand(line)
	switch cmd {
	case "USER", "PASS", "AUTH", "APOP", "STLS":
		s.reply("-ERR Command not valid after login")
		return
	}
	s.state.SetBusy(true)
	defer s.state.SetBusy(false)
	up := s.up
	deadline := func() { up.Conn.SetDeadline(time.Now().Add(s.srv.opts.Config.UpstreamTimeout.Duration)) }
	deadline()
	if _, err := io.WriteString(up.Conn, line+"\r\n"); err != nil {
		s.upstreamFailed(err)
		return
	}
	status, err := up.Reader.ReadSlice('\n')
	if err != nil {
		s.upstreamFailed(err)
		return
	}
	ok := bytes.HasPrefix(status, []byte("+OK"))
	if !ok || !isMultiline(cmd, arg) {
		s.conn.SetWriteDeadline(time.Now().Add(time.Minute))
		if _, err := s.w.Write(status); err != nil {
			s.ended = "client gone"
			return
		}
	} else {
		// The status line and the body go straight to the connection
		// (s.w is empty between commands).
		w := &deadlineWriter{w: s.conn, conn: s.conn, timeout: time.Minute}
		n, err := copyMultiline(w, status, up.Reader, s.upMore, deadline, renewEvery(s.srv.opts.Config.UpstreamTimeout.Duration))
		if cmd == "RETR" {
			s.retrCount++
			s.retrBytes += n
			s.srv.opts.Metrics.RetrBytes(s.account.Config.Name, n)
			if err == nil {
				s.srv.opts.Metrics.MailboxEvent(s.account.Config.Name, "pop3", "download")
			}
		}
		if err != nil {
			if errors.Is(err, errClientWrite) {
				s.ended = "client gone"
			} else {
				s.upstreamFailed(err)
			}
			return
		}
	}
	s.conn.SetWriteDeadline(time.Now().Add(time.Minute))
	if err := s.w.Flush(); err != nil {
		s.ended = "client gone"
		return
	}
	switch {
	case cmd == "DELE" && ok:
		s.deleCount++
	case cmd == "QUIT":
		up.Conn.Close()
		s.up = nil
		s.ended = "quit"
	}
}

// upstreamFailed ends the session when Outlook's connection fails: the
// client's connection is closed without an answer, so it never takes a
// deletion for committed that Outlook did not commit.
func (s *session) upstreamFailed(err error) {
	s.log.Error().Err(err).Str("upstream", s.account.Config.POP3Upstream).Msg("upstream connection failed: closing the client's connection")
	s.ended = "upstream failed"
}

// isMultiline reports whether a successful answer to cmd has more lines
// (RFC 1939 §5, RFC 2449 §5, RFC 6856 for LANG).
func isMultiline(cmd, arg string) bool {
	switch cmd {
	case "RETR", "TOP", "CAPA":
		return true
	case "LIST", "UIDL", "LANG":
		return strings.TrimSpace(arg) == ""
	}
	return false
}

var errClientWrite = errors.New("writing to the client failed")

// renewEvery is how often, at most, a transfer moves a deadline of d on: a
// clock read per chunk is cheap, moving a deadline (a runtime timer) for
// each TLS record of a large download is not. A deadline so never lapses
// before three quarters of d of silence.
func renewEvery(d time.Duration) time.Duration { return min(time.Second, d/4) }

// deadlineWriter renews the client's write deadline (at most every
// renewEvery), so that a slow but live client is never cut off while a
// dead one is.
type deadlineWriter struct {
	w       io.Writer
	conn    net.Conn
	timeout time.Duration
	renewed time.Time
}

func (d *deadlineWriter) Write(p []byte) (int, error) {
	if now := time.Now(); now.Sub(d.renewed) >= renewEvery(d.timeout) {
		d.conn.SetWriteDeadline(now.Add(d.timeout))
		d.renewed = now
	}
	n, err := d.w.Write(p)
	if err != nil {
		return n, fmt.Errorf("%w: %v", errClientWrite, err)
	}
	return n, nil
}

// indexTerminator returns the index of the first CRLF "." CRLF in b, or
// -1. It looks for the dot, the rarest of the five bytes in mail (base64
// has none), where bytes.Index would stop at every line's CR.
func indexTerminator(b []byte) int {
	for i := 2; i+3 <= len(b); i++ {
		j := bytes.IndexByte(b[i:len(b)-2], '.')
		if j < 0 {
			return -1
		}
		i += j
		if b[i-2] == '\r' && b[i-1] == '\n' && b[i+1] == '\r' && b[i+2] == '\n' {
			return i - 2
		}
	}
	return -1
}

// copyMultiline writes head (the answer's status line), then the body of
// a multi-line answer from src, to dst as it arrives, up to and including
// the terminating ".CRLF" line (RFC 1939 §3), and returns the body's bytes.
// Nothing is changed: dot-stuffing, lines of any length, 8-bit bytes and
// bare CR or LF pass as they are; only CRLF ends a line, so the answer ends
// at the first CRLF "." CRLF (or at a body that starts with "." CRLF).
// renew is called before the first read from src, then at most every
// renewal.
//
// Writes follow what arrives. A large read (a full TLS record, 16 KiB) is
// written as it is, from src's buffer without a copy. Small ones (a server
// that sends a TLS record per line) are gathered, up to 64 KiB, while more
// has arrived (more reports bytes received and not read yet); once src and
// the socket hold nothing more, what was gathered is written before the
// copy waits for Outlook again, so a slow Outlook's bytes are never held
// back. head goes with the first bytes of the body.
func copyMultiline(dst io.Writer, head []byte, src *bufio.Reader, more func() bool, renew func(), renewal time.Duration) (int64, error) {
	const (
		gatherUpTo = 64 << 10 // the most written at once from small reads
		largeRead  = 8 << 10  // a read this large is written on its own
	)
	terminator := []byte("\r\n.\r\n")
	// last holds the final bytes seen so far, to find a terminator split
	// across reads; it starts as CRLF: the body starts at a line start.
	last := []byte("\r\n")
	var total int64
	var renewed time.Time
	// pending is what was read and not written yet: first a copy of head,
	// as src's buffer (which head may be a slice of) is about to be refilled.
	pending := append(make([]byte, 0, len(head)+4<<10), head...)
	for {
		if now := time.Now(); now.Sub(renewed) >= renewal {
			renew()
			renewed = now
		}
		if src.Buffered() == 0 && len(pending) > 0 && !more() {
			// Outlook has sent nothing more yet: what is here goes now.
			if _, err := dst.Write(pending); err != nil {
				return total, err
			}
			pending = pending[:0]
		}
		if _, err := src.Peek(1); err != nil {
			return total, err
		}
		chunk, _ := src.Peek(src.Buffered())
		end := -1 // index in chunk of the terminator's final LF
		// A terminator that began in an earlier chunk.
		head := chunk[:min(len(chunk), len(terminator)-1)]
		window := append(append(make([]byte, 0, 2*len(terminator)), last...), head...)
		if i := bytes.Index(window, terminator); i >= 0 {
			end = i + len(terminator) - len(last) - 1
		} else if i := indexTerminator(chunk); i >= 0 {
			end = i + len(terminator) - 1
		}
		n := len(chunk)
		if end >= 0 {
			n = end + 1
		}
		data := chunk[:n]
		var err error
		if len(pending) > 0 && len(pending)+len(data) > gatherUpTo {
			_, err = dst.Write(pending)
			pending = pending[:0]
		}
		switch {
		case err != nil:
		case len(pending) == 0 && len(data) >= largeRead:
			_, err = dst.Write(data)
		default:
			pending = append(pending, data...)
			if end >= 0 {
				_, err = dst.Write(pending)
				pending = pending[:0]
			}
		}
		total += int64(n)
		if len(chunk) >= len(terminator)-1 {
			last = append(last[:0], chunk[len(chunk)-(len(terminator)-1):]...)
		} else {
			last = append(last, chunk...)
			last = last[max(0, len(last)-(len(terminator)-1)):]
		}
		src.Discard(n)
		if err != nil {
			return total, err
		}
		if end >= 0 {
			return total, nil
		}
	}
}
