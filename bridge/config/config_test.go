package config_test

import (
	"fmt"
	"mailbridge/bridge/config"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// The example as installed is refused for its placeholders, each named
// with the fix, and for nothing else; filled in, it loads with the
// defaults.
func TestExampleConfigLoads(t *testing.T) {
	_, err := loadResolved("../../config.example.toml")
	if err == nil {
		t.Fatal("the example loaded with its placeholders")
	}
	lines := strings.Split(err.Error(), "\n")
	for i, want := range []string{
		"account[1] (tm-master).tenant_id: \"00000000-0000-0000-0000-000000000000\": still the example's placeholder: paste the Directory (tenant) ID",
		"account[1] (tm-master).client_id: \"00000000-0000-0000-0000-000000000000\": still the example's placeholder: paste the Application (client) ID",
		"account[1] (tm-master).client_secret: still the example's placeholder: paste the client secret's Value",
	} {
		if len(lines) != 3 || !strings.Contains(lines[i], want) {
			t.Errorf("line %d: want %q in\n%s", i+1, want, err)
		}
	}
	data, _ := os.ReadFile("../../config.example.toml")
	if !config.IsUntouchedExample(data) {
		t.Error("the example is not recognised as untouched")
	}
	filled := strings.Replace(string(data), config.PlaceholderGUID, "72f988bf-86f1-41af-91ab-2d7cd011db47", 1)
	filled = strings.Replace(filled, config.PlaceholderGUID, "1b2c3d4e-0000-4abc-8def-123456789abc", 1)
	filled = strings.Replace(filled, config.PlaceholderSecret, "Abc8Q~realLookingSecretValue.0123456789xy", 1)
	if config.IsUntouchedExample([]byte(filled)) {
		t.Error("a filled-in example is taken for untouched")
	}
	p := filepath.Join(t.TempDir(), "mailbridge.toml")
	os.WriteFile(p, []byte(filled), 0o600)
	cfg, err := loadResolved(p)
	if err != nil {
		t.Fatalf("the filled-in example does not load: %v", err)
	}
	a := cfg.Accounts[0]
	if a.TokenURL != "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token" || a.GraphURL != "https://graph.microsoft.com/v1.0" || a.SendScope != "https://graph.microsoft.com/.default" {
		t.Errorf("defaults not applied: %+v", a)
	}
	if cfg.SMTP.SendTimeout.Duration != 60*time.Second || cfg.SMTP.Listen != "127.0.0.1:2525" {
		t.Errorf("smtp: %+v", cfg.SMTP)
	}
}

// IDs that are not an app registration's, and a Secret ID where the Value
// goes, are caught offline with the fix; a tenant's domain name is a
// tenant ID.
func TestMistakesCaughtOffline(t *testing.T) {
	for _, tc := range []struct{ tenant, client, secret, want string }{
		{"contoso-shipping", "1b2c3d4e-0000-4abc-8def-123456789abc", "Abc8Q~value", "tenant_id: \"contoso-shipping\": not a tenant ID: the Directory (tenant) ID is a GUID"},
		{"contoso.onmicrosoft.com", "12345", "Abc8Q~value", "client_id: \"12345\": not an Application (client) ID"},
		{"72f988bf-86f1-41af-91ab-2d7cd011db47", "1b2c3d4e-0000-4abc-8def-123456789abc", "9a8b7c6d-1234-4abc-8def-0123456789ab", "client_secret_file: " + "SECRET" + ": this is a Secret ID (a GUID), not the secret's Value"},
		{"contoso.onmicrosoft.com", "1b2c3d4e-0000-4abc-8def-123456789abc", "Abc8Q~value", ""},
	} {
		dir := t.TempDir()
		secret := filepath.Join(dir, "secret.txt")
		os.WriteFile(secret, []byte(tc.secret+"\n"), 0o600)
		p := filepath.Join(dir, "m.toml")
		os.WriteFile(p, []byte(fmt.Sprintf(`[[account]]
name = "x"
username = "u"
password_hash = "$2a$04$1o5Qf3Pq9oW3WpDdRZBwHePaS3E0GKGRhFNbcXRnWy3ExHGKzD0p."
mailbox = "orders@example.com"
tenant_id = %q
client_id = %q
client_secret_file = "secret.txt"
`, tc.tenant, tc.client)), 0o600)
		_, err := loadResolved(p)
		want := strings.ReplaceAll(tc.want, "SECRET", secret)
		switch {
		case want == "" && err != nil:
			t.Errorf("%s: %v", tc.tenant, err)
		case want != "" && (err == nil || !strings.Contains(err.Error(), want) || strings.Count(err.Error(), "\n") != 0):
			t.Errorf("got %v, want one line with %q", err, want)
		}
	}
}

func TestConfigErrorsNameFileAndKey(t *testing.T) {
	_, err := loadResolved("../../testdata/config-bad.toml")
	if err == nil {
		t.Fatal("a bad configuration loaded")
	}
	if want := "config-bad.toml: line 6: smtp.send_timeout: not a duration"; !strings.Contains(err.Error(), want) {
		t.Errorf("got %v, want %q", err, want)
	}
	// Decoding stops at the bad duration; fix it to see the rest.
	data, _ := os.ReadFile("../../testdata/config-bad.toml")
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "secret.txt"), []byte("s\n"), 0o600)
	p := filepath.Join(dir, "bad.toml")
	os.WriteFile(p, []byte(strings.Replace(string(data), `send_timeout = "soon"`, `send_timeout = "0s"`, 1)), 0o600)
	_, err = loadResolved(p)
	if err == nil {
		t.Fatal("a bad configuration loaded")
	}
	lines := strings.Split(err.Error(), "\n")
	for _, want := range []string{
		"bad.toml: account.colour: unknown key",
		"bad.toml: log.level: must be debug, info, warn or error",
		"bad.toml: smtp.listen: \"0.0.0.0:25\" is not a loopback address",
		"bad.toml: smtp.send_timeout: must be a positive duration",
		"bad.toml: account[1] (a).password_hash: not a bcrypt hash",
		"bad.toml: account[1] (a).mailbox: \"not-an-address\" is not an email address",
		"bad.toml: account[1] (a).client_id: required",
		"bad.toml: account[1] (a).client_secret: give one of client_secret, client_secret_file and client_certificate_file",
		"bad.toml: account[1] (a).allowed_senders: \"*@\" is not an address or *@domain",
		"bad.toml: account[1] (a).graph_url: \"http://graph.example.com/v1.0\" must use https",
		"bad.toml: account[2] (a).name: \"a\" is used by another account",
		"bad.toml: account[2] (a).username: \"DUP\" is used by another account",
		"bad.toml: account[2] (a).client_secret_file: cannot read it",
		"bad.toml: account[2] (a).send_scope: must end in /.default",
		"bad.toml: account[1] (a).tenant_id: \"t\": not a tenant ID",
		"bad.toml: account[2] (a).tenant_id: \"t\": not a tenant ID",
		"bad.toml: account[2] (a).client_id: \"c\": not an Application (client) ID",
	} {
		found := false
		for _, l := range lines {
			if strings.Contains(l, want) {
				found = true
			}
		}
		if !found {
			t.Errorf("no line with %q in:\n%v", want, err)
		}
	}
	if len(lines) != 17 {
		t.Errorf("%d problems reported, want 17:\n%v", len(lines), err)
	}
}

func TestConfigSecretFile(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "secret.txt"), []byte("  from-file\r\n"), 0o600)
	p := filepath.Join(dir, "mailbridge.toml")
	os.WriteFile(p, []byte(`
[[account]]
name = "x"
username = "x"
password_hash = "$2a$10$X.FmiwimM0FjfQl2Q48UhuOd9hztzcuSRK04xk4T0bEruuwmhLH66"
mailbox = "x@example.com"
tenant_id = "aaaaaaaa-0000-4000-8000-00000000000a"
client_id = "c11e0000-0000-4000-8000-00000000000a"
client_secret_file = "secret.txt"
token_url = "http://127.0.0.1:8080/{tenant}/token"
`), 0o600)
	cfg, res, err := config.LoadResolved(p)
	if err != nil {
		t.Fatal(err)
	}
	if got := res.Accounts[cfg.Accounts[0].Name].Credentials.ClientSecret; got != "from-file" {
		t.Errorf("secret %q, want the file's content trimmed", got)
	}
}

func TestConfigSyntaxErrorNamesTheLineWhereTheProblemStarts(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.toml")
	os.WriteFile(p, []byte("[smtp]\nlisten = \"127.0.0.1:2525\"\n[[account]]\nname = \"x\"\nallowed_senders = [\"a@example.com\",\nusername = \"x\"\nmailbox = \"y\"\n\n\n"), 0o600)
	_, err := loadResolved(p)
	if err == nil || !strings.Contains(err.Error(), "x.toml: line 5: account.allowed_senders: its value is not closed") {
		t.Errorf("got %v, want line 5, where the [ is not closed", err)
	}
}

func TestConfigSyntaxErrorNamesLine(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.toml")
	os.WriteFile(p, []byte("[smtp]\nlisten = \n"), 0o600)
	_, err := loadResolved(p)
	if err == nil || !strings.Contains(err.Error(), "x.toml: line 2:") {
		t.Errorf("got %v, want the file and line", err)
	}
}

func TestNationalCloudDefaults(t *testing.T) {
	p := filepath.Join(t.TempDir(), "m.toml")
	os.WriteFile(p, []byte(`
[[account]]
name = "gov"
username = "gov"
password_hash = "$2a$10$X.FmiwimM0FjfQl2Q48UhuOd9hztzcuSRK04xk4T0bEruuwmhLH66"
mailbox = "x@agency.example"
tenant_id = "aaaaaaaa-0000-4000-8000-00000000000a"
client_id = "c11e0000-0000-4000-8000-00000000000a"
client_secret = "s"
cloud = "usgov"

[[account]]
name = "cn"
username = "cn"
password_hash = "$2a$10$X.FmiwimM0FjfQl2Q48UhuOd9hztzcuSRK04xk4T0bEruuwmhLH66"
mailbox = "x@example.cn"
tenant_id = "aaaaaaaa-0000-4000-8000-00000000000a"
client_id = "c11e0000-0000-4000-8000-00000000000a"
client_secret = "s"
cloud = "china"
graph_url = "https://graph-proxy.example.cn/v1.0"
`), 0o600)
	cfg, err := loadResolved(p)
	if err != nil {
		t.Fatal(err)
	}
	gov, cn := cfg.Accounts[0], cfg.Accounts[1]
	if gov.TokenURL != "https://login.microsoftonline.us/{tenant}/oauth2/v2.0/token" || gov.GraphURL != "https://graph.microsoft.us/v1.0" ||
		gov.SendScope != "https://graph.microsoft.us/.default" || gov.POP3Scope != "https://outlook.office365.us/.default" || gov.POP3Upstream != "outlook.office365.us:995" {
		t.Errorf("usgov: %+v", gov)
	}
	if cn.TokenURL != "https://login.chinacloudapi.cn/{tenant}/oauth2/v2.0/token" || cn.GraphURL != "https://graph-proxy.example.cn/v1.0" || cn.POP3Upstream != "partner.outlook.cn:995" {
		t.Errorf("china (graph_url overridden): %+v", cn)
	}
	os.WriteFile(p, []byte(strings.Replace(mustRead(t, p), `cloud = "usgov"`, `cloud = "mars"`, 1)), 0o600)
	if _, err := loadResolved(p); err == nil || !strings.Contains(err.Error(), `account[1] (gov).cloud: "mars" is not global, usgov, usgovdod or china`) {
		t.Errorf("unknown cloud: %v", err)
	}
}

func mustRead(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// loadResolved loads and resolves the file at path, as the bridge does.
func loadResolved(path string) (*config.Config, error) {
	cfg, _, err := config.LoadResolved(path)
	return cfg, err
}

func TestExposedSecrets(t *testing.T) {
	if runtime.GOOS == "windows" {
		t.Skip("file modes: the Windows ACL check is built for Windows only")
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "mailbridge.toml")
	os.WriteFile(p, []byte(`
[[account]]
name = "x"
username = "x"
password_hash = "$2a$10$X.FmiwimM0FjfQl2Q48UhuOd9hztzcuSRK04xk4T0bEruuwmhLH66"
mailbox = "x@example.com"
tenant_id = "aaaaaaaa-0000-4000-8000-00000000000a"
client_id = "c11e0000-0000-4000-8000-00000000000a"
client_secret = "plain-secret"
`), 0o644)
	cfg, err := loadResolved(p)
	if err != nil {
		t.Fatal(err)
	}
	if w := cfg.ExposedSecrets(); len(w) != 1 || !strings.Contains(w[0], "readable by everyone") || !strings.Contains(w[0], "chmod 600") {
		t.Errorf("world-readable config with a secret: %v", w)
	}
	os.Chmod(p, 0o600)
	if w := cfg.ExposedSecrets(); len(w) != 0 {
		t.Errorf("owner-only config: %v", w)
	}
}

func TestAdminOffLoopbackNeedsAllowNetwork(t *testing.T) {
	cfg := config.Default()
	cfg.Admin.Listen = "0.0.0.0:9925"
	if err := cfg.Complete(""); err == nil || !strings.Contains(err.Error(), "admin.listen: \"0.0.0.0:9925\" is not a loopback address") {
		t.Errorf("got %v", err)
	}
	cfg.Admin.AllowNetwork = true
	if err := cfg.Complete(""); err != nil && strings.Contains(err.Error(), "admin.listen") {
		t.Errorf("with admin_allow_network: %v", err)
	}
	cfg.SMTP.Listen = "127.0.0.1:99999"
	if err := cfg.Complete(""); err == nil || !strings.Contains(err.Error(), "smtp.listen: \"127.0.0.1:99999\" is not host:port with a port up to 65535") {
		t.Errorf("port 99999: %v", err)
	}
}

func TestStatusPageLogin(t *testing.T) {
	cfg := config.Default()
	cfg.Admin.PasswordHash = "hunter2"
	if err := cfg.Complete(""); err == nil || !strings.Contains(err.Error(), "admin.password_hash: not a bcrypt hash") {
		t.Errorf("a password instead of its hash: %v", err)
	}
	cfg = config.Default()
	cfg.Admin.Username = "ops"
	if err := cfg.Complete(""); err == nil || !strings.Contains(err.Error(), "admin.password_hash: admin.username is set but not password_hash") {
		t.Errorf("a user name without a hash: %v", err)
	}
	cfg = config.Default()
	cfg.Admin.PasswordHash = "$2a$04$C8yo0wQ6k2Hn1uZ1pQbB1uQ2mS9mKq1vC8o0mJ9f2d1aL7eX9y5yW"
	err := cfg.Complete("")
	if err != nil && strings.Contains(err.Error(), "admin.") {
		t.Errorf("a hash alone: %v", err)
	}
	if cfg.Admin.Username != "admin" || cfg.Admin.Listen != config.DefaultAdminListen {
		t.Errorf("a hash alone gives user %q on %q, want admin on %s", cfg.Admin.Username, cfg.Admin.Listen, config.DefaultAdminListen)
	}
}

// A protocol listens when its table sets listen or an account uses it;
// otherwise its port stays closed, with the reason for the log.
func TestListenersOnlyForProtocolsInUse(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "secret.txt"), []byte("s\n"), 0o600)
	account := func(protocols string) string {
		return `[[account]]
name = "a"
username = "a"
password_hash = "$2a$04$3/cm9bi4dXVz6vRXkbJCBO5hxG0M7bnK.dGhx/W0WPQnf3XHTcRtC"
mailbox = "a@example.com"
tenant_id = "aaaaaaaa-0000-0000-0000-00000000000a"
client_id = "c11e0000-0000-0000-0000-00000000000a"
client_secret_file = "secret.txt"
` + protocols + "\n"
	}
	for _, tc := range []struct {
		name, file       string
		smtp, pop3, imap string // the listen addresses after loading
		offReason        map[string]string
	}{
		{"default protocols", account(""), "127.0.0.1:2525", "127.0.0.1:1110", "",
			map[string]string{"imap": `no account lists "imap" in protocols, and [imap] listen is not set`}},
		{"imap only", account(`protocols = ["imap"]`), "", "", "127.0.0.1:1143",
			map[string]string{"smtp": `no account lists "smtp" in protocols`, "pop3": `no account lists "pop3" in protocols`}},
		{"listen set explicitly, at the default", "[imap]\nlisten = \"127.0.0.1:1143\"\n" + account(""), "127.0.0.1:2525", "127.0.0.1:1110", "127.0.0.1:1143", nil},
		{"listen set to another port", "[imap]\nlisten = \"127.0.0.1:2143\"\n" + account(""), "127.0.0.1:2525", "127.0.0.1:1110", "127.0.0.1:2143", nil},
		{"listen emptied", "[pop3]\nlisten = \"\"\n" + account(""), "127.0.0.1:2525", "", "",
			map[string]string{"pop3": "[pop3] listen is empty", "imap": `no account lists "imap"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, "c.toml")
			os.WriteFile(p, []byte(tc.file), 0o600)
			cfg, err := config.Load(p)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.SMTP.Listen != tc.smtp || cfg.POP3.Listen != tc.pop3 || cfg.IMAP.Listen != tc.imap {
				t.Errorf("listen smtp %q pop3 %q imap %q, want %q %q %q", cfg.SMTP.Listen, cfg.POP3.Listen, cfg.IMAP.Listen, tc.smtp, tc.pop3, tc.imap)
			}
			if len(cfg.ListenersOff) != len(tc.offReason) {
				t.Errorf("listeners off: %v, want %v", cfg.ListenersOff, tc.offReason)
			}
			for proto, want := range tc.offReason {
				if !strings.Contains(cfg.ListenersOff[proto], want) {
					t.Errorf("%s off because %q, want %q", proto, cfg.ListenersOff[proto], want)
				}
			}
			// Completing again (as a reload does) decides again: an
			// account that starts using IMAP opens it.
			cfg.Accounts[0].Protocols = []string{"smtp", "pop3", "imap"}
			if err := cfg.Complete(dir); err != nil {
				t.Fatal(err)
			}
			if tc.name == "default protocols" && cfg.IMAP.Listen != config.DefaultIMAPListen {
				t.Errorf("after an account took up IMAP: imap listen %q", cfg.IMAP.Listen)
			}
		})
	}
}
