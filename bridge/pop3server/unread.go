package pop3server

import (
	"crypto/tls"
	"net"
	"syscall"
)

// moreArriving returns a function that reports whether bytes from c's
// peer have arrived that nobody has read yet, so that a copy can wait for
// them rather than write what it holds. Where that cannot be known (c is
// not a socket) it always reports false: the copy then writes at once.
func moreArriving(c net.Conn) func() bool {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return func() bool { return false }
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return func() bool { return false }
	}
	return func() bool { return socketUnread(raw) > 0 }
}
