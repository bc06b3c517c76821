//! The admin `GET /config` document: what this proxy currently enforces, as JSON. Built on
//! request from snapshots the data path already publishes (watch channels, `Arc`s), so
//! serving it takes no lock the data path waits on for longer than a handle clone.
//!
//! The view structs here exist only to be serialised; the hot-path types carry no serde
//! derives. Lists are capped at [`MAX_LIST`] entries and the whole document at
//! [`MAX_ENTRIES`]; a cut sets the top-level `truncated`. Private keys, tokens and
//! certificates never appear: only the SPIFFE id and the certificate's expiry.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Method, Uri};
use serde::Serialize;
use weft_api::destination as dproto;
use weft_api::inbound as iproto;
use weft_certs::CertStore;

use crate::authz::watch::PortSnapshot;
use crate::authz::{PolicyWatch, Protocol};
use crate::discovery::{Discovery, Endpoint, Target};
use crate::http::retry::RetryPolicy;
use crate::http::route::{Route, RouteAction};
use crate::metrics::Metrics;

/// Entries in any one list (targets, routes, backends, endpoints, ports, policies, ...).
pub const MAX_LIST: usize = 1000;
/// List entries in the whole document, so nested lists cannot multiply past a few MB.
pub const MAX_ENTRIES: usize = 20_000;

/// Where `/config` reads from. Discovery and inbound policy start after the admin server
/// (which must answer `/ready` first), so they are attached once they exist.
pub struct ConfigSources {
    control_addr: String,
    discovery: OnceLock<Arc<Discovery>>,
    inbound: OnceLock<Arc<PolicyWatch>>,
}

impl ConfigSources {
    pub fn new(control_addr: &str) -> ConfigSources {
        ConfigSources {
            control_addr: control_addr.to_string(),
            discovery: OnceLock::new(),
            inbound: OnceLock::new(),
        }
    }

    /// Called once, when the listeners are built; later calls are ignored.
    pub fn attach(&self, discovery: Arc<Discovery>, inbound: Arc<PolicyWatch>) {
        let _ = self.discovery.set(discovery);
        let _ = self.inbound.set(inbound);
    }

    /// The current document.
    pub fn render(&self, store: &CertStore, metrics: &Metrics) -> ConfigView {
        let mut budget = Budget::new();
        let outbound = match self.discovery.get() {
            Some(d) => {
                let (targets, more) = d.snapshot(MAX_LIST);
                budget.truncated |= more;
                budget.list(targets, |b, (addr, t)| target_view(b, addr, t.as_deref()))
            }
            None => Vec::new(),
        };
        let inbound = match self.inbound.get() {
            Some(w) => {
                let (ports, more) = w.snapshot(MAX_LIST);
                budget.truncated |= more;
                budget.list(ports, |b, p| port_view(b, &p))
            }
            None => Vec::new(),
        };
        ConfigView {
            identity: IdentityView {
                spiffe_id: store.identity().to_string(),
                certificate: store.is_ready(),
                cert_expiry_unix: store.not_after().and_then(unix),
            },
            control_plane: ControlPlaneView {
                addr: self.control_addr.clone(),
                connected: metrics.control_plane_connected.get() == 1,
            },
            outbound,
            inbound,
            truncated: budget.truncated,
        }
    }
}

/// Counts entries against the caps; a list cut short marks the document truncated.
struct Budget {
    left: usize,
    truncated: bool,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            left: MAX_ENTRIES,
            truncated: false,
        }
    }

    fn list<T, U>(
        &mut self,
        items: impl IntoIterator<Item = T>,
        mut view: impl FnMut(&mut Budget, T) -> U,
    ) -> Vec<U> {
        let mut out = Vec::new();
        for item in items {
            if out.len() >= MAX_LIST || self.left == 0 {
                self.truncated = true;
                break;
            }
            self.left -= 1;
            out.push(view(self, item));
        }
        out
    }
}

fn unix(t: SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs())
}

fn millis(d: Option<Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Serialize)]
pub struct ConfigView {
    identity: IdentityView,
    control_plane: ControlPlaneView,
    outbound: Vec<TargetView>,
    inbound: Vec<PortView>,
    truncated: bool,
}

#[derive(Serialize)]
struct IdentityView {
    spiffe_id: String,
    /// A workload certificate is held.
    certificate: bool,
    cert_expiry_unix: Option<u64>,
}

#[derive(Serialize)]
struct ControlPlaneView {
    addr: String,
    connected: bool,
}

#[derive(Serialize)]
struct TargetView {
    target: String,
    /// "resolving" until the control plane's first answer, then "resolved".
    state: &'static str,
    known: bool,
    service: Option<String>,
    /// "opaque" (never detected) or "detect".
    protocol: &'static str,
    last_update_unix: Option<u64>,
    endpoints: Vec<EndpointView>,
    routes: Vec<RouteView>,
}

#[derive(Serialize)]
struct EndpointView {
    addr: String,
    identity: Option<String>,
}

#[derive(Serialize)]
struct RouteView {
    name: String,
    /// The route that forwards to the target's own endpoints when it has no HTTP routes.
    default: bool,
    /// Any one must hold; empty matches every request.
    matches: Vec<MatchView>,
    backends: Vec<BackendView>,
    timeouts: TimeoutsView,
    retry: Option<RetryView>,
}

#[derive(Serialize)]
struct MatchView {
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<ValueKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    headers: Vec<NamedValue>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    query_params: Vec<NamedValue>,
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum ValueKind {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Serialize)]
struct NamedValue {
    name: String,
    #[serde(flatten)]
    value: Option<ValueKind>,
}

#[derive(Serialize)]
struct BackendView {
    name: String,
    weight: u32,
    endpoints: Vec<EndpointView>,
}

#[derive(Serialize)]
struct TimeoutsView {
    request_ms: Option<u64>,
    backend_request_ms: Option<u64>,
}

#[derive(Serialize)]
struct RetryView {
    max_attempts: u32,
    codes: Vec<u16>,
    backoff_ms: Option<u64>,
    non_idempotent: bool,
    budget: RetryBudgetView,
}

#[derive(Serialize)]
struct RetryBudgetView {
    ratio: f64,
    min_retries_per_second: u32,
    window_secs: u32,
}

#[derive(Serialize)]
struct PortView {
    port: u16,
    /// "waiting" (no answer yet), "active", or "invalid" (the first answer did not
    /// compile: every connection is refused).
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    require_mtls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    default_policy: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trust_domain: Option<String>,
    /// AuthorizationPolicies selecting this port, in evaluation order.
    authorizations: Vec<AuthorizationView>,
    probe_paths: Vec<String>,
    last_update_unix: Option<u64>,
    rejected_updates: u64,
    last_error: Option<String>,
}

#[derive(Serialize)]
struct AuthorizationView {
    name: String,
    action: &'static str,
    rules: Vec<RuleView>,
}

#[derive(Serialize)]
struct RuleView {
    from: Vec<SourceView>,
    to: Vec<DestinationView>,
}

#[derive(Serialize)]
struct SourceView {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    identities: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    service_accounts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    namespaces: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    networks: Vec<NetworkView>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    unauthenticated: bool,
}

#[derive(Serialize)]
struct NetworkView {
    cidr: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    except: Vec<String>,
}

#[derive(Serialize)]
struct DestinationView {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    methods: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    paths: Vec<String>,
}

fn target_view(b: &mut Budget, addr: SocketAddr, target: Option<&Target>) -> TargetView {
    let Some(t) = target else {
        return TargetView {
            target: addr.to_string(),
            state: "resolving",
            known: false,
            service: None,
            protocol: "detect",
            last_update_unix: None,
            endpoints: Vec::new(),
            routes: Vec::new(),
        };
    };
    let installed = t.routes.routes();
    let routes = if installed.is_empty() {
        // Without HTTP routes every request takes the default route, whatever it asks.
        match t
            .routes
            .select(&Method::GET, &Uri::from_static("/"), &HeaderMap::new())
        {
            RouteAction::Forward(route) => b.list([route], |b, r| route_view(b, r, None, true)),
            RouteAction::NotFound => Vec::new(),
        }
    } else {
        let mut cursor = 0;
        b.list(installed, |b, r| {
            let spec = spec_for(&t.route_specs, &mut cursor, r);
            route_view(b, r, spec, false)
        })
    };
    TargetView {
        target: addr.to_string(),
        state: "resolved",
        known: t.known,
        service: t.service.clone(),
        protocol: if t.opaque { "opaque" } else { "detect" },
        last_update_unix: unix(t.updated),
        endpoints: b.list(&t.endpoints, |_, e| endpoint_view(e)),
        routes,
    }
}

/// The control plane's route an installed route was built from. Installed routes are the
/// control plane's in order, minus invalid ones, and names repeat (one entry per match),
/// so the next spec agreeing on name, backends and timeouts is taken; when several agree,
/// the first whose matches would compile.
fn spec_for<'a>(
    specs: &'a [dproto::HttpRoute],
    cursor: &mut usize,
    route: &Route,
) -> Option<&'a dproto::HttpRoute> {
    let agrees = |s: &dproto::HttpRoute| {
        *route.name.0 == s.name
            && millis(route.request_timeout)
                == Some(u64::from(s.request_timeout_ms)).filter(|&ms| ms != 0)
            && millis(route.backend_request_timeout)
                == Some(u64::from(s.backend_request_timeout_ms)).filter(|&ms| ms != 0)
            && route.backends.iter().map(|b| (&*b.name.0, b.weight)).eq(s
                .backends
                .iter()
                .filter(|b| !b.name.is_empty())
                .map(|b| (b.name.as_str(), b.weight)))
    };
    let rest = specs.get(*cursor..)?;
    let mut agreeing = rest.iter().enumerate().filter(|(_, s)| agrees(s));
    let (first, _) = agreeing.next()?;
    let found = std::iter::once(first)
        .chain(agreeing.map(|(i, _)| i))
        .find(|&i| installable(&rest[i]))
        .unwrap_or(first);
    let spec = &specs[*cursor + found];
    *cursor += found + 1;
    Some(spec)
}

/// Whether discovery would have installed `spec` (see `http::route`): every header name and
/// method parses, every value match has a value, every regex compiles within the limit.
fn installable(spec: &dproto::HttpRoute) -> bool {
    use dproto::path_match::Kind;
    use dproto::value_match::Value;
    let regex_ok = |pattern: &str| {
        regex::bytes::RegexBuilder::new(&format!(r"\A(?:{pattern})\z"))
            .size_limit(1 << 20)
            .build()
            .is_ok()
    };
    let value_ok = |v: &dproto::ValueMatch| match &v.value {
        Some(Value::Exact(_)) => true,
        Some(Value::Regex(p)) => regex_ok(p),
        None => false,
    };
    spec.matches.iter().all(|m| {
        let path_ok = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
            Some(Kind::Regex(p)) => regex_ok(p),
            _ => true,
        };
        path_ok
            && (m.method.is_empty() || Method::from_bytes(m.method.as_bytes()).is_ok())
            && m.headers
                .iter()
                .all(|h| http::HeaderName::from_bytes(h.name.as_bytes()).is_ok() && value_ok(h))
            && m.query_params.iter().all(value_ok)
    })
}

fn route_view(
    b: &mut Budget,
    route: &Route,
    spec: Option<&dproto::HttpRoute>,
    default: bool,
) -> RouteView {
    let matches = match spec {
        Some(s) => b.list(&s.matches, match_view),
        None => Vec::new(),
    };
    RouteView {
        name: route.name.0.to_string(),
        default,
        matches,
        backends: b.list(&route.backends, |b, backend| BackendView {
            name: backend.name.0.to_string(),
            weight: backend.weight,
            endpoints: b.list(backend.balancer.endpoints(), |_, e| endpoint_view(e)),
        }),
        timeouts: TimeoutsView {
            request_ms: millis(route.request_timeout),
            backend_request_ms: millis(route.backend_request_timeout),
        },
        retry: route.retry.as_ref().map(retry_view),
    }
}

fn endpoint_view(e: &Endpoint) -> EndpointView {
    EndpointView {
        addr: e.addr.to_string(),
        identity: e.identity.as_ref().map(|p| p.id.to_string()),
    }
}

fn match_view(b: &mut Budget, m: &dproto::RouteMatch) -> MatchView {
    use dproto::path_match::Kind;
    use dproto::value_match::Value;
    let value = |v: &dproto::ValueMatch| NamedValue {
        name: v.name.clone(),
        value: v.value.as_ref().map(|v| match v {
            Value::Exact(s) => ValueKind::Exact(s.clone()),
            Value::Regex(s) => ValueKind::Regex(s.clone()),
        }),
    };
    MatchView {
        path: m
            .path
            .as_ref()
            .and_then(|p| p.kind.as_ref())
            .map(|k| match k {
                Kind::Exact(s) => ValueKind::Exact(s.clone()),
                Kind::Prefix(s) => ValueKind::Prefix(s.clone()),
                Kind::Regex(s) => ValueKind::Regex(s.clone()),
            }),
        method: (!m.method.is_empty()).then(|| m.method.clone()),
        headers: b.list(&m.headers, |_, v| value(v)),
        query_params: b.list(&m.query_params, |_, v| value(v)),
    }
}

fn retry_view(r: &RetryPolicy) -> RetryView {
    RetryView {
        max_attempts: r.max_attempts,
        codes: (100..=599).filter(|&c| r.should_retry_status(c)).collect(),
        backoff_ms: millis(Some(r.backoff)),
        non_idempotent: r.non_idempotent,
        budget: RetryBudgetView {
            ratio: r.budget.ratio(),
            min_retries_per_second: r.budget.min_retries_per_second(),
            window_secs: r.budget.window_secs(),
        },
    }
}

fn port_view(b: &mut Budget, p: &PortSnapshot) -> PortView {
    let mut view = PortView {
        port: p.port,
        state: "waiting",
        protocol: None,
        require_mtls: None,
        default_policy: None,
        trust_domain: None,
        authorizations: Vec::new(),
        probe_paths: Vec::new(),
        last_update_unix: p.updated.and_then(unix),
        rejected_updates: p.rejected,
        last_error: p.last_error.clone(),
    };
    let Some(policy) = &p.policy else {
        return view;
    };
    view.state = if policy.is_invalid() {
        "invalid"
    } else {
        "active"
    };
    view.protocol = Some(match policy.protocol {
        Protocol::Detect => "detect",
        Protocol::Http1 => "http1",
        Protocol::Http2 => "http2",
        Protocol::Grpc => "grpc",
        Protocol::Opaque => "opaque",
    });
    view.require_mtls = Some(policy.require_mtls);
    view.default_policy = Some(policy.default.as_str());
    view.trust_domain = Some(policy.trust_domain.clone());
    view.probe_paths = b.list(&policy.probe_paths, |_, s| s.clone());
    // `source` compiled into `policy`; without it (an invalid first answer) there is nothing
    // in force but the refusal.
    if let Some(source) = &p.source {
        view.authorizations = b.list(&source.policies, authorization_view);
    }
    view
}

fn authorization_view(b: &mut Budget, p: &iproto::Policy) -> AuthorizationView {
    AuthorizationView {
        name: p.name.clone(),
        action: match iproto::Action::try_from(p.action) {
            Ok(iproto::Action::Allow) => "allow",
            Ok(iproto::Action::Deny) => "deny",
            Ok(iproto::Action::Audit) => "audit",
            // Would not have compiled.
            Err(_) => "unknown",
        },
        rules: b.list(&p.rules, |b, r| RuleView {
            from: b.list(&r.from, |b, s| SourceView {
                identities: b.list(&s.identities, |_, v| v.clone()),
                service_accounts: b.list(&s.service_accounts, |_, v| v.clone()),
                namespaces: b.list(&s.namespaces, |_, v| v.clone()),
                networks: b.list(&s.networks, |b, n| NetworkView {
                    cidr: n.cidr.clone(),
                    except: b.list(&n.except, |_, v| v.clone()),
                }),
                unauthenticated: s.unauthenticated,
            }),
            to: b.list(&r.to, |b, d| DestinationView {
                methods: b.list(&d.methods, |_, v| v.clone()),
                paths: b.list(&d.paths, |_, v| v.clone()),
            }),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value as Json};
    use weft_api::destination::path_match::Kind;
    use weft_api::destination::value_match::Value as ProtoValue;

    fn endpoint(addr: &str, identity: &str) -> dproto::Endpoint {
        dproto::Endpoint {
            address: addr.into(),
            identity: identity.into(),
            labels: Default::default(),
        }
    }

    fn backend(
        name: &str,
        weight: u32,
        endpoints: Vec<dproto::Endpoint>,
    ) -> dproto::WeightedBackend {
        dproto::WeightedBackend {
            name: name.into(),
            weight,
            endpoints,
        }
    }

    fn render_target(policy: dproto::OutboundPolicy) -> (Json, bool) {
        let target = Target::from_policy(policy, None);
        let mut b = Budget::new();
        let view = target_view(&mut b, "10.96.0.10:80".parse().unwrap(), Some(&target));
        (serde_json::to_value(view).unwrap(), b.truncated)
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    #[test]
    fn a_routed_target_shows_matches_backends_identities_timeouts_and_retry() {
        let route = |name: &str, prefix: &str, header_regex: &str| dproto::HttpRoute {
            name: name.into(),
            matches: vec![dproto::RouteMatch {
                path: Some(dproto::PathMatch {
                    kind: Some(Kind::Prefix(prefix.into())),
                }),
                headers: vec![dproto::ValueMatch {
                    name: "x-canary".into(),
                    value: Some(ProtoValue::Regex(header_regex.into())),
                }],
                query_params: vec![],
                method: "GET".into(),
            }],
            backends: vec![
                backend("web-v1.shop", 90, vec![endpoint("10.1.0.5:8080", WEB)]),
                backend("web-v2.shop", 10, vec![endpoint("10.1.0.6:8080", "")]),
            ],
            request_timeout_ms: 2000,
            backend_request_timeout_ms: 0,
            retry: Some(dproto::RetryPolicy {
                max_attempts: 3,
                codes: vec![503, 502],
                backoff_ms: 25,
                non_idempotent: false,
                budget: None,
            }),
        };
        let policy = dproto::OutboundPolicy {
            known: true,
            protocol: dproto::ProtocolHint::Unknown as i32,
            service: "web.shop".into(),
            endpoints: vec![endpoint("10.1.0.5:8080", WEB)],
            // Same name, backends and timeouts; the first has a regex that does not
            // compile, so discovery drops it and the view must not borrow its matches.
            routes: vec![
                route("shop/web", "/bad", "("),
                route("shop/web", "/api", "yes|true"),
            ],
        };
        let (v, truncated) = render_target(policy);
        assert!(!truncated);
        assert_eq!(v["target"], "10.96.0.10:80");
        assert_eq!(v["state"], "resolved");
        assert_eq!(v["known"], true);
        assert_eq!(v["service"], "web.shop");
        assert_eq!(v["protocol"], "detect");
        assert!(v["last_update_unix"].as_u64().unwrap() > 1_700_000_000);
        assert_eq!(
            v["endpoints"],
            json!([{"addr": "10.1.0.5:8080", "identity": WEB}])
        );
        let routes = v["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 1, "{v:#}");
        let r = &routes[0];
        assert_eq!(r["name"], "shop/web");
        assert_eq!(r["default"], false);
        assert_eq!(
            r["matches"],
            json!([{
                "path": {"prefix": "/api"},
                "method": "GET",
                "headers": [{"name": "x-canary", "regex": "yes|true"}],
            }])
        );
        assert_eq!(
            r["backends"],
            json!([
                {"name": "web-v1.shop", "weight": 90,
                 "endpoints": [{"addr": "10.1.0.5:8080", "identity": WEB}]},
                {"name": "web-v2.shop", "weight": 10,
                 "endpoints": [{"addr": "10.1.0.6:8080", "identity": null}]},
            ])
        );
        assert_eq!(
            r["timeouts"],
            json!({"request_ms": 2000, "backend_request_ms": null})
        );
        assert_eq!(r["retry"]["max_attempts"], 3);
        assert_eq!(r["retry"]["codes"], json!([502, 503]));
        assert_eq!(r["retry"]["backoff_ms"], 25);
        assert_eq!(r["retry"]["non_idempotent"], false);
    }

    #[test]
    fn a_target_without_routes_shows_its_default_route() {
        let policy = dproto::OutboundPolicy {
            known: true,
            protocol: dproto::ProtocolHint::Opaque as i32,
            service: "db.shop".into(),
            endpoints: vec![endpoint("10.1.0.7:5432", WEB)],
            routes: vec![],
        };
        let (v, _) = render_target(policy);
        assert_eq!(v["protocol"], "opaque");
        let routes = v["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0]["name"], "default");
        assert_eq!(routes[0]["default"], true);
        assert_eq!(routes[0]["matches"], json!([]));
        assert_eq!(routes[0]["retry"], Json::Null);
        assert_eq!(
            routes[0]["backends"],
            json!([{"name": "db.shop", "weight": 1,
                    "endpoints": [{"addr": "10.1.0.7:5432", "identity": WEB}]}])
        );
    }

    #[test]
    fn an_unanswered_target_is_resolving() {
        let mut b = Budget::new();
        let v = serde_json::to_value(target_view(&mut b, "10.96.0.1:443".parse().unwrap(), None))
            .unwrap();
        assert_eq!(v["state"], "resolving");
        assert_eq!(v["routes"], json!([]));
    }

    #[test]
    fn long_lists_are_capped_and_flagged() {
        let endpoints = (0..1500u32)
            .map(|i| endpoint(&format!("10.2.{}.{}:80", i / 256, i % 256), ""))
            .collect();
        let policy = dproto::OutboundPolicy {
            known: true,
            protocol: 0,
            service: "big.shop".into(),
            endpoints,
            routes: vec![],
        };
        let (v, truncated) = render_target(policy);
        assert!(truncated);
        assert_eq!(v["endpoints"].as_array().unwrap().len(), MAX_LIST);
        let backend = &v["routes"][0]["backends"][0];
        assert_eq!(backend["endpoints"].as_array().unwrap().len(), MAX_LIST);

        let mut b = Budget::new();
        let n = b.list(0..3 * MAX_ENTRIES, |b, _| b.list(0..10, |_, i| i).len());
        assert!(b.truncated);
        assert!(n.len() + n.iter().sum::<usize>() <= MAX_ENTRIES);
    }

    #[test]
    fn an_inbound_port_shows_its_policy() {
        let msg = iproto::InboundPolicy {
            protocol: iproto::PortProtocol::Http1 as i32,
            require_mtls: true,
            default_policy: iproto::DefaultPolicy::Deny as i32,
            trust_domain: String::new(),
            policies: vec![iproto::Policy {
                name: "shop/web-readers".into(),
                action: iproto::Action::Allow as i32,
                rules: vec![iproto::Rule {
                    from: vec![iproto::Source {
                        identities: vec!["spiffe://cluster.local/ns/shop/*".into()],
                        service_accounts: vec!["shop/client".into()],
                        networks: vec![iproto::Network {
                            cidr: "10.0.0.0/8".into(),
                            except: vec!["10.9.0.0/16".into()],
                        }],
                        ..Default::default()
                    }],
                    to: vec![iproto::Destination {
                        methods: vec!["GET".into()],
                        paths: vec!["/api/*".into()],
                    }],
                }],
            }],
            probe_paths: vec!["/healthz?full=1".into()],
        };
        let policy = crate::authz::PortPolicy::compile(&msg, "cluster.local").unwrap();
        let updated = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let snap = PortSnapshot {
            port: 8080,
            policy: Some(Arc::new(policy)),
            source: Some(Arc::new(msg)),
            updated: Some(updated),
            rejected: 1,
            last_error: Some("policy \"shop/x\": bad".into()),
            generation: 0,
        };
        let mut b = Budget::new();
        let v = serde_json::to_value(port_view(&mut b, &snap)).unwrap();
        assert_eq!(
            v,
            json!({
                "port": 8080,
                "state": "active",
                "protocol": "http1",
                "require_mtls": true,
                "default_policy": "deny",
                "trust_domain": "cluster.local",
                "authorizations": [{
                    "name": "shop/web-readers",
                    "action": "allow",
                    "rules": [{
                        "from": [{
                            "identities": ["spiffe://cluster.local/ns/shop/*"],
                            "service_accounts": ["shop/client"],
                            "networks": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}],
                        }],
                        "to": [{"methods": ["GET"], "paths": ["/api/*"]}],
                    }],
                }],
                "probe_paths": ["/healthz"],
                "last_update_unix": 1_800_000_000u64,
                "rejected_updates": 1,
                "last_error": "policy \"shop/x\": bad",
            })
        );

        let waiting = PortSnapshot {
            port: 9090,
            policy: None,
            source: None,
            updated: None,
            rejected: 0,
            last_error: None,
            generation: 1,
        };
        let v = serde_json::to_value(port_view(&mut b, &waiting)).unwrap();
        assert_eq!(v["state"], "waiting");
        assert!(v.get("default_policy").is_none());

        let refused = PortSnapshot {
            policy: Some(Arc::new(crate::authz::PortPolicy::refuse_all())),
            ..waiting
        };
        let v = serde_json::to_value(port_view(&mut b, &refused)).unwrap();
        assert_eq!(v["state"], "invalid");
        assert_eq!(v["default_policy"], "deny");
    }
}
