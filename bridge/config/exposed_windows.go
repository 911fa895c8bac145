//go:build windows

package config

import (
	"unsafe"

	"golang.org/x/sys/windows"
)

// readableByOthers says which broad group (Everyone, Users, Authenticated
// Users) the file's ACL lets read it, "" if none.
func readableByOthers(p string) string {
	sd, err := windows.GetNamedSecurityInfo(p, windows.SE_FILE_OBJECT, windows.DACL_SECURITY_INFORMATION)
	if err != nil {
		return ""
	}
	dacl, _, err := sd.DACL()
	if err != nil || dacl == nil {
		return ""
	}
	groups := map[string]string{"S-1-1-0": "Everyone", "S-1-5-32-545": "Users", "S-1-5-11": "Authenticated Users"}
	const read = windows.FILE_READ_DATA | windows.GENERIC_READ | windows.GENERIC_ALL
	for i := uint32(0); i < uint32(dacl.AceCount); i++ {
		var ace *windows.ACCESS_ALLOWED_ACE
		if windows.GetAce(dacl, i, &ace) != nil || ace.Header.AceType != windows.ACCESS_ALLOWED_ACE_TYPE || uint32(ace.Mask)&read == 0 {
			continue
		}
		sid := (*windows.SID)(unsafe.Pointer(&ace.SidStart))
		if name, ok := groups[sid.String()]; ok {
			return name
		}
	}
	return ""
}

func restrictHint(p string) string {
	return "remove Users and Everyone from its Security tab, or run icacls \"" + p + "\" /inheritance:r /grant:r Administrators:F SYSTEM:F"
}
