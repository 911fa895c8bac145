package smtpserver

import (
	"bytes"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
)

// Limits of the guard.
const (
	// MaxCommandLine bounds an SMTP command line: RFC 5321 §4.5.3.1.4
	// allows 512 octets; AUTH PLAIN lines and long addresses need more.
	MaxCommandLine = 4096
	// maxLongLines is how many over-long command lines a client may send
	// before the connection is closed.
	maxLongLines = 3
)

// guardConn sits between the client's connection and go-smtp, which has
// one line limit for commands and message lines (a message line may be as
// long as a message Graph takes). It reads the client's bytes as go-smtp
// will and:
//
//   - bounds command lines at MaxCommandLine: a longer line is dropped
//     unread by go-smtp and answered "500 5.5.2 Line too long"; after
//     maxLongLines of them the connection is closed. So a client that has
//     not logged in costs a few kilobytes, whatever it sends.
//   - keeps every byte of the message in DATA: go-smtp's dot-reader drops
//     the CR of a line that starts with an unstuffed ".\r" (RFC 5321
//     §4.5.2 removes only the dot), so such a CR is doubled for it to
//     remove. It follows go-smtp's idea of where lines start, so that both
//     agree on where the message ends; go-smtp misses a line start after
//     "\r\r\n" (a CR after a CR is data to it), which the guard cannot
//     mend without changing the message.
//
// It follows the conversation by the server's replies: "354" starts a
// message (which ends at CRLF "." CRLF), "220" to STARTTLS hands the
// connection to TLS, which it then passes through untouched, and "334"
// makes the next line an AUTH response, not a command. It passes BDAT
// chunks untouched, and only those go-smtp reads: a BDAT line that
// go-smtp's parser takes (one size below 2^32, then LAST or nothing)
// where go-smtp reads a command. To know which lines are commands, it
// gives go-smtp one command line at a time and holds what follows until
// go-smtp has acted on it (and written its reply).
type guardConn struct {
	net.Conn
	log func(what string)

	mu       sync.Mutex // guards mode against the writes of replies
	mode     int
	line     []byte // the command line so far (command mode)
	dropping bool   // inside an over-long line
	long     int    // over-long lines so far
	startTLS bool   // the last command was STARTTLS
	bdat     int64  // chunk bytes still to pass (BDAT)
	auth     bool   // the server asked for an AUTH response (334)
	pending  []byte // client bytes read, not yet filtered (within buf)
	dot      int    // data mode: 0 in a line, 1 at a line start, 2 after ".", 3 after ".\r"; -1 after CR
	out      []byte // transformed bytes not yet returned
	buf      []byte
	closing  bool
}

const (
	modeCommand = iota
	modeData
	modePass
)

// Read buffer sizes: small while commands come (a connection that has not
// logged in costs little), large once a message or TLS streams through.
const (
	commandBuffer = 4 << 10
	streamBuffer  = 32 << 10
)

func newGuardConn(c net.Conn, log func(string)) *guardConn {
	return &guardConn{Conn: c, log: log, buf: make([]byte, commandBuffer)}
}

// NetConn returns the connection the guard reads from.
func (g *guardConn) NetConn() net.Conn { return g.Conn }

// go-smtp answers bad base64 in an AUTH exchange 454 4.7.0 (temporary, so
// clients retry for ever) before any hook of ours sees it; RFC 4954 §4
// says 501. The guard corrects the reply on its way out.
var (
	goSMTPBadBase64 = []byte("454 4.7.0 Invalid base64 data\r\n")
	badBase64Reply  = []byte("501 5.5.2 Invalid base64 data\r\n")
)

// Write passes the server's replies and watches them for the ones that
// change what the client sends next.
func (g *guardConn) Write(p []byte) (int, error) {
	if bytes.Equal(p, goSMTPBadBase64) {
		if _, err := g.Conn.Write(badBase64Reply); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	g.mu.Lock()
	// Pipelined replies may come in one write: look at each line start.
	switch {
	case g.mode == modeCommand && replyStarts(p, "354"):
		g.mode, g.dot = modeData, 1
	case g.mode == modeCommand && g.startTLS && replyStarts(p, "220"):
		g.mode = modePass
	case g.mode == modeCommand && replyStarts(p, "334"):
		g.auth = true
	}
	g.mu.Unlock()
	return g.Conn.Write(p)
}

// Read returns the client's bytes as go-smtp must see them.
func (g *guardConn) Read(p []byte) (int, error) {
	for len(g.out) == 0 {
		if g.closing {
			return 0, io.EOF
		}
		if len(g.pending) > 0 {
			g.filter()
			continue
		}
		if len(g.buf) < streamBuffer {
			g.mu.Lock()
			streaming := g.mode != modeCommand || g.bdat > 0
			g.mu.Unlock()
			if streaming {
				g.buf = make([]byte, streamBuffer)
			}
		}
		n, err := g.Conn.Read(g.buf[:min(len(g.buf), max(len(p), 512))])
		if n > 0 {
			g.pending = g.buf[:n]
			g.filter()
		}
		if err != nil {
			if len(g.out) > 0 {
				break
			}
			return 0, err
		}
	}
	n := copy(p, g.out)
	g.out = g.out[n:]
	if len(g.out) == 0 {
		g.out = nil
	}
	return n, nil
}

// filter moves the pending bytes that go-smtp may read to g.out; it stops
// after a command line, so that go-smtp acts on it before the guard reads
// what follows.
func (g *guardConn) filter() {
	g.mu.Lock()
	defer g.mu.Unlock()
	in := g.pending
	defer func() { g.pending = in }()
	for len(in) > 0 {
		switch {
		case g.mode == modePass:
			g.out = append(g.out, in...)
			in = nil
		case g.bdat > 0:
			n := int(min(int64(len(in)), g.bdat))
			g.out = append(g.out, in[:n]...)
			g.bdat -= int64(n)
			in = in[n:]
		case g.mode == modeData:
			in = g.filterData(in)
		default:
			var line bool
			if in, line = g.filterCommand(in); line {
				return
			}
		}
	}
}

// filterCommand takes command bytes up to the end of a line; line says
// whether a whole line went to go-smtp.
func (g *guardConn) filterCommand(in []byte) (rest []byte, line bool) {
	i := bytes.IndexByte(in, '\n')
	chunk := in
	if i >= 0 {
		chunk = in[:i+1]
	}
	rest = in[len(chunk):]
	if g.dropping {
		if i >= 0 {
			g.dropping = false
		}
		return rest, false
	}
	// The bytes held are bounded before the line ends; the line itself
	// is measured without its ending, which may be a bare LF.
	if len(g.line)+len(chunk) > MaxCommandLine+2 {
		g.line = g.line[:0]
		g.dropping = i < 0
		return g.refuseLong(rest), false
	}
	g.line = append(g.line, chunk...)
	if i < 0 {
		return rest, false
	}
	cmd := strings.TrimRight(string(g.line), "\r\n")
	g.line = g.line[:0]
	if len(cmd) > MaxCommandLine {
		return g.refuseLong(rest), false
	}
	g.out = append(g.out, cmd...)
	g.out = append(g.out, '\r', '\n')
	if g.auth { // an AUTH response, whatever it looks like
		g.auth, g.startTLS = false, false
		return rest, true
	}
	g.startTLS = strings.HasPrefix(strings.ToUpper(cmd), "STARTTLS")
	g.bdat = bdatChunk(cmd)
	return rest, true
}

// refuseLong answers a command line over MaxCommandLine, which go-smtp
// never sees, and closes the connection at the maxLongLines-th; it returns
// what is left to read (nothing once closing).
func (g *guardConn) refuseLong(rest []byte) []byte {
	g.long++
	if g.long >= maxLongLines {
		g.Conn.Write([]byte("421 4.7.0 Too many long lines, closing connection\r\n"))
		g.log("connection closed: too many command lines over 4096 bytes")
		g.closing = true
		return nil
	}
	g.Conn.Write([]byte("500 5.5.2 Line too long\r\n"))
	g.log("command refused: line over 4096 bytes")
	return rest
}

// bdatChunk returns the size of the chunk go-smtp reads after the command
// line cmd, 0 if it reads none: go-smtp's parseCmd and handleBdat, rule
// for rule (a four-letter verb, a space, then a size that ParseUint takes
// in 32 bits and an optional LAST; a malformed one gets 501 and no chunk
// is read).
func bdatChunk(cmd string) int64 {
	if len(cmd) < 6 || cmd[4] != ' ' || !strings.EqualFold(cmd[:4], "BDAT") {
		return 0
	}
	args := strings.Fields(cmd[5:])
	if len(args) == 0 || len(args) > 2 || (len(args) == 2 && !strings.EqualFold(args[1], "LAST")) {
		return 0
	}
	n, err := strconv.ParseUint(args[0], 10, 32)
	if err != nil {
		return 0
	}
	return int64(n)
}

// filterData passes message bytes, doubling the CR of a line that starts
// with ".\r" not followed by LF, until the CRLF "." CRLF that ends the
// message.
func (g *guardConn) filterData(in []byte) []byte {
	for i := 0; i < len(in); i++ {
		// Inside a line nothing matters until the next CR: copy up to it
		// at once.
		if g.dot == 0 {
			j := bytes.IndexByte(in[i:], '\r')
			if j < 0 {
				g.out = append(g.out, in[i:]...)
				return nil
			}
			g.out = append(g.out, in[i:i+j]...)
			i += j
		}
		c := in[i]
		switch g.dot {
		case 1: // at a line start
			g.dot = 0
			if c == '.' {
				g.dot = 2
			}
		case 2: // after a line-start "."
			g.dot = 0
			if c == '\r' {
				g.dot = 3
			}
		case 3: // after a line-start ".\r"
			if c == '\n' { // the end of the message
				g.out = append(g.out, c)
				g.mode, g.dot = modeCommand, 0
				return in[i+1:]
			}
			g.out = append(g.out, '\r') // go-smtp drops one CR here
			g.dot = 0
		case -1: // after a CR
			g.dot = 0
			g.out = append(g.out, c)
			if c == '\n' {
				g.dot = 1
			}
			// As go-smtp's reader: a CR after a CR is data, not the start of
			// a line end (so "\r\r\n." is no line start to it either).
			continue
		}
		if g.dot == 0 && c == '\r' {
			g.dot = -1
		}
		g.out = append(g.out, c)
	}
	return nil
}

// replyStarts reports whether a line of p starts with code and a space.
func replyStarts(p []byte, code string) bool {
	return bytes.HasPrefix(p, []byte(code+" ")) || bytes.Contains(p, []byte("\n"+code+" "))
}

// guardListener wraps the connections it accepts in a guardConn.
type guardListener struct {
	net.Listener
	srv *Server
}

func (l *guardListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	remote := c.RemoteAddr().String()
	return newGuardConn(c, func(what string) { l.srv.log.Warn().Str("remote", remote).Msg(what) }), nil
}
