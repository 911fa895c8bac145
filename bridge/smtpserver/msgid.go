package smtpserver

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"slices"
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
	// unknownSizes counts the entries without a client ID (only those
	// answered 451) by account and size: a message without an ID is
	// hashed only when one of its size waits.
	unknownSizes map[string]int
}

func recentKey(account, clientID string, size int64, digest string) string {
	if clientID != "" {
		return account + "\x00id\x00" + clientID
	}
	return sizeKey(account, size) + digest
}

func sizeKey(account string, size int64) string {
	return account + "\x00sum\x00" + strconv.FormatInt(size, 10) + "\x00"
}

// digestOf is the content digest of a message without a Message-ID; it is
// computed only when a message of the same size and account without one
// is remembered as unknown.
func digestOf(r io.ReaderAt, size int64) string {
	h := sha256.New()
	io.Copy(h, io.NewSectionReader(r, 0, size))
	return hex.EncodeToString(h.Sum(nil))
}

// keyOf returns the key of a message, "" for one without an ID when none
// of its size waits (then it was never remembered, and is not hashed).
func (rm *recentMessages) keyOf(account, clientID string, size int64, content io.ReaderAt) string {
	if clientID != "" {
		return recentKey(account, clientID, size, "")
	}
	rm.mu.Lock()
	waiting := rm.unknownSizes[sizeKey(account, size)] > 0
	rm.mu.Unlock()
	if !waiting {
		return ""
	}
	return recentKey(account, "", size, digestOf(content, size))
}

// recall returns what is remembered of a message (the client's ID, its
// size, its content), if it was taken before.
func (rm *recentMessages) recall(account, clientID string, size int64, content io.ReaderAt, now time.Time) (recentMessage, bool) {
	key := rm.keyOf(account, clientID, size, content)
	rm.mu.Lock()
	defer rm.mu.Unlock()
	e := rm.by[key]
	if key == "" || e == nil || now.Sub(e.at) > recentFor {
		return recentMessage{}, false
	}
	return *e, true
}

// remember records a message taken (unknown: answered 451 with its
// outcome unknown), forgetting the oldest beyond recentLimit. A message
// without an ID is remembered only while its outcome is unknown: once it
// went, an identical message later is a new one, never its resend.
func (rm *recentMessages) remember(account, clientID string, content io.ReaderAt, e recentMessage) {
	var key string
	if clientID == "" && e.unknown {
		e.digest = digestOf(content, e.size)
		key = recentKey(account, "", e.size, e.digest)
	} else {
		key = rm.keyOf(account, clientID, e.size, content)
	}
	if key == "" {
		return
	}
	rm.mu.Lock()
	defer rm.mu.Unlock()
	if clientID == "" && !e.unknown {
		rm.drop(key)
		return
	}
	if rm.by == nil {
		rm.by, rm.unknownSizes = map[string]*recentMessage{}, map[string]int{}
	}
	if _, ok := rm.by[key]; !ok {
		rm.order = append(rm.order, key)
		if clientID == "" {
			rm.unknownSizes[sizeKey(account, e.size)]++
		}
	}
	rm.by[key] = &e
	for len(rm.order) > recentLimit {
		rm.drop(rm.order[0])
	}
}

// drop forgets the entry of key; rm.mu is held.
func (rm *recentMessages) drop(key string) {
	e := rm.by[key]
	if e == nil {
		return
	}
	delete(rm.by, key)
	if len(rm.order) > 0 && rm.order[0] == key {
		rm.order = rm.order[1:] // the oldest, as eviction drops it
	} else {
		rm.order = slices.DeleteFunc(rm.order, func(k string) bool { return k == key })
	}
	if e.digest != "" {
		sk := strings.TrimSuffix(key, e.digest)
		if rm.unknownSizes[sk]--; rm.unknownSizes[sk] <= 0 {
			delete(rm.unknownSizes, sk)
		}
	}
}
