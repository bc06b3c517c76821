//! How `weft stat` shows rows: an aligned table for people, and a JSON document whose field
//! names are part of the CLI's contract (README, "weft stat").

use serde_json::{json, Map, Value};

use super::model::{Resource, Row};

/// One computed view: what the rows are and over which window.
#[derive(Clone, Debug)]
pub struct Frame {
    /// `prometheus` or `proxies`.
    pub source: &'static str,
    pub resource: Resource,
    /// The window the rows cover in seconds; 0 for totals since the proxies started.
    pub window_seconds: f64,
    pub rows: Vec<Row>,
}

const ALL_KEYS: [&str; 7] = [
    "namespace",
    "workload",
    "pod",
    "direction",
    "route",
    "dst_service",
    "dst_backend",
];

fn header(key: &str) -> &'static str {
    match key {
        "namespace" => "NAMESPACE",
        "workload" => "WORKLOAD",
        "pod" => "POD",
        "direction" => "DIRECTION",
        "route" => "ROUTE",
        "dst_service" => "SERVICE",
        "dst_backend" => "BACKEND",
        _ => "?",
    }
}

pub fn fmt_count(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.1}")
    }
}

pub fn fmt_latency(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |s| format!("{:.1}ms", s * 1000.0))
}

pub fn fmt_bytes(v: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = v;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{}B", value as u64)
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// The aligned table: key columns left, numbers right; "-" where there is no value.
pub fn table(frame: &Frame) -> String {
    let keys = frame.resource.keys();
    let tcp = frame.rows.iter().any(|r| r.tcp.is_some()) || frame.resource.has_tcp();
    let mut head: Vec<&str> = keys.iter().map(|k| header(k)).collect();
    head.extend(["REQUESTS", "RPS", "SUCCESS", "P50", "P95", "P99"]);
    if tcp {
        head.extend(["TCP_OPEN", "TCP_CONN", "READ", "WRITE"]);
    }
    let mut lines: Vec<Vec<String>> = vec![head.iter().map(|h| h.to_string()).collect()];
    for row in &frame.rows {
        let mut cells: Vec<String> = row
            .key
            .iter()
            .map(|v| {
                if v.is_empty() {
                    "-".to_string()
                } else {
                    v.clone()
                }
            })
            .collect();
        cells.push(fmt_count(row.requests));
        cells.push(row.request_rate.map_or("-".into(), |r| format!("{r:.1}")));
        cells.push(
            row.success_rate
                .map_or("-".into(), |s| format!("{:.2}%", s * 100.0)),
        );
        cells.extend(row.latency.iter().map(|l| fmt_latency(*l)));
        if tcp {
            match &row.tcp {
                Some(t) => {
                    cells.push(fmt_count(t.open_connections));
                    cells.push(fmt_count(t.connections));
                    cells.push(fmt_bytes(t.read_bytes));
                    cells.push(fmt_bytes(t.write_bytes));
                }
                None => cells.extend(std::iter::repeat_n("-".to_string(), 4)),
            }
        }
        lines.push(cells);
    }
    let columns = lines[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (c, cell) in line.iter().enumerate() {
            if c > 0 {
                text.push_str("  ");
            }
            let pad = widths[c] - cell.chars().count();
            if c < keys.len() {
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            } else {
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// The JSON document (field names documented in the README).
pub fn json(frame: &Frame) -> Value {
    let keys = frame.resource.keys();
    let rows: Vec<Value> = frame
        .rows
        .iter()
        .map(|row| {
            let mut m = Map::new();
            for name in ALL_KEYS {
                let value = keys
                    .iter()
                    .position(|k| *k == name)
                    .map_or(Value::Null, |i| Value::String(row.key[i].clone()));
                m.insert(name.to_string(), value);
            }
            m.insert("requests".into(), json!(row.requests));
            m.insert("request_rate".into(), json!(row.request_rate));
            m.insert("success_rate".into(), json!(row.success_rate));
            for (name, value) in [
                "latency_p50_seconds",
                "latency_p95_seconds",
                "latency_p99_seconds",
            ]
            .iter()
            .zip(row.latency)
            {
                m.insert(name.to_string(), json!(value));
            }
            let tcp = row.tcp.as_ref();
            m.insert(
                "tcp_open_connections".into(),
                json!(tcp.map(|t| t.open_connections)),
            );
            m.insert("tcp_connections".into(), json!(tcp.map(|t| t.connections)));
            m.insert("tcp_read_bytes".into(), json!(tcp.map(|t| t.read_bytes)));
            m.insert("tcp_write_bytes".into(), json!(tcp.map(|t| t.write_bytes)));
            Value::Object(m)
        })
        .collect();
    json!({
        "source": frame.source,
        "resource": frame.resource.as_str(),
        "window_seconds": frame.window_seconds,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stat::model::Tcp;

    fn frame() -> Frame {
        Frame {
            source: "proxies",
            resource: Resource::Route,
            window_seconds: 60.0,
            rows: vec![Row {
                key: ["shop", "client", "outbound", "checkout", "payments.shop"]
                    .map(String::from)
                    .to_vec(),
                requests: 600.0,
                request_rate: Some(10.0),
                success_rate: Some(0.9),
                latency: [Some(0.0853), Some(0.1), None],
                tcp: None,
            }],
        }
    }

    #[test]
    fn table_aligns_columns() {
        let text = table(&frame());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "NAMESPACE  WORKLOAD  DIRECTION  ROUTE     SERVICE        REQUESTS   RPS  SUCCESS     P50      P95  P99"
        );
        assert_eq!(
            lines[1],
            "shop       client    outbound   checkout  payments.shop       600  10.0   90.00%  85.3ms  100.0ms    -"
        );
    }

    #[test]
    fn json_has_every_field_always() {
        let mut f = frame();
        f.resource = Resource::Workload;
        f.rows[0].key = vec!["shop".into(), "client".into(), "inbound".into()];
        f.rows[0].tcp = Some(Tcp {
            open_connections: 2.0,
            connections: 3.0,
            read_bytes: 10.0,
            write_bytes: 20.0,
        });
        let v = json(&f);
        assert_eq!(v["source"], "proxies");
        assert_eq!(v["resource"], "workload");
        assert_eq!(v["window_seconds"], 60.0);
        let row = &v["rows"][0];
        assert_eq!(row["workload"], "client");
        assert_eq!(row["pod"], Value::Null);
        assert_eq!(row["route"], Value::Null);
        assert_eq!(row["requests"], 600.0);
        assert_eq!(row["success_rate"], 0.9);
        assert_eq!(row["latency_p99_seconds"], Value::Null);
        assert_eq!(row["tcp_connections"], 3.0);
        assert_eq!(row.as_object().unwrap().len(), 17);
        assert_eq!(fmt_bytes(1536.0), "1.5KiB");
        assert_eq!(fmt_count(2.5), "2.5");
    }
}
