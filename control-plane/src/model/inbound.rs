//! The effective inbound policy of one pod port: which default applies (pod > namespace >
//! control plane), whether plaintext is refused, how the proxy treats the port's protocol,
//! the AuthorizationPolicies that select it and the kubelet probe paths it must let through.

use std::fmt;
use std::str::FromStr;

use super::authz::AuthorizationPolicy;
use super::{
    annotation_lists_port, is_default_opaque, target_port_of, ClusterState, Pod, PortRanges,
};

/// Pod or namespace annotation: the default inbound policy (see [`DefaultInboundPolicy`]).
pub const DEFAULT_INBOUND_POLICY_ANNOTATION: &str = "config.weft.io/default-inbound-policy";
/// Pod annotation listing ports (`5432,8000-8100`) that refuse plaintext clients even when
/// a policy would allow them.
pub const REQUIRE_MTLS_PORTS_ANNOTATION: &str = "config.weft.io/require-mtls-ports";

/// What a port allows when no ALLOW (or AUDIT) policy selects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultInboundPolicy {
    #[default]
    AllUnauthenticated,
    /// Any client with a verified identity, from any trust anchor's domain.
    AllAuthenticated,
    /// Clients whose identity is in the control plane's trust domain.
    ClusterAuthenticated,
    Deny,
}

impl DefaultInboundPolicy {
    pub const ALL: [Self; 4] = [
        Self::AllUnauthenticated,
        Self::AllAuthenticated,
        Self::ClusterAuthenticated,
        Self::Deny,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllUnauthenticated => "all-unauthenticated",
            Self::AllAuthenticated => "all-authenticated",
            Self::ClusterAuthenticated => "cluster-authenticated",
            Self::Deny => "deny",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|policy| policy.as_str() == text)
    }
}

impl fmt::Display for DefaultInboundPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DefaultInboundPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|p| p.as_str()).collect();
            format!("{text:?} is not one of {}", names.join(", "))
        })
    }
}

/// How the inbound proxy reads a port. Only the opaque/detect split is configurable today
/// (opaque-ports annotation and the default opaque ports); detection finds HTTP/1, HTTP/2
/// and gRPC by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundProtocol {
    Detect,
    Opaque,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPolicy {
    /// False when no pod of that name is known: the answer then holds only what does not
    /// depend on the pod object (see [`ClusterState::inbound_policy`]).
    pub pod_known: bool,
    pub protocol: InboundProtocol,
    pub require_mtls: bool,
    pub default_policy: DefaultInboundPolicy,
    /// Sorted by name (all are in the pod's namespace).
    pub policies: Vec<AuthorizationPolicy>,
    /// Request paths of the pod's plaintext HTTP probes on this port, sorted, deduplicated.
    pub probe_paths: Vec<String>,
}

/// The request path kubelet sends for an `httpGet.path`: absolute, without its query
/// (proxies authorize by path, so `/health?full=1` is allowed as `/health`).
pub fn probe_request_path(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

impl ClusterState {
    /// The effective inbound policy of `port` on pod `namespace/pod_name`.
    ///
    /// For an unknown pod (not created yet, or deleted) the answer uses what is known
    /// without it: the namespace's (else `cluster_default`) default policy, the default
    /// opaque ports, and the policies that select every pod of the namespace on this port
    /// by number. Once the pod appears, watchers get the full answer.
    ///
    /// Annotations that do not parse fail closed (`deny`; mTLS required on every port).
    /// Sources refuse such objects, so this only guards values built by other means.
    pub fn inbound_policy(
        &self,
        namespace: &str,
        pod_name: &str,
        port: u16,
        cluster_default: DefaultInboundPolicy,
    ) -> InboundPolicy {
        let namespace_default = self
            .namespaces
            .get(namespace)
            .and_then(|ns| annotated_default(&ns.annotations));
        let Some(pod) = self.pods.get(&(namespace.to_owned(), pod_name.to_owned())) else {
            return InboundPolicy {
                pod_known: false,
                protocol: if is_default_opaque(port) {
                    InboundProtocol::Opaque
                } else {
                    InboundProtocol::Detect
                },
                require_mtls: false,
                default_policy: namespace_default.unwrap_or(cluster_default),
                policies: self
                    .authorization_policies_in(namespace)
                    .filter(|policy| {
                        policy.selector.is_empty()
                            && (policy.ports.is_empty()
                                || policy.ports.contains(&super::TargetPort::Number(port)))
                    })
                    .cloned()
                    .collect(),
                probe_paths: Vec::new(),
            };
        };
        let opaque = is_default_opaque(port) || annotation_lists_port(&pod.annotations, port);
        InboundPolicy {
            pod_known: true,
            protocol: if opaque {
                InboundProtocol::Opaque
            } else {
                InboundProtocol::Detect
            },
            require_mtls: requires_mtls(pod, port),
            default_policy: annotated_default(&pod.annotations)
                .or(namespace_default)
                .unwrap_or(cluster_default),
            policies: self
                .authorization_policies_in(namespace)
                .filter(|policy| policy.selects_pod(pod) && policy.selects_port(pod, port))
                .cloned()
                .collect(),
            probe_paths: probe_paths(pod, port),
        }
    }

    /// In name order: the map is keyed by (namespace, name).
    fn authorization_policies_in<'a>(
        &'a self,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        self.authorization_policies
            .range((namespace.to_owned(), String::new())..)
            .take_while(move |((ns, _), _)| ns == namespace)
            .map(|(_, policy)| policy)
    }
}

fn annotated_default(
    annotations: &std::collections::BTreeMap<String, String>,
) -> Option<DefaultInboundPolicy> {
    annotations
        .get(DEFAULT_INBOUND_POLICY_ANNOTATION)
        .map(|text| DefaultInboundPolicy::parse(text.trim()).unwrap_or(DefaultInboundPolicy::Deny))
}

fn requires_mtls(pod: &Pod, port: u16) -> bool {
    match pod.annotations.get(REQUIRE_MTLS_PORTS_ANNOTATION) {
        None => false,
        Some(text) => PortRanges::parse(text).map_or(true, |ranges| ranges.contains(port)),
    }
}

fn probe_paths(pod: &Pod, port: u16) -> Vec<String> {
    let mut paths: Vec<String> = pod
        .probes
        .iter()
        .filter(|probe| target_port_of(&probe.port, pod) == Some(port))
        .map(|probe| probe.path.clone())
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_names_round_trip() {
        for policy in DefaultInboundPolicy::ALL {
            assert_eq!(policy.as_str().parse(), Ok(policy));
        }
        assert!("Deny".parse::<DefaultInboundPolicy>().is_err());
        assert_eq!(
            DefaultInboundPolicy::default(),
            DefaultInboundPolicy::AllUnauthenticated
        );
    }

    #[test]
    fn probe_paths_are_absolute_and_without_query() {
        assert_eq!(probe_request_path("/healthz"), "/healthz");
        assert_eq!(probe_request_path("healthz"), "/healthz");
        assert_eq!(probe_request_path("/ready?full=1"), "/ready");
        assert_eq!(probe_request_path(""), "/");
    }
}
