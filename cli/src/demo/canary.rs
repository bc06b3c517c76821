//! The demo's HTTP half: a `web` Service split between `web-v1` and `web-v2` by an SMI
//! TrafficSplit that the demo rewrites as it runs (90/10 → 50/50 → 0/100), the way a
//! canary rollout would, and `weft stat`'s per-backend view of the client proxy's metrics.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use super::app;
use crate::stat::exposition::{self, Sample};
use crate::stat::model::{self, Resource, Scrape, Selector};
use crate::stat::render::{self, Frame};

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

/// A scrape of the client proxy, shown with `weft stat`'s backend view (outbound, to one
/// Service) over the time since the previous scrape.
pub struct RouteTable {
    samples: Result<Vec<Sample>, String>,
    dst_service: String,
    at: Instant,
}

impl RouteTable {
    pub fn read(metrics_text: &str, dst_service: &str) -> RouteTable {
        RouteTable {
            samples: exposition::parse(metrics_text).map_err(|e| e.to_string()),
            dst_service: dst_service.to_string(),
            at: Instant::now(),
        }
    }

    /// The stat frame: growth since `previous` (totals without one).
    pub fn frame(&self, previous: Option<&RouteTable>) -> Result<Frame, String> {
        let now = self.samples.as_ref().map_err(Clone::clone)?;
        let before = previous.and_then(|p| p.samples.as_ref().ok().map(|s| (s, p.at)));
        let window = before.map_or(0.0, |(_, at)| {
            self.at.duration_since(at).as_secs_f64().max(0.001)
        });
        let scrapes = [Scrape {
            target_labels: vec![
                ("namespace".into(), "demo".into()),
                ("workload".into(), "client".into()),
            ],
            samples: model::deltas(now, before.map(|(s, _)| s.as_slice())),
        }];
        let selector = Selector::default()
            .exact("direction", "outbound")
            .exact("dst_service", &self.dst_service);
        Ok(Frame {
            source: "proxies",
            resource: Resource::Backend,
            window_seconds: window,
            rows: model::rows_from_scrapes(&scrapes, Resource::Backend, &selector, window),
        })
    }

    /// Prints the table; rates are over the time since `previous`.
    pub fn print(&self, previous: Option<&RouteTable>, split: (u32, u32)) {
        println!(
            "  weft stat backend --to {} (client proxy; TrafficSplit web-v1 {}% / web-v2 {}%):",
            self.dst_service, split.0, split.1
        );
        match self.frame(previous) {
            Ok(frame) => {
                for line in render::table(&frame).lines() {
                    println!("    {line}");
                }
            }
            Err(e) => println!("    client proxy /metrics unreadable: {e}"),
        }
    }
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

    const BEFORE: &str = "weft_http_requests_total{direction=\"outbound\",route=\"default\",dst_service=\"web.demo\",dst_backend=\"web-v1.demo\",tls=\"true\"} 4\n";
    const NOW: &str = concat!(
        "weft_http_requests_total{direction=\"outbound\",route=\"default\",dst_service=\"web.demo\",dst_backend=\"web-v1.demo\",tls=\"true\"} 9\n",
        "weft_http_responses_total{status_code=\"200\",grpc_status=\"\",direction=\"outbound\",route=\"default\",dst_service=\"web.demo\",dst_backend=\"web-v1.demo\",tls=\"true\"} 8\n",
        "weft_http_responses_total{status_code=\"503\",grpc_status=\"\",direction=\"outbound\",route=\"default\",dst_service=\"web.demo\",dst_backend=\"web-v1.demo\",tls=\"true\"} 1\n",
        "weft_http_requests_total{direction=\"inbound\",route=\"default\",dst_service=\"\",dst_backend=\"\",tls=\"true\"} 3\n",
        "weft_http_requests_total{direction=\"outbound\",route=\"default\",dst_service=\"echo.demo\",dst_backend=\"echo.demo\",tls=\"true\"} 3\n",
    );

    #[test]
    fn table_shows_outbound_backends_of_one_service() {
        let now = RouteTable::read(NOW, "web.demo");
        let totals = now.frame(None).unwrap();
        assert_eq!(totals.rows.len(), 1);
        let row = &totals.rows[0];
        assert_eq!(row.key[5], "web-v1.demo");
        assert_eq!((row.requests, row.success_rate), (9.0, Some(8.0 / 9.0)));
        let before = RouteTable::read(BEFORE, "web.demo");
        let grown = now.frame(Some(&before)).unwrap();
        assert_eq!(grown.rows[0].requests, 5.0);
        assert!(grown.rows[0].request_rate.is_some());
        assert!(RouteTable::read("garbage{", "web.demo")
            .frame(None)
            .is_err());
    }
}
