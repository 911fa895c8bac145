// Package outlookpop is the fake Outlook POP3 service of m365fake: implicit
// TLS on loopback, SASL XOAUTH2 logins checked by the caller's Authorizer,
// Exchange Online's texts and 512-byte command limit, mailboxes of raw
// messages, and injected faults.
package outlookpop

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Outlook's POP3 answers, as Exchange Online gives them.
const (
	pop3AuthFailed  = "-ERR Authentication failure: unknown user name or bad password."
	pop3TooLong     = "-ERR Protocol error. Connection is closed. 10"
	pop3SignOff     = "+OK Microsoft Exchange Server 2016 POP3 server signing off."
	pop3AuthOK      = "+OK User successfully authenticated."
	pop3MaxCmdBytes = 512 // Outlook's command line limit, CRLF included
)

// popMessage is a message in a fake mailbox.
type popMessage struct {
	uid     string
	data    []byte
	stuffed []byte // the RETR answer's body, for WritesBulk; made on first use
}

// Writes says how the service writes a RETR answer.
type Writes int

const (
	// WritesBuffered writes 32 KiB at a time (the default).
	WritesBuffered Writes = iota
	// WritesBulk writes the whole answer, dot-stuffed in advance, in one
	// write: as fast as a server can answer, so that a benchmark measures
	// what is between it and the client.
	WritesBulk
	// WritesLinePerRecord flushes each line: one TLS record per line.
	WritesLinePerRecord
)

// Fault is an injected failure of the fake Outlook POP3 service.
type Fault struct {
	// DropRetrAfter closes the connection after this many bytes of the next
	// RETR answer have been written (0: no drop).
	DropRetrAfter int
	// Delay is waited before each answer of the next session.
	Delay time.Duration
	// RefuseAuth refuses the next XOAUTH2 login even with a good token.
	RefuseAuth bool
	// StallRetr answers the next session's RETR with "+OK" and then
	// nothing more, keeping the connection open.
	StallRetr bool
}

// Authorizer checks a SASL XOAUTH2 response (base64) for an app holding
// role and returns the mailbox (a primary address) it opens.
type Authorizer func(xoauth2, role string) (mailbox string, ok bool)

// Options configure the service.
type Options struct {
	Certificate tls.Certificate
	Authorize   Authorizer
	// NameTag is the bracket of the greeting: the server name in
	// UTF-16LE, base64.
	NameTag string
}

// Service is a running fake Outlook POP3 service.
type Service struct {
	opts      Options
	ln        net.Listener
	mu        sync.Mutex
	boxes     map[string][]popMessage // by primary address
	faults    []Fault
	nextUID   int
	logins    int
	accepted  int
	wg        sync.WaitGroup
	closeOnce sync.Once
	conns     map[net.Conn]bool
	writes    Writes
}

// SetWrites sets how RETR answers are written from now on.
func (s *Service) SetWrites(w Writes) {
	s.mu.Lock()
	s.writes = w
	s.mu.Unlock()
}

// Start starts the service with implicit TLS on a free port of 127.0.0.1.
func Start(opts Options) (*Service, error) {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{opts.Certificate}, MinVersion: tls.VersionTLS12})
	if err != nil {
		return nil, fmt.Errorf("fake outlook pop3: %w", err)
	}
	s := &Service{opts: opts, ln: ln, boxes: map[string][]popMessage{}, conns: map[net.Conn]bool{}}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			s.conns[c] = true
			s.accepted++
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.serve(c)
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
			}()
		}
	}()
	return s, nil
}

// Close stops the service and closes its connections.
func (s *Service) Close() {
	s.closeOnce.Do(func() {
		s.ln.Close()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		s.wg.Wait()
	})
}

// Addr is the service's address.
func (s *Service) Addr() string { return s.ln.Addr().String() }

// Add puts a raw message into mailbox and returns its UID.
func (s *Service) Add(mailbox string, raw []byte) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextUID++
	uid := fmt.Sprintf("AAQkAD%08d", s.nextUID)
	s.boxes[mailbox] = append(s.boxes[mailbox], popMessage{uid: uid, data: raw})
	return uid
}

// UIDs returns the UIDs of the messages in mailbox, oldest first.
func (s *Service) UIDs(mailbox string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var uids []string
	for _, m := range s.boxes[mailbox] {
		uids = append(uids, m.uid)
	}
	return uids
}

// Fail queues a fault for the next session.
func (s *Service) Fail(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, f)
}

// Connections counts the connections the service accepted.
func (s *Service) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted
}

// Logins counts successful XOAUTH2 logins.
func (s *Service) Logins() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.logins
}

type popSession struct {
	s       *Service
	conn    net.Conn
	r       *bufio.Reader
	w       *bufio.Writer
	fault   Fault
	mailbox string
	msgs    []popMessage // snapshot at login
	deleted map[int]bool
}

func (p *popSession) reply(lines ...string) error {
	if p.fault.Delay > 0 {
		time.Sleep(p.fault.Delay)
	}
	for _, l := range lines {
		p.w.WriteString(l)
		p.w.WriteString("\r\n")
	}
	return p.w.Flush()
}

func (s *Service) serve(conn net.Conn) {
	p := &popSession{s: s, conn: conn, r: bufio.NewReaderSize(conn, 1024), w: bufio.NewWriterSize(conn, 64<<10), deleted: map[int]bool{}}
	s.mu.Lock()
	if len(s.faults) > 0 {
		p.fault = s.faults[0]
		s.faults = s.faults[1:]
	}
	s.mu.Unlock()
	conn.SetDeadline(time.Now().Add(10 * time.Minute))
	if p.reply("+OK The Microsoft Exchange POP3 service is ready. ["+s.opts.NameTag+"]") != nil {
		return
	}
	for {
		line, err := p.readLine(pop3MaxCmdBytes)
		if err != nil {
			if err == errLineTooLong {
				p.reply(pop3TooLong)
			}
			return
		}
		cmd, arg, _ := strings.Cut(line, " ")
		cmd = strings.ToUpper(cmd)
		if cmd == "QUIT" {
			p.commit()
			p.reply(pop3SignOff)
			return
		}
		if p.mailbox == "" {
			if !p.authorization(cmd, arg) {
				return
			}
			continue
		}
		if !p.transaction(cmd, arg) {
			return
		}
	}
}

var errLineTooLong = fmt.Errorf("command line too long")

// readLine reads a line of at most limit bytes, CRLF included: Outlook's
// 512 for commands, more for a SASL response (it carries the token).
func (p *popSession) readLine(limit int) (string, error) {
	var line []byte
	for {
		chunk, isPrefix, err := p.r.ReadLine()
		if err != nil {
			return "", err
		}
		line = append(line, chunk...)
		if len(line)+2 > limit {
			return "", errLineTooLong
		}
		if !isPrefix {
			return string(line), nil
		}
	}
}

// authorization serves a command before login; false ends the session.
func (p *popSession) authorization(cmd, arg string) bool {
	switch cmd {
	case "CAPA":
		return p.reply("+OK", "TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER", ".") == nil
	case "USER":
		return p.reply("+OK") == nil
	case "PASS":
		return p.reply(pop3AuthFailed) == nil // basic authentication is off
	case "AUTH":
		mech, ir, _ := strings.Cut(arg, " ")
		if !strings.EqualFold(mech, "XOAUTH2") {
			return p.reply(pop3AuthFailed) == nil
		}
		resp := ir
		if resp == "" {
			if p.reply("+ ") != nil {
				return false
			}
			var err error
			if resp, err = p.readLine(64 << 10); err != nil {
				if err == errLineTooLong {
					p.reply(pop3TooLong)
				}
				return false
			}
		}
		mailbox, ok := p.s.opts.Authorize(resp, "POP.AccessAsApp")
		if !ok || p.fault.RefuseAuth {
			return p.reply(pop3AuthFailed) == nil
		}
		p.s.mu.Lock()
		p.mailbox = mailbox
		p.msgs = slices.Clone(p.s.boxes[mailbox])
		p.s.logins++
		p.s.mu.Unlock()
		return p.reply(pop3AuthOK) == nil
	case "NOOP", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET":
		return p.reply("-ERR Command is not valid in this state.") == nil
	}
	return p.reply("-ERR Protocol error. 14") == nil
}

// msg returns the message numbered by arg (1-based), if it exists and is
// not deleted.
func (p *popSession) msg(arg string) (int, *popMessage, bool) {
	n, err := strconv.Atoi(strings.TrimSpace(arg))
	if err != nil || n < 1 || n > len(p.msgs) || p.deleted[n] {
		return 0, nil, false
	}
	return n, &p.msgs[n-1], true
}

// transaction serves a command after login; false ends the session.
func (p *popSession) transaction(cmd, arg string) bool {
	const noSuch = "-ERR The specified message is out of range."
	switch cmd {
	case "CAPA":
		return p.reply("+OK", "TOP", "UIDL", "SASL PLAIN XOAUTH2", "USER", ".") == nil
	case "NOOP":
		return p.reply("+OK") == nil
	case "STAT":
		n, size := 0, 0
		for i, m := range p.msgs {
			if !p.deleted[i+1] {
				n++
				size += len(m.data)
			}
		}
		return p.reply(fmt.Sprintf("+OK %d %d", n, size)) == nil
	case "LIST", "UIDL":
		item := func(i int, m *popMessage) string {
			if cmd == "LIST" {
				return fmt.Sprintf("%d %d", i, len(m.data))
			}
			return fmt.Sprintf("%d %s", i, m.uid)
		}
		if arg != "" {
			i, m, ok := p.msg(arg)
			if !ok {
				return p.reply(noSuch) == nil
			}
			return p.reply("+OK "+item(i, m)) == nil
		}
		lines := []string{"+OK"}
		for i := range p.msgs {
			if !p.deleted[i+1] {
				lines = append(lines, item(i+1, &p.msgs[i]))
			}
		}
		return p.reply(append(lines, ".")...) == nil
	case "RETR", "TOP":
		num, lines, _ := strings.Cut(arg, " ")
		_, m, ok := p.msg(num)
		if !ok {
			return p.reply(noSuch) == nil
		}
		maxBody := -1
		if cmd == "TOP" {
			n, err := strconv.Atoi(strings.TrimSpace(lines))
			if err != nil || n < 0 {
				return p.reply("-ERR Protocol error. 14") == nil
			}
			maxBody = n
		}
		if p.reply("+OK") != nil {
			return false
		}
		if cmd == "RETR" && p.fault.StallRetr {
			io.Copy(io.Discard, p.conn) // until the client gives up
			return false
		}
		var w io.Writer = p.w
		if cmd == "RETR" && p.fault.DropRetrAfter > 0 {
			w = &dropWriter{w: p.w, left: p.fault.DropRetrAfter, conn: p.conn}
		}
		p.s.mu.Lock()
		writes := p.s.writes
		p.s.mu.Unlock()
		if cmd == "RETR" && writes == WritesBulk && w == io.Writer(p.w) {
			if m.stuffed == nil {
				var b bytes.Buffer
				writeDotStuffed(&b, m.data, -1, false)
				m.stuffed = b.Bytes()
			}
			_, err := p.w.Write(m.stuffed)
			return err == nil && p.w.Flush() == nil
		}
		if writeDotStuffed(w, m.data, maxBody, writes == WritesLinePerRecord) != nil || p.w.Flush() != nil {
			return false
		}
		return true
	case "DELE":
		i, _, ok := p.msg(arg)
		if !ok {
			return p.reply(noSuch) == nil
		}
		p.deleted[i] = true
		return p.reply("+OK") == nil
	case "RSET":
		clear(p.deleted)
		return p.reply("+OK") == nil
	}
	return p.reply("-ERR Protocol error. 14") == nil
}

// commit removes the messages marked deleted from the mailbox: the UPDATE
// state of RFC 1939 §6, reached only through QUIT.
func (p *popSession) commit() {
	if p.mailbox == "" || len(p.deleted) == 0 {
		return
	}
	gone := map[string]bool{}
	for i := range p.deleted {
		gone[p.msgs[i-1].uid] = true
	}
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	p.s.boxes[p.mailbox] = slices.DeleteFunc(p.s.boxes[p.mailbox], func(m popMessage) bool { return gone[m.uid] })
}

// writeDotStuffed writes a message as a multi-line answer (RFC 1939 §3):
// lines that start with "." get another, and a line with a single dot ends
// it. Lines are CRLF-delimited; a bare CR or LF is data. maxBody >= 0 stops
// after that many body lines (TOP). perLine flushes each line to w, and w
// too when it is a *bufio.Writer.
func writeDotStuffed(w io.Writer, data []byte, maxBody int, perLine bool) error {
	bw := bufio.NewWriterSize(w, 32<<10)
	inBody, bodyLines := false, 0
	for len(data) > 0 {
		if inBody && maxBody >= 0 && bodyLines >= maxBody {
			break
		}
		end := bytes.Index(data, []byte("\r\n"))
		var line []byte
		if end < 0 {
			line, data = data, nil
		} else {
			line, data = data[:end], data[end+2:]
		}
		if len(line) > 0 && line[0] == '.' {
			bw.WriteByte('.')
		}
		bw.Write(line)
		bw.WriteString("\r\n")
		if perLine {
			bw.Flush()
			if f, ok := w.(*bufio.Writer); ok {
				f.Flush()
			}
		}
		if inBody {
			bodyLines++
		} else if len(line) == 0 {
			inBody = true
		}
	}
	bw.WriteString(".\r\n")
	return bw.Flush()
}

// dropWriter cuts the connection after left bytes.
type dropWriter struct {
	w    io.Writer
	left int
	conn net.Conn
}

func (d *dropWriter) Write(b []byte) (int, error) {
	if len(b) >= d.left {
		n, _ := d.w.Write(b[:d.left])
		if f, ok := d.w.(*bufio.Writer); ok {
			f.Flush()
		}
		d.conn.Close()
		return n, io.ErrClosedPipe
	}
	d.left -= len(b)
	return d.w.Write(b)
}
