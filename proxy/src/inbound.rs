//! The inbound path: a redirected connection → its original port → detection (is this
//! mesh mTLS addressed to us?) → TLS termination with the client's identity, or plaintext
//! from an unmeshed client → `127.0.0.1:<port>` where the app listens → bytes both ways.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::drain::Drain;
use crate::forward::{forward, Prefixed};
use crate::http::client::Clients;
use crate::http::inbound::InboundHttp;
use crate::http::ALPN_H2;
use crate::metrics::{Direction, Metrics, TcpLabels, TlsState};
use crate::original_dst::original_dst;
use crate::ALPN_OPAQUE;

/// A ClientHello larger than this is not one a weft proxy sends; stop buffering.
const MAX_DETECT_BYTES: usize = 16 * 1024;
/// TLS record content type "handshake" — the first byte of every ClientHello.
const TLS_HANDSHAKE: u8 = 0x16;

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
    #[error("connecting to the app on {addr}: {source}")]
    App {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to the app on {0}: timed out")]
    AppTimeout(SocketAddr),
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
                        if let Err(e) = this.handle(tcp).await {
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

    async fn handle(&self, mut tcp: TcpStream) -> Result<(), InboundError> {
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
        let (prefix, detected) = self.detect(&mut tcp).await?;
        let io = Prefixed::new(prefix, tcp);
        match detected {
            Detected::Mesh => {
                let tls =
                    match tokio::time::timeout(self.connect_timeout, self.tls.accept(io)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => return Err(InboundError::Handshake(e)),
                        Err(_) => return Err(InboundError::HandshakeTimeout),
                    };
                let peer = weft_certs::peer_identity(tls.get_ref().1)
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                if tls.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
                    return self.serve_mesh_http(tls, app_addr, &peer).await;
                }
                let app = self.connect_app(app_addr).await?;
                let m = self.metrics.tcp_connection(TcpLabels {
                    direction: Direction::Inbound,
                    peer_identity: peer,
                    tls: TlsState::Mutual,
                });
                let _ = forward(tls, app, &m).await;
            }
            Detected::Plaintext | Detected::Silent => {
                if detected == Detected::Silent {
                    self.metrics.inbound_detect_timeouts.inc();
                    tracing::debug!(
                        port = dst.port(),
                        "client sent nothing before the detection timeout; treating as opaque"
                    );
                }
                let app = self.connect_app(app_addr).await?;
                let m = self.metrics.tcp_connection(TcpLabels {
                    direction: Direction::Inbound,
                    peer_identity: String::new(),
                    tls: TlsState::Plaintext,
                });
                let _ = forward(io, app, &m).await;
            }
        }
        Ok(())
    }

    /// Reads until the first bytes tell what the connection is. The bytes read are
    /// returned so they can be replayed.
    async fn detect(&self, tcp: &mut TcpStream) -> Result<(Vec<u8>, Detected), InboundError> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 2048];
        let deadline = tokio::time::Instant::now() + self.detect_timeout;
        loop {
            let n = match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
                Err(_) if buf.is_empty() => return Ok((buf, Detected::Silent)),
                Err(_) => return Ok((buf, Detected::Plaintext)),
                Ok(Err(e)) => return Err(InboundError::Detect(e)),
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                return Ok((buf, Detected::Plaintext));
            }
            buf.extend_from_slice(&chunk[..n]);
            match classify(&buf, &self.server_name) {
                Some(d) => return Ok((buf, d)),
                None if buf.len() >= MAX_DETECT_BYTES => return Ok((buf, Detected::Plaintext)),
                None => {}
            }
        }
    }

    /// Multiplexed HTTP/2 from a client proxy: each request goes to the app on its own.
    async fn serve_mesh_http(
        &self,
        tls: tokio_rustls::server::TlsStream<Prefixed<TcpStream>>,
        app: SocketAddr,
        peer: &str,
    ) -> Result<(), InboundError> {
        let service = Arc::new(InboundHttp::new(
            app,
            self.app_clients.clone(),
            self.metrics.clone(),
        ));
        let svc = hyper::service::service_fn(move |req| service.clone().serve(req));
        let served = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
            .await;
        if let Err(e) = served {
            tracing::debug!(%peer, error = %e, "mesh HTTP/2 connection ended");
        }
        Ok(())
    }

    async fn connect_app(&self, addr: SocketAddr) -> Result<TcpStream, InboundError> {
        match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
            Ok(Err(source)) => Err(InboundError::App { addr, source }),
            Err(_) => Err(InboundError::AppTimeout(addr)),
        }
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
