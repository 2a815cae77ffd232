//! A process sandbox's log file as a stream: all of it or its last lines, then, when
//! following, what is appended to it (polled: the file is written by the sandbox directly, so
//! there is nothing to be told by), until the reader leaves. The gateway appends lifecycle
//! markers (`[sandgate] started`, `[sandgate] exited with code N`) as the sandbox starts and
//! ends.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::backend::{BackendError, LogOptions, LogStream};

/// How often a followed log is checked for new output.
const POLL: Duration = Duration::from_millis(200);
/// How far back from the end `tail` looks for its lines.
const TAIL_WINDOW: u64 = 4 << 20;
/// Largest piece read at once.
const CHUNK: usize = 64 * 1024;

/// The last `n` lines of `bytes` (all of them if it has fewer).
fn last_lines(bytes: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

pub async fn stream(path: PathBuf, opts: LogOptions) -> Result<LogStream, BackendError> {
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !opts.follow => {
            return Ok(futures_util::stream::empty().boxed())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Not written yet: follow from its first byte once it exists.
            return Ok(follow(path, None, 0).boxed());
        }
        Err(e) => return Err(e.into()),
    };
    let len = file.metadata().await?.len();
    let head = match opts.tail {
        Some(n) => {
            let from = len.saturating_sub(TAIL_WINDOW);
            file.seek(SeekFrom::Start(from)).await?;
            let mut buf = Vec::with_capacity((len - from) as usize);
            (&mut file).take(len - from).read_to_end(&mut buf).await?;
            Some(Bytes::copy_from_slice(last_lines(&buf, n)))
        }
        None => None,
    };
    let offset = if head.is_some() { len } else { 0 };
    if !opts.follow {
        return Ok(match head {
            Some(h) => futures_util::stream::once(async move { Ok(h) }).boxed(),
            None => {
                file.seek(SeekFrom::Start(0)).await?;
                tokio_util::io::ReaderStream::new(file).boxed()
            }
        });
    }
    let rest = follow(path, Some(file), offset);
    Ok(match head {
        Some(h) => futures_util::stream::once(async move { Ok(h) })
            .chain(rest)
            .boxed(),
        None => rest.boxed(),
    })
}

/// What the file holds from `offset` on, then what is appended, for ever (the reader ends it
/// by leaving).
fn follow(
    path: PathBuf,
    file: Option<tokio::fs::File>,
    offset: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold(
        (path, file, offset),
        |(path, mut file, mut offset)| async move {
            loop {
                if file.is_none() {
                    file = tokio::fs::File::open(&path).await.ok();
                }
                if let Some(f) = file.as_mut() {
                    let read = async {
                        f.seek(SeekFrom::Start(offset)).await?;
                        let mut buf = vec![0u8; CHUNK];
                        let n = f.read(&mut buf).await?;
                        buf.truncate(n);
                        Ok::<_, std::io::Error>(buf)
                    }
                    .await;
                    match read {
                        Ok(buf) if !buf.is_empty() => {
                            offset += buf.len() as u64;
                            return Some((Ok(Bytes::from(buf)), (path, file, offset)));
                        }
                        Ok(_) => {}
                        Err(e) => return Some((Err(e), (path, None, offset))),
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        },
    )
}

/// The last `n` lines of the log at `path` (at most 4 KiB of it), as one line of text for
/// an error message.
pub fn tail_text(path: &std::path::Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let _ = f.read_to_end(&mut buf);
    }
    let text = String::from_utf8_lossy(last_lines(&buf, n));
    text.lines()
        .filter(|l| !l.starts_with("[sandgate]"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Appends a lifecycle marker line to a sandbox's log.
pub fn mark(path: &std::path::Path, what: &str) {
    use std::io::Write;
    let line = format!(
        "[sandgate] {} {what}\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
    }
}
