package m365fake

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/mail"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// minUploadSession is the smallest attachment Graph takes through an
// upload session (3 MB); smaller ones are posted whole.
const minUploadSession = 3 << 20

// SentAttachment is a file attachment of a message sent from a draft.
type SentAttachment struct {
	Name        string
	ContentType string
	IsInline    bool
	ContentID   string
	Size        int64
	SHA256      [32]byte
	path        string // the content, on disk (not in memory: benchmarks measure the heap)
}

// Data reads the attachment's content.
func (a SentAttachment) Data() ([]byte, error) { return os.ReadFile(a.path) }

type draft struct {
	id          string
	user        string
	tenant      string
	mime        []byte
	attachments []SentAttachment
}

type uploadSession struct {
	draftID string
	att     SentAttachment
	next    int64
	file    *os.File
	expires time.Time
}

// Drafts counts the drafts that exist (created, neither sent nor deleted).
func (s *Server) Drafts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.drafts)
}

func (s *Server) attachmentFile() (*os.File, error) {
	s.mu.Lock()
	if s.uploadDir == "" {
		dir, err := os.MkdirTemp("", "m365fake-attachments-")
		if err != nil {
			s.mu.Unlock()
			return nil, err
		}
		s.uploadDir = dir
	}
	dir := s.uploadDir
	s.mu.Unlock()
	return os.CreateTemp(dir, "att-*")
}

func (s *Server) removeUploads() {
	s.mu.Lock()
	dir := s.uploadDir
	s.mu.Unlock()
	if dir != "" {
		os.RemoveAll(dir)
	}
}

func (s *Server) serveCreateDraft(g *graphRequest) {
	raw, _, ok := g.readMIME()
	if !ok {
		return
	}
	d := &draft{id: "AAMkAD" + newGUID(), user: g.user, tenant: g.claims.Tid, mime: raw}
	s.mu.Lock()
	s.drafts[d.id] = d
	s.mu.Unlock()
	g.w.Header().Set("Content-Type", "application/json")
	g.w.WriteHeader(http.StatusCreated)
	json.NewEncoder(g.w).Encode(map[string]any{"id": d.id, "isDraft": true, "hasAttachments": false})
}

// draftOf finds the draft of the path, answering 404 if there is none.
func (s *Server) draftOf(g *graphRequest) *draft {
	s.mu.Lock()
	d := s.drafts[g.r.PathValue("id")]
	s.mu.Unlock()
	if d == nil || d.user != g.user || d.tenant != g.claims.Tid {
		g.fail(http.StatusNotFound, "ErrorItemNotFound", "The specified object was not found in the store.")
		return nil
	}
	return d
}

func (s *Server) serveAddAttachment(g *graphRequest) {
	d := s.draftOf(g)
	if d == nil {
		return
	}
	body, err := io.ReadAll(io.LimitReader(g.r.Body, maxRequestBody+1))
	if err != nil {
		return
	}
	if len(body) > maxRequestBody {
		g.w.WriteHeader(http.StatusRequestEntityTooLarge)
		return
	}
	var a struct {
		Type         string `json:"@odata.type"`
		Name         string `json:"name"`
		ContentType  string `json:"contentType"`
		ContentBytes string `json:"contentBytes"`
		IsInline     bool   `json:"isInline"`
		ContentID    string `json:"contentId"`
	}
	if err := json.Unmarshal(body, &a); err != nil || a.Type != "#microsoft.graph.fileAttachment" || a.Name == "" {
		g.fail(http.StatusBadRequest, "RequestBodyRead", "Cannot read the request body.")
		return
	}
	data, err := base64.StdEncoding.DecodeString(a.ContentBytes)
	if err != nil {
		g.fail(http.StatusBadRequest, "ErrorInvalidProperty", "Invalid base64 string for contentBytes.")
		return
	}
	f, err := s.attachmentFile()
	if err != nil {
		g.fail(http.StatusInternalServerError, "ErrorInternalServerError", err.Error())
		return
	}
	f.Write(data)
	f.Close()
	att := SentAttachment{Name: a.Name, ContentType: a.ContentType, IsInline: a.IsInline, ContentID: a.ContentID,
		Size: int64(len(data)), SHA256: sha256.Sum256(data), path: f.Name()}
	s.mu.Lock()
	d.attachments = append(d.attachments, att)
	s.mu.Unlock()
	g.w.Header().Set("Content-Type", "application/json")
	g.w.WriteHeader(http.StatusCreated)
	json.NewEncoder(g.w).Encode(map[string]any{"id": "AAMkAtt" + newGUID(), "name": a.Name, "size": len(data)})
}

func (s *Server) serveCreateUploadSession(g *graphRequest) {
	d := s.draftOf(g)
	if d == nil {
		return
	}
	var req struct {
		Item struct {
			Type        string `json:"attachmentType"`
			Name        string `json:"name"`
			Size        int64  `json:"size"`
			ContentType string `json:"contentType"`
			IsInline    bool   `json:"isInline"`
			ContentID   string `json:"contentId"`
		} `json:"AttachmentItem"`
	}
	if err := json.NewDecoder(io.LimitReader(g.r.Body, 64<<10)).Decode(&req); err != nil || req.Item.Type != "file" || req.Item.Name == "" {
		g.fail(http.StatusBadRequest, "RequestBodyRead", "Cannot read the request body.")
		return
	}
	if req.Item.Size < minUploadSession {
		g.fail(http.StatusBadRequest, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize", "Attachment size must be greater than the minimum size.")
		return
	}
	if req.Item.Size > 150<<20 {
		g.fail(http.StatusBadRequest, "ErrorAttachmentSizeLimitExceeded", "The attachment exceeds the maximum size.")
		return
	}
	f, err := s.attachmentFile()
	if err != nil {
		g.fail(http.StatusInternalServerError, "ErrorInternalServerError", err.Error())
		return
	}
	secret := make([]byte, 24)
	rand.Read(secret)
	key := hex.EncodeToString(secret)
	expires := time.Now().Add(15 * time.Minute)
	s.mu.Lock()
	s.uploads[key] = &uploadSession{draftID: d.id, file: f, expires: expires,
		att: SentAttachment{Name: req.Item.Name, ContentType: req.Item.ContentType, IsInline: req.Item.IsInline, ContentID: req.Item.ContentID, Size: req.Item.Size, path: f.Name()}}
	s.mu.Unlock()
	g.w.Header().Set("Content-Type", "application/json")
	g.w.WriteHeader(http.StatusCreated)
	json.NewEncoder(g.w).Encode(map[string]any{
		"@odata.context":     "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.uploadSession",
		"uploadUrl":          s.URL + "/upload/" + key,
		"expirationDateTime": expires.UTC().Format(time.RFC3339),
		"nextExpectedRanges": []string{"0-"},
	})
}

var contentRangeRe = regexp.MustCompile(`^bytes (\d+)-(\d+)/(\d+)$`)

// serveUpload takes one chunk of an upload session: in order, without
// gaps or overlaps, at most 4 MB, and without an Authorization header.
func (s *Server) serveUpload(w http.ResponseWriter, r *http.Request) {
	requestID := newGUID()
	w.Header().Set("request-id", requestID)
	fail := func(status int, code, msg string) { writeGraphError(w, requestID, status, code, msg) }
	if f, ok := s.takeEndpointFault(EndpointUpload); ok {
		if applyFault(w, r, f, func(f Fault) { fail(f.Status, f.Code, f.Message) }) {
			return
		}
	}
	if r.Header.Get("Authorization") != "" {
		fail(http.StatusUnauthorized, "InvalidAuthenticationToken", "The upload URL carries its own token: send no Authorization header.")
		return
	}
	key := r.PathValue("session")
	s.mu.Lock()
	us := s.uploads[key]
	s.mu.Unlock()
	if us == nil || time.Now().After(us.expires) {
		fail(http.StatusNotFound, "ErrorItemNotFound", "The upload session was not found or has expired.")
		return
	}
	m := contentRangeRe.FindStringSubmatch(r.Header.Get("Content-Range"))
	if m == nil {
		fail(http.StatusBadRequest, "InvalidContentRange", "The Content-Range header is missing or malformed.")
		return
	}
	from, _ := strconv.ParseInt(m[1], 10, 64)
	to, _ := strconv.ParseInt(m[2], 10, 64)
	total, _ := strconv.ParseInt(m[3], 10, 64)
	n := to - from + 1
	s.mu.Lock()
	next := us.next
	s.mu.Unlock()
	if total != us.att.Size || from != next || n <= 0 || to >= total || n > maxRequestBody || r.ContentLength != n {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
		json.NewEncoder(w).Encode(map[string]any{"error": map[string]any{"code": "InvalidRange",
			"message": fmt.Sprintf("Expected bytes %d- of %d.", next, us.att.Size)}, "nextExpectedRanges": []string{fmt.Sprintf("%d-", next)}})
		return
	}
	// Streamed to disk, not held: benchmarks measure the heap of the
	// process the fake runs in.
	got, err := io.Copy(io.NewOffsetWriter(us.file, from), io.LimitReader(r.Body, n))
	if err != nil || got != n {
		return // a broken chunk leaves the session where it was
	}
	s.mu.Lock()
	us.next = to + 1
	done := us.next == us.att.Size
	if done {
		delete(s.uploads, key)
	}
	s.mu.Unlock()
	if done {
		h := sha256.New()
		us.file.Seek(0, io.SeekStart)
		io.Copy(h, us.file)
		us.file.Close()
		copy(us.att.SHA256[:], h.Sum(nil))
		s.mu.Lock()
		if d := s.drafts[us.draftID]; d != nil {
			d.attachments = append(d.attachments, us.att)
		}
		s.mu.Unlock()
	}
	if done {
		w.Header().Set("Location", s.URL+"/v1.0/attachments/"+newGUID())
		w.WriteHeader(http.StatusCreated)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"@odata.context":     "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.uploadSession",
		"ExpirationDateTime": us.expires.UTC().Format(time.RFC3339),
		"NextExpectedRanges": []string{strconv.FormatInt(to+1, 10)},
	})
}

func (s *Server) serveCancelUpload(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	if us := s.uploads[r.PathValue("session")]; us != nil {
		us.file.Close()
		os.Remove(us.file.Name())
		delete(s.uploads, r.PathValue("session"))
	}
	s.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) serveSendDraft(g *graphRequest) {
	d := s.draftOf(g)
	if d == nil {
		return
	}
	msg, err := mail.ReadMessage(bytes.NewReader(d.mime))
	if err != nil {
		g.fail(http.StatusBadRequest, "ErrorMimeContentInvalid", "MIME content does not contain all required information, malformed formatting, or empty.")
		return
	}
	sent, ok := g.sentMessage(d.mime, msg)
	if !ok {
		return
	}
	s.mu.Lock()
	sent.Attachments = d.attachments
	delete(s.drafts, d.id) // sent: it moves to Sent Items
	s.mu.Unlock()
	s.record(sent)
	if !g.acceptedFault() {
		g.w.WriteHeader(http.StatusAccepted)
	}
}

func (s *Server) serveDeleteDraft(g *graphRequest) {
	d := s.draftOf(g)
	if d == nil {
		return
	}
	s.mu.Lock()
	delete(s.drafts, d.id)
	s.mu.Unlock()
	g.w.WriteHeader(http.StatusNoContent)
}

// Rebuild returns the message as Exchange would deliver it: the MIME the
// message was sent with, and, for a message sent from a draft, its
// attachments added as parts of a multipart/mixed around it.
func (m SentMessage) Rebuild() ([]byte, error) {
	if len(m.Attachments) == 0 {
		return m.MIME, nil
	}
	msg, err := mail.ReadMessage(bytes.NewReader(m.MIME))
	if err != nil {
		return nil, err
	}
	const boundary = "m365fake-rebuilt-boundary"
	var b bytes.Buffer
	var contentFields []string
	for k, vs := range msg.Header {
		for _, v := range vs {
			if strings.HasPrefix(strings.ToLower(k), "content-") || strings.EqualFold(k, "MIME-Version") {
				contentFields = append(contentFields, k+": "+v)
				continue
			}
			fmt.Fprintf(&b, "%s: %s\r\n", k, v)
		}
	}
	fmt.Fprintf(&b, "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=%q\r\n\r\n--%s\r\n", boundary, boundary)
	for _, f := range contentFields {
		b.WriteString(f + "\r\n")
	}
	b.WriteString("\r\n")
	io.Copy(&b, msg.Body)
	for _, a := range m.Attachments {
		data, err := a.Data()
		if err != nil {
			return nil, err
		}
		disp := "attachment"
		if a.IsInline {
			disp = "inline"
		}
		fmt.Fprintf(&b, "\r\n--%s\r\nContent-Type: %s\r\nContent-Disposition: %s\r\nContent-Transfer-Encoding: base64\r\n",
			boundary, a.ContentType, mime.FormatMediaType(disp, map[string]string{"filename": a.Name}))
		if a.ContentID != "" {
			fmt.Fprintf(&b, "Content-ID: <%s>\r\n", a.ContentID)
		}
		b.WriteString("\r\n")
		enc := base64.StdEncoding.EncodeToString(data)
		for len(enc) > 76 {
			b.WriteString(enc[:76] + "\r\n")
			enc = enc[76:]
		}
		b.WriteString(enc + "\r\n")
	}
	fmt.Fprintf(&b, "--%s--\r\n", boundary)
	return b.Bytes(), nil
}
