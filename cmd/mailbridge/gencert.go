package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"mailbridge/bridge/localtls"
	"os"
	"path/filepath"
	"strings"
)

// genCert writes a self-signed certificate and key for the bridge's own
// TLS listeners and says how to trust it on Windows.
func genCert(args []string, stdout, stderr io.Writer) int {
	flags := flag.NewFlagSet("gen-cert", flag.ContinueOnError)
	flags.SetOutput(stderr)
	host := flags.String("host", "", "the name (or IP address) clients connect to, such as the machine's name")
	out := flags.String("out", ".", "directory for mailbridge.crt and mailbridge.key")
	if _, err := parseAnywhere(flags, args); err != nil {
		return usageStatus(err)
	}
	if *host == "" {
		fmt.Fprintln(stderr, "mailbridge: gen-cert needs -host NAME: the name the mail clients use for this machine")
		return 2
	}
	hosts := []string{*host}
	for _, h := range []string{"localhost", "127.0.0.1"} {
		if !strings.EqualFold(h, *host) {
			hosts = append(hosts, h)
		}
	}
	certPEM, keyPEM, err := localtls.GenerateSelfSigned(hosts)
	if err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		fmt.Fprintln(stderr, "mailbridge:", err)
		return 1
	}
	certPath, keyPath := filepath.Join(*out, "mailbridge.crt"), filepath.Join(*out, "mailbridge.key")
	for _, f := range []struct {
		path string
		data []byte
		mode os.FileMode
	}{{certPath, certPEM, 0o644}, {keyPath, keyPEM, 0o600}} {
		fh, err := os.OpenFile(f.path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, f.mode)
		if errors.Is(err, fs.ErrExist) {
			fmt.Fprintf(stderr, "mailbridge: %s exists: remove it first, or choose another -out\n", f.path)
			return 1
		}
		if err == nil {
			_, err = fh.Write(f.data)
			err = errors.Join(err, fh.Close())
		}
		if err != nil {
			fmt.Fprintln(stderr, "mailbridge:", err)
			return 1
		}
	}
	fmt.Fprintf(stdout, `Wrote %s and %s for %s (RSA 2048, valid ten years).

In mailbridge.toml:
  [smtp]
  tls_cert = %q
  tls_key = %q
  # tls_listen = "127.0.0.1:465"   (implicit TLS, for clients that want SSL from the start)
and the same under [pop3] (STLS, and tls_listen = "127.0.0.1:995" for implicit TLS).

Make Windows trust it, on each machine whose mail client connects (as Administrator):
  certutil -addstore -f Root %s
or in PowerShell:
  Import-Certificate -FilePath %s -CertStoreLocation Cert:\LocalMachine\Root
The client must then connect to the name %q (it is in the certificate).
`, certPath, keyPath, strings.Join(hosts, ", "), certPath, keyPath, certPath, certPath, *host)
	return 0
}
