package bridge_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
)

// newCertificateFile makes an RSA certificate as an administrator would
// for an app registration, and writes it with its key to a PEM file.
func newCertificateFile(t *testing.T) (string, *x509.Certificate) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "mailbridge app"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pk, _ := x509.MarshalPKCS8PrivateKey(key)
	p := filepath.Join(t.TempDir(), "app.pem")
	data := append(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk}), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, cert
}

func TestCertificateCredential(t *testing.T) {
	fake := startFake(t)
	path, cert := newCertificateFile(t)
	fake.AddAppCertificate(tenantA, clientA, cert, "Mail.Send")
	cfg := testConfig(fake)
	cfg.Accounts[0].ClientSecret = ""
	cfg.Accounts[0].ClientCertificateFile = path
	b, logs := startBridge(t, fake, cfg)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n")); err != nil {
		t.Fatalf("send with a certificate credential: %v", err)
	}
	if n := b.Accounts()[0].GraphTokens.Requests(); n != 1 {
		t.Errorf("%d token requests", n)
	}
	// Another certificate than the one uploaded: refused, and explained.
	otherPath, _ := newCertificateFile(t)
	cfg2 := testConfig(fake)
	cfg2.Accounts[0].ClientSecret = ""
	cfg2.Accounts[0].ClientCertificateFile = otherPath
	b2, logs2 := startBridge(t, fake, cfg2)
	c2 := dialAuth(t, b2.SMTPAddr(), userA, passwordA)
	_, err := send(c2, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nhi\n"))
	if code, ec := smtpCode(err); code != 451 || ec != (smtp.EnhancedCode{4, 7, 0}) {
		t.Fatalf("wrong certificate: %v", err)
	}
	if !strings.Contains(logs2.String(), "AADSTS700027") || !strings.Contains(logs2.String(), "upload the certificate of client_certificate_file") {
		t.Errorf("the refusal is not explained:\n%s", logs2.String())
	}
	if strings.Contains(logs.String()+logs2.String(), "PRIVATE KEY") {
		t.Error("the log contains the key")
	}
}

func TestSecretExpiryWarning(t *testing.T) {
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		expires time.Time
		want    string
	}{
		{time.Time{}, ""},
		{now.Add(90 * 24 * time.Hour), ""},
		{now.Add(10*24*time.Hour + time.Hour), "expires in 11 days"},
		{now.Add(-time.Hour), "has expired"},
	} {
		a := config.AccountConfig{ClientSecretExpires: tc.expires}
		got := a.SecretExpiryWarning(now)
		if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
			t.Errorf("expires %v: %q, want %q", tc.expires, got, tc.want)
		}
	}
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.Accounts[1].ClientSecretExpires = time.Now().Add(5 * 24 * time.Hour)
	_, logs := startBridge(t, fake, cfg)
	line := findLogLine(t, logs.String(), "the client secret expires in 5 days (client_secret_expires): create a new one under Certificates & secrets before then, or switch to client_certificate_file")
	if !strings.Contains(line, `"level":"warn"`) || !strings.Contains(line, `"account":"scanner"`) {
		t.Errorf("warning line %s", line)
	}
}

// Microsoft out of reach is said at start, once per account, with the
// hosts and ports to open and the proxy key; check's rows say the same.
func TestUnreachableMicrosoftNamesWhatToOpen(t *testing.T) {
	fake := startFake(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close() // nothing listens there now: the connection is refused
	cfg := testConfig(fake)
	cfg.Accounts = cfg.Accounts[:1]
	cfg.Accounts[0].TokenURL = "https://" + closed + "/{tenant}/oauth2/v2.0/token"
	cfg.Accounts[0].GraphURL = "https://" + closed + "/v1.0"
	b, logs := startBridge(t, fake, cfg)
	lines := linesWith(logs.String(), "Microsoft 365 cannot be reached: messages are queued (or answered 451 with the outbox off) until it can")
	if len(lines) != 1 {
		t.Fatalf("%d start-up lines about Microsoft out of reach, want 1:\n%s", len(lines), logs)
	}
	for _, want := range []string{`"account":"tm-master"`, "allow outbound TCP to " + closed + ", " + fake.POP3Addr() + ", " + fake.IMAPAddr(), `[network] proxy`} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("the line lacks %q: %s", want, lines[0])
		}
	}
	found := false
	for _, r := range b.Check(context.Background(), "") {
		if r.Check == "smtp-token" {
			found = true
			if r.OK || !strings.Contains(r.Hint, "allow outbound TCP to "+closed) {
				t.Errorf("check's token row: %+v", r)
			}
		}
	}
	if !found {
		t.Error("check has no smtp-token row")
	}
}

// On a slow link the first sign-in outlasts the start's wait: the bridge
// starts meanwhile and says so, and the sign-in is not cut short (before,
// it was cancelled after 5 s and logged as a failed sign-in): its outcome
// is logged when it comes. The token endpoint is reached through a
// forwarder that holds the connection until the test lets it go.
func TestSlowSignInDoesNotHoldTheStart(t *testing.T) {
	fake := startFake(t)
	tokenURL, err := url.Parse(fake.TokenURL())
	if err != nil {
		t.Fatal(err)
	}
	fakeHost := tokenURL.Host
	release := make(chan struct{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				<-release
				up, err := net.Dial("tcp", fakeHost)
				if err != nil {
					return
				}
				defer up.Close()
				go io.Copy(up, c)
				io.Copy(c, up)
			}()
		}
	}()
	cfg := testConfig(fake)
	cfg.Accounts = cfg.Accounts[:1]
	tokenURL.Host = ln.Addr().String()
	cfg.Accounts[0].TokenURL = strings.ReplaceAll(tokenURL.String(), "%7Btenant%7D", "{tenant}")
	b, logs := startBridgeWith(t, fake, cfg, func(o *bridge.Options) { o.SignInWait = time.Millisecond })
	findLogLine(t, logs.String(), "signing in to Microsoft 365 takes long: starting meanwhile; each account's sign-in is logged when it ends")
	if linesWith(logs.String(), "signed in to Microsoft 365") != nil {
		t.Fatal("signed in before the token endpoint was reached")
	}
	close(release)
	waitFor(t, "the sign-in to be logged", func() bool { return len(linesWith(logs.String(), "signed in to Microsoft 365")) == 1 })
	if err := b.Accounts()[0].GraphTokens.LastError(); err != nil || b.Accounts()[0].GraphTokens.Requests() != 1 {
		t.Errorf("the start-up sign-in: %d requests, last error %v; want one, that succeeded", b.Accounts()[0].GraphTokens.Requests(), err)
	}
}
