//! Upgraded connections (WebSocket and other protocol switches): bytes are spliced both ways
//! until either side closes, with no timeout (an idle WebSocket is a healthy WebSocket), and
//! traffic in either direction counts as use of the sandbox for the idle reaper.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::admission::OwnedAdmission;
use crate::routes::Entry;

/// Copy buffer per direction. Idle WebSockets are the common case (thousands held open), so
/// this is half tokio's default: per idle WebSocket the gateway's memory fell from 21.8 to
/// 10.0 KiB in the benchmark (docs/benchmarks.md), with no loss in echo round trips.
const SPLICE_BUF: usize = 4 * 1024;

/// Copies bytes both ways between an upgraded client and upstream connection; the stream's
/// admission (its sandbox's in-use mark) finishes when it ends.
pub async fn splice(
    client: OnUpgrade,
    upstream: OnUpgrade,
    entry: Arc<Entry>,
    admission: OwnedAdmission,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(sandbox = %entry.id, error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = Touching {
        io: TokioIo::new(client),
        entry: entry.clone(),
    };
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, SPLICE_BUF, SPLICE_BUF)
            .await
    {
        tracing::debug!(sandbox = %entry.id, error = %e, "upgraded connection ended");
    }
    entry.touch();
    drop(admission);
}

/// Marks the sandbox used whenever bytes move through the wrapped side.
struct Touching<T> {
    io: T,
    entry: Arc<Entry>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Touching<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.entry.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touching<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.entry.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
