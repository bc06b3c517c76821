//! The `config.weft.io/…` pod annotations the injector honours: parsing and validation.
//! A bad value denies the pod with a message naming the annotation, because a silently
//! ignored `skip-inbound-ports` or resource limit is worse than a rejected apply.

use std::collections::BTreeMap;

use serde_json::Value;

pub const SKIP_INBOUND_PORTS: &str = "config.weft.io/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "config.weft.io/skip-outbound-ports";
pub const OPAQUE_PORTS: &str = "config.weft.io/opaque-ports";
pub const PROXY_CPU_REQUEST: &str = "config.weft.io/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "config.weft.io/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "config.weft.io/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "config.weft.io/proxy-memory-limit";
pub const LOG_LEVEL: &str = "config.weft.io/log-level";
pub const DEFAULT_INBOUND_POLICY: &str = "config.weft.io/default-inbound-policy";
pub const NATIVE_SIDECAR: &str = "config.weft.io/native-sidecar";

/// The values `config.weft.io/default-inbound-policy` may take (the control plane's list).
pub const INBOUND_POLICIES: [&str; 4] = [
    "all-unauthenticated",
    "all-authenticated",
    "cluster-authenticated",
    "deny",
];

/// The checked proxy configuration of one pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxyOverrides {
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
    /// `WEFT_LOG` of the proxy (tracing filter syntax).
    pub log_level: Option<String>,
    /// `Some(false)` forces the regular-container layout, `Some(true)` the native sidecar.
    pub native_sidecar: Option<bool>,
}

/// One or more bad annotation values; the message lists all of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid weft annotations: {}", .0.join("; "))]
pub struct AnnotationErrors(pub Vec<String>);

/// The annotations of a pod (or pod template) object, as strings.
pub fn annotations_of(pod: &Value) -> BTreeMap<String, String> {
    string_map(pod.pointer("/metadata/annotations"))
}

pub(crate) fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
    value
        .and_then(Value::as_object)
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

impl ProxyOverrides {
    /// Reads and validates every `config.weft.io/…` annotation the injector knows.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> Result<ProxyOverrides, AnnotationErrors> {
        let mut errors = Vec::new();
        let get = |key: &str| annotations.get(key).map(|v| v.trim().to_string());
        let mut out = ProxyOverrides::default();

        for (key, target) in [
            (SKIP_INBOUND_PORTS, &mut out.skip_inbound_ports),
            (SKIP_OUTBOUND_PORTS, &mut out.skip_outbound_ports),
        ] {
            if let Some(text) = get(key) {
                match parse_port_list(&text) {
                    Ok(ports) => *target = ports,
                    Err(e) => errors.push(format!("{key}: {e}")),
                }
            }
        }
        if let Some(text) = get(OPAQUE_PORTS) {
            if let Err(e) = parse_port_ranges(&text) {
                errors.push(format!("{OPAQUE_PORTS}: {e}"));
            }
        }

        let mut quantity = |key: &str, kind: QuantityKind| -> Option<(String, f64)> {
            let text = get(key)?;
            match parse_quantity(&text, kind) {
                Ok(value) => Some((text, value)),
                Err(e) => {
                    errors.push(format!("{key}: {e}"));
                    None
                }
            }
        };
        let cpu_request = quantity(PROXY_CPU_REQUEST, QuantityKind::Cpu);
        let cpu_limit = quantity(PROXY_CPU_LIMIT, QuantityKind::Cpu);
        let memory_request = quantity(PROXY_MEMORY_REQUEST, QuantityKind::Memory);
        let memory_limit = quantity(PROXY_MEMORY_LIMIT, QuantityKind::Memory);
        for (request, limit, req_key, lim_key) in [
            (&cpu_request, &cpu_limit, PROXY_CPU_REQUEST, PROXY_CPU_LIMIT),
            (
                &memory_request,
                &memory_limit,
                PROXY_MEMORY_REQUEST,
                PROXY_MEMORY_LIMIT,
            ),
        ] {
            if let (Some((req_text, req)), Some((lim_text, lim))) = (request, limit) {
                if req > lim {
                    errors.push(format!(
                        "{req_key} {req_text:?} is more than {lim_key} {lim_text:?}"
                    ));
                }
            }
        }
        out.cpu_request = cpu_request.map(|(t, _)| t);
        out.cpu_limit = cpu_limit.map(|(t, _)| t);
        out.memory_request = memory_request.map(|(t, _)| t);
        out.memory_limit = memory_limit.map(|(t, _)| t);

        if let Some(text) = get(LOG_LEVEL) {
            // The proxy parses WEFT_LOG with this same filter syntax; a filter it would
            // reject would only show up as a warning in the proxy's log.
            match tracing_subscriber::EnvFilter::try_new(&text) {
                Ok(_) if !text.is_empty() => out.log_level = Some(text),
                Ok(_) => errors.push(format!("{LOG_LEVEL}: must not be empty")),
                Err(e) => errors.push(format!(
                    "{LOG_LEVEL}: {text:?} is not a log filter (e.g. \"info\" or \"warn,weft_proxy=debug\"): {e}"
                )),
            }
        }
        if let Some(text) = get(DEFAULT_INBOUND_POLICY) {
            if !INBOUND_POLICIES.contains(&text.as_str()) {
                errors.push(format!(
                    "{DEFAULT_INBOUND_POLICY}: {text:?} is not one of {}",
                    INBOUND_POLICIES.join(", ")
                ));
            }
        }
        if let Some(text) = get(NATIVE_SIDECAR) {
            match text.as_str() {
                "true" => out.native_sidecar = Some(true),
                "false" => out.native_sidecar = Some(false),
                _ => errors.push(format!(
                    "{NATIVE_SIDECAR}: {text:?} is not \"true\" or \"false\""
                )),
            }
        }

        if errors.is_empty() {
            Ok(out)
        } else {
            Err(AnnotationErrors(errors))
        }
    }
}

/// `"22, 8081"` → `[22, 8081]`: single ports, as `weft-proxy init` takes them.
pub fn parse_port_list(text: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let port = parse_port(item)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// `"5432,8000-8100"`: ports and inclusive ranges, as the control plane reads opaque ports.
pub fn parse_port_ranges(text: &str) -> Result<Vec<(u16, u16)>, String> {
    let mut ranges = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let range = match item.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (parse_port(lo.trim())?, parse_port(hi.trim())?);
                if lo > hi {
                    return Err(format!("range {item:?} runs backwards"));
                }
                (lo, hi)
            }
            None => {
                let port = parse_port(item)?;
                (port, port)
            }
        };
        ranges.push(range);
    }
    Ok(ranges)
}

fn parse_port(text: &str) -> Result<u16, String> {
    let invalid = || format!("{text:?} is not a port (a number from 1 to 65535)");
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(invalid()),
        Ok(port) => Ok(port),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantityKind {
    Cpu,
    Memory,
}

/// Parses a Kubernetes resource quantity (`100m`, `0.5`, `64Mi`, `1e9`) into its value in
/// base units (cores or bytes), so request ≤ limit can be checked.
pub fn parse_quantity(text: &str, kind: QuantityKind) -> Result<f64, String> {
    let example = match kind {
        QuantityKind::Cpu => "e.g. \"100m\" or \"0.5\"",
        QuantityKind::Memory => "e.g. \"64Mi\" or \"1Gi\"",
    };
    let invalid = || format!("{text:?} is not a Kubernetes quantity ({example})");
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let unsigned = number.strip_prefix('+').unwrap_or(number);
    if unsigned.is_empty()
        || unsigned.starts_with('-')
        || unsigned.matches('.').count() > 1
        || !unsigned.bytes().any(|b| b.is_ascii_digit())
        || unsigned.contains(['+', '-'])
    {
        return Err(invalid());
    }
    let base: f64 = unsigned.parse().map_err(|_| invalid())?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let digits = &exp[1..];
            let unsigned_digits = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if unsigned_digits.is_empty() || !unsigned_digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            let power: i32 = digits.parse().map_err(|_| invalid())?;
            10f64.powi(power)
        }
        _ => return Err(invalid()),
    };
    let value = base * multiplier;
    if value <= 0.0 {
        return Err(format!("{text:?} must be more than zero"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn valid_annotations_are_read() {
        let o = ProxyOverrides::from_annotations(&annotations(&[
            (SKIP_INBOUND_PORTS, "22, 8081"),
            (SKIP_OUTBOUND_PORTS, "5432"),
            (OPAQUE_PORTS, "3306,8000-8100"),
            (PROXY_CPU_REQUEST, "100m"),
            (PROXY_CPU_LIMIT, "1"),
            (PROXY_MEMORY_REQUEST, "20Mi"),
            (PROXY_MEMORY_LIMIT, "1Gi"),
            (LOG_LEVEL, "warn,weft_proxy=debug"),
            (DEFAULT_INBOUND_POLICY, "deny"),
            (NATIVE_SIDECAR, "false"),
        ]))
        .unwrap();
        assert_eq!(o.skip_inbound_ports, vec![22, 8081]);
        assert_eq!(o.skip_outbound_ports, vec![5432]);
        assert_eq!(o.cpu_request.as_deref(), Some("100m"));
        assert_eq!(o.memory_limit.as_deref(), Some("1Gi"));
        assert_eq!(o.log_level.as_deref(), Some("warn,weft_proxy=debug"));
        assert_eq!(o.native_sidecar, Some(false));
    }

    #[test]
    fn no_annotations_means_defaults() {
        let o = ProxyOverrides::from_annotations(&BTreeMap::new()).unwrap();
        assert_eq!(o, ProxyOverrides::default());
    }

    #[test]
    fn every_bad_value_is_reported_by_name() {
        let err = ProxyOverrides::from_annotations(&annotations(&[
            (SKIP_INBOUND_PORTS, "abc"),
            (SKIP_OUTBOUND_PORTS, "70000"),
            (OPAQUE_PORTS, "9000-8000"),
            (PROXY_CPU_LIMIT, "lots"),
            (PROXY_MEMORY_REQUEST, "-5Mi"),
            (DEFAULT_INBOUND_POLICY, "allow-all"),
            (NATIVE_SIDECAR, "yes"),
            (LOG_LEVEL, "info,[bad"),
        ]))
        .unwrap_err();
        let message = err.to_string();
        for needle in [
            "config.weft.io/skip-inbound-ports: \"abc\" is not a port",
            "config.weft.io/skip-outbound-ports: \"70000\" is not a port",
            "config.weft.io/opaque-ports: range \"9000-8000\" runs backwards",
            "config.weft.io/proxy-cpu-limit: \"lots\" is not a Kubernetes quantity",
            "config.weft.io/proxy-memory-request: \"-5Mi\"",
            "config.weft.io/default-inbound-policy: \"allow-all\" is not one of",
            "config.weft.io/native-sidecar: \"yes\"",
            "config.weft.io/log-level",
        ] {
            assert!(message.contains(needle), "{needle} missing from: {message}");
        }
        assert_eq!(err.0.len(), 8, "{message}");
    }

    #[test]
    fn request_above_limit_is_rejected() {
        let err = ProxyOverrides::from_annotations(&annotations(&[
            (PROXY_MEMORY_REQUEST, "2Gi"),
            (PROXY_MEMORY_LIMIT, "1000M"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("is more than"), "{err}");
        assert!(ProxyOverrides::from_annotations(&annotations(&[
            (PROXY_CPU_REQUEST, "500m"),
            (PROXY_CPU_LIMIT, "0.5"),
        ]))
        .is_ok());
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        let cpu = |t| parse_quantity(t, QuantityKind::Cpu);
        assert_eq!(cpu("100m").unwrap(), 0.1);
        assert_eq!(cpu("2").unwrap(), 2.0);
        assert_eq!(cpu("1.5").unwrap(), 1.5);
        assert_eq!(parse_quantity("1Ki", QuantityKind::Memory).unwrap(), 1024.0);
        assert_eq!(parse_quantity("1e3", QuantityKind::Memory).unwrap(), 1000.0);
        for bad in ["", "m", "1.2.3", "10 m", "5x", "1e", "0", "lots", "--1"] {
            assert!(cpu(bad).is_err(), "{bad:?} accepted");
        }
    }
}
