package upstream_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"mailbridge/upstream"
	"mailbridge/upstream/m365fake"
	"mailbridge/upstream/m365fake/m365test"
)

const (
	tenant  = "aaaaaaaa-0000-0000-0000-00000000000a"
	client  = "c11e0000-0000-0000-0000-00000000000a"
	secret  = "s3cr3t~Value"
	mailbox = "orders@example.com"
)

func startFake(t *testing.T) *m365fake.Server {
	t.Helper()
	return m365test.Start(t, m365test.Tenant{ID: tenant, ClientID: client, Secret: secret,
		Roles: []string{"Mail.Send", "POP.AccessAsApp"}, Mailboxes: []string{mailbox}})
}

// tokenSource returns a token source of the test app for scope, on a
// client that trusts the fake.
func tokenSource(fake *m365fake.Server, scope string) *upstream.TokenSource {
	return upstream.NewTokenSources(upstream.NewHTTPClient(fake.CertPool(), nil)).Get(
		upstream.Credentials{TokenURL: fake.TokenURL(), TenantID: tenant, ClientID: client, ClientSecret: secret}, scope)
}

func TestTokenErrorsAreDecoded(t *testing.T) {
	fake := startFake(t)
	fake.AddApp(tenant, "expired-app", "old", "Mail.Send")
	fake.ExpireSecret(tenant, "expired-app")
	sources := upstream.NewTokenSources(upstream.NewHTTPClient(fake.CertPool(), nil))
	for _, tc := range []struct {
		name            string
		tenant, client  string
		secret, scope   string
		status, aadsts  int
		code, hintStart string
	}{
		{"wrong secret", tenant, client, "secret-id-instead", upstream.GraphScope, 401, 7000215, "invalid_client", "the client secret is wrong"},
		{"expired secret", tenant, "expired-app", "old", upstream.GraphScope, 401, 7000222, "invalid_client", "the client secret has expired"},
		{"unknown app", tenant, "nope", secret, upstream.GraphScope, 400, 700016, "unauthorized_client", "the Application (client) ID is not known"},
		{"unknown tenant", "no-such-tenant", client, secret, upstream.GraphScope, 400, 90002, "invalid_request", "the tenant was not found"},
		{"scope without .default", tenant, client, secret, "https://graph.microsoft.com/Mail.Send", 400, 1002012, "invalid_scope", "the scope must end in /.default"},
		{"unknown resource", tenant, client, secret, "https://outlook.office366.com/.default", 400, 500011, "invalid_resource", "the resource of the scope is not in this tenant"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := sources.Get(upstream.Credentials{TokenURL: fake.TokenURL(), TenantID: tc.tenant, ClientID: tc.client, ClientSecret: tc.secret}, tc.scope)
			_, err := ts.Token(context.Background())
			var te *upstream.TokenError
			if !errors.As(err, &te) {
				t.Fatalf("got %v, want a *TokenError", err)
			}
			if te.Status != tc.status || te.AADSTS != tc.aadsts || te.Code != tc.code || te.Temporary() {
				t.Errorf("got status %d AADSTS%d %q temporary=%v, want %d AADSTS%d %q", te.Status, te.AADSTS, te.Code, te.Temporary(), tc.status, tc.aadsts, tc.code)
			}
			if !strings.HasPrefix(te.Hint(), tc.hintStart) {
				t.Errorf("hint %q, want it to start %q", te.Hint(), tc.hintStart)
			}
			if strings.Contains(te.Description, "\n") || !strings.HasPrefix(te.Description, "AADSTS") {
				t.Errorf("description %q: want the first line only", te.Description)
			}
			if ts.LastError() == nil {
				t.Error("LastError is nil after a failure")
			}
		})
	}
}

func TestTokenIsSharedCachedAndRenewed(t *testing.T) {
	fake := startFake(t)
	sources := upstream.NewTokenSources(upstream.NewHTTPClient(fake.CertPool(), nil))
	cred := upstream.Credentials{TokenURL: fake.TokenURL(), TenantID: tenant, ClientID: client, ClientSecret: secret}
	ts := sources.Get(cred, upstream.GraphScope)
	if sources.Get(cred, upstream.GraphScope) != ts {
		t.Fatal("the same credentials and scope gave two token sources")
	}
	if sources.Get(cred, upstream.OutlookScope) == ts {
		t.Fatal("two scopes share a token source")
	}
	fake.FailToken(1, m365fake.Fault{Delay: 50 * time.Millisecond})
	var wg sync.WaitGroup
	tokens := make([]string, 50)
	for i := range tokens {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tok, err := ts.Token(context.Background())
			if err != nil {
				t.Error(err)
			}
			tokens[i] = tok
		}()
	}
	wg.Wait()
	if n := fake.TokenRequests(upstream.GraphScope); n != 1 || ts.Requests() != 1 {
		t.Fatalf("%d token requests (source counted %d) for 50 concurrent callers, want 1", n, ts.Requests())
	}
	for _, tok := range tokens {
		if tok != tokens[0] {
			t.Fatal("callers got different tokens")
		}
	}
	roles, ok := upstream.TokenRoles(tokens[0])
	if !ok || !slices.Equal(roles, []string{"Mail.Send"}) {
		t.Errorf("Graph token roles %v (%v), want [Mail.Send] only", roles, ok)
	}
	ts.Invalidate("not the cached one")
	if tok, _ := ts.Token(context.Background()); tok != tokens[0] || ts.Requests() != 1 {
		t.Error("invalidating another token dropped the cached one")
	}
	ts.Invalidate(tokens[0])
	if _, err := ts.Token(context.Background()); err != nil || ts.Requests() != 2 {
		t.Errorf("after Invalidate: err %v, %d requests; want a new token request", err, ts.Requests())
	}
}

func TestTokenRenewedBeforeExpiry(t *testing.T) {
	fake := startFake(t)
	fake.SetTokenLifetime(4 * time.Minute) // shorter than the renewal margin: every call renews
	ts := tokenSource(fake, upstream.GraphScope)
	for range 3 {
		if _, err := ts.Token(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if n := ts.Requests(); n != 3 {
		t.Errorf("%d token requests for a token about to expire, want 3", n)
	}
}

func TestTokenWaitHonoursContext(t *testing.T) {
	fake := startFake(t)
	fake.FailToken(1, m365fake.Fault{Delay: 2 * time.Second})
	ts := tokenSource(fake, upstream.GraphScope)
	go ts.Token(context.Background()) // holds the request
	time.Sleep(50 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := ts.Token(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("got %v, want the waiter to give up with its context", err)
	}
}

func TestSendMailRenewsRefusedToken(t *testing.T) {
	fake := startFake(t)
	hc := upstream.NewHTTPClient(fake.CertPool(), nil)
	ts := tokenSource(fake, upstream.GraphScope)
	g := upstream.NewGraphClient(fake.GraphURL(), hc, ts)
	msg := []byte("From: orders@example.com\r\nTo: a@example.org\r\n\r\nhello\r\n")
	fake.FailGraph(1, m365fake.Fault{Status: 401, Code: "InvalidAuthenticationToken", Message: "Access token has expired or is not yet valid."})
	res, err := g.SendMail(context.Background(), mailbox, bytes.NewReader(msg), int64(len(msg)))
	if err != nil {
		t.Fatal(err)
	}
	if res.Status != 202 || res.RequestID == "" {
		t.Errorf("result %+v", res)
	}
	if ts.Requests() != 2 {
		t.Errorf("%d token requests, want 2 (the refused token renewed once)", ts.Requests())
	}
	if sent := fake.Sent(); len(sent) != 1 || !bytes.Equal(sent[0].MIME, msg) {
		t.Fatalf("Graph received %d messages", len(sent))
	}
}

func TestSendMailErrors(t *testing.T) {
	fake := startFake(t)
	hc := upstream.NewHTTPClient(fake.CertPool(), nil)
	ts := tokenSource(fake, upstream.GraphScope)
	g := upstream.NewGraphClient(fake.GraphURL(), hc, ts)
	msg := []byte("From: orders@example.com\r\nTo: a@example.org\r\n\r\nhello\r\n")
	send := func(user string, m []byte) error {
		_, err := g.SendMail(context.Background(), user, bytes.NewReader(m), int64(len(m)))
		return err
	}
	fake.FailGraph(1, m365fake.Throttled("2.128"))
	var apiErr *upstream.APIError
	if err := send(mailbox, msg); !errors.As(err, &apiErr) || apiErr.Status != 429 || apiErr.Code != "TooManyRequests" ||
		apiErr.RetryAfter != 2128*time.Millisecond || !apiErr.Temporary() || apiErr.RequestID == "" {
		t.Errorf("429: got %#v", err)
	}
	if err := send("nobody@example.com", msg); !errors.As(err, &apiErr) || apiErr.Status != 404 || apiErr.Code != "ErrorInvalidUser" || apiErr.Temporary() {
		t.Errorf("unknown user: got %v", err)
	}
	other := []byte("From: ceo@example.com\r\nTo: a@example.org\r\n\r\nhello\r\n")
	if err := send(mailbox, other); !errors.As(err, &apiErr) || apiErr.Status != 403 || apiErr.Code != "ErrorSendAsDenied" {
		t.Errorf("send as another user: got %v", err)
	}
	big := bytes.Repeat([]byte("x"), upstream.MaxSendMailMIME+3)
	if err := send(mailbox, big); !errors.As(err, &apiErr) || apiErr.Status != 413 {
		t.Errorf("over 4 MB: got %v", err)
	}
	fake.FailGraph(1, m365fake.Fault{Drop: true})
	if err := send(mailbox, msg); err == nil || errors.As(err, &apiErr) {
		t.Errorf("dropped connection: got %v, want a transport error", err)
	}
	if n := len(fake.Sent()); n != 0 {
		t.Errorf("%d messages accepted, want none", n)
	}
	if err := send(mailbox, bytes.Repeat([]byte("y"), upstream.MaxSendMailMIME-60)); !errors.As(err, &apiErr) || apiErr.Status != 400 {
		t.Errorf("just under the limit reaches Graph's content checks: got %v", err)
	}
}

func TestBase64Reader(t *testing.T) {
	for _, n := range []int{0, 1, 2, 3, 4, 3071, 3072, 3073, 100000} {
		raw := make([]byte, n)
		for i := range raw {
			raw[i] = byte(mrand.N(256))
		}
		want := base64.StdEncoding.EncodeToString(raw)
		got, err := io.ReadAll(iotest.OneByteReader(upstream.NewBase64Reader(iotest.HalfReader(bytes.NewReader(raw)))))
		if err != nil || string(got) != want {
			t.Fatalf("n=%d: encoding differs (err %v)", n, err)
		}
		if err := iotest.TestReader(upstream.NewBase64Reader(bytes.NewReader(raw)), []byte(want)); err != nil {
			t.Fatalf("n=%d: %v", n, err)
		}
	}
	failing := upstream.NewBase64Reader(io.MultiReader(bytes.NewReader([]byte("abc")), iotest.ErrReader(io.ErrClosedPipe)))
	if _, err := io.ReadAll(failing); !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("a read error became %v", err)
	}
}

func TestFakeGraphRefusesBadBase64AndBadTokens(t *testing.T) {
	fake := startFake(t)
	hc := upstream.NewHTTPClient(fake.CertPool(), nil)
	ts := tokenSource(fake, upstream.GraphScope)
	graphToken, err := ts.Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	outlookToken, err := tokenSource(fake, upstream.OutlookScope).Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	post := func(token, body string) (int, string, string) {
		req, _ := http.NewRequest("POST", fake.GraphURL()+"/users/"+mailbox+"/sendMail", strings.NewReader(body))
		req.Header.Set("Content-Type", "text/plain")
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), resp.Header.Get("request-id")
	}
	if st, body, rid := post(graphToken, "not base64!"); st != 400 || !strings.Contains(body, `"code":"ErrorMimeContentInvalidBase64String"`) || rid == "" || !strings.Contains(body, rid) {
		t.Errorf("bad base64: %d %s (request-id %q)", st, body, rid)
	}
	if st, body, _ := post(outlookToken, base64.StdEncoding.EncodeToString([]byte("To: a@b.c\r\n\r\nx"))); st != 401 || !strings.Contains(body, "Invalid audience") {
		t.Errorf("Outlook token on Graph: %d %s", st, body)
	}
	if st, body, _ := post(graphToken+"x", "eA=="); st != 401 || !strings.Contains(body, "InvalidAuthenticationToken") {
		t.Errorf("tampered token: %d %s", st, body)
	}
	// Line breaks inside the base64 are accepted, as by Graph.
	enc := base64.StdEncoding.EncodeToString([]byte("From: orders@example.com\r\nTo: a@example.org\r\n\r\nhello\r\n"))
	if st, body, _ := post(graphToken, enc[:20]+"\r\n"+enc[20:]); st != 202 {
		t.Errorf("base64 with a line break: %d %s", st, body)
	}
}

func TestFakeOutlookPOP3BehavesAsOutlook(t *testing.T) {
	fake := startFake(t)
	fake.GrantMailboxAccess(tenant, client, mailbox)
	addr := fake.POP3Addr()
	token, err := tokenSource(fake, upstream.OutlookScope).Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	dial := func() (*tls.Conn, *bufio.Reader) {
		c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: fake.CertPool()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		r := bufio.NewReader(c)
		greeting, _ := r.ReadString('\n')
		if !strings.HasPrefix(greeting, "+OK The Microsoft Exchange POP3 service is ready. [") {
			t.Fatalf("greeting %q", greeting)
		}
		return c, r
	}
	ask := func(c *tls.Conn, r *bufio.Reader, line string) string {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, line+"\r\n")
		l, _ := r.ReadString('\n')
		return strings.TrimRight(l, "\r\n")
	}
	blob := base64.StdEncoding.EncodeToString([]byte("user=" + mailbox + "\x01auth=Bearer " + token + "\x01\x01"))

	// The token on the AUTH line: over the 512-byte limit, connection closed.
	c, r := dial()
	if l := ask(c, r, "AUTH XOAUTH2 "+blob); l != "-ERR Protocol error. Connection is closed. 10" {
		t.Errorf("one-step XOAUTH2: %q", l)
	}
	if _, err := r.ReadByte(); err == nil {
		t.Error("the connection stayed open")
	}
	// Basic authentication is off.
	c, r = dial()
	ask(c, r, "USER "+mailbox)
	if l := ask(c, r, "PASS secret"); l != "-ERR Authentication failure: unknown user name or bad password." {
		t.Errorf("PASS: %q", l)
	}
	// Two steps: accepted. A Graph token is not.
	if l := ask(c, r, "AUTH XOAUTH2"); l != "+ " {
		t.Errorf("continuation %q", l)
	}
	if l := ask(c, r, blob); l != "+OK User successfully authenticated." {
		t.Errorf("two-step XOAUTH2: %q", l)
	}
	if l := ask(c, r, "QUIT"); l != "+OK Microsoft Exchange Server 2016 POP3 server signing off." {
		t.Errorf("QUIT: %q", l)
	}
	graphToken, _ := tokenSource(fake, upstream.GraphScope).Token(context.Background())
	_, err = (&upstream.POP3Dialer{Addr: addr, RootCAs: fake.CertPool()}).Dial(context.Background(), mailbox, graphToken)
	var authErr *upstream.POP3AuthError
	if !errors.As(err, &authErr) || authErr.Reply != "-ERR Authentication failure: unknown user name or bad password." {
		t.Errorf("Graph token on POP3: %v", err)
	}
	// The dialer verifies the certificate.
	if _, err := (&upstream.POP3Dialer{Addr: addr}).Dial(context.Background(), mailbox, token); err == nil || errors.As(err, &authErr) {
		t.Errorf("untrusted certificate: got %v, want a TLS error", err)
	}
}

func TestFakeChecksClientAssertions(t *testing.T) {
	fake := startFake(t)
	key, _ := rsa.GenerateKey(rand.Reader, 2048)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	cert, _ := x509.ParseCertificate(der)
	fake.AddAppCertificate(tenant, "cert-app", cert, "Mail.Send")
	cc := &upstream.ClientCertificate{Key: key, Cert: cert}
	tokenURL := strings.ReplaceAll(fake.TokenURL(), "{tenant}", tenant)
	hc := upstream.NewHTTPClient(fake.CertPool(), nil)
	ask := func(assertion string) (int, string) {
		form := url.Values{"grant_type": {"client_credentials"}, "client_id": {"cert-app"}, "scope": {upstream.GraphScope},
			"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}, "client_assertion": {assertion}}
		resp, err := hc.PostForm(tokenURL, form)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	good, _ := cc.Assertion("cert-app", tokenURL, time.Now())
	if code, body := ask(good); code != 200 || !strings.Contains(body, "access_token") {
		t.Errorf("a good assertion: %d %s", code, body)
	}
	expired, _ := cc.Assertion("cert-app", tokenURL, time.Now().Add(-time.Hour))
	if code, body := ask(expired); code != 401 || !strings.Contains(body, "AADSTS700024") {
		t.Errorf("an expired assertion: %d %s", code, body)
	}
	elsewhere, _ := cc.Assertion("cert-app", "https://login.microsoftonline.com/"+tenant+"/oauth2/v2.0/token", time.Now())
	if code, body := ask(elsewhere); code != 401 || !strings.Contains(body, "AADSTS700027") || !strings.Contains(body, "audience") {
		t.Errorf("an assertion for another audience: %d %s", code, body)
	}
	parts := strings.Split(good, ".")
	if code, body := ask(parts[0] + "." + parts[1] + ".AAAA"); code != 401 || !strings.Contains(body, "signature") {
		t.Errorf("a forged signature: %d %s", code, body)
	}
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	forged, _ := (&upstream.ClientCertificate{Key: other, Cert: cert}).Assertion("cert-app", tokenURL, time.Now())
	if code, _ := ask(forged); code != 401 {
		t.Errorf("signed with another key: %d", code)
	}
}

// no_proxy follows the usual NO_PROXY rules for Microsoft's names and
// addresses, and the bridge's own for loopback (which httpproxy would
// never proxy).
func TestNoProxyRules(t *testing.T) {
	p, err := upstream.ParseProxy("http://proxy.example:8080")
	if err != nil {
		t.Fatal(err)
	}
	p.NoProxy = []string{"*.corp.example", "10.0.0.0/8", ".internal.example", "graph.microsoft.us", "127.0.0.2"}
	for _, tc := range []struct {
		addr   string
		direct bool
	}{
		{"mail.corp.example:443", true}, {"corp.example:443", false}, {"10.1.2.3:993", true}, {"a.b.internal.example:995", true},
		{"graph.microsoft.us:443", true}, {"127.0.0.2:443", true},
		{"graph.microsoft.com:443", false}, {"11.1.2.3:993", false}, {"corp.example.com:443", false}, {"127.0.0.1:443", false},
	} {
		host, port, _ := net.SplitHostPort(tc.addr)
		if got := upstream.ProxyBypass(p, host, port); got != tc.direct {
			t.Errorf("%s: direct %v, want %v", tc.addr, got, tc.direct)
		}
	}
}

// An answer lost after Graph took the request (504, a dropped connection)
// is an unknown outcome; a refusal (429, 503), or a connection lost before
// the request was written whole, is not. FindSent then finds the message
// by its Message-ID, quotes and all, and only when sent since the time
// given.
func TestSendOutcomesAndFindSent(t *testing.T) {
	fake := startFake(t)
	fake.AddApp(tenant, client, secret, "Mail.Send", "Mail.ReadBasic.All")
	g := upstream.NewGraphClient(fake.GraphURL(), upstream.NewHTTPClient(fake.CertPool(), nil), tokenSource(fake, upstream.GraphScope))
	ctx := context.Background()
	id := "<o'brien+1@example.com>"
	msg := []byte("From: orders@example.com\r\nTo: a@example.org\r\nMessage-ID: " + id + "\r\n\r\nhello\r\n")
	send := func() error {
		_, err := g.SendMail(ctx, mailbox, bytes.NewReader(msg), int64(len(msg)))
		return err
	}
	for name, f := range map[string]m365fake.Fault{"429": m365fake.Throttled("1"), "503": m365fake.Unavailable()} {
		fake.FailGraph(1, f)
		if err := send(); err == nil || upstream.IsOutcomeUnknown(err) {
			t.Errorf("%s: %v, want a refusal with a known outcome", name, err)
		}
	}
	if _, found, err := g.FindSent(ctx, mailbox, id, time.Time{}); err != nil || found {
		t.Fatalf("before any send: found %v, %v", found, err)
	}
	before := time.Now().Add(-time.Second)
	for name, f := range map[string]m365fake.Fault{"504": m365fake.GatewayTimeoutAfterAccept(), "drop": m365fake.DropAfterAccept()} {
		fake.FailGraph(1, f)
		if err := send(); !upstream.IsOutcomeUnknown(err) {
			t.Errorf("%s after acceptance: %v, want an unknown outcome", name, err)
		}
	}
	if n := len(fake.Sent()); n != 2 {
		t.Fatalf("%d messages taken, want 2", n)
	}
	cp, found, err := g.FindSent(ctx, mailbox, id, before)
	if err != nil || !found || cp.ID == "" {
		t.Errorf("FindSent(%s) = %+v, %v, %v", id, cp, found, err)
	}
	if _, found, _ := g.FindSent(ctx, mailbox, id, time.Now().Add(time.Hour)); found {
		t.Error("a copy sent before the time given was found")
	}
	if _, found, _ := g.FindSent(ctx, mailbox, "<o'brien@example.com>", time.Time{}); found {
		t.Error("another Message-ID was found")
	}
	// Without a read permission, Graph says so.
	fake.AddApp(tenant, client, secret, "Mail.Send")
	g2 := upstream.NewGraphClient(fake.GraphURL(), upstream.NewHTTPClient(fake.CertPool(), nil), tokenSource(fake, upstream.GraphScope))
	var apiErr *upstream.APIError
	if _, _, err := g2.FindSent(ctx, mailbox, id, time.Time{}); !errors.As(err, &apiErr) || apiErr.Status != 403 || apiErr.Code != "ErrorAccessDenied" {
		t.Errorf("without a read role: %v, want 403 ErrorAccessDenied", err)
	}
}

// The fake Outlook IMAP service words its answers as Outlook does: the
// greeting, the capabilities before and after login, the login's OK
// without a CAPABILITY code, IDLE's continuation and LOGOUT's BYE.
func TestFakeOutlookIMAPBehavesAsOutlook(t *testing.T) {
	fake := startFake(t)
	fake.AddApp(tenant, client, secret, "Mail.Send", "IMAP.AccessAsApp")
	fake.GrantMailboxAccess(tenant, client, mailbox)
	token, err := tokenSource(fake, upstream.OutlookScope).Token(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c, err := tls.Dial("tcp", fake.IMAPAddr(), &tls.Config{RootCAs: fake.CertPool()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	r := bufio.NewReader(c)
	line := func() string {
		l, _ := r.ReadString('\n')
		return strings.TrimRight(l, "\r\n")
	}
	if l := line(); l != m365fake.IMAPGreeting() || !strings.HasPrefix(l, "* OK The Microsoft Exchange IMAP4 service is ready. [") {
		t.Errorf("greeting %q", l)
	}
	exchange := func(cmd string, want ...string) {
		t.Helper()
		io.WriteString(c, cmd+"\r\n")
		for _, w := range want {
			if l := line(); l != w {
				t.Errorf("%s: got %q, want %q", cmd, l, w)
			}
		}
	}
	exchange("C1 CAPABILITY", "* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS ID UNSELECT CHILDREN IDLE NAMESPACE LITERAL+", "C1 OK CAPABILITY completed.")
	blob := base64.StdEncoding.EncodeToString([]byte("user=" + mailbox + "\x01auth=Bearer " + token + "\x01\x01"))
	exchange("A1 AUTHENTICATE XOAUTH2 "+blob, "A1 OK AUTHENTICATE completed.")
	exchange("C2 CAPABILITY", "* CAPABILITY IMAP4 IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR UIDPLUS MOVE ID UNSELECT CLIENTACCESSRULES CLIENTNETWORKPRESENCELOCATION BACKENDAUTHENTICATE CHILDREN IDLE NAMESPACE LITERAL+", "C2 OK CAPABILITY completed.")
	exchange("S1 SELECT INBOX")
	for l := line(); !strings.HasPrefix(l, "S1 "); l = line() {
	}
	exchange("I1 IDLE", "+ IDLE accepted, awaiting DONE command.")
	exchange("DONE", "I1 OK IDLE completed.")
	exchange("L1 LOGOUT", "* BYE Microsoft Exchange Server IMAP4 server signing off.", "L1 OK LOGOUT completed.")
}
