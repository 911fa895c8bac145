package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/mail"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	pop3 "github.com/knadh/go-pop3"
	"golang.org/x/crypto/bcrypt"

	"mailbridge/bridge/config"
	"mailbridge/upstream/m365fake"
	"mailbridge/upstream/m365fake/m365test"
)

var binary string // the mailbridge binary built for these tests

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "mailbridge-test")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "mailbridge")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building mailbridge: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// patience is how long a test waits for one thing that should come soon:
// generous, so that a busy machine is slow, not a failure.
const patience = 60 * time.Second

const (
	tenant  = "aaaaaaaa-0000-0000-0000-00000000000a"
	client  = "c11e0000-0000-0000-0000-00000000000a"
	secret  = "s3cr3t~Value.for-tests"
	mailbox = "orders@example.com"
)

// fakeAndConfig starts a fake Microsoft 365 and writes a configuration for
// it; it returns the fake, the config path and an environment that trusts
// the fake's CA through SSL_CERT_FILE.
func fakeAndConfig(t testing.TB, listen string, extra string) (*m365fake.Server, string, []string) {
	t.Helper()
	fake := m365test.Start(t, m365test.Tenant{ID: tenant, ClientID: client, Secret: secret,
		Roles: []string{"Mail.Send", "Mail.ReadWrite", "POP.AccessAsApp"}, Mailboxes: []string{mailbox}, FullAccess: []string{mailbox}})
	pop3Addr := fake.POP3Addr()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	os.WriteFile(ca, fake.CACertPEM(), 0o600)
	os.WriteFile(filepath.Join(dir, "secret.txt"), []byte(secret+"\n"), 0o600)
	hash, _ := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	cfg := fmt.Sprintf(`[smtp]
listen = %q
[imap]
listen = "127.0.0.1:0"
upstream = %q
[pop3]
listen = "127.0.0.1:0"
upstream = %q
[[account]]
name = "tm-master"
username = "tm"
password_hash = %q
mailbox = %q
tenant_id = %q
client_id = %q
client_secret_file = "secret.txt"
token_url = %q
graph_url = %q
%s
`, listen, fake.IMAPAddr(), pop3Addr, hash, mailbox, tenant, client, fake.TokenURL(), fake.GraphURL(), extra)
	path := filepath.Join(dir, "mailbridge.toml")
	os.WriteFile(path, []byte(cfg), 0o600)
	return fake, path, append(os.Environ(), "SSL_CERT_FILE="+ca)
}

func runBinary(t *testing.T, env []string, stdin string, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = env
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return code, stdout.String(), stderr.String()
}

func TestServeSendsAndStopsOnSIGTERM(t *testing.T) {
	t.Run("serve", func(t *testing.T) { testServeSendsAndStopsOnSIGTERM(t) })
	// As `service install` registers it with systemd.
	t.Run("serve -service", func(t *testing.T) { testServeSendsAndStopsOnSIGTERM(t, "-service") })
}

func testServeSendsAndStopsOnSIGTERM(t *testing.T, flags ...string) {
	fake, path, env := fakeAndConfig(t, "127.0.0.1:0", "")
	cmd := exec.Command(binary, append([]string{"serve", "-config", path}, flags...)...)
	cmd.Env = env
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	lines := bufio.NewScanner(stderr)
	addr := ""
	var logs strings.Builder
	for addr == "" && lines.Scan() {
		logs.WriteString(lines.Text() + "\n")
		if l := lines.Text(); strings.Contains(l, `"message":"listening"`) && strings.Contains(l, `"proto":"smtp"`) {
			i := strings.Index(l, `"listen":"`) + len(`"listen":"`)
			addr = l[i : i+strings.IndexByte(l[i:], '"')]
		}
	}
	if addr == "" {
		t.Fatalf("no listening line:\n%s", logs.String())
	}
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewLoginClient("tm", "pw")); err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail(mailbox, []string{"a@example.org"}, strings.NewReader("From: orders@example.com\r\nTo: a@example.org\r\nSubject: via the binary\r\n\r\nhi\r\n")); err != nil {
		t.Fatalf("send: %v", err)
	}
	c.Quit()
	waitSent(t, fake, 1)
	if sent := fake.Sent(); sent[0].Subject != "via the binary" {
		t.Fatalf("Graph received %q", sent[0].Subject)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() {
		for lines.Scan() {
			logs.WriteString(lines.Text() + "\n")
		}
		done <- cmd.Wait()
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, logs.String())
		}
	case <-time.After(patience):
		t.Fatal("the bridge did not stop after SIGTERM")
	}
	out := logs.String()
	for _, want := range []string{`"message":"message queued"`, `"message":"message sent"`, `"message":"stopped"`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s:\n%s", want, out)
		}
	}
	if strings.Contains(out, secret) {
		t.Error("the log contains the client secret")
	}
}

// waitSent waits until the fake Graph has sent n messages.
func waitSent(t *testing.T, fake *m365fake.Server, n int) {
	t.Helper()
	// Progress, not a total deadline: fail when no message came for a
	// long while.
	last, since := -1, time.Now()
	for got := len(fake.Sent()); got < n; got = len(fake.Sent()) {
		if got != last {
			last, since = got, time.Now()
		} else if time.Since(since) > patience {
			t.Fatalf("Graph sent %d messages, want %d", got, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := len(fake.Sent()); got != n {
		t.Fatalf("Graph sent %d messages, want %d", got, n)
	}
}

func TestBadConfigExits2WithOneLinePerProblem(t *testing.T) {
	code, _, stderr := runBinary(t, os.Environ(), "", "serve", "-config", "../../testdata/config-bad.toml")
	if code != 2 {
		t.Errorf("exit status %d, want 2", code)
	}
	if want := "mailbridge: config: ../../testdata/config-bad.toml: line 6: smtp.send_timeout: not a duration"; !strings.Contains(stderr, want) {
		t.Errorf("stderr %q, want %q", stderr, want)
	}
	// So under systemd too (serve -service): it exits, not waits for a
	// signal with nothing running.
	code, _, stderr = runBinary(t, os.Environ(), "", "serve", "-service", "-config", "../../testdata/config-bad.toml")
	if code != 2 || !strings.Contains(stderr, "smtp.send_timeout: not a duration") {
		t.Errorf("serve -service: status %d, stderr %q", code, stderr)
	}
	code, _, stderr = runBinary(t, os.Environ(), "", "serve", "-config", filepath.Join(t.TempDir(), "missing.toml"))
	if code != 2 || !strings.Contains(stderr, "missing.toml") {
		t.Errorf("missing file: status %d, stderr %q", code, stderr)
	}
	if code, _, _ := runBinary(t, os.Environ(), ""); code != 2 {
		t.Errorf("no command: status %d, want 2", code)
	}
	if code, _, _ := runBinary(t, os.Environ(), "", "frobnicate"); code != 2 {
		t.Errorf("unknown command: status %d, want 2", code)
	}
}

func TestCheck(t *testing.T) {
	fake, path, env := fakeAndConfig(t, "127.0.0.1:0", "")
	fake.AddMessage(mailbox, []byte("Subject: waiting\r\n\r\nx\r\n"))
	code, stdout, stderr := runBinary(t, env, "", "check", "-config", path, "-send-test", "it@example.org")
	if code != 0 {
		t.Fatalf("status %d\n%s%s", code, stdout, stderr)
	}
	for _, want := range []string{
		"ok    tm-master            smtp-token token issued",
		"ok    tm-master            large-msgs created and deleted a draft",
		"ok    tm-master            send-test  Graph accepted the test message to it@example.org (HTTP 202, request-id ",
		"ok    tm-master            pop3       logged in to orders@example.com at 127.0.0.1:",
		": 1 messages, 23 bytes",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("output lacks %q:\n%s", want, stdout)
		}
	}
	if sent := fake.Sent(); len(sent) != 1 || sent[0].Recipients[0] != "it@example.org" {
		t.Errorf("test message not received: %v", sent)
	}

	// A wrong secret: exit 1, the AADSTS code and the fix.
	fake.AddApp(tenant, client, "rotated", "Mail.Send")
	code, stdout, _ = runBinary(t, env, "", "check", "-config", path)
	if code != 1 || !strings.Contains(stdout, "FAIL  tm-master") || !strings.Contains(stdout, "AADSTS7000215") ||
		!strings.Contains(stdout, "fix: the client secret is wrong") {
		t.Errorf("status %d, output:\n%s", code, stdout)
	}

	// Consent missing: the tokens lack their roles. Sending may still rest
	// on an RBAC assignment, which only a send-test can tell; here it
	// fails, and says what to grant.
	fake.AddApp(tenant, client, secret)
	code, stdout, _ = runBinary(t, env, "", "check", "-config", path, "-send-test", "it@example.org")
	for _, want := range []string{"the token lists no Mail.Send: sending relies on an RBAC for Applications assignment; the send-test below proves it",
		"FAIL  tm-master            send-test  graph sendMail: graph answered HTTP 403 ErrorAccessDenied", "add the mailbox to its management scope",
		"without the POP.AccessAsApp role", "add POP.AccessAsApp as an Application permission (Office 365 Exchange Online)"} {
		if code != 1 || !strings.Contains(stdout, want) {
			t.Errorf("status %d, output lacks %q:\n%s", code, want, stdout)
		}
	}

	if fake.Drafts() != 0 {
		t.Error("check left a draft")
	}

	// POP3 consented but no mailbox permission: the login is refused;
	// without Mail.ReadWrite no draft can be made.
	fake.AddApp(tenant, client, secret, "Mail.Send", "POP.AccessAsApp")
	fake.AddMailbox(tenant, "other@example.com")
	path2 := filepath.Join(filepath.Dir(path), "other.toml")
	data, _ := os.ReadFile(path)
	os.WriteFile(path2, []byte(strings.Replace(string(data), "[[account]]", "[[account]]\npop3_mailbox = \"other@example.com\"", 1)), 0o600)
	code, stdout, _ = runBinary(t, env, "", "check", "-config", path2)
	if code != 1 || !strings.Contains(stdout, "FAIL  tm-master            pop3       outlook refused the XOAUTH2 login") || !strings.Contains(stdout, "Add-MailboxPermission") ||
		!strings.Contains(stdout, "FAIL  tm-master            large-msgs") || !strings.Contains(stdout, "grant Mail.ReadWrite") {
		t.Errorf("status %d, output:\n%s", code, stdout)
	}
}

func TestHashPassword(t *testing.T) {
	code, stdout, _ := runBinary(t, os.Environ(), "s3cret pass\n", "hash-password")
	if code != 0 {
		t.Fatalf("status %d", code)
	}
	line := strings.TrimSpace(stdout)
	hash, ok := strings.CutPrefix(line, `password_hash = "`)
	hash, ok2 := strings.CutSuffix(hash, `"`)
	if !ok || !ok2 {
		t.Fatalf("printed %q, want a password_hash line to paste", line)
	}
	if err := bcrypt.CompareHashAndPassword([]byte(hash), []byte("s3cret pass")); err != nil {
		t.Errorf("printed hash %q does not verify: %v", hash, err)
	}
	if _, bare, _ := runBinary(t, os.Environ(), "s3cret pass\n", "hash-password", "-bare"); bcrypt.CompareHashAndPassword([]byte(strings.TrimSpace(bare)), []byte("s3cret pass")) != nil {
		t.Errorf("-bare printed %q", bare)
	}
	if code, _, _ := runBinary(t, os.Environ(), "\n", "hash-password"); code != 2 {
		t.Errorf("empty password: status %d, want 2", code)
	}
}

func TestVersion(t *testing.T) {
	code, stdout, _ := runBinary(t, os.Environ(), "", "version")
	if code != 0 || !strings.HasPrefix(stdout, "mailbridge ") {
		t.Errorf("status %d, output %q", code, stdout)
	}
}

func TestDemoServesTheWholeLoop(t *testing.T) {
	cmd := exec.Command(binary, "demo", "-smtp", "127.0.0.1:0", "-pop3", "127.0.0.1:0", "-imap", "127.0.0.1:0", "-admin", "127.0.0.1:0", "-log-format", "json", "-outbox", t.TempDir())
	stdout, _ := cmd.StdoutPipe()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sc := bufio.NewScanner(stdout)
	addr, popAddr := "", ""
	for popAddr == "" && sc.Scan() {
		if l, ok := strings.CutPrefix(sc.Text(), "SMTP server "); ok {
			addr = strings.TrimSuffix(strings.Fields(l)[0], ",")
		}
		if l, ok := strings.CutPrefix(sc.Text(), "POP3 server "); ok {
			popAddr = strings.TrimSuffix(strings.Fields(l)[0], ",")
		}
	}
	if addr == "" || popAddr == "" {
		t.Fatal("the demo did not print its SMTP and POP3 addresses")
	}
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewPlainClient("", "demo", "demo")); err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail("demo@example.com", []string{"demo@example.com"}, strings.NewReader("From: demo@example.com\r\nTo: demo@example.com\r\nSubject: demo\r\n\r\nhi\r\n")); err != nil {
		t.Fatal(err)
	}
	// A 10 MB attachment goes too (the demo's app has Mail.ReadWrite), and
	// a refused recipient comes back as a non-delivery report.
	big := "From: demo@example.com\r\nTo: demo@example.com\r\nSubject: big\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nsee the file\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=big.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n" +
		strings.Repeat(strings.Repeat("QUFB", 19)+"\r\n", 180000) + "--b--\r\n"
	if err := c.SendMail("demo@example.com", []string{"demo@example.com"}, strings.NewReader(big)); err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail("demo@example.com", []string{"nobody@refused.example"}, strings.NewReader("From: demo@example.com\r\nTo: nobody@refused.example\r\nSubject: bounce me\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	c.Quit()
	host, port, _ := net.SplitHostPort(popAddr)
	pn, _ := strconv.Atoi(port)
	var pc *pop3.Conn
	deadline := time.Now().Add(patience)
	for { // the outbox delivers in the background: wait for the message
		var err error
		if pc, err = pop3.New(pop3.Opt{Host: host, Port: pn}).NewConn(); err != nil {
			t.Fatal(err)
		}
		if err := pc.Auth("demo", "demo"); err != nil {
			t.Fatalf("POP3 login: %v", err)
		}
		if n, _, err := pc.Stat(); err == nil && n >= 4 {
			break
		}
		pc.Quit()
		if time.Now().After(deadline) {
			t.Fatal("the message sent through the demo's SMTP never reached its mailbox")
		}
		time.Sleep(20 * time.Millisecond)
	}
	var all strings.Builder
	for i := 2; i <= 4; i++ {
		raw, err := pc.RetrRaw(i)
		if err != nil {
			t.Fatalf("RETR %d through the demo's POP3: %v", i, err)
		}
		all.WriteString(raw.String()[:min(raw.Len(), 4000)])
	}
	for _, want := range []string{"Subject: demo", "Subject: big", "Undeliverable: bounce me", "Final-Recipient: rfc822; nobody@refused.example"} {
		if !strings.Contains(all.String(), want) {
			t.Errorf("the demo mailbox lacks %q", want)
		}
	}
	pc.Quit()
	cmd.Process.Signal(syscall.SIGINT)
	cmd.Wait()
	if !strings.Contains(stderr.String(), `"message":"fake Graph received a message"`) || !strings.Contains(stderr.String(), `"subject":"demo"`) {
		t.Errorf("the demo did not log the message the fake received:\n%s", stderr.String())
	}
}

// TestKill9AfterAcceptance kills the bridge with SIGKILL right after it
// answered 250 for messages Graph had not taken yet, starts it again, and
// checks that every message arrives exactly once.
func TestKill9AfterAcceptance(t *testing.T) {
	fake, path, env := fakeAndConfig(t, "127.0.0.1:0", "")
	// A message in flight at the kill is looked up before it goes again:
	// not for the two minutes of the default window here.
	setSMTP(t, path, `lookup_window = "3s"`)
	fake.FailGraph(100000, m365fake.Unavailable()) // Graph is down while the bridge accepts
	start := func() (*exec.Cmd, string, *bytes.Buffer) {
		cmd := exec.Command(binary, "serve", "-config", path)
		cmd.Env = env
		stderr, _ := cmd.StderrPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		logs := &bytes.Buffer{}
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			l := sc.Text()
			logs.WriteString(l + "\n")
			if strings.Contains(l, `"message":"listening"`) && strings.Contains(l, `"proto":"smtp"`) {
				i := strings.Index(l, `"listen":"`) + len(`"listen":"`)
				go io.Copy(io.Discard, stderr)
				return cmd, l[i : i+strings.IndexByte(l[i:], '"')], logs
			}
		}
		t.Fatalf("no listening line:\n%s", logs)
		return nil, "", nil
	}
	cmd, addr, _ := start()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewPlainClient("", "tm", "pw")); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		msg := fmt.Sprintf("From: orders@example.com\r\nTo: a@example.org\r\nMessage-ID: <k%d@test>\r\nSubject: kill %d\r\n\r\nx\r\n", i, i)
		if err := c.SendMail(mailbox, []string{"a@example.org"}, strings.NewReader(msg)); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if n := len(fake.Sent()); n != 0 {
		t.Fatalf("%d messages got through while Graph was down", n)
	}
	code, stdout, _ := runBinary(t, env, "", "queue", "list", "-config", path)
	if code != 0 || !strings.Contains(stdout, "5 message(s)") || !strings.Contains(stdout, "queued") {
		t.Errorf("queue list after the kill: %d\n%s", code, stdout)
	}
	fake.ClearFaults()
	start()
	waitSent(t, fake, 5)
	time.Sleep(300 * time.Millisecond) // a duplicate would show up now
	seen := map[string]int{}
	for _, m := range fake.Sent() {
		seen[m.Subject]++
	}
	for i := range 5 {
		if seen[fmt.Sprintf("kill %d", i)] != 1 {
			t.Errorf("message %d arrived %d times", i, seen[fmt.Sprintf("kill %d", i)])
		}
	}
}

func TestQueueCommand(t *testing.T) {
	_, path, env := fakeAndConfig(t, "127.0.0.1:0", "")
	if code, _, stderr := runBinary(t, env, "", "queue", "retry", "-config", path); code != 2 || !strings.Contains(stderr, "needs a message ID") {
		t.Errorf("retry without ID: %d %q", code, stderr)
	}
	if code, _, stderr := runBinary(t, env, "", "queue", "delete", "nope", "-config", path); code != 1 || !strings.Contains(stderr, "no message nope") {
		t.Errorf("delete unknown: %d %q", code, stderr)
	}
	if code, stdout, _ := runBinary(t, env, "", "queue", "list", "-config", path); code != 0 || !strings.Contains(stdout, "0 message(s)") {
		t.Errorf("list: %d %q", code, stdout)
	}
	if code, stdout, _ := runBinary(t, env, "", "queue", "retry-failed", "-config", path); code != 0 || !strings.Contains(stdout, "0 failed message(s)") {
		t.Errorf("retry-failed: %d %q", code, stdout)
	}
	// The bridge never ran: the outbox is its to create, with its owner.
	if _, err := os.Stat(filepath.Join(filepath.Dir(path), "outbox")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("mailbridge queue created the outbox (%v)", err)
	}
}

func TestCheckWarnsOfExpiringSecret(t *testing.T) {
	soon := time.Now().Add(10 * 24 * time.Hour).Format(time.DateOnly)
	_, path, env := fakeAndConfig(t, "127.0.0.1:0", "client_secret_expires = "+soon)
	code, stdout, _ := runBinary(t, env, "", "check", "-config", path)
	if code != 0 || !strings.Contains(stdout, "WARN  tm-master            secret     expires "+soon) || !strings.Contains(stdout, "fix: the client secret expires in ") {
		t.Errorf("status %d, output:\n%s", code, stdout)
	}
}

func TestGenCert(t *testing.T) {
	dir := t.TempDir()
	code, stdout, stderr := runBinary(t, os.Environ(), "", "gen-cert", "-host", "bridge-pc", "-out", dir)
	if code != 0 {
		t.Fatalf("status %d: %s", code, stderr)
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, "mailbridge.crt"), filepath.Join(dir, "mailbridge.key"))
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(pair.Certificate[0])
	if err := cert.VerifyHostname("bridge-pc"); err != nil {
		t.Error(err)
	}
	if err := cert.VerifyHostname("127.0.0.1"); err != nil {
		t.Error(err)
	}
	if !strings.Contains(stdout, "certutil -addstore -f Root") {
		t.Errorf("no Windows instructions:\n%s", stdout)
	}
	if code, _, stderr := runBinary(t, os.Environ(), "", "gen-cert", "-host", "bridge-pc", "-out", dir); code != 1 || !strings.Contains(stderr, "exists") {
		t.Errorf("overwrite: status %d %q", code, stderr)
	}
	if code, _, _ := runBinary(t, os.Environ(), "", "gen-cert"); code != 2 {
		t.Errorf("without -host: status %d", code)
	}
}

func TestSIGHUPReloads(t *testing.T) {
	_, path, env := fakeAndConfig(t, "127.0.0.1:0", "")
	cmd := exec.Command(binary, "serve", "-config", path)
	cmd.Env = env
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	waitLine := func(substr string) string {
		t.Helper()
		timeout := time.After(patience)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("the bridge exited before logging %q", substr)
				}
				if strings.Contains(l, substr) {
					return l
				}
			case <-timeout:
				t.Fatalf("no log line with %q", substr)
			}
		}
	}
	l := waitLine(`"proto":"smtp","listen":"`)
	i := strings.Index(l, `"listen":"`) + len(`"listen":"`)
	addr := l[i : i+strings.IndexByte(l[i:], '"')]

	data, _ := os.ReadFile(path)
	newHash, _ := bcrypt.GenerateFromPassword([]byte("rotated"), bcrypt.MinCost)
	cfg := string(data)
	start := strings.Index(cfg, "password_hash = ")
	end := start + strings.IndexByte(cfg[start:], '\n')
	os.WriteFile(path, []byte(cfg[:start]+fmt.Sprintf("password_hash = %q", newHash)+cfg[end:]), 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	waitLine("configuration reloaded")
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Auth(sasl.NewPlainClient("", "tm", "rotated")); err != nil {
		t.Fatalf("the new password after SIGHUP: %v", err)
	}
}

// syncBuffer is a bytes.Buffer safe for a writer and a reader at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startServe starts `mailbridge serve` and returns it, its SMTP address and
// everything it logs.
func startServe(t testing.TB, path string, env []string) (*exec.Cmd, string, *syncBuffer) {
	t.Helper()
	cmd := exec.Command(binary, "serve", "-config", path)
	cmd.Env = env
	logs := &syncBuffer{}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	re := regexp.MustCompile(`"proto":"smtp","listen":"([^"]+)","accounts"`)
	deadline := time.Now().Add(patience)
	for time.Now().Before(deadline) {
		if m := re.FindStringSubmatch(logs.String()); m != nil {
			return cmd, m[1], logs
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no listening line:\n%s", logs)
	return nil, "", nil
}

// A second `mailbridge serve` on the same outbox (an administrator trying
// it in a console beside the service) must not start: it would clear what
// the first is writing, and with listeners on other ports (here both take
// port 0) deliver the same queued messages a second time. It exits with the
// reason and the fix, and the first goes on.
func TestSecondServeOnTheSameOutboxRefused(t *testing.T) {
	fake, path, env := fakeAndConfig(t, "127.0.0.1:0", "")
	first, addr, _ := startServe(t, path, env)
	ctx, cancel := context.WithTimeout(context.Background(), 3*patience)
	defer cancel()
	second := exec.CommandContext(ctx, binary, "serve", "-config", path)
	second.Env = env
	out, err := second.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("the second bridge is running on the first's outbox:\n%s", out)
	}
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Errorf("the second bridge ended with %v, want exit status 1", err)
	}
	want := fmt.Sprintf("is in use by another mailbridge (process %d): stop it first", first.Process.Pid)
	if !strings.Contains(string(out), want) || !strings.Contains(string(out), `"message":"cannot start"`) {
		t.Errorf("the second bridge's log lacks %q:\n%s", want, out)
	}
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Auth(sasl.NewPlainClient("", "tm", "pw")); err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail(mailbox, []string{"a@example.org"}, strings.NewReader("From: orders@example.com\r\nTo: a@example.org\r\nSubject: after\r\n\r\nx\r\n")); err != nil {
		t.Fatalf("the first bridge no longer takes mail: %v", err)
	}
	waitSent(t, fake, 1)
}

// TestKill9WithMessagesInFlight kills the bridge while Graph has taken
// three messages but not yet answered, and holds a large message's upload:
// after the restart the three are found in Sent Items and not sent again,
// the large one (not in Sent Items within the look-up window) is sent
// again, and its interrupted draft is deleted, not left at Graph. Each of
// the four reaches Graph exactly once.
func TestKill9WithMessagesInFlight(t *testing.T) {
	fake, path, env := fakeAndConfig(t, "127.0.0.1:0", "")
	setSMTP(t, path, `lookup_window = "3s"`)
	fake.FailGraph(3, m365fake.Fault{Delay: 10 * time.Minute, AfterAccept: true})
	fake.FailEndpoint(m365fake.EndpointUpload, 1, m365fake.Fault{Delay: 30 * time.Second})
	cmd, addr, _ := startServe(t, path, env)
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewPlainClient("", "tm", "pw")); err != nil {
		t.Fatal(err)
	}
	large := "From: orders@example.com\r\nTo: a@example.org\r\nMessage-ID: <large@test>\r\nSubject: large in flight\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\ntext\r\n--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=a.bin\r\nContent-Transfer-Encoding: base64\r\n\r\n" +
		strings.Repeat(strings.Repeat("QUFB", 19)+"\r\n", 70000) + "--b--\r\n"
	if err := c.SendMail(mailbox, []string{"a@example.org"}, strings.NewReader(large)); err != nil {
		t.Fatal(err)
	}
	// The large one takes one of the mailbox's four slots: three small ones
	// take the others.
	for start := time.Now(); fake.Drafts() < 1; time.Sleep(10 * time.Millisecond) {
		if time.Since(start) > patience {
			t.Fatal("the large message never created its draft")
		}
	}
	for i := range 3 {
		msg := fmt.Sprintf("From: orders@example.com\r\nTo: a@example.org\r\nMessage-ID: <f%d@test>\r\nSubject: in flight %d\r\n\r\nx\r\n", i, i)
		if err := c.SendMail(mailbox, []string{"a@example.org"}, strings.NewReader(msg)); err != nil {
			t.Fatal(err)
		}
	}
	// Kill it once all four are marked in flight on disk (the mark is what
	// flags a redelivery), the large one's draft is recorded, and Graph
	// has taken at least one small one (the mark is written before the
	// request, so on a busy machine the kill could otherwise come before
	// Graph saw any): what else the fake has seen by then depends on how
	// busy the machine is.
	queue := filepath.Join(filepath.Dir(path), "outbox", "queue")
	marked := func() (inFlight, drafts int) {
		entries, _ := filepath.Glob(filepath.Join(queue, "*.json"))
		for _, e := range entries {
			data, _ := os.ReadFile(e)
			if strings.Contains(string(data), `"in_flight":true`) {
				inFlight++
			}
			if strings.Contains(string(data), `"draft_id":"`) {
				drafts++
			}
		}
		return
	}
	deadline := time.Now().Add(patience)
	for n, d := marked(); n < 4 || d < 1 || len(fake.Sent()) < 1; n, d = marked() {
		if time.Now().After(deadline) {
			t.Fatalf("the messages never got in flight: %d marked, %d drafts recorded, %d taken by Graph", n, d, len(fake.Sent()))
		}
		time.Sleep(10 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	// What was in flight at the kill, as the disk says now that nothing
	// writes it: on a busy machine an attempt may have ended (a 429 from
	// the fake's concurrency limit, say) and wait for its retry unmarked.
	inFlight := map[string]bool{}
	entries, _ := filepath.Glob(filepath.Join(queue, "*.json"))
	for _, e := range entries {
		data, _ := os.ReadFile(e)
		inFlight[strings.TrimSuffix(filepath.Base(e), ".json")] = strings.Contains(string(data), `"in_flight":true`)
	}
	fake.ClearFaults()
	_, _, logs := startServe(t, path, env)
	waitSent(t, fake, 4)
	waitFor := time.Now().Add(patience)
	for strings.Count(logs.String(), `"message":"message sent"`) < 4 && time.Now().Before(waitFor) {
		time.Sleep(20 * time.Millisecond)
	}
	var lines []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, `"message":"message sent"`) {
			lines = append(lines, l)
		}
	}
	if len(lines) != 4 {
		t.Fatalf("%d deliveries after the restart, want 4:\n%s", len(lines), logs)
	}
	found := 0
	for _, l := range lines {
		var f struct {
			QueueID           string `json:"queue_id"`
			MessageID         string `json:"message_id"`
			PossibleDuplicate bool   `json:"possible_duplicate"`
			Found             bool   `json:"found_in_sent_items"`
		}
		json.Unmarshal([]byte(l), &f)
		switch {
		case f.PossibleDuplicate:
			t.Errorf("a message is flagged as a possible duplicate, with the look-up allowed: %s", l)
		case f.Found && !inFlight[f.QueueID]:
			t.Errorf("a message that was not in flight was looked up: %s", l)
		case f.Found:
			found++
		}
	}
	if found == 0 {
		t.Error("no message taken by Graph before the kill was found in Sent Items")
	}
	// Exactly once: the fake took each Message-ID once, whatever the kill
	// interrupted; nothing more comes once every line is written.
	copies := map[string]int{}
	for _, m := range fake.Sent() {
		mm, _ := mail.ReadMessage(bytes.NewReader(m.MIME))
		copies[mm.Header.Get("Message-Id")]++
	}
	for _, id := range []string{"<large@test>", "<f0@test>", "<f1@test>", "<f2@test>"} {
		if copies[id] != 1 {
			t.Errorf("%s reached Graph %d times, want once (%v)", id, copies[id], copies)
		}
	}
	if n := fake.Drafts(); n != 0 {
		t.Errorf("%d drafts left at Graph", n)
	}
	if !strings.Contains(logs.String(), "deleted the draft of an interrupted attempt") {
		t.Error("the interrupted draft's deletion is not logged")
	}
}

// Flags go before or after the action and its arguments; retry and delete
// say what they did; gen-cert creates its directory.
func TestCLIHabits(t *testing.T) {
	fake, path, env := fakeAndConfig(t, "127.0.0.1:0", "")
	fake.FailGraph(100000, m365fake.Unavailable())
	cmd, addr, _ := startServe(t, path, env)
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewPlainClient("", "tm", "pw")); err != nil {
		t.Fatal(err)
	}
	msg := "From: orders@example.com\r\nTo: a@example.org, b@example.org\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from the queue\r\n\r\nx\r\n"
	if err := c.SendMail(mailbox, []string{"a@example.org", "b@example.org"}, strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	code, list, _ := runBinary(t, env, "", "queue", "-config", path, "list")
	if code != 0 {
		t.Fatalf("queue -config F list: %d", code)
	}
	for _, want := range []string{"ID", "AGE", "ATTEMPTS", "NEXT ATTEMPT", "FROM", "RECIPIENTS", "SUBJECT", "BYTES", "WHY", "orders@example.com", "a@example.org,b@example.org", "Grüße from the queue", "1 message(s)"} {
		if !strings.Contains(list, want) {
			t.Errorf("queue list lacks %q:\n%s", want, list)
		}
	}
	id := strings.Fields(strings.Split(list, "\n")[1])[0]
	if code, out, stderr := runBinary(t, env, "", "queue", "retry", id, "-config", path); code != 0 || !strings.Contains(out, id+": due now") {
		t.Errorf("queue retry ID -config F: %d %q %q", code, out, stderr)
	}
	if code, out, _ := runBinary(t, env, "", "queue", "-config", path, "delete", id); code != 0 || !strings.Contains(out, id+": deleted") {
		t.Errorf("queue -config F delete ID: %d %q", code, out)
	}
	if code, _, stderr := runBinary(t, env, "", "queue", "delete", id, "-config", path); code != 1 || !strings.Contains(stderr, "no message") {
		t.Errorf("delete an unknown id: %d %q", code, stderr)
	}
	dir := filepath.Join(t.TempDir(), "new", "certs")
	if code, _, stderr := runBinary(t, env, "", "gen-cert", "-out", dir, "-host", "bridge.local"); code != 0 {
		t.Fatalf("gen-cert into a new directory: %d %s", code, stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "mailbridge.crt")); err != nil {
		t.Error(err)
	}
}

// init, non-interactively: the configuration it writes loads, check runs,
// the secret sits in a file of its own that only its owner reads, and serve
// starts with it and sends through the fake.
func TestInitWritesAWorkingConfiguration(t *testing.T) {
	fake, _, env := fakeAndConfig(t, "127.0.0.1:0", "")
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "secret.in"), []byte(secret+"\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "password.in"), []byte("legacy pw\n"), 0o600)
	path := filepath.Join(dir, "conf", "mailbridge.toml")
	args := []string{"init", "-config", path, "-tenant-id", tenant, "-client-id", client, "-client-secret-file", filepath.Join(dir, "secret.in"),
		"-mailbox", mailbox, "-username", "erp", "-password-file", filepath.Join(dir, "password.in"),
		"-token-url", fake.TokenURL(), "-graph-url", fake.GraphURL(), "-pop3-upstream", fake.POP3Addr()}
	code, out, stderr := runBinary(t, env, "", args...)
	if code != 0 {
		t.Fatalf("init: %d\n%s\n%s", code, out, stderr)
	}
	for _, want := range []string{"ok    main", "smtp-token", "SMTP server 127.0.0.1, port 2525, SSL off", `user "erp"`, "the password in " + filepath.Join(dir, "password.in"), "POP3 server 127.0.0.1, port 1110",
		"no tenant-wide Mail.Send", `New-ManagementRoleAssignment -App ` + client + ` -Role "Application Mail.Send" -CustomResourceScope "mailbridge main"`,
		"Add-MailboxPermission -Identity " + mailbox + " -User <service principal ID> -AccessRights FullAccess",
		// check's permissions section: the app's Mail.Send and Mail.ReadWrite are tenant-wide.
		"WARN  main                 permissions consented tenant-wide in Entra", "        New-ManagementScope -Name \"mailbridge main\""} {
		if !strings.Contains(out, want) {
			t.Errorf("init's output lacks %q:\n%s", want, out)
		}
	}
	data, _ := os.ReadFile(path)
	if strings.Contains(string(data), secret) || strings.Contains(string(data), "legacy pw") {
		t.Error("the configuration holds the secret or the password in clear")
	}
	if st, err := os.Stat(filepath.Join(dir, "conf", "mailbridge-secret.txt")); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("the secret file: %v %v", st, err)
	}
	if code, _, stderr := runBinary(t, env, "", args...); code != 1 || !strings.Contains(stderr, "without -force") {
		t.Errorf("init over an existing file: %d %q", code, stderr)
	}
	// serve with it, on a free port.
	os.WriteFile(path, []byte(strings.Replace(string(data), `listen = "127.0.0.1:2525"`, `listen = "127.0.0.1:0"`, 1)), 0o600)
	os.WriteFile(path, []byte(strings.Replace(mustReadFile(t, path), `listen = "127.0.0.1:1110"`, `listen = "127.0.0.1:0"`, 1)), 0o600)
	_, addr, logs := startServe(t, path, env)
	// No account of init's uses IMAP: its port stays closed, and the log
	// says why, so the demo (which listens on 1143) can run beside it.
	if l := logs.String(); !strings.Contains(l, `"proto":"imap","reason":"no account lists \"imap\" in protocols`) || strings.Contains(l, `"proto":"imap","listen"`) {
		t.Errorf("init's configuration opens IMAP, or does not say why not:\n%s", l)
	}
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewPlainClient("", "erp", "legacy pw")); err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail(mailbox, []string{"a@example.org"}, strings.NewReader("From: orders@example.com\r\nTo: a@example.org\r\nSubject: init\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	waitSent(t, fake, 1)
	// Missing answers, without a terminal: one line naming the flag.
	if code, _, stderr := runBinary(t, env, "", "init", "-config", filepath.Join(dir, "other.toml")); code != 2 || !strings.Contains(stderr, "init needs -tenant-id") {
		t.Errorf("init without answers: %d %q", code, stderr)
	}
}

func mustReadFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// With [log] file set, a person at a terminal still sees the start-up and a
// fatal error (here: the port is taken); the file gets no colour codes.
func TestLogFileStillShowsFatalErrorsOnTheTerminal(t *testing.T) {
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 (for a pseudo-terminal) is not installed")
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	_, path, env := fakeAndConfig(t, busy.Addr().String(), "")
	logFile := filepath.Join(t.TempDir(), "bridge.log")
	os.WriteFile(path, []byte(fmt.Sprintf("[log]\nfile = %q\nformat = \"console\"\n", logFile)+mustReadFile(t, path)), 0o600)
	// A pseudo-terminal, as an administrator's console is.
	script := `import os, pty, sys
out = b""
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
while True:
    try:
        data = os.read(fd, 4096)
    except OSError:
        break
    if not data:
        break
    out += data
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode("utf-8", "replace"))
sys.exit(os.waitstatus_to_exitcode(status))
`
	cmd := exec.Command(python, "-c", script, binary, "serve", "-config", path)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
		t.Fatalf("serve on a taken port: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "address already in use") || !strings.Contains(string(out), "cannot start") {
		t.Errorf("the terminal did not see the fatal error:\n%s", out)
	}
	if !strings.Contains(string(out), "log_file="+logFile) {
		t.Errorf("the first line does not name the log file:\n%s", out)
	}
	data, _ := os.ReadFile(logFile)
	if !strings.Contains(string(data), "address already in use") {
		t.Errorf("the log file lacks the error:\n%s", data)
	}
	if !strings.Contains(string(data), "another program holds") || !strings.Contains(string(data), "or change [smtp] listen") {
		t.Errorf("the error does not say what to do:\n%s", data)
	}
	if bytes.Contains(data, []byte("\x1b[")) {
		t.Errorf("colour codes in the log file:\n%q", data)
	}
	// console format to a pipe: no colour codes either.
	code, _, stderr := runBinary(t, env, "", "serve", "-config", path)
	if code != 1 || strings.Contains(stderr, "\x1b[") {
		t.Errorf("serve to a pipe: %d %q", code, stderr)
	}
}

// A certificate that does not verify (here: the fake's CA is not trusted,
// as behind a TLS-inspecting proxy) is explained as such by check.
func TestCheckExplainsAnUntrustedCertificate(t *testing.T) {
	_, path, _ := fakeAndConfig(t, "127.0.0.1:0", "")
	code, out, _ := runBinary(t, os.Environ(), "", "check", "-config", path)
	if code != 1 || !strings.Contains(out, "TLS-inspecting proxy") || !strings.Contains(out, "SSL_CERT_FILE") {
		t.Errorf("check without the CA: %d\n%s", code, out)
	}
}

// A proxy setting that is no URL (no scheme, a bad % escape) is refused
// without its password in the message, by check and by serve.
func TestProxyPasswordNeverInErrors(t *testing.T) {
	for _, proxy := range []string{"user:s3cret-pw@proxy.example:8080", "http://user:s3cret-pw%zz@proxy.example:8080", "ftp://user:s3cret-pw@proxy.example"} {
		_, path, env := fakeAndConfig(t, "127.0.0.1:0", fmt.Sprintf("[network]\nproxy = %q\n", proxy))
		for _, args := range [][]string{{"check", "-config", path}, {"serve", "-config", path}} {
			code, out, stderr := runBinary(t, env, "", args...)
			if code == 0 || !strings.Contains(stderr+out, "network.proxy") {
				t.Errorf("%s with proxy %q: exit %d, no network.proxy problem:\n%s%s", args[0], proxy, code, out, stderr)
			}
			if strings.Contains(stderr+out, "s3cret") {
				t.Errorf("%s with proxy %q prints the password:\n%s%s", args[0], proxy, out, stderr)
			}
		}
	}
}

// init writes valid TOML whatever the user name holds (a backslash, a
// quote), names the secret file after the configuration, and never
// overwrites a secret file: a second configuration in the same folder, or
// the same one again with -force and another secret, keeps the first
// secret where the first configuration finds it.
func TestInitKeepsSecretsAndEscapesValues(t *testing.T) {
	fake, _, env := fakeAndConfig(t, "127.0.0.1:0", "")
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "password.in"), []byte("pw\n"), 0o600)
	initWith := func(file, user, secretValue string, extra ...string) {
		t.Helper()
		in := filepath.Join(dir, "secret.in")
		os.WriteFile(in, []byte(secretValue+"\n"), 0o600)
		args := append([]string{"init", "-config", filepath.Join(dir, file), "-tenant-id", tenant, "-client-id", client, "-client-secret-file", in,
			"-mailbox", mailbox, "-username", user, "-password-file", filepath.Join(dir, "password.in"),
			"-token-url", fake.TokenURL(), "-graph-url", fake.GraphURL(), "-pop3-upstream", fake.POP3Addr()}, extra...)
		if code, out, stderr := runBinary(t, env, "", args...); code != 0 && code != 1 {
			t.Fatalf("init %s: %d\n%s\n%s", file, code, out, stderr)
		}
	}
	secretOf := func(file string) string {
		t.Helper()
		cfg, err := config.Load(filepath.Join(dir, file))
		if err != nil {
			t.Fatalf("%s does not load: %v", file, err)
		}
		data, err := os.ReadFile(filepath.Join(dir, cfg.Accounts[0].ClientSecretFile))
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(data))
	}
	initWith("first.toml", `CORP\scanner "one"`, secret)
	initWith("second.toml", "erp", "another~Secret.Value")
	if got := secretOf("first.toml"); got != secret {
		t.Errorf("first.toml's secret file now holds %q", got)
	}
	if got := secretOf("second.toml"); got != "another~Secret.Value" {
		t.Errorf("second.toml's secret file holds %q", got)
	}
	cfg, err := config.Load(filepath.Join(dir, "first.toml"))
	if err != nil || cfg.Accounts[0].Username != `CORP\scanner "one"` || cfg.Accounts[0].ClientSecretFile != "first-secret.txt" {
		t.Fatalf("first.toml: %v, user name %q, secret file %q", err, cfg.Accounts[0].Username, cfg.Accounts[0].ClientSecretFile)
	}
	// first.toml again, with -force and a new secret: the old secret file
	// stays as it was, the new secret goes beside it.
	initWith("first.toml", "tm", "a-new~Secret.Value", "-force")
	if data, _ := os.ReadFile(filepath.Join(dir, "first-secret.txt")); strings.TrimSpace(string(data)) != secret {
		t.Errorf("first-secret.txt was overwritten: %q", data)
	}
	if got := secretOf("first.toml"); got != "a-new~Secret.Value" {
		t.Errorf("first.toml's secret after -force: %q", got)
	}
}

// init writes its files private from the first byte and renames them into
// place: a symbolic link where the configuration goes is replaced, not
// followed, so init cannot be made to write elsewhere.
func TestInitReplacesASymlinkInsteadOfFollowingIt(t *testing.T) {
	fake, _, env := fakeAndConfig(t, "127.0.0.1:0", "")
	dir := t.TempDir()
	elsewhere := filepath.Join(t.TempDir(), "victim.txt")
	os.WriteFile(elsewhere, []byte("untouched\n"), 0o644)
	path := filepath.Join(dir, "mailbridge.toml")
	if err := os.Symlink(elsewhere, path); err != nil {
		t.Skip("no symbolic links here:", err)
	}
	os.WriteFile(filepath.Join(dir, "secret.in"), []byte(secret+"\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "password.in"), []byte("pw\n"), 0o600)
	runBinary(t, env, "", "init", "-config", path, "-force", "-tenant-id", tenant, "-client-id", client,
		"-client-secret-file", filepath.Join(dir, "secret.in"), "-mailbox", mailbox, "-username", "tm",
		"-password-file", filepath.Join(dir, "password.in"), "-token-url", fake.TokenURL(), "-graph-url", fake.GraphURL())
	if data, _ := os.ReadFile(elsewhere); string(data) != "untouched\n" {
		t.Errorf("init wrote through the symbolic link: %q", data)
	}
	st, err := os.Lstat(path)
	if err != nil || st.Mode()&os.ModeSymlink != 0 || st.Mode().Perm() != 0o600 {
		t.Errorf("the configuration: %v %v, want a regular file of mode 0600", st.Mode(), err)
	}
}

// setSMTP adds settings to the [smtp] table of the configuration at path.
func setSMTP(t *testing.T, path, settings string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, bytes.Replace(data, []byte("[smtp]\n"), []byte("[smtp]\n"+settings+"\n"), 1), 0o600); err != nil {
		t.Fatal(err)
	}
}

// init refuses the commonest mistakes before Microsoft sees them, each in
// one line naming the fix; it replaces the example the MSI or the package
// installed without -force, and nothing else.
func TestInitCatchesMistakesAndReplacesTheExample(t *testing.T) {
	_, _, env := fakeAndConfig(t, "127.0.0.1:0", "")
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "secret.in"), []byte(secret+"\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "secret-id.in"), []byte("9a8b7c6d-1234-4abc-8def-0123456789ab\n"), 0o600)
	os.WriteFile(filepath.Join(dir, "password.in"), []byte("legacy pw\n"), 0o600)
	path := filepath.Join(dir, "mailbridge.toml")
	args := func(tenantID, clientID, secretFile string) []string {
		return []string{"init", "-config", path, "-tenant-id", tenantID, "-client-id", clientID, "-client-secret-file", filepath.Join(dir, secretFile),
			"-mailbox", mailbox, "-username", "erp", "-password-file", filepath.Join(dir, "password.in"), "-no-check"}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{args("contoso-shipping", client, "secret.in"), `-tenant-id: not a tenant ID: the Directory (tenant) ID is a GUID`},
		{args(tenant, "12345", "secret.in"), `-client-id: not an Application (client) ID`},
		{args(tenant, config.PlaceholderGUID, "secret.in"), `-client-id: still the example's placeholder`},
		{args(tenant, client, "secret-id.in"), `this is a Secret ID (a GUID), not the secret's Value`},
	} {
		code, _, stderr := runBinary(t, env, "", tc.args...)
		if code != 2 || !strings.Contains(stderr, tc.want) || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("init %v: %d %q, want one line with %q", tc.args[3:7], code, stderr, tc.want)
		}
		if _, err := os.Stat(path); err == nil {
			t.Fatal("init wrote a configuration with a mistake in it")
		}
	}
	// The example as installed is replaced without -force.
	example, _ := os.ReadFile("../../config.example.toml")
	os.WriteFile(path, example, 0o600)
	if code, out, stderr := runBinary(t, env, "", args("contoso.onmicrosoft.com", client, "secret.in")...); code != 0 {
		t.Fatalf("init over the untouched example: %d\n%s\n%s", code, out, stderr)
	}
	if data := mustReadFile(t, path); !strings.Contains(data, `tenant_id = "contoso.onmicrosoft.com"`) || strings.Contains(data, config.ExampleMarker) {
		t.Errorf("the example was not replaced:\n%s", data)
	}
	// What init wrote is not an example: -force is needed.
	if code, _, stderr := runBinary(t, env, "", args(tenant, client, "secret.in")...); code != 1 || !strings.Contains(stderr, "is not the untouched example: init does not overwrite it without -force") {
		t.Errorf("init over its own configuration: %d %q", code, stderr)
	}
	// check and serve name the same mistakes in a file edited by hand.
	bad := strings.Replace(mustReadFile(t, path), `tenant_id = "contoso.onmicrosoft.com"`, `tenant_id = "contoso shipping"`, 1)
	os.WriteFile(path, []byte(bad), 0o600)
	for _, cmd := range []string{"check", "serve"} {
		code, _, stderr := runBinary(t, env, "", cmd, "-config", path)
		if code == 0 || !strings.Contains(stderr, `tenant_id: "contoso shipping": not a tenant ID`) {
			t.Errorf("%s with a bad tenant ID: %d %q", cmd, code, stderr)
		}
	}
}

// A message stuck because Microsoft is out of reach: queue list gives the
// cause in a few words and the fix naming what to open; -v the whole
// error.
func TestQueueListSaysWhyAndTheFix(t *testing.T) {
	_, path, env := fakeAndConfig(t, "127.0.0.1:0", "")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	data := mustReadFile(t, path)
	data = regexp.MustCompile(`(?m)^graph_url = .*$`).ReplaceAllString(data, `graph_url = "https://`+closed+`/v1.0"`)
	os.WriteFile(path, []byte(data), 0o600)
	cmd, addr, _ := startServe(t, path, env)
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewPlainClient("", "tm", "pw")); err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail(mailbox, []string{"a@example.org"}, strings.NewReader("From: orders@example.com\r\nTo: a@example.org\r\nSubject: stuck\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	queue := filepath.Join(filepath.Dir(path), "outbox", "queue")
	for deadline := time.Now().Add(patience); ; time.Sleep(20 * time.Millisecond) {
		entries, _ := filepath.Glob(filepath.Join(queue, "*.json"))
		if len(entries) == 1 && strings.Contains(mustReadFile(t, entries[0]), `"last_reason"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the message never failed an attempt")
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	code, list, _ := runBinary(t, env, "", "queue", "list", "-config", path)
	if code != 0 {
		t.Fatalf("queue list: %d", code)
	}
	for _, want := range []string{"Why, and the fix:", "dial tcp " + closed + ": connect: connection refused",
		"fix: this machine cannot reach Microsoft 365: allow outbound TCP to ", ", " + closed + ", ", "[network] proxy"} {
		if !strings.Contains(list, want) {
			t.Errorf("queue list lacks %q:\n%s", want, list)
		}
	}
	if strings.Contains(list, "error: ") {
		t.Errorf("queue list without -v prints the whole error:\n%s", list)
	}
	if _, list, _ := runBinary(t, env, "", "queue", "list", "-v", "-config", path); !strings.Contains(list, `error: graph sendMail: Post "https://`+closed) {
		t.Errorf("queue list -v lacks the whole error:\n%s", list)
	}
}

// Each command explains itself: COMMAND -h and help COMMAND print its
// synopsis and flags and exit 0; version takes no arguments.
func TestHelpForEachCommand(t *testing.T) {
	for _, cmd := range []string{"serve", "check", "init", "queue", "service", "demo", "gen-cert", "hash-password"} {
		code, out, stderr := runBinary(t, nil, "", cmd, "-h")
		if code != 0 || !strings.Contains(out+stderr, "usage: mailbridge "+cmd) || strings.Contains(out+stderr, "Usage of") {
			t.Errorf("%s -h: %d %q %q", cmd, code, out, stderr)
		}
		code, out, _ = runBinary(t, nil, "", "help", cmd)
		if code != 0 || !strings.Contains(out, "usage: mailbridge "+cmd) || !strings.Contains(out, "\n\n") {
			t.Errorf("help %s: %d %q", cmd, code, out)
		}
	}
	if code, _, stderr := runBinary(t, nil, "", "version", "extra"); code != 2 || !strings.Contains(stderr, "version takes no arguments") {
		t.Errorf("version extra: %d %q", code, stderr)
	}
	if code, out, _ := runBinary(t, nil, "", "version"); code != 0 || strings.Contains(out, "unknown") {
		t.Errorf("version: %d %q", code, out)
	}
}
