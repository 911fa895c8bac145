package deliver

import (
	"context"
	"strings"
	"sync"
)

// PerMailboxInFlight is Microsoft's limit of concurrent Graph requests per
// app and mailbox: a fifth is answered 429 ApplicationThrottled
// (MailboxConcurrency).
const PerMailboxInFlight = 4

// MailboxSlots keeps at most n deliveries in flight per (app, mailbox),
// whoever starts them: SMTP sessions with the outbox off, and the outbox's
// worker. A message holds its slot for all its requests, which a message
// makes one after the other.
type MailboxSlots struct {
	n  int
	mu sync.Mutex
	by map[string]chan struct{}
}

// NewMailboxSlots returns slots of n per key.
func NewMailboxSlots(n int) *MailboxSlots {
	return &MailboxSlots{n: n, by: map[string]chan struct{}{}}
}

// SlotKey is the (app, mailbox) a message is sent through.
func SlotKey(m *Message) string {
	c := m.Account.Config
	return c.TenantID + "/" + c.ClientID + "/" + strings.ToLower(m.GraphUser)
}

// Acquire waits for a free slot of key, or until ctx ends; release gives
// it back.
func (s *MailboxSlots) Acquire(ctx context.Context, key string) (release func(), err error) {
	s.mu.Lock()
	ch := s.by[key]
	if ch == nil {
		ch = make(chan struct{}, s.n)
		s.by[key] = ch
	}
	s.mu.Unlock()
	select {
	case ch <- struct{}{}:
		return func() { <-ch }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Free reports whether key has a free slot now.
func (s *MailboxSlots) Free(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := s.by[key]
	return ch == nil || len(ch) < cap(ch)
}
