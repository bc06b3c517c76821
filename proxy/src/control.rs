//! The proxy's gRPC channel to the control plane: HTTP/2 over TLS, the server verified by
//! its SPIFFE identity (never by DNS name).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// A lazily connecting, self-reconnecting channel to `addr` (`host:port`).
pub fn channel(
    addr: &str,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let addr = addr.to_string();
    let connector = TlsConnector::from(tls);
    let connect = tower::service_fn(move |_uri: http::Uri| {
        let addr = addr.clone();
        let connector = connector.clone();
        let server_name = server_name.clone();
        async move {
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connect))
}
