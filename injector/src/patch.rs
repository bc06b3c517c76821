//! The injection itself: the `weft-init` and `weft-proxy` containers, the identity token
//! volume and the status annotations, as an RFC 6902 patch against the pod (or pod
//! template) JSON.
//!
//! The patch is built as explicit `add` operations rather than diffed from a re-serialised
//! pod: a typed round trip would drop fields this build's k8s-openapi does not know, and the
//! diff would then remove them from the user's pod.
//!
//! Layout. `weft-init` is always the first init container: it installs the iptables rules,
//! so it must run before anything whose traffic should go through the proxy, and it needs no
//! proxy itself (it makes no connections). With the native-sidecar layout the proxy is the
//! second init container (`restartPolicy: Always`), ahead of the app's own init containers:
//! by then the rules are in place and their traffic is redirected, so the proxy must already
//! be listening (the kubelet waits for its startup probe before starting the next init
//! container). With the regular layout the proxy is the first app container with a
//! post-start hook (`weft-proxy wait-ready`); the kubelet starts containers in order and
//! holds the next one until the hook returns. The app's init containers then run before any
//! proxy exists, so their outbound TCP fails unless its ports are skipped — one more reason
//! the native layout is the default.

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, Probe, ProjectedVolumeSource,
    ResourceRequirements, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};

use crate::annotations::ProxyOverrides;
use crate::{
    ProxySettings, ADMIN_PORT, ADMIN_PORT_NAME, IDENTITY_AUDIENCE, IDENTITY_TOKEN_DIR,
    IDENTITY_TOKEN_FILE, IDENTITY_VOLUME, INBOUND_PORT, INIT_CONTAINER, INJECTED_ANNOTATION,
    OUTBOUND_PORT, PROXY_CONTAINER, PROXY_UID,
};

/// Prometheus scrape annotations added to injected pods (existing values are kept).
pub const SCRAPE_ANNOTATIONS: [(&str, &str); 3] = [
    ("prometheus.io/scrape", "true"),
    ("prometheus.io/port", "7191"),
    ("prometheus.io/path", "/metrics"),
];

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the pod has no spec.containers list")]
    NoContainers,
    #[error("building the patch: {0}")]
    Json(#[from] serde_json::Error),
}

/// How the proxy is placed in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// An init container with `restartPolicy: Always` (Kubernetes ≥ 1.29).
    NativeSidecar,
    /// The first regular container, with a post-start hook that waits for `/ready`.
    Regular,
}

impl Layout {
    /// The pod's `config.weft.io/native-sidecar` wins over the cluster-derived default.
    pub fn choose(overrides: &ProxyOverrides, native_by_default: bool) -> Layout {
        if overrides.native_sidecar.unwrap_or(native_by_default) {
            Layout::NativeSidecar
        } else {
            Layout::Regular
        }
    }
}

/// `weft-init`: programs the pod's iptables. Root with NET_ADMIN/NET_RAW only, because
/// iptables needs both in the pod's network namespace and nothing else.
pub fn init_container(settings: &ProxySettings, overrides: &ProxyOverrides) -> Container {
    let mut args = vec![
        "init".to_string(),
        format!("--proxy-uid={PROXY_UID}"),
        format!("--inbound-port={INBOUND_PORT}"),
        format!("--outbound-port={OUTBOUND_PORT}"),
        format!("--admin-port={ADMIN_PORT}"),
    ];
    for (flag, ports) in [
        ("--skip-inbound-ports", &overrides.skip_inbound_ports),
        ("--skip-outbound-ports", &overrides.skip_outbound_ports),
    ] {
        if !ports.is_empty() {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            args.push(format!("{flag}={}", list.join(",")));
        }
    }
    Container {
        name: INIT_CONTAINER.to_string(),
        image: Some(settings.proxy_image.clone()),
        command: Some(vec!["weft-proxy".to_string()]),
        args: Some(args),
        security_context: Some(SecurityContext {
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            // Not read-only: iptables-legacy takes its lock in /run/xtables.lock.
            privileged: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field.to_string(),
                api_version: None,
            }),
            ..Default::default()
        }),
    }
}

fn http_probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(ADMIN_PORT.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `weft-proxy`: the sidecar itself, unprivileged as UID 2170 (the UID iptables skips).
pub fn proxy_container(
    settings: &ProxySettings,
    overrides: &ProxyOverrides,
    layout: Layout,
) -> Container {
    let mut env_vars = vec![
        env("WEFT_CONTROL_ADDR", settings.control_addr.clone()),
        env(
            "WEFT_CONTROL_IDENTITY",
            format!(
                "spiffe://{}/ns/{}/sa/weft-control",
                settings.trust_domain, settings.control_namespace
            ),
        ),
        env("WEFT_TRUST_DOMAIN", settings.trust_domain.clone()),
        env("WEFT_TRUST_ANCHORS_PEM", settings.trust_anchors_pem.clone()),
        env("WEFT_IDENTITY_TOKEN_FILE", IDENTITY_TOKEN_FILE),
        env_field("WEFT_NAMESPACE", "metadata.namespace"),
        env_field("WEFT_POD_NAME", "metadata.name"),
        env_field("WEFT_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ];
    if let Some(level) = &overrides.log_level {
        env_vars.push(env("WEFT_LOG", level.clone()));
    }

    let mut requests = std::collections::BTreeMap::new();
    let mut limits = std::collections::BTreeMap::new();
    for (is_request, key, value) in [
        (true, "cpu", &overrides.cpu_request),
        (false, "cpu", &overrides.cpu_limit),
        (true, "memory", &overrides.memory_request),
        (false, "memory", &overrides.memory_limit),
    ] {
        if let Some(v) = value {
            let map = if is_request {
                &mut requests
            } else {
                &mut limits
            };
            map.insert(key.to_string(), Quantity(v.clone()));
        }
    }
    let resources = (!requests.is_empty() || !limits.is_empty()).then(|| ResourceRequirements {
        requests: (!requests.is_empty()).then_some(requests),
        limits: (!limits.is_empty()).then_some(limits),
        ..Default::default()
    });

    let mut container = Container {
        name: PROXY_CONTAINER.to_string(),
        image: Some(settings.proxy_image.clone()),
        command: Some(vec!["weft-proxy".to_string()]),
        env: Some(env_vars),
        ports: Some(vec![
            ContainerPort {
                name: Some("weft-inbound".to_string()),
                container_port: INBOUND_PORT.into(),
                protocol: Some("TCP".to_string()),
                ..Default::default()
            },
            ContainerPort {
                name: Some(ADMIN_PORT_NAME.to_string()),
                container_port: ADMIN_PORT.into(),
                protocol: Some("TCP".to_string()),
                ..Default::default()
            },
        ]),
        readiness_probe: Some(http_probe("/ready")),
        liveness_probe: Some(http_probe("/live")),
        resources,
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID.into()),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: IDENTITY_VOLUME.to_string(),
            mount_path: IDENTITY_TOKEN_DIR.to_string(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    };
    match layout {
        Layout::NativeSidecar => {
            container.restart_policy = Some("Always".to_string());
            // The kubelet starts the next init container only once this succeeds, so the
            // app's init containers find the proxy listening. Two minutes to get a first
            // certificate from the control plane.
            container.startup_probe = Some(Probe {
                period_seconds: Some(1),
                failure_threshold: Some(120),
                ..http_probe("/ready")
            });
        }
        Layout::Regular => {
            container.lifecycle = Some(Lifecycle {
                post_start: Some(LifecycleHandler {
                    exec: Some(ExecAction {
                        command: Some(vec!["weft-proxy".to_string(), "wait-ready".to_string()]),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    container
}

/// The projected service-account token the proxy proves its identity with.
pub fn identity_volume() -> Volume {
    Volume {
        name: IDENTITY_VOLUME.to_string(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(IDENTITY_AUDIENCE.to_string()),
                    expiration_seconds: Some(3600),
                    path: "token".to_string(),
                }),
                ..Default::default()
            }]),
            default_mode: None,
        }),
        ..Default::default()
    }
}

/// RFC 6901 escaping of one path segment (annotation keys contain `/`).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn add(path: String, value: Value) -> Value {
    json!({"op": "add", "path": path, "value": value})
}

/// The patch that injects `pod` (a Pod or a pod template: `metadata` + `spec`).
pub fn injection_patch(
    pod: &Value,
    settings: &ProxySettings,
    overrides: &ProxyOverrides,
    layout: Layout,
) -> Result<json_patch::Patch, PatchError> {
    if !pod.pointer("/spec/containers").is_some_and(Value::is_array) {
        return Err(PatchError::NoContainers);
    }
    let mut ops = Vec::new();

    let mut annotations = vec![(INJECTED_ANNOTATION, "true")];
    let existing = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object);
    for (key, value) in SCRAPE_ANNOTATIONS {
        if !existing.is_some_and(|a| a.contains_key(key)) {
            annotations.push((key, value));
        }
    }
    let annotation_map: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    if !pod.get("metadata").is_some_and(Value::is_object) {
        ops.push(add(
            "/metadata".into(),
            json!({ "annotations": annotation_map }),
        ));
    } else if existing.is_none() {
        ops.push(add(
            "/metadata/annotations".into(),
            Value::Object(annotation_map),
        ));
    } else {
        for (key, value) in annotation_map {
            ops.push(add(
                format!("/metadata/annotations/{}", escape(&key)),
                value,
            ));
        }
    }

    // The API server refuses a projected service-account token without a service account
    // name. Pods get one from the ServiceAccount admission plugin before webhooks run, but
    // pod templates (`weft inject` of a Deployment) do not, so name the account explicitly.
    let account = pod
        .pointer("/spec/serviceAccountName")
        .and_then(Value::as_str);
    if account.is_none_or(str::is_empty) {
        let legacy = pod.pointer("/spec/serviceAccount").and_then(Value::as_str);
        let name = legacy.filter(|n| !n.is_empty()).unwrap_or("default");
        ops.push(add("/spec/serviceAccountName".into(), json!(name)));
    }

    let volume = serde_json::to_value(identity_volume())?;
    if pod.pointer("/spec/volumes").is_some_and(Value::is_array) {
        ops.push(add("/spec/volumes/-".into(), volume));
    } else {
        ops.push(add("/spec/volumes".into(), json!([volume])));
    }

    let init = serde_json::to_value(init_container(settings, overrides))?;
    let proxy = serde_json::to_value(proxy_container(settings, overrides, layout))?;
    let has_inits = pod
        .pointer("/spec/initContainers")
        .is_some_and(Value::is_array);
    match (layout, has_inits) {
        (Layout::NativeSidecar, false) => {
            ops.push(add("/spec/initContainers".into(), json!([init, proxy])));
        }
        (Layout::NativeSidecar, true) => {
            ops.push(add("/spec/initContainers/0".into(), init));
            ops.push(add("/spec/initContainers/1".into(), proxy));
        }
        (Layout::Regular, false) => {
            ops.push(add("/spec/initContainers".into(), json!([init])));
            ops.push(add("/spec/containers/0".into(), proxy));
        }
        (Layout::Regular, true) => {
            ops.push(add("/spec/initContainers/0".into(), init));
            ops.push(add("/spec/containers/0".into(), proxy));
        }
    }
    Ok(serde_json::from_value(Value::Array(ops))?)
}
