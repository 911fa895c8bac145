package mime

import (
	"bytes"
	"io"
	"strings"
	"testing"
)

func TestParseMIMEOffsets(t *testing.T) {
	msg := crlf("Content-Type: multipart/mixed; boundary=X\n\npreamble\n--X\nContent-Type: text/plain\n\nhello\n--X\nContent-Type: application/pdf\nContent-Disposition: attachment; filename=a.pdf\n\nPDF\n--X--\nepilogue\n")
	root, err := parseEntity(bytes.NewReader(msg), 0, int64(len(msg)), 0)
	if err != nil {
		t.Fatal(err)
	}
	if root.mediaType != "multipart/mixed" || len(root.children) != 2 {
		t.Fatalf("root %s with %d children", root.mediaType, len(root.children))
	}
	body := func(p *Part) string { return string(msg[p.bodyStart:p.end]) }
	if got := body(root.children[0]); got != "hello" {
		t.Errorf("first body %q", got)
	}
	att := root.children[1]
	if got := body(att); got != "PDF" || !att.isAttachment() || root.children[0].isAttachment() {
		t.Errorf("second body %q, attachment %v", got, att.isAttachment())
	}
	if got := string(msg[att.delimStart:att.nextDelim]); !strings.HasPrefix(got, "--X\r\nContent-Type: application/pdf") || !strings.HasSuffix(got, "PDF\r\n") {
		t.Errorf("removable range %q", got)
	}
	// Cutting the attachment leaves a well-formed message.
	cut := append(append([]byte{}, msg[:att.delimStart]...), msg[att.nextDelim:]...)
	if !bytes.Contains(cut, []byte("hello\r\n--X--\r\nepilogue")) {
		t.Errorf("after the cut: %q", cut)
	}
}

func TestParseMIMELenient(t *testing.T) {
	for name, msg := range map[string]string{
		"LF only":          "Content-Type: multipart/mixed; boundary=X\n\n--X\n\nA\n--X\n\nB\n--X--\n",
		"no close":         "Content-Type: multipart/mixed; boundary=X\r\n\r\n--X\r\n\r\nA\r\n--X\r\n\r\nB\r\n",
		"boundary in text": "Content-Type: multipart/mixed; boundary=X\r\n\r\n--X\r\n\r\nA --X not a delimiter\r\n--Xtra\r\n--X\r\n\r\nB\r\n--X--\r\n",
	} {
		root, err := parseEntity(strings.NewReader(msg), 0, int64(len(msg)), 0)
		if err != nil || len(root.children) != 2 {
			t.Errorf("%s: %v, %d children", name, err, len(root.children))
			continue
		}
		first := strings.TrimRight(msg[root.children[0].bodyStart:root.children[0].end], "\r\n")
		second := strings.TrimRight(msg[root.children[1].bodyStart:root.children[1].end], "\r\n")
		if !strings.HasPrefix(first, "A") || second != "B" {
			t.Errorf("%s: bodies %q and %q", name, first, second)
		}
	}
}

func TestSplitForDraftKeepsMultipartsNonEmpty(t *testing.T) {
	big := strings.Repeat("QUFB", 800_000) // 3.2 MB of base64
	msg := crlf("Content-Type: multipart/mixed; boundary=X\n\n--X\nContent-Type: multipart/related; boundary=Y\n\n--Y\nContent-Type: image/png\nContent-ID: <i>\nContent-Transfer-Encoding: base64\n\n" + big + "\n--Y--\n--X\nContent-Type: text/plain\n\nbody\n--X--\n")
	v := View{BytesPiece(msg)}
	root, err := parseEntity(v, 0, v.Size(), 0)
	if err != nil {
		t.Fatal(err)
	}
	removed, draft := SplitForDraft(root, v, 2_500_000)
	if len(removed) != 1 {
		t.Fatalf("%d removed", len(removed))
	}
	got, _ := io.ReadAll(io.NewSectionReader(draft, 0, draft.Size()))
	want := crlf("Content-Type: multipart/mixed; boundary=X\n\n--X\nContent-Type: multipart/related; boundary=Y\n\n--Y\nContent-Type: text/plain; charset=us-ascii\n\n\n--Y--\n--X\nContent-Type: text/plain\n\nbody\n--X--\n")
	if !bytes.Equal(got, want) {
		t.Errorf("draft\n%q\nwant\n%q", got, want)
	}
	name, ctype, cid, inline := removed[0].AttachmentInfo(1)
	if name != "attachment-1" || ctype != "image/png" || cid != "i" || !inline {
		t.Errorf("attachment %q %q %q %v", name, ctype, cid, inline)
	}
	data, _ := io.ReadAll(removed[0].DecodedBody(v))
	if len(data) != 2_400_000 || !bytes.Equal(data[:3], []byte("AAA")) {
		t.Errorf("decoded %d bytes", len(data))
	}
}

func FuzzParseMIME(f *testing.F) {
	f.Add([]byte("Content-Type: multipart/mixed; boundary=X\r\n\r\n--X\r\n\r\nA\r\n--X--\r\n"))
	f.Add([]byte("Content-Type: message/rfc822\r\n\r\nContent-Type: multipart/mixed; boundary=\"a b\"\r\n\r\n--a b\r\n\r\n--a b--"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		root, err := parseEntity(bytes.NewReader(msg), 0, int64(len(msg)), 0)
		if err != nil {
			return
		}
		var check func(p *Part)
		check = func(p *Part) {
			if p.start > p.bodyStart || p.bodyStart > p.end || p.end > int64(len(msg)) {
				t.Fatalf("part offsets %d %d %d of %d", p.start, p.bodyStart, p.end, len(msg))
			}
			for _, c := range p.children {
				if c.start < p.bodyStart || c.end > p.end {
					t.Fatalf("child [%d,%d) outside parent body [%d,%d)", c.start, c.end, p.bodyStart, p.end)
				}
				if c.delimStart >= 0 && (c.delimStart > c.start || c.nextDelim < c.end) {
					t.Fatalf("removable range [%d,%d) does not cover [%d,%d)", c.delimStart, c.nextDelim, c.start, c.end)
				}
				check(c)
			}
		}
		check(root)
	})
}

func crlf(s string) []byte { return []byte(strings.ReplaceAll(s, "\n", "\r\n")) }
