package bridge_test

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"runtime"
	"testing"
	"time"
)

// largeMessageReader streams a message of about size bytes: a short text
// part and one base64 attachment of pseudo-random bytes, never held whole
// in memory.
func largeMessageReader(size int64) io.Reader {
	head := "From: orders@example.com\r\nTo: supplier@example.org\r\nSubject: large\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"L\"\r\n\r\n--L\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n--L\r\nContent-Type: application/zip\r\nContent-Disposition: attachment; filename=\"package.zip\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
	tail := "--L--\r\n"
	raw := (size - int64(len(head)+len(tail))) / 78 * 57
	return io.MultiReader(bytes.NewReader([]byte(head)), &base64Lines{left: raw}, bytes.NewReader([]byte(tail)))
}

// base64Lines produces left pseudo-random bytes as base64 lines of 76.
type base64Lines struct {
	left int64
	seed uint64
	buf  []byte
}

func (b *base64Lines) Read(p []byte) (int, error) {
	if len(b.buf) == 0 {
		if b.left <= 0 {
			return 0, io.EOF
		}
		n := min(b.left, 57*1024)
		b.left -= n
		b.seed++
		raw := randomBytes(int(n), b.seed)
		for len(raw) > 0 {
			k := min(57, len(raw))
			b.buf = append(b.buf, base64.StdEncoding.EncodeToString(raw[:k])...)
			b.buf = append(b.buf, '\r', '\n')
			raw = raw[k:]
		}
	}
	n := copy(p, b.buf)
	b.buf = b.buf[n:]
	return n, nil
}

// BenchmarkLargeMessage sends 10, 40 and 100 MB messages through the
// bridge to the fake Graph (draft, upload session, send) and reports the
// time per message and the live heap above idle at its peak (the SMTP
// client and the fake run in the same process and count too).
func BenchmarkLargeMessage(b *testing.B) {
	for _, mb := range []int64{10, 40, 100} {
		b.Run(fmt.Sprintf("%dMB", mb), func(b *testing.B) {
			fake := startFake(b)
			fake.AddApp(tenantA, clientA, secretA, "Mail.Send", "Mail.ReadWrite")
			cfg := testConfig(fake)
			cfg.Log.Level = "info"
			cfg.SMTP.MaxMessageBytes = 150 << 20
			cfg.SMTP.SpoolDir = b.TempDir()
			cfg.SMTP.UploadBytesPer5Min = 1 << 40
			br, _ := startBridge(b, fake, cfg)
			c := dialAuth(b, br.SMTPAddr(), userA, passwordA)
			runtime.GC()
			idle := heapNow()
			var peak uint64
			var total time.Duration
			b.ResetTimer()
			for range b.N {
				hs := startHeapSampler()
				t0 := time.Now()
				if err := c.Mail(mailboxA, nil); err != nil {
					b.Fatal(err)
				}
				if err := c.Rcpt("supplier@example.org", nil); err != nil {
					b.Fatal(err)
				}
				w, err := c.Data()
				if err != nil {
					b.Fatal(err)
				}
				if _, err := io.Copy(w, largeMessageReader(mb<<20)); err != nil {
					b.Fatal(err)
				}
				if _, err := w.CloseWithResponse(); err != nil {
					b.Fatal(err)
				}
				total += time.Since(t0)
				peak = max(peak, hs.Stop())
			}
			b.StopTimer()
			if n := len(fake.Sent()); n != b.N {
				b.Fatalf("Graph sent %d messages, want %d", n, b.N)
			}
			b.ReportMetric(total.Seconds()/float64(b.N), "s/msg")
			b.ReportMetric(float64(int64(peak)-int64(idle))/(1<<20), "peak-heap-MB-above-idle")
			b.ReportMetric(0, "ns/op")
		})
	}
}
