package bridge_test

import (
	"bytes"
	"crypto/sha256"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/upstream/m365fake"
)

// TestInteropMonoSmtpClient sends with .NET's System.Net.Mail.SmtpClient
// (mono), which knows AUTH LOGIN only and sends the user name on the AUTH
// line, and whose EnableSsl means STARTTLS.
func TestInteropMonoSmtpClient(t *testing.T) {
	mcs := need(t, "mcs")
	mono := need(t, "mono")
	exe := filepath.Join(t.TempDir(), "SmtpClientSend.exe")
	run(t, nil, mcs, "-r:System.dll", "-out:"+exe, "../testdata/SmtpClientSend.cs")
	fake := startFake(t)
	b, _, ca := interopBridge(t, fake, nil)
	// Mono's SmtpClient, like .NET Framework 4.0-4.6 without
	// SchUseStrongCrypto, offers TLS 1.0 only: the README tells such users
	// to set tls_min_version = "1.0".
	old, _, oldCA := interopBridge(t, fake, func(cfg *config.Config) { cfg.SMTP.TLSMinVersion = "1.0" })
	for _, tc := range []struct {
		name   string
		bridge *bridge.Bridge
		ca     string
		ssl    string
		attach int
		extra  string
	}{
		{"plain", b, ca, "0", 0, ""},
		{"plain-5MB-attachment", b, ca, "0", 5 << 20, ""},
		{"enable-ssl-tls1.0", old, oldCA, "1", 0, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			subject := "mono " + tc.name
			_, port := hostPort(tc.bridge.SMTPAddr())
			out := run(t, nil, mono, exe, "localhost", port, userA, passwordA, mailboxA, "supplier@example.org", tc.ssl, strconv.Itoa(tc.attach), tc.ca, subject, tc.extra)
			if !strings.Contains(out, "sent") {
				t.Fatalf("SmtpClient: %s", out)
			}
			var got []m365fake.SentMessage
			for _, m := range fake.Sent() {
				if m.Subject == subject {
					got = append(got, m)
				}
			}
			if len(got) != 1 {
				t.Fatalf("%d messages with subject %q reached Graph, want 1", len(got), subject)
			}
			rebuilt, err := got[0].Rebuild()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(rebuilt, []byte("Body written by System.Net.Mail.")) {
				t.Errorf("the body is missing:\n%q", head(rebuilt))
			}
			if tc.attach > 0 {
				data := make([]byte, tc.attach)
				for i := range data {
					data[i] = byte(i*7 + 3)
				}
				want := sha256.Sum256(data)
				found := false
				for _, l := range leaves(t, rebuilt) {
					if l.sha == want && l.filename == "report.bin" {
						found = true
					}
				}
				if !found {
					t.Errorf("the %d-byte attachment did not arrive intact: leaves %+v", tc.attach, leaves(t, rebuilt))
				}
			}
		})
	}
}
