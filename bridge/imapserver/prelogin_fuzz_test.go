package imapserver

import (
	"context"
	"io"
	"net"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"mailbridge/bridge/admin"
	"mailbridge/bridge/config"
	"mailbridge/bridge/conntrack"
)

// FuzzPreLoginParser feeds any bytes to the parser that reads commands
// before login: it never panics, never returns a command whose line and
// literals together exceed maxCommand, and never reads more of one command
// than that before giving up.
func FuzzPreLoginParser(f *testing.F) {
	f.Add([]byte("a LOGIN user pass\r\n"))
	f.Add([]byte("a LOGIN {4+}\r\nuser {4}\r\npass\r\nb CAPABILITY\r\n"))
	f.Add([]byte("a LOGIN \"us\\\"er\" \"p\\\\ass\"\r\nb AUTHENTICATE PLAIN =\r\n"))
	f.Add([]byte("a LOGIN {8192+}\r\n" + string(make([]byte, 8192)) + " {8192+}\r\n"))
	f.Add([]byte("a X {99999999999999999999}\r\n\r\n\r\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		cfg := config.Default().IMAP
		cfg.IdleTimeout = config.Duration{Duration: time.Minute}
		srv := New(Options{Config: cfg, Conns: &conntrack.Tracker{}, Metrics: admin.NewMetrics(), Log: zerolog.Nop(), Context: context.Background()})
		client, server := net.Pipe()
		defer client.Close()
		go func() {
			client.Write(in)
			client.Close()
		}()
		go io.Copy(io.Discard, client) // "+ Ready" and BAD answers
		s := srv.newSession(server)
		defer s.cancel()
		for {
			_, cmd, args, err := s.readCommand()
			if err != nil {
				return
			}
			size := len(cmd)
			for _, a := range args {
				size += len(a)
			}
			if size > maxCommand {
				t.Fatalf("a command of %d bytes passed the %d-byte bound", size, maxCommand)
			}
		}
	})
}
