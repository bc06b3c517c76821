//! Outbound HTTP route selection: turns a destination's `OutboundPolicy` into matchers
//! compiled once per discovery update, then picks the route for each request (first match
//! wins; 404 when the destination has HTTP routes and none matches) and a weighted backend
//! within it. Transport-free; no allocation per request.
//!
//! Matching follows Gateway API `HTTPRoute` semantics:
//! - Exact path compares the path without the query; PathPrefix is element-wise (`/api`
//!   matches `/api`, `/api/` and `/api/x` but not `/apix`; a trailing `/` in the prefix is
//!   ignored); a path regex must match the whole path.
//! - Header names compare case-insensitively, values case-sensitively. When a request
//!   carries a header several times, the match succeeds if *any* of its values matches.
//! - Query parameters are compared raw (no percent-decoding, so `a%20b` does not equal
//!   `a b`); names are case-sensitive; a repeated parameter matches if any value does; a
//!   parameter without `=` has the empty value.
//! - Header and query regexes must match the whole value. Regexes use the `regex` crate
//!   (linear time, no backreferences).
//! - A route with no matches matches every request; a route with several matches
//!   applies when any of them does; within one match every condition must hold.

use std::time::Duration;

use http::{HeaderMap, HeaderName, Method, Uri};
use regex::bytes::{Regex, RegexBuilder};
use weft_api::destination as proto;
use weft_api::destination::path_match::Kind as PathKind;
use weft_api::destination::value_match::Value as ProtoValue;

use super::balance::{Balancer, EndpointPool};
use super::retry::RetryPolicy;
use crate::discovery::{parse_endpoints, Endpoint};
use crate::metrics::Name;

/// Route name (a metrics label) for requests no HTTPRoute claimed.
pub const DEFAULT_ROUTE_NAME: &str = "default";
// Compiled-program limit per regex: a control plane cannot make us build huge automata.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Every route of one destination, built once per discovery update.
#[derive(Debug)]
pub struct Routes {
    routes: Vec<Route>,
    /// Forwards to the target's own endpoints when the policy has no HTTP routes (or none
    /// valid); `None` when it has some, so a request none matches gets 404 (Gateway API:
    /// an attached route that matches nothing means "not found", not "bypass the route").
    default: Option<Route>,
}

/// What to do with a request.
#[derive(Debug, Clone, Copy)]
pub enum RouteAction<'a> {
    /// Pick a backend with `Route::pick_backend` and send it there.
    Forward(&'a Route),
    /// Answer 404 without contacting anything; the route label is [`DEFAULT_ROUTE_NAME`].
    NotFound,
}

#[derive(Debug)]
pub struct Route {
    /// HTTPRoute name, or "default" (a bounded metrics label).
    pub name: Name,
    pub backends: Vec<Backend>,
    total_weight: u64,
    /// Whole request including retries.
    pub request_timeout: Option<Duration>,
    /// Each attempt.
    pub backend_request_timeout: Option<Duration>,
    /// `None`: never retried.
    pub retry: Option<RetryPolicy>,
    matches: Vec<RequestMatch>,
}

#[derive(Debug)]
pub struct Backend {
    /// "name.namespace" of the backend Service (a bounded metrics label).
    pub name: Name,
    pub weight: u32,
    pub balancer: Balancer,
    /// Request metric handles for this backend, resolved on its first request.
    pub metrics: std::sync::OnceLock<crate::metrics::RouteMetrics>,
}

#[derive(Debug)]
struct RequestMatch {
    path: Option<PathMatcher>,
    headers: Vec<(HeaderName, ValueMatcher)>,
    query_params: Vec<(Box<str>, ValueMatcher)>,
    method: Option<Method>,
}

#[derive(Debug)]
enum PathMatcher {
    Exact(Box<str>),
    /// Stored without its trailing `/`; empty matches every path.
    Prefix(Box<str>),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueMatcher {
    Exact(Box<[u8]>),
    Regex(Regex),
}

/// Why a route from the control plane was not installed.
#[derive(Debug, thiserror::Error)]
enum InvalidRoute {
    #[error("invalid regex {pattern:?}: {source}")]
    Regex {
        pattern: String,
        source: regex::Error,
    },
    #[error("invalid header name {0:?}")]
    HeaderName(String),
    #[error("invalid method {0:?}")]
    Method(String),
    #[error("{0} match {1:?} has no value")]
    NoValue(&'static str, String),
    #[error("no backends")]
    NoBackends,
}

impl Routes {
    /// Builds the routes for `policy`. `default_endpoints` are the target's own endpoints
    /// (already validated by discovery), used when the policy has no HTTP routes.
    /// `previous` (the routes this update replaces) lends what it learned: per-endpoint
    /// latency, in-flight and failure state for endpoints that remain, and the retry budget
    /// of a route whose name and budget parameters are unchanged.
    ///
    /// Invalid routes (bad regex, header name or method, no named backend) are dropped with
    /// a warning. If every route was dropped, the destination behaves as if it had none.
    pub fn from_policy(
        policy: &proto::OutboundPolicy,
        default_endpoints: Vec<Endpoint>,
        previous: Option<&Routes>,
    ) -> Routes {
        let mut pool = EndpointPool::default();
        if let Some(previous) = previous {
            for route in previous.routes.iter().chain(&previous.default) {
                for backend in &route.backends {
                    pool.remember(&backend.balancer);
                }
            }
        }
        let routes: Vec<Route> = policy
            .routes
            .iter()
            .filter_map(|route| {
                let prev =
                    previous.and_then(|p| p.routes.iter().find(|r| *r.name.0 == route.name));
                match Route::from_proto(route, prev, &mut pool) {
                    Ok(r) => Some(r),
                    Err(error) => {
                        tracing::warn!(route = %route.name, service = %policy.service, %error, "ignoring invalid HTTP route");
                        None
                    }
                }
            })
            .collect();
        let default = routes.is_empty().then(|| {
            let backend_name = if policy.service.is_empty() {
                DEFAULT_ROUTE_NAME
            } else {
                policy.service.as_str()
            };
            Route::forward_all(backend_name, pool.balancer(default_endpoints))
        });
        Routes { routes, default }
    }

    /// What to do with a request: the first route whose matches accept it, else the
    /// default route, else 404. O(routes); no allocation.
    pub fn select(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> RouteAction<'_> {
        let path = uri.path();
        let query = uri.query();
        match self
            .routes
            .iter()
            .find(|r| r.matches(method, path, query, headers))
            .or(self.default.as_ref())
        {
            Some(route) => RouteAction::Forward(route),
            None => RouteAction::NotFound,
        }
    }

    /// The installed HTTP routes in precedence order (without the default).
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

impl Route {
    fn from_proto(
        route: &proto::HttpRoute,
        previous: Option<&Route>,
        pool: &mut EndpointPool,
    ) -> Result<Route, InvalidRoute> {
        let matches = route
            .matches
            .iter()
            .map(RequestMatch::from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let named: Vec<&proto::WeightedBackend> = route
            .backends
            .iter()
            .filter(|b| !b.name.is_empty())
            .collect();
        if named.is_empty() {
            return Err(InvalidRoute::NoBackends);
        }
        let backends: Vec<Backend> = named
            .into_iter()
            .map(|b| Backend {
                name: Name::new(&b.name),
                weight: b.weight,
                balancer: pool.balancer(parse_endpoints(&b.endpoints)),
                metrics: Default::default(),
            })
            .collect();
        let retry = route
            .retry
            .as_ref()
            .map(|r| RetryPolicy::from_proto_reusing(r, previous.and_then(|p| p.retry.as_ref())));
        Ok(Route {
            name: Name::new(&route.name),
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
            backends,
            request_timeout: millis(route.request_timeout_ms),
            backend_request_timeout: millis(route.backend_request_timeout_ms),
            retry,
            matches,
        })
    }

    fn forward_all(backend_name: &str, balancer: Balancer) -> Route {
        Route {
            name: Name::new(DEFAULT_ROUTE_NAME),
            backends: vec![Backend {
                name: Name::new(backend_name),
                weight: 1,
                balancer,
                metrics: Default::default(),
            }],
            total_weight: 1,
            request_timeout: None,
            backend_request_timeout: None,
            retry: None,
            matches: Vec::new(),
        }
    }

    fn matches(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> bool {
        self.matches.is_empty()
            || self
                .matches
                .iter()
                .any(|m| m.matches(method, path, query, headers))
    }

    /// Sum of the backend weights.
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// Weighted backend choice for a uniformly random `rng_value`. Weight-0 backends get
    /// nothing; `None` when every weight is 0 (or there are no backends): answer 503.
    pub fn pick_backend(&self, rng_value: u32) -> Option<&Backend> {
        if self.total_weight == 0 {
            return None;
        }
        // Multiply-shift maps the 32-bit value onto [0, total) without modulo bias worth
        // mentioning, and in u128 it cannot overflow whatever the weights.
        let mut point = ((u128::from(rng_value) * u128::from(self.total_weight)) >> 32) as u64;
        for backend in &self.backends {
            let weight = u64::from(backend.weight);
            if point < weight {
                return Some(backend);
            }
            point -= weight;
        }
        None
    }
}

impl Backend {
    /// True when every endpoint is meshed (requests travel over mTLS); false for an
    /// unmeshed or mixed backend, or one without endpoints.
    pub fn meshed(&self) -> bool {
        let mut endpoints = self.balancer.endpoints().peekable();
        endpoints.peek().is_some() && endpoints.all(|e| e.identity.is_some())
    }
}

fn millis(ms: u32) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(u64::from(ms)))
}

impl RequestMatch {
    fn from_proto(m: &proto::RouteMatch) -> Result<RequestMatch, InvalidRoute> {
        let path = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
            None => None,
            Some(PathKind::Exact(exact)) => Some(PathMatcher::Exact(exact.as_str().into())),
            Some(PathKind::Prefix(prefix)) => {
                Some(PathMatcher::Prefix(prefix.trim_end_matches('/').into()))
            }
            Some(PathKind::Regex(pattern)) => Some(PathMatcher::Regex(full_match_regex(pattern)?)),
        };
        let headers = m
            .headers
            .iter()
            .map(|h| {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| InvalidRoute::HeaderName(h.name.clone()))?;
                Ok((name, ValueMatcher::from_proto("header", h)?))
            })
            .collect::<Result<Vec<_>, InvalidRoute>>()?;
        let query_params = m
            .query_params
            .iter()
            .map(|q| {
                Ok((
                    q.name.as_str().into(),
                    ValueMatcher::from_proto("query", q)?,
                ))
            })
            .collect::<Result<Vec<_>, InvalidRoute>>()?;
        let method = if m.method.is_empty() {
            None
        } else {
            Some(
                Method::from_bytes(m.method.as_bytes())
                    .map_err(|_| InvalidRoute::Method(m.method.clone()))?,
            )
        };
        Ok(RequestMatch {
            path,
            headers,
            query_params,
            method,
        })
    }

    fn matches(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        if let Some(p) = &self.path {
            if !p.matches(path) {
                return false;
            }
        }
        self.headers.iter().all(|(name, value)| {
            headers
                .get_all(name)
                .iter()
                .any(|v| value.matches(v.as_bytes()))
        }) && self
            .query_params
            .iter()
            .all(|(name, value)| query_values(query, name).any(|v| value.matches(v)))
    }
}

impl PathMatcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(exact) => path == &**exact,
            PathMatcher::Prefix(prefix) => {
                prefix.is_empty()
                    || (path.starts_with(&**prefix)
                        && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
            }
            PathMatcher::Regex(re) => re.is_match(path.as_bytes()),
        }
    }
}

impl ValueMatcher {
    fn from_proto(kind: &'static str, m: &proto::ValueMatch) -> Result<ValueMatcher, InvalidRoute> {
        match &m.value {
            Some(ProtoValue::Exact(exact)) => Ok(ValueMatcher::Exact(exact.as_bytes().into())),
            Some(ProtoValue::Regex(pattern)) => Ok(ValueMatcher::Regex(full_match_regex(pattern)?)),
            None => Err(InvalidRoute::NoValue(kind, m.name.clone())),
        }
    }

    fn matches(&self, value: &[u8]) -> bool {
        match self {
            ValueMatcher::Exact(exact) => value == &**exact,
            ValueMatcher::Regex(re) => re.is_match(value),
        }
    }
}

fn full_match_regex(pattern: &str) -> Result<Regex, InvalidRoute> {
    RegexBuilder::new(&format!(r"\A(?:{pattern})\z"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|source| InvalidRoute::Regex {
            pattern: pattern.to_owned(),
            source,
        })
}

/// Raw values of the query parameter `name`, in order, borrowed from the query string.
fn query_values<'q>(query: Option<&'q str>, name: &'q str) -> impl Iterator<Item = &'q [u8]> {
    query.unwrap_or("").split('&').filter_map(move |pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name && !pair.is_empty()).then_some(value.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::collections::HashMap;
    use std::sync::Arc;
    use weft_api::destination::{
        HttpRoute, OutboundPolicy, PathMatch, RouteMatch, ValueMatch, WeightedBackend,
    };

    fn proto_ep(last: u8) -> proto::Endpoint {
        proto::Endpoint {
            address: format!("198.18.0.{last}:8080"),
            identity: String::new(),
            labels: Default::default(),
        }
    }

    fn ep(last: u8) -> Endpoint {
        parse_endpoints(&[proto_ep(last)]).remove(0)
    }

    fn backend(name: &str, weight: u32, last: u8) -> WeightedBackend {
        WeightedBackend {
            name: name.into(),
            weight,
            endpoints: vec![proto_ep(last)],
        }
    }

    fn route(name: &str, matches: Vec<RouteMatch>) -> HttpRoute {
        HttpRoute {
            name: name.into(),
            matches,
            backends: vec![backend(&format!("{name}.shop"), 1, 1)],
            ..Default::default()
        }
    }

    fn path(kind: PathKind) -> RouteMatch {
        RouteMatch {
            path: Some(PathMatch { kind: Some(kind) }),
            ..Default::default()
        }
    }

    fn value(name: &str, v: ProtoValue) -> ValueMatch {
        ValueMatch {
            name: name.into(),
            value: Some(v),
        }
    }

    fn policy(routes: Vec<HttpRoute>) -> OutboundPolicy {
        OutboundPolicy {
            known: true,
            service: "web.shop".into(),
            endpoints: vec![proto_ep(9)],
            routes,
            ..Default::default()
        }
    }

    fn routes(routes: Vec<HttpRoute>) -> Routes {
        Routes::from_policy(&policy(routes), vec![ep(9)], None)
    }

    fn get(r: &Routes, uri: &str) -> String {
        select(r, Method::GET, uri, &HeaderMap::new())
    }

    fn select(r: &Routes, method: Method, uri: &str, headers: &HeaderMap) -> String {
        let uri: Uri = uri.parse().unwrap();
        match r.select(&method, &uri, headers) {
            RouteAction::Forward(route) => route.name.0.to_string(),
            RouteAction::NotFound => "404".into(),
        }
    }

    #[test]
    fn no_routes_forwards_everything_to_the_target() {
        let r = routes(vec![]);
        let uri = "/anything?x=1".parse().unwrap();
        let RouteAction::Forward(route) = r.select(&Method::POST, &uri, &HeaderMap::new()) else {
            panic!("no routes must mean forward");
        };
        assert_eq!(&*route.name.0, "default");
        let backend = route.pick_backend(12345).unwrap();
        assert_eq!(&*backend.name.0, "web.shop");
        assert_eq!(backend.balancer.endpoints().next(), Some(&ep(9)));
        assert!(!backend.meshed());
    }

    #[test]
    fn exact_path_ignores_the_query() {
        let r = routes(vec![route(
            "exact",
            vec![path(PathKind::Exact("/api".into()))],
        )]);
        assert_eq!(get(&r, "/api"), "exact");
        assert_eq!(get(&r, "/api?x=1"), "exact");
        assert_eq!(get(&r, "/api/"), "404");
        assert_eq!(get(&r, "/apix"), "404");
        assert_eq!(get(&r, "http://web.shop/api"), "exact");
    }

    #[test]
    fn prefix_is_element_wise() {
        for prefix in ["/api", "/api/"] {
            let r = routes(vec![route(
                "prefix",
                vec![path(PathKind::Prefix(prefix.into()))],
            )]);
            for hit in ["/api", "/api/", "/api/x", "/api/x/y?q=1"] {
                assert_eq!(get(&r, hit), "prefix", "{prefix} vs {hit}");
            }
            for miss in ["/apix", "/ap", "/", "/v1/api"] {
                assert_eq!(get(&r, miss), "404", "{prefix} vs {miss}");
            }
        }
        let root = routes(vec![route(
            "root",
            vec![path(PathKind::Prefix("/".into()))],
        )]);
        assert_eq!(get(&root, "/"), "root");
        assert_eq!(get(&root, "/anything/at/all"), "root");
    }

    #[test]
    fn path_regex_must_match_the_whole_path() {
        let r = routes(vec![route(
            "users",
            vec![path(PathKind::Regex("/users/[0-9]+".into()))],
        )]);
        assert_eq!(get(&r, "/users/42"), "users");
        assert_eq!(get(&r, "/users/42?expand=1"), "users");
        assert_eq!(get(&r, "/users/42/orders"), "404");
        assert_eq!(get(&r, "/v1/users/42"), "404");
        // Alternation must not escape the anchors.
        let alt = routes(vec![route(
            "alt",
            vec![path(PathKind::Regex("/a|/b".into()))],
        )]);
        assert_eq!(get(&alt, "/b"), "alt");
        assert_eq!(get(&alt, "/a/x"), "404");
        assert_eq!(get(&alt, "/x/b"), "404");
    }

    #[test]
    fn headers_match_case_insensitively_by_name_and_any_value() {
        let r = routes(vec![route(
            "canary",
            vec![RouteMatch {
                headers: vec![
                    value("X-Canary", ProtoValue::Exact("yes".into())),
                    value("x-user", ProtoValue::Regex("u-[0-9]+".into())),
                ],
                ..Default::default()
            }],
        )]);
        let mut h = HeaderMap::new();
        h.insert("x-canary", HeaderValue::from_static("yes"));
        h.insert("x-user", HeaderValue::from_static("u-17"));
        assert_eq!(select(&r, Method::GET, "/", &h), "canary");
        // Any of several values.
        let mut multi = h.clone();
        multi.insert("x-canary", HeaderValue::from_static("no"));
        multi.append("x-canary", HeaderValue::from_static("yes"));
        assert_eq!(select(&r, Method::GET, "/", &multi), "canary");
        // Values are case-sensitive and regexes are anchored.
        let mut upper = h.clone();
        upper.insert("x-canary", HeaderValue::from_static("YES"));
        assert_eq!(select(&r, Method::GET, "/", &upper), "404");
        let mut partial = h.clone();
        partial.insert("x-user", HeaderValue::from_static("u-17x"));
        assert_eq!(select(&r, Method::GET, "/", &partial), "404");
        // All headers of a match are required.
        let mut missing = h;
        missing.remove("x-user");
        assert_eq!(select(&r, Method::GET, "/", &missing), "404");
    }

    #[test]
    fn query_params_and_method() {
        let r = routes(vec![route(
            "q",
            vec![RouteMatch {
                query_params: vec![
                    value("v", ProtoValue::Exact("2".into())),
                    value("debug", ProtoValue::Regex("|1|true".into())),
                ],
                method: "POST".into(),
                ..Default::default()
            }],
        )]);
        let post = |uri: &str| select(&r, Method::POST, uri, &HeaderMap::new());
        assert_eq!(post("/x?v=2&debug=1"), "q");
        assert_eq!(post("/x?debug&v=2"), "q", "a bare name has the empty value");
        assert_eq!(post("/x?v=1&v=2&debug=true"), "q", "any repeated value");
        assert_eq!(post("/x?v=2"), "404", "debug missing");
        assert_eq!(post("/x?v=22&debug=1"), "404");
        assert_eq!(post("/x?V=2&debug=1"), "404", "names are case-sensitive");
        assert_eq!(post("/x?v=%32&debug=1"), "404", "no percent-decoding");
        assert_eq!(
            select(&r, Method::GET, "/x?v=2&debug=1", &HeaderMap::new()),
            "404"
        );
    }

    #[test]
    fn first_matching_route_wins_and_any_match_suffices() {
        let r = routes(vec![
            route(
                "api",
                vec![
                    path(PathKind::Prefix("/api".into())),
                    path(PathKind::Exact("/health".into())),
                ],
            ),
            route("api-v2", vec![path(PathKind::Prefix("/api/v2".into()))]),
            route("catch-all", vec![]),
        ]);
        assert_eq!(get(&r, "/api/v2/x"), "api");
        assert_eq!(get(&r, "/health"), "api");
        assert_eq!(get(&r, "/other"), "catch-all");
    }

    #[test]
    fn invalid_routes_are_dropped() {
        let mut no_backends = route("empty", vec![]);
        no_backends.backends.clear();
        let mut unnamed = route("unnamed", vec![]);
        unnamed.backends[0].name.clear();
        let r = routes(vec![
            route("bad-regex", vec![path(PathKind::Regex("(".into()))]),
            route(
                "bad-header",
                vec![RouteMatch {
                    headers: vec![value("bad header", ProtoValue::Exact("x".into()))],
                    ..Default::default()
                }],
            ),
            route(
                "no-value",
                vec![RouteMatch {
                    headers: vec![ValueMatch {
                        name: "x".into(),
                        value: None,
                    }],
                    ..Default::default()
                }],
            ),
            route(
                "bad-method",
                vec![RouteMatch {
                    method: "GE T".into(),
                    ..Default::default()
                }],
            ),
            no_backends,
            unnamed,
            route("good", vec![path(PathKind::Exact("/ok".into()))]),
        ]);
        let names: Vec<&str> = r.routes().iter().map(|r| &*r.name.0).collect();
        assert_eq!(names, ["good"]);
        assert_eq!(get(&r, "/ok"), "good");
        assert_eq!(get(&r, "/other"), "404");

        // Nothing valid left: the destination behaves as if it had no routes.
        let all_bad = routes(vec![route("bad", vec![path(PathKind::Regex("[".into()))])]);
        assert_eq!(get(&all_bad, "/anything"), "default");
    }

    #[test]
    fn weighted_backend_choice() {
        let mut split = route("split", vec![]);
        split.backends = vec![
            backend("a.shop", 1, 1),
            backend("off.shop", 0, 2),
            backend("b.shop", 3, 3),
        ];
        let r = routes(vec![split]);
        let route = &r.routes()[0];
        assert_eq!(route.total_weight(), 4);
        let mut counts: HashMap<&str, u32> = HashMap::new();
        // Evenly spaced values stand in for a uniform random source.
        let steps = 4_000u64;
        for i in 0..steps {
            let value = ((i << 32) / steps) as u32;
            *counts
                .entry(&*route.pick_backend(value).unwrap().name.0)
                .or_default() += 1;
        }
        assert_eq!(counts.get("a.shop"), Some(&1_000));
        assert_eq!(counts.get("b.shop"), Some(&3_000));
        assert_eq!(counts.get("off.shop"), None);
        assert_eq!(&*route.pick_backend(u32::MAX).unwrap().name.0, "b.shop");

        let r = routes(vec![route_with_weights("zero", &[0, 0])]);
        assert!(r.routes()[0].pick_backend(0).is_none());
        assert!(r.routes()[0].pick_backend(u32::MAX).is_none());

        // Weights near u32::MAX do not overflow.
        let r = routes(vec![route_with_weights("huge", &[u32::MAX, u32::MAX])]);
        assert_eq!(r.routes()[0].total_weight(), 2 * u64::from(u32::MAX));
        assert!(r.routes()[0].pick_backend(u32::MAX).is_some());
    }

    fn route_with_weights(name: &str, weights: &[u32]) -> HttpRoute {
        let mut r = route(name, vec![]);
        r.backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| backend(&format!("b{i}.shop"), *w, i as u8 + 1))
            .collect();
        r
    }

    #[test]
    fn timeouts_and_retry_are_carried_over() {
        let mut r = route("timed", vec![]);
        r.request_timeout_ms = 1_500;
        r.retry = Some(proto::RetryPolicy {
            max_attempts: 3,
            codes: vec![503],
            ..Default::default()
        });
        let rs = routes(vec![r, route("plain", vec![])]);
        let timed = &rs.routes()[0];
        assert_eq!(timed.request_timeout, Some(Duration::from_millis(1_500)));
        assert_eq!(timed.backend_request_timeout, None);
        let retry = timed.retry.as_ref().unwrap();
        assert!(retry.should_retry_status(503) && !retry.should_retry_status(500));
        assert!(rs.routes()[1].retry.is_none());
    }

    #[test]
    fn update_keeps_endpoint_state_and_retry_budget() {
        let mut r = route("api", vec![]);
        r.backends = vec![backend("a.shop", 1, 1), backend("b.shop", 1, 2)];
        r.retry = Some(proto::RetryPolicy {
            max_attempts: 2,
            codes: vec![503],
            ..Default::default()
        });
        let old = routes(vec![r.clone()]);
        let held = old.routes()[0].backends[0].balancer.pick().unwrap();
        assert_eq!(held.endpoint(), &ep(1));
        // Spend the floor of the budget.
        let budget = old.routes()[0].retry.as_ref().unwrap().budget.clone();
        while budget.try_withdraw() {}

        // Endpoint 1 moves from backend a to b, next to a new endpoint 3: its state (one
        // request in flight) follows, so the new balancer prefers the idle newcomer.
        r.backends = vec![WeightedBackend {
            name: "b.shop".into(),
            weight: 1,
            endpoints: vec![proto_ep(1), proto_ep(3)],
        }];
        let new = Routes::from_policy(&policy(vec![r.clone()]), vec![ep(9)], Some(&old));
        let route = &new.routes()[0];
        assert!(Arc::ptr_eq(&route.retry.as_ref().unwrap().budget, &budget));
        assert!(!route.retry.as_ref().unwrap().budget.try_withdraw());
        let balancer = &route.backends[0].balancer;
        for _ in 0..20 {
            assert_eq!(balancer.pick().unwrap().endpoint(), &ep(3));
        }
        drop(held);
        let first = balancer.pick().unwrap();
        let second = balancer.pick().unwrap();
        assert_ne!(
            first.endpoint(),
            second.endpoint(),
            "both idle now: one each"
        );

        // A changed budget starts fresh.
        r.retry.as_mut().unwrap().budget = Some(proto::RetryBudget {
            ratio: 0.5,
            ..Default::default()
        });
        let changed = Routes::from_policy(&policy(vec![r]), vec![ep(9)], Some(&new));
        assert!(!Arc::ptr_eq(
            &changed.routes()[0].retry.as_ref().unwrap().budget,
            &budget
        ));
    }

    #[test]
    fn backend_is_meshed_only_when_all_endpoints_are() {
        let meshed = |last: u8| proto::Endpoint {
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            ..proto_ep(last)
        };
        let mut r = route("m", vec![]);
        r.backends = vec![
            WeightedBackend {
                name: "all.shop".into(),
                weight: 1,
                endpoints: vec![meshed(1), meshed(2)],
            },
            WeightedBackend {
                name: "mixed.shop".into(),
                weight: 1,
                endpoints: vec![meshed(3), proto_ep(4)],
            },
            WeightedBackend {
                name: "none.shop".into(),
                weight: 1,
                endpoints: vec![],
            },
        ];
        let rs = routes(vec![r]);
        let flags: Vec<bool> = rs.routes()[0]
            .backends
            .iter()
            .map(Backend::meshed)
            .collect();
        assert_eq!(flags, [true, false, false]);
    }
}
