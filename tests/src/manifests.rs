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

    /// An SMI `TrafficSplit` (`split.smi-spec.io/v1alpha2`): requests to the apex Service
    /// `service` go to the backend Services in proportion to their weights. Writing the same
    /// name again replaces the object (the control plane applies the change live).
    pub fn traffic_split(
        &self,
        namespace: &str,
        name: &str,
        service: &str,
        backends: &[(&str, u32)],
    ) -> Result<PathBuf> {
        let backends: String = backends
            .iter()
            .map(|(backend, weight)| {
                format!("  - service: {}\n    weight: {weight}\n", quote(backend))
            })
            .collect();
        let yaml = format!(
            "apiVersion: split.smi-spec.io/v1alpha2\n\
             kind: TrafficSplit\n\
             metadata:\n  name: {name}\n  namespace: {namespace}\n\
             spec:\n  service: {service}\n  backends:\n{backends}",
            name = quote(name),
            namespace = quote(namespace),
            service = quote(service),
        );
        self.write(&traffic_split_file(namespace, name), &yaml)
    }

    /// A Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`) attached to the Service
    /// `parent_service` (parentRef kind Service, all its ports), with `annotations` (e.g.
    /// `retry.weft.io/budget-percent`). Writing the same name again replaces it.
    pub fn http_route(
        &self,
        namespace: &str,
        name: &str,
        parent_service: &str,
        annotations: &[(&str, &str)],
        rules: &[RouteRule],
    ) -> Result<PathBuf> {
        let annotations = if annotations.is_empty() {
            String::new()
        } else {
            let lines: String = annotations
                .iter()
                .map(|(k, v)| format!("    {}: {}\n", quote(k), quote(v)))
                .collect();
            format!("  annotations:\n{lines}")
        };
        let rules: String = rules.iter().map(RouteRule::to_yaml).collect();
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\n\
             kind: HTTPRoute\n\
             metadata:\n  name: {name}\n  namespace: {namespace}\n{annotations}\
             spec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: {parent}\n\
             \x20 rules:\n{rules}",
            name = quote(name),
            namespace = quote(namespace),
            parent = quote(parent_service),
        );
        self.write(&http_route_file(namespace, name), &yaml)
    }

    /// Adds labels to a pod written by [`Manifests::pod`] (e.g. a label several pods share, for
    /// one Service to select them all), keeping everything else.
    pub fn add_pod_labels(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<PathBuf> {
        let file = pod_file(namespace, name);
        let path = self.dir.join(&file);
        let yaml =
            std::fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
        let extra: String = labels
            .iter()
            .map(|(k, v)| format!("    {}: {}\n", quote(k), quote(v)))
            .collect();
        let Some(at) = yaml.find(LABELS_LINE).map(|i| i + LABELS_LINE.len()) else {
            return Err(crate::error::HarnessError::invalid(
                "pod manifest",
                format!("{} has no metadata.labels", path.display()),
            ));
        };
        let yaml = format!("{}{extra}{}", &yaml[..at], &yaml[at..]);
        self.write(&file, &yaml)
    }

    /// Deletes the object in `file_name` (as returned by a writer), as `kubectl delete` would.
    pub fn remove(&self, file_name: &str) -> Result<()> {
        let path = self.dir.join(file_name);
        std::fs::remove_file(&path).context(|| format!("removing {}", path.display()))
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

/// Where [`Manifests::pod`] puts a pod's labels.
const LABELS_LINE: &str = "\n  labels:\n";

/// One rule of an HTTPRoute: matches (any of them; none = every request), weighted backend
/// Services, timeouts and the experimental `retry` stanza.
#[derive(Debug, Clone, Default)]
pub struct RouteRule {
    pub matches: Vec<RouteMatch>,
    pub backends: Vec<RouteBackend>,
    /// `timeouts.request`, a Gateway API duration such as `"200ms"`.
    pub request_timeout: Option<String>,
    /// `timeouts.backendRequest`.
    pub backend_request_timeout: Option<String>,
    pub retry: Option<RouteRetry>,
}

#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub method: Option<String>,
    /// Exact header matches.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Gateway API `PathPrefix` (element-wise).
    Prefix(String),
    RegularExpression(String),
}

#[derive(Debug, Clone)]
pub struct RouteBackend {
    pub service: String,
    pub port: u16,
    pub weight: u32,
}

/// Gateway API's experimental `retry`: `attempts` retries (after the first try) on `codes`.
#[derive(Debug, Clone)]
pub struct RouteRetry {
    pub codes: Vec<u16>,
    pub attempts: u32,
    /// A Gateway API duration such as `"10ms"`.
    pub backoff: Option<String>,
}

impl RouteRule {
    /// All requests to `backends`.
    pub fn to_backends(backends: &[(&str, u16, u32)]) -> RouteRule {
        RouteRule {
            backends: backends
                .iter()
                .map(|(service, port, weight)| RouteBackend {
                    service: service.to_string(),
                    port: *port,
                    weight: *weight,
                })
                .collect(),
            ..RouteRule::default()
        }
    }

    /// Requests whose path has the (element-wise) `prefix`, to one backend.
    pub fn path_prefix(prefix: &str, service: &str, port: u16) -> RouteRule {
        RouteRule {
            matches: vec![RouteMatch {
                path: Some(PathMatch::Prefix(prefix.to_string())),
                ..RouteMatch::default()
            }],
            ..RouteRule::to_backends(&[(service, port, 1)])
        }
    }

    pub fn request_timeout(mut self, timeout: &str) -> RouteRule {
        self.request_timeout = Some(timeout.to_string());
        self
    }

    pub fn backend_request_timeout(mut self, timeout: &str) -> RouteRule {
        self.backend_request_timeout = Some(timeout.to_string());
        self
    }

    pub fn retry(mut self, codes: &[u16], attempts: u32, backoff: Option<&str>) -> RouteRule {
        self.retry = Some(RouteRetry {
            codes: codes.to_vec(),
            attempts,
            backoff: backoff.map(str::to_string),
        });
        self
    }

    fn to_yaml(&self) -> String {
        let mut out = String::from("  - ");
        let mut first = true;
        // The first key of a list item follows the dash; the others are indented under it.
        let mut key = |out: &mut String, text: &str| {
            if !first {
                out.push_str("    ");
            }
            first = false;
            out.push_str(text);
        };
        if !self.matches.is_empty() {
            key(&mut out, "matches:\n");
            for m in &self.matches {
                out.push_str(&m.to_yaml());
            }
        }
        key(&mut out, "backendRefs:\n");
        for b in &self.backends {
            out.push_str(&format!(
                "    - name: {}\n      port: {}\n      weight: {}\n",
                quote(&b.service),
                b.port,
                b.weight
            ));
        }
        if self.request_timeout.is_some() || self.backend_request_timeout.is_some() {
            key(&mut out, "timeouts:\n");
            if let Some(t) = &self.request_timeout {
                out.push_str(&format!("      request: {}\n", quote(t)));
            }
            if let Some(t) = &self.backend_request_timeout {
                out.push_str(&format!("      backendRequest: {}\n", quote(t)));
            }
        }
        if let Some(retry) = &self.retry {
            key(&mut out, "retry:\n");
            let codes: Vec<String> = retry.codes.iter().map(u16::to_string).collect();
            out.push_str(&format!("      codes: [{}]\n", codes.join(", ")));
            out.push_str(&format!("      attempts: {}\n", retry.attempts));
            if let Some(backoff) = &retry.backoff {
                out.push_str(&format!("      backoff: {}\n", quote(backoff)));
            }
        }
        out
    }
}

impl RouteMatch {
    fn to_yaml(&self) -> String {
        let mut lines = Vec::new();
        if let Some(path) = &self.path {
            let (kind, value) = match path {
                PathMatch::Exact(v) => ("Exact", v),
                PathMatch::Prefix(v) => ("PathPrefix", v),
                PathMatch::RegularExpression(v) => ("RegularExpression", v),
            };
            lines.push(format!(
                "path:\n        type: {kind}\n        value: {}\n",
                quote(value)
            ));
        }
        if let Some(method) = &self.method {
            lines.push(format!("method: {}\n", quote(method)));
        }
        if !self.headers.is_empty() {
            let headers: String = self
                .headers
                .iter()
                .map(|(k, v)| {
                    format!(
                        "      - type: Exact\n        name: {}\n        value: {}\n",
                        quote(k),
                        quote(v)
                    )
                })
                .collect();
            lines.push(format!("headers:\n{headers}"));
        }
        if lines.is_empty() {
            // An empty match matches every request.
            return "    - {}\n".to_string();
        }
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            out.push_str(if i == 0 { "    - " } else { "      " });
            out.push_str(line);
        }
        out
    }
}

pub fn traffic_split_file(namespace: &str, name: &str) -> String {
    format!("trafficsplit-{namespace}-{name}.yaml")
}

pub fn http_route_file(namespace: &str, name: &str) -> String {
    format!("httproute-{namespace}-{name}.yaml")
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

    fn parse(path: &Path) -> serde_yaml_ng::Value {
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn writes_a_traffic_split_and_replaces_it() {
        let m = scratch("split");
        let path = m
            .traffic_split(
                "shop",
                "web-split",
                "web",
                &[("web-v1", 90), ("web-v2", 10)],
            )
            .unwrap();
        assert!(path.ends_with("trafficsplit-shop-web-split.yaml"));
        let v = parse(&path);
        assert_eq!(v["apiVersion"], "split.smi-spec.io/v1alpha2");
        assert_eq!(v["kind"], "TrafficSplit");
        assert_eq!(v["metadata"]["namespace"], "shop");
        assert_eq!(v["spec"]["service"], "web");
        assert_eq!(v["spec"]["backends"][0]["service"], "web-v1");
        assert_eq!(v["spec"]["backends"][0]["weight"], 90);
        assert_eq!(v["spec"]["backends"][1]["weight"], 10);
        m.traffic_split(
            "shop",
            "web-split",
            "web",
            &[("web-v1", 50), ("web-v2", 50)],
        )
        .unwrap();
        assert_eq!(parse(&path)["spec"]["backends"][0]["weight"], 50);
        m.remove(&traffic_split_file("shop", "web-split")).unwrap();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(m.dir());
    }

    #[test]
    fn writes_an_http_route_with_every_rule_feature() {
        let m = scratch("route");
        let mut matched = RouteRule::path_prefix("/api/v2", "web-v2", 80)
            .request_timeout("200ms")
            .backend_request_timeout("100ms")
            .retry(&[503, 502], 3, Some("10ms"));
        matched.matches[0].method = Some("GET".to_string());
        matched.matches[0]
            .headers
            .push(("x-canary".to_string(), "yes".to_string()));
        matched.matches.push(RouteMatch {
            path: Some(PathMatch::Exact("/exact".to_string())),
            ..RouteMatch::default()
        });
        let path = m
            .http_route(
                "shop",
                "web-route",
                "web",
                &[("retry.weft.io/budget-percent", "20")],
                &[
                    matched,
                    RouteRule::to_backends(&[("web-v1", 80, 90), ("web-v2", 80, 10)]),
                ],
            )
            .unwrap();
        assert!(path.ends_with("httproute-shop-web-route.yaml"));
        let v = parse(&path);
        assert_eq!(v["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(v["kind"], "HTTPRoute");
        assert_eq!(
            v["metadata"]["annotations"]["retry.weft.io/budget-percent"],
            "20"
        );
        let parent = &v["spec"]["parentRefs"][0];
        assert_eq!(parent["group"], "");
        assert_eq!(parent["kind"], "Service");
        assert_eq!(parent["name"], "web");
        let rule = &v["spec"]["rules"][0];
        let first = &rule["matches"][0];
        assert_eq!(first["path"]["type"], "PathPrefix");
        assert_eq!(first["path"]["value"], "/api/v2");
        assert_eq!(first["method"], "GET");
        assert_eq!(first["headers"][0]["name"], "x-canary");
        assert_eq!(first["headers"][0]["value"], "yes");
        assert_eq!(rule["matches"][1]["path"]["type"], "Exact");
        assert_eq!(rule["backendRefs"][0]["name"], "web-v2");
        assert_eq!(rule["backendRefs"][0]["port"], 80);
        assert_eq!(rule["timeouts"]["request"], "200ms");
        assert_eq!(rule["timeouts"]["backendRequest"], "100ms");
        assert_eq!(rule["retry"]["codes"][1], 502);
        assert_eq!(rule["retry"]["attempts"], 3);
        assert_eq!(rule["retry"]["backoff"], "10ms");
        let split = &v["spec"]["rules"][1];
        assert!(split.get("matches").is_none());
        assert!(split.get("retry").is_none());
        assert_eq!(split["backendRefs"][0]["weight"], 90);
        assert_eq!(split["backendRefs"][1]["name"], "web-v2");
        assert_eq!(split["backendRefs"][1]["weight"], 10);
        let _ = std::fs::remove_dir_all(m.dir());
    }

    #[test]
    fn adds_pod_labels_keeping_the_rest() {
        let m = scratch("labels");
        m.pod(
            "shop",
            "lb-1",
            Ipv4Addr::new(198, 18, 0, 21),
            "lb-sa",
            true,
            Some("tok"),
        )
        .unwrap();
        let path = m
            .add_pod_labels("shop", "lb-1", &[("tier", "lb"), ("version", "v1")])
            .unwrap();
        let v = parse(&path);
        assert_eq!(v["metadata"]["labels"]["app"], "lb-1");
        assert_eq!(v["metadata"]["labels"]["tier"], "lb");
        assert_eq!(v["metadata"]["labels"]["version"], "v1");
        assert_eq!(
            v["metadata"]["annotations"]["weft.io/token-sha256"],
            token_sha256_hex(b"tok").as_str()
        );
        assert_eq!(v["status"]["podIP"], "198.18.0.21");
        assert!(m.add_pod_labels("shop", "nope", &[("a", "b")]).is_err());
        let _ = std::fs::remove_dir_all(m.dir());
    }
}
