//! Kubernetes-shaped YAML documents → validated model objects. Mirrors only the fields weft
//! reads; everything else in a manifest is ignored, as `kubectl apply` users expect.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::model::{
    ContainerPort, InvalidField, Namespace, Pod, Service, ServicePort, TargetPort,
    DEFAULT_SERVICE_ACCOUNT,
};

/// A model object read from a manifest.
#[derive(Debug, Clone)]
pub(crate) enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
}

impl Object {
    /// `Kind namespace/name`: also the identity used to find duplicates.
    pub(crate) fn describe(&self) -> String {
        match self {
            Object::Namespace(ns) => format!("Namespace {}", ns.name),
            Object::Pod(pod) => format!("Pod {}/{}", pod.namespace, pod.name),
            Object::Service(svc) => format!("Service {}/{}", svc.namespace, svc.name),
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

fn read_object(document: Value, location: &str, parsed: &mut ParsedFile) {
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
struct Container {
    ports: Option<Vec<ContainerPortManifest>>,
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
    for container in spec.and_then(|spec| spec.containers).unwrap_or_default() {
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
    };
    pod.validate()?;
    Ok(Object::Pod(pod))
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
- {apiVersion: split.smi-spec.io/v1alpha2, kind: TrafficSplit, metadata: {name: t}}
- {apiVersion: v1, kind: Pod, metadata: {name: p, namespace: shop}}
";
        let parsed = parse_documents(text).unwrap();
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        let names: Vec<_> = parsed.objects.iter().map(Object::describe).collect();
        assert_eq!(names, vec!["Namespace shop", "Pod shop/p"]);
    }

    #[test]
    fn yaml_syntax_error_fails_the_file() {
        assert!(
            parse_documents("apiVersion: v1\nkind: Pod\n---\nmetadata: {name: [unclosed\n")
                .is_err()
        );
    }
}
