// Package bridge is the local side of mailbridge: the SMTP server that
// legacy clients talk to on loopback, their accounts and the configuration.
// It hands messages to Microsoft Graph through the upstream package.
package bridge

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/rs/zerolog"

	"mailbridge/upstream"
)

// Options are what a Bridge needs besides its configuration.
type Options struct {
	// Logger receives the bridge's structured log.
	Logger zerolog.Logger
	// RootCAs are the CAs trusted for Microsoft's servers; nil means the
	// system's pool (where SSL_CERT_FILE works).
	RootCAs *x509.CertPool
	// AuthFailureDelay is the pause before refusing a first bad password
	// from an address; it doubles with each further failure, up to 30
	// times itself. Zero means one second.
	AuthFailureDelay time.Duration
}

// Account is a configured local user with its sending policy and Graph
// client.
type Account struct {
	Config AccountConfig
	// Tokens are for Graph (send_scope), POP3Tokens for Outlook's POP3
	// service (pop3_scope): two audiences, two tokens.
	Tokens     *upstream.TokenSource
	POP3Tokens *upstream.TokenSource
	Sender     MailSender
	POP3Dialer MailboxDialer
	password   *passwordChecker
	senders    senderPolicy
}

// Bridge is a configured mailbridge: its accounts, upstream clients and
// local SMTP server.
type Bridge struct {
	cfg        *Config
	log        zerolog.Logger
	accountSet atomic.Pointer[accounts]
	tokens     *upstream.TokenSources
	rootCAs    *x509.CertPool
	key        *[32]byte
	throttle   *authThrottle
	retry      retryPolicy
	pacer      *uploadPacer
	spoolDir   string
	httpClient *http.Client

	smtpServer *smtp.Server
	smtpLn     net.Listener
	smtpTLSLn  net.Listener
	pop3TLSLn  net.Listener
	pop3Ln     net.Listener
	listeners  []net.Listener // every listener opened, closed at shutdown
	pop3Slots  chan struct{}
	pop3Wg     sync.WaitGroup
	conns      connTracker
	smtpSlots  chan struct{}

	outbox        *outboxStore
	worker        *outboxWorker
	stopWorker    context.CancelFunc
	stopDelivery  context.CancelFunc
	workerStopped chan struct{}

	metrics *bridgeMetrics
	serving atomic.Bool
	adminLn net.Listener

	baseCtx    context.Context
	cancelBase context.CancelFunc
	served     sync.WaitGroup
}

// New builds a bridge from a completed configuration. It opens no
// connection yet.
func New(cfg *Config, opts Options) (*Bridge, error) {
	if opts.AuthFailureDelay <= 0 {
		opts.AuthFailureDelay = time.Second
	}
	httpClient := upstream.NewHTTPClient(opts.RootCAs)
	b := &Bridge{
		cfg:        cfg,
		log:        opts.Logger,
		throttle:   newAuthThrottle(opts.AuthFailureDelay, 30*opts.AuthFailureDelay),
		retry:      defaultRetry,
		pacer:      newUploadPacer(cfg.SMTP.UploadBytesPer5Min, 5*time.Minute),
		spoolDir:   cfg.SMTP.SpoolDir,
		httpClient: httpClient,
		tokens:     upstream.NewTokenSources(httpClient),
		rootCAs:    opts.RootCAs,
		key:        newProcessKey(),
	}
	set, err := b.buildAccounts(cfg)
	if err != nil {
		return nil, err
	}
	b.accountSet.Store(set)
	b.pop3Slots = make(chan struct{}, max(cfg.POP3.MaxSessions, 1))
	b.smtpSlots = make(chan struct{}, max(cfg.SMTP.MaxSessions, 1))
	if cfg.Outbox.Enabled {
		store, err := OpenOutbox(cfg.Outbox.Dir)
		if err != nil {
			return nil, err
		}
		b.outbox = store
		b.worker = newOutboxWorker(b, store, b.log.With().Str("proto", "outbox").Logger())
	}
	b.metrics = newBridgeMetrics(b)
	upstream.Observe(httpClient, b.metrics.observeUpstream)
	b.baseCtx, b.cancelBase = context.WithCancel(context.Background())
	return b, nil
}

// secretExpiryWarning says when an account's client secret expires within
// 30 days, or has expired; "" otherwise.
func secretExpiryWarning(a AccountConfig, now time.Time) string {
	if a.ClientSecretExpires.IsZero() || a.ClientCertificateFile != "" {
		return ""
	}
	left := a.ClientSecretExpires.Sub(now)
	switch {
	case left < 0:
		return "the client secret has expired (client_secret_expires): create a new one under Certificates & secrets, put its Value in client_secret and its date in client_secret_expires"
	case left < 30*24*time.Hour:
		return fmt.Sprintf("the client secret expires in %d days (client_secret_expires): create a new one under Certificates & secrets before then, or switch to client_certificate_file", int(left.Hours()/24)+1)
	}
	return ""
}

// accounts is the set of accounts in force: replaced whole by a reload,
// while sessions keep the *Account they logged in with.
type accounts struct {
	byUser  map[string]*Account // by lower-case user name
	ordered []*Account
}

// buildAccounts makes the accounts of cfg, sharing token sources (and so
// cached tokens) with those that came before.
func (b *Bridge) buildAccounts(cfg *Config) (*accounts, error) {
	set := &accounts{byUser: map[string]*Account{}}
	for _, ac := range cfg.Accounts {
		patterns := []string{ac.Mailbox}
		if len(ac.AllowedSenders) > 0 {
			patterns = ac.AllowedSenders
		}
		var policy senderPolicy
		for _, p := range patterns {
			sp, err := parseSenderPattern(p)
			if err != nil {
				return nil, fmt.Errorf("account %s: allowed_senders: %w", ac.Name, err)
			}
			policy = append(policy, sp)
		}
		ts := b.tokens.Get(ac.Credentials(), ac.SendScope)
		a := &Account{
			Config:     ac,
			Tokens:     ts,
			POP3Tokens: b.tokens.Get(ac.Credentials(), ac.POP3Scope),
			POP3Dialer: &upstream.POP3Dialer{Addr: ac.POP3Upstream, RootCAs: b.rootCAs, Timeout: cfg.POP3.UpstreamTimeout.Duration},
			Sender:     upstream.NewGraphClient(ac.GraphURL, b.httpClient, ts),
			password:   newPasswordChecker(ac.PasswordHash, b.key),
			senders:    policy,
		}
		set.byUser[strings.ToLower(ac.Username)] = a
		set.ordered = append(set.ordered, a)
	}
	return set, nil
}

// Accounts returns the configured accounts in configuration order.
func (b *Bridge) Accounts() []*Account { return b.accountSet.Load().ordered }

func (b *Bridge) accountByName(name string) *Account {
	for _, a := range b.Accounts() {
		if a.Config.Name == name {
			return a
		}
	}
	return nil
}

// authenticate checks a local user name and password of an account that
// may use protocol, and returns the account. Failures are slowed down per
// remote address.
func (b *Bridge) authenticate(ctx context.Context, protocol, remoteIP, username, password string) (*Account, error) {
	a := b.accountSet.Load().byUser[strings.ToLower(username)]
	if a != nil && !a.Config.Uses(protocol) {
		a = nil
	}
	if a != nil && a.password.check(password) {
		b.throttle.succeeded(remoteIP)
		return a, nil
	}
	if a == nil {
		spendBcrypt(password)
	}
	sleepCtx(ctx, b.throttle.failed(remoteIP))
	return nil, errBadCredentials
}

// Start opens the SMTP and POP3 listeners and serves them in the
// background.
func (b *Bridge) Start() error {
	ln, err := net.Listen("tcp", b.cfg.SMTP.Listen)
	if err != nil {
		return fmt.Errorf("smtp listener: %w", err)
	}
	b.listeners = append(b.listeners, ln)
	if b.cfg.POP3.Listen != "" {
		pln, err := b.listen("pop3", b.cfg.POP3.Listen, nil)
		if err != nil {
			return err
		}
		b.pop3Ln = pln
		b.served.Add(1)
		go func() {
			defer b.served.Done()
			b.servePOP3(b.conns.wrap(pln))
		}()
		if tl := b.cfg.POP3.TLSListen; tl != "" {
			tln, err := b.listen("pop3", tl, b.cfg.POP3.TLSConfig())
			if err != nil {
				return err
			}
			b.pop3TLSLn = tln
			b.served.Add(1)
			go func() {
				defer b.served.Done()
				b.servePOP3(tls.NewListener(b.conns.wrap(tln), b.cfg.POP3.TLSConfig()))
			}()
		}
	}
	if tl := b.cfg.SMTP.TLSListen; tl != "" {
		tln, err := b.listen("smtp", tl, b.cfg.SMTP.TLSConfig())
		if err != nil {
			return err
		}
		b.smtpTLSLn = tln
	}
	b.smtpLn = ln
	b.smtpServer = b.newSMTPServer()
	if b.worker != nil {
		wctx, stop := context.WithCancel(context.Background())
		dctx, stopDelivery := context.WithCancel(context.Background())
		b.stopWorker, b.stopDelivery = stop, stopDelivery
		b.workerStopped = make(chan struct{})
		go func() {
			defer close(b.workerStopped)
			b.worker.run(wctx, dctx)
		}()
		b.log.Info().Str("proto", "outbox").Str("dir", b.cfg.Outbox.Dir).Msg("outbox open: queued messages will be delivered")
	}
	serveSMTP := func(l net.Listener) {
		b.served.Add(1)
		go func() {
			defer b.served.Done()
			if err := b.smtpServer.Serve(l); err != nil && !errors.Is(err, smtp.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				b.log.Error().Err(err).Msg("smtp listener stopped")
			}
		}()
	}
	serveSMTP(b.conns.wrap(&sessionLimitListener{Listener: ln, slots: b.smtpSlots, log: b.log}))
	if b.smtpTLSLn != nil {
		serveSMTP(tls.NewListener(b.conns.wrap(&sessionLimitListener{Listener: b.smtpTLSLn, slots: b.smtpSlots, log: b.log}), b.cfg.SMTP.TLSConfig()))
	}
	if b.cfg.Admin.Listen != "" {
		aln, err := b.listen("admin", b.cfg.Admin.Listen, nil)
		if err != nil {
			return err
		}
		b.adminLn = aln
		go b.serveAdmin(aln)
	}
	b.serving.Store(true)
	b.log.Info().Str("proto", "smtp").Str("listen", ln.Addr().String()).Int("accounts", len(b.Accounts())).Msg("listening")
	for _, a := range b.Accounts() {
		if w := secretExpiryWarning(a.Config, time.Now()); w != "" {
			b.log.Warn().Str("account", a.Config.Name).Time("client_secret_expires", a.Config.ClientSecretExpires).Msg(w)
		}
	}
	return nil
}

// listen opens a listener for proto and logs it; tlsConfig marks an
// implicit-TLS one (the caller wraps it). A failure closes what Start
// opened before.
func (b *Bridge) listen(proto, addr string, tlsConfig *tls.Config) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		for _, l := range b.listeners {
			l.Close()
		}
		return nil, fmt.Errorf("%s listener: %w", proto, err)
	}
	b.listeners = append(b.listeners, ln)
	ev := b.log.Info().Str("proto", proto).Str("listen", ln.Addr().String()).Bool("implicit_tls", tlsConfig != nil)
	if proto == "pop3" {
		ev = ev.Str("upstream", b.cfg.POP3.Upstream)
	}
	ev.Msg("listening")
	if host, _, _ := net.SplitHostPort(addr); proto != "admin" && !isLoopbackHost(host) && tlsConfig == nil {
		lt := b.cfg.SMTP.LocalTLS
		if proto == "pop3" {
			lt = b.cfg.POP3.LocalTLS
		}
		if lt.TLSConfig() == nil {
			b.log.Warn().Str("proto", proto).Str("listen", addr).Msg("PLAINTEXT ON THE NETWORK: clients send their passwords unencrypted to this address (allow_plaintext_on_network = true); configure tls_cert and tls_key")
		}
	}
	return ln, nil
}

// SMTPTLSAddr is the address of the implicit-TLS SMTP listener, "" if none.
func (b *Bridge) SMTPTLSAddr() string {
	if b.smtpTLSLn == nil {
		return ""
	}
	return b.smtpTLSLn.Addr().String()
}

// POP3TLSAddr is the address of the implicit-TLS POP3 listener, "" if none.
func (b *Bridge) POP3TLSAddr() string {
	if b.pop3TLSLn == nil {
		return ""
	}
	return b.pop3TLSLn.Addr().String()
}

// AdminAddr is the address of the /metrics and /healthz listener, "" if
// none.
func (b *Bridge) AdminAddr() string {
	if b.adminLn == nil {
		return ""
	}
	return b.adminLn.Addr().String()
}

// SMTPAddr is the address the SMTP listener is bound to.
func (b *Bridge) SMTPAddr() string { return b.smtpLn.Addr().String() }

// POP3Addr is the address the POP3 listener is bound to, "" if POP3 is off.
func (b *Bridge) POP3Addr() string {
	if b.pop3Ln == nil {
		return ""
	}
	return b.pop3Ln.Addr().String()
}

// Shutdown stops accepting connections, closes idle sessions at once and
// lets sessions that are receiving a message finish, until ctx ends; then
// it closes what is left.
func (b *Bridge) Shutdown(ctx context.Context) error {
	b.log.Info().Msg("shutting down")
	b.serving.Store(false)
	// go-smtp closes only the listeners its Serve has registered: one whose
	// goroutine has not started yet would be missed.
	for _, l := range b.listeners {
		l.Close()
	}
	done := make(chan error, 1)
	go func() {
		err := b.smtpServer.Shutdown(context.Background())
		if errors.Is(err, net.ErrClosed) {
			err = nil // closed above already
		}
		b.pop3Wg.Wait()
		done <- err
	}()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		b.conns.closeIdle(250 * time.Millisecond)
		select {
		case err := <-done:
			b.cancelBase()
			b.served.Wait()
			err = errors.Join(err, b.stopOutbox(ctx))
			b.httpClient.CloseIdleConnections()
			return err
		case <-ctx.Done():
			b.cancelBase()
			b.smtpServer.Close()
			b.conns.closeAll()
			<-done
			b.served.Wait()
			b.stopOutbox(ctx)
			b.httpClient.CloseIdleConnections()
			return fmt.Errorf("shutdown: sessions still busy were closed: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// stopOutbox stops dispatching, lets deliveries in progress finish until
// ctx ends, then interrupts them: an interrupted message stays queued.
func (b *Bridge) stopOutbox(ctx context.Context) error {
	if b.worker == nil || b.stopWorker == nil {
		return nil
	}
	b.stopWorker()
	select {
	case <-b.workerStopped:
		b.stopDelivery()
		return nil
	case <-ctx.Done():
		b.stopDelivery()
		<-b.workerStopped
		return fmt.Errorf("outbox: deliveries in progress were interrupted and stay queued: %w", ctx.Err())
	}
}

// Outbox returns the outbox, nil when it is off.
func (b *Bridge) Outbox() *outboxStore { return b.outbox }

// Reload puts the accounts of cfg (already loaded and validated) in force
// for new sessions; sessions already logged in go on with theirs. Settings
// other than the accounts need a restart: the ones that changed are named
// in the log.
func (b *Bridge) Reload(cfg *Config) error {
	set, err := b.buildAccounts(cfg)
	if err != nil {
		return err
	}
	b.accountSet.Store(set)
	var restart []string
	old := b.cfg
	oldSMTP, newSMTP, oldPOP3, newPOP3 := old.SMTP, cfg.SMTP, old.POP3, cfg.POP3
	oldSMTP.config, newSMTP.config, oldPOP3.config, newPOP3.config = nil, nil, nil, nil // loaded anew each time
	for key, changed := range map[string]bool{
		"smtp":   !reflect.DeepEqual(oldSMTP, newSMTP),
		"pop3":   !reflect.DeepEqual(oldPOP3, newPOP3),
		"outbox": !reflect.DeepEqual(old.Outbox, cfg.Outbox),
		"admin":  old.Admin != cfg.Admin,
		"log":    old.Log != cfg.Log,
	} {
		if changed {
			restart = append(restart, "["+key+"]")
		}
	}
	slices.Sort(restart)
	ev := b.log.Info().Int("accounts", len(set.ordered))
	if len(restart) > 0 {
		ev = ev.Strs("need_restart", restart)
	}
	ev.Msg("configuration reloaded: accounts apply to new sessions")
	for _, a := range set.ordered {
		if w := secretExpiryWarning(a.Config, time.Now()); w != "" {
			b.log.Warn().Str("account", a.Config.Name).Time("client_secret_expires", a.Config.ClientSecretExpires).Msg(w)
		}
	}
	return nil
}

// ReloadFrom reads the configuration file at path and applies its
// accounts; an invalid file changes nothing.
func (b *Bridge) ReloadFrom(path string) error {
	cfg, err := LoadConfig(path)
	if err != nil {
		b.log.Error().Err(err).Str("config", path).Msg("reload refused: the running configuration stays in force")
		return err
	}
	return b.Reload(cfg)
}

// Run starts the bridge and serves until ctx ends, then shuts down within
// the configured shutdown timeout.
func (b *Bridge) Run(ctx context.Context) error {
	if err := b.Start(); err != nil {
		return err
	}
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), b.cfg.SMTP.ShutdownTimeout.Duration)
	defer cancel()
	return b.Shutdown(sctx)
}
