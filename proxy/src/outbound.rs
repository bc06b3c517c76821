//! The outbound path: the app's redirected connection → its original destination →
//! discovery → an endpoint → mTLS to a meshed endpoint's proxy (verifying the identity
//! discovery expects) or plain TCP to an unmeshed one → bytes both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::connect::{self, ConnectError};
use crate::detect::{detect, Protocol};
use crate::discovery::{Discovery, Endpoint, Target};
use crate::drain::Drain;
use crate::forward::{forward, Prefixed};
use crate::http::body::boxed;
use crate::http::h1_server;
use crate::http::outbound::{HttpContext, OutboundHttp};
use crate::metrics::{Direction, Metrics, TcpLabels};
use crate::original_dst::original_dst;

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("reading the original destination: {0}")]
    OriginalDst(std::io::Error),
    #[error("connection was not redirected (original destination is the proxy itself)")]
    NotRedirected,
    #[error(transparent)]
    Discovery(#[from] crate::discovery::DiscoveryError),
    #[error("{0} has no endpoints")]
    NoEndpoints(SocketAddr),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("reading the first bytes: {0}")]
    Detect(std::io::Error),
    #[error("HTTP: {0}")]
    Http(hyper::Error),
    #[error("HTTP/1: {0}")]
    Http1(h1_server::ServeError),
}

pub struct Outbound {
    pub discovery: Arc<Discovery>,
    pub mesh_tls: TlsConnector,
    pub metrics: Arc<Metrics>,
    pub connect_timeout: Duration,
    pub detect_timeout: Duration,
    pub http: Arc<HttpContext>,
}

/// Tries this many distinct endpoints before giving up on a connection.
const CONNECT_ATTEMPTS: usize = 3;

impl Outbound {
    /// Accepts until the process exits: outbound stays up while a shutdown drains, so the
    /// app can finish its work (its calls out are what let its own requests complete).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        loop {
            match listener.accept().await {
                Ok((tcp, client)) => {
                    let guard = drain.track();
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.handle(tcp).await {
                            tracing::info!(%client, error = %e, "outbound connection failed");
                        }
                        drop(guard);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, mut tcp: TcpStream) -> Result<(), OutboundError> {
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().map_err(OutboundError::OriginalDst)?;
        let dst = original_dst(&tcp, local).map_err(OutboundError::OriginalDst)?;
        if dst == local {
            return Err(OutboundError::NotRedirected);
        }
        // The paths that are not HTTP run boxed, as does the lookup: inline, their state
        // would size the task of every connection, including each idle HTTP/1 one.
        let watch = Box::pin(self.discovery.resolve(dst)).await?;
        let target = watch.current();
        if !target.known {
            // Not in the mesh's view: pass through as the app asked (egress).
            return Box::pin(self.egress(tcp, dst)).await;
        }
        if target.opaque {
            return Box::pin(self.connect_endpoint(Prefixed::new(Vec::new(), tcp), dst, &target))
                .await;
        }
        let (prefix, protocol) = detect(&mut tcp, self.detect_timeout)
            .await
            .map_err(OutboundError::Detect)?;
        match protocol {
            Protocol::Opaque => {
                Box::pin(self.connect_endpoint(Prefixed::new(prefix, tcp), dst, &target)).await
            }
            Protocol::Silent => {
                self.metrics.http_detect_timeouts.inc();
                tracing::debug!(%dst, "app sent nothing before the detection timeout; treating as opaque");
                Box::pin(self.connect_endpoint(Prefixed::new(prefix, tcp), dst, &target)).await
            }
            Protocol::Http1 => {
                let service = Arc::new(OutboundHttp {
                    target: watch,
                    ctx: self.http.clone(),
                });
                // Our own HTTP/1 server: an idle keep-alive connection holds no buffers.
                h1_server::serve(tcp, prefix, h1_server::LIMITS, move |req| {
                    service.clone().respond(req)
                })
                .await
                .map_err(OutboundError::Http1)
            }
            Protocol::Http2 => {
                let service = Arc::new(OutboundHttp {
                    target: watch,
                    ctx: self.http.clone(),
                });
                let io = hyper_util::rt::TokioIo::new(Prefixed::new(prefix, tcp));
                // Boxed: see `Inbound::serve_http` (a task per HTTP/2 request copies it).
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    Box::pin(service.clone().serve(req.map(boxed)))
                });
                // Boxed like the other paths (see above).
                Box::pin(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .timer(hyper_util::rt::TokioTimer::new())
                        .serve_connection(io, svc),
                )
                .await
                .map_err(OutboundError::Http)
            }
        }
    }

    async fn egress(&self, tcp: TcpStream, dst: SocketAddr) -> Result<(), OutboundError> {
        let server = connect::tcp(dst, self.connect_timeout).await?;
        let m = self
            .metrics
            .tcp_connection(TcpLabels::plaintext(Direction::Outbound));
        let _ = forward(tcp, server, &m).await;
        Ok(())
    }

    async fn connect_endpoint(
        &self,
        tcp: Prefixed<TcpStream>,
        dst: SocketAddr,
        target: &Target,
    ) -> Result<(), OutboundError> {
        let n = target.endpoints.len();
        if n == 0 {
            return Err(OutboundError::NoEndpoints(dst));
        }
        let start = rand::rng().random_range(0..n);
        let mut last_err = None;
        for i in 0..n.min(CONNECT_ATTEMPTS) {
            let ep = &target.endpoints[(start + i) % n];
            match self.open(ep).await {
                Ok(Opened::Mesh(tls, peer)) => {
                    let m = self
                        .metrics
                        .tcp_connection(TcpLabels::mutual(Direction::Outbound, peer));
                    let _ = forward(tcp, tls, &m).await;
                    return Ok(());
                }
                Ok(Opened::Plain(server)) => {
                    let m = self
                        .metrics
                        .tcp_connection(TcpLabels::plaintext(Direction::Outbound));
                    let _ = forward(tcp, server, &m).await;
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(endpoint = %ep.addr, error = %e, "endpoint failed; trying another");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or(OutboundError::NoEndpoints(dst)))
    }

    async fn open(&self, ep: &Endpoint) -> Result<Opened, OutboundError> {
        let opened = match &ep.identity {
            Some(peer) => Opened::Mesh(
                Box::new(connect::mesh(&self.mesh_tls, ep.addr, peer, self.connect_timeout).await?),
                peer.id.to_string(),
            ),
            None => Opened::Plain(connect::tcp(ep.addr, self.connect_timeout).await?),
        };
        Ok(opened)
    }
}

enum Opened {
    Mesh(Box<tokio_rustls::client::TlsStream<TcpStream>>, String),
    Plain(TcpStream),
}
