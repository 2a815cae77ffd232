//! Client addresses: who is asking, by address, and whether that address may ask at all.
//!
//! - **Resolution**: the client of a request is the connection's peer, unless the peer is one
//!   of the configured `trusted_proxies`: then it is the rightmost address of its
//!   `X-Forwarded-For` that is not itself a trusted proxy (each proxy appends the address it
//!   was connected from, so everything right of that address was written by proxies the
//!   gateway trusts, and everything left of it by whoever the gateway cannot vouch for). The
//!   one resolved address is what the allowlists, the per-client share, the failed-credential
//!   throttle and the `X-Forwarded-For` a sandbox receives all use, in both lanes.
//! - **Allowlists**: `allowed_ips` (global, checked before anything else is decided) and a
//!   team's `allowed_ips` (checked once the credential names the team): 403 `AUTH_004`.
//!
//! Everything here is pure and allocation-free per request: the request policy's check step
//! calls it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use crate::config::{Cidr, Config};
use crate::error::Error;

/// How many `X-Forwarded-For` fields of a head are kept for resolution: the last ones, which
/// the nearest proxies wrote (a proxy that adds a field of its own instead of appending to
/// the previous one, as HAProxy does, adds one per hop).
pub const FORWARDED_FIELDS: usize = 4;

/// At most this many `X-Forwarded-For` entries are walked (a chain of trusted proxies longer
/// than this resolves to the entry where the walk stopped).
const MAX_HOPS: usize = 32;

/// The last [`FORWARDED_FIELDS`] `X-Forwarded-For` field values of a request head, in order,
/// as the parser saw them (`policy::head::facts` fills it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardedFor<'a> {
    fields: [&'a [u8]; FORWARDED_FIELDS],
    len: u8,
}

impl<'a> ForwardedFor<'a> {
    /// Records the next field value; past the limit, the oldest one is let go.
    pub fn push(&mut self, value: &'a [u8]) {
        let len = self.len as usize;
        if len < FORWARDED_FIELDS {
            self.fields[len] = value;
            self.len += 1;
        } else {
            self.fields.rotate_left(1);
            self.fields[FORWARDED_FIELDS - 1] = value;
        }
    }

    /// The entries, rightmost (nearest hop) first, as raw text.
    fn entries_rev(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.fields[..self.len as usize]
            .iter()
            .rev()
            .flat_map(|f| f.rsplit(|&b| b == b','))
    }
}

/// The address rules of one gateway, from its configuration.
pub struct Addresses {
    allowed: Vec<Cidr>,
    trusted: Vec<Cidr>,
    /// Teams with an `allowed_ips` list of their own.
    teams: HashMap<Box<str>, Vec<Cidr>>,
}

impl Addresses {
    pub fn new(config: &Config) -> Addresses {
        Addresses {
            allowed: config.allowed_ips.clone(),
            trusted: config.trusted_proxies.clone(),
            teams: config
                .teams
                .iter()
                .filter_map(|(name, t)| Some((name.as_str().into(), t.allowed_ips.clone()?)))
                .collect(),
        }
    }

    /// The client of a request from `peer` carrying `forwarded` (see the module's note).
    pub fn client(&self, peer: IpAddr, forwarded: &ForwardedFor<'_>) -> IpAddr {
        let peer = peer.to_canonical();
        if self.trusted.is_empty() || !self.trusted(peer) {
            return peer;
        }
        let mut client = peer;
        for entry in forwarded.entries_rev().take(MAX_HOPS) {
            // An entry that is no address ("unknown", garbage): the chain cannot be followed
            // further, and the nearest address a trusted hop vouched for stands.
            let Some(ip) = parse_entry(entry) else {
                return client;
            };
            client = ip.to_canonical();
            if !self.trusted(client) {
                return client;
            }
        }
        client
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// The global allowlist: `AddressNotAllowed` unless `client` is in it (or there is none).
    pub fn allows(&self, client: IpAddr) -> Result<(), Error> {
        match self.allowed.is_empty() || self.allowed.iter().any(|c| c.contains(client)) {
            true => Ok(()),
            false => Err(Error::AddressNotAllowed),
        }
    }

    /// `team`'s own allowlist, if it has one.
    pub fn team_allows(&self, team: &str, client: IpAddr) -> Result<(), Error> {
        if self.teams.is_empty() {
            return Ok(());
        }
        match self.teams.get(team) {
            Some(list) if !list.iter().any(|c| c.contains(client)) => Err(Error::AddressNotAllowed),
            _ => Ok(()),
        }
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`, `[2001:db8::1]`), surrounded by optional whitespace.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry.trim_ascii()).ok()?;
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        return inner.parse().ok();
    }
    text.parse::<SocketAddr>().ok().map(|s| s.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn addresses(trusted: &[&str]) -> Addresses {
        let mut config = Config::for_data_dir("unused");
        config.trusted_proxies = cidrs(trusted);
        Addresses::new(&config)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff<'a>(fields: &[&'a str]) -> ForwardedFor<'a> {
        let mut f = ForwardedFor::default();
        for v in fields {
            f.push(v.as_bytes());
        }
        f
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let a = addresses(&["10.0.0.0/8", "127.0.0.2"]);
        let from = |peer: &str, fields: &[&str]| a.client(ip(peer), &xff(fields));
        // An untrusted peer's header is ignored.
        assert_eq!(from("192.0.2.9", &["203.0.113.7"]), ip("192.0.2.9"));
        // A trusted peer: the nearest untrusted entry, skipping trusted hops and spoofed
        // entries further left.
        assert_eq!(from("127.0.0.2", &["203.0.113.7"]), ip("203.0.113.7"));
        assert_eq!(
            from("127.0.0.2", &["198.51.100.1, 203.0.113.7, 10.1.2.3"]),
            ip("203.0.113.7")
        );
        assert_eq!(
            from("127.0.0.2", &["198.51.100.1", "203.0.113.7", " 10.1.2.3 "]),
            ip("203.0.113.7")
        );
        // Without a header, or with only trusted hops, or up to an entry that is no
        // address: the nearest address a trusted hop vouched for.
        assert_eq!(from("127.0.0.2", &[]), ip("127.0.0.2"));
        assert_eq!(from("127.0.0.2", &["10.0.0.1, 10.0.0.2"]), ip("10.0.0.1"));
        assert_eq!(from("127.0.0.2", &["unknown, 10.0.0.9"]), ip("10.0.0.9"));
        // Ports, brackets and IPv4-mapped addresses.
        assert_eq!(from("127.0.0.2", &["203.0.113.7:4711"]), ip("203.0.113.7"));
        assert_eq!(from("127.0.0.2", &["[2001:db8::1]:80"]), ip("2001:db8::1"));
        assert_eq!(from("127.0.0.2", &["[2001:db8::1]"]), ip("2001:db8::1"));
        assert_eq!(
            from("::ffff:127.0.0.2", &["::ffff:192.0.2.1"]),
            ip("192.0.2.1")
        );
        // Nothing trusted: always the peer.
        assert_eq!(
            addresses(&[]).client(ip("127.0.0.2"), &xff(&["203.0.113.7"])),
            ip("127.0.0.2")
        );
    }

    #[test]
    fn the_last_fields_are_kept() {
        let a = addresses(&["10.0.0.0/8"]);
        let f = xff(&["192.0.2.1", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        // The oldest field was let go: the chain ends at the oldest one kept.
        assert_eq!(a.client(ip("10.9.9.9"), &f), ip("10.0.0.1"));
        let f = xff(&["10.0.0.1", "192.0.2.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]);
        assert_eq!(a.client(ip("10.9.9.9"), &f), ip("192.0.2.1"));
    }

    #[test]
    fn allowlists_global_and_per_team() {
        let mut config = Config::for_data_dir("unused");
        config.allowed_ips = cidrs(&["127.0.0.0/8", "2001:db8::/32"]);
        config.teams.insert(
            "office".into(),
            crate::config::TeamConfig {
                allowed_ips: Some(cidrs(&["127.0.0.2"])),
                ..Default::default()
            },
        );
        let a = Addresses::new(&config);
        assert!(a.allows(ip("127.0.0.9")).is_ok());
        assert!(a.allows(ip("2001:db8:1::5")).is_ok());
        assert!(matches!(
            a.allows(ip("192.0.2.1")),
            Err(Error::AddressNotAllowed)
        ));
        assert!(a.team_allows("office", ip("127.0.0.2")).is_ok());
        assert!(a.team_allows("office", ip("127.0.0.3")).is_err());
        assert!(a.team_allows("default", ip("127.0.0.3")).is_ok());
        assert!(Addresses::new(&Config::for_data_dir("x"))
            .allows(ip("192.0.2.1"))
            .is_ok());
    }
}
