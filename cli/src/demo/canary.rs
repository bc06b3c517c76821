//! The demo's HTTP half: a `web` Service split between `web-v1` and `web-v2` by an SMI
//! TrafficSplit that the demo rewrites as it runs (90/10 → 50/50 → 0/100), the way a
//! canary rollout would, and a per-backend golden-signal table read from the client proxy.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use super::app;

pub const WEB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const WEB_V1_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 21);
const WEB_V2_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 22);
pub const PHASES: [(u32, u32); 3] = [(90, 10), (50, 50), (0, 100)];

/// The three Services: the apex `web` and one per version.
pub fn services_yaml(namespace: &str, app_port: u16) -> String {
    let mut yaml = String::new();
    for (name, ip, version) in [
        ("web", WEB_IP, None),
        ("web-v1", WEB_V1_IP, Some("v1")),
        ("web-v2", WEB_V2_IP, Some("v2")),
    ] {
        let version = version
            .map(|v| format!("\n    version: {v}"))
            .unwrap_or_default();
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {ip}\n  selector:\n    app: web{version}\n  ports:\n  - name: http\n    port: 80\n    targetPort: {app_port}\n"
        ));
    }
    yaml
}

/// Writes the split atomically (rename), as an editor or `kubectl apply` would replace it.
pub fn write_split(dir: &Path, namespace: &str, (v1, v2): (u32, u32)) -> anyhow::Result<()> {
    let yaml = format!(
        "apiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata:\n  name: web-canary\n  namespace: {namespace}\nspec:\n  service: web\n  backends:\n  - service: web-v1\n    weight: {v1}\n  - service: web-v2\n    weight: {v2}\n"
    );
    let tmp = dir.join(".split.yaml.tmp");
    std::fs::write(&tmp, yaml).context("writing the split")?;
    std::fs::rename(&tmp, dir.join("split.yaml")).context("replacing the split")?;
    Ok(())
}

/// What the app saw, per phase: responses by the backend that served them.
#[derive(Default)]
pub struct PhaseTally {
    pub served_by: BTreeMap<String, u64>,
    pub failed: u64,
    pub last_error: Option<String>,
}

pub fn request(tally: &mut PhaseTally, result: Result<(u16, String), String>) {
    match result {
        Ok((200, served_by)) => *tally.served_by.entry(served_by).or_default() += 1,
        Ok((status, _)) => {
            tally.failed += 1;
            tally.last_error = Some(format!("HTTP {status}"));
        }
        Err(e) => {
            tally.failed += 1;
            tally.last_error = Some(e);
        }
    }
}

/// One row per backend of the client proxy's outbound HTTP metrics for the `web` Service.
#[derive(Default, Clone)]
pub struct BackendRow {
    requests: f64,
    success: f64,
    buckets: Vec<(f64, f64)>,
}

pub struct RouteTable {
    rows: BTreeMap<(String, String), BackendRow>,
    at: Instant,
}

impl RouteTable {
    pub fn read(metrics_text: &str, dst_service: &str) -> RouteTable {
        let mut rows: BTreeMap<(String, String), BackendRow> = BTreeMap::new();
        for (name, labels, value) in super::parse_metrics(metrics_text) {
            if labels.get("direction").map(String::as_str) != Some("outbound")
                || labels.get("dst_service").map(String::as_str) != Some(dst_service)
            {
                continue;
            }
            let key = (
                labels.get("route").cloned().unwrap_or_default(),
                labels.get("dst_backend").cloned().unwrap_or_default(),
            );
            let row = rows.entry(key).or_default();
            match name.as_str() {
                "weft_http_requests_total" => row.requests += value,
                "weft_http_responses_total" => {
                    let ok_http = labels
                        .get("status_code")
                        .is_some_and(|c| !c.starts_with('5'));
                    let ok_grpc = labels
                        .get("grpc_status")
                        .is_none_or(|g| g.is_empty() || g == "0");
                    if ok_http && ok_grpc {
                        row.success += value;
                    }
                }
                "weft_http_response_latency_seconds_bucket" => {
                    if let Some(le) = labels.get("le").and_then(|l| {
                        if l == "+Inf" {
                            Some(f64::INFINITY)
                        } else {
                            l.parse().ok()
                        }
                    }) {
                        row.buckets.push((le, value));
                    }
                }
                _ => {}
            }
        }
        RouteTable {
            rows,
            at: Instant::now(),
        }
    }

    /// Prints the table; rates are over the time since `previous`.
    pub fn print(&self, previous: Option<&RouteTable>, split: (u32, u32)) {
        println!(
            "  client proxy → web.demo (TrafficSplit web-v1 {}% / web-v2 {}%):",
            split.0, split.1
        );
        println!(
            "    {:<9} {:<13} {:>8} {:>8} {:>9} {:>9} {:>9}",
            "route", "backend", "requests", "req/s", "success", "p50", "p99"
        );
        for ((route, backend), row) in &self.rows {
            let rate = previous
                .and_then(|p| {
                    p.rows
                        .get(&(route.clone(), backend.clone()))
                        .map(|old| (old.requests, p.at))
                })
                .map(|(old, at)| {
                    (row.requests - old) / self.at.duration_since(at).as_secs_f64().max(0.001)
                })
                .unwrap_or(0.0);
            let success = if row.requests > 0.0 {
                100.0 * row.success / row.requests
            } else {
                0.0
            };
            println!(
                "    {route:<9} {backend:<13} {:>8} {rate:>8.1} {success:>8.1}% {:>9} {:>9}",
                row.requests as u64,
                fmt_ms(quantile(&row.buckets, 0.5)),
                fmt_ms(quantile(&row.buckets, 0.99)),
            );
        }
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|s| format!("{:.1}ms", s * 1000.0))
        .unwrap_or_else(|| "-".into())
}

/// The Prometheus way: the upper bound of the bucket holding the q-th observation, linearly
/// interpolated within it.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let mut b = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in b {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let inside = count - below;
            let frac = if inside > 0.0 {
                (rank - below) / inside
            } else {
                1.0
            };
            return Some(lower + (le - lower) * frac);
        }
        lower = le;
        below = count;
    }
    None
}

/// GET `/` of the `web` Service through the client's proxy; returns (status, x-served-by).
pub fn get_web() -> Result<(u16, String), String> {
    let addr = SocketAddr::from((WEB_IP, 80));
    let (status, headers, _) = app::http_request(addr, "GET", "/", "web.demo")?;
    Ok((
        status,
        headers.get("x-served-by").cloned().unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let b = [
            (0.001, 0.0),
            (0.002, 50.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let p50 = quantile(&b, 0.5).unwrap();
        assert!((p50 - 0.002).abs() < 1e-9, "{p50}");
        let p99 = quantile(&b, 0.99).unwrap();
        assert!(p99 > 0.002 && p99 <= 0.004, "{p99}");
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn table_reads_outbound_rows_of_one_service() {
        let text = concat!(
            "weft_http_requests_total{direction=\"outbound\",route=\"default\",dst_service=\"web.demo\",dst_backend=\"web-v1.demo\",tls=\"true\"} 9\n",
            "weft_http_responses_total{status_code=\"200\",grpc_status=\"\",direction=\"outbound\",route=\"default\",dst_service=\"web.demo\",dst_backend=\"web-v1.demo\",tls=\"true\"} 8\n",
            "weft_http_responses_total{status_code=\"503\",grpc_status=\"\",direction=\"outbound\",route=\"default\",dst_service=\"web.demo\",dst_backend=\"web-v1.demo\",tls=\"true\"} 1\n",
            "weft_http_requests_total{direction=\"inbound\",route=\"default\",dst_service=\"\",dst_backend=\"\",tls=\"true\"} 3\n",
        );
        let t = RouteTable::read(text, "web.demo");
        let row = &t.rows[&("default".to_string(), "web-v1.demo".to_string())];
        assert_eq!((row.requests, row.success), (9.0, 8.0));
        assert_eq!(t.rows.len(), 1);
    }
}
