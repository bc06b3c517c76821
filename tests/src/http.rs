//! A minimal HTTP/1.0 GET client (std only), for admin endpoints and test servers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{HarnessError, IoContext, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// `http://host:port/path` split into the socket address to dial, the Host header and the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

pub fn parse_url(url: &str) -> Result<HttpUrl> {
    let invalid = |detail: &str| HarnessError::invalid("URL", format!("{url:?}: {detail}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("only http:// is supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(invalid("no host"));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| invalid(&e.to_string()))?
        .next()
        .ok_or_else(|| invalid("host resolves to no address"))?;
    Ok(HttpUrl {
        addr,
        host: authority.to_string(),
        path: path.to_string(),
    })
}

/// GETs `url` with HTTP/1.0 (the server closes after the response, so no chunking or
/// keep-alive to handle). `timeout` bounds the connect and each read/write.
pub fn http_get(url: &str, timeout: Duration) -> Result<HttpResponse> {
    let target = parse_url(url)?;
    let mut stream = TcpStream::connect_timeout(&target.addr, timeout)
        .context(|| format!("connecting to {}", target.addr))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .context(|| "setting socket timeouts".to_string())?;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: weft-e2e\r\nAccept: */*\r\n\r\n",
        target.path, target.host
    );
    stream
        .write_all(request.as_bytes())
        .context(|| format!("sending GET {url}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .context(|| format!("reading the response to GET {url}"))?;
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let invalid = |detail: &str| HarnessError::invalid("HTTP response", detail.to_string());
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no end of headers"))?;
    let head =
        std::str::from_utf8(&raw[..head_end]).map_err(|_| invalid("headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(&format!("status line {status_line:?}")));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid(&format!("status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    let content_length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    if let Some(len) = content_length {
        if body.len() < len {
            return Err(invalid(&format!(
                "body has {} bytes, content-length says {len}",
                body.len()
            )));
        }
        body.truncate(len);
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let url = parse_url("http://198.18.0.5:7191/ready").unwrap();
        assert_eq!(url.addr, "198.18.0.5:7191".parse().unwrap());
        assert_eq!(url.host, "198.18.0.5:7191");
        assert_eq!(url.path, "/ready");
        assert_eq!(parse_url("http://127.0.0.1").unwrap().path, "/");
        assert_eq!(parse_url("http://127.0.0.1").unwrap().addr.port(), 80);
        assert!(parse_url("https://127.0.0.1/").is_err());
        assert!(parse_url("http:///x").is_err());
    }

    #[test]
    fn parses_responses_with_and_without_length() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nready\nXX").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"ready\n");
        assert!(r.is_success());
        let r = parse_response(b"HTTP/1.0 503 Service Unavailable\r\nX: y\r\n\r\nnot yet").unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body_text(), "not yet");
        assert_eq!(r.headers, vec![("x".to_string(), "y".to_string())]);
        assert!(!r.is_success());
    }

    #[test]
    fn rejects_garbage_and_short_bodies() {
        assert!(parse_response(b"SSH-2.0-x\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").is_err());
    }

    #[test]
    fn gets_from_a_local_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello").unwrap();
            request
        });
        let response = http_get(&format!("http://{addr}/metrics"), Duration::from_secs(5)).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"hello");
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /metrics HTTP/1.0\r\n"),
            "{request}"
        );
    }
}
