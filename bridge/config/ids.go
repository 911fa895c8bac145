package config

import (
	"regexp"
	"strings"
)

// Mistakes caught before Microsoft sees them: the example's placeholders
// left in place, IDs that cannot be an app registration's, and the commonest
// mistake of all, a client secret's ID pasted where its Value goes.

// Placeholders of config.example.toml: a configuration that still has one
// was not filled in.
const (
	PlaceholderGUID   = "00000000-0000-0000-0000-000000000000"
	PlaceholderSecret = "paste-the-secret-Value-here"
	// ExampleMarker is the first line of config.example.toml. A file that
	// still starts with it and still has a placeholder is the example as
	// installed, which `mailbridge init` may replace without -force.
	ExampleMarker = "# mailbridge example configuration: `mailbridge init` replaces this file while its IDs are still the placeholders."
)

var (
	guidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
	// A verified domain of the tenant: contoso.onmicrosoft.com, contoso.com.
	domainRE = regexp.MustCompile(`^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]{2,63}$`)
)

// CheckTenantID says what is wrong with a tenant ID, "" if nothing: it is
// the Directory (tenant) ID, a GUID, or one of the tenant's verified
// domain names.
func CheckTenantID(s string) string {
	switch {
	case s == PlaceholderGUID:
		return "still the example's placeholder: paste the Directory (tenant) ID from the app registration's Overview page"
	case guidRE.MatchString(s), domainRE.MatchString(s):
		return ""
	}
	return "not a tenant ID: the Directory (tenant) ID is a GUID such as 72f988bf-86f1-41af-91ab-2d7cd011db47 (a verified domain such as contoso.onmicrosoft.com works too)"
}

// CheckClientID says what is wrong with a client ID, "" if nothing.
func CheckClientID(s string) string {
	switch {
	case s == PlaceholderGUID:
		return "still the example's placeholder: paste the Application (client) ID from the app registration's Overview page"
	case !guidRE.MatchString(s):
		return "not an Application (client) ID: it is a GUID such as 1b2c3d4e-0000-4abc-8def-123456789abc, from the app registration's Overview page"
	}
	return ""
}

// CheckSecret says what is wrong with a client secret, "" if nothing.
func CheckSecret(s string) string {
	switch {
	case strings.TrimSpace(s) == PlaceholderSecret:
		return "still the example's placeholder: paste the client secret's Value (Certificates & secrets)"
	case guidRE.MatchString(strings.TrimSpace(s)):
		return "this is a Secret ID (a GUID), not the secret's Value: in Certificates & secrets copy the Value column (shown only when the secret is made; make a new secret if it is hidden)"
	}
	return ""
}

// IsUntouchedExample reports whether data is config.example.toml as it
// was installed: its marker line first and its placeholders still in.
func IsUntouchedExample(data []byte) bool {
	s := string(data)
	return strings.HasPrefix(s, ExampleMarker) && strings.Contains(s, PlaceholderGUID)
}
