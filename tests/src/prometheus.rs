//! A real Prometheus server (the Debian `prometheus` binary) in a cluster's node namespace:
//! generated scrape config with Kubernetes-style target labels, instant queries over the HTTP
//! API, and the PromQL found in the Grafana dashboards shipped with the chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::{Cluster, NODE_IP};
use crate::error::{HarnessError, IoContext, Result};
use crate::prereqs::find_tool;
use crate::proc::{Cmd, Proc};
use crate::wait::wait_until;

/// Tools a Prometheus test needs: a meshed-pod test's, plus the server itself.
pub const PROMETHEUS_TOOLS: &[&str] = &[
    "ip",
    "setpriv",
    "iptables-nft-restore",
    "tcpdump",
    "prometheus",
];

/// Where Prometheus listens in the node namespace.
pub const PROMETHEUS_PORT: u16 = 9090;
/// Scrape and evaluation interval: short, so a test sees its traffic within seconds.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One proxy admin endpoint to scrape, with the labels Kubernetes service discovery and
/// relabeling would attach (`namespace`, `pod`, `workload`): the proxy itself exports none.
#[derive(Debug, Clone)]
pub struct ScrapeTarget {
    pub addr: SocketAddr,
    pub labels: Vec<(String, String)>,
}

impl ScrapeTarget {
    /// A proxy admin port with the usual pod labels.
    pub fn proxy(addr: SocketAddr, namespace: &str, pod: &str, workload: &str) -> ScrapeTarget {
        ScrapeTarget {
            addr,
            labels: vec![
                ("namespace".to_string(), namespace.to_string()),
                ("pod".to_string(), pod.to_string()),
                ("workload".to_string(), workload.to_string()),
            ],
        }
    }
}

/// The `prometheus.yml` scraping `targets` every [`SCRAPE_INTERVAL`] as job `weft-proxy`.
/// Label values are JSON-quoted, which is valid YAML for any string.
pub fn scrape_config(targets: &[ScrapeTarget]) -> String {
    let secs = SCRAPE_INTERVAL.as_secs().max(1);
    let mut yaml = format!(
        "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\n  evaluation_interval: {secs}s\n\
         scrape_configs:\n- job_name: weft-proxy\n  metrics_path: /metrics\n  static_configs:\n"
    );
    for target in targets {
        let _ = writeln!(
            yaml,
            "  - targets: [{}]",
            Value::String(target.addr.to_string())
        );
        yaml.push_str("    labels:\n");
        for (key, value) in &target.labels {
            let _ = writeln!(yaml, "      {key}: {}", Value::String(value.clone()));
        }
    }
    yaml
}

/// A running Prometheus; stopped when dropped (through its [`Proc`]).
pub struct Prometheus {
    proc: Proc,
    node: crate::netns::Netns,
    base_url: String,
}

/// One element of an instant query's result: labels and value (a scalar result has no labels).
#[derive(Debug, Clone, PartialEq)]
pub struct QuerySample {
    pub labels: BTreeMap<String, String>,
    pub timestamp: f64,
    pub value: f64,
}

impl Prometheus {
    /// Writes the config and starts `prometheus` in the node namespace on
    /// `198.18.0.1:<PROMETHEUS_PORT>`, with its TSDB in the cluster's temp dir; waits for
    /// `/-/ready`.
    pub fn start(cluster: &Cluster, targets: &[ScrapeTarget]) -> Result<Prometheus> {
        let binary = find_tool("prometheus").ok_or_else(|| {
            HarnessError::invalid(
                "prerequisites",
                "prometheus is not installed (run scripts/setup-test-deps)",
            )
        })?;
        let dir = cluster.tmp_dir().join("prometheus");
        let data = dir.join("data");
        std::fs::create_dir_all(&data).context(|| format!("creating {}", data.display()))?;
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, scrape_config(targets))
            .context(|| format!("writing {}", config.display()))?;
        let listen = SocketAddr::from((NODE_IP, PROMETHEUS_PORT));
        let proc = cluster.node().spawn(
            Cmd::new(&binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", data.display()))
                .arg(format!("--web.listen-address={listen}"))
                .arg("--log.level=warn"),
        )?;
        let mut prometheus = Prometheus {
            proc,
            node: cluster.node().clone(),
            base_url: format!("http://{listen}"),
        };
        prometheus.wait_ready()?;
        Ok(prometheus)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}/-/ready", self.base_url);
        let (node, proc) = (&self.node, &mut self.proc);
        wait_until("prometheus to be ready", READY_TIMEOUT, || {
            if let Some(status) = proc.try_wait()? {
                return Err(HarnessError::CommandFailed {
                    command: proc.label().to_string(),
                    status: format!("exited with {status} before becoming ready"),
                    stderr: proc.logs(),
                });
            }
            Ok(node.http_get(&url).is_ok_and(|r| r.status == 200))
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Runs `expr` at `time` (Unix seconds; `None` = now) through `/api/v1/query`.
    pub fn query_at(&self, expr: &str, time: Option<f64>) -> Result<Vec<QuerySample>> {
        let mut url = format!("{}/api/v1/query?query={}", self.base_url, url_encode(expr));
        if let Some(time) = time {
            let _ = write!(url, "&time={time:.3}");
        }
        let response = self.node.http_get(&url)?;
        let body = response.body_text();
        parse_query_response(&body).map_err(|e| match e {
            HarnessError::Invalid { detail, .. } => HarnessError::invalid(
                "prometheus query",
                format!("{expr}: HTTP {}: {detail}", response.status),
            ),
            other => other,
        })
    }

    pub fn query(&self, expr: &str) -> Result<Vec<QuerySample>> {
        self.query_at(expr, None)
    }

    /// The single value `expr` returns at `time`; an error when it returns none or several.
    pub fn scalar_at(&self, expr: &str, time: Option<f64>) -> Result<f64> {
        let samples = self.query_at(expr, time)?;
        match samples.as_slice() {
            [one] => Ok(one.value),
            _ => Err(HarnessError::invalid(
                "prometheus query",
                format!("{expr}: expected one sample, got {samples:?}"),
            )),
        }
    }

    /// The scrape targets' health as Prometheus sees it: `(scrape url, health, last error)`.
    pub fn targets(&self) -> Result<Vec<(String, String, String)>> {
        let url = format!("{}/api/v1/targets", self.base_url);
        let body = self.node.http_get(&url)?.body_text();
        let json: Value = serde_json::from_str(&body)
            .map_err(|e| HarnessError::invalid("prometheus targets", e.to_string()))?;
        let active = json
            .pointer("/data/activeTargets")
            .and_then(Value::as_array)
            .ok_or_else(|| HarnessError::invalid("prometheus targets", body.clone()))?;
        Ok(active
            .iter()
            .map(|t| {
                let field = |name: &str| {
                    t.get(name)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                (field("scrapeUrl"), field("health"), field("lastError"))
            })
            .collect())
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (PromQL is full of `{}"=~`).
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The samples of a `/api/v1/query` answer (vector or scalar); an error for `status: error`.
pub fn parse_query_response(body: &str) -> Result<Vec<QuerySample>> {
    let invalid = |detail: String| HarnessError::invalid("prometheus response", detail);
    let json: Value = serde_json::from_str(body).map_err(|e| invalid(format!("{e}: {body}")))?;
    if json.get("status").and_then(Value::as_str) != Some("success") {
        return Err(invalid(body.to_string()));
    }
    let data = json
        .get("data")
        .ok_or_else(|| invalid(format!("no data: {body}")))?;
    let point = |value: &Value| -> Result<(f64, f64)> {
        let pair = value
            .as_array()
            .filter(|p| p.len() == 2)
            .ok_or_else(|| invalid(format!("bad point {value}")))?;
        let timestamp = pair[0]
            .as_f64()
            .ok_or_else(|| invalid(format!("bad timestamp {value}")))?;
        let value = pair[1]
            .as_str()
            .and_then(parse_prometheus_float)
            .ok_or_else(|| invalid(format!("bad value {value}")))?;
        Ok((timestamp, value))
    };
    match data.get("resultType").and_then(Value::as_str) {
        Some("vector") => data
            .get("result")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(format!("no result: {body}")))?
            .iter()
            .map(|item| {
                let labels = item
                    .get("metric")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let (timestamp, value) = point(item.get("value").unwrap_or(&Value::Null))?;
                Ok(QuerySample {
                    labels,
                    timestamp,
                    value,
                })
            })
            .collect(),
        Some("scalar") => {
            let (timestamp, value) = point(data.get("result").unwrap_or(&Value::Null))?;
            Ok(vec![QuerySample {
                labels: BTreeMap::new(),
                timestamp,
                value,
            }])
        }
        other => Err(invalid(format!("unexpected result type {other:?}: {body}"))),
    }
}

fn parse_prometheus_float(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        other => other.parse().ok(),
    }
}

/// One query found in a dashboard: where it is (for messages) and its PromQL as written.
#[derive(Debug, Clone, PartialEq)]
pub struct DashboardQuery {
    pub dashboard: String,
    /// Panel title, or `variable <name>` for a template variable's `label_values(...)`.
    pub panel: String,
    pub expr: String,
}

/// The dashboards shipped with the chart: `charts/weft/dashboards/` at the workspace root.
pub fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("charts")
        .join("weft")
        .join("dashboards")
}

/// Every `*.json` in `dir`, parsed, sorted by file name.
pub fn load_dashboards(dir: &Path) -> Result<Vec<(String, Value)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text =
                std::fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
            let json: Value = serde_json::from_str(&text).map_err(|e| {
                HarnessError::invalid("dashboard JSON", format!("{}: {e}", path.display()))
            })?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok((name, json))
        })
        .collect()
}

/// Every panel target's `expr` (panels nested in rows included) and every query template
/// variable's query, in document order.
pub fn dashboard_queries(name: &str, dashboard: &Value) -> Vec<DashboardQuery> {
    let mut queries = Vec::new();
    if let Some(panels) = dashboard.get("panels").and_then(Value::as_array) {
        collect_panel_queries(name, panels, &mut queries);
    }
    let variables = dashboard
        .pointer("/templating/list")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for variable in variables {
        if variable.get("type").and_then(Value::as_str) != Some("query") {
            continue;
        }
        let query = match variable.get("query") {
            Some(Value::String(q)) => Some(q.clone()),
            Some(Value::Object(o)) => o.get("query").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        if let Some(expr) = query {
            let var_name = variable
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            queries.push(DashboardQuery {
                dashboard: name.to_string(),
                panel: format!("variable {var_name}"),
                expr,
            });
        }
    }
    queries
}

fn collect_panel_queries(name: &str, panels: &[Value], out: &mut Vec<DashboardQuery>) {
    for panel in panels {
        let title = panel
            .get("title")
            .and_then(Value::as_str)
            .unwrap_or_default();
        for target in panel
            .get("targets")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if let Some(expr) = target.get("expr").and_then(Value::as_str) {
                out.push(DashboardQuery {
                    dashboard: name.to_string(),
                    panel: title.to_string(),
                    expr: expr.to_string(),
                });
            }
        }
        // Collapsed rows keep their panels inside the row.
        if let Some(nested) = panel.get("panels").and_then(Value::as_array) {
            collect_panel_queries(name, nested, out);
        }
    }
}

/// Replaces Grafana variables (`$name` and `${name}`) with `values`; unknown ones are left
/// alone, so the query then fails to parse and the test names it.
pub fn substitute_variables(expr: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match values.iter().find(|(k, _)| *k == name) {
            Some((_, value)) if consumed > 0 => {
                out.push_str(value);
                rest = &after[consumed..];
            }
            _ => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `label_values(selector, label)` (Grafana's variable query) as the PromQL selector it reads
/// and the label it lists; `None` for any other query.
pub fn label_values_query(query: &str) -> Option<(String, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_string(), label.trim().to_string()))
}

/// `(lower, upper]`: the histogram bucket holding `value`, from sorted upper bounds (`le`).
pub fn bucket_of(bounds: &[f64], value: f64) -> Option<(f64, f64)> {
    let i = bounds.iter().position(|le| value <= *le)?;
    Some((if i == 0 { 0.0 } else { bounds[i - 1] }, bounds[i]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn bucket_of_finds_the_half_open_bucket() {
        use super::bucket_of;
        let bounds = [0.016, 0.032, 0.064, f64::INFINITY];
        assert_eq!(bucket_of(&bounds, 0.045), Some((0.032, 0.064)));
        assert_eq!(bucket_of(&bounds, 0.032), Some((0.016, 0.032)));
        assert_eq!(bucket_of(&bounds, 0.001), Some((0.0, 0.016)));
        assert_eq!(bucket_of(&bounds, 100.0), Some((0.064, f64::INFINITY)));
        assert_eq!(bucket_of(&[0.1], 0.2), None);
    }

    use super::*;

    #[test]
    fn encodes_promql_for_a_query_string() {
        assert_eq!(
            url_encode(r#"sum(rate(x{a=~"b|c"}[1m]))"#),
            "sum%28rate%28x%7Ba%3D~%22b%7Cc%22%7D%5B1m%5D%29%29"
        );
        assert_eq!(url_encode("a b+c"), "a%20b%2Bc");
    }

    #[test]
    fn parses_vector_scalar_and_error_answers() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"route":"checkout"},"value":[1700000000.5,"0.9"]},
            {"metric":{},"value":[1700000000.5,"NaN"]}]}}"#;
        let samples = parse_query_response(vector).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].labels["route"], "checkout");
        assert_eq!(samples[0].value, 0.9);
        assert_eq!(samples[0].timestamp, 1_700_000_000.5);
        assert!(samples[1].value.is_nan());
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"+Inf"]}}"#;
        assert_eq!(
            parse_query_response(scalar).unwrap()[0].value,
            f64::INFINITY
        );
        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(parse_query_response(error).is_err());
        assert!(parse_query_response("not json").is_err());
    }

    #[test]
    fn writes_targets_with_their_labels() {
        let config = scrape_config(&[ScrapeTarget::proxy(
            "198.18.0.10:7191".parse().unwrap(),
            "shop",
            "client-0",
            "client",
        )]);
        assert!(config.contains("scrape_interval: 1s"), "{config}");
        assert!(
            config.contains("  - targets: [\"198.18.0.10:7191\"]\n    labels:\n      namespace: \"shop\"\n      pod: \"client-0\"\n      workload: \"client\"\n"),
            "{config}"
        );
    }

    #[test]
    fn substitutes_both_variable_forms_and_leaves_unknown_ones() {
        let values = [("namespace", "shop"), ("__rate_interval", "5m")];
        assert_eq!(
            substitute_variables(
                r#"rate(x{namespace=~"$namespace",a="${namespace}"}[$__rate_interval])"#,
                &values
            ),
            r#"rate(x{namespace=~"shop",a="shop"}[5m])"#
        );
        assert_eq!(
            substitute_variables("x{a=\"$nope\"}", &values),
            "x{a=\"$nope\"}"
        );
        assert_eq!(substitute_variables("a$", &values), "a$");
    }

    #[test]
    fn finds_targets_in_rows_and_variables() {
        let dashboard = serde_json::json!({
            "panels": [
                {"type": "row", "title": "Inbound", "panels": [
                    {"title": "Rate", "targets": [{"expr": "a"}, {"expr": "b"}]}
                ]},
                {"title": "Top", "targets": [{"expr": "c"}]},
                {"type": "text", "title": "Notes"}
            ],
            "templating": {"list": [
                {"type": "datasource", "name": "datasource", "query": "prometheus"},
                {"type": "query", "name": "namespace",
                 "query": {"query": "label_values(weft_control_plane_connected, namespace)"}}
            ]}
        });
        let queries = dashboard_queries("d.json", &dashboard);
        let exprs: Vec<&str> = queries.iter().map(|q| q.expr.as_str()).collect();
        assert_eq!(
            exprs,
            [
                "a",
                "b",
                "c",
                "label_values(weft_control_plane_connected, namespace)"
            ]
        );
        assert_eq!(queries[0].panel, "Rate");
        assert_eq!(queries[3].panel, "variable namespace");
        assert_eq!(
            label_values_query(&queries[3].expr),
            Some((
                "weft_control_plane_connected".to_string(),
                "namespace".to_string()
            ))
        );
        assert_eq!(
            label_values_query("label_values(x{a=~\"b\"}, route)"),
            Some(("x{a=~\"b\"}".to_string(), "route".to_string()))
        );
        assert_eq!(label_values_query("up"), None);
    }
}
