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
		var ps []ProtocolState
		for _, s := range tc.states {
			ps = append(ps, ProtocolState{State: s})
		}
		if got := Worst(ps); got != tc.want {
			t.Errorf("Worst(%v) = %q, want %q", tc.states, got, tc.want)
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
