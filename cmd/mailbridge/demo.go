package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/crypto/bcrypt"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/upstream/m365fake"
)

// The demo's fake tenant.
const (
	demoTenant   = "11111111-2222-3333-4444-555555555555"
	demoClient   = "66666666-7777-8888-9999-000000000000"
	demoMailbox  = "demo@example.com"
	demoPassword = "demo"
	// demoRefusedDomain is a domain the demo's fake Graph refuses, to show
	// a non-delivery report.
	demoRefusedDomain = "refused.example"
	// demoDrainTime bounds how long Ctrl+C waits for the outbox to empty.
	demoDrainTime = 30 * time.Second
)

// demo runs the bridge against a fake Microsoft 365 in this process, so a
// new user sees the whole path work on a machine with no network.
func demo(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("smtp", config.DefaultSMTPListen, "SMTP listen address")
	pop3Listen := fs.String("pop3", config.DefaultPOP3Listen, "POP3 listen address")
	imapListen := fs.String("imap", config.DefaultIMAPListen, "IMAP listen address")
	adminListen := fs.String("admin", "127.0.0.1:9925", "status page, /metrics and /healthz listen address (\"\" = off)")
	format := fs.String("log-format", "console", "log format: json or console")
	outboxDir := fs.String("outbox", filepath.Join(os.TempDir(), "mailbridge-demo-outbox"), "outbox directory, kept between runs")
	describe(fs)
	if err := fs.Parse(args); err != nil {
		return usageStatus(err)
	}
	logCfg := config.LogConfig{Level: "info", Format: *format}
	log := bridge.NewLogger(stderr, logCfg)

	fake, err := m365fake.Start()
	if err != nil {
		log.Error().Err(err).Msg("cannot start the fake Microsoft 365")
		return 1
	}
	defer fake.Close()
	secret := "demo-secret"
	fake.AddTenant(demoTenant)
	fake.AddApp(demoTenant, demoClient, secret, "Mail.Send", "Mail.ReadWrite", "POP.AccessAsApp", "IMAP.AccessAsApp")
	fake.RefuseRecipients(demoRefusedDomain)
	fake.AddMailbox(demoTenant, demoMailbox)
	fake.GrantMailboxAccess(demoTenant, demoClient, demoMailbox)
	fake.AddMessage(demoMailbox, []byte("From: Microsoft 365 <no-reply@example.com>\r\nTo: demo@example.com\r\nSubject: Welcome to the mailbridge demo\r\n\r\nThis message waits in the fake mailbox; fetch it through the bridge's POP3 side.\r\n"))
	pop3Upstream, err := fake.StartPOP3()
	if err != nil {
		log.Error().Err(err).Msg("cannot start the fake Outlook POP3 service")
		return 1
	}
	fake.OnSend(func(m m365fake.SentMessage) {
		log.Info().Str("component", "fake-graph").Str("user", m.User).Str("from", m.From).
			Strs("recipients", m.Recipients).Str("subject", m.Subject).Int("bytes", len(m.MIME)).
			Str("request_id", m.RequestID).Msg("fake Graph received a message")
	})

	hash, err := bcrypt.GenerateFromPassword([]byte(demoPassword), bcrypt.MinCost)
	if err != nil {
		log.Error().Err(err).Msg("cannot hash the demo password")
		return 1
	}
	cfg := config.Default()
	cfg.Log = logCfg
	cfg.SMTP.Listen = *listen
	cfg.POP3.Listen = *pop3Listen
	imapUpstream, err := fake.StartIMAP()
	if err != nil {
		log.Error().Err(err).Msg("cannot start the fake Outlook IMAP service")
		return 1
	}
	cfg.IMAP.Listen, cfg.IMAP.Upstream = *imapListen, imapUpstream
	cfg.POP3.Upstream = pop3Upstream
	// The outbox is kept between runs, in a directory the banner names:
	// what a client was told was queued is never thrown away.
	cfg.Outbox.Dir = *outboxDir
	cfg.Admin.Listen, cfg.Admin.Username, cfg.Admin.PasswordHash = *adminListen, "demo", string(hash)
	cfg.Accounts = []config.AccountConfig{{
		Name: "demo", Username: "demo", PasswordHash: string(hash), Mailbox: demoMailbox,
		TenantID: demoTenant, ClientID: demoClient, ClientSecret: secret,
		TokenURL: fake.TokenURL(), GraphURL: fake.GraphURL(), Protocols: []string{"smtp", "pop3", "imap"},
	}}
	if err := cfg.Complete(""); err != nil {
		log.Error().Err(err).Msg("demo configuration")
		return 1
	}
	b, err := bridge.New(cfg, bridge.Options{Logger: log, RootCAs: fake.CertPool(), Version: versionString() + " (demo)"})
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	if err := b.Start(); err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	addr, popAddr := b.SMTPAddr(), b.POP3Addr()
	fmt.Fprintf(stdout, `mailbridge demo: a fake Microsoft 365 runs inside this process; nothing leaves this machine.
SMTP server %s, user "demo", password %q, sender %s.
POP3 server %s, same user, reading the mailbox %[3]s; IMAP server %[7]s. Ctrl+C stops.
Outbox: %[5]s (kept between runs).
Status page: %[8]s (same user and password).

Send a message with curl (to the demo mailbox itself, so that POP3 finds it):
  printf 'From: %[3]s\r\nTo: %[3]s\r\nSubject: hello\r\n\r\nHello through the bridge.\r\n' |
    curl smtp://%[1]s --user demo:demo --mail-from %[3]s --mail-rcpt %[3]s -T -
or with swaks:
  swaks --server %[1]s --auth LOGIN --auth-user demo --auth-password demo --from %[3]s --to %[3]s
Then list and read the mailbox through POP3:
  curl pop3://%[4]s/ --user demo:demo
  curl pop3://%[4]s/1 --user demo:demo
or through IMAP (server %[7]s):
  curl 'imap://%[7]s/INBOX;UID=1' --user demo:demo
A recipient at %[6]s is refused by the fake Graph: the bridge then sends a
non-delivery report to the sender, which appears in the demo mailbox (POP3):
  printf 'From: %[3]s\r\nTo: nobody@%[6]s\r\nSubject: bounce me\r\n\r\nx\r\n' |
    curl smtp://%[1]s --user demo:demo --mail-from %[3]s --mail-rcpt nobody@%[6]s -T -

`, addr, demoPassword, demoMailbox, popAddr, *outboxDir, demoRefusedDomain, b.IMAPAddr(), statusURL(b.AdminAddr()))
	<-ctx.Done()
	// Let the outbox drain before the fake Microsoft 365 goes away with
	// this process, within a bound.
	deadline := time.Now().Add(demoDrainTime)
	for n, _ := b.QueueDepth(); n > 0 && time.Now().Before(deadline); n, _ = b.QueueDepth() {
		time.Sleep(100 * time.Millisecond)
	}
	if n, _ := b.QueueDepth(); n > 0 {
		log.Warn().Int("queued", n).Str("dir", *outboxDir).Msg("demo stopping with messages still queued: they stay in the outbox and go at the next run")
	}
	sctx, cancel := context.WithTimeout(context.Background(), cfg.SMTP.ShutdownTimeout.Duration)
	defer cancel()
	b.Shutdown(sctx)
	return 0
}

// statusURL is the status page's address, or says it is off.
func statusURL(addr string) string {
	if addr == "" {
		return "off (-admin \"\")"
	}
	return "http://" + addr + "/"
}
