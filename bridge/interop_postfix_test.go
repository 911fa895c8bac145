package bridge_test

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// postfix is a private Postfix instance (its own config_directory, queue
// and log, no listener of its own) that relays everything to the bridge
// with SASL, as a Linux server's Postfix does with relayhost.
type postfix struct {
	dir      string
	sendmail string
	log      string
}

func startPostfix(t *testing.T, bridgeAddr, user, password string) *postfix {
	t.Helper()
	host, port := hostPort(bridgeAddr)
	relay := "[" + host + "]:" + port
	bin := need(t, "postfix")
	sendmail := need(t, "sendmail")
	if matches, _ := filepath.Glob("/usr/lib/*/sasl2/libplain.so*"); len(matches) == 0 {
		missing(t, "libsasl2-modules (SASL PLAIN for Postfix) is not installed")
	}
	if os.Geteuid() != 0 {
		missing(t, "a private Postfix instance needs root")
	}
	dir, err := os.MkdirTemp("", "mailbridge-postfix-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	p := &postfix{dir: dir, sendmail: sendmail, log: filepath.Join(dir, "maillog")}
	// master.cf: Debian's, with nothing chrooted and no listener.
	master, err := os.ReadFile("/etc/postfix/master.cf")
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(master), "\n") {
		f := strings.Fields(l)
		if len(f) >= 8 && !strings.HasPrefix(l, "#") && !strings.HasPrefix(l, " ") {
			if f[1] == "inet" {
				continue
			}
			f[4] = "n"
			l = strings.Join(f, " ")
		}
		lines = append(lines, l)
	}
	os.WriteFile(filepath.Join(dir, "master.cf"), []byte(strings.Join(lines, "\n")), 0o644)
	os.WriteFile(filepath.Join(dir, "main.cf"), []byte(fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %[1]s/queue
data_directory = %[1]s/data
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.interop.test
mydomain = interop.test
myorigin = example.com
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
relayhost = %[2]s
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:%[1]s/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sasl_mechanism_filter = plain, login
smtp_tls_security_level = none
maillog_file_prefixes = /var, /dev/stdout, /tmp
maillog_file = %[5]s
message_size_limit = 40000000
default_destination_concurrency_limit = 4
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_connect_timeout = 10s
alias_maps =
alias_database =
`, dir, relay, user, password, p.log)), 0o644)
	os.WriteFile(filepath.Join(dir, "sasl_passwd"), []byte(fmt.Sprintf("%s %s:%s\n", relay, user, password)), 0o600)
	os.MkdirAll(filepath.Join(dir, "queue"), 0o755)
	os.MkdirAll(filepath.Join(dir, "data"), 0o700)
	run(t, nil, "chown", "postfix", filepath.Join(dir, "data"))
	run(t, nil, bin, "-c", dir, "check")
	run(t, nil, bin, "-c", dir, "start")
	t.Cleanup(func() {
		runErr(nil, bin, "-c", dir, "stop")
		if t.Failed() {
			data, _ := os.ReadFile(p.log)
			t.Logf("postfix log:\n%s", data)
		}
		os.RemoveAll(dir)
	})
	return p
}

// send hands msg to Postfix with its sendmail, for rcpts from from.
func (p *postfix) send(t *testing.T, from string, msg []byte, rcpts ...string) {
	t.Helper()
	run(t, msg, p.sendmail, append([]string{"-C", p.dir, "-f", from, "-oi", "--"}, rcpts...)...)
}

// waitSent waits until Postfix's log says the message to rcpt was
// delivered, and returns that line.
func (p *postfix) waitSent(t *testing.T, rcpt string) string {
	t.Helper()
	re := regexp.MustCompile(`to=<` + regexp.QuoteMeta(rcpt) + `>.*status=(\w+) \((.*)\)`)
	deadline := time.Now().Add(60 * time.Second)
	for {
		data, _ := os.ReadFile(p.log)
		for _, m := range re.FindAllStringSubmatch(string(data), -1) {
			if m[1] == "sent" {
				return m[0]
			}
			if m[1] == "bounced" {
				t.Fatalf("Postfix bounced the message to %s: %s", rcpt, m[2])
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("Postfix did not deliver the message to %s:\n%s", rcpt, data)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestInteropPostfixRelay(t *testing.T) {
	fake := startFake(t)
	b, _, _ := interopBridge(t, fake, nil)
	pf := startPostfix(t, b.SMTPAddr(), userA, passwordA)

	t.Run("2KB", func(t *testing.T) {
		id := "postfix-2k@mailbridge.test"
		msg := interopMessage(id, "Content-Type: text/plain; charset=us-ascii\n", strings.Repeat("A line of an ordinary 2 KB message.\n", 56))
		pf.send(t, mailboxA, msg, "supplier@example.org")
		line := pf.waitSent(t, "supplier@example.org")
		if !strings.Contains(line, "250 2.0.0 OK: accepted by Microsoft 365, request-id") {
			t.Errorf("Postfix's log: %s", line)
		}
		checkByteExact(t, sentOnce(t, fake, id), msg, true)
	})
	t.Run("8bit", func(t *testing.T) {
		id := "postfix-8bit@mailbridge.test"
		msg := interopMessage(id, "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n", "Grüße aus Hamburg, Œuvre, 東京.\n")
		pf.send(t, mailboxA, msg, "eightbit@example.org")
		pf.waitSent(t, "eightbit@example.org")
		checkByteExact(t, sentOnce(t, fake, id), msg, true)
	})
	t.Run("three-recipients-one-bcc", func(t *testing.T) {
		id := "postfix-bcc@mailbridge.test"
		msg := crlf("From: Orders <orders@example.com>\nTo: a@example.org\nCc: b@example.org\nSubject: three\nDate: Tue, 01 Dec 2026 10:00:00 +0000\nMessage-ID: <" + id + ">\n\nto three, one of them Bcc\n")
		pf.send(t, mailboxA, msg, "a@example.org", "b@example.org", "secret-c@example.org")
		for _, r := range []string{"a@example.org", "b@example.org", "secret-c@example.org"} {
			pf.waitSent(t, r)
		}
		sent := sentOnce(t, fake, id)
		checkByteExact(t, sent, msg, true)
		if got := strings.Join(sent.Recipients, ","); got != "a@example.org,b@example.org,secret-c@example.org" {
			t.Errorf("Graph's recipients %s", got)
		}
	})
	t.Run("11MB-attachment", func(t *testing.T) {
		big := []byte(strings.Replace(string(message12MB()), "Message-ID: <large-12@mailbridge.test>", "Message-ID: <postfix-large@mailbridge.test>", 1))
		pf.send(t, mailboxA, big, "large@example.org")
		line := pf.waitSent(t, "large@example.org")
		if !strings.Contains(line, "250 2.0.0 OK: accepted by Microsoft 365") {
			t.Errorf("Postfix's log: %s", line)
		}
		sent := sentOnce(t, fake, "postfix-large@mailbridge.test")
		rebuilt, err := sent.Rebuild()
		if err != nil {
			t.Fatal(err)
		}
		if got, want := leaves(t, rebuilt), leaves(t, big); !equalLeaves(got, want) {
			t.Errorf("the attachments changed:\ngot  %+v\nwant %+v", got, want)
		}
	})
}
