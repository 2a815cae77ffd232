//! Finds where a chunked body (RFC 9112 §7.1) ends without decoding it: the fast lane forwards
//! the chunks exactly as they came, and needs only to know how far the body reaches and that
//! it is well formed.

/// Longest chunk-size line (size plus extensions) or trailer section accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// After chunk data: expecting CR LF; `true` once the CR was seen.
    DataEnd(bool),
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
    Done,
}

/// A malformed chunked body.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

#[derive(Debug)]
pub struct Scanner {
    state: State,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner { state: State::Size }
    }
}

impl Scanner {
    /// Walks over `buf`, the body bytes not yet scanned, and returns how many of them belong to
    /// the body and can be forwarded. Bytes it leaves (a size line or trailer section split
    /// across reads) must be offered again, with more after them.
    pub fn scan(&mut self, buf: &[u8]) -> Result<usize, Malformed> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self.state {
                State::Done => return Ok(at),
                State::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        at += used;
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if rest.len() < MAX_LINE => return Ok(at),
                    _ => return Err(Malformed),
                },
                State::Data(left) => {
                    if rest.is_empty() {
                        return Ok(at);
                    }
                    let take = left.min(rest.len() as u64);
                    at += take as usize;
                    self.state = match left - take {
                        0 => State::DataEnd(false),
                        n => State::Data(n),
                    };
                }
                State::DataEnd(cr_seen) => match (cr_seen, rest.first()) {
                    (_, None) => return Ok(at),
                    (false, Some(b'\r')) => {
                        at += 1;
                        self.state = State::DataEnd(true);
                    }
                    (true, Some(b'\n')) => {
                        at += 1;
                        self.state = State::Size;
                    }
                    _ => return Err(Malformed),
                },
                State::Trailers => {
                    // Whole lines only; an empty one ends the body.
                    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                        return if rest.len() < MAX_LINE {
                            Ok(at)
                        } else {
                            Err(Malformed)
                        };
                    };
                    let line = &rest[..nl];
                    if line.last() != Some(&b'\r') {
                        return Err(Malformed);
                    }
                    at += nl + 1;
                    if line.len() == 1 {
                        self.state = State::Done;
                    }
                }
            }
        }
    }

    pub fn done(&self) -> bool {
        self.state == State::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step` bytes the way the fast lane does: unscanned bytes are
    /// offered again with the next piece. Returns where the body ended.
    fn scan_in_steps(body: &[u8], step: usize) -> Result<usize, Malformed> {
        let mut s = Scanner::default();
        let (mut start, mut end) = (0, 0);
        while !s.done() {
            if end == body.len() {
                return Err(Malformed);
            }
            end = (end + step).min(body.len());
            start += s.scan(&body[start..end])?;
        }
        Ok(start)
    }

    #[test]
    fn finds_the_end_however_the_bytes_arrive() {
        let body =
            b"4;ext=1\r\nRust\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1";
        let end = body.len() - b"GET / HTTP/1.1".len();
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(scan_in_steps(body, step), Ok(end), "step {step}");
        }
        assert_eq!(scan_in_steps(b"0\r\n\r\n", 1), Ok(5));
    }

    #[test]
    fn rejects_malformed_bodies() {
        for bad in [
            &b"4\r\nRustX\r\n0\r\n\r\n"[..],
            b"g\r\n",
            b"4\r\nRust\r\n0\r\nbad-trailer\n\r\n",
            b"ffffffffffffffffff\r\n",
        ] {
            assert_eq!(scan_in_steps(bad, 3), Err(Malformed), "{bad:?}");
        }
        let mut long_size_line = b"1".to_vec();
        long_size_line.extend([b';'; 5000]);
        assert_eq!(Scanner::default().scan(&long_size_line), Err(Malformed));
    }
}
