package bridge_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	bmime "mailbridge/bridge/mime"
	"math/rand/v2"
	"mime"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/emersion/go-message"
	"github.com/emersion/go-message/mail"
	"github.com/emersion/go-smtp"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/upstream/m365fake"
)

// randomBytes returns n reproducible pseudo-random bytes (incompressible,
// like a zip).
func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64()
		for j := range 8 {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// mimeBuilder writes a MIME message the way mail clients do.
type mimeBuilder struct{ bytes.Buffer }

func (m *mimeBuilder) line(s string) { m.WriteString(s + "\r\n") }

func (m *mimeBuilder) base64Part(boundary, headers string, data []byte) {
	m.line("--" + boundary)
	m.WriteString(strings.ReplaceAll(headers, "\n", "\r\n"))
	m.line("Content-Transfer-Encoding: base64")
	m.line("")
	enc := base64.StdEncoding.EncodeToString(data)
	for len(enc) > 76 {
		m.line(enc[:76])
		enc = enc[76:]
	}
	m.line(enc)
}

func (m *mimeBuilder) textPart(boundary, ctype, body string) {
	m.line("--" + boundary)
	m.line("Content-Type: " + ctype)
	m.line("Content-Transfer-Encoding: 8bit")
	m.line("")
	m.WriteString(strings.ReplaceAll(body, "\n", "\r\n"))
}

// message12MB: a 10 MB zip, a 1 MB PDF with an RFC 2231 UTF-8 name, and an
// inline PNG the HTML refers to by cid, with text and HTML alternatives.
func message12MB() []byte {
	var m mimeBuilder
	m.line("From: Orders <orders@example.com>")
	m.line("To: supplier@example.org")
	m.line("Subject: =?utf-8?q?Bestellung_Nr=2E_42_=E2=80=93_M=C3=BCller?=")
	m.line("Message-ID: <large-12@mailbridge.test>")
	m.line("MIME-Version: 1.0")
	m.line(`Content-Type: multipart/mixed; boundary="mixed"`)
	m.line("")
	m.line("This is a multi-part message in MIME format.")
	m.line("--mixed")
	m.line(`Content-Type: multipart/related; boundary="related"`)
	m.line("")
	m.line("--related")
	m.line(`Content-Type: multipart/alternative; boundary="alt"`)
	m.line("")
	m.textPart("alt", "text/plain; charset=utf-8", "Grüße, see the attachments.\n")
	m.textPart("alt", "text/html; charset=utf-8", "<p>Grüße</p><img src=\"cid:logo@mailbridge.test\">\n")
	m.line("--alt--")
	m.base64Part("related", "Content-Type: image/png\nContent-ID: <logo@mailbridge.test>\nContent-Disposition: inline\n", randomBytes(200<<10, 3))
	m.line("--related--")
	m.base64Part("mixed", "Content-Type: application/zip; name=\"replication.zip\"\nContent-Disposition: attachment; filename=\"replication.zip\"\n", randomBytes(10<<20, 1))
	m.base64Part("mixed", "Content-Type: application/pdf\nContent-Disposition: attachment;\n filename*=UTF-8''Pr%C3%BCfbericht%20%E2%84%962.pdf\n", randomBytes(1<<20, 2))
	m.line("--mixed--")
	return m.Bytes()
}

// message40MB: five attachments, one with an RFC 2047 name, and a
// forwarded message/rfc822 holding a nested multipart/mixed with its own
// attachment.
func message40MB() []byte {
	var fwd mimeBuilder
	fwd.line("From: captain@example.com")
	fwd.line("To: orders@example.com")
	fwd.line("Subject: Fwd: engine report")
	fwd.line(`Content-Type: multipart/mixed; boundary="inner"`)
	fwd.line("")
	fwd.textPart("inner", "text/plain; charset=utf-8", "Report attached.\n")
	fwd.base64Part("inner", "Content-Type: application/octet-stream\nContent-Disposition: attachment; filename=\"engine.log\"\n", randomBytes(5<<19, 20))
	fwd.line("--inner--")

	var m mimeBuilder
	m.line("From: orders@example.com")
	m.line("To: supplier@example.org, agent@port.example")
	m.line("Subject: Five attachments")
	m.line("MIME-Version: 1.0")
	m.line(`Content-Type: multipart/mixed; boundary="b40"`)
	m.line("")
	m.textPart("b40", "text/plain; charset=utf-8", "Five files and a forwarded message.\n")
	for i, size := range []int{8 << 20, 7 << 20, 5 << 20, 4 << 20, 3 << 19} {
		disp := fmt.Sprintf("attachment; filename=\"part%d.bin\"", i+1)
		switch i {
		case 1: // RFC 2047, as Outlook and many older clients write it
			disp = fmt.Sprintf("attachment; filename=\"%s\"", mime.BEncoding.Encode("utf-8", "Übersicht Schiff №1.xlsx"))
		case 3: // RFC 2231
			disp = "attachment;\n filename*=UTF-8''Pr%C3%BCfbericht%20%E2%84%962.pdf"
		}
		m.base64Part("b40", "Content-Type: application/octet-stream\nContent-Disposition: "+disp+"\n", randomBytes(size, uint64(10+i)))
	}
	m.line("--b40")
	m.line("Content-Type: message/rfc822")
	m.line("Content-Disposition: attachment")
	m.line("")
	m.Write(fwd.Bytes())
	m.line("--b40--")
	return m.Bytes()
}

// leaf is a MIME leaf as a reader of the message sees it.
type leaf struct {
	mediaType, filename, contentID string
	inline                         bool
	sha                            [32]byte
	size                           int
}

// leaves flattens a message into its leaves, forwarded messages counted as
// one leaf each; empty text parts are left out.
func leaves(t *testing.T, raw []byte) []leaf {
	t.Helper()
	e, err := message.Read(bytes.NewReader(raw))
	if err != nil && !message.IsUnknownCharset(err) {
		t.Fatalf("parse: %v", err)
	}
	var out []leaf
	var walk func(e *message.Entity)
	walk = func(e *message.Entity) {
		if mr := e.MultipartReader(); mr != nil {
			for {
				p, err := mr.NextPart()
				if err == io.EOF {
					return
				}
				if err != nil && !message.IsUnknownCharset(err) {
					t.Fatalf("part: %v", err)
				}
				walk(p)
			}
		}
		mt, _, _ := e.Header.ContentType()
		disp, _, _ := e.Header.ContentDisposition()
		ah := mail.AttachmentHeader{Header: e.Header}
		name, _ := ah.Filename()
		body, _ := io.ReadAll(e.Body)
		if strings.HasPrefix(mt, "text/") && len(bytes.TrimSpace(body)) == 0 {
			return
		}
		cid := strings.Trim(e.Header.Get("Content-Id"), "<>")
		if mt == "message/rfc822" {
			name = "" // Graph needs a name; the bridge makes one up
		}
		out = append(out, leaf{mediaType: mt, filename: name, contentID: cid, inline: disp == "inline" || (disp == "" && cid != ""), sha: sha256.Sum256(body), size: len(body)})
	}
	walk(e)
	slices.SortFunc(out, func(a, b leaf) int { return bytes.Compare(a.sha[:], b.sha[:]) })
	return out
}

func topHeader(raw []byte) string {
	h, _ := bmime.SplitHeader(raw)
	return string(raw[:h])
}

// sendLarge sends msg through the bridge and returns what the fake
// received.
func sendLarge(t *testing.T, fake *m365fake.Server, b *bridge.Bridge, msg []byte, rcpts ...string) m365fake.SentMessage {
	t.Helper()
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, rcpts, msg); err != nil {
		t.Fatalf("send: %v", err)
	}
	sent := fake.Sent()
	if len(sent) != 1 {
		t.Fatalf("Graph sent %d messages, want 1", len(sent))
	}
	return sent[0]
}

// checkSameMessage compares what the client sent with what the fake
// rebuilds: the same header, the same leaves byte for byte.
func checkSameMessage(t *testing.T, sent m365fake.SentMessage, original []byte, wantHeader string) {
	t.Helper()
	raw := sent.MIME
	if !strings.Contains(wantHeader, "Message-ID:") {
		raw = withoutAddedID(t, raw)
	}
	if got := topHeader(raw); got != wantHeader {
		t.Errorf("header changed:\n%q\nwant\n%q", got, wantHeader)
	}
	rebuilt, err := sent.Rebuild()
	if err != nil {
		t.Fatal(err)
	}
	got, want := leaves(t, rebuilt), leaves(t, original)
	if !slices.Equal(got, want) {
		t.Errorf("leaves differ:\ngot  %+v\nwant %+v", got, want)
	}
	if len(sent.MIME) > 3_000_000 {
		t.Errorf("the draft has %d bytes of MIME", len(sent.MIME))
	}
}

func largeTestConfig(t *testing.T, fake *m365fake.Server) *config.Config {
	cfg := testConfig(fake)
	cfg.SMTP.SpoolDir = t.TempDir()
	return cfg
}

func noSpoolLeft(t *testing.T, dir string) {
	t.Helper()
	entries, _ := os.ReadDir(dir)
	if len(entries) != 0 {
		t.Errorf("spool files left behind: %v", entries)
	}
}

func grantReadWrite(fake *m365fake.Server) {
	fake.AddApp(tenantA, clientA, secretA, "Mail.Send", "Mail.ReadWrite", "POP.AccessAsApp", "IMAP.AccessAsApp")
}

func TestLargeMessage12MB(t *testing.T) {
	fake := startFake(t)
	grantReadWrite(fake)
	cfg := largeTestConfig(t, fake)
	b, logs := startBridge(t, fake, cfg)
	msg := message12MB()
	sent := sendLarge(t, fake, b, msg, "supplier@example.org", "archive@example.com")
	checkSameMessage(t, sent, msg, topHeader(msg)+"Bcc: archive@example.com\r\n")
	// The zip alone takes it under the limit: the PDF and the inline
	// image stay in the MIME as the client wrote them.
	if len(sent.Attachments) != 1 || sent.Attachments[0].Name != "replication.zip" || sent.Attachments[0].ContentType != "application/zip" {
		t.Errorf("attachments %+v, want the zip", sent.Attachments)
	}
	if !slices.Contains(sent.Recipients, "archive@example.com") {
		t.Errorf("the envelope-only recipient is missing: %v", sent.Recipients)
	}
	if fake.Drafts() != 0 {
		t.Errorf("%d drafts left", fake.Drafts())
	}
	if !strings.Contains(logs.String(), `"path":"draft"`) {
		t.Error("the log does not say the message went as a draft")
	}
	noSpoolLeft(t, cfg.SMTP.SpoolDir)
}

func TestLargeMessage40MBWithForwardedMessage(t *testing.T) {
	fake := startFake(t)
	grantReadWrite(fake)
	cfg := largeTestConfig(t, fake)
	cfg.SMTP.MaxMessageBytes = 50 << 20
	b, _ := startBridge(t, fake, cfg)
	msg := message40MB()
	if len(msg) < 38<<20 || len(msg) > 42<<20 {
		t.Fatalf("the message has %d bytes, want about 40 MB", len(msg))
	}
	sent := sendLarge(t, fake, b, msg, "supplier@example.org", "agent@port.example")
	checkSameMessage(t, sent, msg, topHeader(msg))
	var names []string
	for _, a := range sent.Attachments {
		names = append(names, a.Name+" "+a.ContentType)
	}
	slices.Sort(names)
	want := []string{"Fwd_ engine report.eml message/rfc822", "Prüfbericht №2.pdf application/octet-stream", "part1.bin application/octet-stream", "part3.bin application/octet-stream", "Übersicht Schiff №1.xlsx application/octet-stream"}
	if !slices.Equal(names, want) {
		t.Errorf("attachments %q\nwant %q", names, want)
	}
	noSpoolLeft(t, cfg.SMTP.SpoolDir)
}

func TestLargeMessageChunkFailureResumes(t *testing.T) {
	fake := startFake(t)
	grantReadWrite(fake)
	b, logs := startBridge(t, fake, largeTestConfig(t, fake))
	fake.FailEndpoint(m365fake.EndpointUpload, 1, m365fake.Fault{})           // the first chunk goes through
	fake.FailEndpoint(m365fake.EndpointUpload, 1, m365fake.Fault{Drop: true}) // the second is cut off
	fake.FailEndpoint(m365fake.EndpointUpload, 1, m365fake.Unavailable())     // and refused once more
	fake.FailEndpoint(m365fake.EndpointCreateDraft, 1, m365fake.Throttled("0.01"))
	msg := message12MB()
	sent := sendLarge(t, fake, b, msg, "supplier@example.org")
	checkSameMessage(t, sent, msg, topHeader(msg))
	if !strings.Contains(logs.String(), `"message":"message sent"`) {
		t.Error("no message sent line")
	}
}

func TestLargeMessagePermanentFailureDeletesDraft(t *testing.T) {
	fake := startFake(t)
	grantReadWrite(fake)
	cfg := largeTestConfig(t, fake)
	b, _ := startBridge(t, fake, cfg)
	fake.FailEndpoint(m365fake.EndpointSendDraft, 1, m365fake.Fault{Status: 400, Code: "ErrorMessageSizeExceeded", Message: "The message exceeds the maximum supported size."})
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	_, err := send(c, mailboxA, []string{"supplier@example.org"}, message12MB())
	if code, ec := smtpCode(err); code != 552 || ec != (smtp.EnhancedCode{5, 3, 4}) {
		t.Fatalf("got %v, want 552 5.3.4", err)
	}
	if fake.Drafts() != 0 || len(fake.Sent()) != 0 {
		t.Fatalf("%d drafts and %d sent messages left, want none", fake.Drafts(), len(fake.Sent()))
	}
	noSpoolLeft(t, cfg.SMTP.SpoolDir)
}

func TestLargeMessageRefusedWithoutPermissionOrSetting(t *testing.T) {
	fake := startFake(t) // the app has Mail.Send only
	cfg := largeTestConfig(t, fake)
	off := false
	cfg.Accounts[1].LargeMessagesSetting = &off
	cfg.Accounts[1].AllowedSenders = []string{mailboxB}
	b, logs := startBridge(t, fake, cfg)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	_, err := send(c, mailboxA, []string{"supplier@example.org"}, message12MB())
	if code, _ := smtpCode(err); code != 552 || !strings.Contains(err.Error(), "Mail.ReadWrite") {
		t.Errorf("without Mail.ReadWrite: %v", err)
	}
	if !strings.Contains(logs.String(), "grant Mail.ReadWrite") {
		t.Error("the log does not say which permission to grant")
	}
	c2 := dialAuth(t, b.SMTPAddr(), userB, passwordB)
	msg := bytes.Replace(message12MB(), []byte("From: Orders <orders@example.com>"), []byte("From: "+mailboxB), 1)
	_, err = send(c2, mailboxB, []string{"supplier@example.org"}, msg)
	if code, _ := smtpCode(err); code != 552 || !strings.Contains(err.Error(), "large_messages is off") {
		t.Errorf("large_messages = false: %v", err)
	}
	if fake.Drafts() != 0 || len(fake.Sent()) != 0 {
		t.Error("something reached Graph")
	}
}

func TestOverMaxMessageBytes(t *testing.T) {
	fake := startFake(t)
	cfg := largeTestConfig(t, fake)
	cfg.SMTP.MaxMessageBytes = 5 << 20
	b, _ := startBridge(t, fake, cfg)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if ok, v := c.Extension("SIZE"); !ok || v != fmt.Sprint(5<<20) {
		t.Errorf("EHLO SIZE %q", v)
	}
	_, err := send(c, mailboxA, []string{"supplier@example.org"}, message12MB())
	if code, ec := smtpCode(err); code != 552 || ec != (smtp.EnhancedCode{5, 3, 4}) {
		t.Fatalf("got %v, want 552 5.3.4", err)
	}
	noSpoolLeft(t, cfg.SMTP.SpoolDir)
}

// A message that could only go in thousands of Graph requests, or whose
// body is over sendMail's limit without its attachments, is refused at
// DATA with 552 5.3.4 saying why, with the outbox on or off; nothing is
// queued or sent.
func TestUnsendableLargeMessagesRefusedAtData(t *testing.T) {
	var many mimeBuilder
	many.line("From: orders@example.com")
	many.line("To: x@example.org")
	many.line(`Content-Type: multipart/mixed; boundary="m"`)
	many.line("")
	for i := range 8500 {
		many.base64Part("m", fmt.Sprintf("Content-Type: application/octet-stream\nContent-Disposition: attachment; filename=\"f%d.bin\"\n", i), randomBytes(200, uint64(i)))
	}
	many.line("--m--")
	body := crlf("From: orders@example.com\nTo: x@example.org\n\n" + strings.Repeat(strings.Repeat("b", 76)+"\n", 48000))
	for _, outbox := range []bool{false, true} {
		fake := startFake(t)
		grantReadWrite(fake)
		cfg := largeTestConfig(t, fake)
		if outbox {
			cfg = outboxConfig(t, fake)
		}
		b, logs := startBridge(t, fake, cfg)
		c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
		for _, tc := range []struct {
			msg  []byte
			want string
		}{
			{many.Bytes(), "more than the 50 the bridge makes for one message"},
			{body, "even without its attachments the message has"},
		} {
			_, err := send(c, mailboxA, []string{"x@example.org"}, tc.msg)
			if code, ec := smtpCode(err); code != 552 || ec != (smtp.EnhancedCode{5, 3, 4}) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("outbox %v: %d bytes: %v, want 552 5.3.4 %q", outbox, len(tc.msg), err, tc.want)
			}
			c.Reset()
		}
		if n := len(fake.Sent()) + fake.Drafts(); n != 0 {
			t.Errorf("outbox %v: %d messages or drafts reached Graph", outbox, n)
		}
		if strings.Count(logs.String(), "message refused at DATA: it cannot be sent through Graph") != 2 {
			t.Errorf("outbox %v: the refusals are not logged", outbox)
		}
	}
}
