package imapserver

import "testing"

// The command tracker arms upstream_timeout while a command is
// outstanding. Outlook refusing an IDLE, or refusing a synchronising
// literal, must not leave it believing the client idles or sends literal
// bytes: the commands after it count again.
func TestTrackerAfterRefusedIdleAndLiteral(t *testing.T) {
	tr := &tracker{}
	tr.client([]byte("a IDLE\r\n"))
	tr.upstream([]byte("a NO IDLE not allowed now.\r\n"))
	if tr.idling.Load() {
		t.Error("still idling after Outlook refused the IDLE")
	}
	tr.client([]byte("b NOOP\r\n"))
	if !tr.outstanding() {
		t.Error("a NOOP after the refused IDLE is not counted: upstream_timeout is off")
	}
	tr.upstream([]byte("b OK NOOP completed.\r\n"))

	// A synchronising literal that Outlook refuses: the client sends the
	// next command instead of the literal's bytes.
	tr.client([]byte("c APPEND INBOX {5000000}\r\n"))
	tr.upstream([]byte("c NO [TOOBIG] Message too large.\r\n"))
	tr.client([]byte("d NOOP\r\n"))
	if !tr.outstanding() {
		t.Error("the NOOP after a refused literal is taken for literal bytes: upstream_timeout is off")
	}
	tr.upstream([]byte("d OK NOOP completed.\r\n"))

	// An accepted one: its bytes are skipped, commands after it count.
	tr.client([]byte("e APPEND INBOX {5}\r\n"))
	tr.upstream([]byte("+ Ready for additional command text.\r\n"))
	tr.client([]byte("f NOO\r\n")) // five literal bytes that look like a command...
	tr.client([]byte("\r\n"))      // ...and the end of APPEND's line
	tr.upstream([]byte("e OK APPEND completed.\r\n"))
	if tr.outstanding() {
		t.Error("literal bytes were counted as a command")
	}
	// A normal IDLE ends with DONE and its completion.
	tr.client([]byte("g IDLE\r\n"))
	tr.upstream([]byte("+ IDLE accepted, awaiting DONE command.\r\n"))
	tr.client([]byte("DONE\r\n"))
	tr.upstream([]byte("g OK IDLE completed.\r\n"))
	if tr.idling.Load() || tr.outstanding() {
		t.Errorf("after IDLE and DONE: idling %v, outstanding %v", tr.idling.Load(), tr.outstanding())
	}
}
