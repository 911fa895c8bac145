// Command mailbridge lets legacy SMTP clients send through Microsoft 365
// after basic authentication was switched off: see README.md.
package main

import (
	"bufio"
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
	"syscall"
	"time"

	"github.com/kardianos/service"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/term"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/bridge/outbox"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

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
  gen-cert -host NAME [-out DIR]     write a self-signed certificate for the local TLS listeners
  hash-password                      read a password on standard input, print its bcrypt hash
  version                            print the version
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
		return hashPassword(stdin, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "mailbridge", versionString())
		return 0
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "mailbridge: unknown command %q\n%s", cmd, usage)
	return 2
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// loadConfig parses the -config flag and loads the file; on failure it
// prints every problem, one per line, and returns exit status 2.
func loadConfig(fs *flag.FlagSet, args []string, stderr io.Writer) (*config.Config, int) {
	path := fs.String("config", "mailbridge.toml", "configuration file")
	if err := fs.Parse(args); err != nil {
		return nil, 2
	}
	cfg, err := loadResolved(*path)
	if err != nil {
		for _, line := range strings.Split(err.Error(), "\n") {
			fmt.Fprintln(stderr, "mailbridge: config:", line)
		}
		return nil, 2
	}
	return cfg, 0
}

func serve(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg, status := loadConfig(fs, args, stderr)
	if cfg == nil {
		return status
	}
	if !service.Interactive() {
		// Started by the Windows Service Control Manager or systemd.
		if cfg.Log.File == "" && runtime.GOOS == "windows" {
			cfg.Log.File = defaultServiceLog(cfg.Path)
		}
		return runAsService(cfg.Path, func(ctx context.Context) int { return runBridge(ctx, cfg, stderr) })
	}
	return runBridge(ctx, cfg, stderr)
}

// runBridge runs the bridge until ctx ends; SIGHUP reloads its accounts.
func runBridge(ctx context.Context, cfg *config.Config, stderr io.Writer) int {
	out, closeLog := bridge.LogOutput(cfg.Log, stderr)
	defer closeLog.Close()
	log := bridge.NewLogger(out, cfg.Log)
	log.Info().Str("version", versionString()).Str("config", cfg.Path).Msg("mailbridge starting")
	b, err := bridge.New(cfg, bridge.Options{Logger: log})
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		return 1
	}
	// SIGHUP (Linux: kill -HUP, systemctl reload) reloads the accounts.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for range hup {
			log.Info().Str("config", cfg.Path).Msg("SIGHUP: reloading the configuration")
			b.ReloadFrom(cfg.Path)
		}
	}()
	if err := b.Run(ctx); err != nil {
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
	cfg, status := loadConfig(fs, args, stderr)
	if cfg == nil {
		return status
	}
	cfg.Log.Level = "warn"
	b, err := bridge.New(cfg, bridge.Options{Logger: bridge.NewLogger(stderr, cfg.Log)})
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	failed := 0
	for _, r := range b.Check(ctx, *sendTest) {
		mark := "ok  "
		if r.Warn {
			mark = "WARN"
		}
		if !r.OK {
			mark = "FAIL"
			failed++
		}
		fmt.Fprintf(stdout, "%s  %-20s %-10s %s\n", mark, r.Account, r.Check, r.Detail)
		if r.Hint != "" {
			fmt.Fprintf(stdout, "      fix: %s\n", r.Hint)
		}
	}
	if failed > 0 {
		fmt.Fprintf(stdout, "%d check(s) failed\n", failed)
		return 1
	}
	return 0
}

func queue(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, "usage: mailbridge queue list|retry ID|retry-failed|delete ID -config FILE\n")
		return 2
	}
	action, args := args[0], args[1:]
	var id string
	if action == "retry" || action == "delete" {
		if len(args) == 0 || strings.HasPrefix(args[0], "-") {
			fmt.Fprintf(stderr, "mailbridge: queue %s needs a message ID (see mailbridge queue list)\n", action)
			return 2
		}
		id, args = args[0], args[1:]
	}
	fs := flag.NewFlagSet("queue", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfg, status := loadConfig(fs, args, stderr)
	if cfg == nil {
		return status
	}
	if !cfg.Outbox.Enabled {
		fmt.Fprintln(stderr, "mailbridge: the outbox is off in this configuration ([outbox] enabled = false)")
		return 1
	}
	store, err := outbox.Open(cfg.Outbox.Dir)
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	switch action {
	case "list":
		entries, err := store.List()
		if err != nil {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return 1
		}
		fmt.Fprintf(stdout, "%-34s %-7s %-12s %10s %8s %-8s %-20s %s\n", "ID", "STATE", "ACCOUNT", "BYTES", "AGE", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR")
		for _, e := range entries {
			next, last := e.NextAttempt.Local().Format(time.DateTime), e.LastError
			if e.State == "failed" {
				next, last = "-", e.Failure.Reason
			}
			fmt.Fprintf(stdout, "%-34s %-7s %-12s %10d %8s %8d %-20s %s\n", e.ID, e.State, e.Account, e.Size,
				time.Since(e.Received).Round(time.Second), e.Attempts, next, last)
		}
		fmt.Fprintf(stdout, "%d message(s)\n", len(entries))
	case "retry":
		err = store.Retry(id)
	case "retry-failed":
		var n int
		n, err = store.RetryFailed()
		fmt.Fprintf(stdout, "%d failed message(s) back in the queue\n", n)
	case "delete":
		err = store.Delete(id)
	default:
		fmt.Fprintf(stderr, "mailbridge: unknown queue action %q\n", action)
		return 2
	}
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	return 0
}

func hashPassword(stdin io.Reader, stdout, stderr io.Writer) int {
	var password []byte
	if f, ok := stdin.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		fmt.Fprint(stderr, "Password: ")
		p1, err := term.ReadPassword(int(f.Fd()))
		fmt.Fprintln(stderr)
		if err != nil {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return 1
		}
		fmt.Fprint(stderr, "Again: ")
		p2, err := term.ReadPassword(int(f.Fd()))
		fmt.Fprintln(stderr)
		if err != nil || string(p1) != string(p2) {
			fmt.Fprintln(stderr, "mailbridge: the passwords differ")
			return 1
		}
		password = p1
	} else {
		line, err := bufio.NewReader(stdin).ReadString('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return 1
		}
		password = []byte(strings.TrimRight(line, "\r\n"))
	}
	if len(password) == 0 {
		fmt.Fprintln(stderr, "mailbridge: empty password")
		return 2
	}
	if len(password) > 72 {
		fmt.Fprintln(stderr, "mailbridge: a password is at most 72 bytes (bcrypt's limit)")
		return 2
	}
	hash, err := bcrypt.GenerateFromPassword(password, bcrypt.DefaultCost)
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	fmt.Fprintln(stdout, string(hash))
	return 0
}

// loadResolved loads the configuration at path and reads the files it
// names, reporting the problems of both.
func loadResolved(path string) (*config.Config, error) {
	cfg, _, err := config.LoadResolved(path)
	return cfg, err
}
