package upstream

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
)

// Limits of Graph's attachment API.
const (
	// MaxAttachmentPost is the largest attachment posted in one JSON
	// request (its base64 and the JSON around it stay under 4 MB); larger
	// ones go through an upload session.
	MaxAttachmentPost = 3_000_000
	// UploadChunk is the size of one upload session PUT: a multiple of
	// 320 KiB, under the 4 MB limit.
	UploadChunk = 12 * 320 << 10
)

// Attachment describes a file attachment added to a draft.
type Attachment struct {
	Name        string
	ContentType string
	IsInline    bool
	ContentID   string // without angle brackets
	Size        int64
}

// CreateDraft creates a draft in user's mailbox from a raw MIME message of
// size bytes (POST /users/{user}/messages, base64 as for sendMail) and
// returns its id.
func (g *GraphClient) CreateDraft(ctx context.Context, user string, mime io.ReaderAt, size int64) (string, error) {
	var created struct {
		ID string `json:"id"`
	}
	body := func() io.Reader { return NewBase64Reader(io.NewSectionReader(mime, 0, size)) }
	_, err := g.call(ctx, http.MethodPost, g.userURL(user, "messages"), "text/plain", body, int64(base64.StdEncoding.EncodedLen(int(size))), http.StatusCreated, &created)
	if err != nil {
		return "", fmt.Errorf("create draft: %w", err)
	}
	if created.ID == "" {
		return "", errors.New("create draft: Graph answered without an id")
	}
	return created.ID, nil
}

// AddAttachment adds a file attachment of up to MaxAttachmentPost bytes to
// a draft in one request, its content base64-encoded as it is read.
func (g *GraphClient) AddAttachment(ctx context.Context, user, messageID string, a Attachment, content io.ReaderAt) error {
	head, _ := json.Marshal(map[string]any{
		"@odata.type": "#microsoft.graph.fileAttachment",
		"name":        a.Name,
		"contentType": a.ContentType,
		"isInline":    a.IsInline,
		"contentId":   a.ContentID,
	})
	prefix := append(bytes.TrimSuffix(head, []byte("}")), `,"contentBytes":"`...)
	suffix := []byte(`"}`)
	body := func() io.Reader {
		return io.MultiReader(bytes.NewReader(prefix), NewBase64Reader(io.NewSectionReader(content, 0, a.Size)), bytes.NewReader(suffix))
	}
	n := int64(len(prefix)+len(suffix)) + int64(base64.StdEncoding.EncodedLen(int(a.Size)))
	if _, err := g.call(ctx, http.MethodPost, g.userURL(user, "messages", messageID, "attachments"), "application/json", body, n, http.StatusCreated, nil); err != nil {
		return fmt.Errorf("add attachment %q: %w", a.Name, err)
	}
	return nil
}

// UploadSession is an attachment upload session of Graph.
type UploadSession struct {
	URL string
	// Next is the offset Graph expects next (from nextExpectedRanges).
	Next int64
	Size int64
}

// CreateUploadSession starts the upload of an attachment of 3 MB or more
// to a draft.
func (g *GraphClient) CreateUploadSession(ctx context.Context, user, messageID string, a Attachment) (*UploadSession, error) {
	item, _ := json.Marshal(map[string]any{"AttachmentItem": map[string]any{
		"attachmentType": "file",
		"name":           a.Name,
		"size":           a.Size,
		"contentType":    a.ContentType,
		"isInline":       a.IsInline,
		"contentId":      a.ContentID,
	}})
	var resp struct {
		UploadURL          string   `json:"uploadUrl"`
		NextExpectedRanges []string `json:"nextExpectedRanges"`
	}
	body := func() io.Reader { return bytes.NewReader(item) }
	if _, err := g.call(ctx, http.MethodPost, g.userURL(user, "messages", messageID, "attachments", "createUploadSession"), "application/json", body, int64(len(item)), http.StatusCreated, &resp); err != nil {
		return nil, fmt.Errorf("create upload session for %q: %w", a.Name, err)
	}
	u, err := url.Parse(resp.UploadURL)
	if err != nil || (u.Scheme != "https" && !(u.Scheme == "http" && isLoopback(u.Hostname()))) {
		return nil, fmt.Errorf("create upload session for %q: unusable uploadUrl", a.Name)
	}
	return &UploadSession{URL: resp.UploadURL, Next: nextExpected(resp.NextExpectedRanges), Size: a.Size}, nil
}

// UploadChunk sends content[s.Next, s.Next+UploadChunk) to the session
// (PUT with Content-Range and no Authorization header: the URL carries its
// own token) and advances s.Next to what Graph expects next. It reports
// whether the upload is complete.
func (g *GraphClient) UploadChunk(ctx context.Context, s *UploadSession, content io.ReaderAt) (done bool, err error) {
	from := s.Next
	n := min(int64(UploadChunk), s.Size-from)
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, s.URL, io.NewSectionReader(content, from, n))
	if err != nil {
		return false, err
	}
	req.ContentLength = n
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", from, from+n-1, s.Size))
	resp, err := g.httpClient.Do(req)
	if err != nil {
		return false, fmt.Errorf("upload bytes %d-%d: %w", from, from+n-1, err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusCreated:
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		s.Next = s.Size
		return true, nil
	case http.StatusOK:
		// {"ExpirationDateTime":..., "nextExpectedRanges":["2097152"]}:
		// encoding/json matches the key's case loosely.
		var st struct {
			NextExpectedRanges []string `json:"nextExpectedRanges"`
		}
		if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&st); err != nil {
			return false, fmt.Errorf("upload bytes %d-%d: %w", from, from+n-1, err)
		}
		s.Next = nextExpected(st.NextExpectedRanges)
		if s.Next <= from || s.Next > s.Size {
			return false, fmt.Errorf("upload bytes %d-%d: Graph expects %v next", from, from+n-1, st.NextExpectedRanges)
		}
		return false, nil
	}
	return false, fmt.Errorf("upload bytes %d-%d: %w", from, from+n-1, decodeAPIError(resp))
}

// CancelUpload deletes an upload session.
func (g *GraphClient) CancelUpload(ctx context.Context, s *UploadSession) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, s.URL, nil)
	if err != nil {
		return err
	}
	resp, err := g.httpClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	return nil
}

// SendDraft sends a draft (POST /users/{user}/messages/{id}/send). Its
// errors are those of SendMail.
func (g *GraphClient) SendDraft(ctx context.Context, user, messageID string) (SendResult, error) {
	var wrote atomic.Bool
	res, err := g.call(traceWritten(ctx, &wrote), http.MethodPost, g.userURL(user, "messages", messageID, "send"), "", nil, 0, http.StatusAccepted, nil)
	if err != nil {
		err = fmt.Errorf("send draft: %w", err)
		if unknownOutcome(wrote.Load(), err) {
			err = &OutcomeUnknownError{Err: err}
		}
		return res, err
	}
	return res, nil
}

// DeleteMessage deletes a message (a draft) from user's mailbox.
func (g *GraphClient) DeleteMessage(ctx context.Context, user, messageID string) error {
	if _, err := g.call(ctx, http.MethodDelete, g.userURL(user, "messages", messageID), "", nil, 0, http.StatusNoContent, nil); err != nil {
		return fmt.Errorf("delete draft: %w", err)
	}
	return nil
}

func (g *GraphClient) userURL(user string, parts ...string) string {
	u := g.baseURL + "/users/" + url.PathEscape(user)
	for _, p := range parts {
		u += "/" + url.PathEscape(p)
	}
	return u
}

// call makes one authenticated Graph request, renewing a refused token
// once, and decodes a JSON answer of status want into out (if not nil).
func (g *GraphClient) call(ctx context.Context, method, u, contentType string, body func() io.Reader, n int64, want int, out any) (SendResult, error) {
	res, token, err := g.callOnce(ctx, method, u, contentType, body, n, want, out)
	var apiErr *APIError
	if errors.As(err, &apiErr) && apiErr.Status == http.StatusUnauthorized {
		g.tokens.Invalidate(token)
		res, _, err = g.callOnce(ctx, method, u, contentType, body, n, want, out)
	}
	return res, err
}

func (g *GraphClient) callOnce(ctx context.Context, method, u, contentType string, body func() io.Reader, n int64, want int, out any) (SendResult, string, error) {
	token, err := g.tokens.Token(ctx)
	if err != nil {
		return SendResult{}, "", err
	}
	var rd io.Reader
	if body != nil {
		rd = body()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return SendResult{}, token, err
	}
	if body != nil {
		req.ContentLength = n
		req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(body()), nil }
		req.Header.Set("Content-Type", contentType)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := g.httpClient.Do(req)
	if err != nil {
		return SendResult{}, token, err
	}
	defer resp.Body.Close()
	res := SendResult{Status: resp.StatusCode, RequestID: resp.Header.Get("request-id")}
	if resp.StatusCode != want {
		return res, token, decodeAPIError(resp)
	}
	if out != nil {
		if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(out); err != nil {
			return res, token, fmt.Errorf("decode Graph's answer: %w", err)
		}
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	return res, token, nil
}

// nextExpected reads the start of the first of Graph's nextExpectedRanges
// ("2097152" or "2097152-").
func nextExpected(ranges []string) int64 {
	if len(ranges) == 0 {
		return 0
	}
	start, _, _ := strings.Cut(ranges[0], "-")
	n, _ := strconv.ParseInt(start, 10, 64)
	return n
}

func isLoopback(host string) bool {
	return host == "localhost" || host == "127.0.0.1" || host == "::1"
}
