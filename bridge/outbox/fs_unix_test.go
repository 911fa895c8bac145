//go:build !windows

package outbox

import (
	"bytes"
	"os"
	"syscall"
	"testing"
	"time"
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
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for range 2 {
		env := &Envelope{Account: "a", GraphUser: "u@example.com", Size: 5, Received: time.Now(), NextAttempt: time.Now().Add(time.Hour)}
		if err := s.Add(env, bytes.NewReader([]byte("hello")), 0); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, env.ID)
	}
	env, _ := s.readEnvelope("queue", ids[1])
	if err := s.fail(env, &FailureRecord{Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	for _, sub := range []string{"", "tmp", "queue", "failed"} {
		entries, _ := os.ReadDir(s.path(sub))
		os.Chown(s.path(sub), service, service)
		for _, e := range entries {
			os.Chown(s.path(sub)+"/"+e.Name(), service, service)
		}
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
