// Package outbox is the durable queue between the SMTP side and Graph: the
// client hears 250 only when the message and its envelope are on disk
// (both files fsynced, renamed into queue/, the directory fsynced), and a
// worker delivers them, at most 4 at once per mailbox, within a rate per
// account, retrying with Graph's Retry-After or backoff, and moving what
// cannot go to failed/ with the reason and the fix.
//
// Files:
//
//	<dir>/tmp/      files being written; emptied at start-up
//	<dir>/queue/    <id>.eml (the message as Graph gets it) and <id>.json
//	                (its envelope); the envelope is renamed in last, so an
//	                entry without one was never acknowledged
//	<dir>/failed/   messages that cannot be delivered, with the reason
//
// A message Graph accepted has its envelope renamed to <id>.sent before
// its files are removed, so that a crash in between never sends it twice.
//
// The outbox implements deliver.Submitter, as direct delivery does. It may
// import bridge/account, bridge/admin, bridge/deliver, bridge/failure and
// bridge/mime.
package outbox

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mailbridge/bridge/failure"
	bmime "mailbridge/bridge/mime"
	"mime"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Envelope is what the outbox knows of a queued message.
type Envelope struct {
	ID           string    `json:"id"`
	Account      string    `json:"account"`
	From         string    `json:"from"`
	Recipients   []string  `json:"recipients"`
	GraphUser    string    `json:"graph_user"`
	FallbackUser string    `json:"fallback_user,omitempty"`
	Size         int64     `json:"size"`
	Received     time.Time `json:"received"`
	Attempts     int       `json:"attempts"`
	NextAttempt  time.Time `json:"next_attempt"`
	LastError    string    `json:"last_error,omitempty"`
	// LastReason is LastError's cause in a few words, LastHint its fix:
	// what `queue list` and the status page show.
	LastReason string `json:"last_reason,omitempty"`
	LastHint   string `json:"last_hint,omitempty"`
	// Session, Remote and MessageID name where the message came from, for
	// the log lines of its delivery, after a restart too.
	Session   string `json:"session,omitempty"`
	Remote    string `json:"remote,omitempty"`
	MessageID string `json:"message_id,omitempty"`
	// Subject is the message's Subject for the log, decoded and clipped.
	Subject string `json:"subject,omitempty"`
	// InFlight is set, durably, before each attempt at Graph and cleared
	// after it: found set at start-up, it means a crash during an attempt
	// whose outcome is unknown.
	InFlight bool `json:"in_flight,omitempty"`
	// OutcomeUnknown is set when an attempt's send reached Graph whole and
	// got no clear answer, and no look-up in Sent Items settled it yet:
	// the next attempt looks there before it sends.
	OutcomeUnknown bool `json:"outcome_unknown,omitempty"`
	// IDReused: another message the bridge took recently had the same
	// Message-ID, so a look-up in Sent Items cannot tell them apart.
	IDReused bool `json:"id_reused,omitempty"`
	// MaybeSent is set when the message was sent again after an unknown
	// outcome without a look-up (no read permission, no usable
	// Message-ID), and kept until it is delivered: its final line says
	// possible_duplicate.
	MaybeSent bool `json:"maybe_sent,omitempty"`
	// DraftID is the draft a large message's attempt created at Graph;
	// found set at start-up, it is deleted before the message goes again.
	DraftID string `json:"draft_id,omitempty"`
	// Failure is set for a message in failed/: why it was given up, and
	// Graph's answer.
	Failure *FailureRecord `json:"failure,omitempty"`
}

// FailureRecord explains why a message was moved to failed/.
type FailureRecord struct {
	Reason      string    `json:"reason"`
	Kind        string    `json:"kind,omitempty"`
	GraphStatus int       `json:"graph_status,omitempty"`
	GraphCode   string    `json:"graph_code,omitempty"`
	RequestID   string    `json:"request_id,omitempty"`
	Hint        string    `json:"hint,omitempty"`
	At          time.Time `json:"at"`
	// The non-delivery report: sent (with Graph's request-id and its
	// recipients), skipped (and why) or failed (and why).
	NDRSent      bool     `json:"ndr_sent"`
	NDRRequestID string   `json:"ndr_request_id,omitempty"`
	NDRTo        []string `json:"ndr_to,omitempty"`
	NDRSkipped   string   `json:"ndr_skipped,omitempty"`
	NDRError     string   `json:"ndr_error,omitempty"`
}

// Store is the outbox's files, without the delivery worker: what
// `mailbridge queue` works on too.
type Store struct {
	dir    string
	shared bool     // opened by Attach: another process may own the outbox
	lock   *os.File // held by Open until Close: one bridge per outbox

	mu    sync.Mutex
	bytes int64 // size of the queued messages
}

// Attach opens an outbox that a running bridge may own, for
// `mailbridge queue`: it creates nothing and clears nothing, because what
// looks half-written may be a message the bridge is accepting right now
// (Open would remove its message file between the two renames of Add, and
// the bridge would then answer 250 for a message without its text). An
// outbox that does not exist yet holds no messages.
func Attach(dir string) *Store { return &Store{dir: dir, shared: true} }

// Open opens (creating if need be) the outbox directory and clears
// what a crash left half-written. Only the bridge that delivers from the
// outbox opens it so; see Attach. It takes the outbox's lock (<dir>/lock)
// until Close, and fails if another process holds it: two bridges on one
// outbox would clear each other's half-written messages and send each
// message twice. The system releases the lock when a process ends, even
// by kill -9.
func Open(dir string) (*Store, error) {
	for _, sub := range []string{"tmp", "queue", "failed"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("outbox: %w", err)
		}
	}
	lock, err := lockOutbox(filepath.Join(dir, "lock"))
	if err != nil {
		return nil, err
	}
	s := &Store{dir: dir, lock: lock}
	tmp, _ := os.ReadDir(s.path("tmp"))
	for _, e := range tmp {
		os.Remove(filepath.Join(s.path("tmp"), e.Name()))
	}
	entries, err := os.ReadDir(s.path("queue"))
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	have := map[string]bool{}
	for _, e := range entries {
		have[e.Name()] = true
	}
	for name := range have {
		id, ext, _ := strings.Cut(name, ".")
		switch ext {
		case "sent": // Graph took it; the crash came before the clean-up
			os.Remove(s.file("queue", id, "eml"))
			os.Remove(s.file("queue", id, "sent"))
		case "eml":
			if !have[id+".json"] && !have[id+".sent"] {
				os.Remove(s.file("queue", id, "eml")) // never acknowledged
			} else if st, err := os.Stat(s.file("queue", id, "eml")); err == nil && have[id+".json"] {
				s.bytes += st.Size()
			}
		}
	}
	return s, nil
}

// Close releases the outbox's lock (see Open); the store must not be used
// after.
func (s *Store) Close() error {
	if s.lock == nil {
		return nil
	}
	err := s.lock.Close()
	s.lock = nil
	return err
}

// errHeld is lockFile's answer when another process holds the lock.
var errHeld = errors.New("held by another process")

// lockOutbox takes the outbox's lock file name (creating it) and writes
// this process's ID into it, for the refusal another process gets.
func lockOutbox(name string) (*os.File, error) {
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("outbox: %w", err)
	}
	if err := lockFile(f); err != nil {
		holder, _ := os.ReadFile(name)
		f.Close()
		if errors.Is(err, errHeld) {
			who := "another mailbridge"
			if pid := strings.TrimSpace(string(holder)); pid != "" {
				who += " (process " + pid + ")"
			}
			return nil, fmt.Errorf("outbox: %s is in use by %s: stop it first (on Windows the mailbridge service, on Linux systemctl stop mailbridge), or give this one its own [outbox] dir", filepath.Dir(name), who)
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

// Dir is the outbox's directory.
func (s *Store) Dir() string { return s.dir }

func (s *Store) path(sub string) string { return filepath.Join(s.dir, sub) }

func (s *Store) file(sub, id, ext string) string {
	return filepath.Join(s.dir, sub, id+"."+ext)
}

// validID reports whether id can be a queue ID (newQueueID's letters,
// digits and dashes): an ID from outside (the status page's form, the
// command line) never names a path.
func validID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for _, c := range []byte(id) {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-') {
			return false
		}
	}
	return true
}

// errNoMessage is the answer for an ID the outbox does not hold.
func errNoMessage(id string) error { return fmt.Errorf("no message %s in the outbox", id) }

func newQueueID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return time.Now().UTC().Format("20060102T150405") + "-" + hex.EncodeToString(b)
}

// Add writes msg and its envelope durably (fsync of both files and of the
// directory) and returns only then: the caller may now answer 250.
func (s *Store) Add(env *Envelope, msg io.ReaderAt, maxBytes int64) error {
	s.mu.Lock()
	if maxBytes > 0 && s.bytes+env.Size > maxBytes {
		s.mu.Unlock()
		return failure.ErrQueueFull
	}
	s.bytes += env.Size
	s.mu.Unlock()
	ok := false
	defer func() {
		if !ok {
			s.mu.Lock()
			s.bytes -= env.Size
			s.mu.Unlock()
		}
	}()
	env.ID = newQueueID()
	tmpMsg, tmpEnv := s.file("tmp", env.ID, "eml"), s.file("tmp", env.ID, "json")
	if err := writeFileSync(tmpMsg, func(w io.Writer) error {
		_, err := io.Copy(w, io.NewSectionReader(msg, 0, env.Size))
		return err
	}); err != nil {
		os.Remove(tmpMsg)
		return s.diskError(err)
	}
	if err := writeFileSync(tmpEnv, func(w io.Writer) error { return json.NewEncoder(w).Encode(env) }); err != nil {
		os.Remove(tmpMsg)
		os.Remove(tmpEnv)
		return s.diskError(err)
	}
	if err := os.Rename(tmpMsg, s.file("queue", env.ID, "eml")); err != nil {
		return s.diskError(err)
	}
	if err := os.Rename(tmpEnv, s.file("queue", env.ID, "json")); err != nil {
		os.Remove(s.file("queue", env.ID, "eml"))
		return s.diskError(err)
	}
	if err := syncDir(s.path("queue")); err != nil {
		return s.diskError(err)
	}
	ok = true
	return nil
}

// writeFileSync creates name, lets write fill it, and syncs it to disk.
func writeFileSync(name string, write func(io.Writer) error) error {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := write(f); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// corruptError is an entry of the outbox that cannot be trusted: it is
// never delivered, but moved to failed/ with the reason.
type corruptError struct{ reason string }

func (e *corruptError) Error() string { return "outbox: corrupt entry: " + e.reason }

// readEnvelope reads the envelope of id in sub ("queue" or "failed"),
// trusting nothing: an empty or unparseable file, an id that is not the
// file's name, or (in queue/) a message file of another size than the
// envelope says is a *corruptError.
func (s *Store) readEnvelope(sub, id string) (*Envelope, error) {
	b, err := os.ReadFile(s.file(sub, id, "json"))
	if err != nil {
		return nil, err
	}
	var env Envelope
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, &corruptError{"the envelope " + id + ".json is empty"}
	}
	if err := json.Unmarshal(b, &env); err != nil {
		return nil, &corruptError{fmt.Sprintf("the envelope %s.json cannot be read: %v", id, err)}
	}
	if env.ID != id {
		return &env, &corruptError{fmt.Sprintf("the envelope %s.json names another message (%s): a copy, or a file renamed by hand", id, env.ID)}
	}
	if sub == "queue" {
		st, err := os.Stat(s.file(sub, id, "eml"))
		switch {
		case err != nil:
			return &env, &corruptError{fmt.Sprintf("the message file %s.eml is missing", id)}
		case st.Size() != env.Size:
			return &env, &corruptError{fmt.Sprintf("the message file %s.eml has %d bytes, its envelope says %d", id, st.Size(), env.Size)}
		}
	}
	return &env, nil
}

// quarantine moves the entry id of queue/ to failed/ with reason, for an
// entry readEnvelope found corrupt; env is what could be read of it, if
// anything. The original envelope is kept beside as <id>.json.orig.
func (s *Store) quarantine(id string, env *Envelope, reason string) error {
	if env == nil {
		env = &Envelope{}
	}
	orig := *env
	orig.ID = id
	orig.Failure = &FailureRecord{Kind: "local", Reason: reason, At: time.Now(),
		Hint: "the outbox entry was damaged or changed by hand; inspect outbox/failed/" + id + ".*, then `mailbridge queue retry` or `delete` it"}
	os.Rename(s.file("queue", id, "json"), s.file("failed", id, "json.orig"))
	if _, err := os.Stat(s.file("queue", id, "eml")); err == nil {
		if err := os.Rename(s.file("queue", id, "eml"), s.file("failed", id, "eml")); err != nil {
			return err
		}
	}
	if err := s.saveEnvelope("failed", &orig); err != nil {
		return err
	}
	syncDir(s.path("queue"))
	syncDir(s.path("failed"))
	return nil
}

// saveEnvelope replaces the envelope of a queued message (attempts, next
// attempt, last error) atomically.
func (s *Store) saveEnvelope(sub string, env *Envelope) error {
	tmp := s.file("tmp", env.ID+"-"+newQueueID(), "json")
	if err := writeFileSync(tmp, func(w io.Writer) error { return json.NewEncoder(w).Encode(env) }); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := keepOwner(tmp, s.path(sub)); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, s.file(sub, env.ID, "json"))
}

// delivered removes a message Graph accepted: its envelope is renamed to
// .sent (and the directory synced) before the files go.
func (s *Store) delivered(env *Envelope) error {
	if err := os.Rename(s.file("queue", env.ID, "json"), s.file("queue", env.ID, "sent")); err != nil {
		return err
	}
	if err := syncDir(s.path("queue")); err != nil {
		return err
	}
	os.Remove(s.file("queue", env.ID, "eml"))
	os.Remove(s.file("queue", env.ID, "sent"))
	s.mu.Lock()
	s.bytes -= env.Size
	s.mu.Unlock()
	return nil
}

// fail moves a message to failed/ with the reason in its envelope.
func (s *Store) fail(env *Envelope, f *FailureRecord) error {
	env.Failure = f
	if err := s.saveEnvelope("queue", env); err != nil {
		return err
	}
	if err := os.Rename(s.file("queue", env.ID, "eml"), s.file("failed", env.ID, "eml")); err != nil {
		return err
	}
	if err := os.Rename(s.file("queue", env.ID, "json"), s.file("failed", env.ID, "json")); err != nil {
		return err
	}
	syncDir(s.path("queue"))
	syncDir(s.path("failed"))
	s.mu.Lock()
	s.bytes -= env.Size
	s.mu.Unlock()
	return nil
}

// ids lists the message IDs in sub, oldest first (IDs start with the time
// they were accepted), reading the directory in batches.
func (s *Store) ids(sub string) ([]string, error) {
	d, err := os.Open(s.path(sub))
	if s.shared && errors.Is(err, os.ErrNotExist) {
		return nil, nil // the bridge has not created it yet
	}
	if err != nil {
		return nil, err
	}
	defer d.Close()
	var out []string
	for {
		names, err := d.Readdirnames(1024)
		for _, n := range names {
			if id, ok := strings.CutSuffix(n, ".json"); ok {
				out = append(out, id)
			}
		}
		if err == io.EOF || len(names) == 0 {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	slices.Sort(out)
	return out, nil
}

// Failed returns how many messages failed/ holds, and how many of them
// failed after since.
func (s *Store) Failed(since time.Time) (total, recent int) {
	entries, _ := os.ReadDir(s.path("failed"))
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		total++
		if info, err := e.Info(); err == nil && info.ModTime().After(since) {
			recent++
		}
	}
	return total, recent
}

// Outbox management for `mailbridge queue`.

// QueueEntry is one message of the outbox, for listing.
type QueueEntry struct {
	State   string // "queued", "failed", or "corrupt" (moved to failed/ by the running bridge)
	Subject string // decoded
	// FromHeader is the message's From field, decoded: the display name
	// and address, where Envelope.From is MAIL FROM's address.
	FromHeader string
	Envelope
}

// headerSummary reads the decoded Subject and From fields of the message
// id in sub.
func (s *Store) headerSummary(sub, id string, size int64) (subject, from string) {
	f, err := os.Open(s.file(sub, id, "eml"))
	if err != nil {
		return "", ""
	}
	defer f.Close()
	h, err := bmime.ReadHead(f, size)
	if err != nil {
		return "", ""
	}
	decode := func(field string) string {
		v := h.Fields.Get(field)
		if d, err := new(mime.WordDecoder).DecodeHeader(v); err == nil {
			return d
		}
		return v
	}
	return decode("Subject"), decode("From")
}

// List returns the queued and failed messages, oldest first.
func (s *Store) List() ([]QueueEntry, error) {
	queued, _, err := s.Entries("queue", -1)
	if err != nil {
		return nil, err
	}
	failed, _, err := s.Entries("failed", -1)
	return append(queued, failed...), err
}

// Entries returns the first limit (all if negative) messages of sub
// ("queue" or "failed"), oldest first, and how many sub holds.
func (s *Store) Entries(sub string, limit int) (entries []QueueEntry, total int, err error) {
	ids, err := s.ids(sub)
	if err != nil {
		return nil, 0, err
	}
	for _, id := range ids {
		if limit >= 0 && len(entries) >= limit {
			break
		}
		env, err := s.readEnvelope(sub, id)
		var ce *corruptError
		switch {
		case errors.As(err, &ce):
			// Shown as it is; the worker moves it to failed/.
			e := Envelope{ID: id, LastError: ce.reason}
			if env != nil {
				e = *env
				e.ID, e.LastError = id, ce.reason
			}
			entries = append(entries, QueueEntry{State: "corrupt", Envelope: e})
			continue
		case err != nil:
			continue // delivered or moved meanwhile
		}
		state := "queued"
		if sub == "failed" {
			state = "failed"
		}
		subject, from := s.headerSummary(sub, id, env.Size)
		entries = append(entries, QueueEntry{State: state, Subject: subject, FromHeader: from, Envelope: *env})
	}
	return entries, len(ids), nil
}

// Retry makes a queued message due now, or puts a failed one back in the
// queue.
func (s *Store) Retry(id string) error {
	if !validID(id) {
		return errNoMessage(id)
	}
	if env, err := s.readEnvelope("queue", id); err == nil {
		env.NextAttempt = time.Now()
		return s.saveEnvelope("queue", env)
	}
	env, err := s.readEnvelope("failed", id)
	if err != nil {
		return errNoMessage(id)
	}
	env.Failure, env.NextAttempt, env.Received = nil, time.Now(), time.Now()
	if err := s.saveEnvelope("failed", env); err != nil {
		return err
	}
	if err := os.Rename(s.file("failed", id, "eml"), s.file("queue", id, "eml")); err != nil {
		return err
	}
	if err := os.Rename(s.file("failed", id, "json"), s.file("queue", id, "json")); err != nil {
		return err
	}
	s.mu.Lock()
	s.bytes += env.Size
	s.mu.Unlock()
	return nil
}

// RetryFailed puts every failed message back in the queue.
func (s *Store) RetryFailed() (int, error) {
	ids, err := s.ids("failed")
	if err != nil {
		return 0, err
	}
	var errs []error
	for _, id := range ids {
		errs = append(errs, s.Retry(id))
	}
	return len(ids), errors.Join(errs...)
}

// Delete removes a message, queued or failed.
func (s *Store) Delete(id string) error {
	if !validID(id) {
		return errNoMessage(id)
	}
	found := false
	for _, sub := range []string{"queue", "failed"} {
		st, statErr := os.Stat(s.file(sub, id, "eml"))
		if err := os.Remove(s.file(sub, id, "json")); err == nil {
			found = true
			os.Remove(s.file(sub, id, "eml"))
			if sub == "queue" && statErr == nil {
				s.mu.Lock()
				s.bytes -= st.Size()
				s.mu.Unlock()
			}
		}
	}
	if !found {
		return errNoMessage(id)
	}
	return nil
}

// diskError is a failure to write the outbox: temporary, and the hint
// names the directory.
func (s *Store) diskError(err error) error {
	return &failure.Error{Kind: failure.Local, Temporary: true, Reason: "Cannot store the message now, try again later", Err: err,
		Hint: fmt.Sprintf("the bridge cannot write to outbox.dir (%s): check free space and permissions", s.dir)}
}
