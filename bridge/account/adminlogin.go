package account

import (
	"context"
	"crypto/subtle"
	"strings"

	"mailbridge/bridge/conntrack"
)

// AdminLogin is the status page's one login: a user name and a bcrypt
// hash, checked as mail logins are (the remembered HMAC, the same
// throttle, so that guessing here slows guessing there too).
type AdminLogin struct {
	username string
	password *passwordChecker
	r        *Registry
}

// AdminLogin returns the login of username with the bcrypt hash.
func (r *Registry) AdminLogin(username, hash string) *AdminLogin {
	return &AdminLogin{username: strings.ToLower(username), password: newPasswordChecker(hash, r.key), r: r}
}

// Authenticate checks a user name and password from remoteIP; a failure
// waits as a failed mail login does and is a *Refusal.
func (l *AdminLogin) Authenticate(ctx context.Context, remoteIP, username, password string) error {
	user := strings.ToLower(username)
	key := "admin:" + l.username
	wait, ok := l.r.throttle.admit(remoteIP, key)
	if !ok {
		return ErrTooManyGuesses
	}
	sleep(ctx, wait)
	nameOK := subtle.ConstantTimeCompare([]byte(user), []byte(l.username)) == 1
	if l.password.check(password) && nameOK {
		l.r.throttle.succeeded(remoteIP, key)
		return nil
	}
	report := l.r.throttle.failed(remoteIP, key)
	if report != nil {
		l.r.log.Warn().Str("proto", "admin").Str("username", conntrack.Clip(username)).Strs("remotes", report).
			Str("hint", "someone is guessing the status page's password: check the addresses, and keep [admin] listen on loopback").
			Msg("many failed status page logins within a minute")
	}
	return &Refusal{Delay: wait}
}
