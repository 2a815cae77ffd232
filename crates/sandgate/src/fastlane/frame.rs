//! What the fast lane makes of a byte string as one request: where its head and body end, or
//! that it refuses it or leaves it to hyper. Built from the very functions the lane runs
//! (`parse_head` is `Lane::plan`'s first step, `RequestBody::take` the body's), so that tests
//! and the fuzzer (`fastlane::differential`, `crates/sandgate/fuzz`) judge the real code.

use std::mem::MaybeUninit;

use httparse::Header;

use super::head::{self, MAX_HEADERS};
use super::RequestBody;
use crate::error::Error;
use crate::gateway::MAX_HEAD;
use crate::policy::{self, Facts, Framing};

/// The fast lane's verdict on a byte string as the first request of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// More bytes are needed.
    Partial,
    /// Not the fast lane's: hyper will judge it (and so it always agrees with hyper).
    Handoff,
    /// Answered with 400 and the connection closed.
    Refuse(&'static str),
    /// A request the fast lane forwards: its head is `buf[..head_len]`, its body (by length
    /// or chunked) ends at `body_end` and carries `body_len` bytes of content, and the
    /// connection stays open after it if `keep_alive`.
    Complete {
        head_len: usize,
        body_end: usize,
        body_len: u64,
        keep_alive: bool,
    },
}

/// A request head the fast lane may forward, as `parse_head` found it.
pub(super) struct Head<'b, 'h> {
    pub head_len: usize,
    pub method: &'b str,
    pub target: &'b str,
    pub headers: &'h [Header<'b>],
    pub facts: Facts<'h>,
}

/// Why a head with more fields than `MAX_HEADERS` is refused (431, not 400).
pub const TOO_MANY_FIELDS: &str = "more than 100 header fields";
/// Why a head still incomplete at `MAX_HEAD` bytes is refused (431, as hyper's lane, whose
/// buffer has the same limit).
pub const HEAD_TOO_LARGE: &str = "request head larger than 64 KiB";

/// The gateway's error for a refused head.
pub(super) fn refusal(why: &'static str) -> Error {
    match why {
        TOO_MANY_FIELDS | HEAD_TOO_LARGE => Error::HeadTooLarge(MAX_HEAD),
        why => Error::BadFraming(why),
    }
}

/// What an HTTP/2 connection with prior knowledge starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The fast lane's reading of a request head at the start of `buf`, before routing: the
/// parsed head, or the verdict that ends it there (`Partial`, `Handoff` or `Refuse`). The
/// policy (`policy::check`) then refuses ambiguous framing too; it is refused here already so
/// that `request_framing` says what the lane does.
pub(super) fn parse_head<'b, 'h>(
    buf: &'b [u8],
    headers: &'h mut [MaybeUninit<Header<'b>>; MAX_HEADERS],
) -> Result<Head<'b, 'h>, Verdict> {
    if buf.starts_with(b"PRI * HTTP/2.0") {
        return Err(Verdict::Handoff); // h2c with prior knowledge
    }
    if H2_PREFACE.starts_with(buf) {
        return Err(Verdict::Partial); // perhaps the start of one
    }
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(Verdict::Partial),
        // Answered by the lane, in the gateway's error shape (hyper's own is a bare 400).
        Err(httparse::Error::TooManyHeaders) => return Err(Verdict::Refuse(TOO_MANY_FIELDS)),
        Err(_) => return Err(Verdict::Refuse("malformed request head")),
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(Verdict::Handoff); // HTTP/1.0: hyper's
    };
    if !head::plain_target(target) {
        return Err(Verdict::Handoff); // absolute-form and the like: hyper's lane judges
    }
    if method == "CONNECT" {
        // What follows a CONNECT head is a tunnel's bytes, not requests: hyper's lane refuses
        // it (405) and decides what becomes of the connection, so the fast lane never reads
        // on after one (found by the fuzzer).
        return Err(Verdict::Handoff);
    }
    let facts = policy::facts(method, req.headers);
    if let Some(why) = facts.ambiguous {
        return Err(Verdict::Refuse(why));
    }
    if facts.expect {
        return Err(Verdict::Handoff); // `100-continue` is hyper's
    }
    Ok(Head {
        head_len,
        method,
        target,
        headers: req.headers,
        facts,
    })
}

/// What the fast lane does with `buf` as the first request on a connection, assuming it routes
/// to a running sandbox (routing never changes framing): the head as `Lane::read_head` and
/// `Lane::plan` read it (at most `MAX_HEAD` bytes), the body as `RequestBody::take` walks it.
pub fn request_framing(buf: &[u8]) -> Verdict {
    let mut headers = [const { MaybeUninit::<Header<'_>>::uninit() }; MAX_HEADERS];
    // `Lane::read_head` refuses a head still incomplete once it holds `MAX_HEAD` bytes, with
    // the same `HEAD_TOO_LARGE`. (A head `plan_complete` parses from bytes left after a
    // previous body is not bounded by `MAX_HEAD`; this models a connection's first.)
    let head = match parse_head(&buf[..buf.len().min(MAX_HEAD)], &mut headers) {
        Ok(h) => h,
        Err(Verdict::Partial) if buf.len() >= MAX_HEAD => return Verdict::Refuse(HEAD_TOO_LARGE),
        Err(v) => return v,
    };
    let mut body = RequestBody::new(head.facts.framing);
    let rest = &buf[head.head_len..];
    let forward = body.take(rest);
    if let Some(m) = body.malformed {
        return Verdict::Refuse(m.0);
    }
    if !body.received {
        return Verdict::Partial;
    }
    let body_len = match head.facts.framing {
        Framing::Length(n) => n,
        Framing::Chunked => body.scanner.data_len(),
        Framing::Empty | Framing::UntilClose => 0,
    };
    Verdict::Complete {
        head_len: head.head_len,
        body_end: head.head_len + forward + body.swallow,
        body_len,
        keep_alive: head.facts.keep_alive,
    }
}

/// Refusals of requests hyper would serve, made on purpose: framing headers a smuggler could
/// use (RFC 9112 §6.3 lets a server refuse them; hyper interprets some) and chunk-size lines
/// too long to hold (`chunked::MAX_SIZE_LINE`). Every other refusal must match hyper's.
pub fn stricter_by_design(why: &str) -> bool {
    [
        "invalid Content-Length",
        "conflicting Content-Length values",
        "unsupported Transfer-Encoding (only chunked)",
        "both Content-Length and Transfer-Encoding",
        "chunk-size line too long",
    ]
    .contains(&why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(
            request_framing(get),
            Verdict::Complete {
                head_len: get.len(),
                body_end: get.len(),
                body_len: 0,
                keep_alive: true
            }
        );
        assert_eq!(request_framing(&get[..10]), Verdict::Partial);
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                        1\r\nx\r\n0\r\nt: 1\r\n\r\nNEXT";
        assert_eq!(
            request_framing(chunked),
            Verdict::Complete {
                head_len: 66,
                body_end: chunked.len() - 4,
                body_len: 1,
                keep_alive: false
            }
        );
        assert_eq!(
            request_framing(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab"),
            Verdict::Partial
        );
        assert_eq!(
            request_framing(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;a\nb\r\n"),
            Verdict::Refuse("bare LF in a chunk extension")
        );
        assert_eq!(request_framing(b"GET / HTTP/1.0\r\n\r\n"), Verdict::Handoff);
        assert_eq!(
            request_framing(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Verdict::Refuse("conflicting Content-Length values")
        );
        let mut huge = b"GET / HTTP/1.1\r\nx: ".to_vec();
        huge.resize(MAX_HEAD + 10, b'a');
        assert_eq!(request_framing(&huge), Verdict::Refuse(HEAD_TOO_LARGE));
    }
}
