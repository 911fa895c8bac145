package upstream

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"time"
)

// NewHTTPClient returns the HTTP client for Microsoft's endpoints: TLS 1.2
// or later verified against rootCAs (nil: the system's pool), through p
// (nil: the environment's HTTPS_PROXY and NO_PROXY), connections kept
// alive between messages, and a time limit on every request.
func NewHTTPClient(rootCAs *x509.CertPool, p *Proxy) *http.Client {
	proxyFunc := http.ProxyFromEnvironment
	dial := (&net.Dialer{Timeout: 15 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	if p != nil {
		// The tunnel is ours, for its typed refusals (407, 403, 502).
		proxyFunc, dial = nil, p.DialContext
	}
	return &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{
			Proxy:                 proxyFunc,
			DialContext:           dial,
			TLSClientConfig:       &tls.Config{RootCAs: rootCAs, MinVersion: tls.VersionTLS12},
			TLSHandshakeTimeout:   15 * time.Second,
			ResponseHeaderTimeout: 90 * time.Second,
			ForceAttemptHTTP2:     true,
			MaxIdleConns:          100,
			MaxIdleConnsPerHost:   32,
			IdleConnTimeout:       90 * time.Second,
			// A message body goes out in few large TLS records, not 4 KB ones.
			WriteBufferSize: 64 << 10,
		},
	}
}
