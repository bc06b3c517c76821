//! `AuthorizationPolicy` (`policy.weft.io/v1alpha1`) as a domain type: which pods and ports
//! it protects, what it does, who and which requests its rules match, and the checks that
//! keep an invalid policy from ever reaching a proxy. Matching itself happens in proxies;
//! the control plane only selects policies and ships them whole.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use super::{
    check_dns_label, check_dns_subdomain, check_labels, check_port_name, selector_matches,
    target_port_of, InvalidField, Pod, TargetPort,
};

/// Bounds that keep one policy's cost in every proxy small; far above what people write.
pub const MAX_RULES: usize = 64;
/// `from` or `to` entries in one rule.
pub const MAX_RULE_ENTRIES: usize = 64;
/// Items in one list field (identities, paths, ...).
pub const MAX_LIST_ITEMS: usize = 256;
pub const MAX_PORTS: usize = 64;
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest `regex:` pattern accepted; longer ones are refused, never truncated.
pub const MAX_REGEX_BYTES: usize = 1024;
/// Compiled-program cap, so that a short pattern with huge repetitions (`\w{1000}{1000}`)
/// is refused here instead of costing every proxy memory.
pub const MAX_REGEX_PROGRAM_BYTES: usize = 1 << 20;
const MAX_IDENTITY_BYTES: usize = 2048;
const MAX_METHOD_BYTES: usize = 64;
/// Marks a path pattern as a regular expression (RE2 syntax, whole-path match).
pub const REGEX_PATH_PREFIX: &str = "regex:";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    /// `spec.selector.matchLabels`; empty selects every pod of the policy's namespace.
    pub selector: BTreeMap<String, String>,
    /// Empty: every port. A name is looked up among the selected pod's container ports.
    pub ports: Vec<TargetPort>,
    pub action: PolicyAction,
    /// No rules: an ALLOW policy allows nothing, a DENY or AUDIT policy matches everything.
    pub rules: Vec<PolicyRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
    /// Allows, but proxies count and log what an ALLOW policy would have denied.
    Audit,
}

impl PolicyAction {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "ALLOW" => Some(Self::Allow),
            "DENY" => Some(Self::Deny),
            "AUDIT" => Some(Self::Audit),
            _ => None,
        }
    }
}

/// Matches when one `from` entry and one `to` entry match; an empty list matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyRule {
    pub from: Vec<SourceMatch>,
    pub to: Vec<DestinationMatch>,
}

/// Every non-empty field must match; the items of one field are alternatives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceMatch {
    /// `spiffe://` ids in which `*` matches any run of characters.
    pub identities: Vec<String>,
    /// `namespace/name`.
    pub service_accounts: Vec<String>,
    pub namespaces: Vec<String>,
    pub networks: Vec<NetworkMatch>,
    /// Matches clients without an identity (plaintext) only.
    pub unauthenticated: bool,
}

impl SourceMatch {
    fn has_identity_fields(&self) -> bool {
        !self.identities.is_empty()
            || !self.service_accounts.is_empty()
            || !self.namespaces.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkMatch {
    pub cidr: IpNet,
    /// Sub-networks of `cidr` that do not match.
    pub except: Vec<IpNet>,
}

/// HTTP only: an entry with methods or paths never matches an opaque TCP connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationMatch {
    /// Upper case.
    pub methods: Vec<String>,
    pub paths: Vec<PathPattern>,
}

/// How a policy path is written: `/exact`, `/prefix/*` or `regex:<RE2>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    /// The part before the `*`, so always ending in `/`: `/api/*` is `Prefix("/api/")`,
    /// which matches `/api/` and everything below it but not `/api` itself.
    Prefix(String),
    /// Without the `regex:` marker; proxies match it against the whole path.
    Regex(String),
}

impl PathPattern {
    /// Parses and validates one `paths` item.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(pattern) = text.strip_prefix(REGEX_PATH_PREFIX) {
            check_path_regex(pattern)?;
            return Ok(Self::Regex(pattern.to_owned()));
        }
        if let Some(prefix) = text.strip_suffix('*') {
            if !prefix.ends_with('/') {
                return Err(format!(
                    "{text:?}: '*' is only allowed as a final \"/*\" (prefix match)"
                ));
            }
            check_plain_path(text, prefix)?;
            return Ok(Self::Prefix(prefix.to_owned()));
        }
        check_plain_path(text, text)?;
        Ok(Self::Exact(text.to_owned()))
    }
}

/// Back to the form users write (and the proxy contract carries).
impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(path) => f.write_str(path),
            Self::Prefix(prefix) => write!(f, "{prefix}*"),
            Self::Regex(pattern) => write!(f, "{REGEX_PATH_PREFIX}{pattern}"),
        }
    }
}

/// An absolute, normalised request path: what a proxy compares after normalising the
/// request's, so a pattern that no normalised request can ever equal is refused.
fn check_plain_path(text: &str, path: &str) -> Result<(), String> {
    let invalid = |why: &str| Err(format!("{text:?} {why}"));
    if text.len() > MAX_PATH_BYTES {
        return invalid(&format!("is longer than {MAX_PATH_BYTES} bytes"));
    }
    if !path.starts_with('/') {
        return invalid("must start with '/' (or be \"regex:<pattern>\")");
    }
    for bad in ["//", "/./", "/../"] {
        if path.contains(bad) {
            return invalid(&format!("must not contain {bad:?}"));
        }
    }
    if path.ends_with("/..") || path.ends_with("/.") {
        return invalid("must not end with \"/..\" or \"/.\"");
    }
    let bytes = path.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let b = bytes[at];
        if b == b'%' {
            let escaped = bytes
                .get(at + 1..at + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit));
            if !escaped {
                return invalid("has a '%' not followed by two hex digits");
            }
            at += 3;
            continue;
        }
        if b == b'*' {
            return invalid("may contain '*' only as a final \"/*\" (prefix match)");
        }
        // RFC 3986 path characters; '?' and '#' end a path, so they cannot be in one.
        if !(b.is_ascii_alphanumeric() || b"-/._~!$&'()+,;=:@".contains(&b)) {
            return invalid(&format!(
                "contains {:?}, which must be percent-encoded in a path",
                char::from(b)
            ));
        }
        at += 1;
    }
    Ok(())
}

/// Compiles the pattern as proxies will use it (anchored at both ends) with the `regex`
/// crate, whose engine runs in time linear in the input: no pattern can backtrack
/// catastrophically, so the only costs to bound are pattern and program size.
fn check_path_regex(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("regex: the pattern must not be empty".to_owned());
    }
    if pattern.len() > MAX_REGEX_BYTES {
        return Err(format!(
            "regex: the pattern is longer than {MAX_REGEX_BYTES} bytes"
        ));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(MAX_REGEX_PROGRAM_BYTES)
        .build()
        .map(drop)
        .map_err(|e| format!("invalid regex {pattern:?}: {e}"))
}

/// An IP network in CIDR form with no host bits set; its `Display` is canonical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpNet {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR like 10.0.0.0/8 or fd00::/8"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?}: {addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = Some(len)
            .filter(|len| {
                !len.is_empty() && len.len() <= 3 && len.bytes().all(|b| b.is_ascii_digit())
            })
            .and_then(|len| len.parse::<u8>().ok())
            .filter(|len| *len <= max)
            .ok_or_else(|| format!("{text:?}: the prefix length must be 0-{max}"))?;
        let network = mask(addr, prefix_len);
        if network != addr {
            // Almost always a typo: say which network the text would have meant.
            return Err(format!(
                "{text:?} has host bits set (the network is {network}/{prefix_len})"
            ));
        }
        Ok(Self { addr, prefix_len })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }

    /// Whether every address of `other` is in `self`.
    pub fn covers(&self, other: &IpNet) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(other.addr)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((bits & kept).into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((bits & kept).into())
        }
    }
}

/// `spiffe://<trust domain>[/<path>]` where `*` may stand for any run of characters.
/// Other SPIFFE issuers' ids are allowed, so only the SPIFFE character rules are checked.
fn check_identity_pattern(text: &str) -> Result<(), String> {
    let rest = text
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("{text:?} must start with spiffe://"))?;
    if text.len() > MAX_IDENTITY_BYTES {
        return Err(format!(
            "{text:?} is longer than {MAX_IDENTITY_BYTES} bytes"
        ));
    }
    let (trust_domain, path) = match rest.split_once('/') {
        Some((trust_domain, path)) => (trust_domain, Some(path)),
        None => (rest, None),
    };
    let domain_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_*".contains(&b);
    if trust_domain.is_empty() || !trust_domain.bytes().all(domain_ok) {
        return Err(format!(
            "{text:?}: the trust domain must be lowercase letters, digits, '.', '-', '_' (or '*')"
        ));
    }
    if let Some(path) = path {
        for segment in path.split('/') {
            let segment_ok = !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_*".contains(&b));
            if !segment_ok {
                return Err(format!(
                    "{text:?}: path segments must be non-empty letters, digits, '.', '-', '_' (or '*'), not \".\" or \"..\""
                ));
            }
        }
    }
    Ok(())
}

/// RFC 9110 token (what a method is), already upper-cased by the source.
fn check_method(method: &str) -> Result<(), String> {
    let token = !method.is_empty()
        && method.len() <= MAX_METHOD_BYTES
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(format!("{method:?} is not an HTTP method (a token)"));
    }
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(format!("{method:?} must be upper case"));
    }
    Ok(())
}

fn check_len<T>(field: &str, items: &[T], max: usize) -> Result<(), InvalidField> {
    if items.len() > max {
        return Err(InvalidField::new(
            field,
            format!("has {} items; at most {max} are allowed", items.len()),
        ));
    }
    Ok(())
}

/// Applies `check` to each item, naming the failing one as `field[i]`.
fn check_each<T>(
    field: &str,
    items: &[T],
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<(), InvalidField> {
    check_len(field, items, MAX_LIST_ITEMS)?;
    for (i, item) in items.iter().enumerate() {
        check(item).map_err(|reason| InvalidField::new(format!("{field}[{i}]"), reason))?;
    }
    Ok(())
}

impl AuthorizationPolicy {
    /// Every rule of the schema and weft's bounds; the first violation, named by its field
    /// path (`spec.rules[0].to[1].paths[0]`).
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_dns_label("metadata.namespace", &self.namespace)?;
        check_dns_subdomain("metadata.name", &self.name)?;
        check_labels(&self.selector).map_err(|e| {
            let field = e
                .field
                .replacen("metadata.labels", "spec.selector.matchLabels", 1);
            InvalidField::new(field, e.reason)
        })?;
        check_len("spec.ports", &self.ports, MAX_PORTS)?;
        for (i, port) in self.ports.iter().enumerate() {
            let field = format!("spec.ports[{i}]");
            match port {
                TargetPort::Number(0) => {
                    return Err(InvalidField::new(field, "0 is not a port in 1-65535"))
                }
                TargetPort::Number(_) => {}
                TargetPort::Name(name) => check_port_name(&field, name)?,
            }
        }
        check_len("spec.rules", &self.rules, MAX_RULES)?;
        for (i, rule) in self.rules.iter().enumerate() {
            let field = format!("spec.rules[{i}]");
            check_len(&format!("{field}.from"), &rule.from, MAX_RULE_ENTRIES)?;
            for (j, source) in rule.from.iter().enumerate() {
                validate_source(&format!("{field}.from[{j}]"), source)?;
            }
            check_len(&format!("{field}.to"), &rule.to, MAX_RULE_ENTRIES)?;
            for (j, destination) in rule.to.iter().enumerate() {
                validate_destination(&format!("{field}.to[{j}]"), destination)?;
            }
        }
        Ok(())
    }

    /// Whether the policy protects `pod`: same namespace, selector matches its labels.
    pub fn selects_pod(&self, pod: &Pod) -> bool {
        self.namespace == pod.namespace && selector_matches(&self.selector, &pod.labels)
    }

    /// Whether the policy covers `port` of `pod` (named ports resolve against the pod).
    pub fn selects_port(&self, pod: &Pod, port: u16) -> bool {
        self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|selected| target_port_of(selected, pod) == Some(port))
    }

    /// `namespace/name`: how proxies, logs and metrics name the policy.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn validate_source(field: &str, source: &SourceMatch) -> Result<(), InvalidField> {
    if !source.has_identity_fields() && source.networks.is_empty() && !source.unauthenticated {
        return Err(InvalidField::new(
            field,
            "sets nothing to match: give identities, serviceAccounts, namespaces, networks or unauthenticated (leave `from` out to match every client)",
        ));
    }
    if source.unauthenticated && source.has_identity_fields() {
        return Err(InvalidField::new(
            format!("{field}.unauthenticated"),
            "cannot be combined with identities, serviceAccounts or namespaces in one entry: a client without an identity never matches them (use two entries)",
        ));
    }
    check_each(
        &format!("{field}.identities"),
        &source.identities,
        |identity| check_identity_pattern(identity),
    )?;
    check_each(
        &format!("{field}.serviceAccounts"),
        &source.service_accounts,
        |account| {
            let (namespace, name) = account
                .split_once('/')
                .ok_or_else(|| format!("{account:?} must be \"namespace/name\""))?;
            check_dns_label("namespace", namespace)
                .and_then(|()| check_dns_subdomain("name", name))
                .map_err(|e| format!("{account:?}: {}: {}", e.field, e.reason))
        },
    )?;
    check_each(
        &format!("{field}.namespaces"),
        &source.namespaces,
        |namespace| check_dns_label("namespace", namespace).map_err(|e| e.reason),
    )?;
    let networks_field = format!("{field}.networks");
    check_len(&networks_field, &source.networks, MAX_LIST_ITEMS)?;
    for (i, network) in source.networks.iter().enumerate() {
        check_each(
            &format!("{networks_field}[{i}].except"),
            &network.except,
            |except| {
                if network.cidr.covers(except) {
                    Ok(())
                } else {
                    Err(format!("{except} is not inside {}", network.cidr))
                }
            },
        )?;
    }
    Ok(())
}

fn validate_destination(field: &str, destination: &DestinationMatch) -> Result<(), InvalidField> {
    if destination.methods.is_empty() && destination.paths.is_empty() {
        return Err(InvalidField::new(
            field,
            "sets nothing to match: give methods or paths (leave `to` out to match every request and connection)",
        ));
    }
    check_each(
        &format!("{field}.methods"),
        &destination.methods,
        |method| check_method(method),
    )?;
    // Patterns are validated when parsed; re-checking here keeps hand-built values honest.
    check_each(&format!("{field}.paths"), &destination.paths, |path| {
        PathPattern::parse(&path.to_string()).map(drop)
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn net(text: &str) -> IpNet {
        IpNet::parse(text).unwrap()
    }

    #[test]
    fn cidrs_parse_canonically_and_refuse_host_bits() {
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(net("2001:DB8::/32").to_string(), "2001:db8::/32");
        assert_eq!(net("::/0").to_string(), "::/0");
        assert_eq!(net("192.0.2.7/32").to_string(), "192.0.2.7/32");
        let error = IpNet::parse("10.1.2.3/8").unwrap_err();
        assert!(error.contains("10.0.0.0/8"), "{error}");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0/8",
            "fd00::/129",
            "banana/8",
            "10.0.0.0/0008",
        ] {
            assert!(IpNet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidr_containment() {
        let ten = net("10.0.0.0/8");
        assert!(ten.contains("10.255.0.1".parse().unwrap()));
        assert!(!ten.contains("11.0.0.1".parse().unwrap()));
        assert!(!ten.contains("::a00:1".parse().unwrap()));
        assert!(ten.covers(&net("10.1.0.0/16")));
        assert!(ten.covers(&ten));
        assert!(!ten.covers(&net("0.0.0.0/0")));
        assert!(!ten.covers(&net("11.0.0.0/16")));
        assert!(!net("fd00::/8").covers(&ten));
        assert!(net("::/0").covers(&net("fd00::/8")));
    }

    #[test]
    fn path_patterns() {
        assert_eq!(
            PathPattern::parse("/api/v1/orders"),
            Ok(PathPattern::Exact("/api/v1/orders".into()))
        );
        assert_eq!(
            PathPattern::parse("/api/*"),
            Ok(PathPattern::Prefix("/api/".into()))
        );
        assert_eq!(
            PathPattern::parse("/*"),
            Ok(PathPattern::Prefix("/".into()))
        );
        assert_eq!(
            PathPattern::parse("regex:/api/v1/users/.*"),
            Ok(PathPattern::Regex("/api/v1/users/.*".into()))
        );
        for text in ["/api/v1/orders", "/api/*", "regex:/a+", "/%41b"] {
            assert_eq!(PathPattern::parse(text).unwrap().to_string(), text);
        }
        for bad in [
            "api",
            "/api*",
            "/a/*/b",
            "/a//b",
            "/a/../b",
            "/a/.",
            "/a?x=1",
            "/a b",
            "/%zz",
            "regex:",
            "regex:/(unclosed",
            "",
        ] {
            assert!(PathPattern::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert!(PathPattern::parse(&long).is_err());
        let long_regex = format!("regex:{}", "a".repeat(MAX_REGEX_BYTES + 1));
        assert!(PathPattern::parse(&long_regex).is_err());
        // Small text, huge program.
        assert!(PathPattern::parse(r"regex:\w{1000}\w{1000}").is_err());
    }

    #[test]
    fn backtracking_pattern_is_accepted_and_linear() {
        assert_eq!(
            PathPattern::parse("regex:(a+)+$"),
            Ok(PathPattern::Regex("(a+)+$".into()))
        );
        // The engine proxies use: a backtracking engine takes ~2^n steps here.
        let compiled = regex::RegexBuilder::new("^(?:(a+)+$)$")
            .size_limit(MAX_REGEX_PROGRAM_BYTES)
            .build()
            .unwrap();
        let input = format!("{}!", "a".repeat(100_000));
        let started = Instant::now();
        assert!(!compiled.is_match(&input));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn identity_patterns() {
        for good in [
            "spiffe://cluster.local/ns/shop/sa/api",
            "spiffe://cluster.local/ns/shop/sa/*",
            "spiffe://cluster.local/ns/*/sa/api-*",
            "spiffe://*",
            "spiffe://other.example/workload/Batch_1",
        ] {
            assert_eq!(check_identity_pattern(good), Ok(()), "{good}");
        }
        for bad in [
            "cluster.local/ns/shop/sa/api",
            "spiffe://",
            "spiffe://Cluster.local/ns/a",
            "spiffe://cluster.local/ns//sa/a",
            "spiffe://cluster.local/ns/a/",
            "spiffe://cluster.local/ns/../sa/a",
            "spiffe://cluster.local/ns/a?x",
            "spiffe://cluster.local:8080/ns/a",
        ] {
            assert!(check_identity_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn methods_are_upper_case_tokens() {
        assert_eq!(check_method("GET"), Ok(()));
        assert_eq!(check_method("PROPFIND"), Ok(()));
        assert!(check_method("get").is_err());
        assert!(check_method("GE T").is_err());
        assert!(check_method("").is_err());
    }

    fn policy() -> AuthorizationPolicy {
        AuthorizationPolicy {
            namespace: "shop".into(),
            name: "internal-api".into(),
            selector: BTreeMap::from([("app".to_owned(), "internal".to_owned())]),
            ports: vec![TargetPort::Number(8080)],
            action: PolicyAction::Allow,
            rules: vec![PolicyRule {
                from: vec![SourceMatch {
                    service_accounts: vec!["shop/api".into()],
                    ..SourceMatch::default()
                }],
                to: vec![DestinationMatch {
                    methods: vec!["GET".into()],
                    paths: vec![PathPattern::Regex("/api/v1/users/.*".into())],
                }],
            }],
        }
    }

    fn field_of(policy: &AuthorizationPolicy) -> String {
        policy.validate().unwrap_err().field
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(policy().validate(), Ok(()));

        let mut p = policy();
        p.rules[0].from[0].service_accounts.push("api".into());
        assert_eq!(field_of(&p), "spec.rules[0].from[0].serviceAccounts[1]");

        let mut p = policy();
        p.rules[0].from[0] = SourceMatch::default();
        assert_eq!(field_of(&p), "spec.rules[0].from[0]");

        let mut p = policy();
        p.rules[0].from[0].unauthenticated = true;
        assert_eq!(field_of(&p), "spec.rules[0].from[0].unauthenticated");

        let mut p = policy();
        p.rules[0].from.push(SourceMatch {
            unauthenticated: true,
            networks: vec![NetworkMatch {
                cidr: net("10.0.0.0/8"),
                except: vec![net("10.1.0.0/16"), net("192.168.0.0/16")],
            }],
            ..SourceMatch::default()
        });
        assert_eq!(field_of(&p), "spec.rules[0].from[1].networks[0].except[1]");

        let mut p = policy();
        p.rules[0].to[0].methods.push("get".into());
        assert_eq!(field_of(&p), "spec.rules[0].to[0].methods[1]");

        let mut p = policy();
        p.rules[0].to.push(DestinationMatch::default());
        assert_eq!(field_of(&p), "spec.rules[0].to[1]");

        let mut p = policy();
        p.rules[0].to[0].paths[0] = PathPattern::Regex("(".into());
        assert_eq!(field_of(&p), "spec.rules[0].to[0].paths[0]");

        let mut p = policy();
        p.ports.push(TargetPort::Name("Not_A_Name".into()));
        assert_eq!(field_of(&p), "spec.ports[1]");

        let mut p = policy();
        p.ports.push(TargetPort::Number(0));
        assert_eq!(field_of(&p), "spec.ports[1]");

        let mut p = policy();
        p.selector.insert("app".into(), "bad value!".into());
        assert_eq!(field_of(&p), "spec.selector.matchLabels[app]");

        let mut p = policy();
        p.rules = vec![PolicyRule::default(); MAX_RULES + 1];
        assert_eq!(field_of(&p), "spec.rules");

        let mut p = policy();
        p.name = "Internal".into();
        assert_eq!(field_of(&p), "metadata.name");
    }

    #[test]
    fn selection_by_labels_namespace_and_ports() {
        let mut pod = Pod {
            namespace: "shop".into(),
            name: "internal-0".into(),
            ip: None,
            service_account: "internal".into(),
            labels: BTreeMap::from([
                ("app".to_owned(), "internal".to_owned()),
                ("tier".to_owned(), "back".to_owned()),
            ]),
            annotations: BTreeMap::new(),
            container_ports: vec![super::super::ContainerPort {
                name: Some("http".into()),
                port: 8080,
            }],
            probes: Vec::new(),
        };
        let mut p = policy();
        assert!(p.selects_pod(&pod));
        assert!(p.selects_port(&pod, 8080));
        assert!(!p.selects_port(&pod, 9090));
        p.ports = vec![TargetPort::Name("http".into())];
        assert!(p.selects_port(&pod, 8080));
        p.ports = vec![TargetPort::Name("admin".into())];
        assert!(!p.selects_port(&pod, 8080));
        p.ports.clear();
        assert!(p.selects_port(&pod, 1));

        p.selector.clear();
        assert!(p.selects_pod(&pod), "an empty selector selects every pod");
        pod.namespace = "other".into();
        assert!(!p.selects_pod(&pod), "never across namespaces");
        pod.namespace = "shop".into();
        p.selector.insert("app".into(), "web".into());
        assert!(!p.selects_pod(&pod));
    }
}
