//go:build !windows

package outbox

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// syncDir flushes a directory's entries (renames, new files) to disk.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// keepOwner gives the new file name the owner of dir, the directory it is
// about to be renamed into, when this process runs as root and dir is
// another user's: `sudo mailbridge queue retry` must not leave the service
// (user mailbridge) an envelope it cannot read.
func keepOwner(name, dir string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	st, err := os.Stat(dir)
	if err != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok || sys.Uid == 0 {
		return nil
	}
	if err := os.Lchown(name, int(sys.Uid), int(sys.Gid)); err != nil {
		return fmt.Errorf("outbox: giving %s to the owner of %s: %w", name, dir, err)
	}
	return nil
}

// lockFile takes an exclusive flock on f without waiting; errHeld if
// another process holds it.
func lockFile(f *os.File) error {
	err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return errHeld
	}
	return err
}
