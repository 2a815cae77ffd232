//! A process sandbox's log file. The sandbox writes its output into a pipe read by a log
//! writer (`sandgate log-writer`, a process of its own, so it outlives a crashed gateway as
//! the sandbox does) that starts each line with the time it arrived (RFC 3339, milliseconds,
//! UTC) and appends it to the file. The gateway appends lifecycle markers (`[sandgate]
//! starting`, `[sandgate] exited with code N`) the same way.
//!
//! Read as a stream: all of it or its last lines, then, when following, what is appended to
//! it (polled), until the reader leaves; without `timestamps` the times are taken off each
//! line (lines written without one, by older versions, pass unchanged).

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

/// `2026-12-01T22:43:53.002Z ` at the start of every line of the file.
const STAMP_LEN: usize = 25;

/// The time at the start of a line.
fn stamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Whether `b` (at least [`STAMP_LEN`] bytes) starts with a line's time.
fn is_stamp(b: &[u8]) -> bool {
    const SHAPE: &[u8; STAMP_LEN] = b"0000-00-00T00:00:00.000Z ";
    b.len() >= STAMP_LEN
        && SHAPE.iter().zip(b).all(|(s, c)| {
            if *s == b'0' {
                c.is_ascii_digit()
            } else {
                s == c
            }
        })
}

/// Takes the time off the start of each line of a stream of chunks (which may split lines,
/// and times, anywhere).
#[derive(Default)]
pub struct Unstamp {
    /// Bytes at the start of a line, held until they show whether it starts with a time.
    held: Vec<u8>,
    /// Within a line, past its start.
    mid_line: bool,
}

impl Unstamp {
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len());
        for &b in chunk {
            if self.mid_line {
                out.push(b);
                self.mid_line = b != b'\n';
                continue;
            }
            self.held.push(b);
            if b == b'\n' || self.held.len() == STAMP_LEN {
                if !is_stamp(&self.held) {
                    out.extend_from_slice(&self.held);
                }
                self.mid_line = b != b'\n';
                self.held.clear();
            }
        }
        out
    }

    /// What is still held when the stream ends.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }
}

/// `sandgate log-writer <file>`: copies standard input to the end of `file`, each line
/// starting with the time it arrived, until standard input ends. A line's bytes are written
/// as they come (a progress bar without a newline shows at once), its time once.
pub fn run_writer(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::{Read, Write};
    // The gateway created it; a sandbox deleted before this started must stay deleted.
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    let mut input = std::io::stdin().lock();
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK + 256);
    let mut line_start = true;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let now = stamp();
        out.clear();
        for line in buf[..n].split_inclusive(|b| *b == b'\n') {
            if line_start {
                out.extend_from_slice(now.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(line);
            line_start = line.ends_with(b"\n");
        }
        file.write_all(&out)?;
    }
}

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
    let raw = raw_stream(path, opts.tail, opts.follow).await?;
    if opts.timestamps {
        return Ok(raw);
    }
    let mut unstamp = Unstamp::default();
    Ok(raw
        .map(Some)
        .chain(futures_util::stream::once(async { None }))
        .map(move |chunk| match chunk {
            Some(chunk) => chunk.map(|c| Bytes::from(unstamp.feed(&c))),
            // The end: a last line too short to tell is passed as it is.
            None => Ok(Bytes::from(unstamp.finish())),
        })
        .filter(|c| std::future::ready(!matches!(c, Ok(b) if b.is_empty())))
        .boxed())
}

/// The file as written (each line with its time).
async fn raw_stream(
    path: PathBuf,
    tail: Option<usize>,
    following: bool,
) -> Result<LogStream, BackendError> {
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !following => {
            return Ok(futures_util::stream::empty().boxed())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Not written yet: follow from its first byte once it exists.
            return Ok(follow(path, None, 0).boxed());
        }
        Err(e) => return Err(e.into()),
    };
    let len = file.metadata().await?.len();
    let head = match tail {
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
    if !following {
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
    let mut unstamp = Unstamp::default();
    let mut text = unstamp.feed(last_lines(&buf, n));
    text.extend(unstamp.finish());
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| !l.starts_with("[sandgate]"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Appends a lifecycle marker line to a sandbox's log, creating it (at a start).
pub fn mark_first(path: &std::path::Path, what: &str) {
    append_mark(path, what, true);
}

/// Appends a lifecycle marker line to a sandbox's log, if it still exists (a deleted
/// sandbox's directory is never brought back).
pub fn mark(path: &std::path::Path, what: &str) {
    append_mark(path, what, false);
}

fn append_mark(path: &std::path::Path, what: &str, create: bool) {
    use std::io::Write;
    let line = format!("{} [sandgate] {what}\n", stamp());
    let file = std::fs::OpenOptions::new()
        .create(create)
        .append(true)
        .open(path);
    if let Ok(mut f) = file {
        let _ = f.write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_come_off_each_line_however_the_chunks_fall() {
        let text = b"2026-12-01T22:43:53.002Z one\n2026-12-01T22:43:53.010Z two\nold line\n\
                     2026-12-01T22:43:54.000Z [sandgate] exited with code 0\nshort\n\n";
        let want = b"one\ntwo\nold line\n[sandgate] exited with code 0\nshort\n\n";
        for size in [1, 2, 7, 24, 25, 26, 300] {
            let mut u = Unstamp::default();
            let mut got: Vec<u8> = text.chunks(size).flat_map(|c| u.feed(c)).collect();
            got.extend(u.finish());
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(want),
                "{size}"
            );
        }
        assert!(is_stamp(format!("{} ", stamp()).as_bytes()));
    }

    #[test]
    fn the_last_lines() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
    }
}
