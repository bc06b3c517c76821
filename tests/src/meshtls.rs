//! A mesh-TLS client the test drives itself: a workload certificate minted by any trust
//! domain's issuer (such as a second CA from `weft identity --trust-domain other.local`), and a
//! TLS connection presenting it to a server pod exactly as a client proxy would (SNI = the
//! server identity's DNS form, weft's ALPN, TLS 1.3). It stands in for a proxy of another
//! trust domain, which a single standalone control plane cannot run: discovery would name the
//! server by that other domain's identity, and the server could never present it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;
use weft_certs::{CertStore, Issuer, SpiffeId, TrustAnchors, WorkloadKey};

use crate::error::{HarnessError, IoContext, Result};
use crate::mesh::IdentityFiles;
use crate::netns::Netns;

/// ALPN of opaque TCP between proxies: the bytes inside the TLS stream are the app's.
pub const ALPN_OPAQUE: &[u8] = b"weft.opaque/1";
/// Lifetime of a minted certificate: longer than any test.
const CERT_LIFETIME: Duration = Duration::from_secs(3600);

/// A private key and a certificate for one SPIFFE identity, ready to present.
pub struct WorkloadCert {
    identity: SpiffeId,
    store: Arc<CertStore>,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .finish()
    }
}

impl WorkloadCert {
    /// Signs a certificate for `identity` (a `spiffe://<td>/ns/<ns>/sa/<sa>` URI) with the
    /// issuer in `ca` — what that CA's control plane would hand a proxy proving `identity`.
    pub fn mint(ca: &IdentityFiles, identity: &str) -> Result<WorkloadCert> {
        let certs_error = |what: &str, e: weft_certs::Error| {
            HarnessError::invalid("workload certificate", format!("{what}: {e}"))
        };
        let id = SpiffeId::parse(identity).map_err(|e| certs_error(identity, e))?;
        let issuer_pem = read_text(&ca.issuer)?;
        let issuer_key_pem = read_text(&ca.issuer_key)?;
        let issuer = Issuer::from_pem(&issuer_pem, &issuer_key_pem)
            .map_err(|e| certs_error("loading the issuer", e))?;
        let key = WorkloadKey::generate().map_err(|e| certs_error("generating a key", e))?;
        let csr = key
            .csr_der(&id)
            .map_err(|e| certs_error("making the CSR", e))?;
        let signed = issuer.sign_csr(&csr, &id, CERT_LIFETIME).map_err(|e| {
            HarnessError::invalid("workload certificate", format!("signing the CSR: {e}"))
        })?;
        let certified = key
            .certified_key(
                signed.leaf_der.to_vec(),
                signed.chain_der.iter().map(|c| c.to_vec()).collect(),
            )
            .map_err(|e| certs_error("pairing the certificate with its key", e))?;
        let store = CertStore::new(id.clone());
        store.install(certified, signed.not_after);
        Ok(WorkloadCert {
            identity: id,
            store,
        })
    }

    /// The SPIFFE id the certificate carries.
    pub fn identity(&self) -> String {
        self.identity.to_string()
    }
}

/// A client-side mesh-TLS connection whose handshake has completed. Reads and writes carry
/// the inner stream (the app's bytes on [`ALPN_OPAQUE`]).
pub struct MeshTlsStream {
    stream: StreamOwned<ClientConnection, TcpStream>,
}

impl MeshTlsStream {
    /// Connects from inside `netns` to `addr` and handshakes (see [`MeshTlsStream::handshake`]).
    /// `timeout` bounds the connect and every later read and write.
    pub fn connect(
        netns: &Netns,
        addr: SocketAddr,
        server_identity: &str,
        client: &WorkloadCert,
        trust_anchors: &Path,
        alpn: &[u8],
        timeout: Duration,
    ) -> Result<MeshTlsStream> {
        let tcp = netns.connect(addr, timeout)?;
        tcp.set_read_timeout(Some(timeout))
            .and_then(|()| tcp.set_write_timeout(Some(timeout)))
            .and_then(|()| tcp.set_nodelay(true))
            .context(|| format!("setting socket options on the connection to {addr}"))?;
        MeshTlsStream::handshake(tcp, server_identity, client, trust_anchors, alpn)
    }

    /// Handshakes on `tcp`: presents `client`, sends the SNI of `server_identity` and `alpn`,
    /// and accepts the server only if its certificate chains to an anchor in `trust_anchors`
    /// and carries `server_identity`.
    ///
    /// In TLS 1.3 the server checks the client's certificate after the client has finished,
    /// so a server that refuses it (or refuses the connection by policy) shows up as a closed
    /// stream on the first read, not as an error here.
    pub fn handshake(
        tcp: TcpStream,
        server_identity: &str,
        client: &WorkloadCert,
        trust_anchors: &Path,
        alpn: &[u8],
    ) -> Result<MeshTlsStream> {
        let invalid = |what: &str, detail: String| {
            HarnessError::invalid("mesh TLS client", format!("{what}: {detail}"))
        };
        let server = SpiffeId::parse(server_identity)
            .map_err(|e| invalid("server identity", e.to_string()))?;
        let anchors_pem = std::fs::read(trust_anchors)
            .context(|| format!("reading {}", trust_anchors.display()))?;
        let anchors = TrustAnchors::from_pem(&anchors_pem)
            .map_err(|e| invalid("trust anchors", e.to_string()))?;
        let config = weft_certs::client_config(&anchors, Some(client.store.clone()), &[alpn])
            .map_err(|e| invalid("client config", e.to_string()))?;
        let server_name = ServerName::try_from(server.tls_server_name())
            .map_err(|e| invalid("server name", e.to_string()))?;
        let connection = ClientConnection::new(config, server_name)
            .map_err(|e| invalid("client connection", e.to_string()))?;
        let mut stream = StreamOwned::new(connection, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .context(|| format!("mesh TLS handshake with {server_identity}"))?;
        }
        Ok(MeshTlsStream { stream })
    }

    /// The ALPN protocol the server chose.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.stream.conn.alpn_protocol().map(<[u8]>::to_vec)
    }

    /// The SPIFFE id of the (verified) server.
    pub fn peer_identity(&self) -> Option<String> {
        weft_certs::peer_identity(&self.stream.conn).map(|id| id.to_string())
    }
}

impl Read for MeshTlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for MeshTlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A CA like `weft identity --trust-domain <trust_domain>` writes, in a fresh temp dir.
    fn test_ca(name: &str, trust_domain: &str) -> IdentityFiles {
        let dir =
            std::env::temp_dir().join(format!("weft-e2e-meshtls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let day = Duration::from_secs(86_400);
        let generated = weft_certs::generate_identity(trust_domain, day * 2, day).unwrap();
        let files = IdentityFiles {
            trust_domain: trust_domain.to_string(),
            trust_anchors: dir.join("trust-anchors.pem"),
            issuer: dir.join("issuer.pem"),
            issuer_key: dir.join("issuer-key.pem"),
            dir,
        };
        std::fs::write(&files.trust_anchors, generated.trust_anchors_pem).unwrap();
        std::fs::write(&files.issuer, generated.issuer_pem).unwrap();
        std::fs::write(&files.issuer_key, generated.issuer_key_pem).unwrap();
        files
    }

    #[test]
    fn mints_a_certificate_of_another_trust_domain() {
        let ca = test_ca("mint", "other.local");
        let cert = WorkloadCert::mint(&ca, "spiffe://other.local/ns/shop/sa/foreign").unwrap();
        assert_eq!(cert.identity(), "spiffe://other.local/ns/shop/sa/foreign");
        let presented = cert.store.current().unwrap();
        let leaf_identity = weft_certs::spiffe_id_of_cert(&presented.cert[0]).unwrap();
        assert_eq!(
            leaf_identity.to_string(),
            "spiffe://other.local/ns/shop/sa/foreign"
        );
        assert!(WorkloadCert::mint(&ca, "not a spiffe id").is_err());
        let _ = std::fs::remove_dir_all(&ca.dir);
    }

    /// A server like an inbound proxy that trusts both CAs: it reports the client's identity
    /// and echoes one message.
    #[test]
    fn a_foreign_client_handshakes_with_a_server_trusting_both_anchors() {
        let home = test_ca("home", "cluster.local");
        let other = test_ca("other", "other.local");
        let mut bundle = std::fs::read(&home.trust_anchors).unwrap();
        bundle.extend(std::fs::read(&other.trust_anchors).unwrap());
        let bundle_path = home.dir.join("bundle.pem");
        std::fs::write(&bundle_path, &bundle).unwrap();

        let server_id = "spiffe://cluster.local/ns/shop/sa/server";
        let server_cert = WorkloadCert::mint(&home, server_id).unwrap();
        let server_config = weft_certs::server_config(
            &TrustAnchors::from_pem(&bundle).unwrap(),
            server_cert.store.clone(),
            weft_certs::ClientAuth::Required,
            &[ALPN_OPAQUE],
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(server_config).unwrap();
            let mut tls = StreamOwned::new(conn, tcp);
            let mut message = [0u8; 5];
            tls.read_exact(&mut message).unwrap();
            let client = weft_certs::peer_identity(&tls.conn).map(|id| id.to_string());
            tls.write_all(&message).unwrap();
            tls.conn.send_close_notify();
            let _ = tls.flush();
            client
        });

        let foreign =
            WorkloadCert::mint(&other, "spiffe://other.local/ns/shop/sa/foreign").unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls =
            MeshTlsStream::handshake(tcp, server_id, &foreign, &bundle_path, ALPN_OPAQUE).unwrap();
        assert_eq!(tls.alpn().as_deref(), Some(ALPN_OPAQUE));
        assert_eq!(tls.peer_identity().as_deref(), Some(server_id));
        tls.write_all(b"hello").unwrap();
        let mut echoed = [0u8; 5];
        tls.read_exact(&mut echoed).unwrap();
        assert_eq!(&echoed, b"hello");
        assert_eq!(
            server.join().unwrap().as_deref(),
            Some("spiffe://other.local/ns/shop/sa/foreign")
        );

        // A client expecting another server identity refuses this one.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_config = weft_certs::server_config(
            &TrustAnchors::from_pem(&bundle).unwrap(),
            server_cert.store.clone(),
            weft_certs::ClientAuth::Required,
            &[ALPN_OPAQUE],
        )
        .unwrap();
        let refused = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(server_config).unwrap();
            let mut tls = StreamOwned::new(conn, tcp);
            let mut byte = [0u8; 1];
            tls.read(&mut byte).is_err()
        });
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let err = MeshTlsStream::handshake(
            tcp,
            "spiffe://cluster.local/ns/shop/sa/someone-else",
            &foreign,
            &bundle_path,
            ALPN_OPAQUE,
        )
        .err()
        .unwrap();
        assert!(
            err.to_string().to_lowercase().contains("certificate"),
            "expected a certificate error, got {err}"
        );
        assert!(refused.join().unwrap(), "the server saw the client abort");
        let _ = std::fs::remove_dir_all(&home.dir);
        let _ = std::fs::remove_dir_all(&other.dir);
    }
}
