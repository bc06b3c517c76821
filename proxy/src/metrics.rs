//! The proxy's Prometheus metrics. Label sets are bounded: a direction, a peer identity
//! (one per service account in the mesh) and a TLS state; never IPs or ports.
//!
//! Handles for one connection are looked up once when it opens ([`Metrics::tcp_connection`]);
//! byte counts then go straight to atomics, with no lock on the data path.

use std::fmt::{self, Write};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum TlsState {
    /// Mesh mTLS; the peer's identity is known.
    Mutual,
    /// Plaintext (an unmeshed peer or destination).
    Plaintext,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, enc: &mut LabelValueEncoder) -> fmt::Result {
        enc.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        })
    }
}

impl EncodeLabelValue for TlsState {
    fn encode(&self, enc: &mut LabelValueEncoder) -> fmt::Result {
        enc.write_str(match self {
            TlsState::Mutual => "true",
            TlsState::Plaintext => "false",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: Direction,
    /// The other proxy's SPIFFE id: the client's on inbound, the server's on outbound; empty for plaintext.
    pub peer_identity: String,
    pub tls: TlsState,
}

/// A label value shared by many series without copying: route and service names are
/// built once per discovery update, and each request only clones the `Arc`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl Name {
    pub fn new(s: &str) -> Self {
        Name(Arc::from(s))
    }
}

impl EncodeLabelValue for Name {
    fn encode(&self, enc: &mut LabelValueEncoder) -> fmt::Result {
        enc.write_str(&self.0)
    }
}

/// The gRPC status of a response ("" for plain HTTP).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct GrpcStatus(pub Option<u16>);

impl EncodeLabelValue for GrpcStatus {
    fn encode(&self, enc: &mut LabelValueEncoder) -> fmt::Result {
        match self.0 {
            Some(code) => code.encode(enc),
            None => Ok(()),
        }
    }
}

/// Who a request went to, as far as metrics may say (bounded: names, never paths or IPs).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub direction: Direction,
    /// HTTPRoute name, or "default".
    pub route: Name,
    /// The Service the app addressed ("name.namespace"), "" when not a Service.
    pub dst_service: Name,
    /// The backend Service chosen by the traffic split ("name.namespace").
    pub dst_backend: Name,
    /// Inbound: the calling proxy's SPIFFE id (the source workload's identity; bounded by
    /// the service accounts that call this pod), "" for plaintext. Outbound: "" (the
    /// source is the scraped proxy itself).
    pub client_id: Name,
    pub tls: TlsState,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub status_code: u16,
    pub grpc_status: GrpcStatus,
    // The derive moves the encoder into a flattened set, so it must come last.
    #[prometheus(flatten)]
    pub route: RouteLabels,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub route: Name,
    pub dst_service: Name,
}

/// An inbound authorization outcome. `audit_deny` is counted in addition to the `allow`
/// of the same access, so allow + deny is every access exactly once.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum AuthzDecision {
    Allow,
    Deny,
    AuditDeny,
}

impl EncodeLabelValue for AuthzDecision {
    fn encode(&self, enc: &mut LabelValueEncoder) -> fmt::Result {
        enc.write_str(match self {
            AuthzDecision::Allow => "allow",
            AuthzDecision::Deny => "deny",
            AuthzDecision::AuditDeny => "audit_deny",
        })
    }
}

/// The index of the deciding rule in its policy ("" when no rule decided).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct RuleLabel(pub Option<usize>);

impl EncodeLabelValue for RuleLabel {
    fn encode(&self, enc: &mut LabelValueEncoder) -> fmt::Result {
        match self.0 {
            Some(index) => (index as u64).encode(enc),
            None => Ok(()),
        }
    }
}

/// The pod's port an access was for; "other" once too many distinct ports have been seen.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct PortLabel(pub Option<u16>);

impl EncodeLabelValue for PortLabel {
    fn encode(&self, enc: &mut LabelValueEncoder) -> fmt::Result {
        match self.0 {
            Some(port) => port.encode(enc),
            None => enc.write_str("other"),
        }
    }
}

/// Bounded by the cluster's configuration: policy names, rule indexes, the pod's ports and
/// the mesh's identities.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub decision: AuthzDecision,
    /// "namespace/name" of the deciding AuthorizationPolicy, or "default".
    pub policy: Name,
    pub rule: RuleLabel,
    pub port: PortLabel,
    /// Inbound routes are not named yet: always "default".
    pub route: Name,
    /// The client's SPIFFE id; "" for plaintext.
    pub client_id: Name,
}

impl TcpLabels {
    pub fn plaintext(direction: Direction) -> Self {
        TcpLabels {
            direction,
            peer_identity: String::new(),
            tls: TlsState::Plaintext,
        }
    }

    pub fn mutual(direction: Direction, peer_identity: String) -> Self {
        TcpLabels {
            direction,
            peer_identity,
            tls: TlsState::Mutual,
        }
    }
}

type HistogramFamily = Family<TcpLabels, Histogram, fn() -> Histogram>;
type LatencyFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    tcp_open: Family<TcpLabels, Gauge>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_read_bytes: Family<TcpLabels, Counter>,
    tcp_write_bytes: Family<TcpLabels, Counter>,
    tcp_duration: HistogramFamily,
    http_requests: Family<RouteLabels, Counter>,
    http_responses: Family<ResponseLabels, Counter>,
    http_latency: LatencyFamily,
    pub http_retries: Family<RetryLabels, Counter>,
    pub http_timeouts: Family<RetryLabels, Counter>,
    pub http_detect_timeouts: Counter,
    pub cert_expiry: Gauge,
    pub control_plane_connected: Gauge,
    pub discovery_failures: Counter,
    pub inbound_detect_timeouts: Counter,
    authz: Family<AuthzLabels, Counter>,
    /// Counters of `authz` already looked up (see [`SeenCounters`]).
    authz_seen: SeenCounters<AuthzLabels>,
    pub inbound_policy_rejected: Counter,
    pub trace_spans_exported: Counter,
    pub trace_spans_dropped: Counter,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s, doubling: fine enough near the p50/p99 of a service call.
    Histogram::new(buckets(0.001, 2.0, 15))
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~4.6 h: TCP connections live from a request to a whole day.
    Histogram::new(buckets(0.001, 4.0, 13))
}

/// `start`, `start * factor`, … (`count` bounds): prometheus-client's `exponential_buckets`
/// by repeated multiplication instead of `powf`, the only other libm call in the proxy
/// (see `balance::decay`). Factors are powers of two, so the bounds are the same exactly.
fn buckets(start: f64, factor: f64, count: usize) -> impl Iterator<Item = f64> {
    std::iter::successors(Some(start), move |b| Some(b * factor)).take(count)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("weft");
        let tcp_open = Family::<TcpLabels, Gauge>::default();
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_read_bytes = Family::<TcpLabels, Counter>::default();
        let tcp_write_bytes = Family::<TcpLabels, Counter>::default();
        let tcp_duration: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let http_requests = Family::<RouteLabels, Counter>::default();
        let http_responses = Family::<ResponseLabels, Counter>::default();
        let http_latency: LatencyFamily = Family::new_with_constructor(latency_histogram);
        let http_retries = Family::<RetryLabels, Counter>::default();
        let http_timeouts = Family::<RetryLabels, Counter>::default();
        let http_detect_timeouts = Counter::default();
        registry.register(
            "http_requests",
            "HTTP requests received (outbound: from the app)",
            http_requests.clone(),
        );
        registry.register(
            "http_responses",
            "HTTP responses by status code and gRPC status, counted when the response ends",
            http_responses.clone(),
        );
        registry.register(
            "http_response_latency_seconds",
            "Time from request to response headers",
            http_latency.clone(),
        );
        registry.register(
            "http_retries",
            "Retries sent (each one also passed the retry budget)",
            http_retries.clone(),
        );
        registry.register(
            "http_timeouts",
            "Requests answered 504 by a route timeout",
            http_timeouts.clone(),
        );
        registry.register(
            "outbound_detect_timeouts",
            "Outbound connections that sent nothing before the detection timeout (treated as opaque)",
            http_detect_timeouts.clone(),
        );
        let cert_expiry = Gauge::default();
        let control_plane_connected = Gauge::default();
        let discovery_failures = Counter::default();
        let inbound_detect_timeouts = Counter::default();
        registry.register(
            "tcp_open_connections",
            "TCP connections currently open",
            tcp_open.clone(),
        );
        registry.register(
            "tcp_connections_opened",
            "TCP connections accepted",
            tcp_opened.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from the peer",
            tcp_read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to the peer",
            tcp_write_bytes.clone(),
        );
        registry.register(
            "tcp_connection_duration_seconds",
            "Lifetime of closed TCP connections",
            tcp_duration.clone(),
        );
        registry.register(
            "identity_cert_expiry_timestamp_seconds",
            "Expiry of the current workload certificate (Unix time)",
            cert_expiry.clone(),
        );
        registry.register(
            "control_plane_connected",
            "1 when the last call to the control plane succeeded",
            control_plane_connected.clone(),
        );
        registry.register(
            "discovery_failures",
            "Outbound connections refused because discovery gave no answer",
            discovery_failures.clone(),
        );
        registry.register(
            "inbound_detect_timeouts",
            "Inbound connections that sent nothing before the detection timeout (treated as opaque)",
            inbound_detect_timeouts.clone(),
        );
        let authz = Family::<AuthzLabels, Counter>::default();
        let inbound_policy_rejected = Counter::default();
        registry.register(
            "inbound_authz",
            "Inbound authorization decisions per connection (opaque TCP) or request (HTTP)",
            authz.clone(),
        );
        registry.register(
            "inbound_policy_rejected",
            "Inbound policy updates refused because they did not compile (the last good one stays)",
            inbound_policy_rejected.clone(),
        );
        let trace_spans_exported = Counter::default();
        let trace_spans_dropped = Counter::default();
        registry.register(
            "trace_spans_exported",
            "Spans the trace collector accepted",
            trace_spans_exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans dropped: the queue was full, or the collector failed or refused them",
            trace_spans_dropped.clone(),
        );
        registry.register_collector(Box::new(crate::process::ProcessCollector));
        Arc::new(Metrics {
            registry,
            tcp_open,
            tcp_opened,
            tcp_read_bytes,
            tcp_write_bytes,
            tcp_duration,
            http_requests,
            http_responses,
            http_latency,
            http_retries,
            http_timeouts,
            http_detect_timeouts,
            cert_expiry,
            control_plane_connected,
            discovery_failures,
            inbound_detect_timeouts,
            authz,
            authz_seen: SeenCounters::default(),
            inbound_policy_rejected,
            trace_spans_exported,
            trace_spans_dropped,
        })
    }

    /// Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a newly opened connection and returns the handles it updates while open.
    pub fn tcp_connection(&self, labels: TcpLabels) -> TcpConnMetrics {
        self.tcp_opened.get_or_create(&labels).inc();
        let open = self.tcp_open.get_or_create(&labels).clone();
        open.inc();
        TcpConnMetrics {
            open,
            read_bytes: self.tcp_read_bytes.get_or_create(&labels).clone(),
            write_bytes: self.tcp_write_bytes.get_or_create(&labels).clone(),
            duration: self.tcp_duration.get_or_create(&labels).clone(),
            opened_at: Instant::now(),
        }
    }
}

impl Metrics {
    pub fn authz_decision(&self, labels: &AuthzLabels) {
        self.authz_seen
            .get_or_insert(labels, |l| self.authz.get_or_create(l).clone())
            .inc();
    }

    /// Resolves the request counter and latency histogram of one label set, once: callers
    /// keep the result per backend or per connection so requests skip the lookups.
    pub fn http_route(&self, labels: RouteLabels) -> RouteMetrics {
        RouteMetrics(Arc::new(RouteShared {
            requests: self.http_requests.get_or_create(&labels).clone(),
            latency: self.http_latency.get_or_create(&labels).clone(),
            responses: self.http_responses.clone(),
            responses_seen: SeenCounters::default(),
            labels,
        }))
    }

    /// Counts a request and returns what its response is recorded with.
    pub fn http_request(&self, labels: RouteLabels) -> HttpRequestMetrics {
        self.http_route(labels).request()
    }
}

/// Counters of a family already looked up, found again by comparing labels (shared `Name`s
/// compare by pointer) instead of hashing them into the family's map on every request.
/// Bounded: label sets beyond the first [`SeenCounters::MAX`] are looked up every time.
struct SeenCounters<L>(RwLock<Vec<(L, Counter)>>);

impl<L> Default for SeenCounters<L> {
    fn default() -> Self {
        SeenCounters(RwLock::new(Vec::new()))
    }
}

impl<L: PartialEq + Clone> SeenCounters<L> {
    const MAX: usize = 32;

    fn get_or_insert(&self, labels: &L, lookup: impl FnOnce(&L) -> Counter) -> Counter {
        let found = {
            let seen = self.0.read().unwrap_or_else(|p| p.into_inner());
            seen.iter()
                .find(|(l, _)| l == labels)
                .map(|(_, c)| c.clone())
        };
        if let Some(counter) = found {
            return counter;
        }
        let counter = lookup(labels);
        let mut seen = self.0.write().unwrap_or_else(|p| p.into_inner());
        if seen.len() < Self::MAX && !seen.iter().any(|(l, _)| l == labels) {
            seen.push((labels.clone(), counter.clone()));
        }
        counter
    }
}

/// The per-request metric handles of one label set (see [`Metrics::http_route`]).
#[derive(Clone)]
pub struct RouteMetrics(Arc<RouteShared>);

struct RouteShared {
    labels: RouteLabels,
    requests: Counter,
    latency: Histogram,
    responses: Family<ResponseLabels, Counter>,
    /// Response counters of this label set by (status, gRPC status).
    responses_seen: SeenCounters<(u16, GrpcStatus)>,
}

impl fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RouteMetrics").field(&self.0.labels).finish()
    }
}

impl RouteMetrics {
    pub fn request(&self) -> HttpRequestMetrics {
        self.0.requests.inc();
        HttpRequestMetrics {
            route: self.0.clone(),
            started: Instant::now(),
        }
    }
}

/// One request in flight: records latency at response headers and the response (with its
/// gRPC status, known only at the end of the body) once.
pub struct HttpRequestMetrics {
    route: Arc<RouteShared>,
    started: Instant,
}

impl HttpRequestMetrics {
    pub fn response_headers(&self) {
        self.route
            .latency
            .observe(self.started.elapsed().as_secs_f64());
    }

    pub fn response_end(&self, status_code: u16, grpc_status: GrpcStatus) {
        let route = &self.route;
        route
            .responses_seen
            .get_or_insert(&(status_code, grpc_status), |_| {
                let labels = ResponseLabels {
                    route: route.labels.clone(),
                    status_code,
                    grpc_status,
                };
                route.responses.get_or_create(&labels).clone()
            })
            .inc();
    }
}

/// One open connection's metric handles; closing (dropping) it records the duration.
pub struct TcpConnMetrics {
    open: Gauge,
    pub read_bytes: Counter,
    pub write_bytes: Counter,
    duration: Histogram,
    opened_at: Instant,
}

impl Drop for TcpConnMetrics {
    fn drop(&mut self) {
        self.open.dec();
        self.duration
            .observe(self.opened_at.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_are_exactly_prometheus_clients_exponential_ones() {
        use prometheus_client::metrics::histogram::exponential_buckets;
        for (factor, count) in [(2.0, 15), (4.0, 13)] {
            let ours: Vec<f64> = buckets(0.001, factor, count).collect();
            let theirs: Vec<f64> = exponential_buckets(0.001, factor, count as u16).collect();
            assert_eq!(ours, theirs, "factor {factor}");
        }
    }

    #[test]
    fn responses_are_counted_per_status_through_the_route_cache() {
        let m = Metrics::new();
        let route = m.http_route(RouteLabels {
            direction: Direction::Inbound,
            route: Name::new("default"),
            dst_service: Name::new(""),
            dst_backend: Name::new(""),
            client_id: Name::new("spiffe://cluster.local/ns/shop/sa/client"),
            tls: TlsState::Mutual,
        });
        for (status, grpc) in [
            (200, None),
            (200, None),
            (503, None),
            (200, Some(14)),
            (200, None),
        ] {
            route.request().response_end(status, GrpcStatus(grpc));
        }
        let text = m.encode();
        for (status, grpc, count) in [("200", "", 3), ("503", "", 1), ("200", "14", 1)] {
            let line = format!(
                r#"weft_http_responses_total{{status_code="{status}",grpc_status="{grpc}",direction="inbound",route="default",dst_service="",dst_backend="",client_id="spiffe://cluster.local/ns/shop/sa/client",tls="true"}} {count}"#
            );
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        assert!(text.contains(r#"weft_http_requests_total{direction="inbound",route="default",dst_service="",dst_backend="",client_id="spiffe://cluster.local/ns/shop/sa/client",tls="true"} 5"#), "{text}");
    }

    #[test]
    fn connection_metrics_are_exposed_with_labels() {
        let m = Metrics::new();
        let labels = TcpLabels {
            direction: Direction::Inbound,
            peer_identity: "spiffe://cluster.local/ns/a/sa/b".into(),
            tls: TlsState::Mutual,
        };
        let conn = m.tcp_connection(labels);
        conn.read_bytes.inc_by(10);
        let text = m.encode();
        assert!(text.contains(
            r#"weft_tcp_open_connections{direction="inbound",peer_identity="spiffe://cluster.local/ns/a/sa/b",tls="true"} 1"#
        ), "{text}");
        assert!(text.contains(
            r#"weft_tcp_read_bytes_total{direction="inbound",peer_identity="spiffe://cluster.local/ns/a/sa/b",tls="true"} 10"#
        ), "{text}");
        drop(conn);
        let text = m.encode();
        assert!(text.contains(r#"weft_tcp_open_connections{direction="inbound",peer_identity="spiffe://cluster.local/ns/a/sa/b",tls="true"} 0"#), "{text}");
        assert!(
            text.contains("weft_tcp_connection_duration_seconds_count"),
            "{text}"
        );
    }
}
