package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"mailbridge/upstream"
)

// bridgeMetrics are the bridge's Prometheus metrics, in a registry of its
// own.
type bridgeMetrics struct {
	reg            *prometheus.Registry
	sessions       *prometheus.CounterVec // by proto
	activeSessions *prometheus.GaugeVec   // by proto
	messages       *prometheus.CounterVec // by account, result, reason
	messageBytes   *prometheus.CounterVec // by account
	upstreamTime   *prometheus.HistogramVec
	upstreamStatus *prometheus.CounterVec // by op, status
	retrBytes      *prometheus.CounterVec // by account
}

func newBridgeMetrics(b *Bridge) *bridgeMetrics {
	m := &bridgeMetrics{
		reg: prometheus.NewRegistry(),
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
	m.reg.MustRegister(m.sessions, m.activeSessions, m.messages, m.messageBytes, m.upstreamTime, m.upstreamStatus, m.retrBytes,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if b.worker != nil {
		w := b.worker
		m.reg.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "mailbridge_outbox_messages", Help: "Messages waiting in the outbox."},
				func() float64 { n, _ := w.depth(); return float64(n) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "mailbridge_outbox_oldest_age_seconds", Help: "Age of the oldest message waiting in the outbox."},
				func() float64 { _, oldest := w.depth(); return oldest.Seconds() }),
		)
	}
	return m
}

// observeUpstream is the upstream.Observer of the bridge's HTTP client.
func (m *bridgeMetrics) observeUpstream(op string, status int, d time.Duration) {
	m.upstreamTime.WithLabelValues(op).Observe(d.Seconds())
	m.upstreamStatus.WithLabelValues(op, strconv.Itoa(status)).Inc()
}

// message counts one message's outcome.
func (m *bridgeMetrics) message(account, result string, err error, bytes int64) {
	m.messages.WithLabelValues(account, result, reasonLabel(err)).Inc()
	if result == "sent" {
		m.messageBytes.WithLabelValues(account).Add(float64(bytes))
	}
}

// reasonLabel names an error's cause for a metric label, from a small set.
func reasonLabel(err error) string {
	if err == nil {
		return ""
	}
	var apiErr *upstream.APIError
	var tokErr *upstream.TokenError
	var se *smtp.SMTPError
	switch {
	case errors.As(err, &apiErr):
		if apiErr.Code != "" {
			return "graph_" + apiErr.Code
		}
		return fmt.Sprintf("graph_http_%d", apiErr.Status)
	case errors.As(err, &tokErr):
		return "token"
	case errors.Is(err, errOutboxFull):
		return "outbox_full"
	case errors.Is(err, errSpool):
		return "disk"
	case errors.As(err, &se):
		return fmt.Sprintf("smtp_%d_%d_%d_%d", se.Code, se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2])
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	}
	return "network"
}

// health reports whether the bridge is serving and every account's last
// token request succeeded (or none was made yet), with the reasons if not.
func (b *Bridge) health() (bool, []string) {
	var reasons []string
	if !b.serving.Load() {
		reasons = append(reasons, "the listeners are not up")
	}
	for _, a := range b.Accounts() {
		for _, ts := range []*upstream.TokenSource{a.Tokens, a.POP3Tokens} {
			if err := ts.LastError(); err != nil {
				r := fmt.Sprintf("account %s: %v", a.Config.Name, err)
				var tokErr *upstream.TokenError
				if errors.As(err, &tokErr) {
					r += " (fix: " + tokErr.Hint() + ")"
				}
				reasons = append(reasons, r)
			}
		}
	}
	return len(reasons) == 0, reasons
}

// serveAdmin serves /metrics and /healthz on ln until it is closed.
func (b *Bridge) serveAdmin(ln net.Listener) {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(b.metrics.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		ok, reasons := b.health()
		w.Header().Set("Content-Type", "application/json")
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
			json.NewEncoder(w).Encode(map[string]any{"status": "unhealthy", "reasons": reasons})
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"status": "ok"})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	srv.Serve(ln)
}
