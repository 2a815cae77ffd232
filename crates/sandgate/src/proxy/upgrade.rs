//! Upgraded connections (WebSocket and other protocol switches): bytes are spliced both ways
//! until either side closes, with no timeout (an idle WebSocket is a healthy WebSocket), and
//! traffic in either direction counts as use of the sandbox for the idle reaper.
//!
//! When the gateway stops, a WebSocket is closed the way a server going away closes it: once
//! each direction is between frames (the splice follows frame headers, never payloads), the
//! client gets a close frame with status 1001 and the sandbox a masked one, as a client going
//! away would send; then both connections end. Other protocols are just ended.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::admission::OwnedAdmission;
use crate::routes::Entry;

/// Copy buffer per direction. Idle WebSockets are the common case (thousands held open), so
/// this is half tokio's default: per idle WebSocket the gateway's memory fell from 21.8 to
/// 10.0 KiB in the benchmark (docs/benchmarks.md), with no loss in echo round trips.
const SPLICE_BUF: usize = 4 * 1024;

/// How long a stopping gateway waits for a frame in progress to end before it ends the
/// connection without a close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Copies bytes both ways between an upgraded client and upstream connection; the stream's
/// admission (its sandbox's in-use mark) finishes when it ends. `websocket`: the protocol is
/// WebSocket, closed with 1001 once `stopping` fires.
pub async fn splice(
    client: OnUpgrade,
    upstream: OnUpgrade,
    entry: Arc<Entry>,
    admission: OwnedAdmission,
    websocket: bool,
    stopping: CancellationToken,
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
    let spliced = if websocket {
        splice_websocket(&mut client, &mut upstream, &stopping).await
    } else {
        tokio::select! {
            r = tokio::io::copy_bidirectional_with_sizes(
                &mut client, &mut upstream, SPLICE_BUF, SPLICE_BUF,
            ) => r.map(|_| ()),
            _ = stopping.cancelled() => Ok(()),
        }
    };
    if let Err(e) = spliced {
        tracing::debug!(sandbox = %entry.id, error = %e, "upgraded connection ended");
    }
    entry.touch();
    drop(admission);
}

/// A close frame with status 1001 (going away) from the server: unmasked.
const CLOSE_TO_CLIENT: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

/// The same close frame from a client, which must be masked (RFC 6455 §5.3).
fn close_to_server() -> [u8; 8] {
    let m: [u8; 4] = rand::random();
    [0x88, 0x82, m[0], m[1], m[2], m[3], 0x03 ^ m[0], 0xE9 ^ m[1]]
}

/// Splices a WebSocket both ways, following each direction's frame boundaries; when
/// `stopping` fires, waits (up to [`CLOSE_WAIT`]) until both are between frames, then sends
/// each side a 1001 close frame.
async fn splice_websocket<C, U>(
    client: &mut C,
    upstream: &mut U,
    stopping: &CancellationToken,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut from_client = [0u8; SPLICE_BUF];
    let mut from_upstream = [0u8; SPLICE_BUF];
    // Frames sent by the client (to the sandbox) and by the sandbox (to the client).
    let mut up_frames = Frames::default();
    let mut down_frames = Frames::default();
    let (mut client_open, mut upstream_open) = (true, true);
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if deadline.is_some() && up_frames.between() && down_frames.between() {
            // Going away: both sides hear it, between frames.
            if upstream_open {
                let _ = upstream.write_all(&close_to_server()).await;
            }
            if client_open {
                let _ = client.write_all(&CLOSE_TO_CLIENT).await;
            }
            let _ = tokio::join!(client.shutdown(), upstream.shutdown());
            return Ok(());
        }
        if !client_open && !upstream_open {
            return Ok(());
        }
        let until = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = client.read(&mut from_client), if client_open => {
                pass_on(n, &from_client, upstream, &mut up_frames, &mut client_open).await?;
            }
            n = upstream.read(&mut from_upstream), if upstream_open => {
                pass_on(n, &from_upstream, client, &mut down_frames, &mut upstream_open).await?;
            }
            _ = stopping.cancelled(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + CLOSE_WAIT);
            }
            _ = until => {
                // A frame never ended: end the connections without a close frame.
                return Ok(());
            }
        }
    }
}

/// Passes on what one side sent (`read` bytes of `buf`) to the other, following its frames;
/// when the side has closed (0 bytes), marks it closed and ends the other's writing half.
async fn pass_on<W: AsyncWrite + Unpin>(
    read: io::Result<usize>,
    buf: &[u8],
    to: &mut W,
    frames: &mut Frames,
    open: &mut bool,
) -> io::Result<()> {
    let n = read?;
    if n == 0 {
        *open = false;
        return to.shutdown().await;
    }
    frames.advance(&buf[..n]);
    to.write_all(&buf[..n]).await
}

/// Where one direction of a WebSocket is in its frames: reading a header (its bytes so far)
/// or a payload (bytes left).
#[derive(Default)]
struct Frames {
    header: [u8; 14],
    header_len: usize,
    payload_left: u64,
}

impl Frames {
    /// Between two frames (nothing of a header or payload pending).
    fn between(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }

    /// The header's full length, once its first two bytes are known.
    fn header_needed(&self) -> usize {
        let b1 = self.header[1];
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
    }

    /// Follows `data` through headers and payloads.
    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = (data.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                data = &data[n as usize..];
                continue;
            }
            // A header byte.
            self.header[self.header_len] = data[0];
            self.header_len += 1;
            data = &data[1..];
            if self.header_len >= 2 && self.header_len == self.header_needed() {
                let b1 = self.header[1];
                self.payload_left = match b1 & 0x7f {
                    126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                    127 => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or([0; 8])),
                    n => u64::from(n),
                };
                self.header_len = 0;
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_boundaries_are_followed_across_reads() {
        // Masked 5-byte text frame, 16-bit length frame (300 bytes), unmasked close frame.
        let mut bytes = vec![0x81, 0x85, 1, 2, 3, 4, b'h', b'e', b'l', b'l', b'o'];
        bytes.extend_from_slice(&[0x82, 126, 0x01, 0x2c]);
        bytes.extend(std::iter::repeat_n(7u8, 300));
        bytes.extend_from_slice(&CLOSE_TO_CLIENT);
        // Every split: between frames exactly at the frames' ends.
        let ends = [11, 11 + 4 + 300, bytes.len()];
        for cut in 1..bytes.len() {
            let mut f = Frames::default();
            f.advance(&bytes[..cut]);
            assert_eq!(f.between(), ends.contains(&cut), "cut at {cut}");
            f.advance(&bytes[cut..]);
            assert!(f.between());
        }
        // A 64-bit length.
        let mut f = Frames::default();
        f.advance(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert!(!f.between());
        f.advance(&vec![0u8; 65536]);
        assert!(f.between());
        // The close frame sent to a sandbox is masked and says 1001.
        let c = close_to_server();
        assert_eq!((c[0], c[1]), (0x88, 0x82));
        assert_eq!([c[6] ^ c[2], c[7] ^ c[3]], [0x03, 0xE9]);
    }
}
