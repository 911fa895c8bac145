//go:build !windows

package config

import "os"

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
	case m&0o040 != 0:
		return "its group"
	}
	return ""
}

func restrictHint(p string) string {
	return "run chmod 600 " + p + " (or 640 with the service's group)"
}
