//! The exporter task: drains the span queue into batches (up to [`MAX_BATCH`] spans or every
//! [`FLUSH_INTERVAL`]) and sends each as one OTLP/gRPC `ExportTraceServiceRequest` to the
//! collector, in plaintext. An export that fails or takes longer than [`EXPORT_TIMEOUT`]
//! drops its batch (counted) and pauses exports with a doubling backoff; the queue keeps
//! being drained meanwhile, so requests never wait on the collector.

use std::time::Duration;

use http::Version;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::{SpanData, SpanKind, TraceError};

pub const MAX_BATCH: usize = 512;
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The semantic conventions the attribute names follow.
const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.27.0";

/// The collector's gRPC endpoint: `host:port` (or a full `http://host:port`).
pub fn endpoint(collector: &str) -> Result<Endpoint, TraceError> {
    let uri = if collector.contains("://") {
        collector.to_string()
    } else {
        format!("http://{collector}")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|_| TraceError::Collector(collector.to_string()))?;
    if endpoint.uri().port_u16().is_none() {
        return Err(TraceError::Collector(collector.to_string()));
    }
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT)
        .tcp_nodelay(true))
}

pub fn resource(attrs: &[(&'static str, String)]) -> Resource {
    Resource {
        attributes: attrs.iter().map(|(k, v)| string(k, v.clone())).collect(),
        ..Default::default()
    }
}

/// Runs until every sender is gone (the process is ending).
pub async fn run(
    mut rx: mpsc::Receiver<SpanData>,
    endpoint: Endpoint,
    resource: Resource,
    exported: Counter,
    dropped: Counter,
) {
    let mut exporter = Exporter {
        client: TraceServiceClient::new(endpoint.connect_lazy()),
        resource,
        exported,
        dropped,
        paused_until: None,
        backoff: MIN_BACKOFF,
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let room = MAX_BATCH - batch.len();
        tokio::select! {
            n = rx.recv_many(&mut batch, room) => {
                if n == 0 {
                    exporter.flush(std::mem::take(&mut batch)).await;
                    return;
                }
                if batch.len() < MAX_BATCH {
                    continue;
                }
            }
            _ = tick.tick() => {
                if batch.is_empty() {
                    continue;
                }
            }
        }
        let full = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        exporter.flush(full).await;
    }
}

struct Exporter {
    client: TraceServiceClient<Channel>,
    resource: Resource,
    exported: Counter,
    dropped: Counter,
    /// While set, batches are dropped without trying: the collector failed recently.
    paused_until: Option<Instant>,
    backoff: Duration,
}

impl Exporter {
    async fn flush(&mut self, spans: Vec<SpanData>) {
        if spans.is_empty() {
            return;
        }
        let n = spans.len() as u64;
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            self.dropped.inc_by(n);
            return;
        }
        let request = self.request(spans);
        match tokio::time::timeout(EXPORT_TIMEOUT, self.client.export(request)).await {
            Ok(Ok(rsp)) => {
                let rejected = rsp
                    .into_inner()
                    .partial_success
                    .map_or(0, |p| p.rejected_spans.clamp(0, n as i64) as u64);
                self.exported.inc_by(n - rejected);
                self.dropped.inc_by(rejected);
                if self.paused_until.take().is_some() {
                    tracing::info!("trace collector reachable again");
                }
                self.backoff = MIN_BACKOFF;
            }
            result => {
                self.dropped.inc_by(n);
                let error = match result {
                    Ok(Err(status)) => status.to_string(),
                    _ => "timed out".to_string(),
                };
                // One line per outage, not per batch.
                if self.backoff == MIN_BACKOFF {
                    tracing::warn!(%error, spans = n, "exporting traces failed; dropping spans until the collector answers");
                }
                self.paused_until = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    fn request(&self, spans: Vec<SpanData>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "weft-proxy".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: spans.into_iter().map(to_proto).collect(),
                    schema_url: SCHEMA_URL.into(),
                }],
                schema_url: String::new(),
            }],
        }
    }
}

fn value(v: any_value::Value) -> Option<AnyValue> {
    Some(AnyValue { value: Some(v) })
}

fn string(key: &str, v: String) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value(any_value::Value::StringValue(v)),
        ..Default::default()
    }
}

fn int(key: &str, v: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value(any_value::Value::IntValue(v)),
        ..Default::default()
    }
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "",
    }
}

/// Methods outside the registry's list are reported as `_OTHER` (bounded span names).
fn known_method(m: &http::Method) -> Option<&str> {
    use http::Method as M;
    [
        M::GET,
        M::POST,
        M::PUT,
        M::DELETE,
        M::HEAD,
        M::OPTIONS,
        M::PATCH,
        M::CONNECT,
        M::TRACE,
    ]
    .contains(m)
    .then(|| m.as_str())
}

/// gRPC codes a server span reports as errors (the rest are the client's doing).
fn grpc_server_error(code: u16) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// The OTLP span, with attributes from the HTTP semantic conventions (client: `url.full`,
/// server: `url.path` + `url.scheme`; query strings are left out: they may carry secrets)
/// and weft's own (`weft.direction`, `weft.route`, `weft.peer.identity`).
pub fn to_proto(d: SpanData) -> Span {
    let mut attrs = Vec::with_capacity(14);
    let method = known_method(&d.method);
    attrs.push(string(
        "http.request.method",
        method.unwrap_or("_OTHER").to_string(),
    ));
    if method.is_none() {
        attrs.push(string("http.request.method_original", d.method.to_string()));
    }
    let authority = d
        .uri
        .authority()
        .map(|a| (a.host().to_string(), a.port_u16()))
        .or_else(|| {
            let host = d.host.as_ref()?.to_str().ok()?;
            let a: http::uri::Authority = host.parse().ok()?;
            Some((a.host().to_string(), a.port_u16()))
        });
    let scheme = d.uri.scheme_str().unwrap_or("http").to_string();
    match d.kind {
        SpanKind::Client => {
            let host = authority.as_ref().map_or("", |(h, _)| h.as_str());
            let full = match d.uri.authority() {
                Some(a) => format!("{scheme}://{a}{}", d.uri.path()),
                None => format!("{scheme}://{host}{}", d.uri.path()),
            };
            attrs.push(string("url.full", full));
            attrs.push(string("weft.direction", "outbound".into()));
        }
        SpanKind::Server => {
            attrs.push(string("url.path", d.uri.path().to_string()));
            attrs.push(string("url.scheme", scheme));
            attrs.push(string("weft.direction", "inbound".into()));
        }
    }
    if let Some((host, port)) = authority {
        attrs.push(string("server.address", host));
        attrs.push(int("server.port", i64::from(port.unwrap_or(80))));
    }
    if let Some(addr) = d.peer_addr {
        match d.kind {
            SpanKind::Client => {
                attrs.push(string("network.peer.address", addr.ip().to_string()));
                attrs.push(int("network.peer.port", i64::from(addr.port())));
            }
            SpanKind::Server => attrs.push(string("client.address", addr.ip().to_string())),
        }
    }
    let version = protocol_version(d.version);
    if !version.is_empty() {
        attrs.push(string("network.protocol.version", version.into()));
    }
    if let Some(route) = &d.route {
        attrs.push(string("weft.route", route.0.to_string()));
    }
    if let Some(id) = &d.peer_identity {
        attrs.push(string("weft.peer.identity", id.0.to_string()));
    }
    if let Some(code) = d.status_code {
        attrs.push(int("http.response.status_code", i64::from(code)));
    }
    if let Some(code) = d.grpc_status {
        attrs.push(int("rpc.grpc.status_code", i64::from(code)));
    }
    if let Some(why) = d.proxy_error.as_ref().and_then(|v| v.to_str().ok()) {
        attrs.push(string("weft.error", why.to_string()));
    }
    // Client spans: 4xx and 5xx are errors; server spans: only 5xx (semantic conventions).
    let http_error = d.status_code.filter(|&c| match d.kind {
        SpanKind::Client => c >= 400,
        SpanKind::Server => c >= 500,
    });
    let grpc_error = d.grpc_status.filter(|&c| match d.kind {
        SpanKind::Client => c != 0,
        SpanKind::Server => grpc_server_error(c),
    });
    let status = if let Some(why) = d.failure {
        attrs.push(string("error.type", "_OTHER".into()));
        Some(Status {
            message: why.into(),
            code: status::StatusCode::Error as i32,
        })
    } else if let Some(code) = grpc_error {
        attrs.push(string("error.type", code.to_string()));
        Some(Status {
            message: format!("gRPC status {code}"),
            code: status::StatusCode::Error as i32,
        })
    } else if let Some(code) = http_error {
        attrs.push(string("error.type", code.to_string()));
        Some(Status {
            message: String::new(),
            code: status::StatusCode::Error as i32,
        })
    } else {
        None
    };
    // W3C trace flags (sampled) plus "the parent is remote" when there is a parent.
    let mut flags = 0x01 | 0x100;
    if d.parent_span_id.is_some() {
        flags |= 0x200;
    }
    Span {
        trace_id: d.trace_id.to_vec(),
        span_id: d.span_id.to_vec(),
        trace_state: d
            .trace_state
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
        parent_span_id: d.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags,
        name: method.unwrap_or("HTTP").to_string(),
        kind: match d.kind {
            SpanKind::Client => span::SpanKind::Client as i32,
            SpanKind::Server => span::SpanKind::Server as i32,
        },
        start_time_unix_nano: d.start_unix_nanos,
        end_time_unix_nano: d.end_unix_nanos,
        attributes: attrs,
        status,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Name;

    fn span(kind: SpanKind) -> SpanData {
        SpanData {
            kind,
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: Some([3; 8]),
            trace_state: None,
            start_unix_nanos: 10,
            end_unix_nanos: 20,
            method: http::Method::GET,
            uri: "http://web.shop:8080/api/items?token=secret"
                .parse()
                .unwrap(),
            host: None,
            version: Version::HTTP_2,
            peer_addr: Some("10.0.0.7:8080".parse().unwrap()),
            peer_identity: Some(Name::new("spiffe://cluster.local/ns/shop/sa/web")),
            route: Some(Name::new("web-route")),
            status_code: Some(200),
            grpc_status: None,
            proxy_error: None,
            failure: None,
        }
    }

    fn attr(s: &Span, key: &str) -> Option<any_value::Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    }

    fn text(v: &str) -> Option<any_value::Value> {
        Some(any_value::Value::StringValue(v.into()))
    }

    fn is_error(s: &Span) -> bool {
        s.status
            .as_ref()
            .is_some_and(|st| st.code == status::StatusCode::Error as i32)
    }

    #[test]
    fn client_span_attributes_follow_the_conventions() {
        let s = to_proto(span(SpanKind::Client));
        assert_eq!(s.kind, span::SpanKind::Client as i32);
        assert_eq!(s.name, "GET");
        assert_eq!(s.parent_span_id, vec![3; 8]);
        assert_eq!((s.start_time_unix_nano, s.end_time_unix_nano), (10, 20));
        assert_eq!(attr(&s, "http.request.method"), text("GET"));
        // No query string: it may carry secrets.
        assert_eq!(attr(&s, "url.full"), text("http://web.shop:8080/api/items"));
        assert_eq!(attr(&s, "url.path"), None);
        assert_eq!(attr(&s, "server.address"), text("web.shop"));
        assert_eq!(
            attr(&s, "server.port"),
            Some(any_value::Value::IntValue(8080))
        );
        assert_eq!(attr(&s, "network.peer.address"), text("10.0.0.7"));
        assert_eq!(attr(&s, "network.protocol.version"), text("2"));
        assert_eq!(
            attr(&s, "http.response.status_code"),
            Some(any_value::Value::IntValue(200))
        );
        assert_eq!(attr(&s, "weft.route"), text("web-route"));
        assert_eq!(
            attr(&s, "weft.peer.identity"),
            text("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(attr(&s, "weft.direction"), text("outbound"));
        assert!(!is_error(&s));
    }

    #[test]
    fn server_span_uses_path_and_host_header() {
        let mut d = span(SpanKind::Server);
        d.uri = "/api/items?x=1".parse().unwrap();
        d.host = Some(http::HeaderValue::from_static("web.shop"));
        d.version = Version::HTTP_11;
        let s = to_proto(d);
        assert_eq!(s.kind, span::SpanKind::Server as i32);
        assert_eq!(attr(&s, "url.path"), text("/api/items"));
        assert_eq!(attr(&s, "url.scheme"), text("http"));
        assert_eq!(attr(&s, "url.full"), None);
        assert_eq!(attr(&s, "server.address"), text("web.shop"));
        assert_eq!(
            attr(&s, "server.port"),
            Some(any_value::Value::IntValue(80))
        );
        assert_eq!(attr(&s, "client.address"), text("10.0.0.7"));
        assert_eq!(attr(&s, "network.protocol.version"), text("1.1"));
        assert_eq!(attr(&s, "weft.direction"), text("inbound"));
    }

    #[test]
    fn error_status_by_kind() {
        let with = |kind, status: Option<u16>, grpc: Option<u16>| {
            let mut d = span(kind);
            d.status_code = status;
            d.grpc_status = grpc;
            if status.is_none() {
                d.failure = Some("no response");
            }
            to_proto(d)
        };
        // 4xx is the client's error, not the server's.
        assert!(is_error(&with(SpanKind::Client, Some(404), None)));
        assert!(!is_error(&with(SpanKind::Server, Some(404), None)));
        assert!(is_error(&with(SpanKind::Server, Some(503), None)));
        // gRPC: any non-OK status for a client, server faults only for a server.
        let unavailable = with(SpanKind::Server, Some(200), Some(14));
        assert!(is_error(&unavailable));
        assert_eq!(
            attr(&unavailable, "rpc.grpc.status_code"),
            Some(any_value::Value::IntValue(14))
        );
        assert_eq!(attr(&unavailable, "error.type"), text("14"));
        assert!(!is_error(&with(SpanKind::Server, Some(200), Some(5))));
        assert!(is_error(&with(SpanKind::Client, Some(200), Some(5))));
        assert!(!is_error(&with(SpanKind::Client, Some(200), Some(0))));
        let failed = with(SpanKind::Client, None, None);
        assert!(is_error(&failed));
        assert_eq!(attr(&failed, "error.type"), text("_OTHER"));
    }

    #[test]
    fn unknown_methods_are_bounded() {
        let mut d = span(SpanKind::Client);
        d.method = http::Method::from_bytes(b"PURGE").unwrap();
        let s = to_proto(d);
        assert_eq!(s.name, "HTTP");
        assert_eq!(attr(&s, "http.request.method"), text("_OTHER"));
        assert_eq!(attr(&s, "http.request.method_original"), text("PURGE"));
    }

    #[test]
    fn collector_addresses_are_checked() {
        assert!(endpoint("otel-collector.observability:4317").is_ok());
        assert!(endpoint("http://10.0.0.1:4317").is_ok());
        assert!(endpoint("no-port").is_err());
        assert!(endpoint("bad host:4317").is_err());
    }

    #[tokio::test]
    async fn a_failing_collector_drops_batches_and_pauses() {
        // Nothing listens on a port just released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (exported, dropped) = (Counter::default(), Counter::default());
        let mut exporter = Exporter {
            client: TraceServiceClient::new(
                endpoint(&format!("127.0.0.1:{port}"))
                    .unwrap()
                    .connect_lazy(),
            ),
            resource: resource(&[("service.name", "weft-proxy".into())]),
            exported: exported.clone(),
            dropped: dropped.clone(),
            paused_until: None,
            backoff: MIN_BACKOFF,
        };
        exporter
            .flush(vec![span(SpanKind::Client), span(SpanKind::Server)])
            .await;
        assert_eq!((exported.get(), dropped.get()), (0, 2));
        assert!(exporter.paused_until.is_some());
        assert_eq!(exporter.backoff, MIN_BACKOFF * 2);
        // While paused, a batch is dropped without another try.
        exporter.flush(vec![span(SpanKind::Client)]).await;
        assert_eq!(dropped.get(), 3);
        assert_eq!(exporter.backoff, MIN_BACKOFF * 2);
    }
}
