package bridge

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

	"github.com/rs/zerolog"

	"mailbridge/upstream"
)

// MailboxDialer opens a logged-in POP3 session with Outlook for mailbox.
// Refusals of the login are *upstream.POP3AuthError. *upstream.POP3Dialer
// is the real one.
type MailboxDialer interface {
	Dial(ctx context.Context, mailbox, token string) (*upstream.POP3Conn, error)
}

// maxPOP3Command bounds a client's command line (RFC 2449 §4 allows 255
// octets; AUTH responses are longer).
const maxPOP3Command = 1024

// pop3Capabilities is the bridge's own CAPA answer before login (RFC 2449).
var pop3Capabilities = []string{"USER", "UIDL", "TOP", "RESP-CODES", "AUTH-RESP-CODE", "SASL PLAIN LOGIN"}

// servePOP3 accepts POP3 clients until ln is closed.
func (b *Bridge) servePOP3(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				b.log.Error().Err(err).Str("proto", "pop3").Msg("pop3 listener stopped")
			}
			return
		}
		select {
		case b.pop3Slots <- struct{}{}:
		default:
			b.log.Warn().Str("proto", "pop3").Str("remote", c.RemoteAddr().String()).Int("max_sessions", cap(b.pop3Slots)).Msg("session refused: pop3.max_sessions reached")
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(c, "-ERR [SYS/TEMP] Too many POP3 sessions, try again later\r\n")
			c.Close()
			continue
		}
		b.pop3Wg.Add(1)
		go func() {
			defer b.pop3Wg.Done()
			defer func() { <-b.pop3Slots }()
			s := b.newPOP3Session(c)
			s.serve()
		}()
	}
}

// pop3Session is one POP3 client: answered by the bridge until it logs in,
// then proxied to Outlook command by command.
type pop3Session struct {
	bridge  *Bridge
	conn    net.Conn
	state   *connState
	r       *bufio.Reader
	w       *bufio.Writer
	ctx     context.Context
	cancel  context.CancelFunc
	log     zerolog.Logger
	remote  string
	started time.Time

	isTLS   bool   // implicit TLS, or after STLS
	user    string // from USER
	account *Account
	up      *upstream.POP3Conn

	commands, retrCount, deleCount int
	retrBytes                      int64
	ended                          string
}

func (b *Bridge) newPOP3Session(c net.Conn) *pop3Session {
	ctx, cancel := context.WithCancel(b.baseCtx)
	remote := c.RemoteAddr().String()
	_, isTLS := c.(*tls.Conn)
	return &pop3Session{
		isTLS:  isTLS,
		bridge: b, conn: c, state: b.conns.state(c), ctx: ctx, cancel: cancel, remote: remote, started: time.Now(),
		r:   bufio.NewReaderSize(c, 4096),
		w:   bufio.NewWriterSize(c, 64<<10),
		log: b.log.With().Str("proto", "pop3").Str("session", newSessionID()).Str("remote", remote).Logger(),
	}
}

func (s *pop3Session) serve() {
	defer s.finish()
	s.log.Info().Msg("session started")
	s.bridge.metrics.sessions.WithLabelValues("pop3").Inc()
	s.bridge.metrics.activeSessions.WithLabelValues("pop3").Inc()
	defer s.bridge.metrics.activeSessions.WithLabelValues("pop3").Dec()
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

func (s *pop3Session) finish() {
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

func (s *pop3Session) readFailure(err error) string {
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
func (s *pop3Session) readCommand() (string, error) {
	s.conn.SetReadDeadline(time.Now().Add(s.bridge.cfg.POP3.IdleTimeout.Duration))
	line, err := s.r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) || len(line) > maxPOP3Command+2 {
		return "", errCommandTooLong
	}
	if err != nil {
		return "", err
	}
	return string(bytes.TrimRight(line, "\r\n")), nil
}

// reply writes answer lines to the client.
func (s *pop3Session) reply(lines ...string) error {
	s.conn.SetWriteDeadline(time.Now().Add(time.Minute))
	for _, l := range lines {
		s.w.WriteString(l)
		s.w.WriteString("\r\n")
	}
	return s.w.Flush()
}

// authorization serves the bridge's own AUTHORIZATION state (RFC 1939 §4).
func (s *pop3Session) authorization(line string) {
	cmd, arg, _ := strings.Cut(line, " ")
	cmd = strings.ToUpper(cmd)
	if cmd == "PASS" || cmd == "AUTH" {
		s.log.Debug().Str("command", cmd).Msg("command")
	} else {
		s.log.Debug().Str("command", cmd).Str("arg", arg).Msg("command")
	}
	tlsConfig := s.bridge.cfg.POP3.TLSConfig()
	if !s.isTLS && !s.bridge.cfg.POP3.plaintextAuthAllowed(s.bridge.cfg.POP3.Listen) && (cmd == "USER" || cmd == "PASS" || cmd == "AUTH") {
		s.reply("-ERR [AUTH] TLS required: send STLS first")
		return
	}
	switch cmd {
	case "CAPA":
		caps := pop3Capabilities
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
			s.log.Warn().Err(err).Msg("STLS handshake failed")
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
// initial response, and AUTH alone listing the mechanisms.
func (s *pop3Session) auth(arg string) {
	fields := strings.Fields(arg)
	if len(fields) > 2 {
		s.reply("-ERR AUTH takes a mechanism and at most an initial response")
		return
	}
	var mech, ir string
	if len(fields) > 0 {
		mech = strings.ToUpper(fields[0])
	}
	hasIR := len(fields) == 2
	if hasIR {
		ir = fields[1]
	}
	next := func(prompt string) ([]byte, bool) {
		if s.reply("+ "+prompt) != nil {
			s.ended = "client gone"
			return nil, false
		}
		line, err := s.readCommand()
		if err != nil {
			s.ended = s.readFailure(err)
			return nil, false
		}
		if line == "*" {
			s.reply("-ERR Authentication cancelled")
			return nil, false
		}
		b, err := base64.StdEncoding.DecodeString(line)
		if err != nil {
			s.reply("-ERR Invalid base64 data")
			return nil, false
		}
		return b, true
	}
	first := func(prompt string) ([]byte, bool) {
		if !hasIR {
			return next(prompt)
		}
		if ir == "=" {
			return []byte{}, true
		}
		b, err := base64.StdEncoding.DecodeString(ir)
		if err != nil {
			s.reply("-ERR Invalid base64 data")
			return nil, false
		}
		return b, true
	}
	switch mech {
	case "":
		s.reply("+OK", "PLAIN", "LOGIN", ".")
	case "PLAIN":
		resp, ok := first("")
		if !ok {
			return
		}
		parts := bytes.Split(resp, []byte{0})
		if len(parts) != 3 || (len(parts[0]) > 0 && !bytes.Equal(parts[0], parts[1])) {
			s.reply("-ERR [AUTH] Authentication failed")
			return
		}
		s.login(string(parts[1]), string(parts[2]))
	case "LOGIN":
		user, ok := first(base64.StdEncoding.EncodeToString([]byte("Username:")))
		if !ok {
			return
		}
		pass, ok := next(base64.StdEncoding.EncodeToString([]byte("Password:")))
		if !ok {
			return
		}
		s.login(string(user), string(pass))
	default:
		s.reply("-ERR Unsupported authentication mechanism")
	}
}

// login checks the local password, then opens the session with Outlook
// for the account's mailbox. The client is told +OK only when Outlook
// accepted the login.
func (s *pop3Session) login(username, password string) {
	ip, _, _ := net.SplitHostPort(s.remote)
	a, err := s.bridge.authenticate(s.ctx, "pop3", ip, username, password)
	if err != nil {
		s.log.Warn().Str("username", username).Msg("authentication failed: unknown user name or wrong password")
		s.reply("-ERR [AUTH] Authentication failed")
		return
	}
	s.account = a
	s.log = s.log.With().Str("account", a.Config.Name).Logger()
	s.state.setBusy(true)
	defer s.state.setBusy(false)
	ctx, cancel := context.WithTimeout(s.ctx, s.bridge.cfg.POP3.UpstreamTimeout.Duration)
	defer cancel()
	start := time.Now()
	token, err := a.POP3Tokens.Token(ctx)
	var up *upstream.POP3Conn
	if err == nil {
		up, err = a.POP3Dialer.Dial(ctx, a.Config.POP3Mailbox, token)
	}
	if err != nil {
		ev := s.log.Error().Err(err).Str("mailbox", a.Config.POP3Mailbox).Str("upstream", a.Config.POP3Upstream).Str("hint", pop3Hint(err, token))
		ev.Int64("duration_ms", time.Since(start).Milliseconds()).Msg("upstream login failed")
		s.reply(pop3Reply(err))
		s.account = nil
		return
	}
	s.up = up
	s.log.Info().Str("mailbox", a.Config.POP3Mailbox).Str("upstream", a.Config.POP3Upstream).Str("greeting", up.Greeting).
		Int64("duration_ms", time.Since(start).Milliseconds()).Msg("logged in upstream")
	s.reply(up.AuthReply)
}

// pop3Hint explains a failed login to Outlook's POP3 service for the log
// and for `check`; token is the one the login used ("" if none was had).
func pop3Hint(err error, token string) string {
	var authErr *upstream.POP3AuthError
	if errors.As(err, &authErr) {
		if roles, ok := upstream.TokenRoles(token); ok && !slices.Contains(roles, "POP.AccessAsApp") {
			return roleHint("POP.AccessAsApp", "Office 365 Exchange Online")
		}
		return authErr.Hint()
	}
	var tokErr *upstream.TokenError
	if errors.As(err, &tokErr) {
		return tokErr.Hint()
	}
	return "Outlook's POP3 service could not be reached: check the network, firewall (port 995) and DNS, and pop3.upstream"
}

// pop3Reply is the one place where an upstream login failure becomes the
// client's -ERR line (RFC 3206 response codes).
func pop3Reply(err error) string {
	var authErr *upstream.POP3AuthError
	var tokErr *upstream.TokenError
	switch {
	case errors.As(err, &authErr):
		return "-ERR [SYS/TEMP] Outlook refused the bridge's login to this mailbox; the administrator must fix it, see the bridge's log"
	case errors.As(err, &tokErr) && !tokErr.Temporary():
		return "-ERR [SYS/TEMP] Microsoft 365 refused the bridge's sign-in; the administrator must fix the app registration, see the bridge's log"
	case errors.As(err, &tokErr):
		return "-ERR [SYS/TEMP] Microsoft sign-in is unavailable, try again later"
	}
	return "-ERR [SYS/TEMP] Outlook's POP3 service could not be reached, try again later"
}

// transaction proxies one command of the TRANSACTION state to Outlook and
// streams its answer back, byte for byte.
func (s *pop3Session) transaction(line string) {
	cmd, arg, _ := strings.Cut(line, " ")
	cmd = strings.ToUpper(cmd)
	s.log.Debug().Str("command", cmd).Str("arg", arg).Msg("command")
	switch cmd {
	case "USER", "PASS", "AUTH", "APOP", "STLS":
		s.reply("-ERR Command not valid after login")
		return
	}
	s.state.setBusy(true)
	defer s.state.setBusy(false)
	up := s.up
	deadline := func() { up.Conn.SetDeadline(time.Now().Add(s.bridge.cfg.POP3.UpstreamTimeout.Duration)) }
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
	s.conn.SetWriteDeadline(time.Now().Add(time.Minute))
	if _, err := s.w.Write(status); err != nil {
		s.ended = "client gone"
		return
	}
	ok := bytes.HasPrefix(status, []byte("+OK"))
	if ok && isMultiline(cmd, arg) {
		w := &deadlineWriter{w: s.w, conn: s.conn, timeout: time.Minute}
		n, err := copyMultiline(w, up.Reader, deadline)
		if cmd == "RETR" {
			s.retrCount++
			s.retrBytes += n
			s.bridge.metrics.retrBytes.WithLabelValues(s.account.Config.Name).Add(float64(n))
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
func (s *pop3Session) upstreamFailed(err error) {
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

// deadlineWriter renews the client's write deadline before each write, so
// that a slow but live client is never cut off while a dead one is.
type deadlineWriter struct {
	w       io.Writer
	conn    net.Conn
	timeout time.Duration
}

func (d *deadlineWriter) Write(p []byte) (int, error) {
	d.conn.SetWriteDeadline(time.Now().Add(d.timeout))
	n, err := d.w.Write(p)
	if err != nil {
		return n, fmt.Errorf("%w: %v", errClientWrite, err)
	}
	return n, nil
}

// copyMultiline copies the body of a multi-line answer from src to dst as
// it arrives, up to and including the terminating ".CRLF" line (RFC 1939
// §3), and returns the bytes copied. Nothing is changed: dot-stuffing,
// lines of any length, 8-bit bytes and bare CR or LF pass as they are; only
// CRLF ends a line, so the answer ends at the first CRLF "." CRLF (or at a
// body that starts with "." CRLF). renew is called before each read from
// src.
func copyMultiline(dst io.Writer, src *bufio.Reader, renew func()) (int64, error) {
	terminator := []byte("\r\n.\r\n")
	// last holds the final bytes seen so far, to find a terminator split
	// across reads; it starts as CRLF: the body starts at a line start.
	last := []byte("\r\n")
	var total int64
	for {
		renew()
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
		} else if i := bytes.Index(chunk, terminator); i >= 0 {
			end = i + len(terminator) - 1
		}
		n := len(chunk)
		if end >= 0 {
			n = end + 1
		}
		w, err := dst.Write(chunk[:n])
		total += int64(w)
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
