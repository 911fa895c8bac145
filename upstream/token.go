// Package upstream talks to Microsoft 365: the identity platform's token
// endpoint (OAuth2 client credentials), Microsoft Graph and Outlook's POP3
// service. It exports concrete clients; the bridge package declares the
// interfaces it needs from them.
package upstream

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

// Default endpoints and scopes of Microsoft's global cloud.
const (
	DefaultTokenURL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
	DefaultGraphURL = "https://graph.microsoft.com/v1.0"
	GraphScope      = "https://graph.microsoft.com/.default"
	OutlookScope    = "https://outlook.office365.com/.default"
)

// renewBefore is how long before its expiry a cached token is replaced, so
// that a token never expires between being handed out and being used.
const renewBefore = 5 * time.Minute

// Credentials identify an Azure app registration: what the old clients'
// OAuth2 tab calls Token URL, Client ID and Client Secret.
type Credentials struct {
	// TokenURL may contain "{tenant}", replaced by TenantID.
	TokenURL     string
	TenantID     string
	ClientID     string
	ClientSecret string
	// Certificate, if set, replaces the secret: each token request carries
	// a freshly signed client assertion.
	Certificate *ClientCertificate
}

func (c Credentials) tokenURL() string {
	u := c.TokenURL
	if u == "" {
		u = DefaultTokenURL
	}
	return strings.ReplaceAll(u, "{tenant}", c.TenantID)
}

// TokenSources hands out one shared TokenSource per (token URL, client,
// secret, scope), so that every session and account using the same app
// registration shares one cached token.
type TokenSources struct {
	httpClient *http.Client

	mu      sync.Mutex
	sources map[[32]byte]*TokenSource
}

// NewTokenSources returns an empty registry whose token requests use
// httpClient, which must have a timeout.
func NewTokenSources(httpClient *http.Client) *TokenSources {
	return &TokenSources{httpClient: httpClient, sources: make(map[[32]byte]*TokenSource)}
}

// Get returns the token source for cred and scope, creating it on first use.
func (t *TokenSources) Get(cred Credentials, scope string) *TokenSource {
	secret := cred.ClientSecret
	if cred.Certificate != nil {
		secret = "certificate:" + cred.Certificate.Thumbprint()
	}
	key := sha256.Sum256([]byte(cred.tokenURL() + "\x00" + cred.ClientID + "\x00" + secret + "\x00" + scope))
	t.mu.Lock()
	defer t.mu.Unlock()
	if s, ok := t.sources[key]; ok {
		return s
	}
	s := &TokenSource{
		conf: clientcredentials.Config{
			ClientID:     cred.ClientID,
			ClientSecret: cred.ClientSecret,
			TokenURL:     cred.tokenURL(),
			Scopes:       []string{scope},
			AuthStyle:    oauth2.AuthStyleInParams,
		},
		httpClient: t.httpClient,
		cert:       cred.Certificate,
		lock:       make(chan struct{}, 1),
	}
	t.sources[key] = s
	return s
}

// TokenSource caches one access token and renews it shortly before it
// expires. Concurrent callers wait for a single token request.
type TokenSource struct {
	conf       clientcredentials.Config
	httpClient *http.Client
	cert       *ClientCertificate
	lock       chan struct{} // a mutex that can be abandoned when ctx ends

	token    *oauth2.Token // guarded by lock
	requests atomic.Int64
	lastErr  atomic.Pointer[error]
}

// Token returns a valid access token, fetching one only when the cached one
// is missing, invalidated or about to expire. Errors from the token endpoint
// are *TokenError.
func (s *TokenSource) Token(ctx context.Context) (string, error) {
	select {
	case s.lock <- struct{}{}:
	case <-ctx.Done():
		return "", fmt.Errorf("waiting for a token: %w", ctx.Err())
	}
	defer func() { <-s.lock }()
	if s.token != nil && time.Until(s.token.Expiry) > renewBefore {
		return s.token.AccessToken, nil
	}
	s.requests.Add(1)
	if s.cert != nil {
		assertion, err := s.cert.Assertion(s.conf.ClientID, s.conf.TokenURL, time.Now())
		if err != nil {
			return "", err
		}
		s.conf.EndpointParams = url.Values{
			"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
			"client_assertion":      {assertion},
		}
	}
	tok, err := s.conf.Token(context.WithValue(ctx, oauth2.HTTPClient, s.httpClient))
	if err != nil {
		err = decodeTokenError(err)
		s.lastErr.Store(&err)
		return "", err
	}
	var none error
	s.lastErr.Store(&none)
	s.token = tok
	return tok.AccessToken, nil
}

// Invalidate drops the cached token if it is still accessToken, so that the
// next call to Token fetches a new one (after Graph refused it, say).
func (s *TokenSource) Invalidate(accessToken string) {
	s.lock <- struct{}{}
	if s.token != nil && s.token.AccessToken == accessToken {
		s.token = nil
	}
	<-s.lock
}

// Requests reports how many token requests this source has sent.
func (s *TokenSource) Requests() int64 { return s.requests.Load() }

// LastError is the outcome of the last token request: nil if it succeeded or
// none was made yet.
func (s *TokenSource) LastError() error {
	if p := s.lastErr.Load(); p != nil {
		return *p
	}
	return nil
}

// TokenError is a token request that Microsoft's identity platform refused,
// or that could not be made.
type TokenError struct {
	Status      int    // HTTP status; 0 when no answer came
	Code        string // OAuth2 "error", such as invalid_client
	AADSTS      int    // the first of "error_codes", such as 7000215
	Description string // first line of "error_description"
	TraceID     string
	Err         error // the transport error when no answer came
}

func (e *TokenError) Error() string {
	if e.Status == 0 {
		return fmt.Sprintf("token request failed: %v", e.Err)
	}
	if e.Code == "" {
		return fmt.Sprintf("token endpoint answered HTTP %d", e.Status)
	}
	return fmt.Sprintf("token request refused: %s: %s", e.Code, e.Description)
}

func (e *TokenError) Unwrap() error { return e.Err }

// Temporary reports whether the same request may succeed later without the
// administrator changing anything: no answer, throttling or a server error.
func (e *TokenError) Temporary() bool {
	return e.Status == 0 || e.Status == http.StatusTooManyRequests || e.Status >= 500
}

// Hint says in one sentence what the administrator should fix.
func (e *TokenError) Hint() string {
	switch e.AADSTS {
	case 7000215:
		return "the client secret is wrong: copy the secret's Value (not its Secret ID) from Certificates & secrets into client_secret"
	case 7000222:
		return "the client secret has expired: create a new one under Certificates & secrets and put its Value into client_secret"
	case 700016:
		return "the Application (client) ID is not known in this tenant: check client_id and tenant_id against the app registration's Overview page"
	case 90002:
		return "the tenant was not found: check tenant_id (Directory (tenant) ID on the app registration's Overview page) and the cloud"
	case 1002012:
		return "the scope must end in /.default for the client-credentials flow"
	case 500011:
		return "the resource of the scope is not in this tenant: check the scope's host and that the tenant has Exchange Online"
	case 700027:
		return "the client assertion was refused: upload the certificate of client_certificate_file under Certificates & secrets > Certificates, or check that it is the same one"
	case 700024:
		return "the client assertion is outside its valid time: check this machine's clock"
	}
	switch {
	case e.Status == 0:
		return "the token endpoint could not be reached: check the network, proxy and DNS, and token_url"
	case e.Status == http.StatusTooManyRequests || e.Status >= 500:
		return "Microsoft's sign-in service is busy or failing: it will be retried"
	}
	return "see the error description; check tenant_id, client_id and client_secret"
}

// decodeTokenError turns x/oauth2's error into a *TokenError, decoding
// Microsoft's JSON (error, error_description, error_codes, trace_id).
func decodeTokenError(err error) error {
	var re *oauth2.RetrieveError
	if !errors.As(err, &re) {
		return &TokenError{Err: err}
	}
	te := &TokenError{Code: re.ErrorCode}
	if re.Response != nil {
		te.Status = re.Response.StatusCode
	}
	var body struct {
		Error       string `json:"error"`
		Description string `json:"error_description"`
		Codes       []int  `json:"error_codes"`
		TraceID     string `json:"trace_id"`
	}
	if json.Unmarshal(re.Body, &body) == nil {
		if body.Error != "" {
			te.Code = body.Error
		}
		te.Description = body.Description
		if len(body.Codes) > 0 {
			te.AADSTS = body.Codes[0]
		}
		te.TraceID = body.TraceID
	}
	if te.Description == "" {
		te.Description = re.ErrorDescription
	}
	te.Description, _, _ = strings.Cut(te.Description, "\r\n")
	te.Description, _, _ = strings.Cut(te.Description, "\n")
	return te
}

// TokenRoles returns the application roles ("roles" claim) of a JWT access
// token, such as Mail.Send, without verifying its signature: it only serves
// to explain a missing permission. ok is false if the token is not a JWT.
func TokenRoles(accessToken string) (roles []string, ok bool) {
	parts := strings.Split(accessToken, ".")
	if len(parts) != 3 {
		return nil, false
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil, false
	}
	var claims struct {
		Roles []string `json:"roles"`
	}
	if json.Unmarshal(payload, &claims) != nil {
		return nil, false
	}
	return claims.Roles, true
}
