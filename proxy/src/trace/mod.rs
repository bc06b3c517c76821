//! OpenTelemetry traces of HTTP requests: a CLIENT span per outbound attempt (app → mesh)
//! and a SERVER span per inbound request (mesh → app), parent-based ratio sampling, W3C
//! `traceparent` / B3 propagation ([`propagation`]) and OTLP/gRPC export ([`export`]).
//!
//! Cost model: with no collector configured nothing is installed, and each hook is one
//! load of a `OnceLock` and a branch. With tracing on, a request whose trace is not sampled
//! costs a header parse and (for a new trace) one `traceparent` written; a sampled one
//! costs a [`SpanData`] pushed with `try_send` onto a bounded queue when its response
//! ends. A full queue or a dead collector drops spans (counted) and never waits.

pub mod export;
pub mod propagation;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::config::Settings;
use crate::discovery::MeshPeer;
use crate::http::body::{boxed, grpc_status_of, Body, EndOfBody, OnEnd};
use crate::http::inbound::InboundClient;
use crate::metrics::{Metrics, Name};
use propagation::{Format, Incoming, Outgoing, SpanId, TraceId};

/// The installed tracer; unset (the default) means tracing is off.
static TRACER: OnceLock<Tracer> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("WEFT_TRACE_COLLECTOR {0:?} is not a valid host:port")]
    Collector(String),
    #[error("tracing was already started in this process")]
    AlreadyInstalled,
}

/// What `WEFT_TRACE_*` configure.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// host:port of an OTLP/gRPC collector (plaintext).
    pub collector: String,
    /// Share of new traces (no incoming context) that are sampled.
    pub sampling_ratio: f64,
    /// Finished spans waiting for export; more are dropped.
    pub queue: usize,
}

/// `WEFT_TRACE_SAMPLING_RATIO`: a number in 0.0..=1.0.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio between 0.0 and 1.0")),
    }
}

/// Starts tracing for this process: the span queue and the exporter task. Call once, inside
/// the runtime.
pub fn install(
    config: &TraceConfig,
    settings: &Settings,
    metrics: &Metrics,
) -> Result<(), TraceError> {
    let endpoint = export::endpoint(&config.collector)?;
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let tracer = Tracer::new(
        tx,
        Sampler::ratio(config.sampling_ratio),
        metrics.trace_spans_dropped.clone(),
    );
    TRACER
        .set(tracer)
        .map_err(|_| TraceError::AlreadyInstalled)?;
    tokio::spawn(export::run(
        rx,
        endpoint,
        export::resource(&resource_attributes(settings)),
        metrics.trace_spans_exported.clone(),
        metrics.trace_spans_dropped.clone(),
    ));
    tracing::info!(collector = %config.collector, sampling_ratio = config.sampling_ratio, queue = config.queue, "exporting traces");
    Ok(())
}

/// The resource every span of this proxy belongs to.
pub fn resource_attributes(settings: &Settings) -> Vec<(&'static str, String)> {
    let mut attrs = vec![
        ("service.name", "weft-proxy".to_string()),
        ("service.version", env!("CARGO_PKG_VERSION").to_string()),
        (
            "k8s.namespace.name",
            settings.identity.namespace().to_string(),
        ),
        ("weft.identity", settings.identity.to_string()),
    ];
    if !settings.pod_name.is_empty() {
        attrs.push(("k8s.pod.name", settings.pod_name.clone()));
    }
    attrs
}

/// Outbound hook: a CLIENT span for one attempt of `req` (already in the form the endpoint
/// gets) to `peer_addr`, whose proxy proves `peer`'s identity. Rewrites the trace headers so
/// the server proxy's span is this span's child.
#[inline]
pub fn client<B>(
    req: &mut Request<B>,
    peer_addr: SocketAddr,
    peer: Option<&MeshPeer>,
    route: &Name,
) -> Option<ActiveSpan> {
    let tracer = TRACER.get()?;
    let mut span = tracer.start(SpanKind::Client, req)?;
    if let Some(data) = span.data.as_mut() {
        data.peer_addr = Some(peer_addr);
        data.peer_identity = peer.map(|p| Name::new(&p.id.to_string()));
        data.route = Some(route.clone());
    }
    Some(span)
}

/// Inbound hook: a SERVER span for `req` from `client`, and `traceparent` rewritten so the
/// app's own spans are its children.
#[inline]
pub fn server<B>(req: &mut Request<B>, client: &InboundClient) -> Option<ActiveSpan> {
    let tracer = TRACER.get()?;
    // A plaintext WebSocket upgrade becomes a byte stream: no request/response to span.
    if req.headers().contains_key(http::header::UPGRADE) {
        return None;
    }
    let mut span = tracer.start(SpanKind::Server, req)?;
    if let Some(data) = span.data.as_mut() {
        data.peer_addr = Some(SocketAddr::new(client.ip, 0));
        data.peer_identity = client.identity.as_ref().map(|id| id.uri.clone());
        // Inbound routes are not named yet (as in the metrics).
        data.route = Some(Name::new("default"));
    }
    Some(span)
}

/// Records the response on the span, which ends when the response body does (a gRPC
/// status may come in trailers). Without a span the response is returned as it is.
#[inline]
pub fn respond(span: Option<ActiveSpan>, rsp: Response<Body>) -> Response<Body> {
    let Some(mut span) = span else {
        return rsp;
    };
    span.response(rsp.status().as_u16(), rsp.headers());
    rsp.map(|inner| boxed(OnEnd::new(inner, span)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Client,
    Server,
}

/// A finished span as it waits in the queue: ids, times and what the attributes are made
/// of. Everything is cheap to clone from the request (`Uri`, `Method` and header values
/// share their bytes); the OTLP form is built by the exporter.
#[derive(Debug)]
pub struct SpanData {
    pub kind: SpanKind,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub trace_state: Option<HeaderValue>,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub method: Method,
    pub uri: Uri,
    /// Host header, when the URI has no authority (origin-form HTTP/1).
    pub host: Option<HeaderValue>,
    pub version: Version,
    /// Outbound: the endpoint; inbound: the client's IP (port 0: not known per request).
    pub peer_addr: Option<SocketAddr>,
    pub peer_identity: Option<Name>,
    pub route: Option<Name>,
    pub status_code: Option<u16>,
    pub grpc_status: Option<u16>,
    /// `x-weft-error` of a response the proxy made itself.
    pub proxy_error: Option<HeaderValue>,
    /// Why the span ended without a (complete) response.
    pub failure: Option<&'static str>,
}

/// Parent-based sampling: an incoming decision is honoured; without one, the trace id
/// decides against the ratio (the same id gets the same answer in every proxy).
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    threshold: u64,
    always: bool,
}

impl Sampler {
    pub fn ratio(ratio: f64) -> Self {
        let always = ratio >= 1.0;
        let threshold = if ratio <= 0.0 || always {
            0
        } else {
            (ratio * u64::MAX as f64) as u64
        };
        Sampler { threshold, always }
    }

    pub fn sample_new(&self, trace_id: &TraceId) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        self.always || u64::from_be_bytes(low) < self.threshold
    }
}

/// The context this proxy's span continues, and whether it is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continued {
    pub trace_id: TraceId,
    pub parent: Option<SpanId>,
    pub sampled: bool,
    pub format: Option<Format>,
}

/// `None`: the caller said "not sampled"; no span, and the headers stay as they are.
pub fn decide(sampler: &Sampler, incoming: Incoming) -> Option<Continued> {
    match incoming {
        Incoming::Context(ctx) => {
            let sampled = match ctx.sampled {
                Some(false) => return None,
                Some(true) => true,
                None => sampler.sample_new(&ctx.trace_id),
            };
            Some(Continued {
                trace_id: ctx.trace_id,
                parent: Some(ctx.span_id),
                sampled,
                format: Some(ctx.format),
            })
        }
        Incoming::Decision(false) => None,
        Incoming::Decision(true) => Some(Continued {
            trace_id: new_trace_id(),
            parent: None,
            sampled: true,
            format: None,
        }),
        Incoming::None => {
            let trace_id = new_trace_id();
            Some(Continued {
                sampled: sampler.sample_new(&trace_id),
                trace_id,
                parent: None,
                format: None,
            })
        }
    }
}

fn new_trace_id() -> TraceId {
    loop {
        let id: TraceId = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

fn new_span_id() -> SpanId {
    loop {
        let id: SpanId = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub struct Tracer {
    tx: mpsc::Sender<SpanData>,
    sampler: Sampler,
    dropped: Counter,
}

impl Tracer {
    pub fn new(tx: mpsc::Sender<SpanData>, sampler: Sampler, dropped: Counter) -> Self {
        Tracer {
            tx,
            sampler,
            dropped,
        }
    }

    /// Continues or starts the request's trace and points its headers at the new span;
    /// `None` when the trace is not sampled.
    pub fn start<B>(&'static self, kind: SpanKind, req: &mut Request<B>) -> Option<ActiveSpan> {
        let cont = decide(&self.sampler, propagation::extract(req.headers()))?;
        let span_id = new_span_id();
        propagation::inject(
            req.headers_mut(),
            &Outgoing {
                trace_id: &cont.trace_id,
                span_id: &span_id,
                sampled: cont.sampled,
                parent: cont.parent.as_ref(),
            },
        );
        if !cont.sampled {
            return None;
        }
        let trace_state = match cont.format {
            Some(Format::W3c) => req.headers().get(propagation::TRACESTATE).cloned(),
            _ => None,
        };
        let host = match req.uri().authority() {
            Some(_) => None,
            None => req.headers().get(http::header::HOST).cloned(),
        };
        Some(ActiveSpan {
            tracer: self,
            started: Instant::now(),
            data: Some(SpanData {
                kind,
                trace_id: cont.trace_id,
                span_id,
                parent_span_id: cont.parent,
                trace_state,
                start_unix_nanos: unix_nanos(),
                end_unix_nanos: 0,
                method: req.method().clone(),
                uri: req.uri().clone(),
                host,
                version: req.version(),
                peer_addr: None,
                peer_identity: None,
                route: None,
                status_code: None,
                grpc_status: None,
                proxy_error: None,
                failure: None,
            }),
        })
    }

    /// Queues a finished span, or counts it dropped when the queue is full.
    fn submit(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

/// A sampled span in progress; dropping it ends it and queues it for export.
pub struct ActiveSpan {
    tracer: &'static Tracer,
    started: Instant,
    // Always `Some` until dropped.
    data: Option<SpanData>,
}

impl ActiveSpan {
    pub fn ids(&self) -> Option<(TraceId, SpanId)> {
        self.data.as_ref().map(|d| (d.trace_id, d.span_id))
    }

    fn response(&mut self, status: u16, headers: &HeaderMap) {
        let grpc = grpc_status_of(headers);
        let proxy_error = headers.get("x-weft-error").cloned();
        if let Some(data) = self.data.as_mut() {
            data.status_code = Some(status);
            data.grpc_status = grpc;
            data.proxy_error = proxy_error;
        }
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        if let (Some(code), Some(data)) = (grpc_status_of(trailers), self.data.as_mut()) {
            data.grpc_status = Some(code);
        }
    }

    fn fail(&mut self, why: &'static str) {
        if let Some(data) = self.data.as_mut() {
            data.failure = Some(why);
        }
    }
}

impl Drop for ActiveSpan {
    fn drop(&mut self) {
        if let Some(mut data) = self.data.take() {
            if data.status_code.is_none() && data.failure.is_none() {
                data.failure = Some("no response: the request failed, timed out or was cancelled");
            }
            data.end_unix_nanos = data
                .start_unix_nanos
                .saturating_add(self.started.elapsed().as_nanos() as u64);
            self.tracer.submit(data);
        }
    }
}

/// A span ends when its response body does (dropping it submits it).
impl EndOfBody for ActiveSpan {
    fn trailers(&mut self, trailers: &HeaderMap) {
        ActiveSpan::trailers(self, trailers);
    }

    fn end(mut self, failed: bool) {
        if failed {
            self.fail("the response body failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::body::BoxError;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper::body::Frame;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn tracer(queue: usize, ratio: f64) -> (&'static Tracer, mpsc::Receiver<SpanData>, Counter) {
        let (tx, rx) = mpsc::channel(queue);
        let dropped = Counter::default();
        let t = Box::leak(Box::new(Tracer::new(
            tx,
            Sampler::ratio(ratio),
            dropped.clone(),
        )));
        (t, rx, dropped)
    }

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .method("GET")
            .uri("http://web.shop:80/api/items?secret=1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn sampling_is_parent_based() {
        let never = Sampler::ratio(0.0);
        let always = Sampler::ratio(1.0);
        let tp = |flags: &str| {
            propagation::extract(
                &request(&[("traceparent", &format!("00-{TRACE}-{SPAN}-{flags}"))])
                    .headers()
                    .clone(),
            )
        };
        // An incoming sampled context is honoured even at ratio 0, a not-sampled one even
        // at ratio 1.
        let c = decide(&never, tp("01")).unwrap();
        assert!(c.sampled);
        assert_eq!(propagation::hex(&c.trace_id), TRACE);
        assert_eq!(propagation::hex(&c.parent.unwrap()), SPAN);
        assert_eq!(decide(&always, tp("00")), None);
        // No context: the ratio decides.
        assert!(decide(&always, Incoming::None).unwrap().sampled);
        assert!(!decide(&never, Incoming::None).unwrap().sampled);
        assert!(decide(&never, Incoming::Decision(true)).unwrap().sampled);
        assert_eq!(decide(&always, Incoming::Decision(false)), None);
        // The decision follows the trace id's low 64 bits.
        let half = Sampler::ratio(0.5);
        let mut low = [0u8; 16];
        low[8] = 0x10;
        let mut high = [0u8; 16];
        high[8] = 0xf0;
        assert!(half.sample_new(&low));
        assert!(!half.sample_new(&high));
        let sampled = (0..4000)
            .filter(|_| half.sample_new(&new_trace_id()))
            .count();
        assert!((1600..2400).contains(&sampled), "{sampled} of 4000 at 0.5");
    }

    #[test]
    fn ratio_is_validated() {
        assert_eq!(parse_ratio("0.25"), Ok(0.25));
        assert_eq!(parse_ratio("1"), Ok(1.0));
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert!(parse_ratio("NaN").is_err());
        assert!(parse_ratio("lots").is_err());
    }

    #[tokio::test]
    async fn a_sampled_request_becomes_a_child_span_and_is_queued_at_response_end() {
        let (t, mut rx, dropped) = tracer(8, 0.0);
        let mut req = request(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "vendor=x"),
        ]);
        let span = t.start(SpanKind::Client, &mut req).unwrap();
        let (_, span_id) = span.ids().unwrap();
        assert_eq!(
            req.headers()["traceparent"],
            format!("00-{TRACE}-{}-01", propagation::hex(&span_id))
        );
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("14"));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ]));
        let rsp = respond(Some(span), Response::new(boxed(body)));
        assert!(
            rx.try_recv().is_err(),
            "the span ends with the body, not before"
        );
        rsp.into_body().collect().await.unwrap();
        let data = rx.try_recv().unwrap();
        assert_eq!(data.kind, SpanKind::Client);
        assert_eq!(propagation::hex(&data.trace_id), TRACE);
        assert_eq!(data.span_id, span_id);
        assert_eq!(propagation::hex(&data.parent_span_id.unwrap()), SPAN);
        assert_eq!(data.trace_state.unwrap(), "vendor=x");
        assert_eq!((data.status_code, data.grpc_status), (Some(200), Some(14)));
        assert!(data.end_unix_nanos >= data.start_unix_nanos);
        assert!(data.start_unix_nanos > 1_600_000_000_000_000_000);
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn not_sampled_requests_make_no_span() {
        let (t, mut rx, _) = tracer(8, 0.0);
        // A caller's "not sampled" is passed on untouched.
        let tp = format!("00-{TRACE}-{SPAN}-00");
        let mut req = request(&[("traceparent", &tp)]);
        assert!(t.start(SpanKind::Server, &mut req).is_none());
        assert_eq!(req.headers()["traceparent"], tp.as_str());
        // A new trace that the ratio does not sample still tells the next hop so.
        let mut req = request(&[]);
        assert!(t.start(SpanKind::Client, &mut req).is_none());
        let Incoming::Context(c) = propagation::extract(req.headers()) else {
            panic!("no traceparent written");
        };
        assert_eq!(c.sampled, Some(false));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (t, mut rx, dropped) = tracer(2, 1.0);
        for _ in 0..5 {
            let mut req = request(&[]);
            let span = t.start(SpanKind::Server, &mut req).unwrap();
            drop(span);
        }
        assert_eq!(dropped.get(), 3);
        let first = rx.try_recv().unwrap();
        assert!(first.failure.is_some(), "no response was recorded");
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn b3_in_keeps_the_trace_and_updates_b3_out() {
        let (t, mut rx, _) = tracer(8, 0.0);
        let mut req = request(&[("b3", &format!("{TRACE}-{SPAN}-1"))]);
        let span = t.start(SpanKind::Client, &mut req).unwrap();
        let (trace_id, span_id) = span.ids().unwrap();
        assert_eq!(propagation::hex(&trace_id), TRACE);
        let s = propagation::hex(&span_id);
        assert_eq!(req.headers()["b3"], format!("{TRACE}-{s}-1-{SPAN}"));
        assert_eq!(req.headers()["traceparent"], format!("00-{TRACE}-{s}-01"));
        drop(span);
        assert!(rx.try_recv().unwrap().trace_state.is_none());
    }
}
