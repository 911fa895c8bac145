package deliver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/rs/zerolog"

	"mailbridge/bridge/failure"
	"mailbridge/bridge/mime"
	"mailbridge/upstream"
)

// draftTarget is how much MIME the draft keeps at most: well under
// sendMail's limit, so that Graph's own additions never push it over.
const draftTarget = 2_500_000

// largeAttachment is a part taken out of the message, decoded to a
// temporary file (closed until it is added).
type largeAttachment struct {
	upstream.Attachment
	path string
}

// split chooses the parts of msg to take out and returns them with the
// draft, or refuses a message whose draft would still be over sendMail's
// limit.
func (dl *Deliverer) split(msg mime.View) ([]*mime.Part, mime.View, error) {
	root, err := mime.Parse(msg, msg.Size())
	if err != nil {
		return nil, nil, fmt.Errorf("parse MIME: %w", err)
	}
	removed, draft := mime.SplitForDraft(root, msg, draftTarget)
	if draft.Size() > upstream.MaxSendMailMIME {
		return nil, nil, errLargeNotAllowed(fmt.Sprintf("even without its attachments the message has %d bytes", draft.Size()), "")
	}
	return removed, draft, nil
}

// Plan checks, before a message over sendMail's limit is accepted, that it
// can be sent the draft way within MaxRequests Graph requests: a draft,
// each attachment taken out (one request under 3 MB, else an upload
// session and its chunks), and the send. A message that cannot is refused
// now, with the reason, rather than failing later. A message that fits
// sendMail is always fine.
func (dl *Deliverer) Plan(m *Message) error {
	if m.Size() <= upstream.MaxSendMailMIME {
		return nil
	}
	if !m.Account.Config.LargeMessages {
		return ErrLargeMessagesOff
	}
	removed, draft, err := dl.split(m.Content)
	if err != nil {
		return err
	}
	m.planned = &plannedSplit{removed: removed, draft: draft}
	requests := 2 // the draft and its send
	for _, p := range removed {
		size := p.EncodedSize() // base64 grows by 4/3: a bound on the decoded size
		if p.IsBase64() {
			size = size / 4 * 3
		}
		if size < upstream.MaxAttachmentPost {
			requests++
		} else {
			requests += 1 + int((size+upstream.UploadChunk-1)/upstream.UploadChunk)
		}
	}
	if requests > dl.opts.MaxRequests {
		return errLargeNotAllowed(fmt.Sprintf("sending its %d attachments would take %d Graph requests, more than the %d the bridge makes for one message (smtp.max_graph_requests_per_message); send fewer, larger attachments (a zip)",
			len(removed), requests, dl.opts.MaxRequests), "")
	}
	return nil
}

// attemptLarge sends a message over sendMail's limit after settling an
// earlier attempt's unknown outcome.
func (dl *Deliverer) attemptLarge(ctx context.Context, m *Message, log zerolog.Logger) (Delivery, error) {
	d := Delivery{User: m.GraphUser, Path: "draft", OutcomeUnknown: m.OutcomeUnknown}
	if d.OutcomeUnknown {
		if done, err := dl.settle(ctx, m, candidates(m, &d), &d, log); done || err != nil {
			return d, err
		}
	}
	err := dl.sendLarge(ctx, m, log, &d)
	return d, err
}

// sendLarge sends a message over sendMail's limit: the attachments that
// make it large leave the MIME, the rest becomes a draft byte for byte, the
// attachments are added to the draft (by upload session from 3 MB), and the
// draft is sent. A step that fails for a transient reason is retried alone;
// when the message cannot be sent the draft is deleted.
func (dl *Deliverer) sendLarge(ctx context.Context, m *Message, log zerolog.Logger, d *Delivery) error {
	if !m.Account.Config.LargeMessages {
		return ErrLargeMessagesOff
	}
	var gc Graph = m.Account.Graph
	msg := m.Content
	var removed []*mime.Part
	var draft mime.View
	var err error
	if p := m.planned; p != nil {
		removed, draft = p.removed, p.draft
	} else if removed, draft, err = dl.split(msg); err != nil {
		return err
	}
	atts, err := dl.decodeAttachments(msg, removed)
	defer func() {
		for _, at := range atts {
			os.Remove(at.path)
		}
	}()
	if err != nil {
		return err
	}
	log.Debug().Int64("draft_bytes", draft.Size()).Int("attachments", len(atts)).Msg("sending as draft with attachments")
	if m.StaleDraft != "" {
		err := dl.step(ctx, d, "delete the draft of an interrupted attempt", func(ctx context.Context) error {
			err := gc.DeleteMessage(ctx, d.User, m.StaleDraft)
			if failure.Classify(err).Kind == failure.Mailbox { // 404: already gone
				return nil
			}
			return err
		})
		if err != nil {
			log.Error().Err(err).Str("draft_id", m.StaleDraft).Msg("could not delete the draft of an interrupted attempt")
		} else {
			log.Info().Str("draft_id", m.StaleDraft).Msg("deleted the draft of an interrupted attempt")
		}
	}

	step := func(name string, op func(ctx context.Context) error) error { return dl.step(ctx, d, name, op) }

	var draftID string
	err = step("create draft", func(ctx context.Context) error {
		if err := dl.pacer.wait(ctx, d.User, draft.Size()); err != nil {
			return err
		}
		id, err := gc.CreateDraft(ctx, d.User, draft, draft.Size())
		if err != nil && dl.fallBack(m, d, err) {
			id, err = gc.CreateDraft(ctx, d.User, draft, draft.Size())
		}
		draftID = id
		return err
	})
	if err == nil && m.OnDraft != nil {
		m.OnDraft(draftID)
	}
	if err != nil {
		if failure.IsAccessDenied(err) {
			return &failure.Error{Kind: failure.TooLarge, Hint: failure.ReadWriteHint, Err: err,
				Reason: fmt.Sprintf("Message over Graph sendMail's limit of %d bytes: the app lacks the Mail.ReadWrite permission; the administrator must grant it", upstream.MaxSendMailMIME)}
		}
		return err
	}
	sent := false
	defer func() {
		if sent {
			return
		}
		// Never leave a stray draft behind, even when the session's
		// context has ended.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if _, err := dl.retry(dctx, func(ctx context.Context) error { return gc.DeleteMessage(ctx, d.User, draftID) }); err != nil {
			log.Error().Err(err).Str("draft_id", draftID).Msg("could not delete the draft of a message that was not sent")
		}
	}()
	for _, at := range atts {
		if err := dl.addAttachment(ctx, gc, d.User, draftID, at, step); err != nil {
			return err
		}
	}
	lookCtx := ctx // the look-ups have their own window, longer than a step
	err = step("send draft", func(ctx context.Context) error {
		if d.OutcomeUnknown {
			if done, err := dl.settle(lookCtx, m, []string{d.User}, d, log); done || err != nil {
				sent = done
				return err
			}
		}
		res, err := gc.SendDraft(ctx, d.User, draftID)
		d.Result = res
		if upstream.IsOutcomeUnknown(err) {
			d.OutcomeUnknown = true
			log.Warn().Err(err).Str("graph_user", d.User).Bool("possible_duplicate", true).
				Msg("the draft's send had an unknown outcome: looking in Sent Items before sending again")
			if done, _ := dl.settle(lookCtx, m, []string{d.User}, d, log); done {
				sent = true
				return nil
			}
		}
		return err
	})
	if sent {
		return nil // found in Sent Items: the draft left Drafts when it went
	}
	if err != nil {
		return err
	}
	sent = true
	return nil
}

// addAttachment adds one attachment to the draft: in one request under
// MaxAttachmentPost bytes, else by an upload session whose chunks are
// retried from where Graph says it stands.
func (dl *Deliverer) addAttachment(ctx context.Context, gc Graph, user, draftID string, at largeAttachment, step func(string, func(context.Context) error) error) error {
	name := "attachment " + at.Name
	if at.Size < upstream.MaxAttachmentPost {
		return step(name, func(ctx context.Context) error {
			if err := dl.pacer.wait(ctx, user, at.Size); err != nil {
				return err
			}
			return withFile(at.path, func(f *os.File) error { return gc.AddAttachment(ctx, user, draftID, at.Attachment, f) })
		})
	}
	var sess *upstream.UploadSession
	err := step(name+": upload session", func(ctx context.Context) error {
		s, err := gc.CreateUploadSession(ctx, user, draftID, at.Attachment)
		sess = s
		return err
	})
	var apiErr *upstream.APIError
	if errors.As(err, &apiErr) && apiErr.Code == "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize" {
		return step(name, func(ctx context.Context) error {
			return withFile(at.path, func(f *os.File) error { return gc.AddAttachment(ctx, user, draftID, at.Attachment, f) })
		})
	}
	if err != nil {
		return err
	}
	for done := false; !done; {
		err := step(fmt.Sprintf("%s: bytes from %d", name, sess.Next), func(ctx context.Context) error {
			if err := dl.pacer.wait(ctx, user, min(int64(upstream.UploadChunk), sess.Size-sess.Next)); err != nil {
				return err
			}
			return withFile(at.path, func(f *os.File) error {
				var err error
				done, err = gc.UploadChunk(ctx, sess, f)
				return err
			})
		})
		if err != nil {
			gc.CancelUpload(context.WithoutCancel(ctx), sess)
			return err
		}
	}
	return nil
}

// decodeAttachments writes each removed part's decoded content to a
// temporary file.
func (dl *Deliverer) decodeAttachments(msg mime.View, parts []*mime.Part) ([]largeAttachment, error) {
	var atts []largeAttachment
	for i, p := range parts {
		name, ctype, cid, inline := p.AttachmentInfo(i + 1)
		f, err := os.CreateTemp(dl.opts.SpoolDir, "mailbridge-att-*")
		if err != nil {
			return atts, fmt.Errorf("%w: %v", mime.ErrSpool, err)
		}
		at := largeAttachment{Attachment: upstream.Attachment{Name: name, ContentType: ctype, ContentID: cid, IsInline: inline}, path: f.Name()}
		atts = append(atts, at)
		n, err := io.Copy(f, p.DecodedBody(msg))
		// Closed at once: a message with many attachments holds one file
		// open at a time, however many it has.
		if cerr := f.Close(); err == nil && cerr != nil {
			err = &os.PathError{Op: "close", Path: f.Name(), Err: cerr}
		}
		if err != nil {
			var pe *os.PathError
			if errors.As(err, &pe) {
				return atts, fmt.Errorf("%w: %v", mime.ErrSpool, err)
			}
			return atts, &failure.Error{Kind: failure.Content, Reason: fmt.Sprintf("Attachment %q cannot be decoded: %v", name, err)}
		}
		atts[len(atts)-1].Size = n
	}
	return atts, nil
}

// step runs one step of a large message with its own send_timeout,
// retrying transient failures, and counts its attempts in d.
func (dl *Deliverer) step(ctx context.Context, d *Delivery, name string, op func(ctx context.Context) error) error {
	sctx, cancel := context.WithTimeout(ctx, dl.opts.SendTimeout)
	defer cancel()
	n, err := dl.retry(sctx, op)
	d.Attempts += n
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	return nil
}

// withFile opens the file at p for fn and closes it after.
func withFile(p string, fn func(f *os.File) error) error {
	f, err := os.Open(p)
	if err != nil {
		return fmt.Errorf("%w: %v", mime.ErrSpool, err)
	}
	defer f.Close()
	return fn(f)
}
