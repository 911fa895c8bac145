package bridge

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"mailbridge/bridge/failure"
	"mailbridge/bridge/outbox"
	"mailbridge/bridge/statuspage"
	"mailbridge/upstream"
)

// pageRows bounds the queued and failed messages the status page lists;
// `mailbridge queue list` shows them all.
const pageRows = 200

// statusPage returns the status page of the [admin] login, off without a
// password_hash.
func (b *Bridge) statusPage() *statuspage.Page {
	opts := statuspage.Options{Backend: statusBackend{b}, Log: b.log}
	if h := b.cfg.Admin.PasswordHash; h != "" {
		opts.Login = b.accounts.AdminLogin(b.cfg.Admin.Username, h).Authenticate
	}
	return statuspage.New(opts)
}

// statusBackend is what the status page reads of the bridge and does to
// its outbox.
type statusBackend struct{ b *Bridge }

var _ statuspage.Backend = statusBackend{}

func (s statusBackend) Status() statuspage.Status {
	b := s.b
	st := statuspage.Status{Version: b.version, Started: b.started, OutboxOn: b.outbox != nil}
	tlsState := map[bool]string{true: "STARTTLS offered", false: "none (plain text)"}
	for _, l := range []struct {
		proto, addr, tls string
	}{
		{"smtp", b.SMTPAddr(), tlsState[b.res.SMTPTLS != nil]},
		{"smtp", b.SMTPTLSAddr(), "implicit TLS"},
		{"pop3", b.POP3Addr(), strings.Replace(tlsState[b.res.POP3TLS != nil], "STARTTLS", "STLS", 1)},
		{"pop3", b.POP3TLSAddr(), "implicit TLS"},
		{"imap", b.IMAPAddr(), tlsState[b.res.IMAPTLS != nil]},
		{"imap", b.IMAPTLSAddr(), "implicit TLS"},
		{"admin", b.AdminAddr(), "none (HTTP)"},
	} {
		if l.addr != "" {
			st.Listeners = append(st.Listeners, statuspage.Listener{Proto: l.proto, Addr: l.addr, TLS: l.tls})
		}
	}
	activity := b.metrics.Activity()
	for _, a := range b.Accounts() {
		as := statuspage.AccountState{Account: a.Config.Name}
		for _, proto := range []string{"smtp", "pop3", "imap"} {
			if !a.Config.Uses(proto) || (proto == "pop3" && b.pop3Front.ln == nil) || (proto == "imap" && b.imapFront.ln == nil) {
				continue
			}
			ts := a.OutlookTokens
			if proto == "smtp" {
				ts = a.GraphTokens
				as.CountsMail, as.Day = true, activity.Today(a.Config.Name)
			}
			ps := tokenState(ts)
			ps.Proto = proto
			if proto != "smtp" {
				day := activity.MailboxToday(a.Config.Name, proto)
				ps.Mailbox = &day
			}
			as.Protocols = append(as.Protocols, ps)
		}
		st.Accounts = append(st.Accounts, as)
	}
	st.Recent = activity.Recent()
	if b.outbox == nil {
		return st
	}
	st.QueuedTotal, st.OldestAge = b.outbox.Depth()
	store := b.outbox.Store()
	queued, total, err := store.Entries("queue", pageRows)
	if err == nil {
		st.QueuedTotal = max(st.QueuedTotal, total)
	}
	for _, e := range queued {
		st.Queued = append(st.Queued, pageMessage(e))
	}
	failed, total, _ := store.Entries("failed", pageRows)
	st.FailedTotal = total
	for _, e := range failed {
		st.Failed = append(st.Failed, pageMessage(e))
	}
	slices.Reverse(st.Failed) // the newest failure first
	return st
}

// tokenState says what the last token request of ts came to.
func tokenState(ts *upstream.TokenSource) statuspage.ProtocolState {
	if ts.Requests() == 0 {
		return statuspage.ProtocolState{State: "unused"}
	}
	err := ts.LastError()
	if err == nil {
		return statuspage.ProtocolState{State: "ok"}
	}
	f := failure.Classify(err)
	as := statuspage.ProtocolState{State: "retrying", Detail: err.Error(), Hint: f.Hint}
	var te *upstream.TokenError
	if errors.As(err, &te) {
		as.Hint = te.Hint()
		if code := fmt.Sprintf("AADSTS%d", te.AADSTS); te.AADSTS != 0 && !strings.Contains(as.Detail, code) {
			as.Detail = code + ": " + as.Detail
		}
		if !te.Temporary() {
			as.State = "refused"
		}
	}
	return as
}

func pageMessage(e outbox.QueueEntry) statuspage.Message {
	from := e.FromHeader
	if from == "" {
		from = e.From
	}
	m := statuspage.Message{ID: e.ID, State: e.State, Received: e.Received, From: from, Recipients: e.Recipients,
		Subject: e.Subject, MessageID: e.MessageID, Size: e.Size, Attempts: e.Attempts, NextAttempt: e.NextAttempt, InFlight: e.InFlight, LastError: e.LastError,
		LastReason: e.LastReason, LastHint: e.LastHint}
	if f := e.Failure; f != nil {
		m.FailedAt, m.Reason, m.Hint, m.GraphStatus, m.RequestID = f.At, f.Reason, f.Hint, f.GraphStatus, f.RequestID
		switch {
		case f.NDRSent:
			m.Report = "sent to " + strings.Join(f.NDRTo, ", ")
		case f.NDRSkipped != "":
			m.Report = "none: " + f.NDRSkipped
		case f.NDRError != "":
			m.Report = "failed: " + f.NDRError
		default:
			m.Report = "none"
		}
	}
	if e.State == "corrupt" {
		m.Reason = e.LastError
	}
	return m
}

func (s statusBackend) Retry(id string) (string, error) {
	if s.b.outbox == nil {
		return "", statuspage.ErrNoOutbox
	}
	requeued, err := s.b.outbox.Retry(id)
	if err != nil {
		return "", err
	}
	if requeued {
		return "Message " + id + " is back in the queue: it goes out now.", nil
	}
	return "Message " + id + " is due now.", nil
}

func (s statusBackend) Delete(id string) error {
	if s.b.outbox == nil {
		return statuspage.ErrNoOutbox
	}
	return s.b.outbox.Delete(id)
}

func (s statusBackend) Check(ctx context.Context) []statuspage.CheckRow {
	var rows []statuspage.CheckRow
	for _, r := range s.b.Check(ctx, "") {
		row := statuspage.CheckRow{Account: r.Account, Check: r.Check, Result: "ok", Detail: r.Detail, Hint: r.Hint, Path: r.Path, Commands: r.Commands}
		switch {
		case !r.OK:
			row.Result = "fail"
		case r.Warn:
			row.Result = "warn"
		}
		rows = append(rows, row)
	}
	return rows
}
