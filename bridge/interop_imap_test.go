package bridge_test

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

var xtuid = regexp.MustCompile(`(?m)^X-TUID: \S+\r?\n`)

const pythonIMAP = `
import imaplib, sys
host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
m = imaplib.IMAP4(host, port)
m.login(user, password)
typ, data = m.select("INBOX")
count = int(data[0])
for i in range(1, count + 1):
    typ, msg = m.fetch(str(i), "(BODY.PEEK[])")
    sys.stdout.buffer.write(msg[0][1] + b"\x00")
m.logout()
`

func TestInteropPythonImaplib(t *testing.T) {
	python := need(t, "python3")
	fake := startFake(t)
	b, _, _ := interopBridge(t, fake, nil)
	msgs := pop3Fixtures(fake)
	script := filepath.Join(t.TempDir(), "imap.py")
	os.WriteFile(script, []byte(pythonIMAP), 0o600)
	host, port := hostPort(b.IMAPAddr())
	out := run(t, nil, python, script, host, port, userA, passwordA)
	got := strings.Split(strings.TrimSuffix(out, "\x00"), "\x00")
	if len(got) != len(msgs) {
		t.Fatalf("imaplib fetched %d messages, want %d", len(got), len(msgs))
	}
	for i := range msgs {
		if got[i] != string(msgs[i]) {
			t.Errorf("message %d through imaplib: %q, want %q", i+1, head([]byte(got[i])), head(msgs[i]))
		}
	}
}

func TestInteropCurlIMAPWithSTARTTLS(t *testing.T) {
	curl := need(t, "curl")
	fake := startFake(t)
	b, _, ca := interopBridge(t, fake, nil)
	msgs := pop3Fixtures(fake)
	_, port := hostPort(b.IMAPAddr())
	base := []string{"-sS", "--ssl-reqd", "--cacert", ca, "--resolve", "localhost:" + port + ":127.0.0.1", "--user", userA + ":" + passwordA}
	for i := range msgs {
		got := run(t, nil, curl, append(base, fmt.Sprintf("imap://localhost:%s/INBOX;UID=%d", port, i+1))...)
		if got != string(msgs[i]) {
			t.Errorf("UID %d through curl: %q, want %q", i+1, head([]byte(got)), head(msgs[i]))
		}
	}
}

func TestInteropFetchmailIMAP(t *testing.T) {
	fetchmail := need(t, "fetchmail")
	fake := startFake(t)
	b, _, _ := interopBridge(t, fake, nil)
	msgs := pop3Fixtures(fake)
	host, port := hostPort(b.IMAPAddr())
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	os.MkdirAll(out, 0o700)
	rc := filepath.Join(dir, "fetchmailrc")
	os.WriteFile(rc, []byte(fmt.Sprintf(`set no syslog
poll %s service %s protocol IMAP auth password
  user "%s" there with password "%s" is root here
  keep
  sslproto ''
  mda "/bin/sh -c 'cat > %s/msg-$$-$(date +%%s%%N)'"
`, host, port, userA, passwordA, out)), 0o600)
	if res, err := runErr(nil, fetchmail, "-f", rc, "-i", filepath.Join(dir, "ids"), "--nodetach", "--nosyslog", "-v"); err != nil {
		t.Fatalf("fetchmail: %v\n%s", err, res)
	}
	entries, _ := os.ReadDir(out)
	var got [][]byte
	for _, e := range entries {
		got = append(got, mustRead(t, filepath.Join(out, e.Name())))
	}
	checkDownloaded(t, "fetchmail (IMAP)", got, msgs)
}

func TestInteropMbsync(t *testing.T) {
	mbsync := need(t, "mbsync")
	fake := startFake(t)
	b, _, _ := interopBridge(t, fake, nil)
	msgs := pop3Fixtures(fake)
	host, port := hostPort(b.IMAPAddr())
	dir := t.TempDir()
	maildir := filepath.Join(dir, "mail") + "/"
	os.MkdirAll(maildir, 0o700)
	rc := filepath.Join(dir, "mbsyncrc")
	os.WriteFile(rc, []byte(fmt.Sprintf(`IMAPAccount bridge
Host %s
Port %s
User %s
Pass "%s"
SSLType None
AuthMechs LOGIN PLAIN

IMAPStore remote
Account bridge

MaildirStore local
Path %s
Inbox %sINBOX

Channel inbox
Far :remote:INBOX
Near :local:INBOX
Create Near
Sync Pull
SyncState *
`, host, port, userA, passwordA, maildir, maildir)), 0o600)
	run(t, nil, mbsync, "-c", rc, "-a")
	got := readMaildir(t, filepath.Join(maildir, "INBOX"))
	// mbsync marks each message it stores with an X-TUID field of its own.
	for i := range got {
		got[i] = xtuid.ReplaceAll(got[i], nil)
	}
	checkDownloaded(t, "mbsync", got, msgs)
}
