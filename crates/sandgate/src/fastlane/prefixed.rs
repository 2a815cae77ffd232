//! A connection handed from the fast lane to hyper: the bytes the fast lane already read are
//! read again first, then the socket itself. Dropped after its write side was shut down (hyper
//! closing the connection) but before the client's end of stream was read, it lingers
//! (`super::linger`) in a task of its own, so an early answer reaches a client still sending
//! its body. It does not linger in `poll_shutdown`: after an upgrade the proxy shuts down the
//! client's side while it still reads from it (a half-close), and those bytes are not to drop.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Prefixed<T: AsyncRead + Unpin + Send + 'static> {
    prefix: Bytes,
    /// Always `Some` until dropped (`Drop` moves it into the lingering task).
    inner: Option<T>,
    /// The write side was shut down.
    shut: bool,
    /// A read reached the end of the stream (or failed): nothing is left to linger for.
    read_end: bool,
}

impl<T: AsyncRead + Unpin + Send + 'static> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Prefixed<T> {
        Prefixed {
            prefix,
            inner: Some(inner),
            shut: false,
            read_end: false,
        }
    }

    fn io(&mut self) -> Pin<&mut T> {
        Pin::new(
            self.inner
                .as_mut()
                .expect("only Drop takes the inner stream"),
        )
    }
}

impl<T: AsyncRead + Unpin + Send + 'static> Drop for Prefixed<T> {
    fn drop(&mut self) {
        if !self.shut || self.read_end {
            return;
        }
        let (Some(mut io), Ok(rt)) = (self.inner.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        rt.spawn(async move { super::linger::drain(&mut io).await });
    }
}

impl<T: AsyncRead + Unpin + Send + 'static> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let read = self.io().poll_read(cx, buf);
        match &read {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                self.read_end = true;
            }
            Poll::Ready(Err(_)) => self.read_end = true,
            _ => {}
        }
        read
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    /// Hyper calls this when it closes the connection (HTTP/1 after the last response, HTTP/2
    /// when the connection ends), the proxy when an upgraded connection's sandbox side ends.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let done = std::task::ready!(self.io().poll_shutdown(cx));
        self.shut = true;
        Poll::Ready(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn prefix_is_read_before_the_stream() {
        let mut p = Prefixed::new(Bytes::from_static(b"GET "), &b"/ HTTP/1.1"[..]);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "GET / HTTP/1.1");
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    /// Shut down and dropped while the client still sends, the connection lingers: the client
    /// can write all it meant to (no reset), then reads the answer and the end of stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shut_connection_dropped_early_lingers() {
        let (mut client, server) = pair().await;
        let body = vec![b'x'; 6 << 20];
        let writer = tokio::spawn(async move {
            client.write_all(&body).await?;
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await?;
            Ok::<_, io::Error>(answer)
        });
        let mut p = Prefixed::new(Bytes::new(), server);
        let mut head = [0u8; 1024];
        p.read_exact(&mut head).await.unwrap();
        p.write_all(b"refused").await.unwrap();
        p.shutdown().await.unwrap();
        drop(p);
        let answer = writer.await.unwrap().expect("no reset while writing");
        assert_eq!(answer, b"refused");
    }

    /// After `shutdown` (an upgraded connection's half-close) every byte the client sends is
    /// still read by whoever reads the connection.
    #[tokio::test]
    async fn reads_after_shutdown_lose_nothing() {
        let (mut client, server) = pair().await;
        let mut p = Prefixed::new(Bytes::new(), server);
        p.shutdown().await.unwrap();
        let mut eof = [0u8; 1];
        assert_eq!(
            client.read(&mut eof).await.unwrap(),
            0,
            "the client sees the FIN"
        );
        client.write_all(b"still talking").await.unwrap();
        drop(client);
        let mut rest = String::new();
        p.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "still talking");
    }
}
