//! Moves bytes both ways between an accepted connection and the one the proxy opened,
//! honouring half-close, and counts them for the connection's metrics.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::TcpConnMetrics;

/// Largest read per poll, into a buffer on the stack.
const BUF_SIZE: usize = 8 * 1024;

/// Proxies until both directions have finished (each side's EOF is passed on as a
/// write shutdown to the other) or either side fails. `accepted` is the connection the
/// proxy accepted; its bytes are what the metrics count.
///
/// Unlike `tokio::io::copy_bidirectional`, an idle connection holds no copy buffers: bytes
/// are read into a stack buffer and written on at once; only what the other side cannot
/// take yet is kept on the heap, until it has been written and the reader is idle again.
pub async fn forward<A, B>(
    accepted: A,
    opened: B,
    metrics: &TcpConnMetrics,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut accepted = Counted {
        io: accepted,
        read: &metrics.read_bytes,
        written: &metrics.write_bytes,
    };
    let mut opened = opened;
    let mut to_opened = Half::default();
    let mut to_accepted = Half::default();
    poll_fn(|cx| {
        let sent = to_opened.poll_copy(cx, &mut accepted, &mut opened)?;
        let received = to_accepted.poll_copy(cx, &mut opened, &mut accepted)?;
        match (sent, received) {
            (Poll::Ready(sent), Poll::Ready(received)) => Poll::Ready(Ok((sent, received))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction of [`forward`].
#[derive(Default)]
struct Half {
    /// Bytes read but not yet written (`pending[written..]`); `None` while there are none.
    pending: Option<Vec<u8>>,
    written: usize,
    /// Written since the last flush.
    unflushed: bool,
    read_eof: bool,
    done: bool,
    total: u64,
}

impl Half {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(self.total));
        }
        loop {
            if let Some(pending) = &self.pending {
                while self.written < pending.len() {
                    let n =
                        ready!(Pin::new(&mut *writer).poll_write(cx, &pending[self.written..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.written += n;
                    self.total += n as u64;
                    self.unflushed = true;
                }
                self.pending = None;
                self.written = 0;
            }
            if self.read_eof {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.total));
            }
            let mut stack = [0u8; BUF_SIZE];
            let mut buf = ReadBuf::new(&mut stack);
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    // Idle: make sure what was written reaches the peer (TLS may buffer).
                    if self.unflushed {
                        ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let read = buf.filled();
            if read.is_empty() {
                self.read_eof = true;
                continue;
            }
            match Pin::new(&mut *writer).poll_write(cx, read) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.total += n as u64;
                    self.unflushed = true;
                    if n < read.len() {
                        self.pending = Some(read[n..].to_vec());
                    }
                }
                Poll::Pending => self.pending = Some(read.to_vec()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Counts bytes as they pass, so long-lived connections show up in metrics before they close.
struct Counted<'a, T> {
    io: T,
    read: &'a Counter,
    written: &'a Counter,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.inc_by(n as u64);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = res {
            self.written.inc_by(n as u64);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A stream whose first bytes were already read (during protocol detection) and are
/// replayed before reading from the socket again.
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    io: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Vec<u8>, io: T) -> Self {
        Prefixed { prefix, pos: 0, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                // Give the detection buffer back: the connection may live for hours.
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Direction, Metrics, TcpLabels, TlsState};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn forwards_both_ways_with_half_close_and_counts() {
        let m = Metrics::new();
        let conn = m.tcp_connection(TcpLabels {
            direction: Direction::Outbound,
            peer_identity: String::new(),
            tls: TlsState::Plaintext,
        });
        let (mut client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, mut server) = tokio::io::duplex(1024);
        let fwd = tokio::spawn(async move {
            let r = forward(Prefixed::new(b"hel".to_vec(), proxy_a), proxy_b, &conn).await;
            (r, conn.read_bytes.get(), conn.write_bytes.get())
        });
        client.write_all(b"lo").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The server answers after the client's half-close, then closes.
        server.write_all(b"world").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world");
        let (res, read, written) = fwd.await.unwrap();
        assert_eq!(res.unwrap(), (5, 5));
        assert_eq!((read, written), (5, 5));
    }

    #[tokio::test]
    async fn large_transfers_through_slow_peers_arrive_whole() {
        let m = Metrics::new();
        let conn = m.tcp_connection(TcpLabels::plaintext(Direction::Inbound));
        // Pipes far smaller than one read: every write is partial or has to wait.
        let (mut client, proxy_a) = tokio::io::duplex(100);
        let (proxy_b, mut server) = tokio::io::duplex(100);
        let fwd = tokio::spawn(async move { forward(proxy_a, proxy_b, &conn).await });
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = up.iter().rev().copied().collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut client);
            let send = async {
                w.write_all(&up2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            got
        });
        let (mut r, mut w) = tokio::io::split(&mut server);
        let mut got = Vec::new();
        let send = async {
            w.write_all(&down2).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
        n.unwrap();
        assert_eq!(got, up);
        assert_eq!(client_side.await.unwrap(), down);
        assert_eq!(fwd.await.unwrap().unwrap(), (200_000, 200_000));
    }
}
