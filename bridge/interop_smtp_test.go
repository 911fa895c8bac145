package bridge_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"mailbridge/bridge/config"
)

func TestInteropSwaks(t *testing.T) {
	swaks := need(t, "swaks")
	fake := startFake(t)
	b, _, ca := interopBridge(t, fake, nil)
	host, port := hostPort(b.SMTPAddr())
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"auth-login", []string{"--auth", "LOGIN"}},
		{"auth-plain", []string{"--auth", "PLAIN"}},
		{"starttls", []string{"--auth", "LOGIN", "--tls", "--tls-verify", "--tls-ca-path", ca, "--tls-sni", "localhost"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "swaks-" + tc.name + "@mailbridge.test"
			msg := interopMessage(id, "Content-Type: text/plain; charset=utf-8\n", "Hello from swaks.\n.leading dot\n")
			// swaks ends the data with CRLF "." CRLF after the file as it
			// is: the file leaves out the message's last line break.
			file := filepath.Join(t.TempDir(), "msg.eml")
			os.WriteFile(file, bytes.TrimSuffix(msg, []byte("\r\n")), 0o600)
			args := append([]string{"--server", host, "--port", port, "--from", mailboxA, "--to", "supplier@example.org",
				"--auth-user", userA, "--auth-password", passwordA, "--data", file, "--helo", "swaks.test", "--timeout", "30"}, tc.args...)
			out := run(t, nil, swaks, args...)
			if !strings.Contains(out, "250 2.0.0 OK: accepted by Microsoft 365") {
				t.Fatalf("swaks did not see the bridge's 250:\n%s", out)
			}
			checkByteExact(t, sentOnce(t, fake, id), msg, false)
		})
	}
}

func TestInteropCurlSMTPWithStartTLS(t *testing.T) {
	curl := need(t, "curl")
	fake := startFake(t)
	b, _, ca := interopBridge(t, fake, nil)
	id := "curl-smtp@mailbridge.test"
	msg := interopMessage(id, "Content-Type: text/plain; charset=utf-8\n", "Hello from curl, over STARTTLS.\n")
	file := filepath.Join(t.TempDir(), "msg.eml")
	os.WriteFile(file, msg, 0o600)
	_, port := hostPort(b.SMTPAddr())
	out := run(t, nil, curl, "-sS", "--ssl-reqd", "--cacert", ca, "--url", "smtp://localhost:"+port, "--resolve", "localhost:"+port+":127.0.0.1",
		"--mail-from", mailboxA, "--mail-rcpt", "supplier@example.org", "--mail-rcpt", "hidden@example.org",
		"--user", userA+":"+passwordA, "--upload-file", file, "-v")
	if !strings.Contains(out, "STARTTLS") || !strings.Contains(out, "250 2.0.0 OK: accepted by Microsoft 365") {
		t.Fatalf("curl:\n%s", out)
	}
	sent := sentOnce(t, fake, id)
	checkByteExact(t, sent, msg, false)
	if !strings.Contains(string(sent.MIME), "Bcc: hidden@example.org\r\n") {
		t.Errorf("the Bcc-only recipient was not added:\n%s", head(sent.MIME))
	}
}

const pythonSMTP = `
import smtplib, sys, email, email.policy
from email.message import EmailMessage
host, port, user, password, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
s = smtplib.SMTP(host, port, timeout=60)
s.ehlo()
if "size" not in s.esmtp_features:
    sys.exit("no SIZE in EHLO")
s.login(user, password)
raw = sys.stdin.buffer.read()
if mode == "sendmail":
    # sendmail with SIZE, as Thunderbird and Postfix announce it
    refused = s.sendmail("orders@example.com", ["supplier@example.org"], raw, mail_options=["SIZE=%d" % len(raw)])
else:
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    refused = s.send_message(msg)
print("refused:", refused)
s.quit()
`

func TestInteropPythonSmtplib(t *testing.T) {
	python := need(t, "python3")
	fake := startFake(t)
	b, _, _ := interopBridge(t, fake, nil)
	host, port := hostPort(b.SMTPAddr())
	script := filepath.Join(t.TempDir(), "send.py")
	os.WriteFile(script, []byte(pythonSMTP), 0o600)

	id := "python-size@mailbridge.test"
	small := interopMessage(id, "Content-Type: text/plain; charset=utf-8\n", "Hello from smtplib, with SIZE.\n")
	if out := run(t, small, python, script, host, port, userA, passwordA, "sendmail"); !strings.Contains(out, "refused: {}") {
		t.Fatalf("smtplib: %s", out)
	}
	checkByteExact(t, sentOnce(t, fake, id), small, false)

	// send_message with a 10 MB attachment: SIZE, then the draft path.
	big := message12MB()
	big = []byte(strings.Replace(string(big), "Message-ID: <large-12@mailbridge.test>", "Message-ID: <python-large@mailbridge.test>", 1))
	if out := run(t, big, python, script, host, port, userA, passwordA, "send_message"); !strings.Contains(out, "refused: {}") {
		t.Fatalf("smtplib send_message: %s", out)
	}
	sent := sentOnce(t, fake, "python-large@mailbridge.test")
	rebuilt, err := sent.Rebuild()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := leaves(t, rebuilt), leaves(t, big); !equalLeaves(got, want) {
		t.Errorf("the attachments changed:\ngot  %+v\nwant %+v", got, want)
	}
}

func TestInteropOpenSSLTLS10(t *testing.T) {
	openssl := need(t, "openssl")
	fake := startFake(t)
	// tls_min_version = "1.0": an old client's TLS 1.0 handshake and AUTH work.
	b, _, _ := interopBridge(t, fake, func(cfg *config.Config) { cfg.SMTP.TLSMinVersion = "1.0" })
	out, _ := runErr([]byte("EHLO old.client\r\nAUTH PLAIN AHRtbWFzdGVyAGNvcnJlY3QgaG9yc2U=\r\nQUIT\r\n"), openssl, "s_client",
		"-connect", b.SMTPAddr(), "-starttls", "smtp", "-tls1", "-cipher", "DEFAULT:@SECLEVEL=0", "-quiet", "-ign_eof")
	if !strings.Contains(out, "235 2.0.0 Authentication succeeded") {
		t.Fatalf("TLS 1.0 with tls_min_version = \"1.0\":\n%s", out)
	}

	// The default refuses it, and says why in one line with the fix.
	b2, logs, _ := interopBridge(t, fake, nil)
	out, err := runErr([]byte("EHLO old.client\r\nQUIT\r\n"), openssl, "s_client",
		"-connect", b2.SMTPAddr(), "-starttls", "smtp", "-tls1", "-cipher", "DEFAULT:@SECLEVEL=0", "-quiet", "-ign_eof")
	if err == nil && strings.Contains(out, "250") && !strings.Contains(out, "alert") {
		t.Fatalf("TLS 1.0 accepted by default:\n%s", out)
	}
	waitFor(t, "the handshake failure line", func() bool { return strings.Contains(logs.String(), `"message":"TLS handshake failed"`) })
	line := findLogLine(t, logs.String(), "TLS handshake failed")
	for _, want := range []string{`"level":"warn"`, `"client_max_version":"TLS 1.0"`, `"remote":"127.0.0.1:`, `tls_min_version = \"1.0\"`, "SchUseStrongCrypto"} {
		if !strings.Contains(line, want) {
			t.Errorf("handshake failure logged without %s: %s", want, line)
		}
	}
}
