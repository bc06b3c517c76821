//! Kubernetes-shaped YAML documents → validated model objects. Mirrors only the fields weft
//! reads; everything else in a manifest is ignored, as `kubectl apply` users expect.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::model::duration::parse_gateway_duration;
use crate::model::inbound::probe_request_path;
use crate::model::routes::{
    BackendRef, ParentRef, PathMatch, RouteMatch, RouteRetry, RouteRule, RouteTimeouts,
    SplitBackend, StringMatch, ValueMatch, DEFAULT_RETRY_ATTEMPTS, MAX_BACKEND_WEIGHT,
};
use crate::model::{
    AuthorizationPolicy, ClusterState, ContainerPort, HttpProbe, HttpRoute, InvalidField,
    Namespace, Pod, Service, ServicePort, TargetPort, TrafficSplit, DEFAULT_SERVICE_ACCOUNT,
};

mod authorization;

/// A model object read from a manifest.
#[derive(Debug, Clone)]
pub(crate) enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    TrafficSplit(TrafficSplit),
    HttpRoute(HttpRoute),
    AuthorizationPolicy(AuthorizationPolicy),
}

impl Object {
    /// `Kind namespace/name`: also the identity used to find duplicates.
    pub(crate) fn describe(&self) -> String {
        match self {
            Object::Namespace(ns) => format!("Namespace {}", ns.name),
            Object::Pod(pod) => format!("Pod {}/{}", pod.namespace, pod.name),
            Object::Service(svc) => format!("Service {}/{}", svc.namespace, svc.name),
            Object::TrafficSplit(split) => {
                format!("TrafficSplit {}/{}", split.namespace, split.name)
            }
            Object::HttpRoute(route) => format!("HTTPRoute {}/{}", route.namespace, route.name),
            Object::AuthorizationPolicy(policy) => {
                format!("AuthorizationPolicy {}/{}", policy.namespace, policy.name)
            }
        }
    }
}

impl Object {
    /// Adds the object to `state` under its kind, namespace and name (replacing one of the
    /// same identity): the one place both sources turn objects into a state.
    pub(crate) fn insert_into(self, state: &mut ClusterState) {
        match self {
            Object::Namespace(ns) => {
                state.namespaces.insert(ns.name.clone(), ns);
            }
            Object::Pod(pod) => {
                state
                    .pods
                    .insert((pod.namespace.clone(), pod.name.clone()), pod);
            }
            Object::Service(svc) => {
                state
                    .services
                    .insert((svc.namespace.clone(), svc.name.clone()), svc);
            }
            Object::TrafficSplit(split) => {
                state
                    .traffic_splits
                    .insert((split.namespace.clone(), split.name.clone()), split);
            }
            Object::HttpRoute(route) => {
                state
                    .http_routes
                    .insert((route.namespace.clone(), route.name.clone()), route);
            }
            Object::AuthorizationPolicy(policy) => {
                state
                    .authorization_policies
                    .insert((policy.namespace.clone(), policy.name.clone()), policy);
            }
        }
    }
}

/// An object in a file that was skipped.
#[derive(Debug, Clone)]
pub(crate) struct ObjectProblem {
    pub(crate) object: Option<String>,
    pub(crate) message: String,
}

#[derive(Debug, Default)]
pub(crate) struct ParsedFile {
    pub(crate) objects: Vec<Object>,
    pub(crate) problems: Vec<ObjectProblem>,
}

/// Parses every document of a (multi-document) YAML text. A YAML syntax error anywhere fails
/// the whole file, so that a half-written file never replaces its last good version.
pub(crate) fn parse_documents(text: &str) -> Result<ParsedFile, serde_yaml_ng::Error> {
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        documents.push(Value::deserialize(document)?);
    }
    let mut parsed = ParsedFile::default();
    for (index, document) in documents.into_iter().enumerate() {
        read_object(document, &format!("document {}", index + 1), &mut parsed);
    }
    Ok(parsed)
}

pub(crate) fn read_object(document: Value, location: &str, parsed: &mut ParsedFile) {
    let mut problem = |object: Option<String>, message: String| {
        parsed.problems.push(ObjectProblem {
            object,
            message: format!("{location}: {message}"),
        })
    };
    if document.is_null() {
        // An empty document (a trailing `---`, a file of comments) is not an object.
        return;
    }
    if !document.is_mapping() {
        problem(
            None,
            "not a Kubernetes object (expected a mapping)".to_owned(),
        );
        return;
    }
    let api_version = document
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = document
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api_version.is_empty() || kind.is_empty() {
        problem(
            None,
            "not a Kubernetes object (apiVersion and kind are required)".to_owned(),
        );
        return;
    }
    let name = metadata_str(&document, "name");
    let namespace = metadata_str(&document, "namespace")
        .filter(|ns| !ns.is_empty())
        .unwrap_or("default");
    let described = name.map(|name| match kind {
        "Namespace" => format!("{kind} {name}"),
        _ => format!("{kind} {namespace}/{name}"),
    });

    let converted = match (api_version, kind) {
        ("v1", "List") => {
            let items = match document.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                None | Some(Value::Null) => Vec::new(),
                Some(_) => {
                    problem(None, "List: items must be a sequence".to_owned());
                    return;
                }
            };
            for (index, item) in items.into_iter().enumerate() {
                read_object(item, &format!("{location} item {}", index + 1), parsed);
            }
            return;
        }
        ("v1", "Namespace") => decode::<NamespaceManifest>(document).and_then(namespace_from),
        ("v1", "Pod") => decode::<PodManifest>(document).and_then(pod_from),
        ("v1", "Service") => decode::<ServiceManifest>(document).and_then(service_from),
        ("split.smi-spec.io/v1alpha2", "TrafficSplit") => {
            decode::<TrafficSplitManifest>(document).and_then(traffic_split_from)
        }
        // v1beta1 has the same shape; clusters still serve it next to v1.
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
            decode::<HttpRouteManifest>(document).and_then(http_route_from)
        }
        ("policy.weft.io/v1alpha1", "AuthorizationPolicy") => {
            decode::<authorization::AuthorizationPolicyManifest>(document)
                .and_then(authorization::authorization_policy_from)
        }
        // Skipping a policy silently would leave open what its author meant to protect.
        (other, "AuthorizationPolicy") if other.starts_with("policy.weft.io/") => {
            Err(InvalidField::new(
                "apiVersion",
                format!("{other} is not served; use policy.weft.io/v1alpha1"),
            ))
        }
        // Kinds weft does not read (yet) are not errors: a scenario directory holds them too.
        _ => return,
    };
    match converted {
        Ok(object) => parsed.objects.push(object),
        Err(invalid) => problem(described, invalid.to_string()),
    }
}

fn metadata_str<'a>(document: &'a Value, field: &str) -> Option<&'a str> {
    document.get("metadata")?.get(field)?.as_str()
}

fn decode<T: serde::de::DeserializeOwned>(document: Value) -> Result<T, InvalidField> {
    serde_yaml_ng::from_value(document).map_err(|e| InvalidField::new("manifest", e.to_string()))
}

#[derive(Debug, Deserialize)]
struct ObjectMeta {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
struct NamespaceManifest {
    metadata: Option<ObjectMeta>,
}

#[derive(Debug, Deserialize)]
struct PodManifest {
    metadata: Option<ObjectMeta>,
    spec: Option<PodSpec>,
    status: Option<PodStatus>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    service_account_name: Option<String>,
    /// Deprecated alias of serviceAccountName that Kubernetes still honours.
    service_account: Option<String>,
    containers: Option<Vec<Container>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    ports: Option<Vec<ContainerPortManifest>>,
    liveness_probe: Option<ProbeManifest>,
    readiness_probe: Option<ProbeManifest>,
    startup_probe: Option<ProbeManifest>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProbeManifest {
    http_get: Option<HttpGetManifest>,
}

#[derive(Debug, Deserialize)]
struct HttpGetManifest {
    path: Option<String>,
    port: Option<IntOrString>,
    host: Option<String>,
    scheme: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPortManifest {
    name: Option<String>,
    container_port: Option<i64>,
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PodStatus {
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ServiceManifest {
    metadata: Option<ObjectMeta>,
    spec: Option<ServiceSpec>,
}

#[derive(Debug, Deserialize)]
struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    selector: Option<BTreeMap<String, String>>,
    ports: Option<Vec<ServicePortManifest>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortManifest {
    name: Option<String>,
    port: Option<i64>,
    target_port: Option<IntOrString>,
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    String(String),
}

struct Meta {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

fn meta_from(metadata: Option<ObjectMeta>) -> Result<Meta, InvalidField> {
    let metadata = metadata.ok_or_else(|| InvalidField::new("metadata", "is required"))?;
    let name = metadata
        .name
        .filter(|name| !name.is_empty())
        .ok_or_else(|| InvalidField::new("metadata.name", "is required"))?;
    Ok(Meta {
        name,
        namespace: metadata
            .namespace
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        labels: metadata.labels.unwrap_or_default(),
        annotations: metadata.annotations.unwrap_or_default(),
    })
}

fn namespace_from(manifest: NamespaceManifest) -> Result<Object, InvalidField> {
    let meta = meta_from(manifest.metadata)?;
    let namespace = Namespace {
        name: meta.name,
        annotations: meta.annotations,
    };
    namespace.validate()?;
    Ok(Object::Namespace(namespace))
}

fn pod_from(manifest: PodManifest) -> Result<Object, InvalidField> {
    let meta = meta_from(manifest.metadata)?;
    let spec = manifest.spec;
    let service_account = spec
        .as_ref()
        .and_then(|spec| {
            spec.service_account_name
                .clone()
                .or_else(|| spec.service_account.clone())
        })
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned());
    let ip = match manifest
        .status
        .and_then(|status| status.pod_ip)
        .filter(|ip| !ip.is_empty())
    {
        Some(text) => Some(parse_unicast_ip("status.podIP", &text)?),
        None => None,
    };
    let mut container_ports = Vec::new();
    let mut probes = Vec::new();
    for container in spec.and_then(|spec| spec.containers).unwrap_or_default() {
        for probe in [
            &container.liveness_probe,
            &container.readiness_probe,
            &container.startup_probe,
        ] {
            if let Some(http_get) = probe.as_ref().and_then(|probe| probe.http_get.as_ref()) {
                probes.extend(http_probe_from(http_get)?);
            }
        }
        for port in container.ports.unwrap_or_default() {
            let field = "spec.containers[].ports[].containerPort";
            let number = port
                .container_port
                .ok_or_else(|| InvalidField::new(field, "is required"))?;
            let number = port_number(field, number)?;
            if is_tcp(
                port.protocol.as_deref(),
                "spec.containers[].ports[].protocol",
            )? {
                container_ports.push(ContainerPort {
                    name: port.name.filter(|name| !name.is_empty()),
                    port: number,
                });
            }
        }
    }
    let pod = Pod {
        namespace: meta.namespace,
        name: meta.name,
        ip,
        service_account,
        labels: meta.labels,
        annotations: meta.annotations,
        container_ports,
        probes,
    };
    pod.validate()?;
    Ok(Object::Pod(pod))
}

/// `None` for probes the inbound proxy never sees in plaintext: HTTPS ones (the path is
/// inside TLS) and ones kubelet sends to another host.
fn http_probe_from(http_get: &HttpGetManifest) -> Result<Option<HttpProbe>, InvalidField> {
    let field = "spec.containers[].*Probe.httpGet.port";
    let port = match &http_get.port {
        None => return Err(InvalidField::new(field, "is required")),
        Some(IntOrString::Int(number)) => TargetPort::Number(port_number(field, *number)?),
        Some(IntOrString::String(text))
            if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) =>
        {
            TargetPort::Number(port_number(field, text.parse().unwrap_or(i64::MAX))?)
        }
        Some(IntOrString::String(name)) => TargetPort::Name(name.clone()),
    };
    let plaintext = match http_get.scheme.as_deref() {
        None | Some("HTTP") => true,
        Some("HTTPS") => false,
        Some(other) => {
            return Err(InvalidField::new(
                "spec.containers[].*Probe.httpGet.scheme",
                format!("{other:?} is not HTTP or HTTPS"),
            ))
        }
    };
    let own_host = http_get.host.as_deref().is_none_or(str::is_empty);
    if !plaintext || !own_host {
        return Ok(None);
    }
    Ok(Some(HttpProbe {
        path: probe_request_path(http_get.path.as_deref().unwrap_or("/")),
        port,
    }))
}

fn service_from(manifest: ServiceManifest) -> Result<Object, InvalidField> {
    let meta = meta_from(manifest.metadata)?;
    let spec = manifest
        .spec
        .ok_or_else(|| InvalidField::new("spec", "is required"))?;
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None,
        Some(text) => Some(parse_unicast_ip("spec.clusterIP", text)?),
    };
    let mut ports = Vec::new();
    for port in spec.ports.unwrap_or_default() {
        let number = port
            .port
            .ok_or_else(|| InvalidField::new("spec.ports[].port", "is required"))?;
        let number = port_number("spec.ports[].port", number)?;
        let target_port = match port.target_port {
            // Kubernetes defaults an absent or zero targetPort to the service port.
            None | Some(IntOrString::Int(0)) => TargetPort::Number(number),
            Some(IntOrString::Int(target)) => {
                TargetPort::Number(port_number("spec.ports[].targetPort", target)?)
            }
            // A quoted number is what the author meant, not a port name (names need a letter).
            Some(IntOrString::String(text))
                if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) =>
            {
                let target = text.parse::<i64>().map_err(|_| {
                    InvalidField::new(
                        "spec.ports[].targetPort",
                        format!("{text:?} is out of range"),
                    )
                })?;
                TargetPort::Number(port_number("spec.ports[].targetPort", target)?)
            }
            Some(IntOrString::String(name)) => TargetPort::Name(name),
        };
        if is_tcp(port.protocol.as_deref(), "spec.ports[].protocol")? {
            ports.push(ServicePort {
                name: port.name.filter(|name| !name.is_empty()),
                port: number,
                target_port,
            });
        }
    }
    let service = Service {
        namespace: meta.namespace,
        name: meta.name,
        cluster_ip,
        selector: spec.selector.unwrap_or_default(),
        ports,
        annotations: meta.annotations,
    };
    service.validate()?;
    Ok(Object::Service(service))
}

#[derive(Debug, Deserialize)]
struct TrafficSplitManifest {
    metadata: Option<ObjectMeta>,
    spec: Option<TrafficSplitSpec>,
}

#[derive(Debug, Deserialize)]
struct TrafficSplitSpec {
    service: Option<String>,
    backends: Option<Vec<TrafficSplitBackendManifest>>,
    matches: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct TrafficSplitBackendManifest {
    service: Option<String>,
    weight: Option<i64>,
}

fn traffic_split_from(manifest: TrafficSplitManifest) -> Result<Object, InvalidField> {
    let meta = meta_from(manifest.metadata)?;
    let spec = manifest
        .spec
        .ok_or_else(|| InvalidField::new("spec", "is required"))?;
    // Applying the split to all traffic would ignore what the author restricted it to.
    if spec.matches.is_some_and(|matches| !matches.is_empty()) {
        return Err(InvalidField::new(
            "spec.matches",
            "HTTPRouteGroup matches are not supported; use an HTTPRoute",
        ));
    }
    let mut backends = Vec::new();
    for (i, backend) in spec.backends.unwrap_or_default().into_iter().enumerate() {
        let field = format!("spec.backends[{i}]");
        let service = backend
            .service
            .ok_or_else(|| InvalidField::new(format!("{field}.service"), "is required"))?;
        let weight = backend
            .weight
            .ok_or_else(|| InvalidField::new(format!("{field}.weight"), "is required"))?;
        backends.push(SplitBackend {
            service,
            weight: weight_from(&format!("{field}.weight"), weight)?,
        });
    }
    let split = TrafficSplit {
        namespace: meta.namespace,
        name: meta.name,
        service: spec
            .service
            .ok_or_else(|| InvalidField::new("spec.service", "is required"))?,
        backends,
    };
    split.validate()?;
    Ok(Object::TrafficSplit(split))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpRouteManifest {
    metadata: Option<ObjectMeta>,
    spec: Option<HttpRouteSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpRouteSpec {
    parent_refs: Option<Vec<ParentRefManifest>>,
    rules: Option<Vec<RuleManifest>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ParentRefManifest {
    group: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    section_name: Option<String>,
    port: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuleManifest {
    matches: Option<Vec<MatchManifest>>,
    filters: Option<Vec<Value>>,
    backend_refs: Option<Vec<BackendRefManifest>>,
    timeouts: Option<TimeoutsManifest>,
    retry: Option<RetryManifest>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MatchManifest {
    path: Option<TypedValueManifest>,
    headers: Option<Vec<TypedValueManifest>>,
    query_params: Option<Vec<TypedValueManifest>>,
    method: Option<String>,
}

/// `{type, value}` path matches and `{type, name, value}` header/query matches.
#[derive(Debug, Deserialize)]
struct TypedValueManifest {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BackendRefManifest {
    group: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
    port: Option<i64>,
    weight: Option<i64>,
    filters: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeoutsManifest {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RetryManifest {
    codes: Option<Vec<i64>>,
    attempts: Option<i64>,
    backoff: Option<String>,
}

/// The core API group, as Gateway API references spell it.
fn is_core_group(group: Option<&str>) -> bool {
    matches!(group, Some("") | Some("core"))
}

/// Whether an HTTPRoute parentRef is weft's to serve (and to report status on). Gateway API
/// defaults a parentRef to a Gateway (group gateway.networking.k8s.io): only an explicit
/// core Service is a mesh parent. Parents in other namespaces (consumer routes) are not
/// supported and, like Gateway parents, not ours to judge.
pub(super) fn is_mesh_parent(
    kind: Option<&str>,
    group: Option<&str>,
    namespace: Option<&str>,
    route_namespace: &str,
) -> bool {
    kind == Some("Service")
        && is_core_group(group)
        && namespace.is_none_or(|ns| ns == route_namespace)
}

fn http_route_from(manifest: HttpRouteManifest) -> Result<Object, InvalidField> {
    let meta = meta_from(manifest.metadata)?;
    let spec = manifest
        .spec
        .ok_or_else(|| InvalidField::new("spec", "is required"))?;
    let mut parents = Vec::new();
    for (i, parent) in spec.parent_refs.unwrap_or_default().into_iter().enumerate() {
        if !is_mesh_parent(
            parent.kind.as_deref(),
            parent.group.as_deref(),
            parent.namespace.as_deref(),
            &meta.namespace,
        ) {
            continue;
        }
        let field = format!("spec.parentRefs[{i}]");
        parents.push(ParentRef {
            name: parent
                .name
                .ok_or_else(|| InvalidField::new(format!("{field}.name"), "is required"))?,
            port: parent
                .port
                .map(|port| port_number(&format!("{field}.port"), port))
                .transpose()?,
            section_name: parent.section_name,
        });
    }
    let rules = match spec.rules {
        Some(rules) => rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| rule_from(&format!("spec.rules[{i}]"), rule, &meta.namespace))
            .collect::<Result<Vec<_>, _>>()?,
        // Kubernetes' default: one rule matching everything, with no backend.
        None => vec![RouteRule {
            matches: vec![RouteMatch::everything()],
            backend_refs: Vec::new(),
            timeouts: RouteTimeouts::default(),
            retry: None,
        }],
    };
    let route = HttpRoute {
        namespace: meta.namespace,
        name: meta.name,
        annotations: meta.annotations,
        parents,
        rules,
    };
    route.validate()?;
    Ok(Object::HttpRoute(route))
}

fn rule_from(field: &str, rule: RuleManifest, namespace: &str) -> Result<RouteRule, InvalidField> {
    // A filter weft skipped would change what the author asked for (a redirect, a header):
    // refusing the route is the honest answer until filters are implemented.
    if rule.filters.is_some_and(|filters| !filters.is_empty()) {
        return Err(InvalidField::new(
            format!("{field}.filters"),
            "filters are not supported",
        ));
    }
    let matches = match rule.matches {
        Some(matches) if !matches.is_empty() => matches
            .into_iter()
            .enumerate()
            .map(|(i, m)| match_from(&format!("{field}.matches[{i}]"), m))
            .collect::<Result<Vec<_>, _>>()?,
        _ => vec![RouteMatch::everything()],
    };
    let mut backend_refs = Vec::new();
    for (i, backend) in rule
        .backend_refs
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let field = format!("{field}.backendRefs[{i}]");
        // Gateway API defaults a backendRef to a core Service.
        let group = backend.group.as_deref().unwrap_or("");
        let kind = backend.kind.as_deref().unwrap_or("Service");
        if !is_core_group(Some(group)) || kind != "Service" {
            return Err(InvalidField::new(
                format!("{field}.kind"),
                format!("{group}/{kind} backends are not supported (only core Services)"),
            ));
        }
        if backend.filters.is_some_and(|filters| !filters.is_empty()) {
            return Err(InvalidField::new(
                format!("{field}.filters"),
                "filters are not supported",
            ));
        }
        backend_refs.push(BackendRef {
            name: backend
                .name
                .ok_or_else(|| InvalidField::new(format!("{field}.name"), "is required"))?,
            namespace: backend
                .namespace
                .filter(|ns| !ns.is_empty())
                .unwrap_or_else(|| namespace.to_owned()),
            port: backend
                .port
                .map(|port| port_number(&format!("{field}.port"), port))
                .transpose()?,
            weight: weight_from(&format!("{field}.weight"), backend.weight.unwrap_or(1))?,
        });
    }
    let duration = |name: &str, text: Option<String>| {
        text.map(|text| {
            parse_gateway_duration(&text).map_err(|e| InvalidField::new(name, e.to_string()))
        })
        .transpose()
    };
    let timeouts = match rule.timeouts {
        Some(timeouts) => RouteTimeouts {
            request: duration(&format!("{field}.timeouts.request"), timeouts.request)?,
            backend_request: duration(
                &format!("{field}.timeouts.backendRequest"),
                timeouts.backend_request,
            )?,
        },
        None => RouteTimeouts::default(),
    };
    let retry = match rule.retry {
        Some(retry) => {
            let attempts = match retry.attempts {
                None => DEFAULT_RETRY_ATTEMPTS,
                Some(attempts) => u32::try_from(attempts).map_err(|_| {
                    InvalidField::new(
                        format!("{field}.retry.attempts"),
                        format!("{attempts} is not a number of retries"),
                    )
                })?,
            };
            let mut codes = Vec::new();
            for code in retry.codes.unwrap_or_default() {
                codes.push(u16::try_from(code).map_err(|_| {
                    InvalidField::new(
                        format!("{field}.retry.codes"),
                        format!("{code} is not a status code in 400-599"),
                    )
                })?);
            }
            Some(RouteRetry {
                codes,
                attempts,
                backoff: duration(&format!("{field}.retry.backoff"), retry.backoff)?,
            })
        }
        None => None,
    };
    Ok(RouteRule {
        matches,
        backend_refs,
        timeouts,
        retry,
    })
}

fn match_from(field: &str, manifest: MatchManifest) -> Result<RouteMatch, InvalidField> {
    let path = match manifest.path {
        None => PathMatch::Prefix("/".to_owned()),
        Some(path) => {
            let value = path.value.unwrap_or_else(|| "/".to_owned());
            match path.kind.as_deref().unwrap_or("PathPrefix") {
                "Exact" => PathMatch::Exact(value),
                "PathPrefix" => PathMatch::Prefix(value),
                "RegularExpression" => PathMatch::Regex(value),
                other => {
                    return Err(InvalidField::new(
                        format!("{field}.path.type"),
                        format!("{other:?} is not Exact, PathPrefix or RegularExpression"),
                    ))
                }
            }
        }
    };
    let value_matches = |list: &str, items: Option<Vec<TypedValueManifest>>| {
        items
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, item)| value_match_from(&format!("{field}.{list}[{i}]"), item))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(RouteMatch {
        path,
        headers: value_matches("headers", manifest.headers)?,
        query_params: value_matches("queryParams", manifest.query_params)?,
        method: manifest.method,
    })
}

fn value_match_from(field: &str, manifest: TypedValueManifest) -> Result<ValueMatch, InvalidField> {
    let name = manifest
        .name
        .ok_or_else(|| InvalidField::new(format!("{field}.name"), "is required"))?;
    let value = manifest
        .value
        .ok_or_else(|| InvalidField::new(format!("{field}.value"), "is required"))?;
    let value = match manifest.kind.as_deref().unwrap_or("Exact") {
        "Exact" => StringMatch::Exact(value),
        "RegularExpression" => StringMatch::Regex(value),
        other => {
            return Err(InvalidField::new(
                format!("{field}.type"),
                format!("{other:?} is not Exact or RegularExpression"),
            ))
        }
    };
    Ok(ValueMatch { name, value })
}

fn weight_from(field: &str, weight: i64) -> Result<u32, InvalidField> {
    u32::try_from(weight).map_err(|_| {
        InvalidField::new(
            field,
            format!("{weight} is not a weight in 0-{MAX_BACKEND_WEIGHT}"),
        )
    })
}

fn port_number(field: &str, number: i64) -> Result<u16, InvalidField> {
    u16::try_from(number)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| InvalidField::new(field, format!("{number} is not a port in 1-65535")))
}

/// weft proxies TCP only; UDP/SCTP ports are valid Kubernetes but invisible to the mesh.
fn is_tcp(protocol: Option<&str>, field: &str) -> Result<bool, InvalidField> {
    match protocol {
        None | Some("TCP") => Ok(true),
        Some("UDP") | Some("SCTP") => Ok(false),
        Some(other) => Err(InvalidField::new(
            field,
            format!("{other:?} is not TCP, UDP or SCTP"),
        )),
    }
}

fn parse_unicast_ip(field: &str, text: &str) -> Result<IpAddr, InvalidField> {
    let ip: IpAddr = text
        .parse()
        .map_err(|_| InvalidField::new(field, format!("{text:?} is not an IP address")))?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(InvalidField::new(
            field,
            format!("{ip} is not a unicast address"),
        ));
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(text: &str) -> Result<Object, String> {
        let parsed = parse_documents(text).map_err(|e| format!("yaml: {e}"))?;
        if let Some(problem) = parsed.problems.first() {
            return Err(problem.message.clone());
        }
        parsed
            .objects
            .into_iter()
            .next()
            .ok_or_else(|| "no object".to_owned())
    }

    #[test]
    fn pod_fields_and_defaults() {
        let text = "
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}, annotations: {weft.io/inject: enabled}}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}, {containerPort: 53, protocol: UDP}]
  - name: metrics
    ports: [{containerPort: 9090}]
status: {podIP: 10.1.0.7}
";
        let Ok(Object::Pod(pod)) = single(text) else {
            panic!("expected a pod: {:?}", single(text));
        };
        assert_eq!(pod.namespace, "default");
        assert_eq!(pod.service_account, "default");
        assert_eq!(pod.ip, Some("10.1.0.7".parse().unwrap()));
        assert_eq!(
            pod.container_ports,
            vec![
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080
                },
                ContainerPort {
                    name: None,
                    port: 9090
                }
            ]
        );
        assert_eq!(pod.labels.get("app").map(String::as_str), Some("web"));
    }

    #[test]
    fn service_target_ports() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: a, port: 80, targetPort: http}
  - {name: b, port: 81, targetPort: 8081}
  - {name: c, port: 82, targetPort: "8082"}
  - {name: d, port: 83}
"#;
        let Ok(Object::Service(svc)) = single(text) else {
            panic!("expected a service: {:?}", single(text));
        };
        let targets: Vec<_> = svc.ports.iter().map(|p| p.target_port.clone()).collect();
        assert_eq!(
            targets,
            vec![
                TargetPort::Name("http".into()),
                TargetPort::Number(8081),
                TargetPort::Number(8082),
                TargetPort::Number(83)
            ]
        );
        assert_eq!(svc.cluster_ip, Some("10.96.0.10".parse().unwrap()));
    }

    #[test]
    fn headless_service_has_no_cluster_ip() {
        let text = "{apiVersion: v1, kind: Service, metadata: {name: db}, spec: {clusterIP: None, ports: [{port: 5432}]}}";
        let Ok(Object::Service(svc)) = single(text) else {
            panic!("expected a service");
        };
        assert_eq!(svc.cluster_ip, None);
    }

    #[test]
    fn invalid_objects_are_reported_with_their_name() {
        let cases = [
            ("{apiVersion: v1, kind: Pod, metadata: {name: p}, status: {podIP: 10.0.0.300}}", "status.podIP"),
            ("{apiVersion: v1, kind: Pod, metadata: {name: p}, status: {podIP: 0.0.0.0}}", "unicast"),
            (
                "{apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{ports: [{containerPort: 0}]}]}}",
                "containerPort",
            ),
            (
                "{apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {containers: [{ports: [{containerPort: 70000}]}]}}",
                "70000",
            ),
            ("{apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: 0}]}}", "spec.ports[].port"),
            (
                "{apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: 80, targetPort: 65536}]}}",
                "targetPort",
            ),
            ("{apiVersion: v1, kind: Service, metadata: {name: s}, spec: {clusterIP: banana}}", "clusterIP"),
            ("{apiVersion: v1, kind: Pod, metadata: {name: Bad_Name}}", "metadata.name"),
            (
                "{apiVersion: v1, kind: Pod, metadata: {name: p, annotations: {config.weft.io/opaque-ports: '99999'}}}",
                "opaque-ports",
            ),
            ("{apiVersion: v1, kind: Pod, metadata: {name: p, labels: {app: 7}}}", "manifest"),
        ];
        for (text, needle) in cases {
            let parsed = parse_documents(text).unwrap();
            assert!(parsed.objects.is_empty(), "{text} was accepted");
            let problem = &parsed.problems[0];
            assert!(
                problem.message.contains(needle),
                "{text}: {}",
                problem.message
            );
            assert!(problem.object.is_some(), "{text}: object not named");
        }
    }

    #[test]
    fn unnamed_and_kindless_documents_are_reported() {
        let parsed = parse_documents(
            "---\n{apiVersion: v1, kind: Pod, metadata: {}}\n---\n[1, 2]\n---\nfoo: bar\n",
        )
        .unwrap();
        assert!(parsed.objects.is_empty());
        assert_eq!(parsed.problems.len(), 3, "{:?}", parsed.problems);
        assert!(parsed.problems[0]
            .message
            .contains("metadata.name: is required"));
        assert!(parsed.problems[1].message.starts_with("document 2"));
    }

    #[test]
    fn lists_and_other_kinds() {
        let text = "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
- {apiVersion: apps/v1, kind: Deployment, metadata: {name: d}}
- {apiVersion: split.smi-spec.io/v1alpha1, kind: TrafficSplit, metadata: {name: old}}
- {apiVersion: v1, kind: Pod, metadata: {name: p, namespace: shop}}
";
        let parsed = parse_documents(text).unwrap();
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        let names: Vec<_> = parsed.objects.iter().map(Object::describe).collect();
        assert_eq!(names, vec!["Namespace shop", "Pod shop/p"]);
    }

    #[test]
    fn http_route_fields_and_kubernetes_defaults() {
        let text = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web-routes
  namespace: shop
  annotations: {retry.weft.io/budget-percent: "10"}
spec:
  hostnames: [ignored.example]
  parentRefs:
  - {name: edge}                                          # a Gateway: not ours
  - {kind: Service, name: no-group}                        # group defaults to gateway.networking.k8s.io
  - {kind: Service, group: "", name: other-ns, namespace: other}
  - {kind: Service, group: "", name: web, port: 80}
  - {kind: Service, group: core, name: web-admin, sectionName: admin}
  rules:
  - matches:
    - path: {type: Exact, value: /login}
      method: POST
    - headers: [{name: x-canary, value: "yes"}, {type: RegularExpression, name: x-v, value: "v[0-9]"}]
      queryParams: [{name: debug, value: "1"}]
    - path: {type: RegularExpression, value: "/v[0-9]+/.*"}
    backendRefs:
    - {name: web-v2, port: 8080, weight: 3}
    - {name: web-v1, namespace: legacy}
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {codes: [503], attempts: 2, backoff: 100ms}
  - backendRefs: [{group: "", kind: Service, name: web-v1, weight: 0}]
    retry: {}
"#;
        let Ok(Object::HttpRoute(route)) = single(text) else {
            panic!("expected an HTTPRoute: {:?}", single(text));
        };
        assert_eq!(
            route.parents,
            vec![
                ParentRef {
                    name: "web".into(),
                    port: Some(80),
                    section_name: None
                },
                ParentRef {
                    name: "web-admin".into(),
                    port: None,
                    section_name: Some("admin".into())
                },
            ]
        );
        assert_eq!(route.rules.len(), 2);
        let first = &route.rules[0];
        assert_eq!(first.matches.len(), 3);
        assert_eq!(first.matches[0].path, PathMatch::Exact("/login".into()));
        assert_eq!(first.matches[0].method.as_deref(), Some("POST"));
        assert_eq!(first.matches[1].path, PathMatch::Prefix("/".into()));
        assert_eq!(
            first.matches[1].headers,
            vec![
                ValueMatch {
                    name: "x-canary".into(),
                    value: StringMatch::Exact("yes".into())
                },
                ValueMatch {
                    name: "x-v".into(),
                    value: StringMatch::Regex("v[0-9]".into())
                },
            ]
        );
        assert_eq!(first.matches[1].query_params.len(), 1);
        assert_eq!(
            first.matches[2].path,
            PathMatch::Regex("/v[0-9]+/.*".into())
        );
        assert_eq!(
            first.backend_refs,
            vec![
                BackendRef {
                    name: "web-v2".into(),
                    namespace: "shop".into(),
                    port: Some(8080),
                    weight: 3
                },
                BackendRef {
                    name: "web-v1".into(),
                    namespace: "legacy".into(),
                    port: None,
                    weight: 1
                },
            ]
        );
        assert_eq!(
            first.timeouts,
            RouteTimeouts {
                request: Some(std::time::Duration::from_secs(2)),
                backend_request: Some(std::time::Duration::from_millis(500)),
            }
        );
        assert_eq!(
            first.retry,
            Some(RouteRetry {
                codes: vec![503],
                attempts: 2,
                backoff: Some(std::time::Duration::from_millis(100)),
            })
        );
        let second = &route.rules[1];
        assert_eq!(second.matches, vec![RouteMatch::everything()]);
        assert_eq!(second.backend_refs[0].weight, 0);
        assert_eq!(
            second.retry,
            Some(RouteRetry {
                codes: vec![],
                attempts: DEFAULT_RETRY_ATTEMPTS,
                backoff: None,
            })
        );
        assert_eq!(route.retry_budget().map(|b| b.ratio), Ok(0.1));
    }

    #[test]
    fn http_route_without_rules_gets_the_default_rule() {
        let text = "{apiVersion: gateway.networking.k8s.io/v1beta1, kind: HTTPRoute, metadata: {name: r}, spec: {parentRefs: [{kind: Service, group: '', name: web}]}}";
        let Ok(Object::HttpRoute(route)) = single(text) else {
            panic!("expected an HTTPRoute: {:?}", single(text));
        };
        assert_eq!(route.namespace, "default");
        assert_eq!(route.rules.len(), 1);
        assert_eq!(route.rules[0].matches, vec![RouteMatch::everything()]);
        assert!(route.rules[0].backend_refs.is_empty());
    }

    #[test]
    fn traffic_split_fields() {
        let text = "
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: web-split, namespace: shop}
spec:
  service: web
  backends: [{service: web-v1, weight: 90}, {service: web-v2, weight: 10}]
";
        let Ok(Object::TrafficSplit(split)) = single(text) else {
            panic!("expected a TrafficSplit: {:?}", single(text));
        };
        assert_eq!(split.service, "web");
        assert_eq!(
            split.backends,
            vec![
                SplitBackend {
                    service: "web-v1".into(),
                    weight: 90
                },
                SplitBackend {
                    service: "web-v2".into(),
                    weight: 10
                },
            ]
        );
    }

    #[test]
    fn invalid_routes_and_splits_are_refused_whole() {
        let route = |spec: &str| {
            format!("{{apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {{name: r, namespace: shop}}, spec: {spec}}}")
        };
        let split = |spec: &str| {
            format!("{{apiVersion: split.smi-spec.io/v1alpha2, kind: TrafficSplit, metadata: {{name: s, namespace: shop}}, spec: {spec}}}")
        };
        let cases = [
            (route("{rules: [{filters: [{type: RequestRedirect}]}]}"), "filters"),
            (route("{rules: [{backendRefs: [{name: b, filters: [{type: RequestHeaderModifier}]}]}]}"), "filters"),
            (route("{rules: [{backendRefs: [{kind: ServiceImport, group: multicluster.x-k8s.io, name: b}]}]}"), "backendRefs[0].kind"),
            (route("{rules: [{backendRefs: [{name: b, weight: -1}]}]}"), "weight"),
            (route("{rules: [{backendRefs: [{name: b, port: 70000}]}]}"), "port"),
            (route("{rules: [{backendRefs: [{port: 80}]}]}"), "backendRefs[0].name"),
            (route("{rules: [{timeouts: {request: 1.5s}}]}"), "timeouts.request"),
            (route("{rules: [{timeouts: {request: 1s, backendRequest: 2s}}]}"), "backendRequest"),
            (route("{rules: [{retry: {attempts: 11}}]}"), "retry.attempts"),
            (route("{rules: [{retry: {attempts: -1}}]}"), "retry.attempts"),
            (route("{rules: [{retry: {codes: [70000]}}]}"), "retry.codes"),
            (route("{rules: [{retry: {codes: [200]}}]}"), "retry.codes"),
            (route("{rules: [{retry: {backoff: 1d}}]}"), "retry.backoff"),
            (route("{rules: [{matches: [{path: {type: Glob, value: /x}}]}]}"), "path.type"),
            (route("{rules: [{matches: [{path: {type: RegularExpression, value: '('}}]}]}"), "regular expression"),
            (route("{rules: [{matches: [{path: {value: no-slash}}]}]}"), "path.value"),
            (route("{rules: [{matches: [{headers: [{name: x, type: Prefix, value: a}]}]}]}"), "headers[0].type"),
            (route("{rules: [{matches: [{headers: [{name: x}]}]}]}"), "headers[0].value"),
            (route("{rules: [{matches: [{method: FETCH}]}]}"), "method"),
            (route("{parentRefs: [{kind: Service, group: '', name: web, port: 0}]}"), "parentRefs[0].port"),
            (route("{rules: [{matches: [{path: /x}]}]}"), "manifest"),
            ("{apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {name: r, annotations: {retry.weft.io/non-idempotent: 'yes'}}, spec: {}}".to_owned(), "non-idempotent"),
            ("{apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {name: r}}".to_owned(), "spec"),
            (split("{backends: [{service: a, weight: 1}]}"), "spec.service"),
            (split("{service: web, backends: [{service: a}]}"), "weight"),
            (split("{service: web, backends: [{service: a, weight: -5}]}"), "weight"),
            (split("{service: web, backends: []}"), "spec.backends"),
            (split("{service: web, backends: [{service: a, weight: 1}], matches: [{kind: HTTPRouteGroup, name: g}]}"), "spec.matches"),
        ];
        for (text, needle) in cases {
            let parsed = parse_documents(&text).unwrap();
            assert!(parsed.objects.is_empty(), "{text} was accepted");
            let problem = &parsed.problems[0];
            assert!(
                problem.message.contains(needle),
                "{text}: {}",
                problem.message
            );
            assert!(
                problem
                    .object
                    .as_deref()
                    .is_some_and(|o| o.starts_with("HTTPRoute ") || o.starts_with("TrafficSplit ")),
                "{text}: {:?}",
                problem.object
            );
        }
    }

    #[test]
    fn yaml_syntax_error_fails_the_file() {
        assert!(
            parse_documents("apiVersion: v1\nkind: Pod\n---\nmetadata: {name: [unclosed\n")
                .is_err()
        );
    }
}
