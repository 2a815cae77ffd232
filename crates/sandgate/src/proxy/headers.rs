//! Header rules for proxied messages: hop-by-hop removal (RFC 9110 §7.6.1), the gateway's own
//! credentials stripped before a request reaches a sandbox, `X-Forwarded-*`, and `Location`
//! rewriting so redirects point back through the gateway.

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop fields (RFC 9110 §7.6.1, plus the legacy `Keep-Alive` and `Proxy-Connection`).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Cookies whose name starts with this belong to the gateway and never reach a sandbox.
pub const GATEWAY_COOKIE_PREFIX: &str = "sandgate";
/// Request headers that carry gateway credentials or gateway-internal data.
const GATEWAY_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Whether the message asks to switch to the WebSocket (or another) protocol.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Removes hop-by-hop fields, including every field named in `Connection`. With `keep_upgrade`
/// the `Connection: upgrade` and `Upgrade` pair survives, as a protocol switch needs them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Fields listed in Connection are hop-by-hop too (RFC 9110 §7.6.1). The common case names
    // only keep-alive/close/upgrade, so collect nothing unless there is something else.
    let mut named: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            for t in s.split(',').map(str::trim) {
                if t.is_empty()
                    || t.eq_ignore_ascii_case("close")
                    || t.eq_ignore_ascii_case("keep-alive")
                    || t.eq_ignore_ascii_case("upgrade")
                {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                    named.push(n);
                }
            }
        }
    }
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Strips the gateway's own credentials: `X-API-Key` and `sandgate*` cookies.
pub fn strip_gateway_credentials(headers: &mut HeaderMap) {
    headers.remove(GATEWAY_API_KEY);
    let has_ours = headers
        .get_all(header::COOKIE)
        .iter()
        .any(|v| contains_gateway_cookie(v.as_bytes()));
    if !has_ours {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with(GATEWAY_COOKIE_PREFIX))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

fn contains_gateway_cookie(v: &[u8]) -> bool {
    let p = GATEWAY_COOKIE_PREFIX.as_bytes();
    v.windows(p.len()).any(|w| w == p)
}

/// Appends the client to `X-Forwarded-For` and sets `X-Forwarded-Proto/Host` (and `-Prefix`
/// for path routes).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client_ip: std::net::IpAddr,
    proto: &'static str,
    host: Option<&HeaderValue>,
    prefix: Option<&HeaderValue>,
) {
    let mut buf = BytesMut::with_capacity(64);
    if let Some(prev) = headers.get(&X_FORWARDED_FOR) {
        buf.put_slice(prev.as_bytes());
        buf.put_slice(b", ");
    }
    use std::fmt::Write;
    let _ = write!(buf, "{client_ip}");
    if let Ok(v) = HeaderValue::from_maybe_shared(buf.freeze()) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h.clone());
    }
    match prefix {
        Some(p) => {
            headers.insert(X_FORWARDED_PREFIX, p.clone());
        }
        None => {
            headers.remove(X_FORWARDED_PREFIX);
        }
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

    #[test]
    fn strips_hop_by_hop_and_fields_named_in_connection() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-end-to-end"]);
    }

    #[test]
    fn keeps_the_upgrade_pair_for_websockets() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "abc"),
        ]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "abc");
        assert!(!is_upgrade(&map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn gateway_credentials_never_pass() {
        let mut h = map(&[
            ("x-api-key", "secret"),
            ("cookie", "a=1; sandgate_session=xyz; b=2"),
            ("cookie", "sandgate_preview=1"),
            ("authorization", "Bearer app-token"),
        ]);
        strip_gateway_credentials(&mut h);
        assert!(h.get("x-api-key").is_none());
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
        // Without gateway auth enabled, Authorization belongs to the app.
        assert_eq!(h["authorization"], "Bearer app-token");
        let mut only_ours = map(&[("cookie", "sandgate_session=xyz")]);
        strip_gateway_credentials(&mut only_ours);
        assert!(only_ours.get("cookie").is_none());
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-prefix", "/evil"),
        ]);
        let host = HeaderValue::from_static("gw.example:8070");
        set_forwarded(
            &mut h,
            "127.0.0.1".parse().unwrap(),
            "http",
            Some(&host),
            None,
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "gw.example:8070");
        assert!(h.get("x-forwarded-prefix").is_none());
        let prefix = HeaderValue::from_static("/sandbox/sb-x");
        set_forwarded(&mut h, "::1".parse().unwrap(), "http", None, Some(&prefix));
        assert_eq!(h["x-forwarded-prefix"], "/sandbox/sb-x");
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
