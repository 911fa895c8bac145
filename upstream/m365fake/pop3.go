package m365fake

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf16"
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
	uid  string
	data []byte
}

// POP3Fault is an injected failure of the fake Outlook POP3 service.
type POP3Fault struct {
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

// pop3State is the fake's POP3 side: mailboxes and faults.
type pop3State struct {
	ln        net.Listener
	mu        sync.Mutex
	boxes     map[string][]popMessage // by primary address
	access    map[string]bool         // tenant/client/mailbox granted FullAccess
	faults    []POP3Fault
	nextUID   int
	logins    int
	accepted  int
	wg        sync.WaitGroup
	closeOnce sync.Once
	conns     map[net.Conn]bool
}

// StartPOP3 starts the fake Outlook POP3 service with implicit TLS on a free
// port of 127.0.0.1 and returns its address.
func (s *Server) StartPOP3() (string, error) {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{s.pki.server}, MinVersion: tls.VersionTLS12})
	if err != nil {
		return "", fmt.Errorf("fake outlook pop3: %w", err)
	}
	s.mu.Lock()
	s.pop.ln = ln
	s.mu.Unlock()
	s.pop.wg.Add(1)
	go func() {
		defer s.pop.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.pop.mu.Lock()
			s.pop.conns[c] = true
			s.pop.accepted++
			s.pop.mu.Unlock()
			s.pop.wg.Add(1)
			go func() {
				defer s.pop.wg.Done()
				s.servePOP3(c)
				s.pop.mu.Lock()
				delete(s.pop.conns, c)
				s.pop.mu.Unlock()
				c.Close()
			}()
		}
	}()
	return ln.Addr().String(), nil
}

func (s *Server) closePOP3() {
	s.pop.closeOnce.Do(func() {
		s.mu.Lock()
		ln := s.pop.ln
		s.mu.Unlock()
		if ln == nil {
			return
		}
		ln.Close()
		s.pop.mu.Lock()
		for c := range s.pop.conns {
			c.Close()
		}
		s.pop.mu.Unlock()
		s.pop.wg.Wait()
	})
}

// POP3Addr is the address of the POP3 service started by StartPOP3.
func (s *Server) POP3Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pop.ln == nil {
		return ""
	}
	return s.pop.ln.Addr().String()
}

// GrantMailboxAccess gives the app's service principal FullAccess on
// mailbox (Add-MailboxPermission), which POP3 logins need.
func (s *Server) GrantMailboxAccess(tenantID, clientID, mailbox string) {
	s.pop.mu.Lock()
	defer s.pop.mu.Unlock()
	s.pop.access[tenantID+"/"+clientID+"/"+strings.ToLower(mailbox)] = true
}

// AddMessage puts a raw message into mailbox (a primary address), for POP3
// and IMAP, and returns its POP3 UID.
func (s *Server) AddMessage(mailbox string, raw []byte) string {
	mb := strings.ToLower(mailbox)
	s.pop.mu.Lock()
	s.pop.nextUID++
	uid := fmt.Sprintf("AAQkAD%08d", s.pop.nextUID)
	s.pop.boxes[mb] = append(s.pop.boxes[mb], popMessage{uid: uid, data: raw})
	s.pop.mu.Unlock()
	s.addIMAPMessage(mb, raw) // the same mailbox, seen over IMAP
	return uid
}

// MailboxUIDs returns the UIDs of the messages in mailbox, oldest first.
func (s *Server) MailboxUIDs(mailbox string) []string {
	s.pop.mu.Lock()
	defer s.pop.mu.Unlock()
	var uids []string
	for _, m := range s.pop.boxes[strings.ToLower(mailbox)] {
		uids = append(uids, m.uid)
	}
	return uids
}

// FailPOP3 queues a fault for the next POP3 session.
func (s *Server) FailPOP3(f POP3Fault) {
	s.pop.mu.Lock()
	defer s.pop.mu.Unlock()
	s.pop.faults = append(s.pop.faults, f)
}

// POP3Connections counts the connections the POP3 service accepted.
func (s *Server) POP3Connections() int {
	s.pop.mu.Lock()
	defer s.pop.mu.Unlock()
	return s.pop.accepted
}

// POP3Logins counts successful XOAUTH2 logins.
func (s *Server) POP3Logins() int {
	s.pop.mu.Lock()
	defer s.pop.mu.Unlock()
	return s.pop.logins
}

// deliverLocal puts a message Graph sent into the fake mailboxes among its
// recipients, so that the demo can show the whole loop.
func (s *Server) deliverLocal(m SentMessage) {
	s.mu.Lock()
	var boxes []string
	for _, t := range s.tenants {
		for _, r := range m.Recipients {
			if mb := t.mailboxes[r]; mb != nil && !slices.Contains(boxes, mb.primary) {
				boxes = append(boxes, mb.primary)
			}
		}
	}
	s.mu.Unlock()
	for _, b := range boxes {
		s.AddMessage(b, m.MIME)
	}
}

func serverNameTag() string {
	u := utf16.Encode([]rune("AM0PR03CA0097.eurprd03.prod.outlook.com"))
	b := make([]byte, 0, 2*len(u))
	for _, c := range u {
		b = append(b, byte(c), byte(c>>8))
	}
	return base64.StdEncoding.EncodeToString(b)
}

type popSession struct {
	s       *Server
	conn    net.Conn
	r       *bufio.Reader
	w       *bufio.Writer
	fault   POP3Fault
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

func (s *Server) servePOP3(conn net.Conn) {
	p := &popSession{s: s, conn: conn, r: bufio.NewReaderSize(conn, 1024), w: bufio.NewWriterSize(conn, 64<<10), deleted: map[int]bool{}}
	s.pop.mu.Lock()
	if len(s.pop.faults) > 0 {
		p.fault = s.pop.faults[0]
		s.pop.faults = s.pop.faults[1:]
	}
	s.pop.mu.Unlock()
	conn.SetDeadline(time.Now().Add(10 * time.Minute))
	if p.reply("+OK The Microsoft Exchange POP3 service is ready. ["+serverNameTag()+"]") != nil {
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
		mailbox, ok := p.s.checkXOAUTH2(resp, "POP.AccessAsApp")
		if !ok || p.fault.RefuseAuth {
			return p.reply(pop3AuthFailed) == nil
		}
		p.s.pop.mu.Lock()
		p.mailbox = mailbox
		p.msgs = slices.Clone(p.s.pop.boxes[mailbox])
		p.s.pop.logins++
		p.s.pop.mu.Unlock()
		return p.reply(pop3AuthOK) == nil
	case "NOOP", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET":
		return p.reply("-ERR Command is not valid in this state.") == nil
	}
	return p.reply("-ERR Protocol error. 14") == nil
}

// checkXOAUTH2 verifies a SASL XOAUTH2 response and returns the mailbox it
// opens.
func (s *Server) checkXOAUTH2(b64, role string) (string, bool) {
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(b64))
	if err != nil {
		return "", false
	}
	parts := strings.Split(string(raw), "\x01")
	if len(parts) != 4 || parts[2] != "" || parts[3] != "" {
		return "", false
	}
	user, ok1 := strings.CutPrefix(parts[0], "user=")
	token, ok2 := strings.CutPrefix(parts[1], "auth=Bearer ")
	if !ok1 || !ok2 {
		return "", false
	}
	c, err := s.verifyToken(token, OutlookAudience)
	if err != nil || !slices.Contains(c.Roles, role) {
		return "", false
	}
	s.mu.Lock()
	t := s.tenants[c.Tid]
	var mb *mailbox
	if t != nil {
		mb = t.mailboxes[strings.ToLower(user)]
	}
	s.mu.Unlock()
	if mb == nil {
		return "", false
	}
	s.pop.mu.Lock()
	granted := s.pop.access[c.Tid+"/"+c.AppID+"/"+mb.primary]
	s.pop.mu.Unlock()
	return mb.primary, granted
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
		if writeDotStuffed(w, m.data, maxBody) != nil || p.w.Flush() != nil {
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
	p.s.pop.mu.Lock()
	defer p.s.pop.mu.Unlock()
	p.s.pop.boxes[p.mailbox] = slices.DeleteFunc(p.s.pop.boxes[p.mailbox], func(m popMessage) bool { return gone[m.uid] })
}

// writeDotStuffed writes a message as a multi-line answer (RFC 1939 §3):
// lines that start with "." get another, and a line with a single dot ends
// it. Lines are CRLF-delimited; a bare CR or LF is data. maxBody >= 0 stops
// after that many body lines (TOP).
func writeDotStuffed(w io.Writer, data []byte, maxBody int) error {
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
