package config

import (
	"crypto/tls"
	"errors"
	"os"
	"strings"

	"mailbridge/bridge/mime"
	"mailbridge/upstream"
)

// Resolved is what a configuration refers to outside itself, read once:
// the local TLS certificates, each account's client credential and its
// parsed sender policy. It is kept apart from the decoded Config, so that
// comparing two configurations compares only what the file says.
type Resolved struct {
	// SMTPTLS, POP3TLS and IMAPTLS are the local listeners' TLS
	// configurations, nil when no certificate is set.
	SMTPTLS, POP3TLS, IMAPTLS *tls.Config
	// Accounts holds what each account needs at run time, by account name.
	Accounts map[string]ResolvedAccount
}

// ResolvedAccount is an account's credential, sender policy and proxy.
type ResolvedAccount struct {
	Credentials upstream.Credentials
	Senders     mime.SenderPolicy
	// Proxy is the proxy the account's connections go through; nil for
	// direct (with the environment's proxy settings for HTTPS).
	Proxy *upstream.Proxy
}

// Resolve reads the files the configuration names (secret files, client
// certificates, local TLS certificates), checks the spool directory and
// parses allowed_senders. It returns every problem at once, each naming
// the file and the key.
func (c *Config) Resolve() (*Resolved, error) {
	var errs []error
	bad := c.problems(&errs)
	res := &Resolved{Accounts: map[string]ResolvedAccount{}}
	res.SMTPTLS = c.SMTP.LocalTLS.load("smtp", bad)
	if c.POP3.Listen != "" {
		res.POP3TLS = c.POP3.LocalTLS.load("pop3", bad)
	}
	if c.IMAP.Listen != "" {
		res.IMAPTLS = c.IMAP.LocalTLS.load("imap", bad)
	}
	if c.SMTP.SpoolDir != "" {
		if st, err := os.Stat(c.SMTP.SpoolDir); err != nil || !st.IsDir() {
			bad("smtp.spool_dir", "%q is not a directory", c.SMTP.SpoolDir)
		}
	}
	global := c.Network.proxy(c.dir, "network.proxy", c.Network.Proxy, bad)
	for i := range c.Accounts {
		a := &c.Accounts[i]
		key := func(k string) string { return accountKey(i, a, k) }
		p := global
		if a.ProxySetting != nil {
			p = c.Network.proxy(c.dir, key("proxy"), *a.ProxySetting, bad)
		}
		cred := upstream.Credentials{TokenURL: a.TokenURL, TenantID: a.TenantID, ClientID: a.ClientID, ClientSecret: a.ClientSecret}
		switch {
		case a.ClientSecretFile != "" && a.ClientSecret == "":
			p := absPath(c.dir, a.ClientSecretFile)
			b, err := os.ReadFile(p)
			if err != nil {
				bad(key("client_secret_file"), "cannot read it: %v", err)
			} else if cred.ClientSecret = strings.TrimSpace(string(b)); cred.ClientSecret == "" {
				bad(key("client_secret_file"), "%s is empty", p)
			} else if why := CheckSecret(cred.ClientSecret); why != "" {
				bad(key("client_secret_file"), "%s: %s", p, why)
			}
		case a.ClientCertificateFile != "" && a.ClientSecret == "":
			cc, err := upstream.LoadClientCertificate(absPath(c.dir, a.ClientCertificateFile))
			if err != nil {
				bad(key("client_certificate_file"), "%v", err)
			}
			cred.Certificate = cc
		}
		patterns := a.AllowedSenders
		if len(patterns) == 0 {
			patterns = []string{a.Mailbox}
		}
		policy, err := mime.ParseSenderPolicy(patterns)
		if err != nil && len(a.AllowedSenders) > 0 {
			bad(key("allowed_senders"), "%v", err)
		}
		res.Accounts[a.Name] = ResolvedAccount{Credentials: cred, Senders: policy, Proxy: p}
	}
	return res, errors.Join(errs...)
}

// load reads the certificate and key; nil when none is set.
func (l *LocalTLS) load(table string, bad func(key, format string, args ...any)) *tls.Config {
	if l.TLSCert == "" || l.TLSKey == "" {
		return nil
	}
	cert, err := tls.LoadX509KeyPair(l.TLSCert, l.TLSKey)
	if err != nil {
		bad(table+".tls_cert", "cannot load the certificate and key: %v", err)
		return nil
	}
	min := TLSVersions[l.TLSMinVersion]
	if min == 0 {
		min = tls.VersionTLS12
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: min}
	return cfg
}

// proxy reads a proxy setting with the table's user and password; nil for
// "".
func (n *NetworkConfig) proxy(dir, key, raw string, bad func(key, format string, args ...any)) *upstream.Proxy {
	if raw == "" {
		return nil
	}
	p, err := upstream.ParseProxy(raw)
	if err != nil {
		bad(key, "%v", err)
		return nil
	}
	if n.ProxyUser != "" {
		p.User = n.ProxyUser
	}
	if n.ProxyPasswordFile != "" {
		b, err := os.ReadFile(absPath(dir, n.ProxyPasswordFile))
		if err != nil {
			bad("network.proxy_password_file", "cannot read it: %v", err)
		}
		p.Password = strings.TrimSpace(string(b))
	}
	p.NoProxy = n.NoProxy
	return p
}
