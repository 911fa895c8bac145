package smtpserver

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Message-IDs: every message leaves with one, so that after a send whose
// outcome is unknown it can be found in Sent Items. A message without one
// gets one at DATA (RFC 6409 §8.3 lets a submission server add it).
//
// The server remembers the messages it took recently, so that:
//   - a message whose Message-ID another one had is known as such: a copy
//     in Sent Items would not tell them apart;
//   - with the outbox off, a message answered 451 because Graph's answer
//     was lost is recognised when the client sends it again (by its
//     Message-ID, or for one without, by its content), and is looked up
//     in Sent Items before it is sent again, under the same ID.

// newMessageID returns a Message-ID on the right of which is domain.
func newMessageID(domain string, now time.Time) string {
	b := make([]byte, 10)
	rand.Read(b)
	if domain == "" {
		domain = "mailbridge.invalid"
	}
	return "<" + now.UTC().Format("20060102150405") + "." + hex.EncodeToString(b) + ".mailbridge@" + domain + ">"
}

// recentLimit and recentFor bound what the server remembers.
const (
	recentLimit = 10000
	recentFor   = 24 * time.Hour
)

// recentMessage is what the server remembers of a message it took.
type recentMessage struct {
	messageID    string    // the ID it left with
	size         int64     // of the client's bytes
	digest       string    // of the client's bytes, for one without an ID
	firstAttempt time.Time // when the bridge first took it
	unknown      bool      // answered 451 after Graph's answer was lost
	at           time.Time
}

// recentMessages remembers the messages taken in the last day, by account
// and the client's Message-ID (or content, for one without).
type recentMessages struct {
	mu    sync.Mutex
	by    map[string]*recentMessage
	order []string // keys, oldest first
}

func recentKey(account, clientID string, size int64, digest string) string {
	if clientID != "" {
		return account + "\x00id\x00" + clientID
	}
	return account + "\x00sum\x00" + strconv.FormatInt(size, 10) + "\x00" + digest
}

// digestOf is the content digest of a message without a Message-ID; it is
// computed only when a message of the same size and account without one
// is remembered as unknown.
func digestOf(r io.ReaderAt, size int64) string {
	h := sha256.New()
	io.Copy(h, io.NewSectionReader(r, 0, size))
	return hex.EncodeToString(h.Sum(nil))
}

// recall returns what is remembered of a message (the client's ID, its
// size, its content), if it was taken before.
func (rm *recentMessages) recall(account, clientID string, size int64, content io.ReaderAt, now time.Time) (recentMessage, bool) {
	rm.mu.Lock()
	if rm.by == nil {
		rm.mu.Unlock()
		return recentMessage{}, false
	}
	if clientID != "" {
		defer rm.mu.Unlock()
		e := rm.by[recentKey(account, clientID, size, "")]
		if e == nil || now.Sub(e.at) > recentFor {
			return recentMessage{}, false
		}
		return *e, true
	}
	// Without an ID only an unknown outcome matters: is there one of
	// this size? Only then is the content hashed.
	prefix := recentKey(account, "", size, "")
	any := false
	for k, e := range rm.by {
		if strings.HasPrefix(k, prefix) && e.unknown {
			any = true
			break
		}
	}
	rm.mu.Unlock()
	if !any {
		return recentMessage{}, false
	}
	d := digestOf(content, size)
	rm.mu.Lock()
	defer rm.mu.Unlock()
	e := rm.by[recentKey(account, "", size, d)]
	if e == nil || now.Sub(e.at) > recentFor {
		return recentMessage{}, false
	}
	return *e, true
}

// remember records a message taken (unknown: answered 451 with its
// outcome unknown), forgetting the oldest beyond recentLimit.
func (rm *recentMessages) remember(account, clientID string, content io.ReaderAt, e recentMessage) {
	if clientID == "" && !e.unknown {
		return // only a resend after 451 is recognised by content
	}
	if clientID == "" {
		e.digest = digestOf(content, e.size)
	}
	key := recentKey(account, clientID, e.size, e.digest)
	rm.mu.Lock()
	defer rm.mu.Unlock()
	if rm.by == nil {
		rm.by = map[string]*recentMessage{}
	}
	if _, ok := rm.by[key]; !ok {
		rm.order = append(rm.order, key)
	}
	rm.by[key] = &e
	for len(rm.order) > recentLimit {
		delete(rm.by, rm.order[0])
		rm.order = rm.order[1:]
	}
}
