package bridge

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/mail"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"golang.org/x/crypto/bcrypt"

	"mailbridge/upstream"
)

// Config is the whole configuration file.
type Config struct {
	// Path is the file the configuration was read from.
	Path string `toml:"-"`

	Log      LogConfig       `toml:"log"`
	SMTP     SMTPConfig      `toml:"smtp"`
	POP3     POP3Config      `toml:"pop3"`
	Outbox   OutboxConfig    `toml:"outbox"`
	Admin    AdminConfig     `toml:"admin"`
	Accounts []AccountConfig `toml:"account"`
}

// LogConfig is the [log] table.
type LogConfig struct {
	Level  string `toml:"level"`  // debug | info | warn | error
	Format string `toml:"format"` // json | console
	// File, if set, receives the log instead of standard error, rotated by
	// size and age (for service mode, where standard error goes nowhere).
	File       string `toml:"file"`
	MaxSizeMB  int    `toml:"max_size_mb"`  // rotate past this size
	MaxBackups int    `toml:"max_backups"`  // rotated files kept
	MaxAgeDays int    `toml:"max_age_days"` // rotated files older than this are removed
}

// SMTPConfig is the [smtp] table: the local SMTP listener.
type SMTPConfig struct {
	Listen          string `toml:"listen"`
	LocalTLS        `toml:",inline"`
	MaxMessageBytes int64    `toml:"max_message_bytes"`
	MaxRecipients   int      `toml:"max_recipients"`
	SendTimeout     Duration `toml:"send_timeout"`     // how long one message may take to reach Graph, retries included
	MaxSessions     int      `toml:"max_sessions"`     // concurrent SMTP sessions
	IdleTimeout     Duration `toml:"idle_timeout"`     // how long a client may stay silent
	ShutdownTimeout Duration `toml:"shutdown_timeout"` // how long a stop waits for messages being received
	// SpoolDir holds messages over 4 MB while they are received and sent;
	// "" is the system's temporary directory.
	SpoolDir string `toml:"spool_dir"`
	// UploadBytesPer5Min paces uploads per mailbox (Graph allows 150 MB per
	// 5 minutes).
	UploadBytesPer5Min int64 `toml:"upload_bytes_per_5min"`
}

// LocalTLS is the TLS the bridge offers its own clients, for those whose
// "Enable SSL" box cannot be unticked: STARTTLS (SMTP) or STLS (POP3) on
// the plain listener, and an implicit-TLS listener.
type LocalTLS struct {
	TLSCert   string `toml:"tls_cert"`   // PEM certificate (chain)
	TLSKey    string `toml:"tls_key"`    // PEM private key
	TLSListen string `toml:"tls_listen"` // implicit TLS, such as 127.0.0.1:465 or :995
	// AllowPlaintextOnNetwork lets the plain listener take a non-loopback
	// address without TLS: passwords then cross the network in clear.
	AllowPlaintextOnNetwork bool `toml:"allow_plaintext_on_network"`
	config                  *tls.Config
}

// TLSConfig is the server TLS configuration, nil when none is set.
func (l *LocalTLS) TLSConfig() *tls.Config { return l.config }

// plaintextAuthAllowed reports whether clients may send passwords on the
// plain listener before TLS: on loopback, or when the administrator said so.
func (l *LocalTLS) plaintextAuthAllowed(listen string) bool {
	host, _, _ := net.SplitHostPort(listen)
	return isLoopbackHost(host) || l.AllowPlaintextOnNetwork
}

// complete loads the certificate and checks the listeners; table is
// "smtp" or "pop3".
func (l *LocalTLS) complete(table, listen, dir string, bad func(key, format string, args ...any)) {
	abs := func(p string) string {
		if p != "" && !filepath.IsAbs(p) && dir != "" {
			return filepath.Join(dir, p)
		}
		return p
	}
	l.TLSCert, l.TLSKey = abs(l.TLSCert), abs(l.TLSKey)
	switch {
	case (l.TLSCert == "") != (l.TLSKey == ""):
		bad(table+".tls_cert", "give both tls_cert and tls_key (`mailbridge gen-cert` makes a pair)")
	case l.TLSCert != "":
		cert, err := tls.LoadX509KeyPair(l.TLSCert, l.TLSKey)
		if err != nil {
			bad(table+".tls_cert", "cannot load the certificate and key: %v", err)
		} else {
			l.config = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		}
	}
	if l.TLSListen != "" {
		if l.TLSCert == "" {
			bad(table+".tls_listen", "needs tls_cert and tls_key")
		}
		if _, _, err := net.SplitHostPort(l.TLSListen); err != nil {
			bad(table+".tls_listen", "%q is not host:port", l.TLSListen)
		}
	}
	if listen == "" {
		return
	}
	host, port, err := net.SplitHostPort(listen)
	switch {
	case err != nil || port == "":
		bad(table+".listen", "%q is not host:port, such as %q", listen, "127.0.0.1:2525")
	case !isLoopbackHost(host) && l.TLSCert == "" && !l.AllowPlaintextOnNetwork:
		bad(table+".listen", "%q is not a loopback address: clients send their passwords, so a network listener needs tls_cert and tls_key (STARTTLS), or allow_plaintext_on_network = true", listen)
	}
}

// POP3Config is the [pop3] table: the local POP3 listener and the Outlook
// service it proxies to.
type POP3Config struct {
	Listen          string `toml:"listen"` // "" turns POP3 off
	LocalTLS        `toml:",inline"`
	Upstream        string   `toml:"upstream"`         // host:port, implicit TLS
	IdleTimeout     Duration `toml:"idle_timeout"`     // how long a client may stay silent
	UpstreamTimeout Duration `toml:"upstream_timeout"` // how long Outlook may stay silent within an answer
	MaxSessions     int      `toml:"max_sessions"`     // concurrent POP3 sessions
}

// OutboxConfig is the [outbox] table: the durable queue between the SMTP
// side and Graph.
type OutboxConfig struct {
	// EnabledSetting: nil means true. With the outbox off, DATA is answered
	// only after Graph took the message.
	EnabledSetting *bool    `toml:"enabled"`
	Enabled        bool     `toml:"-"`
	Dir            string   `toml:"dir"`       // default: "outbox" next to the configuration file
	MaxAge         Duration `toml:"max_age"`   // then a message goes to failed/
	MaxBytes       int64    `toml:"max_bytes"` // disk bound; past it new mail gets 452 4.3.1
	// RatePerSecond bounds Graph requests per account (Microsoft allows
	// 10,000 per 10 minutes per mailbox).
	RatePerSecond float64 `toml:"rate_per_second"`
}

// AdminConfig is the [admin] table: /metrics (Prometheus) and /healthz.
type AdminConfig struct {
	Listen string `toml:"listen"` // "" turns it off; such as 127.0.0.1:9925
}

// AccountConfig is one [[account]] table: a local user and the app
// registration and mailbox it sends through.
type AccountConfig struct {
	Name             string `toml:"name"`
	Username         string `toml:"username"`
	PasswordHash     string `toml:"password_hash"`
	Mailbox          string `toml:"mailbox"`
	TenantID         string `toml:"tenant_id"`
	ClientID         string `toml:"client_id"`
	ClientSecret     string `toml:"client_secret"`
	ClientSecretFile string `toml:"client_secret_file"`
	// ClientCertificateFile is a PEM file with a certificate and its RSA
	// key, uploaded to the app registration: the credential Microsoft
	// recommends over secrets.
	ClientCertificateFile string `toml:"client_certificate_file"`
	// ClientSecretExpires is the secret's expiry date from the portal: the
	// bridge warns 30 days ahead.
	ClientSecretExpires time.Time `toml:"client_secret_expires"`
	certificate         *upstream.ClientCertificate
	AllowedSenders      []string `toml:"allowed_senders"`
	UseAddressFromUser  bool     `toml:"use_address_from_user"`
	// Cloud is "global" (the default), "usgov", "usgovdod" or "china": the
	// defaults of the endpoints below.
	Cloud     string `toml:"cloud"`
	TokenURL  string `toml:"token_url"`
	GraphURL  string `toml:"graph_url"`
	SendScope string `toml:"send_scope"`
	// Protocols the account may use: "smtp", "pop3" or both (the default).
	Protocols   []string `toml:"protocols"`
	POP3Scope   string   `toml:"pop3_scope"`
	POP3Mailbox string   `toml:"pop3_mailbox"` // "" means Mailbox
	// POP3Upstream is Outlook's POP3 service for this account: by default
	// [pop3] upstream, or the national cloud's.
	POP3Upstream string `toml:"pop3_upstream"`
	// LargeMessages sends messages over sendMail's limit as a draft with
	// attachments (needs Mail.ReadWrite); nil means true.
	LargeMessagesSetting *bool `toml:"large_messages"`
	LargeMessages        bool  `toml:"-"`
}

// Uses reports whether the account may use protocol ("smtp" or "pop3").
func (a *AccountConfig) Uses(protocol string) bool { return slices.Contains(a.Protocols, protocol) }

// Credentials returns the account's app registration for the token source.
func (a *AccountConfig) Credentials() upstream.Credentials {
	return upstream.Credentials{TokenURL: a.TokenURL, TenantID: a.TenantID, ClientID: a.ClientID, ClientSecret: a.ClientSecret, Certificate: a.certificate}
}

// Duration is a time.Duration written as a string such as "30s" or "2m".
type Duration struct{ time.Duration }

// UnmarshalText parses a duration such as "90s".
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("not a duration like \"30s\" or \"5m\": %q", b)
	}
	d.Duration = v
	return nil
}

// MarshalText writes the duration as time.Duration.String does.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.Duration.String()), nil }

// Defaults for what the file leaves out.
const (
	DefaultSMTPListen      = "127.0.0.1:2525"
	DefaultPOP3Listen      = "127.0.0.1:1110"
	DefaultMaxMessageBytes = 35 << 20
	// DefaultMaxRecipients is Exchange Online's default recipient limit.
	DefaultMaxRecipients = 500
)

// DefaultConfig returns a configuration with every default applied and no
// accounts.
func DefaultConfig() *Config {
	return &Config{
		Log: LogConfig{Level: "info", Format: "json", MaxSizeMB: 50, MaxBackups: 10, MaxAgeDays: 30},
		SMTP: SMTPConfig{
			Listen:             DefaultSMTPListen,
			MaxMessageBytes:    DefaultMaxMessageBytes,
			MaxRecipients:      DefaultMaxRecipients,
			SendTimeout:        Duration{60 * time.Second},
			IdleTimeout:        Duration{5 * time.Minute},
			ShutdownTimeout:    Duration{30 * time.Second},
			UploadBytesPer5Min: 150 << 20,
			MaxSessions:        100,
		},
		Outbox: OutboxConfig{
			MaxAge:        Duration{72 * time.Hour},
			MaxBytes:      1 << 30,
			RatePerSecond: 16,
		},
		POP3: POP3Config{
			Listen:   DefaultPOP3Listen,
			Upstream: upstream.DefaultPOP3Addr,
			// RFC 1939 §3: an autologout timer of at least 10 minutes.
			IdleTimeout:     Duration{10 * time.Minute},
			UpstreamTimeout: Duration{2 * time.Minute},
			MaxSessions:     100,
		},
	}
}

// LoadConfig reads, completes and validates the configuration file at path.
// Every problem is reported, each naming the file and the key.
func LoadConfig(path string) (*Config, error) {
	cfg := DefaultConfig()
	md, err := toml.DecodeFile(path, cfg)
	if err != nil {
		var perr toml.ParseError
		if errors.As(err, &perr) {
			if perr.LastKey != "" {
				return nil, fmt.Errorf("%s: line %d: %s: %s", path, perr.Position.Line, perr.LastKey, perr.Message)
			}
			return nil, fmt.Errorf("%s: line %d: %s", path, perr.Position.Line, perr.Message)
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	cfg.Path = path
	var errs []error
	for _, key := range md.Undecoded() {
		errs = append(errs, fmt.Errorf("%s: %s: unknown key (misspelt, or in the wrong table?)", path, key))
	}
	if err := cfg.Complete(filepath.Dir(path)); err != nil {
		errs = append(errs, err)
	}
	return cfg, errors.Join(errs...)
}

// Complete applies per-account defaults, reads secret files (relative to
// dir) and validates the configuration, returning every problem at once.
func (c *Config) Complete(dir string) error {
	var errs []error
	bad := func(key, format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		if c.Path != "" {
			errs = append(errs, fmt.Errorf("%s: %s: %s", c.Path, key, msg))
		} else {
			errs = append(errs, fmt.Errorf("%s: %s", key, msg))
		}
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "must be debug, info, warn or error, not %q", c.Log.Level)
	}
	switch c.Log.Format {
	case "json", "console":
	default:
		bad("log.format", "must be json or console, not %q", c.Log.Format)
	}
	if c.Log.File != "" {
		if !filepath.IsAbs(c.Log.File) && dir != "" {
			c.Log.File = filepath.Join(dir, c.Log.File)
		}
		if c.Log.MaxSizeMB <= 0 || c.Log.MaxBackups < 0 || c.Log.MaxAgeDays < 0 {
			bad("log.max_size_mb", "max_size_mb must be positive, max_backups and max_age_days not negative")
		}
	}
	c.SMTP.LocalTLS.complete("smtp", c.SMTP.Listen, dir, bad)
	if c.SMTP.MaxMessageBytes <= 0 {
		bad("smtp.max_message_bytes", "must be a positive number of bytes")
	}
	if c.SMTP.UploadBytesPer5Min <= 0 {
		bad("smtp.upload_bytes_per_5min", "must be a positive number of bytes")
	}
	if c.SMTP.SpoolDir != "" {
		if st, err := os.Stat(c.SMTP.SpoolDir); err != nil || !st.IsDir() {
			bad("smtp.spool_dir", "%q is not a directory", c.SMTP.SpoolDir)
		}
	}
	if c.SMTP.MaxSessions <= 0 {
		bad("smtp.max_sessions", "must be positive")
	}
	if c.SMTP.MaxRecipients <= 0 {
		bad("smtp.max_recipients", "must be positive")
	}
	for key, d := range map[string]Duration{"smtp.send_timeout": c.SMTP.SendTimeout, "smtp.idle_timeout": c.SMTP.IdleTimeout, "smtp.shutdown_timeout": c.SMTP.ShutdownTimeout} {
		if d.Duration <= 0 {
			bad(key, "must be a positive duration such as \"30s\"")
		}
	}
	if c.POP3.Listen != "" {
		c.POP3.LocalTLS.complete("pop3", c.POP3.Listen, dir, bad)
		if _, port, err := net.SplitHostPort(c.POP3.Upstream); err != nil || port == "" {
			bad("pop3.upstream", "%q is not host:port, such as %q", c.POP3.Upstream, upstream.DefaultPOP3Addr)
		}
		for key, d := range map[string]Duration{"pop3.idle_timeout": c.POP3.IdleTimeout, "pop3.upstream_timeout": c.POP3.UpstreamTimeout} {
			if d.Duration <= 0 {
				bad(key, "must be a positive duration such as \"30s\"")
			}
		}
		if c.POP3.MaxSessions <= 0 {
			bad("pop3.max_sessions", "must be positive")
		}
	}
	c.Outbox.Enabled = c.Outbox.EnabledSetting == nil || *c.Outbox.EnabledSetting
	if c.Outbox.Enabled {
		switch {
		case c.Outbox.Dir == "" && dir == "":
			bad("outbox.dir", "required when the configuration has no file to be next to")
		case c.Outbox.Dir == "":
			c.Outbox.Dir = filepath.Join(dir, "outbox")
		case !filepath.IsAbs(c.Outbox.Dir) && dir != "":
			c.Outbox.Dir = filepath.Join(dir, c.Outbox.Dir)
		}
		if c.Outbox.MaxAge.Duration <= 0 {
			bad("outbox.max_age", "must be a positive duration such as \"72h\"")
		}
		if c.Outbox.MaxBytes <= 0 {
			bad("outbox.max_bytes", "must be a positive number of bytes")
		}
		if c.Outbox.RatePerSecond <= 0 {
			bad("outbox.rate_per_second", "must be positive")
		}
	}
	if c.Admin.Listen != "" {
		if _, port, err := net.SplitHostPort(c.Admin.Listen); err != nil || port == "" {
			bad("admin.listen", "%q is not host:port, such as \"127.0.0.1:9925\"", c.Admin.Listen)
		}
	}
	if len(c.Accounts) == 0 {
		bad("account", "no [[account]] table: add one per local user")
	}
	names, users := map[string]bool{}, map[string]bool{}
	for i := range c.Accounts {
		a := &c.Accounts[i]
		key := func(k string) string {
			if a.Name != "" {
				return fmt.Sprintf("account[%d] (%s).%s", i+1, a.Name, k)
			}
			return fmt.Sprintf("account[%d].%s", i+1, k)
		}
		if a.Name == "" {
			bad(key("name"), "required: a label for the logs, such as \"tm-master\"")
		} else if names[a.Name] {
			bad(key("name"), "%q is used by another account", a.Name)
		}
		names[a.Name] = true
		if a.Username == "" {
			bad(key("username"), "required: the user name the legacy client types")
		} else if users[strings.ToLower(a.Username)] {
			bad(key("username"), "%q is used by another account", a.Username)
		}
		users[strings.ToLower(a.Username)] = true
		if a.PasswordHash == "" {
			bad(key("password_hash"), "required: run `mailbridge hash-password` and paste its output")
		} else if _, err := bcrypt.Cost([]byte(a.PasswordHash)); err != nil {
			bad(key("password_hash"), "not a bcrypt hash (it should start with $2a$ or $2b$): run `mailbridge hash-password`")
		}
		if a.Mailbox == "" {
			bad(key("mailbox"), "required: the mailbox address Graph sends from (the \"User Name\" of the OAuth2 tab)")
		} else if !isAddress(a.Mailbox) {
			bad(key("mailbox"), "%q is not an email address", a.Mailbox)
		}
		if a.TenantID == "" {
			bad(key("tenant_id"), "required: Directory (tenant) ID from the app registration's Overview page")
		}
		if a.ClientID == "" {
			bad(key("client_id"), "required: Application (client) ID from the app registration's Overview page")
		}
		credentials := 0
		for _, set := range []bool{a.ClientSecret != "", a.ClientSecretFile != "", a.ClientCertificateFile != ""} {
			if set {
				credentials++
			}
		}
		abs := func(p string) string {
			if !filepath.IsAbs(p) {
				return filepath.Join(dir, p)
			}
			return p
		}
		switch {
		case credentials > 1:
			bad(key("client_secret"), "give one of client_secret, client_secret_file and client_certificate_file")
		case a.ClientSecretFile != "":
			b, err := os.ReadFile(abs(a.ClientSecretFile))
			if err != nil {
				bad(key("client_secret_file"), "cannot read it: %v", err)
			} else if a.ClientSecret = strings.TrimSpace(string(b)); a.ClientSecret == "" {
				bad(key("client_secret_file"), "%s is empty", abs(a.ClientSecretFile))
			}
		case a.ClientCertificateFile != "":
			cc, err := upstream.LoadClientCertificate(abs(a.ClientCertificateFile))
			if err != nil {
				bad(key("client_certificate_file"), "%v", err)
			}
			a.certificate = cc
		case a.ClientSecret == "":
			bad(key("client_secret"), "required (or client_secret_file, or client_certificate_file): the secret's Value from Certificates & secrets")
		}
		for _, s := range a.AllowedSenders {
			if _, err := parseSenderPattern(s); err != nil {
				bad(key("allowed_senders"), "%v", err)
			}
		}
		if a.Cloud == "" {
			a.Cloud = "global"
		}
		cloud, ok := upstream.Clouds[a.Cloud]
		if !ok {
			bad(key("cloud"), "%q is not global, usgov, usgovdod or china", a.Cloud)
			cloud = upstream.Clouds["global"]
		}
		if a.TokenURL == "" {
			a.TokenURL = cloud.TokenURL
		}
		if a.GraphURL == "" {
			a.GraphURL = cloud.GraphURL
		}
		if a.SendScope == "" {
			a.SendScope = cloud.GraphScope
		}
		if a.POP3Upstream == "" {
			a.POP3Upstream = c.POP3.Upstream
			if a.Cloud != "global" {
				a.POP3Upstream = cloud.POP3Addr
			}
		}
		for k, u := range map[string]string{"token_url": a.TokenURL, "graph_url": a.GraphURL} {
			if err := checkUpstreamURL(u); err != nil {
				bad(key(k), "%v", err)
			}
		}
		a.LargeMessages = a.LargeMessagesSetting == nil || *a.LargeMessagesSetting
		if a.POP3Scope == "" {
			a.POP3Scope = cloud.OutlookScope
		}
		if a.POP3Mailbox == "" {
			a.POP3Mailbox = a.Mailbox
		} else if !isAddress(a.POP3Mailbox) {
			bad(key("pop3_mailbox"), "%q is not an email address", a.POP3Mailbox)
		}
		if a.Protocols == nil {
			a.Protocols = []string{"smtp", "pop3"}
		}
		for _, p := range a.Protocols {
			if p != "smtp" && p != "pop3" {
				bad(key("protocols"), "%q is not \"smtp\" or \"pop3\"", p)
			}
		}
		if len(a.Protocols) == 0 {
			bad(key("protocols"), "empty: give \"smtp\", \"pop3\" or both")
		}
		if !strings.HasSuffix(a.POP3Scope, "/.default") {
			bad(key("pop3_scope"), "must end in /.default for the client-credentials flow, such as %q", upstream.OutlookScope)
		}
		if !strings.HasSuffix(a.SendScope, "/.default") {
			bad(key("send_scope"), "must end in /.default for the client-credentials flow, such as %q", upstream.GraphScope)
		}
	}
	return errors.Join(errs...)
}

func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkUpstreamURL requires https, except for a loopback host (tests and
// the demo's fake Microsoft 365).
func checkUpstreamURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%q is not a URL", raw)
	}
	if u.Scheme == "https" || (u.Scheme == "http" && isLoopbackHost(u.Hostname())) {
		return nil
	}
	return fmt.Errorf("%q must use https", raw)
}

func isAddress(s string) bool {
	a, err := mail.ParseAddress(s)
	return err == nil && a.Name == "" && strings.Contains(a.Address, "@")
}
