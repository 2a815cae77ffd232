//! Lingering close (nginx's `lingering_close`): a connection the gateway ends while the client
//! may still be sending (an early 413 or 400, a body hyper left unread) first has its write
//! side shut down, then what still arrives is read and discarded, bounded by `LINGER_TIME` and
//! `LINGER_BYTES`, before the socket is closed. Closed at once, unread bytes make the kernel
//! answer with a reset, which fails a client that writes its whole body before reading
//! (Python's `http.client`: EPIPE or ECONNRESET) before it has read the answer.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest the gateway keeps reading after it has answered and shut down its side.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// The most it reads and discards in that time.
pub const LINGER_BYTES: usize = 8 * 1024 * 1024;
/// Bytes discarded per read.
const SCRATCH: usize = 16 * 1024;

/// Reads and discards until the client closes (or fails), `LINGER_BYTES` were read or
/// `LINGER_TIME` has passed. The write side must be shut down already.
pub async fn drain<R: AsyncRead + Unpin>(io: &mut R) {
    let mut scratch = vec![0u8; SCRATCH];
    let mut left = LINGER_BYTES;
    let reads = async {
        while left > 0 {
            match io.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, reads).await;
}

/// Ends a connection whose answer is written: shuts down the write side (flushing it), then
/// drains. The error is the shutdown's; the socket is the caller's to drop.
pub async fn close<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) -> io::Result<()> {
    io.shutdown().await?;
    drain(io).await;
    Ok(())
}
