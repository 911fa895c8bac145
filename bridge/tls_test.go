package bridge_test

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"mailbridge/bridge/config"
	"mailbridge/bridge/localtls"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// localTLS writes a certificate from GenerateSelfSigned and returns a
// config using it on every listener, and a client TLS config trusting it.
func localTLS(t *testing.T, cfg *config.Config) *tls.Config {
	t.Helper()
	certPEM, keyPEM, err := localtls.GenerateSelfSigned([]string{"localhost", "127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "mailbridge.crt"), filepath.Join(dir, "mailbridge.key")
	os.WriteFile(cert, certPEM, 0o600)
	os.WriteFile(key, keyPEM, 0o600)
	for _, lt := range []*config.LocalTLS{&cfg.SMTP.LocalTLS, &cfg.POP3.LocalTLS, &cfg.IMAP.LocalTLS} {
		lt.TLSCert, lt.TLSKey, lt.TLSListen = cert, key, "127.0.0.1:0"
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	return &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
}

func TestSMTPStartTLSAndImplicitTLS(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	clientTLS := localTLS(t, cfg)
	b, _ := startBridge(t, fake, cfg)
	msg := crlf("From: orders@example.com\nTo: x@example.org\n\nover TLS\n")

	c, err := smtp.Dial(b.SMTPAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("test"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := c.Extension("STARTTLS"); !ok {
		t.Fatal("STARTTLS not offered")
	}
	c.Close()

	for name, dial := range map[string]func() (*smtp.Client, error){
		"STARTTLS":     func() (*smtp.Client, error) { return smtp.DialStartTLS(b.SMTPAddr(), clientTLS) },
		"implicit TLS": func() (*smtp.Client, error) { return smtp.DialTLS(b.SMTPTLSAddr(), clientTLS) },
	} {
		c, err := dial()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := c.Auth(sasl.NewLoginClient(userA, passwordA)); err != nil {
			t.Fatalf("%s: AUTH: %v", name, err)
		}
		if st, ok := c.TLSConnectionState(); !ok || st.Version < tls.VersionTLS12 {
			t.Fatalf("%s: not TLS 1.2+", name)
		}
		if ok, _ := c.Extension("STARTTLS"); ok {
			t.Errorf("%s: STARTTLS offered inside TLS", name)
		}
		if _, err := send(c, mailboxA, []string{"x@example.org"}, msg); err != nil {
			t.Fatalf("%s: send: %v", name, err)
		}
		c.Close()
	}
	if n := len(fake.Sent()); n != 2 {
		t.Errorf("Graph received %d messages, want 2", n)
	}
}

func TestPOP3STLSAndImplicitTLS(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	clientTLS := localTLS(t, cfg)
	b, _ := startBridge(t, fake, cfg)
	fake.AddMessage(mailboxA, crlf("Subject: tls\n\nx\n"))

	p := dialPOP3(t, b.POP3Addr())
	p.cmd("CAPA")
	var caps []string
	for l := p.line(); l != "."; l = p.line() {
		caps = append(caps, l)
	}
	if !strings.Contains(strings.Join(caps, " "), "STLS") {
		t.Fatalf("CAPA %v lacks STLS", caps)
	}
	if l := p.cmd("STLS"); !strings.HasPrefix(l, "+OK") {
		t.Fatalf("STLS: %q", l)
	}
	tc := tls.Client(p.conn, clientTLS)
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	p = newPOP3Client(t, tc)
	p.login(userA, passwordA)
	if l := p.cmd("STAT"); !strings.HasPrefix(l, "+OK 1 ") {
		t.Errorf("STAT over STLS: %q", l)
	}
	if l := p.cmd("STLS"); !strings.HasPrefix(l, "-ERR") {
		t.Errorf("STLS twice: %q", l)
	}

	conn, err := tls.Dial("tcp", b.POP3TLSAddr(), clientTLS)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	p2 := &popClient{t: t, conn: conn, r: bufio.NewReader(conn)}
	if l := p2.line(); !strings.HasPrefix(l, "+OK") {
		t.Fatalf("greeting over implicit TLS: %q", l)
	}
	p2.login(userA, passwordA)
	if got := string(p2.retr(1)); got != string(crlf("Subject: tls\n\nx\n")) {
		t.Errorf("RETR over implicit TLS: %q", got)
	}
}

func TestNetworkListenersNeedTLS(t *testing.T) {
	base := func() *config.Config {
		fake := startFake(t)
		cfg := testConfig(fake)
		cfg.SMTP.Listen = "0.0.0.0:2525"
		return cfg
	}
	cfg := base()
	if err := cfg.Complete(""); err == nil || !strings.Contains(err.Error(), `smtp.listen: "0.0.0.0:2525" is not a loopback address`) {
		t.Errorf("plaintext on the network: %v", err)
	}
	cfg = base()
	cfg.SMTP.AllowPlaintextOnNetwork = true
	if err := cfg.Complete(""); err != nil {
		t.Errorf("with allow_plaintext_on_network: %v", err)
	}
	cfg = base()
	localTLS(t, cfg)
	if err := cfg.Complete(""); err != nil {
		t.Errorf("with TLS: %v", err)
	}
	if cfg.SMTP.PlaintextAuthAllowed(cfg.SMTP.Listen) {
		t.Error("AUTH without TLS allowed on a network listener")
	}
	cfg = base()
	cfg.POP3.TLSListen = "127.0.0.1:1995"
	cfg.SMTP.AllowPlaintextOnNetwork = true
	if err := cfg.Complete(""); err == nil || !strings.Contains(err.Error(), "pop3.tls_listen: needs tls_cert and tls_key") {
		t.Errorf("tls_listen without a certificate: %v", err)
	}
}
