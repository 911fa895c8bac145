//go:build windows

package outbox

// syncDir is a no-op on Windows: NTFS journals renames, and a directory
// cannot be opened for FlushFileBuffers without backup privileges.
func syncDir(dir string) error { return nil }
