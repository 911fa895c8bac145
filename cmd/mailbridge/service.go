package main

import (
	"flag"
	"fmt"
	"io"
	"mailbridge/bridge/config"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"

	"github.com/kardianos/service"
)

// serviceName is the name under which the bridge is registered with the
// Windows Service Control Manager and systemd.
const serviceName = "mailbridge"

// serviceConfig describes the bridge as a service running `serve` with the
// configuration file at cfgPath (made absolute: services start elsewhere).
func serviceConfig(cfgPath string) (*service.Config, error) {
	abs, err := filepath.Abs(cfgPath)
	if err != nil {
		return nil, err
	}
	return &service.Config{
		Name:        serviceName,
		DisplayName: "mailbridge (SMTP and POP3 to Microsoft 365)",
		Description: "Lets legacy SMTP and POP3 clients use Microsoft 365 through Graph and OAuth2.",
		// -service: told, not guessed from the parent process (wine runs
		// services.exe outside session 0, where x/sys/windows/svc looks).
		Arguments:        []string{"serve", "-service", "-config", abs},
		WorkingDirectory: filepath.Dir(abs),
		Dependencies:     []string{"After=network-online.target", "Wants=network-online.target"},
		Option: service.KeyValue{
			// Windows: start with the machine, restart after a crash.
			"StartType":              "automatic",
			"OnFailure":              "restart",
			"OnFailureDelayDuration": "10s",
			"OnFailureResetPeriod":   3600,
			// systemd: restart on failure, `systemctl reload` sends SIGHUP.
			"Restart":      "on-failure",
			"ReloadSignal": "HUP",
		},
	}, nil
}

// controlOnly is the service.Interface that `mailbridge service` hands to
// kardianos/service to install, start and stop the service; it never
// serves (runAsService does, in the process the service manager starts).
type controlOnly struct{}

func (controlOnly) Start(service.Service) error { return nil }
func (controlOnly) Stop(service.Service) error  { return nil }

// serviceCommand carries out `mailbridge service ACTION -config FILE`.
func serviceCommand(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, "usage: mailbridge service install|uninstall|start|stop|restart|reload|status -config FILE\n")
		return 2
	}
	fs := flag.NewFlagSet("service", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "mailbridge.toml", "configuration file")
	rest, err := parseAnywhere(fs, args)
	if err != nil {
		return usageStatus(err)
	}
	if len(rest) != 1 {
		fmt.Fprint(stderr, "usage: mailbridge service install|uninstall|start|stop|restart|reload|status -config FILE\n")
		return 2
	}
	action := rest[0]
	// status, stop and uninstall work whatever state the file is in.
	cfg := &config.Config{Path: *path}
	if action != "status" && action != "uninstall" && action != "stop" {
		var status int
		if cfg, _, status = loadConfig(flag.NewFlagSet("service", flag.ContinueOnError), []string{"-config", *path}, stderr); cfg == nil {
			return status
		}
	}
	sc, err := serviceConfig(cfg.Path)
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	s, err := service.New(controlOnly{}, sc)
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	switch action {
	case "status":
		st, err := s.Status()
		if err != nil {
			fmt.Fprintf(stdout, "%s: not installed (%v)\n", serviceName, err)
			return 1
		}
		fmt.Fprintf(stdout, "%s: %s\n", serviceName, map[service.Status]string{service.StatusRunning: "running", service.StatusStopped: "stopped"}[st])
		return 0
	case "reload":
		if runtime.GOOS == "windows" {
			fmt.Fprintln(stderr, "mailbridge: Windows services cannot be reloaded: use `mailbridge service restart` (sessions in progress finish first)")
			return 1
		}
		if out, err := exec.Command("systemctl", "reload", serviceName).CombinedOutput(); err != nil {
			fmt.Fprintf(stderr, "mailbridge: systemctl reload %s: %v\n%s", serviceName, err, out)
			return 1
		}
		fmt.Fprintln(stdout, "reloaded")
		return 0
	case "install", "uninstall", "start", "stop", "restart":
		before := serviceFiles()
		if action == "uninstall" {
			// kardianos/service removes the event-log source after the
			// service and fails when there is none, as with the MSI's.
			ensureEventSource()
		}
		if err := service.Control(s, action); err != nil {
			fmt.Fprintf(stderr, "mailbridge: service %s: %v\n", action, err)
			if action == "install" {
				fmt.Fprintln(stderr, "(installing a service needs an Administrator prompt on Windows, root on Linux)")
			}
			return 1
		}
		fmt.Fprintf(stdout, "service %s: done\n", action)
		switch action {
		case "install":
			for _, f := range serviceFiles() {
				fmt.Fprintf(stdout, "wrote %s\n", f)
			}
		case "uninstall":
			for _, f := range before {
				os.Remove(f) // what the service manager left, if anything
				if _, err := os.Stat(f); err != nil {
					fmt.Fprintf(stdout, "removed %s\n", f)
				}
			}
		}
		if action == "install" {
			restarts := " and restarts after a failure"
			if s.Platform() == "unix-systemv" {
				restarts = "; a SysV init script does not restart it after a failure (systemd would)"
			}
			fmt.Fprintf(stdout, "It runs %q with the arguments %q, starts with the machine%s.\nStart it now with `mailbridge service start -config %s`.\n", executable(), sc.Arguments, restarts, cfg.Path)
			if cfg.Log.File == "" && runtime.GOOS == "windows" {
				fmt.Fprintf(stdout, "Its log goes to %s (set [log] file to change it).\n", defaultServiceLog(cfg.Path))
			}
		}
		return 0
	}
	fmt.Fprintf(stderr, "mailbridge: unknown service action %q\n", action)
	return 2
}

func executable() string {
	p, err := os.Executable()
	if err != nil {
		return "mailbridge"
	}
	return p
}

// defaultServiceLog is where a Windows service logs when [log] file is not
// set: standard error goes nowhere there.
func defaultServiceLog(cfgPath string) string {
	abs, _ := filepath.Abs(cfgPath)
	return filepath.Join(filepath.Dir(abs), "mailbridge.log")
}

// serviceFiles lists the files a service install wrote on this machine: the
// systemd unit, or the SysV script and its rc links; none on Windows (the
// service lives in the registry).
func serviceFiles() []string {
	if runtime.GOOS != "linux" {
		return nil
	}
	var out []string
	for _, p := range []string{"/etc/systemd/system/" + serviceName + ".service", "/etc/init.d/" + serviceName} {
		if _, err := os.Stat(p); err == nil {
			out = append(out, p)
		}
	}
	links, _ := filepath.Glob("/etc/rc[0-6S].d/[SK][0-9][0-9]" + serviceName)
	return append(out, links...)
}
