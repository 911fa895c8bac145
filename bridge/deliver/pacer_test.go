package deliver

import (
	"testing"
	"time"
)

func TestUploadPacer(t *testing.T) {
	now := time.Unix(0, 0)
	p := newUploadPacer(150, 5*time.Minute)
	p.now = func() time.Time { return now }
	if d := p.delay("a", 100); d != 0 {
		t.Fatalf("first upload waits %v", d)
	}
	now = now.Add(time.Minute)
	if d := p.delay("a", 40); d != 0 {
		t.Fatalf("within the budget waits %v", d)
	}
	now = now.Add(time.Minute)
	if d := p.delay("a", 20); d != 3*time.Minute {
		t.Fatalf("over the budget waits %v, want until the first upload leaves the window (3m)", d)
	}
	if d := p.delay("b", 150); d != 0 {
		t.Fatalf("another mailbox waits %v", d)
	}
	now = now.Add(3 * time.Minute)
	if d := p.delay("a", 20); d != 0 {
		t.Fatalf("after the window moved: %v", d)
	}
	if d := p.delay("c", 500); d != 0 {
		t.Fatalf("an upload larger than the budget waits %v on an empty window", d)
	}
}
