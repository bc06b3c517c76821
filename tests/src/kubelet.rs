//! The test plays the kubelet: it reads a pod back from the API server (as the webhook
//! mutated it), gives it a network namespace and an IP (reported in `status.podIP`), asks
//! the TokenRequest API for its projected ServiceAccount token, runs its `weft-init` init
//! container and starts its `weft-proxy` container with the environment the spec declares
//! (downward-API fields resolved as the kubelet would).
//!
//! Two stand-ins replace cluster infrastructure the test does not have: cluster DNS
//! (`WEFT_CONTROL_ADDR` points at the control plane the test runs) and volume mounts (the
//! token path is a file in the test's temp dir). Everything else comes from the spec.
//!
//! [`ApiRelay`] makes the API server (on the host's loopback) reachable from the node
//! namespace at the same address, so a control plane started there can use the fixture's
//! kubeconfig unchanged.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::bins::bin;
use crate::cluster::{Cluster, Pod};
use crate::error::{HarnessError, IoContext, Result};
use crate::kube::KubeFixture;
use crate::mesh::{control_plane_addr, PROXY_UID};
use crate::proc::{Cmd, Proc};

/// The audience of the proxy's projected token (DESIGN.md).
pub const IDENTITY_AUDIENCE: &str = "identity.weft.io";

/// Forwards TCP connections made inside a namespace to `127.0.0.1:<port>` of the host
/// namespace, where the kube fixture listens. Stops accepting on drop.
pub struct ApiRelay {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl ApiRelay {
    /// Listens on `addr` (a loopback address) inside `netns` and relays each connection to
    /// the same address in the host namespace.
    pub fn start(netns: &crate::netns::Netns, addr: SocketAddr) -> Result<ApiRelay> {
        let listener = netns.bind(addr)?;
        listener
            .set_nonblocking(true)
            .context(|| format!("relay listener {addr}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || accept_loop(listener, addr, stopped));
        Ok(ApiRelay { stop, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for ApiRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((inside, _)) => {
                // This thread stays in the host namespace, so the connect reaches the host's
                // loopback while `inside` belongs to the node namespace.
                match TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) {
                    Ok(outside) => splice(inside, outside),
                    Err(e) => eprintln!("weft-e2e: api relay: connecting {upstream}: {e}"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                eprintln!("weft-e2e: api relay: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn splice(a: TcpStream, b: TcpStream) {
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = from.set_nonblocking(false);
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => {
            copy(a, b2);
            copy(b, a2);
        }
        _ => eprintln!("weft-e2e: api relay: cloning a socket failed"),
    }
}

/// The host-loopback address of the fixture's API server (from its URL).
pub fn api_server_addr(kube: &KubeFixture) -> Result<SocketAddr> {
    let url = kube.server_url();
    url.strip_prefix("https://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|hostport| hostport.parse().ok())
        .ok_or_else(|| {
            HarnessError::invalid("KUBE_APISERVER_URL", format!("not https://ip:port: {url}"))
        })
}

/// A pod read back from the API server, run in a network namespace by the test.
pub struct KubeletPod {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub spec: Value,
    pub pod: Pod,
    pub token_file: PathBuf,
    pub proxy: Option<Proc>,
}

impl KubeletPod {
    /// The status of the proxy's `/ready`, from the node namespace (as the kubelet probes
    /// it), or `None` when the admin port does not answer.
    pub fn ready_status(&self) -> Option<u16> {
        let url = format!("http://{}:7191/ready", self.pod.ip());
        self.pod.node().http_get(&url).ok().map(|r| r.status)
    }

    /// Waits for `/ready` to return 200; fails early (with the proxy's logs) if it exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let what = format!("proxy of {}/{} to be ready", self.namespace, self.name);
        let pod = &self.pod;
        let Some(proxy) = self.proxy.as_mut() else {
            return Err(HarnessError::invalid(what, "the proxy is not running"));
        };
        crate::wait::wait_until(&what, timeout, || {
            if let Some(status) = proxy.try_wait()? {
                return Err(HarnessError::CommandFailed {
                    command: proxy.label().to_string(),
                    status: format!("exited with {status} before becoming ready"),
                    stderr: proxy.logs(),
                });
            }
            let url = format!("http://{}:7191/ready", pod.ip());
            Ok(pod.node().http_get(&url).is_ok_and(|r| r.status == 200))
        })
    }
}

/// `kubectl <args>`'s stdout, or its stderr as the error.
pub fn kubectl_stdout(kube: &KubeFixture, args: &[&str]) -> Result<String> {
    let out = kube.kubectl(args)?;
    if !out.success {
        return Err(HarnessError::CommandFailed {
            command: format!("kubectl {}", args.join(" ")),
            status: "failed".into(),
            stderr: out.stderr,
        });
    }
    Ok(out.stdout)
}

/// `kubectl get pod <name> -n <ns> -o json`.
pub fn get_pod(kube: &KubeFixture, namespace: &str, name: &str) -> Result<Value> {
    let out = kubectl_stdout(kube, &["get", "pod", name, "-n", namespace, "-o", "json"])?;
    serde_json::from_str(&out)
        .map_err(|e| HarnessError::invalid(format!("pod {namespace}/{name}"), e.to_string()))
}

/// What a kubelet reports once the pod runs: phase Running, Ready, and `ip` as its podIP.
pub fn report_running(kube: &KubeFixture, namespace: &str, name: &str, ip: &str) -> Result<()> {
    let status = serde_json::json!({
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    });
    kubectl_stdout(
        kube,
        &[
            "patch",
            "pod",
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ],
    )
    .map(drop)
}

/// Every container the pod declares, init containers first, as the kubelet orders them.
pub fn all_containers(pod: &Value) -> Vec<&Value> {
    let spec = &pod["spec"];
    let list = |key: &str| spec[key].as_array().map(|a| a.iter().collect::<Vec<_>>());
    let mut out = list("initContainers").unwrap_or_default();
    out.extend(list("containers").unwrap_or_default());
    out
}

/// The container named `name` (init or regular).
pub fn container<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    all_containers(pod)
        .into_iter()
        .find(|c| c["name"].as_str() == Some(name))
}

/// The container's `command` + `args` with the image's `weft-proxy` replaced by the
/// workspace binary.
fn command_line(container: &Value) -> Result<Cmd> {
    let strings = |key: &str| -> Vec<String> {
        container[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut words = strings("command");
    words.extend(strings("args"));
    let proxy = bin("weft-proxy")?;
    let mut iter = words.into_iter();
    // An image's entrypoint is `weft-proxy`; a spec may name it by path or leave it out.
    let mut cmd = Cmd::new(&proxy);
    if let Some(first) = iter.next() {
        if !(first == "weft-proxy" || first.ends_with("/weft-proxy")) {
            cmd = cmd.arg(first);
        }
    }
    Ok(cmd.args(iter))
}

/// Resolves the container's env as the kubelet does: literal values and the downward-API
/// fields weft uses. Other sources (secrets, resource fields) are an error here.
pub fn container_env(pod: &Value, container: &Value) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap_or_default().to_string();
        if let Some(value) = var.get("value").and_then(Value::as_str) {
            out.push((name, value.to_string()));
            continue;
        }
        let field = var["valueFrom"]["fieldRef"]["fieldPath"].as_str();
        let value = match field {
            Some("metadata.name") => pod["metadata"]["name"].as_str(),
            Some("metadata.namespace") => pod["metadata"]["namespace"].as_str(),
            Some("spec.serviceAccountName") => pod["spec"]["serviceAccountName"].as_str(),
            Some("status.podIP") => pod["status"]["podIP"].as_str(),
            Some("spec.nodeName") => Some("test-node"),
            _ => None,
        };
        match value {
            Some(value) => out.push((name, value.to_string())),
            None if var.get("valueFrom").is_none() => out.push((name, String::new())),
            None => {
                return Err(HarnessError::invalid(
                    format!("env {name}"),
                    format!("the test kubelet cannot resolve {}", var["valueFrom"]),
                ))
            }
        }
    }
    Ok(out)
}

/// A ServiceAccount token from the TokenRequest API, bound to the pod, for `audience`.
pub fn request_token(
    kube: &KubeFixture,
    namespace: &str,
    service_account: &str,
    audience: &str,
    bound_pod: Option<(&str, &str)>,
) -> Result<String> {
    let mut args = vec![
        "create",
        "token",
        service_account,
        "-n",
        namespace,
        "--audience",
        audience,
        "--duration",
        "1h",
    ];
    if let Some((name, uid)) = bound_pod {
        args.extend(["--bound-object-kind", "Pod", "--bound-object-name", name]);
        args.extend(["--bound-object-uid", uid]);
    }
    Ok(kubectl_stdout(kube, &args)?.trim().to_string())
}

/// Options for [`run_pod`].
#[derive(Debug, Clone, Default)]
pub struct KubeletOptions {
    /// Use this ServiceAccount's token instead of the pod's own (to show a refusal).
    pub token_of: Option<String>,
    /// Extra proxy environment after the spec's (e.g. a log level).
    pub env: Vec<(String, String)>,
}

/// Runs pod `namespace/name` as the kubelet would: netns with 198.18.0.<octet>, podIP in
/// its status, token, `weft-init` to completion, then `weft-proxy` as UID 2170.
pub fn run_pod(
    cluster: &Cluster,
    kube: &KubeFixture,
    namespace: &str,
    name: &str,
    octet: u8,
    options: &KubeletOptions,
) -> Result<KubeletPod> {
    let netns_name = format!("{namespace}-{name}");
    let pod = cluster.add_pod(&netns_name, octet)?;
    report_running(kube, namespace, name, &pod.ip().to_string())?;
    let spec = get_pod(kube, namespace, name)?;
    let service_account = spec["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default")
        .to_string();
    let uid = spec["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let token_sa = options.token_of.as_deref().unwrap_or(&service_account);
    let token = request_token(
        kube,
        namespace,
        token_sa,
        IDENTITY_AUDIENCE,
        (token_sa == service_account).then_some((name, uid.as_str())),
    )?;
    let token_file = cluster
        .tmp_dir()
        .join(format!("sa-token-{namespace}-{name}"));
    std::fs::write(&token_file, token).context(|| format!("writing {}", token_file.display()))?;
    set_world_readable(&token_file)?;

    let init = container(&spec, "weft-init").ok_or_else(|| {
        HarnessError::invalid(format!("pod {namespace}/{name}"), "no weft-init container")
    })?;
    pod.run_ok(command_line(init)?)?;

    let proxy_spec = container(&spec, "weft-proxy").ok_or_else(|| {
        HarnessError::invalid(format!("pod {namespace}/{name}"), "no weft-proxy container")
    })?;
    let mut cmd = command_line(proxy_spec)?;
    for (key, value) in container_env(&spec, proxy_spec)? {
        let value = match key.as_str() {
            // Cluster DNS stand-in.
            "WEFT_CONTROL_ADDR" => control_plane_addr().to_string(),
            // Volume-mount stand-in.
            "WEFT_IDENTITY_TOKEN_FILE" => token_file.display().to_string(),
            _ => value,
        };
        cmd = cmd.env(key, value);
    }
    for (key, value) in &options.env {
        cmd = cmd.env(key, value);
    }
    let proxy = pod.spawn_as(PROXY_UID, PROXY_UID, cmd)?;
    Ok(KubeletPod {
        name: name.to_string(),
        namespace: namespace.to_string(),
        service_account,
        spec,
        pod,
        token_file,
        proxy: Some(proxy),
    })
}

fn set_world_readable(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .context(|| format!("chmod {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downward_api_fields_resolve_from_the_pod() {
        let pod = serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop"},
            "spec": {"serviceAccountName": "web"},
            "status": {"podIP": "198.18.0.9"}
        });
        let container = serde_json::json!({"env": [
            {"name": "A", "value": "literal"},
            {"name": "WEFT_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "WEFT_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "WEFT_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ]});
        let env = container_env(&pod, &container).expect("resolves");
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("A"), Some("literal"));
        assert_eq!(get("WEFT_POD_NAME"), Some("web-1"));
        assert_eq!(get("WEFT_NAMESPACE"), Some("shop"));
        assert_eq!(get("WEFT_SERVICE_ACCOUNT"), Some("web"));
        assert_eq!(get("IP"), Some("198.18.0.9"));

        let secret = serde_json::json!({"env": [
            {"name": "S", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}}
        ]});
        assert!(container_env(&pod, &secret).is_err());
    }
}
