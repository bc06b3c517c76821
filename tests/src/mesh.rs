//! The mesh on top of a [`Cluster`]: identity files from `weft identity`, the standalone control
//! plane in the node namespace, and meshed pods (`weft-proxy init` + the proxy as UID 2170).

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::bins::bin;
use crate::cluster::{lock, Cluster, Pod, NODE_IP};
use crate::error::{HarnessError, IoContext, Result};
use crate::http::HttpResponse;
use crate::metrics::MetricsSnapshot;
use crate::proc::{Cmd, Proc};
use crate::wait::wait_until;

pub const PROXY_UID: u32 = 2170;
pub const CONTROL_PLANE_PORT: u16 = 7150;
pub const ADMIN_PORT: u16 = 7191;
pub const TRUST_DOMAIN: &str = "cluster.local";
pub const CONTROL_PLANE_IDENTITY: &str = "spiffe://cluster.local/ns/weft/sa/weft-control";
/// How long a freshly started control plane gets to open its gRPC port.
const CONTROL_PLANE_START: Duration = Duration::from_secs(30);

/// `spiffe://cluster.local/ns/<namespace>/sa/<service_account>`.
pub fn spiffe_id(namespace: &str, service_account: &str) -> String {
    spiffe_id_in(TRUST_DOMAIN, namespace, service_account)
}

/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
pub fn spiffe_id_in(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// The control plane's address as the pods see it.
pub fn control_plane_addr() -> SocketAddr {
    SocketAddr::from((NODE_IP, CONTROL_PLANE_PORT))
}

/// The files `weft identity --out <dir>` writes.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    /// The `--trust-domain` they were generated for.
    pub trust_domain: String,
    pub dir: PathBuf,
    pub trust_anchors: PathBuf,
    pub issuer: PathBuf,
    pub issuer_key: PathBuf,
}

impl Cluster {
    /// The cluster's trust anchor and issuer, generated on first use by the real
    /// `weft identity --out <tmp>/identity`.
    pub fn identity(&self) -> Result<IdentityFiles> {
        let mut identity = lock(&self.identity);
        if let Some(files) = identity.as_ref() {
            return Ok(files.clone());
        }
        let files = generate_identity(&self.tmp_dir().join("identity"), TRUST_DOMAIN)?;
        *identity = Some(files.clone());
        Ok(files)
    }

    /// A second, unrelated CA: the real `weft identity --trust-domain <trust_domain> --out
    /// <tmp>/identity-<trust_domain>`, generated on first use. Its issuer mints identities of
    /// that trust domain (see [`crate::meshtls::WorkloadCert::mint`]); a proxy trusts them
    /// only when its `WEFT_TRUST_ANCHORS` holds this anchor too (see [`Cluster::trust_bundle`]).
    pub fn other_trust_domain(&self, trust_domain: &str) -> Result<IdentityFiles> {
        if trust_domain == TRUST_DOMAIN {
            return Err(HarnessError::invalid(
                "trust domain",
                format!("{trust_domain} is the cluster's own"),
            ));
        }
        let dir = self.tmp_dir().join(format!("identity-{trust_domain}"));
        if dir.join("issuer-key.pem").is_file() {
            return Ok(identity_files(&dir, trust_domain));
        }
        generate_identity(&dir, trust_domain)
    }

    /// A PEM bundle of the cluster's trust anchors followed by those of `others`, for a
    /// proxy that must accept peers of several trust domains (its `WEFT_TRUST_ANCHORS`, e.g.
    /// via [`MeshPodSpec::trust_anchors`]).
    pub fn trust_bundle(&self, others: &[&IdentityFiles]) -> Result<PathBuf> {
        let mut bundle = Vec::new();
        let own = self.identity()?;
        let mut name = String::from("trust-bundle");
        for files in std::iter::once(&own).chain(others.iter().copied()) {
            let pem = std::fs::read(&files.trust_anchors)
                .context(|| format!("reading {}", files.trust_anchors.display()))?;
            bundle.extend_from_slice(&pem);
            if !bundle.ends_with(b"\n") {
                bundle.push(b'\n');
            }
            name.push('-');
            name.push_str(&files.trust_domain);
        }
        let path = self.tmp_dir().join(format!("{name}.pem"));
        std::fs::write(&path, &bundle).context(|| format!("writing {}", path.display()))?;
        set_mode(&path, 0o644)?;
        Ok(path)
    }

    /// Starts `weft-control --source dir:<manifests> --identity <identity> --listen
    /// 198.18.0.1:7150 <extra_args>` in the node namespace and waits until its port accepts.
    pub fn start_control_plane(&self, extra_args: &[&str]) -> Result<Proc> {
        let identity = self.identity()?;
        let cmd = Cmd::new(bin("weft-control")?)
            .arg("--source")
            .arg(format!("dir:{}", self.manifests().dir().display()))
            .arg("--identity")
            .arg(&identity.dir)
            .arg("--listen")
            .arg(control_plane_addr().to_string())
            .args(extra_args)
            .env("WEFT_LOG", "info");
        let mut proc = self.node().spawn(cmd)?;
        let addr = control_plane_addr();
        wait_until(
            "the control plane to listen on 198.18.0.1:7150",
            CONTROL_PLANE_START,
            || {
                if let Some(status) = proc.try_wait()? {
                    return Err(HarnessError::CommandFailed {
                        command: proc.label().to_string(),
                        status: format!("exited early with {status}"),
                        stderr: proc.logs(),
                    });
                }
                Ok(self
                    .node()
                    .connect(addr, Duration::from_millis(500))
                    .is_ok())
            },
        )?;
        Ok(proc)
    }

    /// A pod with a proxy: writes its manifest (meshed, with a fresh token's hash), runs
    /// `weft-proxy init` in it, writes the token file, and starts the proxy as UID/GID 2170.
    /// Does not wait for readiness (see [`MeshPod::wait_ready`]).
    pub fn add_mesh_pod(&self, spec: MeshPodSpec) -> Result<MeshPod> {
        let identity = self.identity()?;
        let pod = self.add_pod(&spec.name, spec.ip_last_octet)?;
        let token = hex::encode(rand::random::<[u8; 32]>());
        let token_file = self
            .tmp_dir()
            .join(format!("token-{}-{}", spec.namespace, spec.name));
        std::fs::write(&token_file, &token)
            .context(|| format!("writing {}", token_file.display()))?;
        set_mode(&token_file, 0o644)?;
        self.manifests().ensure_namespace(&spec.namespace)?;
        let annotations: Vec<(&str, &str)> = spec
            .annotations
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.manifests().annotated_pod(
            &spec.namespace,
            &spec.name,
            pod.ip(),
            &spec.service_account,
            true,
            Some(&token),
            &annotations,
        )?;
        pod.run_ok(
            Cmd::new(bin("weft-proxy")?)
                .arg("init")
                .args(&spec.init_args),
        )?;
        let mut cmd = Cmd::new(bin("weft-proxy")?)
            .env("WEFT_CONTROL_ADDR", control_plane_addr().to_string())
            .env("WEFT_CONTROL_IDENTITY", CONTROL_PLANE_IDENTITY)
            .env("WEFT_TRUST_ANCHORS", &identity.trust_anchors)
            .env("WEFT_IDENTITY_TOKEN_FILE", &token_file)
            .env("WEFT_NAMESPACE", &spec.namespace)
            .env("WEFT_SERVICE_ACCOUNT", &spec.service_account)
            .env("WEFT_POD_NAME", &spec.name)
            .env("WEFT_LOG", "info");
        for (key, value) in &spec.env {
            cmd = cmd.env(key, value);
        }
        let proxy = pod.spawn_as(PROXY_UID, PROXY_UID, cmd)?;
        Ok(MeshPod {
            identity: spiffe_id(&spec.namespace, &spec.service_account),
            namespace: spec.namespace,
            service_account: spec.service_account,
            token_file,
            pod,
            proxy,
        })
    }

    /// A pod without a proxy or iptables rules, listed in the manifests as unmeshed.
    pub fn add_plain_pod(&self, namespace: &str, name: &str, ip_last_octet: u8) -> Result<Pod> {
        let pod = self.add_pod(name, ip_last_octet)?;
        self.manifests().ensure_namespace(namespace)?;
        self.manifests()
            .pod(namespace, name, pod.ip(), "default", false, None)?;
        Ok(pod)
    }
}

/// What a meshed pod is: name, address, Kubernetes namespace and service account, plus extra
/// proxy environment, `weft-proxy init` arguments and pod annotations.
#[derive(Debug, Clone)]
pub struct MeshPodSpec {
    pub name: String,
    pub ip_last_octet: u8,
    pub namespace: String,
    pub service_account: String,
    pub env: Vec<(String, String)>,
    pub init_args: Vec<String>,
    /// Written into the pod's manifest before its proxy starts.
    pub annotations: Vec<(String, String)>,
}

impl MeshPodSpec {
    pub fn new(
        name: &str,
        ip_last_octet: u8,
        namespace: &str,
        service_account: &str,
    ) -> MeshPodSpec {
        MeshPodSpec {
            name: name.to_string(),
            ip_last_octet,
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            env: Vec::new(),
            init_args: Vec::new(),
            annotations: Vec::new(),
        }
    }

    /// A pod annotation (e.g. `config.weft.io/default-inbound-policy`), in the manifest from
    /// the start, so the proxy never sees the pod without it.
    pub fn annotation(mut self, key: &str, value: &str) -> MeshPodSpec {
        self.annotations.push((key.to_string(), value.to_string()));
        self
    }

    /// The proxy's `WEFT_TRUST_ANCHORS` instead of the cluster's own anchors (e.g. a
    /// [`Cluster::trust_bundle`] that also trusts another trust domain).
    pub fn trust_anchors(self, pem_bundle: &Path) -> MeshPodSpec {
        let value = pem_bundle.display().to_string();
        self.env("WEFT_TRUST_ANCHORS", &value)
    }

    /// An extra proxy environment variable (e.g. `WEFT_SHUTDOWN_GRACE_SECS`).
    pub fn env(mut self, key: &str, value: &str) -> MeshPodSpec {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn init_arg(mut self, arg: &str) -> MeshPodSpec {
        self.init_args.push(arg.to_string());
        self
    }
}

/// A meshed pod and its running proxy. Derefs to the [`Pod`].
pub struct MeshPod {
    pod: Pod,
    proxy: Proc,
    identity: String,
    namespace: String,
    service_account: String,
    token_file: PathBuf,
}

impl MeshPod {
    pub fn pod(&self) -> &Pod {
        &self.pod
    }

    pub fn proxy(&mut self) -> &mut Proc {
        &mut self.proxy
    }

    /// `spiffe://cluster.local/ns/<namespace>/sa/<service account>`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// GET `http://<pod ip>:7191<path>` from the node namespace (as a kubelet or Prometheus
    /// would).
    pub fn admin_get(&self, path: &str) -> Result<HttpResponse> {
        let url = format!("http://{}:{ADMIN_PORT}{path}", self.pod.ip());
        self.pod.node().http_get(&url)
    }

    /// The status of `/ready`, or `None` when the admin port does not answer.
    pub fn ready_status(&self) -> Option<u16> {
        self.admin_get("/ready").ok().map(|r| r.status)
    }

    /// Waits for `/ready` to return 200; fails early (with the proxy's logs) if the proxy exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let what = format!("proxy of {} to be ready", self.pod.name());
        let (pod, proxy) = (&self.pod, &mut self.proxy);
        wait_until(&what, timeout, || {
            if let Some(status) = proxy.try_wait()? {
                return Err(HarnessError::CommandFailed {
                    command: proxy.label().to_string(),
                    status: format!("exited with {status} before becoming ready"),
                    stderr: proxy.logs(),
                });
            }
            let url = format!("http://{}:{ADMIN_PORT}/ready", pod.ip());
            Ok(pod.node().http_get(&url).is_ok_and(|r| r.status == 200))
        })
    }

    /// The raw `/metrics` text; fails on a non-200 answer.
    pub fn metrics_text(&self) -> Result<String> {
        let response = self.admin_get("/metrics")?;
        if response.status != 200 {
            return Err(HarnessError::invalid(
                "metrics response",
                format!("status {}: {}", response.status, response.body_text()),
            ));
        }
        Ok(response.body_text())
    }

    /// `/metrics`, parsed.
    pub fn metrics(&self) -> Result<MetricsSnapshot> {
        MetricsSnapshot::parse(&self.metrics_text()?)
    }
}

impl Deref for MeshPod {
    type Target = Pod;

    fn deref(&self) -> &Pod {
        &self.pod
    }
}

/// Runs the real `weft identity --trust-domain <trust_domain> --out <dir>`.
fn generate_identity(dir: &Path, trust_domain: &str) -> Result<IdentityFiles> {
    let weft = bin("weft")?;
    let output = Command::new(&weft)
        .arg("identity")
        .arg("--trust-domain")
        .arg(trust_domain)
        .arg("--out")
        .arg(dir)
        .output()
        .context(|| format!("running {} identity", weft.display()))?;
    if !output.status.success() {
        return Err(HarnessError::CommandFailed {
            command: format!(
                "weft identity --trust-domain {trust_domain} --out {}",
                dir.display()
            ),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let files = identity_files(dir, trust_domain);
    for path in [&files.trust_anchors, &files.issuer, &files.issuer_key] {
        if !path.is_file() {
            return Err(HarnessError::invalid(
                "weft identity output",
                format!("{} was not written", path.display()),
            ));
        }
    }
    Ok(files)
}

fn identity_files(dir: &Path, trust_domain: &str) -> IdentityFiles {
    IdentityFiles {
        trust_domain: trust_domain.to_string(),
        trust_anchors: dir.join("trust-anchors.pem"),
        issuer: dir.join("issuer.pem"),
        issuer_key: dir.join("issuer-key.pem"),
        dir: dir.to_path_buf(),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .context(|| format!("chmod {mode:o} {}", path.display()))
}
