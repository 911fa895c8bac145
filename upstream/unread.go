package upstream

import (
	"crypto/tls"
	"net"
	"syscall"
)

// MoreArriving returns a function that reports whether bytes from c's
// peer have arrived that nobody has read yet (see Unread), so that a relay
// can gather small reads rather than write each at once. Where that cannot
// be known it always reports false: the relay then writes at once.
func MoreArriving(c net.Conn) func() bool {
	raw := rawConn(c)
	if raw == nil {
		return func() bool { return false }
	}
	return func() bool { return socketUnread(raw) > 0 }
}

// Unread is the number of bytes received on c's socket (c, or the socket
// under a TLS connection) and not read yet, 0 where that cannot be known.
func Unread(c net.Conn) int {
	if raw := rawConn(c); raw != nil {
		return socketUnread(raw)
	}
	return 0
}

func rawConn(c net.Conn) syscall.RawConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}
