package mime

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime/quotedprintable"
	"strings"

	"github.com/emersion/go-message"
	_ "github.com/emersion/go-message/charset" // charsets of RFC 2047 file names
	"github.com/emersion/go-message/mail"
	"github.com/emersion/go-message/textproto"
)

// Part is one entity of a MIME message, located by byte offsets in the
// message so that it can be cut out without touching the rest.
type Part struct {
	start     int64 // first byte of the part's header
	bodyStart int64 // first byte of its body
	end       int64 // one past its body: the line break before the next delimiter is not part of it
	// For a child of a multipart: [delimStart, nextDelim) is the part with
	// its delimiter line, what removing it removes.
	delimStart, nextDelim int64
	header                message.Header
	mediaType             string
	boundary              string
	children              []*Part
	parent                *Part
}

const maxMIMEDepth = 20

// parseEntity reads the structure of the MIME entity in r[start:end), with
// bounded memory however large it is. Multipart bodies are split at their
// delimiters (RFC 2046 §5.1.1); a message/rfc822 body is one child.
func parseEntity(r io.ReaderAt, start, end int64, depth int) (*Part, error) {
	p := &Part{start: start, end: end, delimStart: -1, nextDelim: -1}
	headBuf, headerLen, bodyStart, err := readHeaderAt(r, start, end)
	if err != nil {
		return nil, err
	}
	p.bodyStart = start + int64(bodyStart)
	h, err := textproto.ReadHeader(bufio.NewReader(io.MultiReader(bytes.NewReader(headBuf[:headerLen]), strings.NewReader("\r\n"))))
	if err != nil {
		h = textproto.Header{} // a header Exchange would take leniently: treat as plain text
	}
	p.header = message.Header{Header: h}
	mt, params, err := p.header.ContentType()
	if err != nil || mt == "" {
		mt = "text/plain"
	}
	p.mediaType = strings.ToLower(mt)
	if depth >= maxMIMEDepth {
		return p, nil
	}
	switch {
	case strings.HasPrefix(p.mediaType, "multipart/") && params["boundary"] != "":
		p.boundary = params["boundary"]
		if err := p.splitMultipart(r, depth); err != nil {
			return nil, err
		}
	case p.mediaType == "message/rfc822" && !isEncoded(p.header):
		child, err := parseEntity(r, p.bodyStart, p.end, depth+1)
		if err != nil {
			return nil, err
		}
		child.parent = p
		p.children = []*Part{child}
	}
	return p, nil
}

// readHeaderAt reads the header section of the entity at r[start:end),
// reading more only while no empty line has been found, up to
// maxHeaderBytes.
func readHeaderAt(r io.ReaderAt, start, end int64) (buf []byte, headerLen, bodyStart int, err error) {
	size := int64(16 << 10)
	for {
		n := min(end-start, size, maxHeaderBytes)
		buf = make([]byte, n)
		if _, err := r.ReadAt(buf, start); err != nil && err != io.EOF {
			return nil, 0, 0, err
		}
		headerLen, bodyStart = SplitHeader(buf)
		if headerLen < len(buf) || n == end-start || n == maxHeaderBytes {
			return buf, headerLen, bodyStart, nil
		}
		size *= 4
	}
}

func isEncoded(h message.Header) bool {
	cte := strings.ToLower(strings.TrimSpace(h.Get("Content-Transfer-Encoding")))
	return cte == "base64" || cte == "quoted-printable"
}

// splitMultipart finds the delimiter lines of p's body and parses the
// parts between them.
func (p *Part) splitMultipart(r io.ReaderAt, depth int) error {
	delim := []byte("--" + p.boundary)
	br := bufio.NewReaderSize(io.NewSectionReader(r, p.bodyStart, p.end-p.bodyStart), 64<<10)
	pos := p.bodyStart
	atLineStart := true
	var delims []int64  // line starts of delimiter lines
	var breakLens []int // length of the line break before each
	prevBreak := 0
	closed := false
	for !closed {
		frag, err := br.ReadSlice('\n')
		if len(frag) == 0 && err != nil {
			break
		}
		if atLineStart && bytes.HasPrefix(frag, delim) {
			rest := frag[len(delim):]
			if bytes.HasPrefix(rest, []byte("--")) {
				closed = true
			}
			if closed || len(bytes.TrimRight(rest, " \t\r\n")) == 0 {
				delims = append(delims, pos)
				breakLens = append(breakLens, prevBreak)
			}
		}
		pos += int64(len(frag))
		atLineStart = frag[len(frag)-1] == '\n'
		prevBreak = 0
		if bytes.HasSuffix(frag, []byte("\r\n")) {
			prevBreak = 2
		} else if atLineStart {
			prevBreak = 1
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			break
		}
	}
	if !closed {
		// No close delimiter: the last part runs to the end.
		delims = append(delims, p.end)
		breakLens = append(breakLens, 0)
	}
	for i := 0; i+1 < len(delims); i++ {
		// The child starts after its delimiter line.
		lineEnd, err := lineEndAt(r, delims[i], p.end)
		if err != nil {
			return err
		}
		childEnd := delims[i+1] - int64(breakLens[i+1])
		if childEnd < lineEnd {
			childEnd = lineEnd
		}
		child, err := parseEntity(r, lineEnd, childEnd, depth+1)
		if err != nil {
			return err
		}
		child.parent = p
		child.delimStart, child.nextDelim = delims[i], delims[i+1]
		if !closed && i+2 == len(delims) {
			child.nextDelim = p.end
		}
		p.children = append(p.children, child)
	}
	return nil
}

// lineEndAt returns the offset after the line that starts at off.
func lineEndAt(r io.ReaderAt, off, end int64) (int64, error) {
	buf := make([]byte, 1024)
	for off < end {
		n, err := r.ReadAt(buf[:min(int64(len(buf)), end-off)], off)
		if i := bytes.IndexByte(buf[:n], '\n'); i >= 0 {
			return off + int64(i) + 1, nil
		}
		off += int64(n)
		if err != nil && err != io.EOF {
			return 0, err
		}
		if n == 0 {
			break
		}
	}
	return end, nil
}

// AttachmentInfo describes what Graph needs to know of a part taken out of
// the message.
func (p *Part) AttachmentInfo(index int) (name, contentType, contentID string, inline bool) {
	ah := mail.AttachmentHeader{Header: p.header}
	name, _ = ah.Filename()
	disp, _, _ := p.header.ContentDisposition()
	contentID = strings.Trim(strings.TrimSpace(p.header.Get("Content-Id")), "<>")
	inline = strings.EqualFold(disp, "inline") || (disp == "" && contentID != "")
	contentType = p.mediaType
	if name == "" && p.mediaType == "message/rfc822" && len(p.children) == 1 {
		// Graph needs a name: a forwarded message is named by its subject,
		// as Outlook does.
		subject, _ := p.children[0].header.Text("Subject")
		name = strings.Map(func(r rune) rune {
			if strings.ContainsRune(`\/:*?"<>|`, r) || r < ' ' {
				return '_'
			}
			return r
		}, strings.TrimSpace(subject))
		if name != "" {
			name += ".eml"
		}
	}
	if name == "" {
		name = fmt.Sprintf("attachment-%d", index)
		if p.mediaType == "message/rfc822" {
			name += ".eml"
		}
	}
	return name, contentType, contentID, inline
}

// isAttachment reports whether a part can leave the MIME and become a
// Graph attachment: a leaf that is an attachment, has a file name, or is an
// inline non-text part with a Content-ID (an image the HTML refers to), or
// a whole forwarded message.
func (p *Part) isAttachment() bool {
	if p.parent == nil || p.delimStart < 0 {
		return false // the message itself, or the body of a message/rfc822
	}
	if p.mediaType == "message/rfc822" {
		return true
	}
	if len(p.children) > 0 || strings.HasPrefix(p.mediaType, "multipart/") {
		return false
	}
	disp, params, _ := p.header.ContentDisposition()
	if strings.EqualFold(disp, "attachment") || params["filename"] != "" {
		return true
	}
	if _, ctParams, _ := p.header.ContentType(); ctParams["name"] != "" {
		return true
	}
	return !strings.HasPrefix(p.mediaType, "text/") && p.header.Get("Content-Id") != ""
}

// attachmentCandidates lists the parts that may be taken out, not looking
// inside forwarded messages (which leave as a whole).
func (p *Part) attachmentCandidates() []*Part {
	var out []*Part
	var walk func(*Part)
	walk = func(q *Part) {
		if q.isAttachment() {
			out = append(out, q)
			return
		}
		if q.mediaType == "message/rfc822" && q.parent != nil {
			return
		}
		for _, c := range q.children {
			walk(c)
		}
	}
	walk(p)
	return out
}

// DecodedBody returns a reader of the part's body without its
// Content-Transfer-Encoding.
func (p *Part) DecodedBody(r io.ReaderAt) io.Reader {
	body := io.NewSectionReader(r, p.bodyStart, p.end-p.bodyStart)
	switch strings.ToLower(strings.TrimSpace(p.header.Get("Content-Transfer-Encoding"))) {
	case "base64":
		return base64.NewDecoder(base64.StdEncoding, &base64Filter{r: body})
	case "quoted-printable":
		return quotedprintable.NewReader(body)
	}
	return body
}

// base64Filter drops what is not base64 (line breaks, spaces), as RFC 2045
// §6.8 tells a decoder to.
type base64Filter struct{ r io.Reader }

func (f *base64Filter) Read(p []byte) (int, error) {
	for {
		n, err := f.r.Read(p)
		j := 0
		for _, c := range p[:n] {
			if c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '+' || c == '/' || c == '=' {
				p[j] = c
				j++
			}
		}
		if j > 0 || err != nil {
			return j, err
		}
	}
}

// EncodedSize is the number of bytes of the part's body as it is in the
// message (encoded).
func (p *Part) EncodedSize() int64 { return p.end - p.bodyStart }

// IsBase64 reports whether the part's body is base64-encoded.
func (p *Part) IsBase64() bool {
	return strings.EqualFold(strings.TrimSpace(p.header.Get("Content-Transfer-Encoding")), "base64")
}
