//go:build !windows

package outbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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

// lockOutbox takes an exclusive flock on name, creating it, and writes this
// process's ID into it for the message another process gets.
func lockOutbox(name string) (*os.File, error) {
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(name)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, errLocked(filepath.Dir(name), strings.TrimSpace(string(b)))
		}
		return nil, fmt.Errorf("outbox: locking %s: %w", name, err)
	}
	// Created by root (`sudo mailbridge serve` while the service is
	// stopped), it must stay openable by the service's user.
	if err := keepOwner(name, filepath.Dir(name)); err != nil {
		f.Close()
		return nil, err
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return f, nil
}
