package bridge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/rs/zerolog"

	"mailbridge/upstream"
)

// LargeSender is what sending a message over sendMail's limit needs of
// Graph: a draft from MIME, attachments (in one request or an upload
// session), sending the draft, and deleting it when that fails.
// *upstream.GraphClient is the real one.
type LargeSender interface {
	CreateDraft(ctx context.Context, user string, mime io.ReaderAt, size int64) (string, error)
	AddAttachment(ctx context.Context, user, messageID string, a upstream.Attachment, content io.ReaderAt) error
	CreateUploadSession(ctx context.Context, user, messageID string, a upstream.Attachment) (*upstream.UploadSession, error)
	UploadChunk(ctx context.Context, s *upstream.UploadSession, content io.ReaderAt) (bool, error)
	CancelUpload(ctx context.Context, s *upstream.UploadSession) error
	SendDraft(ctx context.Context, user, messageID string) (upstream.SendResult, error)
	DeleteMessage(ctx context.Context, user, messageID string) error
}

// readWriteHint tells how to allow messages over sendMail's limit.
const readWriteHint = "grant Mail.ReadWrite as an Application permission (Microsoft Graph) and click 'Grant admin consent', or set large_messages = false (messages over 3 MB are then refused)"

// draftTarget is how much MIME the draft keeps at most: well under
// sendMail's limit, so that Graph's own additions never push it over.
const draftTarget = 2_500_000

// errLargeNotAllowed answers a message over sendMail's limit for an
// account that may not send it the large way.
func errLargeNotAllowed(reason string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
		Message: fmt.Sprintf("Message over Graph sendMail's limit of %d bytes: %s", upstream.MaxSendMailMIME, reason)}
}

// largeAttachment is a part taken out of the message, decoded to a
// temporary file.
type largeAttachment struct {
	upstream.Attachment
	file *os.File
}

// deliverLarge sends a message over sendMail's limit: the attachments that
// make it large leave the MIME, the rest becomes a draft byte for byte, the
// attachments are added to the draft (by upload session from 3 MB), and the
// draft is sent. A step that fails for a transient reason is retried alone;
// when the message cannot be sent the draft is deleted.
func (b *Bridge) deliverLarge(ctx context.Context, a *Account, log zerolog.Logger, user, fallbackUser string, msg view) (delivery, error) {
	d := delivery{user: user, path: "draft"}
	if !a.Config.LargeMessages {
		return d, errLargeNotAllowed("large_messages is off for this account")
	}
	gc, ok := a.Sender.(LargeSender)
	if !ok {
		return d, errLargeNotAllowed("this account's Graph client cannot create drafts")
	}
	root, err := parseMIME(msg, 0, msg.size(), 0)
	if err != nil {
		return d, fmt.Errorf("parse MIME: %w", err)
	}
	removed, draft, err := splitForDraft(root, msg)
	if err != nil {
		return d, err
	}
	atts, err := b.decodeAttachments(msg, removed)
	defer func() {
		for _, at := range atts {
			at.file.Close()
			os.Remove(at.file.Name())
		}
	}()
	if err != nil {
		return d, err
	}
	log.Debug().Int64("draft_bytes", draft.size()).Int("attachments", len(atts)).Msg("sending as draft with attachments")

	step := func(name string, op func(ctx context.Context) error) error {
		sctx, cancel := context.WithTimeout(ctx, b.cfg.SMTP.SendTimeout.Duration)
		defer cancel()
		n, err := retryOp(sctx, b.retry, op)
		d.attempts += n
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	}

	var draftID string
	err = step("create draft", func(ctx context.Context) error {
		if err := b.pacer.wait(ctx, d.user, draft.size()); err != nil {
			return err
		}
		id, err := gc.CreateDraft(ctx, d.user, draft, draft.size())
		if err != nil && fallbackUser != "" && d.user != fallbackUser && noMailbox(err) {
			d.user, d.fellBack = fallbackUser, true
			id, err = gc.CreateDraft(ctx, d.user, draft, draft.size())
		}
		draftID = id
		return err
	})
	if err != nil {
		if isAccessDenied(err) {
			log.Error().Err(err).Str("hint", readWriteHint).Msg("cannot create a draft")
			return d, errLargeNotAllowed("the app lacks the Mail.ReadWrite permission; the administrator must grant it")
		}
		return d, err
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
		if _, err := retryOp(dctx, b.retry, func(ctx context.Context) error { return gc.DeleteMessage(ctx, d.user, draftID) }); err != nil {
			log.Error().Err(err).Str("draft_id", draftID).Msg("could not delete the draft of a message that was not sent")
		}
	}()
	for _, at := range atts {
		if err := b.addAttachment(ctx, gc, d.user, draftID, at, step); err != nil {
			return d, err
		}
	}
	err = step("send draft", func(ctx context.Context) error {
		res, err := gc.SendDraft(ctx, d.user, draftID)
		d.result = res
		return err
	})
	if err != nil {
		return d, err
	}
	sent = true
	return d, nil
}

// addAttachment adds one attachment to the draft: in one request under
// MaxAttachmentPost bytes, else by an upload session whose chunks are
// retried from where Graph says it stands.
func (b *Bridge) addAttachment(ctx context.Context, gc LargeSender, user, draftID string, at largeAttachment, step func(string, func(context.Context) error) error) error {
	name := "attachment " + at.Name
	if at.Size < upstream.MaxAttachmentPost {
		return step(name, func(ctx context.Context) error {
			if err := b.pacer.wait(ctx, user, at.Size); err != nil {
				return err
			}
			return gc.AddAttachment(ctx, user, draftID, at.Attachment, at.file)
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
		return step(name, func(ctx context.Context) error { return gc.AddAttachment(ctx, user, draftID, at.Attachment, at.file) })
	}
	if err != nil {
		return err
	}
	for done := false; !done; {
		err := step(fmt.Sprintf("%s: bytes from %d", name, sess.Next), func(ctx context.Context) error {
			if err := b.pacer.wait(ctx, user, min(int64(upstream.UploadChunk), sess.Size-sess.Next)); err != nil {
				return err
			}
			var err error
			done, err = gc.UploadChunk(ctx, sess, at.file)
			return err
		})
		if err != nil {
			gc.CancelUpload(context.WithoutCancel(ctx), sess)
			return err
		}
	}
	return nil
}

// splitForDraft chooses the parts to take out, largest first, until what
// is left fits well under sendMail's limit, and returns them with the
// draft's MIME: the message with those parts (and their delimiter lines)
// cut out, and an empty text part where a multipart would be left empty.
func splitForDraft(root *mimePart, msg view) ([]*mimePart, view, error) {
	cands := root.attachmentCandidates()
	slices.SortStableFunc(cands, func(x, y *mimePart) int { return int((y.nextDelim - y.delimStart) - (x.nextDelim - x.delimStart)) })
	left := msg.size()
	var removed []*mimePart
	for _, c := range cands {
		if left <= draftTarget {
			break
		}
		removed = append(removed, c)
		left -= c.nextDelim - c.delimStart
	}
	if left > upstream.MaxSendMailMIME {
		return nil, nil, errLargeNotAllowed(fmt.Sprintf("even without its attachments the message has %d bytes", left))
	}
	slices.SortFunc(removed, func(x, y *mimePart) int { return int(x.delimStart - y.delimStart) })
	// Multiparts that lose every part keep an empty text part.
	emptied := map[*mimePart]bool{}
	for _, r := range removed {
		all := true
		for _, sib := range r.parent.children {
			if !slices.Contains(removed, sib) {
				all = false
			}
		}
		if all {
			emptied[r.parent] = true
		}
	}
	var out view
	var pos int64
	for _, r := range removed {
		out = append(out, msg.slice(pos, r.delimStart)...)
		if emptied[r.parent] && r == r.parent.children[0] {
			out = append(out, bytesPiece([]byte("--"+r.parent.boundary+"\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\r\n")))
		}
		pos = r.nextDelim
	}
	out = append(out, msg.slice(pos, msg.size())...)
	return removed, out, nil
}

// decodeAttachments writes each removed part's decoded content to a
// temporary file.
func (b *Bridge) decodeAttachments(msg view, parts []*mimePart) ([]largeAttachment, error) {
	var atts []largeAttachment
	for i, p := range parts {
		name, ctype, cid, inline := p.attachmentInfo(i + 1)
		f, err := os.CreateTemp(b.spoolDir, "mailbridge-att-*")
		if err != nil {
			return atts, fmt.Errorf("%w: %v", errSpool, err)
		}
		at := largeAttachment{Attachment: upstream.Attachment{Name: name, ContentType: ctype, ContentID: cid, IsInline: inline}, file: f}
		atts = append(atts, at)
		n, err := io.Copy(f, p.decodedBody(msg))
		if err != nil {
			var pe *os.PathError
			if errors.As(err, &pe) {
				return atts, fmt.Errorf("%w: %v", errSpool, err)
			}
			return atts, &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0},
				Message: fmt.Sprintf("Attachment %q cannot be decoded: %v", name, err)}
		}
		atts[len(atts)-1].Size = n
	}
	return atts, nil
}

func isAccessDenied(err error) bool {
	var apiErr *upstream.APIError
	return errors.As(err, &apiErr) && apiErr.Status == http.StatusForbidden && strings.EqualFold(apiErr.Code, "ErrorAccessDenied")
}
