package upstream

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// socketUnread reports the bytes received on the socket and not read yet
// (SIOCINQ, which is FIONREAD).
func socketUnread(raw syscall.RawConn) int {
	n := 0
	raw.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) })
	return n
}
