//go:build windows

package config

import (
	"errors"
	"unsafe"

	"golang.org/x/sys/windows"
)

// readableByOthers says which broad group (Everyone, Users, Authenticated
// Users) the file's ACL lets read it, "" if none (or it cannot be read).
func readableByOthers(p string) string {
	sd, err := windows.GetNamedSecurityInfo(p, windows.SE_FILE_OBJECT, windows.DACL_SECURITY_INFORMATION)
	if err != nil {
		return ""
	}
	dacl, _, err := sd.DACL()
	switch {
	case errors.Is(err, windows.ERROR_OBJECT_NOT_FOUND) || err == nil && dacl == nil: // no DACL, or a NULL one
		return exposedByACL(true, nil)
	case err != nil:
		return ""
	}
	const read = windows.FILE_READ_DATA | windows.GENERIC_READ | windows.GENERIC_ALL
	var entries []aclEntry
	for i := uint32(0); i < uint32(dacl.AceCount); i++ {
		var ace *windows.ACCESS_ALLOWED_ACE
		if windows.GetAce(dacl, i, &ace) != nil || ace.Header.AceType != windows.ACCESS_ALLOWED_ACE_TYPE {
			continue
		}
		sid := (*windows.SID)(unsafe.Pointer(&ace.SidStart))
		entries = append(entries, aclEntry{sid: sid.String(), read: uint32(ace.Mask)&read != 0})
	}
	return exposedByACL(false, entries)
}

func restrictHint(p string) string {
	return "remove Users and Everyone from its Security tab, or run icacls \"" + p + "\" /inheritance:r /grant:r Administrators:F SYSTEM:F"
}
