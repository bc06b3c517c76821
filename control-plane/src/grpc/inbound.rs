//! `weft.inbound.v1.Inbound/Watch`: a proxy asks for the effective inbound policy of one
//! port of its own pod; the answer is streamed again, whole, whenever it changes. Only the
//! pod's own identity may ask: a policy reveals who may reach the pod.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tonic::{Request, Response, Status};
use weft_api::inbound::inbound_server::Inbound as InboundApi;
use weft_api::inbound::{
    Action, DefaultPolicy, Destination, InboundPolicy as ProtoPolicy, Network, Policy,
    PortProtocol, Rule, Source, WatchRequest,
};
use weft_certs::SpiffeId;

use crate::index::Index;
use crate::model::authz::{AuthorizationPolicy, PolicyAction};
use crate::model::{ClusterState, DefaultInboundPolicy, InboundPolicy, InboundProtocol};

pub struct InboundService {
    pub index: Arc<Index>,
    pub trust_domain: String,
    /// The cluster-wide default (`--default-inbound-policy`).
    pub default_policy: DefaultInboundPolicy,
}

type PolicyStream = Pin<Box<dyn Stream<Item = Result<ProtoPolicy, Status>> + Send>>;

#[tonic::async_trait]
impl InboundApi for InboundService {
    type WatchStream = PolicyStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<PolicyStream>, Status> {
        let caller = super::caller_identity(&request, "Inbound")?;
        let req = request.into_inner();
        let port = u16::try_from(req.port)
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| {
                Status::invalid_argument(format!("port {} is not in 1-65535", req.port))
            })?;
        if req.namespace.is_empty() || req.pod.is_empty() {
            return Err(Status::invalid_argument("namespace and pod are required"));
        }
        let (namespace, pod) = (req.namespace, req.pod);
        check_caller(
            &self.index.snapshot(),
            &caller,
            &namespace,
            &pod,
            &self.trust_domain,
        )?;
        tracing::debug!(%caller, %namespace, %pod, port, "inbound watch");
        let (trust_domain, default_policy) = (self.trust_domain.clone(), self.default_policy);
        let td = trust_domain.clone();
        // The pod may appear, or change service account, while the stream is open.
        let answer = move |state: &ClusterState| {
            check_caller(state, &caller, &namespace, &pod, &trust_domain)?;
            Ok(state.inbound_policy(&namespace, &pod, port, default_policy))
        };
        let stream = super::watch(&self.index, answer, move |policy| to_proto(policy, &td));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A known pod: the caller must hold exactly its identity. An unknown pod: the caller must
/// at least be of the same trust domain and namespace, which is all that can be checked.
fn check_caller(
    state: &ClusterState,
    caller: &SpiffeId,
    namespace: &str,
    pod: &str,
    trust_domain: &str,
) -> Result<(), Status> {
    match state.pods.get(&(namespace.to_owned(), pod.to_owned())) {
        Some(known) => {
            if state.identity_of(known, trust_domain).as_ref() == Some(caller) {
                Ok(())
            } else {
                Err(Status::permission_denied(format!(
                    "{caller} may not watch the inbound policy of pod {namespace}/{pod}: it runs as service account {}",
                    known.service_account
                )))
            }
        }
        None if caller.trust_domain() == trust_domain && caller.namespace() == namespace => Ok(()),
        None => Err(Status::permission_denied(format!(
            "{caller} may not watch the inbound policy of a pod in namespace {namespace}"
        ))),
    }
}

pub fn to_proto(policy: &InboundPolicy, trust_domain: &str) -> ProtoPolicy {
    ProtoPolicy {
        protocol: match policy.protocol {
            InboundProtocol::Detect => PortProtocol::Detect,
            InboundProtocol::Opaque => PortProtocol::Opaque,
        } as i32,
        require_mtls: policy.require_mtls,
        default_policy: match policy.default_policy {
            DefaultInboundPolicy::AllUnauthenticated => DefaultPolicy::AllUnauthenticated,
            DefaultInboundPolicy::AllAuthenticated => DefaultPolicy::AllAuthenticated,
            DefaultInboundPolicy::ClusterAuthenticated => DefaultPolicy::ClusterAuthenticated,
            DefaultInboundPolicy::Deny => DefaultPolicy::Deny,
        } as i32,
        trust_domain: trust_domain.to_owned(),
        policies: policy.policies.iter().map(policy_to_proto).collect(),
        probe_paths: policy.probe_paths.clone(),
    }
}

fn policy_to_proto(policy: &AuthorizationPolicy) -> Policy {
    Policy {
        name: policy.qualified_name(),
        action: match policy.action {
            PolicyAction::Allow => Action::Allow,
            PolicyAction::Deny => Action::Deny,
            PolicyAction::Audit => Action::Audit,
        } as i32,
        rules: policy
            .rules
            .iter()
            .map(|rule| Rule {
                from: rule
                    .from
                    .iter()
                    .map(|source| Source {
                        identities: source.identities.clone(),
                        service_accounts: source.service_accounts.clone(),
                        namespaces: source.namespaces.clone(),
                        networks: source
                            .networks
                            .iter()
                            .map(|network| Network {
                                cidr: network.cidr.to_string(),
                                except: network.except.iter().map(ToString::to_string).collect(),
                            })
                            .collect(),
                        unauthenticated: source.unauthenticated,
                    })
                    .collect(),
                to: rule
                    .to
                    .iter()
                    .map(|destination| Destination {
                        methods: destination.methods.clone(),
                        paths: destination.paths.iter().map(ToString::to_string).collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::authz::{
        DestinationMatch, IpNet, NetworkMatch, PathPattern, PolicyRule, SourceMatch,
    };
    use crate::model::{Pod, TargetPort};

    #[test]
    fn policies_translate_field_by_field() {
        let policy = InboundPolicy {
            pod_known: true,
            protocol: InboundProtocol::Opaque,
            require_mtls: true,
            default_policy: DefaultInboundPolicy::ClusterAuthenticated,
            policies: vec![AuthorizationPolicy {
                namespace: "shop".into(),
                name: "internal-api".into(),
                selector: BTreeMap::new(),
                ports: vec![TargetPort::Number(8080)],
                action: PolicyAction::Audit,
                rules: vec![PolicyRule {
                    from: vec![SourceMatch {
                        identities: vec!["spiffe://cluster.local/ns/shop/sa/*".into()],
                        service_accounts: vec!["shop/api".into()],
                        namespaces: vec!["shop".into()],
                        networks: vec![NetworkMatch {
                            cidr: IpNet::parse("2001:DB8::/32").unwrap(),
                            except: vec![IpNet::parse("2001:db8:1::/48").unwrap()],
                        }],
                        unauthenticated: false,
                    }],
                    to: vec![DestinationMatch {
                        methods: vec!["GET".into()],
                        paths: vec![
                            PathPattern::Exact("/a".into()),
                            PathPattern::Prefix("/api/".into()),
                            PathPattern::Regex("/u/.*".into()),
                        ],
                    }],
                }],
            }],
            probe_paths: vec!["/healthz".into()],
        };
        let proto = to_proto(&policy, "cluster.local");
        assert_eq!(
            proto,
            ProtoPolicy {
                protocol: PortProtocol::Opaque as i32,
                require_mtls: true,
                default_policy: DefaultPolicy::ClusterAuthenticated as i32,
                trust_domain: "cluster.local".into(),
                policies: vec![Policy {
                    name: "shop/internal-api".into(),
                    action: Action::Audit as i32,
                    rules: vec![Rule {
                        from: vec![Source {
                            identities: vec!["spiffe://cluster.local/ns/shop/sa/*".into()],
                            service_accounts: vec!["shop/api".into()],
                            namespaces: vec!["shop".into()],
                            networks: vec![Network {
                                cidr: "2001:db8::/32".into(),
                                except: vec!["2001:db8:1::/48".into()],
                            }],
                            unauthenticated: false,
                        }],
                        to: vec![Destination {
                            methods: vec!["GET".into()],
                            paths: vec!["/a".into(), "/api/*".into(), "regex:/u/.*".into()],
                        }],
                    }],
                }],
                probe_paths: vec!["/healthz".into()],
            }
        );
    }

    #[test]
    fn only_the_pods_own_identity_may_watch() {
        let mut state = ClusterState::default();
        state.pods.insert(
            ("shop".into(), "db-0".into()),
            Pod {
                namespace: "shop".into(),
                name: "db-0".into(),
                ip: None,
                service_account: "db".into(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                container_ports: Vec::new(),
                probes: Vec::new(),
            },
        );
        let id = |ns: &str, sa: &str| SpiffeId::new("cluster.local", ns, sa).unwrap();
        let td = "cluster.local";
        assert!(check_caller(&state, &id("shop", "db"), "shop", "db-0", td).is_ok());
        let denied = check_caller(&state, &id("shop", "api"), "shop", "db-0", td).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        // Unknown pods: same namespace and trust domain only.
        assert!(check_caller(&state, &id("shop", "api"), "shop", "new-0", td).is_ok());
        let other_ns = check_caller(&state, &id("web", "api"), "shop", "new-0", td).unwrap_err();
        assert_eq!(other_ns.code(), tonic::Code::PermissionDenied);
        let other_td = SpiffeId::new("other.example", "shop", "db").unwrap();
        assert_eq!(
            check_caller(&state, &other_td, "shop", "db-0", td)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            check_caller(&state, &other_td, "shop", "new-0", td)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
    }
}
