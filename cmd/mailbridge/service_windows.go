package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"mailbridge/bridge/config"

	"golang.org/x/sys/windows"
	"golang.org/x/sys/windows/svc"
	"golang.org/x/sys/windows/svc/eventlog"
	"golang.org/x/sys/windows/svc/mgr"
)

// runAsService runs serve under the Service Control Manager. It is used
// when serve is given -service (as the MSI and `service install` register
// it), so it does not depend on x/sys/windows/svc.IsWindowsService, which
// looks for services.exe in session 0 and answers false under wine.
func runAsService(_ context.Context, _ string, run func(ctx context.Context) int, stderr io.Writer) int {
	// The SCM waits this long for the stop: the default shutdown timeout,
	// and a margin.
	h := &scmHandler{run: run, stopHint: config.Default().SMTP.ShutdownTimeout.Duration + 30*time.Second}
	if err := svc.Run(serviceName, h); err != nil {
		if errors.Is(err, windows.ERROR_FAILED_SERVICE_CONTROLLER_CONNECT) {
			fmt.Fprintln(stderr, "mailbridge: serve -service is for the Service Control Manager: start the service with `sc start mailbridge` or services.msc, or run `mailbridge serve` without -service in a console")
			return 2
		}
		fmt.Fprintln(stderr, "mailbridge: service:", err)
		return 1
	}
	return h.status
}

// scmHandler answers the Service Control Manager for the bridge: running
// once serve has started it, stopping (sessions finishing first) on Stop
// or Shutdown, and stopped with serve's exit status, which the SCM's
// recovery actions act on.
type scmHandler struct {
	run      func(ctx context.Context) int
	stopHint time.Duration
	status   int
}

func (h *scmHandler) Execute(_ []string, requests <-chan svc.ChangeRequest, changes chan<- svc.Status) (bool, uint32) {
	changes <- svc.Status{State: svc.StartPending}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan int, 1)
	go func() { done <- h.run(ctx) }()
	running := svc.Status{State: svc.Running, Accepts: svc.AcceptStop | svc.AcceptShutdown}
	changes <- running
	for {
		select {
		case h.status = <-done:
			// It ended by itself: it could not start (the log says why).
			return h.status != 0, uint32(h.status)
		case r := <-requests:
			switch r.Cmd {
			case svc.Interrogate:
				changes <- r.CurrentStatus
			case svc.Stop, svc.Shutdown:
				changes <- svc.Status{State: svc.StopPending, WaitHint: uint32(h.stopHint / time.Millisecond)}
				cancel()
				h.status = <-done
				return h.status != 0, uint32(h.status)
			default:
				changes <- running
			}
		}
	}
}

// ensureEventSource registers the service's event-log source when it is
// missing (the MSI does not register one), so that kardianos/service's
// uninstall, which removes it after the service, does not fail.
func ensureEventSource() {
	eventlog.InstallAsEventCreate(serviceName, eventlog.Error|eventlog.Warning|eventlog.Info)
}

// registerService registers the Windows service that runs serve -service
// with cfgPath, from this program's path, as `service install` does but
// without an event-log source: or, when it exists (a repair, or an
// install by `service install`), sets its command line and automatic
// start. The MSI runs it (`mailbridge msi-install`) instead of its own
// ServiceInstall table, whose command line Windows Installer may write with
// the program's path unquoted (so wine does; "C:\Program Files\..." so is
// the unquoted service path weakness, CWE-428). It returns the command
// line.
func registerService(cfgPath string) (string, error) {
	sc, err := serviceConfig(cfgPath)
	if err != nil {
		return "", err
	}
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	command := windows.EscapeArg(exe)
	for _, a := range sc.Arguments {
		command += " " + windows.EscapeArg(a)
	}
	m, err := mgr.Connect()
	if err != nil {
		return "", err
	}
	defer m.Disconnect()
	if s, err := m.OpenService(serviceName); err == nil {
		defer s.Close()
		p, err := windows.UTF16PtrFromString(command)
		if err != nil {
			return "", err
		}
		const same = windows.SERVICE_NO_CHANGE
		return command, windows.ChangeServiceConfig(s.Handle, same, windows.SERVICE_AUTO_START, same, p, nil, nil, nil, nil, nil, nil)
	}
	s, err := m.CreateService(serviceName, exe, mgr.Config{
		DisplayName:  sc.DisplayName,
		Description:  sc.Description,
		StartType:    mgr.StartAutomatic,
		ErrorControl: mgr.ErrorNormal,
		ServiceType:  windows.SERVICE_WIN32_OWN_PROCESS,
	}, sc.Arguments...)
	if err != nil {
		return "", err
	}
	defer s.Close()
	// Restart after a failure, as `service install` sets it.
	if err := s.SetRecoveryActions([]mgr.RecoveryAction{{Type: mgr.ServiceRestart, Delay: 10 * time.Second}}, 3600); err != nil {
		return command, fmt.Errorf("registered, but without restart after a failure: %w", err)
	}
	return command, nil
}
