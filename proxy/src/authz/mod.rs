//! Inbound authorization: what may reach this pod, per port. `watch` streams each port's
//! policy from the control plane, `policy` compiles it, `evaluate` decides one connection
//! (opaque TCP) or one request (HTTP); [`PortAuthz`] ties them to metrics and denial logs.
//!
//! Until a port's first policy arrives, a connection waits up to the discovery timeout and
//! is then refused ("no policy from control plane"); once known, the last policy is kept
//! through control-plane outages.

pub mod evaluate;
pub mod policy;
pub mod watch;

#[cfg(test)]
mod reference;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use evaluate::{evaluate, Basis, Decision};
pub use policy::{
    Access, Action, ClientIdentity, DefaultPolicy, HttpAccess, PolicyError, PortPolicy, Protocol,
};
pub use watch::{PolicyRx, PolicyWatch};

use crate::metrics::{AuthzDecision, AuthzLabels, Metrics, Name, PortLabel, RuleLabel};

/// Denial (and audit) log lines per port and second; the rest are counted and reported
/// with the next line that is written.
const LOG_LINES_PER_SECOND: u32 = 10;
/// Every redirected port reaches the proxy, and inbound clients are not trusted: a port
/// scan must not hold a control-plane stream per port. Beyond this many watched ports,
/// the least recently used port without open connections stops being watched.
const MAX_WATCHED_PORTS: usize = 256;
/// Distinct `port` label values; ports first seen after these are counted as "other", so
/// a scan cannot mint a metrics series per port.
const MAX_PORT_LABELS: usize = 256;

/// Per-proxy authorization: one [`PortAuthz`] per port, created by its first connection.
pub struct Authz {
    source: PolicySource,
    metrics: Arc<Metrics>,
    /// How long a connection waits for a port's first policy.
    timeout: Duration,
    // Touched once per new connection, never per request.
    ports: Mutex<Ports>,
}

#[derive(Default)]
struct Ports {
    watched: HashMap<u16, Watched>,
    labelled: HashSet<u16>,
}

struct Watched {
    state: Arc<PortState>,
    last_used: Instant,
}

enum PolicySource {
    Control(Arc<PolicyWatch>),
    /// Tests: a fixed channel per port.
    #[cfg(test)]
    Fixed(PolicyRx),
}

/// One port's authorization, cheap to clone into every connection on it.
#[derive(Clone)]
pub struct PortAuthz {
    state: Arc<PortState>,
    metrics: Arc<Metrics>,
    timeout: Duration,
}

struct PortState {
    port: u16,
    port_label: PortLabel,
    rx: PolicyRx,
    denials: LogLimiter,
    audits: LogLimiter,
    // Label values shared by every count on the port.
    default_label: Name,
    route_label: Name,
    no_client: Name,
}

impl Authz {
    pub fn new(watch: Arc<PolicyWatch>, metrics: Arc<Metrics>, timeout: Duration) -> Arc<Self> {
        Arc::new(Authz {
            source: PolicySource::Control(watch),
            metrics,
            timeout,
            ports: Mutex::new(Ports::default()),
        })
    }

    /// Every port reads `rx` (tests).
    #[cfg(test)]
    pub fn fixed(rx: PolicyRx, metrics: Arc<Metrics>, timeout: Duration) -> Arc<Self> {
        Arc::new(Authz {
            source: PolicySource::Fixed(rx),
            metrics,
            timeout,
            ports: Mutex::new(Ports::default()),
        })
    }

    /// The port's authorization; the first call starts its policy watch (without waiting).
    pub fn port(&self, port: u16) -> PortAuthz {
        let state = {
            let mut ports = self
                .ports
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let now = Instant::now();
            match ports.watched.get_mut(&port) {
                Some(w) => {
                    w.last_used = now;
                    w.state.clone()
                }
                None => {
                    if ports.watched.len() >= MAX_WATCHED_PORTS {
                        ports.evict_idle();
                    }
                    let state = self.new_port(port, &mut ports.labelled);
                    ports.watched.insert(
                        port,
                        Watched {
                            state: state.clone(),
                            last_used: now,
                        },
                    );
                    state
                }
            }
        };
        PortAuthz {
            state,
            metrics: self.metrics.clone(),
            timeout: self.timeout,
        }
    }

    fn new_port(&self, port: u16, labelled: &mut HashSet<u16>) -> Arc<PortState> {
        let rx = match &self.source {
            PolicySource::Control(watch) => watch.start(port),
            #[cfg(test)]
            PolicySource::Fixed(rx) => rx.clone(),
        };
        let port_label = if labelled.contains(&port) || labelled.len() < MAX_PORT_LABELS {
            labelled.insert(port);
            PortLabel(Some(port))
        } else {
            PortLabel(None)
        };
        Arc::new(PortState {
            port,
            port_label,
            rx,
            denials: LogLimiter::default(),
            audits: LogLimiter::default(),
            default_label: Name::new("default"),
            route_label: Name::new("default"),
            no_client: Name::new(""),
        })
    }
}

impl Ports {
    /// Stops watching the least recently used port that no connection holds (dropping its
    /// receiver ends its stream). Ports in use are never evicted.
    fn evict_idle(&mut self) {
        let oldest_idle = self
            .watched
            .iter()
            .filter(|(_, w)| Arc::strong_count(&w.state) == 1)
            .min_by_key(|(_, w)| w.last_used)
            .map(|(port, _)| *port);
        if let Some(port) = oldest_idle {
            self.watched.remove(&port);
        }
    }
}

impl PortAuthz {
    pub fn port(&self) -> u16 {
        self.state.port
    }

    /// The port's current policy; only while none has arrived yet does this wait (up to
    /// the timeout). No lock is held after it returns.
    pub async fn policy(&self) -> Option<Arc<PortPolicy>> {
        if let Some(p) = self.state.rx.borrow().as_ref() {
            return Some(p.clone());
        }
        let mut rx = self.state.rx.clone();
        let waited = tokio::time::timeout(self.timeout, rx.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(current)) => current.clone(),
            _ => None,
        }
    }

    /// Decides `access` on the current policy, counts it and logs denials.
    pub async fn decide(&self, access: &Access<'_>) -> Decision {
        let policy = self.policy().await;
        self.check(policy.as_deref(), access)
    }

    /// Decides `access` on `policy` (from [`PortAuthz::policy`]), counts it and logs denials.
    pub fn check(&self, policy: Option<&PortPolicy>, access: &Access<'_>) -> Decision {
        let decision = evaluate(policy, access);
        let s = &self.state;
        let client_id = access.peer.map_or(&s.no_client, |p| &p.uri);
        let labels = AuthzLabels {
            decision: if decision.allowed {
                AuthzDecision::Allow
            } else {
                AuthzDecision::Deny
            },
            policy: decision.policy_label().unwrap_or(&s.default_label).clone(),
            rule: RuleLabel(decision.rule_label()),
            port: s.port_label,
            route: s.route_label.clone(),
            client_id: client_id.clone(),
        };
        self.metrics.authz_decision(&labels);
        if !decision.allowed {
            if let Some(suppressed) = s.denials.admit() {
                tracing::info!(
                    port = s.port,
                    decision = "deny",
                    reason = %decision.reason(),
                    policy = %labels.policy.0,
                    rule = ?decision.rule_label(),
                    client_id = %client_id.0,
                    client_ip = %access.ip,
                    tls = access.tls,
                    method = access.http.map(|h| h.method),
                    path = access.http.map(|h| h.path),
                    suppressed,
                    "inbound access denied"
                );
            }
        } else if let Some(audit) = &decision.audit_would_deny {
            self.metrics.authz_decision(&AuthzLabels {
                decision: AuthzDecision::AuditDeny,
                policy: audit.clone(),
                rule: RuleLabel(None),
                ..labels
            });
            if let Some(suppressed) = s.audits.admit() {
                tracing::info!(
                    port = s.port,
                    decision = "audit_deny",
                    audit_policy = %audit.0,
                    client_id = %client_id.0,
                    client_ip = %access.ip,
                    tls = access.tls,
                    method = access.http.map(|h| h.method),
                    path = access.http.map(|h| h.path),
                    suppressed,
                    "inbound access allowed, but AUDIT policies would deny it"
                );
            }
        }
        decision
    }
}

/// At most [`LOG_LINES_PER_SECOND`] lines per one-second window.
#[derive(Default)]
struct LogLimiter {
    // Touched only on denials and audits; a short critical section.
    state: Mutex<LimiterState>,
}

#[derive(Default)]
struct LimiterState {
    window: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// `Some(lines suppressed since the last one written)` when this line may be written.
    fn admit(&self) -> Option<u64> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if s.window
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1))
        {
            s.window = Some(now);
            s.written = 0;
        }
        if s.written >= LOG_LINES_PER_SECOND {
            s.suppressed += 1;
            return None;
        }
        s.written += 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

/// The path policies are matched against: percent-encoded unreserved characters decoded
/// and `.`/`..` segments resolved (RFC 3986 §6.2.2), as most servers would before routing.
/// Without this, `/api/%2e%2e/admin` would pass an ALLOW of `/api/*` and reach `/admin`.
/// Empty segments (`//`) and other escapes (`%2F`) are kept. The request is forwarded unchanged.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if !path.contains('%') && !path.contains("/.") {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    if !decoded.starts_with('/') {
        return Cow::Owned(decoded);
    }
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                out.pop();
            }
            other => {
                out.push(other);
                continue;
            }
        }
        // A trailing dot segment leaves a directory: "/a/b/.." is "/a/".
        if i == last {
            out.push("");
        }
    }
    Cow::Owned(format!("/{}", out.join("/")))
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (hi * 16 + lo) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                    i += 3;
                    continue;
                }
            }
        }
        // Non-ASCII bytes cannot appear in a valid http::Uri path; push whole chars anyway.
        let ch_len = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + ch_len]);
        i += ch_len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::inbound as proto;
    use weft_certs::SpiffeId;

    #[test]
    fn paths_are_normalized_for_matching() {
        let cases = [
            ("/api/v1/users", "/api/v1/users"),
            ("/", "/"),
            ("/.well-known/x", "/.well-known/x"),
            ("/api/../admin", "/admin"),
            ("/api/%2e%2e/admin", "/admin"),
            ("/api/%2E%2E/admin", "/admin"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a//b", "/a//b"),
            ("/%61dmin", "/admin"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2", "/a%2"),
            ("/a%zz", "/a%zz"),
            ("/%", "/%"),
            ("*", "*"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }

    #[test]
    fn log_limiter_counts_what_it_suppresses() {
        let l = LogLimiter::default();
        for _ in 0..LOG_LINES_PER_SECOND {
            assert_eq!(l.admit(), Some(0));
        }
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
        // A new window reports the two suppressed lines once.
        l.state.lock().unwrap().window = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(l.admit(), Some(2));
        assert_eq!(l.admit(), Some(0));
    }

    fn compiled(msg: proto::InboundPolicy) -> Option<Arc<PortPolicy>> {
        Some(Arc::new(
            PortPolicy::compile(&msg, "cluster.local").unwrap(),
        ))
    }

    #[tokio::test]
    async fn decisions_are_counted_with_bounded_labels() {
        let metrics = Metrics::new();
        let msg = proto::InboundPolicy {
            policies: vec![
                proto::Policy {
                    name: "shop/audit-web".into(),
                    action: proto::Action::Audit as i32,
                    rules: vec![proto::Rule {
                        from: vec![proto::Source {
                            namespaces: vec!["nobody".into()],
                            ..Default::default()
                        }],
                        to: vec![],
                    }],
                },
                proto::Policy {
                    name: "shop/no-admin".into(),
                    action: proto::Action::Deny as i32,
                    rules: vec![proto::Rule {
                        from: vec![],
                        to: vec![proto::Destination {
                            methods: vec![],
                            paths: vec!["/admin/*".into()],
                        }],
                    }],
                },
            ],
            ..Default::default()
        };
        let (_tx, rx) = tokio::sync::watch::channel(compiled(msg));
        let authz = Authz::fixed(rx, metrics.clone(), Duration::from_millis(10));
        let port = authz.port(8080);
        let api =
            ClientIdentity::new(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap());
        let access = |path| Access {
            peer: Some(&api),
            ip: "10.1.0.1".parse().unwrap(),
            tls: true,
            http: Some(HttpAccess {
                method: "GET",
                path,
            }),
        };
        assert!(port.decide(&access("/api")).await.allowed);
        assert!(port.decide(&access("/api")).await.allowed);
        assert!(!port.decide(&access("/admin/x")).await.allowed);
        let text = metrics.encode();
        let id = "spiffe://cluster.local/ns/shop/sa/api";
        for want in [
            format!(
                r#"weft_inbound_authz_total{{decision="allow",policy="default",rule="",port="8080",route="default",client_id="{id}"}} 2"#
            ),
            format!(
                r#"weft_inbound_authz_total{{decision="audit_deny",policy="shop/audit-web",rule="",port="8080",route="default",client_id="{id}"}} 2"#
            ),
            format!(
                r#"weft_inbound_authz_total{{decision="deny",policy="shop/no-admin",rule="0",port="8080",route="default",client_id="{id}"}} 1"#
            ),
        ] {
            assert!(text.contains(&want), "missing {want}\n{text}");
        }
    }

    #[tokio::test]
    async fn watched_ports_and_port_labels_are_bounded() {
        let metrics = Metrics::new();
        let (_tx, rx) = tokio::sync::watch::channel(compiled(proto::InboundPolicy::default()));
        let authz = Authz::fixed(rx, metrics.clone(), Duration::from_millis(10));
        let held = authz.port(1);
        for port in 2..=1000 {
            let _ = authz.port(port);
        }
        {
            let ports = authz.ports.lock().unwrap();
            assert!(ports.watched.len() <= MAX_WATCHED_PORTS);
            assert_eq!(ports.labelled.len(), MAX_PORT_LABELS);
        }
        // A port with an open connection keeps its state (and its watch).
        assert!(Arc::ptr_eq(&held.state, &authz.port(1).state));
        let access = Access {
            peer: None,
            ip: "10.1.0.1".parse().unwrap(),
            tls: false,
            http: None,
        };
        authz.port(1).decide(&access).await;
        authz.port(999).decide(&access).await;
        let text = metrics.encode();
        assert!(text.contains(r#"port="1",route="default""#), "{text}");
        assert!(text.contains(r#"port="other",route="default""#), "{text}");
        assert!(!text.contains(r#"port="999""#), "{text}");
    }

    #[tokio::test]
    async fn a_port_without_policy_waits_then_fails_closed() {
        let metrics = Metrics::new();
        let (tx, rx) = tokio::sync::watch::channel(None);
        let authz = Authz::fixed(rx, metrics.clone(), Duration::from_millis(50));
        let port = authz.port(5432);
        let access = Access {
            peer: None,
            ip: "10.1.0.1".parse().unwrap(),
            tls: false,
            http: None,
        };
        let d = port.decide(&access).await;
        assert!(!d.allowed);
        assert_eq!(d.reason(), "no policy from control plane");
        assert!(metrics.encode().contains(
            r#"weft_inbound_authz_total{decision="deny",policy="default",rule="",port="5432",route="default",client_id=""} 1"#
        ));
        // An answer arriving while a connection waits lets it through.
        let waiting = tokio::spawn({
            let port = port.clone();
            async move {
                let access = Access {
                    peer: None,
                    ip: "10.1.0.1".parse().unwrap(),
                    tls: false,
                    http: None,
                };
                port.decide(&access).await.allowed
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        tx.send_replace(compiled(proto::InboundPolicy::default()));
        assert!(waiting.await.unwrap());
    }
}
