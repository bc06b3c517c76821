//! The standalone control plane's input: Kubernetes-shaped YAML, one object per file so a test
//! can edit or delete a single object while the control plane watches the directory.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

pub const INJECT_ANNOTATION: &str = "weft.io/inject";
pub const TOKEN_SHA256_ANNOTATION: &str = "weft.io/token-sha256";

#[derive(Debug, Clone)]
pub struct Manifests {
    dir: PathBuf,
}

impl Manifests {
    pub fn new(dir: impl Into<PathBuf>) -> Result<Manifests> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        Ok(Manifests { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A Namespace, annotated `weft.io/inject: enabled` when `inject`.
    pub fn namespace(&self, name: &str, inject: bool) -> Result<PathBuf> {
        let annotations = if inject {
            format!("  annotations:\n    {INJECT_ANNOTATION}: \"enabled\"\n")
        } else {
            String::new()
        };
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n{annotations}",
            quote(name)
        );
        self.write(&namespace_file(name), &yaml)
    }

    /// Writes an uninjected Namespace unless this namespace already has a manifest (which a
    /// test may have written with `inject: true`).
    pub fn ensure_namespace(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(namespace_file(name));
        if path.exists() {
            Ok(path)
        } else {
            self.namespace(name, false)
        }
    }

    /// A running Pod with `status.podIP`, `spec.serviceAccountName`, label `app: <name>`;
    /// `weft.io/inject` is `enabled` when `meshed` (else `disabled`, so a namespace default
    /// cannot mesh it), and `weft.io/token-sha256` holds the token's hash when given.
    pub fn pod(
        &self,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
        service_account: &str,
        meshed: bool,
        token: Option<&str>,
    ) -> Result<PathBuf> {
        let inject = if meshed { "enabled" } else { "disabled" };
        let mut annotations = format!("    {INJECT_ANNOTATION}: {}\n", quote(inject));
        if let Some(token) = token {
            annotations.push_str(&format!(
                "    {TOKEN_SHA256_ANNOTATION}: {}\n",
                quote(&token_sha256_hex(token.as_bytes()))
            ));
        }
        let ip = quote(&ip.to_string());
        let yaml = format!(
            "apiVersion: v1\n\
             kind: Pod\n\
             metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    app: {name}\n  annotations:\n{annotations}\
             spec:\n  serviceAccountName: {sa}\n  containers:\n  - name: app\n    image: weft-testapp\n\
             status:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n",
            name = quote(name),
            namespace = quote(namespace),
            sa = quote(service_account),
        );
        self.write(&pod_file(namespace, name), &yaml)
    }

    /// A ClusterIP Service with one TCP port.
    pub fn service(
        &self,
        namespace: &str,
        name: &str,
        cluster_ip: Ipv4Addr,
        selector: &[(&str, &str)],
        port: u16,
        target_port: u16,
    ) -> Result<PathBuf> {
        let selector: String = selector
            .iter()
            .map(|(k, v)| format!("    {}: {}\n", quote(k), quote(v)))
            .collect();
        let yaml = format!(
            "apiVersion: v1\n\
             kind: Service\n\
             metadata:\n  name: {name}\n  namespace: {namespace}\n\
             spec:\n  type: ClusterIP\n  clusterIP: {ip}\n  selector:\n{selector}\
             \x20 ports:\n  - name: tcp-{port}\n    protocol: TCP\n    port: {port}\n    targetPort: {target_port}\n",
            name = quote(name),
            namespace = quote(namespace),
            ip = quote(&cluster_ip.to_string()),
        );
        self.write(&format!("service-{namespace}-{name}.yaml"), &yaml)
    }

    /// Any other object, verbatim.
    pub fn raw(&self, file_name: &str, yaml: &str) -> Result<PathBuf> {
        self.write(file_name, yaml)
    }

    pub fn remove_pod(&self, namespace: &str, name: &str) -> Result<()> {
        let path = self.dir.join(pod_file(namespace, name));
        std::fs::remove_file(&path).context(|| format!("removing {}", path.display()))
    }

    /// Writes via a hidden temp file and a rename, so the watching control plane never reads a
    /// half-written object.
    fn write(&self, file_name: &str, yaml: &str) -> Result<PathBuf> {
        let path = self.dir.join(file_name);
        let tmp = self.dir.join(format!(".{file_name}.tmp"));
        std::fs::write(&tmp, yaml).context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).context(|| format!("renaming to {}", path.display()))?;
        Ok(path)
    }
}

fn namespace_file(name: &str) -> String {
    format!("namespace-{name}.yaml")
}

fn pod_file(namespace: &str, name: &str) -> String {
    format!("pod-{namespace}-{name}.yaml")
}

/// Lowercase hex SHA-256, as in the `weft.io/token-sha256` annotation.
pub fn token_sha256_hex(token: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, token))
}

/// A YAML double-quoted scalar (JSON string syntax is valid YAML), so no value can break the
/// document.
fn quote(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"\"".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> Manifests {
        let dir =
            std::env::temp_dir().join(format!("weft-e2e-manifests-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Manifests::new(dir).unwrap()
    }

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            token_sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn writes_a_meshed_pod() {
        let m = scratch("pod");
        let path = m
            .pod(
                "shop",
                "api",
                Ipv4Addr::new(198, 18, 0, 10),
                "api-sa",
                true,
                Some("abc"),
            )
            .unwrap();
        let yaml = std::fs::read_to_string(&path).unwrap();
        assert!(path.ends_with("pod-shop-api.yaml"));
        for expected in [
            "kind: Pod\n",
            "  namespace: \"shop\"\n",
            "    weft.io/inject: \"enabled\"\n",
            "    weft.io/token-sha256: \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"\n",
            "  serviceAccountName: \"api-sa\"\n",
            "  podIP: \"198.18.0.10\"\n",
        ] {
            assert!(yaml.contains(expected), "missing {expected:?} in\n{yaml}");
        }
        m.remove_pod("shop", "api").unwrap();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(m.dir());
    }

    #[test]
    fn writes_an_unmeshed_pod_without_token() {
        let m = scratch("plain");
        let path = m
            .pod(
                "shop",
                "legacy",
                Ipv4Addr::new(198, 18, 0, 11),
                "default",
                false,
                None,
            )
            .unwrap();
        let yaml = std::fs::read_to_string(path).unwrap();
        assert!(yaml.contains("weft.io/inject: \"disabled\""));
        assert!(!yaml.contains("token-sha256"));
        let _ = std::fs::remove_dir_all(m.dir());
    }

    #[test]
    fn writes_namespace_and_service() {
        let m = scratch("svc");
        let ns = std::fs::read_to_string(m.namespace("shop", true).unwrap()).unwrap();
        assert!(ns.contains("kind: Namespace\n") && ns.contains("weft.io/inject: \"enabled\""));
        let svc = m
            .service(
                "shop",
                "api",
                Ipv4Addr::new(198, 19, 0, 1),
                &[("app", "api")],
                80,
                8080,
            )
            .unwrap();
        let svc = std::fs::read_to_string(svc).unwrap();
        for expected in [
            "kind: Service\n",
            "  clusterIP: \"198.19.0.1\"\n",
            "    \"app\": \"api\"\n",
            "    port: 80\n",
            "    targetPort: 8080\n",
        ] {
            assert!(svc.contains(expected), "missing {expected:?} in\n{svc}");
        }
        let _ = std::fs::remove_dir_all(m.dir());
    }
}
