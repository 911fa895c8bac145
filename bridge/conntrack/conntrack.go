// Package conntrack knows the bridge's open client connections: which are
// busy (receiving a message, waiting on Outlook) and which idle, so that a
// shutdown closes the idle ones at once and waits for the busy ones; and
// the listener that refuses connections over a session limit. It also
// makes session IDs.
//
// It imports nothing of the bridge.
package conntrack

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"

	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
)

// Tracker knows every open client connection and whether it is busy
// (receiving a message), so that a shutdown can close the idle ones at once
// and wait for the busy ones.
type Tracker struct {
	mu    sync.Mutex
	conns map[net.Conn]*State
}

// State is one connection's busy flag and login state.
type State struct {
	busy      atomic.Bool
	idleSince atomic.Int64 // unix nanoseconds
	closeNext atomic.Bool
	authed    atomic.Bool
	fails     atomic.Int32 // failed logins
	opened    time.Time
	policy    *LoginPolicy
	timer     *time.Timer
}

// MarkAuthenticated records that the client logged in: the login timeout
// no longer applies, and the connection no longer counts as unauthenticated.
func (s *State) MarkAuthenticated() {
	s.authed.Store(true)
	if s.timer != nil {
		s.timer.Stop()
	}
}

// MaxLoginFailures is how many failed logins a connection may make
// before the bridge closes it.
const MaxLoginFailures = 3

// LoginFailed counts and logs a failed login of username on the
// connection; it reports whether that was the last one allowed, and the
// connection must be closed (logged too).
func (s *State) LoginFailed(log zerolog.Logger, username string, delay time.Duration) (closeNow bool) {
	n := s.fails.Add(1)
	log.Warn().Str("username", Clip(username)).Int32("failures", n).Int64("delay_ms", delay.Milliseconds()).
		Msg("authentication failed: unknown user name or wrong password")
	if n < MaxLoginFailures {
		return false
	}
	log.Warn().Msg("session closed: too many failed logins on one connection")
	return true
}

// evictAfter is how long a connection must have been open without logging
// in before it may be closed to make room for a new one.
const evictAfter = 2 * time.Second

// LoginPolicy bounds the connections of one protocol that have not logged
// in: each is closed after Timeout, and at most MaxUnauthenticated of
// them are open at once (a new one closes the oldest), so that idle
// connections never keep authenticated clients out.
type LoginPolicy struct {
	Timeout            time.Duration
	MaxUnauthenticated int
	// Key names the timeout's setting for the log, such as
	// "smtp.login_timeout".
	Key string
	Log zerolog.Logger
	// Opened and Closed, if set, are called as connections open and close
	// (the active-sessions metric).
	Opened, Closed func()
}

// EvictUnauthenticated closes one connection of policy p that has not
// logged in, to make room for a new client at the session limit: the
// oldest of the remote address that holds the most such connections (a
// flood from one address costs that address its connections, not a
// client elsewhere its login). It reports whether it closed one.
func (t *Tracker) EvictUnauthenticated(p *LoginPolicy) bool {
	t.mu.Lock()
	perIP := map[string]int{}
	type candidate struct {
		c      *trackedConn
		opened time.Time
	}
	oldest := map[string]candidate{}
	for other, st := range t.conns {
		oc, ok := other.(*trackedConn)
		if !ok || st.policy != p || st.authed.Load() {
			continue
		}
		ip, _, _ := net.SplitHostPort(oc.RemoteAddr().String())
		perIP[ip]++
		if o, ok := oldest[ip]; !ok || st.opened.Before(o.opened) {
			oldest[ip] = candidate{oc, st.opened}
		}
	}
	victimIP := ""
	for ip, n := range perIP {
		if victimIP == "" || n > perIP[victimIP] || (n == perIP[victimIP] && oldest[ip].opened.Before(oldest[victimIP].opened)) {
			victimIP = ip
		}
	}
	t.mu.Unlock()
	if victimIP == "" {
		return false
	}
	victim := oldest[victimIP].c
	p.Log.Warn().Str("remote", victim.RemoteAddr().String()).Int("not_logged_in_from_there", perIP[victimIP]).
		Str("hint", "connections that do not log in held every session slot; if this repeats, look at what runs on that address").
		Msg("connection closed: the session limit is reached, and this one, of the address with the most, had not logged in")
	victim.Close()
	return true
}

// CloseAfterNextWrite closes the connection once the next reply has been
// written to it (the 421 of a session the bridge ends).
func (s *State) CloseAfterNextWrite() { s.closeNext.Store(true) }

// SetBusy marks the connection busy, or idle from now.
func (s *State) SetBusy(busy bool) {
	if !busy {
		s.idleSince.Store(time.Now().UnixNano())
	}
	s.busy.Store(busy)
}

// Wrap returns ln whose accepted connections are tracked.
func (t *Tracker) Wrap(ln net.Listener) net.Listener { return &trackedListener{Listener: ln, t: t} }

// WrapLogin is Wrap with a login policy for the connections of ln.
func (t *Tracker) WrapLogin(ln net.Listener, p *LoginPolicy) net.Listener {
	return &trackedListener{Listener: ln, t: t, policy: p}
}

func (t *Tracker) add(c net.Conn, p *LoginPolicy) *trackedConn {
	st := &State{opened: time.Now(), policy: p}
	st.SetBusy(false)
	tc := &trackedConn{Conn: c, t: t, state: st}
	var evict *trackedConn
	t.mu.Lock()
	if t.conns == nil {
		t.conns = map[net.Conn]*State{}
	}
	if p != nil && p.MaxUnauthenticated > 0 {
		n := 0
		var oldest time.Time
		for other, ost := range t.conns {
			if ost.policy == p && !ost.authed.Load() {
				n++
				// A client logs in within milliseconds of connecting: only
				// one silent for longer is taken for an idler.
				if oc, ok := other.(*trackedConn); ok && time.Since(ost.opened) > evictAfter && (evict == nil || ost.opened.Before(oldest)) {
					evict, oldest = oc, ost.opened
				}
			}
		}
		if n < p.MaxUnauthenticated {
			evict = nil
		}
	}
	t.conns[tc] = st
	t.mu.Unlock()
	if p != nil {
		if p.Opened != nil {
			p.Opened()
		}
		if evict != nil {
			p.Log.Warn().Str("remote", evict.RemoteAddr().String()).Int("max_unauthenticated", p.MaxUnauthenticated).
				Msg("connection closed: the oldest of too many that have not logged in, to make room")
			evict.Close()
		}
		if p.Timeout > 0 {
			st.timer = time.AfterFunc(p.Timeout, func() {
				if !st.authed.Load() {
					p.Log.Warn().Str("remote", c.RemoteAddr().String()).Dur("login_timeout", p.Timeout).
						Str("hint", "the client connected but did not log in within "+p.Key).Msg("connection closed: not logged in in time")
					tc.Close()
				}
			})
		}
	}
	return tc
}

// StateOf returns the state of a tracked connection (or of the tracked
// connection under a TLS one); an untracked one gets a state nobody reads.
func (t *Tracker) StateOf(c net.Conn) *State {
	t.mu.Lock()
	defer t.mu.Unlock()
	// TLS (implicit or STARTTLS) and the SMTP guard wrap the tracked
	// connection.
	for range 4 {
		if st := t.conns[c]; st != nil {
			return st
		}
		w, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = w.NetConn()
	}
	return &State{} // not tracked: a state nobody reads
}

// CloseIdle closes the connections that have not been busy for at least
// grace (long enough for the reply to the last message to be written).
func (t *Tracker) CloseIdle(grace time.Duration) {
	cutoff := time.Now().Add(-grace).UnixNano()
	t.closeWhere(func(st *State) bool { return !st.busy.Load() && st.idleSince.Load() < cutoff })
}

// Counts returns how many tracked connections are open and how many of
// them are busy.
func (t *Tracker) Counts() (open, busy int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, st := range t.conns {
		open++
		if st.busy.Load() {
			busy++
		}
	}
	return open, busy
}

// CloseAll closes every connection, busy or not.
func (t *Tracker) CloseAll() { t.closeWhere(func(*State) bool { return true }) }

func (t *Tracker) closeWhere(match func(*State) bool) {
	t.mu.Lock()
	var conns []net.Conn
	for c, st := range t.conns {
		if match(st) {
			conns = append(conns, c)
		}
	}
	t.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

type trackedListener struct {
	net.Listener
	t      *Tracker
	policy *LoginPolicy
}

func (l *trackedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.t.add(c, l.policy), nil
}

type trackedConn struct {
	net.Conn
	t     *Tracker
	state *State
	once  sync.Once
}

func (c *trackedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if c.state.closeNext.Load() {
		c.Close()
	}
	return n, err
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.t.mu.Lock()
		delete(c.t.conns, c)
		c.t.mu.Unlock()
		if c.state.timer != nil {
			c.state.timer.Stop()
		}
		if p := c.state.policy; p != nil && p.Closed != nil {
			p.Closed()
		}
	})
	return c.Conn.Close()
}

// LimitListener refuses connections over the session limit with the
// protocol's refusal (SMTP's 421, RFC 5321 §3.8) instead of letting them
// queue. With Evict set, a full house first closes a connection that has
// not logged in, so that idlers can never keep a client from the login.
type LimitListener struct {
	net.Listener
	// Slots holds a token for each open session; its capacity is the limit.
	Slots chan struct{}
	// Refusal is the line written to a refused client, with its CRLF.
	Refusal string
	// Key names the limit's key for the log.
	Key string
	// Evict, if set, closes one connection that has not logged in (its
	// slot is free when it returns true).
	Evict func() bool
	// Log is the protocol's logger (it carries "proto").
	Log zerolog.Logger
}

func (l *LimitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.Slots <- struct{}{}:
			return &slotConn{Conn: c, release: func() { <-l.Slots }}, nil
		default:
		}
		if l.Evict != nil && l.Evict() {
			select {
			case l.Slots <- struct{}{}:
				return &slotConn{Conn: c, release: func() { <-l.Slots }}, nil
			default:
			}
		}
		l.Log.Warn().Str("remote", c.RemoteAddr().String()).Int("max_sessions", cap(l.Slots)).Msg("session refused: " + l.Key + " reached")
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, l.Refusal)
		c.Close()
	}
}

// slotConn gives its session slot back when closed.
type slotConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *slotConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}

// SessionID returns a new random session ID for the log.
func SessionID() string {
	b := make([]byte, 6)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// IdleListener returns ln whose connections push their read deadline, when
// one is set, to timeout from now whenever bytes arrive: a deadline set
// for a whole message (go-smtp sets one at each command) then means
// "silent for timeout", and a slow but live client is never cut off.
func IdleListener(ln net.Listener, timeout time.Duration) net.Listener {
	return &idleListener{Listener: ln, timeout: timeout}
}

type idleListener struct {
	net.Listener
	timeout time.Duration
}

func (l *idleListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &idleConn{Conn: c, timeout: l.timeout}, nil
}

type idleConn struct {
	net.Conn
	timeout  time.Duration
	deadline atomic.Bool // a read deadline is set
}

func (c *idleConn) SetReadDeadline(t time.Time) error {
	c.deadline.Store(!t.IsZero())
	return c.Conn.SetReadDeadline(t)
}

func (c *idleConn) SetDeadline(t time.Time) error {
	c.deadline.Store(!t.IsZero())
	return c.Conn.SetDeadline(t)
}

func (c *idleConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 && c.deadline.Load() {
		c.Conn.SetReadDeadline(time.Now().Add(c.timeout))
	}
	return n, err
}

// MaxLogged bounds a value a client chose (HELO, user name, address,
// command argument) in a log line.
const MaxLogged = 256

// Clip returns s cut at MaxLogged bytes and marked as cut, for the log.
func Clip(s string) string {
	if len(s) <= MaxLogged {
		return s
	}
	return s[:MaxLogged] + "…(truncated)"
}

// Sessions runs each connection a listener accepts in a goroutine of its
// own, and waits for them to end: the POP3 and IMAP servers' accept loop.
type Sessions struct{ wg sync.WaitGroup }

// Serve accepts connections on ln until it is closed, running serve for
// each; an accept error other than a closed listener is logged.
func (s *Sessions) Serve(ln net.Listener, log zerolog.Logger, serve func(net.Conn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Error().Err(err).Msg("listener stopped")
			}
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			serve(c)
		}()
	}
}

// Wait waits until every session Serve started has ended.
func (s *Sessions) Wait() { s.wg.Wait() }
