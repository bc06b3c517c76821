//! The standalone control plane's input: Kubernetes-shaped YAML, one object per file so a test
//! can edit or delete a single object while the control plane watches the directory.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

pub const INJECT_ANNOTATION: &str = "weft.io/inject";
pub const TOKEN_SHA256_ANNOTATION: &str = "weft.io/token-sha256";
/// Pod or namespace annotation: `all-unauthenticated`, `all-authenticated`,
/// `cluster-authenticated` or `deny` (what a port no AuthorizationPolicy selects lets in).
pub const DEFAULT_INBOUND_POLICY_ANNOTATION: &str = "config.weft.io/default-inbound-policy";
/// Pod annotation: comma-separated ports on which plaintext is refused whatever the policy.
pub const REQUIRE_MTLS_PORTS_ANNOTATION: &str = "config.weft.io/require-mtls-ports";

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
        self.namespace_with_annotations(name, inject, &[])
    }

    /// A Namespace with `annotations` (e.g. [`DEFAULT_INBOUND_POLICY_ANNOTATION`]), plus
    /// `weft.io/inject: enabled` when `inject`. Writing it again replaces it (applied live).
    pub fn namespace_with_annotations(
        &self,
        name: &str,
        inject: bool,
        annotations: &[(&str, &str)],
    ) -> Result<PathBuf> {
        let mut lines = String::new();
        if inject {
            lines.push_str(&format!("    {INJECT_ANNOTATION}: \"enabled\"\n"));
        }
        lines.push_str(&annotation_lines(annotations));
        let annotations = if lines.is_empty() {
            String::new()
        } else {
            format!("  annotations:\n{lines}")
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
        self.annotated_pod(namespace, name, ip, service_account, meshed, token, &[])
    }

    /// [`Manifests::pod`] with extra `annotations` (e.g. [`DEFAULT_INBOUND_POLICY_ANNOTATION`]).
    #[allow(clippy::too_many_arguments)]
    pub fn annotated_pod(
        &self,
        namespace: &str,
        name: &str,
        ip: Ipv4Addr,
        service_account: &str,
        meshed: bool,
        token: Option<&str>,
        extra_annotations: &[(&str, &str)],
    ) -> Result<PathBuf> {
        let inject = if meshed { "enabled" } else { "disabled" };
        let mut annotations = format!("    {INJECT_ANNOTATION}: {}\n", quote(inject));
        if let Some(token) = token {
            annotations.push_str(&format!(
                "    {TOKEN_SHA256_ANNOTATION}: {}\n",
                quote(&token_sha256_hex(token.as_bytes()))
            ));
        }
        annotations.push_str(&annotation_lines(extra_annotations));
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

    /// Sets annotations on a pod written by [`Manifests::pod`] (replacing any of the same key),
    /// keeping everything else: `kubectl annotate --overwrite`, applied live.
    pub fn set_pod_annotations(
        &self,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> Result<PathBuf> {
        let file = pod_file(namespace, name);
        let path = self.dir.join(&file);
        let yaml =
            std::fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
        let Some(at) = yaml
            .find(ANNOTATIONS_LINE)
            .map(|i| i + ANNOTATIONS_LINE.len())
        else {
            return Err(crate::error::HarnessError::invalid(
                "pod manifest",
                format!("{} has no metadata.annotations", path.display()),
            ));
        };
        let (head, rest) = yaml.split_at(at);
        // The annotation block is the run of lines indented by four spaces after its key.
        let block_len = rest
            .split_inclusive('\n')
            .take_while(|line| line.starts_with("    "))
            .map(str::len)
            .sum::<usize>();
        let (block, tail) = rest.split_at(block_len);
        let replaced = |line: &str| {
            annotations.iter().any(|(key, _)| {
                line.starts_with(&format!("    {key}:"))
                    || line.starts_with(&format!("    {}:", quote(key)))
            })
        };
        let kept: String = block
            .split_inclusive('\n')
            .filter(|line| !replaced(line))
            .collect();
        let yaml = format!("{head}{kept}{}{tail}", annotation_lines(annotations));
        self.write(&file, &yaml)
    }

    /// An `AuthorizationPolicy` (`policy.weft.io/v1alpha1`) built with
    /// [`AuthorizationPolicySpec`]. Writing the same name again replaces it (applied live).
    pub fn authorization_policy(
        &self,
        namespace: &str,
        name: &str,
        spec: &AuthorizationPolicySpec,
    ) -> Result<PathBuf> {
        self.authorization_policy_yaml(namespace, name, &spec.to_yaml())
    }

    /// An `AuthorizationPolicy` whose `spec` is `spec_yaml` as written (a block or flow YAML
    /// mapping; block lines are indented under `spec:` here), for objects the builder cannot
    /// express, such as malformed ones.
    pub fn authorization_policy_yaml(
        &self,
        namespace: &str,
        name: &str,
        spec_yaml: &str,
    ) -> Result<PathBuf> {
        let spec: String = spec_yaml
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| format!("  {line}\n"))
            .collect();
        let yaml = format!(
            "apiVersion: policy.weft.io/v1alpha1\n\
             kind: AuthorizationPolicy\n\
             metadata:\n  name: {name}\n  namespace: {namespace}\n\
             spec:\n{spec}",
            name = quote(name),
            namespace = quote(namespace),
        );
        self.write(&authorization_policy_file(namespace, name), &yaml)
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
/// Where [`Manifests::pod`] puts a pod's annotations.
const ANNOTATIONS_LINE: &str = "\n  annotations:\n";

/// `    "key": "value"` lines of a metadata.annotations block.
fn annotation_lines(annotations: &[(&str, &str)]) -> String {
    annotations
        .iter()
        .map(|(k, v)| format!("    {}: {}\n", quote(k), quote(v)))
        .collect()
}

/// What an `AuthorizationPolicy` does with the requests its rules match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyAction {
    /// Only what some rule matches passes (the selected ports become default-deny).
    Allow,
    /// What a rule matches is refused, whatever any ALLOW says.
    Deny,
    /// An ALLOW rehearsal: what no rule matches still passes, but is counted and logged as
    /// what would have been denied.
    Audit,
}

impl PolicyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyAction::Allow => "ALLOW",
            PolicyAction::Deny => "DENY",
            PolicyAction::Audit => "AUDIT",
        }
    }
}

/// The `spec` of an `AuthorizationPolicy`, as DESIGN.md fixes its schema: a workload
/// selector, optional ports, an action and rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicySpec {
    /// `selector.matchLabels`.
    pub match_labels: Vec<(String, String)>,
    /// Empty: every port of the selected pods.
    pub ports: Vec<u16>,
    pub action: PolicyAction,
    pub rules: Vec<PolicyRule>,
}

/// One rule: it matches when one `from` entry and one `to` entry match; an empty list
/// matches everything (and is left out of the YAML).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyRule {
    pub from: Vec<PolicySource>,
    pub to: Vec<PolicyTarget>,
}

/// A `from` entry: every field that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySource {
    /// SPIFFE ids; `*` matches any run of characters.
    pub identities: Vec<String>,
    /// `namespace/name`.
    pub service_accounts: Vec<String>,
    pub namespaces: Vec<String>,
    pub networks: Vec<PolicyNetwork>,
    pub unauthenticated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyNetwork {
    pub cidr: String,
    pub except: Vec<String>,
}

/// A `to` entry (HTTP only): methods and paths (exact, `/prefix/*` or `regex:<re>`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyTarget {
    pub methods: Vec<String>,
    pub paths: Vec<String>,
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

impl AuthorizationPolicySpec {
    /// A policy for the pods whose labels include `match_labels`, with no rules yet.
    pub fn new(action: PolicyAction, match_labels: &[(&str, &str)]) -> AuthorizationPolicySpec {
        AuthorizationPolicySpec {
            match_labels: match_labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: Vec::new(),
            action,
            rules: Vec::new(),
        }
    }

    pub fn allow(match_labels: &[(&str, &str)]) -> AuthorizationPolicySpec {
        AuthorizationPolicySpec::new(PolicyAction::Allow, match_labels)
    }

    pub fn deny(match_labels: &[(&str, &str)]) -> AuthorizationPolicySpec {
        AuthorizationPolicySpec::new(PolicyAction::Deny, match_labels)
    }

    pub fn audit(match_labels: &[(&str, &str)]) -> AuthorizationPolicySpec {
        AuthorizationPolicySpec::new(PolicyAction::Audit, match_labels)
    }

    pub fn ports(mut self, ports: &[u16]) -> AuthorizationPolicySpec {
        self.ports = ports.to_vec();
        self
    }

    pub fn rule(mut self, rule: PolicyRule) -> AuthorizationPolicySpec {
        self.rules.push(rule);
        self
    }

    /// The spec as one JSON line, which is also a YAML flow mapping (JSON quoting keeps every
    /// value intact, whatever characters a path or regex holds).
    pub fn to_yaml(&self) -> String {
        let mut spec = serde_json::Map::new();
        let labels: serde_json::Map<String, serde_json::Value> = self
            .match_labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect();
        spec.insert(
            "selector".to_string(),
            serde_json::json!({ "matchLabels": labels }),
        );
        if !self.ports.is_empty() {
            spec.insert("ports".to_string(), serde_json::json!(self.ports));
        }
        spec.insert("action".to_string(), self.action.as_str().into());
        let rules: Vec<serde_json::Value> = self.rules.iter().map(PolicyRule::to_json).collect();
        spec.insert("rules".to_string(), rules.into());
        serde_json::Value::Object(spec).to_string()
    }
}

impl PolicyRule {
    /// A rule matching everything (until `from`/`to` entries narrow it).
    pub fn new() -> PolicyRule {
        PolicyRule::default()
    }

    /// Adds a `from` alternative.
    pub fn from(mut self, source: PolicySource) -> PolicyRule {
        self.from.push(source);
        self
    }

    /// Adds a `to` alternative.
    pub fn to(mut self, target: PolicyTarget) -> PolicyRule {
        self.to.push(target);
        self
    }

    fn to_json(&self) -> serde_json::Value {
        let mut rule = serde_json::Map::new();
        if !self.from.is_empty() {
            let from: Vec<_> = self.from.iter().map(PolicySource::to_json).collect();
            rule.insert("from".to_string(), from.into());
        }
        if !self.to.is_empty() {
            let to: Vec<_> = self.to.iter().map(PolicyTarget::to_json).collect();
            rule.insert("to".to_string(), to.into());
        }
        serde_json::Value::Object(rule)
    }
}

impl PolicySource {
    /// Clients with one of these service accounts (`namespace/name`).
    pub fn service_accounts(service_accounts: &[&str]) -> PolicySource {
        PolicySource {
            service_accounts: strings(service_accounts),
            ..PolicySource::default()
        }
    }

    /// Clients with one of these SPIFFE ids (`*` wildcards allowed).
    pub fn identities(identities: &[&str]) -> PolicySource {
        PolicySource {
            identities: strings(identities),
            ..PolicySource::default()
        }
    }

    pub fn namespaces(namespaces: &[&str]) -> PolicySource {
        PolicySource {
            namespaces: strings(namespaces),
            ..PolicySource::default()
        }
    }

    /// Clients whose address is in `cidr` but in none of `except`.
    pub fn network(cidr: &str, except: &[&str]) -> PolicySource {
        PolicySource {
            networks: vec![PolicyNetwork {
                cidr: cidr.to_string(),
                except: strings(except),
            }],
            ..PolicySource::default()
        }
    }

    /// Clients without an identity (plaintext).
    pub fn unauthenticated() -> PolicySource {
        PolicySource {
            unauthenticated: true,
            ..PolicySource::default()
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let mut source = serde_json::Map::new();
        for (key, values) in [
            ("identities", &self.identities),
            ("serviceAccounts", &self.service_accounts),
            ("namespaces", &self.namespaces),
        ] {
            if !values.is_empty() {
                source.insert(key.to_string(), serde_json::json!(values));
            }
        }
        if !self.networks.is_empty() {
            let networks: Vec<_> = self
                .networks
                .iter()
                .map(|n| {
                    if n.except.is_empty() {
                        serde_json::json!({ "cidr": n.cidr })
                    } else {
                        serde_json::json!({ "cidr": n.cidr, "except": n.except })
                    }
                })
                .collect();
            source.insert("networks".to_string(), networks.into());
        }
        if self.unauthenticated {
            source.insert("unauthenticated".to_string(), true.into());
        }
        serde_json::Value::Object(source)
    }
}

impl PolicyTarget {
    /// Requests with one of `methods` (empty: any) and one of `paths` (empty: any).
    pub fn new(methods: &[&str], paths: &[&str]) -> PolicyTarget {
        PolicyTarget {
            methods: strings(methods),
            paths: strings(paths),
        }
    }

    pub fn paths(paths: &[&str]) -> PolicyTarget {
        PolicyTarget::new(&[], paths)
    }

    pub fn methods(methods: &[&str]) -> PolicyTarget {
        PolicyTarget::new(methods, &[])
    }

    fn to_json(&self) -> serde_json::Value {
        let mut target = serde_json::Map::new();
        if !self.methods.is_empty() {
            target.insert("methods".to_string(), serde_json::json!(self.methods));
        }
        if !self.paths.is_empty() {
            target.insert("paths".to_string(), serde_json::json!(self.paths));
        }
        serde_json::Value::Object(target)
    }
}

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

pub fn authorization_policy_file(namespace: &str, name: &str) -> String {
    format!("authorizationpolicy-{namespace}-{name}.yaml")
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
    #[test]
    fn writes_namespace_annotations() {
        let m = scratch("ns-annotations");
        let path = m
            .namespace_with_annotations(
                "shop",
                true,
                &[(DEFAULT_INBOUND_POLICY_ANNOTATION, "deny")],
            )
            .unwrap();
        let v = parse(&path);
        assert_eq!(v["kind"], "Namespace");
        let annotations = &v["metadata"]["annotations"];
        assert_eq!(annotations["weft.io/inject"], "enabled");
        assert_eq!(annotations["config.weft.io/default-inbound-policy"], "deny");
        let plain = parse(&m.namespace_with_annotations("other", false, &[]).unwrap());
        assert!(plain["metadata"].get("annotations").is_none());
        let _ = std::fs::remove_dir_all(m.dir());
    }

    #[test]
    fn writes_pod_annotations_and_overwrites_them() {
        let m = scratch("pod-annotations");
        let path = m
            .annotated_pod(
                "shop",
                "db",
                Ipv4Addr::new(198, 18, 0, 22),
                "db",
                true,
                Some("tok"),
                &[
                    (DEFAULT_INBOUND_POLICY_ANNOTATION, "cluster-authenticated"),
                    (REQUIRE_MTLS_PORTS_ANNOTATION, "8080"),
                ],
            )
            .unwrap();
        let v = parse(&path);
        let annotations = &v["metadata"]["annotations"];
        assert_eq!(
            annotations["config.weft.io/default-inbound-policy"],
            "cluster-authenticated"
        );
        assert_eq!(annotations["config.weft.io/require-mtls-ports"], "8080");
        assert_eq!(annotations["weft.io/inject"], "enabled");

        m.set_pod_annotations(
            "shop",
            "db",
            &[
                (DEFAULT_INBOUND_POLICY_ANNOTATION, "deny"),
                ("example.com/new", "yes"),
            ],
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.matches("default-inbound-policy").count(),
            1,
            "the old value must be replaced, not duplicated:\n{text}"
        );
        let v = parse(&path);
        let annotations = &v["metadata"]["annotations"];
        assert_eq!(annotations["config.weft.io/default-inbound-policy"], "deny");
        assert_eq!(annotations["example.com/new"], "yes");
        assert_eq!(annotations["config.weft.io/require-mtls-ports"], "8080");
        assert_eq!(
            annotations["weft.io/token-sha256"],
            token_sha256_hex(b"tok").as_str()
        );
        assert_eq!(v["spec"]["serviceAccountName"], "db");
        assert_eq!(v["status"]["podIP"], "198.18.0.22");
        // The built-in (unquoted) keys can be overwritten too.
        m.set_pod_annotations("shop", "db", &[(INJECT_ANNOTATION, "disabled")])
            .unwrap();
        let v = parse(&path);
        assert_eq!(v["metadata"]["annotations"]["weft.io/inject"], "disabled");
        assert!(m
            .set_pod_annotations("shop", "nope", &[("a", "b")])
            .is_err());
        let _ = std::fs::remove_dir_all(m.dir());
    }

    #[test]
    fn writes_an_authorization_policy_as_design_md_shapes_it() {
        let m = scratch("authz");
        let spec = AuthorizationPolicySpec::allow(&[("app", "internal")])
            .ports(&[8080])
            .rule(
                PolicyRule::new()
                    .from(PolicySource::service_accounts(&["shop/api"]))
                    .to(PolicyTarget::new(&["GET"], &["regex:/api/v1/users/.*"]))
                    .to(PolicyTarget::new(&["POST"], &["/api/v1/orders"])),
            )
            .rule(
                PolicyRule::new()
                    .from(PolicySource::network("198.18.0.0/24", &["198.18.0.1/32"]))
                    .from(PolicySource::identities(&[
                        "spiffe://cluster.local/ns/*/sa/web",
                    ]))
                    .from(PolicySource::namespaces(&["ops"]))
                    .from(PolicySource::unauthenticated()),
            )
            .rule(PolicyRule::new());
        let path = m
            .authorization_policy("shop", "internal-api", &spec)
            .unwrap();
        assert!(path.ends_with("authorizationpolicy-shop-internal-api.yaml"));
        let v = parse(&path);
        assert_eq!(v["apiVersion"], "policy.weft.io/v1alpha1");
        assert_eq!(v["kind"], "AuthorizationPolicy");
        assert_eq!(v["metadata"]["name"], "internal-api");
        assert_eq!(v["metadata"]["namespace"], "shop");
        let spec = &v["spec"];
        assert_eq!(spec["selector"]["matchLabels"]["app"], "internal");
        assert_eq!(spec["ports"][0], 8080);
        assert_eq!(spec["action"], "ALLOW");
        let first = &spec["rules"][0];
        assert_eq!(first["from"][0]["serviceAccounts"][0], "shop/api");
        assert_eq!(first["to"][0]["methods"][0], "GET");
        assert_eq!(first["to"][0]["paths"][0], "regex:/api/v1/users/.*");
        assert_eq!(first["to"][1]["methods"][0], "POST");
        assert_eq!(first["to"][1]["paths"][0], "/api/v1/orders");
        let second = &spec["rules"][1];
        assert!(
            second.get("to").is_none(),
            "an absent `to` matches everything"
        );
        assert_eq!(second["from"][0]["networks"][0]["cidr"], "198.18.0.0/24");
        assert_eq!(
            second["from"][0]["networks"][0]["except"][0],
            "198.18.0.1/32"
        );
        assert_eq!(
            second["from"][1]["identities"][0],
            "spiffe://cluster.local/ns/*/sa/web"
        );
        assert_eq!(second["from"][2]["namespaces"][0], "ops");
        assert_eq!(second["from"][3]["unauthenticated"], true);
        assert!(second["from"][0].get("unauthenticated").is_none());
        let third = &spec["rules"][2];
        assert!(third.get("from").is_none() && third.get("to").is_none());

        let deny = AuthorizationPolicySpec::deny(&[("app", "db")]);
        let v = parse(&m.authorization_policy("shop", "db-deny", &deny).unwrap());
        assert_eq!(v["spec"]["action"], "DENY");
        assert!(v["spec"].get("ports").is_none(), "no ports: all ports");
        assert_eq!(v["spec"]["rules"].as_sequence().map(Vec::len), Some(0));
        let audit = AuthorizationPolicySpec::audit(&[("app", "db")]);
        assert_eq!(
            parse(&m.authorization_policy("shop", "db-deny", &audit).unwrap())["spec"]["action"],
            "AUDIT"
        );
        m.remove(&authorization_policy_file("shop", "db-deny"))
            .unwrap();
        let _ = std::fs::remove_dir_all(m.dir());
    }

    #[test]
    fn writes_a_raw_authorization_policy_spec_under_spec() {
        let m = scratch("authz-raw");
        let path = m
            .authorization_policy_yaml(
                "shop",
                "raw",
                "selector:\n  matchLabels: {app: web}\naction: DENY\nrules:\n- from: [{namespaces: [\"x\"]}]\n",
            )
            .unwrap();
        let v = parse(&path);
        assert_eq!(v["spec"]["selector"]["matchLabels"]["app"], "web");
        assert_eq!(v["spec"]["action"], "DENY");
        assert_eq!(v["spec"]["rules"][0]["from"][0]["namespaces"][0], "x");
        let _ = std::fs::remove_dir_all(m.dir());
    }
}
