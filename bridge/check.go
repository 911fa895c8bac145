package bridge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"mailbridge/bridge/account"
	"mailbridge/bridge/deliver"
	"mailbridge/bridge/failure"
	"mailbridge/upstream"
)

// CheckResult is the outcome of checking one account and protocol, as the
// old clients' "Test" button would show it.
type CheckResult struct {
	Account string
	Check   string // "token", "send-test"
	OK      bool
	Warn    bool   // OK, but something needs doing soon
	Detail  string // what happened: a request ID, or the error
	Hint    string // what to fix, for failures
	Path    string // "direct", or "via proxy URL"
	// Commands, if any, carry out the fix: PowerShell lines to run.
	Commands []string
}

// Check tests every account as the old clients' "Test" buttons would: for
// SMTP a Graph token with the Mail.Send role and, if sendTestTo is not
// empty, one test message through Graph; for POP3 a token with the
// POP.AccessAsApp role, a login to Outlook and STAT.
func (b *Bridge) Check(ctx context.Context, sendTestTo string) []CheckResult {
	results := b.check(ctx, sendTestTo)
	for i := range results {
		results[i].Path = "direct"
		if a := b.accounts.ByName(results[i].Account); a != nil && a.Proxy != nil {
			results[i].Path = "via proxy " + a.Proxy.String()
		}
	}
	return results
}

func (b *Bridge) check(ctx context.Context, sendTestTo string) []CheckResult {
	var results []CheckResult
	for _, w := range b.cfg.ExposedSecrets() {
		results = append(results, CheckResult{Check: "secret-file", OK: true, Warn: true, Detail: w})
	}
	for _, a := range b.Accounts() {
		if w := a.Config.SecretExpiryWarning(time.Now()); w != "" {
			results = append(results, CheckResult{Account: a.Config.Name, Check: "secret", OK: true, Warn: true,
				Detail: "expires " + a.Config.ClientSecretExpires.Format(time.DateOnly), Hint: w})
		}
		if a.Config.Uses("smtp") {
			results = append(results, b.checkSMTP(ctx, a, sendTestTo)...)
		}
		if a.Config.Uses("pop3") && b.cfg.POP3.Listen != "" {
			results = append(results, b.checkPOP3(ctx, a))
		}
		if a.Config.Uses("imap") && b.cfg.IMAP.Listen != "" {
			results = append(results, b.checkIMAP(ctx, a))
		}
	}
	return results
}

// checkToken fetches a token and checks that it carries role.
func (b *Bridge) checkToken(ctx context.Context, a *account.Account, ts *upstream.TokenSource, check, role, api string) (string, *CheckResult) {
	tok, err := ts.Token(ctx)
	if err != nil {
		return "", &CheckResult{Account: a.Config.Name, Check: check, Detail: err.Error(), Hint: b.hintFor(a, err, failure.Classify(err).Hint)}
	}
	if roles, ok := upstream.TokenRoles(tok); ok && role != "" && !slices.Contains(roles, role) {
		return "", &CheckResult{Account: a.Config.Name, Check: check,
			Detail: fmt.Sprintf("token issued, but without the %s role (roles: %v)", role, roles),
			Hint:   failure.RoleHint(role, api)}
	}
	return tok, nil
}

func (b *Bridge) checkSMTP(ctx context.Context, a *account.Account, sendTestTo string) []CheckResult {
	name := a.Config.Name
	if _, fail := b.checkToken(ctx, a, a.GraphTokens, "smtp-token", "", "Microsoft Graph"); fail != nil {
		return []CheckResult{*fail}
	}
	results := []CheckResult{{Account: name, Check: "smtp-token", OK: true, Detail: "token issued for " + a.Config.SendScope}}
	roles, _ := graphRoles(ctx, a)
	results = append(results, b.checkPermissions(roles, a, sendTestTo)...)
	results = append(results, b.checkSentItems(ctx, a))
	if a.Config.LargeMessages {
		results = append(results, b.checkDrafts(ctx, a))
	}
	if sendTestTo == "" {
		return results
	}
	msg := testMessage(a.Config.Mailbox, sendTestTo)
	d, err := b.deliverer.SendTest(ctx, a, a.Config.Mailbox, msg)
	if err != nil {
		var apiErr *upstream.APIError
		detail := err.Error()
		if errors.As(err, &apiErr) && apiErr.RequestID != "" {
			detail += " (request-id " + apiErr.RequestID + ")"
		}
		return append(results, CheckResult{Account: name, Check: "send-test", Detail: detail, Hint: failure.Classify(err).Hint})
	}
	return append(results, CheckResult{Account: name, Check: "send-test", OK: true,
		Detail: fmt.Sprintf("Graph accepted the test message to %s (HTTP %d, request-id %s)", sendTestTo, d.Result.Status, d.Result.RequestID)})
}

// hintFor is the hint for err: what to open when Microsoft could not be
// reached at all, else hint.
func (b *Bridge) hintFor(a *account.Account, err error, hint string) string {
	if unreachable(err) {
		return b.reachHint(a)
	}
	return hint
}

// checkSentItems looks in the mailbox's Sent Items as a send whose answer
// was lost would: without a permission that lists messages, delivery is
// at least once, not exactly once.
func (b *Bridge) checkSentItems(ctx context.Context, a *account.Account) CheckResult {
	res := CheckResult{Account: a.Config.Name, Check: "sent-items"}
	_, _, err := a.Graph.FindSent(ctx, a.Config.Mailbox, probeMessageID, time.Time{})
	switch {
	case err == nil:
		res.OK, res.Detail = true, "Sent Items can be read: a message whose Graph answer is lost is looked up there, not sent twice (exactly once)"
	case failure.IsAccessDenied(err):
		res.OK, res.Warn = true, true
		res.Detail = "the app may not read Sent Items: a message whose Graph answer is lost is sent again and may arrive twice"
		res.Hint = deliver.ReadPermissionHint
	default:
		res.Detail, res.Hint = err.Error(), b.hintFor(a, err, failure.Classify(err).Hint)
	}
	return res
}

// checkDrafts creates and deletes a draft: what sending a message over
// sendMail's limit needs (Mail.ReadWrite).
func (b *Bridge) checkDrafts(ctx context.Context, a *account.Account) CheckResult {
	gc := a.Graph
	res := CheckResult{Account: a.Config.Name, Check: "large-msgs"}
	msg := testMessage(a.Config.Mailbox, a.Config.Mailbox)
	sctx, cancel := context.WithTimeout(ctx, b.cfg.SMTP.SendTimeout.Duration)
	defer cancel()
	id, err := gc.CreateDraft(sctx, a.Config.Mailbox, bytes.NewReader(msg), int64(len(msg)))
	if err != nil {
		res.Detail = err.Error()
		res.Hint = failure.ReadWriteHint
		if !failure.IsAccessDenied(err) {
			res.Hint = failure.Classify(err).Hint
		}
		return res
	}
	if err := gc.DeleteMessage(sctx, a.Config.Mailbox, id); err != nil {
		res.Detail = "a test draft was created but could not be deleted: " + err.Error()
		return res
	}
	res.OK, res.Detail = true, "created and deleted a draft: messages over sendMail's limit can be sent"
	return res
}

func (b *Bridge) checkPOP3(ctx context.Context, a *account.Account) CheckResult {
	name := a.Config.Name
	tok, fail := b.checkToken(ctx, a, a.OutlookTokens, "pop3", "POP.AccessAsApp", "Office 365 Exchange Online")
	if fail != nil {
		return *fail
	}
	pctx, cancel := context.WithTimeout(ctx, b.cfg.POP3.UpstreamTimeout.Duration)
	defer cancel()
	up, err := a.POP3Dialer.Dial(pctx, a.Config.POP3Mailbox, tok)
	if err != nil {
		return CheckResult{Account: name, Check: "pop3", Detail: err.Error(), Hint: b.hintFor(a, err, failure.MailboxLoginHint("pop3", err, tok))}
	}
	count, size, err := up.Stat()
	up.Quit()
	if err != nil {
		return CheckResult{Account: name, Check: "pop3", Detail: err.Error()}
	}
	return CheckResult{Account: name, Check: "pop3", OK: true,
		Detail: fmt.Sprintf("logged in to %s at %s: %d messages, %d bytes", a.Config.POP3Mailbox, a.Config.POP3Upstream, count, size)}
}

func testMessage(from, to string) []byte {
	return fmt.Appendf(nil, "From: <%s>\r\nTo: <%s>\r\nSubject: mailbridge test message\r\nDate: %s\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThis message was sent by `mailbridge check -send-test` to test the account's\r\nMicrosoft Graph settings. No action is needed.\r\n",
		from, to, time.Now().Format(time.RFC1123Z))
}

// checkIMAP logs in to Outlook's IMAP service and examines INBOX.
func (b *Bridge) checkIMAP(ctx context.Context, a *account.Account) CheckResult {
	name := a.Config.Name
	tok, fail := b.checkToken(ctx, a, a.OutlookTokens, "imap", "IMAP.AccessAsApp", "Office 365 Exchange Online")
	if fail != nil {
		return *fail
	}
	ictx, cancel := context.WithTimeout(ctx, b.cfg.IMAP.UpstreamTimeout.Duration)
	defer cancel()
	up, err := a.IMAPDialer.Dial(ictx, a.Config.IMAPMailbox, tok)
	if err != nil {
		return CheckResult{Account: name, Check: "imap", Detail: err.Error(), Hint: b.hintFor(a, err, failure.MailboxLoginHint("imap", err, tok))}
	}
	defer up.Conn.Close()
	count, err := up.Examine("INBOX")
	if err != nil {
		return CheckResult{Account: name, Check: "imap", Detail: err.Error()}
	}
	return CheckResult{Account: name, Check: "imap", OK: true,
		Detail: fmt.Sprintf("logged in to %s at %s: INBOX holds %d messages", a.Config.IMAPMailbox, a.Config.IMAPUpstream, count)}
}
