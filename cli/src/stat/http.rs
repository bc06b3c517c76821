//! One HTTP/1.1 GET (hyper's client connection, no pool): enough for Prometheus' API and a
//! proxy's `/metrics`. Plain `http://` only; bodies are capped at [`MAX_BODY`].

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// The largest body read: a busy proxy's `/metrics` or a Prometheus answer is a few MiB at
/// most, and whatever answers on a scraped port must not make `weft stat` take all memory.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

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
    get_capped(url, timeout, MAX_BODY).await
}

async fn get_capped(
    url: &str,
    timeout: Duration,
    max_body: usize,
) -> Result<(u16, String), HttpError> {
    match tokio::time::timeout(timeout, get_inner(url, max_body)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout(url.to_string())),
    }
}

async fn get_inner(url: &str, max_body: usize) -> Result<(u16, String), HttpError> {
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
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| failed(format!("reading the body (at most {max_body} bytes): {e}")))?
        .to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One connection answered with a 200 and `body`.
    async fn serve_once(body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = sock.read(&mut request).await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
        format!("http://{addr}/metrics")
    }

    #[tokio::test]
    async fn bodies_over_the_cap_are_refused() {
        let url = serve_once("0123456789").await;
        let (status, body) = get_capped(&url, Duration::from_secs(5), 10).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "0123456789"));
        let url = serve_once("0123456789x").await;
        let err = get_capped(&url, Duration::from_secs(5), 10)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("at most 10 bytes"), "{err}");
    }
}
