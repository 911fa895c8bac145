// Package m365test starts the fake Microsoft 365 for a test: one helper,
// so that each package's tests do not keep a copy of their own. It lives
// apart from m365fake so that the demo binary does not link "testing".
package m365test

import (
	"testing"

	"mailbridge/upstream/m365fake"
)

// Tenant describes a tenant for NewTest: one app registration with a
// client secret and application roles, and its mailboxes.
type Tenant struct {
	ID, ClientID, Secret string
	Roles                []string
	// Mailboxes are the tenant's mailboxes; Aliases gives some of them
	// aliases.
	Mailboxes []string
	Aliases   map[string][]string
	// FullAccess lists the mailboxes the app may open over POP3 and IMAP.
	FullAccess []string
}

// Start starts a fake Microsoft 365 for a test, with its tenants and the
// fake Outlook POP3 service, and stops it when the test ends.
func Start(t testing.TB, tenants ...Tenant) *m365fake.Server {
	t.Helper()
	fake, err := m365fake.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fake.Close() })
	for _, tt := range tenants {
		fake.AddTenant(tt.ID)
		fake.AddApp(tt.ID, tt.ClientID, tt.Secret, tt.Roles...)
		for _, m := range tt.Mailboxes {
			fake.AddMailbox(tt.ID, m, tt.Aliases[m]...)
		}
		for _, m := range tt.FullAccess {
			fake.GrantMailboxAccess(tt.ID, tt.ClientID, m)
		}
	}
	if _, err := fake.StartPOP3(); err != nil {
		t.Fatal(err)
	}
	if _, err := fake.StartIMAP(); err != nil {
		t.Fatal(err)
	}
	return fake
}
