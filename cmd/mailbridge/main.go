// Command mailbridge lets legacy SMTP clients send through Microsoft 365
// after basic authentication was switched off: see README.md.
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/kardianos/service"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/term"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/bridge/outbox"
)

// version and commit are set by .ci/release with -ldflags "-X
// main.version=... -X main.commit=...".
var version, commit = "", ""

const usage = `usage: mailbridge COMMAND [flags]

commands:
  serve -config FILE                 run the bridge (default config: mailbridge.toml)
  demo                               run the bridge on an embedded fake Microsoft 365
  check -config FILE [-send-test ADDRESS]
                                     test every account's Microsoft 365 settings
  service install|uninstall|start|stop|restart|reload|status -config FILE
                                     run as a Windows service or systemd unit
  queue list|retry ID|retry-failed|delete ID -config FILE
                                     show and manage the outbox
  init [-config FILE] [flags]        write a first configuration, asking for each value
  gen-cert -host NAME [-out DIR]     write a self-signed certificate for the local TLS listeners
  hash-password [-bare]              read a password, print its password_hash line
  version                            print the version

Flags may come before or after the command's arguments.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run carries out one command and returns the process's exit status:
// 0 success, 1 failure, 2 bad usage or configuration.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cmd, args := args[0], args[1:]
	switch cmd {
	case "serve":
		return serve(ctx, args, stderr)
	case "demo":
		return demo(ctx, args, stdout, stderr)
	case "check":
		return check(ctx, args, stdout, stderr)
	case "service":
		return serviceCommand(args, stdout, stderr)
	case "queue":
		return queue(args, stdout, stderr)
	case "gen-cert":
		return genCert(args, stdout, stderr)
	case "hash-password":
		return hashPassword(args, stdin, stdout, stderr)
	case "init":
		return initConfig(ctx, args, stdin, stdout, stderr)
	case "msi-install":
		return msiInstall(args, stdout, stderr)
	case "version":
		if len(args) > 0 {
			fmt.Fprintf(stderr, "mailbridge: version takes no arguments, not %q\n", strings.Join(args, " "))
			return 2
		}
		fmt.Fprintln(stdout, "mailbridge", versionString())
		return 0
	case "help", "-h", "-help", "--help":
		if len(args) == 1 && commandUsage[args[0]] != "" && args[0] != "version" {
			return run([]string{args[0], "-h"}, stdin, stdout, stdout)
		}
		if len(args) == 1 && args[0] == "version" {
			fmt.Fprintf(stdout, "usage: mailbridge %s\n", commandUsage["version"])
			return 0
		}
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "mailbridge: unknown command %q\n%s", cmd, usage)
	return 2
}

// versionString is the release version, or "devel" for a build from a
// checkout, with the commit and the Go version: "0.3.0 (commit 1a2b3c4d5e6f,
// go1.26.8)", or "devel (built from source, go1.26.8)" when the build
// carries no commit.
func versionString() string {
	v, c := version, commit
	bi, ok := debug.ReadBuildInfo()
	if v == "" {
		v = "devel"
		if ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
	}
	if c == "" && ok {
		dirty := ""
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				c = s.Value[:min(12, len(s.Value))]
			case "vcs.modified":
				if s.Value == "true" {
					dirty = "-dirty"
				}
			}
		}
		if c != "" {
			c += dirty
		}
	}
	if c == "" {
		// Built from source without version control stamping (go run,
		// -buildvcs=false): nothing more is known, and "unknown" would
		// only worry.
		return fmt.Sprintf("%s (built from source, %s)", v, runtime.Version())
	}
	return fmt.Sprintf("%s (commit %s, %s)", v, c, runtime.Version())
}

// commandUsage is each command's synopsis and what it does, for
// `mailbridge help COMMAND` and COMMAND -h.
var commandUsage = map[string]string{
	"serve":         "serve -config FILE [-service]\n\nRun the bridge in the foreground (a service manager starts it the same way; -service: under the Windows Service Control Manager).",
	"demo":          "demo [flags]\n\nRun the bridge on an embedded fake Microsoft 365, to try it with a mail client on a machine without a tenant.",
	"check":         "check -config FILE [-send-test ADDRESS]\n\nTest every account's settings against Microsoft 365 and print one row per check, with the fix.",
	"service":       "service install|uninstall|start|stop|restart|reload|status -config FILE\n\nRun as a Windows service or a systemd unit (SysV init where there is no systemd).",
	"queue":         "queue list [-v]|retry ID|retry-failed|delete ID -config FILE\n\nShow and manage the outbox, also while the bridge runs.",
	"init":          "init [-config FILE] [flags]\n\nWrite a first configuration and its secret file, asking for each value (or taking them from flags), then check it.",
	"msi-install":   "msi-install -config FILE\n\nRegister the Windows service, and copy config.example.toml beside FILE to FILE unless it exists (run by the MSI).",
	"gen-cert":      "gen-cert -host NAME [-out DIR]\n\nWrite a self-signed certificate for the local TLS listeners.",
	"hash-password": "hash-password [-bare]\n\nRead a password and print its password_hash line.",
	"version":       "version\n\nPrint the version, the commit and the Go version.",
}

// usageStatus is the exit status of a command whose flags did not parse:
// 0 for -h (the help was asked for and printed), 2 otherwise.
func usageStatus(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	return 2
}

// describe makes fs print the command's synopsis, what it does and its
// flags for -h.
func describe(fs *flag.FlagSet) {
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: mailbridge %s\n", commandUsage[fs.Name()])
		n := 0
		fs.VisitAll(func(*flag.Flag) { n++ })
		if n > 0 {
			fmt.Fprintln(fs.Output(), "\nflags:")
			fs.PrintDefaults()
		}
	}
}

// parseAnywhere parses the flags of fs wherever they stand among args and
// returns the other arguments in order: `queue retry ID -config F` and
// `queue -config F retry ID` mean the same. -h prints the command's help
// (flag.ErrHelp: exit 0, see usageStatus).
func parseAnywhere(fs *flag.FlagSet, args []string) ([]string, error) {
	describe(fs)
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return positional, nil
		}
		if args[0] == "--" {
			return append(positional, args[1:]...), nil
		}
		positional = append(positional, args[0])
		args = args[1:]
	}
}

// loadConfig parses the flags (the -config flag among them) wherever they
// stand, and loads the file; on failure it prints every problem, one per
// line, and returns exit status 2. It returns the other arguments too.
func loadConfig(fs *flag.FlagSet, args []string, stderr io.Writer) (*config.Config, []string, int) {
	path := fs.String("config", "mailbridge.toml", "configuration file")
	rest, err := parseAnywhere(fs, args)
	if err != nil {
		return nil, nil, usageStatus(err)
	}
	cfg, err := loadResolved(*path)
	if err != nil {
		printConfigError(stderr, err)
		return nil, nil, 2
	}
	return cfg, rest, 0
}

func serve(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	asService := fs.Bool("service", false, "run under the Windows Service Control Manager (the MSI and `service install` register serve with it)")
	path := fs.String("config", "mailbridge.toml", "configuration file")
	if _, err := parseAnywhere(fs, args); err != nil {
		return usageStatus(err)
	}
	if !*asService && service.Interactive() {
		cfg, err := loadResolved(*path)
		if err != nil {
			printConfigError(stderr, err)
			return 2
		}
		return runBridge(ctx, cfg, stderr)
	}
	// Started by the Windows Service Control Manager or systemd. The
	// configuration is read once the service manager is answered, so that
	// on Windows a mistake in it is logged and the service stops with
	// status 2, rather than the SCM giving up with error 1053.
	return runAsService(ctx, *path, func(ctx context.Context) int {
		cfg, err := loadResolved(*path)
		if err != nil {
			printConfigError(stderr, err)
			if runtime.GOOS == "windows" {
				logServiceConfigError(*path, err, stderr)
			}
			return 2
		}
		if cfg.Log.File == "" && runtime.GOOS == "windows" {
			cfg.Log.File = defaultServiceLog(cfg.Path)
		}
		return runBridge(ctx, cfg, stderr)
	}, stderr)
}

// printConfigError prints each problem of a configuration, one per line.
func printConfigError(stderr io.Writer, err error) {
	for _, line := range strings.Split(err.Error(), "\n") {
		fmt.Fprintln(stderr, "mailbridge: config:", line)
	}
}

// logServiceConfigError writes why a Windows service could not read its
// configuration to the service's default log, where an administrator who
// started it from services.msc looks (its standard error goes nowhere).
func logServiceConfigError(path string, err error, stderr io.Writer) {
	out, closer := bridge.LogOutput(config.LogConfig{File: defaultServiceLog(path)}, stderr)
	defer closer.Close()
	log := bridge.NewLogger(out, config.LogConfig{Level: "info", Format: "json"})
	for _, line := range strings.Split(err.Error(), "\n") {
		log.Error().Str("config", path).Str("problem", line).
			Str("hint", "fix the configuration file, then start the service again; `mailbridge check -config \""+path+"\"` shows each problem").
			Msg("cannot start: the configuration has a mistake")
	}
}

// runBridge runs the bridge until ctx ends; SIGHUP reloads its accounts.
// With [log] file set and a person at the terminal, the start-up lines and
// any error also go to the terminal, so that nothing fails unseen.
func runBridge(ctx context.Context, cfg *config.Config, stderr io.Writer) int {
	out, closeLog := bridge.LogOutput(cfg.Log, stderr)
	defer closeLog.Close()
	var tee *terminalTee
	if cfg.Log.File != "" && isTerminal(stderr) && service.Interactive() {
		tee = &terminalTee{terminal: stderr}
		out = io.MultiWriter(out, tee)
	}
	log := bridge.NewLogger(out, cfg.Log)
	ev := log.Info().Str("version", versionString()).Str("config", cfg.Path)
	if cfg.Log.File != "" {
		ev = ev.Str("log_file", cfg.Log.File)
	}
	ev.Msg("mailbridge starting")
	// SIGHUP (Linux: kill -HUP, systemctl reload) reloads the accounts. It
	// is caught from before the start: one that comes while the bridge
	// starts (once its listeners are logged) waits for it, rather than
	// ending the process or, where SIGHUP was ignored (nohup), being lost.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	b, err := bridge.New(cfg, bridge.Options{Logger: log, Version: versionString()})
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	if err := b.Start(); err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	if tee != nil {
		log.Info().Str("log_file", cfg.Log.File).Msg("started: from now on only errors are shown here; the whole log is in the log file")
		tee.startedUp()
	}
	go func() {
		for range hup {
			log.Info().Str("config", cfg.Path).Msg("SIGHUP: reloading the configuration")
			b.ReloadFrom(cfg.Path)
		}
	}()
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), cfg.SMTP.ShutdownTimeout.Duration)
	defer cancel()
	if err := b.Shutdown(sctx); err != nil {
		log.Error().Err(err).Msg("stopped with an error")
		return 1
	}
	log.Info().Msg("stopped")
	return 0
}

func check(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sendTest := fs.String("send-test", "", "also send a test message to this address")
	cfg, _, status := loadConfig(fs, args, stderr)
	if cfg == nil {
		return status
	}
	return runCheck(ctx, cfg, *sendTest, stdout, stderr)
}

func queue(args []string, stdout, stderr io.Writer) int {
	const queueUsage = "usage: mailbridge queue list [-v]|retry ID|retry-failed|delete ID -config FILE\n"
	fs := flag.NewFlagSet("queue", flag.ContinueOnError)
	fs.SetOutput(stderr)
	verbose := fs.Bool("v", false, "list: the whole error of each message, not only its cause")
	cfg, rest, status := loadConfig(fs, args, stderr)
	if cfg == nil {
		return status
	}
	if len(rest) == 0 {
		fmt.Fprint(stderr, queueUsage)
		return 2
	}
	action, rest := rest[0], rest[1:]
	var id string
	switch action {
	case "retry", "delete":
		if len(rest) != 1 {
			fmt.Fprintf(stderr, "mailbridge: queue %s needs a message ID (see mailbridge queue list)\n", action)
			return 2
		}
		id = rest[0]
	case "list", "retry-failed":
	default:
		fmt.Fprintf(stderr, "mailbridge: unknown queue action %q\n%s", action, queueUsage)
		return 2
	}
	if !cfg.Outbox.Enabled {
		fmt.Fprintln(stderr, "mailbridge: the outbox is off in this configuration ([outbox] enabled = false)")
		return 1
	}
	// The bridge may be running and accepting messages into this outbox.
	store := outbox.Attach(cfg.Outbox.Dir)
	switch action {
	case "list":
		entries, err := store.List()
		if err != nil {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return 1
		}
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tSTATE\tAGE\tATTEMPTS\tNEXT ATTEMPT\tFROM\tRECIPIENTS\tSUBJECT\tBYTES\tWHY")
		type why struct{ id, reason, hint, whole string }
		var whys []why
		for _, e := range entries {
			next, w := e.NextAttempt.Local().Format(time.DateTime), why{e.ID, e.LastReason, e.LastHint, e.LastError}
			if w.reason == "" {
				w.reason = e.LastError
			}
			if e.State == "failed" && e.Failure != nil {
				next, w = "-", why{e.ID, e.Failure.Reason, e.Failure.Hint, e.Failure.Reason}
			}
			if w.reason != "" {
				whys = append(whys, w)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%d\t%s\n", e.ID, e.State, time.Since(e.Received).Round(time.Second), e.Attempts, next,
				e.From, strings.Join(e.Recipients, ","), oneLine(e.Subject, 60), e.Size, oneLine(w.reason, 60))
		}
		tw.Flush()
		if len(whys) > 0 {
			fmt.Fprintln(stdout, "\nWhy, and the fix:")
		}
		for _, w := range whys {
			fmt.Fprintf(stdout, "  %s: %s\n", w.id, oneLine(w.reason, 200))
			if w.hint != "" {
				fmt.Fprintf(stdout, "      fix: %s\n", w.hint)
			}
			if *verbose && w.whole != w.reason {
				fmt.Fprintf(stdout, "      error: %s\n", oneLine(w.whole, 2000))
			}
		}
		fmt.Fprintf(stdout, "%d message(s)\n", len(entries))
	case "retry":
		if err := store.Retry(id); err != nil {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return 1
		}
		fmt.Fprintf(stdout, "%s: due now; the running bridge sends it within a few seconds\n", id)
	case "retry-failed":
		n, err := store.RetryFailed()
		fmt.Fprintf(stdout, "%d failed message(s) back in the queue\n", n)
		if err != nil {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return 1
		}
	case "delete":
		if err := store.Delete(id); err != nil {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return 1
		}
		fmt.Fprintf(stdout, "%s: deleted\n", id)
	}
	return 0
}

// oneLine returns s on one line, cut at n characters.
func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return s
}

func hashPassword(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("hash-password", flag.ContinueOnError)
	fs.SetOutput(stderr)
	bare := fs.Bool("bare", false, "print the hash alone, not a password_hash line")
	if _, err := parseAnywhere(fs, args); err != nil {
		return usageStatus(err)
	}
	password, status := readPassword(stdin, stderr)
	if password == nil {
		return status
	}
	hash, err := bcrypt.GenerateFromPassword(password, bcrypt.DefaultCost)
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	if *bare {
		fmt.Fprintln(stdout, string(hash))
	} else {
		fmt.Fprintf(stdout, "password_hash = %q\n", hash)
	}
	return 0
}

// readPassword reads a password: twice without echo from a terminal, else
// one line of stdin. nil and an exit status when there is none.
func readPassword(stdin io.Reader, stderr io.Writer) ([]byte, int) {
	var password []byte
	if f, ok := stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		fmt.Fprint(stderr, "Password: ")
		p1, err := term.ReadPassword(int(f.Fd()))
		fmt.Fprintln(stderr)
		if err != nil {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return nil, 1
		}
		fmt.Fprint(stderr, "Again: ")
		p2, err := term.ReadPassword(int(f.Fd()))
		fmt.Fprintln(stderr)
		if err != nil || string(p1) != string(p2) {
			fmt.Fprintln(stderr, "mailbridge: the passwords differ")
			return nil, 1
		}
		password = p1
	} else {
		line, err := bufio.NewReader(stdin).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return nil, 1
		}
		password = []byte(strings.TrimRight(line, "\r\n"))
	}
	if len(password) == 0 {
		fmt.Fprintln(stderr, "mailbridge: empty password")
		return nil, 2
	}
	if len(password) > 72 {
		fmt.Fprintln(stderr, "mailbridge: a password is at most 72 bytes (bcrypt's limit)")
		return nil, 2
	}
	return password, 0
}

// loadResolved loads the configuration at path and reads the files it
// names, reporting the problems of both.
func loadResolved(path string) (*config.Config, error) {
	cfg, _, err := config.LoadResolved(path)
	return cfg, err
}

// terminalTee passes the log to a terminal until the bridge has started,
// then only lines at error level.
type terminalTee struct {
	terminal io.Writer
	started  atomic.Bool
}

func (t *terminalTee) startedUp() { t.started.Store(true) }

func (t *terminalTee) Write(p []byte) (int, error) {
	if !t.started.Load() || bytes.Contains(p, []byte(`"level":"error"`)) || bytes.Contains(p, []byte(" ERR ")) {
		t.terminal.Write(p)
	}
	return len(p), nil
}
