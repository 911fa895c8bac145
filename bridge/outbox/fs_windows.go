//go:build windows

package outbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/windows"
)

// syncDir is a no-op on Windows: NTFS journals renames, and a directory
// cannot be opened for FlushFileBuffers without backup privileges.
func syncDir(dir string) error { return nil }

// keepOwner is a no-op on Windows: a new file inherits its directory's
// ACL, which lets the service's account (LocalSystem) read it.
func keepOwner(name, dir string) error { return nil }

// lockOutbox takes an exclusive lock on name, creating it, and writes this
// process's ID into it for the message another process gets. The locked
// byte lies far past the end of the file: Windows locks are mandatory, and
// the ID must stay readable.
func lockOutbox(name string) (*os.File, error) {
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	ol := &windows.Overlapped{Offset: 0, OffsetHigh: 1 << 30}
	if err := windows.LockFileEx(windows.Handle(f.Fd()), windows.LOCKFILE_EXCLUSIVE_LOCK|windows.LOCKFILE_FAIL_IMMEDIATELY, 0, 1, 0, ol); err != nil {
		b, _ := os.ReadFile(name)
		f.Close()
		if errors.Is(err, windows.ERROR_LOCK_VIOLATION) || errors.Is(err, windows.ERROR_IO_PENDING) {
			return nil, errLocked(filepath.Dir(name), strings.TrimSpace(string(b)))
		}
		return nil, fmt.Errorf("outbox: locking %s: %w", name, err)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\r\n"), 0)
	return f, nil
}
