//! Gateway API durations (GEP-2257): `1h30m`, `500ms`, `0s`; one to four components of one
//! to five decimal digits and a unit in `h`, `m`, `s`, `ms`, summed.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a Gateway API duration (e.g. \"500ms\", \"2s\", \"1h30m\"): {reason}")]
pub struct DurationError {
    pub text: String,
    pub reason: &'static str,
}

const MAX_COMPONENTS: usize = 4;
const MAX_DIGITS: usize = 5;

/// Parses a GEP-2257 duration. Stricter than Go's `time.ParseDuration` on purpose: no signs,
/// no fractions, no units other than h/m/s/ms, so that every accepted value means the same to
/// every Gateway API implementation.
pub fn parse_gateway_duration(text: &str) -> Result<Duration, DurationError> {
    let fail = |reason| DurationError {
        text: text.to_owned(),
        reason,
    };
    if text.is_empty() {
        return Err(fail("empty"));
    }
    let bytes = text.as_bytes();
    let mut total = Duration::ZERO;
    let mut components = 0;
    let mut at = 0;
    while at < bytes.len() {
        let digits_start = at;
        while at < bytes.len() && bytes[at].is_ascii_digit() {
            at += 1;
        }
        let digits = &text[digits_start..at];
        if digits.is_empty() {
            return Err(fail("each component is digits followed by h, m, s or ms"));
        }
        if digits.len() > MAX_DIGITS {
            return Err(fail("at most five digits per component"));
        }
        // At most five digits: always fits.
        let value: u64 = digits.parse().map_err(|_| fail("not a number"))?;
        let rest = &bytes[at..];
        let (unit, unit_len) = if rest.starts_with(b"ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with(b"h") {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with(b"m") {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with(b"s") {
            (Duration::from_secs(1), 1)
        } else if rest.is_empty() {
            return Err(fail("missing unit (h, m, s or ms)"));
        } else {
            return Err(fail("units are h, m, s and ms"));
        };
        at += unit_len;
        components += 1;
        if components > MAX_COMPONENTS {
            return Err(fail("at most four components"));
        }
        // 4 × 99999 h is far below Duration's range: plain arithmetic cannot overflow.
        total += unit * u32::try_from(value).map_err(|_| fail("not a number"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hms(h: u64, m: u64, s: u64, ms: u64) -> Duration {
        Duration::from_millis(((h * 60 + m) * 60 + s) * 1000 + ms)
    }

    #[test]
    fn gep_2257_valid_vectors() {
        let cases = [
            ("0h", hms(0, 0, 0, 0)),
            ("0s", hms(0, 0, 0, 0)),
            ("0h0m0s", hms(0, 0, 0, 0)),
            ("1h", hms(1, 0, 0, 0)),
            ("30m", hms(0, 30, 0, 0)),
            ("10s", hms(0, 0, 10, 0)),
            ("500ms", hms(0, 0, 0, 500)),
            ("2h30m", hms(2, 30, 0, 0)),
            ("150m", hms(2, 30, 0, 0)),
            ("7230s", hms(2, 0, 30, 0)),
            ("1h30m10s", hms(1, 30, 10, 0)),
            ("10s30m1h", hms(1, 30, 10, 0)),
            ("100ms200ms300ms", hms(0, 0, 0, 600)),
            ("01h", hms(1, 0, 0, 0)),
            ("00060m", hms(1, 0, 0, 0)),
            ("1h2h20m10m", hms(3, 30, 0, 0)),
            ("1s500ms", hms(0, 0, 1, 500)),
            ("99999h", hms(99_999, 0, 0, 0)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_gateway_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn gep_2257_invalid_vectors() {
        for text in [
            "",
            "1",
            "1m1",
            "1d",
            "1h30m10s20ms50h",
            "999999h",
            "1.5h",
            "-15m",
            "+15m",
            "h",
            "ms",
            "1 h",
            " 1h",
            "1h ",
            "1us",
            "1µs",
            "1ns",
            "1H",
            "1msx",
        ] {
            assert!(parse_gateway_duration(text).is_err(), "{text:?} accepted");
        }
    }

    #[test]
    fn error_names_the_input() {
        let err = parse_gateway_duration("5 minutes").unwrap_err();
        assert!(err.to_string().contains("\"5 minutes\""), "{err}");
    }
}
