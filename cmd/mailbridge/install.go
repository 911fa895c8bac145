package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"mailbridge/bridge/config"
)

// Where `mailbridge init` writes depends on how the bridge was installed:
// the Debian package's /etc/mailbridge (readable by the service's group,
// the outbox in /var/lib), the MSI's ProgramData folder, or the working
// directory for a bridge that was simply unpacked.

// debConfigPath is the Debian package's configuration file.
const debConfigPath = "/etc/mailbridge/mailbridge.toml"

// installation is how init writes for the place a configuration goes.
type installation struct {
	// Group may read the configuration and the secret (0640, owner root):
	// the service's; "" keeps them to their owner.
	Group string
	// OutboxDir is the outbox's directory as written into the file.
	OutboxDir string
	// NeedsRoot: the files belong to root.
	NeedsRoot bool
	// Start says how to start the service afterwards.
	Start string
}

// defaultConfigPath is where init writes by default: the package's file on
// Linux when it is installed, the MSI's place on Windows, the working
// directory elsewhere.
func defaultConfigPath() string {
	switch runtime.GOOS {
	case "windows":
		if pd := os.Getenv("ProgramData"); pd != "" {
			return filepath.Join(pd, "mailbridge", "mailbridge.toml")
		}
	case "linux":
		if _, err := os.Stat(debConfigPath); err == nil {
			return debConfigPath
		}
	}
	return "mailbridge.toml"
}

// installationFor returns how init writes the configuration at path.
func installationFor(path string) installation {
	abs, _ := filepath.Abs(path)
	if runtime.GOOS == "linux" && abs == debConfigPath {
		return installation{Group: "mailbridge", OutboxDir: "/var/lib/mailbridge/outbox", NeedsRoot: true,
			Start: "sudo systemctl enable --now mailbridge (or sudo systemctl restart mailbridge if it runs)"}
	}
	if pd := os.Getenv("ProgramData"); runtime.GOOS == "windows" && pd != "" && strings.EqualFold(filepath.Dir(abs), filepath.Join(pd, "mailbridge")) {
		return installation{OutboxDir: "outbox", NeedsRoot: true,
			Start: "start the mailbridge service: Services (services.msc) > mailbridge > Start, or sc start mailbridge"}
	}
	return installation{OutboxDir: "outbox",
		Start: fmt.Sprintf("mailbridge serve -config %s (or mailbridge service install -config %s)", path, path)}
}

// mayReplace says whether init may write path without -force: it does
// not exist, or it is the example the package or the MSI installed,
// untouched.
func mayReplace(path string) (bool, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return config.IsUntouchedExample(data), nil
}

// groupID returns the numeric ID of the named group, -1 for "".
func groupID(name string) (int, error) {
	if name == "" || runtime.GOOS == "windows" {
		return -1, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return -1, fmt.Errorf("group %s: %w (is the package installed?)", name, err)
	}
	return strconv.Atoi(g.Gid)
}
