package localtls

import (
	"crypto/tls"
	"net"
	"slices"
	"sync"

	"github.com/rs/zerolog"
)

// Hints for a failed handshake.
const (
	HintOldClient   = "the client knows only an old TLS version: set tls_min_version = \"1.0\" (or \"1.1\") in this table for it, or on the client machine enable strong cryptography for .NET (registry SchUseStrongCrypto = 1 under HKLM\\SOFTWARE\\Microsoft\\.NETFramework\\v4.0.30319)"
	HintCertificate = "if the client refused the bridge's certificate, trust the certificate from `mailbridge gen-cert` on the client machine (certutil -addstore -f Root mailbridge.crt), and check that the name the client connects to is in it"
)

// Watcher explains failed TLS handshakes of one protocol's listeners in
// the log: the highest version the client offered (read from its
// ClientHello), the error where one is known, and a hint. Use its Config
// for the server, and Listener under the TLS layer, so that it sees the
// connections end.
type Watcher struct {
	log zerolog.Logger
	key string // the table, such as "smtp", for the hints and the log
	min uint16

	mu sync.Mutex
	hs map[string]*handshake // by remote address
}

type handshake struct {
	offered  uint16 // the highest version in the ClientHello
	done     bool
	reported bool
}

// NewWatcher returns a watcher for the listeners of table ("smtp",
// "pop3"), whose tls_min_version is min.
func NewWatcher(log zerolog.Logger, table string, min uint16) *Watcher {
	return &Watcher{log: log.With().Str("proto", table).Logger(), key: table, min: min, hs: map[string]*handshake{}}
}

// Config returns base for a server, with the hooks that watch each
// handshake.
func (w *Watcher) Config(base *tls.Config) *tls.Config {
	if base == nil {
		return nil
	}
	cfg := base.Clone()
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		remote := hello.Conn.RemoteAddr().String()
		offered := slices.Max(append([]uint16{0}, hello.SupportedVersions...))
		h := &handshake{offered: offered}
		w.mu.Lock()
		w.hs[remote] = h
		w.mu.Unlock()
		if offered < w.min {
			w.report(remote, h, "the client offers at most "+tls.VersionName(offered)+", below "+w.key+".tls_min_version "+tls.VersionName(w.min), HintOldClient)
		}
		c := base.Clone()
		c.VerifyConnection = func(tls.ConnectionState) error {
			w.mu.Lock()
			h.done = true
			w.mu.Unlock()
			return nil
		}
		return c, nil
	}
	return cfg
}

// Failed reports a handshake on the connection from remote that failed
// with err (the bridge's own STLS, where the error is known).
func (w *Watcher) Failed(remote string, err error) {
	w.mu.Lock()
	h := w.hs[remote]
	w.mu.Unlock()
	if h == nil {
		h = &handshake{}
	}
	hint := HintCertificate
	if h.offered != 0 && h.offered < w.min {
		hint = HintOldClient
	}
	w.report(remote, h, err.Error(), hint)
}

func (w *Watcher) report(remote string, h *handshake, reason, hint string) {
	w.mu.Lock()
	already := h.reported
	h.reported = true
	w.mu.Unlock()
	if already {
		return
	}
	ev := w.log.Warn().Str("remote", remote)
	if h.offered != 0 {
		ev = ev.Str("client_max_version", tls.VersionName(h.offered))
	}
	ev.Str("error", reason).Str("hint", hint).Msg("TLS handshake failed")
}

// closed is called when a connection ends: a handshake that began and
// never finished is reported.
func (w *Watcher) closed(remote string) {
	w.mu.Lock()
	h := w.hs[remote]
	delete(w.hs, remote)
	w.mu.Unlock()
	if h != nil && !h.done {
		w.report(remote, h, "the handshake did not complete: the client gave up after the bridge's certificate or closed the connection", HintCertificate)
	}
}

// Listener returns ln whose connections tell the watcher when they end.
// It goes under the TLS layer (implicit TLS) or under the protocol's
// STARTTLS.
func (w *Watcher) Listener(ln net.Listener) net.Listener { return &watchedListener{Listener: ln, w: w} }

type watchedListener struct {
	net.Listener
	w *Watcher
}

func (l *watchedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &watchedConn{Conn: c, w: l.w}, nil
}

type watchedConn struct {
	net.Conn
	w    *Watcher
	once sync.Once
}

func (c *watchedConn) Close() error {
	c.once.Do(func() { c.w.closed(c.RemoteAddr().String()) })
	return c.Conn.Close()
}
