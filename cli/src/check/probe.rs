//! The webhook reachability probe for a URL clientConfig: a TLS handshake with the URL's
//! host that must verify against the webhook's caBundle, as the API server's would.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("not an https URL with a host: {0}")]
    BadUrl(String),
    #[error("caBundle: {0}")]
    CaBundle(String),
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("TLS handshake: {0}")]
    Handshake(String),
}

/// Connects to `url`'s host and port and completes a TLS handshake trusting only `ca_pem`.
pub fn tls_probe(url: &str, ca_pem: &str, timeout: Duration) -> Result<(), ProbeError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| ProbeError::BadUrl(url.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(ProbeError::BadUrl(url.to_string()));
    }
    let host = uri
        .host()
        .ok_or_else(|| ProbeError::BadUrl(url.to_string()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);

    let mut roots = rustls::RootCertStore::empty();
    let ders = crate::install::pki::parse_pem_certs(ca_pem, "caBundle")
        .map_err(|e| ProbeError::CaBundle(e.to_string()))?;
    for der in ders {
        roots
            .add(der)
            .map_err(|e| ProbeError::CaBundle(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProbeError::Handshake(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name =
        ServerName::try_from(host.clone()).map_err(|_| ProbeError::BadUrl(url.to_string()))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| ProbeError::Handshake(e.to_string()))?;

    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(ProbeError::Connect)?
        .next()
        .ok_or_else(|| ProbeError::BadUrl(url.to_string()))?;
    let mut sock = TcpStream::connect_timeout(&addr, timeout).map_err(ProbeError::Connect)?;
    sock.set_read_timeout(Some(timeout))
        .map_err(ProbeError::Connect)?;
    sock.set_write_timeout(Some(timeout))
        .map_err(ProbeError::Connect)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)
            .map_err(|e| ProbeError::Handshake(e.to_string()))?;
    }
    // Be polite: close the session; the answer no longer matters.
    conn.send_close_notify();
    let _ = conn.complete_io(&mut sock);
    let _ = sock.flush();
    let mut sink = [0u8; 1];
    let _ = sock.read(&mut sink);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::install::pki::generate_webhook_tls;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// A one-connection TLS server on loopback presenting `tls`'s serving certificate.
    fn serve_once(tls: &crate::install::pki::WebhookTls) -> u16 {
        let certs = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut sock, _)) = listener.accept() {
                let mut conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                while conn.is_handshaking() {
                    if conn.complete_io(&mut sock).is_err() {
                        return;
                    }
                }
                let _ = conn.complete_io(&mut sock);
            }
        });
        port
    }

    #[test]
    fn handshake_verifies_against_the_ca_bundle() {
        let tls = generate_webhook_tls(&["localhost".to_string()], 1).unwrap();
        let port = serve_once(&tls);
        let url = format!("https://localhost:{port}/inject");
        tls_probe(&url, &tls.ca_pem, Duration::from_secs(5)).unwrap();

        let other = generate_webhook_tls(&["localhost".to_string()], 1).unwrap();
        let port = serve_once(&tls);
        let url = format!("https://localhost:{port}/inject");
        let err = tls_probe(&url, &other.ca_pem, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, ProbeError::Handshake(_)), "{err}");
    }

    #[test]
    fn refuses_plain_http_and_empty_bundles() {
        assert!(matches!(
            tls_probe("http://127.0.0.1:1/", "x", Duration::from_secs(1)),
            Err(ProbeError::BadUrl(_))
        ));
        assert!(matches!(
            tls_probe("https://127.0.0.1:1/", "", Duration::from_secs(1)),
            Err(ProbeError::CaBundle(_))
        ));
    }
}
