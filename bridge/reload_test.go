package bridge_test

import (
	"mailbridge/bridge/config"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/BurntSushi/toml"
	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"
)

// writeConfig writes cfg as the TOML file an administrator would edit.
func writeConfig(t *testing.T, cfg *config.Config) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "mailbridge.toml")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := toml.NewEncoder(f).Encode(cfg); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestReloadChangesPasswordForNewSessionsOnly(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	b, logs := startBridge(t, fake, cfg)
	old := dialAuth(t, b.SMTPAddr(), userA, passwordA) // logged in before the reload

	newHash, _ := bcrypt.GenerateFromPassword([]byte("new password"), bcrypt.MinCost)
	edited := testConfig(fake)
	edited.Accounts[0].PasswordHash = string(newHash)
	edited.Log.Level = "warn" // not applied: needs a restart
	path := writeConfig(t, edited)
	if err := b.ReloadFrom(path); err != nil {
		t.Fatal(err)
	}
	if _, err := send(old, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nold session\n")); err != nil {
		t.Fatalf("the session from before the reload: %v", err)
	}
	c, _ := smtp.Dial(b.SMTPAddr())
	defer c.Close()
	if err := c.Auth(sasl.NewPlainClient("", userA, passwordA)); err == nil {
		t.Error("the old password still opens new sessions")
	}
	dialAuth(t, b.SMTPAddr(), userA, "new password")
	line := findLogLine(t, logs.String(), "configuration reloaded: accounts apply to new sessions")
	if !strings.Contains(line, `"need_restart":["[log]"]`) {
		t.Errorf("reload line %s", line)
	}

	// An invalid file changes nothing.
	os.WriteFile(path, []byte("[smtp]\nlisten = \n"), 0o600)
	if err := b.ReloadFrom(path); err == nil {
		t.Fatal("an invalid configuration was applied")
	}
	dialAuth(t, b.SMTPAddr(), userA, "new password")
	if !strings.Contains(logs.String(), "reload refused: the running configuration stays in force") {
		t.Error("the refused reload is not logged")
	}
}
