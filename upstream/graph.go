package upstream

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// MaxSendMailBody is Graph's limit on a request body: for a MIME sendMail the
// body is the base64 text, so the raw message may be at most 3/4 of it.
const MaxSendMailBody = 4 << 20

// MaxSendMailMIME is the largest raw MIME message that fits in one sendMail
// request (base64 without line breaks).
const MaxSendMailMIME = MaxSendMailBody / 4 * 3

// GraphClient sends mail through Microsoft Graph for one app registration.
type GraphClient struct {
	baseURL    string
	httpClient *http.Client
	tokens     *TokenSource
}

// NewGraphClient returns a client for the Graph API at baseURL (such as
// DefaultGraphURL) that authenticates with tokens from tokens.
func NewGraphClient(baseURL string, httpClient *http.Client, tokens *TokenSource) *GraphClient {
	return &GraphClient{baseURL: strings.TrimRight(baseURL, "/"), httpClient: httpClient, tokens: tokens}
}

// SendResult is Graph's answer to an accepted message.
type SendResult struct {
	Status    int
	RequestID string
}

// SendMail posts the raw RFC 5322 message of size bytes read from mime to
// POST /users/{user}/sendMail, base64-encoded as it is read. A refused
// token is renewed and the request made once more. Graph's refusals are
// *APIError, token failures *TokenError; a request written whole that got
// no clear answer is an *OutcomeUnknownError.
func (g *GraphClient) SendMail(ctx context.Context, user string, mime io.ReaderAt, size int64) (SendResult, error) {
	body := func() io.Reader { return NewBase64Reader(io.NewSectionReader(mime, 0, size)) }
	var wrote atomic.Bool
	res, err := g.call(traceWritten(ctx, &wrote), http.MethodPost, g.userURL(user, "sendMail"), "text/plain", body, int64(base64.StdEncoding.EncodedLen(int(size))), http.StatusAccepted, nil)
	if err != nil {
		err = fmt.Errorf("graph sendMail: %w", err)
		if unknownOutcome(wrote.Load(), err) {
			err = &OutcomeUnknownError{Err: err}
		}
		return res, err
	}
	return res, nil
}

// APIError is an answer from Graph other than success.
type APIError struct {
	Status     int
	Code       string // Graph's error code, such as ErrorSendAsDenied
	Message    string
	RequestID  string
	RetryAfter time.Duration // from the Retry-After header; 0 if absent
}

func (e *APIError) Error() string {
	if e.Code == "" {
		return fmt.Sprintf("graph answered HTTP %d", e.Status)
	}
	return fmt.Sprintf("graph answered HTTP %d %s: %s", e.Status, e.Code, e.Message)
}

// Temporary reports whether the request may succeed if retried unchanged:
// throttling and server errors.
func (e *APIError) Temporary() bool {
	switch e.Status {
	case http.StatusTooManyRequests, http.StatusInternalServerError, http.StatusBadGateway,
		http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

func decodeAPIError(resp *http.Response) error {
	e := &APIError{
		Status:     resp.StatusCode,
		RequestID:  resp.Header.Get("request-id"),
		RetryAfter: parseRetryAfter(resp.Header.Get("Retry-After"), time.Now()),
	}
	var body struct {
		Error struct {
			Code       string `json:"code"`
			Message    string `json:"message"`
			InnerError struct {
				RequestID string `json:"request-id"`
			} `json:"innerError"` // encoding/json also matches the documented "innererror"
		} `json:"error"`
	}
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(data, &body) == nil {
		e.Code = body.Error.Code
		e.Message = body.Error.Message
		if e.RequestID == "" {
			e.RequestID = body.Error.InnerError.RequestID
		}
	}
	return e
}

// parseRetryAfter reads a Retry-After value: seconds, possibly fractional
// as Graph sends them ("2.128"), or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if secs, err := strconv.ParseFloat(v, 64); err == nil {
		if secs <= 0 {
			return 0
		}
		return time.Duration(secs * float64(time.Second))
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// base64Reader encodes what it reads from r as standard base64 without line
// breaks, holding no more than one small block in memory.
type base64Reader struct {
	r   io.Reader
	raw [3 * 1024]byte
	enc [4 * 1024]byte
	out []byte // encoded bytes not yet returned
	err error
}

// NewBase64Reader returns a reader of the base64 encoding of r.
func NewBase64Reader(r io.Reader) io.Reader { return &base64Reader{r: r} }

func (b *base64Reader) Read(p []byte) (int, error) {
	for len(b.out) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		n, err := io.ReadFull(b.r, b.raw[:])
		if err == io.ErrUnexpectedEOF {
			err = io.EOF
		}
		b.err = err
		base64.StdEncoding.Encode(b.enc[:], b.raw[:n])
		b.out = b.enc[:base64.StdEncoding.EncodedLen(n)]
	}
	n := copy(p, b.out)
	b.out = b.out[n:]
	return n, nil
}
