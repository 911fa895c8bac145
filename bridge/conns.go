package bridge

import (
	"crypto/tls"
	"net"

	"github.com/rs/zerolog"
	"sync"
	"sync/atomic"
	"time"
)

// connTracker knows every open client connection and whether it is busy
// (receiving a message), so that a shutdown can close the idle ones at once
// and wait for the busy ones.
type connTracker struct {
	mu    sync.Mutex
	conns map[net.Conn]*connState
}

type connState struct {
	busy      atomic.Bool
	idleSince atomic.Int64 // unix nanoseconds
}

func (s *connState) setBusy(busy bool) {
	if !busy {
		s.idleSince.Store(time.Now().UnixNano())
	}
	s.busy.Store(busy)
}

func (t *connTracker) wrap(ln net.Listener) net.Listener { return &trackedListener{Listener: ln, t: t} }

func (t *connTracker) add(c net.Conn) *trackedConn {
	st := &connState{}
	st.setBusy(false)
	t.mu.Lock()
	if t.conns == nil {
		t.conns = map[net.Conn]*connState{}
	}
	tc := &trackedConn{Conn: c, t: t, state: st}
	t.conns[tc] = st
	t.mu.Unlock()
	return tc
}

func (t *connTracker) state(c net.Conn) *connState {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn() // implicit TLS and STARTTLS wrap the tracked connection
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if st := t.conns[c]; st != nil {
		return st
	}
	return &connState{} // not tracked: a state nobody reads
}

// closeIdle closes the connections that have not been busy for at least
// grace (long enough for the reply to the last message to be written).
func (t *connTracker) closeIdle(grace time.Duration) {
	cutoff := time.Now().Add(-grace).UnixNano()
	t.closeWhere(func(st *connState) bool { return !st.busy.Load() && st.idleSince.Load() < cutoff })
}

// closeAll closes every connection, busy or not.
func (t *connTracker) closeAll() { t.closeWhere(func(*connState) bool { return true }) }

func (t *connTracker) closeWhere(match func(*connState) bool) {
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
	t *connTracker
}

func (l *trackedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.t.add(c), nil
}

type trackedConn struct {
	net.Conn
	t     *connTracker
	state *connState
	once  sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.t.mu.Lock()
		delete(c.t.conns, c)
		c.t.mu.Unlock()
	})
	return c.Conn.Close()
}

// sessionLimitListener refuses connections over the session limit with a
// 421 reply (RFC 5321 §3.8) instead of letting them queue.
type sessionLimitListener struct {
	net.Listener
	slots chan struct{}
	log   zerolog.Logger
}

func (l *sessionLimitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.slots <- struct{}{}:
			return &slotConn{Conn: c, release: func() { <-l.slots }}, nil
		default:
			l.log.Warn().Str("proto", "smtp").Str("remote", c.RemoteAddr().String()).Int("max_sessions", cap(l.slots)).Msg("session refused: smtp.max_sessions reached")
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			c.Write([]byte("421 4.3.2 Too many sessions, try again later\r\n"))
			c.Close()
		}
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
