package mime

import (
	"io"
	"slices"
	"strings"
	"testing"
)

func TestSplitHeader(t *testing.T) {
	for _, tc := range []struct {
		msg             string
		headerLen, body int
	}{
		{"A: 1\r\nB: 2\r\n\r\nbody", 12, 14},
		{"A: 1\nB: 2\n\nbody", 10, 11},
		{"A: 1\r\n\r\n", 6, 8},
		{"\r\nbody only", 0, 2},
		{"A: 1\r\nB: 2\r\n", 12, 12}, // no empty line: all header
		{"A: 1", 4, 4},
		{"", 0, 0},
	} {
		h, b := SplitHeader([]byte(tc.msg))
		if h != tc.headerLen || b != tc.body {
			t.Errorf("SplitHeader(%q) = %d, %d; want %d, %d", tc.msg, h, b, tc.headerLen, tc.body)
		}
	}
}

func TestParseHeaderIsLenient(t *testing.T) {
	h := parseHeader([]byte("From: a@example.com\r\nTo: b@example.com,\r\n\tc@example.com\r\nnot a field\r\nSubject : Grüße\r\ncc: d@example.com\r\n"))
	if got := h.Get("To"); got != "b@example.com,\tc@example.com" {
		t.Errorf("To = %q, want the unfolded value", got)
	}
	if got := h.Get("Subject"); got != "Grüße" {
		t.Errorf("Subject = %q", got)
	}
	if got := headerAddresses(h, "To", "Cc"); !slices.Equal(got, []string{"b@example.com", "c@example.com", "d@example.com"}) {
		t.Errorf("addresses %v", got)
	}
}

func TestParseAddressList(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{`"Müller, Hans" <Hans.Mueller@Example.com>, ops@x.example`, []string{"hans.mueller@example.com", "ops@x.example"}},
		{`=?utf-8?q?M=C3=BCller?= <m@example.com>`, []string{"m@example.com"}},
		{`Undisclosed recipients:;`, nil},
		{`a@example.com; b@example.com`, []string{"a@example.com", "b@example.com"}}, // Outlook-style separator: lenient
		{`<broken@example.com`, []string{"broken@example.com"}},
		{`group: x@example.com, y@example.com;`, []string{"x@example.com", "y@example.com"}},
	} {
		if got := parseAddressList(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("parseAddressList(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func FuzzParseAddressList(f *testing.F) {
	for _, s := range []string{`a@b.c`, `"x" <y@z>`, `g: a@b, c@d;`, `=?utf-8?b?w7w=?= <u@v>`, `;;@@<>`, "0@\xff", "X@İ.example"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, a := range parseAddressList(s) {
			if !strings.Contains(a, "@") {
				t.Errorf("parseAddressList(%q) returned %q, not an address", s, a)
			}
			// Lowered as ASCII only (lowerASCII): Unicode case mappings
			// would make foreign addresses equal to allowed ones.
			if strings.ContainsAny(a, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") {
				t.Errorf("parseAddressList(%q) returned %q, not lower case", s, a)
			}
		}
	})
}

func TestRemoveField(t *testing.T) {
	in := "From: a\r\nBcc: x,\r\n y\r\nTo: b\r\nbcc : z\r\nX-Bcc-Info: keep\r\n"
	want := "From: a\r\nTo: b\r\nX-Bcc-Info: keep\r\n"
	if got := string(removeField([]byte(in), "Bcc")); got != want {
		t.Errorf("removeField = %q, want %q", got, want)
	}
}

func TestFoldedField(t *testing.T) {
	var addrs []string
	for i := range 10 {
		addrs = append(addrs, strings.Repeat("r", 10)+string(rune('a'+i))+"@example.com")
	}
	got := string(foldedField("Bcc", addrs))
	if !strings.HasSuffix(got, "\r\n") {
		t.Fatal("field does not end in CRLF")
	}
	lines := strings.Split(strings.TrimSuffix(got, "\r\n"), "\r\n")
	if len(lines) < 2 {
		t.Fatalf("not folded: %q", got)
	}
	for i, l := range lines {
		if len(l) > 78 {
			t.Errorf("line %d is %d characters long", i, len(l))
		}
		if i > 0 && l[0] != ' ' {
			t.Errorf("continuation line %q does not start with white space", l)
		}
	}
	h := parseHeader([]byte(got))
	if back := headerAddresses(h, "Bcc"); !slices.Equal(back, addrs) {
		t.Errorf("folded field reads back as %v", back)
	}
}

func TestViewReadAtAndSlice(t *testing.T) {
	v := View{BytesPiece([]byte("hello ")), BytesPiece(nil), Piece{r: strings.NewReader("xxbig yy"), off: 2, n: 4}, BytesPiece([]byte("world"))}
	whole := "hello big world"
	if v.Size() != int64(len(whole)) {
		t.Fatalf("size %d", v.Size())
	}
	for off := 0; off <= len(whole); off++ {
		for n := 0; n <= len(whole)-off+2; n++ {
			p := make([]byte, n)
			got, err := v.ReadAt(p, int64(off))
			want := min(n, len(whole)-off)
			if got != want || string(p[:got]) != whole[off:off+want] {
				t.Fatalf("ReadAt(%d bytes at %d) = %d %q", n, off, got, p[:got])
			}
			if got < n && err != io.EOF {
				t.Fatalf("short ReadAt without EOF")
			}
		}
	}
	for from := 0; from <= len(whole); from++ {
		for to := from; to <= len(whole); to++ {
			sl := v.Slice(int64(from), int64(to))
			b, err := io.ReadAll(io.NewSectionReader(sl, 0, sl.Size()))
			if err != nil || string(b) != whole[from:to] {
				t.Fatalf("slice(%d, %d) = %q, %v", from, to, b, err)
			}
		}
	}
}

func TestSenderPolicy_Allows(t *testing.T) {
	var p SenderPolicy
	for _, s := range []string{"Orders@Example.com", "*@fleet.example.net"} {
		sp, err := parseSenderPattern(s)
		if err != nil {
			t.Fatal(err)
		}
		p = append(p, sp)
	}
	for addr, want := range map[string]bool{
		"orders@example.com": true, "ORDERS@EXAMPLE.COM": true, "other@example.com": false,
		"a@fleet.example.net": true, "a@sub.fleet.example.net": false, "a@evilfleet.example.net": false,
		"fleet.example.net": false, "": false, "orders@example.com.evil": false,
	} {
		if got := p.Allows(addr); got != want {
			t.Errorf("allows(%q) = %v, want %v", addr, got, want)
		}
	}
	for _, bad := range []string{"*", "*@", "x*@example.com", "not an address", "*@a@b"} {
		if _, err := parseSenderPattern(bad); err == nil {
			t.Errorf("parseSenderPattern(%q) accepted", bad)
		}
	}
}

// A Subject for a log line: decoded, one line, no control characters,
// clipped.
func TestDisplayText(t *testing.T) {
	for in, want := range map[string]string{
		"=?utf-8?q?Gr=C3=BC=C3=9Fe?= from the ship": "Grüße from the ship",
		"PO 4711\r\n\tfolded\x1b[31m red":           "PO 4711 folded [31m red",
		"  ":                                        "",
		strings.Repeat("x", 130):                    strings.Repeat("x", 120) + "…",
	} {
		if got := DisplayText(in); got != want {
			t.Errorf("DisplayText(%q) = %q, want %q", in, got, want)
		}
	}
}
