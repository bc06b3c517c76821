//! Where requests leave the proxy: one multiplexed HTTP/2 connection per mesh endpoint
//! (mTLS, ALPN `weft.h2/1`) or per plaintext HTTP/2 destination, shared by every request
//! to it; pooled HTTP/1.1 keep-alive connections for HTTP/1 destinations (the local app,
//! unmeshed endpoints).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2::SendRequest};
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

/// HTTP/1.1 keep-alive connections kept per address.
const HTTP1_MAX_POOLED: usize = 64;
/// A pooled HTTP/1.1 connection unused this long is closed.
const HTTP1_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One pooled HTTP/1.1 connection. It goes back to the pool as soon as its response head
/// arrives; until that response's body has been read it is not ready and is skipped.
struct Http1Conn {
    sender: http1::SendRequest<Body>,
    used: Instant,
}

/// Connection pools are keyed by address and looked up on every request.
type AddrMap<V> = HashMap<SocketAddr, V, foldhash::fast::RandomState>;

type Http1Pool = Mutex<AddrMap<Vec<Http1Conn>>>;

pub struct Clients {
    mesh_tls: TlsConnector,
    // Held only to take or return a sender, never across an await; shared with the task
    // that closes idle connections.
    http1: Arc<Http1Pool>,
    http1_sweeper: std::sync::Once,
    // Looked up once per request; held only to clone a sender, never across an await.
    h2: Mutex<AddrMap<H2Conn>>,
    connect_timeout: Duration,
}

impl Clients {
    pub fn new(mesh_tls: TlsConnector, connect_timeout: Duration) -> Self {
        Clients {
            mesh_tls,
            http1: Arc::new(Mutex::new(AddrMap::default())),
            http1_sweeper: std::sync::Once::new(),
            h2: Mutex::new(AddrMap::default()),
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
            return self.send_http1(addr, req).await;
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

    /// HTTP/1.1 on a pooled keep-alive connection (a new one when none is ready). A request
    /// a pooled connection could not even start to send (the server had just closed it) is
    /// sent once more on a new connection.
    async fn send_http1(
        &self,
        addr: SocketAddr,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        // Origin-form on the wire; the Host header keeps (or, if missing, gets) the authority.
        if req.uri().authority().is_some() {
            if !req.headers().contains_key(http::header::HOST) {
                let host = req
                    .uri()
                    .authority()
                    .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok());
                if let Some(host) = host {
                    req.headers_mut().insert(http::header::HOST, host);
                }
            }
            *req.uri_mut() = super::headers::origin_form(req.uri());
        }
        let request_error = |e: hyper::Error| SendError::Request {
            addr,
            source: Box::new(e),
        };
        let req = match self.pooled_http1(addr) {
            Some(mut sender) => match sender.try_send_request(req).await {
                Ok(rsp) => {
                    self.return_http1(addr, sender);
                    return Ok(rsp);
                }
                Err(mut e) => match e.take_message() {
                    Some(req) => req,
                    None => return Err(request_error(e.into_error())),
                },
            },
            None => req,
        };
        // Boxed: connecting is rare, and its state would otherwise make every request's
        // future (copied whole when its task is spawned) that much larger.
        let mut sender = Box::pin(self.connect_http1(addr)).await?;
        let rsp = sender.send_request(req).await.map_err(request_error)?;
        self.return_http1(addr, sender);
        Ok(rsp)
    }

    /// The most recently used ready connection to `addr`; closed ones are dropped on the way.
    fn pooled_http1(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut pool = lock(&self.http1);
        let conns = pool.get_mut(&addr)?;
        conns.retain(|c| !c.sender.is_closed());
        let ready = conns.iter().rposition(|c| c.sender.is_ready())?;
        Some(conns.swap_remove(ready).sender)
    }

    fn return_http1(&self, addr: SocketAddr, sender: http1::SendRequest<Body>) {
        let mut pool = lock(&self.http1);
        let conns = pool.entry(addr).or_default();
        if conns.len() < HTTP1_MAX_POOLED {
            conns.push(Http1Conn {
                sender,
                used: Instant::now(),
            });
        }
    }

    async fn connect_http1(&self, addr: SocketAddr) -> Result<http1::SendRequest<Body>, SendError> {
        let tcp = connect::tcp(addr, self.connect_timeout).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|source| SendError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "HTTP/1.1 connection closed");
            }
        });
        let pool = Arc::downgrade(&self.http1);
        self.http1_sweeper
            .call_once(|| drop(tokio::spawn(sweep_http1(pool))));
        Ok(sender)
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
        // Boxed for the same reason as the HTTP/1 connect: a TLS handshake's state is large.
        let sender = Box::pin(self.connect_h2(addr, peer)).await?;
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
                // Boxed: hyper spawns a task per request whose type is as large as its
                // connection task, TLS state included, and that task is copied on spawn.
                let (sender, conn) = builder
                    .handshake(TokioIo::new(Box::new(tls)))
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

    fn lock(&self) -> std::sync::MutexGuard<'_, AddrMap<H2Conn>> {
        self.h2
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Closes pooled HTTP/1.1 connections unused for [`HTTP1_IDLE_TIMEOUT`], until the pool
/// is gone.
async fn sweep_http1(pool: Weak<Http1Pool>) {
    let mut tick = tokio::time::interval(HTTP1_IDLE_TIMEOUT / 2);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let mut pool = lock(&pool);
        for conns in pool.values_mut() {
            conns.retain(|c| !c.sender.is_closed() && c.used.elapsed() < HTTP1_IDLE_TIMEOUT);
        }
        pool.retain(|_, conns| !conns.is_empty());
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
