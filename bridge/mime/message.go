package mime

import (
	"errors"
	"fmt"
	"io"
	gomime "mime"
	"net/mail"
	"strings"
	"unicode"
	"unicode/utf8"
)

// maxHeaderBytes bounds the header section the bridge reads.
const maxHeaderBytes = 1 << 20

// ErrHeaderTooLong is a header section over 1 MB, or one without an end in
// the first megabyte of a larger message.
var ErrHeaderTooLong = errors.New("message header over 1 MB or without an end")

// Head is the header section of a message, parsed leniently.
type Head struct {
	raw       []byte // the header fields, up to and including the last field's line break
	bodyStart int    // offset of the body (after the empty line); == len(raw) when there is none
	Fields    mail.Header
}

// ReadHead reads and parses the header section of the message in r (size
// bytes). Errors are ErrHeaderTooLong, or ErrSpool when r cannot be read.
func ReadHead(r io.ReaderAt, size int64) (*Head, error) {
	buf, headerLen, bodyStart, err := readHeaderAt(r, 0, size)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrSpool, err)
	}
	if headerLen == len(buf) && size > maxHeaderBytes {
		return nil, ErrHeaderTooLong
	}
	return &Head{raw: buf[:headerLen], bodyStart: bodyStart, Fields: parseHeader(buf[:headerLen])}, nil
}

// Raw returns the header fields as they came, up to and including the last
// field's line break.
func (h *Head) Raw() []byte { return h.raw }

// Addresses returns the addresses of the named address-list fields, lower
// case; a field that does not parse is read leniently.
func (h *Head) Addresses(fields ...string) []string { return headerAddresses(h.Fields, fields...) }

// FieldAddresses returns the addresses of each value of field, one list per
// occurrence, so that a field without any address can be told apart.
func (h *Head) FieldAddresses(field string) [][]string {
	var out [][]string
	for _, v := range h.Fields[field] {
		out = append(out, parseAddressList(v))
	}
	return out
}

// WithBcc returns msg (size bytes, whose header is h) as Graph must receive
// it: every envelope recipient that no To, Cc or Bcc field names is added
// to one Bcc field at the end of the header, merged with a Bcc field the
// client wrote, since a message may have only one (RFC 5322 §3.6); and a
// Message-ID field with messageID when it is not "" (for a message that
// has none). The rest of the message stays byte for byte. headerOnly lists
// the header recipients that are not envelope recipients.
func WithBcc(msg io.ReaderAt, size int64, h *Head, rcpts []string, messageID string) (out View, headerOnly []string) {
	inHeaders := map[string]bool{}
	for _, a := range h.Addresses("To", "Cc", "Bcc") {
		inHeaders[a] = true
	}
	inEnvelope := map[string]bool{}
	var bcc []string
	for _, r := range rcpts {
		lr := lowerASCII(r)
		inEnvelope[lr] = true
		if !inHeaders[lr] {
			bcc = append(bcc, r)
		}
	}
	for a := range inHeaders {
		if !inEnvelope[a] {
			headerOnly = append(headerOnly, a)
		}
	}
	whole := Piece{r: msg, n: size}
	if len(bcc) == 0 && messageID == "" {
		return View{whole}, headerOnly
	}
	head := h.raw
	var added []byte
	if messageID != "" {
		added = []byte("Message-ID: " + messageID + "\r\n")
	}
	if len(bcc) > 0 {
		if existing := h.Fields["Bcc"]; len(existing) > 0 {
			head = removeField(head, "Bcc")
			bcc = append(h.Addresses("Bcc"), bcc...)
		}
		added = append(added, foldedField("Bcc", bcc)...)
	}
	headerLen := len(h.raw)
	if headerLen == h.bodyStart { // no empty line: the message is all header
		if len(head) > 0 && head[len(head)-1] != '\n' {
			head = append(head[:len(head):len(head)], '\r', '\n')
		}
		return View{BytesPiece(head), BytesPiece(added), BytesPiece([]byte("\r\n"))}, headerOnly
	}
	rest := Piece{r: msg, off: int64(headerLen), n: size - int64(headerLen)}
	return View{BytesPiece(head), BytesPiece(added), rest}, headerOnly
}

// maxSubjectRunes bounds a Subject in a log line or on the status page.
const maxSubjectRunes = 120

// Subject returns the message's Subject for a log line or a page: decoded
// (RFC 2047), on one line without control characters, and clipped.
func (h *Head) Subject() string { return DisplayText(h.Fields.Get("Subject")) }

// DisplayText returns a header value decoded (RFC 2047), with control
// characters turned into spaces and runs of space folded, clipped to
// maxSubjectRunes.
func DisplayText(v string) string {
	if d, err := new(gomime.WordDecoder).DecodeHeader(v); err == nil {
		v = d
	}
	var b strings.Builder
	space, n := false, 0
	for _, r := range strings.TrimSpace(v) {
		if unicode.IsControl(r) || unicode.IsSpace(r) || r == utf8.RuneError {
			space = true
			continue
		}
		if n == maxSubjectRunes {
			b.WriteString("…")
			break
		}
		if space && b.Len() > 0 {
			b.WriteByte(' ')
			n++
		}
		space = false
		b.WriteRune(r)
		n++
	}
	return b.String()
}
