//! Header rewrites at the edges of the mesh hop: HTTP/1 from the app travels as HTTP/2
//! between proxies and is restored for the server app. Connection-specific headers never
//! cross a hop (RFC 9110 §7.6.1), and HTTP/2 forbids them outright.

use http::header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri, Version};

/// Set by the client proxy on requests that were HTTP/1.x when the app sent them, so the
/// server proxy speaks HTTP/1.1 to its app.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("weft-orig-proto");
const HTTP11: HeaderValue = HeaderValue::from_static("HTTP/1.1");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("request has no Host header or authority")]
    NoAuthority,
    #[error("request target cannot be made absolute")]
    BadTarget,
}

/// Not in `http`'s standard set, so named once here rather than parsed on every call.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the names (cheap comparisons, no
    // hashing) decides whether anything needs removing at all.
    let any = headers.keys().any(|name| {
        name == CONNECTION
            || name == TRANSFER_ENCODING
            || name == UPGRADE
            || name == TE
            || name == KEEP_ALIVE
            || name == PROXY_CONNECTION
    });
    if !any {
        return;
    }
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        CONNECTION,
        TRANSFER_ENCODING,
        UPGRADE,
        KEEP_ALIVE,
        PROXY_CONNECTION,
    ] {
        headers.remove(name);
    }
    // `te: trailers` is the one TE value HTTP/2 allows (gRPC needs it).
    if headers.get(TE).is_some_and(|v| v.as_bytes() != b"trailers") {
        headers.remove(TE);
    }
}

/// The authority the app addressed: the URI's, else the Host header.
pub fn authority_of<B>(req: &Request<B>) -> Option<http::uri::Authority> {
    if let Some(a) = req.uri().authority() {
        return Some(a.clone());
    }
    req.headers().get(HOST)?.to_str().ok()?.parse().ok()
}

/// `http://<authority><path>`, reusing the URI's parsed path rather than re-parsing it.
fn with_authority(uri: Uri, authority: http::uri::Authority) -> Result<Uri, HeaderError> {
    let mut parts = uri.into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).map_err(|_| HeaderError::BadTarget)
}

/// The URI as an HTTP/1 request line carries it to an origin server: path and query only.
pub fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .cloned()
        .map_or_else(|| Uri::from_static("/"), Uri::from)
}

/// Outbound: makes an app request (HTTP/1.x or HTTP/2) into a mesh HTTP/2 request.
pub fn to_mesh<B>(req: &mut Request<B>) -> Result<(), HeaderError> {
    let authority = authority_of(req).ok_or(HeaderError::NoAuthority)?;
    let was_http1 = req.version() < Version::HTTP_2;
    let uri = std::mem::take(req.uri_mut());
    *req.uri_mut() = with_authority(uri, authority)?;
    strip_hop_by_hop(req.headers_mut());
    // :authority carries it on HTTP/2.
    req.headers_mut().remove(HOST);
    if was_http1 {
        req.headers_mut().insert(ORIG_PROTO, HTTP11);
    }
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// Inbound: restores the app's view of a mesh request. Returns true when the app is to
/// be spoken to in HTTP/1.1: the request then has the app's Host and an origin-form URI
/// (the connection it goes on says where the app is).
pub fn from_mesh<B>(req: &mut Request<B>) -> Result<bool, HeaderError> {
    let http1 = req
        .headers_mut()
        .remove(ORIG_PROTO)
        .is_some_and(|v| v == HTTP11);
    strip_hop_by_hop(req.headers_mut());
    if http1 {
        if !req.headers().contains_key(HOST) {
            let authority = authority_of(req).ok_or(HeaderError::NoAuthority)?;
            let host =
                HeaderValue::from_str(authority.as_str()).map_err(|_| HeaderError::BadTarget)?;
            req.headers_mut().insert(HOST, host);
        }
        *req.uri_mut() = origin_form(req.uri());
        *req.version_mut() = Version::HTTP_11;
    }
    Ok(http1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_round_trips_through_the_mesh_form() {
        let mut req = Request::builder()
            .uri("/api/v1/users?id=4")
            .header(HOST, "web.shop:80")
            .header(CONNECTION, "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-app", "kept")
            .body(())
            .unwrap();
        to_mesh(&mut req).unwrap();
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.uri(), "http://web.shop:80/api/v1/users?id=4");
        assert!(req.headers().get(HOST).is_none());
        assert!(req.headers().get("x-hop").is_none() && req.headers().get("keep-alive").is_none());
        assert_eq!(req.headers()[&ORIG_PROTO], "HTTP/1.1");
        assert_eq!(req.headers()["x-app"], "kept");

        let http1 = from_mesh(&mut req).unwrap();
        assert!(http1);
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri(), "/api/v1/users?id=4");
        assert_eq!(req.headers()[HOST], "web.shop:80");
        assert!(req.headers().get(&ORIG_PROTO).is_none());
    }

    #[test]
    fn grpc_keeps_te_trailers_and_http2() {
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://greeter.shop:50051/Echo/Say")
            .header(TE, "trailers")
            .body(())
            .unwrap();
        to_mesh(&mut req).unwrap();
        assert_eq!(req.headers()[TE], "trailers");
        assert!(req.headers().get(&ORIG_PROTO).is_none());
        assert!(!from_mesh(&mut req).unwrap());
        assert_eq!(req.uri(), "http://greeter.shop:50051/Echo/Say");
    }

    #[test]
    fn strips_only_hop_by_hop_headers() {
        let mut plain = HeaderMap::new();
        plain.insert("x-app", HeaderValue::from_static("1"));
        plain.insert(TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2);

        let mut hop = plain.clone();
        hop.insert(TE, HeaderValue::from_static("gzip"));
        hop.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        hop.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut hop);
        assert_eq!(hop.keys().collect::<Vec<_>>(), ["x-app"]);
    }

    #[test]
    fn a_request_without_authority_is_refused() {
        let mut req = Request::builder().uri("/").body(()).unwrap();
        assert_eq!(to_mesh(&mut req), Err(HeaderError::NoAuthority));
    }
}
