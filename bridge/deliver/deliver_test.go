package deliver

import (
	"errors"
	"testing"

	"mailbridge/upstream"
)

func TestRetryPolicyWait(t *testing.T) {
	p := RetryPolicy{Base: 100e6, Max: 400e6}
	if w := p.Wait(1, &upstream.APIError{Status: 429, RetryAfter: 7e9}); w != 7e9 {
		t.Errorf("Retry-After not honoured: %v", w)
	}
	for n := 1; n < 6; n++ {
		w := p.Wait(n, errors.New("x"))
		hi := min(p.Base<<(n-1), p.Max)
		if w < hi/2 || w > hi {
			t.Errorf("attempt %d: wait %v outside [%v, %v]", n, w, hi/2, hi)
		}
	}
}
