//! The control API's entry check against cross-site requests and DNS rebinding: every request
//! must name the gateway as its host (else 421), and a state-changing one (POST, PUT, PATCH,
//! DELETE) must come from no `Origin` or the gateway's own (else 403) and, if it has a body,
//! send it as `application/json` (else 415), which a browser cannot do cross-site without a
//! CORS preflight the gateway never grants.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, ORIGIN, TRANSFER_ENCODING};
use http::uri::Authority;
use http::{HeaderMap, Method, Uri};
use http_body::Body as _;

use crate::config::Config;
use crate::error::Error;

/// The names the control API answers to, from the configuration.
#[derive(Debug)]
pub struct Guard {
    /// `localhost`, the domain, the public URL's host and exact `allowed_hosts` entries.
    names: Vec<String>,
    /// `.suffix` entries of `allowed_hosts` (with their dot).
    suffixes: Vec<String>,
    /// `allowed_hosts` holds `*`: any `Host` (origins are still checked by name).
    any_host: bool,
}

impl Guard {
    pub fn new(config: &Config) -> Guard {
        let mut names = vec!["localhost".to_string(), config.domain.to_ascii_lowercase()];
        let public_host = config.public_url.as_deref().and_then(|u| {
            let uri = u.parse::<Uri>().ok()?;
            Some(uri.host()?.to_ascii_lowercase())
        });
        names.extend(public_host);
        let mut suffixes = Vec::new();
        let mut any_host = false;
        for h in &config.allowed_hosts {
            match h.as_str() {
                "*" => any_host = true,
                s if s.starts_with('.') => suffixes.push(s.to_string()),
                s => names.push(s.to_string()),
            }
        }
        Guard {
            names,
            suffixes,
            any_host,
        }
    }

    /// Whether `host` (lowercase, no port) is one of the configured names: exact, or equal to
    /// or under a `.suffix` entry.
    fn named(&self, host: &str) -> bool {
        self.names.iter().any(|n| n == host)
            || self
                .suffixes
                .iter()
                .any(|s| host.ends_with(s.as_str()) || host == &s[1..])
    }

    /// Whether the API answers to `host` (lowercase, no port).
    fn host_allowed(&self, host: &str) -> bool {
        self.any_host || is_ip_literal(host) || self.named(host)
    }

    /// The host the request is addressed to (lowercase, no port), if the API answers to it:
    /// an absolute-form (or HTTP/2) authority wins and the `Host` field is then ignored (RFC
    /// 9112 §3.2.2), as in the request policy's routing; otherwise the `Host` field.
    fn check_host(&self, req: &Request) -> Result<String, Error> {
        let named = match req.uri().authority() {
            Some(a) => Some(a.as_str().to_string()),
            None => req
                .headers()
                .get(HOST)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        };
        let named = named.ok_or_else(|| Error::ForbiddenHost(String::new()))?;
        match host_of(&named) {
            Some(host) if self.host_allowed(&host) => Ok(host),
            _ => Err(Error::ForbiddenHost(named)),
        }
    }

    /// Refuses an `Origin` other than the gateway's own: `http(s)://` and the host the
    /// request was addressed to or a configured name (never by `*`), any port. `null` (a
    /// sandboxed frame, a redirect across sites) is refused.
    fn check_origin(&self, headers: &HeaderMap, host: &str) -> Result<(), Error> {
        let mut origins = headers.get_all(ORIGIN).iter();
        let Some(origin) = origins.next() else {
            return Ok(()); // not a browser: curl, SDKs
        };
        let text = String::from_utf8_lossy(origin.as_bytes());
        let allowed = origins.next().is_none()
            && origin_host(&text).is_some_and(|o| o == host || self.named(&o));
        match allowed {
            true => Ok(()),
            false => Err(Error::ForbiddenOrigin(text.into_owned())),
        }
    }
}

/// The middleware: the host check for every request, the origin and media-type checks for
/// state-changing ones. A protocol upgrade (seed 004's command socket) changes state too: its
/// origin is checked (cross-site WebSocket hijacking), though it has no body.
pub async fn check(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    match admit(&guard, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn admit(guard: &Guard, req: &Request) -> Result<(), Error> {
    let host = guard.check_host(req)?;
    let upgrade = req.headers().contains_key(http::header::UPGRADE);
    if !changes_state(req.method()) && !upgrade {
        return Ok(());
    }
    guard.check_origin(req.headers(), &host)?;
    if changes_state(req.method()) && has_body(req) {
        let ctypes: Vec<_> = req.headers().get_all(CONTENT_TYPE).iter().collect();
        let bytes_ok = takes_bytes(req.uri().path());
        let ok = match ctypes.as_slice() {
            [one] => one
                .to_str()
                .is_ok_and(|v| is_json(v) || (bytes_ok && is_octet_stream(v))),
            _ => false,
        };
        if !ok {
            let got = match ctypes.as_slice() {
                [] => "none".to_string(),
                all => all
                    .iter()
                    .map(|v| format!("{:?}", String::from_utf8_lossy(v.as_bytes())))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            return Err(Error::UnsupportedMediaType(got));
        }
    }
    Ok(())
}

fn changes_state(method: &Method) -> bool {
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method)
}

/// Whether the request carries a body: `Content-Length` above 0 (or unreadable),
/// `Transfer-Encoding`, or (HTTP/2) a stream not ended with its headers.
fn has_body(req: &Request) -> bool {
    let h = req.headers();
    let length = h
        .get(CONTENT_LENGTH)
        .map(|v| v.to_str().ok()?.parse::<u64>().ok());
    h.contains_key(TRANSFER_ENCODING)
        || length.is_some_and(|n| n != Some(0))
        || !req.body().is_end_stream()
}

/// Routes whose body is raw bytes (`application/octet-stream`), not JSON: a background
/// command's stdin, a file upload. Cross-site, such a body still needs a CORS preflight the gateway never
/// grants.
fn takes_bytes(path: &str) -> bool {
    let segs: Vec<_> = path.trim_start_matches('/').split('/').collect();
    matches!(
        segs.as_slice(),
        ["sandboxes", _, "exec", _, "stdin"] | ["sandboxes", _, "files"]
    )
}

fn is_octet_stream(value: &str) -> bool {
    value
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/octet-stream"))
}

/// `application/json`, any case, optionally with `charset=utf-8` and nothing else.
fn is_json(value: &str) -> bool {
    let mut parts = value.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|t| t.eq_ignore_ascii_case("application/json"))
    {
        return false;
    }
    match (parts.next(), parts.next()) {
        (None, _) => true,
        (Some(p), None) => {
            p.eq_ignore_ascii_case("charset=utf-8") || p.eq_ignore_ascii_case("charset=\"utf-8\"")
        }
        _ => false,
    }
}

/// The host of an authority (`host[:port]`, `[v6][:port]`), lowercase, without a trailing
/// dot; `None` if it is not an authority or carries user information.
fn host_of(authority: &str) -> Option<String> {
    let a = authority.parse::<Authority>().ok()?;
    if a.as_str().contains('@') || a.host().is_empty() {
        return None;
    }
    let host = a.host().to_ascii_lowercase();
    Some(match host.strip_suffix('.') {
        Some(h) => h.to_string(),
        None => host,
    })
}

/// The host of a serialised origin (`http(s)://host[:port]`, nothing after it).
fn origin_host(origin: &str) -> Option<String> {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))?;
    host_of(rest)
}

/// An IPv4 address in dotted-decimal form, or an IPv6 address in brackets.
fn is_ip_literal(host: &str) -> bool {
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => host.parse::<Ipv4Addr>().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(allowed: &[&str]) -> Guard {
        let mut c = Config::for_data_dir("/nonexistent");
        c.domain = "sandbox.test".into();
        c.public_url = Some("https://Gate.Example.com:8443/base".into());
        c.allowed_hosts = allowed.iter().map(|s| s.to_string()).collect();
        Guard::new(&c)
    }

    #[test]
    fn json_media_type_is_exact() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            "application/json; charset=\"utf-8\"",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in [
            "",
            "text/plain",
            "text/plain; charset=+json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
            "application/json; foo=bar",
            "application/json; charset=latin1",
            "application/json; charset=utf-8; foo=bar",
            "application/json;",
            "application/vnd.api+json",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }

    #[test]
    fn hosts_the_api_answers_to() {
        let g = guard(&["api.internal", ".corp.example"]);
        let ok = |a: &str| host_of(a).is_some_and(|h| g.host_allowed(&h));
        for a in [
            "127.0.0.1:8070",
            "10.1.2.3",
            "[::1]:8070",
            "localhost:8070",
            "LOCALHOST",
            "localhost.",
            "sandbox.test:80",
            "gate.example.com",
            "api.internal:1",
            "corp.example",
            "a.b.corp.example:9",
        ] {
            assert!(ok(a), "{a}");
        }
        for a in [
            "evil.example",
            "x.localhost",
            "127.0.0.1.evil.example",
            "0x7f.1",
            "evilcorp.example",
            "api.internal.evil.example",
            "user@localhost",
            "",
            "[::1",
        ] {
            assert!(!ok(a), "{a}");
        }
        let any = guard(&["*"]);
        assert!(any.host_allowed("evil.example"));
        assert!(!any.named("evil.example"), "* is not a name for origins");
    }

    #[test]
    fn origins_are_the_gateways_own() {
        let g = guard(&[]);
        let ok = |origin: &str, host: &str| {
            let mut h = HeaderMap::new();
            h.insert(ORIGIN, origin.parse().unwrap());
            g.check_origin(&h, host).is_ok()
        };
        assert!(ok("http://127.0.0.1:8070", "127.0.0.1"));
        assert!(ok("http://localhost:3000", "127.0.0.1"));
        assert!(ok("https://gate.example.com", "gate.example.com"));
        assert!(!ok("http://evil.example", "127.0.0.1"));
        assert!(
            !ok("http://10.0.0.9:8070", "127.0.0.1"),
            "another IP's page"
        );
        assert!(!ok("null", "127.0.0.1"));
        assert!(!ok("ftp://127.0.0.1", "127.0.0.1"));
        assert!(!ok("http://127.0.0.1/path", "127.0.0.1"));
        assert!(!ok("http://3000-sb-abc.sandbox.test", "sandbox.test"));
        assert!(g.check_origin(&HeaderMap::new(), "127.0.0.1").is_ok());
    }
}
