//! The `--prometheus` source: the golden signals as PromQL instant queries over
//! `/api/v1/query`. Sums, the success ratio and `histogram_quantile` are computed by
//! Prometheus; growth over the window is each series' newest sample minus its sample one
//! window earlier (the whole value for a series born inside the window or reset by a proxy
//! restart), the same rule as `--from-proxies`, so both sources give whole, equal counts.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use super::http;
use super::model::{
    Resource, Row, Selector, Tcp, LATENCY_BUCKET, QUANTILES, REQUESTS, RESPONSES, TCP_OPEN,
    TCP_OPENED, TCP_READ, TCP_WRITE,
};

/// `metric{selector}`, or the bare name when there is no filter.
fn series(metric: &str, selector: &str) -> String {
    if selector.is_empty() {
        metric.to_string()
    } else {
        format!("{metric}{{{selector}}}")
    }
}

/// Each series' growth over `window` (see the module doc); its value with no window.
pub fn growth(metric: &str, selector: &str, window: Duration) -> String {
    let s = series(metric, selector);
    if window.is_zero() {
        return s;
    }
    let w = promql_duration(window);
    format!("((({s}) - ({s} offset {w})) >= 0 or {s})")
}

fn promql_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// Every query `weft stat` runs, by what it fills in.
pub struct Queries {
    pub requests: String,
    pub success_rate: String,
    pub latency: [String; 3],
    /// open, opened, read, written; empty when the rows carry no TCP signals.
    pub tcp: Vec<String>,
}

pub fn queries(resource: Resource, selector: &Selector, window: Duration) -> Queries {
    let keys = resource.keys().join(", ");
    let sel = selector.promql();
    let sum =
        |metric: &str, sel: &str| format!("sum by ({keys}) ({})", growth(metric, sel, window));
    let ok_sel = [sel.as_str(), r#"status_code!~"5..",grpc_status=~"|0""#]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(",");
    let all = sum(RESPONSES, &sel);
    // A row whose every response failed has no success series: `or all * 0` makes it 0.
    let success_rate = format!("({} or {all} * 0) / {all}", sum(RESPONSES, &ok_sel));
    let latency = QUANTILES.map(|q| {
        format!(
            "histogram_quantile({q}, sum by ({keys}, le) ({}))",
            growth(LATENCY_BUCKET, &sel, window)
        )
    });
    let tcp = if resource.has_tcp() && selector.applies_to_tcp() {
        vec![
            format!("sum by ({keys}) ({})", series(TCP_OPEN, &sel)),
            sum(TCP_OPENED, &sel),
            sum(TCP_READ, &sel),
            sum(TCP_WRITE, &sel),
        ]
    } else {
        Vec::new()
    };
    Queries {
        requests: sum(REQUESTS, &sel),
        success_rate,
        latency,
        tcp,
    }
}

/// Runs one instant query: `(labels, value)` per element of the answer.
pub async fn query(
    base_url: &str,
    expr: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<(BTreeMap<String, String>, f64)>> {
    let url = format!(
        "{}/api/v1/query?query={}",
        base_url.trim_end_matches('/'),
        url_encode(expr)
    );
    let (status, body) = http::get(&url, timeout)
        .await
        .with_context(|| format!("querying Prometheus at {base_url}"))?;
    parse_answer(&body).with_context(|| format!("Prometheus answered HTTP {status} to {expr}"))
}

/// The elements of a `/api/v1/query` answer (vector or scalar).
pub fn parse_answer(body: &str) -> anyhow::Result<Vec<(BTreeMap<String, String>, f64)>> {
    let json: Value =
        serde_json::from_str(body).with_context(|| format!("not JSON: {body:.200}"))?;
    if json.get("status").and_then(Value::as_str) != Some("success") {
        bail!(
            "{}",
            json.get("error").and_then(Value::as_str).unwrap_or(body)
        );
    }
    let value_of = |point: &Value| -> Option<f64> {
        super::exposition::parse_value(point.as_array()?.get(1)?.as_str()?)
    };
    let data = json.get("data").context("no data in the answer")?;
    match data.get("resultType").and_then(Value::as_str) {
        Some("vector") => data
            .get("result")
            .and_then(Value::as_array)
            .context("no result")?
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
                let value = item
                    .get("value")
                    .and_then(value_of)
                    .with_context(|| format!("bad sample {item}"))?;
                Ok((labels, value))
            })
            .collect(),
        Some("scalar") => {
            let value = data
                .get("result")
                .and_then(value_of)
                .context("bad scalar")?;
            Ok(vec![(BTreeMap::new(), value)])
        }
        other => bail!("unexpected result type {other:?}"),
    }
}

/// Percent-encodes all but RFC 3986's unreserved characters.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The rows Prometheus computes for `resource` over `window` (0: totals).
pub async fn rows(
    base_url: &str,
    resource: Resource,
    selector: &Selector,
    window: Duration,
    timeout: Duration,
) -> anyhow::Result<Vec<Row>> {
    let q = queries(resource, selector, window);
    let tcp = !q.tcp.is_empty();
    let mut rows: BTreeMap<Vec<String>, Row> = BTreeMap::new();
    let key_of = |labels: &BTreeMap<String, String>| -> Vec<String> {
        resource
            .keys()
            .iter()
            .map(|k| labels.get(*k).cloned().unwrap_or_default())
            .collect()
    };
    let secs = window.as_secs_f64();
    let mut fill = |answer: Vec<(BTreeMap<String, String>, f64)>, set: &dyn Fn(&mut Row, f64)| {
        for (labels, value) in answer {
            let key = key_of(&labels);
            let row = rows
                .entry(key.clone())
                .or_insert_with(|| Row::empty(key, tcp));
            set(row, value);
        }
    };
    fill(query(base_url, &q.requests, timeout).await?, &|row, v| {
        row.requests = v;
        row.request_rate = (secs > 0.0).then(|| v / secs);
    });
    fill(
        query(base_url, &q.success_rate, timeout).await?,
        &|row, v| {
            row.success_rate = super::model::finite(v);
        },
    );
    for (i, expr) in q.latency.iter().enumerate() {
        fill(query(base_url, expr, timeout).await?, &|row, v| {
            row.latency[i] = super::model::finite(v);
        });
    }
    for (i, expr) in q.tcp.iter().enumerate() {
        fill(query(base_url, expr, timeout).await?, &|row, v| {
            let t = row.tcp.get_or_insert_with(Tcp::default);
            match i {
                0 => t.open_connections = v,
                1 => t.connections = v,
                2 => t.read_bytes = v,
                _ => t.write_bytes = v,
            }
        });
    }
    // Windowed rows need a rate even when only TCP answered.
    if secs > 0.0 {
        for row in rows.values_mut() {
            row.request_rate.get_or_insert(row.requests / secs);
        }
    }
    Ok(rows.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stat::model::Match;

    #[test]
    fn queries_use_growth_over_the_window_and_the_row_labels() {
        let selector = Selector::default()
            .exact("direction", "outbound")
            .with("dst_service", Match::ServiceName("payments".into()));
        let q = queries(Resource::Route, &selector, Duration::from_secs(60));
        let s = r#"weft_http_requests_total{direction="outbound",dst_service=~"payments\\..+"}"#;
        assert_eq!(
            q.requests,
            format!(
                "sum by (namespace, workload, direction, route, dst_service) \
                 (((({s}) - ({s} offset 60000ms)) >= 0 or {s}))"
            )
        );
        assert!(q
            .success_rate
            .contains(r#"status_code!~"5..",grpc_status=~"|0""#));
        assert!(q.latency[2].starts_with("histogram_quantile(0.99, sum by (namespace, workload, direction, route, dst_service, le) ("));
        assert!(q.tcp.is_empty(), "routes carry no TCP signals");
        let totals = queries(Resource::Workload, &Selector::default(), Duration::ZERO);
        assert_eq!(
            totals.requests,
            "sum by (namespace, workload, direction) (weft_http_requests_total)"
        );
        assert_eq!(totals.tcp.len(), 4);
        assert_eq!(
            totals.tcp[0],
            "sum by (namespace, workload, direction) (weft_tcp_open_connections)"
        );
    }

    #[test]
    fn parses_answers() {
        let vector = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"route":"checkout"},"value":[1700000000.5,"0.9"]},
            {"metric":{},"value":[1700000000.5,"NaN"]}]}}"#;
        let answer = parse_answer(vector).unwrap();
        assert_eq!(answer[0].0["route"], "checkout");
        assert_eq!(answer[0].1, 0.9);
        assert!(answer[1].1.is_nan());
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"+Inf"]}}"#;
        assert_eq!(parse_answer(scalar).unwrap()[0].1, f64::INFINITY);
        let error = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert_eq!(parse_answer(error).unwrap_err().to_string(), "parse error");
        assert!(parse_answer("<html>").is_err());
        assert_eq!(url_encode("a b{\"}"), "a%20b%7B%22%7D");
    }
}
