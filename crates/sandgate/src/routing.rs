//! Request → route: which sandbox (by id or `owner/name`), which port, and which path prefix,
//! or the control API. Pure functions over the host and path, so they are unit-tested here.
//!
//! Precedence: host `{port}-{id}.{domain}` first; then `/sandbox/{id}/...`; then
//! `/{owner}/{name}/...` when the first segment is not one of the API's own; else the API.

use crate::error::Error;
use crate::model::{valid_id, valid_label, RESERVED_OWNERS};

/// How a request names a sandbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `{port}-{id}.{domain}`: the whole path goes to `port`.
    Host {
        id: &'a str,
        port: u16,
    },
    /// `/sandbox/{id}/rest`: `prefix` is `/sandbox/{id}`.
    Id {
        id: &'a str,
        prefix: &'a str,
    },
    /// `/{owner}/{name}/rest`, if such a sandbox exists; otherwise the API answers.
    Path {
        owner: &'a str,
        name: &'a str,
        prefix: &'a str,
    },
    /// `/sandbox/{id}` without the trailing slash: redirect so relative URLs resolve.
    AddSlash {
        id_route: bool,
        path: &'a str,
    },
    Api,
}

/// Classifies a request by its host (without or with `:port`) and path.
pub fn classify<'a>(
    host: Option<&'a str>,
    path: &'a str,
    domain: &str,
) -> Result<Route<'a>, Error> {
    if let Some(host) = host {
        if let Some(r) = classify_host(host, domain)? {
            return Ok(r);
        }
    }
    classify_path(path)
}

/// Where ASCII byte `b` first occurs in `s`. `str::find` with a `char` goes through the
/// generic searcher, which costs more than the whole scan on the short strings every proxied
/// request is routed by.
pub(crate) fn find_byte(s: &str, b: u8) -> Option<usize> {
    debug_assert!(b.is_ascii());
    s.as_bytes().iter().position(|&c| c == b)
}

/// `s.split_once(b)` for an ASCII byte, through [`find_byte`].
pub(crate) fn split_once_byte(s: &str, b: u8) -> Option<(&str, &str)> {
    let i = find_byte(s, b)?;
    Some((&s[..i], &s[i + 1..]))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host; // an IPv6 literal is never a sandbox host
    }
    match host.as_bytes().iter().rposition(|&c| c == b':') {
        Some(i) => &host[..i],
        None => host,
    }
}

/// `{port}-{id}.{domain}`; `Ok(None)` when the host is not of that form at all.
fn classify_host<'a>(host: &'a str, domain: &str) -> Result<Option<Route<'a>>, Error> {
    let host = strip_port(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    let Some(label) = host
        .len()
        .checked_sub(domain.len() + 1)
        .filter(|&n| host.as_bytes()[n] == b'.' && host[n + 1..].eq_ignore_ascii_case(domain))
        .map(|n| &host[..n])
    else {
        return Ok(None);
    };
    let Some((port, id)) = split_once_byte(label, b'-') else {
        return Ok(None);
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    let port_num = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Error::InvalidPort(port.to_string()))?;
    if !valid_id(id) {
        return Err(Error::InvalidId(id.to_string()));
    }
    Ok(Some(Route::Host { id, port: port_num }))
}

fn classify_path(path: &str) -> Result<Route<'_>, Error> {
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(Route::Api);
    };
    let (first, after_first) = rest.split_at(find_byte(rest, b'/').unwrap_or(rest.len()));
    if first == "sandbox" {
        let Some(after) = after_first.strip_prefix('/') else {
            return Ok(Route::Api); // `/sandbox`: the seed-000 create endpoint
        };
        if after.is_empty() {
            return Ok(Route::Api);
        }
        let id_len = find_byte(after, b'/').unwrap_or(after.len());
        let id = &after[..id_len];
        if !valid_id(id) {
            return Err(Error::InvalidId(id.to_string()));
        }
        let prefix = &path[..1 + first.len() + 1 + id_len];
        if prefix.len() == path.len() {
            return Ok(Route::AddSlash {
                id_route: true,
                path,
            });
        }
        return Ok(Route::Id { id, prefix });
    }
    if RESERVED_OWNERS.contains(&first) || !valid_label(first) {
        return Ok(Route::Api);
    }
    let Some(after) = after_first.strip_prefix('/') else {
        return Ok(Route::Api);
    };
    let name_len = find_byte(after, b'/').unwrap_or(after.len());
    let name = &after[..name_len];
    if !valid_label(name) {
        return Ok(Route::Api);
    }
    let prefix = &path[..1 + first.len() + 1 + name_len];
    if prefix.len() == path.len() {
        return Ok(Route::AddSlash {
            id_route: false,
            path,
        });
    }
    Ok(Route::Path {
        owner: first,
        name,
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sb-abcdefghijklmnop";

    fn c<'a>(host: &'a str, path: &'a str) -> Result<Route<'a>, Error> {
        classify(Some(host), path, "localhost")
    }

    #[test]
    fn byte_splits_match_the_char_ones() {
        for s in ["", "?", "a?b?c", "/sandbox/x?y", "ünï?cødé", "no-mark"] {
            assert_eq!(split_once_byte(s, b'?'), s.split_once('?'), "{s:?}");
            assert_eq!(find_byte(s, b'/'), s.find('/'), "{s:?}");
        }
        assert_eq!(strip_port("1-sb.localhost:8070"), "1-sb.localhost");
        assert_eq!(strip_port("a:b:c"), "a:b");
        assert_eq!(strip_port("[::1]:80"), "[::1]:80");
        assert_eq!(strip_port("plain"), "plain");
    }

    #[test]
    fn host_routes() {
        let host = format!("3000-{ID}.localhost:8070");
        assert_eq!(c(&host, "/x").unwrap(), Route::Host { id: ID, port: 3000 });
        let host = format!("65535-{ID}.LOCALHOST");
        assert_eq!(
            c(&host, "/").unwrap(),
            Route::Host {
                id: ID,
                port: 65535
            }
        );
        for bad_port in ["0", "65536", "99999999999"] {
            let host = format!("{bad_port}-{ID}.localhost");
            assert!(
                matches!(c(&host, "/"), Err(Error::InvalidPort(_))),
                "{bad_port}"
            );
        }
        assert!(matches!(
            c("3000-sb-NOPE.localhost", "/"),
            Err(Error::InvalidId(_))
        ));
        // Not sandbox hosts: fall through to path routing / the API.
        assert_eq!(c("localhost:8070", "/health").unwrap(), Route::Api);
        assert_eq!(c("127.0.0.1:8070", "/health").unwrap(), Route::Api);
        assert_eq!(c(&format!("www-{ID}.localhost"), "/").unwrap(), Route::Api);
        assert_eq!(
            c(&format!("3000-{ID}.example.com"), "/").unwrap(),
            Route::Api
        );
        assert_eq!(c("[::1]:8070", "/").unwrap(), Route::Api);
        assert_eq!(
            c(&format!("3000-{ID}.evil-localhost"), "/").unwrap(),
            Route::Api
        );
    }

    #[test]
    fn id_routes() {
        let path = format!("/sandbox/{ID}/api/users?x=1");
        let prefix = format!("/sandbox/{ID}");
        assert_eq!(
            c("gw", &path).unwrap(),
            Route::Id {
                id: ID,
                prefix: &prefix
            }
        );
        let bare = format!("/sandbox/{ID}");
        assert_eq!(
            c("gw", &bare).unwrap(),
            Route::AddSlash {
                id_route: true,
                path: &bare
            }
        );
        assert_eq!(c("gw", "/sandbox").unwrap(), Route::Api);
        assert_eq!(c("gw", "/sandbox/").unwrap(), Route::Api);
        assert!(matches!(
            c("gw", "/sandbox/nope/"),
            Err(Error::InvalidId(_))
        ));
    }

    #[test]
    fn owner_name_routes_and_reserved_prefixes() {
        assert_eq!(
            c("gw", "/alice/my-app/index.html").unwrap(),
            Route::Path {
                owner: "alice",
                name: "my-app",
                prefix: "/alice/my-app"
            }
        );
        assert_eq!(
            c("gw", "/alice/my-app").unwrap(),
            Route::AddSlash {
                id_route: false,
                path: "/alice/my-app"
            }
        );
        for api in [
            "/sandboxes/sb-abcdefghijklmnop",
            "/health/proxy",
            "/sandboxes",
            "/",
            "/api/v1/sandbox/execute",
            "/Alice/x/",
            "/alice",
        ] {
            assert_eq!(c("gw", api).unwrap(), Route::Api, "{api}");
        }
    }
}
