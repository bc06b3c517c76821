//! The HTTP test server behind `weft-httpapp http-server` (HTTP/1.1 and h2c, failure injection,
//! streaming echo, WebSocket echo, per-method request counts), the speak-first `banner-server`,
//! a WebSocket echo client, and the harness helpers that start them inside pods.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::bins::bin;
use crate::error::{HarnessError, Result};
use crate::netns::Netns;
use crate::proc::{Cmd, Proc};

/// Every response carries this header with the server's `--name`, so clients can tell which
/// backend answered.
pub const SERVED_BY: &str = "x-served-by";
/// How long the harness waits for a freshly started app to print "listening on".
const START_TIMEOUT: Duration = Duration::from_secs(10);

type ResponseBody = BoxBody<Bytes, hyper::Error>;

#[derive(Debug, Clone)]
pub struct HttpServerConfig {
    /// Sent back in [`SERVED_BY`] and as the body of `/`.
    pub name: String,
    /// This share of counted requests (all but `/count`) is answered 503, spread evenly (see
    /// [`fails`]).
    pub fail_percent: u32,
    /// Added before answering every counted request.
    pub delay: Duration,
}

/// Requests the server has handled, by method (`/count` itself excluded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    pub total: u64,
    pub by_method: BTreeMap<String, u64>,
}

impl RequestCounts {
    pub fn method(&self, method: &str) -> u64 {
        self.by_method.get(method).copied().unwrap_or(0)
    }
}

/// Whether counted request number `seq` (0-based) fails at `percent`%: failures are spread
/// like a Bresenham line, so any `100 / gcd(percent, 100)` consecutive requests hold exactly
/// their share (30% → exactly 3 of every 10, never two in a row), whatever the concurrency.
pub fn fails(seq: u64, percent: u32) -> bool {
    let percent = u64::from(percent.min(100));
    (seq + 1) * percent / 100 > seq * percent / 100
}

struct ServerState {
    config: HttpServerConfig,
    seq: AtomicU64,
    counts: Mutex<RequestCounts>,
}

impl ServerState {
    fn count(&self, method: &Method) -> u64 {
        let mut counts = match self.counts.lock() {
            Ok(counts) => counts,
            Err(poisoned) => poisoned.into_inner(),
        };
        counts.total += 1;
        *counts.by_method.entry(method.to_string()).or_default() += 1;
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    fn snapshot(&self) -> RequestCounts {
        match self.counts.lock() {
            Ok(counts) => counts.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Serves HTTP/1.1 and HTTP/2 prior knowledge (h2c) on `listener` until the task is dropped.
///
/// Paths: `/` (and any path not below) → 200 with the name as body; `/status/<code>`;
/// `/sleep/<ms>`; `/echo` streams the request body back, chunked; `/count` → JSON
/// [`RequestCounts`]; `/ws` upgrades to a WebSocket that echoes every message.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    config: HttpServerConfig,
) -> std::io::Result<()> {
    let state = Arc::new(ServerState {
        config,
        seq: AtomicU64::new(0),
        counts: Mutex::new(RequestCounts::default()),
    });
    loop {
        let (stream, peer) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                eprintln!("weft-httpapp: connection from {peer}: {e}");
            }
        });
    }
}

async fn handle(
    state: Arc<ServerState>,
    req: Request<Incoming>,
) -> std::result::Result<Response<ResponseBody>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/count" {
        let body = serde_json::to_vec(&state.snapshot()).unwrap_or_default();
        return Ok(respond(&state, StatusCode::OK, "application/json", body));
    }
    let seq = state.count(req.method());
    if !state.config.delay.is_zero() {
        tokio::time::sleep(state.config.delay).await;
    }
    if path == "/ws" {
        return Ok(websocket_upgrade(&state, req));
    }
    if fails(seq, state.config.fail_percent) {
        // Read the body first, so the connection stays usable for the next request.
        let _ = req.into_body().collect().await;
        return Ok(respond(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("{} fails request {seq} on purpose\n", state.config.name),
        ));
    }
    if path == "/echo" {
        return Ok(echo(&state, req));
    }
    // Every other path answers only after the whole request body arrived, so a broken body
    // never gets a success response from this server.
    if let Err(e) = req.into_body().collect().await {
        return Ok(respond(
            &state,
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("reading the request body: {e}\n"),
        ));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return Ok(match code.parse::<u16>().ok().and_then(valid_status) {
            Some(status) => respond(
                &state,
                status,
                "text/plain",
                format!("{}\n", status.as_u16()),
            ),
            None => respond(
                &state,
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("bad status code {code:?}\n"),
            ),
        });
    }
    if let Some(ms) = path.strip_prefix("/sleep/") {
        let Ok(ms) = ms.parse::<u64>() else {
            return Ok(respond(
                &state,
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("bad sleep {ms:?}\n"),
            ));
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    Ok(respond(
        &state,
        StatusCode::OK,
        "text/plain",
        state.config.name.clone(),
    ))
}

fn valid_status(code: u16) -> Option<StatusCode> {
    // 1xx are interim responses, not something a handler can end a request with.
    StatusCode::from_u16(code)
        .ok()
        .filter(|s| !s.is_informational())
}

fn respond(
    state: &ServerState,
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut response = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    add_served_by(state, &mut response);
    response
}

fn add_served_by(state: &ServerState, response: &mut Response<ResponseBody>) {
    if let Ok(value) = HeaderValue::from_str(&state.config.name) {
        response.headers_mut().insert(SERVED_BY, value);
    }
}

/// Streams the request body back as it arrives. The body has no known length, so HTTP/1.1
/// replies chunked.
fn echo(state: &ServerState, req: Request<Incoming>) -> Response<ResponseBody> {
    let frames = req
        .into_body()
        .into_data_stream()
        .map(|chunk| chunk.map(Frame::data));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    add_served_by(state, &mut response);
    response
}

fn websocket_upgrade(state: &ServerState, mut req: Request<Incoming>) -> Response<ResponseBody> {
    let wants_websocket = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return respond(
            state,
            StatusCode::BAD_REQUEST,
            "text/plain",
            "expected a WebSocket upgrade\n",
        );
    };
    if !wants_websocket {
        return respond(
            state,
            StatusCode::BAD_REQUEST,
            "text/plain",
            "expected Upgrade: websocket\n",
        );
    }
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                if let Err(e) = websocket_echo(ws).await {
                    eprintln!("weft-httpapp: websocket: {e}");
                }
            }
            Err(e) => eprintln!("weft-httpapp: websocket upgrade: {e}"),
        }
    });
    let mut response = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    add_served_by(state, &mut response);
    response
}

async fn websocket_echo<S>(
    mut ws: WebSocketStream<S>,
) -> std::result::Result<(), tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = ws.next().await {
        match message? {
            m @ (Message::Text(_) | Message::Binary(_)) => ws.send(m).await?,
            // tungstenite answers pings and close frames itself.
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}

/// A speak-first TCP server (like MySQL or SMTP): writes `banner` and a newline on accept,
/// then echoes until the peer half-closes.
pub fn serve_banner(listener: std::net::TcpListener, banner: &str) -> std::io::Result<()> {
    let banner = Arc::new(format!("{banner}\n").into_bytes());
    loop {
        let (stream, peer) = listener.accept()?;
        let banner = banner.clone();
        std::thread::spawn(move || {
            if let Err(e) = banner_connection(stream, &banner) {
                eprintln!("weft-httpapp: banner connection from {peer}: {e}");
            }
        });
    }
}

fn banner_connection(mut stream: std::net::TcpStream, banner: &[u8]) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.write_all(banner)?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n])?;
    }
    stream.shutdown(Shutdown::Write)
}

/// Opens a WebSocket to `ws://<host><path>` over a TCP connection to `addr`, sends each
/// message and waits for its echo, then closes. Returns the echoes in order.
pub async fn ws_echo(
    addr: SocketAddr,
    host: &str,
    path: &str,
    messages: &[Message],
) -> Result<Vec<Message>> {
    let ws_error = |what: &str, e: tokio_tungstenite::tungstenite::Error| {
        HarnessError::invalid("WebSocket exchange", format!("{what}: {e}"))
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|error| HarnessError::Io {
            context: format!("connecting to {addr}"),
            error,
        })?;
    let url = format!("ws://{host}{path}");
    let (mut ws, _response) = tokio_tungstenite::client_async(url.as_str(), stream)
        .await
        .map_err(|e| ws_error("handshake", e))?;
    let mut echoes = Vec::with_capacity(messages.len());
    for message in messages {
        ws.send(message.clone())
            .await
            .map_err(|e| ws_error("send", e))?;
        loop {
            match ws.next().await {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    echoes.push(m);
                    break;
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(HarnessError::invalid(
                        "WebSocket exchange",
                        format!("server closed after {} echoes: {frame:?}", echoes.len()),
                    ))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(ws_error("receive", e)),
                None => {
                    return Err(HarnessError::invalid(
                        "WebSocket exchange",
                        format!("connection ended after {} echoes", echoes.len()),
                    ))
                }
            }
        }
    }
    ws.close(None).await.map_err(|e| ws_error("close", e))?;
    Ok(echoes)
}

/// [`ws_echo`] on a fresh current-thread runtime: call it inside `pod.in_netns(..)` so the
/// socket is made in the pod.
pub fn ws_echo_blocking(
    addr: SocketAddr,
    host: &str,
    path: &str,
    messages: &[Message],
) -> Result<Vec<Message>> {
    current_thread_runtime()?.block_on(ws_echo(addr, host, path, messages))
}

/// A single-threaded runtime: every socket it makes belongs to the calling thread's network
/// namespace (worker threads of a multi-threaded runtime would not have joined it).
pub fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| HarnessError::Io {
            context: "building a tokio runtime".to_string(),
            error,
        })
}

/// Starts `weft-httpapp http-server --listen 0.0.0.0:<port> --name <name> <extra_args>` in
/// `netns` (e.g. `["--fail-percent", "30"]`) and waits until it listens.
pub fn start_http_server(
    netns: &Netns,
    name: &str,
    port: u16,
    extra_args: &[&str],
) -> Result<Proc> {
    start_app(
        netns,
        Cmd::new(bin("weft-httpapp")?)
            .args(["http-server", "--listen", &listen_any(port), "--name", name])
            .args(extra_args),
    )
}

/// Starts `weft-httpapp banner-server --listen 0.0.0.0:<port> --banner <banner>` in `netns`.
pub fn start_banner_server(netns: &Netns, port: u16, banner: &str) -> Result<Proc> {
    start_app(
        netns,
        Cmd::new(bin("weft-httpapp")?).args([
            "banner-server",
            "--listen",
            &listen_any(port),
            "--banner",
            banner,
        ]),
    )
}

/// Starts `weft-httpapp grpc-server --listen 0.0.0.0:<port> --name <name>` in `netns`.
pub fn start_grpc_server(netns: &Netns, name: &str, port: u16) -> Result<Proc> {
    start_app(
        netns,
        Cmd::new(bin("weft-httpapp")?).args([
            "grpc-server",
            "--listen",
            &listen_any(port),
            "--name",
            name,
        ]),
    )
}

fn listen_any(port: u16) -> String {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).to_string()
}

fn start_app(netns: &Netns, cmd: Cmd) -> Result<Proc> {
    let mut proc = netns.spawn(cmd)?;
    proc.wait_for_output("listening on", START_TIMEOUT)?;
    Ok(proc)
}

/// The request counts of the http-server listening on `port` in `netns`, asked over loopback
/// (which iptables never redirects), so the question is not itself proxied or counted by a
/// proxy.
pub fn request_counts(netns: &Netns, port: u16) -> Result<RequestCounts> {
    let response = netns.http_get(&format!("http://127.0.0.1:{port}/count"))?;
    if response.status != 200 {
        return Err(HarnessError::invalid(
            "/count response",
            format!("status {}: {}", response.status, response.body_text()),
        ));
    }
    serde_json::from_slice(&response.body).map_err(|e| {
        HarnessError::invalid(
            "/count response",
            format!("{e}: {:?}", response.body_text()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::H1Connection;

    #[test]
    fn failures_are_spread_exactly() {
        let pattern: Vec<bool> = (0..20).map(|seq| fails(seq, 30)).collect();
        for window in pattern.windows(10) {
            assert_eq!(window.iter().filter(|f| **f).count(), 3, "{pattern:?}");
        }
        assert!(
            !pattern.windows(2).any(|w| w[0] && w[1]),
            "two failures in a row: {pattern:?}"
        );
        assert!((0..1000).all(|seq| fails(seq, 100)));
        assert!((0..1000).all(|seq| !fails(seq, 0)));
        assert_eq!((0..1000).filter(|seq| fails(*seq, 7)).count(), 70);
        assert!((0..100).all(|seq| fails(seq, 250)), "clamped to 100%");
    }

    /// An in-process server on 127.0.0.1; lives as long as the test process.
    fn local_server(name: &str, fail_percent: u32, delay_ms: u64) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let config = HttpServerConfig {
            name: name.to_string(),
            fail_percent,
            delay: Duration::from_millis(delay_ms),
        };
        std::thread::spawn(move || {
            current_thread_runtime().unwrap().block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                serve_http(listener, config).await.unwrap();
            })
        });
        addr
    }

    fn connect(addr: SocketAddr) -> H1Connection {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        H1Connection::new(stream, Duration::from_secs(10)).unwrap()
    }

    fn local_counts(addr: SocketAddr) -> RequestCounts {
        let response = connect(addr).get("/count", "x").unwrap();
        assert_eq!(response.header(SERVED_BY), Some("counter"));
        serde_json::from_slice(&response.body).unwrap()
    }

    #[test]
    fn serves_paths_on_one_keep_alive_connection() {
        let addr = local_server("web-1", 0, 0);
        let mut conn = connect(addr);
        for path in ["/", "/api/v2/items", "/anything"] {
            let response = conn.get(path, "web").unwrap();
            assert_eq!(response.status(), 200, "{path}");
            assert_eq!(response.body_text(), "web-1");
            assert_eq!(response.header(SERVED_BY), Some("web-1"));
        }
        let response = conn.get("/status/418", "web").unwrap();
        assert_eq!(response.status(), 418);
        assert_eq!(response.header(SERVED_BY), Some("web-1"));
        assert_eq!(conn.get("/status/abc", "web").unwrap().status(), 400);
        assert_eq!(conn.get("/status/101", "web").unwrap().status(), 400);
        let started = std::time::Instant::now();
        let response = conn.get("/sleep/150", "web").unwrap();
        assert_eq!(response.status(), 200);
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert!(!conn.is_closed(Duration::from_millis(100)));
    }

    #[test]
    fn counts_requests_by_method_but_not_count_itself() {
        let addr = local_server("counter", 0, 0);
        let mut conn = connect(addr);
        conn.get("/", "x").unwrap();
        conn.get("/status/500", "x").unwrap();
        conn.request("POST", "/", "x", &[], Some(b"body")).unwrap();
        let counts = local_counts(addr);
        assert_eq!(counts.total, 3);
        assert_eq!(counts.method("GET"), 2);
        assert_eq!(counts.method("POST"), 1);
        assert_eq!(local_counts(addr).total, 3);
    }

    #[test]
    fn fails_exactly_the_requested_share() {
        let addr = local_server("flaky", 30, 0);
        let mut conn = connect(addr);
        let statuses: Vec<u16> = (0..20)
            .map(|_| conn.get("/", "x").unwrap().status())
            .collect();
        assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 6);
        assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 14);
        // A failed POST had its body read: the connection still works.
        let statuses: Vec<u16> = (0..10)
            .map(|_| {
                conn.request("POST", "/", "x", &[], Some(&[7u8; 3000]))
                    .unwrap()
                    .status()
            })
            .collect();
        assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 3);
    }

    #[test]
    fn delays_every_response() {
        let addr = local_server("slow", 0, 120);
        let started = std::time::Instant::now();
        assert_eq!(connect(addr).get("/", "x").unwrap().status(), 200);
        assert!(started.elapsed() >= Duration::from_millis(120));
    }

    #[test]
    fn echoes_chunked_bodies_chunked() {
        let addr = local_server("echo", 0, 0);
        let mut conn = connect(addr);
        let mut request =
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        request.extend_from_slice(&crate::h1::chunked(&[b"hello ", b"chunked ", b"world"]));
        conn.send_raw(&request).unwrap();
        let response = conn.read_response().unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.head.is_chunked(), "{:?}", response.head);
        assert_eq!(response.body_text(), "hello chunked world");
        // Still usable afterwards.
        assert_eq!(conn.get("/", "x").unwrap().body_text(), "echo");
    }

    #[test]
    fn echo_streams_a_large_body_while_it_is_still_arriving() {
        let addr = local_server("echo", 0, 0);
        let mut conn = connect(addr);
        let len: usize = 16 << 20;
        let mut writer = conn.writer_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let mut pattern = crate::testapp::Pattern::new(3, b"ECHO");
            let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
            writer
                .write_all(
                    format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n")
                        .as_bytes(),
                )
                .unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(buf.len());
                pattern.fill(&mut buf[..n]);
                digest.update(&buf[..n]);
                writer.write_all(&buf[..n]).unwrap();
                left -= n;
            }
            digest.finish()
        });
        let head = conn.read_head().unwrap();
        assert_eq!(head.status, 200);
        assert!(head.is_chunked());
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let received = conn.read_body(&head, |chunk| digest.update(chunk)).unwrap();
        let sent = sender.join().unwrap();
        assert_eq!(received, len as u64);
        assert_eq!(digest.finish().as_ref(), sent.as_ref());
    }

    #[test]
    fn a_broken_chunked_body_never_gets_a_success() {
        let addr = local_server("strict", 0, 0);
        let mut conn = connect(addr);
        conn.send_raw(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        )
        .unwrap();
        match conn.read_response() {
            Ok(response) => assert_eq!(response.status(), 400),
            Err(_) => assert!(conn.is_closed(Duration::from_secs(1))),
        }
    }

    #[test]
    fn speaks_http2_prior_knowledge() {
        let addr = local_server("h2", 0, 0);
        let runtime = current_thread_runtime().unwrap();
        let (status, served_by, body) = runtime.block_on(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let request = Request::builder()
                .uri(format!("http://{addr}/echo"))
                .method("POST")
                .body(Full::new(Bytes::from_static(b"over h2")))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let status = response.status();
            let served_by = response.headers().get(SERVED_BY).cloned();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, served_by, body)
        });
        assert_eq!(status, StatusCode::OK);
        assert_eq!(served_by, Some(HeaderValue::from_static("h2")));
        assert_eq!(&body[..], b"over h2");
    }

    #[test]
    fn websocket_upgrade_echoes_messages() {
        let addr = local_server("ws", 0, 0);
        let messages = vec![
            Message::text("hello"),
            Message::binary(vec![9u8; 100 * 1024]),
            Message::text("bye"),
        ];
        let echoes = ws_echo_blocking(addr, "web", "/ws", &messages).unwrap();
        assert_eq!(echoes, messages);
        // A plain GET to /ws is refused, not hung.
        assert_eq!(connect(addr).get("/ws", "x").unwrap().status(), 400);
    }

    #[test]
    fn banner_server_speaks_first_then_echoes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve_banner(listener, "220 weft ready"));
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut banner = [0u8; 15];
        stream.read_exact(&mut banner).unwrap();
        assert_eq!(&banner, b"220 weft ready\n");
        stream.write_all(b"ping").unwrap();
        let mut echo = [0u8; 4];
        stream.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"ping");
    }

    #[test]
    fn load_generator_counts_and_paces() {
        let addr = local_server("loaded", 30, 0);
        let mut config = crate::load::LoadConfig::get(&format!("http://{addr}/x"), 40, 4);
        config.rate = Some(200.0);
        config.keep_records = true;
        let report = crate::load::run_load_blocking(&config).unwrap();
        assert_eq!(report.total, 40);
        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(report.status_count(503), 12, "{report:?}");
        assert_eq!(report.status_count(200), 28);
        assert_eq!(report.served_by_count("loaded"), 40);
        assert!(!report.all_succeeded());
        // Request 39 is due 195 ms after the start.
        assert!(report.elapsed_ms >= 190.0, "{report:?}");
        assert_eq!(report.records.len(), 40);
        let last = report
            .records
            .iter()
            .map(|r| r.start_ms)
            .fold(0.0, f64::max);
        assert!(last >= 190.0, "{last}");

        let mut fresh = crate::load::LoadConfig::get(&format!("http://{addr}/"), 10, 2);
        fresh.keep_alive = false;
        let report = crate::load::run_load_blocking(&fresh).unwrap();
        assert_eq!((report.total, report.errors), (10, 0), "{report:?}");

        let mut posts = crate::load::LoadConfig::get(&format!("http://{addr}/"), 10, 2);
        posts.method = Method::POST;
        posts.body_bytes = 2048;
        let before = local_counts_named(addr);
        let report = crate::load::run_load_blocking(&posts).unwrap();
        assert_eq!(report.total, 10);
        assert_eq!(
            local_counts_named(addr).method("POST") - before.method("POST"),
            10
        );
    }

    fn local_counts_named(addr: SocketAddr) -> RequestCounts {
        let response = connect(addr).get("/count", "x").unwrap();
        serde_json::from_slice(&response.body).unwrap()
    }

    #[test]
    fn counts_default_to_zero_per_method() {
        let counts: RequestCounts =
            serde_json::from_str(r#"{"total":3,"by_method":{"GET":2,"POST":1}}"#).unwrap();
        assert_eq!(counts.method("GET"), 2);
        assert_eq!(counts.method("PUT"), 0);
    }
}
