package bridge_test

// The interop suite: the real bridge driven by programs nobody here wrote
// (Postfix, swaks, curl, mpop, fetchmail, Python's smtplib and poplib,
// mono's System.Net.Mail, openssl), against the fake Microsoft 365. Each
// test skips, naming the missing tool, where it is not installed; with
// MAILBRIDGE_INTEROP=required (as .ci/run sets it) a missing tool fails the
// test instead.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	bmime "mailbridge/bridge/mime"
	"mailbridge/upstream/m365fake"
)

// need returns the path of tool, or skips the test (fails it under
// MAILBRIDGE_INTEROP=required) when it is not installed.
func need(t *testing.T, tool string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/" + tool); serr == nil {
			return "/usr/sbin/" + tool
		}
		missing(t, tool+" is not installed")
	}
	return p
}

// missing skips the test for want of what (fails it under
// MAILBRIDGE_INTEROP=required).
func missing(t *testing.T, what string) {
	t.Helper()
	if os.Getenv("MAILBRIDGE_INTEROP") == "required" {
		t.Fatalf("interop: %s (.ci/run installs the clients and runs as root)", what)
	}
	t.Skipf("interop: %s", what)
}

// run runs a command with a time limit and returns its combined output; a
// failure fails the test with that output.
func run(t *testing.T, stdin []byte, name string, args ...string) string {
	t.Helper()
	out, err := runErr(stdin, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(stdin []byte, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// interopBridge starts a bridge with local TLS (STARTTLS on the plain
// listeners, and implicit TLS listeners), large messages allowed, and
// returns it with the CA file a client must trust.
func interopBridge(t *testing.T, fake *m365fake.Server, edit func(*config.Config)) (*bridge.Bridge, *logBuffer, string) {
	t.Helper()
	grantReadWrite(fake)
	cfg := testConfig(fake)
	cfg.SMTP.SpoolDir = t.TempDir()
	localTLS(t, cfg)
	if edit != nil {
		edit(cfg)
	}
	ca := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(ca, mustRead(t, cfg.SMTP.TLSCert), 0o600)
	b, logs := startBridge(t, fake, cfg)
	return b, logs, ca
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func hostPort(addr string) (string, string) {
	i := strings.LastIndexByte(addr, ':')
	return addr[:i], addr[i+1:]
}

// sentOnce returns what the fake received with Message-ID id, and fails
// the test unless it arrived exactly once.
func sentOnce(t *testing.T, fake *m365fake.Server, id string) m365fake.SentMessage {
	t.Helper()
	var found []m365fake.SentMessage
	for _, m := range fake.Sent() {
		if bytes.Contains(m.MIME, []byte("Message-ID: <"+id+">")) {
			found = append(found, m)
		}
	}
	if len(found) != 1 {
		t.Fatalf("message %s reached Graph %d times, want once", id, len(found))
	}
	return found[0]
}

var bccField = regexp.MustCompile(`(?m)^Bcc:.*\r\n(?:[ \t].*\r\n)*`)

// withoutAdded removes from what Graph received the Bcc field the bridge
// added and, for a relay such as Postfix, the trace fields it put on top
// (Received:), so that the rest can be compared with what the client
// wrote, byte for byte.
func withoutAdded(mime []byte, trace bool) []byte {
	h, _ := bmime.SplitHeader(mime)
	head, body := mime[:h], mime[h:]
	head = bccField.ReplaceAll(head, nil)
	if trace {
		head = regexp.MustCompile(`(?m)\AReceived:.*\r\n(?:[ \t].*\r\n)*`).ReplaceAll(head, nil)
	}
	return append(append([]byte(nil), head...), body...)
}

// checkByteExact fails the test unless what Graph received, less what the
// bridge (and a relay) adds, is the message the client wrote.
func checkByteExact(t *testing.T, got m365fake.SentMessage, want []byte, trace bool) {
	t.Helper()
	g := withoutAdded(got.MIME, trace)
	if sha256.Sum256(g) != sha256.Sum256(want) {
		t.Errorf("what reached Graph differs from what the client sent (first difference at byte %d)\ngot  %q\nwant %q",
			firstDiff(g, want), head(g), head(want))
	}
}

func head(b []byte) []byte { return b[:min(len(b), 600)] }

// interopMessage is a message with a Message-ID of its own.
func interopMessage(id, extraHeaders, body string) []byte {
	return crlf(fmt.Sprintf("From: Orders <orders@example.com>\nTo: Supplier <supplier@example.org>\nSubject: interop %s\nDate: Tue, 01 Dec 2026 10:00:00 +0000\nMessage-ID: <%s>\nMIME-Version: 1.0\n%s\n%s", id, id, extraHeaders, body))
}

func equalLeaves(a, b []leaf) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
