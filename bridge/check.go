package bridge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"mailbridge/upstream"
)

// CheckResult is the outcome of checking one account and protocol, as the
// old clients' "Test" button would show it.
type CheckResult struct {
	Account string
	Check   string // "token", "send-test"
	OK      bool
	Detail  string // what happened: a request ID, or the error
	Hint    string // what to fix, for failures
}

// Check fetches a token for every account and, if sendTestTo is not empty,
// sends one test message from each account's mailbox to it through Graph.
func (b *Bridge) Check(ctx context.Context, sendTestTo string) []CheckResult {
	var results []CheckResult
	for _, a := range b.ordered {
		name := a.Config.Name
		tok, err := a.Tokens.Token(ctx)
		if err != nil {
			results = append(results, CheckResult{Account: name, Check: "token", Detail: err.Error(), Hint: adminHint(err)})
			continue
		}
		if roles, ok := upstream.TokenRoles(tok); ok && !slices.Contains(roles, "Mail.Send") {
			results = append(results, CheckResult{Account: name, Check: "token",
				Detail: fmt.Sprintf("token issued, but without the Mail.Send role (roles: %v)", roles),
				Hint:   "add Mail.Send as an Application permission (Microsoft Graph) and click 'Grant admin consent'"})
			continue
		}
		results = append(results, CheckResult{Account: name, Check: "token", OK: true, Detail: "token issued for " + a.Config.SendScope})
		if sendTestTo == "" {
			continue
		}
		msg := testMessage(a.Config.Mailbox, sendTestTo)
		sctx, cancel := context.WithTimeout(ctx, b.cfg.SMTP.SendTimeout.Duration)
		d, err := deliver(sctx, a.Sender, b.retry, a.Config.Mailbox, "", bytes.NewReader(msg), int64(len(msg)))
		cancel()
		if err != nil {
			var apiErr *upstream.APIError
			detail := err.Error()
			if errors.As(err, &apiErr) && apiErr.RequestID != "" {
				detail += " (request-id " + apiErr.RequestID + ")"
			}
			results = append(results, CheckResult{Account: name, Check: "send-test", Detail: detail, Hint: adminHint(err)})
			continue
		}
		results = append(results, CheckResult{Account: name, Check: "send-test", OK: true,
			Detail: fmt.Sprintf("Graph accepted the test message to %s (HTTP %d, request-id %s)", sendTestTo, d.result.Status, d.result.RequestID)})
	}
	return results
}

func testMessage(from, to string) []byte {
	return fmt.Appendf(nil, "From: <%s>\r\nTo: <%s>\r\nSubject: mailbridge test message\r\nDate: %s\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThis message was sent by `mailbridge check -send-test` to test the account's\r\nMicrosoft Graph settings. No action is needed.\r\n",
		from, to, time.Now().Format(time.RFC1123Z))
}
