package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

func TestServiceConfig(t *testing.T) {
	sc, err := serviceConfig("mailbridge.toml")
	if err != nil {
		t.Fatal(err)
	}
	if len(sc.Arguments) != 4 || sc.Arguments[0] != "serve" || sc.Arguments[1] != "-service" || sc.Arguments[2] != "-config" || !filepath.IsAbs(sc.Arguments[3]) {
		t.Errorf("arguments %q: want serve -service -config with an absolute path", sc.Arguments)
	}
	for k, want := range map[string]any{"StartType": "automatic", "OnFailure": "restart", "Restart": "on-failure", "ReloadSignal": "HUP"} {
		if sc.Option[k] != want {
			t.Errorf("option %s = %v, want %v", k, sc.Option[k], want)
		}
	}
}

// On a Linux host without systemd, install writes a SysV script and rc
// links and names them; uninstall removes all of them.
func TestServiceInstallNamesAndRemovesItsFiles(t *testing.T) {
	if runtime.GOOS != "linux" || os.Geteuid() != 0 {
		t.Skip("needs root on Linux")
	}
	if _, err := os.Stat("/run/systemd/system"); err == nil {
		t.Skip("a systemd host: the test would install a real unit")
	}
	if _, err := os.Stat("/etc/init.d/" + serviceName); err == nil {
		t.Skip("a mailbridge service is installed on this machine")
	}
	path := filepath.Join(t.TempDir(), "mailbridge.toml")
	os.WriteFile(path, []byte("not even TOML ["), 0o600)
	var out, errOut bytes.Buffer
	if code := serviceCommand([]string{"install", "-config", path}, &out, &errOut); code != 2 {
		t.Fatalf("install with an invalid configuration: %d, want 2 (%s)", code, errOut.String())
	}
	valid := filepath.Join(t.TempDir(), "ok.toml")
	os.WriteFile(valid, []byte(validServiceConfig), 0o600)
	out.Reset()
	if code := serviceCommand([]string{"install", "-config", valid}, &out, &errOut); code != 0 {
		t.Fatalf("install: %d %s", code, errOut.String())
	}
	t.Cleanup(func() { serviceCommand([]string{"uninstall"}, io.Discard, io.Discard) })
	if !strings.Contains(out.String(), "wrote /etc/init.d/"+serviceName) || !strings.Contains(out.String(), "wrote /etc/rc") {
		t.Errorf("install did not name its files:\n%s", out.String())
	}
	if strings.Contains(out.String(), "restarts after a failure") || !strings.Contains(out.String(), "a SysV init script does not restart it after a failure") {
		t.Errorf("install claims what a SysV script does not do:\n%s", out.String())
	}
	os.WriteFile(valid, []byte("broken ["), 0o600) // uninstall works whatever the file says
	out.Reset()
	if code := serviceCommand([]string{"uninstall", "-config", valid}, &out, &errOut); code != 0 {
		t.Fatalf("uninstall: %d %s", code, errOut.String())
	}
	if left := serviceFiles(); len(left) != 0 {
		t.Errorf("uninstall left %v", left)
	}
	if !strings.Contains(out.String(), "removed /etc/init.d/"+serviceName) {
		t.Errorf("uninstall did not name what it removed:\n%s", out.String())
	}
}

const validServiceConfig = `[[account]]
name = "x"
username = "x"
password_hash = "$2a$10$X.FmiwimM0FjfQl2Q48UhuOd9hztzcuSRK04xk4T0bEruuwmhLH66"
mailbox = "x@example.com"
tenant_id = "aaaaaaaa-0000-4000-8000-00000000000a"
client_id = "c11e0000-0000-4000-8000-00000000000a"
client_secret = "s"
[outbox]
dir = "/tmp/mailbridge-service-test-outbox"
`
