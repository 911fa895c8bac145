package admin

import (
	"fmt"
	"testing"
	"time"
)

func TestActivityKeepsTheLast100NewestFirst(t *testing.T) {
	a := NewActivity()
	for i := range 150 {
		result := "sent"
		if i%3 == 0 {
			result = "failed"
		}
		a.Record(FinalMessage{Account: "a", Result: result, QueueID: fmt.Sprint(i), RequestID: fmt.Sprint("r", i)})
	}
	recent := a.Recent()
	if len(recent) != 100 || recent[0].QueueID != "149" || recent[99].QueueID != "50" {
		t.Fatalf("%d lines, first %q, last %q; want 100 from 149 down to 50", len(recent), recent[0].QueueID, recent[99].QueueID)
	}
	d := a.Today("a")
	if d.Sent != 100 || d.Failed != 50 || d.LastRequestID != "r149" {
		t.Errorf("today %+v, want 100 sent, 50 failed, last r149", d)
	}
	if (a.Today("nobody") != AccountDay{}) {
		t.Error("an account with no messages has counts")
	}
}

func TestActivityStartsEachDayAfresh(t *testing.T) {
	now := time.Date(2026, 12, 1, 23, 59, 0, 0, time.Local)
	a := NewActivity()
	a.now = func() time.Time { return now }
	a.Record(FinalMessage{Account: "a", Result: "sent", RequestID: "yesterday"})
	a.Record(FinalMessage{Account: "a", Result: "not sent"})
	now = now.Add(2 * time.Minute)
	d := a.Today("a")
	if d.Sent != 0 || d.Failed != 0 || d.LastRequestID != "yesterday" {
		t.Errorf("after midnight %+v: want zero counts and yesterday's last message", d)
	}
	if len(a.Recent()) != 2 {
		t.Error("midnight dropped the recent lines")
	}
	var nilActivity *Activity
	nilActivity.Record(FinalMessage{}) // a nil Activity records nothing, and does not panic
}
