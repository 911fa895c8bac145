// Package account holds the bridge's local users: each account's settings,
// its upstream clients (Graph, Outlook POP3) and token sources, its sender
// policy, the reloadable set of accounts in force, and logging in: the
// bcrypt password check (remembered as a per-process HMAC), the throttle
// that slows down failed logins, and the SASL LOGIN server that go-sasl
// lacks.
//
// It may import bridge/config, bridge/conntrack, bridge/failure,
// bridge/mime and upstream.
package account

import (
	"context"
	"crypto/x509"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"mailbridge/bridge/config"
	"mailbridge/bridge/conntrack"
	"mailbridge/bridge/mime"
	"mailbridge/upstream"

	"github.com/rs/zerolog"
	"golang.org/x/crypto/bcrypt"
)

// ErrBadCredentials is a login with an unknown user name or a wrong
// password; the two are never told apart to the client.
var ErrBadCredentials = errors.New("unknown user name or wrong password")

// ErrTooManyGuesses is a login that got no verdict: the waits booked for
// its account or address were already too long (a temporary refusal).
var ErrTooManyGuesses = errors.New("too many logins waiting for this account or address: try again later")

// Refusal is a failed login: it is ErrBadCredentials, answered after Delay
// (the throttle's pause before the verdict, which the log line shows).
type Refusal struct{ Delay time.Duration }

func (r *Refusal) Error() string { return ErrBadCredentials.Error() }

// Is makes a Refusal ErrBadCredentials for errors.Is.
func (r *Refusal) Is(target error) bool { return target == ErrBadCredentials }

// RefusalDelay returns how long the login refused with err was held
// before its answer, 0 if err is no Refusal.
func RefusalDelay(err error) time.Duration {
	var r *Refusal
	if errors.As(err, &r) {
		return r.Delay
	}
	return 0
}

// Account is a configured local user with its sending policy and upstream
// clients.
type Account struct {
	Config config.AccountConfig
	// GraphTokens are for Graph (send_scope), OutlookTokens for Outlook's
	// POP3 and IMAP services (pop3_scope): two audiences, two tokens.
	GraphTokens   *upstream.TokenSource
	OutlookTokens *upstream.TokenSource
	// Proxy is the proxy the account's connections go through, nil for
	// direct.
	Proxy      *upstream.Proxy
	Graph      *upstream.GraphClient
	POP3Dialer *upstream.POP3Dialer
	IMAPDialer *upstream.IMAPDialer
	// Senders are the addresses the account may send as.
	Senders  mime.SenderPolicy
	password *passwordChecker
}

// Set is the accounts in force: replaced whole by a reload, while sessions
// keep the *Account they logged in with.
type Set struct {
	byUser  map[string]*Account // by lower-case user name
	ordered []*Account
	// cost is the highest bcrypt cost of the accounts' hashes: an unknown
	// user name is refused after a check of that cost, as slow as a
	// wrong password of the slowest account.
	cost int
}

// All returns the accounts in configuration order.
func (s *Set) All() []*Account { return s.ordered }

// Registry builds accounts, keeps the set in force and logs users in.
type Registry struct {
	current   atomic.Pointer[Set]
	newClient func(*upstream.Proxy) *http.Client
	mu        sync.Mutex
	clients   map[string]*clientSet // by proxy (its URL, user and password)
	rootCAs   *x509.CertPool
	key       *[32]byte
	throttle  *throttle
	log       zerolog.Logger
}

// NewRegistry returns an empty registry whose accounts reach Microsoft's
// HTTPS endpoints with the clients newClient makes (one per proxy, nil
// for direct) and trust rootCAs (nil: the system's) for Outlook's mail
// services. A failed login waits failureDelay, doubling with
// each further failure from the same address or for the same account, up
// to 30 times as long. An account over 10 failed logins a minute is
// reported to log.
func NewRegistry(newClient func(*upstream.Proxy) *http.Client, rootCAs *x509.CertPool, failureDelay time.Duration, log zerolog.Logger) *Registry {
	r := &Registry{
		log:       log,
		newClient: newClient,
		clients:   map[string]*clientSet{},
		rootCAs:   rootCAs,
		key:       newProcessKey(),
		throttle:  newThrottle(failureDelay, 30*failureDelay),
	}
	r.current.Store(&Set{byUser: map[string]*Account{}})
	return r
}

// Load builds the accounts of cfg, sharing token sources (and so cached
// tokens) with those that came before, and puts them in force.
func (r *Registry) Load(cfg *config.Config, res *config.Resolved) *Set {
	set := &Set{byUser: map[string]*Account{}}
	for _, ac := range cfg.Accounts {
		ra := res.Accounts[ac.Name]
		cs := r.clientsFor(ra.Proxy)
		graphTokens := cs.tokens.Get(ra.Credentials, ac.SendScope)
		a := &Account{
			Config:        ac,
			GraphTokens:   graphTokens,
			OutlookTokens: cs.tokens.Get(ra.Credentials, ac.POP3Scope),
			Proxy:         ra.Proxy,
			POP3Dialer:    &upstream.POP3Dialer{Addr: ac.POP3Upstream, RootCAs: r.rootCAs, Timeout: cfg.POP3.UpstreamTimeout.Duration},
			IMAPDialer:    &upstream.IMAPDialer{Addr: ac.IMAPUpstream, RootCAs: r.rootCAs, Timeout: cfg.IMAP.UpstreamTimeout.Duration},
			Graph:         upstream.NewGraphClient(ac.GraphURL, cs.http, graphTokens),
			Senders:       ra.Senders,
			password:      newPasswordChecker(ac.PasswordHash, r.key),
		}
		if ra.Proxy != nil {
			a.POP3Dialer.DialContext, a.IMAPDialer.DialContext = ra.Proxy.DialContext, ra.Proxy.DialContext
		}
		set.byUser[strings.ToLower(ac.Username)] = a
		set.ordered = append(set.ordered, a)
		if c, err := bcrypt.Cost([]byte(ac.PasswordHash)); err == nil && c > set.cost {
			set.cost = c
		}
	}
	r.current.Store(set)
	return set
}

// All returns the accounts in force, in configuration order.
func (r *Registry) All() []*Account { return r.current.Load().ordered }

// ByName returns the account in force named name, nil if none.
func (r *Registry) ByName(name string) *Account {
	for _, a := range r.All() {
		if a.Config.Name == name {
			return a
		}
	}
	return nil
}

// Authenticate checks a local user name and password of an account that
// may use protocol, and returns the account. Once the address or the
// account has failed lately, the check waits first, whatever its outcome
// (see throttle.admit); a client that hangs up does not shorten the wait
// of the logins after it. Failures are a *Refusal (ErrBadCredentials);
// a login beyond the booked waits is ErrTooManyGuesses, with no verdict.
func (r *Registry) Authenticate(ctx context.Context, protocol, remoteIP, username, password string) (*Account, error) {
	user := strings.ToLower(username)
	wait, ok := r.throttle.admit(remoteIP, user)
	if !ok {
		r.log.Warn().Str("proto", protocol).Str("remote_ip", remoteIP).Str("username", conntrack.Clip(username)).
			Str("hint", "someone is guessing this account's password from many connections at once; the right password logs in once the guessing stops").
			Msg("login not checked: too many logins waiting for this account or address")
		return nil, ErrTooManyGuesses
	}
	sleep(ctx, wait)
	set := r.current.Load()
	a := set.byUser[user]
	if a != nil && !a.Config.Uses(protocol) {
		a = nil
	}
	if a != nil && a.password.check(password) {
		r.throttle.succeeded(remoteIP, user)
		return a, nil
	}
	if a == nil {
		spendBcrypt(password, set.cost)
	}
	if report := r.throttle.failed(remoteIP, user); report != nil {
		name := ""
		if a != nil {
			name = a.Config.Name
		}
		r.log.Warn().Str("proto", protocol).Str("username", conntrack.Clip(username)).Str("account", name).Strs("remotes", report).
			Str("hint", "someone is guessing this account's password: check the addresses; the right password still logs in").
			Msg("many failed logins for one account within a minute")
	}
	return nil, &Refusal{Delay: wait}
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// clientSet is the HTTP client and token sources of one proxy setting.
type clientSet struct {
	http   *http.Client
	tokens *upstream.TokenSources
}

// clientsFor returns the client set of proxy p, made the first time.
func (r *Registry) clientsFor(p *upstream.Proxy) *clientSet {
	key := "direct"
	if p != nil {
		key = p.String() + "\x00" + p.User + "\x00" + p.Password + "\x00" + strings.Join(p.NoProxy, ",")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	cs := r.clients[key]
	if cs == nil {
		c := r.newClient(p)
		cs = &clientSet{http: c, tokens: upstream.NewTokenSources(c)}
		r.clients[key] = cs
	}
	return cs
}

// CloseIdleConnections closes the idle connections of every HTTP client.
func (r *Registry) CloseIdleConnections() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, cs := range r.clients {
		cs.http.CloseIdleConnections()
	}
}
