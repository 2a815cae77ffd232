//! Header rules for proxied messages: hop-by-hop removal (RFC 9110 §7.6.1), the gateway's own
//! credentials stripped before a request reaches a sandbox, `X-Forwarded-*`, and `Location`
//! rewriting so redirects point back through the gateway.

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Cookies whose name starts with this belong to the gateway and never reach a sandbox.
pub const GATEWAY_COOKIE_PREFIX: &str = "sandgate";
/// The query parameter that carries a gateway credential (a preview token); never forwarded.
pub const GATEWAY_QUERY_PARAM: &str = "sandgate_token";

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What becomes of a request header field on its way to a sandbox. This table is the one
/// both proxy lanes use (the fast lane writing a head from `httparse` fields, the hyper lane
/// rebuilding a `HeaderMap`), so a rule is never written twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestField {
    /// Passed on as it is.
    Forward,
    /// Never passed on: hop-by-hop (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and
    /// `Proxy-Connection`; an allowed protocol switch re-adds its own pair), a gateway
    /// credential (`X-API-Key`), a field the gateway sets itself (`X-Forwarded-For/Host/
    /// Proto/Prefix`: a client's own `X-Forwarded-For` is believed only from a trusted proxy,
    /// and then already resolved into the one address the gateway writes), or a name the gateway does not accept as it is (an underscore: nginx's
    /// default, since `X_API_Key` or `Transfer_Encoding` may mean something to a sandbox's
    /// server that the gateway did not check).
    Drop,
    /// `Host`: the sandbox gets `localhost:{port}`; the client's goes to `X-Forwarded-Host`.
    Host,
    /// `Cookie`: passed on without the gateway's own cookies (`sandgate*`).
    Cookie,
    /// `Content-Length`: the lane states the framing it forwards.
    Length,
    /// `Authorization`: dropped when the gateway authenticated the request with it (a
    /// sandbox's own scheme, e.g. Basic on a public port, passes).
    Authorization,
}

/// The rule for request field `name` (any case).
pub fn request_field(name: &[u8]) -> RequestField {
    use RequestField::*;
    if name.contains(&b'_') {
        return Drop;
    }
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    match name.len() {
        2 if is("te") => Drop,
        4 if is("host") => Host,
        6 if is("cookie") => Cookie,
        7 if is("trailer") || is("upgrade") => Drop,
        9 if is("x-api-key") => Drop,
        10 if is("connection") || is("keep-alive") => Drop,
        // The lane writes the request's id itself (the client's, if sane).
        12 if is("x-request-id") => Drop,
        13 if is("authorization") => Authorization,
        14 if is("content-length") => Length,
        15 if is("x-forwarded-for") => Drop,
        16 if is("x-forwarded-host") || is("proxy-connection") => Drop,
        17 if is("transfer-encoding") || is("x-forwarded-proto") => Drop,
        18 if is("proxy-authenticate") || is("x-forwarded-prefix") => Drop,
        19 if is("proxy-authorization") => Drop,
        _ => Forward,
    }
}

/// What becomes of a response header field on its way from a sandbox to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseField {
    Forward,
    /// Hop-by-hop (the lane states its own framing and connection handling).
    Drop,
    /// `Location`: rewritten when it points at the sandbox itself.
    Location,
    /// `Content-Length`: kept or restated by the lane.
    Length,
}

/// The rule for response field `name` (any case).
pub fn response_field(name: &[u8]) -> ResponseField {
    use ResponseField::*;
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    match name.len() {
        2 if is("te") => Drop,
        7 if is("trailer") || is("upgrade") => Drop,
        8 if is("location") => Location,
        10 if is("connection") || is("keep-alive") => Drop,
        // The client gets the id the gateway logged, not the sandbox's.
        12 if is("x-request-id") => Drop,
        14 if is("content-length") => Length,
        16 if is("proxy-connection") => Drop,
        17 if is("transfer-encoding") => Drop,
        18 if is("proxy-authenticate") => Drop,
        _ => Forward,
    }
}

/// Field names listed in `Connection` (hop-by-hop by RFC 9110 §7.6.1) besides the ones every
/// message loses anyway. Up to eight names are kept inline (no allocation); beyond that the
/// raw `Connection` values (up to four fields) are searched. A head with more `Connection`
/// fields than that is abuse: then every field not needed to forward it counts as listed.
pub struct Named<'b> {
    names: [&'b [u8]; 8],
    len: usize,
    /// More names than `names` holds: search `values`.
    many: bool,
    values: [&'b [u8]; 4],
    /// More `Connection` fields than `values` holds.
    overflow: bool,
}

impl<'b> Named<'b> {
    /// The names listed in the `Connection` values given.
    pub fn from_values(values: impl Iterator<Item = &'b [u8]>) -> Named<'b> {
        let mut named = Named {
            names: [&[]; 8],
            len: 0,
            many: false,
            values: [&[]; 4],
            overflow: false,
        };
        for (i, v) in values.enumerate() {
            match named.values.get_mut(i) {
                Some(slot) => *slot = v,
                None => named.overflow = true,
            }
            for t in tokens(v) {
                if t.eq_ignore_ascii_case(b"close")
                    || t.eq_ignore_ascii_case(b"keep-alive")
                    || t.eq_ignore_ascii_case(b"upgrade")
                {
                    continue;
                }
                if named.len < named.names.len() {
                    named.names[named.len] = t;
                    named.len += 1;
                } else {
                    named.many = true;
                }
            }
        }
        named
    }

    /// Whether field `name` is listed (and so hop-by-hop).
    pub fn contains(&self, name: &[u8]) -> bool {
        if self.overflow {
            return true;
        }
        self.names[..self.len]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
            || (self.many
                && self
                    .values
                    .iter()
                    .any(|v| tokens(v).any(|t| t.eq_ignore_ascii_case(name))))
    }
}

/// The comma-separated tokens of a field value, trimmed, without empty ones.
pub fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Appends the cookie pairs of `value` that are not the gateway's own to `out`, with `"; "`
/// between pairs (and before the first if `out` already holds pairs past `start`).
pub fn cookies_without_ours(value: &[u8], out: &mut Vec<u8>, start: usize) {
    for c in value.split(|&b| b == b';').map(<[u8]>::trim_ascii) {
        if c.is_empty() || is_gateway_cookie(c) {
            continue;
        }
        if out.len() > start {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(c);
    }
}

/// Whether a cookie pair is the gateway's own: its name starts with `sandgate`, in any case
/// (so no spelling of one reaches a sandbox).
fn is_gateway_cookie(pair: &[u8]) -> bool {
    let p = GATEWAY_COOKIE_PREFIX.as_bytes();
    pair.len() >= p.len() && pair[..p.len()].eq_ignore_ascii_case(p)
}

/// Whether a `Cookie` value may hold a gateway cookie (then it must be filtered).
pub fn has_gateway_cookie(v: &[u8]) -> bool {
    let p = GATEWAY_COOKIE_PREFIX.as_bytes();
    v.windows(p.len()).any(|w| w.eq_ignore_ascii_case(p))
}

/// The query without the gateway's credential parameter, or `None` if it has none (the
/// common case, which costs one scan). Parameters are compared by name, before any `=`.
pub fn query_without_credentials(query: &str) -> Option<String> {
    let p = GATEWAY_QUERY_PARAM;
    if !query.contains(p) {
        return None;
    }
    let is_ours = |pair: &&str| pair.split('=').next() == Some(p);
    if !query.split('&').any(|pair| is_ours(&pair)) {
        return None;
    }
    Some(
        query
            .split('&')
            .filter(|pair| !is_ours(pair) && !pair.is_empty())
            .collect::<Vec<_>>()
            .join("&"),
    )
}

/// The request's `Upgrade` protocol if it asks to switch (`Connection: upgrade` and an
/// `Upgrade` value).
pub fn upgrade_requested(headers: &HeaderMap) -> Option<&HeaderValue> {
    let asked = headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"upgrade")));
    asked.then(|| headers.get(header::UPGRADE)).flatten()
}

/// The fields a sandbox receives for a request (hyper lane): the table applied to `headers`,
/// then `X-Forwarded-*`, `Host` and, for an allowed protocol switch, its `Connection`/`Upgrade`
/// pair.
pub fn upstream_request_headers(
    headers: &HeaderMap,
    forwarded: &Forwarded<'_>,
    upgrade: Option<&HeaderValue>,
) -> HeaderMap {
    let named = Named::from_values(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .map(HeaderValue::as_bytes),
    );
    let mut out = HeaderMap::with_capacity(headers.len() + 6);
    let mut cookies: Option<Vec<u8>> = None;
    for (name, value) in headers {
        let n = name.as_str().as_bytes();
        if named.contains(n) {
            continue;
        }
        match request_field(n) {
            RequestField::Authorization if forwarded.strip_authorization => {}
            RequestField::Forward | RequestField::Length | RequestField::Authorization => {
                out.append(name.clone(), value.clone());
            }
            RequestField::Drop | RequestField::Host => {}
            RequestField::Cookie => {
                cookies_without_ours(value.as_bytes(), cookies.get_or_insert_with(Vec::new), 0)
            }
        }
    }
    if let Some(c) = cookies.filter(|c| !c.is_empty()) {
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(c)) {
            out.insert(header::COOKIE, v);
        }
    }
    set_forwarded(&mut out, forwarded);
    if let Some(protocol) = upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        out.insert(header::UPGRADE, protocol.clone());
    }
    out
}

/// What the gateway tells a sandbox about the request it forwards.
pub struct Forwarded<'a> {
    /// The client's address as the request policy resolved it (`crate::addresses`): the
    /// whole of the `X-Forwarded-For` a sandbox receives.
    pub client_ip: std::net::IpAddr,
    pub proto: &'static str,
    /// The client's `Host` (or absolute-form authority).
    pub host: Option<&'a HeaderValue>,
    /// The route prefix, for path routes.
    pub prefix: Option<&'a HeaderValue>,
    /// The sandbox port dialled: `Host: localhost:{port}`.
    pub upstream_port: u16,
    /// Leave out `Authorization` (the gateway's credential).
    pub strip_authorization: bool,
    /// The request's id (`x-request-id`).
    pub request_id: &'a str,
}

/// Removes hop-by-hop fields from a response (hyper lane), including every field named in
/// `Connection`. With `keep_upgrade` the `Connection: upgrade` and `Upgrade` pair survives, as
/// a protocol switch needs them.
pub fn strip_response_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    let named: Vec<HeaderName> = {
        let named = Named::from_values(
            headers
                .get_all(header::CONNECTION)
                .iter()
                .map(HeaderValue::as_bytes),
        );
        headers
            .keys()
            .filter(|n| {
                named.contains(n.as_str().as_bytes())
                    || response_field(n.as_str().as_bytes()) == ResponseField::Drop
            })
            .cloned()
            .collect()
    };
    for n in named {
        headers.remove(n);
    }
    if let Some(u) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u);
    }
}

/// Sets the `Host` a sandbox receives: `localhost:{port}`, the port it is dialed on.
pub fn set_upstream_host(headers: &mut HeaderMap, port: u16) {
    let mut host = BytesMut::with_capacity(16);
    host.put_slice(b"localhost:");
    host.put_slice(itoa::Buffer::new().format(port).as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(host.freeze()) {
        headers.insert(header::HOST, v);
    }
}

/// Sets `X-Forwarded-For` (the client's address), `-Proto`, `-Host`, `-Prefix` (path routes)
/// and `Host: localhost:{port}`.
fn set_forwarded(headers: &mut HeaderMap, f: &Forwarded<'_>) {
    let mut buf = BytesMut::with_capacity(48);
    use std::fmt::Write;
    let _ = write!(buf, "{}", f.client_ip);
    if let Ok(v) = HeaderValue::from_maybe_shared(buf.freeze()) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(f.proto));
    if let Some(h) = f.host {
        headers.insert(X_FORWARDED_HOST, h.clone());
    }
    if let Some(p) = f.prefix {
        headers.insert(X_FORWARDED_PREFIX, p.clone());
    }
    set_upstream_host(headers, f.upstream_port);
    if let Ok(v) = HeaderValue::from_str(f.request_id) {
        headers.insert(X_REQUEST_ID, v);
    }
}

/// Rewrites a `Location` that points at the sandbox's own origin (`http://localhost:PORT/...`
/// or `http://127.0.0.1:PORT/...`) to the gateway's public origin, and a root-relative one
/// (`/...`) on a path route to include the route's prefix. Returns `None` to leave it alone.
pub fn rewrite_location(
    location: &HeaderValue,
    upstream_ports: &[u16],
    public_origin: &str,
    prefix: &str,
) -> Option<HeaderValue> {
    let loc = location.to_str().ok()?;
    let path = if let Some(rest) = loc
        .strip_prefix("http://")
        .or_else(|| loc.strip_prefix("https://"))
    {
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = authority.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let local = matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "0.0.0.0");
        if !local || !upstream_ports.contains(&port) {
            return None;
        }
        if path.is_empty() {
            "/"
        } else {
            path
        }
    } else if loc.starts_with('/') && !loc.starts_with("//") && !prefix.is_empty() {
        if loc == prefix || loc.starts_with(&format!("{prefix}/")) {
            return None;
        }
        return HeaderValue::from_str(&format!("{prefix}{loc}")).ok();
    } else {
        return None;
    };
    HeaderValue::from_str(&format!("{public_origin}{prefix}{path}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn forwarded<'a>(
        host: Option<&'a HeaderValue>,
        prefix: Option<&'a HeaderValue>,
    ) -> Forwarded<'a> {
        Forwarded {
            client_ip: "127.0.0.1".parse().unwrap(),
            proto: "http",
            host,
            prefix,
            upstream_port: 3000,
            strip_authorization: false,
            request_id: "abc",
        }
    }

    #[test]
    fn request_fields_lose_hop_by_hop_credentials_and_underscored_names() {
        let h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-api-key", "secret"),
            ("x_api_key", "secret"),
            ("transfer_encoding", "chunked"),
            ("cookie", "a=1; sandgate_session=xyz; b=2"),
            ("cookie", "sandgate_preview=1"),
            ("authorization", "Bearer app-token"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-prefix", "/evil"),
            ("x-forwarded-host", "evil"),
            ("content-length", "3"),
            ("x-end-to-end", "kept"),
        ]);
        let host = HeaderValue::from_static("gw.example:8070");
        let out = upstream_request_headers(&h, &forwarded(Some(&host), None), None);
        let mut names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "authorization",
                "content-length",
                "cookie",
                "host",
                "x-end-to-end",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
                "x-request-id"
            ]
        );
        assert_eq!(out["cookie"], "a=1; b=2");
        // Unless the gateway authenticated the request with it, Authorization is the app's.
        assert_eq!(out["authorization"], "Bearer app-token");
        let consumed = Forwarded {
            strip_authorization: true,
            ..forwarded(Some(&host), None)
        };
        let out = upstream_request_headers(&h, &consumed, None);
        assert!(!out.contains_key("authorization"));
        // The client's own X-Forwarded-For is replaced by the address the policy resolved.
        assert_eq!(out["x-forwarded-for"], "127.0.0.1");
        assert_eq!(out["x-forwarded-host"], "gw.example:8070");
        assert_eq!(out["host"], "localhost:3000");
        let only_ours = map(&[("cookie", "sandgate_session=xyz")]);
        let out = upstream_request_headers(&only_ours, &forwarded(None, None), None);
        assert!(out.get("cookie").is_none());
    }

    #[test]
    fn an_allowed_switch_keeps_its_upgrade_pair() {
        let h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "abc"),
        ]);
        let protocol = upgrade_requested(&h).cloned();
        assert_eq!(protocol.as_ref().unwrap(), "websocket");
        let prefix = HeaderValue::from_static("/sandbox/sb-x");
        let out = upstream_request_headers(&h, &forwarded(None, Some(&prefix)), protocol.as_ref());
        assert_eq!(out["connection"], "upgrade");
        assert_eq!(out["upgrade"], "websocket");
        assert_eq!(out["sec-websocket-key"], "abc");
        assert_eq!(out["x-forwarded-prefix"], "/sandbox/sb-x");
        assert!(upgrade_requested(&map(&[("upgrade", "websocket")])).is_none());
        // A switch the policy did not allow is not asked of the sandbox.
        let out = upstream_request_headers(&h, &forwarded(None, None), None);
        assert!(out.get("upgrade").is_none() && out.get("connection").is_none());
    }

    #[test]
    fn response_fields_lose_hop_by_hop() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("content-length", "2"),
            ("x-end-to-end", "kept"),
        ]);
        strip_response_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-end-to-end"]);
    }

    #[test]
    fn many_connection_fields_drop_everything_optional() {
        let values = ["a", "b", "c", "d", "e"];
        let named = Named::from_values(values.iter().map(|v| v.as_bytes()));
        assert!(named.contains(b"anything"));
        let names = "n1, n2, n3, n4, n5, n6, n7, n8, n9, n10";
        let named = Named::from_values([names.as_bytes()].into_iter());
        assert!(named.contains(b"n10") && named.contains(b"N1") && !named.contains(b"n11"));
    }

    #[test]
    fn the_credential_query_parameter_is_removed() {
        assert_eq!(query_without_credentials("a=1&b=2"), None);
        assert_eq!(query_without_credentials("sandgate_tokenx=1"), None);
        assert_eq!(
            query_without_credentials("a=1&sandgate_token=s3cret&b=2").as_deref(),
            Some("a=1&b=2")
        );
        assert_eq!(
            query_without_credentials("sandgate_token=s3cret").as_deref(),
            Some("")
        );
        assert_eq!(
            query_without_credentials("sandgate_token&x=1").as_deref(),
            Some("x=1")
        );
    }

    #[test]
    fn location_rewrites() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        let origin = "http://gw:8070";
        let pre = "/sandbox/sb-x";
        let r = |loc, prefix| rewrite_location(&v(loc), &[3000, 20001], origin, prefix);
        assert_eq!(
            r("http://127.0.0.1:20001/a?b=1", pre).unwrap(),
            "http://gw:8070/sandbox/sb-x/a?b=1"
        );
        assert_eq!(r("http://localhost:3000", "").unwrap(), "http://gw:8070/");
        assert_eq!(r("/login", pre).unwrap(), "/sandbox/sb-x/login");
        assert_eq!(r("/sandbox/sb-x/login", pre), None);
        assert_eq!(r("/login", ""), None);
        assert_eq!(r("https://example.com/x", pre), None);
        assert_eq!(r("http://127.0.0.1:22/x", pre), None);
        assert_eq!(r("//evil.example/x", pre), None);
        assert_eq!(r("relative", pre), None);
    }
}
