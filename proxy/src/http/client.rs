//! Where requests leave the proxy: one multiplexed HTTP/2 connection per mesh endpoint
//! (mTLS, ALPN `weft.h2/1`) or per plaintext HTTP/2 destination, shared by every request
//! to it; pooled HTTP/1.1 keep-alive connections for HTTP/1 destinations (the local app,
//! unmeshed endpoints).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_rustls::TlsConnector;

use super::body::Body;
use crate::connect::{self, ConnectError};
use crate::discovery::MeshPeer;
use weft_certs::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP/2 handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SendError {
    /// Failed before the request could have reached the server: safe to retry anywhere.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::Handshake { .. })
    }
}

/// One pooled HTTP/2 connection and the identity its server proved (`None`: plaintext).
/// Keyed by address alone so a lookup allocates nothing; a different identity at the same
/// address (a recycled pod IP) replaces the connection.
struct H2Conn {
    identity: Option<SpiffeId>,
    sender: SendRequest<Body>,
}

pub struct Clients {
    mesh_tls: TlsConnector,
    http1: Client<HttpConnector, Body>,
    // Looked up once per request; held only to clone a sender, never across an await.
    h2: Mutex<HashMap<SocketAddr, H2Conn>>,
    connect_timeout: Duration,
}

impl Clients {
    pub fn new(mesh_tls: TlsConnector, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let http1 = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector);
        Clients {
            mesh_tls,
            http1,
            h2: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// Sends `req` to `addr`: over mesh mTLS HTTP/2 when `peer` is given; otherwise
    /// plaintext in the request's own version. An HTTP/1 request's URI must already name
    /// `addr` as its authority (its Host header keeps what the app said).
    pub async fn send(
        &self,
        addr: SocketAddr,
        peer: Option<&MeshPeer>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        if peer.is_none() && req.version() < Version::HTTP_2 {
            return self
                .http1
                .request(req)
                .await
                .map_err(|e| SendError::Request {
                    addr,
                    source: Box::new(e),
                });
        }
        let mut sender = self.h2_sender(addr, peer).await?;
        sender
            .send_request(req)
            .await
            .map_err(|e| SendError::Request {
                addr,
                source: Box::new(e),
            })
    }

    async fn h2_sender(
        &self,
        addr: SocketAddr,
        peer: Option<&MeshPeer>,
    ) -> Result<SendRequest<Body>, SendError> {
        let wanted = peer.map(|p| &p.id);
        if let Some(conn) = self.lock().get(&addr) {
            if conn.identity.as_ref() == wanted && !conn.sender.is_closed() {
                return Ok(conn.sender.clone());
            }
        }
        let sender = self.connect_h2(addr, peer).await?;
        let conn = H2Conn {
            identity: wanted.cloned(),
            sender: sender.clone(),
        };
        self.lock().insert(addr, conn);
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        addr: SocketAddr,
        peer: Option<&MeshPeer>,
    ) -> Result<SendRequest<Body>, SendError> {
        let builder = {
            let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10));
            b
        };
        let sender = match peer {
            Some(peer) => {
                let tls = connect::mesh(&self.mesh_tls, addr, peer, self.connect_timeout).await?;
                let (sender, conn) = builder
                    .handshake(TokioIo::new(tls))
                    .await
                    .map_err(|source| SendError::Handshake { addr, source })?;
                spawn_connection(addr, conn);
                sender
            }
            None => {
                let tcp = connect::tcp(addr, self.connect_timeout).await?;
                let (sender, conn) = builder
                    .handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|source| SendError::Handshake { addr, source })?;
                spawn_connection(addr, conn);
                sender
            }
        };
        Ok(sender)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, H2Conn>> {
        self.h2
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Drives a client connection until it closes; the pool notices through `is_closed`.
fn spawn_connection<F>(addr: SocketAddr, conn: F)
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "HTTP/2 connection closed");
        }
    });
}
