package account

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"slices"
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
	dummyMu     sync.Mutex
	dummyHashes = map[int][]byte{} // by cost
)

// dummyHash returns a hash of cost (DefaultCost if below MinCost), made
// once per cost.
func dummyHash(cost int) []byte {
	if cost < bcrypt.MinCost {
		cost = bcrypt.DefaultCost
	}
	dummyMu.Lock()
	defer dummyMu.Unlock()
	h := dummyHashes[cost]
	if h == nil {
		h, _ = bcrypt.GenerateFromPassword([]byte("mailbridge-dummy"), cost)
		dummyHashes[cost] = h
	}
	return h
}

// spendBcrypt does the work of one bcrypt check at cost, so that an
// unknown user name takes as long to refuse as a wrong password.
func spendBcrypt(password string, cost int) {
	bcrypt.CompareHashAndPassword(dummyHash(cost), []byte(password))
}

func newProcessKey() *[32]byte {
	var k [32]byte
	if _, err := rand.Read(k[:]); err != nil {
		panic(err)
	}
	return &k
}

// throttle slows down clients that keep failing to log in. Failures are
// counted per (address, account) pair and summed per address and per
// account: once an address or an account has failed, each of its logins
// waits before its verdict (admit), twice as long as the one before, from
// base up to max, so that neither many accounts from one address nor one
// account from many addresses (other loopback addresses, say) nor many
// connections at once go fast. A success clears only its own pair.
// A pair that stays quiet for forgetAfter is forgotten. An account that
// fails more than capPerMinute times in a minute is reported.
//
// Its memory is bounded whatever clients send: user names are clipped to
// maxKeyBytes before they become keys, quiet entries are swept out at most
// once a minute (not by a walk on every failure), and past maxPairs the
// oldest pairs go first.
type throttle struct {
	base, max    time.Duration
	forgetAfter  time.Duration
	capPerMinute int
	now          func() time.Time

	mu      sync.Mutex
	swept   time.Time // the last sweep
	pairs   map[pairKey]*failRecord
	byIP    map[string]int
	byAcct  map[string]int
	windows map[string]*minuteWindow // by account
	gates   map[string]time.Time     // by account, and by "ip:"+address: the end of the waits booked
}

type pairKey struct{ ip, account string }

type failRecord struct {
	count int
	last  time.Time
}

type minuteWindow struct {
	start    time.Time
	count    int
	ips      []string
	reported bool
}

// Bounds of the throttle's memory.
const (
	maxKeyBytes = 64    // of a user name used as a key
	maxPairs    = 20000 // (address, account) pairs remembered
)

func newThrottle(base, max time.Duration) *throttle {
	return &throttle{base: base, max: max, forgetAfter: 15 * time.Minute, capPerMinute: 10, now: time.Now,
		pairs: map[pairKey]*failRecord{}, byIP: map[string]int{}, byAcct: map[string]int{}, windows: map[string]*minuteWindow{}, gates: map[string]time.Time{}}
}

// maxQueue bounds the wait admit books for a login, in multiples of max:
// a login that would wait longer gets no verdict at all.
const maxQueue = 2

// admit books the login of account from ip: it returns how long to wait
// before checking the password, and ok false when that wait would exceed
// maxQueue times max, the waits of the account or the address being
// booked so far ahead (then the login gets a temporary refusal and no
// verdict, so that it is no guess).
//
// Once the address or the account has recent failures, every login waits
// before its verdict, whatever the verdict: a right password is not
// answered sooner than a wrong one, so a client that hangs up early learns
// nothing. The wait doubles with the failures (base, 2·base, … up to max),
// and the waits of one account, or one address, follow one another: a
// hundred connections guessing in parallel get a verdict one after the
// other, as one connection would.
func (t *throttle) admit(ip, account string) (wait time.Duration, ok bool) {
	account = clipKey(account)
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	n := max(t.byIP[ip], t.byAcct[account])
	if n == 0 {
		return 0, true
	}
	d := t.base
	for i := 1; i < n && d < t.max; i++ {
		d *= 2
	}
	d = min(d, t.max)
	slot := now
	for _, g := range []time.Time{t.gates[account], t.gates["ip:"+ip]} {
		if g.After(slot) {
			slot = g
		}
	}
	if slot.Add(d).Sub(now) > maxQueue*t.max {
		return 0, false
	}
	t.gates[account], t.gates["ip:"+ip] = slot.Add(d), slot.Add(d)
	return slot.Add(d).Sub(now), true
}

// failed records a failed login from ip for account (the lower-case user
// name given) and returns, once per minute when the account is over its
// cap, the addresses it failed from.
func (t *throttle) failed(ip, account string) []string {
	account = clipKey(account)
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	if now.Sub(t.swept) >= time.Minute || len(t.pairs) >= maxPairs {
		t.sweep(now)
	}
	k := pairKey{ip, account}
	r := t.pairs[k]
	if r != nil && now.Sub(r.last) > t.forgetAfter {
		t.forget(k, r)
		r = nil
	}
	if r == nil {
		r = &failRecord{}
		t.pairs[k] = r
	}
	r.count++
	r.last = now
	t.byIP[ip]++
	t.byAcct[account]++
	w := t.windows[account]
	if w == nil || now.Sub(w.start) >= time.Minute {
		w = &minuteWindow{start: now}
		t.windows[account] = w
	}
	w.count++
	if !slices.Contains(w.ips, ip) && len(w.ips) < 20 {
		w.ips = append(w.ips, ip)
	}
	var report []string
	if w.count > t.capPerMinute && !w.reported {
		w.reported = true
		report = slices.Clone(w.ips)
	}
	return report
}

// sweep forgets the pairs quiet for forgetAfter and the minute windows
// that have ended, then, past maxPairs, the oldest pairs down to three
// quarters of it; t.mu is held.
func (t *throttle) sweep(now time.Time) {
	t.swept = now
	for k, r := range t.pairs {
		if now.Sub(r.last) > t.forgetAfter {
			t.forget(k, r)
		}
	}
	for a, w := range t.windows {
		if now.Sub(w.start) >= time.Minute {
			delete(t.windows, a)
		}
	}
	for k, g := range t.gates {
		if g.Before(now) {
			delete(t.gates, k)
		}
	}
	if len(t.pairs) < maxPairs {
		return
	}
	type aged struct {
		k    pairKey
		last time.Time
	}
	all := make([]aged, 0, len(t.pairs))
	for k, r := range t.pairs {
		all = append(all, aged{k, r.last})
	}
	slices.SortFunc(all, func(a, b aged) int { return a.last.Compare(b.last) })
	for _, a := range all[:len(all)-maxPairs*3/4] {
		t.forget(a.k, t.pairs[a.k])
	}
}

// clipKey clips a user name to maxKeyBytes for use as a key.
func clipKey(account string) string {
	if len(account) > maxKeyBytes {
		return account[:maxKeyBytes]
	}
	return account
}

// forget drops a pair's failures from the sums; t.mu is held.
func (t *throttle) forget(k pairKey, r *failRecord) {
	delete(t.pairs, k)
	if t.byIP[k.ip] -= r.count; t.byIP[k.ip] <= 0 {
		delete(t.byIP, k.ip)
	}
	if t.byAcct[k.account] -= r.count; t.byAcct[k.account] <= 0 {
		delete(t.byAcct, k.account)
	}
}

// succeeded forgets the failures of the pair (ip, account), and no other.
func (t *throttle) succeeded(ip, account string) {
	account = clipKey(account)
	t.mu.Lock()
	if r := t.pairs[pairKey{ip, account}]; r != nil {
		t.forget(pairKey{ip, account}, r)
	}
	t.mu.Unlock()
}
