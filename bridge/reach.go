package bridge

import (
	"net"
	"net/url"
	"slices"
	"strings"

	"mailbridge/bridge/account"
	"mailbridge/bridge/failure"
)

// unreachable reports whether err says Microsoft could not be reached at
// all (no answer, not a refusal, a proxy's answer or an untrusted
// certificate, which have hints of their own).
func unreachable(err error) bool {
	f := failure.Classify(err)
	return err != nil && f.Kind == failure.Network && !f.UntrustedCertificate && f.Upstream != "proxy"
}

// reachHint says what this account needs to reach: the hosts and ports of
// Microsoft's endpoints it uses, and the proxy key.
func (b *Bridge) reachHint(a *account.Account) string {
	var hosts []string
	add := func(hostport string) {
		if hostport != "" && !slices.Contains(hosts, hostport) {
			hosts = append(hosts, hostport)
		}
	}
	add(urlHostPort(a.Config.TokenURL))
	if a.Config.Uses("smtp") {
		add(urlHostPort(a.Config.GraphURL))
	}
	if a.Config.Uses("pop3") && b.cfg.POP3.Listen != "" {
		add(a.Config.POP3Upstream)
	}
	if a.Config.Uses("imap") && b.cfg.IMAP.Listen != "" {
		add(a.Config.IMAPUpstream)
	}
	return "this machine cannot reach Microsoft 365: allow outbound TCP to " + strings.Join(hosts, ", ") +
		" in the firewall and check DNS; behind a web proxy set [network] proxy = \"http://proxy.example:8080\" (or HTTPS_PROXY)"
}

// urlHostPort is the host:port a URL connects to.
func urlHostPort(raw string) string {
	u, err := url.Parse(strings.ReplaceAll(raw, "{tenant}", "t"))
	if err != nil || u.Host == "" {
		return ""
	}
	if u.Port() != "" {
		return u.Host
	}
	port := "443"
	if u.Scheme == "http" {
		port = "80"
	}
	return net.JoinHostPort(u.Hostname(), port)
}
