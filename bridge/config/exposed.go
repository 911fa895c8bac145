package config

// ExposedSecrets names the files holding a secret (the configuration with
// a client_secret in it, a client_secret_file, a client certificate with
// its key, the proxy password) that other users of this machine can read,
// each with what to do about it.
func (c *Config) ExposedSecrets() []string {
	var files []string
	for _, a := range c.Accounts {
		if a.ClientSecret != "" && c.Path != "" {
			files = append(files, c.Path)
		}
		if a.ClientSecretFile != "" {
			files = append(files, absPath(c.dir, a.ClientSecretFile))
		}
		if a.ClientCertificateFile != "" {
			files = append(files, absPath(c.dir, a.ClientCertificateFile))
		}
	}
	if c.Network.ProxyPasswordFile != "" {
		files = append(files, absPath(c.dir, c.Network.ProxyPasswordFile))
	}
	var out []string
	seen := map[string]bool{}
	for _, f := range files {
		if seen[f] {
			continue
		}
		seen[f] = true
		if who := readableByOthers(f); who != "" {
			out = append(out, f+" holds a secret and is readable by "+who+": "+restrictHint(f))
		}
	}
	return out
}

// aclEntry is one access-allowed entry of a Windows file's DACL: the SID
// it grants, and whether the grant includes reading.
type aclEntry struct {
	sid  string
	read bool
}

// exposedByACL says which broad group (Everyone, Users, Authenticated
// Users) a Windows file's DACL lets read it, "" if none. A file without a
// DACL (a NULL DACL, as some tools and FAT volumes leave) grants everyone
// everything.
func exposedByACL(nullDACL bool, entries []aclEntry) string {
	if nullDACL {
		return "Everyone (the file has no access list)"
	}
	groups := map[string]string{"S-1-1-0": "Everyone", "S-1-5-32-545": "Users", "S-1-5-11": "Authenticated Users"}
	for _, e := range entries {
		if name, ok := groups[e.sid]; ok && e.read {
			return name
		}
	}
	return ""
}
