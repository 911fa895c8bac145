package statuspage

import (
	"testing"
	"time"
)

func TestWorstStateOfAnAccount(t *testing.T) {
	for _, tc := range []struct {
		states []string
		want   string
	}{
		{nil, "unused"},
		{[]string{"unused", "ok"}, "ok"},
		{[]string{"ok", "retrying", "unused"}, "retrying"},
		{[]string{"retrying", "refused", "ok"}, "refused"},
	} {
		var a AccountState
		for _, s := range tc.states {
			a.Protocols = append(a.Protocols, ProtocolState{State: s})
		}
		if got := a.State(); got != tc.want {
			t.Errorf("the state of %v is %q, want %q", tc.states, got, tc.want)
		}
	}
}

func TestAgesReadAtAGlance(t *testing.T) {
	for d, want := range map[time.Duration]string{
		1400 * time.Millisecond:                       "1s",
		12*time.Minute + 5*time.Second:                "12m5s",
		90*time.Minute + 20*time.Second:               "1h30m",
		3*24*time.Hour + 5*time.Hour + 10*time.Minute: "3d5h",
	} {
		if got := roundAge(d); got != want {
			t.Errorf("roundAge(%v) = %q, want %q", d, got, want)
		}
	}
}
