// Package m365fake is a fake Microsoft 365 for tests and the demo, in the
// spirit of net/http/httptest: a real HTTPS server on loopback with the
// identity platform's token endpoint and Graph's sendMail, answering with
// Microsoft's status codes, error codes and texts, with fault injection and
// a record of everything it accepted.
package m365fake

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"mailbridge/upstream/m365fake/outlookimap"
	"mailbridge/upstream/m365fake/outlookpop"
)

// Audiences of the tokens the fake issues, by the resource of the scope.
const (
	GraphAudience   = "https://graph.microsoft.com"
	OutlookAudience = "https://outlook.office365.com"
)

// Server is a running fake Microsoft 365.
type Server struct {
	// URL is the base of the HTTPS endpoints, such as https://127.0.0.1:41234.
	URL string

	pki     *testPKI
	httpSrv *http.Server
	ln      net.Listener
	signKey []byte

	mu            sync.Mutex
	tenants       map[string]*tenant
	sent          []SentMessage
	onSend        func(SentMessage)
	refused       []string // recipient domains sendMail refuses
	imap          *outlookimap.Service
	tokenFaults   []Fault
	graphFaults   map[string][]Fault // by endpoint
	tokenRequests map[string]int     // by scope
	inflight      map[string]int     // Graph requests in flight, by user
	maxInflight   map[string]int
	tokenLifetime time.Duration

	pop    *outlookpop.Service
	access map[string]bool // tenant/client/mailbox granted FullAccess
	added  []addedMessage  // every message put into a mailbox
	// disabled: mailbox/proto turned off (Set-CASMailbox).
	disabled map[string]bool

	sentItems map[string][]sentItem // by primary address
	sentLag   time.Duration
	lookups   map[string]int // look-ups in Sent Items, by Message-ID

	drafts    map[string]*draft         // by id
	uploads   map[string]*uploadSession // by the secret in the upload URL
	uploadDir string
}

type tenant struct {
	id        string
	apps      map[string]*app
	mailboxes map[string]*mailbox // by every address, lower case
}

type app struct {
	clientID      string
	secret        string
	cert          *x509.Certificate
	secretExpired bool
	roles         []string
	// rbac is what RBAC for Applications grants the app in Exchange: by
	// role ("Mail.Send", "Mail.ReadWrite", ...), the mailboxes (primary
	// addresses) of its management scope. Such grants never show in the
	// token's roles.
	rbac map[string][]string
}

type mailbox struct {
	primary string
	aliases []string
}

// Fault is an injected failure: an answer Microsoft gives when it is
// throttling, failing or slow.
type Fault struct {
	Status     int           // the HTTP status to answer; 0 answers normally after Delay
	Code       string        // Graph error code or OAuth2 error
	Message    string        // error message
	RetryAfter string        // Retry-After header, if any
	Delay      time.Duration // wait before answering
	Drop       bool          // close the connection without an answer
	// AfterAccept applies the fault after Graph took the message
	// (sendMail and a draft's send): the answer is lost, not the message.
	AfterAccept bool
}

// Throttled is Graph's 429 answer with the given Retry-After.
func Throttled(retryAfter string) Fault {
	return Fault{Status: http.StatusTooManyRequests, Code: "TooManyRequests", Message: "Please retry again later.", RetryAfter: retryAfter}
}

// Unavailable is Graph's 503 answer.
func Unavailable() Fault {
	return Fault{Status: http.StatusServiceUnavailable, Code: "ServiceUnavailable", Message: "Service Unavailable"}
}

// Start starts a fake on a free port of 127.0.0.1 with no tenants. Close
// stops it.
func Start() (*Server, error) {
	pki, err := newTestPKI()
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("fake microsoft 365: %w", err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	s := &Server{
		URL:           "https://" + ln.Addr().String(),
		pki:           pki,
		ln:            ln,
		signKey:       key,
		tenants:       make(map[string]*tenant),
		tokenRequests: make(map[string]int),
		graphFaults:   make(map[string][]Fault),
		drafts:        make(map[string]*draft),
		uploads:       make(map[string]*uploadSession),
		inflight:      make(map[string]int),
		maxInflight:   make(map[string]int),
		tokenLifetime: 3599 * time.Second,
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /{tenant}/oauth2/v2.0/token", s.serveToken)
	mux.HandleFunc("POST /v1.0/users/{user}/sendMail", s.graph(EndpointSendMail, "Mail.Send", s.serveSendMail))
	mux.HandleFunc("POST /v1.0/users/{user}/messages", s.graph(EndpointCreateDraft, "Mail.ReadWrite", s.serveCreateDraft))
	mux.HandleFunc("POST /v1.0/users/{user}/messages/{id}/attachments", s.graph(EndpointAddAttachment, "Mail.ReadWrite", s.serveAddAttachment))
	mux.HandleFunc("POST /v1.0/users/{user}/messages/{id}/attachments/createUploadSession", s.graph(EndpointCreateUploadSession, "Mail.ReadWrite", s.serveCreateUploadSession))
	mux.HandleFunc("POST /v1.0/users/{user}/messages/{id}/send", s.graph(EndpointSendDraft, "Mail.Send", s.serveSendDraft))
	mux.HandleFunc("DELETE /v1.0/users/{user}/messages/{id}", s.graph(EndpointDelete, "Mail.ReadWrite", s.serveDeleteDraft))
	mux.HandleFunc("GET /v1.0/users/{user}/mailFolders/{folder}/messages", s.graph(EndpointListMessages, "", s.serveListMessages))
	mux.HandleFunc("PUT /upload/{session}", s.serveUpload)
	mux.HandleFunc("DELETE /upload/{session}", s.serveCancelUpload)
	s.httpSrv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{pki.server}, MinVersion: tls.VersionTLS12},
		// HTTP/1.1 only, so that Drop can hijack the connection.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ErrorLog:     log.New(io.Discard, "", 0), // clients that hang up mid-handshake are not news
	}
	go s.httpSrv.ServeTLS(ln, "", "")
	return s, nil
}

// Close stops the fake and closes its connections.
func (s *Server) Close() error {
	s.closePOP3()
	s.closeIMAP()
	s.removeUploads()
	err := s.httpSrv.Close()
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

// CertPool returns a pool holding the fake's CA, to trust its TLS servers.
func (s *Server) CertPool() *x509.CertPool { return s.pki.pool }

// CACertPEM returns the fake's CA certificate in PEM, for SSL_CERT_FILE.
func (s *Server) CACertPEM() []byte { return s.pki.caPEM }

// TokenURL is the token endpoint, with "{tenant}" for the tenant ID.
func (s *Server) TokenURL() string { return s.URL + "/{tenant}/oauth2/v2.0/token" }

// GraphURL is the base URL of the fake Graph API (its "v1.0").
func (s *Server) GraphURL() string { return s.URL + "/v1.0" }

// AddTenant creates a tenant (a directory) with the given ID.
func (s *Server) AddTenant(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tenants[id] == nil {
		s.tenants[id] = &tenant{id: id, apps: map[string]*app{}, mailboxes: map[string]*mailbox{}}
	}
}

// AddApp registers an application with a client secret and its granted
// (admin-consented) application permissions, such as "Mail.Send" or
// "POP.AccessAsApp", in tenant.
func (s *Server) AddApp(tenantID, clientID, secret string, roles ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mustTenant(tenantID).apps[clientID] = &app{clientID: clientID, secret: secret, roles: roles}
}

// ScopeApp grants the app role (such as "Mail.Send", "Mail.ReadBasic",
// "Mail.ReadWrite") on the given mailboxes only, as New-ManagementScope
// and New-ManagementRoleAssignment -Role "Application Mail.Send" do in
// Exchange Online: the app's tokens do not list the role, and Graph lets
// it act on those mailboxes and refuses the others with
// ErrorAccessDenied.
func (s *Server) ScopeApp(tenantID, clientID, role string, mailboxes ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.mustTenant(tenantID).apps[clientID]
	if a.rbac == nil {
		a.rbac = map[string][]string{}
	}
	for _, m := range mailboxes {
		a.rbac[role] = append(a.rbac[role], strings.ToLower(m))
	}
}

// AddAppCertificate registers an application whose credential is a
// certificate (its public key checks the client assertions).
func (s *Server) AddAppCertificate(tenantID, clientID string, cert *x509.Certificate, roles ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mustTenant(tenantID).apps[clientID] = &app{clientID: clientID, cert: cert, roles: roles}
}

// ExpireSecret makes the app's client secret expired.
func (s *Server) ExpireSecret(tenantID, clientID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mustTenant(tenantID).apps[clientID].secretExpired = true
}

// AddMailbox creates a licensed mailbox in tenant with a primary address and
// optional aliases (proxy addresses it may also send as).
func (s *Server) AddMailbox(tenantID, address string, aliases ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.mustTenant(tenantID)
	mb := &mailbox{primary: strings.ToLower(address)}
	for _, a := range aliases {
		mb.aliases = append(mb.aliases, strings.ToLower(a))
		t.mailboxes[strings.ToLower(a)] = mb
	}
	t.mailboxes[mb.primary] = mb
}

func (s *Server) mustTenant(id string) *tenant {
	t := s.tenants[id]
	if t == nil {
		panic("m365fake: unknown tenant " + id)
	}
	return t
}

// FailToken makes the next n token requests answer with f.
func (s *Server) FailToken(n int, f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for range n {
		s.tokenFaults = append(s.tokenFaults, f)
	}
}

// Graph endpoints, for FailEndpoint.
const (
	EndpointSendMail            = "sendMail"
	EndpointCreateDraft         = "createDraft"
	EndpointAddAttachment       = "addAttachment"
	EndpointCreateUploadSession = "createUploadSession"
	EndpointUpload              = "upload"
	EndpointSendDraft           = "send"
	EndpointDelete              = "delete"
	EndpointListMessages        = "listMessages"
)

// FailGraph makes the next n sendMail requests answer with f.
func (s *Server) FailGraph(n int, f Fault) { s.FailEndpoint(EndpointSendMail, n, f) }

// FailEndpoint makes the next n requests to a Graph endpoint answer with f.
func (s *Server) FailEndpoint(endpoint string, n int, f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for range n {
		s.graphFaults[endpoint] = append(s.graphFaults[endpoint], f)
	}
}

// ClearFaults drops every injected fault not yet used.
func (s *Server) ClearFaults() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenFaults = nil
	clear(s.graphFaults)
}

func (s *Server) takeEndpointFault(endpoint string) (Fault, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	q := s.graphFaults[endpoint]
	if len(q) == 0 {
		return Fault{}, false
	}
	s.graphFaults[endpoint] = q[1:]
	return q[0], true
}

// OnSend calls fn (on the request's goroutine) for every message Graph
// accepts.
func (s *Server) OnSend(fn func(SentMessage)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onSend = fn
}

// Sent returns the messages Graph accepted, oldest first.
func (s *Server) Sent() []SentMessage {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]SentMessage(nil), s.sent...)
}

// TokenRequests counts the token requests for scope that reached the
// endpoint, successful or not.
func (s *Server) TokenRequests(scope string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tokenRequests[scope]
}

// MaxConcurrent is the largest number of Graph requests for user that were
// in flight at once.
func (s *Server) MaxConcurrent(user string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxInflight[strings.ToLower(user)]
}

func (s *Server) takeFault(q *[]Fault) (Fault, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(*q) == 0 {
		return Fault{}, false
	}
	f := (*q)[0]
	*q = (*q)[1:]
	return f, true
}

// applyFault carries out f. It reports whether the request was answered
// (or dropped) and must not be served further.
func applyFault(w http.ResponseWriter, r *http.Request, f Fault, writeErr func(Fault)) bool {
	if f.Delay > 0 {
		select {
		case <-time.After(f.Delay):
		case <-r.Context().Done():
			return true
		}
	}
	if f.Drop {
		if hj, ok := w.(http.Hijacker); ok {
			if conn, _, err := hj.Hijack(); err == nil {
				conn.Close()
				return true
			}
		}
		panic(http.ErrAbortHandler)
	}
	if f.Status == 0 {
		return false
	}
	if f.RetryAfter != "" {
		w.Header().Set("Retry-After", f.RetryAfter)
	}
	writeErr(f)
	return true
}

func newGUID() string {
	b := make([]byte, 16)
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// SetTokenLifetime sets the lifetime of the tokens issued from now on
// (3599 seconds by default, as Microsoft's).
func (s *Server) SetTokenLifetime(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenLifetime = d
}

// RefuseRecipients makes sendMail and draft sending refuse any message
// with a recipient in domain, with 400 ErrorInvalidRecipients: a fault for
// tests and for the demo's non-delivery report. (Exchange itself takes
// such a message with 202 and reports later.)
func (s *Server) RefuseRecipients(domain string) {
	s.mu.Lock()
	s.refused = append(s.refused, strings.ToLower(domain))
	s.mu.Unlock()
}

// AcceptRecipients undoes RefuseRecipients for domain.
func (s *Server) AcceptRecipients(domain string) {
	s.mu.Lock()
	s.refused = slices.DeleteFunc(s.refused, func(d string) bool { return d == strings.ToLower(domain) })
	s.mu.Unlock()
}

func (s *Server) refusesRecipient(addr string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, d := range s.refused {
		if strings.HasSuffix(addr, "@"+d) {
			return true
		}
	}
	return false
}
