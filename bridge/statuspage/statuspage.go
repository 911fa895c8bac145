// Package statuspage is the administrator's HTML page at / on the admin
// listener: accounts, the outbox and its failed messages, recent
// deliveries, and forms to retry or delete a message and to run the
// check. It is rendered on the server (html/template, no external assets,
// no script needed), behind HTTP Basic auth, with a CSRF token tied to a
// session cookie on every form.
//
// What it shows and does is handed to it as a Backend; it imports only
// bridge/admin (for the final message lines) and bridge/conntrack.
package statuspage

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"html/template"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"mailbridge/bridge/account"
	"mailbridge/bridge/admin"
	"mailbridge/bridge/conntrack"
)

// Status is what the page shows, as the bridge sees it now.
type Status struct {
	Version   string
	Started   time.Time
	Listeners []Listener
	Accounts  []AccountState
	// OutboxOn is false when outbox.enabled is false: there is no queue.
	OutboxOn    bool
	Queued      []Message // the oldest first, at most a few hundred
	QueuedTotal int
	OldestAge   time.Duration
	Failed      []Message
	FailedTotal int
	Recent      []admin.FinalMessage // newest first
}

// Listener is one open listener.
type Listener struct {
	Proto string // "smtp", "pop3", "imap", "admin"
	Addr  string
	TLS   string // such as "STARTTLS", "implicit TLS", "none"
}

// AccountState is one account: the state of each protocol it serves and,
// for SMTP, today's messages.
type AccountState struct {
	Account   string
	Protocols []ProtocolState
	// Day is today's messages; CountsMail is false for an account without
	// SMTP.
	Day        admin.AccountDay
	CountsMail bool
}

// ProtocolState is the token state of one account and protocol.
type ProtocolState struct {
	Proto string // "smtp", "pop3", "imap"
	// Mailbox is today's POP3 or IMAP use; nil for SMTP.
	Mailbox *admin.MailboxDay
	// State is "ok", "refused" (Microsoft refuses the sign-in: an
	// administrator must act), "retrying" (no answer, or Microsoft is
	// busy) or "unused" (no token asked for yet).
	State  string
	Detail string // the refusal, with its AADSTS code
	Hint   string // the fix
}

// State is the worst of the account's protocols' states: "refused",
// "retrying", "ok", or "unused" when none asked for a token yet.
func (a AccountState) State() string {
	rank := map[string]int{"unused": 0, "ok": 1, "retrying": 2, "refused": 3}
	worst := "unused"
	for _, p := range a.Protocols {
		if rank[p.State] > rank[worst] {
			worst = p.State
		}
	}
	return worst
}

// Message is a queued or failed message of the outbox.
type Message struct {
	ID          string
	State       string // "queued", "failed", "corrupt"
	Received    time.Time
	From        string
	Recipients  []string
	Subject     string
	MessageID   string // the client's, or the one the bridge added
	Size        int64
	Attempts    int
	NextAttempt time.Time
	InFlight    bool
	LastError   string
	LastReason  string // LastError's cause in a few words
	LastHint    string // its fix
	// For a failed message:
	FailedAt    time.Time
	Reason      string
	Hint        string
	GraphStatus int
	RequestID   string
	Report      string // what became of the non-delivery report
}

// CheckRow is one row of `mailbridge check`.
type CheckRow struct {
	Account, Check string
	Result         string // "ok", "warn", "fail"
	Detail, Hint   string
	Path           string
	Commands       []string // PowerShell that carries out the fix
}

// Backend is what the page reads and acts on.
type Backend interface {
	Status() Status
	// Retry makes a queued message due now, or puts a failed one back in
	// the queue; it returns what happened, in a sentence.
	Retry(id string) (string, error)
	// Delete removes a queued or failed message.
	Delete(id string) error
	// Check runs `mailbridge check`'s tests.
	Check(ctx context.Context) []CheckRow
}

// Login checks the page's user name and password from remoteIP; a failure
// has already waited for the throttle.
type Login func(ctx context.Context, remoteIP, username, password string) error

// Options configure the page.
type Options struct {
	// Login is nil when no password_hash is set: the page is off.
	Login   Login
	Backend Backend
	Log     zerolog.Logger
	// Refresh is how often the page reloads itself; zero means 10 s.
	Refresh time.Duration
}

// Page is the status page's handler.
type Page struct {
	opts Options
	key  [32]byte // for CSRF tokens, this process only

	mu        sync.Mutex
	flashes   map[string]flash // by session, shown once
	lastCheck *checkRun
}

type flash struct {
	Text string
	OK   bool
}

type checkRun struct {
	At   time.Time
	By   string
	Rows []CheckRow
}

//go:embed static
var static embed.FS

var page = template.Must(template.New("page.html").Funcs(template.FuncMap{
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "—"
		}
		return t.Local().Format("2006-01-02 15:04:05")
	},
	"age": func(d time.Duration) string {
		return roundAge(d)
	},
	"since": func(t time.Time) string {
		if t.IsZero() {
			return "—"
		}
		return roundAge(time.Since(t))
	},
	"size": func(n int64) string {
		switch {
		case n >= 1<<20:
			return fmt.Sprintf("%.1f MB", float64(n)/(1<<20))
		case n >= 1<<10:
			return fmt.Sprintf("%.1f KB", float64(n)/(1<<10))
		}
		return fmt.Sprintf("%d B", n)
	},
	"join": func(s []string) string { return strings.Join(s, ", ") },
}).ParseFS(static, "static/page.html"))

// roundAge writes d as an administrator reads it: 42s, 12m5s, 5h12m, 3d5h.
func roundAge(d time.Duration) string {
	d = d.Round(time.Second)
	switch {
	case d < time.Hour:
		return d.String()
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd%dh", int(d.Hours())/24, int(d.Hours())%24)
}

// New returns the page.
func New(opts Options) *Page {
	if opts.Refresh <= 0 {
		opts.Refresh = 10 * time.Second
	}
	p := &Page{opts: opts, flashes: map[string]flash{}}
	if _, err := rand.Read(p.key[:]); err != nil {
		panic(err)
	}
	return p
}

const sessionCookie = "mailbridge_session"

// ServeHTTP serves the page, its style sheet and script, and the actions.
func (p *Page) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", "default-src 'self'")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	if p.opts.Login == nil {
		h.Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusNotFound)
		fmt.Fprint(w, "The mailbridge status page is off.\n\n"+
			"To turn it on, run `mailbridge hash-password`, put its output into the [admin] table of the\n"+
			"configuration file, with a user name, and restart mailbridge:\n\n"+
			"  [admin]\n  listen = \"127.0.0.1:9925\"\n  username = \"admin\"\n  password_hash = \"$2a$10$...\"\n\n"+
			"/metrics and /healthz answer without a login.\n")
		return
	}
	switch r.URL.Path {
	case "/style.css", "/page.js":
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		http.ServeFileFS(w, r, static, "static"+r.URL.Path)
		return
	}
	user, ok := p.authenticate(w, r)
	if !ok {
		return
	}
	session := p.session(w, r)
	switch {
	case r.URL.Path == "/" && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		p.render(w, user, session)
	case r.Method == http.MethodPost && (r.URL.Path == "/retry" || r.URL.Path == "/delete" || r.URL.Path == "/check"):
		p.act(w, r, user, session)
	case r.URL.Path == "/" || r.URL.Path == "/retry" || r.URL.Path == "/delete" || r.URL.Path == "/check":
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	default:
		http.NotFound(w, r)
	}
}

func remoteIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// authenticate checks the request's Basic credentials, answering 401 if
// they are missing or wrong.
func (p *Page) authenticate(w http.ResponseWriter, r *http.Request) (string, bool) {
	user, password, has := r.BasicAuth()
	if has {
		err := p.opts.Login(r.Context(), remoteIP(r), user, password)
		if err == nil {
			return user, true
		}
		if errors.Is(err, account.ErrTooManyGuesses) {
			p.opts.Log.Warn().Str("proto", "admin").Str("remote", r.RemoteAddr).
				Str("hint", "someone is guessing the status page's password from many connections at once: keep [admin] listen on loopback").
				Msg("status page login not checked: too many logins waiting")
			http.Error(w, "too many logins waiting: try again later", http.StatusServiceUnavailable)
			return "", false
		}
		p.opts.Log.Warn().Str("proto", "admin").Str("remote", r.RemoteAddr).Str("username", conntrack.Clip(user)).Int64("delay_ms", account.RefusalDelay(err).Milliseconds()).
			Str("hint", "the status page's login is [admin] username and the password whose hash is [admin] password_hash; `mailbridge hash-password` makes a new hash").
			Msg("status page login refused: wrong user name or password")
	}
	w.Header().Set("WWW-Authenticate", `Basic realm="mailbridge", charset="UTF-8"`)
	http.Error(w, "log in with [admin] username and its password", http.StatusUnauthorized)
	return "", false
}

// session returns the request's session, starting one if it has none.
func (p *Page) session(w http.ResponseWriter, r *http.Request) string {
	if c, err := r.Cookie(sessionCookie); err == nil && validSession(c.Value) {
		return c.Value
	}
	var b [32]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	http.SetCookie(w, &http.Cookie{Name: sessionCookie, Value: id, Path: "/", HttpOnly: true, SameSite: http.SameSiteStrictMode})
	return id
}

func validSession(s string) bool {
	if len(s) != 64 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

// csrfToken is the token of the forms of user's session.
func (p *Page) csrfToken(user, session string) string {
	mac := hmac.New(sha256.New, p.key[:])
	fmt.Fprintf(mac, "csrf\x00%s\x00%s", strings.ToLower(user), session)
	return hex.EncodeToString(mac.Sum(nil))
}

type view struct {
	Status
	User      string
	CSRF      string
	Title     string
	Refresh   int
	Uptime    time.Duration
	Now       time.Time
	Flash     *flash
	LastCheck *checkRun
	// CountsSince says from when "today" is counted: midnight, or the
	// start if that was later (the counts are kept in memory).
	CountsSince string
}

func (p *Page) render(w http.ResponseWriter, user, session string) {
	st := p.opts.Backend.Status()
	v := view{Status: st, User: user, CSRF: p.csrfToken(user, session), Refresh: int(p.opts.Refresh / time.Second),
		Uptime: time.Since(st.Started).Round(time.Second), Now: time.Now(), CountsSince: "since 00:00"}
	if y, m, d := v.Now.Date(); st.Started.After(time.Date(y, m, d, 0, 0, 0, 0, v.Now.Location())) {
		v.CountsSince = "since the start at " + st.Started.Local().Format("15:04")
	}
	p.mu.Lock()
	if f, ok := p.flashes[session]; ok {
		v.Flash = &f
		delete(p.flashes, session)
	}
	v.LastCheck = p.lastCheck
	p.mu.Unlock()
	var parts []string
	if st.FailedTotal > 0 {
		parts = append(parts, fmt.Sprintf("%d failed", st.FailedTotal))
	}
	if st.QueuedTotal > 0 {
		parts = append(parts, fmt.Sprintf("%d queued", st.QueuedTotal))
	}
	refused := 0
	for _, a := range st.Accounts {
		if a.State() == "refused" {
			refused++
		}
	}
	if refused > 0 {
		parts = append(parts, fmt.Sprintf("%d sign-in refused", refused))
	}
	v.Title = "mailbridge: OK"
	if len(parts) > 0 {
		v.Title = "mailbridge: " + strings.Join(parts, ", ")
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	if err := page.Execute(w, v); err != nil {
		p.opts.Log.Error().Err(err).Str("proto", "admin").Msg("status page: cannot render")
	}
}

// act runs one POSTed action, after checking its CSRF token, and sends the
// browser back to the page, which shows the outcome.
func (p *Page) act(w http.ResponseWriter, r *http.Request, user, session string) {
	r.Body = http.MaxBytesReader(w, r.Body, 16<<10)
	action := strings.TrimPrefix(r.URL.Path, "/")
	log := p.opts.Log.With().Str("proto", "admin").Str("user", conntrack.Clip(user)).Str("remote", r.RemoteAddr).Str("action", action).Logger()
	token := r.PostFormValue("csrf")
	if origin := r.Header.Get("Origin"); origin != "" && origin != "null" && origin != "http://"+r.Host {
		log.Warn().Str("origin", conntrack.Clip(origin)).Msg("status page action refused: the form came from another site")
		http.Error(w, "this form came from another site: open the status page itself and try again", http.StatusForbidden)
		return
	}
	if token == "" || !hmac.Equal([]byte(token), []byte(p.csrfToken(user, session))) {
		log.Warn().Str("hint", "reload the status page and try again: its forms carry a token of the browser's session").
			Msg("status page action refused: no valid CSRF token")
		http.Error(w, "the form is stale or came from elsewhere: reload the status page and try again", http.StatusForbidden)
		return
	}
	var out flash
	id := r.PostFormValue("id")
	switch action {
	case "check":
		ctx, cancel := context.WithTimeout(r.Context(), 25*time.Second)
		rows := p.opts.Backend.Check(ctx)
		cancel()
		failed := 0
		for _, row := range rows {
			if row.Result == "fail" {
				failed++
			}
		}
		p.mu.Lock()
		p.lastCheck = &checkRun{At: time.Now(), By: user, Rows: rows}
		p.mu.Unlock()
		out = flash{Text: fmt.Sprintf("Check run: %d row(s), %d failed.", len(rows), failed), OK: failed == 0}
		log.Info().Int("rows", len(rows)).Int("failed", failed).Msg("status page: check run")
	case "retry":
		log = log.With().Str("queue_id", conntrack.Clip(id)).Logger()
		what, err := p.opts.Backend.Retry(id)
		if err != nil {
			out = flash{Text: "Retry " + id + ": " + err.Error()}
			log.Warn().Err(err).Msg("status page: retry refused")
		} else {
			out = flash{Text: what, OK: true}
			log.Info().Str("outcome", what).Msg("status page: retry")
		}
	case "delete":
		log = log.With().Str("queue_id", conntrack.Clip(id)).Logger()
		if err := p.opts.Backend.Delete(id); err != nil {
			out = flash{Text: "Delete " + id + ": " + err.Error()}
			log.Warn().Err(err).Msg("status page: delete refused")
		} else {
			out = flash{Text: "Message " + id + " deleted: it will not be sent.", OK: true}
			log.Info().Msg("status page: message deleted")
		}
	}
	p.mu.Lock()
	if len(p.flashes) >= 256 {
		clear(p.flashes)
	}
	p.flashes[session] = out
	p.mu.Unlock()
	anchor := "#outbox"
	if action == "check" {
		anchor = "#check"
	}
	http.Redirect(w, r, "/"+anchor, http.StatusSeeOther)
}

// ErrNoOutbox is the refusal of a queue action when the outbox is off.
var ErrNoOutbox = errors.New("the outbox is off (outbox.enabled = false)")
