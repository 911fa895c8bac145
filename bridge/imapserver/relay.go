package imapserver

import (
	"bytes"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"mailbridge/upstream"
)

// gatherBelow is the size under which a read from Outlook waits for the
// next one if more has arrived (a full TLS record is 16 KiB).
const gatherBelow = 8 << 10

// relay passes every byte between the client and Outlook, in both
// directions, until either side ends; then it closes both. Each direction
// copies through a bounded buffer, so a slow reader slows the writer
// (backpressure) and memory stays flat however large a literal is.
//
// Outlook falling silent is a failure only while a command is outstanding:
// the client's commands and Outlook's tagged completions are counted (the
// streams are only scanned, never changed), an upstream read deadline of
// upstream_timeout is armed while the count is above zero, and IDLE,
// which waits for ever by design, disarms it until the client's DONE.
func (s *session) relay(up *upstream.IMAPConn) {
	s.state.SetBusy(false)
	timeout := s.srv.opts.Config.UpstreamTimeout.Duration
	account := s.account.Config.Name
	t := &tracker{onDownload: func() { s.srv.opts.Metrics.MailboxEvent(account, "imap", "download") }}
	var wg sync.WaitGroup
	var once sync.Once
	closeBoth := func(why string) {
		once.Do(func() {
			s.ended = why
			up.Conn.Close()
			s.conn.Close()
		})
	}
	// Bytes on their way to the client are activity: a download that
	// lasts longer than idle_timeout (a large message on a slow link) goes
	// on while the client, reading, sends nothing. The client's read
	// deadline then only makes it look whether Outlook → client wrote
	// lately or is writing now (a write to a client that reads nothing
	// ends at its own deadline).
	idle := s.srv.opts.Config.IdleTimeout.Duration
	var writing atomic.Bool
	var sentAt atomic.Int64 // when bytes last went to the client, at most renewEvery old
	arm := func() {
		if t.outstanding() && !t.idling.Load() {
			up.Conn.SetReadDeadline(time.Now().Add(timeout))
		} else {
			up.Conn.SetReadDeadline(time.Time{})
		}
	}
	wg.Add(2)
	go func() { // client → Outlook
		defer wg.Done()
		buf := make([]byte, relayBuffer)
		for {
			s.conn.SetReadDeadline(time.Now().Add(idle))
			n, err := s.r.Read(buf)
			if n > 0 {
				t.client(buf[:n])
				arm()
				up.Conn.SetWriteDeadline(time.Now().Add(timeout))
				if _, werr := up.Conn.Write(buf[:n]); werr != nil {
					closeBoth("upstream failed")
					return
				}
				s.in += int64(n)
				s.srv.opts.Metrics.ProxiedBytes("imap", "in", n)
			}
			if err != nil {
				var ne net.Error
				switch {
				case errors.As(err, &ne) && ne.Timeout() && (writing.Load() || time.Since(time.Unix(0, sentAt.Load())) < idle):
					continue // downloading
				case errors.As(err, &ne) && ne.Timeout():
					closeBoth("client idle timeout")
				case s.ctx.Err() != nil:
					closeBoth("bridge shutting down")
				default:
					closeBoth("client gone")
				}
				return
			}
		}
	}()
	go func() { // Outlook → client
		defer wg.Done()
		buf := make([]byte, relayBuffer)
		var renewed time.Time
		renewEvery := min(time.Second, idle/4)
		more := upstream.MoreArriving(up.Conn)
		filled := 0 // small reads gathered in buf, not written yet
		var wasPending bool
		for {
			n, err := up.Reader.Read(buf[filled:])
			if n > 0 || filled > 0 {
				if filled == 0 {
					wasPending = t.outstanding()
				}
				t.upstream(buf[filled : filled+n])
				filled += n
				// Small reads (a server sending a TLS record per line) are
				// gathered while Outlook has sent more, and written as soon
				// as it has not.
				if err == nil && n < gatherBelow && filled <= len(buf)-gatherBelow && (up.Reader.Buffered() > 0 || more()) {
					continue
				}
				n, filled = filled, 0
				// Deadlines are renewed at most every second: a large
				// literal comes in many reads.
				if now := time.Now(); now.Sub(renewed) > renewEvery || wasPending != t.outstanding() {
					renewed = now
					arm()
					s.conn.SetWriteDeadline(now.Add(time.Minute))
					sentAt.Store(now.UnixNano())
				}
				writing.Store(true)
				_, werr := s.conn.Write(buf[:n])
				writing.Store(false)
				if werr != nil {
					closeBoth("client gone")
					return
				}
				s.out += int64(n)
				s.srv.opts.Metrics.ProxiedBytes("imap", "out", n)
			}
			if err != nil {
				var ne net.Error
				switch {
				case errors.As(err, &ne) && ne.Timeout():
					s.log.Error().Dur("upstream_timeout", timeout).Msg("upstream silent while a command was outstanding: closing the session")
					closeBoth("upstream timeout")
				case (errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)) && t.loggedOut.Load():
					closeBoth("logout") // Outlook's BYE after the client's LOGOUT
				case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
					closeBoth("upstream closed")
				default:
					s.log.Error().Err(err).Msg("upstream connection failed: closing the client's connection")
					closeBoth("upstream failed")
				}
				return
			}
		}
	}()
	stop := make(chan struct{})
	go func() {
		select {
		case <-s.ctx.Done():
			closeBoth("bridge shutting down")
		case <-stop:
		}
	}()
	wg.Wait()
	close(stop)
}

// tracker follows the two streams closely enough to know whether a command
// is outstanding: lines and literals ({n} and {n+}), tags, IDLE and DONE.
type tracker struct {
	mu      sync.Mutex
	pending int
	idling  atomic.Bool
	idleTag string // the tag of the IDLE command in progress
	c, u    scanner
	// loggedOut: the client sent LOGOUT, so Outlook's closing is the end
	// the client asked for.
	loggedOut atomic.Bool
	// onDownload, if set, is called for each FETCH of a whole message.
	onDownload func()
}

func (t *tracker) outstanding() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.pending > 0
}

// client scans bytes from the client: each command line counts once.
func (t *tracker) client(p []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.c.feed(p, func(line []byte) {
		if t.idling.Load() {
			if upper(trimCRLF(line)) == "DONE" {
				t.idling.Store(false)
			}
			return
		}
		tag, rest := word(line)
		cmd, _ := word(rest)
		if len(tag) == 0 || tag[0] == '+' || tag[0] == '*' {
			return
		}
		t.pending++
		switch c := upper(cmd); {
		case c == "IDLE":
			t.idling.Store(true)
			t.idleTag = string(tag)
		case c == "LOGOUT":
			t.loggedOut.Store(true)
		case t.onDownload != nil && wholeMessageFetch(c, upper(rest)):
			t.onDownload()
		}
	})
}

// upstream scans bytes from Outlook: each tagged completion ends one
// command. A completion while the client waits to send a synchronising
// literal refuses the literal: the client sends none, so the client's
// scanner stops waiting for its bytes. The IDLE's own completion ends the
// IDLE, also when Outlook refused it (then no DONE comes).
func (t *tracker) upstream(p []byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.u.feed(p, func(line []byte) {
		tag, rest := word(line)
		if len(tag) > 0 && tag[0] == '+' {
			t.c.sync = false // go on: the literal's bytes come
			return
		}
		if len(tag) == 0 || tag[0] == '*' {
			return
		}
		if st, _ := word(rest); upper(st) == "OK" || upper(st) == "NO" || upper(st) == "BAD" {
			if t.pending > 0 {
				t.pending--
			}
			if t.c.sync {
				t.c.skip, t.c.continuing, t.c.sync = 0, false, false
			}
			if t.idling.Load() && string(tag) == t.idleTag {
				t.idling.Store(false)
			}
		}
	})
}

// wholeMessageFetch reports whether a command (cmd, and the line from it
// on, upper case) fetches whole messages: FETCH or UID FETCH of BODY[],
// BODY.PEEK[] or RFC822.
func wholeMessageFetch(cmd, line string) bool {
	if cmd == "UID" {
		_, rest := word([]byte(line))
		c, _ := word(rest)
		if upper(c) != "FETCH" {
			return false
		}
	} else if cmd != "FETCH" {
		return false
	}
	return strings.Contains(line, "BODY[]") || strings.Contains(line, "BODY.PEEK[]") ||
		strings.Contains(line, "RFC822 ") || strings.Contains(line, "RFC822)") || strings.HasSuffix(strings.TrimSpace(line), "RFC822")
}

// scanner splits a stream into lines, skipping the bytes of literals, and
// calls line with the start (up to 256 bytes) of each line that begins a
// new command or response (not the rest of one after a literal).
type scanner struct {
	skip       int64  // literal bytes still to pass
	sync       bool   // the literal is synchronising, not yet accepted with "+"
	head       []byte // the line's first bytes
	tailBuf    []byte // its last bytes, for a literal's announcement
	continuing bool   // the line goes on after a literal
}

func (sc *scanner) feed(p []byte, line func([]byte)) {
	for len(p) > 0 {
		if sc.skip > 0 {
			n := min(int64(len(p)), sc.skip)
			sc.skip -= n
			p = p[n:]
			continue
		}
		i := bytes.IndexByte(p, '\n')
		chunk := p
		if i >= 0 {
			chunk = p[:i+1]
		}
		p = p[len(chunk):]
		if room := 256 - len(sc.head); room > 0 {
			sc.head = append(sc.head, chunk[:min(len(chunk), room)]...)
		}
		sc.tailBuf = append(sc.tailBuf, chunk...)
		if len(sc.tailBuf) > 32 {
			sc.tailBuf = sc.tailBuf[len(sc.tailBuf)-32:]
		}
		if i < 0 {
			continue
		}
		if !sc.continuing {
			line(sc.head)
		}
		n, ok := literalAt(sc.tailBuf)
		sc.skip, sc.continuing = n, ok
		sc.sync = ok && !bytes.HasSuffix(trimCRLF(sc.tailBuf), []byte("+}"))
		sc.head, sc.tailBuf = sc.head[:0], sc.tailBuf[:0]
	}
}

// literalAt reads the literal a line announces at its end ("{123}" or
// "{123+}" before CRLF).
func literalAt(l []byte) (int64, bool) {
	l = trimCRLF(l)
	if len(l) < 3 || l[len(l)-1] != '}' {
		return 0, false
	}
	i := len(l) - 2
	if l[i] == '+' {
		i--
	}
	end := i + 1
	for i >= 0 && l[i] >= '0' && l[i] <= '9' {
		i--
	}
	if i < 0 || l[i] != '{' || i+1 == end {
		return 0, false
	}
	n, err := strconv.ParseInt(string(l[i+1:end]), 10, 64)
	return n, err == nil
}

func trimCRLF(l []byte) []byte {
	for len(l) > 0 && (l[len(l)-1] == '\n' || l[len(l)-1] == '\r') {
		l = l[:len(l)-1]
	}
	return l
}

// word returns the first space-separated word of l and the rest.
func word(l []byte) ([]byte, []byte) {
	l = trimCRLF(l)
	for i, c := range l {
		if c == ' ' {
			return l[:i], l[i+1:]
		}
	}
	return l, nil
}

func upper(b []byte) string { return string(bytes.ToUpper(b)) }
