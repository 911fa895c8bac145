package bridge

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/rs/zerolog"

	"mailbridge/upstream"
)

func (b *Bridge) newSMTPServer() *smtp.Server {
	s := smtp.NewServer(smtp.BackendFunc(b.newSMTPSession))
	s.Domain = "mailbridge"
	s.TLSConfig = b.cfg.SMTP.TLSConfig() // STARTTLS when a certificate is configured
	// Passwords in plaintext only on loopback, unless the administrator
	// allowed it on the network; with TLS, go-smtp offers AUTH after it.
	s.AllowInsecureAuth = b.cfg.SMTP.plaintextAuthAllowed(b.cfg.SMTP.Listen)
	s.MaxMessageBytes = b.cfg.SMTP.MaxMessageBytes
	s.MaxRecipients = b.cfg.SMTP.MaxRecipients
	// Message lines may be as long as a message Graph takes (a client may
	// send an unwrapped base64 attachment); this bounds command lines too.
	s.MaxLineLength = upstream.MaxSendMailBody
	s.ReadTimeout = b.cfg.SMTP.IdleTimeout.Duration
	s.WriteTimeout = time.Minute
	s.ErrorLog = smtpErrorLog{b.log.With().Str("proto", "smtp").Logger()}
	// s.Debug is never set: it would copy AUTH lines, passwords included.
	return s
}

// smtpErrorLog passes go-smtp's internal errors to the structured log.
type smtpErrorLog struct{ log zerolog.Logger }

func (l smtpErrorLog) Printf(format string, v ...any) {
	l.log.Warn().Msg(strings.TrimSpace(fmt.Sprintf(format, v...)))
}
func (l smtpErrorLog) Println(v ...any) { l.log.Warn().Msg(strings.TrimSpace(fmt.Sprintln(v...))) }

// smtpSession is one client connection, from EHLO to QUIT.
type smtpSession struct {
	bridge  *Bridge
	conn    *smtp.Conn
	state   *connState
	ctx     context.Context
	cancel  context.CancelFunc
	log     zerolog.Logger
	remote  string
	started time.Time

	account *Account
	from    string
	rcpts   []string

	messages int
}

func newSessionID() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func (b *Bridge) newSMTPSession(c *smtp.Conn) (smtp.Session, error) {
	remote := c.Conn().RemoteAddr().String()
	ctx, cancel := context.WithCancel(b.baseCtx)
	s := &smtpSession{
		bridge:  b,
		conn:    c,
		state:   b.conns.state(c.Conn()),
		ctx:     ctx,
		cancel:  cancel,
		remote:  remote,
		started: time.Now(),
		log:     b.log.With().Str("proto", "smtp").Str("session", newSessionID()).Str("remote", remote).Logger(),
	}
	s.log.Info().Str("helo", c.Hostname()).Msg("session started")
	b.metrics.sessions.WithLabelValues("smtp").Inc()
	b.metrics.activeSessions.WithLabelValues("smtp").Inc()
	return s, nil
}

// AuthMechanisms implements smtp.AuthSession.
func (s *smtpSession) AuthMechanisms() []string { return []string{sasl.Plain, sasl.Login} }

// Auth implements smtp.AuthSession.
func (s *smtpSession) Auth(mech string) (sasl.Server, error) {
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, username, password string) error {
			if identity != "" && identity != username {
				return s.login("", "")
			}
			return s.login(username, password)
		}), nil
	case sasl.Login:
		return newLoginServer(s.login), nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

func (s *smtpSession) login(username, password string) error {
	ip, _, _ := net.SplitHostPort(s.remote)
	a, err := s.bridge.authenticate(s.ctx, "smtp", ip, username, password)
	if err != nil {
		s.log.Warn().Str("username", username).Msg("authentication failed: unknown user name or wrong password")
		return smtp.ErrAuthFailed
	}
	s.account = a
	s.log = s.log.With().Str("account", a.Config.Name).Logger()
	s.log.Debug().Msg("authenticated")
	return nil
}

// Mail implements smtp.Session.
func (s *smtpSession) Mail(from string, opts *smtp.MailOptions) error {
	if s.account == nil {
		return errAuthRequired
	}
	if from == "" {
		return errNullSender
	}
	if !s.account.senders.allows(from) {
		s.log.Warn().Str("from", from).Msg("sender refused: MAIL FROM is not in the account's allowed_senders")
		return errSenderNotAllowed(from, "Sender")
	}
	if opts != nil && opts.Size > upstream.MaxSendMailMIME {
		return errTooLarge(upstream.MaxSendMailMIME)
	}
	s.from = from
	s.rcpts = s.rcpts[:0]
	return nil
}

// Rcpt implements smtp.Session.
func (s *smtpSession) Rcpt(to string, opts *smtp.RcptOptions) error {
	if s.account == nil {
		return errAuthRequired
	}
	for _, r := range s.rcpts {
		if strings.EqualFold(r, to) {
			return nil // the same recipient twice still receives one copy
		}
	}
	s.rcpts = append(s.rcpts, to)
	return nil
}

// Reset implements smtp.Session.
func (s *smtpSession) Reset() {
	s.from = ""
	s.rcpts = s.rcpts[:0]
}

// Logout implements smtp.Session.
func (s *smtpSession) Logout() error {
	s.cancel()
	s.bridge.metrics.activeSessions.WithLabelValues("smtp").Dec()
	s.log.Info().Int("messages", s.messages).Int64("duration_ms", time.Since(s.started).Milliseconds()).Msg("session ended")
	return nil
}

var bufferPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// Data implements smtp.Session: it checks the message's sender headers,
// adds envelope-only recipients as Bcc, and sends it through Graph.
func (s *smtpSession) Data(r io.Reader) error {
	s.state.setBusy(true)
	defer s.state.setBusy(false)
	start := time.Now()
	sp := newSpool(s.bridge.spoolDir)
	defer sp.Close()
	n, err := io.Copy(sp, r)
	if err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			if se == smtp.ErrDataTooLarge {
				s.log.Warn().Str("from", s.from).Int64("limit", s.bridge.cfg.SMTP.MaxMessageBytes).Msg("message refused: larger than smtp.max_message_bytes")
			}
			return se
		}
		if errors.Is(err, errSpool) {
			s.log.Error().Err(err).Str("hint", adminHint(err)).Msg("message not received: cannot write the spool file")
			return smtpReply(err)
		}
		s.log.Info().Err(err).Int64("bytes", n).Msg("message not received: client connection failed in DATA")
		return err
	}
	msg, graphUser, err := s.prepare(sp)
	if err != nil {
		return err
	}
	size := msg.size()
	fallback := ""
	if s.account.Config.UseAddressFromUser {
		fallback = s.account.Config.Mailbox
	}
	if size > upstream.MaxSendMailMIME && !s.account.Config.LargeMessages {
		s.log.Warn().Str("from", s.from).Int64("bytes", size).Msg("message refused: over sendMail's limit and large_messages is off")
		return errLargeNotAllowed("large_messages is off for this account")
	}
	if s.bridge.outbox != nil {
		return s.queue(msg, graphUser, fallback, start)
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.bridge.cfg.SMTP.SendTimeout.Duration)
	defer cancel()
	var d delivery
	if size <= upstream.MaxSendMailMIME {
		d, err = deliver(ctx, s.account.Sender, s.bridge.retry, graphUser, fallback, msg, size)
	} else {
		d, err = s.bridge.deliverLarge(s.ctx, s.account, s.log, graphUser, fallback, msg)
	}
	s.messages++
	ev := s.log.Info()
	if err != nil {
		ev = s.log.Error().Err(err)
		if hint := adminHint(err); hint != "" {
			ev = ev.Str("hint", hint)
		}
	}
	ev.Str("from", s.from).Int("rcpt_count", len(s.rcpts)).Int64("bytes", size).
		Str("graph_user", d.user).Int("graph_status", graphStatus(d, err)).Str("request_id", d.result.RequestID).
		Int("attempts", d.attempts).Bool("fell_back", d.fellBack).Str("path", d.path).
		Int64("duration_ms", time.Since(start).Milliseconds())
	if err != nil {
		reply := smtpReply(err)
		ev.Int("reply", reply.Code).Msg("message not sent")
		s.bridge.metrics.message(s.account.Config.Name, "refused", err, size)
		return reply
	}
	ev.Msg("message sent")
	s.bridge.metrics.message(s.account.Config.Name, "sent", nil, size)
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0},
		Message: "OK: accepted by Microsoft 365, request-id " + d.result.RequestID}
}

// queue writes the message to the outbox durably and answers 250 with its
// queue ID; the outbox's worker delivers it.
func (s *smtpSession) queue(msg view, graphUser, fallback string, start time.Time) error {
	env := &Envelope{
		Account: s.account.Config.Name, From: s.from, Recipients: append([]string(nil), s.rcpts...),
		GraphUser: graphUser, FallbackUser: fallback, Size: msg.size(), Received: time.Now(), NextAttempt: time.Now(),
	}
	err := s.bridge.outbox.add(env, msg, s.bridge.cfg.Outbox.MaxBytes)
	s.messages++
	if errors.Is(err, errOutboxFull) {
		s.log.Error().Int64("bytes", env.Size).Int64("max_bytes", s.bridge.cfg.Outbox.MaxBytes).Str("hint", "Graph has not taken messages for a while: see the outbox's log lines; raise outbox.max_bytes if the disk allows").Msg("message refused: the outbox is full")
		return &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "Outbox full, try again later"}
	}
	if err != nil {
		s.log.Error().Err(err).Str("hint", adminHint(err)).Msg("message not queued")
		return smtpReply(err)
	}
	s.bridge.worker.enqueue(env)
	s.bridge.metrics.message(s.account.Config.Name, "queued", nil, env.Size)
	s.log.Info().Str("queue_id", env.ID).Str("from", s.from).Int("rcpt_count", len(s.rcpts)).Int64("bytes", env.Size).
		Str("graph_user", graphUser).Int64("duration_ms", time.Since(start).Milliseconds()).Msg("message queued")
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "OK: queued as " + env.ID}
}

func graphStatus(d delivery, err error) int {
	var apiErr *upstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.Status
	}
	return d.result.Status
}

// maxHeaderBytes bounds the header section the bridge reads.
const maxHeaderBytes = 1 << 20

// prepare checks the message against the account's sender policy and
// returns it as Graph must receive it (every envelope recipient in a To,
// Cc or Bcc field) and the Graph user to send as.
func (s *smtpSession) prepare(sp *spool) (view, string, error) {
	headBuf, headerLen, bodyStart, err := readHeaderAt(sp, 0, sp.Size())
	if err != nil {
		return nil, "", fmt.Errorf("%w: %v", errSpool, err)
	}
	if headerLen == len(headBuf) && sp.Size() > maxHeaderBytes {
		return nil, "", &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "Message header over 1 MB or without an end"}
	}
	header := parseHeader(headBuf[:headerLen])
	for _, field := range []string{"From", "Sender"} {
		for _, v := range header[field] {
			addrs := parseAddressList(v)
			if len(addrs) == 0 {
				s.log.Warn().Str("field", field).Msg("sender refused: header field has no address")
				return nil, "", errSenderNotAllowed(v, field+":")
			}
			for _, a := range addrs {
				if !s.account.senders.allows(a) {
					s.log.Warn().Str("from", s.from).Str("field", field).Str("address", a).Msg("sender refused: header address is not in the account's allowed_senders")
					return nil, "", errSenderNotAllowed(a, field+":")
				}
			}
		}
	}
	graphUser := s.account.Config.Mailbox
	if s.account.Config.UseAddressFromUser {
		graphUser = s.from
	}

	inHeaders := map[string]bool{}
	for _, a := range headerAddresses(header, "To", "Cc", "Bcc") {
		inHeaders[a] = true
	}
	inEnvelope := map[string]bool{}
	var bcc []string
	for _, r := range s.rcpts {
		lr := strings.ToLower(r)
		inEnvelope[lr] = true
		if !inHeaders[lr] {
			bcc = append(bcc, r)
		}
	}
	var headerOnly []string
	for a := range inHeaders {
		if !inEnvelope[a] {
			headerOnly = append(headerOnly, a)
		}
	}
	if len(headerOnly) > 0 {
		s.log.Warn().Strs("addresses", headerOnly).Msg("recipients in To/Cc/Bcc but not in RCPT TO: Graph sends to the header recipients too")
	}
	whole := piece{r: sp, n: sp.Size()}
	if len(bcc) == 0 {
		return view{whole}, graphUser, nil
	}
	// Keep the message as it came and add one Bcc field at the end of the
	// header; a Bcc field the client wrote is merged into it, since a
	// message may have only one (RFC 5322 §3.6).
	head := headBuf[:headerLen]
	if existing := header["Bcc"]; len(existing) > 0 {
		head = removeField(head, "Bcc")
		bcc = append(headerAddresses(header, "Bcc"), bcc...)
	}
	if headerLen == bodyStart { // no empty line: the message is all header
		if len(head) > 0 && head[len(head)-1] != '\n' {
			head = append(head[:len(head):len(head)], '\r', '\n')
		}
		return view{bytesPiece(head), bytesPiece(foldedField("Bcc", bcc)), bytesPiece([]byte("\r\n"))}, graphUser, nil
	}
	rest := piece{r: sp, off: int64(headerLen), n: sp.Size() - int64(headerLen)}
	return view{bytesPiece(head), bytesPiece(foldedField("Bcc", bcc)), rest}, graphUser, nil
}
