package upstream

import (
	"net/http"
	"strings"
	"time"
)

// Observer is told of every request to Microsoft's HTTP endpoints: which
// operation, the status (0 when no answer came) and how long it took.
type Observer func(op string, status int, d time.Duration)

// observedTransport reports each round trip to an Observer.
type observedTransport struct {
	next    http.RoundTripper
	observe Observer
}

// Observe makes client report its requests to observe.
func Observe(client *http.Client, observe Observer) {
	next := client.Transport
	if next == nil {
		next = http.DefaultTransport
	}
	client.Transport = &observedTransport{next: next, observe: observe}
}

func (t *observedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	start := time.Now()
	resp, err := t.next.RoundTrip(req)
	status := 0
	if err == nil {
		status = resp.StatusCode
	}
	t.observe(operation(req), status, time.Since(start))
	return resp, err
}

// operation names a request by the API it calls, without IDs, so that it
// can be a metric label.
func operation(req *http.Request) string {
	p := req.URL.Path
	switch {
	case strings.HasSuffix(p, "/oauth2/v2.0/token"):
		return "token"
	case strings.HasSuffix(p, "/sendMail"):
		return "sendMail"
	case strings.HasSuffix(p, "/createUploadSession"):
		return "createUploadSession"
	case strings.HasSuffix(p, "/attachments"):
		return "addAttachment"
	case strings.HasSuffix(p, "/send"):
		return "sendDraft"
	case req.Method == http.MethodGet && strings.HasSuffix(p, "/messages"):
		return "findSent"
	case strings.HasSuffix(p, "/messages"):
		return "createDraft"
	case req.Method == http.MethodDelete && strings.Contains(p, "/messages/"):
		return "deleteDraft"
	case req.Method == http.MethodPut || req.Method == http.MethodDelete:
		return "upload"
	}
	return "other"
}
