//! Whether a pod joins the mesh: the pod's and its namespace's `weft.io/inject`, the
//! namespaces that never get a proxy, host-network pods, and pods that already have one.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::annotations::{annotations_of, string_map};
use crate::{INIT_CONTAINER, INJECT_ANNOTATION, PROXY_CONTAINER};

/// Namespaces that never get a proxy, whatever their annotations say: the cluster's own.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// What the injector knows about the pod's namespace.
#[derive(Debug, Clone, Default)]
pub struct NamespaceMeta {
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

impl NamespaceMeta {
    /// From a Namespace object as JSON.
    pub fn from_object(ns: &Value) -> NamespaceMeta {
        NamespaceMeta {
            name: ns
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            annotations: string_map(ns.pointer("/metadata/annotations")),
            labels: string_map(ns.pointer("/metadata/labels")),
        }
    }

    /// The annotation, or the label of the same name (usable in webhook selectors).
    fn injection_enabled(&self) -> bool {
        self.annotations.get(INJECT_ANNOTATION).map(String::as_str) == Some("enabled")
            || self.labels.get(INJECT_ANNOTATION).map(String::as_str) == Some("enabled")
    }
}

/// Where the namespace's opinion comes from.
#[derive(Debug, Clone)]
pub enum NamespaceView<'a> {
    /// The admission webhook: the Namespace object as the API server has it.
    Known(&'a NamespaceMeta),
    /// `weft inject`: no cluster to ask, so every pod is treated as asking for the mesh
    /// unless it says `disabled` itself.
    Offline { name: Option<&'a str> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Inject,
    Skip(SkipReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Neither the pod nor its namespace asked for the mesh.
    NotRequested,
    /// The pod says `weft.io/inject: disabled`.
    PodDisabled,
    /// A system namespace or the control plane's own.
    ExcludedNamespace(String),
    HostNetwork,
    /// The pod already has a `weft-proxy` (or `weft-init`) container.
    AlreadyInjected,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::NotRequested => write!(
                f,
                "neither the pod nor its namespace has {INJECT_ANNOTATION}: enabled"
            ),
            SkipReason::PodDisabled => write!(f, "the pod has {INJECT_ANNOTATION}: disabled"),
            SkipReason::ExcludedNamespace(ns) => write!(f, "namespace {ns} is never injected"),
            SkipReason::HostNetwork => write!(f, "the pod uses the host network"),
            SkipReason::AlreadyInjected => write!(f, "the pod already has the proxy"),
        }
    }
}

/// A pod-level `weft.io/inject` value that is neither `enabled` nor `disabled`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{INJECT_ANNOTATION}: {0:?} is not \"enabled\" or \"disabled\"")]
pub struct BadInjectValue(pub String);

/// Decides for one pod (or pod template). `control_namespace` is never injected.
pub fn decide(
    pod: &Value,
    namespace: NamespaceView<'_>,
    control_namespace: &str,
) -> Result<Decision, BadInjectValue> {
    let annotations = annotations_of(pod);
    let pod_says = match annotations.get(INJECT_ANNOTATION).map(|v| v.trim()) {
        None => None,
        Some("enabled") => Some(true),
        Some("disabled") => Some(false),
        Some(other) => return Err(BadInjectValue(other.to_string())),
    };
    let ns_name = match &namespace {
        NamespaceView::Known(ns) => Some(ns.name.as_str()),
        NamespaceView::Offline { name } => *name,
    };
    if let Some(ns) = ns_name {
        if SYSTEM_NAMESPACES.contains(&ns) || ns == control_namespace {
            return Ok(Decision::Skip(SkipReason::ExcludedNamespace(
                ns.to_string(),
            )));
        }
    }
    if pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Decision::Skip(SkipReason::HostNetwork));
    }
    if already_injected(pod) {
        return Ok(Decision::Skip(SkipReason::AlreadyInjected));
    }
    let requested = match (pod_says, &namespace) {
        (Some(false), _) => return Ok(Decision::Skip(SkipReason::PodDisabled)),
        (Some(true), _) => true,
        (None, NamespaceView::Known(ns)) => ns.injection_enabled(),
        (None, NamespaceView::Offline { .. }) => true,
    };
    Ok(if requested {
        Decision::Inject
    } else {
        Decision::Skip(SkipReason::NotRequested)
    })
}

/// Whether any container or init container already carries weft's names: injecting again
/// would duplicate them (and the API server would reject the duplicate names).
pub fn already_injected(pod: &Value) -> bool {
    ["/spec/containers", "/spec/initContainers"]
        .iter()
        .filter_map(|ptr| pod.pointer(ptr).and_then(Value::as_array))
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .any(|name| name == PROXY_CONTAINER || name == INIT_CONTAINER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(inject: Option<&str>) -> Value {
        let mut pod = json!({
            "metadata": {"name": "web", "annotations": {}},
            "spec": {"containers": [{"name": "app", "image": "app"}]}
        });
        if let Some(v) = inject {
            pod["metadata"]["annotations"][INJECT_ANNOTATION] = json!(v);
        }
        pod
    }

    fn ns(name: &str, annotation: Option<&str>, label: Option<&str>) -> NamespaceMeta {
        let mut meta = NamespaceMeta {
            name: name.to_string(),
            ..Default::default()
        };
        if let Some(v) = annotation {
            meta.annotations.insert(INJECT_ANNOTATION.into(), v.into());
        }
        if let Some(v) = label {
            meta.labels.insert(INJECT_ANNOTATION.into(), v.into());
        }
        meta
    }

    fn decide_known(pod: &Value, ns: &NamespaceMeta) -> Decision {
        decide(pod, NamespaceView::Known(ns), "weft").unwrap()
    }

    #[test]
    fn decision_table() {
        use Decision::*;
        use SkipReason::*;
        let enabled_ns = ns("shop", Some("enabled"), None);
        let labelled_ns = ns("shop", None, Some("enabled"));
        let disabled_ns = ns("shop", Some("disabled"), None);
        let plain_ns = ns("shop", None, None);
        let cases: [(&NamespaceMeta, Option<&str>, Decision); 12] = [
            (&plain_ns, None, Skip(NotRequested)),
            (&plain_ns, Some("enabled"), Inject),
            (&plain_ns, Some("disabled"), Skip(PodDisabled)),
            (&enabled_ns, None, Inject),
            (&enabled_ns, Some("enabled"), Inject),
            (&enabled_ns, Some("disabled"), Skip(PodDisabled)),
            (&labelled_ns, None, Inject),
            (&labelled_ns, Some("disabled"), Skip(PodDisabled)),
            (&disabled_ns, None, Skip(NotRequested)),
            (&disabled_ns, Some("enabled"), Inject),
            (&ns("shop", Some("yes"), None), None, Skip(NotRequested)),
            (
                &ns("shop", None, Some("disabled")),
                None,
                Skip(NotRequested),
            ),
        ];
        for (i, (namespace, pod_value, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                decide_known(&pod(pod_value), namespace),
                want,
                "case {i}: ns {:?}/{:?}, pod {pod_value:?}",
                namespace.annotations,
                namespace.labels
            );
        }
    }

    #[test]
    fn excluded_namespaces_never_get_a_proxy() {
        for name in ["kube-system", "kube-public", "kube-node-lease", "weft"] {
            let namespace = ns(name, Some("enabled"), None);
            assert_eq!(
                decide_known(&pod(Some("enabled")), &namespace),
                Decision::Skip(SkipReason::ExcludedNamespace(name.to_string()))
            );
        }
        // The control plane's namespace is a flag, not a constant.
        let namespace = ns("mesh-system", Some("enabled"), None);
        assert_eq!(
            decide(&pod(None), NamespaceView::Known(&namespace), "mesh-system").unwrap(),
            Decision::Skip(SkipReason::ExcludedNamespace("mesh-system".into()))
        );
        assert_eq!(
            decide(&pod(None), NamespaceView::Known(&namespace), "weft").unwrap(),
            Decision::Inject
        );
    }

    #[test]
    fn host_network_pods_are_skipped() {
        let mut p = pod(Some("enabled"));
        p["spec"]["hostNetwork"] = json!(true);
        assert_eq!(
            decide_known(&p, &ns("shop", None, None)),
            Decision::Skip(SkipReason::HostNetwork)
        );
        p["spec"]["hostNetwork"] = json!(false);
        assert_eq!(decide_known(&p, &ns("shop", None, None)), Decision::Inject);
    }

    #[test]
    fn injected_pods_are_not_injected_again() {
        let namespace = ns("shop", Some("enabled"), None);
        let mut native = pod(None);
        native["spec"]["initContainers"] = json!([{"name": "weft-init"}, {"name": "weft-proxy"}]);
        assert_eq!(
            decide_known(&native, &namespace),
            Decision::Skip(SkipReason::AlreadyInjected)
        );
        let mut regular = pod(None);
        regular["spec"]["containers"] = json!([{"name": "weft-proxy"}, {"name": "app"}]);
        assert_eq!(
            decide_known(&regular, &namespace),
            Decision::Skip(SkipReason::AlreadyInjected)
        );
    }

    #[test]
    fn offline_injects_unless_the_pod_opts_out() {
        let offline = NamespaceView::Offline { name: None };
        assert_eq!(
            decide(&pod(None), offline.clone(), "weft").unwrap(),
            Decision::Inject
        );
        assert_eq!(
            decide(&pod(Some("disabled")), offline, "weft").unwrap(),
            Decision::Skip(SkipReason::PodDisabled)
        );
        assert_eq!(
            decide(
                &pod(None),
                NamespaceView::Offline {
                    name: Some("kube-system")
                },
                "weft"
            )
            .unwrap(),
            Decision::Skip(SkipReason::ExcludedNamespace("kube-system".into()))
        );
    }

    #[test]
    fn unknown_pod_values_are_an_error() {
        let err = decide(
            &pod(Some("enable")),
            NamespaceView::Known(&ns("shop", None, None)),
            "weft",
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"enable\""), "{err}");
    }
}
