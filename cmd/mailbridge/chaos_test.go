package main

import (
	"bytes"
	"fmt"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"mailbridge/upstream/m365fake"
)

// TestChaosKill9WhileSending kills the bridge with SIGKILL again and again
// while a client sends, with Graph answering slowly after taking some
// messages and losing its answer to others (504 after acceptance). After a
// last start every message the client was told 250 for reaches Graph
// exactly once: none lost, none twice. Each round's kill comes after a
// number of messages were accepted, not after a time, so a busy machine
// changes only how long it takes.
func TestChaosKill9WhileSending(t *testing.T) {
	const rounds, perRound = 8, 20
	fake, path, env := fakeAndConfig(t, "127.0.0.1:0", "")
	setSMTP(t, path, `lookup_window = "3s"`)
	fake.SetSentItemsLag(200 * time.Millisecond)
	var faults []m365fake.Fault
	for i := range 2000 {
		switch {
		case i%4 == 1: // taken, answered late: in flight when a kill comes
			faults = append(faults, m365fake.Fault{Delay: 400 * time.Millisecond, AfterAccept: true})
		case i%9 == 4:
			faults = append(faults, m365fake.GatewayTimeoutAfterAccept())
		case i%13 == 6: // dropped before it was taken
			faults = append(faults, m365fake.Fault{Drop: true})
		default:
			faults = append(faults, m365fake.Fault{})
		}
	}
	for _, f := range faults {
		fake.FailGraph(1, f)
	}
	accepted := map[string]bool{}
	n, kills, inFlightAtKills := 0, 0, 0
	queue := filepath.Join(filepath.Dir(path), "outbox", "queue")
	start := time.Now()
	for round := range rounds + 1 {
		cmd, addr, _ := startServe(t, path, env)
		if round == rounds {
			break // the last start delivers what is left
		}
		c, err := smtp.Dial(addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Auth(sasl.NewPlainClient("", "tm", "pw")); err != nil {
			t.Fatal(err)
		}
		for range perRound {
			id := fmt.Sprintf("<chaos-%d@test>", n)
			n++
			msg := fmt.Sprintf("From: orders@example.com\r\nTo: a@example.org\r\nMessage-ID: %s\r\nSubject: chaos %d\r\n\r\nx\r\n", id, n)
			if err := c.SendMail(mailbox, []string{"a@example.org"}, strings.NewReader(msg)); err != nil {
				t.Fatalf("%s: %v", id, err)
			}
			accepted[id] = true
		}
		c.Close()
		entries, _ := filepath.Glob(filepath.Join(queue, "*.json"))
		for _, e := range entries {
			if data, _ := os.ReadFile(e); bytes.Contains(data, []byte(`"in_flight":true`)) {
				inFlightAtKills++
			}
		}
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		kills++
	}
	copies := func() map[string]int {
		got := map[string]int{}
		for _, m := range fake.Sent() {
			mm, err := mail.ReadMessage(bytes.NewReader(m.MIME))
			if err != nil {
				t.Fatal(err)
			}
			got[mm.Header.Get("Message-Id")]++
		}
		return got
	}
	// Progress, not a deadline: fail when nothing new arrives for a while.
	last, since := -1, time.Now()
	for got := len(copies()); got < len(accepted); got = len(copies()) {
		if got != last {
			last, since = got, time.Now()
		} else if time.Since(since) > patience {
			t.Fatalf("%d of %d messages reached Graph", got, len(accepted))
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The queue empties: nothing is left to go out twice.
	for deadline := time.Now().Add(patience); ; time.Sleep(20 * time.Millisecond) {
		if entries, _ := filepath.Glob(filepath.Join(queue, "*.json")); len(entries) == 0 {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("%d messages still queued", len(entries))
		}
	}
	got := copies()
	lost, extra := 0, 0
	for id := range accepted {
		switch c := got[id]; {
		case c == 0:
			lost++
		case c > 1:
			extra += c - 1
			t.Errorf("%s reached Graph %d times", id, c)
		}
	}
	for id := range got {
		if !accepted[id] {
			t.Errorf("Graph got %s, which no client sent", id)
		}
	}
	if lost != 0 || extra != 0 {
		t.Errorf("%d lost, %d extra copies", lost, extra)
	}
	if inFlightAtKills == 0 {
		t.Error("no kill found a message in flight: the test proves nothing")
	}
	t.Logf("chaos: %d messages, %d kills -9, %d in flight at the kills, %d copies at Graph, %d lost, %d extra, %s",
		len(accepted), kills, inFlightAtKills, len(fake.Sent()), lost, extra, time.Since(start).Round(time.Second))
}
