package account

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// passwordChecker verifies a local password against the account's bcrypt
// hash. bcrypt is slow by design (tens of milliseconds), and legacy clients
// log in for every message, so a password that verified once is remembered
// as an HMAC under a key that lives only in this process's memory.
type passwordChecker struct {
	hash     []byte
	key      *[32]byte
	verified atomic.Pointer[[32]byte]
}

func newPasswordChecker(hash string, key *[32]byte) *passwordChecker {
	return &passwordChecker{hash: []byte(hash), key: key}
}

func (p *passwordChecker) check(password string) bool {
	mac := hmac.New(sha256.New, p.key[:])
	mac.Write([]byte(password))
	var sum [32]byte
	mac.Sum(sum[:0])
	if v := p.verified.Load(); v != nil && hmac.Equal(v[:], sum[:]) {
		return true
	}
	if bcrypt.CompareHashAndPassword(p.hash, []byte(password)) != nil {
		return false
	}
	p.verified.Store(&sum)
	return true
}

var (
	dummyHashOnce sync.Once
	dummyHash     []byte
)

// spendBcrypt does the work of one bcrypt check, so that an unknown user
// name takes as long to refuse as a wrong password.
func spendBcrypt(password string) {
	dummyHashOnce.Do(func() {
		dummyHash, _ = bcrypt.GenerateFromPassword([]byte("mailbridge-dummy"), bcrypt.DefaultCost)
	})
	bcrypt.CompareHashAndPassword(dummyHash, []byte(password))
}

func newProcessKey() *[32]byte {
	var k [32]byte
	if _, err := rand.Read(k[:]); err != nil {
		panic(err)
	}
	return &k
}

// throttle slows down clients that keep failing to log in: after each
// failure from an address its next refusal waits twice as long, from base
// up to max. An address that stays quiet for forgetAfter starts afresh.
type throttle struct {
	base, max   time.Duration
	forgetAfter time.Duration
	now         func() time.Time

	mu    sync.Mutex
	fails map[string]*failRecord
}

type failRecord struct {
	count int
	last  time.Time
}

func newThrottle(base, max time.Duration) *throttle {
	return &throttle{base: base, max: max, forgetAfter: 15 * time.Minute, now: time.Now, fails: map[string]*failRecord{}}
}

// failed records a failed login from ip and returns how long to wait
// before answering it.
func (t *throttle) failed(ip string) time.Duration {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	if len(t.fails) > 10000 {
		for k, r := range t.fails {
			if now.Sub(r.last) > t.forgetAfter {
				delete(t.fails, k)
			}
		}
	}
	r := t.fails[ip]
	if r == nil || now.Sub(r.last) > t.forgetAfter {
		r = &failRecord{}
		t.fails[ip] = r
	}
	r.count++
	r.last = now
	d := t.base
	for i := 1; i < r.count && d < t.max; i++ {
		d *= 2
	}
	return min(d, t.max)
}

// succeeded forgets ip's failures.
func (t *throttle) succeeded(ip string) {
	t.mu.Lock()
	delete(t.fails, ip)
	t.mu.Unlock()
}
