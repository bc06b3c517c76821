//! What the tests that run the real `weft-control` binary share: an identity directory,
//! the process itself, and certified gRPC channels as a proxy would hold them.
// Each test binary uses a different subset.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tonic::transport::Channel;
use tonic::Code;
use weft_api::identity::identity_client::IdentityClient;
use weft_api::identity::CertifyRequest;
use weft_certs::{client_config, generate_identity, SpiffeId, TrustAnchors, WorkloadKey};

pub struct Control(Child);

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// Replaces a manifest atomically, as editors and config tools do, so the watcher never
/// sees a half-written file.
pub fn replace_manifest(dir: &Path, name: &str, text: &str) {
    let temp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, dir.join(name)).unwrap();
}

/// `<dir>/identity` (a fresh trust anchor and issuer) and an empty `<dir>/manifests`.
pub fn write_identity(dir: &Path) {
    let generated = generate_identity(
        "cluster.local",
        Duration::from_secs(86_400),
        Duration::from_secs(3_600),
    )
    .unwrap();
    let id = dir.join("identity");
    std::fs::create_dir_all(&id).unwrap();
    std::fs::write(id.join("trust-anchors.pem"), &generated.trust_anchors_pem).unwrap();
    std::fs::write(id.join("issuer.pem"), &generated.issuer_pem).unwrap();
    std::fs::write(id.join("issuer-key.pem"), &generated.issuer_key_pem).unwrap();
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
}

/// Starts `weft-control` on a free loopback port over `dir`'s manifests and identity.
pub fn start_control(dir: &Path, extra: &[&str]) -> (Control, u16) {
    let port = free_port();
    let control = Control(
        Command::new(env!("CARGO_BIN_EXE_weft-control"))
            .args([
                "--source",
                &format!("dir:{}", dir.join("manifests").display()),
            ])
            .args(["--identity", &dir.join("identity").display().to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    (control, port)
}

/// A proxy's two channels to the control plane.
pub struct Channels {
    /// TLS without a client certificate.
    pub plain: Channel,
    /// mTLS as `identity`.
    pub mtls: Channel,
}

/// Certifies as `identity` with `token` (waiting up to 20 s for the control plane to
/// listen) and returns both channels.
pub async fn certified_channels(
    dir: &Path,
    port: u16,
    identity: &SpiffeId,
    token: &[u8],
) -> Channels {
    let anchors =
        TrustAnchors::from_pem(&std::fs::read(dir.join("identity/trust-anchors.pem")).unwrap())
            .unwrap();
    let control_name = ServerName::try_from(
        SpiffeId::parse("spiffe://cluster.local/ns/weft/sa/weft-control")
            .unwrap()
            .tls_server_name(),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let plain = weft_proxy::control::channel(
        &addr,
        control_name.clone(),
        client_config(&anchors, None, &[b"h2"]).unwrap(),
    )
    .unwrap();
    let key = WorkloadKey::generate().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let cert = loop {
        let req = CertifyRequest {
            identity: identity.to_string(),
            token: token.to_vec(),
            csr_der: key.csr_der(identity).unwrap(),
        };
        match IdentityClient::new(plain.clone()).certify(req).await {
            Ok(rsp) => break rsp.into_inner(),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("certify failed: {s:?}"),
        }
    };
    let store = weft_certs::CertStore::new(identity.clone());
    let not_after = std::time::UNIX_EPOCH + Duration::from_secs(cert.not_after_unix as u64);
    store.install(
        key.certified_key(cert.leaf_der, cert.chain_der).unwrap(),
        not_after,
    );
    let mtls = weft_proxy::control::channel(
        &addr,
        control_name,
        client_config(&anchors, Some(store), &[b"h2"]).unwrap(),
    )
    .unwrap();
    Channels { plain, mtls }
}
