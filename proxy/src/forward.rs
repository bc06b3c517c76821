//! Moves bytes both ways between an accepted connection and the one the proxy opened,
//! honouring half-close, and counts them for the connection's metrics.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::TcpConnMetrics;

/// Per-direction buffer: small, because most connections are idle most of the time.
const BUF_SIZE: usize = 8 * 1024;

/// Proxies until both directions have finished (each side's EOF is passed on as a
/// write shutdown to the other) or either side fails. `accepted` is the connection the
/// proxy accepted; its bytes are what the metrics count.
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
    tokio::io::copy_bidirectional_with_sizes(&mut accepted, &mut opened, BUF_SIZE, BUF_SIZE).await
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
}
