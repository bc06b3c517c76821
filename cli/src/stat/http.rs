//! One HTTP/1.1 GET (hyper's client connection, no pool): enough for Prometheus' API and a
//! proxy's `/metrics`. Plain `http://` only.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {0:?} (want http://host:port/path)")]
    BadUrl(String),
    #[error("GET {url}: {detail}")]
    Failed { url: String, detail: String },
    #[error("GET {0}: timed out")]
    Timeout(String),
}

/// GETs `url`; returns the status and the body as text (lossy UTF-8).
pub async fn get(url: &str, timeout: Duration) -> Result<(u16, String), HttpError> {
    match tokio::time::timeout(timeout, get_inner(url)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout(url.to_string())),
    }
}

async fn get_inner(url: &str) -> Result<(u16, String), HttpError> {
    let bad = || HttpError::BadUrl(url.to_string());
    let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad());
    }
    let host = uri.host().ok_or_else(bad)?;
    let port = uri.port_u16().unwrap_or(80);
    let failed = |detail: String| HttpError::Failed {
        url: url.to_string(),
        detail,
    };
    // `[::1]` in a URL is `::1` to connect to.
    let connect_host = host.trim_start_matches('[').trim_end_matches(']');
    let stream = tokio::net::TcpStream::connect((connect_host, port))
        .await
        .map_err(|e| failed(format!("connecting: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = uri.authority().map_or(host, |a| a.as_str()).to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "text/plain, application/json, */*")
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(format!("reading the body: {e}")))?
        .to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
