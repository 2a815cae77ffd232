//! The request head as the policy sees it, whichever parser produced it: hyper's `HeaderMap`
//! or the fast lane's `httparse` fields, through one small [`Fields`] trait, and the facts one
//! pass over the fields yields (framing, connection handling, the HTML preference, a protocol
//! switch). Both lanes call [`facts`], so no per-request header rule is written twice.

use http::HeaderMap;

use crate::addresses::ForwardedFor;
use crate::auth::Credentials;
use crate::proxy::headers::tokens;

/// How a message body is delimited (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

impl Framing {
    /// Whether any body bytes follow the head.
    pub fn has_body(self) -> bool {
        !matches!(self, Framing::Empty | Framing::Length(0))
    }
}

/// A head's header fields, in order, as raw names and values.
pub trait Fields {
    /// Calls `f` with each field's name and value.
    fn each<'s>(&'s self, f: impl FnMut(&'s [u8], &'s [u8]));
}

impl Fields for [httparse::Header<'_>] {
    fn each<'s>(&'s self, mut f: impl FnMut(&'s [u8], &'s [u8])) {
        for h in self {
            f(h.name.as_bytes(), h.value);
        }
    }
}

impl Fields for HeaderMap {
    fn each<'s>(&'s self, mut f: impl FnMut(&'s [u8], &'s [u8])) {
        for (name, value) in self {
            f(name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// What one pass over a request head's fields says.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub framing: Framing,
    /// Framing a smuggler could use (RFC 9112 §6.3: both lengths, differing lengths, a coding
    /// other than `chunked`): refused, never interpreted.
    pub ambiguous: Option<&'static str>,
    /// The client keeps the connection open after this exchange (HTTP/1.1).
    pub keep_alive: bool,
    pub is_head: bool,
    /// Safe to send again on a fresh connection if a reused one closed under it.
    pub idempotent: bool,
    /// The client prefers HTML error pages (a browser).
    pub html: bool,
    /// The protocol a `Connection: upgrade` request asks to switch to.
    pub upgrade: Option<&'a [u8]>,
    /// An `Expect` field (hyper's lane answers `100-continue`).
    pub expect: bool,
    /// How many `Host` fields the head has.
    pub hosts: u8,
    /// The gateway credentials the head carries.
    pub credentials: Credentials<'a>,
    /// The last `X-Forwarded-For` fields (believed only from a trusted proxy:
    /// `crate::addresses`).
    pub forwarded_for: ForwardedFor<'a>,
}

/// Reads the facts of a request head in one pass.
pub fn facts<'a, F: Fields + ?Sized + 'a>(method: &str, fields: &'a F) -> Facts<'a> {
    let mut f = Facts {
        framing: Framing::Empty,
        ambiguous: None,
        keep_alive: true,
        is_head: method == "HEAD",
        idempotent: crate::proxy::is_idempotent(method),
        html: false,
        upgrade: None,
        expect: false,
        hosts: 0,
        credentials: Credentials::default(),
        forwarded_for: ForwardedFor::default(),
    };
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut connection_upgrade = false;
    let mut upgrade: Option<&[u8]> = None;
    let mut ambiguous = |why| {
        f_ambiguous(&mut f.ambiguous, why);
    };
    fields.each(|name, value| {
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        match name.len() {
            4 if is("host") => f.hosts = f.hosts.saturating_add(1),
            6 if is("expect") => f.expect = true,
            6 if is("accept") => f.html |= contains(value, b"text/html"),
            7 if is("upgrade") => upgrade = Some(value),
            9 if is("x-api-key") => {
                let c = &mut f.credentials;
                c.api_keys = c.api_keys.saturating_add(1);
                c.api_key.get_or_insert(value);
            }
            6 if is("cookie") && contains(value, b"sandgate_preview=") => {
                let c = &mut f.credentials;
                for pair in value.split(|&b| b == b';').map(<[u8]>::trim_ascii) {
                    if let Some(v) = pair.strip_prefix(b"sandgate_preview=") {
                        if let Some(slot) = c.previews.get_mut(c.preview_count as usize) {
                            *slot = v;
                            c.preview_count += 1;
                        }
                    }
                }
            }
            22 if is("sec-websocket-protocol") => {
                for p in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if let Some(cred) = p.strip_prefix(b"sandgate.auth.") {
                        f.credentials.subprotocol.get_or_insert(cred);
                    }
                }
            }
            13 if is("authorization") => {
                f.credentials.authorization.get_or_insert(value);
            }
            10 if is("connection") => {
                for t in tokens(value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        f.keep_alive = false;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        connection_upgrade = true;
                    }
                }
            }
            15 if is("x-forwarded-for") => f.forwarded_for.push(value),
            14 if is("content-length") => match parse_length(value) {
                None => ambiguous("invalid Content-Length"),
                Some(n) if length.is_some_and(|l| l != n) => {
                    ambiguous("conflicting Content-Length values")
                }
                Some(n) => length = Some(n),
            },
            17 if is("transfer-encoding") => {
                if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    ambiguous("unsupported Transfer-Encoding (only chunked)");
                }
                chunked = true;
            }
            _ => {}
        }
    });
    if chunked && length.is_some() {
        f_ambiguous(
            &mut f.ambiguous,
            "both Content-Length and Transfer-Encoding",
        );
    }
    f.framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, None) => Framing::Empty,
        (false, Some(n)) => Framing::Length(n),
    };
    if connection_upgrade {
        f.upgrade = upgrade.map(<[u8]>::trim_ascii);
    }
    f
}

fn f_ambiguous(slot: &mut Option<&'static str>, why: &'static str) {
    slot.get_or_insert(why);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A `Content-Length` value: digits only, no sign, no list (RFC 9110 §8.6), and no more than
/// fit in 63 bits (hyper's limit too).
pub fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v)
        .ok()?
        .parse()
        .ok()
        .filter(|&n: &u64| n <= i64::MAX as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use httparse::Header;

    fn hdrs<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<Header<'a>> {
        pairs
            .iter()
            .map(|(n, v)| Header {
                name: n,
                value: v.as_bytes(),
            })
            .collect()
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// Both parsers' views of the same fields give the same facts.
    fn both(method: &str, pairs: &[(&str, &str)]) -> (Framing, Option<&'static str>) {
        let h = hdrs(pairs);
        let m = map(pairs);
        let a = facts(method, &h[..]);
        let b = facts(method, &m);
        assert_eq!(
            (
                a.framing,
                a.ambiguous,
                a.keep_alive,
                a.html,
                a.upgrade,
                a.expect,
                a.hosts,
                a.forwarded_for
            ),
            (
                b.framing,
                b.ambiguous,
                b.keep_alive,
                b.html,
                b.upgrade,
                b.expect,
                b.hosts,
                b.forwarded_for
            ),
            "{pairs:?}"
        );
        (a.framing, a.ambiguous)
    }

    #[test]
    fn request_framing_is_read_strictly() {
        assert_eq!(both("POST", &[]), (Framing::Empty, None));
        // An explicit zero length is passed on: some servers insist on it for POST.
        assert_eq!(
            both("POST", &[("content-length", "0")]),
            (Framing::Length(0), None)
        );
        assert_eq!(
            both("POST", &[("Content-Length", "12")]),
            (Framing::Length(12), None)
        );
        assert_eq!(
            both("POST", &[("content-length", "5"), ("content-length", "5")]),
            (Framing::Length(5), None)
        );
        assert_eq!(
            both("POST", &[("transfer-encoding", "Chunked")]),
            (Framing::Chunked, None)
        );
        for bad in [
            &[("content-length", "5"), ("content-length", "6")][..],
            &[("content-length", "5"), ("transfer-encoding", "chunked")],
            &[("transfer-encoding", "gzip, chunked")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("content-length", "+5")],
            &[("content-length", "5, 5")],
            &[("content-length", "18446744073709551616")],
            &[("content-length", "9223372036854775808")],
        ] {
            assert!(both("POST", bad).1.is_some(), "{bad:?}");
        }
    }

    #[test]
    fn connection_handling_preferences_and_switches() {
        let pairs = [
            ("Connection", "close, Upgrade"),
            ("Upgrade", " websocket "),
            ("Accept", "text/html,*/*"),
            ("Expect", "100-continue"),
            ("Host", "a"),
            ("host", "b"),
            ("X-Forwarded-For", "192.0.2.1, 10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ];
        both("GET", &pairs);
        let h = hdrs(&pairs);
        let f = facts("GET", &h[..]);
        assert!(!f.keep_alive && f.html && f.expect && f.idempotent && !f.is_head);
        assert_eq!(f.upgrade, Some(&b"websocket"[..]));
        assert_eq!(f.hosts, 2);
        let mut xff = ForwardedFor::default();
        xff.push(b"192.0.2.1, 10.0.0.1");
        xff.push(b"10.0.0.2");
        assert_eq!(f.forwarded_for, xff);
        // `Upgrade` alone asks for nothing.
        let h = hdrs(&[("Upgrade", "websocket")]);
        assert_eq!(facts("GET", &h[..]).upgrade, None);
        assert!(!facts("POST", &[][..]).idempotent);
        assert!(facts("HEAD", &[][..]).is_head);
    }
}
