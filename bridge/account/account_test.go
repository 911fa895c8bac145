package account

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

func TestLoginServer(t *testing.T) {
	var gotUser, gotPass string
	auth := func(u, p string) error {
		gotUser, gotPass = u, p
		if p != "pw" {
			return ErrBadCredentials
		}
		return nil
	}
	// Classic three steps.
	s := NewLoginServer(auth)
	if ch, done, _ := s.Next(nil); done || string(ch) != "Username:" {
		t.Fatalf("first challenge %q done=%v", ch, done)
	}
	if ch, done, _ := s.Next([]byte("user")); done || string(ch) != "Password:" {
		t.Fatalf("second challenge %q done=%v", ch, done)
	}
	if _, done, err := s.Next([]byte("pw")); !done || err != nil || gotUser != "user" || gotPass != "pw" {
		t.Fatalf("done=%v err=%v user=%q pass=%q", done, err, gotUser, gotPass)
	}
	if _, _, err := s.Next([]byte("more")); err == nil {
		t.Fatal("a response after the end was accepted")
	}
	// Initial response (.NET): the user name comes with AUTH.
	s = NewLoginServer(auth)
	if ch, done, _ := s.Next([]byte("dotnet")); done || string(ch) != "Password:" {
		t.Fatalf("challenge after initial response %q", ch)
	}
	if _, done, err := s.Next([]byte("bad")); !done || !errors.Is(err, ErrBadCredentials) || gotUser != "dotnet" {
		t.Fatalf("done=%v err=%v user=%q", done, err, gotUser)
	}
}

func TestAuthThrottleWaitsBeforeTheVerdict(t *testing.T) {
	now := time.Unix(1000, 0)
	th := newThrottle(100*time.Millisecond, time.Second)
	th.now = func() time.Time { return now }
	admit := func(ip, account string) time.Duration {
		t.Helper()
		d, ok := th.admit(ip, account)
		if !ok {
			t.Fatalf("%s for %s: no verdict", ip, account)
		}
		return d
	}
	// One guesser, one connection after another: no wait before any
	// failure, then each login waits twice as long as the one before.
	for i, w := range []time.Duration{0, 100, 200, 400, 800, 1000, 1000} {
		if got := admit("192.0.2.1", "a"); got != w*time.Millisecond {
			t.Fatalf("login %d: wait %v, want %v", i+1, got, w*time.Millisecond)
		}
		now = now.Add(w * time.Millisecond) // it waited
		th.failed("192.0.2.1", "a")
	}
	if got := admit("192.0.2.2", "b"); got != 0 {
		t.Errorf("another address and account waits: %v", got)
	}
	// Another address for account a waits the account's wait, the right
	// password too (admit comes before the verdict).
	if got := admit("127.0.0.2", "a"); got != time.Second {
		t.Errorf("another address for the same account: %v, want the account's wait", got)
	}
	// Logins at the same moment follow one another: the one above booked
	// a second, so the next waits two; past maxQueue seconds, none is
	// checked.
	if got := admit("127.0.0.3", "a"); got != 2*time.Second {
		t.Errorf("a second login at once: %v, want 2s", got)
	}
	if _, ok := th.admit("127.0.0.4", "a"); ok {
		t.Error("a third login at once was booked beyond maxQueue")
	}
	// A success clears its own pair only: the address's other failures
	// stay.
	now = now.Add(time.Minute)
	th.failed("192.0.2.1", "b")
	th.succeeded("192.0.2.1", "b")
	if got := admit("192.0.2.1", "c"); got != time.Second {
		t.Errorf("after another account's success from the same address: %v, want the address's wait", got)
	}
	now = now.Add(16 * time.Minute)
	th.failed("192.0.2.9", "z")
	if got := admit("192.0.2.9", "y"); got != 100*time.Millisecond {
		t.Errorf("a fresh address with one failure: %v, want the base wait", got)
	}
}

func TestAuthThrottleReportsAnAccountOverItsCap(t *testing.T) {
	now := time.Unix(1000, 0)
	th := newThrottle(time.Millisecond, time.Millisecond)
	th.now = func() time.Time { return now }
	var reported [][]string
	for i := range 25 {
		if r := th.failed(fmt.Sprintf("127.0.0.%d", i%3+1), "victim"); r != nil {
			reported = append(reported, r)
		}
	}
	if len(reported) != 1 || len(reported[0]) != 3 {
		t.Fatalf("reports %v, want one naming the three addresses", reported)
	}
	now = now.Add(time.Minute)
	if r := th.failed("127.0.0.1", "victim"); r != nil {
		t.Error("a new minute starts with a report")
	}
}

func TestPasswordCheckerRemembersOnlyTheRightPassword(t *testing.T) {
	hash, _ := bcrypt.GenerateFromPassword([]byte("right"), bcrypt.MinCost)
	p := newPasswordChecker(string(hash), newProcessKey())
	for i, tc := range []struct {
		pw   string
		want bool
	}{{"wrong", false}, {"right", true}, {"right", true}, {"wrong", false}, {"Right", false}, {"", false}} {
		if got := p.check(tc.pw); got != tc.want {
			t.Errorf("check %d (%q) = %v, want %v", i, tc.pw, got, tc.want)
		}
	}
}

// An hour of failures from 40,000 addresses with long user names leaves
// the throttle's memory bounded: clipped keys, swept windows, at most
// maxPairs pairs.
func TestAuthThrottleMemoryIsBounded(t *testing.T) {
	now := time.Unix(1000, 0)
	th := newThrottle(time.Millisecond, 30*time.Millisecond)
	th.now = func() time.Time { return now }
	long := strings.Repeat("u", 20000)
	for i := range 40000 {
		now = now.Add(90 * time.Millisecond) // an hour in all
		th.failed(fmt.Sprintf("10.%d.%d.%d", i>>16, i>>8&255, i&255), fmt.Sprintf("%s%d", long, i))
	}
	if n := len(th.pairs); n > maxPairs {
		t.Errorf("%d pairs remembered, want at most %d", n, maxPairs)
	}
	if n := len(th.byIP) + len(th.byAcct); n > 2*maxPairs {
		t.Errorf("%d address and account sums, want at most %d", n, 2*maxPairs)
	}
	// A minute's failures at most: 60 s / 90 ms.
	if n := len(th.windows); n > 700 {
		t.Errorf("%d minute windows kept", n)
	}
	for k := range th.pairs {
		if len(k.account) > maxKeyBytes {
			t.Fatalf("a %d-byte user name kept as a key", len(k.account))
		}
	}
	// Clipped names still share their counts: a name past maxKeyBytes is
	// throttled as its first maxKeyBytes.
	if d, _ := th.admit("192.0.2.1", long+"x"); d <= time.Millisecond {
		t.Errorf("a long user name's failures are not counted together: %v", d)
	}
}

// The hash an unknown user name is checked against has the cost asked
// for (the accounts' highest, which Load records), so that its timing does
// not tell which names exist.
func TestDummyHashHasTheCostAsked(t *testing.T) {
	for _, cost := range []int{bcrypt.MinCost, 6, 12} {
		if got, _ := bcrypt.Cost(dummyHash(cost)); got != cost {
			t.Errorf("the dummy hash for cost %d has cost %d", cost, got)
		}
	}
	if got, _ := bcrypt.Cost(dummyHash(0)); got != bcrypt.DefaultCost {
		t.Errorf("no account: the dummy hash has cost %d, want the default", got)
	}
}
