//! Property test: the compiled evaluator against a deliberately naive reference written
//! straight from the spec (DESIGN.md + inbound.proto), over random policies and requests
//! from a fixed seed. The reference works on the protobuf types, matches globs by
//! recursion, CIDRs bit by bit and compiles regexes on every call.

use std::collections::HashMap;
use std::net::IpAddr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft_api::inbound as proto;
use weft_certs::SpiffeId;

use super::{evaluate, Access, Basis, ClientIdentity, HttpAccess, PortPolicy};

#[derive(Debug)]
struct Req {
    id: Option<SpiffeId>,
    ip: IpAddr,
    tls: bool,
    http: Option<(String, String)>,
}

#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    allowed: bool,
    /// "default" unless an AuthorizationPolicy decided.
    policy: String,
    rule: Option<usize>,
    audit: Option<String>,
}

fn verdict(allowed: bool, policy: &str, rule: Option<usize>) -> Verdict {
    Verdict {
        allowed,
        policy: policy.to_string(),
        rule,
        audit: None,
    }
}

/// Steps 1–4 of the decision.
fn reference_decide(p: &proto::InboundPolicy, r: &Req) -> Verdict {
    if p.require_mtls && !r.tls {
        return verdict(false, "default", None);
    }
    if !r.tls {
        if let Some((method, path)) = &r.http {
            if (method == "GET" || method == "HEAD") && p.probe_paths.contains(path) {
                return verdict(true, "default", None);
            }
        }
    }
    for policy in &p.policies {
        if policy.action != proto::Action::Deny as i32 {
            continue;
        }
        if policy.rules.is_empty() {
            return verdict(false, &policy.name, None);
        }
        for (i, rule) in policy.rules.iter().enumerate() {
            if rule_matches(rule, r, true) {
                return verdict(false, &policy.name, Some(i));
            }
        }
    }
    let allows: Vec<&proto::Policy> = p
        .policies
        .iter()
        .filter(|x| x.action == proto::Action::Allow as i32)
        .collect();
    if !allows.is_empty() {
        for policy in allows {
            for (i, rule) in policy.rules.iter().enumerate() {
                if rule_matches(rule, r, false) {
                    return verdict(true, &policy.name, Some(i));
                }
            }
        }
        return verdict(false, "default", None);
    }
    let allowed = if p.default_policy == proto::DefaultPolicy::AllUnauthenticated as i32 {
        true
    } else if p.default_policy == proto::DefaultPolicy::AllAuthenticated as i32 {
        r.id.is_some()
    } else if p.default_policy == proto::DefaultPolicy::ClusterAuthenticated as i32 {
        match &r.id {
            Some(id) => id.trust_domain() == p.trust_domain,
            None => false,
        }
    } else {
        false
    };
    verdict(allowed, "default", None)
}

/// Step 5: an allowed request that would be denied if the AUDIT policies were ALLOW
/// policies counts as audit-would-deny.
fn reference(p: &proto::InboundPolicy, r: &Req) -> Verdict {
    let mut v = reference_decide(p, r);
    let audits: Vec<&proto::Policy> = p
        .policies
        .iter()
        .filter(|x| x.action == proto::Action::Audit as i32)
        .collect();
    if v.allowed && !audits.is_empty() {
        let mut flipped = p.clone();
        for x in &mut flipped.policies {
            if x.action == proto::Action::Audit as i32 {
                x.action = proto::Action::Allow as i32;
            }
        }
        if !reference_decide(&flipped, r).allowed {
            v.audit = Some(audits[0].name.clone());
        }
    }
    v
}

/// `deny`: the rule belongs to a DENY policy (HTTP-only `to` entries then also match opaque
/// connections, so a client cannot dodge a DENY by not speaking HTTP).
fn rule_matches(rule: &proto::Rule, r: &Req, deny: bool) -> bool {
    let from = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, r));
    let to = rule.to.is_empty() || rule.to.iter().any(|d| destination_matches(d, r, deny));
    from && to
}

fn source_matches(s: &proto::Source, r: &Req) -> bool {
    let mut checks = Vec::new();
    if !s.identities.is_empty() {
        checks.push(match &r.id {
            Some(id) => s.identities.iter().any(|pat| glob(pat, &id.to_string())),
            None => false,
        });
    }
    if !s.service_accounts.is_empty() {
        checks.push(match &r.id {
            Some(id) => s
                .service_accounts
                .iter()
                .any(|sa| *sa == format!("{}/{}", id.namespace(), id.service_account())),
            None => false,
        });
    }
    if !s.namespaces.is_empty() {
        checks.push(match &r.id {
            Some(id) => s.namespaces.iter().any(|ns| ns == id.namespace()),
            None => false,
        });
    }
    if !s.networks.is_empty() {
        checks.push(
            s.networks
                .iter()
                .any(|n| in_cidr(r.ip, &n.cidr) && !n.except.iter().any(|e| in_cidr(r.ip, e))),
        );
    }
    if s.unauthenticated {
        checks.push(r.id.is_none());
    }
    checks.iter().all(|c| *c)
}

fn destination_matches(d: &proto::Destination, r: &Req, deny: bool) -> bool {
    if d.methods.is_empty() && d.paths.is_empty() {
        return true;
    }
    let Some((method, path)) = &r.http else {
        return deny;
    };
    let method_ok = d.methods.is_empty() || d.methods.contains(method);
    let path_ok = d.paths.is_empty() || d.paths.iter().any(|p| path_matches(p, path));
    method_ok && path_ok
}

fn path_matches(pattern: &str, path: &str) -> bool {
    if let Some(re) = pattern.strip_prefix("regex:") {
        return regex::Regex::new(&format!("^(?:{re})$"))
            .map(|re| re.is_match(path))
            .unwrap_or(false);
    }
    if let Some(base) = pattern.strip_suffix("/*") {
        return path == base || path.starts_with(&format!("{base}/"));
    }
    pattern == path
}

fn glob(pattern: &str, s: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some(('*', rest)) => (0..=s.len()).any(|k| go(rest, &s[k..])),
            Some((c, rest)) => s.first() == Some(c) && go(rest, &s[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = s.chars().collect();
    go(&p, &s)
}

fn bits(ip: IpAddr) -> Vec<bool> {
    let bytes: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1 == 1))
        .collect()
}

fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    let (addr, len) = match cidr.split_once('/') {
        Some((a, l)) => (a, l.parse::<usize>().unwrap_or(usize::MAX)),
        None => (cidr, usize::MAX),
    };
    let Ok(net) = addr.parse::<IpAddr>() else {
        return false;
    };
    if net.is_ipv4() != ip.is_ipv4() {
        return false;
    }
    let (a, b) = (bits(net), bits(ip));
    let len = len.min(a.len());
    a[..len] == b[..len]
}

// ---- random generation ----

fn pick<'a, T>(rng: &mut StdRng, from: &'a [T]) -> &'a T {
    &from[rng.random_range(0..from.len())]
}

fn some<T: Clone>(rng: &mut StdRng, from: &[T], p: f64) -> Vec<T> {
    if !rng.random_bool(p) {
        return Vec::new();
    }
    let n = rng.random_range(1..=2);
    (0..n).map(|_| pick(rng, from).clone()).collect()
}

const IDENTITIES: &[&str] = &[
    "spiffe://cluster.local/ns/shop/sa/api",
    "spiffe://cluster.local/ns/shop/sa/web",
    "spiffe://cluster.local/ns/dev/sa/api",
    "spiffe://other.org/ns/shop/sa/api",
];
const ID_PATTERNS: &[&str] = &[
    "spiffe://cluster.local/ns/shop/sa/api",
    "spiffe://cluster.local/ns/shop/*",
    "*/sa/api",
    "spiffe://*/ns/shop/sa/*",
    "*",
    "spiffe://other.org/*",
    "*shop*web",
];
const SERVICE_ACCOUNTS: &[&str] = &["shop/api", "shop/web", "dev/api", "other/x"];
const NAMESPACES: &[&str] = &["shop", "dev", "prod"];
const IPS: &[&str] = &[
    "10.1.0.5",
    "10.1.2.7",
    "10.2.0.1",
    "192.168.1.1",
    "fd00::5",
    "2001:db8::1",
];
const CIDRS: &[&str] = &[
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "10.1.0.5/32",
    "10.1.0.5",
    "0.0.0.0/0",
    "fd00::/8",
    "::/0",
];
const METHODS: &[&str] = &["GET", "HEAD", "POST", "DELETE"];
const PATHS: &[&str] = &[
    "/",
    "/api",
    "/api/",
    "/api/v1/users/42",
    "/api/v1/orders",
    "/apix",
    "/admin",
    "/healthz",
    "/ready",
];
const PATH_PATTERNS: &[&str] = &[
    "/api/*",
    "/api/v1/orders",
    "/admin",
    "/*",
    "/healthz",
    "regex:/api/v1/users/[0-9]+",
    "regex:.*",
    "regex:/a(pi|dmin)",
];

fn random_source(rng: &mut StdRng) -> proto::Source {
    let networks = if rng.random_bool(0.3) {
        (0..rng.random_range(1..=2))
            .map(|_| proto::Network {
                cidr: pick(rng, CIDRS).to_string(),
                except: some(rng, CIDRS, 0.4)
                    .into_iter()
                    .map(str::to_string)
                    .collect(),
            })
            .collect()
    } else {
        Vec::new()
    };
    proto::Source {
        identities: some(rng, ID_PATTERNS, 0.3)
            .into_iter()
            .map(str::to_string)
            .collect(),
        service_accounts: some(rng, SERVICE_ACCOUNTS, 0.3)
            .into_iter()
            .map(str::to_string)
            .collect(),
        namespaces: some(rng, NAMESPACES, 0.25)
            .into_iter()
            .map(str::to_string)
            .collect(),
        networks,
        unauthenticated: rng.random_bool(0.15),
    }
}

fn random_destination(rng: &mut StdRng) -> proto::Destination {
    proto::Destination {
        methods: some(rng, METHODS, 0.5)
            .into_iter()
            .map(str::to_string)
            .collect(),
        paths: some(rng, PATH_PATTERNS, 0.5)
            .into_iter()
            .map(str::to_string)
            .collect(),
    }
}

fn random_policy(rng: &mut StdRng) -> proto::InboundPolicy {
    let policies = (0..rng.random_range(0..=4))
        .map(|i| {
            let rules = (0..rng.random_range(0..=3))
                .map(|_| proto::Rule {
                    from: (0..rng.random_range(0..=2))
                        .map(|_| random_source(rng))
                        .collect(),
                    to: (0..rng.random_range(0..=2))
                        .map(|_| random_destination(rng))
                        .collect(),
                })
                .collect();
            proto::Policy {
                name: format!("shop/p{i}"),
                action: *pick(
                    rng,
                    &[
                        proto::Action::Allow as i32,
                        proto::Action::Deny as i32,
                        proto::Action::Audit as i32,
                    ],
                ),
                rules,
            }
        })
        .collect();
    proto::InboundPolicy {
        protocol: proto::PortProtocol::Detect as i32,
        require_mtls: rng.random_bool(0.15),
        default_policy: rng.random_range(0..=3),
        trust_domain: "cluster.local".into(),
        policies,
        probe_paths: some(rng, &["/healthz", "/ready"], 0.4)
            .into_iter()
            .map(str::to_string)
            .collect(),
    }
}

fn random_request(rng: &mut StdRng) -> Req {
    let id = if rng.random_bool(0.6) {
        let uri: &&str = pick(rng, IDENTITIES);
        SpiffeId::parse(uri).ok()
    } else {
        None
    };
    // An identity only comes with mesh mTLS; plaintext has none.
    let tls = id.is_some();
    let http = rng
        .random_bool(0.7)
        .then(|| (pick(rng, METHODS).to_string(), pick(rng, PATHS).to_string()));
    Req {
        id,
        ip: pick(rng, IPS)
            .parse()
            .unwrap_or(IpAddr::from([10, 1, 0, 5])),
        tls,
        http,
    }
}

fn basis_kind(b: &Basis) -> &'static str {
    match b {
        Basis::NoPolicy => "no-policy",
        Basis::InvalidPolicy => "invalid",
        Basis::MtlsRequired => "mtls",
        Basis::Probe => "probe",
        Basis::DenyPolicy { .. } => "deny-policy",
        Basis::AllowPolicy { .. } => "allow-policy",
        Basis::NoAllowRuleMatched => "no-allow-rule",
        Basis::Default(_) => "default",
    }
}

#[test]
fn compiled_evaluator_agrees_with_the_reference() {
    let mut rng = StdRng::seed_from_u64(0x5eed_a07b);
    let mut seen: HashMap<&'static str, usize> = HashMap::new();
    let mut audits = 0;
    let mut decisions = 0;
    for round in 0..2_500 {
        let msg = random_policy(&mut rng);
        let compiled = match PortPolicy::compile(&msg, "cluster.local") {
            Ok(c) => c,
            Err(e) => panic!("round {round}: generated policy did not compile: {e}\n{msg:#?}"),
        };
        for _ in 0..20 {
            let r = random_request(&mut rng);
            let identity = r.id.clone().map(ClientIdentity::new);
            let access = Access {
                peer: identity.as_ref(),
                ip: r.ip,
                tls: r.tls,
                http: r.http.as_ref().map(|(method, path)| HttpAccess {
                    method: method.as_str(),
                    path: path.as_str(),
                }),
            };
            let d = evaluate(Some(&compiled), &access);
            let got = Verdict {
                allowed: d.allowed,
                policy: d
                    .policy_label()
                    .map_or_else(|| "default".to_string(), |n| n.0.to_string()),
                rule: d.rule_label(),
                audit: d.audit_would_deny.as_ref().map(|n| n.0.to_string()),
            };
            let want = reference(&msg, &r);
            assert_eq!(
                got, want,
                "round {round}: the evaluator and the reference disagree\nrequest: {r:#?}\npolicy: {msg:#?}"
            );
            *seen.entry(basis_kind(&d.basis)).or_default() += 1;
            audits += usize::from(got.audit.is_some());
            decisions += 1;
        }
    }
    // The generator must reach every kind of decision, or the comparison proves little.
    for kind in [
        "mtls",
        "probe",
        "deny-policy",
        "allow-policy",
        "no-allow-rule",
        "default",
    ] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) >= 100,
            "{kind} decided too rarely: {seen:?}"
        );
    }
    assert!(audits >= 100, "audit-would-deny too rare: {audits}");
    assert_eq!(decisions, 50_000);
}

#[test]
fn the_reference_itself_follows_the_seed_scenario() {
    // Guards the reference against being wrong in the same way as the evaluator.
    let msg = proto::InboundPolicy {
        default_policy: proto::DefaultPolicy::Deny as i32,
        trust_domain: "cluster.local".into(),
        policies: vec![proto::Policy {
            name: "shop/internal-api".into(),
            action: proto::Action::Allow as i32,
            rules: vec![proto::Rule {
                from: vec![proto::Source {
                    service_accounts: vec!["shop/api".into()],
                    ..Default::default()
                }],
                to: vec![
                    proto::Destination {
                        methods: vec!["GET".into()],
                        paths: vec!["regex:/api/v1/users/.*".into()],
                    },
                    proto::Destination {
                        methods: vec!["POST".into()],
                        paths: vec!["/api/v1/orders".into()],
                    },
                ],
            }],
        }],
        ..Default::default()
    };
    let req = |id: &str, method: &str, path: &str| Req {
        id: SpiffeId::parse(id).ok(),
        ip: IpAddr::from([10, 1, 0, 5]),
        tls: true,
        http: Some((method.into(), path.into())),
    };
    let api = "spiffe://cluster.local/ns/shop/sa/api";
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    assert!(reference(&msg, &req(api, "GET", "/api/v1/users/42")).allowed);
    assert!(reference(&msg, &req(api, "POST", "/api/v1/orders")).allowed);
    assert!(!reference(&msg, &req(api, "DELETE", "/api/v1/users/42")).allowed);
    assert!(!reference(&msg, &req(api, "GET", "/admin")).allowed);
    assert!(!reference(&msg, &req(web, "GET", "/api/v1/users/42")).allowed);
    assert!(glob("a*c", "abbbc") && !glob("a*c", "abbb"));
    assert!(in_cidr("10.1.2.3".parse().unwrap(), "10.1.0.0/16"));
    assert!(!in_cidr("10.2.2.3".parse().unwrap(), "10.1.0.0/16"));
}
