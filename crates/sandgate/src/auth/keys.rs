//! API key format: `sgk_` + a 10-character lookup id + `_` + a 32-character secret + a
//! 6-character checksum. The secret carries 190 random bits; the store keeps only the
//! SHA-256 of the whole key, which is compared in constant time. The checksum (the first 32
//! bits of SHA-256 over the rest) lets a scanner or the gateway tell a key from a typo
//! without a lookup, as GitHub's token format does.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What every sandgate API key starts with.
pub const PREFIX: &str = "sgk_";
/// The lookup id of a configured admin key that is not in sandgate's own format
/// (`SANDGATE_ADMIN_KEY`).
pub const CONFIGURED_ID: &str = "admin";

const ID_LEN: usize = 10;
const SECRET_LEN: usize = 32;
const CHECK_LEN: usize = 6;
/// `sgk_` + id + `_` + secret + checksum.
pub const KEY_LEN: usize = PREFIX.len() + ID_LEN + 1 + SECRET_LEN + CHECK_LEN;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A newly generated key: the text shown once, and its lookup id.
pub struct NewKey {
    pub id: String,
    pub key: String,
}

/// A fresh random key (`rand`'s thread RNG is a CSPRNG seeded from the OS).
pub fn generate() -> NewKey {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(PREFIX);
    for _ in 0..ID_LEN {
        key.push(BASE32[rng.gen_range(0..BASE32.len())] as char);
    }
    key.push('_');
    for _ in 0..SECRET_LEN {
        key.push(BASE62[rng.gen_range(0..BASE62.len())] as char);
    }
    let check = checksum(key.as_bytes());
    key.push_str(&check);
    NewKey {
        id: key[PREFIX.len()..PREFIX.len() + ID_LEN].to_string(),
        key,
    }
}

fn checksum(body: &[u8]) -> String {
    let d = Sha256::digest(body);
    let mut n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64;
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a presented key reads.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A well-formed sandgate key with this lookup id.
    Key(&'a str),
    /// Shaped like a sandgate key but its checksum is wrong (a typo or a forgery).
    BadChecksum,
    /// Anything else: only a configured admin key can match it.
    Other,
}

/// Reads a presented key without touching any table.
pub fn parse(key: &str) -> Parsed<'_> {
    let b = key.as_bytes();
    if b.len() != KEY_LEN || !key.starts_with(PREFIX) || b[PREFIX.len() + ID_LEN] != b'_' {
        return Parsed::Other;
    }
    let id = &key[PREFIX.len()..PREFIX.len() + ID_LEN];
    let secret = &b[PREFIX.len() + ID_LEN + 1..];
    if !id.bytes().all(|c| BASE32.contains(&c)) || !secret.iter().all(u8::is_ascii_alphanumeric) {
        return Parsed::Other;
    }
    let (body, check) = b.split_at(KEY_LEN - CHECK_LEN);
    if checksum(body).as_bytes() != check {
        return Parsed::BadChecksum;
    }
    Parsed::Key(id)
}

/// The stored form of a key.
pub fn hash(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// Whether `key` hashes to `stored`, in time independent of where they differ.
pub fn matches(key: &[u8], stored: &[u8; 32]) -> bool {
    hash(key).ct_eq(stored).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_a_changed_character_fails_the_checksum() {
        let k = generate();
        assert_eq!(k.key.len(), KEY_LEN);
        assert!(k.key.starts_with("sgk_"));
        assert_eq!(parse(&k.key), Parsed::Key(k.id.as_str()));
        let mut bad = k.key.clone().into_bytes();
        let i = PREFIX.len() + ID_LEN + 5;
        bad[i] = if bad[i] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            parse(std::str::from_utf8(&bad).unwrap()),
            Parsed::BadChecksum
        );
        assert_eq!(parse("sgk_short"), Parsed::Other);
        assert_eq!(parse(&"x".repeat(KEY_LEN)), Parsed::Other);
        assert_ne!(generate().key, k.key);
    }

    #[test]
    fn hashes_compare_exactly() {
        let k = generate();
        let stored = hash(k.key.as_bytes());
        assert!(matches(k.key.as_bytes(), &stored));
        assert!(!matches(generate().key.as_bytes(), &stored));
    }
}
