// Package smtpserver is the SMTP side that legacy clients talk to: a
// go-smtp backend whose sessions log in with AUTH PLAIN or LOGIN, check the
// sender against the account's allow-list (MAIL FROM, From:, Sender:),
// spool the message, add envelope-only recipients as Bcc, and hand it to a
// deliver.Submitter (direct delivery or the outbox: it never knows which).
// Every failure becomes an SMTP reply in one place, reply.go.
//
// It may import bridge/account, bridge/admin, bridge/config,
// bridge/conntrack, bridge/deliver, bridge/failure and bridge/mime.
package smtpserver

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/rs/zerolog"

	"mailbridge/bridge/account"
	"mailbridge/bridge/admin"
	"mailbridge/bridge/config"
	"mailbridge/bridge/conntrack"
	"mailbridge/bridge/deliver"
	"mailbridge/bridge/failure"
	"mailbridge/bridge/mime"
	"mailbridge/upstream"
)

// Options are what the SMTP server needs.
type Options struct {
	Config config.SMTPConfig
	// TLS is the STARTTLS configuration; nil offers no STARTTLS.
	TLS      *tls.Config
	Accounts *account.Registry
	Submit   deliver.Submitter
	// Plan, if set, refuses at DATA a message that could not be sent (too
	// many Graph requests, a body over the limit without its attachments).
	Plan    func(*deliver.Message) error
	Conns   *conntrack.Tracker
	Metrics *admin.Metrics
	Log     zerolog.Logger
	// Context is the parent of every session's context: cancelling it
	// interrupts the sessions' upstream calls.
	Context context.Context
}

// Server is the SMTP server: one go-smtp server for the plain listener
// (with STARTTLS), and one for the implicit-TLS listener, whose connections
// reach it already decrypted through the guard.
type Server struct {
	*smtp.Server
	implicit *smtp.Server
	opts     Options
	log      zerolog.Logger
	recent   recentMessages
}

// New returns the SMTP server of opts; Serve it on each listener.
func New(opts Options) *Server {
	srv := &Server{opts: opts, log: opts.Log.With().Str("proto", "smtp").Logger()}
	s := smtp.NewServer(smtp.BackendFunc(srv.newSession))
	s.Domain = "mailbridge"
	s.TLSConfig = opts.TLS // STARTTLS when a certificate is configured
	// Passwords in plaintext only on loopback, unless the administrator
	// allowed it on the network; with TLS, go-smtp offers AUTH after it.
	s.AllowInsecureAuth = opts.Config.PlaintextAuthAllowed(opts.Config.Listen)
	s.MaxMessageBytes = opts.Config.MaxMessageBytes
	// MaxRecipients is enforced in Rcpt, where the refusal is logged.
	// Message lines may be as long as a message Graph takes (a client may
	// send an unwrapped base64 attachment); this bounds command lines too.
	s.MaxLineLength = upstream.MaxSendMailBody
	s.ReadTimeout = opts.Config.IdleTimeout.Duration
	s.WriteTimeout = time.Minute
	s.ErrorLog = errorLog{srv.log}
	// s.Debug is never set: it would copy AUTH lines, passwords included.
	srv.Server = s
	// The implicit-TLS listener's server: the guard sits above TLS there,
	// so go-smtp sees a connection that is already private.
	srv.implicit = smtp.NewServer(s.Backend)
	srv.implicit.Domain, srv.implicit.AllowInsecureAuth = s.Domain, true
	srv.implicit.MaxMessageBytes, srv.implicit.MaxLineLength = s.MaxMessageBytes, s.MaxLineLength
	srv.implicit.ReadTimeout, srv.implicit.WriteTimeout, srv.implicit.ErrorLog = s.ReadTimeout, s.WriteTimeout, s.ErrorLog
	return srv
}

// ServeImplicitTLS serves an implicit-TLS listener whose connections come
// through Guard (over TLS).
func (srv *Server) ServeImplicitTLS(ln net.Listener) error { return srv.implicit.Serve(ln) }

// Shutdown stops both servers, letting sessions end.
func (srv *Server) Shutdown(ctx context.Context) error {
	return errors.Join(srv.Server.Shutdown(ctx), srv.implicit.Shutdown(ctx))
}

// Close closes both servers and their sessions at once.
func (srv *Server) Close() error { return errors.Join(srv.Server.Close(), srv.implicit.Close()) }

// Guard wraps a listener so that command lines are bounded at
// MaxCommandLine and every byte of DATA reaches the session: see
// guardConn. On the implicit-TLS listener it goes above TLS (and
// ServeImplicitTLS serves it); after STARTTLS it passes bytes through.
func (srv *Server) Guard(ln net.Listener) net.Listener { return &guardListener{Listener: ln, srv: srv} }

// LimitListener wraps ln so that connections over smtp.max_sessions are
// refused with 421, once evict (if set) found no connection to close that
// had not logged in.
func (srv *Server) LimitListener(ln net.Listener, slots chan struct{}, evict func() bool) net.Listener {
	return &conntrack.LimitListener{Listener: ln, Slots: slots, Refusal: "421 4.3.2 Too many sessions, try again later\r\n",
		Key: "smtp.max_sessions", Log: srv.log, Evict: evict}
}

// errorLog passes go-smtp's internal errors to the structured log.
type errorLog struct{ log zerolog.Logger }

func (l errorLog) Printf(format string, v ...any) {
	l.log.Warn().Msg(strings.TrimSpace(fmt.Sprintf(format, v...)))
}
func (l errorLog) Println(v ...any) { l.log.Warn().Msg(strings.TrimSpace(fmt.Sprintln(v...))) }

// session is one client connection, from EHLO to QUIT.
type session struct {
	srv     *Server
	conn    *smtp.Conn
	state   *conntrack.State
	ctx     context.Context
	cancel  context.CancelFunc
	log     zerolog.Logger
	id      string
	remote  string
	started time.Time

	account *account.Account
	from    string
	rcpts   []string

	messages int
}

// go-smtp finds AUTH by a run-time type assertion: without this check a
// changed method set would silently drop it.
var _ interface {
	smtp.Session
	smtp.AuthSession
} = (*session)(nil)

func (srv *Server) newSession(c *smtp.Conn) (smtp.Session, error) {
	remote := c.Conn().RemoteAddr().String()
	ctx, cancel := context.WithCancel(srv.opts.Context)
	s := &session{
		srv:     srv,
		conn:    c,
		state:   srv.opts.Conns.StateOf(c.Conn()),
		ctx:     ctx,
		cancel:  cancel,
		id:      conntrack.SessionID(),
		remote:  remote,
		started: time.Now(),
	}
	s.log = srv.log.With().Str("session", s.id).Str("remote", remote).Logger()
	s.log.Info().Str("helo", conntrack.Clip(c.Hostname())).Msg("session started")
	srv.opts.Metrics.SessionStarted("smtp")
	return s, nil
}

// AuthMechanisms implements smtp.AuthSession.
func (s *session) AuthMechanisms() []string { return []string{sasl.Plain, sasl.Login} }

// Auth implements smtp.AuthSession.
func (s *session) Auth(mech string) (sasl.Server, error) {
	if server := account.NewSASLServer(mech, s.login); server != nil {
		return server, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

func (s *session) login(username, password string) error {
	ip, _, _ := net.SplitHostPort(s.remote)
	a, err := s.srv.opts.Accounts.Authenticate(s.ctx, "smtp", ip, username, password)
	if errors.Is(err, account.ErrTooManyGuesses) {
		return replyTooManyGuesses
	}
	if err != nil {
		if s.state.LoginFailed(s.log, username, account.RefusalDelay(err)) {
			s.state.CloseAfterNextWrite()
			return replyTooManyFailures
		}
		return smtp.ErrAuthFailed
	}
	s.account = a
	s.state.MarkAuthenticated()
	s.log = s.log.With().Str("account", a.Config.Name).Logger()
	s.log.Debug().Msg("authenticated")
	return nil
}

// Mail implements smtp.Session.
func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	if s.account == nil {
		s.log.Warn().Str("from", conntrack.Clip(from)).Msg("sender refused: MAIL FROM before AUTH")
		return replyAuthRequired
	}
	if from == "" {
		s.log.Warn().Msg("sender refused: the null sender cannot send through Graph")
		return replyNullSender
	}
	if _, _, err := mime.ParseMailbox(from); err != nil {
		s.log.Warn().Str("from", conntrack.Clip(from)).Msg("sender refused: MAIL FROM is not a well-formed address")
		return replyBadSender
	}
	if !s.account.Senders.Allows(from) {
		s.log.Warn().Str("from", conntrack.Clip(from)).Msg("sender refused: MAIL FROM is not in the account's allowed_senders")
		return replySenderNotAllowed(from, "Sender")
	}
	// A message is not taken while Microsoft refuses the account's
	// sign-in for a reason only an administrator can fix: it could only
	// wait in the outbox until max_age, and the sender would never know.
	if err := s.account.GraphTokens.LastError(); err != nil {
		if f := failure.Classify(err); f.Kind == failure.Credentials {
			s.log.Warn().Err(err).Str("from", conntrack.Clip(from)).Str("reason", string(f.Kind)).Str("hint", f.Hint).
				Msg("message refused at MAIL: Microsoft 365 refuses this account's sign-in")
			s.srv.opts.Metrics.Message(s.account.Config.Name, "refused", string(f.Kind), 0)
			return replyFor(f)
		}
	}
	if opts != nil && opts.Size > 0 {
		if limit := s.srv.opts.Config.MaxMessageBytes; opts.Size > limit {
			s.log.Warn().Str("from", conntrack.Clip(from)).Int64("size", opts.Size).Int64("limit", limit).
				Str("hint", "raise smtp.max_message_bytes if the mailbox's send limit allows").Msg("message refused at MAIL: SIZE is over smtp.max_message_bytes")
			return replyOverMaxSize(limit)
		}
		if opts.Size > upstream.MaxSendMailMIME && !s.account.Config.LargeMessages {
			s.log.Warn().Str("from", conntrack.Clip(from)).Int64("size", opts.Size).
				Str("hint", "set large_messages = true (needs Mail.ReadWrite) to send messages over 3 MB").Msg("message refused at MAIL: SIZE is over sendMail's limit and large_messages is off")
			return replyFor(failure.Classify(deliver.ErrLargeMessagesOff))
		}
	}
	s.from = from
	s.rcpts = s.rcpts[:0]
	return nil
}

// Rcpt implements smtp.Session.
func (s *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	if s.account == nil {
		s.log.Warn().Str("to", conntrack.Clip(to)).Msg("recipient refused: RCPT TO before AUTH")
		return replyAuthRequired
	}
	if _, _, err := mime.ParseMailbox(to); err != nil {
		s.log.Warn().Str("to", conntrack.Clip(to)).Msg("recipient refused: RCPT TO is not a well-formed address")
		return replyBadRecipient
	}
	for _, r := range s.rcpts {
		if strings.EqualFold(r, to) {
			return nil // the same recipient twice still receives one copy
		}
	}
	if limit := s.srv.opts.Config.MaxRecipients; len(s.rcpts) >= limit {
		s.log.Warn().Str("from", conntrack.Clip(s.from)).Str("to", conntrack.Clip(to)).Int("limit", limit).
			Str("hint", "the client sends to more recipients than smtp.max_recipients; Exchange Online allows 500 by default").Msg("recipient refused: smtp.max_recipients reached")
		return replyTooManyRecipients
	}
	s.rcpts = append(s.rcpts, to)
	return nil
}

// Reset implements smtp.Session.
func (s *session) Reset() {
	s.from = ""
	s.rcpts = s.rcpts[:0]
}

// Logout implements smtp.Session.
func (s *session) Logout() error {
	s.cancel()
	s.log.Info().Int("messages", s.messages).Int64("duration_ms", time.Since(s.started).Milliseconds()).Msg("session ended")
	return nil
}

// Data implements smtp.Session: it checks the message's sender headers,
// adds envelope-only recipients as Bcc, and hands it to the Submitter.
func (s *session) Data(r io.Reader) error {
	s.state.SetBusy(true)
	defer s.state.SetBusy(false)
	start := time.Now()
	sp := mime.NewSpool(s.srv.opts.Config.SpoolDir)
	defer sp.Close()
	// The idle timeout counts from the last bytes received, not from the
	// DATA command (conntrack.IdleListener): a slow line keeps it going.
	n, err := io.Copy(sp, r)
	if err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			if se == smtp.ErrDataTooLarge {
				s.log.Warn().Str("from", conntrack.Clip(s.from)).Int64("limit", s.srv.opts.Config.MaxMessageBytes).Msg("message refused: larger than smtp.max_message_bytes")
			}
			return se
		}
		if errors.Is(err, mime.ErrSpool) {
			f := failure.Classify(err)
			s.log.Error().Err(err).Str("reason", string(f.Kind)).Str("hint", f.Hint).Msg("message not received: cannot write the spool file")
			return replyFor(f)
		}
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			s.log.Warn().Int64("bytes", n).Dur("idle_timeout", s.srv.opts.Config.IdleTimeout.Duration).
				Msg("message not received: the client stopped sending within DATA for smtp.idle_timeout")
			return replyDataTimeout
		}
		s.log.Info().Err(err).Int64("bytes", n).Msg("message not received: client connection failed in DATA")
		return replyDataBroken
	}
	m, clientID, err := s.prepare(sp)
	if err != nil {
		return err
	}
	size := m.Size()
	if size > upstream.MaxSendMailMIME && !s.account.Config.LargeMessages {
		s.log.Warn().Str("from", conntrack.Clip(s.from)).Int64("bytes", size).Msg("message refused: over sendMail's limit and large_messages is off")
		return replyFor(failure.Classify(deliver.ErrLargeMessagesOff))
	}
	if plan := s.srv.opts.Plan; plan != nil {
		if err := plan(m); err != nil {
			f := failure.Classify(err)
			s.log.Warn().Err(err).Str("from", conntrack.Clip(s.from)).Int64("bytes", size).Str("reason", string(f.Kind)).Msg("message refused at DATA: it cannot be sent through Graph")
			s.srv.opts.Metrics.Message(s.account.Config.Name, "refused", string(f.Kind), size)
			return replyFor(f)
		}
	}
	receipt, err := s.srv.opts.Submit.Submit(s.ctx, m, s.log)
	s.messages++
	if err == nil || receipt.OutcomeUnknown {
		s.srv.recent.remember(s.account.Config.Name, clientID, sp, recentMessage{messageID: m.MessageID, size: sp.Size(),
			firstAttempt: m.FirstAttempt, unknown: err != nil, at: time.Now()})
	}
	return s.finish(m, receipt, err, start)
}

// finish logs the outcome of a message handed to the Submitter, counts it
// and returns the reply.
func (s *session) finish(m *deliver.Message, r deliver.Receipt, err error, start time.Time) error {
	size, name := m.Size(), s.account.Config.Name
	ev := s.log.Info()
	f := failure.Classify(err)
	if err != nil {
		ev = s.log.Error().Err(err).Str("reason", string(f.Kind))
		if f.Hint != "" {
			ev = ev.Str("hint", f.Hint)
		}
	}
	status := r.Result.Status
	if f.GraphStatus != 0 {
		status = f.GraphStatus
	}
	requestID := r.Result.RequestID
	if requestID == "" {
		requestID = f.RequestID
	}
	ev = ev.Str("message_id", m.MessageID).Str("subject", m.Subject).Str("from", conntrack.Clip(s.from)).Strs("rcpt", m.Recipients).Int("rcpt_count", len(m.Recipients)).Int64("bytes", size).
		Str("graph_user", r.User).Int64("duration_ms", time.Since(start).Milliseconds())
	if r.FoundInSentItems {
		ev = ev.Bool("found_in_sent_items", true)
	}
	if r.PossibleDuplicate {
		ev = ev.Bool("possible_duplicate", true)
	}
	switch {
	case err != nil:
		reply := replyFor(f)
		msg := "message not sent"
		if errors.Is(err, failure.ErrQueueFull) {
			msg = "message refused: the outbox is full"
		}
		if r.OutcomeUnknown {
			reply, msg = replyOutcomeUnknown, "message outcome unknown: Graph's answer was lost and Sent Items did not show it within smtp.send_timeout; the client's resend will be looked up first"
			ev = ev.Bool("outcome_unknown", true)
		}
		ev.Int("graph_status", status).Str("request_id", requestID).Int("attempts", r.Attempts).Str("path", r.Path).
			Int("reply", reply.Code).Msg(msg)
		s.srv.opts.Metrics.Final(admin.FinalMessage{Account: name, Result: "not sent", MessageID: m.MessageID, Subject: m.Subject, From: s.from,
			Recipients: m.Recipients, GraphStatus: status, RequestID: requestID, Reason: string(f.Kind), Error: f.Reason, Hint: f.Hint}, size)
		return reply
	case r.QueueID != "":
		ev.Str("queue_id", r.QueueID).Msg("message queued")
		s.srv.opts.Metrics.Message(name, "queued", "", size)
		return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "OK: queued as " + r.QueueID}
	}
	ev.Int("graph_status", status).Str("request_id", requestID).Int("attempts", r.Attempts).Bool("fell_back", r.FellBack).Str("path", r.Path).
		Msg("message sent")
	s.srv.opts.Metrics.Final(admin.FinalMessage{Account: name, Result: "sent", MessageID: m.MessageID, Subject: m.Subject, From: s.from,
		Recipients: m.Recipients, GraphStatus: status, RequestID: requestID}, size)
	if r.FoundInSentItems {
		return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0},
			Message: "OK: sent by Microsoft 365 (its answer was lost; the message is in Sent Items)"}
	}
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0},
		Message: "OK: accepted by Microsoft 365, request-id " + r.Result.RequestID}
}

// prepare checks the message against the account's sender policy and
// returns it as Graph must receive it (every envelope recipient in a To,
// Cc or Bcc field, and a Message-ID) with the Graph user to send as, and
// the client's own Message-ID ("" if it gave none).
func (s *session) prepare(sp *mime.Spool) (*deliver.Message, string, error) {
	head, err := mime.ReadHead(sp, sp.Size())
	if err != nil {
		f := failure.Classify(err)
		s.log.Warn().Err(err).Str("reason", string(f.Kind)).Msg("message refused: its header cannot be read")
		return nil, "", replyFor(f)
	}
	for _, field := range []string{"From", "Sender"} {
		for i, addrs := range head.FieldAddresses(field) {
			if len(addrs) == 0 {
				s.log.Warn().Str("field", field).Msg("sender refused: header field has no address")
				return nil, "", replySenderNotAllowed(head.Fields[field][i], field+":")
			}
			for _, a := range addrs {
				if !s.account.Senders.Allows(a) {
					s.log.Warn().Str("from", conntrack.Clip(s.from)).Str("field", field).Str("address", a).Msg("sender refused: header address is not in the account's allowed_senders")
					return nil, "", replySenderNotAllowed(a, field+":")
				}
			}
		}
	}
	now := time.Now()
	clientID := strings.TrimSpace(head.Fields.Get("Message-Id"))
	m := &deliver.Message{
		Account: s.account, From: s.from, Recipients: s.rcpts, GraphUser: s.account.Config.Mailbox,
		Session: s.id, Remote: s.remote, MessageID: clientID, FirstAttempt: now, Subject: head.Subject(),
	}
	if s.account.Config.UseAddressFromUser {
		m.GraphUser, m.FallbackUser = s.from, s.account.Config.Mailbox
	}
	prior, seen := s.srv.recent.recall(s.account.Config.Name, clientID, sp.Size(), sp, now)
	switch {
	case seen && prior.unknown && prior.size == sp.Size():
		// The client sends again a message answered 451 when Graph's
		// answer was lost: it is looked up before it goes.
		m.MessageID, m.FirstAttempt, m.OutcomeUnknown = prior.messageID, prior.firstAttempt, true
		s.log.Info().Str("message_id", m.MessageID).Msg("the client sends again a message whose outcome was unknown: looking in Sent Items first")
	case seen:
		m.IDReused = true
		s.log.Warn().Str("message_id", clientID).
			Str("hint", "the sending program gives the same Message-ID to different messages: if Graph's answer to one is lost, it cannot be told apart in Sent Items and is sent again").
			Msg("Message-ID used by another message the bridge took in the last day")
	}
	added := ""
	if clientID == "" {
		if !m.OutcomeUnknown {
			_, domain, _ := strings.Cut(s.account.Config.Mailbox, "@")
			m.MessageID = newMessageID(domain, now)
		}
		added = m.MessageID
	}
	content, headerOnly := mime.WithBcc(sp, sp.Size(), head, s.rcpts, added)
	if len(headerOnly) > 0 {
		s.log.Warn().Strs("addresses", headerOnly).Msg("recipients in To/Cc/Bcc but not in RCPT TO: Graph sends to the header recipients too")
	}
	m.Content = content
	return m, clientID, nil
}
