//! The access log: one line per request or upgraded stream when it ends, written by the
//! finish step both lanes share, and the request id every request carries (`x-request-id`:
//! the client's if it is sane, else a new one; forwarded to the sandbox and returned on the
//! response).
//!
//! What a line holds is gathered while the request is planned, into fixed inline buffers
//! ([`Inline`]): no allocation per request, whatever lane serves it. Lines go through
//! `tracing` (target `sandgate::access`), so `--log-format json|text` and `RUST_LOG` apply to
//! them as to every other line.

use std::net::IpAddr;
use std::time::Duration;

/// The request-id field.
pub const X_REQUEST_ID: &str = "x-request-id";

/// A short string kept inline, cut (at a character boundary, with `…`) when longer than `N`.
#[derive(Clone, Copy)]
pub struct Inline<const N: usize> {
    buf: [u8; N],
    len: u16,
}

impl<const N: usize> Default for Inline<N> {
    fn default() -> Self {
        Inline {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Inline<N> {
    /// `s`, cut to fit.
    pub fn new(s: &str) -> Self {
        let mut v = Self::default();
        v.set(s);
        v
    }

    pub fn set(&mut self, s: &str) {
        const MARK: &str = "…";
        let take = if s.len() <= N {
            s.len()
        } else {
            let mut end = N - MARK.len();
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            end
        };
        self.buf[..take].copy_from_slice(&s.as_bytes()[..take]);
        let mut len = take;
        if take < s.len() {
            self.buf[take..take + MARK.len()].copy_from_slice(MARK.as_bytes());
            len += MARK.len();
        }
        self.len = len as u16;
    }

    /// `bytes` as text (a placeholder if they are not UTF-8).
    pub fn set_bytes(&mut self, bytes: &[u8]) {
        match std::str::from_utf8(bytes) {
            Ok(s) => self.set(s),
            Err(_) => self.set("(not UTF-8)"),
        }
    }

    pub fn as_str(&self) -> &str {
        // Only whole `&str`s cut at character boundaries are ever copied in.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<const N: usize> std::fmt::Debug for Inline<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request id: 1-64 characters of `A-Z a-z 0-9 - _ . : / + = @`.
pub type RequestId = Inline<64>;

/// The client's `x-request-id` if it is sane (else a new one is made): a request id ends up
/// in logs and in the sandbox's request, so nothing that could break a log line or a header
/// is kept.
pub fn sane_request_id(value: &[u8]) -> Option<&str> {
    let ok = (1..=64).contains(&value.len())
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b));
    ok.then(|| std::str::from_utf8(value).ok()).flatten()
}

/// A new request id: 32 lowercase hex digits (128 random bits, the shape of a W3C trace id).
pub fn new_request_id() -> RequestId {
    let n: u128 = rand::random();
    let mut id = RequestId::default();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in 0..32 {
        id.buf[i] = HEX[((n >> (124 - 4 * i)) & 0xf) as usize];
    }
    id.len = 32;
    id
}

/// The request's id: the client's if sane, else a new one.
pub fn request_id(client: Option<&[u8]>) -> RequestId {
    match client.and_then(sane_request_id) {
        Some(s) => RequestId::new(s),
        None => new_request_id(),
    }
}

/// The trace id of a valid W3C `traceparent` (`00-{32 hex}-{16 hex}-{2 hex}`), for the log.
pub fn trace_id(traceparent: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(traceparent).ok()?.trim();
    let mut parts = s.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && hex(flags, 2);
    valid.then_some(trace)
}

/// Who and what a request was, gathered while it is planned.
#[derive(Clone, Default)]
pub struct Who {
    pub request_id: RequestId,
    pub trace_id: Inline<32>,
    pub host: Inline<256>,
    /// The path, without the query.
    pub path: Inline<512>,
    pub sandbox: Inline<40>,
    pub port: u16,
    /// The key id or token subject the request acted as.
    pub subject: Option<std::sync::Arc<str>>,
}

/// One line of the access log.
pub struct Line<'a> {
    pub who: &'a Who,
    pub method: &'a str,
    pub route: &'a str,
    pub client: IpAddr,
    /// 0: no response was sent.
    pub status: u16,
    pub duration: Duration,
    /// Envoy-style: `UF` connect failure, `UT` timeout, … (`-`: none).
    pub flag: &'static str,
    /// `request` or `stream` (an upgraded connection, logged when it ends).
    pub kind: &'static str,
}

/// Writes one access-log line.
pub fn log(l: &Line<'_>) {
    let w = l.who;
    tracing::info!(
        target: "sandgate::access",
        kind = %l.kind,
        request_id = %w.request_id.as_str(),
        method = %l.method,
        route = %l.route,
        host = %or_dash(w.host.as_str()),
        path = %or_dash(w.path.as_str()),
        status = l.status,
        duration_ms = l.duration.as_micros() as f64 / 1000.0,
        sandbox = %or_dash(w.sandbox.as_str()),
        port = w.port,
        client = %l.client,
        subject = %or_dash(w.subject.as_deref().unwrap_or("")),
        flag = %l.flag,
        trace_id = %or_dash(w.trace_id.as_str()),
    );
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_cut_at_a_character_boundary_with_a_mark() {
        let v: Inline<8> = Inline::new("ab€€€€");
        assert_eq!(v.as_str(), "ab€…");
        let v: Inline<8> = Inline::new("abcdefgh");
        assert_eq!(v.as_str(), "abcdefgh");
    }

    #[test]
    fn a_sane_client_request_id_is_kept_and_anything_else_replaced() {
        assert_eq!(
            request_id(Some(b"abc-123_x.y:z/+=@")).as_str(),
            "abc-123_x.y:z/+=@"
        );
        for bad in [
            &b""[..],
            b"a b",
            b"a\"b",
            b"a\nb",
            &[b'a'; 65][..],
            "é".as_bytes(),
        ] {
            let id = request_id(Some(bad));
            assert_eq!(id.as_str().len(), 32, "{bad:?}");
            assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        }
        assert_ne!(new_request_id().as_str(), new_request_id().as_str());
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(
            trace_id(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id(b"00-4bf92f35-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id(b"garbage"), None);
    }
}
