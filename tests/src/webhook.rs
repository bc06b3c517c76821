//! The proxy injector as a test fixture: a throwaway webhook CA, `weft-injector` running as a
//! process on 127.0.0.1, and the MutatingWebhookConfiguration that registers it by URL with
//! the kube fixture's API server (which has no cluster networking to reach a Service).

use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

use crate::kube::KubeFixture;

/// Kills the injector when the test ends, pass or fail.
pub struct Injector {
    child: Child,
    log: std::path::PathBuf,
}

impl Injector {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Pki {
    pub ca_der: rustls_pki_types::CertificateDer<'static>,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A throwaway CA and a serving certificate for 127.0.0.1 (webhooks are registered by URL).
pub fn webhook_pki() -> Pki {
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    Pki {
        ca_der: ca_cert.der().clone(),
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `weft-injector` on 127.0.0.1:`port` with `pki`'s serving cert, talking to the
/// fixture's API server. `trust_anchors` is what injected proxies are told to trust (any
/// certificate will do when the pods never run); `extra_args` are more injector flags.
pub fn start_injector(
    fixture: &KubeFixture,
    dir: &Path,
    pki: &Pki,
    port: u16,
    trust_anchors: Option<&Path>,
    extra_args: &[&str],
) -> Result<Injector> {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&cert, &pki.cert_pem)?;
    std::fs::write(&key, &pki.key_pem)?;
    let anchors = match trust_anchors {
        Some(path) => path.to_path_buf(),
        None => {
            let path = dir.join("trust-anchors.pem");
            std::fs::write(&path, &pki.ca_pem)?;
            path
        }
    };
    let log = dir.join("weft-injector.log");
    let child = Command::new(crate::bin("weft-injector")?)
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--tls-cert={}", cert.display()))
        .arg(format!("--tls-key={}", key.display()))
        .arg(format!("--trust-anchors={}", anchors.display()))
        .arg("--proxy-image=registry.test/weft-proxy:e2e")
        .args(extra_args)
        .env("KUBECONFIG", fixture.kubeconfig())
        .env("WEFT_INJECTOR_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting weft-injector")?;
    let mut injector = Injector { child, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = injector.child.try_wait()? {
            bail!("weft-injector exited ({status}):\n{}", injector.log());
        }
        ensure!(
            Instant::now() < deadline,
            "weft-injector not listening:\n{}",
            injector.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(injector)
}

/// A MutatingWebhookConfiguration calling the injector at 127.0.0.1:`port`.
pub fn webhook_config(port: u16, ca_pem: &str) -> String {
    format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata:
  name: weft-injector
webhooks:
- name: inject.weft.io
  clientConfig:
    url: https://127.0.0.1:{port}/inject
    caBundle: {}
  failurePolicy: Fail
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 10
  reinvocationPolicy: Never
  rules:
  - operations: [CREATE]
    apiGroups: [""]
    apiVersions: [v1]
    resources: [pods]
  namespaceSelector:
    matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: NotIn
      values: [kube-system, weft]
"#,
        base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes())
    )
}
