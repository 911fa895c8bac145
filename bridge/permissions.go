package bridge

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"mailbridge/bridge/account"
	"mailbridge/bridge/config"
	"mailbridge/bridge/mime"
	"mailbridge/upstream"
)

// Least privilege. Mail.Send consented as an application permission in
// Entra lets the app send as every mailbox in the tenant; RBAC for
// Applications in Exchange Online scopes the same right to chosen
// mailboxes, and such grants never show in the token's roles. The bridge
// reads the Graph token's roles (never logging the token), warns about
// what reaches the whole tenant, and prints the commands that scope the
// app to exactly this configuration's mailboxes.

// tenantWide are the Graph application permissions that, consented in
// Entra, reach every mailbox in the tenant; with what each unlocks here.
var tenantWide = []struct{ role, does string }{
	{"Mail.Send", "send as every mailbox in the tenant"},
	{"Mail.ReadWrite", "read, change and delete every mailbox's mail"},
	{"Mail.Read", "read every mailbox's mail"},
	{"Mail.ReadBasic.All", "read every mailbox's message headers"},
}

// sendingAs returns the addresses account a sends as: its mailbox, and with
// use_address_from_user the exact addresses of allowed_senders (a
// *@domain pattern names no mailbox).
func sendingAs(c *config.AccountConfig) []string {
	out := []string{strings.ToLower(c.Mailbox)}
	if c.UseAddressFromUser {
		for _, s := range c.AllowedSenders {
			if s = strings.ToLower(s); mime.IsAddress(s) && !slices.Contains(out, s) {
				out = append(out, s)
			}
		}
	}
	return out
}

// leastGraphRoles are the RBAC roles a's configuration needs: sending, and
// the look-up in Sent Items (the drafts of messages over 3 MB need
// ReadWrite, which covers it).
func leastGraphRoles(c *config.AccountConfig) []string {
	if c.LargeMessages {
		return []string{"Mail.Send", "Mail.ReadWrite"}
	}
	return []string{"Mail.Send", "Mail.ReadBasic"}
}

// ScopingCommands is the Exchange Online PowerShell that gives the app of
// account c (of the configuration cfg) the least Graph roles on exactly
// the mailboxes it sends as, and FullAccess on the mailboxes it reads over
// POP3 or IMAP.
func ScopingCommands(cfg *config.Config, c *config.AccountConfig) []string {
	scope := "mailbridge " + c.Name
	var filter []string
	for _, m := range sendingAs(c) {
		filter = append(filter, "PrimarySmtpAddress -eq '"+m+"'")
	}
	cmds := []string{
		"Connect-ExchangeOnline",
		fmt.Sprintf("New-ServicePrincipal -AppId %s -ObjectId <object ID under Entra > Enterprise applications> -DisplayName mailbridge   # once per app", c.ClientID),
		fmt.Sprintf("New-ManagementScope -Name %q -RecipientRestrictionFilter \"%s\"", scope, strings.Join(filter, " -or ")),
	}
	for _, r := range leastGraphRoles(c) {
		cmds = append(cmds, fmt.Sprintf("New-ManagementRoleAssignment -App %s -Role \"Application %s\" -CustomResourceScope %q", c.ClientID, r, scope))
	}
	cmds = append(cmds, fmt.Sprintf("Test-ServicePrincipalAuthorization -Identity %s -Resource %s", c.ClientID, c.Mailbox))
	var read []string
	if c.Uses("pop3") && cfg.POP3.Listen != "" {
		read = append(read, c.POP3Mailbox)
	}
	if c.Uses("imap") && cfg.IMAP.Listen != "" && !slices.Contains(read, c.IMAPMailbox) {
		read = append(read, c.IMAPMailbox)
	}
	for _, m := range read { // POP3 and IMAP are not covered by RBAC for Applications
		cmds = append(cmds, fmt.Sprintf("Add-MailboxPermission -Identity %s -User <service principal ID> -AccessRights FullAccess", m))
	}
	return cmds
}

// removeConsentHint tells how to take away what reaches the whole tenant.
func removeConsentHint(roles []string, mailboxes []string) string {
	return fmt.Sprintf("scope the app to %s with RBAC for Applications (the commands below, in Exchange Online PowerShell), then in Entra > App registrations > the app > API permissions remove %s (Microsoft Graph, Application): a tenant-wide consent undoes the scoping",
		strings.Join(mailboxes, ", "), strings.Join(roles, ", "))
}

// graphRoles returns the roles of a's Graph token, and whether it could be
// read.
func graphRoles(ctx context.Context, a *account.Account) ([]string, bool) {
	tok, err := a.GraphTokens.Token(ctx)
	if err != nil {
		return nil, false
	}
	return upstream.TokenRoles(tok)
}

// wideRoles returns the tenant-wide permissions among roles.
func wideRoles(roles []string) []string {
	var out []string
	for _, w := range tenantWide {
		if slices.Contains(roles, w.role) {
			out = append(out, w.role)
		}
	}
	return out
}

// checkPermissions is check's permissions section for account a: what the
// token carries, what reaches every mailbox (with the commands that scope
// it), and what sending relies on when the token does not say.
func (b *Bridge) checkPermissions(roles []string, a *account.Account, sendTest string) []CheckResult {
	name := a.Config.Name
	carried := "none"
	if len(roles) > 0 {
		carried = strings.Join(roles, ", ")
	}
	rows := []CheckResult{{Account: name, Check: "permissions", OK: true,
		Detail: fmt.Sprintf("Graph token roles: %s. This configuration needs, at least: %s on %s (RBAC for Applications)%s",
			carried, strings.Join(leastGraphRoles(&a.Config), " and "), strings.Join(sendingAs(&a.Config), ", "), b.readNeeds(a))}}
	if wide := wideRoles(roles); len(wide) > 0 {
		var does []string
		for _, w := range tenantWide {
			if slices.Contains(wide, w.role) {
				does = append(does, w.does+" ("+w.role+")")
			}
		}
		rows = append(rows, CheckResult{Account: name, Check: "permissions", OK: true, Warn: true,
			Detail:   "consented tenant-wide in Entra: the app can " + strings.Join(does, ", ") + ", not only this configuration's",
			Hint:     removeConsentHint(wide, sendingAs(&a.Config)),
			Commands: ScopingCommands(b.cfg, &a.Config)})
	}
	if !slices.Contains(roles, "Mail.Send") {
		detail := "the token lists no Mail.Send: sending relies on an RBAC for Applications assignment"
		if sendTest == "" {
			detail += "; prove it with mailbridge check -send-test ADDRESS"
		} else {
			detail += "; the send-test below proves it"
		}
		rows = append(rows, CheckResult{Account: name, Check: "permissions", OK: true, Detail: detail})
	}
	return rows
}

// readNeeds describes what POP3 and IMAP need beyond Graph.
func (b *Bridge) readNeeds(a *account.Account) string {
	var s []string
	if a.Config.Uses("pop3") && b.cfg.POP3.Listen != "" {
		s = append(s, "POP.AccessAsApp")
	}
	if a.Config.Uses("imap") && b.cfg.IMAP.Listen != "" {
		s = append(s, "IMAP.AccessAsApp")
	}
	if len(s) == 0 {
		return ""
	}
	return "; and " + strings.Join(s, " and ") + " (Office 365 Exchange Online) with FullAccess on the mailbox read"
}
