package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"golang.org/x/crypto/bcrypt"

	"mailbridge/bridge"
	"mailbridge/upstream/m365fake"
)

// The demo's fake tenant.
const (
	demoTenant   = "11111111-2222-3333-4444-555555555555"
	demoClient   = "66666666-7777-8888-9999-000000000000"
	demoMailbox  = "demo@example.com"
	demoPassword = "demo"
)

// demo runs the bridge against a fake Microsoft 365 in this process, so a
// new user sees the whole path work on a machine with no network.
func demo(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("smtp", bridge.DefaultSMTPListen, "SMTP listen address")
	format := fs.String("log-format", "console", "log format: json or console")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	logCfg := bridge.LogConfig{Level: "info", Format: *format}
	log := bridge.NewLogger(stderr, logCfg)

	fake, err := m365fake.Start()
	if err != nil {
		log.Error().Err(err).Msg("cannot start the fake Microsoft 365")
		return 1
	}
	defer fake.Close()
	secret := "demo-secret"
	fake.AddTenant(demoTenant)
	fake.AddApp(demoTenant, demoClient, secret, "Mail.Send")
	fake.AddMailbox(demoTenant, demoMailbox)
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
	cfg := bridge.DefaultConfig()
	cfg.Log = logCfg
	cfg.SMTP.Listen = *listen
	cfg.Accounts = []bridge.AccountConfig{{
		Name: "demo", Username: "demo", PasswordHash: string(hash), Mailbox: demoMailbox,
		TenantID: demoTenant, ClientID: demoClient, ClientSecret: secret,
		TokenURL: fake.TokenURL(), GraphURL: fake.GraphURL(),
	}}
	if err := cfg.Complete(""); err != nil {
		log.Error().Err(err).Msg("demo configuration")
		return 1
	}
	b, err := bridge.New(cfg, bridge.Options{Logger: log, RootCAs: fake.CertPool()})
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	if err := b.Start(); err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	addr := b.SMTPAddr()
	fmt.Fprintf(stdout, `mailbridge demo: a fake Microsoft 365 runs inside this process; nothing leaves this machine.
SMTP server %s, user %q, password %q, sender %s. Ctrl+C stops.

Send a message with curl:
  printf 'From: %[4]s\r\nTo: someone@example.org\r\nSubject: hello\r\n\r\nHello through the bridge.\r\n' |
    curl smtp://%[1]s --user demo:demo --mail-from %[4]s --mail-rcpt someone@example.org -T -
or with swaks:
  swaks --server %[1]s --auth LOGIN --auth-user demo --auth-password demo --from %[4]s --to someone@example.org

`, addr, "demo", demoPassword, demoMailbox)
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), cfg.SMTP.ShutdownTimeout.Duration)
	defer cancel()
	b.Shutdown(sctx)
	return 0
}
