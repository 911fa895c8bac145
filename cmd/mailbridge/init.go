package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"text/template"
	"time"

	"github.com/BurntSushi/toml"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/term"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/bridge/mime"
)

// initAnswers are what `mailbridge init` asks for.
type initAnswers struct {
	TenantID, ClientID, Secret, Mailbox, Username, PasswordHash string
	SecretFile                                                  string // as written into the config: relative to it
	POP3                                                        bool
	TokenURL, GraphURL, POP3Upstream                            string // advanced: national clouds, tests
}

var configTemplate = template.Must(template.New("config").Funcs(template.FuncMap{"q": tomlString}).Parse(`# mailbridge configuration, written by ` + "`mailbridge init`" + ` on {{.Date}}.
# Every key and its default: config.example.toml. Check it: mailbridge check -config {{.Path}}

[smtp]
# Where the legacy program's "SMTP server" points: 127.0.0.1, port 2525, SSL off.
listen = "127.0.0.1:2525"

[pop3]
# Where its "POP3 server" points: 127.0.0.1, port 1110, SSL off. "" turns POP3 off.
listen = "{{if .A.POP3}}127.0.0.1:1110{{end}}"
{{- if .A.POP3Upstream}}
upstream = {{q .A.POP3Upstream}}
{{- end}}

[outbox]
# Messages wait here, on disk, until Microsoft 365 took them.
dir = {{q .OutboxDir}}

[admin]
# The status page, http://127.0.0.1:9925/ in a browser: accounts, queued and
# failed messages with Retry and Delete. To turn it on, run
# ` + "`mailbridge hash-password`" + `, paste its output below, remove the # and restart.
# username = "admin"
# password_hash = ""

[[account]]
name = "main"
# The user name and password the legacy program logs in with (the password
# only as a bcrypt hash: ` + "`mailbridge hash-password`" + ` makes a new one).
username = {{q .A.Username}}
password_hash = {{q .A.PasswordHash}}
# The mailbox Microsoft 365 sends as (and POP3 reads).
mailbox = {{q .A.Mailbox}}
# From the app registration's Overview page in the Entra admin center.
tenant_id = {{q .A.TenantID}}
client_id = {{q .A.ClientID}}
# The client secret's Value, in a file only its owner can read.
client_secret_file = {{q .A.SecretFile}}
protocols = [{{if .A.POP3}}"smtp", "pop3"{{else}}"smtp"{{end}}]
{{- if .A.TokenURL}}
token_url = {{q .A.TokenURL}}
{{- end}}
{{- if .A.GraphURL}}
graph_url = {{q .A.GraphURL}}
{{- end}}
`))

// initConfig carries out `mailbridge init`: it asks for what a first
// configuration needs (or takes it from flags), writes the configuration
// and the secret file, checks them, and says what to type into the legacy
// program.
func initConfig(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	flags := flag.NewFlagSet("init", flag.ContinueOnError)
	flags.SetOutput(stderr)
	path := flags.String("config", defaultConfigPath(), "the configuration file to write")
	var a initAnswers
	flags.StringVar(&a.TenantID, "tenant-id", "", "Directory (tenant) ID")
	flags.StringVar(&a.ClientID, "client-id", "", "Application (client) ID")
	secretFile := flags.String("client-secret-file", "", "a file holding the client secret's Value")
	flags.StringVar(&a.Mailbox, "mailbox", "", "the mailbox address to send as")
	flags.StringVar(&a.Username, "username", "", "the user name the legacy program logs in with")
	passwordFile := flags.String("password-file", "", "a file holding the password the legacy program logs in with")
	pop3 := flags.Bool("pop3", true, "let the account read its mailbox over POP3")
	noPOP3 := flags.Bool("no-pop3", false, "SMTP only")
	noCheck := flags.Bool("no-check", false, "do not test the settings against Microsoft 365")
	force := flags.Bool("force", false, "overwrite an existing configuration file")
	flags.StringVar(&a.TokenURL, "token-url", "", "advanced: the token endpoint, for a national cloud")
	flags.StringVar(&a.GraphURL, "graph-url", "", "advanced: the Graph endpoint, for a national cloud")
	flags.StringVar(&a.POP3Upstream, "pop3-upstream", "", "advanced: Outlook's POP3 service, host:port")
	if _, err := parseAnywhere(flags, args); err != nil {
		return usageStatus(err)
	}
	a.POP3 = *pop3 && !*noPOP3
	inst := installationFor(*path)
	if ok, err := mayReplace(*path); err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	} else if !ok && !*force {
		fmt.Fprintf(stderr, "mailbridge: %s exists and is not the untouched example: init does not overwrite it without -force\n", *path)
		return 1
	}
	if inst.NeedsRoot && runtime.GOOS != "windows" && os.Geteuid() != 0 {
		fmt.Fprintf(stderr, "mailbridge: %s belongs to root: run sudo mailbridge init\n", *path)
		return 1
	}
	gid, err := groupID(inst.Group)
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	in := bufio.NewReader(stdin)
	interactive := isTerminal(stdin)
	ask := func(value *string, flagName, question, help string, check func(string) error) bool {
		for *value == "" || check(*value) != nil {
			if !interactive {
				if *value == "" {
					fmt.Fprintf(stderr, "mailbridge: init needs -%s (%s)\n", flagName, question)
				} else {
					fmt.Fprintf(stderr, "mailbridge: -%s: %v\n", flagName, check(*value))
				}
				return false
			}
			if *value != "" {
				fmt.Fprintf(stderr, "  %v\n", check(*value))
			}
			fmt.Fprintf(stdout, "\n%s\n  (%s)\n> ", question, help)
			line, err := in.ReadString('\n')
			if err != nil && line == "" {
				return false
			}
			*value = strings.TrimSpace(line)
		}
		return true
	}
	anyValue := func(string) error { return nil } // ask itself refuses an empty answer
	address := func(s string) error {
		if !mime.IsAddress(s) {
			return fmt.Errorf("%q is not an email address", s)
		}
		return nil
	}
	if interactive {
		fmt.Fprintf(stdout, "mailbridge init writes %s. The first values come from the app registration\nin the Microsoft Entra admin center (Applications > App registrations > your app).\n", *path)
	}
	offline := func(check func(string) string) func(string) error {
		return func(s string) error {
			if why := check(s); why != "" {
				return errors.New(why)
			}
			return nil
		}
	}
	ok := ask(&a.TenantID, "tenant-id", "Directory (tenant) ID?", "Overview page of the app registration", offline(config.CheckTenantID)) &&
		ask(&a.ClientID, "client-id", "Application (client) ID?", "the same Overview page", offline(config.CheckClientID))
	if !ok {
		return 2
	}
	if *secretFile != "" {
		b, err := os.ReadFile(*secretFile)
		if err != nil {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return 1
		}
		a.Secret = strings.TrimSpace(string(b))
		if why := config.CheckSecret(a.Secret); why != "" {
			fmt.Fprintf(stderr, "mailbridge: -client-secret-file %s: %s\n", *secretFile, why)
			return 2
		}
	} else if interactive {
		for a.Secret == "" || config.CheckSecret(a.Secret) != "" {
			if a.Secret != "" {
				fmt.Fprintf(stderr, "  %s\n", config.CheckSecret(a.Secret))
			}
			fmt.Fprint(stdout, "\nClient secret Value?\n  (Certificates & secrets > Client secrets: the Value column, shown once, not the Secret ID; not echoed)\n> ")
			s, err := readSecret(stdin, in)
			if err != nil {
				fmt.Fprintln(stderr, "mailbridge:", err)
				return 1
			}
			a.Secret = s
		}
	} else {
		fmt.Fprintln(stderr, "mailbridge: init needs -client-secret-file (a file holding the client secret's Value)")
		return 2
	}
	if !ask(&a.Mailbox, "mailbox", "Mailbox to send as?", "the address of a licensed Exchange Online mailbox, such as orders@example.com", address) ||
		!ask(&a.Username, "username", "User name for the legacy program?", "what it types as SMTP (and POP3) user; any name, such as tmmaster", anyValue) {
		return 2
	}
	var password []byte
	if *passwordFile != "" {
		b, err := os.ReadFile(*passwordFile)
		if err != nil {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return 1
		}
		password = []byte(strings.TrimRight(string(b), "\r\n"))
	} else if interactive {
		fmt.Fprint(stdout, "\nPassword for the legacy program? (typed twice, not echoed; stored only as a bcrypt hash)\n")
		var status int
		if password, status = readPassword(stdin, stderr); password == nil {
			return status
		}
	} else {
		fmt.Fprintln(stderr, "mailbridge: init needs -password-file (a file holding the legacy program's password)")
		return 2
	}
	if len(password) == 0 || len(password) > 72 {
		fmt.Fprintln(stderr, "mailbridge: the password must be 1 to 72 bytes")
		return 2
	}
	hash, err := bcrypt.GenerateFromPassword(password, bcrypt.DefaultCost)
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	a.PasswordHash = string(hash)

	dir := filepath.Dir(*path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	secretPath, err := secretFileFor(*path, a.Secret)
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	a.SecretFile = filepath.Base(secretPath)
	if err := writePrivate(secretPath, []byte(a.Secret+"\n"), gid); err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	var out strings.Builder
	if err := configTemplate.Execute(&out, map[string]any{"A": a, "Path": *path, "Date": time.Now().Format(time.DateOnly), "OutboxDir": inst.OutboxDir}); err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	if err := writePrivate(*path, []byte(out.String()), gid); err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	who := "its owner only"
	if inst.Group != "" {
		who = "root and the " + inst.Group + " service only"
	}
	fmt.Fprintf(stdout, "\nWrote %s and %s (the secret), readable by %s.\n", *path, secretPath, who)
	cfg, err := loadResolved(*path)
	if err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			fmt.Fprintln(stderr, "mailbridge: config:", line)
		}
		return 1
	}
	printScoping(cfg, stdout)
	status := 0
	if !*noCheck {
		fmt.Fprintln(stdout, "\nChecking the settings against Microsoft 365:")
		status = runCheck(ctx, cfg, "", stdout, stderr)
	}
	host, port, _ := net.SplitHostPort(cfg.SMTP.Listen)
	typed := "the password you typed"
	if *passwordFile != "" {
		typed = "the password in " + *passwordFile
	}
	fmt.Fprintf(stdout, "\nIn the legacy program:\n  SMTP server %s, port %s, SSL off, authentication on, user %q, %s,\n  sender %s.\n", host, port, a.Username, typed, a.Mailbox)
	if a.POP3 {
		phost, pport, _ := net.SplitHostPort(cfg.POP3.Listen)
		fmt.Fprintf(stdout, "  POP3 server %s, port %s, SSL off, the same user and password.\n", phost, pport)
	}
	fmt.Fprintf(stdout, "Then run it: %s.\n", inst.Start)
	return status
}

// printScoping prints the least-privilege set-up of init's account: the
// RBAC for Applications commands for its mailbox, and what not to consent
// in Entra.
func printScoping(cfg *config.Config, stdout io.Writer) {
	fmt.Fprint(stdout, "\nLeast privilege: in Entra give the app no Microsoft Graph application permission\n"+
		"(no tenant-wide Mail.Send: it would let the app send as every mailbox). Instead, in\n"+
		"Exchange Online PowerShell, scope it to this mailbox with RBAC for Applications:\n")
	for _, c := range bridge.ScopingCommands(cfg, &cfg.Accounts[0]) {
		fmt.Fprintf(stdout, "  %s\n", c)
	}
	fmt.Fprint(stdout, "(POP3 and IMAP still need POP.AccessAsApp/IMAP.AccessAsApp consented under Office 365 Exchange Online.)\n")
}

// readSecret reads one line without echo from a terminal.
func readSecret(stdin io.Reader, in *bufio.Reader) (string, error) {
	if f, ok := stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		b, err := term.ReadPassword(int(f.Fd()))
		fmt.Println()
		return strings.TrimSpace(string(b)), err
	}
	line, err := in.ReadString('\n')
	return strings.TrimSpace(line), err
}

func isTerminal(r any) bool {
	f, ok := r.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// writePrivate writes a file only its owner can read (on Windows: only
// Administrators and SYSTEM, without inherited access); with gid >= 0,
// that group may read it too (0640).
func writePrivate(path string, data []byte, gid int) error {
	// Private from its first byte, then renamed into place: a symbolic
	// link at path is replaced, never followed.
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a failure; gone after the rename
	if err := restrictACL(tmp); err != nil {
		f.Close()
		return err
	}
	if gid >= 0 {
		if err := f.Chown(-1, gid); err != nil {
			f.Close()
			return err
		}
		if err := f.Chmod(0o640); err != nil {
			f.Close()
			return err
		}
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// tomlString returns s as a TOML string, quoted and escaped by the TOML
// library's encoder (a user name such as CORP\scanner, or one with a
// quote, stays what it was).
func tomlString(s string) (string, error) {
	var b strings.Builder
	if err := toml.NewEncoder(&b).Encode(map[string]string{"v": s}); err != nil {
		return "", err
	}
	return strings.TrimSpace(strings.TrimPrefix(b.String(), "v = ")), nil
}

// secretFileFor returns where init keeps the client secret of the
// configuration at path: beside it, named after it (mailbridge.toml:
// mailbridge-secret.txt). A secret file is never overwritten: Azure shows
// a secret's Value only once, and another configuration may use it. One
// holding this very secret is reused; otherwise the first free
// NAME-secret-2.txt, -3 and so on is taken.
func secretFileFor(path, secret string) (string, error) {
	base := strings.TrimSuffix(filepath.Base(path), filepath.Ext(path))
	for i := 1; i < 100; i++ {
		name := base + "-secret.txt"
		if i > 1 {
			name = fmt.Sprintf("%s-secret-%d.txt", base, i)
		}
		p := filepath.Join(filepath.Dir(path), name)
		old, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			return p, nil
		}
		if err == nil && strings.TrimSpace(string(old)) == secret {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: no free name for the secret file beside it", path)
}

// restrictACL removes inherited access on Windows, where ProgramData lets
// every user read; nothing elsewhere.
func restrictACL(path string) error {
	if runtime.GOOS != "windows" {
		return nil
	}
	if out, err := exec.Command("icacls", path, "/inheritance:r", "/grant:r", "*S-1-5-32-544:F", "*S-1-5-18:F").CombinedOutput(); err != nil {
		return fmt.Errorf("icacls %s: %v: %s", path, err, out)
	}
	return nil
}

// msiInstall carries out `mailbridge msi-install -config FILE`, run by the
// MSI once its files are in place: it registers the Windows service (or
// updates its command line), then copies config.example.toml beside FILE
// to FILE unless FILE exists, so that an upgrade never touches the
// administrator's file.
func msiInstall(args []string, stdout, stderr io.Writer) int {
	flags := flag.NewFlagSet("msi-install", flag.ContinueOnError)
	flags.SetOutput(stderr)
	path := flags.String("config", defaultConfigPath(), "the configuration file")
	if _, err := parseAnywhere(flags, args); err != nil {
		return usageStatus(err)
	}
	command, err := registerService(*path)
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge: service:", err)
		if command == "" {
			return 1
		}
	}
	fmt.Fprintf(stdout, "service %s: %s\n", serviceName, command)
	if _, err := os.Stat(*path); err == nil {
		fmt.Fprintf(stdout, "%s exists: kept as it is\n", *path)
		return 0
	} else if !errors.Is(err, fs.ErrNotExist) {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	example, err := os.ReadFile(filepath.Join(filepath.Dir(*path), "config.example.toml"))
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	if err := writePrivate(*path, example, -1); err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	fmt.Fprintf(stdout, "wrote %s from config.example.toml: fill it in with `mailbridge init -force`, or by hand\n", *path)
	return 0
}

// withoutOutbox returns a copy of cfg whose bridge opens no outbox: check
// needs none, and run as root (sudo mailbridge init runs it) it would
// create the outbox's directories as root's, which the service's user then
// cannot use.
func withoutOutbox(cfg *config.Config) *config.Config {
	c := *cfg
	c.Outbox.Enabled = false
	return &c
}

// runCheck prints `mailbridge check`'s rows for cfg and returns its exit
// status.
func runCheck(ctx context.Context, cfg *config.Config, sendTest string, stdout, stderr io.Writer) int {
	cfg.Log.Level = "warn"
	b, err := bridge.New(withoutOutbox(cfg), bridge.Options{Logger: bridge.NewLogger(stderr, cfg.Log)})
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	failed := 0
	for _, r := range b.Check(ctx, sendTest) {
		mark := "ok  "
		if r.Warn {
			mark = "WARN"
		}
		if !r.OK {
			mark = "FAIL"
			failed++
		}
		fmt.Fprintf(stdout, "%s  %-20s %-10s %s (%s)\n", mark, r.Account, r.Check, r.Detail, r.Path)
		if r.Hint != "" {
			fmt.Fprintf(stdout, "      fix: %s\n", r.Hint)
		}
		for _, c := range r.Commands {
			fmt.Fprintf(stdout, "        %s\n", c)
		}
	}
	if failed > 0 {
		fmt.Fprintf(stdout, "%d check(s) failed\n", failed)
		return 1
	}
	return 0
}
