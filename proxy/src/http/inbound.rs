//! Inbound HTTP: each request is authorized against the port's current policy, then
//! forwarded to the app on `127.0.0.1:<port>`. Requests arrive over the mesh HTTP/2 hop
//! (restored to what the client app sent: HTTP/1.1 or HTTP/2) or as plaintext HTTP/1
//! from an unmeshed client (forwarded as HTTP/1.1; `Upgrade` gets its own connection).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};

use super::body::{boxed, error_response, full, observed, Body};
use super::client::Clients;
use super::h1_server::OnUpgrade;
use super::headers;
use crate::authz::{normalize_path, Access, ClientIdentity, Decision, HttpAccess, PortAuthz};
use crate::connect;
use crate::metrics::{
    Direction, GrpcStatus, HttpRequestMetrics, Metrics, Name, RouteLabels, RouteMetrics, TlsState,
};

/// gRPC's PERMISSION_DENIED.
const GRPC_PERMISSION_DENIED: &str = "7";

/// Who is on the other end of one inbound connection.
#[derive(Debug, Clone)]
pub struct InboundClient {
    /// The client proxy's identity (mesh mTLS); `None` for plaintext.
    pub identity: Option<ClientIdentity>,
    pub ip: IpAddr,
    /// True for mesh mTLS (requests in mesh form), false for plaintext HTTP/1.
    pub tls: bool,
}

pub struct InboundHttp {
    /// Where the app listens.
    pub app: SocketAddr,
    app_authority: http::uri::Authority,
    pub clients: Arc<Clients>,
    pub metrics: Arc<Metrics>,
    /// Resolved once per connection: every request on it has the same labels.
    route_metrics: RouteMetrics,
    authz: PortAuthz,
    client: InboundClient,
    connect_timeout: Duration,
}

impl InboundHttp {
    pub fn new(
        app: SocketAddr,
        clients: Arc<Clients>,
        metrics: Arc<Metrics>,
        authz: PortAuthz,
        client: InboundClient,
        connect_timeout: Duration,
    ) -> Self {
        // A socket address always parses as an authority.
        let app_authority = http::uri::Authority::try_from(app.to_string().as_str())
            .unwrap_or_else(|_| http::uri::Authority::from_static("127.0.0.1"));
        let labels = RouteLabels {
            direction: Direction::Inbound,
            route: Name::new("default"),
            dst_service: Name::new(""),
            dst_backend: Name::new(""),
            client_id: client
                .identity
                .as_ref()
                .map_or_else(|| Name::new(""), |id| id.uri.clone()),
            tls: if client.tls {
                TlsState::Mutual
            } else {
                TlsState::Plaintext
            },
        };
        InboundHttp {
            app,
            app_authority,
            clients,
            route_metrics: metrics.http_route(labels),
            metrics,
            authz,
            client,
            connect_timeout,
        }
    }

    pub async fn serve(self: Arc<Self>, req: Request<Body>) -> Result<Response<Body>, Infallible> {
        Ok(self.handle(req).await)
    }

    pub async fn respond(self: Arc<Self>, req: Request<Body>) -> Response<Body> {
        self.handle(req).await
    }

    async fn handle(&self, mut req: Request<Body>) -> Response<Body> {
        let metrics = self.route_metrics.request();
        let span = crate::trace::server(&mut req, &self.client);
        // Read per request: a policy change applies to the next request on this connection.
        let decision = {
            let path = normalize_path(req.uri().path());
            let access = Access {
                peer: self.client.identity.as_ref(),
                ip: self.client.ip,
                tls: self.client.tls,
                http: Some(HttpAccess {
                    method: req.method().as_str(),
                    path: &path,
                }),
            };
            self.authz.decide(&access).await
        };
        let rsp = if !decision.allowed {
            denied_response(&decision, is_grpc(&req))
        } else if !self.client.tls && is_upgrade(&req) {
            // Boxed: rare, and its state would enlarge every request's future.
            return Box::pin(self.upgrade(req, metrics)).await;
        } else {
            let prepared = if self.client.tls {
                headers::from_mesh(&mut req).map(|_| ())
            } else {
                self.prepare_plaintext(&mut req)
            };
            match prepared {
                Err(_) => error_response(StatusCode::BAD_REQUEST, "request has no authority"),
                Ok(()) => match self.clients.send(self.app, None, req).await {
                    Ok(rsp) => rsp.map(boxed),
                    Err(e) => {
                        tracing::info!(app = %self.app, error = %e, "forwarding to the app failed");
                        error_response(StatusCode::BAD_GATEWAY, "the app is not answering")
                    }
                },
            }
        };
        let rsp = crate::trace::respond(span, rsp);
        let (mut parts, body) = rsp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        metrics.response_headers();
        let observed = observed(body, metrics, parts.status, &parts.headers);
        Response::from_parts(parts, boxed(observed))
    }

    /// A plaintext HTTP/1 request as the app gets it: HTTP/1.1 on a pooled connection to
    /// the app, the client's Host kept.
    fn prepare_plaintext<B>(&self, req: &mut Request<B>) -> Result<(), headers::HeaderError> {
        headers::strip_hop_by_hop(req.headers_mut());
        if !req.headers().contains_key(http::header::HOST) {
            // HTTP/1.0 without Host: the app sees the address it listens on.
            let host = HeaderValue::from_str(self.app_authority.as_str())
                .map_err(|_| headers::HeaderError::BadTarget)?;
            req.headers_mut().insert(http::header::HOST, host);
        }
        *req.uri_mut() = headers::origin_form(req.uri());
        *req.version_mut() = Version::HTTP_11;
        Ok(())
    }

    /// HTTP/1 Upgrade (WebSocket) from a plaintext client: a dedicated connection to the
    /// app and, after `101`, bytes both ways.
    async fn upgrade(&self, mut req: Request<Body>, metrics: HttpRequestMetrics) -> Response<Body> {
        let client_upgrade = req.extensions_mut().remove::<OnUpgrade>();
        // Origin-form on a direct HTTP/1 connection; Host and the Upgrade headers stay.
        if let Some(pq) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = Uri::from(pq);
        }
        let app = self.app;
        let sent = async {
            let tcp = connect::tcp(app, self.connect_timeout)
                .await
                .map_err(|e| e.to_string())?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(%app, error = %e, "upgraded connection to the app closed");
                }
            });
            sender.send_request(req).await.map_err(|e| e.to_string())
        };
        let mut rsp = match sent.await {
            Ok(rsp) => rsp,
            Err(error) => {
                tracing::info!(%app, %error, "upgrade request to the app failed");
                let rsp = error_response(StatusCode::BAD_GATEWAY, "the app is not answering");
                metrics.response_end(rsp.status().as_u16(), GrpcStatus(None));
                return rsp;
            }
        };
        metrics.response_headers();
        metrics.response_end(rsp.status().as_u16(), GrpcStatus(None));
        if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let app_upgrade = hyper::upgrade::on(&mut rsp);
            tokio::spawn(async move {
                let client = match client_upgrade {
                    Some(on) => on.connection().await,
                    None => None,
                };
                match (client, app_upgrade.await) {
                    (Some(mut client), Ok(server)) => {
                        let mut server = hyper_util::rt::TokioIo::new(server);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                    (c, s) => tracing::info!(
                        client_connection = c.is_some(),
                        app = ?s.err(),
                        "upgrade did not complete"
                    ),
                }
            });
        }
        rsp.map(boxed)
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11 && req.headers().contains_key(http::header::UPGRADE)
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// 403 with the reason as a short text body; gRPC clients get `PERMISSION_DENIED` (a
/// trailers-only response, HTTP 200 as gRPC requires).
fn denied_response(decision: &Decision, grpc: bool) -> Response<Body> {
    let reason = decision.reason();
    let reason_header =
        HeaderValue::from_str(&reason).unwrap_or_else(|_| HeaderValue::from_static("denied"));
    let mut rsp = if grpc {
        let mut rsp = Response::new(super::body::empty());
        let h = rsp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(
            "grpc-status",
            HeaderValue::from_static(GRPC_PERMISSION_DENIED),
        );
        if let Ok(message) = HeaderValue::from_str(&grpc_percent_encode(&reason)) {
            h.insert("grpc-message", message);
        }
        rsp
    } else {
        let mut rsp = Response::new(full(Bytes::from(reason.into_owned())));
        *rsp.status_mut() = StatusCode::FORBIDDEN;
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        rsp
    };
    rsp.headers_mut().insert("x-weft-error", reason_header);
    rsp
}

/// `grpc-message` is percent-encoded: anything outside printable ASCII, and `%` itself.
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::{Authz, PortPolicy};
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tokio::net::TcpListener;
    use weft_api::inbound as proto;

    /// An app answering every request with "app:<method> <path>".
    async fn app() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let body = format!("app:{} {}", req.method(), req.uri().path());
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
                            body,
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn allow_only_get() -> Option<Arc<PortPolicy>> {
        let msg = proto::InboundPolicy {
            policies: vec![proto::Policy {
                name: "shop/internal-api".into(),
                action: proto::Action::Allow as i32,
                rules: vec![proto::Rule {
                    from: vec![],
                    to: vec![proto::Destination {
                        methods: vec!["GET".into()],
                        paths: vec![],
                    }],
                }],
            }],
            ..Default::default()
        };
        Some(Arc::new(
            PortPolicy::compile(&msg, "cluster.local").unwrap(),
        ))
    }

    /// One plaintext HTTP/1 keep-alive connection from an unmeshed client through `InboundHttp`.
    async fn plaintext_connection(
        policy: tokio::sync::watch::Receiver<Option<Arc<PortPolicy>>>,
    ) -> (
        hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        Arc<Metrics>,
    ) {
        let app = app().await;
        let metrics = Metrics::new();
        let authz = Authz::fixed(policy, metrics.clone(), Duration::from_millis(100));
        let tls = tokio_rustls::TlsConnector::from(Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        ));
        let service = Arc::new(InboundHttp::new(
            app,
            Arc::new(Clients::new(tls, Duration::from_secs(1))),
            metrics.clone(),
            authz.port(app.port()),
            InboundClient {
                identity: None,
                ip: "10.9.0.1".parse().unwrap(),
                tls: false,
            },
            Duration::from_secs(1),
        ));
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                service.clone().serve(req.map(boxed))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(server_io), svc)
                .with_upgrades()
                .await;
        });
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
            .await
            .unwrap();
        tokio::spawn(conn);
        (sender, metrics)
    }

    async fn send(
        sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        method: &str,
        path: &str,
        grpc: bool,
    ) -> (StatusCode, http::HeaderMap, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "internal.shop:8080");
        if grpc {
            req = req.header("content-type", "application/grpc");
        }
        sender.ready().await.unwrap();
        let rsp = sender
            .send_request(req.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let status = rsp.status();
        let headers = rsp.headers().clone();
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn requests_are_authorized_one_by_one_and_policy_changes_apply_on_open_connections() {
        let (policy_tx, policy_rx) = tokio::sync::watch::channel(allow_only_get());
        let (mut sender, metrics) = plaintext_connection(policy_rx).await;

        let (status, _, body) = send(&mut sender, "GET", "/api/v1/users/42", false).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "app:GET /api/v1/users/42")
        );

        let (status, headers, body) = send(&mut sender, "DELETE", "/api/v1/users/42", false).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body, "no policy allows this request");
        assert_eq!(headers["x-weft-error"], "no policy allows this request");

        let (status, headers, body) = send(&mut sender, "POST", "/Echo/Say", true).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["grpc-status"], "7");
        assert_eq!(headers["grpc-message"], "no policy allows this request");
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(body, "");

        // The same keep-alive connection: the new policy decides the next request.
        let mut deny_get = proto::InboundPolicy::default();
        deny_get.policies.push(proto::Policy {
            name: "shop/no-get".into(),
            action: proto::Action::Deny as i32,
            rules: vec![proto::Rule {
                from: vec![],
                to: vec![proto::Destination {
                    methods: vec!["GET".into()],
                    paths: vec![],
                }],
            }],
        });
        policy_tx.send_replace(Some(Arc::new(
            PortPolicy::compile(&deny_get, "cluster.local").unwrap(),
        )));
        let (status, _, body) = send(&mut sender, "GET", "/api/v1/users/42", false).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::FORBIDDEN, "denied by policy shop/no-get")
        );
        let (status, _, body) = send(&mut sender, "DELETE", "/x", false).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "app:DELETE /x"));

        let text = metrics.encode();
        for want in [
            r#"weft_inbound_authz_total{decision="allow",policy="shop/internal-api",rule="0",port="#,
            r#"weft_inbound_authz_total{decision="deny",policy="default",rule="",port="#,
            r#"weft_inbound_authz_total{decision="deny",policy="shop/no-get",rule="0",port="#,
            r#"weft_http_responses_total{status_code="403",grpc_status="",direction="inbound",route="default",dst_service="",dst_backend="",client_id="",tls="false"} 2"#,
            r#"weft_http_responses_total{status_code="200",grpc_status="7",direction="inbound""#,
        ] {
            assert!(text.contains(want), "missing {want}\n{text}");
        }
    }

    #[tokio::test]
    async fn paths_are_matched_normalized_but_forwarded_unchanged() {
        let msg = proto::InboundPolicy {
            policies: vec![proto::Policy {
                name: "shop/api-only".into(),
                action: proto::Action::Allow as i32,
                rules: vec![proto::Rule {
                    from: vec![],
                    to: vec![proto::Destination {
                        methods: vec![],
                        paths: vec!["/api/*".into()],
                    }],
                }],
            }],
            ..Default::default()
        };
        let (_tx, rx) = tokio::sync::watch::channel(Some(Arc::new(
            PortPolicy::compile(&msg, "cluster.local").unwrap(),
        )));
        let (mut sender, _) = plaintext_connection(rx).await;
        let (status, _, _) = send(&mut sender, "GET", "/api/%2e%2e/admin", false).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, _, body) = send(&mut sender, "GET", "/api/./v1", false).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, "app:GET /api/./v1")
        );
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(
            grpc_percent_encode("denied by policy a/b"),
            "denied by policy a/b"
        );
        assert_eq!(grpc_percent_encode("100%\n"), "100%25%0A");
    }
}
