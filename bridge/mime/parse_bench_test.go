package mime

import (
	"bytes"
	"encoding/base64"
	"testing"
)

// BenchmarkParse100MB parses the structure of a 100 MB message (a text
// part and a base64 attachment), as the bridge does at DATA and again in
// the outbox worker, to show what the second parse costs next to the
// upload it prepares (which moves the same 100 MB over HTTPS).
//
//	go test ./bridge/mime -run '^$' -bench Parse100MB
func BenchmarkParse100MB(b *testing.B) {
	var m bytes.Buffer
	m.WriteString("From: a@example.com\r\nTo: b@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nsee the file\r\n--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=big.bin\r\n\r\n")
	line := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0xfa, 0xce, 0x01}, 57)) + "\r\n"
	for m.Len() < 100<<20 {
		m.WriteString(line)
	}
	m.WriteString("--b1--\r\n")
	msg := m.Bytes()
	b.SetBytes(int64(len(msg)))
	b.ResetTimer()
	for range b.N {
		p, err := Parse(bytes.NewReader(msg), int64(len(msg)))
		if err != nil || p == nil {
			b.Fatal(err)
		}
	}
}
