//! The cluster as weft sees it (namespaces, pods, services) and the questions the control
//! plane asks of it: who is meshed, what is behind an `ip:port`, which pod a token proves.
//! Pure domain types: no YAML, Kubernetes client or protobuf types leak in here.

pub mod authz;
pub mod duration;
pub mod inbound;
pub mod route_resolution;
pub mod routes;

pub use authz::AuthorizationPolicy;
pub use inbound::{DefaultInboundPolicy, InboundPolicy, InboundProtocol};
pub use route_resolution::{ResolvedBackend, ResolvedRetry, ResolvedRoute, DEFAULT_ROUTE_NAME};
pub use routes::{HttpRoute, TrafficSplit};

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;

use weft_certs::SpiffeId;

/// Pod or namespace annotation that puts pods into the mesh (`enabled` / `disabled`).
pub const INJECT_ANNOTATION: &str = "weft.io/inject";
/// Pod annotation holding the lowercase hex SHA-256 of the pod's standalone bootstrap token.
pub const TOKEN_SHA256_ANNOTATION: &str = "weft.io/token-sha256";
/// Pod or Service annotation listing ports that skip protocol detection, e.g. `5432,6000-6010`.
pub const OPAQUE_PORTS_ANNOTATION: &str = "config.weft.io/opaque-ports";
/// Ports whose servers speak first or whose clients stall protocol detection (DESIGN.md).
pub const DEFAULT_OPAQUE_PORTS: [u16; 8] = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211];
/// Service account Kubernetes assigns when a pod names none.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Endpoint label keys; the set is fixed so metric cardinality stays bounded.
pub const LABEL_NAMESPACE: &str = "namespace";
pub const LABEL_POD: &str = "pod";
pub const LABEL_SERVICE_ACCOUNT: &str = "serviceaccount";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `None` while the pod has no IP yet; such a pod is never an endpoint.
    pub ip: Option<IpAddr>,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// TCP ports declared by the pod's containers (used to resolve named target ports).
    pub container_ports: Vec<ContainerPort>,
    /// The containers' plaintext HTTP liveness/readiness/startup probes.
    pub probes: Vec<HttpProbe>,
}

/// A kubelet `httpGet` probe of the pod's own address, which inbound policy lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    /// The request path kubelet sends (absolute, without query).
    pub path: String,
    /// A number, or the name of one of the pod's container ports.
    pub port: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `None` for headless services (and ones not yet allocated an IP).
    pub cluster_ip: Option<IpAddr>,
    /// An empty selector selects nothing (the service's endpoints are managed elsewhere).
    pub selector: BTreeMap<String, String>,
    /// TCP service ports only.
    pub ports: Vec<ServicePort>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// Looked up among the selected pod's container port names.
    Name(String),
}

/// Everything the control plane knows, as one value: sources build it, the index swaps it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Keyed by (namespace, name).
    pub pods: BTreeMap<(String, String), Pod>,
    /// Keyed by (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    /// Keyed by (namespace, name).
    pub traffic_splits: BTreeMap<(String, String), TrafficSplit>,
    /// Keyed by (namespace, name).
    pub http_routes: BTreeMap<(String, String), HttpRoute>,
    /// Keyed by (namespace, name).
    pub authorization_policies: BTreeMap<(String, String), AuthorizationPolicy>,
}

/// What is behind an original destination `ip:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// False when the address is neither a Service cluster IP:port nor a pod IP.
    pub known: bool,
    /// `name.namespace` when the address is a Service.
    pub service: Option<String>,
    /// Skip protocol detection and proxy as raw TCP.
    pub opaque: bool,
    /// Sorted by address. For HTTP, where no route matches (or there are no routes).
    pub endpoints: Vec<EndpointInfo>,
    /// HTTP route table, first match wins: from the HTTPRoutes attached to the Service port,
    /// else from its TrafficSplit; empty for pods, unknown addresses and unrouted Services.
    pub routes: Vec<ResolvedRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addr: SocketAddr,
    /// The identity the endpoint's proxy must present; `None` when the pod has no proxy.
    pub identity: Option<SpiffeId>,
    /// `namespace`, `pod`, `serviceaccount`.
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no pod is annotated with this token's digest")]
    Unknown,
    #[error("pods with different identities are annotated with this token's digest")]
    Ambiguous,
}

/// A field of an object that Kubernetes itself would have refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    pub field: String,
    pub reason: String,
}

impl InvalidField {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A set of ports written as `5432,6000-6010`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRanges(Vec<RangeInclusive<u16>>);

impl PortRanges {
    pub fn parse(text: &str) -> Result<Self, InvalidField> {
        let invalid =
            |item: &str, why: &str| InvalidField::new("port ranges", format!("{item:?}: {why}"));
        let mut ranges = Vec::new();
        for item in text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let (low, high) = match item.split_once('-') {
                Some((low, high)) => (low.trim(), high.trim()),
                None => (item, item),
            };
            let low = parse_port(low).ok_or_else(|| invalid(item, "not a port in 1-65535"))?;
            let high = parse_port(high).ok_or_else(|| invalid(item, "not a port in 1-65535"))?;
            if low > high {
                return Err(invalid(item, "range runs backwards"));
            }
            ranges.push(low..=high);
        }
        Ok(Self(ranges))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|range| range.contains(&port))
    }
}

fn parse_port(text: &str) -> Option<u16> {
    // u16::from_str accepts a leading '+', which no port list should contain.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|port| *port != 0)
}

/// Whether the annotation `OPAQUE_PORTS_ANNOTATION` in `annotations` lists `port`. An
/// unparsable annotation lists nothing: sources reject such objects before they get here.
fn annotation_lists_port(annotations: &BTreeMap<String, String>, port: u16) -> bool {
    annotations
        .get(OPAQUE_PORTS_ANNOTATION)
        .and_then(|text| PortRanges::parse(text).ok())
        .is_some_and(|ranges| ranges.contains(port))
}

fn is_default_opaque(port: u16) -> bool {
    DEFAULT_OPAQUE_PORTS.contains(&port)
}

impl ClusterState {
    pub fn is_meshed(&self, pod: &Pod) -> bool {
        match pod.annotations.get(INJECT_ANNOTATION).map(String::as_str) {
            Some("enabled") => true,
            Some("disabled") => false,
            _ => self
                .namespaces
                .get(&pod.namespace)
                .and_then(|ns| ns.annotations.get(INJECT_ANNOTATION))
                .is_some_and(|value| value == "enabled"),
        }
    }

    /// The identity the pod's proxy is entitled to, whether or not the pod is meshed.
    pub fn identity_of(&self, pod: &Pod, trust_domain: &str) -> Option<SpiffeId> {
        SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account).ok()
    }

    pub fn resolve(&self, addr: SocketAddr, trust_domain: &str) -> Destination {
        if let Some(destination) = self.resolve_service(addr, trust_domain) {
            return destination;
        }
        if let Some(destination) = self.resolve_pod(addr, trust_domain) {
            return destination;
        }
        Destination {
            known: false,
            service: None,
            opaque: is_default_opaque(addr.port()),
            endpoints: Vec::new(),
            routes: Vec::new(),
        }
    }

    fn resolve_service(&self, addr: SocketAddr, trust_domain: &str) -> Option<Destination> {
        let (service, service_port) = self.services.values().find_map(|service| {
            if service.cluster_ip != Some(addr.ip()) {
                return None;
            }
            let port = service.ports.iter().find(|port| port.port == addr.port())?;
            Some((service, port))
        })?;

        let (endpoints, opaque_target) =
            self.service_endpoints(service, service_port, trust_domain);
        let opaque = opaque_target
            || is_default_opaque(service_port.port)
            || annotation_lists_port(&service.annotations, service_port.port);
        Some(Destination {
            known: true,
            service: Some(format!("{}.{}", service.name, service.namespace)),
            opaque,
            endpoints,
            routes: self.routes_for(service, service_port, trust_domain),
        })
    }

    /// The endpoints behind one port of a Service, sorted by address, and whether any of
    /// their target ports is opaque.
    fn service_endpoints(
        &self,
        service: &Service,
        service_port: &ServicePort,
        trust_domain: &str,
    ) -> (Vec<EndpointInfo>, bool) {
        let mut opaque = false;
        let mut endpoints = Vec::new();
        if !service.selector.is_empty() {
            for pod in self.pods_in(&service.namespace) {
                let Some(ip) = pod.ip else { continue };
                if !selector_matches(&service.selector, &pod.labels) {
                    continue;
                }
                let Some(target) = target_port_of(&service_port.target_port, pod) else {
                    continue;
                };
                opaque = opaque
                    || is_default_opaque(target)
                    || annotation_lists_port(&pod.annotations, target);
                endpoints.extend(self.endpoint(pod, SocketAddr::new(ip, target), trust_domain));
            }
        }
        endpoints.sort_by_key(|endpoint| endpoint.addr);
        // Host-network pods share their node's IP; one address is one endpoint.
        endpoints.dedup_by_key(|endpoint| endpoint.addr);
        (endpoints, opaque)
    }

    fn resolve_pod(&self, addr: SocketAddr, trust_domain: &str) -> Option<Destination> {
        // Host-network pods can share an IP: prefer the one declaring the port, then key order.
        let mut candidates = self.pods.values().filter(|pod| pod.ip == Some(addr.ip()));
        let first = candidates.next()?;
        let pod = if first
            .container_ports
            .iter()
            .any(|cp| cp.port == addr.port())
        {
            first
        } else {
            candidates
                .find(|pod| pod.container_ports.iter().any(|cp| cp.port == addr.port()))
                .unwrap_or(first)
        };
        Some(Destination {
            known: true,
            service: None,
            opaque: is_default_opaque(addr.port())
                || annotation_lists_port(&pod.annotations, addr.port()),
            endpoints: self.endpoint(pod, addr, trust_domain).into_iter().collect(),
            routes: Vec::new(),
        })
    }

    fn pods_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods
            .range((namespace.to_owned(), String::new())..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .map(|(_, pod)| pod)
    }

    /// `None` for a meshed pod whose identity cannot be formed: sending it plaintext
    /// would silently downgrade a connection the client expects to be mTLS.
    fn endpoint(&self, pod: &Pod, addr: SocketAddr, trust_domain: &str) -> Option<EndpointInfo> {
        let identity = if self.is_meshed(pod) {
            Some(self.identity_of(pod, trust_domain)?)
        } else {
            None
        };
        let labels = BTreeMap::from([
            (LABEL_NAMESPACE.to_owned(), pod.namespace.clone()),
            (LABEL_POD.to_owned(), pod.name.clone()),
            (
                LABEL_SERVICE_ACCOUNT.to_owned(),
                pod.service_account.clone(),
            ),
        ]);
        Some(EndpointInfo {
            addr,
            identity,
            labels,
        })
    }

    /// The identity proven by a standalone bootstrap token: the one of the pod(s) whose
    /// `weft.io/token-sha256` annotation is the token's SHA-256.
    pub fn identity_for_token(
        &self,
        token: &[u8],
        trust_domain: &str,
    ) -> Result<SpiffeId, TokenError> {
        // SHA-256 of nothing is public knowledge: an empty token file is a misconfiguration,
        // never a proof.
        if token.is_empty() {
            return Err(TokenError::Unknown);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, token);
        let mut proven: Option<SpiffeId> = None;
        for pod in self.pods.values() {
            let Some(annotated) = pod.annotations.get(TOKEN_SHA256_ANNOTATION) else {
                continue;
            };
            let Ok(annotated) = hex::decode(annotated.trim()) else {
                continue;
            };
            if !digests_equal(digest.as_ref(), &annotated) {
                continue;
            }
            let Some(identity) = self.identity_of(pod, trust_domain) else {
                continue;
            };
            match &proven {
                None => proven = Some(identity),
                Some(existing) if *existing == identity => {}
                Some(_) => return Err(TokenError::Ambiguous),
            }
        }
        proven.ok_or(TokenError::Unknown)
    }
}

/// Constant-time in the contents so that response timing does not reveal how much of a
/// guessed digest was right.
fn digests_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

fn target_port_of(target: &TargetPort, pod: &Pod) -> Option<u16> {
    match target {
        TargetPort::Number(port) => Some(*port),
        TargetPort::Name(name) => pod
            .container_ports
            .iter()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .map(|cp| cp.port),
    }
}

// ---- validation: the rules the Kubernetes API server applies, so that a scenario the
// directory source accepts is one `kubectl apply` would accept too.

impl Namespace {
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_dns_label("metadata.name", &self.name)?;
        check_annotations(&self.annotations)
    }
}

impl Pod {
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_dns_label("metadata.namespace", &self.namespace)?;
        check_dns_subdomain("metadata.name", &self.name)?;
        check_dns_subdomain("spec.serviceAccountName", &self.service_account)?;
        check_labels(&self.labels)?;
        check_annotations(&self.annotations)?;
        if let Some(digest) = self.annotations.get(TOKEN_SHA256_ANNOTATION) {
            let digest = digest.trim();
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(InvalidField::new(
                    format!("metadata.annotations[{TOKEN_SHA256_ANNOTATION}]"),
                    "must be 64 hex digits (a SHA-256)",
                ));
            }
        }
        for port in &self.container_ports {
            if let Some(name) = &port.name {
                check_port_name("spec.containers[].ports[].name", name)?;
            }
            check_port_number("spec.containers[].ports[].containerPort", port.port)?;
        }
        for probe in &self.probes {
            match &probe.port {
                TargetPort::Number(number) => {
                    check_port_number("spec.containers[].*Probe.httpGet.port", *number)?
                }
                TargetPort::Name(name) => {
                    check_port_name("spec.containers[].*Probe.httpGet.port", name)?
                }
            }
        }
        Ok(())
    }
}

impl Service {
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_dns_label("metadata.namespace", &self.namespace)?;
        check_dns_label("metadata.name", &self.name)?;
        if !self.name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(InvalidField::new(
                "metadata.name",
                "must start with a letter",
            ));
        }
        check_labels(&self.selector)
            .map_err(|e| InvalidField::new(format!("spec.selector: {}", e.field), e.reason))?;
        check_annotations(&self.annotations)?;
        for (i, port) in self.ports.iter().enumerate() {
            check_port_number("spec.ports[].port", port.port)?;
            if let Some(name) = &port.name {
                check_dns_label("spec.ports[].name", name)?;
            }
            if self.ports.len() > 1 && port.name.is_none() {
                return Err(InvalidField::new(
                    "spec.ports[].name",
                    "required when a service has several ports",
                ));
            }
            if self.ports[..i]
                .iter()
                .any(|earlier| earlier.port == port.port)
            {
                return Err(InvalidField::new(
                    "spec.ports[].port",
                    format!("{} listed twice", port.port),
                ));
            }
            if port.name.is_some()
                && self.ports[..i]
                    .iter()
                    .any(|earlier| earlier.name == port.name)
            {
                return Err(InvalidField::new("spec.ports[].name", "listed twice"));
            }
            match &port.target_port {
                TargetPort::Number(number) => {
                    check_port_number("spec.ports[].targetPort", *number)?
                }
                TargetPort::Name(name) => check_port_name("spec.ports[].targetPort", name)?,
            }
        }
        Ok(())
    }
}

fn check_port_number(field: &str, port: u16) -> Result<(), InvalidField> {
    if port == 0 {
        return Err(InvalidField::new(field, "must be in 1-65535"));
    }
    Ok(())
}

/// RFC 1123 label: what Kubernetes requires of namespace and service names.
fn check_dns_label(field: &str, name: &str) -> Result<(), InvalidField> {
    if name.is_empty() {
        return Err(InvalidField::new(field, "must not be empty"));
    }
    if name.len() > 63 {
        return Err(InvalidField::new(
            field,
            format!("{name:?} is longer than 63 characters"),
        ));
    }
    if !is_dns_label(name) {
        return Err(InvalidField::new(
            field,
            format!("{name:?} must be lowercase letters, digits and '-', starting and ending with a letter or digit"),
        ));
    }
    Ok(())
}

fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// RFC 1123 subdomain: what Kubernetes requires of pod and service account names.
fn check_dns_subdomain(field: &str, name: &str) -> Result<(), InvalidField> {
    if name.is_empty() {
        return Err(InvalidField::new(field, "must not be empty"));
    }
    if name.len() > 253 || !name.split('.').all(is_dns_label) {
        return Err(InvalidField::new(
            field,
            format!("{name:?} must be dot-separated lowercase labels of letters, digits and '-'"),
        ));
    }
    Ok(())
}

/// IANA service name: what Kubernetes requires of container port names.
fn check_port_name(field: &str, name: &str) -> Result<(), InvalidField> {
    let bytes = name.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= 15
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.iter().any(u8::is_ascii_lowercase)
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
        && !name.contains("--");
    if !valid {
        return Err(InvalidField::new(
            field,
            format!("{name:?} must be at most 15 lowercase letters, digits and single '-', with at least one letter"),
        ));
    }
    Ok(())
}

/// `[prefix/]name`: prefix a DNS subdomain, name 1-63 alphanumerics with `-_.` inside.
fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(is_dns_label) {
            return false;
        }
    }
    !name.is_empty() && is_label_value(name)
}

fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.is_empty()
        || (bytes.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric))
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), InvalidField> {
    for (key, value) in labels {
        if !is_qualified_name(key) {
            return Err(InvalidField::new(
                "metadata.labels",
                format!("invalid key {key:?}"),
            ));
        }
        if !is_label_value(value) {
            return Err(InvalidField::new(
                format!("metadata.labels[{key}]"),
                format!("invalid value {value:?} (at most 63 alphanumerics and '-_.')"),
            ));
        }
    }
    Ok(())
}

fn check_annotations(annotations: &BTreeMap<String, String>) -> Result<(), InvalidField> {
    for (key, value) in annotations {
        if !is_qualified_name(key) {
            return Err(InvalidField::new(
                "metadata.annotations",
                format!("invalid key {key:?}"),
            ));
        }
        if key == OPAQUE_PORTS_ANNOTATION || key == inbound::REQUIRE_MTLS_PORTS_ANNOTATION {
            PortRanges::parse(value)
                .map_err(|e| InvalidField::new(format!("metadata.annotations[{key}]"), e.reason))?;
        }
        if key == inbound::DEFAULT_INBOUND_POLICY_ANNOTATION {
            value
                .trim()
                .parse::<DefaultInboundPolicy>()
                .map_err(|reason| {
                    InvalidField::new(format!("metadata.annotations[{key}]"), reason)
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod(namespace: &str, name: &str, ip: Option<&str>, labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ip: ip.map(|ip| ip.parse().unwrap()),
            service_account: DEFAULT_SERVICE_ACCOUNT.to_owned(),
            labels: map(labels),
            annotations: BTreeMap::new(),
            container_ports: Vec::new(),
            probes: Vec::new(),
        }
    }

    fn service(
        namespace: &str,
        name: &str,
        ip: Option<&str>,
        selector: &[(&str, &str)],
        ports: Vec<ServicePort>,
    ) -> Service {
        Service {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            cluster_ip: ip.map(|ip| ip.parse().unwrap()),
            selector: map(selector),
            ports,
            annotations: BTreeMap::new(),
        }
    }

    fn port(port: u16, target: TargetPort) -> ServicePort {
        ServicePort {
            name: None,
            port,
            target_port: target,
        }
    }

    fn namespace(name: &str, annotations: &[(&str, &str)]) -> Namespace {
        Namespace {
            name: name.to_owned(),
            annotations: map(annotations),
        }
    }

    fn state(namespaces: Vec<Namespace>, pods: Vec<Pod>, services: Vec<Service>) -> ClusterState {
        ClusterState {
            namespaces: namespaces
                .into_iter()
                .map(|ns| (ns.name.clone(), ns))
                .collect(),
            pods: pods
                .into_iter()
                .map(|p| ((p.namespace.clone(), p.name.clone()), p))
                .collect(),
            services: services
                .into_iter()
                .map(|s| ((s.namespace.clone(), s.name.clone()), s))
                .collect(),
            ..ClusterState::default()
        }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new(TD, ns, sa).unwrap()
    }

    fn endpoint_addrs(destination: &Destination) -> Vec<SocketAddr> {
        destination.endpoints.iter().map(|e| e.addr).collect()
    }

    /// shop (injected namespace): web-1, web-2 (named port http=8080), web-old without IP,
    /// api-1 (other labels); other namespace: web-x with matching labels.
    fn shop() -> ClusterState {
        let mut web1 = pod(
            "shop",
            "web-1",
            Some("10.0.0.12"),
            &[("app", "web"), ("tier", "front")],
        );
        web1.container_ports = vec![ContainerPort {
            name: Some("http".into()),
            port: 8080,
        }];
        web1.service_account = "web".into();
        let mut web2 = pod("shop", "web-2", Some("10.0.0.11"), &[("app", "web")]);
        web2.container_ports = vec![ContainerPort {
            name: Some("http".into()),
            port: 8081,
        }];
        web2.service_account = "web".into();
        let mut web3 = pod("shop", "web-3", Some("10.0.0.13"), &[("app", "web")]);
        web3.annotations = map(&[(INJECT_ANNOTATION, "disabled")]);
        let web_old = pod("shop", "web-old", None, &[("app", "web")]);
        let api = pod("shop", "api-1", Some("10.0.0.20"), &[("app", "api")]);
        let other = pod("other", "web-x", Some("10.0.1.5"), &[("app", "web")]);
        state(
            vec![
                namespace("shop", &[(INJECT_ANNOTATION, "enabled")]),
                namespace("other", &[]),
            ],
            vec![web1, web2, web3, web_old, api, other],
            vec![
                service(
                    "shop",
                    "web",
                    Some("10.96.0.10"),
                    &[("app", "web")],
                    vec![
                        port(80, TargetPort::Number(8080)),
                        port(81, TargetPort::Name("http".into())),
                    ],
                ),
                service(
                    "shop",
                    "db",
                    None,
                    &[("app", "db")],
                    vec![port(5432, TargetPort::Number(5432))],
                ),
                service(
                    "shop",
                    "nothing",
                    Some("10.96.0.11"),
                    &[("app", "none")],
                    vec![port(80, TargetPort::Number(80))],
                ),
                service(
                    "shop",
                    "manual",
                    Some("10.96.0.12"),
                    &[],
                    vec![port(80, TargetPort::Number(80))],
                ),
            ],
        )
    }

    #[test]
    fn service_with_numeric_target_port() {
        let state = shop();
        let destination = state.resolve(addr("10.96.0.10:80"), TD);
        assert!(destination.known);
        assert_eq!(destination.service.as_deref(), Some("web.shop"));
        assert!(!destination.opaque);
        // Sorted by address; web-old (no IP), api-1 (labels) and other/web-x (namespace) excluded.
        assert_eq!(
            endpoint_addrs(&destination),
            vec![
                addr("10.0.0.11:8080"),
                addr("10.0.0.12:8080"),
                addr("10.0.0.13:8080")
            ]
        );
        let web1 = &destination.endpoints[1];
        assert_eq!(web1.identity, Some(id("shop", "web")));
        assert_eq!(
            web1.labels,
            map(&[
                ("namespace", "shop"),
                ("pod", "web-1"),
                ("serviceaccount", "web")
            ])
        );
    }

    #[test]
    fn unmeshed_endpoint_has_no_identity() {
        let destination = shop().resolve(addr("10.96.0.10:80"), TD);
        let web3 = &destination.endpoints[2];
        assert_eq!(web3.labels.get("pod").map(String::as_str), Some("web-3"));
        assert_eq!(web3.identity, None);
    }

    #[test]
    fn service_with_named_target_port_skips_pods_without_it() {
        let destination = shop().resolve(addr("10.96.0.10:81"), TD);
        assert!(destination.known);
        assert_eq!(
            endpoint_addrs(&destination),
            vec![addr("10.0.0.11:8081"), addr("10.0.0.12:8080")]
        );
    }

    #[test]
    fn service_ip_on_an_undeclared_port_is_unknown() {
        let destination = shop().resolve(addr("10.96.0.10:82"), TD);
        assert!(!destination.known);
        assert!(destination.endpoints.is_empty());
    }

    #[test]
    fn selector_mismatch_and_empty_selector_give_no_endpoints() {
        let state = shop();
        for target in ["10.96.0.11:80", "10.96.0.12:80"] {
            let destination = state.resolve(addr(target), TD);
            assert!(destination.known, "{target}");
            assert!(destination.service.is_some(), "{target}");
            assert!(destination.endpoints.is_empty(), "{target}");
        }
    }

    #[test]
    fn headless_service_is_reached_by_pod_ip_only() {
        let mut state = shop();
        state.pods.insert(
            ("shop".into(), "db-0".into()),
            pod("shop", "db-0", Some("10.0.0.30"), &[("app", "db")]),
        );
        let destination = state.resolve(addr("10.0.0.30:5432"), TD);
        assert!(destination.known);
        assert_eq!(destination.service, None);
        assert_eq!(endpoint_addrs(&destination), vec![addr("10.0.0.30:5432")]);
        assert!(destination.opaque, "5432 is opaque by default");
        assert_eq!(
            destination.endpoints[0].identity,
            Some(id("shop", "default"))
        );
    }

    #[test]
    fn pod_ip_on_any_port() {
        let state = shop();
        let destination = state.resolve(addr("10.0.1.5:1234"), TD);
        assert!(destination.known);
        assert_eq!(endpoint_addrs(&destination), vec![addr("10.0.1.5:1234")]);
        assert_eq!(
            destination.endpoints[0].identity, None,
            "namespace other is not injected"
        );
    }

    #[test]
    fn unknown_address() {
        let destination = shop().resolve(addr("192.0.2.1:80"), TD);
        assert_eq!(
            destination,
            Destination {
                known: false,
                service: None,
                opaque: false,
                endpoints: vec![],
                routes: vec![]
            }
        );
        assert!(shop().resolve(addr("192.0.2.1:3306"), TD).opaque);
    }

    #[test]
    fn opaque_defaults() {
        let state = shop();
        for port in DEFAULT_OPAQUE_PORTS {
            assert!(
                state
                    .resolve(SocketAddr::new("10.0.0.20".parse().unwrap(), port), TD)
                    .opaque,
                "{port}"
            );
        }
        assert!(!state.resolve(addr("10.0.0.20:8080"), TD).opaque);
    }

    #[test]
    fn opaque_from_service_annotation_ranges() {
        let mut state = shop();
        let web = state
            .services
            .get_mut(&("shop".into(), "web".into()))
            .unwrap();
        web.annotations = map(&[(OPAQUE_PORTS_ANNOTATION, "5432, 70-81")]);
        web.ports.push(port(82, TargetPort::Number(8080)));
        web.ports
            .iter_mut()
            .enumerate()
            .for_each(|(i, p)| p.name = Some(format!("p{i}")));
        assert!(state.resolve(addr("10.96.0.10:80"), TD).opaque);
        assert!(state.resolve(addr("10.96.0.10:81"), TD).opaque);
        assert!(!state.resolve(addr("10.96.0.10:82"), TD).opaque);
    }

    #[test]
    fn opaque_from_pod_annotation() {
        let mut state = shop();
        let api = state
            .pods
            .get_mut(&("shop".into(), "api-1".into()))
            .unwrap();
        api.annotations = map(&[(OPAQUE_PORTS_ANNOTATION, "6000-6010")]);
        assert!(state.resolve(addr("10.0.0.20:6005"), TD).opaque);
        assert!(!state.resolve(addr("10.0.0.20:6011"), TD).opaque);

        // For a service, the pod's annotation speaks about its own (target) port.
        let web1 = state
            .pods
            .get_mut(&("shop".into(), "web-1".into()))
            .unwrap();
        web1.annotations = map(&[(OPAQUE_PORTS_ANNOTATION, "8080")]);
        assert!(state.resolve(addr("10.96.0.10:80"), TD).opaque);
    }

    #[test]
    fn port_ranges_parse() {
        let ranges = PortRanges::parse(" 5432,6000-6010 ,").unwrap();
        assert!(ranges.contains(5432));
        assert!(ranges.contains(6000) && ranges.contains(6010));
        assert!(!ranges.contains(6011) && !ranges.contains(5433));
        assert!(!PortRanges::parse("").unwrap().contains(1));
        for bad in ["0", "65536", "10-5", "abc", "+80", "1-2-3", "80-"] {
            assert!(PortRanges::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn meshed_rules() {
        let ns_enabled = state(
            vec![
                namespace("a", &[(INJECT_ANNOTATION, "enabled")]),
                namespace("b", &[]),
            ],
            vec![],
            vec![],
        );
        let with = |ns: &str, value: Option<&str>| {
            let mut p = pod(ns, "p", None, &[]);
            if let Some(value) = value {
                p.annotations.insert(INJECT_ANNOTATION.into(), value.into());
            }
            p
        };
        assert!(ns_enabled.is_meshed(&with("a", None)));
        assert!(ns_enabled.is_meshed(&with("a", Some("enabled"))));
        assert!(!ns_enabled.is_meshed(&with("a", Some("disabled"))));
        assert!(ns_enabled.is_meshed(&with("a", Some("something-else"))));
        assert!(!ns_enabled.is_meshed(&with("b", None)));
        assert!(ns_enabled.is_meshed(&with("b", Some("enabled"))));
        assert!(!ns_enabled.is_meshed(&with("missing-ns", None)));
        assert!(ns_enabled.is_meshed(&with("missing-ns", Some("enabled"))));
    }

    #[test]
    fn identity_of_needs_valid_names() {
        let state = ClusterState::default();
        let mut p = pod("shop", "p", None, &[]);
        p.service_account = "api".into();
        assert_eq!(state.identity_of(&p, TD), Some(id("shop", "api")));
        p.service_account = "Not_Valid".into();
        assert_eq!(state.identity_of(&p, TD), None);
    }

    fn sha256_hex(token: &[u8]) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, token))
    }

    fn with_token(mut p: Pod, sa: &str, digest: &str) -> Pod {
        p.service_account = sa.into();
        p.annotations
            .insert(TOKEN_SHA256_ANNOTATION.into(), digest.into());
        p
    }

    #[test]
    fn token_matches_its_pod() {
        let state = state(
            vec![],
            vec![
                with_token(
                    pod("shop", "web-1", None, &[]),
                    "web",
                    &sha256_hex(b"web-token"),
                ),
                with_token(
                    pod("shop", "api-1", None, &[]),
                    "api",
                    &sha256_hex(b"api-token"),
                ),
                pod("shop", "plain", None, &[]),
            ],
            vec![],
        );
        assert_eq!(
            state.identity_for_token(b"web-token", TD),
            Ok(id("shop", "web"))
        );
        assert_eq!(
            state.identity_for_token(b"api-token", TD),
            Ok(id("shop", "api"))
        );
        assert_eq!(
            state.identity_for_token(b"guess", TD),
            Err(TokenError::Unknown)
        );
        assert_eq!(state.identity_for_token(b"", TD), Err(TokenError::Unknown));
    }

    #[test]
    fn uppercase_digest_annotation_is_accepted() {
        let state = state(
            vec![],
            vec![with_token(
                pod("shop", "web-1", None, &[]),
                "web",
                &sha256_hex(b"t").to_uppercase(),
            )],
            vec![],
        );
        assert_eq!(state.identity_for_token(b"t", TD), Ok(id("shop", "web")));
    }

    #[test]
    fn shared_token_is_fine_for_one_identity_and_ambiguous_for_two() {
        let digest = sha256_hex(b"shared");
        let same = state(
            vec![],
            vec![
                with_token(pod("shop", "web-1", None, &[]), "web", &digest),
                with_token(pod("shop", "web-2", None, &[]), "web", &digest),
            ],
            vec![],
        );
        assert_eq!(
            same.identity_for_token(b"shared", TD),
            Ok(id("shop", "web"))
        );

        let different = state(
            vec![],
            vec![
                with_token(pod("shop", "web-1", None, &[]), "web", &digest),
                with_token(pod("shop", "api-1", None, &[]), "api", &digest),
            ],
            vec![],
        );
        assert_eq!(
            different.identity_for_token(b"shared", TD),
            Err(TokenError::Ambiguous)
        );
    }

    #[test]
    fn validation_rejects_what_kubernetes_would() {
        let mut p = pod("shop", "web-1", None, &[]);
        assert!(p.validate().is_ok());
        p.annotations
            .insert(TOKEN_SHA256_ANNOTATION.into(), "abc".into());
        assert!(p.validate().is_err());
        p.annotations
            .insert(TOKEN_SHA256_ANNOTATION.into(), sha256_hex(b"x"));
        assert!(p.validate().is_ok());
        p.labels.insert("app".into(), "has space".into());
        assert!(p.validate().is_err());

        let mut svc = service(
            "shop",
            "web",
            None,
            &[],
            vec![port(80, TargetPort::Name("http".into()))],
        );
        assert!(svc.validate().is_ok());
        svc.ports.push(port(80, TargetPort::Number(8080)));
        assert!(svc.validate().is_err(), "two unnamed ports, same number");
        svc.ports[0].name = Some("a".into());
        svc.ports[1].name = Some("b".into());
        assert!(svc.validate().is_err(), "same number twice");
        svc.ports[1].port = 81;
        assert!(svc.validate().is_ok());
        svc.ports[0].target_port = TargetPort::Name("not_a_name".into());
        assert!(svc.validate().is_err());
        svc.ports[0].target_port = TargetPort::Number(0);
        assert!(svc.validate().is_err());

        assert!(namespace("Shop", &[]).validate().is_err());
        assert!(service("shop", "9web", None, &[], vec![])
            .validate()
            .is_err());
    }
}
