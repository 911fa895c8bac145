//go:build linux

package main

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"mailbridge/upstream/m365fake/m365test"
)

// TestWindowsUnderWine runs the release's Windows programs under wine 10,
// in the Debian 13 chroot that .ci/windows-smoke prepares: the exe's
// version and demo, the MSI's install, upgrade and removal, the service
// started and stopped by wine's Service Control Manager with a message
// sent through it, and `mailbridge service`. Only .ci/windows-smoke sets
// MAILBRIDGE_WINE_ROOT (the mounted chroot) and MAILBRIDGE_WINE_DIST (the
// release's dist folder, with upgrade.msi beside it); CI always runs it.
func TestWindowsUnderWine(t *testing.T) {
	root, dist := os.Getenv("MAILBRIDGE_WINE_ROOT"), os.Getenv("MAILBRIDGE_WINE_DIST")
	if root == "" || dist == "" {
		t.Skip("run by .ci/windows-smoke, which prepares wine in a Debian 13 chroot")
	}
	w := newWine(t, root)
	msis, _ := filepath.Glob(filepath.Join(dist, "mailbridge-*-windows-amd64.msi"))
	zips, _ := filepath.Glob(filepath.Join(dist, "mailbridge-*-windows-amd64.zip"))
	if len(msis) != 1 || len(zips) != 1 {
		t.Fatalf("%s must hold one Windows MSI and one zip: %v %v", dist, msis, zips)
	}
	msi := w.put(t, msis[0], "mailbridge.msi")
	upgrade := w.put(t, filepath.Join(dist, "upgrade.msi"), "upgrade.msi")
	exe := w.put(t, unzipExe(t, zips[0]), "mailbridge.exe")

	// The fake Microsoft 365 runs here, on Linux; wine's TLS trusts its CA
	// through the chroot's CA bundle, which wine's crypt32 imports as
	// Windows' root store. Its names are "localhost": wine's SSL policy
	// does not match IP addresses.
	fake := m365test.Start(t, m365test.Tenant{ID: tenant, ClientID: client, Secret: secret,
		Roles: []string{"Mail.Send", "Mail.ReadWrite", "POP.AccessAsApp"}, Mailboxes: []string{mailbox}, FullAccess: []string{mailbox}})
	fake.RefuseRecipients("refused.example")
	w.trust(t, fake.CACertPEM())
	local := func(u string) string { return strings.ReplaceAll(u, "127.0.0.1", "localhost") }
	hash, _ := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	serviceConfig := fmt.Sprintf(`[smtp]
listen = "127.0.0.1:0"
[pop3]
listen = "127.0.0.1:0"
upstream = %q
[imap]
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
`, local(fake.POP3Addr()), local(fake.IMAPAddr()), hash, mailbox, tenant, client, local(fake.TokenURL()), local(fake.GraphURL()))
	programData := w.host(`C:\ProgramData\mailbridge`)
	installed := `C:\Program Files\mailbridge\mailbridge.exe`
	// The program's path has a space and is quoted; the configuration's
	// has none and is not (the rules of Windows' command-line parsing).
	quotedCommand := `"` + installed + `" serve -service -config C:\ProgramData\mailbridge\mailbridge.toml`
	// sendThrough sends one message through the service's SMTP listener,
	// read from the service's log, and waits for Graph to have it, once.
	sendThrough := func(t *testing.T, logFrom int64, subject string) {
		t.Helper()
		addr := w.waitLog(t, filepath.Join(programData, "mailbridge.log"), logFrom, regexp.MustCompile(`"proto":"smtp","listen":"([^"]+)"`))
		curlSMTP(t, addr, "tm", "pw", mailbox, "someone@example.net", subject)
		copies := func() int {
			n := 0
			for _, m := range fake.Sent() {
				if m.Subject == subject {
					n++
				}
			}
			return n
		}
		deadline := time.Now().Add(patience)
		for copies() == 0 {
			if time.Now().After(deadline) {
				t.Fatalf("Graph never got %q", subject)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if n := copies(); n != 1 {
			t.Fatalf("Graph got %d copies of %q", n, subject)
		}
	}

	steps := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"exe: version", func(t *testing.T) {
			out := w.mustRun(t, exe, "version")
			if !strings.HasPrefix(out, "mailbridge ") || !strings.Contains(out, "go1.") {
				t.Fatalf("version printed %q", out)
			}
		}},
		{"exe: demo, a message sent, then read over POP3 and IMAP", func(t *testing.T) {
			testDemoUnderWine(t, w, exe)
		}},
		{"exe: init writes a configuration and its secret file, and checks them against Microsoft 365", func(t *testing.T) {
			// wine's icacls is a stub and wine keeps no file ACLs, so the
			// secret file's ACL cannot be read back here: init's call to
			// icacls must only succeed.
			in := filepath.Join(t.TempDir(), "in")
			os.WriteFile(in, []byte(secret+"\n"), 0o600)
			secretIn := w.put(t, in, "secret.in")
			os.WriteFile(in, []byte("legacy pw\n"), 0o600)
			passwordIn := w.put(t, in, "password.in")
			out := w.mustRun(t, exe, "init", "-config", `C:\users\init test\mailbridge.toml`, "-tenant-id", tenant, "-client-id", client,
				"-client-secret-file", secretIn, "-mailbox", mailbox, "-username", "erp", "-password-file", passwordIn,
				"-token-url", local(fake.TokenURL()), "-graph-url", local(fake.GraphURL()), "-pop3-upstream", local(fake.POP3Addr()))
			for _, want := range []string{"ok    main                 smtp-token", "ok    main                 pop3", "ok    main                 large-msgs"} {
				if !strings.Contains(out, want) {
					t.Errorf("init's output lacks %q:\n%s", want, out)
				}
			}
			if got := mustReadFile(t, w.host(`C:\users\init test\mailbridge-secret.txt`)); strings.TrimSpace(got) != secret {
				t.Error("the secret file does not hold the secret")
			}
			if strings.Contains(mustReadFile(t, w.host(`C:\users\init test\mailbridge.toml`)), secret) {
				t.Error("the configuration holds the secret")
			}
		}},
		{"msiexec /i: files, configuration, service registered with a quoted command line", func(t *testing.T) {
			w.msiexec(t, "/i", msi)
			for _, f := range []string{`C:\Program Files\mailbridge\mailbridge.exe`, `C:\ProgramData\mailbridge\config.example.toml`, `C:\ProgramData\mailbridge\mailbridge.toml`} {
				if _, err := os.Stat(w.host(f)); err != nil {
					t.Errorf("after the install: %v", err)
				}
			}
			if example, config := mustReadFile(t, filepath.Join(programData, "config.example.toml")), mustReadFile(t, filepath.Join(programData, "mailbridge.toml")); example != config {
				t.Error("the msi-install custom action did not copy the example to mailbridge.toml")
			}
			w.checkService(t, quotedCommand)
		}},
		{"sc start with the example configuration: the service stops, and its log says why", func(t *testing.T) {
			from := w.logSize(filepath.Join(programData, "mailbridge.log"))
			w.run(t, "sc", "start", "mailbridge") // it may be seen running before it stops
			w.waitState(t, "STOPPED")
			w.waitLog(t, filepath.Join(programData, "mailbridge.log"), from, regexp.MustCompile(`"level":"error".*(still the example's placeholder).*"hint":"fix the configuration file`))
		}},
		{"sc start: the service runs under the SCM, sends a message, and stops on sc stop", func(t *testing.T) {
			os.WriteFile(filepath.Join(programData, "mailbridge.toml"), []byte(serviceConfig), 0o600)
			os.WriteFile(filepath.Join(programData, "secret.txt"), []byte(secret+"\n"), 0o600)
			from := w.logSize(filepath.Join(programData, "mailbridge.log"))
			w.mustRun(t, "sc", "start", "mailbridge")
			w.waitState(t, "RUNNING")
			sendThrough(t, from, "through the service")
			// A second bridge on the service's outbox, started by hand
			// in a console, is refused (LockFileEx) instead of sending
			// the same messages again; a console's bridge logs to it.
			out, err := w.run(t, installed, "serve", "-config", `C:\ProgramData\mailbridge\mailbridge.toml`)
			if err == nil {
				t.Errorf("a second serve beside the service ended well:\n%s", out)
			}
			if !regexp.MustCompile(`is in use by another mailbridge \(process \d+\): stop it first.*"message":"cannot start"`).MatchString(out) {
				t.Errorf("the second serve did not say that the outbox is in use:\n%s", out)
			}
			// One that Graph refuses stays in the outbox's failed/, for
			// the upgrade to keep.
			addr := w.waitLog(t, filepath.Join(programData, "mailbridge.log"), from, regexp.MustCompile(`"proto":"smtp","listen":"([^"]+)"`))
			curlSMTP(t, addr, "tm", "pw", mailbox, "nobody@refused.example", "refused")
			w.waitLog(t, filepath.Join(programData, "mailbridge.log"), from, regexp.MustCompile(`"subject":"(refused)".*"message":"message failed`))
			w.mustRun(t, "sc", "stop", "mailbridge")
			w.waitState(t, "STOPPED")
			w.waitLog(t, filepath.Join(programData, "mailbridge.log"), from, regexp.MustCompile(`"message":"(stopped)"`))
		}},
		{"msiexec /i of a newer MSI: an upgrade keeps the configuration and the outbox", func(t *testing.T) {
			config := mustReadFile(t, filepath.Join(programData, "mailbridge.toml"))
			outbox := listTree(t, filepath.Join(programData, "outbox"))
			if !strings.Contains(outbox, "failed") {
				t.Fatalf("the outbox holds no failed message: %s", outbox)
			}
			w.msiexec(t, "/i", upgrade)
			if got := mustReadFile(t, filepath.Join(programData, "mailbridge.toml")); got != config {
				t.Error("the upgrade changed mailbridge.toml")
			}
			if got := listTree(t, filepath.Join(programData, "outbox")); got != outbox {
				t.Errorf("the upgrade changed the outbox:\nbefore %s\nafter  %s", outbox, got)
			}
			w.checkService(t, quotedCommand)
			from := w.logSize(filepath.Join(programData, "mailbridge.log"))
			w.mustRun(t, "sc", "start", "mailbridge")
			w.waitState(t, "RUNNING")
			sendThrough(t, from, "after the upgrade")
			w.mustRun(t, "sc", "stop", "mailbridge")
			w.waitState(t, "STOPPED")
		}},
		{"msiexec /x: the program and the service go, the configuration and the outbox stay", func(t *testing.T) {
			w.msiexec(t, "/x", upgrade)
			if _, err := os.Stat(w.host(installed)); err == nil {
				t.Error("mailbridge.exe is still there")
			}
			if out, err := w.run(t, "reg", "query", `HKLM\System\CurrentControlSet\Services\mailbridge`); err == nil {
				t.Errorf("the service is still registered:\n%s", out)
			}
			for _, f := range []string{"mailbridge.toml", "secret.txt", "outbox"} {
				if _, err := os.Stat(filepath.Join(programData, f)); err != nil {
					t.Errorf("the uninstall removed %s: %v", f, err)
				}
			}
		}},
		{"mailbridge service uninstall removes the MSI's service", func(t *testing.T) {
			w.msiexec(t, "/i", msi)
			w.mustRun(t, installed, "service", "uninstall", "-config", `C:\ProgramData\mailbridge\mailbridge.toml`)
			if out, err := w.run(t, "reg", "query", `HKLM\System\CurrentControlSet\Services\mailbridge`); err == nil {
				t.Errorf("the service is still registered:\n%s", out)
			}
			w.msiexec(t, "/x", msi)
		}},
		{"mailbridge service install, start, status, stop, uninstall", func(t *testing.T) {
			dir := w.host(`C:\Program Files\mailbridge zip`)
			os.MkdirAll(dir, 0o755)
			if err := os.WriteFile(filepath.Join(dir, "mailbridge.exe"), []byte(mustReadFile(t, w.host(exe))), 0o755); err != nil {
				t.Fatal(err)
			}
			zipped := `C:\Program Files\mailbridge zip\mailbridge.exe`
			cfg := `C:\ProgramData\mailbridge\mailbridge.toml`
			w.mustRun(t, zipped, "service", "install", "-config", cfg)
			w.checkService(t, `"`+zipped+`" serve -service -config `+cfg)
			from := w.logSize(filepath.Join(programData, "mailbridge.log"))
			w.mustRun(t, zipped, "service", "start", "-config", cfg)
			w.waitState(t, "RUNNING")
			if out := w.mustRun(t, zipped, "service", "status", "-config", cfg); !strings.Contains(out, "running") {
				t.Errorf("service status: %q", out)
			}
			sendThrough(t, from, "through service install")
			w.mustRun(t, zipped, "service", "stop", "-config", cfg)
			w.waitState(t, "STOPPED")
			w.mustRun(t, zipped, "service", "uninstall", "-config", cfg)
			if out, err := w.run(t, "reg", "query", `HKLM\System\CurrentControlSet\Services\mailbridge`); err == nil {
				t.Errorf("the service is still registered:\n%s", out)
			}
		}},
	}
	for _, s := range steps {
		t.Logf("step: %s", s.name)
		if !t.Run(s.name, s.run) {
			return // each step builds on the one before
		}
	}
}

// testDemoUnderWine runs `mailbridge.exe demo` under wine and drives it with
// curl from Linux: a message sent over SMTP, found over POP3 and IMAP, and
// /healthz.
func testDemoUnderWine(t *testing.T, w *wine, exe string) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := w.command(ctx, exe, "demo", "-smtp", "127.0.0.1:0", "-pop3", "127.0.0.1:0", "-imap", "127.0.0.1:0", "-admin", "127.0.0.1:0",
		"-log-format", "json", "-outbox", `C:\demo-outbox`)
	stdout, _ := cmd.StdoutPipe()
	var stderr syncBuffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		w.run(t, "taskkill", "/F", "/IM", "mailbridge.exe")
		cancel()
		cmd.Wait()
	}()
	addrs := map[string]string{}
	sc := bufio.NewScanner(stdout)
	for len(addrs) < 4 && sc.Scan() {
		for _, m := range regexp.MustCompile(`(SMTP|POP3|IMAP) server (127\.0\.0\.1:\d+)|Status page: http://(127\.0\.0\.1:\d+)`).FindAllStringSubmatch(sc.Text(), -1) {
			if m[3] != "" {
				addrs["admin"] = m[3]
			} else {
				addrs[m[1]] = m[2]
			}
		}
	}
	if len(addrs) < 4 {
		t.Fatalf("the demo did not print its addresses: %v\n%s", addrs, stderr.String())
	}
	go io.Copy(io.Discard, stdout)
	// To the demo mailbox itself, so that POP3 and IMAP find it.
	curlSMTP(t, addrs["SMTP"], "demo", "demo", "demo@example.com", "demo@example.com", "under wine")
	// The outbox sends in the background: wait until POP3 lists it.
	deadline := time.Now().Add(patience)
	for {
		out, _ := exec.Command("curl", "-sS", "--user", "demo:demo", "pop3://"+addrs["POP3"]+"/").CombinedOutput()
		if len(strings.Fields(string(out))) >= 4 { // "1 size\r\n2 size"
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("POP3 never listed the message sent:\n%s\n%s", out, stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out := curl(t, "--user", "demo:demo", "pop3://"+addrs["POP3"]+"/2"); !strings.Contains(out, "Subject: under wine") {
		t.Errorf("POP3 RETR 2:\n%s", out)
	}
	if out := curl(t, "--user", "demo:demo", "imap://"+addrs["IMAP"]+"/INBOX", "-X", `SEARCH SUBJECT "under wine"`); !regexp.MustCompile(`\* SEARCH \d`).MatchString(out) {
		t.Errorf("IMAP SEARCH found nothing:\n%s", out)
	}
	resp, err := http.Get("http://" + addrs["admin"] + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("/healthz answered %d", resp.StatusCode)
	}
}

func curl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("curl", append([]string{"-sS", "--max-time", "120"}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("curl %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// curlSMTP sends one message with curl, authenticating as user.
func curlSMTP(t *testing.T, addr, user, password, from, to, subject string) {
	t.Helper()
	cmd := exec.Command("curl", "-sS", "--max-time", "120", "smtp://"+addr, "--user", user+":"+password,
		"--mail-from", from, "--mail-rcpt", to, "-T", "-")
	cmd.Stdin = strings.NewReader("From: " + from + "\r\nTo: " + to + "\r\nSubject: " + subject + "\r\n\r\nsent from Linux to mailbridge.exe under wine\r\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("curl smtp://%s: %v\n%s", addr, err, out)
	}
}

// wine runs Windows programs in a wine prefix of its own inside the chroot.
type wine struct {
	root   string // the chroot, on this side
	dir    string // this test's folder, inside the chroot
	prefix string // the wine prefix, inside the chroot
}

func newWine(t *testing.T, root string) *wine {
	hostDir, err := os.MkdirTemp(filepath.Join(root, "tmp"), "mailbridge-wine-")
	if err != nil {
		t.Fatal(err)
	}
	w := &wine{root: root, dir: strings.TrimPrefix(hostDir, root)}
	w.prefix = w.dir + "/prefix"
	os.MkdirAll(filepath.Join(hostDir, "files"), 0o755)
	os.MkdirAll(filepath.Join(hostDir, "xdg"), 0o700)
	os.MkdirAll(filepath.Join(hostDir, "prefix"), 0o755)
	t.Cleanup(func() {
		// Stops every Windows process of the prefix, the services among
		// them, then removes it.
		w.output(w.tool(context.Background(), "wineserver", "-k"))
		os.RemoveAll(hostDir)
	})
	// One wineserver for the whole test: no start-up between commands.
	if out, err := w.output(w.tool(context.Background(), "wineserver", "-p")); err != nil {
		t.Fatalf("wineserver -p: %v\n%s", err, out)
	}
	if out, err := w.output(w.tool(context.Background(), "wineboot", "-i")); err != nil {
		t.Fatalf("wineboot -i: %v\n%s", err, out)
	}
	// A new prefix's first boot leaves two services.exe running, two
	// Service Control Managers that do not see each other's services:
	// start again, with one.
	w.output(w.tool(context.Background(), "wineserver", "-k"))
	w.output(w.tool(context.Background(), "wineserver", "-p"))
	if out, err := w.output(w.tool(context.Background(), "wineboot")); err != nil {
		t.Fatalf("wineboot: %v\n%s", err, out)
	}
	return w
}

// tool runs a program of wine's own (wineserver, wineboot, wine) in the
// chroot with the prefix's environment.
func (w *wine) tool(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "chroot", append([]string{w.root, "env", "-i", "PATH=/usr/bin:/bin", "HOME=/root",
		"WINEPREFIX=" + w.prefix, "WINEDEBUG=-all", "XDG_RUNTIME_DIR=" + w.dir + "/xdg", name}, args...)...)
	// wine's daemons (wineserver, services.exe) inherit what it was given:
	// a pipe would stay open after the command ends.
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// output runs cmd with its output to a file, not a pipe that wine's
// daemons would keep open, and returns it.
func (w *wine) output(cmd *exec.Cmd) (string, error) {
	f, err := os.CreateTemp("", "wine-output-")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	cmd.Stdout, cmd.Stderr = f, f
	err = cmd.Run()
	b, _ := os.ReadFile(f.Name())
	return strings.ReplaceAll(string(b), "\r\n", "\n"), err
}

// command runs a Windows program under wine.
func (w *wine) command(ctx context.Context, program string, args ...string) *exec.Cmd {
	return w.tool(ctx, "wine", append([]string{program}, args...)...)
}

// run runs a Windows program and returns its output (both streams).
func (w *wine) run(t *testing.T, program string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*patience)
	defer cancel()
	return w.output(w.command(ctx, program, args...))
}

func (w *wine) mustRun(t *testing.T, program string, args ...string) string {
	t.Helper()
	out, err := w.run(t, program, args...)
	if err != nil {
		t.Fatalf("wine %s %v: %v\n%s", program, args, err, out)
	}
	return out
}

// put copies a file of this side into the test's folder and returns its
// Windows path.
func (w *wine) put(t *testing.T, src, name string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.root, w.dir, "files", name), b, 0o755); err != nil {
		t.Fatal(err)
	}
	return `Z:` + strings.ReplaceAll(w.dir, "/", `\`) + `\files\` + name
}

// host returns where a Windows path of the prefix's drive C, or of Z:, is
// on this side.
func (w *wine) host(windowsPath string) string {
	p := strings.ReplaceAll(windowsPath, `\`, "/")
	if rest, ok := strings.CutPrefix(p, "Z:"); ok {
		return filepath.Join(w.root, rest)
	}
	return filepath.Join(w.root, w.prefix, "drive_c", strings.TrimPrefix(p, "C:"))
}

// trust adds a CA to the chroot's CA bundle for the length of the test.
func (w *wine) trust(t *testing.T, pem []byte) {
	bundle := filepath.Join(w.root, "etc/ssl/certs/ca-certificates.crt")
	before, err := os.ReadFile(bundle)
	if err != nil {
		t.Fatalf("the chroot has no CA bundle (ca-certificates): %v", err)
	}
	t.Cleanup(func() { os.WriteFile(bundle, before, 0o644) })
	if err := os.WriteFile(bundle, append(append(before, '\n'), pem...), 0o644); err != nil {
		t.Fatal(err)
	}
}

// msiexec installs or removes an MSI quietly; its verbose log is shown
// when it fails.
func (w *wine) msiexec(t *testing.T, action, msi string) {
	t.Helper()
	logName := fmt.Sprintf(`%s\msiexec-%d.log`, strings.ReplaceAll(w.dir, "/", `\`), time.Now().UnixNano())
	out, err := w.run(t, "msiexec", action, msi, "/qn", "/l*v", "Z:"+logName)
	if err != nil {
		log, _ := os.ReadFile(w.host("Z:" + logName))
		t.Fatalf("msiexec %s %s: %v\n%s\n%s", action, msi, err, out, log)
	}
}

// checkService reads the service's registry key: started with the
// machine, with the command line want.
func (w *wine) checkService(t *testing.T, want string) {
	t.Helper()
	out := w.mustRun(t, "reg", "query", `HKLM\System\CurrentControlSet\Services\mailbridge`)
	m := regexp.MustCompile(`ImagePath\s+REG_(?:EXPAND_)?SZ\s+(.*)`).FindStringSubmatch(out)
	if m == nil || strings.TrimSpace(m[1]) != want {
		t.Errorf("the service's command line is not\n  %s\n%s", want, out)
	}
	if !regexp.MustCompile(`Start\s+REG_DWORD\s+0x2\b`).MatchString(out) {
		t.Errorf("the service does not start with the machine:\n%s", out)
	}
}

// waitState waits until `sc query mailbridge` reports state.
func (w *wine) waitState(t *testing.T, state string) {
	t.Helper()
	deadline := time.Now().Add(patience)
	for {
		out, _ := w.run(t, "sc", "query", "mailbridge")
		if regexp.MustCompile(`STATE\s+:\s+\d+\s+` + state).MatchString(out) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the service never reached %s:\n%s", state, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (w *wine) logSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

// waitLog waits until the log at path, from offset on, has a line that re
// matches, and returns its first group.
func (w *wine) waitLog(t *testing.T, path string, offset int64, re *regexp.Regexp) string {
	t.Helper()
	deadline := time.Now().Add(patience)
	for {
		b, _ := os.ReadFile(path)
		if int64(len(b)) > offset {
			if m := re.FindSubmatch(b[offset:]); m != nil {
				return string(m[1])
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never logged %s; it has:\n%s", path, re, b[min(int64(len(b)), offset):])
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// unzipExe extracts mailbridge.exe from the release's zip.
func unzipExe(t *testing.T, zipPath string) string {
	t.Helper()
	z, err := zip.OpenReader(zipPath)
	if err != nil {
		t.Fatal(err)
	}
	defer z.Close()
	for _, f := range z.File {
		if filepath.Base(f.Name) == "mailbridge.exe" {
			r, _ := f.Open()
			b, err := io.ReadAll(r)
			r.Close()
			if err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(t.TempDir(), "mailbridge.exe")
			os.WriteFile(out, b, 0o755)
			return out
		}
	}
	t.Fatal("the zip has no mailbridge.exe")
	return ""
}

// listTree lists the files under dir with their sizes, one per line.
func listTree(t *testing.T, dir string) string {
	var b bytes.Buffer
	filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			fmt.Fprintf(&b, "%s %d\n", strings.TrimPrefix(p, dir), info.Size())
		}
		return nil
	})
	return b.String()
}
