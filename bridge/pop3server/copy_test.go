package pop3server

import (
	"bufio"
	"bytes"
	"io"
	"testing"
)

// FuzzCopyMultiline checks the data path against a reference: any message,
// dot-stuffed as a server does, is copied exactly up to its terminator and
// no further.
func FuzzCopyMultiline(f *testing.F) {
	f.Add([]byte("a\r\n.\r\nb"), []byte("+OK next"))
	f.Add([]byte(".\r\n..\r\n\r\r\n\n.x"), []byte(""))
	f.Add([]byte{}, []byte("tail"))
	f.Fuzz(func(t *testing.T, msg, tail []byte) {
		var stuffed bytes.Buffer
		if err := writeStuffedReference(&stuffed, msg); err != nil {
			t.Skip()
		}
		src := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(stuffed.Bytes()), bytes.NewReader(tail)), 16)
		var got bytes.Buffer
		n, err := copyMultiline(&got, src, func() {}, 0)
		if err != nil || n != int64(stuffed.Len()) || !bytes.Equal(got.Bytes(), stuffed.Bytes()) {
			t.Fatalf("copied %d %q (%v), want %q", n, got.Bytes(), err, stuffed.Bytes())
		}
		rest, _ := io.ReadAll(src)
		if !bytes.Equal(rest, tail) {
			t.Fatalf("left %q, want %q", rest, tail)
		}
	})
}

// writeStuffedReference dot-stuffs msg line by line (CRLF lines) and adds
// the terminator, as RFC 1939 §3 describes.
func writeStuffedReference(w *bytes.Buffer, msg []byte) error {
	if len(msg) > 0 && !bytes.HasSuffix(msg, []byte("\r\n")) {
		msg = append(msg[:len(msg):len(msg)], "\r\n"...)
	}
	for _, line := range bytes.SplitAfter(msg, []byte("\r\n")) {
		if len(line) == 0 {
			continue
		}
		if line[0] == '.' {
			w.WriteByte('.')
		}
		w.Write(line)
	}
	w.WriteString(".\r\n")
	return nil
}
