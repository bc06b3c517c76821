//! What HTTP requests to a Service port should do: the HTTPRoutes attached to it, in
//! Gateway API precedence order, or else its TrafficSplit; every backend resolved to
//! endpoints the way the Service itself is. Also the cross-object mistakes worth a log line.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::routes::{
    HttpRoute, PathMatch, RetryBudget, RouteMatch, RouteRetry, RouteRule, TrafficSplit, ValueMatch,
    DEFAULT_RETRY_BACKOFF, DEFAULT_RETRY_CODES,
};
use super::{ClusterState, EndpointInfo, Service, ServicePort};

/// Route name for a TrafficSplit (and, on the proxy, for requests no route matched).
pub const DEFAULT_ROUTE_NAME: &str = "default";

/// One entry of a destination's route table; the first whose match applies wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRoute {
    /// The HTTPRoute's name, or [`DEFAULT_ROUTE_NAME`] for a TrafficSplit: a bounded metrics label.
    pub name: String,
    /// The request matches when any does; empty matches everything. Routes built from an
    /// HTTPRoute carry exactly one match, because Gateway API precedence ranks matches,
    /// not rules.
    pub matches: Vec<RouteMatch>,
    /// Weighted; empty when the rule names no backend (Gateway API: answer 500).
    pub backends: Vec<ResolvedBackend>,
    /// `None`: no timeout.
    pub request_timeout: Option<Duration>,
    pub backend_request_timeout: Option<Duration>,
    /// `None`: never retried.
    pub retry: Option<ResolvedRetry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedBackend {
    /// `service.namespace` of the backend Service.
    pub name: String,
    pub weight: u32,
    /// Empty when the Service does not exist, lacks the port, or selects no ready pod.
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRetry {
    /// Including the first attempt.
    pub max_attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
    /// Retry methods other than GET, HEAD, OPTIONS, PUT, DELETE too.
    pub non_idempotent: bool,
    pub budget: RetryBudget,
}

/// Gateway API match precedence, most specific first. Regular expressions rank between
/// exact and prefix paths (the spec leaves them to implementations): after prefixes they
/// could never win over the `PathPrefix /` every match-less rule gets.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence<'a> {
    path_kind: u8,
    path_len: Reverse<usize>,
    has_method: Reverse<bool>,
    headers: Reverse<usize>,
    query_params: Reverse<usize>,
    // Ties between routes: Gateway API says oldest first, then namespace/name; there are
    // no creation timestamps in the model, so namespace/name decides.
    route: (&'a str, &'a str),
    rule: usize,
    match_index: usize,
}

fn precedence<'a>(
    route: &'a HttpRoute,
    rule: usize,
    match_index: usize,
    route_match: &RouteMatch,
) -> Precedence<'a> {
    let (path_kind, path_len) = match &route_match.path {
        PathMatch::Exact(path) => (0, path.len()),
        PathMatch::Regex(pattern) => (1, pattern.len()),
        PathMatch::Prefix(path) => (2, path.len()),
    };
    Precedence {
        path_kind,
        path_len: Reverse(path_len),
        has_method: Reverse(route_match.method.is_some()),
        headers: Reverse(route_match.headers.len()),
        query_params: Reverse(route_match.query_params.len()),
        route: (&route.namespace, &route.name),
        rule,
        match_index,
    }
}

/// Gateway API: of several header matches with equivalent names only the first counts.
fn first_of_each_name(matches: &[ValueMatch], case_insensitive: bool) -> Vec<ValueMatch> {
    let mut seen = BTreeSet::new();
    matches
        .iter()
        .filter(|m| {
            let key = if case_insensitive {
                m.name.to_ascii_lowercase()
            } else {
                m.name.clone()
            };
            seen.insert(key)
        })
        .cloned()
        .collect()
}

fn effective_match(route_match: &RouteMatch) -> RouteMatch {
    RouteMatch {
        path: route_match.path.clone(),
        headers: first_of_each_name(&route_match.headers, true),
        query_params: first_of_each_name(&route_match.query_params, false),
        method: route_match.method.clone(),
    }
}

fn parent_attaches(route: &HttpRoute, service: &Service, port: &ServicePort) -> bool {
    route.namespace == service.namespace
        && route.parents.iter().any(|parent| {
            parent.name == service.name
                && parent.port.is_none_or(|p| p == port.port)
                && parent
                    .section_name
                    .as_ref()
                    .is_none_or(|section| port.name.as_ref() == Some(section))
        })
}

/// Zero means "no timeout" in Gateway API.
fn nonzero(duration: Option<Duration>) -> Option<Duration> {
    duration.filter(|d| !d.is_zero())
}

fn resolve_retry(route: &HttpRoute, retry: &RouteRetry) -> Option<ResolvedRetry> {
    if retry.attempts == 0 {
        return None;
    }
    Some(ResolvedRetry {
        max_attempts: retry.attempts.saturating_add(1),
        codes: if retry.codes.is_empty() {
            DEFAULT_RETRY_CODES.to_vec()
        } else {
            retry.codes.clone()
        },
        backoff: retry.backoff.unwrap_or(DEFAULT_RETRY_BACKOFF),
        // Sources refuse routes with invalid annotations; the defaults are for hand-built ones.
        non_idempotent: route.retries_non_idempotent().unwrap_or(false),
        budget: route.retry_budget().unwrap_or_default(),
    })
}

impl ClusterState {
    /// The HTTPRoutes in `service`'s namespace attached to `service` on `port`, by name.
    fn attached_routes<'a>(
        &'a self,
        service: &'a Service,
        port: &'a ServicePort,
    ) -> impl Iterator<Item = &'a HttpRoute> + 'a {
        self.http_routes
            .range((service.namespace.clone(), String::new())..)
            .take_while(move |((ns, _), _)| *ns == service.namespace)
            .map(|(_, route)| route)
            .filter(move |route| parent_attaches(route, service, port))
    }

    /// The TrafficSplit in effect for `service`: of several, the first by name.
    fn traffic_split_for<'a>(&'a self, service: &Service) -> Option<&'a TrafficSplit> {
        self.traffic_splits
            .range((service.namespace.clone(), String::new())..)
            .take_while(|((ns, _), _)| *ns == service.namespace)
            .map(|(_, split)| split)
            .find(|split| split.service == service.name)
    }

    /// Route table for HTTP to `service` on `port`: attached HTTPRoutes win over a TrafficSplit.
    pub(super) fn routes_for(
        &self,
        service: &Service,
        port: &ServicePort,
        trust_domain: &str,
    ) -> Vec<ResolvedRoute> {
        let attached: Vec<&HttpRoute> = self.attached_routes(service, port).collect();
        if !attached.is_empty() {
            return self.http_route_table(&attached, port, trust_domain);
        }
        let Some(split) = self.traffic_split_for(service) else {
            return Vec::new();
        };
        let backends = split
            .backends
            .iter()
            .map(|backend| {
                self.backend(
                    &split.namespace,
                    &backend.service,
                    port.port,
                    backend.weight,
                    trust_domain,
                )
            })
            .collect();
        vec![ResolvedRoute {
            name: DEFAULT_ROUTE_NAME.to_owned(),
            matches: Vec::new(),
            backends,
            request_timeout: None,
            backend_request_timeout: None,
            retry: None,
        }]
    }

    fn http_route_table(
        &self,
        attached: &[&HttpRoute],
        port: &ServicePort,
        trust_domain: &str,
    ) -> Vec<ResolvedRoute> {
        let everything = [RouteMatch::everything()];
        let mut table = Vec::new();
        for route in attached {
            for (rule_index, rule) in route.rules.iter().enumerate() {
                let template = self.rule_route(route, rule, port, trust_domain);
                let matches: &[RouteMatch] = if rule.matches.is_empty() {
                    &everything
                } else {
                    &rule.matches
                };
                for (match_index, route_match) in matches.iter().enumerate() {
                    let route_match = effective_match(route_match);
                    let key = precedence(route, rule_index, match_index, &route_match);
                    let mut entry = template.clone();
                    entry.matches = vec![route_match];
                    table.push((key, entry));
                }
            }
        }
        table.sort_by(|(a, _), (b, _)| a.cmp(b));
        table.into_iter().map(|(_, entry)| entry).collect()
    }

    /// Everything of a rule but its matches.
    fn rule_route(
        &self,
        route: &HttpRoute,
        rule: &RouteRule,
        port: &ServicePort,
        trust_domain: &str,
    ) -> ResolvedRoute {
        let backends = rule
            .backend_refs
            .iter()
            .map(|backend| {
                self.backend(
                    &backend.namespace,
                    &backend.name,
                    backend.port.unwrap_or(port.port),
                    backend.weight,
                    trust_domain,
                )
            })
            .collect();
        ResolvedRoute {
            name: route.name.clone(),
            matches: Vec::new(),
            backends,
            request_timeout: nonzero(rule.timeouts.request),
            backend_request_timeout: nonzero(rule.timeouts.backend_request),
            retry: rule
                .retry
                .as_ref()
                .and_then(|retry| resolve_retry(route, retry)),
        }
    }

    /// A backend Service resolved like a destination Service; missing pieces give no
    /// endpoints (requests to it fail) and show up in [`ClusterState::conflicts`].
    fn backend(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        weight: u32,
        trust_domain: &str,
    ) -> ResolvedBackend {
        let endpoints = self
            .services
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(|service| {
                let service_port = service.ports.iter().find(|p| p.port == port)?;
                Some(
                    self.service_endpoints(service, service_port, trust_domain)
                        .0,
                )
            })
            .unwrap_or_default();
        ResolvedBackend {
            name: format!("{name}.{namespace}"),
            weight,
            endpoints,
        }
    }

    /// Human-readable descriptions of objects that do not fit together: HTTPRoutes and a
    /// TrafficSplit on one Service (the HTTPRoutes win), several TrafficSplits for one
    /// Service, references to Services or ports that do not exist. Sorted, without duplicates;
    /// empty when all is well. Meant for logs (and later object status).
    pub fn conflicts(&self) -> Vec<String> {
        let mut found = BTreeSet::new();
        let mut split_of: BTreeMap<(&str, &str), &TrafficSplit> = BTreeMap::new();
        for split in self.traffic_splits.values() {
            let id = format!("TrafficSplit {}/{}", split.namespace, split.name);
            if let Some(first) = split_of.get(&(split.namespace.as_str(), split.service.as_str())) {
                found.insert(format!(
                    "{id}: Service {}/{} is already split by TrafficSplit {}/{}, which is used instead",
                    split.namespace, split.service, first.namespace, first.name
                ));
                continue;
            }
            split_of.insert((&split.namespace, &split.service), split);
            let Some(apex) = self
                .services
                .get(&(split.namespace.clone(), split.service.clone()))
            else {
                found.insert(format!(
                    "{id}: apex Service {}/{} does not exist; the split has no effect",
                    split.namespace, split.service
                ));
                continue;
            };
            for backend in &split.backends {
                for port in &apex.ports {
                    if let Some(problem) =
                        self.backend_problem(&split.namespace, &backend.service, port.port)
                    {
                        found.insert(format!("{id}: {problem}"));
                    }
                }
            }
        }

        for route in self.http_routes.values() {
            let id = format!("HTTPRoute {}/{}", route.namespace, route.name);
            for parent in &route.parents {
                let Some(service) = self
                    .services
                    .get(&(route.namespace.clone(), parent.name.clone()))
                else {
                    found.insert(format!(
                        "{id}: parent Service {}/{} does not exist; the route has no effect there",
                        route.namespace, parent.name
                    ));
                    continue;
                };
                let ports: Vec<&ServicePort> = service
                    .ports
                    .iter()
                    .filter(|port| parent_attaches(route, service, port))
                    .collect();
                if ports.is_empty() {
                    found.insert(format!(
                        "{id}: parent Service {}/{} has no port matching the parentRef; the route has no effect there",
                        route.namespace, parent.name
                    ));
                    continue;
                }
                if let Some(split) =
                    split_of.get(&(service.namespace.as_str(), service.name.as_str()))
                {
                    found.insert(format!(
                        "{id}: Service {}/{} also has TrafficSplit {}/{}; the HTTPRoute wins on the ports it attaches to",
                        service.namespace, service.name, split.namespace, split.name
                    ));
                }
                for port in ports {
                    for backend in route.rules.iter().flat_map(|rule| &rule.backend_refs) {
                        let backend_port = backend.port.unwrap_or(port.port);
                        if let Some(problem) =
                            self.backend_problem(&backend.namespace, &backend.name, backend_port)
                        {
                            found.insert(format!("{id}: {problem}"));
                        }
                    }
                }
            }
        }
        found.into_iter().collect()
    }

    fn backend_problem(&self, namespace: &str, name: &str, port: u16) -> Option<String> {
        match self.services.get(&(namespace.to_owned(), name.to_owned())) {
            None => Some(format!(
                "backend Service {namespace}/{name} does not exist; requests sent to it fail"
            )),
            Some(service) if !service.ports.iter().any(|p| p.port == port) => Some(format!(
                "backend Service {namespace}/{name} has no port {port}; requests sent to it fail"
            )),
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::model::routes::{
        BackendRef, ParentRef, RouteTimeouts, SplitBackend, StringMatch,
        RETRY_BUDGET_PERCENT_ANNOTATION, RETRY_NON_IDEMPOTENT_ANNOTATION,
    };
    use crate::model::{Namespace, Pod, TargetPort, INJECT_ANNOTATION};

    const TD: &str = "cluster.local";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod(name: &str, ip: &str, pod_labels: &[(&str, &str)]) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: name.into(),
            ip: Some(ip.parse().unwrap()),
            service_account: "web".into(),
            labels: labels(pod_labels),
            annotations: BTreeMap::new(),
            container_ports: Vec::new(),
            probes: Vec::new(),
        }
    }

    fn service(
        name: &str,
        ip: &str,
        selector: &[(&str, &str)],
        ports: &[(&str, u16, u16)],
    ) -> Service {
        Service {
            namespace: "shop".into(),
            name: name.into(),
            cluster_ip: Some(ip.parse().unwrap()),
            selector: labels(selector),
            ports: ports
                .iter()
                .map(|(port_name, port, target)| ServicePort {
                    name: Some((*port_name).into()),
                    port: *port,
                    target_port: TargetPort::Number(*target),
                })
                .collect(),
            annotations: BTreeMap::new(),
        }
    }

    /// shop (meshed): Service web (80→8080 "http", 9000→9000 "admin") over all web pods;
    /// web-v1 / web-v2 over one version each (80→8080 / 80→8081); api-v2 (80→9090, 8080→9091).
    fn shop() -> ClusterState {
        let mut state = ClusterState::default();
        state.namespaces.insert(
            "shop".into(),
            Namespace {
                name: "shop".into(),
                annotations: labels(&[(INJECT_ANNOTATION, "enabled")]),
            },
        );
        for p in [
            pod("web-v1-a", "10.0.1.1", &[("app", "web"), ("version", "v1")]),
            pod("web-v2-a", "10.0.1.2", &[("app", "web"), ("version", "v2")]),
            pod("api-v2-a", "10.0.1.3", &[("app", "api-v2")]),
        ] {
            state.pods.insert(("shop".into(), p.name.clone()), p);
        }
        for s in [
            service(
                "web",
                "10.96.0.10",
                &[("app", "web")],
                &[("http", 80, 8080), ("admin", 9000, 9000)],
            ),
            service(
                "web-v1",
                "10.96.0.11",
                &[("version", "v1")],
                &[("http", 80, 8080)],
            ),
            service(
                "web-v2",
                "10.96.0.12",
                &[("version", "v2")],
                &[("http", 80, 8081)],
            ),
            service(
                "api-v2",
                "10.96.0.13",
                &[("app", "api-v2")],
                &[("http", 80, 9090), ("alt", 8080, 9091)],
            ),
        ] {
            state.services.insert(("shop".into(), s.name.clone()), s);
        }
        state
    }

    fn add_split(state: &mut ClusterState, name: &str, backends: &[(&str, u32)]) {
        state.traffic_splits.insert(
            ("shop".into(), name.into()),
            TrafficSplit {
                namespace: "shop".into(),
                name: name.into(),
                service: "web".into(),
                backends: backends
                    .iter()
                    .map(|(service, weight)| SplitBackend {
                        service: (*service).into(),
                        weight: *weight,
                    })
                    .collect(),
            },
        );
    }

    fn backend_ref(name: &str, weight: u32) -> BackendRef {
        BackendRef {
            name: name.into(),
            namespace: "shop".into(),
            port: None,
            weight,
        }
    }

    fn rule(matches: Vec<RouteMatch>, backends: Vec<BackendRef>) -> RouteRule {
        RouteRule {
            matches,
            backend_refs: backends,
            timeouts: RouteTimeouts::default(),
            retry: None,
        }
    }

    fn path(path: PathMatch) -> RouteMatch {
        RouteMatch {
            path,
            ..RouteMatch::everything()
        }
    }

    fn prefix(value: &str) -> RouteMatch {
        path(PathMatch::Prefix(value.into()))
    }

    fn add_route(state: &mut ClusterState, name: &str, port: Option<u16>, rules: Vec<RouteRule>) {
        state.http_routes.insert(
            ("shop".into(), name.into()),
            HttpRoute {
                namespace: "shop".into(),
                name: name.into(),
                annotations: BTreeMap::new(),
                parents: vec![ParentRef {
                    name: "web".into(),
                    port,
                    section_name: None,
                }],
                rules,
            },
        );
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn web_routes(state: &ClusterState) -> Vec<ResolvedRoute> {
        state.resolve(addr("10.96.0.10:80"), TD).routes
    }

    /// (backend name, weight, endpoint addresses) per backend.
    fn backends_of(route: &ResolvedRoute) -> Vec<(String, u32, Vec<SocketAddr>)> {
        route
            .backends
            .iter()
            .map(|b| {
                (
                    b.name.clone(),
                    b.weight,
                    b.endpoints.iter().map(|e| e.addr).collect(),
                )
            })
            .collect()
    }

    fn backend(name: &str, weight: u32, addrs: &[&str]) -> (String, u32, Vec<SocketAddr>) {
        (name.into(), weight, addrs.iter().map(|a| addr(a)).collect())
    }

    #[test]
    fn unrouted_service_and_pods_have_no_routes() {
        let state = shop();
        assert!(web_routes(&state).is_empty());
        let mut split = shop();
        add_split(&mut split, "web-split", &[("web-v1", 1)]);
        let pod = split.resolve(addr("10.0.1.1:8080"), TD);
        assert!(pod.known);
        assert!(pod.routes.is_empty(), "a pod IP is never routed");
    }

    #[test]
    fn traffic_split_90_10() {
        let mut state = shop();
        add_split(&mut state, "web-split", &[("web-v1", 90), ("web-v2", 10)]);
        let destination = state.resolve(addr("10.96.0.10:80"), TD);
        // The apex's own endpoints stay (opaque TCP and unmatched HTTP use them).
        assert_eq!(destination.endpoints.len(), 2);
        assert_eq!(destination.routes.len(), 1);
        let route = &destination.routes[0];
        assert_eq!(route.name, "default");
        assert!(route.matches.is_empty());
        assert_eq!(route.retry, None);
        assert_eq!(
            backends_of(route),
            vec![
                backend("web-v1.shop", 90, &["10.0.1.1:8080"]),
                backend("web-v2.shop", 10, &["10.0.1.2:8081"]),
            ]
        );
        let v1 = &route.backends[0].endpoints[0];
        assert_eq!(
            v1.identity.as_ref().map(|id| id.to_string()).as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        // The backend port is the apex port number: web-v1 has no 9000.
        let admin = state.resolve(addr("10.96.0.10:9000"), TD).routes;
        assert_eq!(
            backends_of(&admin[0]),
            vec![
                backend("web-v1.shop", 90, &[]),
                backend("web-v2.shop", 10, &[])
            ]
        );
        assert!(state
            .conflicts()
            .iter()
            .any(|c| c.contains("web-v1") && c.contains("no port 9000")));
    }

    #[test]
    fn http_route_weighted_backend_refs() {
        let mut state = shop();
        add_route(
            &mut state,
            "web-canary",
            Some(80),
            vec![rule(
                vec![RouteMatch::everything()],
                vec![backend_ref("web-v1", 3), backend_ref("web-v2", 1)],
            )],
        );
        let routes = web_routes(&state);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].name, "web-canary");
        assert_eq!(routes[0].matches, vec![RouteMatch::everything()]);
        assert_eq!(
            backends_of(&routes[0]),
            vec![
                backend("web-v1.shop", 3, &["10.0.1.1:8080"]),
                backend("web-v2.shop", 1, &["10.0.1.2:8081"]),
            ]
        );
        assert!(state.conflicts().is_empty(), "{:?}", state.conflicts());
    }

    #[test]
    fn path_prefix_sends_api_v2_elsewhere_and_explicit_ports_are_honoured() {
        let mut state = shop();
        let mut api = backend_ref("api-v2", 1);
        api.port = Some(8080);
        add_route(
            &mut state,
            "web-paths",
            None,
            vec![
                rule(vec![], vec![backend_ref("web-v1", 1)]),
                rule(vec![prefix("/api/v2")], vec![api]),
            ],
        );
        let routes = web_routes(&state);
        assert_eq!(routes.len(), 2);
        // The longer prefix comes first although its rule is second.
        assert_eq!(routes[0].matches, vec![prefix("/api/v2")]);
        assert_eq!(
            backends_of(&routes[0]),
            vec![backend("api-v2.shop", 1, &["10.0.1.3:9091"])]
        );
        // A rule without matches matches everything.
        assert_eq!(routes[1].matches, vec![RouteMatch::everything()]);
        assert_eq!(
            backends_of(&routes[1]),
            vec![backend("web-v1.shop", 1, &["10.0.1.1:8080"])]
        );
        // No port on the parentRef: attached to every service port.
        assert_eq!(state.resolve(addr("10.96.0.10:9000"), TD).routes.len(), 2);
    }

    #[test]
    fn http_route_wins_over_traffic_split_and_says_so() {
        let mut state = shop();
        add_split(&mut state, "web-split", &[("web-v1", 90), ("web-v2", 10)]);
        add_route(
            &mut state,
            "web-routes",
            Some(80),
            vec![rule(vec![], vec![backend_ref("web-v2", 1)])],
        );
        let routes = web_routes(&state);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].name, "web-routes");
        // The route attaches to port 80 only: 9000 keeps the split.
        let admin = state.resolve(addr("10.96.0.10:9000"), TD).routes;
        assert_eq!(admin.len(), 1);
        assert_eq!(admin[0].name, "default");

        let conflicts = state.conflicts();
        let both: Vec<_> = conflicts
            .iter()
            .filter(|c| {
                c.contains("HTTPRoute shop/web-routes") && c.contains("TrafficSplit shop/web-split")
            })
            .collect();
        assert_eq!(both.len(), 1, "{conflicts:#?}");
    }

    #[test]
    fn missing_backend_service_has_no_endpoints_and_is_reported() {
        let mut state = shop();
        add_route(
            &mut state,
            "web-routes",
            Some(80),
            vec![rule(
                vec![],
                vec![backend_ref("web-v1", 1), backend_ref("web-v9", 1)],
            )],
        );
        let routes = web_routes(&state);
        assert_eq!(
            backends_of(&routes[0]),
            vec![
                backend("web-v1.shop", 1, &["10.0.1.1:8080"]),
                backend("web-v9.shop", 1, &[]),
            ]
        );
        assert_eq!(
            state.conflicts(),
            vec!["HTTPRoute shop/web-routes: backend Service shop/web-v9 does not exist; requests sent to it fail".to_owned()]
        );
    }

    #[test]
    fn parent_ref_port_or_section_mismatch_does_not_attach() {
        let mut state = shop();
        add_split(&mut state, "web-split", &[("web-v1", 1)]);
        add_route(
            &mut state,
            "web-routes",
            Some(81),
            vec![rule(vec![], vec![backend_ref("web-v2", 1)])],
        );
        // Port 81 is not a port of web: the split still applies.
        let routes = web_routes(&state);
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].name, "default");
        assert!(state
            .conflicts()
            .iter()
            .any(|c| c.contains("web-routes") && c.contains("no port matching")));

        // sectionName names a service port: "admin" attaches to 9000, not to 80.
        let route = state
            .http_routes
            .get_mut(&("shop".into(), "web-routes".into()))
            .unwrap();
        route.parents[0].port = None;
        route.parents[0].section_name = Some("admin".into());
        assert_eq!(web_routes(&state)[0].name, "default");
        assert_eq!(
            state.resolve(addr("10.96.0.10:9000"), TD).routes[0].name,
            "web-routes"
        );
    }

    #[test]
    fn routes_in_other_namespaces_or_to_other_services_do_not_attach() {
        let mut state = shop();
        add_route(
            &mut state,
            "r",
            None,
            vec![rule(vec![], vec![backend_ref("web-v1", 1)])],
        );
        let mut moved = state
            .http_routes
            .remove(&("shop".into(), "r".into()))
            .unwrap();
        moved.namespace = "other".into();
        state
            .http_routes
            .insert(("other".into(), "r".into()), moved);
        assert!(web_routes(&state).is_empty());
        assert!(state.resolve(addr("10.96.0.11:80"), TD).routes.is_empty());
    }

    #[test]
    fn gateway_api_precedence_across_routes_and_rules() {
        let mut state = shop();
        let with = |edit: &dyn Fn(&mut RouteMatch)| {
            let mut m = prefix("/");
            edit(&mut m);
            m
        };
        let header = |name: &str| ValueMatch {
            name: name.into(),
            value: StringMatch::Exact("1".into()),
        };
        let query = ValueMatch {
            name: "q".into(),
            value: StringMatch::Exact("1".into()),
        };
        // Route "b" (sorts after "a") holds the most specific matches to show that
        // precedence ranks matches across routes, not routes.
        add_route(
            &mut state,
            "b",
            None,
            vec![
                rule(
                    vec![
                        prefix("/"),
                        path(PathMatch::Exact("/login".into())),
                        with(&|m| m.method = Some("GET".into())),
                    ],
                    vec![],
                ),
                rule(
                    vec![
                        with(&|m| m.headers = vec![header("x-a"), header("x-b")]),
                        with(&|m| m.query_params = vec![query.clone()]),
                        path(PathMatch::Regex("/v[0-9]+/.*".into())),
                    ],
                    vec![],
                ),
            ],
        );
        add_route(
            &mut state,
            "a",
            None,
            vec![rule(
                vec![
                    prefix("/"),
                    prefix("/api"),
                    with(&|m| m.headers = vec![header("x-a")]),
                ],
                vec![],
            )],
        );
        let order: Vec<(String, RouteMatch)> = web_routes(&state)
            .into_iter()
            .map(|r| (r.name, r.matches[0].clone()))
            .collect();
        let expected = vec![
            ("b", path(PathMatch::Exact("/login".into()))),
            ("b", path(PathMatch::Regex("/v[0-9]+/.*".into()))),
            ("a", prefix("/api")),
            ("b", with(&|m| m.method = Some("GET".into()))),
            (
                "b",
                with(&|m| m.headers = vec![header("x-a"), header("x-b")]),
            ),
            ("a", with(&|m| m.headers = vec![header("x-a")])),
            ("b", with(&|m| m.query_params = vec![query.clone()])),
            // Full ties: route a before b.
            ("a", prefix("/")),
            ("b", prefix("/")),
        ];
        let expected: Vec<(String, RouteMatch)> = expected
            .into_iter()
            .map(|(name, m)| (name.to_owned(), m))
            .collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn ties_within_a_route_go_to_the_first_rule() {
        let mut state = shop();
        add_route(
            &mut state,
            "r",
            None,
            vec![
                rule(vec![prefix("/x")], vec![backend_ref("web-v2", 1)]),
                rule(vec![prefix("/x")], vec![backend_ref("web-v1", 1)]),
            ],
        );
        let routes = web_routes(&state);
        assert_eq!(routes[0].backends[0].name, "web-v2.shop");
        assert_eq!(routes[1].backends[0].name, "web-v1.shop");
    }

    #[test]
    fn equivalent_header_names_count_once() {
        let mut state = shop();
        let header = |name: &str, value: &str| ValueMatch {
            name: name.into(),
            value: StringMatch::Exact(value.into()),
        };
        let mut m = prefix("/");
        m.headers = vec![
            header("X-Env", "prod"),
            header("x-env", "dev"),
            header("x-b", "1"),
        ];
        add_route(&mut state, "r", None, vec![rule(vec![m], vec![])]);
        let routes = web_routes(&state);
        assert_eq!(
            routes[0].matches[0].headers,
            vec![header("X-Env", "prod"), header("x-b", "1")]
        );
        assert!(routes[0].backends.is_empty(), "no backendRefs: no backends");
    }

    #[test]
    fn timeouts_and_retries_resolve_with_defaults_and_annotations() {
        let mut state = shop();
        let mut retried = rule(vec![prefix("/a")], vec![backend_ref("web-v1", 1)]);
        retried.timeouts = RouteTimeouts {
            request: Some(Duration::from_secs(2)),
            backend_request: Some(Duration::from_millis(500)),
        };
        retried.retry = Some(RouteRetry {
            codes: vec![],
            attempts: 2,
            backoff: None,
        });
        let mut explicit = rule(vec![prefix("/b")], vec![backend_ref("web-v1", 1)]);
        explicit.timeouts.request = Some(Duration::ZERO);
        explicit.retry = Some(RouteRetry {
            codes: vec![500, 429],
            attempts: 1,
            backoff: Some(Duration::from_millis(100)),
        });
        let mut disabled = rule(vec![prefix("/c")], vec![backend_ref("web-v1", 1)]);
        disabled.retry = Some(RouteRetry {
            codes: vec![503],
            attempts: 0,
            backoff: None,
        });
        add_route(&mut state, "r", None, vec![retried, explicit, disabled]);
        state
            .http_routes
            .get_mut(&("shop".into(), "r".into()))
            .unwrap()
            .annotations = labels(&[
            (RETRY_BUDGET_PERCENT_ANNOTATION, "50"),
            (RETRY_NON_IDEMPOTENT_ANNOTATION, "true"),
        ]);

        let routes = web_routes(&state);
        let budget = RetryBudget {
            ratio: 0.5,
            min_retries_per_second: 10,
            window: Duration::from_secs(10),
        };
        assert_eq!(routes[0].request_timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            routes[0].backend_request_timeout,
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            routes[0].retry,
            Some(ResolvedRetry {
                max_attempts: 3,
                codes: vec![502, 503, 504],
                backoff: Duration::from_millis(25),
                non_idempotent: true,
                budget,
            })
        );
        assert_eq!(routes[1].request_timeout, None, "0s disables the timeout");
        assert_eq!(
            routes[1].retry,
            Some(ResolvedRetry {
                max_attempts: 2,
                codes: vec![500, 429],
                backoff: Duration::from_millis(100),
                non_idempotent: true,
                budget,
            })
        );
        assert_eq!(routes[2].retry, None, "attempts: 0 disables retries");
    }

    #[test]
    fn several_traffic_splits_use_the_first_by_name() {
        let mut state = shop();
        add_split(&mut state, "b-split", &[("web-v2", 1)]);
        add_split(&mut state, "a-split", &[("web-v1", 1)]);
        let routes = web_routes(&state);
        assert_eq!(routes[0].backends[0].name, "web-v1.shop");
        let conflicts = state.conflicts();
        let duplicates: Vec<_> = conflicts
            .iter()
            .filter(|c| c.contains("already split"))
            .collect();
        assert_eq!(
            duplicates,
            vec!["TrafficSplit shop/b-split: Service shop/web is already split by TrafficSplit shop/a-split, which is used instead"]
        );
    }

    #[test]
    fn dangling_references_are_reported() {
        let mut state = shop();
        state.traffic_splits.insert(
            ("shop".into(), "ghost".into()),
            TrafficSplit {
                namespace: "shop".into(),
                name: "ghost".into(),
                service: "nope".into(),
                backends: vec![SplitBackend {
                    service: "web-v1".into(),
                    weight: 1,
                }],
            },
        );
        add_route(&mut state, "r", None, vec![]);
        state
            .http_routes
            .get_mut(&("shop".into(), "r".into()))
            .unwrap()
            .parents[0]
            .name = "missing".into();
        assert_eq!(
            state.conflicts(),
            vec![
                "HTTPRoute shop/r: parent Service shop/missing does not exist; the route has no effect there".to_owned(),
                "TrafficSplit shop/ghost: apex Service shop/nope does not exist; the split has no effect".to_owned(),
            ]
        );
    }
}
