//! Traffic-shaping objects as users write them: SMI `TrafficSplit` (apex Service → weighted
//! backend Services) and Gateway API `HTTPRoute` attached to Services, with the checks the
//! Kubernetes API server (CRD schemas and CEL rules) would apply plus weft's own limits.
//! Defaults that Kubernetes fills in (`PathPrefix /`, `Exact`, weight 1) are the source's job.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{check_annotations, check_dns_label, check_dns_subdomain, InvalidField};

/// HTTPRoute annotation: retries may add at most this percentage of requests (0–100).
pub const RETRY_BUDGET_PERCENT_ANNOTATION: &str = "retry.weft.io/budget-percent";
/// HTTPRoute annotation: retries always allowed per second, whatever the percentage.
pub const RETRY_MIN_PER_SECOND_ANNOTATION: &str = "retry.weft.io/min-retries-per-second";
/// HTTPRoute annotation `"true"`: also retry non-idempotent methods (bodies ≤ 64 KiB).
pub const RETRY_NON_IDEMPOTENT_ANNOTATION: &str = "retry.weft.io/non-idempotent";

pub const DEFAULT_RETRY_BUDGET_PERCENT: f64 = 20.0;
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
pub const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries when a route has a `retry` stanza without `attempts` (Gateway API leaves it to us).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 1;
/// Retried status codes when a `retry` stanza lists none: the ones that mean "the backend
/// did not handle it" rather than "the backend failed while handling it".
pub const DEFAULT_RETRY_CODES: [u16; 3] = [502, 503, 504];
/// Base backoff when a `retry` stanza has no `backoff` (Gateway API leaves it to us).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Longest regular expression accepted in a match; longer ones are refused, not truncated.
pub const MAX_REGEX_BYTES: usize = 1024;
/// Compiled-program cap, so a short pattern with huge repetitions is refused here rather
/// than costing every proxy memory.
const MAX_REGEX_PROGRAM_BYTES: usize = 1 << 20;
/// Gateway API's bound, also used for TrafficSplit so that weight sums fit in a u32.
pub const MAX_BACKEND_WEIGHT: u32 = 1_000_000;
const MAX_SPLIT_BACKENDS: usize = 64;

// Gateway API CRD limits.
const MAX_PARENT_REFS: usize = 32;
const MAX_RULES: usize = 16;
const MAX_MATCHES_PER_RULE: usize = 64;
const MAX_MATCHES_PER_ROUTE: usize = 128;
const MAX_BACKEND_REFS: usize = 16;
const MAX_VALUE_MATCHES: usize = 16;
const MAX_PATH_BYTES: usize = 1024;
const MAX_HEADER_NAME_BYTES: usize = 256;
const MAX_HEADER_VALUE_BYTES: usize = 4096;
const MAX_QUERY_VALUE_BYTES: usize = 1024;
const MAX_OBJECT_NAME_BYTES: usize = 253;
/// `HTTPMethod` enum of the Gateway API.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// SMI `split.smi-spec.io/v1alpha2` TrafficSplit: traffic for the apex Service `service`
/// goes to `backends` in proportion to their weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficSplit {
    pub namespace: String,
    pub name: String,
    /// Name of the apex Service, in the split's namespace.
    pub service: String,
    pub backends: Vec<SplitBackend>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBackend {
    /// Name of a Service in the split's namespace.
    pub service: String,
    pub weight: u32,
}

/// Gateway API `HTTPRoute`, reduced to what a mesh needs: the Services it attaches to and
/// its rules. Parent references to anything but a core Service are dropped by the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRoute {
    pub namespace: String,
    pub name: String,
    /// Carries weft's retry settings (`retry.weft.io/*`).
    pub annotations: BTreeMap<String, String>,
    /// Services in the route's namespace.
    pub parents: Vec<ParentRef>,
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// Service name.
    pub name: String,
    /// Attach to this service port only; all ports when `None`.
    pub port: Option<u16>,
    /// Attach to the service port of this name only.
    pub section_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    /// A request matches the rule when any match does. Empty matches everything (the
    /// source normally fills in Kubernetes' default, `PathPrefix /`).
    pub matches: Vec<RouteMatch>,
    /// Empty: requests matching the rule fail (Gateway API: 500).
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: RouteTimeouts,
    pub retry: Option<RouteRetry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// All must match. Names compare case-insensitively; of equivalent names only the first counts.
    pub headers: Vec<ValueMatch>,
    /// All must match. Names compare exactly; of equal names only the first counts.
    pub query_params: Vec<ValueMatch>,
    /// Upper case (`GET`); `None` matches any method.
    pub method: Option<String>,
}

impl RouteMatch {
    /// Kubernetes' default match: every request.
    pub fn everything() -> Self {
        Self {
            path: PathMatch::Prefix("/".to_owned()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    /// Matched against the whole path.
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueMatch {
    pub name: String,
    pub value: StringMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    /// Matched against the whole value.
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRef {
    /// Service name.
    pub name: String,
    /// The route's namespace unless the reference names another.
    pub namespace: String,
    /// Service port; the parent Service's port when `None`.
    pub port: Option<u16>,
    pub weight: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTimeouts {
    /// Whole request including retries; zero disables the timeout.
    pub request: Option<Duration>,
    /// Each attempt; zero disables the timeout.
    pub backend_request: Option<Duration>,
}

/// Gateway API's experimental `retry` stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRetry {
    /// Empty: [`DEFAULT_RETRY_CODES`].
    pub codes: Vec<u16>,
    /// Retries after the first attempt; zero disables retries.
    pub attempts: u32,
    /// [`DEFAULT_RETRY_BACKOFF`] when `None`.
    pub backoff: Option<Duration>,
}

/// How many retries a route may add on top of its requests.
#[derive(Debug, Clone, Copy)]
pub struct RetryBudget {
    /// Retries ≤ `ratio` × requests over `window` (0.0–1.0).
    pub ratio: f64,
    /// Retries allowed per second regardless of `ratio`.
    pub min_retries_per_second: u32,
    pub window: Duration,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: DEFAULT_RETRY_BUDGET_PERCENT / 100.0,
            min_retries_per_second: DEFAULT_MIN_RETRIES_PER_SECOND,
            window: RETRY_BUDGET_WINDOW,
        }
    }
}

// `ratio` is validated finite, so bitwise equality is a true equivalence and the resolved
// destination (which contains budgets) can stay `Eq` for change detection.
impl PartialEq for RetryBudget {
    fn eq(&self, other: &Self) -> bool {
        self.ratio.to_bits() == other.ratio.to_bits()
            && self.min_retries_per_second == other.min_retries_per_second
            && self.window == other.window
    }
}

impl Eq for RetryBudget {}

impl TrafficSplit {
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_dns_label("metadata.namespace", &self.namespace)?;
        check_dns_subdomain("metadata.name", &self.name)?;
        check_dns_label("spec.service", &self.service)?;
        if self.backends.is_empty() {
            return Err(InvalidField::new(
                "spec.backends",
                "at least one is required",
            ));
        }
        if self.backends.len() > MAX_SPLIT_BACKENDS {
            return Err(InvalidField::new(
                "spec.backends",
                format!("at most {MAX_SPLIT_BACKENDS} are supported"),
            ));
        }
        for (i, backend) in self.backends.iter().enumerate() {
            let field = format!("spec.backends[{i}]");
            check_dns_label(&format!("{field}.service"), &backend.service)?;
            check_weight(&format!("{field}.weight"), backend.weight)?;
            if self.backends[..i]
                .iter()
                .any(|earlier| earlier.service == backend.service)
            {
                return Err(InvalidField::new(
                    format!("{field}.service"),
                    format!("{:?} is listed twice", backend.service),
                ));
            }
        }
        Ok(())
    }
}

impl HttpRoute {
    pub fn validate(&self) -> Result<(), InvalidField> {
        check_dns_label("metadata.namespace", &self.namespace)?;
        check_dns_subdomain("metadata.name", &self.name)?;
        check_annotations(&self.annotations)?;
        self.retry_budget()?;
        self.retries_non_idempotent()?;
        if self.parents.len() > MAX_PARENT_REFS {
            return Err(InvalidField::new(
                "spec.parentRefs",
                format!("at most {MAX_PARENT_REFS} are allowed"),
            ));
        }
        for (i, parent) in self.parents.iter().enumerate() {
            let field = format!("spec.parentRefs[{i}]");
            check_object_name(&format!("{field}.name"), &parent.name)?;
            if parent.port == Some(0) {
                return Err(InvalidField::new(
                    format!("{field}.port"),
                    "must be in 1-65535",
                ));
            }
            if let Some(section) = &parent.section_name {
                check_dns_subdomain(&format!("{field}.sectionName"), section)?;
            }
        }
        if self.rules.len() > MAX_RULES {
            return Err(InvalidField::new(
                "spec.rules",
                format!("at most {MAX_RULES} are allowed"),
            ));
        }
        let total_matches: usize = self.rules.iter().map(|rule| rule.matches.len()).sum();
        if total_matches > MAX_MATCHES_PER_ROUTE {
            return Err(InvalidField::new(
                "spec.rules",
                format!("at most {MAX_MATCHES_PER_ROUTE} matches across all rules are allowed"),
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate(&format!("spec.rules[{i}]"))?;
        }
        Ok(())
    }

    /// From the `retry.weft.io/budget-percent` and `retry.weft.io/min-retries-per-second`
    /// annotations, defaulting each.
    pub fn retry_budget(&self) -> Result<RetryBudget, InvalidField> {
        let mut budget = RetryBudget::default();
        if let Some(text) = self.annotations.get(RETRY_BUDGET_PERCENT_ANNOTATION) {
            let invalid = || {
                InvalidField::new(
                    format!("metadata.annotations[{RETRY_BUDGET_PERCENT_ANNOTATION}]"),
                    format!("{text:?} is not a percentage in 0-100 (e.g. \"20\" or \"12.5\")"),
                )
            };
            let text = text.trim();
            // Plain decimals only: f64's parser also takes "inf", "NaN" and "1e2".
            let plain = !text.is_empty()
                && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
                && text.bytes().filter(|b| *b == b'.').count() <= 1
                && text.bytes().any(|b| b.is_ascii_digit());
            let percent: f64 = if plain {
                text.parse().map_err(|_| invalid())?
            } else {
                return Err(invalid());
            };
            if !(0.0..=100.0).contains(&percent) {
                return Err(invalid());
            }
            budget.ratio = percent / 100.0;
        }
        if let Some(text) = self.annotations.get(RETRY_MIN_PER_SECOND_ANNOTATION) {
            let text = text.trim();
            budget.min_retries_per_second = text
                .parse::<u32>()
                .ok()
                .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| {
                    InvalidField::new(
                        format!("metadata.annotations[{RETRY_MIN_PER_SECOND_ANNOTATION}]"),
                        format!("{text:?} is not a whole number of retries per second"),
                    )
                })?;
        }
        Ok(budget)
    }

    /// The `retry.weft.io/non-idempotent` annotation: `"true"` or `"false"` (default).
    pub fn retries_non_idempotent(&self) -> Result<bool, InvalidField> {
        match self
            .annotations
            .get(RETRY_NON_IDEMPOTENT_ANNOTATION)
            .map(|value| value.trim())
        {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(InvalidField::new(
                format!("metadata.annotations[{RETRY_NON_IDEMPOTENT_ANNOTATION}]"),
                format!("{other:?} is not \"true\" or \"false\""),
            )),
        }
    }
}

impl RouteRule {
    fn validate(&self, field: &str) -> Result<(), InvalidField> {
        if self.matches.len() > MAX_MATCHES_PER_RULE {
            return Err(InvalidField::new(
                format!("{field}.matches"),
                format!("at most {MAX_MATCHES_PER_RULE} are allowed"),
            ));
        }
        for (i, route_match) in self.matches.iter().enumerate() {
            route_match.validate(&format!("{field}.matches[{i}]"))?;
        }
        if self.backend_refs.len() > MAX_BACKEND_REFS {
            return Err(InvalidField::new(
                format!("{field}.backendRefs"),
                format!("at most {MAX_BACKEND_REFS} are allowed"),
            ));
        }
        for (i, backend) in self.backend_refs.iter().enumerate() {
            let field = format!("{field}.backendRefs[{i}]");
            check_object_name(&format!("{field}.name"), &backend.name)?;
            check_dns_label(&format!("{field}.namespace"), &backend.namespace)?;
            if backend.port == Some(0) {
                return Err(InvalidField::new(
                    format!("{field}.port"),
                    "must be in 1-65535",
                ));
            }
            check_weight(&format!("{field}.weight"), backend.weight)?;
        }
        if let (Some(request), Some(backend_request)) =
            (self.timeouts.request, self.timeouts.backend_request)
        {
            if !request.is_zero() && backend_request > request {
                return Err(InvalidField::new(
                    format!("{field}.timeouts.backendRequest"),
                    "cannot be longer than the request timeout",
                ));
            }
        }
        if let Some(retry) = &self.retry {
            if retry.attempts > MAX_RETRY_ATTEMPTS {
                return Err(InvalidField::new(
                    format!("{field}.retry.attempts"),
                    format!("{} is more than {MAX_RETRY_ATTEMPTS}", retry.attempts),
                ));
            }
            for (i, code) in retry.codes.iter().enumerate() {
                // Gateway API's HTTPRouteRetryStatusCode: client and server errors only.
                if !(400..=599).contains(code) {
                    return Err(InvalidField::new(
                        format!("{field}.retry.codes"),
                        format!("{code} is not a status code in 400-599"),
                    ));
                }
                if retry.codes[..i].contains(code) {
                    return Err(InvalidField::new(
                        format!("{field}.retry.codes"),
                        format!("{code} is listed twice"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl RouteMatch {
    fn validate(&self, field: &str) -> Result<(), InvalidField> {
        let path_field = format!("{field}.path.value");
        match &self.path {
            PathMatch::Exact(path) | PathMatch::Prefix(path) => check_path(&path_field, path)?,
            PathMatch::Regex(pattern) => check_regex(&path_field, pattern)?,
        }
        check_value_matches(
            &format!("{field}.headers"),
            &self.headers,
            MAX_HEADER_VALUE_BYTES,
            true,
        )?;
        check_value_matches(
            &format!("{field}.queryParams"),
            &self.query_params,
            MAX_QUERY_VALUE_BYTES,
            false,
        )?;
        if let Some(method) = &self.method {
            if !METHODS.contains(&method.as_str()) {
                return Err(InvalidField::new(
                    format!("{field}.method"),
                    format!("{method:?} is not one of {}", METHODS.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

fn check_weight(field: &str, weight: u32) -> Result<(), InvalidField> {
    if weight > MAX_BACKEND_WEIGHT {
        return Err(InvalidField::new(
            field,
            format!("{weight} is more than {MAX_BACKEND_WEIGHT}"),
        ));
    }
    Ok(())
}

/// Gateway API `ObjectName`.
fn check_object_name(field: &str, name: &str) -> Result<(), InvalidField> {
    if name.is_empty() || name.len() > MAX_OBJECT_NAME_BYTES {
        return Err(InvalidField::new(
            field,
            format!("must be 1-{MAX_OBJECT_NAME_BYTES} characters"),
        ));
    }
    Ok(())
}

/// The CEL rules of Gateway API's `HTTPPathMatch` for Exact and PathPrefix values: an
/// absolute, normalised path, so that matching never depends on how a proxy normalises.
fn check_path(field: &str, path: &str) -> Result<(), InvalidField> {
    let invalid = |why: &str| InvalidField::new(field, format!("{path:?} {why}"));
    if path.len() > MAX_PATH_BYTES {
        return Err(invalid("is longer than 1024 characters"));
    }
    if !path.starts_with('/') {
        return Err(invalid("must start with '/'"));
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if path.contains(bad) {
            return Err(invalid(&format!("must not contain {bad:?}")));
        }
    }
    if path.ends_with("/..") || path.ends_with("/.") {
        return Err(invalid("must not end with \"/..\" or \"/.\""));
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
                return Err(invalid("has a '%' not followed by two hex digits"));
            }
            at += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&b)) {
            return Err(invalid(&format!(
                "contains {:?}, which must be percent-encoded",
                char::from(b)
            )));
        }
        at += 1;
    }
    Ok(())
}

fn check_regex(field: &str, pattern: &str) -> Result<(), InvalidField> {
    if pattern.is_empty() {
        return Err(InvalidField::new(field, "must not be empty"));
    }
    if pattern.len() > MAX_REGEX_BYTES {
        return Err(InvalidField::new(
            field,
            format!("regular expression longer than {MAX_REGEX_BYTES} bytes"),
        ));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(MAX_REGEX_PROGRAM_BYTES)
        .build()
        .map(drop)
        .map_err(|e| InvalidField::new(field, format!("invalid regular expression: {e}")))
}

/// RFC 7230 token, which is what Gateway API's `HTTPHeaderName` allows.
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HEADER_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Printable ASCII words separated by single spaces or tabs (RFC 7230 field content).
fn is_header_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    let visible = |b: &u8| (b'!'..=b'~').contains(b);
    bytes.first().is_some_and(visible)
        && bytes.last().is_some_and(visible)
        && bytes
            .iter()
            .all(|b| visible(b) || *b == b' ' || *b == b'\t')
        && !bytes
            .windows(2)
            .any(|pair| !visible(&pair[0]) && !visible(&pair[1]))
}

fn check_value_matches(
    field: &str,
    matches: &[ValueMatch],
    max_value_bytes: usize,
    headers: bool,
) -> Result<(), InvalidField> {
    if matches.len() > MAX_VALUE_MATCHES {
        return Err(InvalidField::new(
            field,
            format!("at most {MAX_VALUE_MATCHES} are allowed"),
        ));
    }
    for (i, value_match) in matches.iter().enumerate() {
        let item = format!("{field}[{i}]");
        if !is_header_name(&value_match.name) {
            return Err(InvalidField::new(
                format!("{item}.name"),
                format!(
                    "{:?} is not a valid name (1-{MAX_HEADER_NAME_BYTES} letters, digits and !#$%&'*+-.^_`|~)",
                    value_match.name
                ),
            ));
        }
        // The API server rejects exact duplicates (a list map keyed by name); names that
        // differ only in case are legal and resolved later (first one counts).
        if matches[..i]
            .iter()
            .any(|earlier| earlier.name == value_match.name)
        {
            return Err(InvalidField::new(
                format!("{item}.name"),
                format!("{:?} is listed twice", value_match.name),
            ));
        }
        let value_field = format!("{item}.value");
        match &value_match.value {
            StringMatch::Exact(value) => {
                if value.is_empty() || value.len() > max_value_bytes {
                    return Err(InvalidField::new(
                        value_field,
                        format!("must be 1-{max_value_bytes} characters"),
                    ));
                }
                if headers && !is_header_value(value) {
                    return Err(InvalidField::new(
                        value_field,
                        format!("{value:?} is not printable ASCII separated by single spaces"),
                    ));
                }
            }
            StringMatch::Regex(pattern) => check_regex(&value_field, pattern)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> HttpRoute {
        HttpRoute {
            namespace: "shop".into(),
            name: "web-routes".into(),
            annotations: BTreeMap::new(),
            parents: vec![ParentRef {
                name: "web".into(),
                port: Some(80),
                section_name: None,
            }],
            rules: vec![RouteRule {
                matches: vec![RouteMatch::everything()],
                backend_refs: vec![BackendRef {
                    name: "web-v1".into(),
                    namespace: "shop".into(),
                    port: None,
                    weight: 1,
                }],
                timeouts: RouteTimeouts::default(),
                retry: None,
            }],
        }
    }

    fn with_match(edit: impl FnOnce(&mut RouteMatch)) -> HttpRoute {
        let mut route = route();
        edit(&mut route.rules[0].matches[0]);
        route
    }

    fn error_of(route: &HttpRoute) -> String {
        match route.validate() {
            Ok(()) => panic!("accepted: {route:#?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_plain_route_is_valid() {
        assert_eq!(route().validate(), Ok(()));
    }

    #[test]
    fn paths_follow_the_gateway_api_rules() {
        for good in [
            "/",
            "/api",
            "/api/v2/",
            "/a%20b",
            "/~user/x.y_z-(1)!$&'*+,;=:@",
        ] {
            let route = with_match(|m| m.path = PathMatch::Exact(good.into()));
            assert_eq!(route.validate(), Ok(()), "{good}");
        }
        for bad in [
            "", "api", "/a//b", "/a/./b", "/a/../b", "/a%2fb", "/a%2Fb", "/a#b", "/a/..", "/a/.",
            "/a b", "/a?b", "/%zz", "/%4", "/é",
        ] {
            let route = with_match(|m| m.path = PathMatch::Prefix(bad.into()));
            assert!(error_of(&route).contains("path.value"), "{bad}");
        }
        let long = format!("/{}", "a".repeat(1024));
        assert!(error_of(&with_match(|m| m.path = PathMatch::Exact(long))).contains("1024"));
    }

    #[test]
    fn regular_expressions_must_compile_and_stay_small() {
        let ok = with_match(|m| m.path = PathMatch::Regex("/api/v[0-9]+/.*".into()));
        assert_eq!(ok.validate(), Ok(()));
        let bad = with_match(|m| m.path = PathMatch::Regex("/api/(unclosed".into()));
        assert!(error_of(&bad).contains("invalid regular expression"));
        let long = with_match(|m| m.path = PathMatch::Regex("a".repeat(1025)));
        assert!(error_of(&long).contains("1024 bytes"));
        let huge = with_match(|m| m.path = PathMatch::Regex(r"\w{1000}\w{1000}".into()));
        assert!(error_of(&huge).contains("invalid regular expression"));
        let header = with_match(|m| {
            m.headers.push(ValueMatch {
                name: "x-version".into(),
                value: StringMatch::Regex("[".into()),
            })
        });
        assert!(error_of(&header).contains("headers[0].value"));
    }

    #[test]
    fn header_and_query_matches_are_checked() {
        let header = |name: &str, value: &str| {
            with_match(|m| {
                m.headers.push(ValueMatch {
                    name: name.into(),
                    value: StringMatch::Exact(value.into()),
                })
            })
        };
        assert_eq!(header("X-Canary", "yes please").validate(), Ok(()));
        assert!(error_of(&header(":method", "GET")).contains("headers[0].name"));
        assert!(error_of(&header("a b", "x")).contains("headers[0].name"));
        assert!(error_of(&header("x", "")).contains("headers[0].value"));
        assert!(error_of(&header("x", "two  spaces")).contains("headers[0].value"));
        assert!(error_of(&header("x", " leading")).contains("headers[0].value"));
        assert!(error_of(&header("x", "new\nline")).contains("headers[0].value"));

        let twice = with_match(|m| {
            for _ in 0..2 {
                m.query_params.push(ValueMatch {
                    name: "v".into(),
                    value: StringMatch::Exact("2".into()),
                });
            }
        });
        assert!(error_of(&twice).contains("listed twice"));
        // Differing only in case is legal for the API server.
        let cased = with_match(|m| {
            for name in ["X-A", "x-a"] {
                m.headers.push(ValueMatch {
                    name: name.into(),
                    value: StringMatch::Exact("1".into()),
                });
            }
        });
        assert_eq!(cased.validate(), Ok(()));
        let many = with_match(|m| {
            for i in 0..17 {
                m.headers.push(ValueMatch {
                    name: format!("h{i}"),
                    value: StringMatch::Exact("1".into()),
                });
            }
        });
        assert!(error_of(&many).contains("at most 16"));
    }

    #[test]
    fn methods_are_the_gateway_api_enum() {
        assert_eq!(
            with_match(|m| m.method = Some("PATCH".into())).validate(),
            Ok(())
        );
        assert!(error_of(&with_match(|m| m.method = Some("get".into()))).contains("method"));
        assert!(error_of(&with_match(|m| m.method = Some("PURGE".into()))).contains("method"));
    }

    #[test]
    fn weights_timeouts_and_retries_are_bounded() {
        let mut heavy = route();
        heavy.rules[0].backend_refs[0].weight = MAX_BACKEND_WEIGHT + 1;
        assert!(error_of(&heavy).contains("weight"));

        let mut timeouts = route();
        timeouts.rules[0].timeouts = RouteTimeouts {
            request: Some(Duration::from_secs(1)),
            backend_request: Some(Duration::from_secs(2)),
        };
        assert!(error_of(&timeouts).contains("backendRequest"));
        // A zero request timeout means "none": any backend timeout fits under it.
        timeouts.rules[0].timeouts.request = Some(Duration::ZERO);
        assert_eq!(timeouts.validate(), Ok(()));

        let retry = |codes: Vec<u16>, attempts: u32| {
            let mut route = route();
            route.rules[0].retry = Some(RouteRetry {
                codes,
                attempts,
                backoff: None,
            });
            route
        };
        assert_eq!(retry(vec![500, 503], 10).validate(), Ok(()));
        assert!(error_of(&retry(vec![], 11)).contains("attempts"));
        assert!(error_of(&retry(vec![200], 1)).contains("400-599"));
        assert!(error_of(&retry(vec![600], 1)).contains("400-599"));
        assert!(error_of(&retry(vec![503, 503], 1)).contains("twice"));
    }

    #[test]
    fn retry_annotations() {
        let annotated = |pairs: &[(&str, &str)]| {
            let mut route = route();
            route.annotations = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            route
        };
        let defaults = route();
        assert_eq!(defaults.retry_budget(), Ok(RetryBudget::default()));
        assert_eq!(defaults.retries_non_idempotent(), Ok(false));

        let tuned = annotated(&[
            (RETRY_BUDGET_PERCENT_ANNOTATION, "12.5"),
            (RETRY_MIN_PER_SECOND_ANNOTATION, "3"),
            (RETRY_NON_IDEMPOTENT_ANNOTATION, "true"),
        ]);
        assert_eq!(tuned.validate(), Ok(()));
        let budget = tuned.retry_budget().unwrap();
        assert_eq!(budget.ratio, 0.125);
        assert_eq!(budget.min_retries_per_second, 3);
        assert_eq!(budget.window, Duration::from_secs(10));
        assert_eq!(tuned.retries_non_idempotent(), Ok(true));
        assert_eq!(
            annotated(&[(RETRY_BUDGET_PERCENT_ANNOTATION, "0")])
                .retry_budget()
                .map(|b| b.ratio),
            Ok(0.0)
        );

        for (key, value) in [
            (RETRY_BUDGET_PERCENT_ANNOTATION, "101"),
            (RETRY_BUDGET_PERCENT_ANNOTATION, "-1"),
            (RETRY_BUDGET_PERCENT_ANNOTATION, "NaN"),
            (RETRY_BUDGET_PERCENT_ANNOTATION, "1e1"),
            (RETRY_BUDGET_PERCENT_ANNOTATION, "20%"),
            (RETRY_BUDGET_PERCENT_ANNOTATION, "."),
            (RETRY_MIN_PER_SECOND_ANNOTATION, "-3"),
            (RETRY_MIN_PER_SECOND_ANNOTATION, "+3"),
            (RETRY_MIN_PER_SECOND_ANNOTATION, "1.5"),
            (RETRY_NON_IDEMPOTENT_ANNOTATION, "yes"),
        ] {
            let err = error_of(&annotated(&[(key, value)]));
            assert!(err.contains(key), "{key}={value}: {err}");
        }
    }

    #[test]
    fn names_and_parents_are_checked() {
        let mut bad_name = route();
        bad_name.name = "Web_Routes".into();
        assert!(error_of(&bad_name).contains("metadata.name"));
        let mut bad_port = route();
        bad_port.parents[0].port = Some(0);
        assert!(error_of(&bad_port).contains("parentRefs[0].port"));
        let mut bad_ns = route();
        bad_ns.rules[0].backend_refs[0].namespace = "Other".into();
        assert!(error_of(&bad_ns).contains("backendRefs[0].namespace"));
        let mut too_many = route();
        too_many.rules = vec![too_many.rules[0].clone(); 17];
        assert!(error_of(&too_many).contains("spec.rules"));
    }

    #[test]
    fn traffic_split_validation() {
        let split = |backends: &[(&str, u32)]| TrafficSplit {
            namespace: "shop".into(),
            name: "web-split".into(),
            service: "web".into(),
            backends: backends
                .iter()
                .map(|(service, weight)| SplitBackend {
                    service: (*service).into(),
                    weight: *weight,
                })
                .collect(),
        };
        assert_eq!(split(&[("web-v1", 90), ("web-v2", 10)]).validate(), Ok(()));
        assert_eq!(split(&[("web-v1", 0)]).validate(), Ok(()));
        let err = |s: TrafficSplit| s.validate().unwrap_err().to_string();
        assert!(err(split(&[])).contains("spec.backends"));
        assert!(err(split(&[("web-v1", 1), ("web-v1", 2)])).contains("twice"));
        assert!(err(split(&[("Web", 1)])).contains("spec.backends[0].service"));
        assert!(err(split(&[("web-v1", 2_000_000)])).contains("weight"));
        let mut bad_apex = split(&[("web-v1", 1)]);
        bad_apex.service = "".into();
        assert!(err(bad_apex).contains("spec.service"));
    }
}
