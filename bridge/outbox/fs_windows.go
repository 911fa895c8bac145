//go:build windows

package outbox

// syncDir is a no-op on Windows: NTFS journals renames, and a directory
// cannot be opened for FlushFileBuffers without backup privileges.
func syncDir(dir string) error { return nil }

// keepOwner is a no-op on Windows: a new file inherits its directory's
// ACL, which lets the service's account (LocalSystem) read it.
func keepOwner(name, dir string) error { return nil }
