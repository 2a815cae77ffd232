//! A client connection that joins the event loop only once it has to wait. Most connections'
//! first request is already in the socket when it is accepted, and a `Connection: close`
//! exchange often ends without the client ever having to be waited for: such a connection
//! costs no event-loop registration (`epoll_ctl` add and delete, a readiness slot) and no
//! extra wake-up before its first read. Why, and what it measured: `docs/fastlane.md`.

use std::cell::RefCell;
use std::io::{self, IoSlice, Read as _, Write as _};
use std::net::{Shutdown, TcpStream as StdStream};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::watch::{Wait, Watch};

/// A non-blocking client socket, used directly until a read or write would block, then
/// registered with the event loop for good. Only the first read goes straight to the socket,
/// taking at most `FIRST_READ` bytes; every later read is tokio's.
pub struct Client {
    state: State,
    first_read: bool,
    /// The event loop's ticker for waits with the client unwatched (`watch.rs`).
    watch: Arc<Watch>,
}

/// Enough for nearly every request head; a larger one is read on by the event loop.
const FIRST_READ: usize = 4096;

thread_local! {
    /// Where a first read lands before it is copied to the caller's buffer. The crate has no
    /// `unsafe` to read into uninitialised memory as tokio does, and zeroing the caller's
    /// fresh buffer each time would cost more than copying the few bytes read.
    static FIRST: RefCell<[u8; FIRST_READ]> = const { RefCell::new([0; FIRST_READ]) };
}

enum State {
    /// Not registered: reads and writes go straight to the socket.
    Direct(StdStream),
    Polled(TcpStream),
    /// Registration failed; the error was reported and the socket is closed.
    Lost,
}

impl Client {
    /// Wraps an accepted socket, which must be non-blocking; `watch` is the accepting event
    /// loop's ticker.
    pub fn new(stream: StdStream, watch: Arc<Watch>) -> Client {
        Client {
            state: State::Direct(stream),
            first_read: true,
            watch,
        }
    }

    /// Whether `wait`, begun with this client unwatched, has lasted long enough that the
    /// client should be registered; if not, the task is woken again at the loop's next tick.
    pub fn waited_long(&self, wait: &mut Wait, cx: &Context<'_>) -> bool {
        self.watch.lasted(wait, cx)
    }

    /// Whether the event loop watches this connection (a waiting task hears of its close).
    pub fn is_polled(&self) -> bool {
        matches!(self.state, State::Polled(_))
    }

    /// Registers the socket with the event loop (which reports its current readiness). An
    /// error leaves the connection lost: every later use fails too.
    pub fn register(&mut self) -> io::Result<()> {
        match self.state {
            State::Polled(_) => return Ok(()),
            State::Lost => return Err(io::ErrorKind::NotConnected.into()),
            State::Direct(_) => {}
        }
        if let State::Direct(s) = std::mem::replace(&mut self.state, State::Lost) {
            self.state = State::Polled(TcpStream::from_std(s)?);
        }
        Ok(())
    }

    /// One attempt on the unregistered socket: `None` if it would block (and the socket is
    /// then registered, so the caller polls it), the result otherwise.
    fn direct<T>(
        &mut self,
        mut op: impl FnMut(&StdStream) -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        let State::Direct(s) = &self.state else {
            return None;
        };
        loop {
            match op(s) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                done => return Some(done),
            }
        }
        self.register().err().map(Err)
    }

    fn polled(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match &mut self.state {
            State::Polled(t) => Ok(Pin::new(t)),
            _ => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// A write: straight to the socket while it is unregistered and takes it, else tokio's.
    fn poll_write_with(
        &mut self,
        direct: impl FnMut(&StdStream) -> io::Result<usize>,
        polled: impl FnOnce(Pin<&mut TcpStream>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if let Some(done) = self.direct(direct) {
            return Poll::Ready(done);
        }
        match self.polled() {
            Ok(t) => polled(t),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for Client {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if std::mem::take(&mut this.first_read) {
            let room = buf.remaining().min(FIRST_READ);
            let first = FIRST.with_borrow_mut(|scratch| {
                let done = this.direct(|mut s| s.read(&mut scratch[..room]))?;
                Some(done.map(|n| buf.put_slice(&scratch[..n])))
            });
            if let Some(done) = first {
                return Poll::Ready(done);
            }
        } else if let Err(e) = this.register() {
            return Poll::Ready(Err(e));
        }
        match this.polled() {
            Ok(t) => t.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(|mut s| s.write(buf), |t| t.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(
            |mut s| s.write_vectored(bufs),
            |t| t.poll_write_vectored(cx, bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Direct(s) => Poll::Ready(s.shutdown(Shutdown::Write)),
            State::Polled(t) => Pin::new(t).poll_shutdown(cx),
            State::Lost => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (Client, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        (Client::new(accepted, Arc::new(Watch::default())), peer)
    }

    /// The first read takes what is there without registering (on loopback the bytes are
    /// queued before `write` returns; were they late, it would register and wait, and yield
    /// them all the same); a later read registers the socket and is woken by the event loop.
    #[tokio::test]
    async fn only_the_first_read_is_direct() {
        let (mut client, mut peer) = pair().await;
        peer.write_all(b"first").await.unwrap();
        let mut buf = [0u8; 16];
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"first");
        let mut rb = ReadBuf::new(&mut buf);
        let next =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut client).poll_read(cx, &mut rb)))
                .await;
        assert!(next.is_pending(), "nothing to read yet");
        assert!(client.is_polled(), "a later read registers");
        peer.write_all(b"second").await.unwrap();
        let n = client.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"second");
    }

    #[tokio::test]
    async fn writes_and_shutdown_work_unregistered() {
        let (mut client, mut peer) = pair().await;
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        assert!(!client.is_polled(), "nothing had to wait");
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
    }

    /// A registered client reports its peer's close to a waiting reader.
    #[tokio::test]
    async fn a_registered_client_hears_the_close() {
        let (mut client, peer) = pair().await;
        client.register().unwrap();
        assert!(client.is_polled());
        drop(peer);
        let mut buf = [0u8; 4];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
    }
}
