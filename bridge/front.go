package bridge

import (
	"crypto/tls"
	"errors"
	"net"
	"time"

	"github.com/emersion/go-smtp"

	"mailbridge/bridge/config"
	"mailbridge/bridge/conntrack"
	"mailbridge/bridge/localtls"
)

// front is one protocol's listening side: its plain and implicit-TLS
// listeners, the certificate watcher of its local TLS, its session slots
// and its login policy. Every protocol stacks them in the one order that
// stack gives, so that the session limit, the guard and the eviction of
// idlers meet a connection the same way whatever it speaks.
type front struct {
	proto  string
	listen string // "" when the protocol is off
	local  config.LocalTLS
	watch  *localtls.Watcher
	tls    *tls.Config // the watched local TLS; nil without tls_cert
	login  *conntrack.LoginPolicy
	// limit wraps a listener in the protocol's session limit, which calls
	// evict when full.
	limit func(ln net.Listener, evict func() bool) net.Listener
	// idle, if set, renews a connection's read deadline as bytes arrive
	// (SMTP, whose server sets one deadline per command).
	idle time.Duration
	// guard, if set, reads the client's bytes for the server (SMTP's
	// guard in front of go-smtp): below the watcher on the plain listener
	// (STARTTLS passes through it), above TLS on the implicit-TLS one.
	guard func(net.Listener) net.Listener
	// serve runs the protocol's server on a stacked listener; serveTLS, if
	// set, on the implicit-TLS one (go-smtp needs to know it).
	serve, serveTLS func(net.Listener) error

	ln, tlsLn net.Listener // open listeners, nil if none
}

// stack puts the layers over ln, an open listener of f's; implicitTLS
// says whether clients speak TLS from the first byte.
func (f *front) stack(conns *conntrack.Tracker, ln net.Listener, implicitTLS bool) net.Listener {
	l := f.limit(ln, func() bool { return conns.EvictUnauthenticated(f.login) })
	if f.idle > 0 {
		l = conntrack.IdleListener(l, f.idle)
	}
	if f.guard != nil && !implicitTLS {
		l = f.guard(l)
	}
	l = conns.WrapLogin(f.watch.Listener(l), f.login)
	if implicitTLS {
		l = tls.NewListener(l, f.tls)
		if f.guard != nil {
			l = f.guard(l)
		}
	}
	return l
}

// open opens f's listeners (none when the protocol is off).
func (f *front) open(b *Bridge) error {
	if f.listen == "" {
		return nil
	}
	ln, err := b.listen(f.proto, f.listen, nil)
	if err != nil {
		return err
	}
	f.ln = ln
	if f.local.TLSListen != "" {
		if f.tlsLn, err = b.listen(f.proto, f.local.TLSListen, f.tls); err != nil {
			return err
		}
	}
	return nil
}

// start serves f's open listeners in the background.
func (f *front) start(b *Bridge) {
	run := func(serve func(net.Listener) error, l net.Listener) {
		b.serve(func() {
			if err := serve(l); err != nil && !errors.Is(err, smtp.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				b.log.Error().Err(err).Str("proto", f.proto).Msg("listener stopped")
			}
		})
	}
	if f.ln != nil {
		run(f.serve, f.stack(&b.conns, f.ln, false))
	}
	if f.tlsLn != nil {
		serveTLS := f.serveTLS
		if serveTLS == nil {
			serveTLS = f.serve
		}
		run(serveTLS, f.stack(&b.conns, f.tlsLn, true))
	}
}
