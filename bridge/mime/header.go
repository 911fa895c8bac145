package mime

import (
	"bytes"
	"fmt"
	"mime"
	"net/mail"
	"net/textproto"
	"regexp"
	"strings"
)

// senderPattern is one entry of an account's allowed_senders: an exact
// address, or "*@domain" for every address of a domain.
type senderPattern struct {
	address string // lower case; empty for a domain pattern
	domain  string // lower case, for "*@domain"
}

func parseSenderPattern(s string) (senderPattern, error) {
	s = lowerASCII(strings.TrimSpace(s))
	if d, ok := strings.CutPrefix(s, "*@"); ok {
		if d == "" || strings.ContainsAny(d, "@* ") {
			return senderPattern{}, fmt.Errorf("%q is not an address or *@domain", s)
		}
		return senderPattern{domain: d}, nil
	}
	if !IsAddress(s) || strings.Contains(s, "*") {
		return senderPattern{}, fmt.Errorf("%q is not an address or *@domain", s)
	}
	return senderPattern{address: s}, nil
}

// SenderPolicy decides which addresses an account may send as.
type SenderPolicy []senderPattern

// ParseSenderPolicy parses allowed_senders entries: addresses and
// "*@domain" patterns. It returns the first problem.
func ParseSenderPolicy(patterns []string) (SenderPolicy, error) {
	var p SenderPolicy
	for _, s := range patterns {
		sp, err := parseSenderPattern(s)
		if err != nil {
			return nil, err
		}
		p = append(p, sp)
	}
	return p, nil
}

// Allows reports whether addr matches one of the patterns. Addresses are
// compared without regard to case.
// An address that is not a well-formed mailbox (ParseMailbox) matches
// nothing; a domain pattern compares the parsed domain exactly.
func (p SenderPolicy) Allows(addr string) bool {
	local, domain, err := ParseMailbox(addr)
	if err != nil {
		return false
	}
	full := lowerASCII(local) + "@" + domain
	for _, pat := range p {
		if pat.address != "" && pat.address == full {
			return true
		}
		if pat.domain != "" && pat.domain == domain {
			return true
		}
	}
	return false
}

// IsAddress reports whether s is a bare address (local@domain, no display
// name).
func IsAddress(s string) bool {
	a, err := mail.ParseAddress(s)
	return err == nil && a.Name == "" && strings.Contains(a.Address, "@")
}

// SplitHeader returns the length of the header section of msg, up to and
// including the line break of its last field, and the offset where the
// body starts (after the empty line). A message without an empty line is
// all header. Lines may end in CRLF or, from careless clients, LF alone.
func SplitHeader(msg []byte) (headerLen, bodyStart int) {
	pos := 0
	for pos < len(msg) {
		nl := bytes.IndexByte(msg[pos:], '\n')
		if nl < 0 {
			return len(msg), len(msg)
		}
		line := msg[pos : pos+nl+1]
		if len(line) == 1 || (len(line) == 2 && line[0] == '\r') {
			return pos, pos + len(line)
		}
		pos += nl + 1
	}
	return len(msg), len(msg)
}

// parseHeader reads the fields of a header section as split by
// SplitHeader, unfolding continuation lines. It is lenient as Exchange is:
// a line that is not a field is skipped, never a reason to refuse mail.
func parseHeader(header []byte) mail.Header {
	h := mail.Header{}
	var name string
	var value []byte
	flush := func() {
		if name != "" {
			key := textproto.CanonicalMIMEHeaderKey(name)
			h[key] = append(h[key], strings.TrimSpace(string(value)))
		}
		name, value = "", nil
	}
	for _, line := range bytes.SplitAfter(header, []byte("\n")) {
		line = bytes.TrimRight(line, "\r\n")
		if len(line) > 0 && (line[0] == ' ' || line[0] == '\t') {
			if name != "" {
				value = append(value, line...)
			}
			continue
		}
		flush()
		if colon := bytes.IndexByte(line, ':'); colon > 0 {
			name = strings.TrimRight(string(line[:colon]), " \t")
			value = append(value, line[colon+1:]...)
		}
	}
	flush()
	return h
}

var wordDecoder = new(mime.WordDecoder)

// addressRe finds address-like tokens in a header that does not parse as an
// address list, so that no recipient is missed because of a client's
// sloppy syntax.
var addressRe = regexp.MustCompile(`[^\s<>,;:"()\[\]]+@[^\s<>,;:"()\[\]]+`)

// headerAddresses returns the addresses of the named address-list fields,
// lower case. A field that does not parse is read leniently.
func headerAddresses(h mail.Header, fields ...string) []string {
	var out []string
	for _, f := range fields {
		for _, v := range h[textproto.CanonicalMIMEHeaderKey(f)] {
			out = append(out, parseAddressList(v)...)
		}
	}
	return out
}

// parseAddressList parses an RFC 5322 address list, falling back to
// picking out anything that looks like an address.
func parseAddressList(v string) []string {
	var out []string
	if list, err := (&mail.AddressParser{WordDecoder: wordDecoder}).ParseList(v); err == nil {
		for _, a := range list {
			out = append(out, lowerASCII(a.Address))
		}
		return out
	}
	for _, m := range addressRe.FindAllString(v, -1) {
		out = append(out, lowerASCII(m))
	}
	return out
}

// removeField returns header without the fields named name (each with its
// continuation lines).
func removeField(header []byte, name string) []byte {
	var out []byte
	skipping := false
	for pos := 0; pos < len(header); {
		end := bytes.IndexByte(header[pos:], '\n')
		if end < 0 {
			end = len(header)
		} else {
			end += pos + 1
		}
		line := header[pos:end]
		pos = end
		if len(line) > 0 && (line[0] == ' ' || line[0] == '\t') {
			if !skipping {
				out = append(out, line...)
			}
			continue
		}
		colon := bytes.IndexByte(line, ':')
		skipping = colon > 0 && strings.EqualFold(strings.TrimRight(string(line[:colon]), " \t"), name)
		if !skipping {
			out = append(out, line...)
		}
	}
	return out
}

// foldedField formats "Name: a, b, c" with CRLF, folded so that no line is
// longer than 78 characters where the addresses allow it (RFC 5322 §2.2.3).
func foldedField(name string, addrs []string) []byte {
	var b bytes.Buffer
	b.WriteString(name)
	b.WriteString(":")
	lineLen := b.Len()
	for i, a := range addrs {
		if i > 0 {
			b.WriteString(",")
			lineLen++
			// Fold before an address that would take the line past 76
			// characters, leaving room for the comma that may follow it.
			if lineLen+1+len(a) > 76 {
				b.WriteString("\r\n")
				lineLen = 0
			}
		}
		b.WriteString(" ")
		b.WriteString(a)
		lineLen += 1 + len(a)
	}
	b.WriteString("\r\n")
	return b.Bytes()
}
