//! The HTTP/1 server for the connections a proxy accepts: the app's outbound ones and
//! plaintext ones from unmeshed clients inbound. It reads request heads
//! (httparse), frames request and response bodies and writes responses itself, so that a
//! keep-alive connection waiting for its next request holds no buffer at all: hyper's
//! HTTP/1 server keeps an 8 KiB read and an 8 KiB write buffer for a connection's whole
//! life, and an app's connection pools can keep thousands of connections open.
//!
//! Requests are served one at a time, in order (pipelined ones wait in the read buffer).
//! A request body is read by whoever holds the request: the connection's read half
//! travels inside the body and comes back when the body ends or is dropped, so body bytes
//! go from the socket to the mesh hop without a copy or a channel.

use std::future::{poll_fn, Future};
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::{response, Version};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::body::{self, Body};
use crate::forward::Prefixed;

/// What a client may send.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request heads larger than this (or with more than [`MAX_HEADERS`] fields) get 431.
    pub max_head_bytes: usize,
    /// Time allowed for the rest of a request head once its first bytes have arrived.
    pub head_timeout: Duration,
}

/// What both proxies allow an app's or a plaintext client's HTTP/1 connection: heads up to
/// 64 KiB (larger ones get 431 here rather than failing on the mesh hop), complete within
/// 30 s of their first byte.
pub const LIMITS: Limits = Limits {
    max_head_bytes: 64 * 1024,
    head_timeout: Duration::from_secs(30),
};

/// As many header fields as hyper's server accepts.
pub const MAX_HEADERS: usize = 100;
/// First read buffer for a request head; doubled while the head is incomplete.
const HEAD_BUF: usize = 4 * 1024;
/// Largest read buffer reserved for request body bytes.
const BODY_READ: usize = 16 * 1024;
/// Response bytes gathered before a write; larger data frames are written as they are.
const WRITE_BATCH: usize = 16 * 1024;
/// A request body the service left unread is read and discarded up to this much, so the
/// next request can be found (and the client is not reset mid-send); beyond it the
/// connection is closed instead.
const MAX_DRAIN: u64 = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// Chunk extensions and trailer fields are skipped, up to this many bytes each.
const MAX_CHUNK_META: u32 = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request head larger than {0} bytes or with more than {MAX_HEADERS} fields")]
    HeadTooLarge(usize),
    #[error("request head not complete within {0:?}")]
    HeadTimeout(Duration),
    #[error("response body failed: {0}")]
    ResponseBody(body::BoxError),
    #[error("response body length differs from its content-length")]
    ResponseLength,
}

/// A request body that could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
    #[error("connection closed before the request body ended")]
    Eof,
    #[error("malformed chunked request body: {0}")]
    Chunked(&'static str),
}

/// In a request's extensions when the client asked to switch protocols (`Upgrade`): gives
/// the connection, with any bytes already read, once the service has answered 101.
/// (Request extensions must be `Clone`; only one clone gets the connection.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Prefixed<TcpStream>>>>>);

impl OnUpgrade {
    /// `None` when the service's answer was not 101, the connection failed first, or
    /// another clone took it.
    pub async fn connection(self) -> Option<Prefixed<TcpStream>> {
        let rx = self.0.lock().ok()?.take()?;
        rx.await.ok()
    }
}

/// Serves `tcp`'s requests (`prefix`: bytes already read from it) with `service` until the
/// client closes, either side asks to close, or the connection fails.
pub async fn serve<S, F>(
    tcp: TcpStream,
    prefix: Vec<u8>,
    limits: Limits,
    mut service: S,
) -> Result<(), ServeError>
where
    S: FnMut(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
{
    let (io, writer) = tcp.into_split();
    let mut conn = Conn {
        reader: Some(Reader {
            io,
            buf: BytesMut::from(prefix.as_slice()),
        }),
        writer: Some(writer),
        limits,
    };
    drop(prefix);
    loop {
        // Idle, this loop is all a connection's task holds: each exchange runs in its own
        // box, freed when it ends (with its buffers, the request and the service's future).
        if !conn.wait_for_request().await? {
            return Ok(());
        }
        if let Next::Close = Box::pin(conn.exchange(&mut service)).await? {
            return Ok(());
        }
    }
}

/// One client connection between requests.
struct Conn {
    /// `None` while a request body holds it.
    reader: Option<Reader>,
    /// `None` once handed to an upgrade.
    writer: Option<OwnedWriteHalf>,
    limits: Limits,
}

enum Next {
    Continue,
    Close,
}

fn gone() -> ServeError {
    ServeError::Io(io::Error::other("connection already handed over"))
}

impl Conn {
    /// Waits until the client sends (or has already sent) the next request's first bytes,
    /// holding no buffer meanwhile. `false`: the client closed the connection.
    async fn wait_for_request(&mut self) -> Result<bool, ServeError> {
        let reader = self.reader.as_mut().ok_or_else(gone)?;
        if reader.buf.is_empty() {
            // Read onto the stack and keep just what came (a typical head is a few hundred
            // bytes). The chunk exists only inside a poll, never across an await, so it is
            // no part of the connection's task; it is not zeroed (`ReadBuf::uninit`).
            let first = poll_fn(|cx| {
                let mut chunk = [MaybeUninit::<u8>::uninit(); HEAD_BUF];
                let mut read = ReadBuf::uninit(&mut chunk);
                ready!(Pin::new(&mut reader.io).poll_read(cx, &mut read))?;
                Poll::Ready(Ok::<_, io::Error>(BytesMut::from(read.filled())))
            })
            .await?;
            if first.is_empty() {
                return Ok(false);
            }
            reader.buf = first;
        }
        Ok(true)
    }

    /// Reads one request, has `service` answer it and writes the answer.
    async fn exchange<S, F>(&mut self, service: &mut S) -> Result<Next, ServeError>
    where
        S: FnMut(Request<Body>) -> F,
        F: Future<Output = Response<Body>>,
    {
        let mut reader = self.reader.take().ok_or_else(gone)?;
        let writer = self.writer.as_mut().ok_or_else(gone)?;
        let head = match read_head(&mut reader, &self.limits).await {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(Next::Close),
            Err(e) => {
                reply_error(writer, &e).await;
                return Err(e);
            }
        };
        let RequestHead {
            mut request,
            framing,
            mut keep_alive,
            expect_continue,
            upgrade: wants_upgrade,
        } = head;
        let exchange = Exchange {
            version: request.version(),
            method: request.method().clone(),
        };
        if expect_continue && !framing.is_empty() {
            // Sent before the service runs: a proxy cannot know whether the server would
            // have refused, and the client would otherwise wait (curl: 1 s) for nothing.
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let mut upgrade = None;
        if wants_upgrade {
            let (tx, rx) = oneshot::channel();
            request
                .extensions_mut()
                .insert(OnUpgrade(Arc::new(Mutex::new(Some(rx)))));
            upgrade = Some(tx);
        }
        // A body-less request leaves the read half here; otherwise it travels in the body.
        let (body, returned) = if framing.is_empty() {
            self.reader = Some(reader);
            (body::empty(), None)
        } else {
            let (tx, rx) = oneshot::channel();
            let body = RequestBody {
                state: Some(BodyReader {
                    reader,
                    framing,
                    failed: false,
                }),
                back: Some(tx),
            };
            (body::boxed(body), Some(rx))
        };
        let (parts, rsp_body) = service(request.map(|()| body)).await.into_parts();
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS && upgrade.is_some();
        // CONNECT tunnels are not offered: a 2xx answer ends the connection after its head.
        if exchange.method == Method::CONNECT {
            keep_alive = false;
        }
        let written =
            write_response(writer, parts, rsp_body, &exchange, keep_alive, switching).await?;
        keep_alive &= written;
        if let Some(rx) = returned {
            let Ok(mut br) = rx.await else {
                return Ok(Next::Close);
            };
            if !br.is_done() && !drain(&mut br).await {
                keep_alive = false;
            }
            self.reader = Some(br.reader);
        }
        if switching {
            if let (Some(tx), Some(reader), Some(writer)) =
                (upgrade, self.reader.take(), self.writer.take())
            {
                let leftover = reader.buf.to_vec();
                let tcp = reader
                    .io
                    .reunite(writer)
                    .map_err(|_| io::Error::other("connection halves do not match"))?;
                let _ = tx.send(Prefixed::new(leftover, tcp));
            }
            return Ok(Next::Close);
        }
        if !keep_alive {
            let _ = writer.shutdown().await;
            return Ok(Next::Close);
        }
        if let Some(reader) = self.reader.as_mut().filter(|r| r.buf.is_empty()) {
            // Idle from here: give the buffer back until the next request arrives.
            reader.buf = BytesMut::new();
        }
        Ok(Next::Continue)
    }
}

/// The connection's read half and the bytes read from it that nobody consumed yet.
struct Reader {
    io: OwnedReadHalf,
    buf: BytesMut,
}

/// What the response needs to know about its request.
struct Exchange {
    version: Version,
    method: Method,
}

struct RequestHead {
    request: Request<()>,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    /// An HTTP/1.1 request with `Upgrade`.
    upgrade: bool,
}

/// Reads the rest of a request head whose first bytes are buffered. `None`: the client
/// closed the connection mid-head, which leaves nothing to answer.
async fn read_head(
    reader: &mut Reader,
    limits: &Limits,
) -> Result<Option<RequestHead>, ServeError> {
    if let Some(head) = parse_head(&mut reader.buf, limits.max_head_bytes)? {
        return Ok(Some(head));
    }
    // The usual head arrives in one read; only a slow or large one meets the timer.
    let rest = async {
        loop {
            let grow = reader.buf.len().max(HEAD_BUF);
            reader.buf.reserve(grow);
            if tokio::io::AsyncReadExt::read_buf(&mut reader.io, &mut reader.buf).await? == 0 {
                return Ok(None);
            }
            if let Some(head) = parse_head(&mut reader.buf, limits.max_head_bytes)? {
                return Ok(Some(head));
            }
        }
    };
    tokio::time::timeout(limits.head_timeout, rest)
        .await
        .map_err(|_| ServeError::HeadTimeout(limits.head_timeout))?
}

/// Parses a complete head off the front of `buf`; `None` while it is incomplete.
fn parse_head(buf: &mut BytesMut, max: usize) -> Result<Option<RequestHead>, ServeError> {
    // Uninitialised slots: filling 100 of them for every request would cost more than
    // parsing a typical head.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max => {
            return Err(ServeError::HeadTooLarge(max))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ServeError::HeadTooLarge(max)),
        Err(_) => return Err(ServeError::BadRequest("malformed request head")),
    };
    if len > max {
        return Err(ServeError::HeadTooLarge(max));
    }
    let bad = ServeError::BadRequest;
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| bad("bad method"))?;
    let uri: Uri = parsed
        .path
        .unwrap_or_default()
        .parse()
        .map_err(|_| bad("bad request target"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // The fields that frame the message are noted while the map is built: one pass, no
    // lookups afterwards.
    let mut facts = HeadFacts::default();
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name =
            HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| bad("bad header name"))?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| bad("bad header value"))?;
        facts.note(&name, field.value);
        headers.append(name, value);
    }
    buf.advance(len);
    let framing = facts.request_framing(version)?;
    let keep_alive = match version {
        Version::HTTP_11 => !facts.close,
        _ => facts.keep_alive,
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(RequestHead {
        request,
        framing,
        keep_alive,
        expect_continue: version == Version::HTTP_11 && facts.expect_continue,
        upgrade: version == Version::HTTP_11 && facts.upgrade,
    }))
}

/// What a request head's framing fields say.
#[derive(Default)]
struct HeadFacts {
    transfer_encoding: bool,
    /// The last transfer coding named so far, and how often `chunked` was named.
    last_coding_chunked: bool,
    chunked_codings: u32,
    content_length: Option<Result<u64, ()>>,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
}

impl HeadFacts {
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if *name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
            for coding in value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .filter(|c| !c.is_empty())
            {
                self.last_coding_chunked = coding.eq_ignore_ascii_case(b"chunked");
                self.chunked_codings += u32::from(self.last_coding_chunked);
            }
        } else if *name == CONTENT_LENGTH {
            self.content_length = Some(merge_content_length(self.content_length, value));
        } else if *name == CONNECTION {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if *name == EXPECT {
            self.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        } else if *name == UPGRADE {
            self.upgrade = true;
        }
    }

    /// How the request body is delimited (RFC 9112 §6.3). Anything ambiguous is refused:
    /// a message two parsers could split differently is how requests get smuggled.
    fn request_framing(&self, version: Version) -> Result<Framing, ServeError> {
        let bad = ServeError::BadRequest;
        if self.transfer_encoding {
            if version == Version::HTTP_10 {
                return Err(bad("transfer-encoding in an HTTP/1.0 request"));
            }
            if self.content_length.is_some() {
                return Err(bad("both transfer-encoding and content-length"));
            }
            if !self.last_coding_chunked {
                return Err(bad("transfer-encoding does not end in chunked"));
            }
            if self.chunked_codings > 1 {
                return Err(bad("chunked applied more than once"));
            }
            return Ok(Framing::Chunked(Chunked::Size {
                value: 0,
                digits: 0,
            }));
        }
        match self.content_length {
            None => Ok(Framing::Length(0)),
            Some(Ok(n)) => Ok(Framing::Length(n)),
            Some(Err(())) => Err(bad("bad content-length")),
        }
    }
}

/// Adds one `Content-Length` field to what earlier ones said: every value must be the same
/// number (a repeated equal value is allowed, RFC 9110 §8.6).
fn merge_content_length(so_far: Option<Result<u64, ()>>, value: &[u8]) -> Result<u64, ()> {
    let mut found = match so_far {
        Some(Err(())) => return Err(()),
        Some(Ok(n)) => Some(n),
        None => None,
    };
    for part in value.split(|&b| b == b',') {
        let n = parse_decimal(part.trim_ascii()).ok_or(())?;
        if found.is_some_and(|f| f != n) {
            return Err(());
        }
        found = Some(n);
    }
    found.ok_or(())
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn push_hex(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789ABCDEF"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes the response head and body. `Ok(false)`: the body was delimited by closing the
/// connection (an HTTP/1.0 client and a body of unknown length).
async fn write_response(
    writer: &mut OwnedWriteHalf,
    parts: response::Parts,
    mut body: Body,
    exchange: &Exchange,
    keep_alive: bool,
    switching: bool,
) -> Result<bool, ServeError> {
    let status = parts.status;
    let bodiless = exchange.method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || (exchange.method == Method::CONNECT && status.is_success());
    // One pass for the fields that frame the body, one to write: no lookups.
    let mut declared: Option<Result<u64, ()>> = None;
    for (name, value) in parts.headers.iter() {
        if name == CONTENT_LENGTH {
            declared = Some(merge_content_length(declared, value.as_bytes()));
        }
    }
    let mut keep = keep_alive && !switching;
    let framing = if bodiless {
        Out::Nothing
    } else if let Some(Ok(n)) = declared {
        Out::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        Out::Length(n)
    } else if exchange.version == Version::HTTP_11 {
        Out::Chunked
    } else {
        keep = false;
        Out::UntilClose
    };
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(if exchange.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // The framing fields are this hop's own: the service's transfer-encoding never goes
    // out, nor a content-length that is not one valid number.
    let own_length = !matches!(declared, Some(Ok(_)));
    for (name, value) in parts.headers.iter() {
        if name == TRANSFER_ENCODING || (name == CONTENT_LENGTH && own_length) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Out::Length(n) if own_length => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(&mut out, n);
            out.extend_from_slice(b"\r\n");
        }
        Out::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // A HEAD answer says how long the body would have been, when that is known.
        Out::Nothing if exchange.method == Method::HEAD && own_length => {
            if let Some(n) = body.size_hint().exact().filter(|&n| n > 0) {
                out.extend_from_slice(b"content-length: ");
                push_decimal(&mut out, n);
                out.extend_from_slice(b"\r\n");
            }
        }
        _ => {}
    }
    if !switching {
        match (exchange.version, keep) {
            (Version::HTTP_11, false) => out.extend_from_slice(b"connection: close\r\n"),
            (Version::HTTP_10, true) => out.extend_from_slice(b"connection: keep-alive\r\n"),
            _ => {}
        }
    }
    out.extend_from_slice(b"\r\n");
    if matches!(framing, Out::Nothing) {
        writer.write_all(&out).await?;
        return Ok(keep);
    }
    let mut sent: u64 = 0;
    loop {
        // Frames that are already there go out with the head in one write; a response
        // that streams gets its head (and what came so far) sent before the wait.
        let frame = if out.is_empty() {
            body.frame().await
        } else {
            match poll_once(&mut body).await {
                Some(frame) => frame,
                None => {
                    writer.write_all(&out).await?;
                    out.clear();
                    continue;
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(ServeError::ResponseBody(e)),
            // Trailers: an HTTP/1 client has no way to ask for them here (`te` is
            // hop-by-hop), so they end with the hop.
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue,
            },
        };
        sent += data.len() as u64;
        if let Out::Length(n) = framing {
            if sent > n {
                return Err(ServeError::ResponseLength);
            }
        }
        if matches!(framing, Out::Chunked) {
            push_hex(&mut out, data.len());
            out.extend_from_slice(b"\r\n");
        }
        if data.len() >= WRITE_BATCH {
            writer.write_all(&out).await?;
            out.clear();
            writer.write_all(&data).await?;
        } else {
            out.extend_from_slice(&data);
        }
        if matches!(framing, Out::Chunked) {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= WRITE_BATCH {
            writer.write_all(&out).await?;
            out.clear();
        }
    }
    if let Out::Length(n) = framing {
        if sent != n {
            return Err(ServeError::ResponseLength);
        }
    }
    if matches!(framing, Out::Chunked) {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        writer.write_all(&out).await?;
    }
    Ok(keep)
}

/// A body's next frame if it is ready now, without waiting.
async fn poll_once(body: &mut Body) -> Option<Option<Result<Frame<Bytes>, body::BoxError>>> {
    poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
        Poll::Ready(frame) => Poll::Ready(Some(frame)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

enum Out {
    Nothing,
    Length(u64),
    Chunked,
    UntilClose,
}

/// The proxy's own answer to a request it could not read; the connection closes after it.
async fn reply_error(writer: &mut OwnedWriteHalf, error: &ServeError) {
    let (status, reason) = match error {
        ServeError::BadRequest(why) => (StatusCode::BAD_REQUEST, *why),
        ServeError::HeadTooLarge(_) => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head too large",
        ),
        _ => return,
    };
    let mut out = Vec::with_capacity(160);
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nx-weft-error: {reason}\r\ncontent-type: text/plain\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{reason}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        reason.len()
    );
    let _ = writer.write_all(&out).await;
    let _ = writer.shutdown().await;
}

/// Reads and discards what is left of a request body the service did not read, within
/// [`MAX_DRAIN`] and [`DRAIN_TIME`]. `false`: the connection cannot be reused.
async fn drain(br: &mut BodyReader) -> bool {
    if br.failed {
        return false;
    }
    let mut total = 0u64;
    let drained = async {
        loop {
            match poll_fn(|cx| br.poll_data(cx)).await {
                Ok(Some(data)) => {
                    total += data.len() as u64;
                    if total > MAX_DRAIN {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(DRAIN_TIME, drained)
        .await
        .unwrap_or(false)
}

/// How a request body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunked),
}

/// Where a chunked body's decoder is (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    Size {
        value: u64,
        digits: u8,
    },
    Extension {
        value: u64,
        seen: u32,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart {
        seen: u32,
    },
    Trailer {
        seen: u32,
    },
    EndLf,
    Done,
}

enum Decoded {
    Data(Bytes),
    More,
    Done,
}

impl Framing {
    fn is_empty(&self) -> bool {
        matches!(self, Framing::Length(0))
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        match self {
            Framing::Length(0) => Ok(Decoded::Done),
            Framing::Length(rest) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = (*rest).min(buf.len() as u64);
                *rest -= n;
                Ok(Decoded::Data(buf.split_to(n as usize).freeze()))
            }
            Framing::Chunked(state) => decode_chunked(state, buf),
        }
    }
}

fn decode_chunked(state: &mut Chunked, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
    use Chunked::*;
    let bad = BodyError::Chunked;
    loop {
        match *state {
            Done => return Ok(Decoded::Done),
            Data(rest) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = rest.min(buf.len() as u64);
                *state = if n == rest { DataCr } else { Data(rest - n) };
                return Ok(Decoded::Data(buf.split_to(n as usize).freeze()));
            }
            _ => {}
        }
        let Some(&b) = buf.first() else {
            return Ok(Decoded::More);
        };
        buf.advance(1);
        *state = match (*state, b) {
            (Size { value, digits }, b) if b.is_ascii_hexdigit() => {
                if digits == 16 {
                    return Err(bad("chunk size too large"));
                }
                let d = (b as char).to_digit(16).unwrap_or(0);
                Size {
                    value: (value << 4) | u64::from(d),
                    digits: digits + 1,
                }
            }
            (Size { digits: 0, .. }, _) => return Err(bad("chunk size missing")),
            (Size { value, .. }, b';' | b' ' | b'\t') => Extension { value, seen: 0 },
            (Size { value, .. } | Extension { value, .. }, b'\r') => SizeLf { value },
            (Extension { value, seen }, b) if b != b'\n' && seen < MAX_CHUNK_META => Extension {
                value,
                seen: seen + 1,
            },
            (SizeLf { value: 0 }, b'\n') => TrailerStart { seen: 0 },
            (SizeLf { value }, b'\n') => Data(value),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size {
                value: 0,
                digits: 0,
            },
            (TrailerStart { .. }, b'\r') => EndLf,
            (TrailerStart { seen } | Trailer { seen }, b'\n') if seen < MAX_CHUNK_META => {
                TrailerStart { seen: seen + 1 }
            }
            (TrailerStart { seen } | Trailer { seen }, _) if seen < MAX_CHUNK_META => {
                Trailer { seen: seen + 1 }
            }
            (EndLf, b'\n') => Done,
            _ => return Err(bad("unexpected byte in chunk framing")),
        };
    }
}

/// The read half while a request body is being read.
struct BodyReader {
    reader: Reader,
    framing: Framing,
    failed: bool,
}

impl BodyReader {
    fn is_done(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunked::Done)
        )
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BodyError>> {
        loop {
            match self.framing.decode(&mut self.reader.buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Ok(Some(data))),
                Ok(Decoded::Done) => return Poll::Ready(Ok(None)),
                Ok(Decoded::More) => {}
                Err(e) => {
                    self.failed = true;
                    return Poll::Ready(Err(e));
                }
            }
            let want = match self.framing {
                Framing::Length(rest) => rest.min(BODY_READ as u64) as usize,
                Framing::Chunked(_) => BODY_READ,
            };
            self.reader.buf.reserve(want);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.reader.io),
                cx,
                &mut self.reader.buf
            ));
            match read {
                Ok(0) => {
                    self.failed = true;
                    return Poll::Ready(Err(BodyError::Eof));
                }
                Ok(_) => {}
                Err(e) => {
                    self.failed = true;
                    return Poll::Ready(Err(e.into()));
                }
            }
        }
    }
}

/// A request body read straight from the connection; hands the read half back to the
/// connection when it ends or is dropped.
struct RequestBody {
    state: Option<BodyReader>,
    back: Option<oneshot::Sender<BodyReader>>,
}

impl RequestBody {
    fn give_back(&mut self) {
        if let (Some(state), Some(back)) = (self.state.take(), self.back.take()) {
            let _ = back.send(state);
        }
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(state) = self.state.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = ready!(state.poll_data(cx));
        let done = state.is_done() || state.failed;
        if done {
            self.give_back();
        }
        Poll::Ready(match polled {
            Ok(Some(data)) => Some(Ok(Frame::data(data))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.state.as_ref().is_none_or(BodyReader::is_done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state.as_ref().map(|s| s.framing) {
            None => SizeHint::with_exact(0),
            Some(Framing::Length(n)) => SizeHint::with_exact(n),
            Some(Framing::Chunked(_)) => SizeHint::default(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    const LIMITS: Limits = Limits {
        max_head_bytes: 1024,
        head_timeout: Duration::from_secs(5),
    };

    /// Echoes the request back: method, target, the headers the tests look at, and the
    /// body (collected), so framing on both sides is visible in one response.
    async fn echo(req: Request<Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return body::error_response(
                    StatusCode::BAD_REQUEST,
                    if e.to_string().contains("malformed") {
                        "malformed"
                    } else {
                        "unreadable"
                    },
                )
            }
        };
        let text = format!(
            "{} {} {:?} body={}",
            parts.method,
            parts.uri,
            parts.version,
            String::from_utf8_lossy(&body)
        );
        Response::new(body::full(Bytes::from(text)))
    }

    /// The client end of a connection, with the bytes read past the last response.
    struct Client {
        tcp: TcpStream,
        buf: Vec<u8>,
    }

    impl Client {
        async fn send(&mut self, bytes: &[u8]) {
            self.tcp.write_all(bytes).await.unwrap();
        }

        async fn read_more(&mut self) {
            let mut chunk = [0u8; 1024];
            let n = self.tcp.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed early: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }

        /// Exactly `n` bytes.
        async fn bytes(&mut self, n: usize) -> Vec<u8> {
            while self.buf.len() < n {
                self.read_more().await;
            }
            self.buf.drain(..n).collect()
        }

        /// Everything until the server closes.
        async fn rest_until_close(&mut self) -> String {
            let mut rest = Vec::new();
            self.tcp.read_to_end(&mut rest).await.unwrap();
            self.buf.extend_from_slice(&rest);
            String::from_utf8(std::mem::take(&mut self.buf)).unwrap()
        }

        /// The head of a response that has no body (to HEAD).
        async fn head_only(&mut self) -> String {
            let head_end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                self.read_more().await;
            };
            String::from_utf8(self.bytes(head_end).await).unwrap()
        }

        /// One response: head, then a body by content-length or chunked framing (the
        /// chunked body is returned with its framing).
        async fn response(&mut self) -> (String, String) {
            let head = self.head_only().await;
            let lower = head.to_ascii_lowercase();
            let len = if let Some(cl) = lower.split("content-length: ").nth(1) {
                cl.split("\r\n").next().unwrap().parse().unwrap()
            } else if lower.contains("transfer-encoding: chunked") {
                loop {
                    if let Some(i) = self.buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                        break i + 5;
                    }
                    self.read_more().await;
                }
            } else {
                0
            };
            let body = String::from_utf8(self.bytes(len).await).unwrap();
            (head, body)
        }
    }

    /// A connected client and the server task serving the other end with `service`.
    async fn connect<S, F>(service: S) -> (Client, tokio::task::JoinHandle<Result<(), ServeError>>)
    where
        S: FnMut(Request<Body>) -> F + Send + 'static,
        F: Future<Output = Response<Body>> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            serve(tcp, Vec::new(), LIMITS, service).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        (
            Client {
                tcp,
                buf: Vec::new(),
            },
            server,
        )
    }

    #[tokio::test]
    async fn keep_alive_pipelining_and_bodies_by_length_and_chunks() {
        let (mut client, server) = connect(echo).await;
        // Two requests in one write (pipelined), then a chunked one with extensions and
        // a trailer.
        client.send(
                b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhelloGET /b?q=1 HTTP/1.1\r\nhost: x\r\n\r\n",
            ).await;
        let (head, body) = client.response().await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, "POST /a HTTP/1.1 body=hello");
        let (_, body) = client.response().await;
        assert_eq!(body, "GET /b?q=1 HTTP/1.1 body=");
        client.send(b"PUT /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n")
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        client
            .send(b"A\r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n")
            .await;
        let (_, body) = client.response().await;
        assert_eq!(body, "PUT /c HTTP/1.1 body=abc0123456789");
        drop(client);
        assert!(server.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn ambiguous_or_malformed_requests_are_refused_and_closed() {
        for (request, status) in [
            (
                &b"POST / HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"[..],
                "400",
            ),
            (
                b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
                "400",
            ),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", "400"),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked, chunked\r\n\r\n",
                "400",
            ),
            (
                b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n",
                "400",
            ),
            (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", "400"),
        ] {
            let (mut client, server) = connect(echo).await;
            client.send(request).await;
            let (head, _) = client.response().await;
            assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
            assert!(head.contains("connection: close"), "{head}");
            assert!(server.await.unwrap().is_err());
        }
        // A head over the limit: 431.
        let (mut client, server) = connect(echo).await;
        let long = format!("GET / HTTP/1.1\r\nx-long: {}\r\n\r\n", "a".repeat(2000));
        client.send(long.as_bytes()).await;
        let (head, _) = client.response().await;
        assert!(head.starts_with("HTTP/1.1 431"), "{head}");
        assert!(matches!(
            server.await.unwrap(),
            Err(ServeError::HeadTooLarge(1024))
        ));
        // A malformed chunk reaches the service as a body error.
        let (mut client, _server) = connect(echo).await;
        client
            .send(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
            .await;
        let (head, body) = client.response().await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        assert_eq!(body, "malformed");
    }

    #[tokio::test]
    async fn responses_are_framed_for_the_client() {
        // A streamed body of unknown length: chunked for HTTP/1.1, close-delimited for 1.0.
        let stream = |_req: Request<Body>| async {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, body::BoxError>>(4);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"ab")))).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"cd")))).await;
            });
            let rx =
                http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            Response::new(body::boxed(rx))
        };
        let (mut client, _server) = connect(stream).await;
        client.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let (head, body) = client.response().await;
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert_eq!(body, "2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n");
        let (mut client, server) = connect(stream).await;
        client.send(b"GET / HTTP/1.0\r\n\r\n").await;
        let all = client.rest_until_close().await;
        assert!(all.starts_with("HTTP/1.0 200 OK\r\n"), "{all}");
        assert!(all.ends_with("\r\n\r\nabcd"), "{all}");
        assert!(server.await.unwrap().is_ok());
        // HEAD: the head only (content-length kept), and the connection stays usable.
        let (mut client, _server) = connect(echo).await;
        client
            .send(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\nGET /next HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let head = client.head_only().await;
        let (next, _) = client.response().await;
        assert_eq!(head, "HTTP/1.1 200 OK\r\ncontent-length: 21\r\n\r\n");
        assert!(next.starts_with("HTTP/1.1 200"), "{next}");
        // HTTP/1.0 keep-alive is honoured; Connection: close ends the connection.
        let (mut client, server) = connect(echo).await;
        client
            .send(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            .await;
        let (head, _) = client.response().await;
        assert!(head.contains("connection: keep-alive"), "{head}");
        client
            .send(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
            .await;
        let (head, _) = client.response().await;
        assert!(head.contains("connection: close"), "{head}");
        assert!(server.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn expect_continue_is_answered_before_the_body() {
        // 100 Continue comes before the service answers.
        let (mut client, _server) = connect(echo).await;
        client
            .send(b"POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n")
            .await;
        assert_eq!(client.bytes(25).await, b"HTTP/1.1 100 Continue\r\n\r\n");
        client.send(b"ok").await;
        let (_, body) = client.response().await;
        assert_eq!(body, "POST / HTTP/1.1 body=ok");
    }

    #[tokio::test]
    async fn an_unread_body_is_drained_and_the_connection_reused() {
        // A service that never reads the body: the body is drained and the next request
        // on the connection is still found.
        let ignore =
            |_req: Request<Body>| async { body::error_response(StatusCode::NOT_FOUND, "no route") };
        let (mut client, _server) = connect(ignore).await;
        client
            .send(b"POST / HTTP/1.1\r\ncontent-length: 10\r\n\r\n0123456789GET / HTTP/1.1\r\n\r\n")
            .await;
        let (head, _) = client.response().await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        let (head, _) = client.response().await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    }

    #[tokio::test]
    async fn an_upgrade_hands_over_the_connection() {
        // Upgrade: after 101 the service gets the raw connection, bytes already sent
        // included.
        let upgrade = |mut req: Request<Body>| async move {
            let on = req.extensions_mut().remove::<OnUpgrade>().unwrap();
            tokio::spawn(async move {
                let mut io = on.connection().await.unwrap();
                let mut got = [0u8; 4];
                io.read_exact(&mut got).await.unwrap();
                io.write_all(&got).await.unwrap();
            });
            let mut rsp = Response::new(body::empty());
            *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            rsp.headers_mut()
                .insert(UPGRADE, HeaderValue::from_static("echo"));
            rsp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            rsp
        };
        let (mut client, _server) = connect(upgrade).await;
        client
            .send(b"GET / HTTP/1.1\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\nping")
            .await;
        let (head, _) = client.response().await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains("upgrade: echo"), "{head}");
        assert_eq!(client.bytes(4).await, b"ping");
    }

    #[tokio::test]
    async fn a_connection_between_requests_holds_no_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let (io, writer) = tcp.into_split();
        let mut conn = Conn {
            reader: Some(Reader {
                io,
                buf: BytesMut::new(),
            }),
            writer: Some(writer),
            limits: LIMITS,
        };
        let mut service = echo;
        for body in ["", "0123456789"] {
            let request = format!(
                "POST / HTTP/1.1\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            client.write_all(request.as_bytes()).await.unwrap();
            assert!(conn.wait_for_request().await.unwrap());
            assert!(matches!(
                conn.exchange(&mut service).await,
                Ok(Next::Continue)
            ));
            let reader = conn.reader.as_ref().unwrap();
            assert_eq!(
                reader.buf.capacity(),
                0,
                "after a request with body {body:?}"
            );
        }
        // (A half-close: unread responses would turn a full close into a reset.)
        client.shutdown().await.unwrap();
        assert!(!conn.wait_for_request().await.unwrap());
    }

    #[test]
    fn chunked_decoder_takes_bytes_in_any_split() {
        let wire =
            b"4\r\nWiki\r\n5;a=b\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx: y\r\n\r\nNEXT";
        for split in 1..wire.len() {
            let mut state = Chunked::Size {
                value: 0,
                digits: 0,
            };
            let mut buf = BytesMut::new();
            let mut body = Vec::new();
            let mut fed = 0;
            loop {
                match decode_chunked(&mut state, &mut buf).unwrap() {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::Done => break,
                    Decoded::More => {
                        let end = (fed + split).min(wire.len());
                        buf.extend_from_slice(&wire[fed..end]);
                        fed = end;
                    }
                }
            }
            assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.", "split {split}");
            // What follows the body stays for the next request.
            let rest: Vec<u8> = buf
                .iter()
                .copied()
                .chain(wire[fed..].iter().copied())
                .collect();
            assert_eq!(rest, b"NEXT", "split {split}");
        }
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b"11111111111111111\r\n",
            b"1\r\naXY",
        ] {
            let mut state = Chunked::Size {
                value: 0,
                digits: 0,
            };
            let mut buf = BytesMut::from(bad);
            let mut result = Ok(Decoded::More);
            for _ in 0..bad.len() + 1 {
                result = decode_chunked(&mut state, &mut buf);
                if !matches!(result, Ok(Decoded::Data(_))) {
                    break;
                }
            }
            assert!(result.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
