package admin

import (
	"slices"
	"sync"
	"time"
)

// FinalMessage is the final outcome of one message, as its last log line
// tells it: Graph took it ("sent"), the outbox gave it up ("failed"), or,
// without the outbox, the client was answered with an error after Graph
// refused it ("not sent").
type FinalMessage struct {
	At          time.Time
	Account     string
	Result      string // "sent", "failed", "not sent"
	QueueID     string // "" without the outbox
	MessageID   string
	Subject     string // decoded, one line, clipped
	From        string
	Recipients  []string
	GraphStatus int
	RequestID   string
	Reason      string // the failure's kind, "" when sent
	Error       string
	Hint        string
}

// AccountDay is what one account did today (local time, since the bridge
// started if that was later).
type AccountDay struct {
	Sent, Failed  int
	LastSent      time.Time // zero if none since the start
	LastRequestID string
}

// MailboxDay is what one account did today over POP3 or IMAP: the legacy
// program's downloads, which replication such as TM Exchange lives on.
type MailboxDay struct {
	Logins, Downloads       int
	LastLogin, LastDownload time.Time // zero if none since the start
}

// Activity keeps the last final message lines and each account's counts
// for today, in memory, for the status page.
type Activity struct {
	mu        sync.Mutex
	now       func() time.Time
	recent    []FinalMessage // a ring of keepRecent, next at head
	head      int
	day       time.Time // midnight of the day counted
	accounts  map[string]*AccountDay
	mailboxes map[string]*MailboxDay // by account and protocol
}

// keepRecent is how many final lines Activity keeps.
const keepRecent = 100

// NewActivity returns an empty record.
func NewActivity() *Activity {
	return &Activity{now: time.Now, accounts: map[string]*AccountDay{}}
}

func midnight(t time.Time) time.Time {
	y, m, d := t.Date()
	return time.Date(y, m, d, 0, 0, 0, 0, t.Location())
}

// Record adds one final outcome. A nil Activity records nothing.
func (a *Activity) Record(f FinalMessage) {
	if a == nil {
		return
	}
	if f.At.IsZero() {
		f.At = a.now()
	}
	f.Recipients = slices.Clone(f.Recipients)
	a.mu.Lock()
	defer a.mu.Unlock()
	a.rollDay()
	if len(a.recent) < keepRecent {
		a.recent = append(a.recent, f)
	} else {
		a.recent[a.head] = f
	}
	a.head = (a.head + 1) % keepRecent
	d := a.accounts[f.Account]
	if d == nil {
		d = &AccountDay{}
		a.accounts[f.Account] = d
	}
	if f.Result == "sent" {
		d.Sent++
		d.LastSent, d.LastRequestID = f.At, f.RequestID
	} else {
		d.Failed++
	}
}

// rollDay starts today's counts afresh at midnight, keeping the last
// message sent; a.mu is held.
func (a *Activity) rollDay() {
	today := midnight(a.now())
	if today.Equal(a.day) {
		return
	}
	a.day = today
	for _, d := range a.accounts {
		d.Sent, d.Failed = 0, 0
	}
	for _, d := range a.mailboxes {
		d.Logins, d.Downloads = 0, 0
	}
}

// Mailbox records a POP3 or IMAP event of account: "login" or
// "download". A nil Activity records nothing.
func (a *Activity) Mailbox(account, proto, event string) {
	if a == nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.rollDay()
	if a.mailboxes == nil {
		a.mailboxes = map[string]*MailboxDay{}
	}
	d := a.mailboxes[account+"/"+proto]
	if d == nil {
		d = &MailboxDay{}
		a.mailboxes[account+"/"+proto] = d
	}
	switch event {
	case "login":
		d.Logins++
		d.LastLogin = a.now()
	case "download":
		d.Downloads++
		d.LastDownload = a.now()
	}
}

// MailboxToday returns account's POP3 or IMAP counts for today.
func (a *Activity) MailboxToday(account, proto string) MailboxDay {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.rollDay()
	if d := a.mailboxes[account+"/"+proto]; d != nil {
		return *d
	}
	return MailboxDay{}
}

// Recent returns the final lines kept, newest first.
func (a *Activity) Recent() []FinalMessage {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]FinalMessage, 0, len(a.recent))
	for i := 1; i <= len(a.recent); i++ {
		out = append(out, a.recent[(a.head-i+len(a.recent))%len(a.recent)])
	}
	return out
}

// Today returns account's counts for today.
func (a *Activity) Today(account string) AccountDay {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.rollDay()
	if d := a.accounts[account]; d != nil {
		return *d
	}
	return AccountDay{}
}
