package bridge_test

import (
	"bytes"
	"fmt"
	"net/mail"
	"strings"
	"testing"
	"time"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/upstream/m365fake"
)

// Exactly once: when Graph's answer to a send is lost after Graph took the
// message, the bridge finds the message in Sent Items instead of sending
// it again. Each test here counts the copies the fake Graph took.

// grantRead lets tenant A's app list messages with the least read
// permission, as well as send.
func grantRead(fake *m365fake.Server, more ...string) {
	fake.AddApp(tenantA, clientA, secretA, append([]string{"Mail.Send", "Mail.ReadBasic.All", "POP.AccessAsApp", "IMAP.AccessAsApp"}, more...)...)
}

// copies counts the messages the fake Graph took with Message-ID id.
func copies(t *testing.T, fake *m365fake.Server, id string) int {
	t.Helper()
	n := 0
	for _, m := range fake.Sent() {
		msg, err := mail.ReadMessage(bytes.NewReader(m.MIME))
		if err != nil {
			t.Fatal(err)
		}
		if msg.Header.Get("Message-Id") == id {
			n++
		}
	}
	return n
}

// exactlyOnceConfig is the outbox's configuration with a short look-up
// window, so that a message Graph did not take goes again soon.
func exactlyOnceConfig(t *testing.T, fake *m365fake.Server, window time.Duration) *config.Config {
	cfg := outboxConfig(t, fake)
	cfg.SMTP.LookupWindow = config.Duration{Duration: window}
	return cfg
}

// sendAndSettle sends one message through the outbox and waits for its
// final line.
func sendAndSettle(t *testing.T, b *bridge.Bridge, logs *logBuffer, msg []byte) string {
	t.Helper()
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, msg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the message's final line", func() bool {
		return len(linesWith(logs.String(), "message sent")) > 0 || len(linesWith(logs.String(), "message failed")) > 0
	})
	lines := linesWith(logs.String(), "message sent")
	if len(lines) != 1 {
		t.Fatalf("%d final lines, want one \"message sent\":\n%s", len(lines), logs)
	}
	return lines[0]
}

// A 504 from a gateway, or a connection dropped, after Graph took the
// message: the outbox finds it in Sent Items (which shows it a moment
// later) and does not send it again.
func TestExactlyOnceAnswerLostAfterAcceptance(t *testing.T) {
	for name, fault := range map[string]m365fake.Fault{
		"504":  m365fake.GatewayTimeoutAfterAccept(),
		"drop": m365fake.DropAfterAccept(),
	} {
		t.Run(name, func(t *testing.T) {
			fake := startFake(t)
			grantRead(fake)
			fake.SetSentItemsLag(300 * time.Millisecond)
			fake.FailGraph(1, fault)
			b, logs := startBridge(t, fake, exactlyOnceConfig(t, fake, time.Hour))
			id := "<po-4711@example.com>"
			line := sendAndSettle(t, b, logs, crlf("From: orders@example.com\nTo: x@example.org\nMessage-ID: "+id+"\nSubject: PO 4711\n\norder\n"))
			if !strings.Contains(line, `"found_in_sent_items":true`) || strings.Contains(line, "possible_duplicate") {
				t.Errorf("final line: %s", line)
			}
			if n := copies(t, fake, id); n != 1 {
				t.Errorf("%d copies at Graph, want 1", n)
			}
			if fake.SentItemLookups(id) < 1 {
				t.Error("Sent Items was never looked at")
			}
			if len(linesWith(logs.String(), "the message whose send had an unknown outcome is in Sent Items: it was sent, and is not sent again")) != 1 {
				t.Errorf("the find is not logged once:\n%s", logs)
			}
		})
	}
}

// A connection dropped before Graph took the message: not in Sent Items
// within the window, so sent again, once.
func TestExactlyOnceDropBeforeAcceptance(t *testing.T) {
	fake := startFake(t)
	grantRead(fake)
	fake.FailGraph(1, m365fake.Fault{Drop: true})
	b, logs := startBridge(t, fake, exactlyOnceConfig(t, fake, 2*time.Second))
	id := "<po-4712@example.com>"
	line := sendAndSettle(t, b, logs, crlf("From: orders@example.com\nTo: x@example.org\nMessage-ID: "+id+"\n\norder\n"))
	if n := copies(t, fake, id); n != 1 {
		t.Errorf("%d copies at Graph, want 1", n)
	}
	if strings.Contains(line, "found_in_sent_items") {
		t.Errorf("final line says found: %s", line)
	}
}

// A message without a Message-ID gets one at DATA: it is in the final
// line, Graph gets it, and it is what the look-up finds.
func TestExactlyOnceWithoutMessageID(t *testing.T) {
	fake := startFake(t)
	grantRead(fake)
	fake.FailGraph(1, m365fake.GatewayTimeoutAfterAccept())
	b, logs := startBridge(t, fake, exactlyOnceConfig(t, fake, time.Hour))
	line := sendAndSettle(t, b, logs, crlf("From: orders@example.com\nTo: x@example.org\nSubject: no id\n\nscan\n"))
	sent := fake.Sent()
	if len(sent) != 1 {
		t.Fatalf("%d copies at Graph, want 1", len(sent))
	}
	msg, _ := mail.ReadMessage(bytes.NewReader(sent[0].MIME))
	id := msg.Header.Get("Message-Id")
	if !addedMessageID.MatchString("Message-ID: " + id + "\r\n") {
		t.Fatalf("Graph got Message-ID %q, not one the bridge made", id)
	}
	if !strings.Contains(line, `"message_id":"`+id+`"`) || !strings.Contains(line, `"found_in_sent_items":true`) {
		t.Errorf("final line lacks the added ID %s or the find: %s", id, line)
	}
	if queued := linesWith(logs.String(), "message queued"); len(queued) != 1 || !strings.Contains(queued[0], id) {
		t.Errorf("the queue line lacks the added ID: %v", queued)
	}
}

// The large-message path: Graph took the draft's /send and the answer was
// lost; the draft is not sent again, nor deleted while it is being sent.
func TestExactlyOnceLargeMessage(t *testing.T) {
	fake := startFake(t)
	grantReadWrite(fake)
	fake.SetSentItemsLag(300 * time.Millisecond)
	fake.FailEndpoint(m365fake.EndpointSendDraft, 1, m365fake.GatewayTimeoutAfterAccept())
	cfg := exactlyOnceConfig(t, fake, time.Hour)
	cfg.SMTP.SpoolDir = t.TempDir()
	b, logs := startBridge(t, fake, cfg)
	msg := bigAttachmentMessage(6 << 20)
	line := sendAndSettle(t, b, logs, msg)
	if n := copies(t, fake, "<large-once@example.com>"); n != 1 {
		t.Errorf("%d copies at Graph, want 1", n)
	}
	if !strings.Contains(line, `"found_in_sent_items":true`) || !strings.Contains(line, `"path":"draft"`) {
		t.Errorf("final line: %s", line)
	}
	if n := fake.Drafts(); n != 0 {
		t.Errorf("%d drafts left at Graph", n)
	}
}

// bigAttachmentMessage is a message over sendMail's limit, with the
// Message-ID <large-once@example.com>.
func bigAttachmentMessage(size int) []byte {
	var b strings.Builder
	b.WriteString("From: orders@example.com\r\nTo: x@example.org\r\nMessage-ID: <large-once@example.com>\r\nSubject: drawings\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nsee attached\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=a.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n")
	line := strings.Repeat("QUFB", 19) + "\r\n"
	for b.Len() < size {
		b.WriteString(line)
	}
	b.WriteString("--b--\r\n")
	return []byte(b.String())
}

// Synchronous mode (outbox off): a lost answer found within send_timeout
// is a 250; one not found in time is a 451, and the client's resend is
// looked up first and answered 250 without a second copy.
func TestExactlyOnceSynchronous(t *testing.T) {
	t.Run("found in time", func(t *testing.T) {
		fake := startFake(t)
		grantRead(fake)
		fake.SetSentItemsLag(300 * time.Millisecond)
		fake.FailGraph(1, m365fake.GatewayTimeoutAfterAccept())
		b, logs := startBridge(t, fake, testConfig(fake))
		c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
		id := "<sync-1@example.com>"
		reply, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\nMessage-ID: "+id+"\n\nx\n"))
		if err != nil || !strings.Contains(reply, "in Sent Items") {
			t.Fatalf("the client was told %q, %v; want 250 saying it is in Sent Items", reply, err)
		}
		if n := copies(t, fake, id); n != 1 {
			t.Errorf("%d copies at Graph, want 1", n)
		}
		if l := linesWith(logs.String(), "message sent"); len(l) != 1 || !strings.Contains(l[0], `"found_in_sent_items":true`) {
			t.Errorf("final line: %v", l)
		}
	})
	for name, withID := range map[string]bool{"client's ID": true, "added ID": false} {
		t.Run("client retries, "+name, func(t *testing.T) {
			fake := startFake(t)
			grantRead(fake)
			fake.SetSentItemsLag(time.Hour) // not there within send_timeout
			fake.FailGraph(1, m365fake.GatewayTimeoutAfterAccept())
			cfg := testConfig(fake)
			cfg.SMTP.SendTimeout = config.Duration{Duration: 2 * time.Second}
			b, logs := startBridge(t, fake, cfg)
			msg := "From: orders@example.com\nTo: x@example.org\nSubject: retried\n\nx\n"
			if withID {
				msg = "Message-ID: <sync-2@example.com>\n" + msg
			}
			c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
			_, err := send(c, mailboxA, []string{"x@example.org"}, crlf(msg))
			if code, _ := smtpCode(err); code != 451 || !strings.Contains(err.Error(), "will not send it twice") {
				t.Fatalf("first try: %v, want 451 saying it will not be sent twice", err)
			}
			if l := linesWith(logs.String(), "message outcome unknown"); len(l) != 1 || !strings.Contains(l[0], `"outcome_unknown":true`) {
				t.Fatalf("the unknown outcome is not logged once: %v", l)
			}
			fake.RevealSentItems() // Exchange files it at last
			c2 := dialAuth(t, b.SMTPAddr(), userA, passwordA)
			if _, err := send(c2, mailboxA, []string{"x@example.org"}, crlf(msg)); err != nil {
				t.Fatalf("the client's resend: %v", err)
			}
			if n := len(fake.Sent()); n != 1 {
				t.Errorf("%d copies at Graph, want 1", n)
			}
			if l := linesWith(logs.String(), "message sent"); len(l) != 1 || !strings.Contains(l[0], `"found_in_sent_items":true`) {
				t.Errorf("final line of the resend: %v", l)
			}
		})
	}
}

// Without a permission that lists Sent Items the bridge sends again, as
// before, but flags the resend and names the permission.
func TestExactlyOnceWithoutReadPermission(t *testing.T) {
	fake := startFake(t) // Mail.Send only
	fake.FailGraph(1, m365fake.GatewayTimeoutAfterAccept())
	b, logs := startBridge(t, fake, exactlyOnceConfig(t, fake, time.Hour))
	id := "<no-read@example.com>"
	line := sendAndSettle(t, b, logs, crlf("From: orders@example.com\nTo: x@example.org\nMessage-ID: "+id+"\n\nx\n"))
	if n := copies(t, fake, id); n != 2 {
		t.Errorf("%d copies at Graph, want 2 (the resend without a look-up)", n)
	}
	if !strings.Contains(line, `"possible_duplicate":true`) {
		t.Errorf("the resend is not flagged: %s", line)
	}
	l := linesWith(logs.String(), "the send had an unknown outcome and cannot be checked in Sent Items: sending it again")
	if len(l) != 1 || !strings.Contains(l[0], "Mail.ReadBasic.All") || !strings.Contains(l[0], `"hint"`) {
		t.Errorf("the missing permission is not named once: %v", l)
	}
	waitFor(t, "the start-up line about the permission", func() bool {
		return len(linesWith(logs.String(), "delivery is not exactly once for this account")) == 2 // both accounts
	})
	for _, l := range linesWith(logs.String(), "delivery is not exactly once for this account") {
		if !strings.Contains(l, "Mail.ReadBasic.All") {
			t.Errorf("the start-up line does not name the permission: %s", l)
		}
	}
}

// 429 and 503 say Graph did not take the message: sent again at once,
// without a look-up, and not flagged.
func TestExactlyOnceRefusalsNeedNoLookup(t *testing.T) {
	fake := startFake(t)
	grantRead(fake)
	fake.FailGraph(1, m365fake.Throttled("0"))
	fake.FailGraph(1, m365fake.Unavailable())
	b, logs := startBridge(t, fake, exactlyOnceConfig(t, fake, time.Hour))
	line := sendAndSettle(t, b, logs, crlf("From: orders@example.com\nTo: x@example.org\nMessage-ID: <refused@example.com>\n\nx\n"))
	if n, looks := copies(t, fake, "<refused@example.com>"), fake.SentItemLookups("<refused@example.com>"); n != 1 || looks != 0 {
		t.Errorf("%d copies, %d look-ups; want 1 and none", n, looks)
	}
	if strings.Contains(line, "possible_duplicate") || strings.Contains(line, "found_in_sent_items") {
		t.Errorf("final line: %s", line)
	}
}

// A program that gives every message the same Message-ID: the second
// message is not mistaken for the first one's copy in Sent Items.
func TestExactlyOnceReusedMessageID(t *testing.T) {
	fake := startFake(t)
	grantRead(fake)
	b, logs := startBridge(t, fake, exactlyOnceConfig(t, fake, time.Hour))
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	for i := range 2 {
		if i == 1 {
			fake.FailGraph(1, m365fake.GatewayTimeoutAfterAccept())
		}
		msg := crlf(fmt.Sprintf("From: orders@example.com\nTo: x@example.org\nMessage-ID: <same@scanner>\nSubject: scan %d\n\nx\n", i))
		if _, err := send(c, mailboxA, []string{"x@example.org"}, msg); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "both final lines", func() bool { return len(linesWith(logs.String(), "message sent")) == 2 })
	subjects := map[string]int{}
	for _, m := range fake.Sent() {
		subjects[m.Subject]++
	}
	if subjects["scan 1"] < 1 {
		t.Errorf("the second message was taken for the first one's copy and never sent: %v", subjects)
	}
	if l := linesWith(logs.String(), "Message-ID used by another message the bridge took in the last day"); len(l) != 1 || !strings.Contains(l[0], `"hint"`) {
		t.Errorf("the reused ID is not reported once: %v", l)
	}
}
