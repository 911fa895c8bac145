// Package mime holds a message as the bridge received it and reads it
// without copying it: the spool (memory, then a temporary file), views
// made of pieces of other readers, header and address helpers, Bcc
// insertion, the MIME tree located by byte offsets, and the split of a
// large message into a draft and its attachments.
//
// It imports nothing of the bridge: every other package may use it.
package mime

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// ErrSpool marks a failure to write a message to the local disk: a
// temporary local problem (452), never the client's fault.
var ErrSpool = errors.New("spool")

// spoolMemory is how much of a message is held in memory before it goes to
// a temporary file: messages that fit one sendMail request never touch the
// disk.
const spoolMemory = 4 << 20

// Spool holds a message as it is received: in memory up to spoolMemory,
// then in a temporary file, so that a large message never sits in memory.
// It is an io.ReaderAt once written.
type Spool struct {
	dir  string
	mem  *bytes.Buffer
	file *os.File
	size int64
}

var bufferPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

// NewSpool returns an empty spool whose file, if one is needed, goes in dir
// ("" for the system's temporary directory).
func NewSpool(dir string) *Spool {
	buf := bufferPool.Get().(*bytes.Buffer)
	buf.Reset()
	return &Spool{dir: dir, mem: buf}
}

// Write implements io.Writer.
func (s *Spool) Write(p []byte) (int, error) {
	if s.file == nil && s.mem.Len()+len(p) > spoolMemory {
		f, err := os.CreateTemp(s.dir, "mailbridge-spool-*.eml")
		if err != nil {
			return 0, fmt.Errorf("%w: %v", ErrSpool, err)
		}
		s.file = f
		if _, err := f.Write(s.mem.Bytes()); err != nil {
			return 0, fmt.Errorf("%w: %v", ErrSpool, err)
		}
		s.mem.Reset()
	}
	s.size += int64(len(p))
	if s.file != nil {
		n, err := s.file.Write(p)
		if err != nil {
			return n, fmt.Errorf("%w: %v", ErrSpool, err)
		}
		return n, nil
	}
	return s.mem.Write(p)
}

// ReadAt implements io.ReaderAt.
func (s *Spool) ReadAt(p []byte, off int64) (int, error) {
	if s.file != nil {
		return s.file.ReadAt(p, off)
	}
	return bytes.NewReader(s.mem.Bytes()).ReadAt(p, off)
}

// Size is the number of bytes written.
func (s *Spool) Size() int64 { return s.size }

// Close removes the temporary file, if any, and returns the memory.
func (s *Spool) Close() error {
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

// View is a message as Graph receives it: pieces of other ReaderAts laid
// end to end, so that an added header or a removed attachment costs no
// copy of the rest.
type View []Piece

// Piece is n bytes of r from off.
type Piece struct {
	r   io.ReaderAt
	off int64
	n   int64
}

// NewPiece returns the n bytes of r from off as a piece.
func NewPiece(r io.ReaderAt, off, n int64) Piece { return Piece{r: r, off: off, n: n} }

// BytesPiece returns b as a piece.
func BytesPiece(b []byte) Piece { return Piece{r: bytes.NewReader(b), n: int64(len(b))} }

// Size is the number of bytes of v.
func (v View) Size() int64 {
	var n int64
	for _, p := range v {
		n += p.n
	}
	return n
}

// ReadAt implements io.ReaderAt.
func (v View) ReadAt(b []byte, off int64) (int, error) {
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

// Slice returns the bytes [from, to) of v as a view.
func (v View) Slice(from, to int64) View {
	var out View
	var pos int64
	for _, p := range v {
		pStart, pEnd := pos, pos+p.n
		pos = pEnd
		lo, hi := max(from, pStart), min(to, pEnd)
		if lo >= hi {
			continue
		}
		out = append(out, Piece{r: p.r, off: p.off + lo - pStart, n: hi - lo})
	}
	return out
}
