// Package config is mailbridge's configuration file: its TOML types, Load
// (decode, defaults, validation that needs no file but the configuration
// itself) and Resolve (what the configuration refers to: secret files,
// certificates, the spool directory, the sender patterns).
//
// It may import the upstream package and bridge/mime, nothing else of the
// bridge. Every problem is reported at once, each naming the file and key.
package config

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"golang.org/x/crypto/bcrypt"

	"mailbridge/bridge/mime"
	"mailbridge/upstream"
)

// Config is the whole configuration file.
type Config struct {
	// Path is the file the configuration was read from.
	Path string `toml:"-"`
	dir  string // what relative paths are relative to

	Log      LogConfig       `toml:"log"`
	SMTP     SMTPConfig      `toml:"smtp"`
	POP3     ProxyConfig     `toml:"pop3"`
	IMAP     ProxyConfig     `toml:"imap"`
	Outbox   OutboxConfig    `toml:"outbox"`
	Admin    AdminConfig     `toml:"admin"`
	Network  NetworkConfig   `toml:"network"`
	Accounts []AccountConfig `toml:"account"`

	// ListenersOff names, for each protocol ("smtp", "pop3", "imap")
	// whose listener stays closed, the reason; Complete fills it. A
	// protocol listens when its table sets listen, or when an account
	// uses it.
	ListenersOff map[string]string `toml:"-"`
	listenGiven  map[string]bool   // listen set in the file (Load)
	listenDrop   map[string]bool   // listen emptied by Complete for want of a user
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
	SendTimeout     Duration `toml:"send_timeout"` // how long one message may take to reach Graph, retries included
	// LookupWindow is how long a message whose send had an unknown outcome
	// (Graph's answer lost) is looked for in Sent Items before it is sent
	// again.
	LookupWindow    Duration `toml:"lookup_window"`
	MaxSessions     int      `toml:"max_sessions"`     // concurrent SMTP sessions
	IdleTimeout     Duration `toml:"idle_timeout"`     // how long a client may stay silent
	LoginTimeout    Duration `toml:"login_timeout"`    // how long a client may take to log in
	ShutdownTimeout Duration `toml:"shutdown_timeout"` // how long a stop waits for messages being received
	// SpoolDir holds messages over 4 MB while they are received and sent;
	// "" is the system's temporary directory.
	SpoolDir string `toml:"spool_dir"`
	// UploadBytesPer5Min paces uploads per mailbox (Graph allows 150 MB per
	// 5 minutes).
	UploadBytesPer5Min int64 `toml:"upload_bytes_per_5min"`
	// MaxGraphRequestsPerMessage bounds the Graph requests one message may
	// take (a draft, its attachments, its send); a message that would take
	// more is refused at DATA. Microsoft allows 10,000 per 10 minutes per
	// mailbox.
	MaxGraphRequestsPerMessage int `toml:"max_graph_requests_per_message"`
}

// LocalTLS is the TLS the bridge offers its own clients, for those whose
// "Enable SSL" box cannot be unticked: STARTTLS (SMTP) or STLS (POP3) on
// the plain listener, and an implicit-TLS listener.
type LocalTLS struct {
	TLSCert   string `toml:"tls_cert"`   // PEM certificate (chain)
	TLSKey    string `toml:"tls_key"`    // PEM private key
	TLSListen string `toml:"tls_listen"` // implicit TLS, such as 127.0.0.1:465 or :995
	// TLSMinVersion is the oldest TLS version offered: "1.2" by default;
	// "1.0" or "1.1" for legacy clients that know nothing newer.
	TLSMinVersion string `toml:"tls_min_version"`
	// AllowPlaintextOnNetwork lets the plain listener take a non-loopback
	// address without TLS: passwords then cross the network in clear.
	AllowPlaintextOnNetwork bool `toml:"allow_plaintext_on_network"`
}

// PlaintextAuthAllowed reports whether clients may send passwords on the
// plain listener before TLS: on loopback, or when the administrator said so.
func (l *LocalTLS) PlaintextAuthAllowed(listen string) bool {
	host, _, _ := net.SplitHostPort(listen)
	return IsLoopbackHost(host) || l.AllowPlaintextOnNetwork
}

// TLSVersions maps the tls_min_version values to Go's constants.
var TLSVersions = map[string]uint16{"1.0": tls.VersionTLS10, "1.1": tls.VersionTLS11, "1.2": tls.VersionTLS12, "1.3": tls.VersionTLS13}

// validate checks the listeners and makes the certificate paths absolute;
// table is "smtp" or "pop3".
func (l *LocalTLS) validate(table, listen, dir string, bad func(key, format string, args ...any)) {
	l.TLSCert, l.TLSKey = absPath(dir, l.TLSCert), absPath(dir, l.TLSKey)
	if (l.TLSCert == "") != (l.TLSKey == "") {
		bad(table+".tls_cert", "give both tls_cert and tls_key (`mailbridge gen-cert` makes a pair)")
	}
	if l.TLSMinVersion == "" {
		l.TLSMinVersion = "1.2"
	}
	if _, ok := TLSVersions[l.TLSMinVersion]; !ok {
		bad(table+".tls_min_version", "%q is not \"1.0\", \"1.1\", \"1.2\" or \"1.3\"", l.TLSMinVersion)
	}
	if l.TLSListen != "" {
		if l.TLSCert == "" {
			bad(table+".tls_listen", "needs tls_cert and tls_key")
		}
		checkListen(table+".tls_listen", l.TLSListen, bad)
	}
	if listen == "" {
		return
	}
	host, _, _ := net.SplitHostPort(listen)
	if checkListen(table+".listen", listen, bad) && !IsLoopbackHost(host) && l.TLSCert == "" && !l.AllowPlaintextOnNetwork {
		bad(table+".listen", "%q is not a loopback address: clients send their passwords, so a network listener needs tls_cert and tls_key (STARTTLS), or allow_plaintext_on_network = true", listen)
	}
}

// checkListen reports a listen address that is not host:port with a port
// from 0 to 65535, and returns whether it is well-formed.
func checkListen(key, addr string, bad func(key, format string, args ...any)) bool {
	_, port, err := net.SplitHostPort(addr)
	n, perr := strconv.Atoi(port)
	if err != nil || port == "" || perr != nil || n < 0 || n > 65535 {
		bad(key, "%q is not host:port with a port up to 65535, such as %q", addr, "127.0.0.1:2525")
		return false
	}
	return true
}

func absPath(dir, p string) string {
	if p != "" && !filepath.IsAbs(p) && dir != "" {
		return filepath.Join(dir, p)
	}
	return p
}

// ProxyConfig is the [pop3] or the [imap] table: the local listener and
// the Outlook service it proxies to.
type ProxyConfig struct {
	Listen          string `toml:"listen"` // "" turns the protocol off
	LocalTLS        `toml:",inline"`
	Upstream        string   `toml:"upstream"`         // host:port, implicit TLS
	IdleTimeout     Duration `toml:"idle_timeout"`     // how long a client may stay silent
	LoginTimeout    Duration `toml:"login_timeout"`    // how long a client may take to log in
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
	// BounceSetting: nil means true. A message that fails for good comes
	// back to its sender as a non-delivery report (RFC 3464).
	BounceSetting *bool `toml:"bounce"`
	Bounce        bool  `toml:"-"`
	// Notify are addresses that get a copy of every non-delivery report.
	Notify []string `toml:"notify"`
}

// NetworkConfig is the [network] table: the proxy every connection to
// Microsoft goes through.
type NetworkConfig struct {
	// Proxy is http://, https:// or socks5://host:port; "" means the
	// environment's HTTPS_PROXY (for HTTPS) and ALL_PROXY.
	Proxy             string   `toml:"proxy"`
	ProxyUser         string   `toml:"proxy_user"`
	ProxyPasswordFile string   `toml:"proxy_password_file"`
	NoProxy           []string `toml:"no_proxy"` // hosts reached directly
}

// AdminConfig is the [admin] table: /metrics (Prometheus), /healthz and
// the status page at /.
type AdminConfig struct {
	Listen string `toml:"listen"` // "" turns it off; such as 127.0.0.1:9925
	// Username and PasswordHash (bcrypt, from `mailbridge hash-password`)
	// are the status page's HTTP Basic login; without a hash the page is
	// off. Username defaults to "admin", and Listen, with a hash, to
	// DefaultAdminListen.
	Username     string `toml:"username"`
	PasswordHash string `toml:"password_hash"`
	// AllowNetwork lets listen take a non-loopback address: /metrics and
	// /healthz are then open to the network.
	AllowNetwork bool `toml:"admin_allow_network"`
	// IdleTimeout closes a keep-alive connection silent this long.
	IdleTimeout Duration `toml:"idle_timeout"`
	// MaxQueueAge: /healthz turns 503 when the oldest queued message is
	// older.
	MaxQueueAge Duration `toml:"max_queue_age"`
	// FailedWindow: /healthz turns 503 while failed/ holds a message that
	// failed within it.
	FailedWindow Duration `toml:"failed_window"`
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
	AllowedSenders      []string  `toml:"allowed_senders"`
	UseAddressFromUser  bool      `toml:"use_address_from_user"`
	// Cloud is "global" (the default), "usgov", "usgovdod" or "china": the
	// defaults of the endpoints below.
	Cloud     string `toml:"cloud"`
	TokenURL  string `toml:"token_url"`
	GraphURL  string `toml:"graph_url"`
	SendScope string `toml:"send_scope"`
	// Protocols the account may use: "smtp", "pop3", "imap" (default:
	// smtp and pop3).
	Protocols   []string `toml:"protocols"`
	POP3Scope   string   `toml:"pop3_scope"`
	POP3Mailbox string   `toml:"pop3_mailbox"` // "" means Mailbox
	// POP3Upstream is Outlook's POP3 service for this account: by default
	// [pop3] upstream, or the national cloud's.
	POP3Upstream string `toml:"pop3_upstream"`
	// IMAPMailbox is the mailbox IMAP opens: "" means POP3Mailbox.
	IMAPMailbox string `toml:"imap_mailbox"`
	// IMAPUpstream is Outlook's IMAP service for this account: by default
	// [imap] upstream, or the national cloud's.
	IMAPUpstream string `toml:"imap_upstream"`
	// ProxySetting overrides [network] proxy for this account: "" is
	// direct; nil means the global one.
	ProxySetting *string `toml:"proxy"`
	// LargeMessages sends messages over sendMail's limit as a draft with
	// attachments (needs Mail.ReadWrite); nil means true.
	LargeMessagesSetting *bool `toml:"large_messages"`
	LargeMessages        bool  `toml:"-"`
}

// Uses reports whether the account may use protocol ("smtp", "pop3" or
// "imap"); before Complete, nil Protocols mean the default ones.
func (a *AccountConfig) Uses(protocol string) bool {
	if a.Protocols == nil {
		return slices.Contains(defaultProtocols, protocol)
	}
	return slices.Contains(a.Protocols, protocol)
}

// defaultProtocols are an account's when it lists none.
var defaultProtocols = []string{"smtp", "pop3"}

// SecretExpiryWarning says when an account's client secret expires within
// 30 days, or has expired; "" otherwise.
func (a *AccountConfig) SecretExpiryWarning(now time.Time) string {
	if a.ClientSecretExpires.IsZero() || a.ClientCertificateFile != "" {
		return ""
	}
	left := a.ClientSecretExpires.Sub(now)
	switch {
	case left < 0:
		return "the client secret has expired (client_secret_expires): create a new one under Certificates & secrets, put its Value in client_secret and its date in client_secret_expires"
	case left < 30*24*time.Hour:
		return fmt.Sprintf("the client secret expires in %d days (client_secret_expires): create a new one under Certificates & secrets before then, or switch to client_certificate_file", int(left.Hours()/24)+1)
	}
	return ""
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
	DefaultSMTPListen = "127.0.0.1:2525"
	DefaultPOP3Listen = "127.0.0.1:1110"
	DefaultIMAPListen = "127.0.0.1:1143"
	// DefaultAdminListen is where the status page is when password_hash
	// is set and listen is not.
	DefaultAdminListen     = "127.0.0.1:9925"
	DefaultMaxMessageBytes = 35 << 20
	// DefaultMaxRecipients is Exchange Online's default recipient limit.
	DefaultMaxRecipients = 500
)

// Default returns a configuration with every default applied and no
// accounts.
func Default() *Config {
	return &Config{
		Log: LogConfig{Level: "info", Format: "json", MaxSizeMB: 50, MaxBackups: 10, MaxAgeDays: 30},
		SMTP: SMTPConfig{
			Listen:                     DefaultSMTPListen,
			MaxMessageBytes:            DefaultMaxMessageBytes,
			MaxRecipients:              DefaultMaxRecipients,
			SendTimeout:                Duration{60 * time.Second},
			LookupWindow:               Duration{2 * time.Minute},
			IdleTimeout:                Duration{5 * time.Minute},
			LoginTimeout:               Duration{60 * time.Second},
			ShutdownTimeout:            Duration{30 * time.Second},
			UploadBytesPer5Min:         150 << 20,
			MaxGraphRequestsPerMessage: 50,
			MaxSessions:                100,
		},
		Admin: AdminConfig{MaxQueueAge: Duration{15 * time.Minute}, FailedWindow: Duration{24 * time.Hour}, IdleTimeout: Duration{60 * time.Second}},
		Outbox: OutboxConfig{
			MaxAge:        Duration{72 * time.Hour},
			MaxBytes:      1 << 30,
			RatePerSecond: 16,
		},
		POP3: ProxyConfig{
			Listen:   DefaultPOP3Listen,
			Upstream: upstream.DefaultPOP3Addr,
			// RFC 1939 §3: an autologout timer of at least 10 minutes.
			IdleTimeout:     Duration{10 * time.Minute},
			LoginTimeout:    Duration{60 * time.Second},
			UpstreamTimeout: Duration{2 * time.Minute},
			MaxSessions:     100,
		},
		IMAP: ProxyConfig{
			Listen:   DefaultIMAPListen,
			Upstream: upstream.DefaultIMAPAddr,
			// RFC 9051 §5.4: an autologout timer of at least 30 minutes;
			// IDLE clients sit silent that long.
			IdleTimeout:     Duration{30 * time.Minute},
			LoginTimeout:    Duration{60 * time.Second},
			UpstreamTimeout: Duration{2 * time.Minute},
			MaxSessions:     100,
		},
	}
}

// Load reads the configuration file at path, applies the defaults and
// validates it; it reads no other file (Resolve does). Every problem is
// reported, each naming the file and the key.
func Load(path string) (*Config, error) {
	cfg := Default()
	md, err := toml.DecodeFile(path, cfg)
	if err != nil {
		var perr toml.ParseError
		if errors.As(err, &perr) {
			if perr.LastKey != "" {
				// The parser notices an unclosed [ or " where the next key
				// starts: name the line where the unfinished value began.
				if start := keyLine(path, perr.LastKey, perr.Position.Line); start > 0 && start < perr.Position.Line {
					return nil, fmt.Errorf("%s: line %d: %s: its value is not closed (a [ or \" without its end?): %s on line %d",
						path, start, perr.LastKey, perr.Message, perr.Position.Line)
				}
				return nil, fmt.Errorf("%s: line %d: %s: %s", path, perr.Position.Line, perr.LastKey, perr.Message)
			}
			return nil, fmt.Errorf("%s: line %d: %s", path, perr.Position.Line, perr.Message)
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	cfg.Path = path
	cfg.listenGiven = map[string]bool{}
	for _, proto := range []string{"smtp", "pop3", "imap"} {
		cfg.listenGiven[proto] = md.IsDefined(proto, "listen")
	}
	var errs []error
	for _, key := range md.Undecoded() {
		errs = append(errs, fmt.Errorf("%s: %s: unknown key (misspelt, or in the wrong table?)", path, key))
	}
	if err := cfg.Complete(filepath.Dir(path)); err != nil {
		errs = append(errs, err)
	}
	return cfg, errors.Join(errs...)
}

// LoadResolved is Load followed by Resolve, with the problems of both.
func LoadResolved(path string) (*Config, *Resolved, error) {
	cfg, err := Load(path)
	if cfg == nil {
		return nil, nil, err
	}
	res, rerr := cfg.Resolve()
	return cfg, res, errors.Join(err, rerr)
}

// Complete applies per-account defaults, makes relative paths relative to
// dir, and validates the configuration, returning every problem at once.
// It reads no file.
func (c *Config) Complete(dir string) error {
	c.dir = dir
	var errs []error
	bad := c.problems(&errs)
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
	c.settleListeners()
	c.SMTP.LocalTLS.validate("smtp", c.SMTP.Listen, dir, bad)
	if c.SMTP.MaxMessageBytes <= 0 {
		bad("smtp.max_message_bytes", "must be a positive number of bytes")
	}
	if c.SMTP.MaxGraphRequestsPerMessage < 3 {
		bad("smtp.max_graph_requests_per_message", "must be at least 3 (a draft, an attachment, the send)")
	}
	if c.SMTP.UploadBytesPer5Min <= 0 {
		bad("smtp.upload_bytes_per_5min", "must be a positive number of bytes")
	}
	if c.SMTP.MaxSessions <= 0 {
		bad("smtp.max_sessions", "must be positive")
	}
	if c.SMTP.MaxRecipients <= 0 {
		bad("smtp.max_recipients", "must be positive")
	}
	for key, d := range map[string]Duration{"smtp.send_timeout": c.SMTP.SendTimeout, "smtp.idle_timeout": c.SMTP.IdleTimeout, "smtp.shutdown_timeout": c.SMTP.ShutdownTimeout, "smtp.login_timeout": c.SMTP.LoginTimeout, "smtp.lookup_window": c.SMTP.LookupWindow} {
		if d.Duration <= 0 {
			bad(key, "must be a positive duration such as \"30s\"")
		}
	}
	c.POP3.validate("pop3", upstream.DefaultPOP3Addr, dir, bad)
	c.IMAP.validate("imap", upstream.DefaultIMAPAddr, dir, bad)
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
		c.Outbox.Bounce = c.Outbox.BounceSetting == nil || *c.Outbox.BounceSetting
		for _, a := range c.Outbox.Notify {
			if !mime.IsAddress(a) {
				bad("outbox.notify", "%q is not an email address", a)
			}
		}
	}
	if c.Admin.PasswordHash != "" && c.Admin.Listen == "" {
		c.Admin.Listen = DefaultAdminListen // a password set means the page is wanted
	}
	if c.Admin.Listen != "" && checkListen("admin.listen", c.Admin.Listen, bad) {
		if host, _, _ := net.SplitHostPort(c.Admin.Listen); !IsLoopbackHost(host) && !c.Admin.AllowNetwork {
			bad("admin.listen", "%q is not a loopback address: /metrics and /healthz would be open to the network; set admin_allow_network = true if that is meant", c.Admin.Listen)
		}
	}
	if h := c.Admin.PasswordHash; h != "" {
		if _, err := bcrypt.Cost([]byte(h)); err != nil {
			bad("admin.password_hash", "not a bcrypt hash (it should start with $2a$ or $2b$): run `mailbridge hash-password` and paste its output")
		}
		if c.Admin.Username == "" {
			c.Admin.Username = "admin"
		}
	} else if c.Admin.Username != "" {
		bad("admin.password_hash", "admin.username is set but not password_hash: run `mailbridge hash-password` and paste its output, or the status page stays off")
	}
	for key, d := range map[string]Duration{"admin.max_queue_age": c.Admin.MaxQueueAge, "admin.failed_window": c.Admin.FailedWindow, "admin.idle_timeout": c.Admin.IdleTimeout} {
		if d.Duration <= 0 {
			bad(key, "must be a positive duration such as \"15m\"")
		}
	}
	if len(c.Accounts) == 0 {
		bad("account", "no [[account]] table: add one per local user")
	}
	names, users := map[string]bool{}, map[string]bool{}
	for i := range c.Accounts {
		a := &c.Accounts[i]
		key := func(k string) string { return accountKey(i, a, k) }
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
		} else if !mime.IsAddress(a.Mailbox) {
			bad(key("mailbox"), "%q is not an email address", a.Mailbox)
		}
		if a.TenantID == "" {
			bad(key("tenant_id"), "required: Directory (tenant) ID from the app registration's Overview page")
		} else if why := CheckTenantID(a.TenantID); why != "" {
			bad(key("tenant_id"), "%q: %s", a.TenantID, why)
		}
		if a.ClientID == "" {
			bad(key("client_id"), "required: Application (client) ID from the app registration's Overview page")
		} else if why := CheckClientID(a.ClientID); why != "" {
			bad(key("client_id"), "%q: %s", a.ClientID, why)
		}
		if why := CheckSecret(a.ClientSecret); a.ClientSecret != "" && why != "" {
			bad(key("client_secret"), "%s", why)
		}
		credentials := 0
		for _, set := range []bool{a.ClientSecret != "", a.ClientSecretFile != "", a.ClientCertificateFile != ""} {
			if set {
				credentials++
			}
		}
		switch {
		case credentials > 1:
			bad(key("client_secret"), "give one of client_secret, client_secret_file and client_certificate_file")
		case credentials == 0:
			bad(key("client_secret"), "required (or client_secret_file, or client_certificate_file): the secret's Value from Certificates & secrets")
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
		if a.IMAPUpstream == "" {
			a.IMAPUpstream = c.IMAP.Upstream
			if a.Cloud != "global" {
				a.IMAPUpstream = cloud.IMAPAddr
			}
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
		} else if !mime.IsAddress(a.POP3Mailbox) {
			bad(key("pop3_mailbox"), "%q is not an email address", a.POP3Mailbox)
		}
		if a.IMAPMailbox == "" {
			a.IMAPMailbox = a.POP3Mailbox
		} else if !mime.IsAddress(a.IMAPMailbox) {
			bad(key("imap_mailbox"), "%q is not an email address", a.IMAPMailbox)
		}
		if a.Protocols == nil {
			a.Protocols = slices.Clone(defaultProtocols)
		}
		for _, p := range a.Protocols {
			if p != "smtp" && p != "pop3" && p != "imap" {
				bad(key("protocols"), "%q is not \"smtp\", \"pop3\" or \"imap\"", p)
			}
		}
		if len(a.Protocols) == 0 {
			bad(key("protocols"), "empty: give \"smtp\", \"pop3\" or \"imap\"")
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

// settleListeners closes the listener of a protocol that no account uses
// and whose table does not set listen, so that a configuration opens only
// the ports it needs, and records why each closed one is closed.
func (c *Config) settleListeners() {
	c.ListenersOff = map[string]string{}
	if c.listenDrop == nil {
		c.listenDrop = map[string]bool{}
	}
	for _, l := range []struct {
		proto, def string
		listen     *string
	}{{"smtp", DefaultSMTPListen, &c.SMTP.Listen}, {"pop3", DefaultPOP3Listen, &c.POP3.Listen}, {"imap", DefaultIMAPListen, &c.IMAP.Listen}} {
		if c.listenDrop[l.proto] && *l.listen == "" {
			*l.listen = l.def // Complete again: decide again
		}
		c.listenDrop[l.proto] = false
		used := slices.ContainsFunc(c.Accounts, func(a AccountConfig) bool { return a.Uses(l.proto) })
		switch {
		case *l.listen == "":
			c.ListenersOff[l.proto] = fmt.Sprintf("[%s] listen is empty", l.proto)
		case used || c.listenGiven[l.proto] || *l.listen != l.def:
		default:
			*l.listen = ""
			c.listenDrop[l.proto] = true
			c.ListenersOff[l.proto] = fmt.Sprintf("no account lists %q in protocols, and [%s] listen is not set", l.proto, l.proto)
		}
	}
}

// IsLoopbackHost reports whether host is "localhost" or a loopback IP.
func IsLoopbackHost(host string) bool {
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
	if u.Scheme == "https" || (u.Scheme == "http" && IsLoopbackHost(u.Hostname())) {
		return nil
	}
	return fmt.Errorf("%q must use https", raw)
}

// problems returns the function that records one problem, naming the
// file (if any) and the key.
func (c *Config) problems(errs *[]error) func(key, format string, args ...any) {
	return func(key, format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		if c.Path != "" {
			*errs = append(*errs, fmt.Errorf("%s: %s: %s", c.Path, key, msg))
		} else {
			*errs = append(*errs, fmt.Errorf("%s: %s", key, msg))
		}
	}
}

// accountKey names a key of the i-th account (from 0) for a problem.
func accountKey(i int, a *AccountConfig, k string) string {
	if a.Name != "" {
		return fmt.Sprintf("account[%d] (%s).%s", i+1, a.Name, k)
	}
	return fmt.Sprintf("account[%d].%s", i+1, k)
}

// keyLine returns the number of the last line at or before line where key
// (its last part) is assigned, 0 if none.
func keyLine(path, key string, line int) int {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	name := key[strings.LastIndexByte(key, '.')+1:]
	lines := strings.Split(string(data), "\n")
	for i := min(line, len(lines)) - 1; i >= 0; i-- {
		l := strings.TrimSpace(lines[i])
		if rest, ok := strings.CutPrefix(l, name); ok && strings.HasPrefix(strings.TrimSpace(rest), "=") {
			return i + 1
		}
	}
	return 0
}

// validate checks a [pop3] or [imap] table that is on; table names it.
func (p *ProxyConfig) validate(table, defaultUpstream, dir string, bad func(key, format string, args ...any)) {
	if p.Listen == "" {
		return
	}
	p.LocalTLS.validate(table, p.Listen, dir, bad)
	if _, port, err := net.SplitHostPort(p.Upstream); err != nil || port == "" {
		bad(table+".upstream", "%q is not host:port, such as %q", p.Upstream, defaultUpstream)
	}
	for key, d := range map[string]Duration{table + ".idle_timeout": p.IdleTimeout, table + ".upstream_timeout": p.UpstreamTimeout, table + ".login_timeout": p.LoginTimeout} {
		if d.Duration <= 0 {
			bad(key, "must be a positive duration such as \"30s\"")
		}
	}
	if p.MaxSessions <= 0 {
		bad(table+".max_sessions", "must be positive")
	}
}
