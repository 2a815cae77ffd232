//! Browser preview tokens: `sgp_<payload>.<tag>`, where the payload names one sandbox, an
//! optional port, the sandbox's preview generation and an expiry, and the tag is HMAC-SHA256
//! over it with a secret the store keeps. A token opens only its sandbox (and port); bumping
//! the sandbox's generation revokes every token issued before. A browser exchanges it once
//! from the URL (`?sandgate_token=…`) for a host-only, HttpOnly cookie (`sandgate_preview`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What every preview token starts with.
pub const PREFIX: &str = "sgp_";
/// The cookie a preview token is kept in after the exchange.
pub const COOKIE: &str = "sandgate_preview";

/// What a verified preview token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    /// `None`: every port of the sandbox.
    pub port: Option<u16>,
    /// Unix seconds.
    pub expires: i64,
}

pub struct Previews {
    key: Vec<u8>,
}

type Tag = Hmac<Sha256>;

impl Previews {
    pub fn new(secret: &[u8]) -> Previews {
        Previews {
            key: secret.to_vec(),
        }
    }

    fn mac(&self) -> Tag {
        // Any key length is accepted by HMAC.
        Tag::new_from_slice(&self.key).expect("HMAC takes keys of any length")
    }

    /// A token for `sandbox` (and `port`, if given) at its current `generation`.
    pub fn issue(&self, sandbox: &str, port: Option<u16>, generation: i64, expires: i64) -> String {
        let payload = format!("{sandbox}.{}.{generation}.{expires}", port.unwrap_or(0));
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The scope of `token` if it is genuine, unexpired and for this sandbox at this
    /// generation; `None` otherwise (a preview credential for anything else is no credential).
    pub fn verify(&self, token: &[u8], sandbox: &str, generation: i64, now: i64) -> Option<Scope> {
        let rest = token.strip_prefix(PREFIX.as_bytes())?;
        let dot = rest.iter().position(|&b| b == b'.')?;
        let (payload, tag) = (&rest[..dot], &rest[dot + 1..]);
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_slice(&tag).ok()?;
        let text = std::str::from_utf8(&payload).ok()?;
        let mut parts = text.split('.');
        let (id, port, gen, exp) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let port: u16 = port.parse().ok()?;
        let expires: i64 = exp.parse().ok()?;
        (id == sandbox && gen.parse::<i64>().ok()? == generation && expires > now).then_some(
            Scope {
                port: (port != 0).then_some(port),
                expires,
            },
        )
    }
}

/// The `sandgate_preview` cookie holding `token` for `path` (`/` on a host route, the route
/// prefix on a path route), host-only (no `Domain`: never sent to another sandbox's host).
pub fn cookie(token: &str, path: &str, max_age: i64, secure: bool) -> String {
    let same_site = if secure {
        "; Secure; SameSite=None"
    } else {
        "; SameSite=Lax"
    };
    format!("{COOKIE}={token}; Path={path}; Max-Age={max_age}; HttpOnly{same_site}")
}

/// The value of the `sandgate_token` query parameter, if any.
pub fn query_token(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("sandgate_token="))
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_open_one_sandbox_port_and_generation_until_they_expire() {
        let p = Previews::new(b"secret");
        let t = p.issue("sb-a", Some(3000), 2, 1_000);
        let scope = p.verify(t.as_bytes(), "sb-a", 2, 999).unwrap();
        assert_eq!(scope.port, Some(3000));
        assert!(p.verify(t.as_bytes(), "sb-b", 2, 999).is_none());
        assert!(p.verify(t.as_bytes(), "sb-a", 3, 999).is_none());
        assert!(p.verify(t.as_bytes(), "sb-a", 2, 1_000).is_none());
        assert!(Previews::new(b"other")
            .verify(t.as_bytes(), "sb-a", 2, 999)
            .is_none());
        let any = p.issue("sb-a", None, 0, 1_000);
        assert_eq!(p.verify(any.as_bytes(), "sb-a", 0, 1).unwrap().port, None);
        // A payload changed under its tag fails.
        let forged = format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode("sb-a.0.2.9999"),
            t.rsplit('.').next().unwrap()
        );
        assert!(p.verify(forged.as_bytes(), "sb-a", 2, 999).is_none());
        assert_eq!(query_token("a=1&sandgate_token=x&b=2"), Some("x"));
        assert!(cookie("t", "/", 60, false).contains("HttpOnly; SameSite=Lax"));
        assert!(!cookie("t", "/", 60, true).contains("Domain"));
    }
}
