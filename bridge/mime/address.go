package mime

import (
	"errors"
	"net/netip"
	"strings"
)

// ErrBadAddress is an address that is not a mailbox as RFC 5321 §4.1.2
// writes one, as far as the bridge takes them.
var ErrBadAddress = errors.New("not a mailbox address")

// ParseMailbox checks an envelope or header address strictly and returns
// its local part and its domain (lower case). It takes a dot-atom local
// part (RFC 5322 §3.4.1; quoted local parts are refused: no mailbox of
// Exchange Online has one, and they hide an "@"), exactly one "@", and a
// domain of LDH labels or an IPv4 address literal. Bytes outside printable
// ASCII, NUL among them, are refused: 8-bit local parts need SMTPUTF8,
// which the bridge does not offer.
func ParseMailbox(addr string) (local, domain string, err error) {
	at := strings.IndexByte(addr, '@')
	if at <= 0 || at != strings.LastIndexByte(addr, '@') || len(addr) > 254 {
		return "", "", ErrBadAddress
	}
	// The domain is checked before it is lowered, and lowered as ASCII.
	local, domain = addr[:at], addr[at+1:]
	if len(local) > 64 || !dotAtom(local) || !validDomain(domain) {
		return "", "", ErrBadAddress
	}
	return local, lowerASCII(domain), nil
}

// atext reports whether c may appear in an atom (RFC 5322 §3.2.3).
func atext(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-/=?^_`{|}~", c) >= 0
}

func dotAtom(s string) bool {
	if s == "" || s[0] == '.' || s[len(s)-1] == '.' || strings.Contains(s, "..") {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] != '.' && !atext(s[i]) {
			return false
		}
	}
	return true
}

func validDomain(d string) bool {
	if strings.HasPrefix(d, "[") && strings.HasSuffix(d, "]") {
		ip, err := netip.ParseAddr(d[1 : len(d)-1])
		return err == nil && ip.Is4()
	}
	if d == "" || len(d) > 253 {
		return false
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// lowerASCII lowers A to Z only. Addresses are compared with it, never
// with strings.ToLower, whose Unicode mappings ("İ" to "i", the Kelvin sign
// to "k") would make a foreign address equal to an allowed one.
func lowerASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if b[j] >= 'A' && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}
