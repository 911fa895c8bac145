//go:build !linux && !windows

package upstream

import "syscall"

// socketUnread is not known here: a copy writes what it holds at once.
func socketUnread(syscall.RawConn) int { return 0 }
