package bridge

import (
	"io"
	"time"

	"github.com/rs/zerolog"
)

// NewLogger returns the root logger for cfg, writing to w: one JSON object
// per line, or aligned text for a human at a console.
func NewLogger(w io.Writer, cfg LogConfig) zerolog.Logger {
	if cfg.Format == "console" {
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: time.DateTime}
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
