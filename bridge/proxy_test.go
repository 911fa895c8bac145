package bridge_test

import (
	"bufio"
	"encoding/base64"
	"encoding/binary"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// testProxy is an HTTP CONNECT proxy (or a SOCKS5 one) on loopback that
// counts the tunnels it opened per target, optionally wants Basic
// credentials, and may forbid some targets.
type testProxy struct {
	ln        net.Listener
	socks     bool
	user, pw  string
	forbidden map[string]bool
	mu        sync.Mutex
	tunnels   map[string]int
}

func startProxy(t *testing.T, socks bool, user, pw string, forbidden ...string) *testProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &testProxy{ln: ln, socks: socks, user: user, pw: pw, forbidden: map[string]bool{}, tunnels: map[string]int{}}
	for _, f := range forbidden {
		p.forbidden[f] = true
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *testProxy) url() string {
	if p.socks {
		return "socks5://" + p.ln.Addr().String()
	}
	return "http://" + p.ln.Addr().String()
}

func (p *testProxy) count(target string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tunnels[target]
}

func (p *testProxy) total() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, v := range p.tunnels {
		n += v
	}
	return n
}

func (p *testProxy) serve(c net.Conn) {
	defer c.Close()
	br := bufio.NewReader(c)
	var target string
	if p.socks {
		var ok bool
		if target, ok = p.socksHandshake(br, c); !ok {
			return
		}
	} else {
		req, err := http.ReadRequest(br)
		if err != nil || req.Method != http.MethodConnect {
			io.WriteString(c, "HTTP/1.1 405 Method Not Allowed\r\n\r\n")
			return
		}
		target = req.Host
		if p.user != "" && req.Header.Get("Proxy-Authorization") != "Basic "+base64.StdEncoding.EncodeToString([]byte(p.user+":"+p.pw)) {
			io.WriteString(c, "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\nContent-Length: 0\r\n\r\n")
			return
		}
		if p.forbidden[target] {
			io.WriteString(c, "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
			return
		}
	}
	up, err := net.Dial("tcp", target)
	if err != nil {
		io.WriteString(c, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
		return
	}
	defer up.Close()
	if !p.socks {
		io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n")
	}
	p.mu.Lock()
	p.tunnels[target]++
	p.mu.Unlock()
	go func() { io.Copy(up, br); up.Close() }()
	io.Copy(c, up)
}

// socksHandshake serves RFC 1928 (no authentication, or RFC 1929 user and
// password) up to the CONNECT request, and answers it.
func (p *testProxy) socksHandshake(br *bufio.Reader, c net.Conn) (string, bool) {
	head := make([]byte, 2)
	if _, err := io.ReadFull(br, head); err != nil || head[0] != 5 {
		return "", false
	}
	methods := make([]byte, head[1])
	io.ReadFull(br, methods)
	if p.user == "" {
		c.Write([]byte{5, 0})
	} else {
		c.Write([]byte{5, 2})
		ver, _ := br.ReadByte()
		ul, _ := br.ReadByte()
		u := make([]byte, ul)
		io.ReadFull(br, u)
		pl, _ := br.ReadByte()
		pw := make([]byte, pl)
		io.ReadFull(br, pw)
		if ver != 1 || string(u) != p.user || string(pw) != p.pw {
			c.Write([]byte{1, 1})
			return "", false
		}
		c.Write([]byte{1, 0})
	}
	req := make([]byte, 4)
	if _, err := io.ReadFull(br, req); err != nil || req[1] != 1 {
		return "", false
	}
	var host string
	switch req[3] {
	case 1:
		ip := make([]byte, 4)
		io.ReadFull(br, ip)
		host = net.IP(ip).String()
	case 3:
		l, _ := br.ReadByte()
		name := make([]byte, l)
		io.ReadFull(br, name)
		host = string(name)
	default:
		return "", false
	}
	port := make([]byte, 2)
	io.ReadFull(br, port)
	c.Write([]byte{5, 0, 0, 1, 127, 0, 0, 1, 0, 0})
	return net.JoinHostPort(host, strconv.Itoa(int(binary.BigEndian.Uint16(port)))), true
}

// hostOf returns the host:port of a URL.
func hostOf(u string) string {
	u = strings.TrimPrefix(strings.TrimPrefix(u, "https://"), "http://")
	return strings.SplitN(u, "/", 2)[0]
}

func TestEverythingUpstreamGoesThroughTheProxy(t *testing.T) {
	for _, socks := range []bool{false, true} {
		fake := startFake(t)
		px := startProxy(t, socks, "ship42", "proxy-pw-777")
		cfg := testConfig(fake)
		cfg.Network.Proxy = px.url()
		cfg.Network.ProxyUser = "ship42"
		pwFile := t.TempDir() + "/proxy.txt"
		writeFile(t, pwFile, "proxy-pw-777\n")
		cfg.Network.ProxyPasswordFile = pwFile
		b, logs := startBridge(t, fake, cfg)
		c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
		if _, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nvia the proxy\n")); err != nil {
			t.Fatalf("socks %v: send: %v", socks, err)
		}
		fake.AddMessage(mailboxA, crlf("Subject: x\n\nx\n"))
		p := dialPOP3(t, b.POP3Addr())
		p.login(userA, passwordA)
		p.cmd("QUIT")
		ic := dialIMAP(t, b.IMAPAddr())
		ic.login(userA, passwordA)
		ic.cmd("LOGOUT")
		for _, target := range []string{hostOf(fake.GraphURL()), fake.POP3Addr(), fake.IMAPAddr()} {
			if px.count(target) == 0 {
				t.Errorf("socks %v: no tunnel to %s through the proxy", socks, target)
			}
		}
		if len(fake.Sent()) != 1 {
			t.Errorf("socks %v: %d messages reached Graph", socks, len(fake.Sent()))
		}
		if strings.Contains(logs.String(), "proxy-pw-777") {
			t.Errorf("socks %v: the proxy password is in the log", socks)
		}
		check := b.Check(t.Context(), "")
		for _, r := range check {
			if r.Path != "via proxy "+px.url() {
				t.Errorf("socks %v: check row %s says %q", socks, r.Check, r.Path)
			}
		}
	}
}

func TestProxyRefusalsAreExplained(t *testing.T) {
	fake := startFake(t)
	px := startProxy(t, false, "ship42", "right", fake.POP3Addr())
	cfg := testConfig(fake)
	cfg.Network.Proxy = "http://wrong-user:wrong-pw-555@" + px.ln.Addr().String()
	b, logs := startBridge(t, fake, cfg)
	results := b.Check(t.Context(), "")
	found := false
	for _, r := range results {
		if !r.OK && strings.Contains(r.Detail, "HTTP 407") && strings.Contains(r.Hint, "proxy_user and proxy_password_file") {
			found = true
		}
		if strings.Contains(r.Detail+r.Hint, "wrong-pw-555") {
			t.Errorf("the proxy password is in a check row: %+v", r)
		}
	}
	if !found {
		t.Errorf("no 407 row with its hint in %+v", results)
	}
	if strings.Contains(logs.String(), "wrong-pw-555") {
		t.Error("the proxy password is in the log")
	}

	// Right credentials, but the proxy forbids the POP3 port.
	cfg2 := testConfig(fake)
	cfg2.Network.Proxy = "http://ship42:right@" + px.ln.Addr().String()
	b2, _ := startBridge(t, fake, cfg2)
	for _, r := range b2.Check(t.Context(), "") {
		if r.Check == "pop3" && (r.OK || !strings.Contains(r.Hint, "the proxy forbids "+fake.POP3Addr())) {
			t.Errorf("pop3 through a proxy that forbids it: %+v", r)
		}
		if r.Check == "smtp-token" && !r.OK {
			t.Errorf("the token through the proxy: %+v", r)
		}
	}
}

func TestNoProxyAndPerAccountDirect(t *testing.T) {
	fake := startFake(t)
	px := startProxy(t, false, "", "")
	cfg := testConfig(fake)
	cfg.Network.Proxy = px.url()
	cfg.Network.NoProxy = []string{"127.0.0.1"}
	b, _ := startBridge(t, fake, cfg)
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\ndirect\n")); err != nil {
		t.Fatal(err)
	}
	direct := ""
	cfg2 := testConfig(fake)
	cfg2.Network.Proxy = px.url()
	cfg2.Accounts[0].ProxySetting = &direct
	b2, _ := startBridge(t, fake, cfg2)
	if n := px.total(); n != 1 {
		t.Errorf("%d tunnels at start, want 1: account B's token check, through the global proxy", n)
	}
	c2 := dialAuth(t, b2.SMTPAddr(), userA, passwordA)
	if _, err := send(c2, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\ndirect too\n")); err != nil {
		t.Fatal(err)
	}
	p := dialPOP3(t, b2.POP3Addr())
	p.login(userA, passwordA)
	if n := px.total(); n != 1 {
		t.Errorf("%d tunnels through the proxy, want account B's only: no_proxy and proxy = \"\" go direct", n)
	}
}
