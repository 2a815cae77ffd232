//! Finds where a chunked body (RFC 9112 §7.1) ends without decoding it: the fast lane forwards
//! the chunks exactly as they came, and needs only to know how far the body reaches and that
//! it is well formed. It is exactly as strict as hyper 1.x's decoder
//! (`hyper/src/proto/h1/decode.rs`), the other lane's: the same bytes are refused, and the
//! body ends at the same byte. The last chunk and the trailer section are validated and then
//! swallowed: the fast lane never forwards trailers and ends the body with `0\r\n\r\n` itself.

/// Extension bytes allowed in a whole body, as hyper (`CHUNKED_EXTENSIONS_LIMIT`: the
/// 16,384th is refused).
const MAX_EXTENSIONS: u64 = 16 * 1024;
/// The trailer section, from its first byte to its closing CR LF, must stay under this many
/// bytes (hyper's `TRAILER_LIMIT`: it refuses once it holds this many).
const MAX_TRAILERS: usize = 16 * 1024;
/// Trailer fields allowed (hyper's default `max_headers`).
const MAX_TRAILER_FIELDS: usize = 100;
/// Longest chunk-size line the fast lane holds while waiting for its end. Hyper streams, so it
/// bounds only the extensions (above) and the size's value; a line is held here until complete
/// (the last chunk's line must not be forwarded before it is known to be the last), so it needs
/// a bound: this one admits every line hyper admits short of more than 16 KiB of leading zeros
/// or blanks.
pub const MAX_SIZE_LINE: usize = 2 * MAX_EXTENSIONS as usize;

/// The last chunk the fast lane writes in place of the one received and its trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// After chunk data: expecting CR LF; `true` once the CR was seen.
    DataEnd(bool),
    /// After the last chunk's line: the trailer section, then an empty line.
    Trailers,
    Done,
}

/// A malformed chunked body, and what is wrong with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

/// What one `scan` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// The first `forward` bytes of the buffer are body to forward as they are (chunk-size
    /// lines, data and the CR LF after it; never the last chunk or trailers).
    pub forward: usize,
    /// The first `consumed` bytes (`>= forward`) are used up; the ones past `forward` are the
    /// last chunk and trailer section, swallowed. Bytes past `consumed` must be offered again,
    /// with more after them.
    pub consumed: usize,
}

#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// Extension bytes seen so far in this body.
    extensions: u64,
    /// Chunk data bytes so far (what the body decodes to).
    data: u64,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            state: State::Size,
            extensions: 0,
            data: 0,
        }
    }
}

impl Scanner {
    /// Chunk data bytes announced so far: once the body has ended, what it decodes to.
    pub fn data(&self) -> u64 {
        self.data
    }

    /// Walks over `buf`, the body bytes not yet consumed. Once `done()`, the body has ended at
    /// `consumed`, and the caller writes `LAST_CHUNK` after what it forwarded.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Progress, Malformed> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self.state {
                State::Done => return Ok(Progress::body(at)),
                State::Size => match size_line(rest, &mut self.extensions)? {
                    None => return Ok(Progress::body(at)),
                    Some((used, 0)) => {
                        self.state = State::Trailers;
                        // The last chunk's line is swallowed.
                        let trailers = self.trailers(&rest[used..])?;
                        return Ok(Progress {
                            forward: at,
                            consumed: at + used + trailers,
                        });
                    }
                    Some((used, size)) => {
                        at += used;
                        self.data = self.data.saturating_add(size);
                        self.state = State::Data(size);
                    }
                },
                State::Data(left) => {
                    if rest.is_empty() {
                        return Ok(Progress::body(at));
                    }
                    let take = left.min(rest.len() as u64);
                    at += take as usize;
                    self.state = match left - take {
                        0 => State::DataEnd(false),
                        n => State::Data(n),
                    };
                }
                State::DataEnd(cr_seen) => match (cr_seen, rest.first()) {
                    (_, None) => return Ok(Progress::body(at)),
                    (false, Some(b'\r')) => {
                        at += 1;
                        self.state = State::DataEnd(true);
                    }
                    (true, Some(b'\n')) => {
                        at += 1;
                        self.state = State::Size;
                    }
                    (false, _) => return Err(Malformed("no CR after chunk data")),
                    (true, _) => return Err(Malformed("no LF after chunk data")),
                },
                State::Trailers => {
                    let trailers = self.trailers(rest)?;
                    return Ok(Progress {
                        forward: at,
                        consumed: at + trailers,
                    });
                }
            }
        }
    }

    /// The trailer section at the start of `buf`, validated, once complete: its length (and
    /// the body is done); 0 while incomplete.
    fn trailers(&mut self, buf: &[u8]) -> Result<usize, Malformed> {
        match trailer_section(buf)? {
            Some(len) => {
                self.state = State::Done;
                Ok(len)
            }
            None => Ok(0),
        }
    }

    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// The length of the chunk data announced so far (of the decoded body, once `done`).
    pub fn data_len(&self) -> u64 {
        self.data
    }
}

impl Progress {
    fn body(n: usize) -> Progress {
        Progress {
            forward: n,
            consumed: n,
        }
    }
}

/// A chunk-size line at the start of `buf` (hyper's grammar: hex digits, blanks, then `;`
/// and extension bytes up to a CR LF; no bare CR or LF anywhere): its length and the chunk
/// size, `None` while incomplete. `extensions` counts the body's extension bytes. A line
/// longer than `MAX_SIZE_LINE` (CR LF included) is refused, however it arrives.
fn size_line(buf: &[u8], extensions: &mut u64) -> Result<Option<(usize, u64)>, Malformed> {
    #[derive(Clone, Copy)]
    enum S {
        Digits,
        Blank,
        Extension,
        Lf,
    }
    let mut size: u64 = 0;
    let mut s = S::Digits;
    let mut ext = *extensions;
    for (i, &b) in buf.iter().take(MAX_SIZE_LINE).enumerate() {
        s = match (s, b) {
            (S::Digits, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                let digit = (b as char).to_digit(16).unwrap_or(0) as u64;
                size = size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .ok_or(Malformed("chunk size overflows"))?;
                S::Digits
            }
            (S::Digits, _) if i == 0 => return Err(Malformed("chunk-size line without a size")),
            (S::Digits | S::Blank, b' ' | b'\t') => S::Blank,
            (S::Digits | S::Blank, b';') => S::Extension,
            (S::Digits | S::Blank | S::Extension, b'\r') => S::Lf,
            (S::Digits | S::Blank, _) => return Err(Malformed("invalid chunk-size line")),
            (S::Extension, b'\n') => return Err(Malformed("bare LF in a chunk extension")),
            (S::Extension, _) => {
                ext += 1;
                if ext >= MAX_EXTENSIONS {
                    return Err(Malformed("chunk extensions over limit"));
                }
                S::Extension
            }
            (S::Lf, b'\n') => {
                *extensions = ext;
                return Ok(Some((i + 1, size)));
            }
            (S::Lf, _) => return Err(Malformed("bare CR in a chunk-size line")),
        };
    }
    if buf.len() >= MAX_SIZE_LINE {
        return Err(Malformed("chunk-size line too long"));
    }
    Ok(None)
}

/// The trailer section at the start of `buf` (right after the last chunk's line), as hyper
/// reads it: bytes up to CR LF CR LF, or a lone CR LF for none; at most `MAX_TRAILERS` bytes
/// and `MAX_TRAILER_FIELDS` CR LF-ended lines, which must parse as header fields. Its length,
/// `None` while incomplete.
fn trailer_section(buf: &[u8]) -> Result<Option<usize>, Malformed> {
    #[derive(Clone, Copy)]
    enum S {
        /// At the start of a line.
        LineStart,
        InLine,
        /// After a CR inside a line.
        LineLf,
        /// After a CR at the start of a line.
        EndLf,
    }
    let mut s = S::LineStart;
    let mut lines = 0;
    for (i, &b) in buf.iter().enumerate() {
        // Hyper keeps the trailer bytes (all of them, once there is one that is not the
        // final CR) and refuses once it holds `MAX_TRAILERS`.
        if i + 1 >= MAX_TRAILERS {
            return Err(Malformed("trailer section over limit"));
        }
        s = match (s, b) {
            (S::LineStart, b'\r') => S::EndLf,
            (S::InLine, b'\r') => S::LineLf,
            (S::LineStart | S::InLine, _) => S::InLine,
            (S::LineLf, b'\n') => {
                if lines >= MAX_TRAILER_FIELDS {
                    return Err(Malformed("too many trailer fields"));
                }
                lines += 1;
                S::LineStart
            }
            (S::LineLf, _) => return Err(Malformed("bare CR in a trailer field")),
            (S::EndLf, b'\n') => {
                let len = i + 1;
                if len > 2 {
                    valid_fields(&buf[..len], lines)?;
                }
                return Ok(Some(len));
            }
            (S::EndLf, _) => return Err(Malformed("no LF after the trailer section")),
        };
    }
    Ok(None)
}

/// Whether a complete trailer section parses as `lines` header fields at most, as hyper checks
/// it (`httparse::parse_headers` with that many slots). `httparse` admits exactly the names and
/// values `http::HeaderName` and `HeaderValue` do, hyper's next check (a unit test shows it).
fn valid_fields(section: &[u8], lines: usize) -> Result<(), Malformed> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
    match httparse::parse_headers(section, &mut slots[..lines]) {
        Ok(httparse::Status::Complete(_)) => Ok(()),
        _ => Err(Malformed("invalid trailer field")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step` bytes the way the fast lane does: unconsumed bytes are
    /// offered again with the next piece. Returns where the body ended and the bytes forwarded
    /// (with the fast lane's own last chunk).
    fn scan_in_steps(body: &[u8], step: usize) -> Result<(usize, Vec<u8>), Malformed> {
        let mut s = Scanner::default();
        let (mut start, mut end) = (0, 0);
        let mut out = Vec::new();
        while !s.done() {
            if end == body.len() {
                return Err(Malformed("incomplete"));
            }
            end = (end + step).min(body.len());
            let p = s.scan(&body[start..end])?;
            assert!(p.forward <= p.consumed && start + p.consumed <= end);
            out.extend_from_slice(&body[start..start + p.forward]);
            start += p.consumed;
        }
        out.extend_from_slice(LAST_CHUNK);
        Ok((start, out))
    }

    const STEPS: [usize; 7] = [1, 2, 3, 5, 7, 64, 100_000];

    #[test]
    fn finds_the_end_however_the_bytes_arrive() {
        let body = b"4;ext=1\r\nRust\r\n10 \t;a=\"b c\"\r\n0123456789abcdef\r\n0;x\r\n\
                     X-T: 1\r\nx-api-key: secret\r\n\r\nGET / HTTP/1.1";
        let end = body.len() - b"GET / HTTP/1.1".len();
        let forwarded = b"4;ext=1\r\nRust\r\n10 \t;a=\"b c\"\r\n0123456789abcdef\r\n0\r\n\r\n";
        for step in STEPS {
            let (at, out) = scan_in_steps(body, step).unwrap();
            assert_eq!(at, end, "step {step}");
            assert_eq!(out, forwarded, "step {step}");
        }
        assert_eq!(scan_in_steps(b"0\r\n\r\n", 1).unwrap().0, 5);
        assert_eq!(scan_in_steps(b"000\r\n\r\nX", 2).unwrap().0, 7);
    }

    #[test]
    fn trailers_are_never_forwarded() {
        let body = b"3\r\nabc\r\n0\r\nx-api-key: k\r\n\r\n";
        for step in STEPS {
            let (at, out) = scan_in_steps(body, step).unwrap();
            assert_eq!(at, body.len());
            assert_eq!(out, b"3\r\nabc\r\n0\r\n\r\n");
        }
    }

    /// Shapes hyper accepts too, however odd: the body must end where hyper's does.
    #[test]
    fn accepts_what_hyper_accepts() {
        for (ok, end) in [
            (&b"0\r\n\r\n"[..], 5),
            (b"0000000000000000000001\r\nx\r\n0\r\n\r\n", 32),
            (b"ffffffffffffffff\r\n", usize::MAX), // incomplete, but not refused
            (b"1;\r\nx\r\n0\r\n\r\n", 12),
            (b"0\r\n\n", usize::MAX),
            // A lone LF first, then a field: httparse reads the LF as the end.
            (b"0\r\n\nX\r\n\r\n", 9),
        ] {
            for step in STEPS {
                match scan_in_steps(ok, step) {
                    Ok((at, _)) => assert_eq!(at, end, "{ok:?} step {step}"),
                    Err(Malformed("incomplete")) => assert_eq!(end, usize::MAX, "{ok:?}"),
                    Err(e) => panic!("{ok:?} step {step}: {e:?}"),
                }
            }
        }
    }

    #[test]
    fn refuses_what_hyper_refuses() {
        let mut long_extension = b"1;".to_vec();
        long_extension.extend([b'a'; 16 * 1024]);
        let mut spread_extensions = Vec::new();
        for _ in 0..3 {
            spread_extensions.extend(b"1;");
            spread_extensions.extend([b'e'; 6000]);
            spread_extensions.extend(b"\r\nx\r\n");
        }
        let mut long_trailer = b"0\r\nx: ".to_vec();
        long_trailer.extend([b'a'; 16 * 1024]);
        long_trailer.extend(b"\r\n\r\n");
        let mut many_trailers = b"0\r\n".to_vec();
        for i in 0..101 {
            many_trailers.extend(format!("t{i}: 1\r\n").as_bytes());
        }
        many_trailers.extend(b"\r\n");
        let mut long_zeros = vec![b'0'; MAX_SIZE_LINE];
        long_zeros.extend(b"1\r\nx\r\n0\r\n\r\n");
        for bad in [
            &b"4\r\nRustX\r\n0\r\n\r\n"[..],
            b"4\r\nRust\r0\r\n\r\n",
            b"4\r\nRust\n0\r\n\r\n",
            b"g\r\n",
            b"\r\n",
            b"\r\n0\r\n\r\n",
            b" 4\r\nRust\r\n0\r\n\r\n",
            b"4\nRust\r\n0\r\n\r\n",
            b"4\rRust\r\n0\r\n\r\n",
            b"4;a\nb\r\nRust\r\n0\r\n\r\n",
            b"4;a\rb\r\nRust\r\n0\r\n\r\n",
            b"4 4\r\nRust\r\n0\r\n\r\n",
            b"4 x\r\nRust\r\n0\r\n\r\n",
            b"0x4\r\nRust\r\n0\r\n\r\n",
            b"-4\r\nRust\r\n0\r\n\r\n",
            b"+4\r\nRust\r\n0\r\n\r\n",
            b"0\n\r\n",
            // A bare LF inside a trailer line: two fields where hyper counted one.
            b"0\r\na: 1\nb: 2\r\n\r\n",
            b"0\r\n\r\r\n",
            b"0\r\n\rX",
            b"0;a\nb\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"10000000000000000\r\n",
            b"4\r\nRust\r\n0\r\nbad-trailer\r\n\r\n",
            b"4\r\nRust\r\n0\r\nbad trailer: 1\r\n\r\n",
            b"4\r\nRust\r\n0\r\nbad : 1\r\n\r\n",
            b"4\r\nRust\r\n0\r\nx: a\rb\r\n\r\n",
            b"4\r\nRust\r\n0\r\nx: a\x01b\r\n\r\n",
            b"4\r\nRust\r\n0\r\nx: 1\r\n folded\r\n\r\n",
            b"4\r\nRust\r\n0\r\nx: 1\r\nbad-trailer\n\r\n\r\n",
            b"0\r\na: 1\nb: 2\nc: 3\r\n\r\n",
            &long_extension,
            &spread_extensions,
            &long_trailer,
            &many_trailers,
            &long_zeros,
        ] {
            // Long shapes rescan their held line on every step: a few steps do.
            let steps = if bad.len() > 1000 {
                &STEPS[4..]
            } else {
                &STEPS[..]
            };
            for &step in steps {
                match scan_in_steps(bad, step) {
                    Err(Malformed(why)) => assert_ne!(why, "incomplete", "{bad:?} step {step}"),
                    Ok(r) => panic!("{:?} step {step}: accepted, {}", bad.escape_ascii(), r.0),
                }
            }
        }
    }

    /// `valid_fields` relies on httparse admitting exactly the names and values `http` does.
    #[test]
    fn httparse_and_http_agree_on_field_bytes() {
        for b in 0..=255u8 {
            let name = [b'x', b];
            let mut field = name.to_vec();
            field.extend(b": v\r\n\r\n");
            let mut slots = [httparse::EMPTY_HEADER; 1];
            let parsed = matches!(
                httparse::parse_headers(&field, &mut slots),
                Ok(httparse::Status::Complete(_))
            );
            if b != b':' && !b.is_ascii_whitespace() {
                assert_eq!(
                    parsed,
                    http::HeaderName::from_bytes(&name).is_ok(),
                    "name byte {b}"
                );
            }
            let value = [b'v', b, b'v'];
            let mut field = b"x: ".to_vec();
            field.extend(value);
            field.extend(b"\r\n\r\n");
            let parsed = matches!(
                httparse::parse_headers(&field, &mut slots),
                Ok(httparse::Status::Complete(_))
            );
            if b != b'\r' && b != b'\n' {
                assert_eq!(
                    parsed,
                    http::HeaderValue::from_bytes(&value).is_ok(),
                    "value byte {b}"
                );
            }
        }
    }
}
