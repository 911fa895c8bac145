package smtpserver

import (
	"bytes"
	"fmt"
	"testing"
	"time"
)

// A message without a Message-ID is recognised by its content only while
// its outcome is unknown: once it went, an identical message is a new
// one, never taken for its resend (it would be looked up, found, and not
// sent).
func TestRecentMessagesWithoutID(t *testing.T) {
	var rm recentMessages
	now := time.Now()
	alarm := bytes.NewReader([]byte("Subject: pump alarm\r\n\r\nhigh\r\n"))
	size := alarm.Size()
	if _, ok := rm.recall("scanner", "", size, alarm, now); ok {
		t.Fatal("recalled before anything was remembered")
	}
	rm.remember("scanner", "", alarm, recentMessage{messageID: "<a@x>", size: size, unknown: true, at: now})
	e, ok := rm.recall("scanner", "", size, alarm, now)
	if !ok || !e.unknown || e.messageID != "<a@x>" {
		t.Fatalf("the 451'd message is not recognised: %+v %v", e, ok)
	}
	if _, ok := rm.recall("other account", "", size, alarm, now); ok {
		t.Error("recognised for another account")
	}
	other := bytes.NewReader([]byte("Subject: pump alarm\r\n\r\nlow!\r\n")) // same size, other content
	if _, ok := rm.recall("scanner", "", other.Size(), other, now); ok {
		t.Error("another content of the same size is recognised")
	}
	rm.remember("scanner", "", alarm, recentMessage{messageID: "<a@x>", size: size, at: now}) // the resend went
	if _, ok := rm.recall("scanner", "", size, alarm, now); ok {
		t.Error("a message sent is still taken for a resend")
	}
	if len(rm.by) != 0 || len(rm.unknownSizes) != 0 || len(rm.order) != 0 {
		t.Errorf("state left: %d entries, %v sizes, %d in order", len(rm.by), rm.unknownSizes, len(rm.order))
	}
}

// At most recentLimit messages are remembered, the oldest forgotten first.
func TestRecentMessagesBounded(t *testing.T) {
	var rm recentMessages
	now := time.Now()
	for i := range recentLimit + 10 {
		rm.remember("a", fmt.Sprintf("<%d@x>", i), nil, recentMessage{size: 1, at: now})
	}
	if len(rm.by) != recentLimit || len(rm.order) != recentLimit {
		t.Fatalf("%d entries, %d in order; want %d", len(rm.by), len(rm.order), recentLimit)
	}
	if _, ok := rm.recall("a", "<0@x>", 1, nil, now); ok {
		t.Error("the oldest is still remembered")
	}
	if _, ok := rm.recall("a", fmt.Sprintf("<%d@x>", recentLimit+9), 1, nil, now); !ok {
		t.Error("the newest is forgotten")
	}
}
