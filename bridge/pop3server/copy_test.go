package pop3server

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"mailbridge/upstream"
)

// FuzzCopyMultiline checks the data path against a reference: any message,
// dot-stuffed as a server does, is copied exactly up to its terminator and
// no further.
func FuzzCopyMultiline(f *testing.F) {
	f.Add([]byte("a\r\n.\r\nb"), []byte("+OK next"))
	f.Add([]byte(".\r\n..\r\n\r\r\n\n.x"), []byte(""))
	f.Add([]byte{}, []byte("tail"))
	f.Fuzz(func(t *testing.T, msg, tail []byte) {
		var stuffed bytes.Buffer
		if err := writeStuffedReference(&stuffed, msg); err != nil {
			t.Skip()
		}
		src := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(stuffed.Bytes()), bytes.NewReader(tail)), 16)
		var got bytes.Buffer
		n, err := copyMultiline(&got, nil, src, never, func() {}, 0)
		if err != nil || n != int64(stuffed.Len()) || !bytes.Equal(got.Bytes(), stuffed.Bytes()) {
			t.Fatalf("copied %d %q (%v), want %q", n, got.Bytes(), err, stuffed.Bytes())
		}
		rest, _ := io.ReadAll(src)
		if !bytes.Equal(rest, tail) {
			t.Fatalf("left %q, want %q", rest, tail)
		}
	})
}

// never is the copy's "more arriving" for a source that is not a socket.
func never() bool { return false }

// writeStuffedReference dot-stuffs msg line by line (CRLF lines) and adds
// the terminator, as RFC 1939 §3 describes.
func writeStuffedReference(w *bytes.Buffer, msg []byte) error {
	if len(msg) > 0 && !bytes.HasSuffix(msg, []byte("\r\n")) {
		msg = append(msg[:len(msg):len(msg)], "\r\n"...)
	}
	for _, line := range bytes.SplitAfter(msg, []byte("\r\n")) {
		if len(line) == 0 {
			continue
		}
		if line[0] == '.' {
			w.WriteByte('.')
		}
		w.Write(line)
	}
	w.WriteString(".\r\n")
	return nil
}

// notifyWriter passes each write on a channel.
type notifyWriter chan []byte

func (w notifyWriter) Write(p []byte) (int, error) {
	w <- bytes.Clone(p)
	return len(p), nil
}

// TestCopyMultilineWritesWhatArrived: while Outlook is slow to send the
// rest, what has arrived already reaches the client (it is not held back
// until a buffer fills or the answer ends).
func TestCopyMultilineWritesWhatArrived(t *testing.T) {
	upstreamR, upstreamW := io.Pipe()
	defer upstreamW.Close()
	src := bufio.NewReaderSize(upstreamR, 64<<10)
	client := make(notifyWriter, 16)
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := copyMultiline(client, []byte("+OK\r\n"), src, never, func() {}, 0)
		done <- result{n, err}
	}()
	var got []byte
	waitFor := func(want string) {
		t.Helper()
		for !bytes.Equal(got, []byte(want)) {
			select {
			case p := <-client:
				got = append(got, p...)
			case <-time.After(time.Minute):
				t.Fatalf("the client has %q, want %q", got, want)
			}
		}
	}
	upstreamW.Write([]byte("first line\r\n"))
	waitFor("+OK\r\nfirst line\r\n")
	upstreamW.Write([]byte("second\r\n"))
	waitFor("+OK\r\nfirst line\r\nsecond\r\n")
	upstreamW.Write([]byte(".\r\n"))
	waitFor("+OK\r\nfirst line\r\nsecond\r\n.\r\n")
	if r := <-done; r.err != nil || r.n != int64(len("first line\r\nsecond\r\n.\r\n")) {
		t.Fatalf("copyMultiline = %d, %v", r.n, r.err)
	}
}

// failingWriter takes limit bytes, then fails.
type failingWriter struct{ limit int }

func (w *failingWriter) Write(p []byte) (int, error) {
	if len(p) > w.limit {
		n := w.limit
		w.limit = 0
		return n, errors.New("connection reset by peer")
	}
	w.limit -= len(p)
	return len(p), nil
}

// TestCopyMultilineStopsWhenClientFails: a client gone in the middle of a
// large download ends the copy with the write's error; the rest of the
// answer is not read into memory.
func TestCopyMultilineStopsWhenClientFails(t *testing.T) {
	body := bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n"), 1<<16) // 4 MiB
	src := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(body), bytes.NewReader([]byte(".\r\n"))), 16<<10)
	n, err := copyMultiline(&failingWriter{limit: 100 << 10}, []byte("+OK\r\n"), src, never, func() {}, 0)
	if err == nil || err.Error() != "connection reset by peer" {
		t.Fatalf("copyMultiline = %d, %v; want the client's error", n, err)
	}
	if n > 100<<10+64<<10 { // one read of src past the failure at most
		t.Fatalf("read %d bytes after the client failed at 100 KiB", n)
	}
}

// FuzzIndexTerminator checks the dot-first search against bytes.Index.
func FuzzIndexTerminator(f *testing.F) {
	for _, s := range []string{"", ".", "\r\n.\r\n", "a.\r\n.\r\n", "\r\n.\r", "x\r\n..\r\n\r\n.\r\nz", "..\r\n.\r\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := indexTerminator(b), bytes.Index(b, []byte("\r\n.\r\n")); got != want {
			t.Fatalf("indexTerminator(%q) = %d, want %d", b, got, want)
		}
	})
}

// countingWriter counts writes and keeps what they carried.
type countingWriter struct {
	bytes.Buffer
	writes int
}

func (w *countingWriter) Write(p []byte) (int, error) {
	w.writes++
	return w.Buffer.Write(p)
}

// TestCopyMultilineGathersSmallReads: an answer that comes in many small
// reads (as from a server that sends one TLS record per line) while more
// has arrived on the socket is written in few writes, not one per read.
func TestCopyMultilineGathersSmallReads(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var answer []byte
	for range 500 {
		answer = append(answer, "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ;\r\n"...)
	}
	answer = append(answer, ".\r\n"...)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		for line := range bytes.Lines(answer) {
			if _, err := c.Write(line); err != nil {
				return
			}
		}
		io.Copy(io.Discard, c) // until the test is done
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for deadline := time.Now().Add(time.Minute); upstream.Unread(c) < len(answer); {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of %d bytes arrived", upstream.Unread(c), len(answer))
		}
		time.Sleep(10 * time.Millisecond)
	}
	var got countingWriter
	src := bufio.NewReaderSize(c, 16) // reads of 16 bytes, as small as records of a line
	n, err := copyMultiline(&got, []byte("+OK\r\n"), src, upstream.MoreArriving(c), func() {}, 0)
	if err != nil || n != int64(len(answer)) || !bytes.Equal(got.Bytes(), append([]byte("+OK\r\n"), answer...)) {
		t.Fatalf("copyMultiline = %d, %v; the client has %d bytes", n, err, got.Len())
	}
	if got.writes > 2 {
		t.Errorf("%d writes for %d reads of a %d-byte answer that had arrived whole", got.writes, len(answer)/16, len(answer))
	}
}
