package upstream

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"time"
)

// NewHTTPClient returns the HTTP client for Microsoft's endpoints: TLS 1.2
// or later verified against rootCAs (nil: the system's pool), the
// environment's proxy settings, connections kept alive between messages,
// and a time limit on every request.
func NewHTTPClient(rootCAs *x509.CertPool) *http.Client {
	return &http.Client{
		Timeout: 2 * time.Minute,
		Transport: &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			DialContext:           (&net.Dialer{Timeout: 15 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
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
