//! A raw HTTP/1.1 client over a std `TcpStream`: byte-exact requests (keep-alive, chunked,
//! deliberately malformed), responses read with content-length, chunked or close-delimited
//! bodies, streamed to a callback when they are large, and a check that the server closed.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::error::{HarnessError, IoContext, Result};

/// Upper bound on a response head, so a broken peer cannot make the client buffer forever.
const MAX_HEAD_BYTES: usize = 256 * 1024;
const READ_CHUNK: usize = 64 * 1024;

/// One HTTP/1.1 connection.
pub struct H1Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// Status line and headers of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H1Head {
    pub version: String,
    pub status: u16,
    /// Names lowercased, in order.
    pub headers: Vec<(String, String)>,
}

impl H1Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }

    /// Whether the server announced it will close the connection after this response.
    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H1Response {
    pub head: H1Head,
    pub body: Vec<u8>,
}

impl H1Response {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl H1Connection {
    /// Wraps a connected stream; `timeout` bounds every read and write.
    pub fn new(stream: TcpStream, timeout: Duration) -> Result<H1Connection> {
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .and_then(|()| stream.set_nodelay(true))
            .context(|| "setting socket options".to_string())?;
        let writer = stream
            .try_clone()
            .context(|| "cloning the socket".to_string())?;
        Ok(H1Connection {
            reader: BufReader::with_capacity(READ_CHUNK, stream),
            writer,
        })
    }

    /// A second handle on the socket, for writing a long body from another thread while this
    /// one reads the response.
    pub fn writer_clone(&self) -> Result<TcpStream> {
        self.writer
            .try_clone()
            .context(|| "cloning the socket".to_string())
    }

    /// Writes `bytes` as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer
            .write_all(bytes)
            .context(|| format!("writing {} request bytes", bytes.len()))
    }

    /// Sends a request with `Host`, the extra `headers` and, when `body` is given, a
    /// `Content-Length` body; then reads the whole response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        host: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<H1Response> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        self.send_raw(&bytes)?;
        self.read_response()
    }

    /// `GET <path>` on this connection (keep-alive).
    pub fn get(&mut self, path: &str, host: &str) -> Result<H1Response> {
        self.request("GET", path, host, &[], None)
    }

    pub fn read_response(&mut self) -> Result<H1Response> {
        let head = self.read_head()?;
        let mut body = Vec::new();
        self.read_body(&head, |chunk| body.extend_from_slice(chunk))?;
        Ok(H1Response { head, body })
    }

    /// Reads a status line and headers, skipping interim (1xx other than 101) responses.
    pub fn read_head(&mut self) -> Result<H1Head> {
        loop {
            let head = self.read_one_head()?;
            if (100..200).contains(&head.status) && head.status != 101 {
                continue;
            }
            return Ok(head);
        }
    }

    fn read_one_head(&mut self) -> Result<H1Head> {
        let mut lines = Vec::new();
        let mut total = 0usize;
        loop {
            let mut line = Vec::new();
            let n = self
                .reader
                .read_until(b'\n', &mut line)
                .context(|| format!("reading a response head after {total} bytes"))?;
            if n == 0 {
                return Err(HarnessError::Io {
                    context: format!("reading a response head after {total} bytes"),
                    error: std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "connection closed before a complete response head",
                    ),
                });
            }
            total += n;
            if total > MAX_HEAD_BYTES {
                return Err(HarnessError::invalid(
                    "HTTP response head",
                    format!("longer than {MAX_HEAD_BYTES} bytes"),
                ));
            }
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if line.is_empty() {
                if lines.is_empty() {
                    // Tolerate stray blank lines between responses.
                    continue;
                }
                break;
            }
            lines.push(line);
        }
        parse_head(&lines)
    }

    /// Reads the body `head` announces and hands it to `sink` piece by piece (never holding
    /// more than a read buffer); returns the number of body bytes.
    pub fn read_body(&mut self, head: &H1Head, mut sink: impl FnMut(&[u8])) -> Result<u64> {
        if head.status == 204 || head.status == 304 || head.status == 101 {
            return Ok(0);
        }
        if head.is_chunked() {
            return self.read_chunked(&mut sink);
        }
        match head.content_length() {
            Some(len) => self.read_exact_to(len, &mut sink).map(|()| len),
            None => self.read_to_close(&mut sink),
        }
    }

    fn read_chunked(&mut self, sink: &mut impl FnMut(&[u8])) -> Result<u64> {
        let mut total = 0u64;
        loop {
            let line = self.read_line("a chunk size")?;
            let size_text = line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size_text, 16).map_err(|_| {
                HarnessError::invalid("chunked response", format!("chunk size line {line:?}"))
            })?;
            if size == 0 {
                // Trailers, up to the blank line.
                while !self.read_line("chunked trailers")?.is_empty() {}
                return Ok(total);
            }
            self.read_exact_to(size, sink)?;
            total += size;
            let end = self.read_line("the end of a chunk")?;
            if !end.is_empty() {
                return Err(HarnessError::invalid(
                    "chunked response",
                    format!("chunk of {size} bytes not followed by CRLF but {end:?}"),
                ));
            }
        }
    }

    fn read_line(&mut self, what: &str) -> Result<String> {
        let mut line = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut line)
            .context(|| format!("reading {what}"))?;
        if n == 0 {
            return Err(HarnessError::Io {
                context: format!("reading {what}"),
                error: std::io::Error::new(ErrorKind::UnexpectedEof, "connection closed"),
            });
        }
        Ok(String::from_utf8_lossy(&line)
            .trim_end_matches(['\r', '\n'])
            .to_string())
    }

    fn read_exact_to(&mut self, mut len: u64, sink: &mut impl FnMut(&[u8])) -> Result<()> {
        while len > 0 {
            let buf = self
                .reader
                .fill_buf()
                .context(|| format!("reading the body ({len} bytes to go)"))?;
            if buf.is_empty() {
                return Err(HarnessError::Io {
                    context: format!("reading the body ({len} bytes to go)"),
                    error: std::io::Error::new(ErrorKind::UnexpectedEof, "connection closed"),
                });
            }
            let n = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
            sink(&buf[..n]);
            self.reader.consume(n);
            len -= n as u64;
        }
        Ok(())
    }

    fn read_to_close(&mut self, sink: &mut impl FnMut(&[u8])) -> Result<u64> {
        let mut total = 0u64;
        loop {
            let buf = self
                .reader
                .fill_buf()
                .context(|| format!("reading a close-delimited body after {total} bytes"))?;
            if buf.is_empty() {
                return Ok(total);
            }
            let n = buf.len();
            sink(buf);
            self.reader.consume(n);
            total += n as u64;
        }
    }

    /// Whether the peer has closed: waits up to `within` for EOF or a reset. Unexpected data
    /// counts as open.
    pub fn is_closed(&mut self, within: Duration) -> bool {
        if !self.reader.buffer().is_empty() {
            return false;
        }
        let stream = self.reader.get_ref();
        let previous = stream.read_timeout().ok().flatten();
        if stream.set_read_timeout(Some(within)).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let closed = match self.reader.get_mut().read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            ),
        };
        let _ = self.reader.get_ref().set_read_timeout(previous);
        closed
    }
}

fn parse_head(lines: &[String]) -> Result<H1Head> {
    let status_line = lines.first().map(String::as_str).unwrap_or_default();
    let invalid = || HarnessError::invalid("HTTP status line", format!("{status_line:?}"));
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(invalid());
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(invalid)?;
    let headers = lines[1..]
        .iter()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(H1Head {
        version: version.to_string(),
        status,
        headers,
    })
}

/// `body` as one chunked-encoding chunk per piece, with the final zero chunk.
pub fn chunked(pieces: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces.iter().filter(|p| !p.is_empty()) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A server that reads one request head, then writes `reply` and closes (or keeps the
    /// socket open when `close` is false).
    fn scripted(reply: &'static [u8], close: bool) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).unwrap();
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            conn.write_all(reply).unwrap();
            if !close {
                std::thread::sleep(Duration::from_secs(2));
            }
        });
        addr
    }

    fn connect(addr: std::net::SocketAddr) -> H1Connection {
        H1Connection::new(TcpStream::connect(addr).unwrap(), Duration::from_secs(5)).unwrap()
    }

    #[test]
    fn reads_chunked_bodies_with_extensions_and_trailers() {
        let addr = scripted(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Served-By: a\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            false,
        );
        let mut conn = connect(addr);
        let response = conn.get("/", "x").unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.head.is_chunked());
        assert_eq!(response.header("X-SERVED-BY"), Some("a"));
        assert_eq!(response.body, b"hello world");
        assert!(!conn.is_closed(Duration::from_millis(200)));
    }

    #[test]
    fn reads_content_length_and_close_delimited_bodies() {
        let addr = scripted(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabcEXTRA",
            true,
        );
        let mut conn = connect(addr);
        let response = conn.get("/", "x").unwrap();
        assert_eq!(response.status(), 431);
        assert!(response.head.closes());
        assert_eq!(response.body, b"abc");

        let addr = scripted(b"HTTP/1.0 200 OK\r\n\r\nuntil close", true);
        let mut conn = connect(addr);
        let response = conn.get("/", "x").unwrap();
        assert_eq!(response.body_text(), "until close");
        assert!(conn.is_closed(Duration::from_secs(1)));
    }

    #[test]
    fn rejects_broken_responses() {
        let mut conn = connect(scripted(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            true,
        ));
        assert!(conn.get("/", "x").is_err());
        let mut conn = connect(scripted(b"SSH-2.0-x\r\n\r\n", true));
        assert!(conn.get("/", "x").is_err());
        let mut conn = connect(scripted(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            true,
        ));
        assert!(conn.get("/", "x").is_err());
        let mut conn = connect(scripted(b"", true));
        assert!(conn.get("/", "x").is_err());
    }

    #[test]
    fn encodes_chunks() {
        assert_eq!(
            chunked(&[b"hello", b"", b" world!!!!!!"]),
            b"5\r\nhello\r\nc\r\n world!!!!!!\r\n0\r\n\r\n"
        );
    }
}
