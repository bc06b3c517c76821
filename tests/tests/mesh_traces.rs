//! Tracing acceptance tests: an app request carrying trace context goes client app →
//! client proxy → server proxy → server app, and a real OTLP/gRPC receiver (the collector's
//! `TraceService` from the official OpenTelemetry protos, tests/src/otlp.rs) in the node
//! namespace gets the proxies' CLIENT and SERVER spans, linked parent to child; W3C
//! `traceparent` and B3 both work; a collector that never answers costs requests nothing
//! and its spans are counted as dropped.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use bytes::Bytes;
use http::HeaderMap;
use weft_e2e::h1::{H1Connection, H1Response};
use weft_e2e::manifests::RouteRule;
use weft_e2e::otlp::{Jaeger, OtlpReceiver, ReceivedSpan};
use weft_e2e::{e2e_test, wait_for, Cluster, MeshPod, MeshPodSpec, Proc, MESH_TOOLS, NODE_IP};

const NS: &str = "shop";
const APP_PORT: u16 = 8080;
const SVC_PORT: u16 = 80;
const WEB_IP_LAST: u8 = 20;
const ROUTE: &str = "traced-route";
const HOST: &str = "web.shop";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const CONFIG_TIMEOUT: Duration = Duration::from_secs(30);
/// The exporter flushes every second; this leaves room for a slow CI machine.
const SPANS_TIMEOUT: Duration = Duration::from_secs(20);
const COLLECTOR_PORT: u16 = 4317;
const DROPPED: &str = "weft_trace_spans_dropped_total";
const EXPORTED: &str = "weft_trace_spans_exported_total";

fn svc_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(198, 19, 0, WEB_IP_LAST), SVC_PORT))
}

/// The server app: answers 200 "ok" and keeps every request's headers.
struct HeaderApp {
    seen: Arc<Mutex<Vec<(String, HeaderMap)>>>,
    _thread: std::thread::JoinHandle<()>,
}

impl HeaderApp {
    fn start(pod: &MeshPod) -> anyhow::Result<HeaderApp> {
        let listener = pod.bind(SocketAddr::from(([0, 0, 0, 0], APP_PORT)))?;
        listener.set_nonblocking(true)?;
        let seen: Arc<Mutex<Vec<(String, HeaderMap)>>> = Arc::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let record = seen.clone();
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let record = record.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                            let entry = (req.uri().path().to_string(), req.headers().clone());
                            record.lock().unwrap().push(entry);
                            async {
                                Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                                    Bytes::from_static(b"ok"),
                                )))
                            }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                    });
                }
            })
        });
        Ok(HeaderApp {
            seen,
            _thread: thread,
        })
    }

    /// The headers of the last request for `path`.
    fn last(&self, path: &str) -> Option<HeaderMap> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .rev()
            .find(|(p, _)| p == path)
            .map(|(_, h)| h.clone())
    }
}

struct Mesh {
    _control_plane: Proc,
    client: MeshPod,
    web: MeshPod,
    app: HeaderApp,
}

/// The control plane, a `web` Service with HTTPRoute [`ROUTE`] to a meshed `web` pod running
/// [`HeaderApp`], and a meshed `client` pod; both proxies get `trace_env`.
fn mesh(cluster: &Cluster, trace_env: &[(&str, &str)]) -> anyhow::Result<Mesh> {
    let manifests = cluster.manifests();
    manifests.namespace(NS, false)?;
    manifests.service(
        NS,
        "web",
        Ipv4Addr::new(198, 19, 0, WEB_IP_LAST),
        &[("app", "web")],
        SVC_PORT,
        APP_PORT,
    )?;
    manifests.http_route(
        NS,
        ROUTE,
        "web",
        &[],
        &[RouteRule::to_backends(&[("web", SVC_PORT, 1)])],
    )?;
    let control_plane = cluster.start_control_plane(&[])?;
    let spec = |name: &str, octet: u8| {
        trace_env.iter().fold(
            MeshPodSpec::new(name, octet, NS, &format!("{name}-sa")),
            |spec, (k, v)| spec.env(k, v),
        )
    };
    let mut web = cluster.add_mesh_pod(spec("web", WEB_IP_LAST))?;
    let app = HeaderApp::start(&web)?;
    let mut client = cluster.add_mesh_pod(spec("client", 10))?;
    web.wait_ready(READY_TIMEOUT)?;
    client.wait_ready(READY_TIMEOUT)?;
    // Until the route reaches the client proxy, requests get 404 or fail.
    let deadline = Instant::now() + CONFIG_TIMEOUT;
    loop {
        match send(&client, "/warmup", &[]) {
            Ok(r) if r.status() == 200 => break,
            other => ensure!(
                Instant::now() < deadline,
                "the web Service never answered: {:?}",
                other.map(|r| r.status())
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Mesh {
        _control_plane: control_plane,
        client,
        web,
        app,
    })
}

/// One HTTP/1.1 GET from the client pod to the web Service (through its proxy).
fn send(client: &MeshPod, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<H1Response> {
    let timeout = Duration::from_secs(2);
    let stream = client.connect(svc_addr(), timeout)?;
    let mut conn = H1Connection::new(stream, timeout)?;
    Ok(conn.request("GET", path, HOST, headers, None)?)
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// The client and server span of `trace_id`, once `fetch` (the spans a collector holds for a
/// trace) shows both.
fn span_pair(
    fetch: impl Fn(&str) -> anyhow::Result<Vec<ReceivedSpan>>,
    trace_id: &str,
) -> anyhow::Result<(ReceivedSpan, ReceivedSpan)> {
    let deadline = Instant::now() + SPANS_TIMEOUT;
    let spans = loop {
        let spans = fetch(trace_id)?;
        if spans.iter().any(|s| s.is_client()) && spans.iter().any(|s| s.is_server()) {
            break spans;
        }
        ensure!(
            Instant::now() < deadline,
            "no client and server span of trace {trace_id} after {SPANS_TIMEOUT:?}: {spans:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(
        spans.len() == 2,
        "one request should make exactly two spans: {spans:#?}"
    );
    let client = spans
        .iter()
        .find(|s| s.is_client())
        .cloned()
        .context("client span")?;
    let server = spans
        .iter()
        .find(|s| s.is_server())
        .cloned()
        .context("server span")?;
    Ok((client, server))
}

fn received(receiver: &OtlpReceiver) -> impl Fn(&str) -> anyhow::Result<Vec<ReceivedSpan>> + '_ {
    move |trace_id| {
        Ok(receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id() == trace_id)
            .collect())
    }
}

fn expect_attr(span: &ReceivedSpan, key: &str, want: &str) -> anyhow::Result<()> {
    let got = span.attr(key);
    ensure!(
        got.as_deref() == Some(want),
        "{key} should be {want:?}, is {got:?} in {span:#?}"
    );
    Ok(())
}

/// The attributes every span of one GET /items to the web Service must have.
fn check_pair(
    m: &Mesh,
    client_span: &ReceivedSpan,
    server_span: &ReceivedSpan,
    before: u64,
) -> anyhow::Result<()> {
    // Jaeger keeps microseconds: a millisecond of slack either side.
    let (before, after) = (before - 1_000_000, unix_nanos() + 1_000_000);
    for span in [client_span, server_span] {
        expect_attr(span, "http.request.method", "GET")?;
        expect_attr(span, "http.response.status_code", "200")?;
        expect_attr(span, "network.protocol.version", "2")?;
        ensure!(
            span.span.status.as_ref().is_none_or(|s| s.code != 2),
            "not an error: {span:#?}"
        );
        ensure!(
            before <= span.span.start_time_unix_nano
                && span.span.start_time_unix_nano <= span.span.end_time_unix_nano
                && span.span.end_time_unix_nano <= after,
            "times must be the request's, in unix nanos: {span:#?}"
        );
        ensure!(span.span.name == "GET", "span name: {span:#?}");
    }
    // CLIENT: the client proxy's attempt to the web pod, through the route.
    expect_attr(client_span, "weft.direction", "outbound")?;
    expect_attr(client_span, "weft.route", ROUTE)?;
    expect_attr(client_span, "weft.peer.identity", m.web.identity())?;
    expect_attr(client_span, "url.full", &format!("http://{HOST}/items"))?;
    expect_attr(client_span, "server.address", HOST)?;
    expect_attr(client_span, "server.port", "80")?;
    expect_attr(client_span, "network.peer.address", &m.web.ip().to_string())?;
    expect_attr(client_span, "network.peer.port", &APP_PORT.to_string())?;
    // SERVER: the web proxy, for the client proxy's identity.
    expect_attr(server_span, "weft.direction", "inbound")?;
    expect_attr(server_span, "weft.peer.identity", m.client.identity())?;
    expect_attr(server_span, "url.path", "/items")?;
    expect_attr(server_span, "client.address", &m.client.ip().to_string())?;
    ensure!(
        server_span.span_id() != client_span.span_id(),
        "two spans, two ids"
    );
    // Each proxy reports as itself.
    for (span, pod) in [(client_span, &m.client), (server_span, &m.web)] {
        let r = &span.resource;
        ensure!(
            r.get("service.name").map(String::as_str) == Some("weft-proxy")
                && r.get("k8s.namespace.name").map(String::as_str) == Some(NS)
                && r.get("k8s.pod.name").map(String::as_str) == Some(pod.name())
                && r.get("weft.identity").map(String::as_str) == Some(pod.identity()),
            "resource of {}'s span: {r:?}",
            pod.name()
        );
    }
    Ok(())
}

#[test]
fn spans_link_app_client_proxy_server_proxy_and_app() {
    e2e_test(
        "traces_linked",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let receiver = OtlpReceiver::start(
                cluster
                    .node()
                    .bind(SocketAddr::from((NODE_IP, COLLECTOR_PORT)))?,
            )?;
            let collector = receiver.addr().to_string();
            // Ratio 0: only the app's own sampled contexts make spans (parent-based), so the
            // warm-up requests leave the receiver empty.
            let m = mesh(
                cluster,
                &[
                    ("WEFT_TRACE_COLLECTOR", &collector),
                    ("WEFT_TRACE_SAMPLING_RATIO", "0"),
                ],
            )?;

            // 1. W3C traceparent from the app.
            let trace_id = random_hex(16);
            let app_span = random_hex(8);
            let before = unix_nanos();
            let rsp = send(
                &m.client,
                "/items?secret=1",
                &[
                    ("traceparent", &format!("00-{trace_id}-{app_span}-01")),
                    ("tracestate", "app=1"),
                ],
            )?;
            ensure!(rsp.status() == 200, "status {}", rsp.status());
            let (client_span, server_span) = span_pair(received(&receiver), &trace_id)?;
            ensure!(
                client_span.parent_span_id() == app_span,
                "the client span's parent is the app's span: {client_span:#?}"
            );
            ensure!(
                server_span.parent_span_id() == client_span.span_id(),
                "the server span's parent is the client span: {server_span:#?}"
            );
            check_pair(&m, &client_span, &server_span, before)?;
            ensure!(
                client_span.span.trace_state == "app=1",
                "tracestate kept: {client_span:#?}"
            );
            let seen = m
                .app
                .last("/items")
                .context("the app got no /items request")?;
            let got = seen.get("traceparent").and_then(|v| v.to_str().ok());
            let want = format!("00-{trace_id}-{}-01", server_span.span_id());
            ensure!(
                got == Some(want.as_str()),
                "the app's parent must be the server span: got {got:?}, want {want}"
            );
            ensure!(
                seen.get("tracestate").is_some_and(|v| v == "app=1"),
                "tracestate passes through: {seen:?}"
            );

            // 2a. B3 single header: the same trace continues, and B3 stays current for the app.
            let trace_id = random_hex(16);
            let app_span = random_hex(8);
            let before = unix_nanos();
            let rsp = send(
                &m.client,
                "/items",
                &[("b3", &format!("{trace_id}-{app_span}-1"))],
            )?;
            ensure!(rsp.status() == 200, "status {}", rsp.status());
            let (client_span, server_span) = span_pair(received(&receiver), &trace_id)?;
            ensure!(client_span.parent_span_id() == app_span, "{client_span:#?}");
            ensure!(
                server_span.parent_span_id() == client_span.span_id(),
                "{server_span:#?}"
            );
            check_pair(&m, &client_span, &server_span, before)?;
            let seen = m.app.last("/items").context("no /items request")?;
            let server_id = server_span.span_id();
            let client_id = client_span.span_id();
            ensure!(
                seen.get("b3").and_then(|v| v.to_str().ok())
                    == Some(format!("{trace_id}-{server_id}-1-{client_id}").as_str()),
                "b3 for the app: {seen:?}"
            );
            ensure!(
                seen.get("traceparent").and_then(|v| v.to_str().ok())
                    == Some(format!("00-{trace_id}-{server_id}-01").as_str()),
                "traceparent for the app: {seen:?}"
            );

            // 2b. B3 multi headers with a 64-bit trace id.
            let trace_low = random_hex(8);
            let app_span = random_hex(8);
            let rsp = send(
                &m.client,
                "/items",
                &[
                    ("X-B3-TraceId", &trace_low),
                    ("X-B3-SpanId", &app_span),
                    ("X-B3-Sampled", "1"),
                ],
            )?;
            ensure!(rsp.status() == 200, "status {}", rsp.status());
            let trace_id = format!("{}{trace_low}", "0".repeat(16));
            let (client_span, server_span) = span_pair(received(&receiver), &trace_id)?;
            ensure!(client_span.parent_span_id() == app_span, "{client_span:#?}");
            ensure!(
                server_span.parent_span_id() == client_span.span_id(),
                "{server_span:#?}"
            );
            let seen = m.app.last("/items").context("no /items request")?;
            let header = |name: &str| {
                seen.get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            ensure!(
                header("x-b3-traceid") == Some(trace_low.clone())
                    && header("x-b3-spanid") == Some(server_span.span_id())
                    && header("x-b3-parentspanid") == Some(client_span.span_id())
                    && header("x-b3-sampled").as_deref() == Some("1"),
                "X-B3-* for the app: {seen:?}"
            );

            // A not-sampled context makes no span, and nothing else was traced: the warm-up
            // requests had no context and the ratio is 0.
            let trace_id = random_hex(16);
            let rsp = send(
                &m.client,
                "/unsampled",
                &[(
                    "traceparent",
                    &format!("00-{trace_id}-{}-00", random_hex(8)),
                )],
            )?;
            ensure!(rsp.status() == 200, "status {}", rsp.status());
            // A sampled request sent after it flushes through the same exporters.
            let marker = random_hex(16);
            send(
                &m.client,
                "/items",
                &[("traceparent", &format!("00-{marker}-{}-01", random_hex(8)))],
            )?;
            span_pair(received(&receiver), &marker)?;
            let spans = receiver.spans();
            ensure!(
                spans.len() == 8,
                "four sampled requests, two spans each: {spans:#?}"
            );
            ensure!(
                m.client.metrics()?.value(EXPORTED, &[]).unwrap_or(0.0) >= 4.0,
                "the client proxy counts what it exported:\n{}",
                m.client.metrics_text()?
            );
            Ok(())
        },
    );
}

#[test]
fn a_dead_collector_never_slows_requests_and_spans_are_counted_dropped() {
    e2e_test(
        "traces_dead_collector",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            // Accepts TCP (the kernel completes the handshake) but never reads or answers.
            let black_hole = cluster
                .node()
                .bind(SocketAddr::from((NODE_IP, COLLECTOR_PORT)))?;
            let collector = black_hole.local_addr()?.to_string();
            let m = mesh(
                cluster,
                &[
                    ("WEFT_TRACE_COLLECTOR", &collector),
                    ("WEFT_TRACE_SAMPLING_RATIO", "1"),
                    ("WEFT_TRACE_QUEUE", "16"),
                ],
            )?;
            let started = Instant::now();
            let timeout = Duration::from_secs(2);
            let stream = m.client.connect(svc_addr(), timeout)?;
            // Each request has 2 s (a hang detector, not a performance bound).
            let mut conn = H1Connection::new(stream, timeout)?;
            for i in 0..200 {
                let rsp = conn
                    .request("GET", &format!("/items/{i}"), HOST, &[], None)
                    .with_context(|| format!("request {i} with the collector dead"))?;
                ensure!(rsp.status() == 200, "request {i}: status {}", rsp.status());
            }
            println!(
                "200 requests with a dead collector took {:?}",
                started.elapsed()
            );
            for pod in [&m.client, &m.web] {
                let dropped = || pod.metrics().ok().and_then(|s| s.value(DROPPED, &[]));
                wait_for(
                    &format!("{DROPPED} on {} to rise", pod.name()),
                    SPANS_TIMEOUT,
                    || dropped().is_some_and(|v| v > 0.0),
                )?;
                let text = pod.metrics_text()?;
                ensure!(
                    pod.metrics()?.value(EXPORTED, &[]) == Some(0.0),
                    "nothing can have been exported:\n{text}"
                );
                println!("{}: {DROPPED} = {:?}", pod.name(), dropped());
            }
            drop(black_hole);
            Ok(())
        },
    );
}

#[test]
fn a_real_collector_jaeger_gets_the_linked_spans() {
    e2e_test(
        "traces_jaeger",
        MESH_TOOLS,
        |cluster| -> anyhow::Result<()> {
            let Some(jaeger) = Jaeger::start("traces_jaeger", cluster.node(), NODE_IP)? else {
                return Ok(());
            };
            let collector = jaeger.otlp_addr().to_string();
            let m = mesh(
                cluster,
                &[
                    ("WEFT_TRACE_COLLECTOR", &collector),
                    ("WEFT_TRACE_SAMPLING_RATIO", "0"),
                ],
            )?;
            let fetch = |trace_id: &str| -> anyhow::Result<Vec<ReceivedSpan>> {
                Ok(jaeger.trace(trace_id)?)
            };
            for b3 in [false, true] {
                let trace_id = random_hex(16);
                let app_span = random_hex(8);
                let header = if b3 {
                    ("b3", format!("{trace_id}-{app_span}-1"))
                } else {
                    ("traceparent", format!("00-{trace_id}-{app_span}-01"))
                };
                let before = unix_nanos();
                let rsp = send(&m.client, "/items", &[(header.0, &header.1)])?;
                ensure!(rsp.status() == 200, "status {}", rsp.status());
                let (client_span, server_span) = span_pair(fetch, &trace_id)?;
                ensure!(
                    client_span.parent_span_id() == app_span,
                    "the client span's parent is the app's span: {client_span:#?}"
                );
                ensure!(
                    server_span.parent_span_id() == client_span.span_id(),
                    "the server span's parent is the client span: {server_span:#?}"
                );
                check_pair(&m, &client_span, &server_span, before)?;
                let seen = m
                    .app
                    .last("/items")
                    .context("the app got no /items request")?;
                let want = format!("00-{trace_id}-{}-01", server_span.span_id());
                ensure!(
                    seen.get("traceparent").is_some_and(|v| v == want.as_str()),
                    "the app's parent must be the server span ({want}): {seen:?}"
                );
            }
            Ok(())
        },
    );
}
