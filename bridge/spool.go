package bridge

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
)

// errSpool marks a failure to write a message to the local disk: a
// temporary local problem (452), never the client's fault.
var errSpool = errors.New("spool")

// spoolMemory is how much of a message is held in memory before it goes to
// a temporary file: messages that fit one sendMail request never touch the
// disk.
const spoolMemory = 4 << 20

// spool holds a message as it is received: in memory up to spoolMemory,
// then in a temporary file, so that a large message never sits in memory.
// It is an io.ReaderAt once written.
type spool struct {
	dir  string
	mem  *bytes.Buffer
	file *os.File
	size int64
}

func newSpool(dir string) *spool {
	buf := bufferPool.Get().(*bytes.Buffer)
	buf.Reset()
	return &spool{dir: dir, mem: buf}
}

// Write implements io.Writer.
func (s *spool) Write(p []byte) (int, error) {
	if s.file == nil && s.mem.Len()+len(p) > spoolMemory {
		f, err := os.CreateTemp(s.dir, "mailbridge-spool-*.eml")
		if err != nil {
			return 0, fmt.Errorf("%w: %v", errSpool, err)
		}
		s.file = f
		if _, err := f.Write(s.mem.Bytes()); err != nil {
			return 0, fmt.Errorf("%w: %v", errSpool, err)
		}
		s.mem.Reset()
	}
	s.size += int64(len(p))
	if s.file != nil {
		n, err := s.file.Write(p)
		if err != nil {
			return n, fmt.Errorf("%w: %v", errSpool, err)
		}
		return n, nil
	}
	return s.mem.Write(p)
}

// ReadAt implements io.ReaderAt.
func (s *spool) ReadAt(p []byte, off int64) (int, error) {
	if s.file != nil {
		return s.file.ReadAt(p, off)
	}
	return bytes.NewReader(s.mem.Bytes()).ReadAt(p, off)
}

// Size is the number of bytes written.
func (s *spool) Size() int64 { return s.size }

// Close removes the temporary file, if any, and returns the memory.
func (s *spool) Close() error {
	if s.mem != nil && s.mem.Cap() <= spoolMemory*2 {
		bufferPool.Put(s.mem)
	}
	s.mem = nil
	if s.file == nil {
		return nil
	}
	name := s.file.Name()
	s.file.Close()
	return os.Remove(name)
}

// view is a message as Graph receives it: pieces of other ReaderAts laid
// end to end, so that an added header or a removed attachment costs no
// copy of the rest.
type view []piece

type piece struct {
	r   io.ReaderAt
	off int64
	n   int64
}

func bytesPiece(b []byte) piece { return piece{r: bytes.NewReader(b), n: int64(len(b))} }

func (v view) size() int64 {
	var n int64
	for _, p := range v {
		n += p.n
	}
	return n
}

// ReadAt implements io.ReaderAt.
func (v view) ReadAt(b []byte, off int64) (int, error) {
	n := 0
	for _, p := range v {
		if off >= p.n {
			off -= p.n
			continue
		}
		want := min(int64(len(b)-n), p.n-off)
		got, err := p.r.ReadAt(b[n:n+int(want)], p.off+off)
		n += got
		if err != nil && !(err == io.EOF && int64(got) == want) {
			return n, err
		}
		off = 0
		if n == len(b) {
			return n, nil
		}
	}
	return n, io.EOF
}

// slice returns the bytes [from, to) of v as a view.
func (v view) slice(from, to int64) view {
	var out view
	var pos int64
	for _, p := range v {
		pStart, pEnd := pos, pos+p.n
		pos = pEnd
		lo, hi := max(from, pStart), min(to, pEnd)
		if lo >= hi {
			continue
		}
		out = append(out, piece{r: p.r, off: p.off + lo - pStart, n: hi - lo})
	}
	return out
}
