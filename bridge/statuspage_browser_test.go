package bridge_test

import (
	"bytes"
	"context"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/fetch"
	"github.com/chromedp/chromedp"
)

// TestStatusPageInABrowser drives the status page in headless Chromium
// (Debian's chromium; .ci/run installs it): it logs in through the
// browser's own Basic-auth challenge, sees the account whose secret the
// fake refuses in red with its fix, finds the message the fake refused in
// the failed list, clears the fault, clicks Retry and sees the message
// delivered once and gone from the list. It checks the layout at 1024 px
// and at a phone's width, and takes the screenshot in the README
// (MAILBRIDGE_SCREENSHOT names where it goes; by default a temporary
// directory).
func TestStatusPageInABrowser(t *testing.T) {
	chromium := need(t, "chromium")
	fake := startFake(t)
	b, logs := startBridge(t, fake, statusConfig(t, fake))
	sendVia(t, b, "crew@example.org", "From: TM Master <orders@example.com>\nTo: crew@example.org\nSubject: Noon report MV Nordic Star\n\nposition\n")
	refused := sendVia(t, b, "agent@"+refusedDomain, "From: TM Master <orders@example.com>\nTo: agent@refused.example\nSubject: Arrival notice Rotterdam\n\neta\n")
	waitFor(t, "the refused message in failed/", func() bool { return entryExists(b, "failed", refused) })

	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(chromium), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true), chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1280, 900))
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	ctx, cancelCtx := chromedp.NewContext(allocCtx, chromedp.WithLogf(t.Logf))
	defer cancelCtx()
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()

	// The browser asks for a login as it would show its dialog; the test
	// types the user name and password there. Every other request goes on.
	auth := chromedp.Events(ctx, fetch.AuthRequired)
	paused := chromedp.Events(ctx, fetch.RequestPaused)
	go func() {
		for ev, err := range auth {
			if err != nil {
				return
			}
			chromedp.Call(ctx, fetch.ContinueWithAuth, fetch.ContinueWithAuthParams{RequestID: ev.RequestID,
				AuthChallengeResponse: &fetch.AuthChallengeResponse{Response: fetch.AuthChallengeResponseResponseProvideCredentials,
					Username: adminUser, Password: adminPassword}})
		}
	}()
	go func() {
		for ev, err := range paused {
			if err != nil {
				return
			}
			chromedp.Call(ctx, fetch.ContinueRequest, fetch.ContinueRequestParams{RequestID: ev.RequestID})
		}
	}()
	if _, err := chromedp.Call(ctx, fetch.Enable, fetch.EnableParams{HandleAuthRequests: new(true)}); err != nil {
		t.Fatal(err)
	}
	page := "http://" + b.AdminAddr() + "/"
	row := `#failed tr[data-id="` + refused + `"]`
	scannerCard := chromedp.CSS(`article[data-account="scanner"]`)
	if err := chromedp.Do(ctx, chromedp.Navigate(page), chromedp.WaitVisible(scannerCard)); err != nil {
		t.Fatalf("opening the page: %v\n%s", err, logs)
	}
	title := browse(t, ctx, chromedp.Title())
	scanner := browse(t, ctx, chromedp.Text(scannerCard))
	failedRow := browse(t, ctx, chromedp.Text(chromedp.CSS(row)))
	if title != "mailbridge: 1 failed, 1 sign-in refused" {
		t.Errorf("title %q", title)
	}
	scannerState := browse(t, ctx, chromedp.AttributeValue(scannerCard, "data-state")).Value
	color := browse(t, ctx, chromedp.Evaluate[string](`getComputedStyle(document.querySelector('article[data-account="scanner"]')).borderLeftColor`))
	smtpState := browse(t, ctx, chromedp.AttributeValue(chromedp.CSS(`article[data-account="scanner"] li[data-proto="smtp"]`), "data-state")).Value
	if scannerState != "refused" || smtpState != "refused" || color != "rgb(207, 34, 46)" || !strings.Contains(scanner, "AADSTS7000215") || !strings.Contains(scanner, "copy the secret's Value") {
		t.Errorf("the refused account: state %q, border %q, text %q; want red with AADSTS7000215 and its fix", scannerState, color, scanner)
	}
	if !strings.Contains(failedRow, "Arrival notice Rotterdam") || !strings.Contains(failedRow, "ErrorInvalidRecipients") || !strings.Contains(failedRow, "agent@refused.example") {
		t.Errorf("the failed row %q lacks its subject, reason or recipient", failedRow)
	}

	// At 1024 px and at a phone's 390 px nothing is wider than the window,
	// and the failed message's Retry button and reason are on screen (on
	// the phone each message is a block of labelled lines).
	for _, width := range []int64{1024, 390} {
		if err := chromedp.Do(ctx, chromedp.EmulateViewport(width, 900)); err != nil {
			t.Fatal(err)
		}
		if browse(t, ctx, chromedp.Evaluate[bool](`document.documentElement.scrollWidth > window.innerWidth`)) {
			t.Errorf("at %d px the page is wider than the window", width)
		}
		inner := browse(t, ctx, chromedp.Evaluate[float64](`window.innerWidth`))
		for _, part := range []string{"button", ".reason"} {
			right := browse(t, ctx, chromedp.Evaluate[float64](`document.querySelector('`+row+` `+part+`').getBoundingClientRect().right`))
			if right > inner {
				t.Errorf("at %d px the failed message's %s ends at %v, beyond the window's %v", width, part, right, inner)
			}
		}
		if width == 390 && os.Getenv("MAILBRIDGE_SCREENSHOT") != "" {
			phone := browse(t, ctx, chromedp.FullScreenshot(100))
			os.WriteFile(strings.TrimSuffix(os.Getenv("MAILBRIDGE_SCREENSHOT"), ".png")+"-phone.png", phone, 0o644)
		}
	}
	if err := chromedp.Do(ctx, chromedp.EmulateViewport(1280, 900)); err != nil {
		t.Fatal(err)
	}
	shot := browse(t, ctx, chromedp.FullScreenshot(100))
	if img, err := png.Decode(bytes.NewReader(shot)); err != nil || img.Bounds().Dx() != 1280 {
		t.Errorf("the screenshot is not a 1280 px wide PNG: %v", err)
	}
	dest := os.Getenv("MAILBRIDGE_SCREENSHOT")
	if dest == "" {
		dest = filepath.Join(t.TempDir(), "statuspage.png")
	}
	if err := os.WriteFile(dest, shot, 0o644); err != nil {
		t.Fatal(err)
	}

	// The fault is cleared; the administrator clicks Retry.
	fake.AcceptRecipients(refusedDomain)
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS(row+` button`)), chromedp.WaitVisible(chromedp.ID("flash"))); err != nil {
		t.Fatalf("clicking Retry: %v", err)
	}
	if flash := browse(t, ctx, chromedp.Text(chromedp.ID("flash"))); !strings.Contains(flash, "is back in the queue") {
		t.Errorf("after Retry the page says %q", flash)
	}
	waitFor(t, "the retried message delivered", func() bool {
		return sentTimes(fake, "Arrival notice Rotterdam") == 1 && !entryExists(b, "queue", refused)
	})
	if err := chromedp.Do(ctx, chromedp.Navigate(page), chromedp.WaitVisible(chromedp.ID("failed-heading"))); err != nil {
		t.Fatal(err)
	}
	gone := browse(t, ctx, chromedp.Evaluate[bool](`document.querySelector('`+row+`') === null`))
	failedHeading := browse(t, ctx, chromedp.Text(chromedp.ID("failed-heading")))
	title = browse(t, ctx, chromedp.Title())
	if !gone || failedHeading != "Failed (0)" || title != "mailbridge: 1 sign-in refused" {
		t.Errorf("after the delivery: row gone %v, heading %q, title %q", gone, failedHeading, title)
	}
	time.Sleep(200 * time.Millisecond)
	if n := sentTimes(fake, "Arrival notice Rotterdam"); n != 1 {
		t.Errorf("the retried message reached the fake %d times", n)
	}
	if !strings.Contains(logs.String(), `"action":"retry"`) {
		t.Error("the click is not in the log")
	}
}

// browse runs one browser action and returns its value; an error fails the
// test.
func browse[T any](t *testing.T, ctx context.Context, a chromedp.Action[T]) T {
	t.Helper()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	return v
}
