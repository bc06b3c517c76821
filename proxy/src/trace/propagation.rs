//! Trace context on the wire: reading W3C `traceparent` and B3 (single `b3` header and
//! multi `X-B3-*` headers) from a request, and writing this proxy's span back as the parent
//! of the next hop. Anything malformed is ignored, never trusted: a request with a broken
//! header is treated as carrying no context at all.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// Which propagation format a context arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// A parent span from another process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// `None`: B3 deferred the decision to us.
    pub sampled: Option<bool>,
    pub format: Format,
}

/// What a request says about tracing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// No (valid) context: this hop starts a trace.
    None,
    /// A B3 sampling decision without ids (`b3: 1`, `b3: 0`, `b3: d`).
    Decision(bool),
    Context(RemoteContext),
}

/// Reads the request's trace context: `traceparent` first, then `b3`, then `X-B3-*`.
pub fn extract(headers: &HeaderMap) -> Incoming {
    if let Some(v) = single(headers, &TRACEPARENT) {
        if let Some(ctx) = parse_traceparent(v.as_bytes()) {
            return Incoming::Context(ctx);
        }
    }
    if let Some(v) = single(headers, &B3) {
        if let Some(found) = parse_b3_single(v.as_bytes()) {
            return found;
        }
    }
    parse_b3_multi(headers).unwrap_or(Incoming::None)
}

/// A header that occurs exactly once (several copies of a context header are ambiguous).
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    all.next().is_none().then_some(first)
}

/// `version-traceid-parentid-flags` (W3C Trace Context level 1). Versions above 00 may
/// append fields after a `-`; version ff is invalid.
pub fn parse_traceparent(v: &[u8]) -> Option<RemoteContext> {
    if v.len() < 55 {
        return None;
    }
    let version = hex_byte(&v[0..2])?;
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id: TraceId = hex_array(&v[3..35])?;
    let span_id: SpanId = hex_array(&v[36..52])?;
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(RemoteContext {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
        format: Format::W3c,
    })
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]` or `b3: {SamplingState}`.
pub fn parse_b3_single(v: &[u8]) -> Option<Incoming> {
    let s = std::str::from_utf8(v).ok()?;
    let mut parts = s.split('-');
    let first = parts.next()?;
    let Some(second) = parts.next() else {
        return b3_state(first).flatten().map(Incoming::Decision);
    };
    let trace_id = b3_trace_id(first)?;
    let span_id = b3_span_id(second)?;
    let sampled = match parts.next() {
        Some(state) => b3_state(state)?,
        None => None,
    };
    if let Some(parent) = parts.next() {
        b3_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Incoming::Context(RemoteContext {
        trace_id,
        span_id,
        sampled,
        format: Format::B3Single,
    }))
}

/// `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled` (`1`/`0`, or `true`/`false` from old
/// tracers), `X-B3-Flags: 1` (debug, which implies sampled).
pub fn parse_b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    let text = |name: &HeaderName| single(headers, name).and_then(|v| v.to_str().ok());
    let debug = text(&B3_FLAGS) == Some("1");
    let sampled = match text(&B3_SAMPLED) {
        _ if debug => Some(true),
        Some("1") | Some("true") => Some(true),
        Some("0") | Some("false") => Some(false),
        Some(_) => return None,
        None => None,
    };
    let (Some(trace), Some(span)) = (text(&B3_TRACE_ID), text(&B3_SPAN_ID)) else {
        return sampled.map(Incoming::Decision);
    };
    Some(Incoming::Context(RemoteContext {
        trace_id: b3_trace_id(trace)?,
        span_id: b3_span_id(span)?,
        sampled,
        format: Format::B3Multi,
    }))
}

/// A B3 sampling state: `1`/`d` (debug) sample, `0` does not; anything else makes the
/// header invalid (outer `None`).
fn b3_state(s: &str) -> Option<Option<bool>> {
    match s {
        "1" | "d" => Some(Some(true)),
        "0" => Some(Some(false)),
        _ => None,
    }
}

/// 16 or 32 lowercase hex digits; a 64-bit id is the low half of a 128-bit one.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    let id: TraceId = match s.len() {
        32 => hex_array(s.as_bytes())?,
        16 => {
            let low: [u8; 8] = hex_array(s.as_bytes())?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn b3_span_id(s: &str) -> Option<SpanId> {
    if s.len() != 16 {
        return None;
    }
    let id: SpanId = hex_array(s.as_bytes())?;
    (id != [0; 8]).then_some(id)
}

fn hex_digit(c: u8) -> Option<u8> {
    // Both specs require lowercase.
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(s: &[u8]) -> Option<u8> {
    Some(hex_digit(s[0])? << 4 | hex_digit(s[1])?)
}

fn hex_array<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = hex_byte(&s[2 * i..2 * i + 2])?;
    }
    Some(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn put_hex(out: &mut [u8], bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0xf) as usize];
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    put_hex(&mut out, bytes);
    // Only ASCII hex digits were written.
    String::from_utf8(out).unwrap_or_default()
}

fn value(bytes: &[u8]) -> HeaderValue {
    // Hex digits and dashes are always valid header bytes.
    HeaderValue::from_bytes(bytes).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The context the next hop sees: this proxy's span as parent.
pub struct Outgoing<'a> {
    pub trace_id: &'a TraceId,
    pub span_id: &'a SpanId,
    pub sampled: bool,
    /// The span this one is a child of (for `X-B3-ParentSpanId` / the b3 parent field).
    pub parent: Option<&'a SpanId>,
}

/// B3 headers keep the trace id width they came with: a 64-bit id stays 64-bit for the
/// B3-only tracers that sent it, even after a hop that only read `traceparent`.
fn b3_64bit(existing: Option<&HeaderValue>, trace_id: &TraceId) -> bool {
    let width = existing.map_or(0, |v| {
        v.as_bytes()
            .iter()
            .position(|&b| b == b'-')
            .unwrap_or(v.len())
    });
    width == 16 && trace_id[..8] == [0; 8]
}

/// Writes `traceparent` (always), and rewrites whichever B3 headers the request carries so a
/// B3-only app downstream sees the same parent. `tracestate` passes through untouched: this
/// proxy adds no vendor entry of its own.
pub fn inject(headers: &mut HeaderMap, out: &Outgoing<'_>) {
    let flags = if out.sampled { b"01" } else { b"00" };
    let mut tp = [0u8; 55];
    tp[..3].copy_from_slice(b"00-");
    put_hex(&mut tp[3..35], out.trace_id);
    tp[35] = b'-';
    put_hex(&mut tp[36..52], out.span_id);
    tp[52] = b'-';
    tp[53..].copy_from_slice(flags);
    headers.insert(TRACEPARENT, value(&tp));

    let trace_hex = |existing: Option<&HeaderValue>| {
        if b3_64bit(existing, out.trace_id) {
            &tp[19..35]
        } else {
            &tp[3..35]
        }
    };
    let span_hex = &tp[36..52];
    let state: &[u8] = if out.sampled { b"1" } else { b"0" };
    if let Some(existing) = headers.get(&B3) {
        let trace_hex = trace_hex(Some(existing));
        let mut b3 = Vec::with_capacity(70);
        b3.extend_from_slice(trace_hex);
        b3.push(b'-');
        b3.extend_from_slice(span_hex);
        b3.push(b'-');
        b3.extend_from_slice(state);
        if let Some(parent) = out.parent {
            let mut p = [0u8; 16];
            put_hex(&mut p, parent);
            b3.push(b'-');
            b3.extend_from_slice(&p);
        }
        headers.insert(B3, value(&b3));
    }
    if headers.contains_key(&B3_TRACE_ID) || headers.contains_key(&B3_SPAN_ID) {
        let trace_hex = trace_hex(headers.get(&B3_TRACE_ID));
        headers.insert(B3_TRACE_ID, value(trace_hex));
        headers.insert(B3_SPAN_ID, value(span_hex));
        headers.insert(
            B3_SAMPLED,
            HeaderValue::from_static(if out.sampled { "1" } else { "0" }),
        );
        headers.remove(B3_FLAGS);
        match out.parent {
            Some(parent) => {
                let mut p = [0u8; 16];
                put_hex(&mut p, parent);
                headers.insert(B3_PARENT_SPAN_ID, value(&p));
            }
            None => {
                headers.remove(B3_PARENT_SPAN_ID);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn tid() -> TraceId {
        hex_array(TRACE.as_bytes()).unwrap()
    }

    fn sid() -> SpanId {
        hex_array(SPAN.as_bytes()).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn valid_traceparent_is_read() {
        let ctx = parse_traceparent(format!("00-{TRACE}-{SPAN}-01").as_bytes()).unwrap();
        assert_eq!(ctx.trace_id, tid());
        assert_eq!(ctx.span_id, sid());
        assert_eq!(ctx.sampled, Some(true));
        let ctx = parse_traceparent(format!("00-{TRACE}-{SPAN}-00").as_bytes()).unwrap();
        assert_eq!(ctx.sampled, Some(false));
        // A future version may append fields.
        let ctx = parse_traceparent(format!("01-{TRACE}-{SPAN}-03-extra").as_bytes()).unwrap();
        assert_eq!(ctx.sampled, Some(true));
    }

    #[test]
    fn malformed_traceparent_is_ignored() {
        for bad in [
            String::new(),
            "garbage".to_string(),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-0g"),
            format!("00_{TRACE}-{SPAN}-01"),
            format!("00-{TRACE}x{SPAN}-01"),
            format!("01-{TRACE}-{SPAN}-01x"),
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
        // A malformed traceparent does not hide a valid B3 context, and two traceparents
        // are ambiguous.
        let h = headers(&[
            ("traceparent", "00-zz"),
            ("b3", &format!("{TRACE}-{SPAN}-1")),
        ]);
        assert!(matches!(extract(&h), Incoming::Context(c) if c.format == Format::B3Single));
        let tp = format!("00-{TRACE}-{SPAN}-01");
        let h = headers(&[("traceparent", &tp), ("traceparent", &tp)]);
        assert_eq!(extract(&h), Incoming::None);
    }

    #[test]
    fn b3_single_header_forms() {
        let Some(Incoming::Context(c)) = parse_b3_single(format!("{TRACE}-{SPAN}-1").as_bytes())
        else {
            panic!("not parsed");
        };
        assert_eq!(
            (c.trace_id, c.span_id, c.sampled),
            (tid(), sid(), Some(true))
        );
        let Some(Incoming::Context(c)) =
            parse_b3_single(format!("a3ce929d0e0e4736-{SPAN}-d-{SPAN}").as_bytes())
        else {
            panic!("not parsed");
        };
        assert_eq!(c.trace_id[..8], [0; 8]);
        assert_eq!(hex(&c.trace_id[8..]), "a3ce929d0e0e4736");
        assert_eq!(c.sampled, Some(true));
        let Some(Incoming::Context(c)) = parse_b3_single(format!("{TRACE}-{SPAN}").as_bytes())
        else {
            panic!("not parsed");
        };
        assert_eq!(c.sampled, None, "no state: the decision is deferred");
        assert_eq!(parse_b3_single(b"0"), Some(Incoming::Decision(false)));
        assert_eq!(parse_b3_single(b"d"), Some(Incoming::Decision(true)));
        for bad in [
            "x".to_string(),
            format!("{TRACE}-{SPAN}-2"),
            format!("{TRACE}-abc-1"),
            format!("{TRACE}0-{SPAN}-1"),
            format!("{TRACE}-{SPAN}-1-xyz"),
            format!("{TRACE}-{SPAN}-1-{SPAN}-more"),
            format!("{}-{SPAN}-1", "0".repeat(32)),
        ] {
            assert_eq!(parse_b3_single(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn b3_multi_headers() {
        let h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ]);
        let Incoming::Context(c) = extract(&h) else {
            panic!("not parsed");
        };
        assert_eq!(
            (c.trace_id, c.sampled, c.format),
            (tid(), Some(true), Format::B3Multi)
        );
        let h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
        ]);
        assert!(matches!(extract(&h), Incoming::Context(c) if c.sampled == Some(true)));
        let h = headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", "short")]);
        assert_eq!(extract(&h), Incoming::None);
        let h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "maybe"),
        ]);
        assert_eq!(extract(&h), Incoming::None);
        let h = headers(&[("x-b3-sampled", "0")]);
        assert_eq!(extract(&h), Incoming::Decision(false));
    }

    #[test]
    fn inject_writes_traceparent_and_updates_b3_present() {
        let parent = sid();
        let span = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut h = headers(&[
            ("b3", &format!("{TRACE}-{SPAN}-1")),
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", SPAN),
            ("x-b3-flags", "1"),
            ("tracestate", "vendor=x"),
        ]);
        inject(
            &mut h,
            &Outgoing {
                trace_id: &tid(),
                span_id: &span,
                sampled: true,
                parent: Some(&parent),
            },
        );
        assert_eq!(h["traceparent"], format!("00-{TRACE}-0102030405060708-01"));
        assert_eq!(h["b3"], format!("{TRACE}-0102030405060708-1-{SPAN}"));
        assert_eq!(h["x-b3-traceid"], TRACE);
        assert_eq!(h["x-b3-spanid"], "0102030405060708");
        assert_eq!(h["x-b3-parentspanid"], SPAN);
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("x-b3-flags"));
        assert_eq!(h["tracestate"], "vendor=x");

        let mut h = headers(&[("x-b3-traceid", "a3ce929d0e0e4736")]);
        let low: TraceId = {
            let mut id = [0; 16];
            id[8..].copy_from_slice(&hex_array::<8>(b"a3ce929d0e0e4736").unwrap());
            id
        };
        inject(
            &mut h,
            &Outgoing {
                trace_id: &low,
                span_id: &span,
                sampled: false,
                parent: None,
            },
        );
        assert_eq!(
            h["traceparent"],
            "00-0000000000000000a3ce929d0e0e4736-0102030405060708-00"
        );
        assert_eq!(h["x-b3-traceid"], "a3ce929d0e0e4736");
        assert_eq!(h["x-b3-sampled"], "0");
        assert!(!h.contains_key("b3"));
        // What was written reads back as the same context.
        let Incoming::Context(c) = extract(&h) else {
            panic!("not parsed");
        };
        assert_eq!((c.trace_id, c.span_id, c.sampled), (low, span, Some(false)));
        // The next hop reads traceparent (128-bit) and still keeps B3 at 64 bits.
        assert_eq!(c.format, Format::W3c);
        inject(
            &mut h,
            &Outgoing {
                trace_id: &c.trace_id,
                span_id: &[9; 8],
                sampled: false,
                parent: Some(&span),
            },
        );
        assert_eq!(h["x-b3-traceid"], "a3ce929d0e0e4736");
        assert_eq!(h["x-b3-parentspanid"], "0102030405060708");
    }
}
