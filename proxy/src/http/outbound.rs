//! Outbound HTTP: each request the app sends → route (HTTPRoute matches) → backend
//! (traffic split) → endpoint (p2c over peak-EWMA) → the mesh HTTP/2 hop or plain HTTP,
//! within the route's timeouts and retries.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use tokio_rustls::TlsConnector;

use super::balance::Outcome;
use super::body::{self, boxed, error_response, observed, Body};
use super::client::{Clients, SendError};
use super::h1_server::OnUpgrade;
use super::headers;
use super::route::{Backend, Route, RouteAction};
use crate::connect;
use crate::discovery::{Endpoint, Target, TargetWatch};
use crate::metrics::{
    Direction, GrpcStatus, HttpRequestMetrics, Metrics, Name, RetryLabels, RouteLabels, TlsState,
};

/// Bodies up to this size are buffered so a request can be retried (DESIGN.md).
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// What every outbound HTTP connection shares.
pub struct HttpContext {
    pub clients: Clients,
    pub metrics: Arc<Metrics>,
    /// For HTTP/1 upgrades (WebSocket), which travel as opaque TCP over mesh mTLS.
    pub opaque_tls: TlsConnector,
    pub connect_timeout: Duration,
}

/// Serves one app connection's requests to one original destination.
pub struct OutboundHttp {
    pub target: TargetWatch,
    pub ctx: Arc<HttpContext>,
}

/// The parts of a request needed to send it again.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Head {
    fn into_request(self, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }

    /// For a retryable request: every attempt needs its own copy.
    fn to_request(&self, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

enum Failure {
    Status(StatusCode, &'static str),
    Timeout,
}

impl OutboundHttp {
    pub async fn serve(self: Arc<Self>, req: Request<Body>) -> Result<Response<Body>, Infallible> {
        Ok(self.handle(req).await)
    }

    pub async fn respond(self: Arc<Self>, req: Request<Body>) -> Response<Body> {
        self.handle(req).await
    }

    /// An answer the proxy gives itself before any backend is chosen. Still a request the
    /// app made, so it is counted (under the route, no backend, `tls="false"`: nothing was
    /// connected); rare, so resolving its metric handle per call costs nothing that matters.
    fn local_response(
        &self,
        target: &Target,
        route: Name,
        status: StatusCode,
        reason: &'static str,
    ) -> Response<Body> {
        let metrics = self
            .ctx
            .metrics
            .http_route(RouteLabels {
                direction: Direction::Outbound,
                route,
                dst_service: target.service_label.clone(),
                dst_backend: Name::new(""),
                client_id: Name::new(""),
                tls: TlsState::Plaintext,
            })
            .request();
        metrics.response_headers();
        metrics.response_end(status.as_u16(), GrpcStatus(None));
        error_response(status, reason)
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let target = self.target.current();
        let route = match target.routes.select(req.method(), req.uri(), req.headers()) {
            RouteAction::Forward(route) => route,
            RouteAction::NotFound => {
                return self.local_response(
                    &target,
                    Name::new("default"),
                    StatusCode::NOT_FOUND,
                    "no route matches this request",
                )
            }
        };
        let Some(backend) = route.pick_backend(rand::random()) else {
            return self.local_response(
                &target,
                route.name.clone(),
                StatusCode::SERVICE_UNAVAILABLE,
                "route has no backend with weight",
            );
        };
        let metrics = backend
            .metrics
            .get_or_init(|| {
                self.ctx.metrics.http_route(RouteLabels {
                    direction: Direction::Outbound,
                    route: route.name.clone(),
                    dst_service: target.service_label.clone(),
                    dst_backend: backend.name.clone(),
                    client_id: Name::new(""),
                    tls: if backend.meshed() {
                        TlsState::Mutual
                    } else {
                        TlsState::Plaintext
                    },
                })
            })
            .request();
        if is_upgrade(&req) {
            // Boxed: rare, and its state would enlarge every request's future.
            return Box::pin(self.upgrade(req, backend, metrics)).await;
        }
        let app_http1 = req.version() < Version::HTTP_2;
        let result = match route.request_timeout {
            Some(limit) => {
                match tokio::time::timeout(limit, self.attempts(&target, route, backend, req)).await
                {
                    Ok(r) => r,
                    Err(_) => Err(Failure::Timeout),
                }
            }
            None => self.attempts(&target, route, backend, req).await,
        };
        let rsp = match result {
            Ok(rsp) => rsp,
            Err(Failure::Timeout) => {
                self.ctx
                    .metrics
                    .http_timeouts
                    .get_or_create(&RetryLabels {
                        route: route.name.clone(),
                        dst_service: target.service_label.clone(),
                    })
                    .inc();
                error_response(StatusCode::GATEWAY_TIMEOUT, "request timed out")
            }
            Err(Failure::Status(status, why)) => error_response(status, why),
        };
        let (mut parts, body) = rsp.into_parts();
        if app_http1 {
            parts.version = Version::HTTP_11;
            headers::strip_hop_by_hop(&mut parts.headers);
        }
        metrics.response_headers();
        let observed = observed(body, metrics, parts.status, &parts.headers);
        Response::from_parts(parts, boxed(observed))
    }

    /// Sends the request, retrying as the route allows; the whole loop is under the
    /// route's request timeout (in `handle`).
    async fn attempts(
        &self,
        target: &Target,
        route: &Route,
        backend: &Backend,
        req: Request<Body>,
    ) -> Result<Response<Body>, Failure> {
        let (parts, incoming) = req.into_parts();
        let head = Head {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
        };
        let policy = route.retry.as_ref();
        if let Some(p) = policy {
            p.budget.deposit();
        }
        // A request can be retried only if its body can be sent again.
        let (replay, once) = match policy {
            Some(p) => match replayable_body(&head, incoming).await {
                Ok(Replay::Buffered(bytes)) if p.is_retryable_method(&head.method, true) => {
                    (Some(bytes), None)
                }
                Ok(Replay::Buffered(bytes)) => (None, Some(body::full(bytes))),
                Ok(Replay::Streaming(b)) => (None, Some(b)),
                Err(_) => {
                    return Err(Failure::Status(
                        StatusCode::BAD_REQUEST,
                        "reading the request body failed",
                    ))
                }
            },
            None => (None, Some(incoming)),
        };
        // A streamed body that breaks mid-way is the client's fault, not the server's.
        let (mut first, body_failed) = match once {
            Some(b) => {
                let (watched, failed) = body::Watched::new(b);
                (Some(boxed(watched)), Some(failed))
            }
            None => (None, None),
        };
        // Only a replayable request keeps its head for later attempts; the usual single
        // attempt moves it, headers and all.
        let (retry_head, mut single) = match (&replay, first.take()) {
            (Some(_), _) => (Some(head), None),
            (None, Some(b)) => (None, Some(head.into_request(b))),
            (None, None) => (None, None),
        };
        let mut attempt = 1u32;
        loop {
            let req = match (&retry_head, &replay, single.take()) {
                (Some(head), Some(bytes), _) => head.to_request(body::full(bytes.clone())),
                (_, _, Some(req)) => req,
                _ => {
                    return Err(Failure::Status(
                        StatusCode::BAD_GATEWAY,
                        "request body already sent",
                    ))
                }
            };
            let result = self.attempt(route, backend, req).await;
            let retryable = match &result {
                Ok(rsp) => policy.is_some_and(|p| p.should_retry_status(rsp.status().as_u16())),
                Err(AttemptError::Send(e)) => e.is_connect() || policy.is_some(),
                Err(AttemptError::Timeout | AttemptError::NoEndpoint) => policy.is_some(),
            };
            if let (true, Some(p), Some(_)) = (retryable, policy, &replay) {
                if attempt < p.max_attempts && p.budget.try_withdraw() {
                    self.ctx
                        .metrics
                        .http_retries
                        .get_or_create(&RetryLabels {
                            route: route.name.clone(),
                            dst_service: target.service_label.clone(),
                        })
                        .inc();
                    tokio::time::sleep(p.backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
            }
            return match result {
                Ok(rsp) => Ok(rsp),
                Err(AttemptError::Timeout) => Err(Failure::Timeout),
                Err(AttemptError::NoEndpoint) => Err(Failure::Status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no endpoint available",
                )),
                Err(AttemptError::Send(_))
                    if body_failed
                        .as_ref()
                        .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed)) =>
                {
                    Err(Failure::Status(
                        StatusCode::BAD_REQUEST,
                        "malformed request body",
                    ))
                }
                Err(AttemptError::Send(e)) => {
                    tracing::info!(error = %e, "request failed");
                    Err(Failure::Status(
                        StatusCode::BAD_GATEWAY,
                        "upstream connection failed",
                    ))
                }
            };
        }
    }

    async fn attempt(
        &self,
        route: &Route,
        backend: &Backend,
        req: Request<Body>,
    ) -> Result<Response<Body>, AttemptError> {
        let Some(handle) = backend.balancer.pick() else {
            return Err(AttemptError::NoEndpoint);
        };
        let ep = handle.endpoint().clone();
        let mut req = match request_for(&ep, req) {
            Ok(r) => r,
            Err(_) => {
                // Nothing was sent: the endpoint learns nothing from this attempt.
                drop(handle);
                return Err(AttemptError::Send(SendError::Request {
                    addr: ep.addr,
                    source: "request target cannot be rewritten".into(),
                }));
            }
        };
        let span = crate::trace::client(&mut req, ep.addr, ep.identity.as_ref(), &route.name);
        let started = Instant::now();
        let send = self.ctx.clients.send(ep.addr, ep.identity.as_ref(), req);
        let sent = match route.backend_request_timeout {
            Some(limit) => tokio::time::timeout(limit, send)
                .await
                .map_err(|_| AttemptError::Timeout),
            None => Ok(send.await),
        };
        match sent {
            Ok(Ok(rsp)) => {
                handle.finish(Outcome::Success(started.elapsed()));
                Ok(crate::trace::respond(span, rsp.map(boxed)))
            }
            Ok(Err(e)) => {
                handle.finish(Outcome::Failure);
                Err(AttemptError::Send(e))
            }
            Err(e) => {
                handle.finish(Outcome::Failure);
                Err(e)
            }
        }
    }

    /// HTTP/1 Upgrade (WebSocket): a dedicated connection to one endpoint — mTLS carrying
    /// opaque bytes when meshed — and, after `101`, bytes both ways.
    async fn upgrade(
        &self,
        mut req: Request<Body>,
        backend: &Backend,
        metrics: HttpRequestMetrics,
    ) -> Response<Body> {
        let Some(handle) = backend.balancer.pick() else {
            let rsp = error_response(StatusCode::SERVICE_UNAVAILABLE, "no endpoint available");
            metrics.response_end(rsp.status().as_u16(), GrpcStatus(None));
            return rsp;
        };
        let ep = handle.endpoint().clone();
        let app_upgrade = req.extensions_mut().remove::<OnUpgrade>();
        let result = self.upgrade_request(&ep, req).await;
        handle.finish(match &result {
            Ok(_) => Outcome::Success(Duration::ZERO),
            Err(_) => Outcome::Failure,
        });
        let mut rsp = match result {
            Ok(rsp) => rsp,
            Err(e) => {
                tracing::info!(error = %e, "upgrade request failed");
                let rsp = error_response(StatusCode::BAD_GATEWAY, "upstream connection failed");
                metrics.response_end(rsp.status().as_u16(), GrpcStatus(None));
                return rsp;
            }
        };
        metrics.response_headers();
        metrics.response_end(rsp.status().as_u16(), GrpcStatus(None));
        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let server_upgrade = hyper::upgrade::on(&mut rsp);
            tokio::spawn(async move {
                let app = match app_upgrade {
                    Some(on) => on.connection().await,
                    None => None,
                };
                match (app, server_upgrade.await) {
                    (Some(mut app), Ok(server)) => {
                        let mut server = hyper_util::rt::TokioIo::new(server);
                        let _ = tokio::io::copy_bidirectional(&mut app, &mut server).await;
                    }
                    (app, server) => tracing::info!(
                        app_connection = app.is_some(),
                        server = ?server.err(),
                        "upgrade did not complete"
                    ),
                }
            });
        }
        rsp.map(boxed)
    }

    async fn upgrade_request(
        &self,
        ep: &Endpoint,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let addr = ep.addr;
        let (parts, body) = req.into_parts();
        let mut out = Request::from_parts(parts, body);
        // Origin-form on a direct HTTP/1 connection; Host and the Upgrade headers stay.
        if let Some(pq) = out.uri().path_and_query().cloned() {
            *out.uri_mut() = Uri::from(pq);
        }
        let timeout = self.ctx.connect_timeout;
        let mut sender = match &ep.identity {
            Some(peer) => {
                let tls = connect::mesh(&self.ctx.opaque_tls, addr, peer, timeout).await?;
                http1_with_upgrades(addr, tls).await?
            }
            None => http1_with_upgrades(addr, connect::tcp(addr, timeout).await?).await?,
        };
        sender
            .send_request(out)
            .await
            .map_err(|e| SendError::Request {
                addr,
                source: Box::new(e),
            })
    }
}

enum AttemptError {
    Send(SendError),
    Timeout,
    NoEndpoint,
}

enum Replay<B> {
    Buffered(Bytes),
    Streaming(B),
}

/// Buffers a body that is known to be small (or empty) so it can be replayed; larger or
/// unsized bodies stream and make the request non-retryable.
async fn replayable_body(head: &Head, body: Body) -> Result<Replay<Body>, body::BoxError> {
    if body.is_end_stream() {
        return Ok(Replay::Buffered(Bytes::new()));
    }
    let declared = head
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len <= MAX_REPLAY_BODY => {
            Ok(Replay::Buffered(body.collect().await?.to_bytes()))
        }
        _ => Ok(Replay::Streaming(body)),
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE)
}

/// The request as this endpoint must receive it.
fn request_for(
    ep: &Endpoint,
    mut req: Request<Body>,
) -> Result<Request<Body>, headers::HeaderError> {
    if ep.identity.is_some() {
        headers::to_mesh(&mut req)?;
        return Ok(req);
    }
    // Unmeshed: plaintext in the app's own protocol. HTTP/1 goes on a connection to the
    // endpoint, in origin-form, and Host keeps what the app said.
    headers::strip_hop_by_hop(req.headers_mut());
    if req.version() < Version::HTTP_2 {
        let authority = headers::authority_of(&req).ok_or(headers::HeaderError::NoAuthority)?;
        if !req.headers().contains_key(http::header::HOST) {
            let host = http::HeaderValue::from_str(authority.as_str())
                .map_err(|_| headers::HeaderError::BadTarget)?;
            req.headers_mut().insert(http::header::HOST, host);
        }
        *req.uri_mut() = headers::origin_form(req.uri());
    }
    Ok(req)
}

/// A one-off HTTP/1 client connection that may be upgraded after its response.
async fn http1_with_upgrades<T>(
    addr: std::net::SocketAddr,
    io: T,
) -> Result<hyper::client::conn::http1::SendRequest<Body>, SendError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|source| SendError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, error = %e, "upgraded connection closed");
        }
    });
    Ok(sender)
}
