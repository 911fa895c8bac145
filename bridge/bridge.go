// Package bridge is a running mailbridge: New wires the packages below it
// (accounts, delivery, the outbox, the SMTP and POP3 servers, the admin
// endpoint) from a configuration; Start opens the listeners; Shutdown lets
// busy sessions and deliveries finish; Reload puts new accounts in force;
// Check tests every account as the legacy clients' Test buttons would.
//
// It holds wiring only: each job lives in a package of its own under
// bridge/. Only cmd imports this package.
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
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"mailbridge/bridge/account"
	"mailbridge/bridge/admin"
	"mailbridge/bridge/config"
	"mailbridge/bridge/conntrack"
	"mailbridge/bridge/deliver"
	"mailbridge/bridge/failure"
	"mailbridge/bridge/imapserver"
	"mailbridge/bridge/localtls"
	"mailbridge/bridge/outbox"
	"mailbridge/bridge/pop3server"
	"mailbridge/bridge/smtpserver"
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
	// Retry spaces the retries within one SMTP transaction (and one step
	// of a large message); zero means deliver.DefaultRetry.
	Retry deliver.RetryPolicy
	// OutboxRetry spaces the outbox's attempts at a message; zero means
	// outbox.DefaultRetry.
	OutboxRetry deliver.RetryPolicy
	// Version is shown on the status page.
	Version string
	// SignInWait is how long Start waits for the accounts' first sign-in
	// (the credentials check), which goes on after it for up to 30 s;
	// zero means 5 s. Tests that look at its outcome wait for all of it.
	SignInWait time.Duration
}

// Bridge is a configured mailbridge.
type Bridge struct {
	cfg       *config.Config
	res       *config.Resolved
	log       zerolog.Logger
	accounts  *account.Registry
	deliverer *deliver.Deliverer
	outbox    *outbox.Outbox // nil when the outbox is off
	metrics   *admin.Metrics
	conns     conntrack.Tracker

	smtp *smtpserver.Server
	pop3 *pop3server.Server
	imap *imapserver.Server
	// The listening side of each protocol (front.go).
	smtpFront, pop3Front, imapFront *front
	adminLn                         net.Listener
	listeners                       []net.Listener // every listener opened, closed at shutdown

	stopWorker    context.CancelFunc
	stopDelivery  context.CancelFunc
	workerStopped chan struct{}

	version    string
	signInWait time.Duration // Options.SignInWait
	started    time.Time

	serving    atomic.Bool
	baseCtx    context.Context
	cancelBase context.CancelFunc
	served     sync.WaitGroup
}

// New builds a bridge from a completed configuration, reading the files it
// names. It opens no connection yet.
func New(cfg *config.Config, opts Options) (*Bridge, error) {
	res, err := cfg.Resolve()
	if err != nil {
		return nil, err
	}
	if opts.AuthFailureDelay <= 0 {
		opts.AuthFailureDelay = time.Second
	}
	b := &Bridge{
		cfg:        cfg,
		res:        res,
		log:        opts.Logger,
		metrics:    admin.NewMetrics(),
		version:    opts.Version,
		signInWait: opts.SignInWait,
	}
	b.baseCtx, b.cancelBase = context.WithCancel(context.Background())
	b.accounts = account.NewRegistry(func(p *upstream.Proxy) *http.Client {
		c := upstream.NewHTTPClient(opts.RootCAs, p)
		upstream.Observe(c, b.metrics.ObserveUpstream)
		return c
	}, opts.RootCAs, opts.AuthFailureDelay, b.log)
	b.accounts.Load(cfg, res)
	b.deliverer = deliver.New(deliver.Options{
		Retry:              opts.Retry,
		SendTimeout:        cfg.SMTP.SendTimeout.Duration,
		UploadBytesPer5Min: cfg.SMTP.UploadBytesPer5Min,
		SpoolDir:           cfg.SMTP.SpoolDir,
		MaxRequests:        cfg.SMTP.MaxGraphRequestsPerMessage,
		LookupWindow:       cfg.SMTP.LookupWindow.Duration,
	})
	var submit deliver.Submitter = b.deliverer
	if cfg.Outbox.Enabled {
		store, err := outbox.Open(cfg.Outbox.Dir)
		if err != nil {
			return nil, err
		}
		b.outbox = outbox.New(store, outbox.Options{
			Deliver:       b.deliverer.Attempt,
			Account:       b.accounts.ByName,
			Hint:          b.hintFor,
			Metrics:       b.metrics,
			Log:           b.log.With().Str("proto", "outbox").Logger(),
			MaxAge:        cfg.Outbox.MaxAge.Duration,
			MaxBytes:      cfg.Outbox.MaxBytes,
			RatePerSecond: cfg.Outbox.RatePerSecond,
			Retry:         opts.OutboxRetry,
			Bounce:        cfg.Outbox.Bounce,
			Notify:        cfg.Outbox.Notify,
		})
		b.metrics.RegisterQueue(b.outbox)
		submit = b.outbox
	}
	b.smtpFront = b.newFront("smtp", cfg.SMTP.Listen, cfg.SMTP.LocalTLS, res.SMTPTLS, cfg.SMTP.LoginTimeout.Duration, cfg.SMTP.MaxSessions)
	b.pop3Front = b.newFront("pop3", cfg.POP3.Listen, cfg.POP3.LocalTLS, res.POP3TLS, cfg.POP3.LoginTimeout.Duration, cfg.POP3.MaxSessions)
	b.imapFront = b.newFront("imap", cfg.IMAP.Listen, cfg.IMAP.LocalTLS, res.IMAPTLS, cfg.IMAP.LoginTimeout.Duration, cfg.IMAP.MaxSessions)
	b.smtp = smtpserver.New(smtpserver.Options{
		Config: cfg.SMTP, TLS: b.smtpFront.tls, Accounts: b.accounts, Submit: submit, Plan: b.deliverer.Plan,
		Conns: &b.conns, Metrics: b.metrics, Log: b.log, Context: b.baseCtx,
	})
	b.imap = imapserver.New(imapserver.Options{
		Config: cfg.IMAP, TLS: b.imapFront.tls, TLSFailed: b.imapFront.watch.Failed, Accounts: b.accounts,
		Conns: &b.conns, Metrics: b.metrics, Log: b.log, Context: b.baseCtx,
	})
	b.pop3 = pop3server.New(pop3server.Options{
		Config: cfg.POP3, TLS: b.pop3Front.tls, TLSFailed: b.pop3Front.watch.Failed, Accounts: b.accounts,
		Conns: &b.conns, Metrics: b.metrics, Log: b.log, Context: b.baseCtx,
	})
	smtpSlots := make(chan struct{}, max(cfg.SMTP.MaxSessions, 1)) // the plain and the implicit-TLS listener share them
	b.smtpFront.limit = func(ln net.Listener, evict func() bool) net.Listener {
		return b.smtp.LimitListener(ln, smtpSlots, evict)
	}
	b.smtpFront.idle = cfg.SMTP.IdleTimeout.Duration
	b.smtpFront.guard = b.smtp.Guard
	b.smtpFront.serve, b.smtpFront.serveTLS = b.smtp.Serve, b.smtp.ServeImplicitTLS
	b.pop3Front.limit = b.pop3.LimitListener
	b.pop3Front.serve = func(l net.Listener) error { b.pop3.Serve(l); return nil }
	b.imapFront.limit = b.imap.LimitListener
	b.imapFront.serve = func(l net.Listener) error { b.imap.Serve(l); return nil }
	return b, nil
}

// newFront returns the listening side of proto, with its certificate
// watcher and login policy; the protocol's server fills in the rest.
func (b *Bridge) newFront(proto, listen string, local config.LocalTLS, resolved *tls.Config, loginTimeout time.Duration, maxSessions int) *front {
	w := localtls.NewWatcher(b.log, proto, config.TLSVersions[local.TLSMinVersion])
	return &front{proto: proto, listen: listen, local: local, watch: w, tls: w.Config(resolved),
		login: b.loginPolicy(proto, loginTimeout, maxSessions)}
}

// loginPolicy bounds the connections of proto that have not logged in: a
// quarter of max_sessions is always left for clients that have.
func (b *Bridge) loginPolicy(proto string, timeout time.Duration, maxSessions int) *conntrack.LoginPolicy {
	return &conntrack.LoginPolicy{
		Timeout: timeout, MaxUnauthenticated: max(1, maxSessions-max(1, maxSessions/4)), Key: proto + ".login_timeout",
		Log:    b.log.With().Str("proto", proto).Logger(),
		Opened: func() { b.metrics.ConnectionOpened(proto) }, Closed: func() { b.metrics.ConnectionClosed(proto) },
	}
}

// Accounts returns the configured accounts in configuration order.
func (b *Bridge) Accounts() []*account.Account { return b.accounts.All() }

// Start opens the listeners of the protocols in use and serves them in
// the background.
func (b *Bridge) Start() error {
	b.started = time.Now()
	for _, proto := range []string{"smtp", "pop3", "imap"} {
		if why, off := b.cfg.ListenersOff[proto]; off {
			b.log.Info().Str("proto", proto).Str("reason", why).
				Str("hint", "add \""+proto+"\" to an account's protocols, or set ["+proto+"] listen, to open it").Msg("listener off")
		}
	}
	for _, f := range []*front{b.smtpFront, b.pop3Front, b.imapFront} {
		if err := f.open(b); err != nil {
			return err
		}
	}
	b.pop3Front.start(b)
	b.imapFront.start(b)
	if b.outbox != nil {
		wctx, stop := context.WithCancel(context.Background())
		dctx, stopDelivery := context.WithCancel(context.Background())
		b.stopWorker, b.stopDelivery = stop, stopDelivery
		b.workerStopped = make(chan struct{})
		go func() {
			defer close(b.workerStopped)
			b.outbox.Run(wctx, dctx)
		}()
		b.log.Info().Str("proto", "outbox").Str("dir", b.cfg.Outbox.Dir).Msg("outbox open: queued messages will be delivered")
	}
	b.smtpFront.start(b) // once the outbox takes messages
	if b.cfg.Admin.Listen != "" {
		aln, err := b.listen("admin", b.cfg.Admin.Listen, nil)
		if err != nil {
			return err
		}
		b.adminLn = aln
		go admin.Serve(aln, b.metrics, b.health, b.statusPage(), b.cfg.Admin.IdleTimeout.Duration, b.log)
		if host, _, _ := net.SplitHostPort(b.cfg.Admin.Listen); !config.IsLoopbackHost(host) {
			msg := "ADMIN ON THE NETWORK: /metrics and /healthz answer anyone who can reach this address (admin_allow_network = true); keep it behind a firewall"
			if b.cfg.Admin.PasswordHash != "" {
				msg += "; the status page's password crosses the network unencrypted (HTTP Basic): reach it through an SSH tunnel or keep it on loopback"
			}
			b.log.Warn().Str("proto", "admin").Str("listen", b.cfg.Admin.Listen).Msg(msg)
		}
		ev := b.log.Info().Str("proto", "admin").Str("url", "http://"+aln.Addr().String()+"/")
		if b.cfg.Admin.PasswordHash == "" {
			ev.Str("hint", "set [admin] username and password_hash (from `mailbridge hash-password`) to turn the status page on").Msg("status page off")
		} else {
			ev.Str("username", b.cfg.Admin.Username).Msg("status page on")
		}
	}
	for _, w := range b.cfg.ExposedSecrets() {
		b.log.Warn().Msg("SECRET READABLE BY OTHERS: " + w)
	}
	for table, lt := range map[string]config.LocalTLS{"smtp": b.cfg.SMTP.LocalTLS, "pop3": b.cfg.POP3.LocalTLS, "imap": b.cfg.IMAP.LocalTLS} {
		if lt.TLSCert != "" && config.TLSVersions[lt.TLSMinVersion] < tls.VersionTLS12 {
			b.log.Warn().Str("proto", table).Str("tls_min_version", lt.TLSMinVersion).
				Msg("OLD TLS ALLOWED: TLS " + lt.TLSMinVersion + " has known weaknesses (BEAST, CBC padding oracles, SHA-1); keep it only for clients that know nothing newer, and only on a trusted network")
		}
	}
	b.waitForSignIn()
	b.serve(func() { b.probeSentItems(b.Accounts()) })
	b.serving.Store(true)
	b.serve(b.watchCredentials)
	// The plain SMTP listener's line comes last, when all is up.
	if b.smtpFront.ln != nil {
		b.log.Info().Str("proto", "smtp").Str("listen", b.SMTPAddr()).Int("accounts", len(b.Accounts())).Msg("listening")
	} else {
		b.log.Info().Int("accounts", len(b.Accounts())).Msg("ready (no SMTP listener)")
	}
	for _, a := range b.Accounts() {
		if w := a.Config.SecretExpiryWarning(time.Now()); w != "" {
			b.log.Warn().Str("account", a.Config.Name).Time("client_secret_expires", a.Config.ClientSecretExpires).Msg(w)
		}
	}
	return nil
}

// serve runs fn in the background until Shutdown waits for it.
func (b *Bridge) serve(fn func()) {
	b.served.Add(1)
	go func() {
		defer b.served.Done()
		fn()
	}()
}

// addrInUse reports whether a listen failed because the address is taken
// (EADDRINUSE; WSAEADDRINUSE on Windows).
func addrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use") ||
		strings.Contains(err.Error(), "Only one usage of each socket address")
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
		if addrInUse(err) {
			key := "[" + proto + "] listen"
			if tlsConfig != nil {
				key = "[" + proto + "] tls_listen"
			}
			return nil, fmt.Errorf("%s listener: %w: another program holds %s (another mailbridge, its demo, or a mail server): stop it, or change %s", proto, err, addr, key)
		}
		return nil, fmt.Errorf("%s listener: %w", proto, err)
	}
	b.listeners = append(b.listeners, ln)
	if proto != "smtp" || tlsConfig != nil { // the plain SMTP one is logged when all is up
		ev := b.log.Info().Str("proto", proto).Str("listen", ln.Addr().String()).Bool("implicit_tls", tlsConfig != nil)
		switch proto {
		case "pop3":
			ev = ev.Str("upstream", b.cfg.POP3.Upstream)
		case "imap":
			ev = ev.Str("upstream", b.cfg.IMAP.Upstream)
		}
		ev.Msg("listening")
	}
	if host, _, _ := net.SplitHostPort(addr); proto != "admin" && !config.IsLoopbackHost(host) && tlsConfig == nil {
		local := map[string]*tls.Config{"smtp": b.res.SMTPTLS, "pop3": b.res.POP3TLS, "imap": b.res.IMAPTLS}[proto]
		if local == nil {
			b.log.Warn().Str("proto", proto).Str("listen", addr).Msg("PLAINTEXT ON THE NETWORK: clients send their passwords unencrypted to this address (allow_plaintext_on_network = true); configure tls_cert and tls_key")
		}
	}
	return ln, nil
}

// addr returns ln's address, "" for none.
func addr(ln net.Listener) string {
	if ln == nil {
		return ""
	}
	return ln.Addr().String()
}

// SMTPAddr is the address the SMTP listener is bound to, "" if SMTP is
// off.
func (b *Bridge) SMTPAddr() string { return addr(b.smtpFront.ln) }

// SMTPTLSAddr is the address of the implicit-TLS SMTP listener, "" if none.
func (b *Bridge) SMTPTLSAddr() string { return addr(b.smtpFront.tlsLn) }

// POP3Addr is the address the POP3 listener is bound to, "" if POP3 is off.
func (b *Bridge) POP3Addr() string { return addr(b.pop3Front.ln) }

// IMAPAddr is the address the IMAP listener is bound to, "" if IMAP is off.
func (b *Bridge) IMAPAddr() string { return addr(b.imapFront.ln) }

// IMAPTLSAddr is the address of the implicit-TLS IMAP listener, "" if none.
func (b *Bridge) IMAPTLSAddr() string { return addr(b.imapFront.tlsLn) }

// POP3TLSAddr is the address of the implicit-TLS POP3 listener, "" if none.
func (b *Bridge) POP3TLSAddr() string { return addr(b.pop3Front.tlsLn) }

// AdminAddr is the address of the /metrics and /healthz listener, "" if
// none.
func (b *Bridge) AdminAddr() string { return addr(b.adminLn) }

// Connections returns how many client connections are open and how many
// of them are busy.
func (b *Bridge) Connections() (open, busy int) { return b.conns.Counts() }

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
		err := b.smtp.Shutdown(context.Background())
		if errors.Is(err, net.ErrClosed) {
			err = nil // closed above already
		}
		b.pop3.Wait()
		b.imap.Wait()
		done <- err
	}()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		b.conns.CloseIdle(250 * time.Millisecond)
		select {
		case err := <-done:
			b.cancelBase()
			b.served.Wait()
			err = errors.Join(err, b.stopOutbox(ctx))
			b.closeOutbox()
			b.accounts.CloseIdleConnections()
			return err
		case <-ctx.Done():
			b.cancelBase()
			b.smtp.Close()
			b.conns.CloseAll()
			<-done
			b.served.Wait()
			b.stopOutbox(ctx)
			b.closeOutbox()
			b.accounts.CloseIdleConnections()
			return fmt.Errorf("shutdown: sessions still busy were closed: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// closeOutbox lets another bridge open the outbox once this one has
// stopped using it.
func (b *Bridge) closeOutbox() {
	if b.outbox != nil {
		b.outbox.Store().Close()
	}
}

// stopOutbox stops dispatching, lets deliveries in progress finish until
// ctx ends, then interrupts them: an interrupted message stays queued.
func (b *Bridge) stopOutbox(ctx context.Context) error {
	if b.outbox == nil || b.stopWorker == nil {
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

// Outbox returns the outbox's files, nil when it is off.
func (b *Bridge) Outbox() *outbox.Store {
	if b.outbox == nil {
		return nil
	}
	return b.outbox.Store()
}

// QueueDepth returns the number of messages the outbox's worker holds and
// the age of the oldest; 0 when the outbox is off.
func (b *Bridge) QueueDepth() (int, time.Duration) {
	if b.outbox == nil {
		return 0, 0
	}
	return b.outbox.Depth()
}

// Reload puts the accounts of cfg (already loaded and validated) in force
// for new sessions; sessions already logged in go on with theirs. Settings
// other than the accounts need a restart: the ones that changed are named
// in the log.
func (b *Bridge) Reload(cfg *config.Config) error {
	res, err := cfg.Resolve()
	if err != nil {
		return err
	}
	set := b.accounts.Load(cfg, res)
	var restart []string
	old := b.cfg
	for key, changed := range map[string]bool{
		"smtp":   !reflect.DeepEqual(old.SMTP, cfg.SMTP),
		"pop3":   !reflect.DeepEqual(old.POP3, cfg.POP3),
		"imap":   !reflect.DeepEqual(old.IMAP, cfg.IMAP),
		"outbox": !reflect.DeepEqual(old.Outbox, cfg.Outbox),
		"admin":  old.Admin != cfg.Admin,
		"log":    old.Log != cfg.Log,
	} {
		if changed {
			restart = append(restart, "["+key+"]")
		}
	}
	slices.Sort(restart)
	ev := b.log.Info().Int("accounts", len(set.All()))
	if len(restart) > 0 {
		ev = ev.Strs("need_restart", restart)
	}
	ev.Msg("configuration reloaded: accounts apply to new sessions")
	go b.checkCredentials(set.All(), 30*time.Second)
	for _, a := range set.All() {
		if w := a.Config.SecretExpiryWarning(time.Now()); w != "" {
			b.log.Warn().Str("account", a.Config.Name).Time("client_secret_expires", a.Config.ClientSecretExpires).Msg(w)
		}
	}
	return nil
}

// ReloadFrom reads the configuration file at path and applies its
// accounts; an invalid file changes nothing.
func (b *Bridge) ReloadFrom(path string) error {
	cfg, _, err := config.LoadResolved(path)
	if err == nil {
		err = b.Reload(cfg)
	}
	if err != nil {
		b.log.Error().Err(err).Str("config", path).Msg("reload refused: the running configuration stays in force")
	}
	return err
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

// credentialsRecheck is how often an account whose sign-in Microsoft
// refused is tried again, so that a fix made in the portal is noticed.
const credentialsRecheck = time.Minute

// watchCredentials fetches again, every minute until shutdown, the Graph
// token of the accounts whose sign-in was refused.
func (b *Bridge) watchCredentials() {
	tick := time.NewTicker(credentialsRecheck)
	defer tick.Stop()
	for {
		select {
		case <-b.baseCtx.Done():
			return
		case <-tick.C:
		}
		var refused []*account.Account
		for _, a := range b.Accounts() {
			if failure.Classify(a.GraphTokens.LastError()).Kind == failure.Credentials {
				refused = append(refused, a)
			}
		}
		b.checkCredentials(refused, 30*time.Second)
	}
}

// waitForSignIn checks the accounts' credentials (checkCredentials) and
// waits for the outcome at most SignInWait, so that a message for an
// account Microsoft refuses is answered 451 from the first one. On a slow
// link the sign-in goes on after the start, up to 30 s, and each outcome
// is logged when it comes (cutting it short would log a timeout instead
// of the answer).
func (b *Bridge) waitForSignIn() {
	done := make(chan struct{})
	b.serve(func() {
		defer close(done)
		b.checkCredentials(b.Accounts(), 30*time.Second)
	})
	wait := b.signInWait
	if wait <= 0 {
		wait = 5 * time.Second
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		b.log.Info().Dur("waited", wait).Msg("signing in to Microsoft 365 takes long: starting meanwhile; each account's sign-in is logged when it ends")
	}
}

// checkCredentials fetches the Graph token of each account, all at once,
// waiting at most limit: an account refused for a reason only an
// administrator can fix has MAIL FROM answered 451 until a token is had.
// An outage of the token endpoint does not count: its messages queue.
func (b *Bridge) checkCredentials(accounts []*account.Account, limit time.Duration) {
	ctx, cancel := context.WithTimeout(b.baseCtx, limit)
	defer cancel()
	var wg sync.WaitGroup
	for _, a := range accounts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := a.GraphTokens.Token(ctx)
			switch f := failure.Classify(err); {
			case err == nil:
				b.log.Info().Str("account", a.Config.Name).Str("tenant_id", a.Config.TenantID).Msg("signed in to Microsoft 365")
				b.logPermissions(ctx, a)
			case f.Kind == failure.Credentials:
				b.log.Error().Err(err).Str("account", a.Config.Name).Str("reason", string(f.Kind)).Str("hint", f.Hint).
					Msg("Microsoft 365 refuses this account's sign-in: its messages are refused (451) until it is fixed")
			case unreachable(err):
				b.log.Warn().Err(err).Str("account", a.Config.Name).Str("reason", string(f.Kind)).Str("hint", b.reachHint(a)).
					Msg("Microsoft 365 cannot be reached: messages are queued (or answered 451 with the outbox off) until it can")
			default:
				ev := b.log.Warn().Err(err).Str("account", a.Config.Name).Str("reason", string(f.Kind))
				if f.Hint != "" {
					ev = ev.Str("hint", f.Hint)
				}
				ev.Msg("the sign-in to Microsoft 365 failed: it is tried again for each message")
			}
		}()
	}
	wg.Wait()
}

// logPermissions says, from the Graph token's roles, what the app may do
// beyond this configuration's mailboxes (a warning with the way to scope
// it), or that sending relies on an RBAC assignment.
func (b *Bridge) logPermissions(ctx context.Context, a *account.Account) {
	if !a.Config.Uses("smtp") {
		return
	}
	roles, ok := graphRoles(ctx, a)
	if !ok {
		return
	}
	if wide := wideRoles(roles); len(wide) > 0 {
		b.log.Warn().Str("account", a.Config.Name).Strs("tenant_wide", wide).
			Str("hint", removeConsentHint(wide, sendingAs(&a.Config))+"; mailbridge check prints the commands for this configuration").
			Msg("the app's permissions reach every mailbox in the tenant, not only this configuration's")
	}
	if !slices.Contains(roles, "Mail.Send") {
		b.log.Info().Str("account", a.Config.Name).
			Msg("the Graph token lists no Mail.Send: sending relies on an RBAC for Applications assignment (mailbridge check -send-test ADDRESS proves it)")
	}
}

// probeSentItems looks once in each sending account's Sent Items, as a
// send with an unknown outcome would, and says once when the app may not:
// its messages are then sent again, not looked up, after a lost answer.
func (b *Bridge) probeSentItems(accounts []*account.Account) {
	ctx, cancel := context.WithTimeout(b.baseCtx, 30*time.Second)
	defer cancel()
	for _, a := range accounts {
		if !a.Config.Uses("smtp") || a.GraphTokens.LastError() != nil {
			continue // a refused sign-in has its own line
		}
		_, _, err := a.Graph.FindSent(ctx, a.Config.Mailbox, probeMessageID, time.Time{})
		if failure.IsAccessDenied(err) {
			b.log.Warn().Str("account", a.Config.Name).Str("mailbox", a.Config.Mailbox).Str("hint", deliver.ReadPermissionHint).
				Msg("delivery is not exactly once for this account: the app may not read Sent Items, so a message whose Graph answer is lost is sent again (flagged possible_duplicate) instead of being looked up")
		}
	}
}

// probeMessageID is a Message-ID no message has, for looking in Sent Items.
const probeMessageID = "<mailbridge-probe@mailbridge.invalid>"

// health reports whether the bridge is serving and every account's last
// token request succeeded (or none was made yet), with the reasons if not.
func (b *Bridge) health() (bool, []string) {
	var reasons []string
	if !b.serving.Load() {
		reasons = append(reasons, "the listeners are not up")
	}
	if b.outbox != nil {
		if n, oldest := b.outbox.Depth(); n > 0 && oldest > b.cfg.Admin.MaxQueueAge.Duration {
			reasons = append(reasons, fmt.Sprintf("outbox: %d message(s) queued, the oldest for %s (admin.max_queue_age %s): Graph is not taking them, see the outbox's log lines",
				n, oldest.Round(time.Second), b.cfg.Admin.MaxQueueAge.Duration))
		}
		if err := b.outbox.FailedDirError(); err != nil {
			reasons = append(reasons, fmt.Sprintf("outbox: a failed message could not be moved to outbox/failed (%v): free space or make it a directory again; the message stays queued", err))
		}
		if _, recent := b.outbox.Store().Failed(time.Now().Add(-b.cfg.Admin.FailedWindow.Duration)); recent > 0 {
			reasons = append(reasons, fmt.Sprintf("outbox: %d message(s) failed within admin.failed_window (%s): see the status page or `mailbridge queue list`; Retry or Delete there (or `queue retry-failed`, `queue delete`) clears this",
				recent, b.cfg.Admin.FailedWindow.Duration))
		}
	}
	for _, a := range b.Accounts() {
		for _, ts := range []*upstream.TokenSource{a.GraphTokens, a.OutlookTokens} {
			if err := ts.LastError(); err != nil {
				r := fmt.Sprintf("account %s: %v", a.Config.Name, err)
				var tokErr *upstream.TokenError
				if errors.As(err, &tokErr) {
					r += " (fix: " + tokErr.Hint() + ")"
				}
				reasons = append(reasons, r)
			}
		}
	}
	return len(reasons) == 0, reasons
}
