package bridge

import (
	"net"
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
	t.mu.Lock()
	var idle []net.Conn
	for c, st := range t.conns {
		if !st.busy.Load() && st.idleSince.Load() < cutoff {
			idle = append(idle, c)
		}
	}
	t.mu.Unlock()
	for _, c := range idle {
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

// closeAll closes every connection, busy or not.
func (t *connTracker) closeAll() {
	t.mu.Lock()
	var all []net.Conn
	for c := range t.conns {
		all = append(all, c)
	}
	t.mu.Unlock()
	for _, c := range all {
		c.Close()
	}
}
