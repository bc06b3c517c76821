//! The authorization decision for one connection or request against a compiled
//! [`PortPolicy`], in DESIGN.md's order: mTLS requirement, probes, DENY, ALLOW or the
//! default policy; AUDIT policies only annotate an allow.

use std::borrow::Cow;

use super::policy::{Access, Action, DefaultPolicy, PortPolicy};
use crate::metrics::Name;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub basis: Basis,
    /// Set on an allowed access that would be denied if every AUDIT policy were an ALLOW
    /// policy; names the first AUDIT policy.
    pub audit_would_deny: Option<Name>,
}

/// Why a decision came out the way it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// The control plane never answered for this port.
    NoPolicy,
    /// The control plane's only answer so far did not compile.
    InvalidPolicy,
    MtlsRequired,
    Probe,
    /// `rule` is `None` for a DENY policy without rules (it denies everything).
    DenyPolicy {
        policy: Name,
        rule: Option<usize>,
    },
    AllowPolicy {
        policy: Name,
        rule: usize,
    },
    /// ALLOW policies select the port and none of their rules matched.
    NoAllowRuleMatched,
    Default(DefaultPolicy),
}

impl Decision {
    fn allow(basis: Basis) -> Decision {
        Decision {
            allowed: true,
            basis,
            audit_would_deny: None,
        }
    }

    pub fn deny(basis: Basis) -> Decision {
        Decision {
            allowed: false,
            basis,
            audit_would_deny: None,
        }
    }

    /// A short, client-facing explanation (403 bodies, gRPC messages, logs).
    pub fn reason(&self) -> Cow<'static, str> {
        match &self.basis {
            Basis::NoPolicy => "no policy from control plane".into(),
            Basis::InvalidPolicy => "the control plane sent an invalid policy for this port".into(),
            Basis::MtlsRequired => "mTLS required".into(),
            Basis::Probe => "kubelet probe".into(),
            Basis::DenyPolicy { policy, .. } => format!("denied by policy {}", policy.0).into(),
            Basis::AllowPolicy { policy, .. } => format!("allowed by policy {}", policy.0).into(),
            Basis::NoAllowRuleMatched => "no policy allows this request".into(),
            Basis::Default(d) if self.allowed => {
                format!("allowed by default policy {}", d.as_str()).into()
            }
            Basis::Default(DefaultPolicy::AllAuthenticated) => {
                "default policy all-authenticated requires a mesh identity".into()
            }
            Basis::Default(DefaultPolicy::ClusterAuthenticated) => {
                "default policy cluster-authenticated requires a mesh identity of this cluster"
                    .into()
            }
            Basis::Default(d) => format!("denied by default policy {}", d.as_str()).into(),
        }
    }

    /// The `policy` metrics label: the deciding AuthorizationPolicy, else "default".
    pub fn policy_label(&self) -> Option<&Name> {
        match &self.basis {
            Basis::DenyPolicy { policy, .. } | Basis::AllowPolicy { policy, .. } => Some(policy),
            _ => None,
        }
    }

    /// The `rule` metrics label: the index of the deciding rule in its policy.
    pub fn rule_label(&self) -> Option<usize> {
        match &self.basis {
            Basis::DenyPolicy { rule, .. } => *rule,
            Basis::AllowPolicy { rule, .. } => Some(*rule),
            _ => None,
        }
    }
}

/// Decides `access` on a port whose policy is `policy` (`None`: not known).
pub fn evaluate(policy: Option<&PortPolicy>, access: &Access<'_>) -> Decision {
    let Some(policy) = policy else {
        return Decision::deny(Basis::NoPolicy);
    };
    if policy.invalid {
        return Decision::deny(Basis::InvalidPolicy);
    }
    if policy.require_mtls && !access.tls {
        return Decision::deny(Basis::MtlsRequired);
    }
    if !access.tls {
        if let Some(http) = access.http {
            if (http.method == "GET" || http.method == "HEAD")
                && policy.probe_paths.iter().any(|p| p == http.path)
            {
                return Decision::allow(Basis::Probe);
            }
        }
    }
    for p in policy.policies.iter().filter(|p| p.action == Action::Deny) {
        if let Some(rule) = p.matching_rule(access) {
            return Decision::deny(Basis::DenyPolicy {
                policy: p.name.clone(),
                rule,
            });
        }
    }
    let mut decision = if policy.has_allow {
        let matched = policy
            .policies
            .iter()
            .filter(|p| p.action == Action::Allow)
            .find_map(|p| Some((p, p.matching_rule(access)??)));
        match matched {
            Some((p, rule)) => Decision::allow(Basis::AllowPolicy {
                policy: p.name.clone(),
                rule,
            }),
            None => Decision::deny(Basis::NoAllowRuleMatched),
        }
    } else {
        let allowed = match policy.default {
            DefaultPolicy::AllUnauthenticated => true,
            DefaultPolicy::AllAuthenticated => access.peer.is_some(),
            DefaultPolicy::ClusterAuthenticated => access
                .peer
                .is_some_and(|peer| peer.id.trust_domain() == policy.trust_domain),
            DefaultPolicy::Deny => false,
        };
        Decision {
            allowed,
            basis: Basis::Default(policy.default),
            audit_would_deny: None,
        }
    };
    // Were the AUDIT policies ALLOW policies, the port would be default-deny and only an
    // ALLOW or AUDIT rule could let this through. An access an ALLOW rule let through
    // passes either way, so only default-policy allows need the check.
    if decision.allowed && matches!(decision.basis, Basis::Default(_)) {
        if let Some(audit) = &policy.first_audit {
            let audited = policy
                .policies
                .iter()
                .filter(|p| p.action == Action::Audit)
                .any(|p| p.matching_rule(access).is_some());
            if !audited {
                decision.audit_would_deny = Some(audit.clone());
            }
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::policy::{ClientIdentity, HttpAccess};
    use std::net::IpAddr;
    use weft_api::inbound as proto;
    use weft_certs::SpiffeId;

    fn id(s: &str) -> ClientIdentity {
        ClientIdentity::new(SpiffeId::parse(s).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn compile(msg: proto::InboundPolicy) -> PortPolicy {
        PortPolicy::compile(&msg, "cluster.local").unwrap()
    }

    fn port(
        default: proto::DefaultPolicy,
        policies: Vec<(&str, proto::Action, Vec<proto::Rule>)>,
    ) -> PortPolicy {
        compile(proto::InboundPolicy {
            default_policy: default as i32,
            trust_domain: "cluster.local".into(),
            policies: policies
                .into_iter()
                .map(|(name, action, rules)| proto::Policy {
                    name: name.into(),
                    action: action as i32,
                    rules,
                })
                .collect(),
            ..Default::default()
        })
    }

    fn from_sa(sa: &str) -> proto::Source {
        proto::Source {
            service_accounts: vec![sa.into()],
            ..Default::default()
        }
    }

    fn to(methods: &[&str], paths: &[&str]) -> proto::Destination {
        proto::Destination {
            methods: methods.iter().map(|m| m.to_string()).collect(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn rule(from: Vec<proto::Source>, to: Vec<proto::Destination>) -> proto::Rule {
        proto::Rule { from, to }
    }

    fn mesh<'a>(peer: &'a ClientIdentity, http: Option<HttpAccess<'a>>) -> Access<'a> {
        Access {
            peer: Some(peer),
            ip: ip("10.1.0.5"),
            tls: true,
            http,
        }
    }

    fn plain(http: Option<HttpAccess<'_>>) -> Access<'_> {
        Access {
            peer: None,
            ip: ip("10.9.0.5"),
            tls: false,
            http,
        }
    }

    fn req<'a>(method: &'a str, path: &'a str) -> Option<HttpAccess<'a>> {
        Some(HttpAccess { method, path })
    }

    #[test]
    fn unknown_policy_fails_closed() {
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        let d = evaluate(None, &mesh(&api, None));
        assert!(!d.allowed);
        assert_eq!(d.reason(), "no policy from control plane");
        let d = evaluate(Some(&PortPolicy::refuse_all()), &mesh(&api, None));
        assert_eq!(d.basis, Basis::InvalidPolicy);
        assert!(!d.allowed);
    }

    #[test]
    fn default_policies() {
        use proto::DefaultPolicy as D;
        let local = id("spiffe://cluster.local/ns/shop/sa/api");
        let foreign = id("spiffe://other.org/ns/shop/sa/api");
        let cases = [
            (D::AllUnauthenticated, [true, true, true]),
            (D::AllAuthenticated, [false, true, true]),
            (D::ClusterAuthenticated, [false, true, false]),
            (D::Deny, [false, false, false]),
        ];
        for (default, [anon, ours, theirs]) in cases {
            let p = port(default, vec![]);
            assert_eq!(
                evaluate(Some(&p), &plain(None)).allowed,
                anon,
                "{default:?}"
            );
            assert_eq!(
                evaluate(Some(&p), &mesh(&local, None)).allowed,
                ours,
                "{default:?}"
            );
            assert_eq!(
                evaluate(Some(&p), &mesh(&foreign, None)).allowed,
                theirs,
                "{default:?}"
            );
            let d = evaluate(Some(&p), &plain(None));
            assert_eq!(d.policy_label(), None);
            assert_eq!(d.rule_label(), None);
        }
    }

    #[test]
    fn require_mtls_refuses_plaintext_even_when_allowed() {
        let mut p = port(proto::DefaultPolicy::AllUnauthenticated, vec![]);
        p.require_mtls = true;
        p.probe_paths = vec!["/healthz".into()];
        let d = evaluate(Some(&p), &plain(req("GET", "/healthz")));
        assert!(!d.allowed);
        assert_eq!(d.reason(), "mTLS required");
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        assert!(evaluate(Some(&p), &mesh(&api, None)).allowed);
    }

    #[test]
    fn probes_pass_default_deny_as_plaintext_get_or_head_only() {
        let mut p = port(
            proto::DefaultPolicy::Deny,
            vec![("shop/deny-all", proto::Action::Deny, vec![])],
        );
        p.probe_paths = vec!["/healthz".into()];
        for method in ["GET", "HEAD"] {
            let d = evaluate(Some(&p), &plain(req(method, "/healthz")));
            assert!(d.allowed && d.basis == Basis::Probe, "{method}");
        }
        assert!(!evaluate(Some(&p), &plain(req("POST", "/healthz"))).allowed);
        assert!(!evaluate(Some(&p), &plain(req("GET", "/healthz/x"))).allowed);
        assert!(!evaluate(Some(&p), &plain(None)).allowed);
        // A mesh client is no probe.
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        assert!(!evaluate(Some(&p), &mesh(&api, req("GET", "/healthz"))).allowed);
    }

    #[test]
    fn deny_beats_allow_and_names_policy_and_rule() {
        use proto::Action::{Allow, Deny};
        let p = port(
            proto::DefaultPolicy::AllUnauthenticated,
            vec![
                (
                    "shop/allow-api",
                    Allow,
                    vec![rule(vec![from_sa("shop/api")], vec![])],
                ),
                (
                    "shop/no-admin",
                    Deny,
                    vec![
                        rule(vec![from_sa("shop/web")], vec![]),
                        rule(vec![], vec![to(&[], &["/admin/*"])]),
                    ],
                ),
            ],
        );
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        let d = evaluate(Some(&p), &mesh(&api, req("GET", "/admin/users")));
        assert!(!d.allowed);
        assert_eq!(d.reason(), "denied by policy shop/no-admin");
        assert_eq!(d.policy_label().map(|n| &*n.0), Some("shop/no-admin"));
        assert_eq!(d.rule_label(), Some(1));
        let d = evaluate(Some(&p), &mesh(&api, req("GET", "/api")));
        assert!(d.allowed);
        assert_eq!(d.policy_label().map(|n| &*n.0), Some("shop/allow-api"));
        assert_eq!(d.rule_label(), Some(0));
    }

    #[test]
    fn http_only_rules_deny_opaque_connections_but_never_allow_them() {
        use proto::Action::{Allow, Deny};
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        // A DENY on paths also closes an opaque connection (an Upgrade, say) from that source.
        let p = port(
            proto::DefaultPolicy::AllUnauthenticated,
            vec![(
                "shop/no-admin",
                Deny,
                vec![rule(
                    vec![from_sa("shop/api")],
                    vec![to(&[], &["/admin/*"])],
                )],
            )],
        );
        let d = evaluate(Some(&p), &mesh(&api, None));
        assert!(!d.allowed);
        assert_eq!(d.policy_label().map(|n| &*n.0), Some("shop/no-admin"));
        assert!(evaluate(Some(&p), &mesh(&api, req("GET", "/api"))).allowed);
        // An ALLOW on paths admits matching requests only, never an opaque connection.
        let p = port(
            proto::DefaultPolicy::AllUnauthenticated,
            vec![(
                "shop/api-get",
                Allow,
                vec![rule(vec![from_sa("shop/api")], vec![to(&["GET"], &[])])],
            )],
        );
        assert!(!evaluate(Some(&p), &mesh(&api, None)).allowed);
        assert!(evaluate(Some(&p), &mesh(&api, req("GET", "/x"))).allowed);
    }

    #[test]
    fn any_allow_policy_makes_the_port_default_deny() {
        use proto::Action::Allow;
        let p = port(
            proto::DefaultPolicy::AllUnauthenticated,
            vec![(
                "shop/internal-api",
                Allow,
                vec![rule(
                    vec![from_sa("shop/api")],
                    vec![
                        to(&["GET"], &["regex:/api/v1/users/.*"]),
                        to(&["POST"], &["/api/v1/orders"]),
                    ],
                )],
            )],
        );
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let allowed = |a: Access<'_>| evaluate(Some(&p), &a).allowed;
        assert!(allowed(mesh(&api, req("GET", "/api/v1/users/42"))));
        assert!(allowed(mesh(&api, req("POST", "/api/v1/orders"))));
        assert!(!allowed(mesh(&api, req("DELETE", "/api/v1/users/42"))));
        assert!(!allowed(mesh(&api, req("GET", "/admin"))));
        assert!(!allowed(mesh(&web, req("GET", "/api/v1/users/42"))));
        assert!(!allowed(plain(req("GET", "/api/v1/users/42"))));
        // HTTP-only destinations never match an opaque connection.
        assert!(!allowed(mesh(&api, None)));
        let d = evaluate(Some(&p), &mesh(&web, None));
        assert_eq!(d.reason(), "no policy allows this request");
        assert_eq!(d.policy_label(), None);
        // An ALLOW policy without rules allows nothing.
        let empty = port(
            proto::DefaultPolicy::AllUnauthenticated,
            vec![("shop/nothing", Allow, vec![])],
        );
        assert!(!evaluate(Some(&empty), &mesh(&api, None)).allowed);
    }

    #[test]
    fn source_fields_must_all_match() {
        use proto::Action::Allow;
        let both = proto::Source {
            namespaces: vec!["shop".into()],
            networks: vec![proto::Network {
                cidr: "10.1.0.0/16".into(),
                except: vec!["10.1.0.0/24".into()],
            }],
            ..Default::default()
        };
        let p = port(
            proto::DefaultPolicy::Deny,
            vec![("shop/p", Allow, vec![rule(vec![both], vec![])])],
        );
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        let other_ns = id("spiffe://cluster.local/ns/dev/sa/api");
        let at = |peer: &ClientIdentity, addr: &str| {
            let a = Access {
                peer: Some(peer),
                ip: ip(addr),
                tls: true,
                http: None,
            };
            evaluate(Some(&p), &a).allowed
        };
        assert!(at(&api, "10.1.7.1"));
        assert!(!at(&api, "10.1.0.9"), "in except");
        assert!(!at(&api, "10.2.7.1"), "outside cidr");
        assert!(!at(&other_ns, "10.1.7.1"), "wrong namespace");
    }

    #[test]
    fn unauthenticated_and_identity_globs() {
        use proto::Action::Allow;
        let anon = proto::Source {
            unauthenticated: true,
            ..Default::default()
        };
        let glob = proto::Source {
            identities: vec!["spiffe://cluster.local/ns/shop/*".into()],
            ..Default::default()
        };
        let p = port(
            proto::DefaultPolicy::Deny,
            vec![(
                "shop/p",
                Allow,
                vec![rule(vec![anon], vec![]), rule(vec![glob], vec![])],
            )],
        );
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        let dev = id("spiffe://cluster.local/ns/dev/sa/api");
        assert_eq!(evaluate(Some(&p), &plain(None)).rule_label(), Some(0));
        assert_eq!(evaluate(Some(&p), &mesh(&api, None)).rule_label(), Some(1));
        assert!(!evaluate(Some(&p), &mesh(&dev, None)).allowed);
    }

    #[test]
    fn a_deny_policy_without_rules_denies_everything() {
        let p = port(
            proto::DefaultPolicy::AllUnauthenticated,
            vec![("shop/lockdown", proto::Action::Deny, vec![])],
        );
        let d = evaluate(Some(&p), &plain(None));
        assert!(!d.allowed);
        assert_eq!(d.policy_label().map(|n| &*n.0), Some("shop/lockdown"));
        assert_eq!(d.rule_label(), None);
    }

    #[test]
    fn audit_annotates_default_allows_only() {
        use proto::Action::{Allow, Audit};
        let p = port(
            proto::DefaultPolicy::AllUnauthenticated,
            vec![(
                "shop/would-be",
                Audit,
                vec![rule(vec![from_sa("shop/api")], vec![])],
            )],
        );
        let api = id("spiffe://cluster.local/ns/shop/sa/api");
        let web = id("spiffe://cluster.local/ns/shop/sa/web");
        let d = evaluate(Some(&p), &mesh(&web, None));
        assert!(d.allowed);
        assert_eq!(
            d.audit_would_deny.as_ref().map(|n| &*n.0),
            Some("shop/would-be")
        );
        let d = evaluate(Some(&p), &mesh(&api, None));
        assert!(d.allowed && d.audit_would_deny.is_none());
        // A denial is not also an audit.
        let deny = port(
            proto::DefaultPolicy::Deny,
            vec![("shop/would-be", Audit, vec![])],
        );
        let d = evaluate(Some(&deny), &mesh(&web, None));
        assert!(!d.allowed && d.audit_would_deny.is_none());
        // Allowed by an ALLOW rule: turning the AUDIT into an ALLOW would change nothing.
        let with_allow = port(
            proto::DefaultPolicy::AllUnauthenticated,
            vec![
                ("shop/would-be", Audit, vec![]),
                ("shop/allow", Allow, vec![rule(vec![], vec![])]),
            ],
        );
        let d = evaluate(Some(&with_allow), &mesh(&web, None));
        assert!(d.allowed && d.audit_would_deny.is_none());
    }
}
