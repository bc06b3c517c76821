//! Opening connections on the proxy's behalf: TCP within the connect timeout, and mesh
//! mTLS that proves the identity discovery expects of the endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::discovery::MeshPeer;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {0}: timed out")]
    Timeout(SocketAddr),
    #[error("mTLS to {addr} (expecting {identity}): {source}")]
    Tls {
        addr: SocketAddr,
        identity: String,
        source: std::io::Error,
    },
}

pub async fn tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => {
            // Proxied traffic is latency-sensitive and already batched by the peer.
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        }
        Ok(Err(source)) => Err(ConnectError::Tcp { addr, source }),
        Err(_) => Err(ConnectError::Timeout(addr)),
    }
}

/// TCP then the mTLS handshake, the whole within `timeout` each.
pub async fn mesh(
    connector: &TlsConnector,
    addr: SocketAddr,
    peer: &MeshPeer,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let tcp = tcp(addr, timeout).await?;
    match tokio::time::timeout(timeout, connector.connect(peer.server_name.clone(), tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(source)) => Err(ConnectError::Tls {
            addr,
            identity: peer.id.to_string(),
            source,
        }),
        Err(_) => Err(ConnectError::Timeout(addr)),
    }
}
