package config

import "testing"

// The Windows DACL rules, on every system: the secret-file warning must
// name a broad group that can read the file, and a file with no DACL at
// all, which Windows opens to everyone.
func TestExposedByACL(t *testing.T) {
	const (
		admins = "S-1-5-32-544"
		system = "S-1-5-18"
	)
	for _, c := range []struct {
		name     string
		nullDACL bool
		entries  []aclEntry
		want     string
	}{
		{"Administrators and SYSTEM only (what init's icacls leaves)", false, []aclEntry{{admins, true}, {system, true}}, ""},
		{"an empty DACL: nobody may read", false, nil, ""},
		{"Users may read (ProgramData's inherited default)", false, []aclEntry{{admins, true}, {"S-1-5-32-545", true}}, "Users"},
		{"Everyone may read", false, []aclEntry{{"S-1-1-0", true}}, "Everyone"},
		{"Authenticated Users may read", false, []aclEntry{{system, true}, {"S-1-5-11", true}}, "Authenticated Users"},
		{"Users may only traverse or write attributes", false, []aclEntry{{"S-1-5-32-545", false}}, ""},
		{"no DACL at all", true, nil, "Everyone (the file has no access list)"},
	} {
		if got := exposedByACL(c.nullDACL, c.entries); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
