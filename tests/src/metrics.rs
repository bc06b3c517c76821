//! A parser for the Prometheus/OpenMetrics text exposition, enough to assert on the proxy's
//! `/metrics`: sample name, labels (any order, escaped values), value.

use std::collections::BTreeMap;

use crate::error::{HarnessError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(name, value)` pair is among this sample's labels.
    pub fn has_labels(&self, wanted: &[(&str, &str)]) -> bool {
        wanted
            .iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|actual| actual == v))
    }
}

#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    pub samples: Vec<Sample>,
}

impl MetricsSnapshot {
    pub fn parse(text: &str) -> Result<MetricsSnapshot> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(parse_sample)
            .collect::<Result<Vec<_>>>()?;
        Ok(MetricsSnapshot { samples })
    }

    /// Samples named `name` carrying all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.has_labels(labels))
    }

    /// The value of the single sample named `name` with `labels`; `None` when there is none.
    /// With several matches (labels not fully specified), their sum.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut matches = self.matching(name, labels).peekable();
        matches.peek()?;
        Some(matches.map(|s| s.value).sum())
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let invalid =
        |detail: &str| HarnessError::invalid("metrics line", format!("{line:?}: {detail}"));
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| invalid("no value"))?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after_brace).map_err(|d| invalid(&d))?;
        labels = parsed;
        rest = remaining;
    }
    let value_text = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| invalid("no value"))?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|_| invalid("value is not a number"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows the closing brace.
fn parse_labels(input: &str) -> std::result::Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = input.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated escape".to_string()),
                },
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".to_string()),
            }
        };
        labels.insert(key, value);
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP weft_tcp_connections_opened Connections opened.
# TYPE weft_tcp_connections_opened counter
weft_tcp_connections_opened_total{direction="inbound",peer_identity="spiffe://cluster.local/ns/shop/sa/client",tls="true"} 3
weft_tcp_connections_opened_total{tls="false",direction="inbound",peer_identity=""} 1
weft_tcp_open_connections{direction="outbound",peer_identity="a\"b\\c",tls="true"} 0
weft_identity_cert_expiry_timestamp_seconds 1700000000.5
weft_tcp_connection_duration_seconds_bucket{le="+Inf",direction="inbound",peer_identity="",tls="false"} 1
# EOF
"#;

    #[test]
    fn parses_labels_in_any_order_and_escapes() {
        let m = MetricsSnapshot::parse(TEXT).unwrap();
        assert_eq!(m.samples.len(), 5);
        let inbound_mtls = [
            ("direction", "inbound"),
            ("peer_identity", "spiffe://cluster.local/ns/shop/sa/client"),
            ("tls", "true"),
        ];
        assert_eq!(
            m.value("weft_tcp_connections_opened_total", &inbound_mtls),
            Some(3.0)
        );
        assert_eq!(
            m.value(
                "weft_tcp_connections_opened_total",
                &[("tls", "false"), ("peer_identity", "")]
            ),
            Some(1.0)
        );
        assert_eq!(m.value("weft_tcp_connections_opened_total", &[]), Some(4.0));
        assert_eq!(
            m.value("weft_tcp_open_connections", &[("peer_identity", "a\"b\\c")]),
            Some(0.0)
        );
        assert_eq!(
            m.value("weft_identity_cert_expiry_timestamp_seconds", &[]),
            Some(1_700_000_000.5)
        );
        assert_eq!(
            m.value(
                "weft_tcp_connection_duration_seconds_bucket",
                &[("le", "+Inf")]
            ),
            Some(1.0)
        );
        assert_eq!(m.value("weft_nope", &[]), None);
        assert_eq!(
            m.value("weft_tcp_connections_opened_total", &[("tls", "maybe")]),
            None
        );
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(MetricsSnapshot::parse("weft_x{a=\"b\" 1").is_err());
        assert!(MetricsSnapshot::parse("weft_x{a=b} 1").is_err());
        assert!(MetricsSnapshot::parse("weft_x one").is_err());
        assert!(MetricsSnapshot::parse("weft_x").is_err());
    }
}
