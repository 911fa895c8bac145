package upstream

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"strings"
	"time"
)

// DefaultIMAPAddr is Exchange Online's IMAP service (implicit TLS).
const DefaultIMAPAddr = "outlook.office365.com:993"

// IMAPDialer opens authenticated sessions with Outlook's IMAP service.
type IMAPDialer struct {
	// Addr is host:port of the service, with implicit TLS.
	Addr string
	// RootCAs verify the service's certificate; nil: the system's pool.
	RootCAs *x509.CertPool
	// Timeout bounds the connection, the TLS handshake, the greeting and
	// the login together.
	Timeout time.Duration
	// DialContext, if set, makes the TCP connection (a proxy's tunnel,
	// say).
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
}

// IMAPConn is an IMAP session with Outlook, logged in (the Authenticated
// state). The session's bytes are written to Conn and read from Reader,
// which may already hold some.
type IMAPConn struct {
	Conn   net.Conn
	Reader *bufio.Reader
	// Greeting is the service's first line, Capabilities what it offers
	// after the login.
	Greeting     string
	Capabilities []string
}

// IMAPAuthError is Outlook refusing the XOAUTH2 login.
type IMAPAuthError struct {
	Reply string // the tagged answer, such as "MB1 NO AUTHENTICATE failed."
}

func (e *IMAPAuthError) Error() string { return "outlook refused the IMAP XOAUTH2 login: " + e.Reply }

// Hint says what the administrator should check.
func (e *IMAPAuthError) Hint() string {
	return "the app needs IMAP.AccessAsApp (Office 365 Exchange Online, Application, admin consent), its service principal registered in Exchange (New-ServicePrincipal with the Enterprise application's object ID), FullAccess on the mailbox (Add-MailboxPermission), and IMAP enabled on it (Set-CASMailbox -ImapEnabled $true); check imap_mailbox too"
}

// IMAPNotConnectedError is Outlook accepting the XOAUTH2 login and then
// refusing to open the mailbox: "BAD User is authenticated but not
// connected." and "* BYE Connection closed. 14". It is what a missing
// FullAccess on the mailbox, or IMAP disabled for it, looks like; a
// service principal unknown to Exchange fails the login instead.
type IMAPNotConnectedError struct {
	Reply string
}

func (e *IMAPNotConnectedError) Error() string {
	return "outlook accepted the IMAP login but cannot open the mailbox: " + e.Reply
}

// Hint says what the administrator should do.
func (e *IMAPNotConnectedError) Hint() string {
	return "the app's service principal lacks FullAccess on the mailbox, or IMAP is off for it: in Exchange Online PowerShell run Add-MailboxPermission -Identity <mailbox> -User <service principal ID> -AccessRights FullAccess, and Set-CASMailbox -Identity <mailbox> -ImapEnabled $true"
}

// maxIMAPLoginLine bounds an answer line during the login.
const maxIMAPLoginLine = 16 << 10

// Dial connects to the service, reads its greeting and logs in to mailbox
// with SASL XOAUTH2 and token, the token in the AUTHENTICATE command itself
// (SASL-IR, RFC 4959, which Outlook's IMAP takes).
func (d *IMAPDialer) Dial(ctx context.Context, mailbox, token string) (*IMAPConn, error) {
	host, _, err := net.SplitHostPort(d.Addr)
	if err != nil {
		return nil, fmt.Errorf("imap upstream %q: %w", d.Addr, err)
	}
	timeout := d.Timeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	dial := d.DialContext
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	raw, err := dial(ctx, "tcp", d.Addr)
	if err != nil {
		return nil, fmt.Errorf("imap upstream %s: %w", d.Addr, err)
	}
	conn := tls.Client(raw, &tls.Config{ServerName: host, RootCAs: d.RootCAs, MinVersion: tls.VersionTLS12})
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	c := &IMAPConn{Conn: conn, Reader: bufio.NewReaderSize(conn, 64<<10)}
	if err := c.login(mailbox, token); err != nil {
		conn.Close()
		if ctx.Err() != nil && !isAuthError(err) {
			return nil, fmt.Errorf("imap upstream %s: %w", d.Addr, ctx.Err())
		}
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	return c, nil
}

func isAuthError(err error) bool { _, ok := err.(*IMAPAuthError); return ok }

func (c *IMAPConn) login(mailbox, token string) error {
	greeting, err := c.readLine()
	if err != nil {
		return err
	}
	if !strings.HasPrefix(greeting, "* OK") {
		return fmt.Errorf("imap upstream: greeting %q", greeting)
	}
	c.Greeting = greeting
	ir := base64.StdEncoding.EncodeToString([]byte("user=" + mailbox + "\x01auth=Bearer " + token + "\x01\x01"))
	if _, err := fmt.Fprintf(c.Conn, "MB1 AUTHENTICATE XOAUTH2 %s\r\n", ir); err != nil {
		return fmt.Errorf("imap upstream: %w", err)
	}
	for {
		line, err := c.readLine()
		if err != nil {
			return err
		}
		switch {
		case strings.HasPrefix(line, "+"): // an error challenge: answer empty to get the tagged NO
			if _, err := c.Conn.Write([]byte("\r\n")); err != nil {
				return fmt.Errorf("imap upstream: %w", err)
			}
		case strings.HasPrefix(line, "* CAPABILITY "):
			c.Capabilities = strings.Fields(strings.TrimPrefix(line, "* CAPABILITY "))
		case strings.HasPrefix(line, "MB1 OK"):
			if caps := bracketCapabilities(line); caps != nil {
				c.Capabilities = caps
			}
			return c.capabilityAndProbe()
		case strings.HasPrefix(line, "MB1 "):
			return &IMAPAuthError{Reply: line}
		}
	}
}

// capabilityAndProbe asks, in one round trip, for the capabilities after
// the login (Outlook's OK carries none) and for the hierarchy delimiter
// (LIST "" ""), a mailbox command: a session that logged in but cannot
// open its mailbox fails it, and that is told apart here rather than in
// the client's first command.
func (c *IMAPConn) capabilityAndProbe() error {
	cmds := "MB3 LIST \"\" \"\"\r\n"
	if c.Capabilities == nil {
		cmds = "MB2 CAPABILITY\r\n" + cmds
	}
	if _, err := io.WriteString(c.Conn, cmds); err != nil {
		return fmt.Errorf("imap upstream: %w", err)
	}
	for {
		line, err := c.readLine()
		if err != nil {
			return err
		}
		if caps, ok := strings.CutPrefix(line, "* CAPABILITY "); ok {
			c.Capabilities = strings.Fields(caps)
		}
		if strings.Contains(line, "authenticated but not connected") {
			return &IMAPNotConnectedError{Reply: line}
		}
		if strings.HasPrefix(line, "MB3 ") {
			return nil
		}
	}
}

// bracketCapabilities reads "[CAPABILITY ...]" from a status line.
func bracketCapabilities(line string) []string {
	i := strings.Index(line, "[CAPABILITY ")
	if i < 0 {
		return nil
	}
	rest := line[i+len("[CAPABILITY "):]
	j := strings.IndexByte(rest, ']')
	if j < 0 {
		return nil
	}
	return strings.Fields(rest[:j])
}

func (c *IMAPConn) readLine() (string, error) {
	line, err := c.Reader.ReadSlice('\n')
	if err != nil {
		if err == bufio.ErrBufferFull || len(line) > maxIMAPLoginLine {
			return "", fmt.Errorf("imap upstream: answer line too long")
		}
		return "", fmt.Errorf("imap upstream: %w", err)
	}
	return strings.TrimRight(string(line), "\r\n"), nil
}

// Examine opens mailbox read-only (EXAMINE) and returns how many messages
// it holds, then logs out.
func (c *IMAPConn) Examine(mailbox string) (int, error) {
	c.Conn.SetDeadline(time.Now().Add(30 * time.Second))
	defer c.Conn.SetDeadline(time.Time{})
	if _, err := fmt.Fprintf(c.Conn, "MB3 EXAMINE %q\r\n", mailbox); err != nil {
		return 0, fmt.Errorf("imap upstream: %w", err)
	}
	count := -1
	for {
		line, err := c.readLine()
		if err != nil {
			return 0, err
		}
		if n, ok := strings.CutSuffix(line, " EXISTS"); ok && strings.HasPrefix(n, "* ") {
			fmt.Sscanf(strings.TrimPrefix(n, "* "), "%d", &count)
		}
		if strings.HasPrefix(line, "MB3 OK") {
			break
		}
		if strings.HasPrefix(line, "MB3 ") {
			return 0, fmt.Errorf("imap upstream: EXAMINE %s: %s", mailbox, line)
		}
	}
	fmt.Fprintf(c.Conn, "MB4 LOGOUT\r\n")
	return count, nil
}
