package upstream

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	pop3 "github.com/knadh/go-pop3"
)

// DefaultPOP3Addr is Exchange Online's POP3 service (implicit TLS).
const DefaultPOP3Addr = "outlook.office365.com:995"

// POP3Dialer opens authenticated sessions with Outlook's POP3 service.
type POP3Dialer struct {
	// Addr is host:port of the service, with implicit TLS.
	Addr string
	// RootCAs verify the service's certificate; nil: the system's pool.
	RootCAs *x509.CertPool
	// Timeout bounds the connection, the TLS handshake, the greeting and
	// the login together.
	Timeout time.Duration
	// DialContext, if set, makes the TCP connection (a proxy's tunnel).
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
}

// POP3Conn is a POP3 session with Outlook, logged in and in the
// TRANSACTION state. Conn and Reader carry the session's bytes; commands
// are written to Conn and answers read from Reader.
type POP3Conn struct {
	Conn   net.Conn
	Reader *bufio.Reader
	// Greeting is the service's first line; AuthReply its answer to the
	// login, such as "+OK User successfully authenticated.".
	Greeting, AuthReply string

	client *pop3.Conn
}

// POP3AuthError is Outlook refusing the XOAUTH2 login.
type POP3AuthError struct {
	Reply string // the service's answer, such as "-ERR Authentication failure: ..."
}

func (e *POP3AuthError) Error() string { return "outlook refused the XOAUTH2 login: " + e.Reply }

// Hint says what the administrator should check.
func (e *POP3AuthError) Hint() string {
	return "the app needs POP.AccessAsApp (Office 365 Exchange Online, Application, admin consent), its service principal registered in Exchange (New-ServicePrincipal with the Enterprise application's object ID) and FullAccess on the mailbox (Add-MailboxPermission); check pop3_mailbox too"
}

// Dial connects to the service, reads its greeting and logs in to mailbox
// with SASL XOAUTH2 and token, in the two-step form: Outlook refuses the
// token on the AUTH line itself, which would exceed its 512-byte command
// limit.
func (d *POP3Dialer) Dial(ctx context.Context, mailbox, token string) (*POP3Conn, error) {
	host, portStr, err := net.SplitHostPort(d.Addr)
	if err != nil {
		return nil, fmt.Errorf("pop3 upstream %q: %w", d.Addr, err)
	}
	port, _ := strconv.Atoi(portStr)
	timeout := d.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	deadline := time.Now().Add(timeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	td := &tlsDialer{ctx: ctx, deadline: deadline, dial: d.DialContext, cfg: &tls.Config{ServerName: host, RootCAs: d.RootCAs, MinVersion: tls.VersionTLS12}}
	// go-pop3 dials through td (which does TLS itself, with our CAs and
	// deadline) and reads the greeting; the login and the data path are
	// ours: go-pop3 cannot read the "+ " continuation of XOAUTH2.
	client, err := pop3.New(pop3.Opt{Host: host, Port: port, Dialer: td}).NewConn()
	if err != nil {
		if td.conn != nil {
			td.conn.Close()
		}
		return nil, fmt.Errorf("pop3 upstream %s: %w", d.Addr, err)
	}
	c := &POP3Conn{Conn: td.conn, Reader: bufio.NewReaderSize(td.conn, 64<<10), Greeting: td.greeting(), client: client}
	stop := context.AfterFunc(ctx, func() { td.conn.SetDeadline(time.Now()) })
	defer stop()
	if err := c.login(mailbox, token); err != nil {
		c.Conn.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("pop3 upstream login: %w", ctx.Err())
		}
		return nil, err
	}
	td.conn.SetDeadline(time.Time{})
	return c, nil
}

func (c *POP3Conn) login(mailbox, token string) error {
	if err := c.client.Send("AUTH XOAUTH2"); err != nil {
		return fmt.Errorf("pop3 upstream: %w", err)
	}
	line, err := c.readLine()
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+ ") && line != "+" {
		return &POP3AuthError{Reply: line}
	}
	sasl := base64.StdEncoding.EncodeToString([]byte("user=" + mailbox + "\x01auth=Bearer " + token + "\x01\x01"))
	if err := c.client.Send(sasl); err != nil {
		return fmt.Errorf("pop3 upstream: %w", err)
	}
	if line, err = c.readLine(); err != nil {
		return err
	}
	if strings.HasPrefix(line, "+ ") || line == "+" { // an error challenge: answer empty to get the final -ERR
		if err := c.client.Send(""); err != nil {
			return fmt.Errorf("pop3 upstream: %w", err)
		}
		if line, err = c.readLine(); err != nil {
			return err
		}
	}
	if !strings.HasPrefix(line, "+OK") {
		return &POP3AuthError{Reply: line}
	}
	c.AuthReply = line
	return nil
}

// readLine reads one answer line (bounded: answers to login are short).
func (c *POP3Conn) readLine() (string, error) {
	line, err := c.Reader.ReadSlice('\n')
	if err != nil {
		return "", fmt.Errorf("pop3 upstream: reading answer: %w", err)
	}
	return strings.TrimRight(string(line), "\r\n"), nil
}

// Stat asks STAT and returns the number of messages and their total size.
// It goes through go-pop3, whose reader holds nothing: Outlook sends
// nothing unasked.
func (c *POP3Conn) Stat() (count, size int, err error) {
	c.Conn.SetDeadline(time.Now().Add(30 * time.Second))
	defer c.Conn.SetDeadline(time.Time{})
	count, size, err = c.client.Stat()
	if err != nil {
		return 0, 0, fmt.Errorf("pop3 upstream: STAT: %w", err)
	}
	return count, size, nil
}

// Quit ends the session (committing deletions) and closes the connection.
func (c *POP3Conn) Quit() error {
	defer c.Conn.Close()
	c.Conn.SetDeadline(time.Now().Add(30 * time.Second))
	if err := c.client.Send("QUIT"); err != nil {
		return err
	}
	line, err := c.readLine()
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+OK") {
		return fmt.Errorf("pop3 upstream: QUIT answered %q", line)
	}
	return nil
}

// tlsDialer is go-pop3's Dialer: a TCP connection within ctx and the
// deadline, with TLS verified against our CAs. It records the connection
// and the greeting line go-pop3 reads through it.
type tlsDialer struct {
	ctx      context.Context
	deadline time.Time
	dial     func(ctx context.Context, network, addr string) (net.Conn, error)
	cfg      *tls.Config
	conn     net.Conn
	rec      *recordingConn
}

func (d *tlsDialer) Dial(network, addr string) (net.Conn, error) {
	ctx, cancel := context.WithDeadline(d.ctx, d.deadline)
	defer cancel()
	var tc net.Conn
	var err error
	if d.dial != nil {
		raw, derr := d.dial(ctx, network, addr)
		if derr != nil {
			return nil, derr
		}
		c := tls.Client(raw, d.cfg)
		if err = c.HandshakeContext(ctx); err != nil {
			raw.Close()
			return nil, err
		}
		tc = c
	} else if tc, err = (&tls.Dialer{Config: d.cfg}).DialContext(ctx, network, addr); err != nil {
		return nil, err
	}
	tc.SetDeadline(d.deadline)
	d.conn = tc
	d.rec = &recordingConn{Conn: tc}
	return d.rec, nil
}

func (d *tlsDialer) greeting() string {
	if d.rec == nil {
		return ""
	}
	line, _, _ := strings.Cut(string(d.rec.read), "\n")
	return strings.TrimRight(line, "\r")
}

// recordingConn keeps the first bytes read (the greeting) for the log.
type recordingConn struct {
	net.Conn
	read []byte
}

func (r *recordingConn) Read(p []byte) (int, error) {
	n, err := r.Conn.Read(p)
	if len(r.read) < 512 {
		r.read = append(r.read, p[:min(n, 512-len(r.read))]...)
	}
	return n, err
}
