//go:build !windows

package outbox

import (
	"os"
	"syscall"
	"testing"
)

// An administrator runs `sudo mailbridge queue retry`: the envelopes root
// rewrites must stay the service's, or the service can no longer read
// them (they are 0600).
func TestRootLeavesTheServiceItsFiles(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to own files as another user (CI runs as root)")
	}
	const service = 65534 // nobody, standing in for the mailbridge user
	dir := t.TempDir()
	s, ids := openWithMessages(t, dir, 2, 1)
	for _, sub := range []string{"", "tmp", "queue", "failed"} {
		entries, _ := os.ReadDir(s.path(sub))
		os.Chown(s.path(sub), service, service)
		for _, e := range entries {
			os.Chown(s.path(sub)+"/"+e.Name(), service, service)
		}
	}

	// The service is stopped, and root starts a bridge by hand: the
	// lock it creates must stay the service's to open.
	os.Remove(s.path("lock"))
	s.Close()
	root, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	root.Close()
	if st, err := os.Stat(s.path("lock")); err != nil || st.Sys().(*syscall.Stat_t).Uid != service {
		t.Errorf("the lock root created is not the service's: %v", err)
	}

	admin := Attach(dir)
	if err := admin.Retry(ids[0]); err != nil { // queued: made due now
		t.Fatal(err)
	}
	if n, err := admin.RetryFailed(); n != 1 || err != nil { // failed: back in the queue
		t.Fatalf("retry-failed: %d %v", n, err)
	}
	for _, id := range ids {
		for _, ext := range []string{"json", "eml"} {
			st, err := os.Stat(s.file("queue", id, ext))
			if err != nil {
				t.Fatal(err)
			}
			if uid := st.Sys().(*syscall.Stat_t).Uid; uid != service {
				t.Errorf("queue/%s.%s belongs to uid %d after root's retry, want the service's %d", id, ext, uid, service)
			}
		}
	}
}
