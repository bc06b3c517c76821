//! The compiled form of one port's inbound policy, built once per control-plane update:
//! regexes anchored and compiled, CIDRs parsed, identity wildcards split, enums checked.
//! Anything that does not compile rejects the whole update (never half-applied).

use std::net::IpAddr;

use weft_api::inbound as proto;
use weft_certs::SpiffeId;

use crate::metrics::Name;

/// Compiled programs of one `regex:` path are capped so a hostile or careless policy
/// cannot make every proxy of a workload allocate without bound.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Longer patterns are refused before compiling.
const MAX_REGEX_LEN: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy {policy:?}: {field}: {reason}")]
    Invalid {
        policy: String,
        field: String,
        reason: String,
    },
    #[error("{field}: unknown value {value}")]
    UnknownEnum { field: &'static str, value: i32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Detect,
    Http1,
    Http2,
    Grpc,
    Opaque,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultPolicy {
    AllUnauthenticated,
    AllAuthenticated,
    ClusterAuthenticated,
    Deny,
}

impl DefaultPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::AllUnauthenticated => "all-unauthenticated",
            DefaultPolicy::AllAuthenticated => "all-authenticated",
            DefaultPolicy::ClusterAuthenticated => "cluster-authenticated",
            DefaultPolicy::Deny => "deny",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// Everything the proxy enforces on one port of its pod.
#[derive(Debug)]
pub struct PortPolicy {
    pub protocol: Protocol,
    pub require_mtls: bool,
    pub default: DefaultPolicy,
    pub trust_domain: String,
    /// In the control plane's (stable) order: the first matching policy names a decision.
    pub policies: Vec<Policy>,
    /// Query-less paths of the pod's HTTP probes on this port.
    pub probe_paths: Vec<String>,
    /// Precomputed because every request asks.
    pub(crate) has_allow: bool,
    /// The first AUDIT policy: it names audit-would-deny counts.
    pub(crate) first_audit: Option<Name>,
    /// The control plane's first answer did not compile: refuse everything until one does.
    pub(crate) invalid: bool,
}

#[derive(Debug)]
pub struct Policy {
    /// "namespace/name": a bounded metrics label.
    pub name: Name,
    pub action: Action,
    pub rules: Vec<Rule>,
}

#[derive(Debug)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Destination>,
}

/// Every field that is set must match; values inside one field are alternatives.
#[derive(Debug, Default)]
pub struct Source {
    pub identities: Vec<Glob>,
    /// (namespace, service account)
    pub service_accounts: Vec<(String, String)>,
    pub namespaces: Vec<String>,
    pub networks: Vec<Network>,
    pub unauthenticated: bool,
}

#[derive(Debug)]
pub struct Network {
    pub cidr: Cidr,
    pub except: Vec<Cidr>,
}

#[derive(Debug, Default)]
pub struct Destination {
    pub methods: Vec<String>,
    pub paths: Vec<PathMatch>,
}

#[derive(Debug)]
pub enum PathMatch {
    Exact(String),
    /// `/api/*` is stored as `/api`: it matches `/api` and everything under `/api/`.
    Prefix(String),
    /// Anchored at both ends; the `regex` crate matches in linear time.
    Regex(regex::Regex),
}

/// The client a decision is about, once per connection.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub id: SpiffeId,
    /// The SPIFFE URI, matched by identity globs and used as the `client_id` label.
    pub uri: Name,
}

impl ClientIdentity {
    pub fn new(id: SpiffeId) -> Self {
        let uri = Name::new(&id.to_string());
        ClientIdentity { id, uri }
    }
}

/// One connection (opaque TCP, `http: None`) or one request to be authorized.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    /// The client's mesh identity; `None` for plaintext.
    pub peer: Option<&'a ClientIdentity>,
    pub ip: IpAddr,
    /// Arrived over mesh mTLS.
    pub tls: bool,
    pub http: Option<HttpAccess<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct HttpAccess<'a> {
    pub method: &'a str,
    /// Already normalized with [`super::normalize_path`].
    pub path: &'a str,
}

impl PortPolicy {
    /// Compiles the control plane's answer. `local_trust_domain` stands in for an empty
    /// `trust_domain` (cluster-authenticated then means "this proxy's own").
    pub fn compile(
        msg: &proto::InboundPolicy,
        local_trust_domain: &str,
    ) -> Result<PortPolicy, PolicyError> {
        let protocol = match proto::PortProtocol::try_from(msg.protocol) {
            Ok(proto::PortProtocol::Detect) => Protocol::Detect,
            Ok(proto::PortProtocol::Http1) => Protocol::Http1,
            Ok(proto::PortProtocol::Http2) => Protocol::Http2,
            Ok(proto::PortProtocol::Grpc) => Protocol::Grpc,
            Ok(proto::PortProtocol::Opaque) => Protocol::Opaque,
            Err(_) => {
                return Err(PolicyError::UnknownEnum {
                    field: "protocol",
                    value: msg.protocol,
                })
            }
        };
        let default = match proto::DefaultPolicy::try_from(msg.default_policy) {
            Ok(proto::DefaultPolicy::AllUnauthenticated) => DefaultPolicy::AllUnauthenticated,
            Ok(proto::DefaultPolicy::AllAuthenticated) => DefaultPolicy::AllAuthenticated,
            Ok(proto::DefaultPolicy::ClusterAuthenticated) => DefaultPolicy::ClusterAuthenticated,
            Ok(proto::DefaultPolicy::Deny) => DefaultPolicy::Deny,
            Err(_) => {
                return Err(PolicyError::UnknownEnum {
                    field: "default_policy",
                    value: msg.default_policy,
                })
            }
        };
        let policies = msg
            .policies
            .iter()
            .map(Policy::compile)
            .collect::<Result<Vec<_>, _>>()?;
        let trust_domain = if msg.trust_domain.is_empty() {
            local_trust_domain.to_string()
        } else {
            msg.trust_domain.clone()
        };
        let probe_paths = msg
            .probe_paths
            .iter()
            .map(|p| p.split_once('?').map_or(p.as_str(), |(path, _)| path))
            .map(|p| super::normalize_path(p).into_owned())
            .collect();
        Ok(PortPolicy {
            protocol,
            require_mtls: msg.require_mtls,
            default,
            trust_domain,
            has_allow: policies.iter().any(|p| p.action == Action::Allow),
            first_audit: policies
                .iter()
                .find(|p| p.action == Action::Audit)
                .map(|p| p.name.clone()),
            policies,
            probe_paths,
            invalid: false,
        })
    }

    /// What a port enforces when the control plane's first answer could not be compiled.
    pub fn refuse_all() -> PortPolicy {
        PortPolicy {
            protocol: Protocol::Detect,
            require_mtls: false,
            default: DefaultPolicy::Deny,
            trust_domain: String::new(),
            policies: Vec::new(),
            probe_paths: Vec::new(),
            has_allow: false,
            first_audit: None,
            invalid: true,
        }
    }

    pub fn is_invalid(&self) -> bool {
        self.invalid
    }
}

impl Policy {
    fn compile(p: &proto::Policy) -> Result<Policy, PolicyError> {
        let invalid = |field: String, reason: String| PolicyError::Invalid {
            policy: p.name.clone(),
            field,
            reason,
        };
        if p.name.is_empty() {
            return Err(invalid("name".into(), "must not be empty".into()));
        }
        let action = match proto::Action::try_from(p.action) {
            Ok(proto::Action::Allow) => Action::Allow,
            Ok(proto::Action::Deny) => Action::Deny,
            Ok(proto::Action::Audit) => Action::Audit,
            Err(_) => {
                return Err(invalid(
                    "action".into(),
                    format!("unknown value {}", p.action),
                ))
            }
        };
        let mut rules = Vec::with_capacity(p.rules.len());
        for (r, rule) in p.rules.iter().enumerate() {
            let mut from = Vec::with_capacity(rule.from.len());
            for (f, src) in rule.from.iter().enumerate() {
                from.push(Source::compile(src).map_err(|(field, why)| {
                    invalid(format!("rules[{r}].from[{f}].{field}"), why)
                })?);
            }
            let mut to = Vec::with_capacity(rule.to.len());
            for (t, dst) in rule.to.iter().enumerate() {
                to.push(
                    Destination::compile(dst).map_err(|(field, why)| {
                        invalid(format!("rules[{r}].to[{t}].{field}"), why)
                    })?,
                );
            }
            rules.push(Rule { from, to });
        }
        Ok(Policy {
            name: Name::new(&p.name),
            action,
            rules,
        })
    }

    /// `Some(rule index)` of the first matching rule; `Some(None)` when a rule-less DENY
    /// policy denies everything; `None` when nothing matches.
    pub fn matching_rule(&self, access: &Access<'_>) -> Option<Option<usize>> {
        if self.rules.is_empty() {
            // No rules: an ALLOW (or AUDIT) policy allows nothing, a DENY policy denies everything.
            return (self.action == Action::Deny).then_some(None);
        }
        let deny = self.action == Action::Deny;
        self.rules
            .iter()
            .position(|r| r.matches(access, deny))
            .map(Some)
    }
}

impl Rule {
    /// `deny`: this rule belongs to a DENY policy; see [`Destination::matches`].
    pub fn matches(&self, access: &Access<'_>, deny: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(access)))
            && (self.to.is_empty() || self.to.iter().any(|d| d.matches(access, deny)))
    }
}

/// A compile error of one field: (field path, reason).
type FieldError = (String, String);

impl Source {
    fn compile(src: &proto::Source) -> Result<Source, FieldError> {
        let identities = src
            .identities
            .iter()
            .enumerate()
            .map(|(i, pat)| {
                if pat.is_empty() {
                    Err((format!("identities[{i}]"), "must not be empty".to_string()))
                } else {
                    Ok(Glob::new(pat))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let service_accounts = src
            .service_accounts
            .iter()
            .enumerate()
            .map(|(i, sa)| match sa.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Ok((ns.to_string(), name.to_string()))
                }
                _ => Err((
                    format!("service_accounts[{i}]"),
                    format!("{sa:?} is not \"namespace/name\""),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (i, ns) in src.namespaces.iter().enumerate() {
            if ns.is_empty() {
                return Err((format!("namespaces[{i}]"), "must not be empty".into()));
            }
        }
        let mut networks = Vec::with_capacity(src.networks.len());
        for (i, net) in src.networks.iter().enumerate() {
            let cidr =
                Cidr::parse(&net.cidr).map_err(|why| (format!("networks[{i}].cidr"), why))?;
            let except = net
                .except
                .iter()
                .enumerate()
                .map(|(e, c)| {
                    Cidr::parse(c).map_err(|why| (format!("networks[{i}].except[{e}]"), why))
                })
                .collect::<Result<Vec<_>, _>>()?;
            networks.push(Network { cidr, except });
        }
        Ok(Source {
            identities,
            service_accounts,
            namespaces: src.namespaces.clone(),
            networks,
            unauthenticated: src.unauthenticated,
        })
    }

    pub fn matches(&self, access: &Access<'_>) -> bool {
        let peer = access.peer;
        if self.unauthenticated && peer.is_some() {
            return false;
        }
        if !self.identities.is_empty() {
            let Some(peer) = peer else { return false };
            if !self.identities.iter().any(|g| g.matches(&peer.uri.0)) {
                return false;
            }
        }
        if !self.service_accounts.is_empty() {
            let Some(peer) = peer else { return false };
            let (ns, sa) = (peer.id.namespace(), peer.id.service_account());
            if !self
                .service_accounts
                .iter()
                .any(|(n, s)| n == ns && s == sa)
            {
                return false;
            }
        }
        if !self.namespaces.is_empty() {
            let Some(peer) = peer else { return false };
            if !self.namespaces.iter().any(|n| n == peer.id.namespace()) {
                return false;
            }
        }
        if !self.networks.is_empty() && !self.networks.iter().any(|n| n.contains(access.ip)) {
            return false;
        }
        true
    }
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }
}

impl Destination {
    fn compile(dst: &proto::Destination) -> Result<Destination, FieldError> {
        for (i, m) in dst.methods.iter().enumerate() {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((
                    format!("methods[{i}]"),
                    format!("{m:?} is not an HTTP method"),
                ));
            }
        }
        let paths = dst
            .paths
            .iter()
            .enumerate()
            .map(|(i, p)| PathMatch::compile(p).map_err(|why| (format!("paths[{i}]"), why)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Destination {
            methods: dst.methods.clone(),
            paths,
        })
    }

    /// A destination naming methods or paths matches requests by them. On an opaque
    /// connection (no request to look at) it never lets anything in through an ALLOW rule,
    /// and always matches for a DENY rule: a client must not dodge a DENY by not speaking
    /// HTTP (an Upgrade, or bytes detection cannot classify).
    pub fn matches(&self, access: &Access<'_>, deny: bool) -> bool {
        if self.methods.is_empty() && self.paths.is_empty() {
            return true;
        }
        let Some(http) = access.http else {
            return deny;
        };
        (self.methods.is_empty() || self.methods.iter().any(|m| m == http.method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(http.path)))
    }
}

impl PathMatch {
    pub fn compile(p: &str) -> Result<PathMatch, String> {
        if let Some(re) = p.strip_prefix("regex:") {
            if re.len() > MAX_REGEX_LEN {
                return Err(format!(
                    "regex is {} bytes; at most {MAX_REGEX_LEN} are allowed",
                    re.len()
                ));
            }
            return regex::RegexBuilder::new(&format!("^(?:{re})$"))
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map(PathMatch::Regex)
                .map_err(|e| format!("invalid regex {re:?}: {e}"));
        }
        if !p.starts_with('/') {
            return Err(format!(
                "{p:?} must start with \"/\" (or be \"regex:<pattern>\")"
            ));
        }
        match p.strip_suffix("/*") {
            Some(prefix) if !prefix.contains('*') => Ok(PathMatch::Prefix(prefix.to_string())),
            _ if p.contains('*') => Err(format!(
                "{p:?}: `*` is only allowed as a final \"/*\" (use regex: for more)"
            )),
            _ => Ok(PathMatch::Exact(p.to_string())),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(prefix) => path
                .strip_prefix(prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            PathMatch::Regex(re) => re.is_match(path),
        }
    }
}

/// An identity pattern where `*` matches any run of characters (including none and `/`).
#[derive(Debug)]
pub struct Glob {
    /// The pattern split at each `*`; one part means no wildcard.
    parts: Vec<String>,
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob {
            parts: pattern.split('*').map(str::to_string).collect(),
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(split) => split,
            None => return s.is_empty(),
        };
        let Some((last, middle)) = rest.split_last() else {
            return s == first;
        };
        if s.len() < first.len() + last.len() || !s.starts_with(first.as_str()) {
            return false;
        }
        if !s.ends_with(last.as_str()) {
            return false;
        }
        // Leftmost placement of each middle part is optimal for `*`-only patterns.
        let end = s.len() - last.len();
        let mut pos = first.len();
        for part in middle {
            match s[pos..end].find(part.as_str()) {
                Some(at) => pos += at + part.len(),
                None => return false,
            }
        }
        true
    }
}

/// An IPv4 or IPv6 network; a bare address is a single host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cidr {
    V4 { net: u32, mask: u32 },
    V6 { net: u128, mask: u128 },
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR (address/prefix-length)"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => {
                match l.parse::<u32>() {
                    Ok(n) if n <= max => n,
                    _ => return Err(format!("{s:?}: prefix length must be 0..={max}")),
                }
            }
            Some(_) => return Err(format!("{s:?}: prefix length must be 0..={max}")),
        };
        Ok(match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                Cidr::V4 {
                    net: u32::from(v4) & mask,
                    mask,
                }
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                Cidr::V6 {
                    net: u128::from(v6) & mask,
                    mask,
                }
            }
        })
    }

    /// IPv4-mapped IPv6 clients (a dual-stack listener's view) count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip.to_canonical()) {
            (Cidr::V4 { net, mask }, IpAddr::V4(v4)) => u32::from(v4) & mask == *net,
            (Cidr::V6 { net, mask }, IpAddr::V6(v6)) => u128::from(v6) & mask == *net,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_any_run_of_characters() {
        let g = Glob::new("spiffe://cluster.local/ns/shop/*");
        assert!(g.matches("spiffe://cluster.local/ns/shop/sa/api"));
        assert!(!g.matches("spiffe://cluster.local/ns/shopping/sa/api"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("*/sa/web").matches("spiffe://a/ns/b/sa/web"));
        assert!(!Glob::new("*/sa/web").matches("spiffe://a/ns/b/sa/webx"));
        assert!(Glob::new("a*b*c").matches("abc"));
        assert!(Glob::new("a*b*c").matches("aXbYbZc"));
        assert!(!Glob::new("a*b*c").matches("acb"));
        // First and last parts must not overlap.
        assert!(!Glob::new("ab*ba").matches("aba"));
        assert!(Glob::new("exact").matches("exact"));
        assert!(!Glob::new("exact").matches("exactly"));
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        // IPv4-mapped IPv6 is the same client.
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("192.0.2.1".parse().unwrap()));
        assert!(!Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));
        let host = Cidr::parse("10.1.2.3").unwrap();
        assert!(host.contains("10.1.2.3".parse().unwrap()));
        assert!(!host.contains("10.1.2.4".parse().unwrap()));
        // Host bits are masked off rather than refused.
        assert!(Cidr::parse("10.1.2.3/8")
            .unwrap()
            .contains("10.200.0.1".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("::/0")
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0/8",
            "fd00::/129",
            "example.com/8",
            "",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_forms() {
        let prefix = PathMatch::compile("/api/*").unwrap();
        assert!(prefix.matches("/api"));
        assert!(prefix.matches("/api/"));
        assert!(prefix.matches("/api/v1/users"));
        assert!(!prefix.matches("/apix"));
        assert!(!prefix.matches("/ap"));
        let all = PathMatch::compile("/*").unwrap();
        assert!(all.matches("/") && all.matches("/anything/at/all"));
        let exact = PathMatch::compile("/api/v1/orders").unwrap();
        assert!(exact.matches("/api/v1/orders"));
        assert!(!exact.matches("/api/v1/orders/"));
        let re = PathMatch::compile("regex:/api/v1/users/.*").unwrap();
        assert!(re.matches("/api/v1/users/42"));
        // Anchored at both ends: a match inside the path is not enough.
        assert!(!re.matches("/x/api/v1/users/42"));
        let alt = PathMatch::compile("regex:/a|/b").unwrap();
        assert!(alt.matches("/a") && alt.matches("/b"));
        assert!(!alt.matches("/a/b") && !alt.matches("/ab"));
        for bad in ["api", "/a*", "/a/*/b", "regex:(", "", "*"] {
            assert!(PathMatch::compile(bad).is_err(), "{bad}");
        }
        let huge = format!("regex:{}", "a".repeat(MAX_REGEX_LEN + 1));
        assert!(PathMatch::compile(&huge).is_err());
        // Within the length cap but beyond the compiled-size cap.
        assert!(PathMatch::compile("regex:(?:[a-z]{1000}){1000}").is_err());
    }

    #[test]
    fn catastrophic_regex_runs_in_linear_time() {
        // A backtracking engine needs exponential time here; this must simply finish.
        let re = PathMatch::compile("regex:(a+)+$").unwrap();
        let mut path = "a".repeat(100 * 1024);
        path.push('b');
        assert!(!re.matches(&path));
        path.pop();
        assert!(re.matches(&path));
    }

    fn policy(name: &str, rules: Vec<proto::Rule>) -> proto::Policy {
        proto::Policy {
            name: name.into(),
            action: proto::Action::Allow as i32,
            rules,
        }
    }

    #[test]
    fn invalid_fields_are_named() {
        let bad_cidr = proto::InboundPolicy {
            policies: vec![policy(
                "shop/db",
                vec![proto::Rule {
                    from: vec![
                        proto::Source::default(),
                        proto::Source {
                            networks: vec![proto::Network {
                                cidr: "10.0.0.0/8".into(),
                                except: vec!["10.1.0.0/99".into()],
                            }],
                            ..Default::default()
                        },
                    ],
                    to: vec![],
                }],
            )],
            ..Default::default()
        };
        let err = PortPolicy::compile(&bad_cidr, "cluster.local").unwrap_err();
        assert_eq!(
            err.to_string(),
            "policy \"shop/db\": rules[0].from[1].networks[0].except[0]: \"10.1.0.0/99\": prefix length must be 0..=32"
        );
        let bad_regex = proto::InboundPolicy {
            policies: vec![policy(
                "shop/api",
                vec![proto::Rule {
                    from: vec![],
                    to: vec![proto::Destination {
                        methods: vec![],
                        paths: vec!["/ok".into(), "regex:/users/(".into()],
                    }],
                }],
            )],
            ..Default::default()
        };
        let err = PortPolicy::compile(&bad_regex, "cluster.local").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("policy \"shop/api\": rules[0].to[0].paths[1]: invalid regex"),
            "{text}"
        );
        let bad_sa = proto::InboundPolicy {
            policies: vec![policy(
                "shop/x",
                vec![proto::Rule {
                    from: vec![proto::Source {
                        service_accounts: vec!["api".into()],
                        ..Default::default()
                    }],
                    to: vec![],
                }],
            )],
            ..Default::default()
        };
        assert!(PortPolicy::compile(&bad_sa, "cluster.local")
            .unwrap_err()
            .to_string()
            .contains("rules[0].from[0].service_accounts[0]"));
        let bad_enum = proto::InboundPolicy {
            default_policy: 42,
            ..Default::default()
        };
        assert_eq!(
            PortPolicy::compile(&bad_enum, "cluster.local").unwrap_err(),
            PolicyError::UnknownEnum {
                field: "default_policy",
                value: 42
            }
        );
        let bad_action = proto::InboundPolicy {
            policies: vec![proto::Policy {
                name: "shop/a".into(),
                action: 9,
                rules: vec![],
            }],
            ..Default::default()
        };
        assert!(PortPolicy::compile(&bad_action, "cluster.local")
            .unwrap_err()
            .to_string()
            .contains("action: unknown value 9"));
    }

    #[test]
    fn compile_fills_in_defaults() {
        let msg = proto::InboundPolicy {
            protocol: proto::PortProtocol::Opaque as i32,
            probe_paths: vec!["/healthz?verbose=1".into(), "/ready".into()],
            policies: vec![
                proto::Policy {
                    name: "shop/audit".into(),
                    action: proto::Action::Audit as i32,
                    rules: vec![],
                },
                policy("shop/allow", vec![]),
            ],
            ..Default::default()
        };
        let p = PortPolicy::compile(&msg, "example.org").unwrap();
        assert_eq!(p.protocol, Protocol::Opaque);
        assert_eq!(p.default, DefaultPolicy::AllUnauthenticated);
        assert_eq!(p.trust_domain, "example.org");
        assert_eq!(p.probe_paths, vec!["/healthz", "/ready"]);
        assert!(p.has_allow);
        assert_eq!(p.first_audit.as_ref().map(|n| &*n.0), Some("shop/audit"));
        assert!(!p.is_invalid() && PortPolicy::refuse_all().is_invalid());
    }
}
