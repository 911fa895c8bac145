package upstream

import (
	"syscall"
	"unsafe"
)

// fionread is Winsock's FIONREAD: the bytes a recv would return now.
const fionread = 0x4004667f

// socketUnread reports the bytes received on the socket and not read yet
// (WSAIoctl FIONREAD).
func socketUnread(raw syscall.RawConn) int {
	var n, returned uint32
	raw.Control(func(fd uintptr) {
		syscall.WSAIoctl(syscall.Handle(fd), fionread, nil, 0, (*byte)(unsafe.Pointer(&n)), 4, &returned, nil, 0)
	})
	return int(n)
}
