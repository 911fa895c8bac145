package outbox

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"mime"
	"os"
	"strings"
	"time"
	"unicode"

	"github.com/rs/zerolog"

	"mailbridge/bridge/account"
	"mailbridge/bridge/deliver"
	"mailbridge/bridge/failure"
	bmime "mailbridge/bridge/mime"
)

// reportStatus is the RFC 3463 status a failure is reported with.
func reportStatus(rec *FailureRecord) string {
	if rec.GraphCode == "ErrorInvalidRecipients" {
		return "5.1.1" // bad destination mailbox address
	}
	switch failure.Kind(rec.Kind) {
	case failure.Content:
		return "5.6.0"
	case failure.TooLarge:
		return "5.3.4"
	case failure.Sender:
		return "5.7.1"
	case failure.Mailbox:
		return "5.1.0"
	case failure.Timeout:
		return "5.4.7" // delivery time expired
	}
	return "5.0.0"
}

// reportable reports why a non-delivery report must not be sent for a
// message with this envelope and header, "" if it may: never for a null
// sender, an automatic message or a report, so that no loop can start.
func reportable(env *Envelope, h *bmime.Head) string {
	if env.From == "" {
		return "the message has a null sender"
	}
	if h == nil {
		return ""
	}
	if v := strings.ToLower(strings.TrimSpace(h.Fields.Get("Auto-Submitted"))); v != "" && v != "no" {
		return "the message is automatic (Auto-Submitted: " + v + ")"
	}
	if ct := strings.ToLower(h.Fields.Get("Content-Type")); strings.HasPrefix(ct, "multipart/report") {
		return "the message is itself a report"
	}
	return ""
}

// buildReport writes the RFC 3464 report of a message that failed for
// good: a part for people (what failed, why, the fix, the queue ID), a
// message/delivery-status part with each recipient's status, and the
// original's header as text/rfc822-headers. It goes from the account's
// mailbox (Graph sends as nobody else).
func buildReport(env *Envelope, rec *FailureRecord, origHeader []byte, subject, mailbox string, to, cc []string, now time.Time) []byte {
	boundary := "mailbridge-report-" + randomHex(8)
	var b bytes.Buffer
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\r\n", args...) }
	w("From: Mail Delivery (mailbridge) <%s>", mailbox)
	w("To: %s", strings.Join(to, ", "))
	if len(cc) > 0 {
		w("Cc: %s", strings.Join(cc, ", "))
	}
	w("Subject: %s", mime.QEncoding.Encode("utf-8", "Undeliverable: "+subject))
	w("Date: %s", now.Format(time.RFC1123Z))
	w("Message-ID: <ndr-%s@mailbridge>", env.ID)
	w("Auto-Submitted: auto-replied")
	w("MIME-Version: 1.0")
	w("Content-Type: multipart/report; report-type=delivery-status; boundary=\"%s\"", boundary)
	w("")
	w("--%s", boundary)
	w("Content-Type: text/plain; charset=utf-8")
	w("Content-Transfer-Encoding: 8bit")
	w("")
	w("Your message could not be delivered through Microsoft 365, and mailbridge has given up on it.")
	w("")
	w("Subject:    %s", subject)
	if env.MessageID != "" {
		w("Message-ID: %s", env.MessageID)
	}
	w("To:         %s", strings.Join(env.Recipients, ", "))
	w("Received:   %s", env.Received.UTC().Format(time.RFC1123))
	w("Reason:     %s", oneLine(rec.Reason))
	if rec.GraphStatus != 0 {
		w("Microsoft:  HTTP %d %s, request-id %s", rec.GraphStatus, rec.GraphCode, rec.RequestID)
	}
	if rec.Hint != "" {
		w("What to do: %s", rec.Hint)
	}
	if retryHelps(rec) {
		w("Queue ID:   %s (outbox/failed; once the cause is fixed, `mailbridge queue retry %s` sends it again)", env.ID, env.ID)
	} else {
		w("Queue ID:   %s (outbox/failed; sent again unchanged, it would fail the same way)", env.ID)
	}
	w("")
	w("--%s", boundary)
	w("Content-Type: message/delivery-status")
	w("")
	w("Reporting-MTA: dns; mailbridge")
	w("X-Mailbridge-Queue-ID: %s", env.ID)
	w("Arrival-Date: %s", env.Received.Format(time.RFC1123Z))
	status := reportStatus(rec)
	for _, r := range env.Recipients {
		w("")
		w("Final-Recipient: rfc822; %s", r)
		w("Action: failed")
		w("Status: %s", status)
		if rec.GraphCode != "" {
			w("Diagnostic-Code: x-graph; %d %s", rec.GraphStatus, rec.GraphCode)
		} else {
			w("Diagnostic-Code: x-mailbridge; %s", oneLine(rec.Reason))
		}
		w("Last-Attempt-Date: %s", now.Format(time.RFC1123Z))
	}
	w("")
	w("--%s", boundary)
	w("Content-Type: text/rfc822-headers")
	w("")
	b.Write(origHeader)
	if len(origHeader) > 0 && !bytes.HasSuffix(origHeader, []byte("\n")) {
		w("")
	}
	w("")
	w("--%s--", boundary)
	return b.Bytes()
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// retryHelps reports whether sending the message again may succeed once
// an administrator has acted (a secret, a permission, an outage); not when
// Microsoft refused the message itself.
func retryHelps(rec *FailureRecord) bool {
	switch failure.Kind(rec.Kind) {
	case failure.Content, failure.TooLarge, failure.Sender:
		return false
	}
	return rec.GraphCode != "ErrorInvalidRecipients"
}

// cleanSubject makes a decoded Subject safe for one line of the report:
// control characters (a CR LF inside an encoded word among them) become
// spaces, and it is clipped to 200 characters.
func cleanSubject(s string) string {
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	s = oneLine(s)
	if r := []rune(s); len(r) > 200 {
		s = string(r[:200]) + "…"
	}
	return s
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// bounce sends the non-delivery report of env, failed for rec, and records
// the outcome in rec. The report goes to the envelope sender, when the
// account may send as it (so it lands in the mailbox the legacy program
// reads), and to outbox.notify.
func (w *Outbox) bounce(ctx context.Context, log zerolog.Logger, a *account.Account, env *Envelope, rec *FailureRecord) {
	if !w.opts.Bounce {
		return
	}
	var head *bmime.Head
	var raw []byte
	if f, err := os.Open(w.store.file("queue", env.ID, "eml")); err == nil {
		head, _ = bmime.ReadHead(f, env.Size)
		f.Close()
	}
	if why := reportable(env, head); why != "" {
		rec.NDRSkipped = why
		log.Info().Str("why", why).Msg("no non-delivery report")
		return
	}
	if a == nil {
		rec.NDRError = "the account is no longer in the configuration"
		log.Error().Str("ndr_error", rec.NDRError).Msg("non-delivery report not sent")
		return
	}
	var to []string
	if a.Senders.Allows(env.From) {
		to = append(to, env.From)
	}
	cc := w.opts.Notify
	if len(to) == 0 {
		to, cc = cc, nil
	}
	if len(to) == 0 {
		rec.NDRSkipped = "the sender is not an address of the account, and outbox.notify is empty"
		log.Warn().Str("why", rec.NDRSkipped).Str("hint", "set [outbox] notify = [\"it@example.com\"] to hear of failed messages").Msg("no non-delivery report")
		return
	}
	subject := ""
	if head != nil {
		raw = head.Raw()
		if s, err := new(mime.WordDecoder).DecodeHeader(head.Fields.Get("Subject")); err == nil {
			subject = cleanSubject(s)
		}
	}
	report := buildReport(env, rec, raw, subject, a.Config.Mailbox, to, cc, time.Now())
	m := &deliver.Message{Account: a, From: a.Config.Mailbox, Recipients: append(to, cc...), GraphUser: a.Config.Mailbox,
		Content: bmime.View{bmime.BytesPiece(report)}, Session: env.Session, MessageID: "<ndr-" + env.ID + "@mailbridge>"}
	d, err := w.opts.Deliver(ctx, m, log)
	if err != nil {
		f := failure.Classify(err)
		rec.NDRError = f.Reason
		ev := log.Error().Err(err).Str("reason", string(f.Kind))
		if f.Hint != "" {
			ev = ev.Str("hint", f.Hint)
		}
		ev.Strs("ndr_to", m.Recipients).Msg("non-delivery report not sent")
		return
	}
	rec.NDRSent, rec.NDRRequestID, rec.NDRTo = true, d.Result.RequestID, m.Recipients
}
