package outlookpop

import (
	"bytes"
	"testing"
)

func TestWriteDotStuffed(t *testing.T) {
	for _, tc := range []struct {
		msg     string
		maxBody int
		want    string
	}{
		{"A: 1\r\n\r\n.x\r\n..\r\nend\r\n", -1, "A: 1\r\n\r\n..x\r\n...\r\nend\r\n.\r\n"},
		{"A: 1\r\n\r\nno final line break", -1, "A: 1\r\n\r\nno final line break\r\n.\r\n"},
		{"A: 1\r\n\r\none\r\ntwo\r\nthree\r\n", 2, "A: 1\r\n\r\none\r\ntwo\r\n.\r\n"},
		{"A: 1\r\nB: 2\r\n\r\nbody\r\n", 0, "A: 1\r\nB: 2\r\n\r\n.\r\n"},
		{"bare\nLF and\rCR\r\n", -1, "bare\nLF and\rCR\r\n.\r\n"},
	} {
		var b bytes.Buffer
		if err := writeDotStuffed(&b, []byte(tc.msg), tc.maxBody, false); err != nil {
			t.Fatal(err)
		}
		if b.String() != tc.want {
			t.Errorf("writeDotStuffed(%q, %d) = %q, want %q", tc.msg, tc.maxBody, b.String(), tc.want)
		}
	}
}
