//go:build unix

package bridge_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"mailbridge/bridge"
	"mailbridge/upstream"
	"mailbridge/upstream/m365fake/outlookpop"
)

// BenchmarkPOP3Relay measures what the bridge itself costs on a POP3
// download, against an upstream fast enough not to hide it: the fake
// Outlook writes each answer pre-stuffed in one write (bulk), or one line
// per TLS record (line-per-record, the cost per record). In each iteration
// the same downloads run straight from the fake over TLS (direct) and
// through the bridge, alternately; the client reads in 256 KiB reads and
// checks the SHA-256 at the end. It reports both throughputs, their ratio,
// and the process's CPU time per GiB for each: the bridge's own cost is
// bridge-cpu-s/GiB minus direct-cpu-s/GiB (the fake and the client are in
// both).
//
//	go test ./bridge -run '^$' -bench BenchmarkPOP3Relay -benchtime 5x
func BenchmarkPOP3Relay(b *testing.B) {
	for _, c := range []struct {
		name     string
		writes   outlookpop.Writes
		parallel int
		size     int
	}{
		{"bulk/1x50MiB", outlookpop.WritesBulk, 1, 50 << 20},
		{"bulk/4x20MiB", outlookpop.WritesBulk, 4, 20 << 20},
		{"line-per-record/1x20MiB", outlookpop.WritesLinePerRecord, 1, 20 << 20},
	} {
		b.Run(c.name, func(b *testing.B) { benchPOP3Relay(b, c.writes, c.parallel, c.size) })
	}
}

func benchPOP3Relay(b *testing.B, writes outlookpop.Writes, parallel, size int) {
	fake := startFake(b)
	fake.SetPOP3Writes(writes)
	cfg := testConfig(fake)
	cfg.Log.Level = "warn"
	cfg.POP3.MaxSessions = 2 * parallel
	br, _ := startBridge(b, fake, cfg)
	var want [][32]byte
	for i := range parallel {
		msg := bigMessage(size)
		msg[len("Subject: ")] = byte('a' + i) // each one different
		want = append(want, sha256.Sum256(dotStuffed(msg)))
		fake.AddMessage(mailboxA, msg)
	}
	token, err := br.Accounts()[0].OutlookTokens.Token(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	var direct, bridged []*bulkClient
	for range parallel {
		up, err := (&upstream.POP3Dialer{Addr: fake.POP3Addr(), RootCAs: fake.CertPool()}).Dial(context.Background(), mailboxA, token)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { up.Conn.Close() })
		direct = append(direct, &bulkClient{conn: up.Conn, r: up.Reader})
		p := dialPOP3(b, br.POP3Addr())
		p.login(userA, passwordA)
		bridged = append(bridged, &bulkClient{conn: p.conn, r: p.r})
	}
	compareRelay(b, parallel*size, direct, bridged, func(c *bulkClient, i int) error {
		// "+OK ...", then the dot-stuffed body and its terminator.
		return c.ask(fmt.Sprintf("RETR %d", i+1), "+OK", "\r\n.\r\n", want[i])
	})
}

// compareRelay downloads with each client at once, in each iteration first
// the direct ones and then the bridged ones (after one warm-up round of
// each), download(c, i) being client i's download; total is the bytes one
// round moves. It reports both throughputs, their ratio, and the process's
// CPU per GiB for each and their difference.
func compareRelay(b *testing.B, total int, direct, bridged []*bulkClient, download func(c *bulkClient, i int) error) {
	round := func(clients []*bulkClient) (time.Duration, time.Duration) {
		cpu0, t0 := processCPU(), time.Now()
		var wg sync.WaitGroup
		for i, c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := download(c, i); err != nil {
					b.Error(err)
				}
			}()
		}
		wg.Wait()
		return time.Since(t0), processCPU() - cpu0
	}
	round(direct)
	round(bridged)
	var tDirect, tBridge, cpuDirect, cpuBridge time.Duration
	b.ResetTimer()
	for range b.N {
		t, c := round(direct)
		tDirect, cpuDirect = tDirect+t, cpuDirect+c
		t, c = round(bridged)
		tBridge, cpuBridge = tBridge+t, cpuBridge+c
	}
	b.StopTimer()
	mib := float64(b.N*total) / (1 << 20)
	b.ReportMetric(mib/tDirect.Seconds(), "direct-MiB/s")
	b.ReportMetric(mib/tBridge.Seconds(), "bridge-MiB/s")
	b.ReportMetric(tDirect.Seconds()/tBridge.Seconds(), "bridge/direct")
	b.ReportMetric(cpuDirect.Seconds()/(mib/1024), "direct-cpu-s/GiB")
	b.ReportMetric(cpuBridge.Seconds()/(mib/1024), "bridge-cpu-s/GiB")
	b.ReportMetric((cpuBridge-cpuDirect).Seconds()/(mib/1024), "relay-cpu-s/GiB")
	b.ReportMetric(0, "ns/op")
}

// bulkClient reads an answer as a fast client does: in large reads,
// hashing the bytes as they come, never line by line.
type bulkClient struct {
	conn net.Conn
	r    *bufio.Reader
	buf  []byte
}

// ask sends command; with status set, reads the status line, which must
// start with it; then reads until the bytes read end with end, and checks
// their SHA-256 (end included) against want.
func (c *bulkClient) ask(command, status, end string, want [32]byte) error {
	if c.buf == nil {
		c.buf = make([]byte, 256<<10)
	}
	c.conn.SetDeadline(time.Now().Add(patience))
	if _, err := fmt.Fprintf(c.conn, "%s\r\n", command); err != nil {
		return err
	}
	if status != "" {
		if l, err := c.r.ReadString('\n'); err != nil || !strings.HasPrefix(l, status) {
			return fmt.Errorf("%s: status %q %v", command, l, err)
		}
	}
	h := sha256.New()
	var tail []byte
	for !bytes.HasSuffix(tail, []byte(end)) {
		k, err := c.r.Read(c.buf)
		h.Write(c.buf[:k])
		tail = append(tail, c.buf[:k]...)
		tail = tail[max(0, len(tail)-len(end)):]
		if err != nil && !bytes.HasSuffix(tail, []byte(end)) {
			return fmt.Errorf("%s: %v", command, err)
		}
	}
	if !bytes.Equal(h.Sum(nil), want[:]) {
		return fmt.Errorf("%s: the answer arrived changed", command)
	}
	return nil
}

// dotStuffed is msg as a POP3 multi-line answer's body: lines starting
// with "." get another, and ".\r\n" ends it (msg ends in CRLF).
func dotStuffed(msg []byte) []byte {
	var b bytes.Buffer
	for line := range bytes.Lines(msg) {
		if line[0] == '.' {
			b.WriteByte('.')
		}
		b.Write(line)
	}
	b.WriteString(".\r\n")
	return b.Bytes()
}

// processCPU is the CPU time (user and system) this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkIMAPRelay is BenchmarkPOP3Relay for IMAP: the upstream is a
// minimal IMAP server over TLS that takes any XOAUTH2 login and answers a
// FETCH with the whole message in one write, or one line per TLS record
// (go-imap's server, the fake
// Outlook's, decides its own write sizes and would cap the figure).
//
//	go test ./bridge -run '^$' -bench BenchmarkIMAPRelay -benchtime 5x
func BenchmarkIMAPRelay(b *testing.B) {
	for _, c := range []struct {
		name          string
		linePerRecord bool
		parallel      int
		size          int
	}{{"bulk/1x50MiB", false, 1, 50 << 20}, {"bulk/4x20MiB", false, 4, 20 << 20}, {"line-per-record/1x20MiB", true, 1, 20 << 20}} {
		b.Run(c.name, func(b *testing.B) { benchIMAPRelay(b, c.linePerRecord, c.parallel, c.size) })
	}
}

func benchIMAPRelay(b *testing.B, linePerRecord bool, parallel, size int) {
	var answers [][]byte // the FETCH answer of message i+1, untagged part
	var want [][32]byte
	for i := range parallel {
		msg := bigMessage(size)
		msg[len("Subject: ")] = byte('a' + i)
		answers = append(answers, append(fmt.Appendf(nil, "* %d FETCH (BODY[] {%d}\r\n", i+1, len(msg)), append(msg, ")\r\n"...)...))
	}
	addr, ca := startBulkIMAP(b, answers, linePerRecord)
	fake := startFake(b)
	cfg := testConfig(fake)
	cfg.Log.Level = "warn"
	cfg.IMAP.Upstream = addr
	cfg.IMAP.MaxSessions = 2 * parallel
	pool := fake.CertPool().Clone()
	pool.AddCert(ca)
	br, _ := startBridgeWith(b, fake, cfg, func(o *bridge.Options) { o.RootCAs = pool })
	var direct, bridged []*bulkClient
	for i := range parallel {
		want = append(want, sha256.Sum256(append(answers[i], fmt.Sprintf("F%d OK FETCH completed.\r\n", i+1)...)))
		conn, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { conn.Close() })
		r := bufio.NewReaderSize(conn, 64<<10)
		r.ReadString('\n') // the greeting
		fmt.Fprintf(conn, "D1 AUTHENTICATE XOAUTH2 eA==\r\n")
		if l, _ := r.ReadString('\n'); !strings.HasPrefix(l, "D1 OK") {
			b.Fatalf("direct login: %q", l)
		}
		direct = append(direct, &bulkClient{conn: conn, r: r})
		c := dialIMAP(b, br.IMAPAddr())
		c.login(userA, passwordA)
		bridged = append(bridged, &bulkClient{conn: c.conn, r: c.r})
	}
	compareRelay(b, parallel*size, direct, bridged, func(c *bulkClient, i int) error {
		// The whole answer, its tagged completion included.
		return c.ask(fmt.Sprintf("F%d FETCH %d BODY.PEEK[]", i+1, i+1), "", fmt.Sprintf("\r\nF%d OK FETCH completed.\r\n", i+1), want[i])
	})
}

// startBulkIMAP starts a minimal IMAP server with implicit TLS on
// 127.0.0.1 and returns its address and its CA: it takes any AUTHENTICATE,
// answers the bridge's CAPABILITY and LIST as Outlook does, and a FETCH of
// message n with answers[n-1] and its completion in one write, or with
// linePerRecord in one write (one TLS record) per line.
func startBulkIMAP(b *testing.B, answers [][]byte, linePerRecord bool) (string, *x509.Certificate) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bulk imap"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		b.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				r := bufio.NewReader(conn)
				io.WriteString(conn, "* OK The Microsoft Exchange IMAP4 service is ready.\r\n")
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					tag, rest, _ := strings.Cut(strings.TrimRight(line, "\r\n"), " ")
					verb, arg, _ := strings.Cut(rest, " ")
					switch strings.ToUpper(verb) {
					case "CAPABILITY":
						fmt.Fprintf(conn, "* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+\r\n%s OK CAPABILITY completed.\r\n", tag)
					case "LIST":
						fmt.Fprintf(conn, "* LIST (\\Marked \\HasNoChildren) \"/\" \"\"\r\n%s OK LIST completed.\r\n", tag)
					case "FETCH":
						var n int
						fmt.Sscanf(arg, "%d", &n)
						if n < 1 || n > len(answers) {
							fmt.Fprintf(conn, "%s BAD no such message\r\n", tag)
							continue
						}
						answer := append(answers[n-1][:len(answers[n-1]):len(answers[n-1])], tag+" OK FETCH completed.\r\n"...)
						if !linePerRecord {
							conn.Write(answer)
							continue
						}
						for line := range bytes.Lines(answer) {
							if _, err := conn.Write(line); err != nil {
								return
							}
						}
					case "LOGOUT":
						fmt.Fprintf(conn, "* BYE\r\n%s OK LOGOUT completed.\r\n", tag)
						return
					default:
						fmt.Fprintf(conn, "%s OK %s completed.\r\n", tag, verb)
					}
				}
			}()
		}
	}()
	return ln.Addr().String(), cert
}
