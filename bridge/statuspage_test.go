package bridge_test

import (
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"mailbridge/bridge"
	"mailbridge/bridge/config"
	"mailbridge/bridge/deliver"
	"mailbridge/upstream/m365fake"
)

const (
	adminUser     = "admin"
	adminPassword = "status page password"
	// refusedDomain is a domain whose recipients the fake refuses with
	// 400 ErrorInvalidRecipients in these tests.
	refusedDomain = "refused.example"
)

// statusConfig is outboxConfig with the status page on, and account B
// (scanner) with a secret the fake refuses.
func statusConfig(t testing.TB, fake *m365fake.Server) *config.Config {
	t.Helper()
	cfg := outboxConfig(t, fake)
	hash, err := bcrypt.GenerateFromPassword([]byte(adminPassword), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Admin.Listen, cfg.Admin.Username, cfg.Admin.PasswordHash = "127.0.0.1:0", adminUser, string(hash)
	cfg.Accounts[1].ClientSecret = "a-secret-that-was-replaced"
	fake.RefuseRecipients(refusedDomain)
	return cfg
}

// pageClient is a browser-like HTTP client: Basic credentials on every
// request, a cookie jar, and redirects not followed, so that each step is
// seen.
type pageClient struct {
	t        testing.TB
	base     string
	user     string
	password string
	http     *http.Client
}

func newPageClient(t testing.TB, b *bridge.Bridge) *pageClient {
	jar, _ := cookiejar.New(nil)
	return &pageClient{t: t, base: "http://" + b.AdminAddr(), user: adminUser, password: adminPassword,
		http: &http.Client{Jar: jar, Timeout: 30 * time.Second,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}}
}

// do sends a request and returns the response with its body read.
func (c *pageClient) do(method, path string, form url.Values, header http.Header) (*http.Response, string) {
	c.t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req, err := http.NewRequest(method, c.base+path, body)
	if err != nil {
		c.t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if c.user != "" {
		req.SetBasicAuth(c.user, c.password)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	data, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		c.t.Fatal(err)
	}
	return resp, string(data)
}

// page fetches the status page and checks that it answered 200.
func (c *pageClient) page() string {
	c.t.Helper()
	resp, body := c.do("GET", "/", nil, nil)
	if resp.StatusCode != 200 {
		c.t.Fatalf("GET /: %s: %s", resp.Status, body)
	}
	return body
}

var csrfField = regexp.MustCompile(`name="csrf" value="([0-9a-f]+)"`)

// csrf returns the token in the page's forms.
func (c *pageClient) csrf() string {
	c.t.Helper()
	m := csrfField.FindStringSubmatch(c.page())
	if m == nil {
		c.t.Fatal("the page has no form with a CSRF token")
	}
	return m[1]
}

// action POSTs one of the page's forms and checks that it was taken (303
// back to the page); it returns the page, which shows the outcome.
func (c *pageClient) action(path, id string) string {
	c.t.Helper()
	resp, body := c.do("POST", path, url.Values{"csrf": {c.csrf()}, "id": {id}}, nil)
	if resp.StatusCode != http.StatusSeeOther {
		c.t.Fatalf("POST %s: %s: %s", path, resp.Status, body)
	}
	return c.page()
}

// sendVia sends one message through the bridge as account A.
func sendVia(t testing.TB, b *bridge.Bridge, to, msg string) string {
	t.Helper()
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	reply, err := send(c, mailboxA, []string{to}, crlf(msg))
	if err != nil {
		t.Fatal(err)
	}
	id, ok := strings.CutPrefix(reply, "2.0.0 OK: queued as ")
	if !ok {
		t.Fatalf("reply %q, want queued", reply)
	}
	return id
}

// sentTimes counts the messages the fake has with subject (the
// non-delivery reports it also has are not counted).
func sentTimes(fake *m365fake.Server, subject string) int {
	n := 0
	for _, m := range fake.Sent() {
		if m.Subject == subject {
			n++
		}
	}
	return n
}

func entryExists(b *bridge.Bridge, sub, id string) bool {
	_, err := os.Stat(filepath.Join(b.Outbox().Dir(), sub, id+".json"))
	return err == nil
}

func TestStatusPageOffWithoutPasswordHash(t *testing.T) {
	fake := startFake(t)
	cfg := testConfig(fake)
	cfg.Admin.Listen = "127.0.0.1:0"
	b, logs := startBridge(t, fake, cfg)
	c := newPageClient(t, b)
	resp, body := c.do("GET", "/", nil, nil)
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(body, "password_hash") || !strings.Contains(body, "mailbridge hash-password") {
		t.Errorf("GET / without a password_hash: %s %q", resp.Status, body)
	}
	if resp, _ := c.do("POST", "/retry", url.Values{"id": {"x"}}, nil); resp.StatusCode != http.StatusNotFound {
		t.Errorf("POST /retry with the page off: %s", resp.Status)
	}
	c.user = ""
	if resp, body := c.do("GET", "/metrics", nil, nil); resp.StatusCode != 200 || !strings.Contains(body, "go_goroutines") {
		t.Errorf("/metrics: %s", resp.Status)
	}
	if !strings.Contains(logs.String(), `"status page off"`) {
		t.Error("the start-up log does not say the status page is off, and how to turn it on")
	}
}

func TestStatusPageNeedsTheLogin(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridgeWith(t, fake, statusConfig(t, fake), func(o *bridge.Options) { o.AuthFailureDelay = 200 * time.Millisecond })
	c := newPageClient(t, b)
	c.user = ""
	resp, _ := c.do("GET", "/", nil, nil)
	if resp.StatusCode != http.StatusUnauthorized || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Basic ") {
		t.Errorf("GET / without credentials: %s, WWW-Authenticate %q", resp.Status, resp.Header.Get("WWW-Authenticate"))
	}
	for path, want := range map[string]int{"/metrics": 200, "/healthz": 503} { // account B's sign-in is refused
		if resp, _ := c.do("GET", path, nil, nil); resp.StatusCode != want {
			t.Errorf("GET %s without credentials: %s, want %d", path, resp.Status, want)
		}
	}
	// Wrong passwords are refused, each later than the one before (the
	// mail logins' throttle: at once, then after 200 ms, then 400 ms, as
	// the log lines say: the wait comes before the verdict).
	// The elapsed times are checked only for a lower bound, which a busy
	// machine cannot break: the pause is really waited.
	c.user, c.password = adminUser, "guess"
	var took []time.Duration
	for range 2 {
		start := time.Now()
		resp, body := c.do("GET", "/", nil, nil)
		took = append(took, time.Since(start))
		if resp.StatusCode != http.StatusUnauthorized || strings.Contains(body, "Outbox") {
			t.Fatalf("a wrong password: %s", resp.Status)
		}
	}
	if took[1] < 200*time.Millisecond {
		t.Errorf("wrong passwords answered after %v: not throttled as mail logins are", took)
	}
	c.user, c.password = "root", adminPassword
	if resp, _ := c.do("GET", "/", nil, nil); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("the right password with another user name: %s", resp.Status)
	}
	if n := strings.Count(logs.String(), "status page login refused"); n != 3 {
		t.Errorf("%d log lines for 3 refused logins", n)
	}
	for i, want := range []string{`"delay_ms":0,`, `"delay_ms":200,`, `"delay_ms":400,`} {
		if lines := linesWith(logs.String(), "status page login refused"); len(lines) <= i || !strings.Contains(lines[i], want) {
			t.Errorf("refusal %d is not logged with %s: %q", i+1, want, lines)
		}
	}
	c.user, c.password = adminUser, adminPassword
	if body := c.page(); !strings.Contains(body, "signed in as "+adminUser) {
		t.Error("the page does not say who is signed in")
	}
	if strings.Contains(logs.String(), adminPassword) {
		t.Error("the admin password is in the log")
	}
}

func TestStatusPageHeadersAndEscaping(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, statusConfig(t, fake))
	id := sendVia(t, b, "nobody@"+refusedDomain, "From: \"<script>alert('from')</script>\" <orders@example.com>\n"+
		"To: nobody@refused.example\nSubject: <script>alert('subject')</script> & <b>bold</b>\n\nthe body <script>alert('body')</script>\n")
	waitFor(t, "the refused message in failed/", func() bool { return entryExists(b, "failed", id) })
	c := newPageClient(t, b)
	body := c.page()
	if strings.Contains(body, "<script>alert") || strings.Contains(body, "<b>bold") {
		t.Error("a hostile Subject or From reached the page unescaped")
	}
	for _, want := range []string{
		"&lt;script&gt;alert(&#39;subject&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;",
		"&#34;&lt;script&gt;alert(&#39;from&#39;)&lt;/script&gt;&#34; &lt;orders@example.com&gt;",
		id, "ErrorInvalidRecipients", "<title>mailbridge: 1 failed, 1 sign-in refused</title>",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("the page lacks %q", want)
		}
	}
	if strings.Contains(body, "the body") || strings.Contains(body, secretA) {
		t.Error("the page shows a message body or a secret")
	}
	// The headers on every answer: the page, a refusal, a 404, a 403.
	answers := map[string]*http.Response{}
	answers["page"], _ = c.do("GET", "/", nil, nil)
	answers["404"], _ = c.do("GET", "/nothing-here", nil, nil)
	answers["403"], _ = c.do("POST", "/delete", url.Values{"id": {id}}, nil)
	c.password = "wrong"
	answers["401"], _ = c.do("GET", "/", nil, nil)
	for name, resp := range answers {
		for h, want := range map[string]string{"Content-Security-Policy": "default-src 'self'", "X-Frame-Options": "DENY", "Cache-Control": "no-store"} {
			if got := resp.Header.Get(h); got != want {
				t.Errorf("%s answer (%s): %s is %q, want %q", name, resp.Status, h, got, want)
			}
		}
	}
	if answers["404"].StatusCode != 404 || answers["403"].StatusCode != 403 || answers["401"].StatusCode != 401 {
		t.Errorf("statuses %s, %s, %s", answers["404"].Status, answers["403"].Status, answers["401"].Status)
	}
	if !entryExists(b, "failed", id) {
		t.Error("a POST without a CSRF token deleted the message")
	}
}

func TestStatusPageRefusesPostsWithoutTheSessionsToken(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, statusConfig(t, fake))
	id := sendVia(t, b, "nobody@"+refusedDomain, "From: orders@example.com\nTo: nobody@refused.example\nSubject: keep me\n\nx\n")
	waitFor(t, "the refused message in failed/", func() bool { return entryExists(b, "failed", id) })
	c := newPageClient(t, b)
	token := c.csrf()
	other := newPageClient(t, b) // another browser: another session
	otherToken := other.csrf()
	if token == otherToken {
		t.Fatal("two sessions have the same CSRF token")
	}
	for name, tc := range map[string]struct {
		client *pageClient
		form   url.Values
		header http.Header
	}{
		"no token":              {c, url.Values{"id": {id}}, nil},
		"a wrong token":         {c, url.Values{"id": {id}, "csrf": {strings.Repeat("0", 64)}}, nil},
		"another session's":     {c, url.Values{"id": {id}, "csrf": {otherToken}}, nil},
		"another site's origin": {c, url.Values{"id": {id}, "csrf": {token}}, http.Header{"Origin": {"http://evil.example"}}},
	} {
		for _, path := range []string{"/delete", "/retry", "/check"} {
			resp, _ := tc.client.do("POST", path, tc.form, tc.header)
			if resp.StatusCode != http.StatusForbidden {
				t.Errorf("POST %s with %s: %s, want 403", path, name, resp.Status)
			}
		}
	}
	// Without a session cookie at all: the token of an old one is worth nothing.
	bare := newPageClient(t, b)
	if resp, _ := bare.do("POST", "/delete", url.Values{"id": {id}, "csrf": {token}}, nil); resp.StatusCode != http.StatusForbidden {
		t.Errorf("POST without the session cookie: %s", resp.Status)
	}
	// Without Basic credentials, even with the right token: 401.
	c.user = ""
	if resp, _ := c.do("POST", "/delete", url.Values{"id": {id}, "csrf": {token}}, nil); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("POST without credentials: %s", resp.Status)
	}
	if !entryExists(b, "failed", id) || sentTimes(fake, "keep me") != 0 {
		t.Fatal("a refused POST changed the outbox")
	}
	if n := strings.Count(logs.String(), "status page action refused"); n != 13 {
		t.Errorf("%d log lines for 13 refused POSTs", n)
	}
	// GET on an action is not an action.
	c.user = adminUser
	if resp, _ := c.do("GET", "/delete?id="+id+"&csrf="+token, nil, nil); resp.StatusCode != http.StatusMethodNotAllowed || !entryExists(b, "failed", id) {
		t.Errorf("GET /delete: %s", resp.Status)
	}
}

func TestStatusPageActionsOnTheOutbox(t *testing.T) {
	fake := startFake(t)
	// A failed attempt waits an hour: "Retry now" is what sends it sooner.
	b, logs := startBridgeWith(t, fake, statusConfig(t, fake), func(o *bridge.Options) {
		o.OutboxRetry = deliver.RetryPolicy{Base: time.Hour, Max: time.Hour}
	})
	c := newPageClient(t, b)

	// failed → Retry, after the fault is cleared: delivered once.
	retried := sendVia(t, b, "nobody@"+refusedDomain, "From: orders@example.com\nTo: nobody@refused.example\nMessage-ID: <retry@test>\nSubject: retry me\n\nx\n")
	// failed → Delete: gone, never sent.
	deleted := sendVia(t, b, "other@"+refusedDomain, "From: orders@example.com\nTo: other@refused.example\nMessage-ID: <delete@test>\nSubject: delete me\n\nx\n")
	// In failed/, and let go by the worker (which moves the files before
	// it drops the message from its index: until then Retry answers that
	// the message is being sent).
	waitFor(t, "two messages in failed/", func() bool {
		n, _ := b.QueueDepth()
		return entryExists(b, "failed", retried) && entryExists(b, "failed", deleted) && n == 0
	})
	body := c.page()
	if !strings.Contains(body, "retry me") || !strings.Contains(body, "delete me") || !strings.Contains(body, "Failed (2)") {
		t.Fatal("the failed messages are not on the page")
	}
	fake.AcceptRecipients(refusedDomain)
	body = c.action("/retry", retried)
	if !strings.Contains(body, "Message "+retried+" is back in the queue") {
		t.Error("the page does not show the retry's outcome")
	}
	waitFor(t, "the retried message delivered", func() bool { return sentTimes(fake, "retry me") == 1 && !entryExists(b, "queue", retried) })
	if entryExists(b, "failed", retried) {
		t.Error("the retried message is still in failed/")
	}
	body = c.action("/delete", deleted)
	if !strings.Contains(body, "Message "+deleted+" deleted") || entryExists(b, "failed", deleted) || entryExists(b, "queue", deleted) {
		t.Error("Delete did not remove the failed message, or the page does not say so")
	}
	if body := c.page(); !strings.Contains(body, "No failed messages") || strings.Contains(section(body, "outbox"), "delete me") {
		t.Error("the page still lists a failed message")
	}
	// The recent messages carry their Subject.
	if recent := section(c.page(), "recent"); !strings.Contains(recent, `<td data-label="Subject">delete me</td>`) || !strings.Contains(recent, `<td data-label="Subject">retry me</td>`) {
		t.Errorf("the recent messages lack their Subject:\n%s", recent)
	}

	// queued → Retry now: a message waiting an hour after a 503 goes at once.
	fake.FailGraph(1, m365fake.Unavailable())
	waiting := sendVia(t, b, "x@example.org", "From: orders@example.com\nTo: x@example.org\nMessage-ID: <waiting@test>\nSubject: waiting\n\nx\n")
	waitFor(t, "the first attempt to fail", func() bool {
		env, err := readEnvelope(b.Outbox().Dir(), "queue", waiting)
		return err == nil && env.Attempts == 1 && !env.InFlight
	})
	if body := c.page(); !strings.Contains(body, "1 queued") || !strings.Contains(body, "waiting") || !strings.Contains(body, "<title>mailbridge: 1 queued, 1 sign-in refused</title>") {
		t.Error("the page does not list the queued message")
	}
	// Why it waits, in a few words, and the fix, as for an account.
	if body := c.page(); !strings.Contains(body, "Graph answered HTTP 503 ServiceUnavailable<br><span class=\"hint\"><b>Fix:</b> Microsoft Graph is failing: nothing to do, it is tried again</span>") ||
		!strings.Contains(body, "<small class=\"msgid\">&lt;waiting@test&gt;</small>") {
		t.Error("the queued message's row lacks its cause and fix, or its Message-ID")
	}
	// The worker marks an attempt over in the envelope before it lets the
	// message go in memory; until then Retry answers that it is being sent.
	waitFor(t, "Retry now accepted", func() bool { return strings.Contains(c.action("/retry", waiting), "Message "+waiting+" is due now.") })
	waitFor(t, "the queued message delivered", func() bool { return sentTimes(fake, "waiting") == 1 && !entryExists(b, "queue", waiting) })

	// queued → Delete: it never goes.
	fake.FailGraph(1, m365fake.Unavailable())
	dropped := sendVia(t, b, "x@example.org", "From: orders@example.com\nTo: x@example.org\nMessage-ID: <dropped@test>\nSubject: dropped\n\nx\n")
	waitFor(t, "the first attempt to fail", func() bool {
		env, err := readEnvelope(b.Outbox().Dir(), "queue", dropped)
		return err == nil && env.Attempts == 1 && !env.InFlight
	})
	waitFor(t, "Delete accepted", func() bool { return strings.Contains(c.action("/delete", dropped), "Message "+dropped+" deleted") })
	if entryExists(b, "queue", dropped) {
		t.Error("Delete left the queued message")
	}
	if n, _ := b.QueueDepth(); n != 0 {
		t.Errorf("the worker still holds %d message(s)", n)
	}
	// Gone: Retry is refused, and the page says why and lists it nowhere.
	body = c.action("/retry", dropped)
	if !strings.Contains(body, "Retry "+dropped+": no message "+dropped+" in the outbox") || strings.Contains(body, `data-id="`+dropped+`"`) {
		t.Error("Retry of a deleted message: the page does not say it is gone, or still lists it")
	}
	time.Sleep(300 * time.Millisecond)
	for subject, want := range map[string]int{"retry me": 1, "delete me": 0, "waiting": 1, "dropped": 0} {
		if n := sentTimes(fake, subject); n != want {
			t.Errorf("the fake has %q %d times, want %d", subject, n, want)
		}
	}

	// Each action is logged with the admin user and the remote address.
	for _, want := range []string{"status page: retry", "status page: message deleted", "status page: retry refused"} {
		found := false
		for _, line := range strings.Split(logs.String(), "\n") {
			if strings.Contains(line, want) && strings.Contains(line, `"user":"`+adminUser+`"`) && strings.Contains(line, `"remote":"127.0.0.1:`) {
				found = true
			}
		}
		if !found {
			t.Errorf("no log line %q with the user and the remote address", want)
		}
	}
	// The recent lines: two sent and two failed, newest first.
	body = c.page()
	recent := body[strings.Index(body, `id="recent-rows"`):]
	newer, older := strings.Index(recent, waiting), strings.Index(recent, retried)
	if strings.Count(recent, `<td class="result" data-label="Result">sent</td>`) != 2 || strings.Count(recent, `<td class="result" data-label="Result">failed</td>`) != 2 ||
		newer < 0 || older < 0 || newer > older {
		t.Error("the recent lines are not the two sent and the two failed, newest first")
	}
	if !strings.Contains(body, "<b>2</b> sent, <b>2</b> failed") {
		t.Error("account A's counts for today are not 2 sent, 2 failed")
	}
	if !strings.Contains(body, "Today (since the start at ") && !strings.Contains(body, "Today (since 00:00)") {
		t.Error("the page does not say from when today's counts run")
	}
}

func TestStatusPageRunsTheCheck(t *testing.T) {
	fake := startFake(t)
	b, _ := startBridge(t, fake, statusConfig(t, fake))
	c := newPageClient(t, b)
	body := c.page()
	// The account whose secret is refused is red, with the fix.
	scanner := regexp.MustCompile(`(?s)<article class="card refused" data-account="scanner" data-state="refused">.*?<li class="refused" data-proto="smtp".*?</article>`).FindString(body)
	if !strings.Contains(scanner, "AADSTS7000215") || !strings.Contains(scanner, "copy the secret&#39;s Value") {
		t.Errorf("account B is not shown refused with its AADSTS code and fix: %q", scanner)
	}
	if !strings.Contains(body, `<article class="card ok" data-account="tm-master"`) {
		t.Error("account A is not shown OK")
	}
	resp, _ := c.do("POST", "/check", url.Values{"csrf": {c.csrf()}}, nil)
	if resp.StatusCode != http.StatusSeeOther || !strings.HasSuffix(resp.Header.Get("Location"), "#check") {
		t.Fatalf("POST /check: %s", resp.Status)
	}
	body = c.page()
	rows := body[strings.Index(body, `id="check-rows"`):]
	for _, want := range []string{
		`<td data-label="Account">tm-master</td><td data-label="Check">smtp-token</td><td class="result" data-label="Result">OK</td>`,
		`<td data-label="Account">scanner</td><td data-label="Check">smtp-token</td><td class="result" data-label="Result">FAIL</td>`,
		"copy the secret&#39;s Value",
		"Check run: ",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("the check's rows lack %q", want)
		}
	}
	if n := strings.Count(rows, "<tr class="); n < 3 {
		t.Errorf("%d check rows", n)
	}
}

// section returns the part of a status page in its <section id=id>.
func section(body, id string) string {
	start := strings.Index(body, `<section id="`+id+`">`)
	if start < 0 {
		return ""
	}
	end := strings.Index(body[start:], "</section>")
	return body[start : start+end]
}

// Each account's POP3 use is on its card, as TM Exchange's replication
// lives on it: logins and downloads today, the last of each; the final
// log line of a message carries its Subject, clipped to one line.
func TestStatusPageShowsMailboxUseAndSubjects(t *testing.T) {
	fake := startFake(t)
	b, logs := startBridge(t, fake, statusConfig(t, fake))
	c := newPageClient(t, b)
	if card := section(c.page(), "accounts"); !strings.Contains(card, "Today: <b>0</b> logins, <b>0</b> messages downloaded.") {
		t.Errorf("the POP3 use before any login:\n%s", card)
	}
	fake.AddMessage(mailboxA, crlf("Subject: from shore\n\nx\n"))
	fake.AddMessage(mailboxA, crlf("Subject: from shore 2\n\ny\n"))
	p := dialPOP3(t, b.POP3Addr())
	p.login(userA, passwordA)
	p.retr(1)
	p.retr(2)
	p.cmd("QUIT")
	card := protoState(c.page(), "tm-master", "pop3")
	if !strings.Contains(card, "Today: <b>1</b> logins, <b>2</b> messages downloaded.") || strings.Contains(card, "last download: none") {
		t.Errorf("the POP3 use after a login and two downloads:\n%s", card)
	}
	// IMAP: a whole-message FETCH is a download; LOGOUT ends the session
	// as the client asked, not as "upstream closed".
	ic := dialIMAP(t, b.IMAPAddr())
	ic.login(userA, passwordA)
	ic.cmd("SELECT INBOX")
	ic.fetchRaw(1)
	ic.cmd("FETCH 2 (FLAGS)")
	ic.cmd("LOGOUT")
	waitFor(t, "the IMAP session's last line", func() bool {
		for _, l := range linesWith(logs.String(), "session ended") {
			if strings.Contains(l, `"proto":"imap"`) {
				return true
			}
		}
		return false
	})
	for _, l := range linesWith(logs.String(), "session ended") {
		if strings.Contains(l, `"proto":"imap"`) && !strings.Contains(l, `"ended":"logout"`) {
			t.Errorf("an IMAP LOGOUT ended otherwise: %s", l)
		}
	}
	if imapCard := protoState(c.page(), "tm-master", "imap"); !strings.Contains(imapCard, "Today: <b>1</b> logins, <b>1</b> messages downloaded.") {
		t.Errorf("the IMAP use after a login and one download:\n%s", imapCard)
	}
	sendVia(t, b, "x@example.org", "From: orders@example.com\nTo: x@example.org\nSubject: =?utf-8?q?Bestellung_Gr=C3=BC=C3=9Fe?=\x1b[2J\nMessage-ID: <subj@test>\n\nx\n")
	waitFor(t, "the message sent", func() bool { return len(linesWith(logs.String(), "message sent")) == 1 })
	if l := linesWith(logs.String(), "message sent")[0]; !strings.Contains(l, `"subject":"Bestellung Grüße [2J"`) {
		t.Errorf("the final line's subject: %s", l)
	}
}

// protoState returns the part of a status page's account card about one
// protocol.
func protoState(body, account, proto string) string {
	card := section(body, "accounts")
	card = card[strings.Index(card, `data-account="`+account+`"`):]
	card = card[strings.Index(card, `data-proto="`+proto+`"`):]
	return card[:strings.Index(card, "</li>")]
}
