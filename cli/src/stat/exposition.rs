//! The Prometheus text exposition format (and the OpenMetrics text the proxy writes):
//! samples as name, labels and value. Comments, `# TYPE`/`# HELP`/`# EOF`, timestamps and
//! exemplars are read past; anything malformed is an error naming the line.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("metrics line {line}: {detail}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub detail: &'static str,
    pub text: String,
}

/// Every sample of an exposition, in order.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = parse_sample(line).map_err(|detail| ParseError {
            line: index + 1,
            detail,
            text: raw.chars().take(200).collect(),
        })?;
        samples.push(sample);
    }
    Ok(samples)
}

fn is_name_char(c: char, first: bool) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
}

fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .char_indices()
        .find(|&(i, c)| !is_name_char(c, i == 0))
        .map_or(line.len(), |(i, _)| i);
    if name_end == 0 {
        return Err("no metric name");
    }
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after)?;
        labels = parsed;
        rest = remaining;
    }
    if !rest.starts_with([' ', '\t']) {
        return Err("no space before the value");
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next().ok_or("no value")?).ok_or("value is not a number")?;
    // An optional timestamp, then an optional OpenMetrics exemplar (`# {...} v`).
    let mut next = fields.next();
    if let Some(timestamp) = next.filter(|f| *f != "#") {
        parse_value(timestamp).ok_or("garbage after the value")?;
        next = fields.next();
    }
    if next.is_some_and(|f| f != "#") {
        return Err("garbage after the value");
    }
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// A float as Go's `strconv.ParseFloat` (and so Prometheus) reads it, infinities and NaN included.
pub fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        other => other.parse().ok(),
    }
}

/// `k="v",k2="v2"}` (a trailing comma allowed) → labels and what follows the brace.
fn parse_labels(input: &str) -> Result<(BTreeMap<String, String>, &str), &'static str> {
    let mut labels = BTreeMap::new();
    let mut rest = input.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let key_end = rest
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit())))
            .map_or(rest.len(), |(i, _)| i);
        if key_end == 0 {
            return Err("bad label name");
        }
        let key = rest[..key_end].to_string();
        rest = rest[key_end..]
            .trim_start()
            .strip_prefix('=')
            .ok_or("label without '='")?
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
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some(_) => return Err("unknown escape in a label value"),
                    None => return Err("unterminated escape"),
                },
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value"),
            }
        };
        if labels.insert(key, value).is_some() {
            return Err("duplicate label");
        }
        rest = rest[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after.trim_start();
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP weft_http_requests Requests.\n\
# TYPE weft_http_requests counter\n\
weft_http_requests_total{direction=\"outbound\",route=\"checkout\",dst_service=\"payments.shop\"} 600\n\
weft_http_responses_total{status_code=\"503\",grpc_status=\"\",route=\"a\\\"b\\\\c\\nd\"} 60 1700000000000\n\
weft_http_response_latency_seconds_bucket{le=\"+Inf\",direction=\"inbound\",} 7 # {trace_id=\"x\"} 0.5\n\
weft_process_start_time_seconds 1.7e9\n\
weft_x{} NaN\n\
weft_y -Inf\n\
# EOF\n";

    #[test]
    fn reads_names_labels_values_escapes_timestamps_and_exemplars() {
        let samples = parse(TEXT).unwrap();
        assert_eq!(samples.len(), 6);
        assert_eq!(samples[0].name, "weft_http_requests_total");
        assert_eq!(samples[0].labels["route"], "checkout");
        assert_eq!(samples[0].labels["dst_service"], "payments.shop");
        assert_eq!(samples[0].value, 600.0);
        assert_eq!(samples[1].labels["grpc_status"], "");
        assert_eq!(samples[1].labels["route"], "a\"b\\c\nd");
        assert_eq!(samples[1].value, 60.0);
        assert_eq!(samples[2].labels["le"], "+Inf");
        assert_eq!(samples[2].labels.len(), 2);
        assert_eq!(samples[2].value, 7.0);
        assert_eq!(samples[3].value, 1.7e9);
        assert!(samples[3].labels.is_empty());
        assert!(samples[4].value.is_nan());
        assert_eq!(samples[5].value, f64::NEG_INFINITY);
    }

    #[test]
    fn rejects_malformed_lines_with_their_number() {
        for (bad, detail) in [
            ("weft_x{a=\"b\" 1", "expected ',' or '}' after a label"),
            ("weft_x{a=b} 1", "label value not quoted"),
            ("weft_x{a=\"b} 1", "unterminated label value"),
            ("weft_x one", "value is not a number"),
            ("weft_x", "no space before the value"),
            ("weft_x{a=\"1\",a=\"2\"} 1", "duplicate label"),
            ("{a=\"1\"} 1", "no metric name"),
            ("weft_x 1 2 3", "garbage after the value"),
            ("weft_x 1 abc", "garbage after the value"),
            ("weft_x{a=\"\\t\"} 1", "unknown escape in a label value"),
        ] {
            let err = parse(&format!("# ok\n{bad}\n")).unwrap_err();
            assert_eq!(err.line, 2, "{bad}");
            assert_eq!(err.detail, detail, "{bad}");
        }
    }

    /// Label values as the exposition format escapes them.
    fn escape(value: &str) -> String {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    }

    #[test]
    fn random_label_values_and_numbers_round_trip() {
        use rand::Rng;
        let alphabet: Vec<char> = "ab\\\"\n ,={}#é/._-0".chars().collect();
        let mut rng = rand::rng();
        for _ in 0..500 {
            let mut want = BTreeMap::new();
            for k in 0..rng.random_range(0..5) {
                let len = rng.random_range(0..12);
                let value: String = (0..len)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect();
                want.insert(format!("l{k}_x"), value);
            }
            let value: f64 = rng.random_range(-1e12..1e12);
            let labels: Vec<String> = want
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let line = if labels.is_empty() && rng.random_bool(0.5) {
                format!("weft_m:x {value}")
            } else {
                format!("weft_m:x{{{}}} {value}", labels.join(","))
            };
            let got = parse(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(got.len(), 1, "{line:?}");
            assert_eq!(got[0].name, "weft_m:x");
            assert_eq!(got[0].labels, want, "{line:?}");
            assert_eq!(got[0].value, value, "{line:?}");
        }
    }

    #[test]
    fn a_timestamp_and_an_exemplar_may_follow_the_value() {
        assert!(parse("weft_x 1 2").is_ok());
        assert!(parse("weft_x 1 2 # {a=\"b\"} 1").is_ok());
    }
}
