//go:build !windows

package config

import (
	"os"
	"os/user"
	"strconv"
	"syscall"
)

// ServiceGroup is the Debian package's service group: a secret it may read
// (0640 root:mailbridge, as `mailbridge init` writes it) is not exposed.
const ServiceGroup = "mailbridge"

// readableByOthers says who besides the owner can read the file at p
// ("group", "everyone"), "" if nobody (or it cannot be read).
func readableByOthers(p string) string {
	st, err := os.Stat(p)
	if err != nil {
		return ""
	}
	switch m := st.Mode().Perm(); {
	case m&0o004 != 0:
		return "everyone"
	case m&0o040 != 0 && !serviceGroup(st):
		return "its group"
	}
	return ""
}

// serviceGroup reports whether the file's group is the service's own.
func serviceGroup(st os.FileInfo) bool {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	g, err := user.LookupGroupId(strconv.FormatUint(uint64(sys.Gid), 10))
	return err == nil && g.Name == ServiceGroup
}

func restrictHint(p string) string {
	return "run chmod 600 " + p + " (or 640 with the service's group, " + ServiceGroup + ")"
}
