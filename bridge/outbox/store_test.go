package outbox

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// openWithMessages opens an outbox in dir holding n messages of 5 bytes,
// due in an hour, the one at failed (if in range) moved to failed/.
func openWithMessages(t *testing.T, dir string, n, failed int) (*Store, []string) {
	t.Helper()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for range n {
		env := &Envelope{Account: "a", GraphUser: "u@example.com", Size: 5, Received: time.Now(), NextAttempt: time.Now().Add(time.Hour)}
		if err := s.Add(env, bytes.NewReader([]byte("hello")), 0); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, env.ID)
	}
	if failed >= 0 && failed < n {
		env, _ := s.readEnvelope("queue", ids[failed])
		if err := s.fail(env, &FailureRecord{Reason: "test"}); err != nil {
			t.Fatal(err)
		}
	}
	return s, ids
}

func TestQueueManagement(t *testing.T) {
	dir := t.TempDir()
	s, ids := openWithMessages(t, dir, 3, 1)
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
	s.Close()
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

func TestIDsFromOutsideNeverNameAPath(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(dir, "victim.json")
	if err := os.WriteFile(victim, []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "victim.eml"), []byte("x"), 0o600)
	w := New(s, Options{})
	for _, id := range []string{"../victim", "..", "", "a/b", `..\victim`, "x\x00"} {
		if err := s.Delete(id); err == nil {
			t.Errorf("Delete(%q) succeeded", id)
		}
		if err := s.Retry(id); err == nil {
			t.Errorf("Retry(%q) succeeded", id)
		}
		if err := w.Delete(id); err == nil {
			t.Errorf("Outbox.Delete(%q) succeeded", id)
		}
		if _, err := w.Retry(id); err == nil {
			t.Errorf("Outbox.Retry(%q) succeeded", id)
		}
	}
	if _, err := os.Stat(victim); err != nil {
		t.Error("a file outside queue/ and failed/ was removed")
	}
}

// A failed message put back in the queue while a rescan finds it is held
// once, so it is delivered once.
func TestRetriedMessageIndexedOnce(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	env := &Envelope{Account: "a", GraphUser: "u@example.com", Size: 5, Received: time.Now(), NextAttempt: time.Now()}
	if err := s.Add(env, bytes.NewReader([]byte("hello")), 0); err != nil {
		t.Fatal(err)
	}
	if err := s.fail(env, &FailureRecord{Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	w := New(s, Options{})
	if err := s.Retry(env.ID); err != nil {
		t.Fatal(err)
	}
	w.rescan() // the worker's rescan sees it first...
	back, err := s.readEnvelope("queue", env.ID)
	if err != nil {
		t.Fatal(err)
	}
	w.enqueue(back) // ...then Outbox.Retry makes it known
	if len(w.index) != 1 || w.ready.Len() != 1 {
		t.Errorf("the message is held %d times in the index and %d in the schedule, want once", len(w.index), w.ready.Len())
	}
}

// `mailbridge queue` while the bridge accepts a message: Attach must leave
// what Add is in the middle of writing as it is. Open would take the
// message file renamed into queue/ before its envelope for a crash's
// leftover and remove it, and the bridge would then answer 250 for an
// envelope without its message.
func TestAttachLeavesAMessageBeingAcceptedAlone(t *testing.T) {
	dir := t.TempDir()
	owner, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	done := &Envelope{Account: "a", GraphUser: "u@example.com", Size: 5, Received: time.Now(), NextAttempt: time.Now().Add(time.Hour)}
	if err := owner.Add(done, bytes.NewReader([]byte("hello")), 0); err != nil {
		t.Fatal(err)
	}
	// Add half done: both files written to tmp/, the message renamed in.
	inFlight := &Envelope{ID: newQueueID(), Account: "a", GraphUser: "u@example.com", Size: 5, Received: time.Now(), NextAttempt: time.Now()}
	os.WriteFile(owner.file("queue", inFlight.ID, "eml"), []byte("hi 2\n"), 0o600)
	b, _ := json.Marshal(inFlight)
	os.WriteFile(owner.file("tmp", inFlight.ID, "json"), b, 0o600)
	os.WriteFile(owner.file("tmp", "being-written", "eml"), []byte("par"), 0o600)

	admin := Attach(dir)
	list, err := admin.List()
	if err != nil || len(list) != 1 || list[0].ID != done.ID {
		t.Fatalf("list: %+v %v", list, err)
	}
	if err := admin.Retry(done.ID); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{owner.file("queue", inFlight.ID, "eml"), owner.file("tmp", inFlight.ID, "json"), owner.file("tmp", "being-written", "eml")} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("Attach's store removed %s, which Add was writing: %v", filepath.Base(f), err)
		}
	}
	// Add ends: the envelope is renamed in, and the message is whole.
	if err := os.Rename(owner.file("tmp", inFlight.ID, "json"), owner.file("queue", inFlight.ID, "json")); err != nil {
		t.Fatal(err)
	}
	if _, err := owner.readEnvelope("queue", inFlight.ID); err != nil {
		t.Errorf("the accepted message is not whole: %v", err)
	}
}

func TestAttachToAnOutboxNotCreatedYet(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "outbox")
	s := Attach(dir)
	if list, err := s.List(); err != nil || len(list) != 0 {
		t.Errorf("list: %v %v", list, err)
	}
	if n, err := s.RetryFailed(); n != 0 || err != nil {
		t.Errorf("retry-failed: %d %v", n, err)
	}
	if err := s.Retry("20261207T000000-00"); err == nil {
		t.Error("retry of a message that is not there succeeded")
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Attach created the outbox (%v): as root it would be root's, and the service could not write to it", err)
	}
}

// A second bridge on the same outbox (`mailbridge serve` started by hand
// beside the service) would clear the first's half-written messages and
// send each queued message a second time: Open refuses it, and says who
// holds the outbox and what to do.
func TestOneBridgePerOutbox(t *testing.T) {
	dir := t.TempDir()
	first, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(first.file("tmp", "being-written", "eml"), []byte("par"), 0o600)
	second, err := Open(dir)
	if err == nil {
		second.Close()
		t.Fatal("a second Open of the same outbox succeeded")
	}
	for _, want := range []string{dir + " is in use by another mailbridge (process " + strconv.Itoa(os.Getpid()) + ")", "stop it first", "its own [outbox] dir"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the refusal %q lacks %q", err, want)
		}
	}
	if _, err := os.Stat(first.file("tmp", "being-written", "eml")); err != nil {
		t.Error("the refused Open cleared the first bridge's tmp/")
	}
	first.Close()
	again, err := Open(dir)
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	again.Close()
}
