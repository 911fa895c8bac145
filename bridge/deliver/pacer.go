package deliver

import (
	"context"
	"sync"
	"time"
)

// uploadPacer keeps each mailbox's uploads under Graph's limit (150 MB per
// 5 minutes per app and mailbox), waiting before an upload rather than
// collecting 429s.
type uploadPacer struct {
	limit  int64
	window time.Duration
	now    func() time.Time

	mu   sync.Mutex
	sent map[string][]upload // by mailbox, oldest first
}

type upload struct {
	at time.Time
	n  int64
}

func newUploadPacer(limit int64, window time.Duration) *uploadPacer {
	return &uploadPacer{limit: limit, window: window, now: time.Now, sent: map[string][]upload{}}
}

// delay records n bytes for mailbox if they fit in the window now, and
// returns 0; otherwise it records nothing and returns how long to wait.
func (p *uploadPacer) delay(mailbox string, n int64) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	list := p.sent[mailbox]
	for len(list) > 0 && now.Sub(list[0].at) >= p.window {
		list = list[1:]
	}
	var total int64
	for _, u := range list {
		total += u.n
	}
	// An upload larger than the whole budget goes when the window is empty.
	if total+n <= p.limit || len(list) == 0 {
		p.sent[mailbox] = append(list, upload{at: now, n: n})
		return 0
	}
	// Wait until enough of the oldest uploads leave the window.
	need := total + n - p.limit
	for _, u := range list {
		need -= u.n
		if need <= 0 {
			return u.at.Add(p.window).Sub(now)
		}
	}
	return list[len(list)-1].at.Add(p.window).Sub(now)
}

// wait blocks until n more bytes may be uploaded to mailbox.
func (p *uploadPacer) wait(ctx context.Context, mailbox string, n int64) error {
	for {
		d := p.delay(mailbox, n)
		if d <= 0 {
			return nil
		}
		if err := sleepCtx(ctx, d); err != nil {
			return err
		}
	}
}
