//! What `weft stat` reports, independent of where the numbers come from: the resource rows
//! are grouped by, the label filters, one row of golden signals, and the computation of rows
//! from raw proxy scrapes (the `--from-proxies` source; Prometheus computes the same thing in
//! PromQL, see `prom.rs`).

use std::collections::{BTreeMap, HashMap};

use super::exposition::Sample;
use super::quantile::histogram_quantile;

pub const REQUESTS: &str = "weft_http_requests_total";
pub const RESPONSES: &str = "weft_http_responses_total";
pub const LATENCY_BUCKET: &str = "weft_http_response_latency_seconds_bucket";
pub const TCP_OPEN: &str = "weft_tcp_open_connections";
pub const TCP_OPENED: &str = "weft_tcp_connections_opened_total";
pub const TCP_READ: &str = "weft_tcp_read_bytes_total";
pub const TCP_WRITE: &str = "weft_tcp_write_bytes_total";

pub const QUANTILES: [f64; 3] = [0.5, 0.95, 0.99];

/// What rows are grouped by. `namespace`, `workload` and `pod` are not exported by the proxy:
/// they are target labels (Prometheus' Kubernetes discovery, or `--from-proxies NAME=ADDR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Resource {
    /// One row per workload (deployment, statefulset, ...) and direction.
    #[value(aliases = ["workloads", "deploy", "deployment", "deployments", "wl"])]
    Workload,
    /// One row per pod and direction.
    #[value(aliases = ["pods", "po"])]
    Pod,
    /// One row per workload, direction, route and destination Service.
    #[value(aliases = ["routes", "rt"])]
    Route,
    /// One row per workload, direction, route, destination Service and split backend.
    #[value(aliases = ["backends"])]
    Backend,
}

impl Resource {
    /// The labels that make a row, in column order.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Resource::Workload => &["namespace", "workload", "direction"],
            Resource::Pod => &["namespace", "pod", "direction"],
            Resource::Route => &["namespace", "workload", "direction", "route", "dst_service"],
            Resource::Backend => &[
                "namespace",
                "workload",
                "direction",
                "route",
                "dst_service",
                "dst_backend",
            ],
        }
    }

    /// The label a positional NAME filters on.
    pub fn name_label(self) -> &'static str {
        match self {
            Resource::Workload => "workload",
            Resource::Pod => "pod",
            Resource::Route => "route",
            Resource::Backend => "dst_backend",
        }
    }

    /// TCP signals carry no route labels: only per-workload and per-pod rows show them.
    pub fn has_tcp(self) -> bool {
        matches!(self, Resource::Workload | Resource::Pod)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Workload => "workload",
            Resource::Pod => "pod",
            Resource::Route => "route",
            Resource::Backend => "backend",
        }
    }
}

/// How one label is matched.
#[derive(Clone, Debug, PartialEq)]
pub enum Match {
    Exact(String),
    /// A Service given without its namespace: `name` matches `name.<any namespace>`.
    ServiceName(String),
}

impl Match {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Match::Exact(v) => value == v,
            Match::ServiceName(name) => value
                .strip_prefix(name.as_str())
                .is_some_and(|rest| rest.starts_with('.')),
        }
    }

    /// The PromQL matcher for `label`.
    pub fn promql(&self, label: &str) -> String {
        match self {
            Match::Exact(v) => format!("{label}={}", promql_string(v)),
            Match::ServiceName(name) => {
                format!(
                    "{label}=~{}",
                    promql_string(&format!("{}\\..+", regex_escape(name)))
                )
            }
        }
    }
}

fn regex_escape(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A PromQL double-quoted string literal.
pub fn promql_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Label filters; a row (and every series summed into it) matches all of them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector {
    pub matchers: Vec<(String, Match)>,
}

impl Selector {
    pub fn exact(mut self, label: &str, value: &str) -> Selector {
        self.matchers
            .push((label.to_string(), Match::Exact(value.to_string())));
        self
    }

    pub fn with(mut self, label: &str, m: Match) -> Selector {
        self.matchers.push((label.to_string(), m));
        self
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matchers
            .iter()
            .all(|(label, m)| m.matches(labels.get(label).map(String::as_str).unwrap_or_default()))
    }

    /// Whether the filters name only labels TCP metrics (and the target) carry.
    pub fn applies_to_tcp(&self) -> bool {
        self.matchers.iter().all(|(label, _)| {
            matches!(
                label.as_str(),
                "namespace" | "workload" | "pod" | "direction"
            )
        })
    }

    /// `a="b",c=~"d"`, for inside a PromQL selector's braces.
    pub fn promql(&self) -> String {
        self.matchers
            .iter()
            .map(|(label, m)| m.promql(label))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// TCP signals of a row (per-workload and per-pod rows only).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Tcp {
    /// Connections open at the end of the window.
    pub open_connections: f64,
    /// Connections accepted within the window.
    pub connections: f64,
    pub read_bytes: f64,
    pub write_bytes: f64,
}

/// One row of golden signals.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Values of [`Resource::keys`], in order ("" when a series lacks the label).
    pub key: Vec<String>,
    /// Requests within the window (or since the proxies started, with window 0).
    pub requests: f64,
    /// Requests per second over the window; `None` for totals.
    pub request_rate: Option<f64>,
    /// Share of responses that were neither 5xx nor a gRPC error; `None` without responses.
    pub success_rate: Option<f64>,
    /// Latency quantiles ([`QUANTILES`]) in seconds; `None` without observations.
    pub latency: [Option<f64>; 3],
    pub tcp: Option<Tcp>,
}

impl Row {
    pub fn empty(key: Vec<String>, tcp: bool) -> Row {
        Row {
            key,
            requests: 0.0,
            request_rate: None,
            success_rate: None,
            latency: [None; 3],
            tcp: tcp.then(Tcp::default),
        }
    }
}

/// A response counts as a success unless its status is 5xx or its gRPC status is set and not OK.
pub fn is_success(labels: &BTreeMap<String, String>) -> bool {
    let http_ok = labels
        .get("status_code")
        .is_none_or(|code| !code.starts_with('5'));
    let grpc_ok = labels
        .get("grpc_status")
        .is_none_or(|g| g.is_empty() || g == "0");
    http_ok && grpc_ok
}

/// The finite form of a computed value.
pub fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// One proxy's scrape with its target labels (`namespace`, `workload`, `pod`).
#[derive(Clone, Debug)]
pub struct Scrape {
    pub target_labels: Vec<(String, String)>,
    pub samples: Vec<Sample>,
}

/// Each series' growth between `before` and `now`: counters and histogram buckets as
/// `now - before`, or `now` when the series is new or was reset (the proxy restarted);
/// gauges as `now`. With no `before`, every value as it is (totals since start).
pub fn deltas(now: &[Sample], before: Option<&[Sample]>) -> Vec<Sample> {
    let Some(before) = before else {
        return now.to_vec();
    };
    let old: HashMap<(&str, &BTreeMap<String, String>), f64> = before
        .iter()
        .map(|s| ((s.name.as_str(), &s.labels), s.value))
        .collect();
    now.iter()
        .map(|s| {
            let mut d = s.clone();
            if s.name != TCP_OPEN {
                if let Some(prev) = old.get(&(s.name.as_str(), &s.labels)) {
                    if s.value >= *prev {
                        d.value = s.value - prev;
                    }
                }
            }
            d
        })
        .collect()
}

#[derive(Default)]
struct Acc {
    requests: f64,
    responses: f64,
    ok: f64,
    buckets: BTreeMap<String, f64>,
    tcp: Tcp,
}

/// Rows from per-proxy series growth (see [`deltas`]): sums per row, success rate and
/// quantiles exactly as the PromQL of `prom.rs` computes them. `window_seconds` 0 means
/// totals (no rate).
pub fn rows_from_scrapes(
    scrapes: &[Scrape],
    resource: Resource,
    selector: &Selector,
    window_seconds: f64,
) -> Vec<Row> {
    let tcp = resource.has_tcp() && selector.applies_to_tcp();
    let mut groups: BTreeMap<Vec<String>, Acc> = BTreeMap::new();
    for scrape in scrapes {
        for sample in &scrape.samples {
            let tcp_metric = matches!(
                sample.name.as_str(),
                TCP_OPEN | TCP_OPENED | TCP_READ | TCP_WRITE
            );
            let http_metric = matches!(sample.name.as_str(), REQUESTS | RESPONSES | LATENCY_BUCKET);
            if !(http_metric || (tcp && tcp_metric)) {
                continue;
            }
            // Target labels win over scraped ones of the same name, as Prometheus' default
            // `honor_labels: false` would keep the target's.
            let mut labels = sample.labels.clone();
            for (k, v) in &scrape.target_labels {
                labels.insert(k.clone(), v.clone());
            }
            if !selector.matches(&labels) {
                continue;
            }
            let key: Vec<String> = resource
                .keys()
                .iter()
                .map(|k| labels.get(*k).cloned().unwrap_or_default())
                .collect();
            let acc = groups.entry(key).or_default();
            let v = sample.value;
            match sample.name.as_str() {
                REQUESTS => acc.requests += v,
                RESPONSES => {
                    acc.responses += v;
                    if is_success(&labels) {
                        acc.ok += v;
                    }
                }
                LATENCY_BUCKET => {
                    if let Some(le) = labels.get("le") {
                        *acc.buckets.entry(le.clone()).or_default() += v;
                    }
                }
                TCP_OPEN => acc.tcp.open_connections += v,
                TCP_OPENED => acc.tcp.connections += v,
                TCP_READ => acc.tcp.read_bytes += v,
                TCP_WRITE => acc.tcp.write_bytes += v,
                _ => {}
            }
        }
    }
    groups
        .into_iter()
        .map(|(key, acc)| {
            let buckets: Vec<(f64, f64)> = acc
                .buckets
                .iter()
                .filter_map(|(le, count)| Some((super::exposition::parse_value(le)?, *count)))
                .collect();
            Row {
                key,
                requests: acc.requests,
                request_rate: (window_seconds > 0.0).then(|| acc.requests / window_seconds),
                success_rate: (acc.responses > 0.0).then(|| acc.ok / acc.responses),
                latency: QUANTILES.map(|q| finite(histogram_quantile(q, &buckets))),
                tcp: tcp.then_some(acc.tcp),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stat::exposition::parse;

    fn scrape(workload: &str, text: &str) -> Scrape {
        Scrape {
            target_labels: vec![
                ("namespace".into(), "shop".into()),
                ("workload".into(), workload.into()),
                ("pod".into(), format!("{workload}-0")),
            ],
            samples: parse(text).unwrap(),
        }
    }

    const BEFORE: &str = "\
weft_http_requests_total{direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 20
weft_http_responses_total{status_code=\"200\",grpc_status=\"\",direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 18
weft_http_response_latency_seconds_bucket{le=\"0.1\",direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 20
weft_http_response_latency_seconds_bucket{le=\"0.2\",direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 20
weft_http_response_latency_seconds_bucket{le=\"+Inf\",direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 20
weft_tcp_open_connections{direction=\"outbound\",peer_identity=\"x\",tls=\"true\"} 2
weft_tcp_connections_opened_total{direction=\"outbound\",peer_identity=\"x\",tls=\"true\"} 5
";

    const NOW: &str = "\
weft_http_requests_total{direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 120
weft_http_responses_total{status_code=\"200\",grpc_status=\"\",direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 108
weft_http_responses_total{status_code=\"503\",grpc_status=\"\",direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 10
weft_http_responses_total{status_code=\"200\",grpc_status=\"14\",direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 2
weft_http_response_latency_seconds_bucket{le=\"0.1\",direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 70
weft_http_response_latency_seconds_bucket{le=\"0.2\",direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 120
weft_http_response_latency_seconds_bucket{le=\"+Inf\",direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\",dst_backend=\"payments.shop\",tls=\"true\"} 120
weft_http_requests_total{direction=\"inbound\",route=\"default\",dst_service=\"\",dst_backend=\"\",tls=\"true\"} 4
weft_tcp_open_connections{direction=\"outbound\",peer_identity=\"x\",tls=\"true\"} 3
weft_tcp_connections_opened_total{direction=\"outbound\",peer_identity=\"x\",tls=\"true\"} 4
";

    #[test]
    fn deltas_subtract_counters_keep_gauges_and_restart_resets() {
        let now = parse(NOW).unwrap();
        let before = parse(BEFORE).unwrap();
        let d = deltas(&now, Some(&before));
        let value = |name: &str, pick: &dyn Fn(&Sample) -> bool| {
            d.iter().find(|s| s.name == name && pick(s)).unwrap().value
        };
        assert_eq!(
            value(REQUESTS, &|s| s.labels["direction"] == "outbound"),
            100.0
        );
        // New series: all of it is growth.
        assert_eq!(
            value(REQUESTS, &|s| s.labels["direction"] == "inbound"),
            4.0
        );
        assert_eq!(value(TCP_OPEN, &|_| true), 3.0);
        // 5 → 4: a reset, the proxy restarted; its 4 are all new.
        assert_eq!(value(TCP_OPENED, &|_| true), 4.0);
        assert_eq!(deltas(&now, None), now);
    }

    #[test]
    fn rows_group_sum_and_compute_signals() {
        let now = parse(NOW).unwrap();
        let before = parse(BEFORE).unwrap();
        let scrapes = [Scrape {
            samples: deltas(&now, Some(&before)),
            ..scrape("client", "")
        }];
        let selector = Selector::default()
            .exact("direction", "outbound")
            .with("dst_service", Match::ServiceName("payments".into()));
        let rows = rows_from_scrapes(&scrapes, Resource::Route, &selector, 10.0);
        assert_eq!(rows.len(), 1, "{rows:?}");
        let row = &rows[0];
        assert_eq!(
            row.key,
            ["shop", "client", "outbound", "checkout", "payments.shop"]
        );
        assert_eq!(row.requests, 100.0);
        assert_eq!(row.request_rate, Some(10.0));
        // 90 + 10 + 2 responses; the 503s and the gRPC UNAVAILABLE fail: 90/102.
        assert_eq!(row.success_rate, Some(90.0 / 102.0));
        // 50 in (0, 0.1], 50 in (0.1, 0.2]: p50 = 0.1, p95 = 0.1 + 0.1 × 45/50.
        assert_eq!(row.latency[0], Some(0.1));
        assert!((row.latency[1].unwrap() - 0.19).abs() < 1e-12);
        assert!(row.tcp.is_none());

        let rows = rows_from_scrapes(&scrapes, Resource::Workload, &Selector::default(), 0.0);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].key, ["shop", "client", "inbound"]);
        assert_eq!(rows[0].request_rate, None);
        assert_eq!(rows[0].success_rate, None);
        assert_eq!(rows[0].latency, [None; 3]);
        let out = &rows[1];
        assert_eq!(
            out.tcp
                .as_ref()
                .map(|t| (t.open_connections, t.connections)),
            Some((3.0, 4.0))
        );
    }

    #[test]
    fn service_names_match_with_or_without_namespace() {
        assert!(Match::ServiceName("web".into()).matches("web.shop"));
        assert!(!Match::ServiceName("web".into()).matches("web-v2.shop"));
        assert!(!Match::ServiceName("web".into()).matches("web"));
        assert_eq!(
            Match::ServiceName("a.b".into()).promql("dst_service"),
            r#"dst_service=~"a\\.b\\..+""#
        );
        assert_eq!(
            Selector::default().exact("route", "x\"y").promql(),
            r#"route="x\"y""#
        );
        let mut labels = BTreeMap::new();
        labels.insert("status_code".to_string(), "503".to_string());
        assert!(!is_success(&labels));
        labels.insert("status_code".to_string(), "404".to_string());
        assert!(is_success(&labels));
        labels.insert("grpc_status".to_string(), "2".to_string());
        assert!(!is_success(&labels));
    }
}
