//! A command's output as a stream of events (`start`, `stdout`, `stderr`, `keepalive`,
//! `exit`), one JSON object per line (`application/x-ndjson`) or as server-sent events
//! (`text/event-stream`). Output is sent as read, never line-buffered: a chunk is `utf-8` text
//! when it is valid UTF-8 (an incomplete character at its end, at most 3 bytes, waits for the
//! next read), else `base64`.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::backend::exec::Chunk;

/// The two streaming formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Ndjson,
    Sse,
}

impl Format {
    /// The streaming format an `Accept` header asks for, if any (else the answer is one JSON
    /// document).
    pub fn from_accept(accept: &str) -> Option<Format> {
        accept.split(',').find_map(|item| {
            let media = item.split(';').next().unwrap_or("").trim();
            if media.eq_ignore_ascii_case("application/x-ndjson") {
                Some(Format::Ndjson)
            } else if media.eq_ignore_ascii_case("text/event-stream") {
                Some(Format::Sse)
            } else {
                None
            }
        })
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Sse => "text/event-stream",
        }
    }
}

/// Turns output and outcomes into framed events.
#[derive(Debug)]
pub struct Encoder {
    format: Format,
    seq: u64,
    /// Per stream (stdout, stderr): bytes held back (an incomplete character), and the offset
    /// of the next byte sent.
    pending: [Vec<u8>; 2],
    offsets: [u64; 2],
}

impl Encoder {
    pub fn new(format: Format) -> Encoder {
        Encoder {
            format,
            seq: 0,
            pending: [Vec::new(), Vec::new()],
            offsets: [0, 0],
        }
    }

    /// An event of `kind` carrying the fields of `fields` (an object).
    pub fn event(&mut self, kind: &str, fields: Value) -> Bytes {
        // `type` first, whatever order the map keeps its keys in (`kind` is a plain word).
        let rest = match &fields {
            Value::Object(map) if !map.is_empty() => fields.to_string(),
            _ => "{}".to_string(),
        };
        let line = if rest == "{}" {
            format!("{{\"type\":\"{kind}\"}}")
        } else {
            format!("{{\"type\":\"{kind}\",{}", &rest[1..])
        };
        self.seq += 1;
        match self.format {
            Format::Ndjson => Bytes::from(format!("{line}\n")),
            Format::Sse => {
                Bytes::from(format!("id: {}\nevent: {kind}\ndata: {line}\n\n", self.seq))
            }
        }
    }

    /// Bytes of each stream (stdout, stderr) taken in so far: sent, or held back.
    pub fn consumed(&self) -> [u64; 2] {
        [0, 1].map(|i| self.offsets[i] + self.pending[i].len() as u64)
    }

    /// Output of stream `0` (stdout) or `1` (stderr) resumes at `offset`: when bytes were
    /// dropped before it, a `truncated` event says how many (never a silent gap).
    pub fn skip_to(&mut self, stream: usize, offset: u64) -> Option<Bytes> {
        if offset <= self.consumed()[stream] {
            return None;
        }
        let omitted = offset - self.offsets[stream];
        self.pending[stream].clear();
        self.offsets[stream] = offset;
        let name = if stream == 0 { "stdout" } else { "stderr" };
        Some(self.event(
            "truncated",
            json!({"stream": name, "omitted_bytes": omitted, "offset": offset}),
        ))
    }

    /// Starts the streams at these offsets (a follower resuming where it was).
    pub fn resume(&mut self, stdout: u64, stderr: u64) {
        self.offsets = [stdout, stderr];
    }

    /// The event for a piece of output, if there is anything to send yet.
    pub fn chunk(&mut self, chunk: Chunk) -> Option<Bytes> {
        let (i, name, bytes) = match chunk {
            Chunk::Stdout(b) => (0, "stdout", b),
            Chunk::Stderr(b) => (1, "stderr", b),
        };
        let mut data = std::mem::take(&mut self.pending[i]);
        data.extend_from_slice(&bytes);
        let (send, encoding) = match std::str::from_utf8(&data) {
            Ok(_) => (data, "utf-8"),
            Err(e) if e.error_len().is_none() && data.len() - e.valid_up_to() <= 3 => {
                self.pending[i] = data.split_off(e.valid_up_to());
                (data, "utf-8")
            }
            Err(_) => (data, "base64"),
        };
        if send.is_empty() {
            return None;
        }
        Some(self.data(i, name, send, encoding))
    }

    /// Held-back bytes of both streams, at the end of the output (as base64: they are not
    /// UTF-8).
    pub fn flush(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        for (i, name) in [(0, "stdout"), (1, "stderr")] {
            let data = std::mem::take(&mut self.pending[i]);
            if !data.is_empty() {
                out.push(self.data(i, name, data, "base64"));
            }
        }
        out
    }

    fn data(&mut self, i: usize, name: &str, data: Vec<u8>, encoding: &str) -> Bytes {
        let offset = self.offsets[i];
        self.offsets[i] += data.len() as u64;
        let text = if encoding == "utf-8" {
            String::from_utf8(data).unwrap_or_default()
        } else {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(&data)
        };
        self.event(
            name,
            json!({"data": text, "encoding": encoding, "offset": offset}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn accept_picks_a_format() {
        assert_eq!(
            Format::from_accept("application/x-ndjson"),
            Some(Format::Ndjson)
        );
        assert_eq!(
            Format::from_accept("text/html, text/event-stream;q=0.9"),
            Some(Format::Sse)
        );
        assert_eq!(Format::from_accept("application/json"), None);
        assert_eq!(Format::from_accept("*/*"), None);
    }

    #[test]
    fn text_is_sent_as_read_and_a_split_character_waits() {
        let mut e = Encoder::new(Format::Ndjson);
        let v = parse(
            &e.chunk(Chunk::Stdout(Bytes::from_static(b"a\xc3")))
                .unwrap(),
        );
        assert_eq!(
            v,
            json!({"type": "stdout", "data": "a", "encoding": "utf-8", "offset": 0})
        );
        let v = parse(
            &e.chunk(Chunk::Stdout(Bytes::from_static(b"\xa9b")))
                .unwrap(),
        );
        assert_eq!(v["data"], "éb");
        assert_eq!(v["offset"], 1);
        // Not UTF-8 at all: base64, offsets per stream.
        let v = parse(
            &e.chunk(Chunk::Stderr(Bytes::from_static(b"\xff\xfe")))
                .unwrap(),
        );
        assert_eq!(
            v,
            json!({"type": "stderr", "data": "//4=", "encoding": "base64", "offset": 0})
        );
        // A held-back byte that never completes is flushed as base64.
        assert!(e
            .chunk(Chunk::Stdout(Bytes::from_static(b"\xe2")))
            .is_none());
        let rest = e.flush();
        assert_eq!(rest.len(), 1);
        let v = parse(&rest[0]);
        assert_eq!(v["encoding"], "base64");
        assert_eq!(v["offset"], 4);
    }

    #[test]
    fn server_sent_events_are_framed() {
        let mut e = Encoder::new(Format::Sse);
        let b = e.event("keepalive", json!({}));
        assert_eq!(
            &b[..],
            b"id: 1\nevent: keepalive\ndata: {\"type\":\"keepalive\"}\n\n"
        );
    }
}
