//! The inbound path: a redirected connection → its original port → detection (is this
//! mesh mTLS addressed to us?) → TLS termination with the client's identity, or plaintext
//! from an unmeshed client → authorization (per connection for opaque TCP, per request for
//! HTTP) → `127.0.0.1:<port>` where the app listens → bytes both ways.
//!
//! A denied opaque connection is closed before the app is connected, so the app never
//! accepts it. Plaintext HTTP/1 is served request by request (so HTTP rules and probes
//! apply to unmeshed clients and policy changes reach open keep-alive connections);
//! plaintext h2c stays opaque and is decided per connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::authz::{Access, Authz, ClientIdentity, PortAuthz, Protocol};
use crate::connect::{self, ConnectError};
use crate::drain::Drain;
use crate::forward::{forward, Prefixed};
use crate::http::body::boxed;
use crate::http::client::Clients;
use crate::http::h1_server;
use crate::http::inbound::{InboundClient, InboundHttp};
use crate::http::ALPN_H2;
use crate::metrics::{Direction, Metrics, TcpLabels};
use crate::original_dst::original_dst;
use crate::ALPN_OPAQUE;

/// A ClientHello larger than this is not one a weft proxy sends; stop buffering.
const MAX_DETECT_BYTES: usize = 16 * 1024;
/// TLS record content type "handshake" — the first byte of every ClientHello.
const TLS_HANDSHAKE: u8 = 0x16;
/// Read size while detecting: a ClientHello or request head usually arrives in one read.
const READ_CHUNK: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("reading the original destination: {0}")]
    OriginalDst(std::io::Error),
    #[error("connection was not redirected (sent straight to the inbound port)")]
    NotRedirected,
    #[error("reading the first bytes: {0}")]
    Detect(std::io::Error),
    #[error("mesh TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("mesh TLS handshake timed out")]
    HandshakeTimeout,
    #[error("the app: {0}")]
    App(#[from] ConnectError),
}

pub struct Inbound {
    pub tls: TlsAcceptor,
    /// Our own SNI: a ClientHello naming it (with weft's ALPN) is mesh traffic for us.
    pub server_name: String,
    pub metrics: Arc<Metrics>,
    pub detect_timeout: Duration,
    pub connect_timeout: Duration,
    /// Pooled connections to the local app for HTTP arriving over the mesh.
    pub app_clients: Arc<Clients>,
    pub authz: Arc<Authz>,
}

/// A connection decided as a whole: no request to look at.
fn opaque_access(peer: &InboundClient) -> Access<'_> {
    Access {
        peer: peer.identity.as_ref(),
        ip: peer.ip,
        tls: peer.tls,
        http: None,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Detected {
    Mesh,
    Plaintext,
    /// The client sent nothing in time: a server-speaks-first protocol, passed through.
    Silent,
}

impl Inbound {
    /// Accepts until the drain starts; open connections are tracked by the drain.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        loop {
            let accepted = tokio::select! {
                _ = drain.signaled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((tcp, client)) => {
                    let guard = drain.track();
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.handle(tcp, client).await {
                            tracing::info!(%client, error = %e, "inbound connection failed");
                        }
                        drop(guard);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, mut tcp: TcpStream, client: SocketAddr) -> Result<(), InboundError> {
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().map_err(InboundError::OriginalDst)?;
        let dst = original_dst(&tcp, local).map_err(InboundError::OriginalDst)?;
        if dst == local {
            return Err(InboundError::NotRedirected);
        }
        let loopback = match dst.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        let app_addr = SocketAddr::new(loopback, dst.port());
        // Starts the port's policy watch (first connection) while detection reads.
        let authz = self.authz.port(dst.port());
        let (mut prefix, detected) = self.detect(&mut tcp).await?;
        if detected == Detected::Mesh {
            let io = Prefixed::new(prefix, tcp);
            let mut tls =
                match tokio::time::timeout(self.connect_timeout, self.tls.accept(io)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return Err(InboundError::Handshake(e)),
                    Err(_) => return Err(InboundError::HandshakeTimeout),
                };
            let identity = weft_certs::peer_identity(tls.get_ref().1).map(ClientIdentity::new);
            let peer = InboundClient {
                identity,
                ip: client.ip(),
                tls: true,
            };
            if tls.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
                self.serve_h2(tls, app_addr, peer, authz).await;
                return Ok(());
            }
            let decision = authz.decide(&opaque_access(&peer)).await;
            if !decision.allowed {
                // The app never sees the connection; close_notify tells the client proxy.
                let _ = tokio::time::timeout(self.connect_timeout, tls.shutdown()).await;
                return Ok(());
            }
            let app = self.connect_app(app_addr).await?;
            let m = self.metrics.tcp_connection(TcpLabels::mutual(
                Direction::Inbound,
                peer.identity
                    .as_ref()
                    .map(|id| id.uri.0.to_string())
                    .unwrap_or_default(),
            ));
            let _ = forward(tls, app, &m).await;
            return Ok(());
        }

        if detected == Detected::Silent {
            self.metrics.inbound_detect_timeouts.inc();
            tracing::debug!(
                port = dst.port(),
                "client sent nothing before the detection timeout; treating as opaque"
            );
        }
        let peer = InboundClient {
            identity: None,
            ip: client.ip(),
            tls: false,
        };
        let policy = authz.policy().await;
        // Plaintext HTTP/1 is authorized per request; h2c and anything else per connection.
        let http_allowed = policy
            .as_ref()
            .is_some_and(|p| p.protocol != Protocol::Opaque);
        if detected == Detected::Plaintext && http_allowed {
            let protocol = self.detect_http(&mut tcp, &mut prefix).await?;
            if protocol == crate::detect::Protocol::Http1 {
                let client_ip = peer.ip;
                let service = Arc::new(self.http_service(app_addr, peer, authz));
                // The same HTTP/1 server as outbound: nothing held between requests.
                let served = h1_server::serve(tcp, prefix, h1_server::LIMITS, move |req| {
                    service.clone().respond(req)
                });
                if let Err(e) = Box::pin(served).await {
                    tracing::debug!(client = %client_ip, error = %e, "inbound HTTP/1 connection ended");
                }
                return Ok(());
            }
        }
        let decision = authz.check(policy.as_deref(), &opaque_access(&peer));
        if !decision.allowed {
            // Dropping the socket closes it before the app is ever connected.
            return Ok(());
        }
        let io = Prefixed::new(prefix, tcp);
        let app = self.connect_app(app_addr).await?;
        let m = self
            .metrics
            .tcp_connection(TcpLabels::plaintext(Direction::Inbound));
        let _ = forward(io, app, &m).await;
        Ok(())
    }

    /// Reads until the first bytes tell what the connection is. The bytes read are
    /// returned so they can be replayed.
    async fn detect(&self, tcp: &mut TcpStream) -> Result<(Vec<u8>, Detected), InboundError> {
        // Read straight into the replay buffer: a stack chunk would live on in every
        // connection's task, which is sized for its largest state.
        let mut buf = Vec::new();
        let deadline = tokio::time::Instant::now() + self.detect_timeout;
        loop {
            buf.reserve(READ_CHUNK);
            let n = match tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf)).await {
                Err(_) if buf.is_empty() => return Ok((buf, Detected::Silent)),
                Err(_) => return Ok((buf, Detected::Plaintext)),
                Ok(Err(e)) => return Err(InboundError::Detect(e)),
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                return Ok((buf, Detected::Plaintext));
            }
            match classify(&buf, &self.server_name) {
                Some(d) => return Ok((buf, d)),
                None if buf.len() >= MAX_DETECT_BYTES => return Ok((buf, Detected::Plaintext)),
                None => {}
            }
        }
    }

    /// Keeps reading a plaintext connection until its first bytes say whether it is
    /// HTTP/1 (the bytes read are appended to `buf` for replay).
    async fn detect_http(
        &self,
        tcp: &mut TcpStream,
        buf: &mut Vec<u8>,
    ) -> Result<crate::detect::Protocol, InboundError> {
        use crate::detect::Protocol;
        let deadline = tokio::time::Instant::now() + self.detect_timeout;
        loop {
            if let Some(p) = crate::detect::classify(buf) {
                return Ok(p);
            }
            if buf.len() >= MAX_DETECT_BYTES {
                return Ok(Protocol::Opaque);
            }
            buf.reserve(READ_CHUNK);
            match tokio::time::timeout_at(deadline, tcp.read_buf(buf)).await {
                Err(_) | Ok(Ok(0)) => return Ok(Protocol::Opaque),
                Ok(Err(e)) => return Err(InboundError::Detect(e)),
                Ok(Ok(_)) => {}
            }
        }
    }

    fn http_service(&self, app: SocketAddr, peer: InboundClient, authz: PortAuthz) -> InboundHttp {
        InboundHttp::new(
            app,
            self.app_clients.clone(),
            self.metrics.clone(),
            authz,
            peer,
            self.connect_timeout,
        )
    }

    /// Multiplexed HTTP/2 from a client proxy: each request is authorized and goes to the
    /// app on its own.
    async fn serve_h2<T>(&self, io: T, app: SocketAddr, peer: InboundClient, authz: PortAuthz)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let client_ip = peer.ip;
        let service = Arc::new(self.http_service(app, peer, authz));
        let io = hyper_util::rt::TokioIo::new(io);
        // Boxed: HTTP/2 spawns a task per request, which copies the request's future whole
        // (several KiB) a few times on the way in; a box costs less.
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            Box::pin(service.clone().serve(req.map(boxed)))
        });
        let served = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(io, svc)
            .await;
        if let Err(e) = served {
            tracing::debug!(client = %client_ip, error = %e, "inbound HTTP connection ended");
        }
    }

    async fn connect_app(&self, addr: SocketAddr) -> Result<TcpStream, InboundError> {
        Ok(connect::tcp(addr, self.connect_timeout).await?)
    }
}

/// `None` while more bytes are needed to decide.
fn classify(buf: &[u8], our_server_name: &str) -> Option<Detected> {
    if buf.first() != Some(&TLS_HANDSHAKE) {
        return Some(Detected::Plaintext);
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd: &[u8] = buf;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Some(Detected::Plaintext),
        }
    }
    match acceptor.accept() {
        Ok(None) => None,
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            let ours = hello.server_name() == Some(our_server_name);
            let weft_alpn = hello
                .alpn()
                .is_some_and(|mut protos| protos.any(|p| p == ALPN_OPAQUE || p == ALPN_H2));
            Some(if ours && weft_alpn {
                Detected::Mesh
            } else {
                Detected::Plaintext
            })
        }
        // Not TLS after all (or TLS we cannot parse): the app's business, pass it through.
        Err(_) => Some(Detected::Plaintext),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn client_hello(sni: &str, alpn: &[u8]) -> Vec<u8> {
        // Any rustls client emits a real ClientHello; the verifier never runs here.
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn detects_mesh_tls_for_us_only() {
        let ours = "web.shop.serviceaccount.identity.weft.cluster.local";
        let hello = client_hello(ours, ALPN_OPAQUE);
        assert_eq!(classify(&hello, ours), Some(Detected::Mesh));
        // Partial hello: undecided.
        assert_eq!(classify(&hello[..hello.len() / 2], ours), None);
        // The app's own TLS (other SNI or ALPN) passes through untouched.
        assert_eq!(
            classify(&client_hello("example.com", ALPN_OPAQUE), ours),
            Some(Detected::Plaintext)
        );
        assert_eq!(
            classify(&client_hello(ours, b"h2"), ours),
            Some(Detected::Plaintext)
        );
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n", ours),
            Some(Detected::Plaintext)
        );
        assert_eq!(
            classify(&[0x16, 0x00, 0x00, 0x00, 0x00, 0x00], ours),
            Some(Detected::Plaintext)
        );
    }
}
