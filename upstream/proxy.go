package upstream

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/http/httpproxy"
	"golang.org/x/net/proxy"
)

// Proxy is an explicit proxy that every connection to Microsoft goes
// through: an HTTP (or HTTPS) proxy, tunnelling with CONNECT, or a SOCKS5
// one, with an optional user and password.
type Proxy struct {
	URL      *url.URL // http://, https:// or socks5://host:port, without credentials
	User     string
	Password string
	// NoProxy lists hosts reached directly, with the usual NO_PROXY
	// rules (golang.org/x/net/http/httpproxy): "host", "domain" and
	// ".domain" and "*.domain" (the domain and its subdomains), an IP
	// address or a CIDR range, an optional ":port", or "*".
	NoProxy []string
	// RootCAs verify an https:// proxy's own certificate.
	RootCAs *x509.CertPool

	noProxyOnce sync.Once
	viaProxy    func(*url.URL) (*url.URL, error) // httpproxy's rules over NoProxy
}

// ParseProxy reads a proxy URL ("http://proxy:8080", "socks5://gw:1080");
// user and password, if in the URL, are taken out of it.
func ParseProxy(raw string) (*Proxy, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("%q is not a proxy URL such as http://proxy.example:8080", Redact(raw))
	}
	switch u.Scheme {
	case "http", "https", "socks5":
	default:
		return nil, fmt.Errorf("%q: the proxy must be http://, https:// or socks5://", Redact(raw))
	}
	p := &Proxy{URL: &url.URL{Scheme: u.Scheme, Host: u.Host}}
	if u.User != nil {
		p.User = u.User.Username()
		p.Password, _ = u.User.Password()
	}
	if u.Port() == "" {
		p.URL.Host = net.JoinHostPort(u.Hostname(), map[string]string{"http": "80", "https": "443", "socks5": "1080"}[u.Scheme])
	}
	return p, nil
}

// String is the proxy's URL without credentials, for the log.
func (p *Proxy) String() string {
	if p == nil {
		return "direct"
	}
	return p.URL.String()
}

// Redact removes the password from a URL in a string, for error texts.
// A string that is no URL (no scheme, a bad % escape) keeps nothing of
// what could be a user and password: everything before the last "@" of
// its authority goes.
func Redact(raw string) string {
	if u, err := url.Parse(raw); err == nil && u.Host != "" {
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), "xxxxx")
		}
		return u.String()
	}
	prefix, rest := "", raw
	if i := strings.Index(raw, "://"); i >= 0 {
		prefix, rest = raw[:i+3], raw[i+3:]
	}
	if at := strings.LastIndexByte(rest, '@'); at >= 0 {
		return prefix + "xxxxx@" + rest[at+1:]
	}
	return raw
}

// bypass reports whether host:port is reached without the proxy.
// httpproxy never proxies a loopback address; the bridge does, unless
// NoProxy names it (Microsoft is never on loopback, but tests tunnel to a
// fake there), by its own rules for that case: "*", the host itself, or a
// CIDR range holding it.
func (p *Proxy) bypass(host, port string) bool {
	if ip := net.ParseIP(host); strings.EqualFold(host, "localhost") || (ip != nil && ip.IsLoopback()) {
		for _, n := range p.NoProxy {
			n = strings.ToLower(strings.TrimSpace(n))
			if _, cidr, err := net.ParseCIDR(n); n == "*" || n == strings.ToLower(host) || (err == nil && ip != nil && cidr.Contains(ip)) {
				return true
			}
		}
		return false
	}
	p.noProxyOnce.Do(func() {
		any := "http://proxy.invalid"
		p.viaProxy = (&httpproxy.Config{HTTPProxy: any, HTTPSProxy: any, NoProxy: strings.Join(p.NoProxy, ",")}).ProxyFunc()
	})
	u, err := p.viaProxy(&url.URL{Scheme: "https", Host: net.JoinHostPort(host, port)})
	return err == nil && u == nil
}

// ProxyError is a proxy's refusal of a tunnel, or no proxy at its address.
type ProxyError struct {
	Proxy  string // the proxy's URL, without credentials
	Target string // host:port asked for
	Status int    // the proxy's HTTP status; 0 when it could not be reached
	Err    error  // the connection error when Status is 0
}

func (e *ProxyError) Error() string {
	if e.Status == 0 {
		return fmt.Sprintf("proxy %s could not be reached: %v", e.Proxy, e.Err)
	}
	return fmt.Sprintf("proxy %s refused CONNECT %s: HTTP %d %s", e.Proxy, e.Target, e.Status, http.StatusText(e.Status))
}

func (e *ProxyError) Unwrap() error { return e.Err }

// Hint says what the administrator should do.
func (e *ProxyError) Hint() string {
	switch {
	case e.Status == 0:
		return "nothing answers at the proxy's address: check [network] proxy (host and port), or that the proxy runs"
	case e.Status == http.StatusProxyAuthRequired:
		return "the proxy wants a user and password, or refused them: set proxy_user and proxy_password_file in [network]"
	case e.Status == http.StatusForbidden:
		return "the proxy forbids " + e.Target + ": ask for login.microsoftonline.com:443, graph.microsoft.com:443 and outlook.office365.com:995 and :993 to be allowed"
	case e.Status == http.StatusBadGateway || e.Status == http.StatusGatewayTimeout:
		return "the proxy cannot reach Microsoft (" + e.Target + "): its own connection to the Internet or its DNS fails"
	}
	return "the proxy refused the tunnel: see its status and its own log"
}

// DialContext opens a TCP connection to addr through the proxy (or
// directly, for a host in NoProxy): CONNECT for an HTTP proxy, the SOCKS5
// handshake for a SOCKS5 one. TLS, if any, goes inside.
func (p *Proxy) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	d := &net.Dialer{Timeout: 15 * time.Second, KeepAlive: 30 * time.Second}
	host, port, _ := net.SplitHostPort(addr)
	if p.bypass(host, port) {
		return d.DialContext(ctx, network, addr)
	}
	if p.URL.Scheme == "socks5" {
		var auth *proxy.Auth
		if p.User != "" {
			auth = &proxy.Auth{User: p.User, Password: p.Password}
		}
		s, err := proxy.SOCKS5("tcp", p.URL.Host, auth, d)
		if err != nil {
			return nil, &ProxyError{Proxy: p.String(), Target: addr, Err: err}
		}
		c, err := s.(proxy.ContextDialer).DialContext(ctx, network, addr)
		if err != nil {
			return nil, &ProxyError{Proxy: p.String(), Target: addr, Err: err}
		}
		return c, nil
	}
	c, err := d.DialContext(ctx, "tcp", p.URL.Host)
	if err != nil {
		return nil, &ProxyError{Proxy: p.String(), Target: addr, Err: err}
	}
	if p.URL.Scheme == "https" {
		tc := tls.Client(c, &tls.Config{ServerName: p.URL.Hostname(), RootCAs: p.RootCAs, MinVersion: tls.VersionTLS12})
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, fmt.Errorf("proxy %s: %w", p, err)
		}
		c = tc
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	} else {
		c.SetDeadline(time.Now().Add(30 * time.Second))
	}
	req := "CONNECT " + addr + " HTTP/1.1\r\nHost: " + addr + "\r\n"
	if p.User != "" {
		req += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(p.User+":"+p.Password)) + "\r\n"
	}
	if _, err := c.Write([]byte(req + "\r\n")); err != nil {
		c.Close()
		return nil, &ProxyError{Proxy: p.String(), Target: addr, Err: err}
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		c.Close()
		return nil, &ProxyError{Proxy: p.String(), Target: addr, Err: err}
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		c.Close()
		return nil, &ProxyError{Proxy: p.String(), Target: addr, Status: resp.StatusCode}
	}
	if br.Buffered() > 0 {
		c.Close()
		return nil, &ProxyError{Proxy: p.String(), Target: addr, Err: errors.New("the proxy sent data before the tunnel was open")}
	}
	c.SetDeadline(time.Time{})
	return c, nil
}
