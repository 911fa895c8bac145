package outbox

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestQueueManagement(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for range 3 {
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
	list, err := s.List()
	if err != nil || len(list) != 3 || list[2].State != "failed" || list[2].ID != ids[1] {
		t.Fatalf("list %+v %v", list, err)
	}
	if err := s.Retry(ids[0]); err != nil {
		t.Fatal(err)
	}
	if env, _ := s.readEnvelope("queue", ids[0]); time.Until(env.NextAttempt) > time.Second {
		t.Error("retry did not make the message due")
	}
	if n, err := s.RetryFailed(); n != 1 || err != nil {
		t.Fatalf("retry-failed: %d %v", n, err)
	}
	if env, err := s.readEnvelope("queue", ids[1]); err != nil || env.Failure != nil {
		t.Fatalf("the failed message is not back in the queue: %v", err)
	}
	if err := s.Delete(ids[2]); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ids[2]); err == nil {
		t.Error("deleting twice succeeded")
	}
	if list, _ := s.List(); len(list) != 2 {
		t.Errorf("%d entries left, want 2", len(list))
	}
	// Reopening counts what is queued and clears half-written files.
	os.WriteFile(filepath.Join(dir, "tmp", "junk.eml"), []byte("x"), 0o600)
	os.WriteFile(filepath.Join(dir, "queue", "orphan.eml"), []byte("x"), 0o600)
	s2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if s2.bytes != 10 {
		t.Errorf("reopened outbox counts %d bytes, want 10", s2.bytes)
	}
	if _, err := os.Stat(filepath.Join(dir, "tmp", "junk.eml")); err == nil {
		t.Error("tmp/ not cleared")
	}
	if _, err := os.Stat(filepath.Join(dir, "queue", "orphan.eml")); err == nil {
		t.Error("a message without an envelope was kept")
	}
}
