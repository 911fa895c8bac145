package mime

import (
	"strings"
	"testing"
)

func TestParseMailbox(t *testing.T) {
	for addr, ok := range map[string]bool{
		"orders@example.com": true, "O.Rders+tag@Sub.Example.COM": true, "x@[192.0.2.1]": true,
		"ceo@evil.example@alpha-dept.a.example": false, `"ceo@evil"@alpha-dept.a.example`: false,
		"nul\x00@example.com": false, "x@exa\x00mple.com": false, "müller@example.com": false,
		"x@-bad.example": false, "x@bad..example": false, ".x@example.com": false, "x.@example.com": false,
		"x@": false, "@example.com": false, "x": false, "": false, "x y@example.com": false,
		"x@" + strings.Repeat("a", 64) + ".com": false, "x@[::1]": false,
		"0@İ": false, "x@\u212aelvin.example": false, "x@Exa\u0130mple.com": false,
	} {
		_, _, err := ParseMailbox(addr)
		if (err == nil) != ok {
			t.Errorf("ParseMailbox(%q): %v, want ok=%v", addr, err, ok)
		}
	}
	p, _ := ParseSenderPolicy([]string{"*@alpha-dept.a.example"})
	if p.Allows("ceo@evil.example@alpha-dept.a.example") || !p.Allows("Ops@Alpha-Dept.A.Example") {
		t.Error("the domain pattern does not compare the parsed domain")
	}
	// Unicode case mappings must not turn a foreign address into an allowed one.
	p, _ = ParseSenderPolicy([]string{"*@big.example", "kim@alpha.example"})
	for _, addr := range []string{"x@b\u0130g.example", "\u212aim@alpha.example", "x@BIG.example"} {
		if p.Allows(addr) != (addr == "x@BIG.example") {
			t.Errorf("Allows(%q) = %v", addr, p.Allows(addr))
		}
	}
}

func FuzzParseMailbox(f *testing.F) {
	for _, s := range []string{"a@b.c", "a@b@c", `"a"@b`, "a@[1.2.3.4]", "\x00@x", "a.b@c-d.e"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, addr string) {
		local, domain, err := ParseMailbox(addr)
		if err != nil {
			return
		}
		if local+"@"+domain != addr[:len(local)]+"@"+strings.ToLower(addr[len(local)+1:]) || strings.Count(addr, "@") != 1 {
			t.Fatalf("%q parsed as %q @ %q", addr, local, domain)
		}
		for i := 0; i < len(addr); i++ {
			if addr[i] <= ' ' || addr[i] > '~' {
				t.Fatalf("%q accepted with byte %#x", addr, addr[i])
			}
		}
	})
}
