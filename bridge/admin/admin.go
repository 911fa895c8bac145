// Package admin is the bridge's administrator endpoint: the Prometheus
// metrics (in a registry of their own) and their recording methods, the
// record of final message outcomes (Activity), and the HTTP server of
// /metrics, /healthz and the status page it is handed.
//
// It imports only bridge/conntrack (for its connection cap); what it
// reports is handed to it.
package admin

import (
	"encoding/json"
	"io"
	stdlog "log"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"mailbridge/bridge/conntrack"
)

// Metrics are the bridge's Prometheus metrics, in a registry of its own.
type Metrics struct {
	reg            *prometheus.Registry
	sessions       *prometheus.CounterVec // by proto
	activeSessions *prometheus.GaugeVec   // by proto
	messages       *prometheus.CounterVec // by account, result, reason
	messageBytes   *prometheus.CounterVec // by account
	upstreamTime   *prometheus.HistogramVec
	upstreamStatus *prometheus.CounterVec // by op, status
	retrBytes      *prometheus.CounterVec // by account
	proxiedBytes   *prometheus.CounterVec // by proto, direction
	activity       *Activity
}

// NewMetrics returns the metrics, registered.
func NewMetrics() *Metrics {
	m := &Metrics{
		reg:      prometheus.NewRegistry(),
		activity: NewActivity(),
		sessions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mailbridge_sessions_total",
			Help: "Client sessions accepted, by protocol."}, []string{"proto"}),
		activeSessions: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mailbridge_sessions_active",
			Help: "Client sessions open now, by protocol."}, []string{"proto"}),
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mailbridge_messages_total",
			Help: "Messages by outcome: sent (Graph took it), queued (in the outbox), failed (given up), refused (answered with an error)."},
			[]string{"account", "result", "reason"}),
		messageBytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mailbridge_message_bytes_total",
			Help: "Bytes of the messages Graph took."}, []string{"account"}),
		upstreamTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "mailbridge_upstream_request_duration_seconds",
			Help: "Requests to Microsoft's token endpoint and Graph, by operation.", Buckets: prometheus.ExponentialBuckets(0.005, 2.5, 10)},
			[]string{"op"}),
		upstreamStatus: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mailbridge_upstream_responses_total",
			Help: "Answers of Microsoft's token endpoint (op=\"token\": refreshes and failures) and Graph, by operation and HTTP status (0: no answer)."},
			[]string{"op", "status"}),
		retrBytes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mailbridge_pop3_retr_bytes_total",
			Help: "Bytes of messages downloaded with RETR through the bridge."}, []string{"account"}),
	}
	m.proxiedBytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mailbridge_proxied_bytes_total",
		Help: "Bytes relayed after login, by protocol and direction (in: from the client, out: to it)."}, []string{"proto", "direction"})
	m.reg.MustRegister(m.proxiedBytes)
	m.reg.MustRegister(m.sessions, m.activeSessions, m.messages, m.messageBytes, m.upstreamTime, m.upstreamStatus, m.retrBytes,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// ObserveUpstream is the upstream.Observer of the bridge's HTTP client.
func (m *Metrics) ObserveUpstream(op string, status int, d time.Duration) {
	m.upstreamTime.WithLabelValues(op).Observe(d.Seconds())
	m.upstreamStatus.WithLabelValues(op, strconv.Itoa(status)).Inc()
}

// Message counts one message's outcome: result is sent, queued, failed or
// refused; reason is the failure's kind, "" for none.
func (m *Metrics) Message(account, result, reason string, bytes int64) {
	m.messages.WithLabelValues(account, result, reason).Inc()
	if result == "sent" {
		m.messageBytes.WithLabelValues(account).Add(float64(bytes))
	}
}

// Final counts a message's final outcome (f.Result "sent", "failed" or
// "not sent", counted as refused) and keeps its line for the status page.
func (m *Metrics) Final(f FinalMessage, bytes int64) {
	result := f.Result
	if result == "not sent" {
		result = "refused"
	}
	m.Message(f.Account, result, f.Reason, bytes)
	m.activity.Record(f)
}

// Activity is the record of final outcomes that Final keeps.
func (m *Metrics) Activity() *Activity { return m.activity }

// MailboxEvent records a POP3 or IMAP "login" or "download" (a message
// retrieved) of account, for the status page.
func (m *Metrics) MailboxEvent(account, proto, event string) {
	if m != nil {
		m.activity.Mailbox(account, proto, event)
	}
}

// Health reports whether the bridge is healthy and, if not, why.
type Health func() (ok bool, reasons []string)

// MaxConnections bounds the admin listener's open connections: at the
// cap the longest idle one is closed for a new one, and only when every
// one has a request in flight is a new one answered 503 and closed.
const MaxConnections = 32

// Serve serves /metrics and /healthz on ln until it is closed, and hands
// every other request to page (the status page). A keep-alive connection
// silent for idle is closed; a request has 10 s for its header and 30 s
// in all.
func Serve(ln net.Listener, m *Metrics, health Health, page http.Handler, idle time.Duration, log zerolog.Logger) error {
	mux := http.NewServeMux()
	mux.Handle("/", page)
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		ok, reasons := health()
		w.Header().Set("Content-Type", "application/json")
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
			json.NewEncoder(w).Encode(map[string]any{"status": "unhealthy", "reasons": reasons})
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"status": "ok"})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: idle, ErrorLog: stdlog.New(io.Discard, "", 0)}
	// At the cap, the connection idle the longest (no request in flight:
	// a keep-alive, or one that never sent a request) is closed for the
	// new one, so that idle connections cannot make /healthz fail.
	var mu sync.Mutex
	idleSince := map[net.Conn]time.Time{}
	srv.ConnState = func(c net.Conn, st http.ConnState) {
		mu.Lock()
		defer mu.Unlock()
		if st == http.StateNew || st == http.StateIdle {
			idleSince[c] = time.Now()
		} else {
			delete(idleSince, c)
		}
	}
	adminLog := log.With().Str("proto", "admin").Logger()
	evict := func() bool {
		mu.Lock()
		var victim net.Conn
		for c, at := range idleSince {
			if victim == nil || at.Before(idleSince[victim]) {
				victim = c
			}
		}
		delete(idleSince, victim)
		mu.Unlock()
		if victim == nil {
			return false
		}
		adminLog.Info().Str("remote", victim.RemoteAddr().String()).Int("max_connections", MaxConnections).Msg("idle admin connection closed to make room")
		victim.Close()
		return true
	}
	lim := &conntrack.LimitListener{Listener: ln, Slots: make(chan struct{}, MaxConnections), Key: "the admin connection cap", Evict: evict,
		Refusal: "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", Log: adminLog}
	return srv.Serve(lim)
}

// SessionStarted counts a client session of proto that began.
func (m *Metrics) SessionStarted(proto string) { m.sessions.WithLabelValues(proto).Inc() }

// ConnectionOpened and ConnectionClosed keep the active-sessions gauge:
// every open connection, logged in or not.
func (m *Metrics) ConnectionOpened(proto string) { m.activeSessions.WithLabelValues(proto).Inc() }

// ConnectionClosed: see ConnectionOpened.
func (m *Metrics) ConnectionClosed(proto string) { m.activeSessions.WithLabelValues(proto).Dec() }

// RetrBytes counts bytes of messages downloaded through the bridge.
func (m *Metrics) RetrBytes(account string, n int64) {
	m.retrBytes.WithLabelValues(account).Add(float64(n))
}

// Queue is what the metrics read of the outbox.
type Queue interface {
	// Depth returns the number of queued messages and the age of the
	// oldest.
	Depth() (int, time.Duration)
	// FailedCount returns the number of messages in failed/.
	FailedCount() int
}

// RegisterQueue adds the outbox's gauges.
func (m *Metrics) RegisterQueue(q Queue) {
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "mailbridge_outbox_messages", Help: "Messages waiting in the outbox."},
			func() float64 { n, _ := q.Depth(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "mailbridge_outbox_oldest_age_seconds", Help: "Age of the oldest message waiting in the outbox."},
			func() float64 { _, oldest := q.Depth(); return oldest.Seconds() }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "mailbridge_outbox_failed", Help: "Messages in the outbox's failed/ directory: given up, waiting for `mailbridge queue retry` or `delete`."},
			func() float64 { return float64(q.FailedCount()) }),
	)
}

// ProxiedBytes counts n bytes relayed for proto in direction ("in", "out").
func (m *Metrics) ProxiedBytes(proto, direction string, n int) {
	m.proxiedBytes.WithLabelValues(proto, direction).Add(float64(n))
}
