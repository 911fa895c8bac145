package bridge_test

import (
	"context"
	"strings"
	"testing"

	"mailbridge/bridge"
)

// rowsOf returns check's rows of account and kind.
func rowsOf(results []bridge.CheckResult, account, check string) []bridge.CheckResult {
	var out []bridge.CheckResult
	for _, r := range results {
		if r.Account == account && r.Check == check {
			out = append(out, r)
		}
	}
	return out
}

// An app with Mail.Send consented in Entra can send as anyone: check and
// the start-up log say so, and check prints the commands that scope it to
// exactly this configuration's mailboxes.
func TestTenantWideSendIsWarnedWithTheScopingCommands(t *testing.T) {
	fake := startFake(t) // tenant A's app: Mail.Send in its token
	cfg := testConfig(fake)
	cfg.Accounts[0].UseAddressFromUser = true // sends as orders@ and sales@ (allowed_senders)
	b, logs := startBridge(t, fake, cfg)
	lines := linesWith(logs.String(), "the app's permissions reach every mailbox in the tenant, not only this configuration's")
	if len(lines) != 2 || !strings.Contains(lines[0]+lines[1], `"tenant_wide":["Mail.Send"]`) || !strings.Contains(lines[0]+lines[1], "mailbridge check prints the commands") {
		t.Errorf("the start-up warnings (one per account): %v", lines)
	}
	rows := rowsOf(b.Check(context.Background(), ""), "tm-master", "permissions")
	var warn *bridge.CheckResult
	for i := range rows {
		if rows[i].Warn {
			warn = &rows[i]
		}
	}
	if warn == nil {
		t.Fatalf("no permissions warning: %+v", rows)
	}
	cmds := strings.Join(warn.Commands, "\n")
	for _, want := range []string{
		`New-ManagementScope -Name "mailbridge tm-master" -RecipientRestrictionFilter "PrimarySmtpAddress -eq 'orders@example.com' -or PrimarySmtpAddress -eq 'sales@example.com'"`,
		`New-ManagementRoleAssignment -App ` + clientA + ` -Role "Application Mail.Send" -CustomResourceScope "mailbridge tm-master"`,
		`-Role "Application Mail.ReadWrite"`, // large_messages is on: drafts, and the look-ups
		`Add-MailboxPermission -Identity orders@example.com -User <service principal ID> -AccessRights FullAccess`,
		`Test-ServicePrincipalAuthorization -Identity ` + clientA,
	} {
		if !strings.Contains(cmds, want) {
			t.Errorf("the commands lack %s:\n%s", want, cmds)
		}
	}
	if strings.Contains(cmds, "captain@example.com") || !strings.Contains(warn.Hint, "remove Mail.Send") {
		t.Errorf("the commands reach beyond the configuration, or the hint does not say to remove the consent: %s\n%s", warn.Hint, cmds)
	}
	for _, r := range b.Check(context.Background(), "") {
		if strings.Contains(r.Detail+r.Hint+strings.Join(r.Commands, ""), secretA) || strings.Contains(r.Detail, "eyJ") {
			t.Errorf("a check row shows a secret or a token: %+v", r)
		}
	}
}

// An app scoped by RBAC for Applications: no Mail.Send in its token, no
// warning, and it sends as its mailbox; check -send-test proves it, and a
// mailbox outside its scope is refused with a hint naming the scope.
func TestRBACScopedAppSendsWithoutWarning(t *testing.T) {
	fake := startFake(t)
	fake.AddApp(tenantA, clientA, secretA, "POP.AccessAsApp", "IMAP.AccessAsApp") // nothing tenant-wide in Graph
	fake.ScopeApp(tenantA, clientA, "Mail.Send", mailboxA)
	fake.ScopeApp(tenantA, clientA, "Mail.ReadWrite", mailboxA)
	cfg := testConfig(fake)
	cfg.Accounts = cfg.Accounts[:1]
	b, logs := startBridge(t, fake, cfg)
	if l := linesWith(logs.String(), "the app's permissions reach every mailbox in the tenant, not only this configuration's"); len(l) != 0 {
		t.Errorf("a scoped app is warned: %v", l)
	}
	if l := linesWith(logs.String(), "the Graph token lists no Mail.Send: sending relies on an RBAC for Applications assignment (mailbridge check -send-test ADDRESS proves it)"); len(l) != 1 {
		t.Errorf("the start-up line about RBAC: %v", l)
	}
	results := b.Check(context.Background(), "test@example.org")
	for _, r := range rowsOf(results, "tm-master", "permissions") {
		if r.Warn || !r.OK {
			t.Errorf("a scoped app's permissions row warns: %+v", r)
		}
	}
	if st := rowsOf(results, "tm-master", "send-test"); len(st) != 1 || !st[0].OK {
		t.Errorf("check -send-test: %+v", st)
	}
	if n := len(fake.Sent()); n != 1 {
		t.Errorf("check -send-test delivered %d messages, want 1", n)
	}
	c := dialAuth(t, b.SMTPAddr(), userA, passwordA)
	if _, err := send(c, mailboxA, []string{"x@example.org"}, crlf("From: orders@example.com\nTo: x@example.org\n\nx\n")); err != nil {
		t.Fatalf("a scoped app's send: %v", err)
	}
	// captain@ is outside the scope.
	cfg2 := testConfig(fake)
	cfg2.Accounts = cfg2.Accounts[:1]
	cfg2.Accounts[0].Mailbox, cfg2.Accounts[0].AllowedSenders = "captain@example.com", []string{"captain@example.com"}
	b2, logs2 := startBridge(t, fake, cfg2)
	c2 := dialAuth(t, b2.SMTPAddr(), userA, passwordA)
	_, err := send(c2, "captain@example.com", []string{"x@example.org"}, crlf("From: captain@example.com\nTo: x@example.org\n\nx\n"))
	if code, _ := smtpCode(err); code != 451 {
		t.Errorf("outside the scope: %v, want 451", err)
	}
	if l := linesWith(logs2.String(), "message not sent"); len(l) != 1 || !strings.Contains(l[0], "ErrorAccessDenied") || !strings.Contains(l[0], "add the mailbox to its management scope") {
		t.Errorf("the refusal outside the scope: %v", l)
	}
}
