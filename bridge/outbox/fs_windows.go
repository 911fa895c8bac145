//go:build windows

package outbox

import (
	"errors"
	"os"

	"golang.org/x/sys/windows"
)

// syncDir is a no-op on Windows: NTFS journals renames, and a directory
// cannot be opened for FlushFileBuffers without backup privileges.
func syncDir(dir string) error { return nil }

// keepOwner is a no-op on Windows: a new file inherits its directory's
// ACL, which lets the service's account (LocalSystem) read it.
func keepOwner(name, dir string) error { return nil }

// lockFile takes an exclusive lock on f without waiting; errHeld if
// another process holds it. The locked byte lies far past the end of the
// file: Windows locks are mandatory, and the holder's ID must stay
// readable.
func lockFile(f *os.File) error {
	ol := &windows.Overlapped{OffsetHigh: 1 << 30}
	err := windows.LockFileEx(windows.Handle(f.Fd()), windows.LOCKFILE_EXCLUSIVE_LOCK|windows.LOCKFILE_FAIL_IMMEDIATELY, 0, 1, 0, ol)
	if errors.Is(err, windows.ERROR_LOCK_VIOLATION) || errors.Is(err, windows.ERROR_IO_PENDING) {
		return errHeld
	}
	return err
}
