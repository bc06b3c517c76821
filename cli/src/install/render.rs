//! The Kubernetes objects of a weft install, built as data. `charts/weft/templates` renders
//! the same set with the same fields (tests/tests/kube_install.rs compares them); change
//! both together.

use base64::Engine;
use serde_json::{json, Value};

use super::pki::{IdentityPem, WebhookTls};

include!(concat!(env!("OUT_DIR"), "/chart_files.rs"));

pub const CONTROL: &str = "weft-control";
pub const INJECTOR: &str = "weft-injector";
pub const IDENTITY_SECRET: &str = "weft-identity";
pub const TRUST_ANCHORS_CONFIGMAP: &str = "weft-trust-anchors";
pub const INJECTOR_TLS_SECRET: &str = "weft-injector-tls";
pub const WEBHOOK_CONFIG: &str = "weft-injector";
pub const WEBHOOK_NAME: &str = "inject.weft.io";
pub const DASHBOARDS_CONFIGMAP: &str = "weft-grafana-dashboards";
pub const SCRAPE_CONFIGMAP: &str = "weft-prometheus-scrape-config";
pub const SCRAPE_CONFIG_KEY: &str = "weft-proxies.yaml";
pub const POD_MONITOR: &str = "weft-proxies";
pub const CONTROL_PORT: u16 = 7150;
pub const INJECTOR_PORT: u16 = 8443;
pub const PROXY_ADMIN_PORT: u16 = 7191;
/// The label (on a namespace or a pod) that keeps the webhook away from it.
pub const WEBHOOK_OPT_OUT_LABEL: &str = "weft.io/admission-webhooks";
/// Namespaces the webhook never sees, besides weft's own.
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];
/// The names of the CRDs the control plane watches.
pub const CRD_NAMES: &[&str] = &[
    "trafficsplits.split.smi-spec.io",
    "httproutes.gateway.networking.k8s.io",
    "authorizationpolicies.policy.weft.io",
];
/// Files mounted from Secret weft-identity and ConfigMap weft-trust-anchors.
pub const IDENTITY_DIR: &str = "/var/run/weft/identity";
const INJECTOR_TLS_DIR: &str = "/var/run/weft/injector";
/// The non-root user weft's images run as.
const RUN_AS: u32 = 65532;
/// `0440`: readable by the owner and the pod's fsGroup.
const SECRET_FILE_MODE: u32 = 0o440;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "PascalCase")]
pub enum FailurePolicy {
    #[value(alias = "fail")]
    Fail,
    #[value(alias = "ignore")]
    Ignore,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Fail => "Fail",
            FailurePolicy::Ignore => "Ignore",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crds {
    Include,
    Skip,
    Only,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    pub trust_domain: String,
    pub registry: String,
    pub version: String,
    pub failure_policy: FailurePolicy,
    pub pod_monitor: bool,
    pub crds: Crds,
}

/// Certificates that go into the objects.
#[derive(Debug)]
pub struct Material {
    pub identity: IdentityPem,
    pub webhook: WebhookTls,
}

/// The DNS names the API server may use for the injector Service (it dials
/// `<svc>.<ns>.svc`).
pub fn injector_dns_names(namespace: &str) -> Vec<String> {
    vec![
        format!("{INJECTOR}.{namespace}.svc"),
        format!("{INJECTOR}.{namespace}.svc.cluster.local"),
        format!("{INJECTOR}.{namespace}"),
        INJECTOR.to_string(),
    ]
}

/// Every object, in an order `kubectl apply` can create them in.
pub fn render(s: &Settings, m: &Material) -> Result<Vec<Value>, serde_yaml_ng::Error> {
    let mut objects = Vec::new();
    if s.crds != Crds::Skip {
        for (_, text) in CHART_CRDS {
            objects.push(serde_yaml_ng::from_str::<Value>(text)?);
        }
    }
    if s.crds == Crds::Only {
        return Ok(objects);
    }
    let ns = s.namespace.as_str();
    let mut rest = vec![
        namespace(ns),
        service_account(ns, CONTROL),
        service_account(ns, INJECTOR),
        control_cluster_role(),
        cluster_role_binding(ns, CONTROL),
        injector_cluster_role(),
        cluster_role_binding(ns, INJECTOR),
        identity_secret(ns, &m.identity),
        trust_anchors_configmap(ns, &m.identity),
        injector_tls_secret(ns, &m.webhook),
        control_service(ns),
        control_deployment(s),
        injector_service(ns),
        injector_deployment(s),
        webhook_configuration(s, &m.webhook),
        dashboards_configmap(ns),
        scrape_configmap(ns)?,
    ];
    if s.pod_monitor {
        rest.push(pod_monitor(ns));
    }
    // The namespace goes first so that everything in it can be created in one apply.
    objects.splice(0..0, rest.drain(..1));
    objects.extend(rest);
    Ok(objects)
}

/// Multi-document YAML.
pub fn to_yaml(objects: &[Value]) -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(object)?);
    }
    Ok(out)
}

fn labels(component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": "weft",
    })
}

fn meta(ns: &str, name: &str, component: &str) -> Value {
    json!({"name": name, "namespace": ns, "labels": labels(component)})
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn namespace(ns: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": ns,
            // Redundant with the webhook's namespace selector, and what a user would look
            // for: weft's own pods are never injected.
            "labels": {"app.kubernetes.io/part-of": "weft", WEBHOOK_OPT_OUT_LABEL: "disabled"},
        },
    })
}

fn service_account(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(ns, name, name)})
}

fn cluster_meta(name: &str) -> Value {
    json!({"name": name, "labels": labels(name)})
}

fn control_cluster_role() -> Value {
    let crd_groups = [
        "split.smi-spec.io",
        "gateway.networking.k8s.io",
        "policy.weft.io",
    ];
    let crd_resources = ["trafficsplits", "httproutes", "authorizationpolicies"];
    let statuses: Vec<String> = crd_resources
        .iter()
        .map(|r| format!("{r}/status"))
        .collect();
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": cluster_meta(CONTROL),
        "rules": [
            {"apiGroups": [""], "resources": ["namespaces", "pods", "services"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": crd_groups, "resources": crd_resources,
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": crd_groups, "resources": statuses, "verbs": ["patch"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
             "verbs": ["create"]},
        ],
    })
}

fn injector_cluster_role() -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": cluster_meta(INJECTOR),
        "rules": [
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]},
        ],
    })
}

fn cluster_role_binding(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": cluster_meta(name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
    })
}

fn identity_secret(ns: &str, identity: &IdentityPem) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(ns, IDENTITY_SECRET, CONTROL),
        "type": "Opaque",
        "data": {
            "issuer.pem": b64(&identity.issuer_pem),
            "issuer-key.pem": b64(&identity.issuer_key_pem),
        },
    })
}

fn trust_anchors_configmap(ns: &str, identity: &IdentityPem) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(ns, TRUST_ANCHORS_CONFIGMAP, CONTROL),
        "data": {"trust-anchors.pem": identity.trust_anchors_pem},
    })
}

fn injector_tls_secret(ns: &str, tls: &WebhookTls) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(ns, INJECTOR_TLS_SECRET, INJECTOR),
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": b64(&tls.cert_pem),
            "tls.key": b64(&tls.key_pem),
            "ca.crt": b64(&tls.ca_pem),
        },
    })
}

fn control_service(ns: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(ns, CONTROL, CONTROL),
        "spec": {
            "selector": labels(CONTROL),
            "ports": [{"name": "grpc", "port": CONTROL_PORT, "targetPort": "grpc", "protocol": "TCP"}],
        },
    })
}

fn injector_service(ns: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(ns, INJECTOR, INJECTOR),
        "spec": {
            "selector": labels(INJECTOR),
            "ports": [{"name": "https", "port": 443, "targetPort": "webhook", "protocol": "TCP"}],
        },
    })
}

fn pod_security_context() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn container_security_context() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

fn tcp_probe(port: &str, period: u32, failures: u32) -> Value {
    json!({"tcpSocket": {"port": port}, "periodSeconds": period, "failureThreshold": failures})
}

#[allow(clippy::too_many_arguments)]
fn deployment(
    s: &Settings,
    name: &str,
    args: Vec<String>,
    env: Value,
    port: (&str, u16),
    mounts: Value,
    volumes: Value,
) -> Value {
    let ns = s.namespace.as_str();
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(ns, name, name),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels(name)},
            "template": {
                "metadata": {"labels": labels(name)},
                "spec": {
                    "serviceAccountName": name,
                    "securityContext": pod_security_context(),
                    "containers": [{
                        "name": name,
                        "image": format!("{}/{name}:{}", s.registry, s.version),
                        "imagePullPolicy": "IfNotPresent",
                        "command": [name],
                        "args": args,
                        "env": env,
                        "ports": [{"name": port.0, "containerPort": port.1, "protocol": "TCP"}],
                        "readinessProbe": tcp_probe(port.0, 5, 3),
                        "livenessProbe": tcp_probe(port.0, 10, 6),
                        "resources": {
                            "requests": {"cpu": "50m", "memory": "64Mi"},
                            "limits": {"memory": "256Mi"},
                        },
                        "securityContext": container_security_context(),
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    })
}

fn control_deployment(s: &Settings) -> Value {
    let args = [
        "--source",
        "kube",
        "--identity",
        IDENTITY_DIR,
        "--listen",
        &format!("0.0.0.0:{CONTROL_PORT}"),
    ]
    .map(str::to_string)
    .to_vec();
    deployment(
        s,
        CONTROL,
        args,
        json!([
            {"name": "WEFT_TRUST_DOMAIN", "value": s.trust_domain},
            {"name": "WEFT_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ]),
        ("grpc", CONTROL_PORT),
        json!([{"name": "identity", "mountPath": IDENTITY_DIR, "readOnly": true}]),
        json!([{
            "name": "identity",
            "projected": {
                "defaultMode": SECRET_FILE_MODE,
                "sources": [
                    {"secret": {"name": IDENTITY_SECRET, "items": [
                        {"key": "issuer.pem", "path": "issuer.pem"},
                        {"key": "issuer-key.pem", "path": "issuer-key.pem"},
                    ]}},
                    {"configMap": {"name": TRUST_ANCHORS_CONFIGMAP, "items": [
                        {"key": "trust-anchors.pem", "path": "trust-anchors.pem"},
                    ]}},
                ],
            },
        }]),
    )
}

/// The injector's command line (the Helm chart renders the same).
pub fn injector_args(s: &Settings) -> Vec<String> {
    let ns = &s.namespace;
    vec![
        "--listen".into(),
        format!("0.0.0.0:{INJECTOR_PORT}"),
        "--tls-cert".into(),
        format!("{INJECTOR_TLS_DIR}/tls.crt"),
        "--tls-key".into(),
        format!("{INJECTOR_TLS_DIR}/tls.key"),
        "--proxy-image".into(),
        format!("{}/weft-proxy:{}", s.registry, s.version),
        "--control-addr".into(),
        format!("{CONTROL}.{ns}.svc.cluster.local:{CONTROL_PORT}"),
        "--control-namespace".into(),
        ns.clone(),
        "--trust-domain".into(),
        s.trust_domain.clone(),
        "--trust-anchors".into(),
        format!("{IDENTITY_DIR}/trust-anchors.pem"),
    ]
}

fn injector_deployment(s: &Settings) -> Value {
    deployment(
        s,
        INJECTOR,
        injector_args(s),
        json!([]),
        ("webhook", INJECTOR_PORT),
        json!([
            {"name": "tls", "mountPath": INJECTOR_TLS_DIR, "readOnly": true},
            {"name": "trust-anchors", "mountPath": IDENTITY_DIR, "readOnly": true},
        ]),
        json!([
            {"name": "tls", "secret": {
                "secretName": INJECTOR_TLS_SECRET,
                "defaultMode": SECRET_FILE_MODE,
                "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}],
            }},
            {"name": "trust-anchors", "configMap": {
                "name": TRUST_ANCHORS_CONFIGMAP,
                "items": [{"key": "trust-anchors.pem", "path": "trust-anchors.pem"}],
            }},
        ]),
    )
}

fn webhook_configuration(s: &Settings, tls: &WebhookTls) -> Value {
    let ns = s.namespace.as_str();
    let mut excluded: Vec<&str> = SYSTEM_NAMESPACES.to_vec();
    excluded.push(ns);
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": cluster_meta(WEBHOOK_CONFIG),
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "clientConfig": {
                "service": {"name": INJECTOR, "namespace": ns, "path": "/inject", "port": 443},
                "caBundle": b64(&tls.ca_pem),
            },
            "rules": [{
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": s.failure_policy.as_str(),
            "matchPolicy": "Equivalent",
            "reinvocationPolicy": "Never",
            "timeoutSeconds": 10,
            "namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded},
                {"key": WEBHOOK_OPT_OUT_LABEL, "operator": "NotIn", "values": ["disabled"]},
            ]},
            "objectSelector": {"matchExpressions": [
                {"key": WEBHOOK_OPT_OUT_LABEL, "operator": "NotIn", "values": ["disabled"]},
            ]},
        }],
    })
}

fn dashboards_configmap(ns: &str) -> Value {
    let data: serde_json::Map<String, Value> = CHART_DASHBOARDS
        .iter()
        .map(|(name, text)| (name.to_string(), Value::String(text.to_string())))
        .collect();
    let mut metadata = meta(ns, DASHBOARDS_CONFIGMAP, "weft-dashboards");
    metadata["labels"]["grafana_dashboard"] = json!("1");
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
}

/// The relabelings that give proxies' series the `namespace`, `pod` and `workload` labels
/// the dashboards group by. `workload` is the pod's `app.kubernetes.io/name` or `app`
/// label, else its controller's name with a ReplicaSet's hash cut off.
fn workload_relabelings(snake: bool) -> Vec<Value> {
    let rule = |source: &[&str], regex: &str, target: &str, replacement: &str| {
        if snake {
            json!({"source_labels": source, "regex": regex, "target_label": target,
                   "replacement": replacement, "action": "replace"})
        } else {
            json!({"sourceLabels": source, "regex": regex, "targetLabel": target,
                   "replacement": replacement, "action": "replace"})
        }
    };
    vec![
        rule(&["__meta_kubernetes_namespace"], "(.+)", "namespace", "$1"),
        rule(&["__meta_kubernetes_pod_name"], "(.+)", "pod", "$1"),
        rule(
            &["__meta_kubernetes_pod_controller_name"],
            "(.+)",
            "workload",
            "$1",
        ),
        rule(
            &[
                "__meta_kubernetes_pod_controller_kind",
                "__meta_kubernetes_pod_controller_name",
            ],
            "ReplicaSet;(.+)-[a-z0-9]+",
            "workload",
            "$1",
        ),
        rule(
            &["__meta_kubernetes_pod_label_app"],
            "(.+)",
            "workload",
            "$1",
        ),
        rule(
            &["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
            "(.+)",
            "workload",
            "$1",
        ),
    ]
}

/// A `scrape_configs` entry for Prometheus' Kubernetes pod discovery.
pub fn scrape_config() -> Value {
    let mut relabel = vec![
        json!({"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
               "regex": "true", "action": "keep"}),
        json!({"source_labels": ["__meta_kubernetes_pod_container_port_number"],
               "regex": PROXY_ADMIN_PORT.to_string(), "action": "keep"}),
    ];
    relabel.extend(workload_relabelings(true));
    json!([{
        "job_name": "weft-proxies",
        "metrics_path": "/metrics",
        "scheme": "http",
        "kubernetes_sd_configs": [{"role": "pod"}],
        "relabel_configs": relabel,
    }])
}

fn scrape_configmap(ns: &str) -> Result<Value, serde_yaml_ng::Error> {
    Ok(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(ns, SCRAPE_CONFIGMAP, "weft-prometheus"),
        "data": {SCRAPE_CONFIG_KEY: serde_yaml_ng::to_string(&scrape_config())?},
    }))
}

fn pod_monitor(ns: &str) -> Value {
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": meta(ns, POD_MONITOR, "weft-prometheus"),
        "spec": {
            // Every pod; only those with a `weft-admin` port (injected proxies) yield targets.
            "selector": {},
            "namespaceSelector": {"any": true},
            "podMetricsEndpoints": [{
                "port": "weft-admin",
                "path": "/metrics",
                "relabelings": workload_relabelings(false),
            }],
        },
    })
}
