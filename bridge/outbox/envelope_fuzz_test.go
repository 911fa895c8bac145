package outbox

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzReadEnvelope feeds arbitrary envelope files to the loader: it never
// panics, and what it accepts names its own file and matches its message.
func FuzzReadEnvelope(f *testing.F) {
	f.Add([]byte(`{"id":"x","account":"a","size":3}`), 3)
	f.Add([]byte(`{"id":"y"}`), 0)
	f.Add([]byte(``), 1)
	f.Add([]byte(`{"id":"x","size":-1}`), 0)
	dir := f.TempDir()
	s, err := Open(dir)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, envelope []byte, emlSize int) {
		if emlSize < 0 || emlSize > 1<<16 {
			return
		}
		os.WriteFile(filepath.Join(dir, "queue", "x.json"), envelope, 0o600)
		// A sparse file of the size: cheap, so that minimizing an input
		// (thousands of runs) takes seconds, not the whole fuzz time.
		os.WriteFile(filepath.Join(dir, "queue", "x.eml"), nil, 0o600)
		os.Truncate(filepath.Join(dir, "queue", "x.eml"), int64(emlSize))
		env, err := s.readEnvelope("queue", "x")
		if err != nil {
			return
		}
		if env.ID != "x" || env.Size != int64(emlSize) {
			t.Fatalf("accepted %q with id %q and size %d for a %d-byte message", envelope, env.ID, env.Size, emlSize)
		}
	})
}
