//! Outbound protocol detection: what the app's first bytes say it speaks. Detection reads
//! (bounded, with a timeout) and hands the bytes back so they can be replayed.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An HTTP/1 request line longer than this is not worth proxying as HTTP.
const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Read size while detecting; a request head usually arrives in one read.
const READ_CHUNK: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Anything else.
    Opaque,
    /// Nothing before the timeout: a server-speaks-first protocol, passed through.
    Silent,
}

/// Reads from `tcp` until the protocol is known. Returns the bytes read and the verdict.
pub async fn detect(
    tcp: &mut TcpStream,
    timeout: Duration,
) -> std::io::Result<(Vec<u8>, Protocol)> {
    // Read straight into the replay buffer: a stack chunk would live on in every
    // connection's task, which is sized for its largest state.
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        buf.reserve(READ_CHUNK);
        let n = match tokio::time::timeout_at(deadline, tcp.read_buf(&mut buf)).await {
            Err(_) if buf.is_empty() => return Ok((buf, Protocol::Silent)),
            Err(_) => return Ok((buf, Protocol::Opaque)),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            return Ok((buf, Protocol::Opaque));
        }
        if let Some(p) = classify(&buf) {
            return Ok((buf, p));
        }
    }
}

/// `None` while more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // An HTTP/1 request line: METHOD SP target SP "HTTP/1." digit CRLF.
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = match line_end {
        Some(end) => &buf[..end],
        None if buf.len() >= MAX_REQUEST_LINE => return Some(Protocol::Opaque),
        None => {
            // Give up early when the bytes so far cannot start a method token.
            let token_ok = buf
                .iter()
                .take_while(|&&b| b != b' ')
                .all(|b| b.is_ascii_uppercase());
            return if token_ok {
                None
            } else {
                Some(Protocol::Opaque)
            };
        }
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let version = parts.next().unwrap_or_default();
    let is_http1 = !method.is_empty()
        && method.iter().all(|b| b.is_ascii_uppercase())
        && !target.is_empty()
        && version.len() == 8
        && version.starts_with(b"HTTP/1.")
        && parts.next().is_none();
    Some(if is_http1 {
        Protocol::Http1
    } else {
        Protocol::Opaque
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(
            classify(b"POST /api/v1/orders HTTP/1.0\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GET / HT"), None);
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET / HTTP/2.0\r\n"), Some(Protocol::Opaque));
        assert_eq!(
            classify(&vec![b'A'; MAX_REQUEST_LINE]),
            Some(Protocol::Opaque)
        );
    }
}
