package bridge_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"mailbridge/upstream/m365fake"
)

// pop3Fixtures puts three messages in mailbox A: a dot line, 8-bit bytes,
// a long line. It returns them in order.
func pop3Fixtures(fake *m365fake.Server) [][]byte {
	msgs := [][]byte{
		crlf("From: a@example.org\nTo: orders@example.com\nSubject: one\nMessage-ID: <pop-1@mailbridge.test>\n\nfirst\n.\n..two dots\n"),
		crlf("From: b@example.org\nTo: orders@example.com\nSubject: zwei\nMessage-ID: <pop-2@mailbridge.test>\nContent-Type: text/plain; charset=utf-8\n\nGrüße, 東京\n"),
		crlf("From: c@example.org\nTo: orders@example.com\nSubject: three\nMessage-ID: <pop-3@mailbridge.test>\n\n" + strings.Repeat("x", 2000) /* poplib refuses lines over 2048 bytes */ + "\n"),
	}
	for _, m := range msgs {
		fake.AddMessage(mailboxA, m)
	}
	return msgs
}

// lf turns CRLF line ends into LF, as local mailbox formats store them.
func lf(b []byte) []byte { return bytes.ReplaceAll(b, []byte("\r\n"), []byte("\n")) }

// checkDownloaded fails the test unless got holds each of want once (line
// ends compared as LF), in any order.
func checkDownloaded(t *testing.T, client string, got [][]byte, want [][]byte) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s downloaded %d messages, want %d", client, len(got), len(want))
	}
	for _, w := range want {
		n := 0
		for _, g := range got {
			if bytes.HasSuffix(lf(g), lf(w)) { // a client may put its own trace field on top
				n++
			}
		}
		if n != 1 {
			t.Errorf("%s: message %q downloaded %d times intact, want once", client, head(w), n)
		}
	}
}

func readMaildir(t *testing.T, dir string) [][]byte {
	t.Helper()
	var out [][]byte
	for _, sub := range []string{"new", "cur"} {
		entries, _ := os.ReadDir(filepath.Join(dir, sub))
		for _, e := range entries {
			out = append(out, mustRead(t, filepath.Join(dir, sub, e.Name())))
		}
	}
	return out
}

func newMaildir(t *testing.T) string {
	dir := filepath.Join(t.TempDir(), "Maildir")
	for _, sub := range []string{"new", "cur", "tmp"} {
		os.MkdirAll(filepath.Join(dir, sub), 0o700)
	}
	return dir
}

func TestInteropCurlPOP3WithSTLS(t *testing.T) {
	curl := need(t, "curl")
	fake := startFake(t)
	b, _, ca := interopBridge(t, fake, nil)
	msgs := pop3Fixtures(fake)
	_, port := hostPort(b.POP3Addr())
	base := []string{"-sS", "--ssl-reqd", "--cacert", ca, "--resolve", "localhost:" + port + ":127.0.0.1", "--user", userA + ":" + passwordA}
	list := run(t, nil, curl, append(base, "pop3://localhost:"+port+"/")...)
	if got := strings.Count(list, "\r\n"); got != 3 {
		t.Fatalf("LIST through curl: %q", list)
	}
	var got [][]byte
	for i := range msgs {
		got = append(got, []byte(run(t, nil, curl, append(base, fmt.Sprintf("pop3://localhost:%s/%d", port, i+1))...)))
	}
	for i := range msgs {
		if !bytes.Equal(got[i], msgs[i]) {
			t.Errorf("RETR %d through curl:\n%q\nwant\n%q", i+1, head(got[i]), head(msgs[i]))
		}
	}
}

func TestInteropMpop(t *testing.T) {
	mpop := need(t, "mpop")
	fake := startFake(t)
	b, _, _ := interopBridge(t, fake, nil)
	msgs := pop3Fixtures(fake)
	host, port := hostPort(b.POP3Addr())
	maildir := newMaildir(t)
	uidls := filepath.Join(t.TempDir(), "uidls")
	args := func(keep string) []string {
		return []string{"--host=" + host, "--port=" + port, "--tls=off", "--auth=user", "--user=" + userA,
			"--passwordeval=echo '" + passwordA + "'", "--delivery=maildir," + maildir, "--keep=" + keep,
			"--uidls-file=" + uidls, "--only-new=on", "--received-header=off", "-q"}
	}
	// Keep mode: everything downloaded, nothing deleted; a second run
	// downloads nothing new (UIDL).
	run(t, nil, mpop, args("on")...)
	checkDownloaded(t, "mpop", readMaildir(t, maildir), msgs)
	if n := len(fake.MailboxUIDs(mailboxA)); n != 3 {
		t.Fatalf("keep mode left %d messages upstream, want 3", n)
	}
	run(t, nil, mpop, args("on")...)
	if got := readMaildir(t, maildir); len(got) != 3 {
		t.Fatalf("a second run in keep mode downloaded again: %d messages", len(got))
	}
	// Delete mode: deleted upstream at QUIT.
	os.Remove(uidls)
	maildir2 := newMaildir(t)
	a := args("off")
	a[6] = "--delivery=maildir," + maildir2
	run(t, nil, mpop, a...)
	checkDownloaded(t, "mpop", readMaildir(t, maildir2), msgs)
	if n := len(fake.MailboxUIDs(mailboxA)); n != 0 {
		t.Fatalf("delete mode left %d messages upstream", n)
	}
}

func TestInteropFetchmail(t *testing.T) {
	fetchmail := need(t, "fetchmail")
	fake := startFake(t)
	b, _, _ := interopBridge(t, fake, nil)
	msgs := pop3Fixtures(fake)
	host, port := hostPort(b.POP3Addr())
	dir := t.TempDir()
	fetch := func(keep bool) [][]byte {
		out := filepath.Join(dir, fmt.Sprintf("out-%v", keep))
		os.MkdirAll(out, 0o700)
		keepWord := "nokeep"
		if keep {
			keepWord = "keep"
		}
		rc := filepath.Join(dir, "fetchmailrc")
		os.WriteFile(rc, []byte(fmt.Sprintf(`set no syslog
poll %s service %s protocol pop3 uidl auth password
  user "%s" there with password "%s" is root here
  %s
  sslproto ''
  mda "/bin/sh -c 'cat > %s/msg-$$-$(date +%%s%%N)'"
`, host, port, userA, passwordA, keepWord, out)), 0o600)
		res, err := runErr(nil, fetchmail, "-f", rc, "-i", filepath.Join(dir, "fetchids"), "--nodetach", "--nosyslog", "-v")
		if err != nil && !strings.Contains(err.Error(), "exit status 1") { // 1: no new mail
			t.Fatalf("fetchmail: %v\n%s", err, res)
		}
		entries, _ := os.ReadDir(out)
		var got [][]byte
		for _, e := range entries {
			got = append(got, mustRead(t, filepath.Join(out, e.Name())))
		}
		return got
	}
	checkDownloaded(t, "fetchmail (keep)", fetch(true), msgs)
	if n := len(fake.MailboxUIDs(mailboxA)); n != 3 {
		t.Fatalf("keep mode left %d messages upstream, want 3", n)
	}
	os.Remove(filepath.Join(dir, "fetchids"))
	checkDownloaded(t, "fetchmail (delete)", fetch(false), msgs)
	if n := len(fake.MailboxUIDs(mailboxA)); n != 0 {
		t.Fatalf("delete mode left %d messages upstream", n)
	}
}

const pythonPOP3 = `
import poplib, sys
host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
p = poplib.POP3(host, port, timeout=60)
p.user(user)
p.pass_(password)
count, size = p.stat()
uidls = p.uidl()[1]
if len(uidls) != count:
    sys.exit("UIDL lists %d of %d" % (len(uidls), count))
for i in range(1, count + 1):
    resp, lines, octets = p.retr(i)
    sys.stdout.buffer.write(b"\r\n".join(lines) + b"\r\n\x00")
p.quit()
`

func TestInteropPythonPoplib(t *testing.T) {
	python := need(t, "python3")
	fake := startFake(t)
	b, _, _ := interopBridge(t, fake, nil)
	msgs := pop3Fixtures(fake)
	script := filepath.Join(t.TempDir(), "fetch.py")
	os.WriteFile(script, []byte(pythonPOP3), 0o600)
	host, port := hostPort(b.POP3Addr())
	out := run(t, nil, python, script, host, port, userA, passwordA)
	got := strings.Split(strings.TrimSuffix(out, "\x00"), "\x00")
	if !slices.Equal(got, []string{string(msgs[0]), string(msgs[1]), string(msgs[2])}) {
		t.Errorf("poplib got %q", got)
	}
}
