//! The admin server on :7191: liveness, readiness (a certificate is held), Prometheus
//! metrics, the current policy as JSON (`/config`, see [`config_view`]), and
//! `POST /shutdown` from loopback (for a pod's preStop or a test).

pub mod config_view;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use weft_certs::CertStore;

use self::config_view::ConfigSources;
use crate::drain::Drain;
use crate::metrics::Metrics;

pub struct Admin {
    pub store: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    /// Set once the inbound and outbound listeners are bound.
    pub listening: AtomicBool,
    pub config: ConfigSources,
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.respond(&req, peer)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tcp), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "admin connection error");
                }
            });
        }
    }

    fn respond(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if self.drain.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                } else if !self.store.is_ready() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no workload certificate yet\n",
                    )
                } else if !self.listening.load(Ordering::Acquire) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "listeners not open yet\n")
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            }
            (&Method::GET, "/metrics") => {
                let mut rsp = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                rsp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                rsp
            }
            (&Method::GET, "/config") => {
                // Synchronous: snapshots are cloned and serialised without awaiting.
                let view = self.config.render(&self.store, &self.metrics);
                match serde_json::to_vec_pretty(&view) {
                    Ok(json) => {
                        let mut rsp = Response::new(Full::new(Bytes::from(json)));
                        rsp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        rsp
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rendering /config failed");
                        text(StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n")
                    }
                }
            }
            (&Method::POST, "/shutdown") => {
                if peer.ip().is_loopback() {
                    tracing::info!("shutdown requested on the admin port");
                    self.drain.start();
                    text(StatusCode::OK, "shutting down\n")
                } else {
                    text(
                        StatusCode::FORBIDDEN,
                        "shutdown is accepted from loopback only\n",
                    )
                }
            }
            (_, "/live" | "/ready" | "/metrics" | "/config" | "/shutdown") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp
}
