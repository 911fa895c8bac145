package bridge_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
)

func TestLogFileRotates(t *testing.T) {
	dir := t.TempDir()
	cfg := config.LogConfig{Level: "info", Format: "json", File: filepath.Join(dir, "mailbridge.log"), MaxSizeMB: 1, MaxBackups: 3}
	out, closer := bridge.LogOutput(cfg, os.Stderr)
	log := bridge.NewLogger(out, cfg)
	line := strings.Repeat("x", 1000)
	for range 1200 { // 1.2 MB of log past a 1 MB bound
		log.Info().Str("filler", line).Msg("rotation test")
	}
	closer.Close()
	entries, _ := os.ReadDir(dir)
	if len(entries) < 2 {
		t.Fatalf("%d log files, want a rotated one besides the current", len(entries))
	}
	data, _ := os.ReadFile(cfg.File)
	if !strings.Contains(string(data), `"message":"rotation test"`) {
		t.Error("the current log file has no JSON lines")
	}
}
