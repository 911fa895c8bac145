package bridge

import (
	"io"
	"mailbridge/bridge/config"
	"os"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/term"
	"gopkg.in/natefinch/lumberjack.v2"
)

// LogOutput returns where the log goes: stderr, or the rotated file of
// cfg.File. Close the closer at exit.
func LogOutput(cfg config.LogConfig, stderr io.Writer) (io.Writer, io.Closer) {
	if cfg.File == "" {
		return stderr, io.NopCloser(nil)
	}
	lj := &lumberjack.Logger{Filename: cfg.File, MaxSize: cfg.MaxSizeMB, MaxBackups: cfg.MaxBackups, MaxAge: cfg.MaxAgeDays}
	return lj, lj
}

// NewLogger returns the root logger for cfg, writing to w: one JSON object
// per line, or aligned text for a human at a console.
func NewLogger(w io.Writer, cfg config.LogConfig) zerolog.Logger {
	if cfg.Format == "console" {
		// Colours only for a person at a terminal: never in a file, a pipe
		// or a service's log.
		f, ok := w.(*os.File)
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: time.DateTime, NoColor: !ok || !term.IsTerminal(int(f.Fd()))}
	}
	level, err := zerolog.ParseLevel(cfg.Level)
	if err != nil || cfg.Level == "" {
		level = zerolog.InfoLevel
	}
	return zerolog.New(w).Level(level).With().Timestamp().Logger()
}

func init() {
	zerolog.TimeFieldFormat = "2006-01-02T15:04:05.000Z07:00"
	zerolog.DurationFieldUnit = time.Millisecond
}
