package m365fake

import (
	"bytes"
	"crypto/sha256"
	"net/mail"
	"strings"
	"testing"
)

func TestRebuildAddsAttachments(t *testing.T) {
	s, err := Start()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	f, err := s.attachmentFile()
	if err != nil {
		t.Fatal(err)
	}
	data := []byte("zip bytes \x00\x01\x02")
	f.Write(data)
	f.Close()
	m := SentMessage{
		MIME: []byte("From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\nContent-Type: text/plain\r\n\r\nbody\r\n"),
		Attachments: []SentAttachment{{Name: "Prüfbericht.zip", ContentType: "application/zip", Size: int64(len(data)),
			SHA256: sha256.Sum256(data), path: f.Name(), IsInline: true, ContentID: "c1"}},
	}
	out, err := m.Rebuild()
	if err != nil {
		t.Fatal(err)
	}
	msg, err := mail.ReadMessage(bytes.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	if msg.Header.Get("Subject") != "s" || !strings.HasPrefix(msg.Header.Get("Content-Type"), "multipart/mixed") {
		t.Errorf("header %v", msg.Header)
	}
	for _, want := range []string{"Content-Disposition: inline; filename*=utf-8''Pr%C3%BCfbericht.zip", "Content-ID: <c1>", "emlwIGJ5dGVzIAABAg==", "\r\n\r\nbody\r\n"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("rebuilt message lacks %q:\n%s", want, out)
		}
	}
}
