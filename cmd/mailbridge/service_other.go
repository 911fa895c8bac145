//go:build !windows

package main

import (
	"context"
	"errors"
	"io"
)

// runAsService runs serve under systemd or SysV init as in a terminal:
// ctx ends on SIGTERM, as on a service stop, and a configuration or start
// failure ends the process with its status.
func runAsService(ctx context.Context, _ string, run func(ctx context.Context) int, _ io.Writer) int {
	return run(ctx)
}

// ensureEventSource is Windows' alone.
func ensureEventSource() {}

// registerService is Windows' alone: the MSI runs it.
func registerService(string) (string, error) {
	return "", errors.New("the service is registered this way on Windows only: use `mailbridge service install`")
}
