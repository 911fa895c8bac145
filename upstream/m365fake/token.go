package m365fake

import (
	"crypto"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"
)

// rolesByAudience lists which application permissions belong to which
// resource: a token carries only the roles of its own audience.
var rolesByAudience = map[string][]string{
	GraphAudience:   {"Mail.Send", "Mail.ReadWrite", "Mail.Read", "Mail.ReadBasic", "Mail.ReadBasic.All", "User.Read.All"},
	OutlookAudience: {"POP.AccessAsApp", "IMAP.AccessAsApp", "SMTP.SendAsApp"},
}

// claims are the parts of an Entra ID access token the fake reads back.
type claims struct {
	Aud   string   `json:"aud"`
	Iss   string   `json:"iss"`
	Tid   string   `json:"tid"`
	AppID string   `json:"appid"`
	Roles []string `json:"roles,omitempty"`
	Iat   int64    `json:"iat"`
	Exp   int64    `json:"exp"`
}

func (s *Server) serveToken(w http.ResponseWriter, r *http.Request) {
	tenantID := r.PathValue("tenant")
	if err := r.ParseForm(); err != nil {
		writeTokenError(w, http.StatusBadRequest, "invalid_request", 900144, "The request body must contain the following parameter: 'grant_type'.")
		return
	}
	scope := r.PostForm.Get("scope")
	s.mu.Lock()
	s.tokenRequests[scope]++
	s.mu.Unlock()
	if f, ok := s.takeFault(&s.tokenFaults); ok {
		if applyFault(w, r, f, func(f Fault) {
			code := f.Code
			if code == "" {
				code = "temporarily_unavailable"
			}
			writeTokenError(w, f.Status, code, 90033, "A transient error has occurred. Please try again.")
		}) {
			return
		}
	}
	clientID := r.PostForm.Get("client_id")
	secret := r.PostForm.Get("client_secret")

	s.mu.Lock()
	t := s.tenants[tenantID]
	var a *app
	if t != nil {
		a = t.apps[clientID]
	}
	lifetime := s.tokenLifetime
	s.mu.Unlock()

	switch {
	case t == nil:
		writeTokenError(w, http.StatusBadRequest, "invalid_request", 90002,
			fmt.Sprintf("Tenant '%s' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant.", tenantID))
	case r.PostForm.Get("grant_type") != "client_credentials":
		writeTokenError(w, http.StatusBadRequest, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
	case a == nil:
		writeTokenError(w, http.StatusBadRequest, "unauthorized_client", 700016,
			fmt.Sprintf("Application with identifier '%s' was not found in the directory '%s'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.", clientID, tenantID))
	case r.PostForm.Get("client_assertion_type") != "":
		if code, text := s.checkAssertion(r, a, clientID); code != 0 {
			writeTokenError(w, http.StatusUnauthorized, "invalid_client", code, text)
			return
		}
		s.issueToken(w, tenantID, a, scope, lifetime)
	case a.secret == "" || !hmac.Equal([]byte(secret), []byte(a.secret)):
		writeTokenError(w, http.StatusUnauthorized, "invalid_client", 7000215,
			fmt.Sprintf("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '%s'.", clientID))
	case a.secretExpired:
		writeTokenError(w, http.StatusUnauthorized, "invalid_client", 7000222,
			fmt.Sprintf("The provided client secret keys for app '%s' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.", clientID))
	default:
		s.issueToken(w, tenantID, a, scope, lifetime)
	}
}

// issueToken answers with an access token for scope, or the scope errors
// that come after the client is authenticated.
func (s *Server) issueToken(w http.ResponseWriter, tenantID string, a *app, scope string, lifetime time.Duration) {
	if !strings.HasSuffix(scope, "/.default") {
		writeTokenError(w, http.StatusBadRequest, "invalid_scope", 1002012,
			fmt.Sprintf("The provided value for scope %s is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).", scope))
		return
	}
	aud := strings.TrimSuffix(scope, "/.default")
	resourceRoles, known := rolesByAudience[aud]
	if !known {
		writeTokenError(w, http.StatusBadRequest, "invalid_resource", 500011,
			fmt.Sprintf("The resource principal named %s was not found in the tenant named %s. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant.", aud, tenantID))
		return
	}
	var roles []string
	for _, role := range a.roles {
		if slices.Contains(resourceRoles, role) {
			roles = append(roles, role)
		}
	}
	now := time.Now()
	tok := s.signToken(claims{
		Aud: aud, Iss: "https://sts.windows.net/" + tenantID + "/", Tid: tenantID, AppID: a.clientID,
		Roles: roles, Iat: now.Unix(), Exp: now.Add(lifetime).Unix(),
	})
	secs := int(lifetime / time.Second)
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	json.NewEncoder(w).Encode(map[string]any{
		"token_type": "Bearer", "expires_in": secs, "ext_expires_in": secs, "access_token": tok,
	})
}

// checkAssertion verifies a client assertion (RFC 7523) as Entra ID does:
// the certificate named by x5t is the app's, the RS256 signature holds, the
// audience is this token endpoint, iss and sub are the client, and it is
// within its time. It returns the AADSTS code and text of a refusal.
func (s *Server) checkAssertion(r *http.Request, a *app, clientID string) (int, string) {
	if r.PostForm.Get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
		return 700025, "Client is public so neither 'client_assertion' nor 'client_secret' should be presented."
	}
	parts := strings.Split(r.PostForm.Get("client_assertion"), ".")
	if len(parts) != 3 {
		return 700027, "Client assertion contains an invalid signature. [Reason - The assertion is not a JWT.]"
	}
	var header struct {
		Alg string `json:"alg"`
		X5t string `json:"x5t"`
	}
	var c struct {
		Aud string `json:"aud"`
		Iss string `json:"iss"`
		Sub string `json:"sub"`
		Nbf int64  `json:"nbf"`
		Exp int64  `json:"exp"`
	}
	hb, err1 := base64.RawURLEncoding.DecodeString(parts[0])
	cb, err2 := base64.RawURLEncoding.DecodeString(parts[1])
	sig, err3 := base64.RawURLEncoding.DecodeString(parts[2])
	if err1 != nil || err2 != nil || err3 != nil || json.Unmarshal(hb, &header) != nil || json.Unmarshal(cb, &c) != nil {
		return 700027, "Client assertion contains an invalid signature. [Reason - The assertion is malformed.]"
	}
	if a.cert == nil {
		return 700027, fmt.Sprintf("Client assertion contains an invalid signature. [Reason - The key was not found., Thumbprint of key used by client: '%s']", strings.ToUpper(hex.EncodeToString(mustB64(header.X5t))))
	}
	thumb := sha1.Sum(a.cert.Raw)
	if header.X5t != base64.RawURLEncoding.EncodeToString(thumb[:]) {
		return 700027, fmt.Sprintf("Client assertion contains an invalid signature. [Reason - The key was not found., Thumbprint of key used by client: '%s']", strings.ToUpper(hex.EncodeToString(mustB64(header.X5t))))
	}
	pub, ok := a.cert.PublicKey.(*rsa.PublicKey)
	digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if !ok || header.Alg != "RS256" || rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig) != nil {
		return 700027, "Client assertion contains an invalid signature. [Reason - The provided signature value did not match the expected signature value.]"
	}
	if want := s.URL + r.URL.Path; c.Aud != want {
		return 700027, fmt.Sprintf("Client assertion contains an invalid signature. [Reason - The audience '%s' is not the token endpoint '%s'.]", c.Aud, want)
	}
	if c.Iss != clientID || c.Sub != clientID {
		return 700021, "Client assertion application identifier doesn't match 'client_id' parameter."
	}
	if now := time.Now().Unix(); now >= c.Exp || now+300 < c.Nbf {
		return 700024, "Client assertion is not within its valid time range."
	}
	return 0, ""
}

func mustB64(s string) []byte {
	b, _ := base64.RawURLEncoding.DecodeString(s)
	return b
}

func writeTokenError(w http.ResponseWriter, status int, code string, aadsts int, text string) {
	traceID, correlationID := newGUID(), newGUID()
	now := time.Now().UTC().Format("2006-01-02 15:04:05Z")
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]any{
		"error": code,
		"error_description": fmt.Sprintf("AADSTS%d: %s\r\nTrace ID: %s\r\nCorrelation ID: %s\r\nTimestamp: %s",
			aadsts, text, traceID, correlationID, now),
		"error_codes":    []int{aadsts},
		"timestamp":      now,
		"trace_id":       traceID,
		"correlation_id": correlationID,
		"error_uri":      fmt.Sprintf("https://login.microsoftonline.com/error?code=%d", aadsts),
	})
}

var jwtHeader = base64.RawURLEncoding.EncodeToString([]byte(`{"typ":"JWT","alg":"HS256"}`))

func (s *Server) signToken(c claims) string {
	payload, _ := json.Marshal(c)
	signed := jwtHeader + "." + base64.RawURLEncoding.EncodeToString(payload)
	mac := hmac.New(sha256.New, s.signKey)
	mac.Write([]byte(signed))
	return signed + "." + base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

// tokenRefusal is Graph's message refusing a bearer token, word for word.
type tokenRefusal string

func (r tokenRefusal) Error() string { return string(r) }

// The two ways Graph and Outlook refuse a bearer token.
const (
	errTokenExpired tokenRefusal = "Access token has expired or is not yet valid."
	errTokenInvalid tokenRefusal = "Access token validation failure. Invalid audience."
)

// verifyToken checks a token's signature, expiry and audience.
func (s *Server) verifyToken(tok, audience string) (claims, error) {
	var c claims
	i := strings.LastIndexByte(tok, '.')
	if i < 0 {
		return c, errTokenInvalid
	}
	mac := hmac.New(sha256.New, s.signKey)
	mac.Write([]byte(tok[:i]))
	sig, err := base64.RawURLEncoding.DecodeString(tok[i+1:])
	if err != nil || !hmac.Equal(sig, mac.Sum(nil)) {
		return c, errTokenInvalid
	}
	parts := strings.Split(tok[:i], ".")
	if len(parts) != 2 {
		return c, errTokenInvalid
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil || json.Unmarshal(payload, &c) != nil {
		return c, errTokenInvalid
	}
	if time.Now().Unix() >= c.Exp {
		return c, errTokenExpired
	}
	if c.Aud != audience {
		return c, errTokenInvalid
	}
	return c, nil
}
