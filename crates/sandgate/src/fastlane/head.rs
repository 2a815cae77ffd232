//! Message heads for the fast lane: the request facts it keeps for an exchange, what a
//! response head says about framing and connection reuse, and the rewritten heads that are
//! sent on, built straight from the parsed bytes into a reused buffer. Which fields pass is
//! decided by the proxy's one table (`proxy::headers`), which hyper's lane uses too.

use std::net::IpAddr;

use http::HeaderValue;
use httparse::Header;

use crate::policy::{Facts, Framing};
use crate::proxy::headers::{
    cookies_without_ours, has_gateway_cookie, request_field, response_field, rewrite_location,
    tokens, Named, RequestField, ResponseField,
};

/// How many header fields a head may have (hyper's default too); more goes to hyper.
pub const MAX_HEADERS: usize = 100;

/// What the fast lane keeps of a request head's facts for the exchange.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts {
    pub framing: Framing,
    /// The client keeps the connection open after this exchange.
    pub keep_alive: bool,
    pub is_head: bool,
    /// Safe to send again on a fresh connection if a reused one closed under it.
    pub idempotent: bool,
    /// The client prefers HTML error pages.
    pub html: bool,
}

impl From<&Facts<'_>> for RequestFacts {
    fn from(f: &Facts<'_>) -> RequestFacts {
        RequestFacts {
            framing: f.framing,
            keep_alive: f.keep_alive,
            is_head: f.is_head,
            idempotent: f.idempotent,
            html: f.html,
        }
    }
}

/// The first `Host` field's value, if it is text.
pub fn host<'b>(headers: &[Header<'b>]) -> Option<&'b str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

/// Whether a request target is a plain origin-form path the fast lane may route: `/` first and
/// only the characters `http::Uri` accepts, so both lanes see the same set of paths.
pub fn plain_target(target: &str) -> bool {
    target.starts_with('/')
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%[]".contains(&b))
}

/// Everything besides the parsed head that shapes the request sent to the sandbox.
pub struct RequestRewrite<'a> {
    pub method: &'a str,
    /// The path (and query) the sandbox sees: the route prefix already removed.
    pub path: &'a str,
    pub upstream_port: u16,
    /// The client's address (as the request policy resolved it) as `X-Forwarded-For` text:
    /// the whole of that field.
    pub client_ip: &'a [u8],
    pub prefix: Option<&'a [u8]>,
    pub framing: Framing,
    /// Leave out `Authorization` (the gateway's credential).
    pub strip_authorization: bool,
    /// The request's id (`x-request-id`).
    pub request_id: &'a [u8],
}

/// Writes the head the sandbox receives into `out` (cleared first): the fields by the proxy's
/// table, then `X-Forwarded-*` and the framing.
pub fn write_request(out: &mut Vec<u8>, headers: &[Header<'_>], rw: &RequestRewrite<'_>) {
    out.clear();
    out.extend_from_slice(rw.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(rw.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: localhost:");
    out.extend_from_slice(itoa::Buffer::new().format(rw.upstream_port).as_bytes());
    out.extend_from_slice(b"\r\n");
    let named = connection_named(headers);
    let mut public_host: Option<&[u8]> = None;
    for h in headers {
        let name = h.name.as_bytes();
        match request_field(name) {
            _ if named.contains(name) => {}
            RequestField::Authorization if rw.strip_authorization => {}
            RequestField::Forward | RequestField::Authorization => put_field(out, name, h.value),
            RequestField::Drop | RequestField::Length => {}
            RequestField::Host => {
                public_host.get_or_insert(h.value);
            }
            RequestField::Cookie if has_gateway_cookie(h.value) => {
                // Written in place: the field is dropped again if no cookie is left.
                let start = out.len();
                out.extend_from_slice(b"cookie: ");
                let values = out.len();
                cookies_without_ours(h.value, out, values);
                if out.len() == values {
                    out.truncate(start);
                } else {
                    out.extend_from_slice(b"\r\n");
                }
            }
            RequestField::Cookie => put_field(out, name, h.value),
        }
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    out.extend_from_slice(rw.client_ip);
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    if let Some(h) = public_host {
        put_field(out, b"x-forwarded-host", h);
    }
    if let Some(p) = rw.prefix {
        put_field(out, b"x-forwarded-prefix", p);
    }
    put_field(out, b"x-request-id", rw.request_id);
    write_framing(out, rw.framing);
    out.extend_from_slice(b"\r\n");
}

/// Changes the port of the `Host` field a head written by [`write_request`] names (the
/// request moved to another instance of its sandbox, which listens on another port).
pub fn set_host_port(out: &mut Vec<u8>, port: u16) {
    const HOST: &[u8] = b"\r\nhost: localhost:";
    let Some(at) = out.windows(HOST.len()).position(|w| w == HOST) else {
        return;
    };
    let start = at + HOST.len();
    let len = out[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let digits = itoa::Buffer::new().format(port).as_bytes().to_vec();
    out.splice(start..start + len, digits);
}

/// What the fast lane needs to know about a response head it forwards.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseFacts {
    pub framing: Framing,
    /// The sandbox keeps its connection open after this response.
    pub reusable: bool,
}

/// Why a response head cannot be forwarded: the sandbox broke the protocol.
#[derive(Debug, PartialEq, Eq)]
pub enum BadResponse {
    /// Conflicting `Content-Length` values, or one that is not a number.
    Length,
    /// A transfer coding other than `chunked`.
    Coding,
    /// `101 Switching Protocols` to a request that asked for no upgrade.
    Switch,
}

/// Reads the framing of a response to a request (RFC 9112 §6.3).
pub fn response_facts(
    status: u16,
    version: u8,
    headers: &[Header<'_>],
    is_head: bool,
) -> Result<ResponseFacts, BadResponse> {
    if status == 101 {
        return Err(BadResponse::Switch);
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut reusable = version == 1;
    for h in headers {
        let name = h.name;
        match name.len() {
            10 if name.eq_ignore_ascii_case("connection") => {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        reusable = false;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") && version == 0 {
                        reusable = true;
                    }
                }
            }
            14 if name.eq_ignore_ascii_case("content-length") => {
                let n = crate::policy::head::parse_length(h.value).ok_or(BadResponse::Length)?;
                if length.is_some_and(|l| l != n) {
                    return Err(BadResponse::Length);
                }
                length = Some(n);
            }
            17 if name.eq_ignore_ascii_case("transfer-encoding") => {
                if !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err(BadResponse::Coding);
                }
                chunked = true;
            }
            _ => {}
        }
    }
    let framing = if bodiless(status, is_head) {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => {
                reusable = false;
                Framing::UntilClose
            }
        }
    };
    Ok(ResponseFacts { framing, reusable })
}

/// Whether a response has no body whatever its fields say: to `HEAD`, 1xx, 204, 304.
pub fn bodiless(status: u16, is_head: bool) -> bool {
    is_head || (100..200).contains(&status) || status == 204 || status == 304
}

/// Everything besides the parsed head that shapes the response the client receives.
pub struct ResponseRewrite<'a> {
    pub status: u16,
    pub reason: &'a str,
    /// How the body reaches the client: `Chunked` when the sandbox's body runs until close.
    pub framing: Framing,
    /// Pass the sandbox's `Content-Length` on for a body that is not sent (HEAD, 304).
    pub keep_length: bool,
    pub close: bool,
    /// For `Location` rewriting: the ports the sandbox may name itself by, the gateway's
    /// public host and the route prefix.
    pub ports: [u16; 2],
    pub public_host: &'a [u8],
    pub prefix: &'a [u8],
    /// The request's id (`x-request-id`; the sandbox's own is dropped).
    pub request_id: &'a [u8],
}

/// Writes the head the client receives into `out` (cleared first).
pub fn write_response(out: &mut Vec<u8>, headers: &[Header<'_>], rw: &ResponseRewrite<'_>) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(rw.status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(rw.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    let named = connection_named(headers);
    for h in headers {
        let name = h.name.as_bytes();
        let skip = match response_field(name) {
            _ if named.contains(name) => true,
            ResponseField::Forward => false,
            ResponseField::Drop => true,
            ResponseField::Location => write_location(out, h.value, rw),
            ResponseField::Length => !rw.keep_length,
        };
        if !skip {
            put_field(out, name, h.value);
        }
    }
    put_field(out, b"x-request-id", rw.request_id);
    if !rw.keep_length {
        write_framing(out, rw.framing);
    }
    if rw.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes a rewritten `Location` field if the sandbox's one needs it; says whether it did.
fn write_location(out: &mut Vec<u8>, value: &[u8], rw: &ResponseRewrite<'_>) -> bool {
    let Ok(loc) = HeaderValue::from_bytes(value) else {
        return false;
    };
    let origin = match std::str::from_utf8(rw.public_host) {
        Ok(h) if !h.is_empty() => format!("http://{h}"),
        _ => String::new(),
    };
    let prefix = std::str::from_utf8(rw.prefix).unwrap_or("");
    match rewrite_location(&loc, &rw.ports, &origin, prefix) {
        Some(new) => {
            put_field(out, b"location", new.as_bytes());
            true
        }
        None => false,
    }
}

/// Serialises a gateway-made response (an error) as a complete HTTP/1.1 message, with the
/// request's id if it has one.
pub fn write_full(
    out: &mut Vec<u8>,
    resp: &http::Response<bytes::Bytes>,
    close: bool,
    request_id: Option<&[u8]>,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(resp.status().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.status().canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in resp.headers() {
        put_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(id) = request_id {
        put_field(out, b"x-request-id", id);
    }
    write_framing(out, Framing::Length(resp.body().len() as u64));
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(resp.body());
}

/// The value of the first field named `name` (any case).
pub fn field<'b>(headers: &[Header<'b>], name: &str) -> Option<&'b [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// The client's address as the text `X-Forwarded-For` carries, held inline (no allocation
/// per connection; no IPv6 text form is longer than 45 bytes).
pub struct IpText {
    buf: [u8; 45],
    len: usize,
}

impl std::ops::Deref for IpText {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl IpText {
    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

/// Once per connection: IPv4 as dotted decimal without `fmt` (a tenth of the instructions).
pub fn ip_text(ip: IpAddr) -> IpText {
    let mut text = IpText {
        buf: [0; 45],
        len: 0,
    };
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push(b".");
                }
                text.push(itoa::Buffer::new().format(octet).as_bytes());
            }
        }
        IpAddr::V6(v6) => {
            let mut rest = &mut text.buf[..];
            // Cannot fail: every IPv6 address's text fits.
            let _ = std::io::Write::write_fmt(&mut rest, format_args!("{v6}"));
            text.len = 45 - rest.len();
        }
    }
    text
}

fn write_framing(out: &mut Vec<u8>, framing: Framing) {
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::UntilClose => {}
    }
}

fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The field names a head's `Connection` fields list.
fn connection_named<'b>(headers: &[Header<'b>]) -> Named<'b> {
    Named::from_values(
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .map(|h| h.value),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs<'a>(pairs: &'a [(&'a str, &'a str)]) -> Vec<Header<'a>> {
        pairs
            .iter()
            .map(|(n, v)| Header {
                name: n,
                value: v.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn client_addresses_read_as_their_display_form() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.200.3.45",
            "255.255.255.255",
            "::1",
            "::ffff:1.2.3.4",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "1:2:3:4:5:6:7:8",
            "::ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(&ip_text(ip)[..], ip.to_string().as_bytes(), "{ip}");
        }
    }

    #[test]
    fn request_head_loses_hop_by_hop_and_gateway_credentials() {
        let h = hdrs(&[
            ("Host", "gw.example:8070"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic x"),
            ("X-Api-Key", "secret"),
            ("X_Api_Key", "secret"),
            ("Transfer_Encoding", "chunked"),
            ("Cookie", "a=1; sandgate_session=xyz; b=2"),
            ("Cookie", "sandgate_preview=1"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-Prefix", "/evil"),
            ("X-Forwarded-Host", "evil"),
            ("Content-Length", "3"),
            ("Authorization", "Bearer app-token"),
            ("X-End-To-End", "kept"),
        ]);
        let mut out = Vec::new();
        write_request(
            &mut out,
            &h,
            &RequestRewrite {
                method: "POST",
                path: "/a?b=1",
                upstream_port: 3000,
                client_ip: b"127.0.0.1",
                prefix: Some(b"/sandbox/sb-x"),
                framing: Framing::Length(3),
                strip_authorization: false,
                request_id: b"req-1",
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /a?b=1 HTTP/1.1\r\n\
             host: localhost:3000\r\n\
             cookie: a=1; b=2\r\n\
             Authorization: Bearer app-token\r\n\
             X-End-To-End: kept\r\n\
             x-forwarded-for: 127.0.0.1\r\n\
             x-forwarded-proto: http\r\n\
             x-forwarded-host: gw.example:8070\r\n\
             x-forwarded-prefix: /sandbox/sb-x\r\n\
             x-request-id: req-1\r\n\
             content-length: 3\r\n\r\n"
        );
    }

    /// The one field table, seen through both lanes' writers: the same fields in, the same
    /// fields (names without case, values) out.
    #[test]
    fn both_lanes_forward_the_same_request_fields() {
        let pairs = [
            ("Host", "gw.example:8070"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "x-api-key"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic x"),
            ("X-Api-Key", "secret"),
            ("X_Api_Key", "secret"),
            ("Transfer_Encoding", "chunked"),
            ("Cookie", "a=1; sandgate_session=xyz; b=2"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Prefix", "/evil"),
            ("X-Forwarded-Host", "evil"),
            ("Authorization", "Bearer app-token"),
            ("Accept", "*/*"),
            (
                "X-Request-Id",
                "the client's, replaced by the lane's choice",
            ),
            ("X-End-To-End", "kept"),
        ];
        let mut fast = Vec::new();
        write_request(
            &mut fast,
            &hdrs(&pairs),
            &RequestRewrite {
                method: "GET",
                path: "/",
                upstream_port: 3000,
                client_ip: b"127.0.0.1",
                prefix: Some(b"/sandbox/sb-x"),
                framing: Framing::Empty,
                strip_authorization: true,
                request_id: b"req-1",
            },
        );
        let text = String::from_utf8(fast).unwrap();
        let mut fast_fields: Vec<(String, String)> = text
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(": ").unwrap();
                (n.to_ascii_lowercase(), v.to_string())
            })
            .collect();
        let mut map = http::HeaderMap::new();
        for (n, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        let host = HeaderValue::from_static("gw.example:8070");
        let prefix = HeaderValue::from_static("/sandbox/sb-x");
        let out = crate::proxy::headers::upstream_request_headers(
            &map,
            &crate::proxy::headers::Forwarded {
                client_ip: "127.0.0.1".parse().unwrap(),
                proto: "http",
                host: Some(&host),
                prefix: Some(&prefix),
                upstream_port: 3000,
                strip_authorization: true,
                request_id: "req-1",
            },
            None,
        );
        let mut hyper_fields: Vec<(String, String)> = out
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        fast_fields.sort();
        hyper_fields.sort();
        assert_eq!(fast_fields, hyper_fields);
        let names: Vec<&str> = fast_fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "accept",
                "cookie",
                "host",
                "x-end-to-end",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-prefix",
                "x-forwarded-proto",
                "x-request-id"
            ]
        );
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let facts =
            |status, pairs: &[(&str, &str)], head| response_facts(status, 1, &hdrs(pairs), head);
        let ok = |f: Framing, reusable| {
            Ok(ResponseFacts {
                framing: f,
                reusable,
            })
        };
        assert_eq!(
            facts(200, &[("content-length", "10")], false),
            ok(Framing::Length(10), true)
        );
        assert_eq!(
            facts(200, &[("content-length", "10")], true),
            ok(Framing::Empty, true)
        );
        assert_eq!(facts(204, &[], false), ok(Framing::Empty, true));
        assert_eq!(
            facts(304, &[("content-length", "10")], false),
            ok(Framing::Empty, true)
        );
        assert_eq!(
            facts(200, &[("transfer-encoding", "chunked")], false),
            ok(Framing::Chunked, true)
        );
        assert_eq!(facts(200, &[], false), ok(Framing::UntilClose, false));
        assert_eq!(
            facts(
                200,
                &[("connection", "close"), ("content-length", "1")],
                false
            ),
            ok(Framing::Length(1), false)
        );
        assert_eq!(
            response_facts(200, 0, &hdrs(&[("content-length", "1")]), false),
            ok(Framing::Length(1), false)
        );
        assert_eq!(
            facts(
                200,
                &[("content-length", "1"), ("content-length", "2")],
                false
            ),
            Err(BadResponse::Length)
        );
        assert_eq!(
            facts(200, &[("transfer-encoding", "gzip")], false),
            Err(BadResponse::Coding)
        );
        assert_eq!(facts(101, &[], false), Err(BadResponse::Switch));
    }

    #[test]
    fn response_head_is_cleaned_and_location_rewritten() {
        let h = hdrs(&[
            ("Content-Type", "text/plain"),
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("Location", "http://127.0.0.1:3000/next"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ]);
        let mut out = Vec::new();
        write_response(
            &mut out,
            &h,
            &ResponseRewrite {
                status: 302,
                reason: "Found",
                framing: Framing::Chunked,
                keep_length: false,
                close: true,
                ports: [3000, 21000],
                public_host: b"gw:8070",
                prefix: b"/sandbox/sb-x",
                request_id: b"req-1",
            },
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 302 Found\r\n\
             Content-Type: text/plain\r\n\
             location: http://gw:8070/sandbox/sb-x/next\r\n\
             Set-Cookie: a=1\r\n\
             Set-Cookie: b=2\r\n\
             x-request-id: req-1\r\n\
             transfer-encoding: chunked\r\n\
             connection: close\r\n\r\n"
        );
    }

    #[test]
    fn only_plain_paths_take_the_fast_lane() {
        assert!(plain_target("/sandbox/sb-x/a?b=1&c=%20"));
        assert!(!plain_target("http://example.com/"));
        assert!(!plain_target("*"));
        assert!(!plain_target("/a{b}"));
        assert!(!plain_target("/a\"b"));
    }
}
