//! Bearer tokens (JWT): the gateway's own, minted by `POST /auth/token` from an API key and
//! signed HS256 with `TOKEN_SECRET`, and an external identity provider's, verified with a PEM
//! public key or a JWKS (RS256/ES256, the algorithm pinned by the key). Verified tokens are
//! cached by the SHA-256 of the token until they expire, so a proxied request with a token
//! costs a hash and a map probe, as one with an API key does.

use std::collections::HashMap;
use std::sync::RwLock;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{Principal, Role, Via};
use crate::error::Error;

/// The `iss` of every token the gateway mints.
pub const ISSUER: &str = "sandgate";
/// Verified tokens remembered at most (a full cache drops its expired entries, then all).
const CACHE_MAX: usize = 10_000;

/// The claims of a token the gateway mints.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The API key id it was minted from.
    pub sub: String,
    pub team: String,
    pub role: String,
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
}

/// How an external identity provider's tokens are read.
/// An identity provider's verification keys by `kid` (`None`: the one PEM key, or a JWKS key
/// without a `kid`), with the algorithm each pins.
type KeySet = Vec<(Option<String>, DecodingKey, Algorithm)>;

pub struct External {
    /// Replaced whole when a JWKS URL is fetched again (key rotation).
    keys: RwLock<KeySet>,
    issuer: Option<String>,
    audience: Option<String>,
    team_claim: String,
    role_claim: String,
}

/// Where an external provider's keys come from.
pub enum ExternalKeys<'a> {
    /// A PEM public key: RSA (RS256) or EC P-256 (ES256), the algorithm pinned by the key.
    Pem(&'a [u8]),
    /// A JWKS document (`{"keys":[…]}`).
    Jwks(&'a [u8]),
}

impl External {
    pub fn new(
        keys: ExternalKeys<'_>,
        issuer: Option<String>,
        audience: Option<String>,
        team_claim: String,
        role_claim: String,
    ) -> Result<External, String> {
        Ok(External {
            keys: RwLock::new(key_set(keys)?),
            issuer,
            audience,
            team_claim,
            role_claim,
        })
    }

    /// Replaces the keys with a newly fetched JWKS document's; returns how many it has. A
    /// document without a usable key changes nothing.
    pub fn replace(&self, jwks: &[u8]) -> Result<usize, String> {
        let keys = key_set(ExternalKeys::Jwks(jwks))?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(n)
    }
}

fn key_set(keys: ExternalKeys<'_>) -> Result<KeySet, String> {
    {
        let keys = match keys {
            ExternalKeys::Pem(pem) => {
                let (key, alg) = match DecodingKey::from_rsa_pem(pem) {
                    Ok(k) => (k, Algorithm::RS256),
                    Err(_) => (
                        DecodingKey::from_ec_pem(pem).map_err(|e| {
                            format!("not an RSA or EC P-256 public key in PEM: {e}")
                        })?,
                        Algorithm::ES256,
                    ),
                };
                vec![(None, key, alg)]
            }
            ExternalKeys::Jwks(doc) => {
                let set: JwkSet =
                    serde_json::from_slice(doc).map_err(|e| format!("not a JWKS document: {e}"))?;
                let mut keys = Vec::new();
                for jwk in &set.keys {
                    let alg = match &jwk.algorithm {
                        jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                        jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => {
                            Algorithm::ES256
                        }
                        _ => continue,
                    };
                    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("a JWKS key: {e}"))?;
                    keys.push((jwk.common.key_id.clone(), key, alg));
                }
                if keys.is_empty() {
                    return Err("the JWKS has no RSA or P-256 key".into());
                }
                keys
            }
        };
        Ok(keys)
    }
}

/// A verified token, as cached.
#[derive(Clone)]
struct Verified {
    principal: Principal,
    exp: i64,
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    own: Validation,
    /// Lifetime of minted tokens, in seconds (`AUTH_TOKEN_EXPIRY`).
    pub expiry: u64,
    external: Option<External>,
    cache: RwLock<HashMap<[u8; 32], Verified>>,
}

/// Whether a bearer credential has the shape of a JWT (three base64url parts).
pub fn looks_like_jwt(token: &[u8]) -> bool {
    token.starts_with(b"eyJ") && token.iter().filter(|&&b| b == b'.').count() == 2
}

impl Tokens {
    pub fn new(secret: &[u8], expiry: u64, external: Option<External>) -> Tokens {
        let mut own = Validation::new(Algorithm::HS256);
        own.set_issuer(&[ISSUER]);
        own.set_required_spec_claims(&["exp", "iss", "sub"]);
        own.leeway = 0;
        Tokens {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            own,
            expiry,
            external,
            cache: RwLock::default(),
        }
    }

    /// Mints a token for `principal` (an API key's), valid `ttl` seconds.
    pub fn mint(&self, principal: &Principal, ttl: u64, now: i64) -> Result<String, Error> {
        let claims = Claims {
            sub: principal.subject.to_string(),
            team: principal.team.to_string(),
            role: principal.role.as_str().into(),
            iss: ISSUER.into(),
            iat: now,
            exp: now + ttl as i64,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(Error::internal)
    }

    /// The principal of a bearer token. `key_active` says whether the API key a gateway
    /// token was minted from is still active (a revoked key's tokens stop with it);
    /// `team_exists`, whether an external token's team is one of this gateway's.
    pub fn verify(
        &self,
        token: &[u8],
        now: i64,
        key_active: impl Fn(&str) -> bool,
        team_exists: impl Fn(&str) -> bool,
    ) -> Result<Principal, Error> {
        let digest = super::keys::hash(token);
        let cached = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&digest)
            .cloned();
        let verified = match cached {
            Some(v) => v,
            None => {
                let v = self.decode(token, &team_exists)?;
                self.remember(digest, v.clone(), now);
                v
            }
        };
        if verified.exp <= now {
            return Err(Error::BadCredential("Token has expired"));
        }
        if verified.principal.via == Via::Token && !key_active(&verified.principal.subject) {
            return Err(Error::BadCredential(
                "the API key this token was minted from was revoked",
            ));
        }
        Ok(verified.principal)
    }

    fn remember(&self, digest: [u8; 32], v: Verified, now: i64) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, v| v.exp > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(digest, v);
    }

    /// Drops expired tokens from the cache (the gateway's sweeper calls this).
    pub fn sweep(&self, now: i64) {
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, v| v.exp > now);
    }

    pub fn cache_size(&self) -> usize {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn external(&self) -> bool {
        self.external.is_some()
    }

    /// The identity provider's keys, if one is configured.
    pub fn provider(&self) -> Option<&External> {
        self.external.as_ref()
    }

    fn decode(&self, token: &[u8], team_exists: &impl Fn(&str) -> bool) -> Result<Verified, Error> {
        let token =
            std::str::from_utf8(token).map_err(|_| Error::BadCredential("malformed token"))?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::BadCredential("malformed token"))?;
        if header.alg == Algorithm::HS256 {
            let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.own)
                .map_err(jwt_error)?;
            let c = data.claims;
            let role: Role = c
                .role
                .parse()
                .map_err(|_| Error::BadCredential("the token's role is unknown"))?;
            return Ok(Verified {
                principal: Principal {
                    team: c.team.into(),
                    role,
                    subject: c.sub.into(),
                    via: Via::Token,
                },
                exp: c.exp,
            });
        }
        let Some(ext) = &self.external else {
            return Err(Error::BadCredential(
                "the token's algorithm is not accepted",
            ));
        };
        let keys = ext.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = keys
            .iter()
            .find(|(kid, _, alg)| {
                *alg == header.alg && (header.kid.is_none() || kid.is_none() || *kid == header.kid)
            })
            .ok_or(Error::BadCredential(
                "no key of the identity provider matches the token",
            ))?;
        let mut validation = Validation::new(key.2);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        if let Some(iss) = &ext.issuer {
            validation.set_issuer(&[iss]);
        }
        match &ext.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key.1,
            &validation,
        )
        .map_err(jwt_error)?;
        let claims = data.claims;
        let text = |name: &str| claims.get(name).and_then(|v| v.as_str());
        let team =
            text(&ext.team_claim).ok_or(Error::BadCredential("the token has no team claim"))?;
        if !team_exists(team) {
            return Err(Error::BadCredential(
                "the token's team is not one of this gateway's",
            ));
        }
        let role: Role = text(&ext.role_claim)
            .unwrap_or("viewer")
            .parse()
            .map_err(|_| Error::BadCredential("the token's role is unknown"))?;
        if role == Role::Owner {
            return Err(Error::BadCredential(
                "an identity provider's token cannot carry the owner role",
            ));
        }
        let exp = claims.get("exp").and_then(|v| v.as_i64()).unwrap_or(0);
        Ok(Verified {
            principal: Principal {
                team: team.into(),
                role,
                subject: text("sub").unwrap_or("").into(),
                via: Via::External,
            },
            exp,
        })
    }
}

fn jwt_error(e: jsonwebtoken::errors::Error) -> Error {
    use jsonwebtoken::errors::ErrorKind::*;
    Error::BadCredential(match e.kind() {
        ExpiredSignature => "Token has expired",
        InvalidSignature => "the token's signature does not verify",
        InvalidIssuer => "the token's issuer is not accepted",
        InvalidAudience => "the token's audience is not accepted",
        MissingRequiredClaim(_) => "the token lacks a required claim (exp, sub)",
        ImmatureSignature => "the token is not valid yet",
        _ => "malformed token",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Principal {
        Principal {
            team: "default".into(),
            role: Role::Owner,
            subject: "abcdefghij".into(),
            via: Via::Key,
        }
    }

    #[test]
    fn a_refetched_jwks_replaces_the_keys_only_when_usable() {
        let doc = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/it/keys/idp-jwks.json"
        ))
        .unwrap();
        let ext = External::new(
            ExternalKeys::Jwks(&doc),
            None,
            None,
            "team".into(),
            "role".into(),
        )
        .unwrap();
        assert_eq!(ext.replace(&doc), Ok(1));
        assert!(ext.replace(br#"{"keys":[]}"#).is_err());
        assert!(ext.replace(b"not json").is_err());
        assert_eq!(
            ext.keys.read().unwrap().len(),
            1,
            "a bad document changes nothing"
        );
    }

    #[test]
    fn minted_tokens_verify_expire_and_die_with_their_key() {
        let t = Tokens::new(&[7; 32], 3600, None);
        let now = 1_800_000_000;
        let tok = t.mint(&owner(), 60, now).unwrap();
        assert!(looks_like_jwt(tok.as_bytes()));
        let p = t.verify(tok.as_bytes(), now, |_| true, |_| true).unwrap();
        assert_eq!(
            (&*p.team, p.role, &*p.subject),
            ("default", Role::Owner, "abcdefghij")
        );
        assert_eq!(t.cache_size(), 1);
        let err = t
            .verify(tok.as_bytes(), now + 61, |_| true, |_| true)
            .unwrap_err();
        assert!(
            matches!(err, Error::BadCredential("Token has expired")),
            "{err:?}"
        );
        assert!(t.verify(tok.as_bytes(), now, |_| false, |_| true).is_err());
        let other = Tokens::new(&[8; 32], 3600, None);
        assert!(other
            .verify(tok.as_bytes(), now, |_| true, |_| true)
            .is_err());
        t.sweep(now + 61);
        assert_eq!(t.cache_size(), 0);
    }
}
