//! Request rates and abuse controls (seed 002): per API key (or token subject) and per
//! sandbox request rates, a per-sandbox cap on open connections, each configurable globally
//! and per team, and the throttle on failed authentication per client address.
//!
//! Rates are counted by `governor` (GCRA: one atomic word of state per key, no timer, no
//! background task), keyed by the subject and the sandbox id as the `Arc<str>` the request
//! already holds, so a request takes its tokens without allocating. Tokens are taken in the
//! request policy's admission step, exactly once per request in the lane that forwards it
//! (or, for the control API, in hyper's lane, the only one that serves it); see
//! docs/auth.md, "Rate limits and address rules".
//!
//! The failed-authentication throttle is split the same way as the policy: the check step
//! only *reads* whether an address is throttled ([`Rates::throttled`]), and the finish step
//! of a refused credential counts the failure ([`Rates::auth_failed`]).
//!
//! Memory is bounded by use: keyed states that are indistinguishable from a fresh one are
//! dropped on the gateway's 15 s sweep ([`Rates::sweep`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use crate::config::{Config, TeamConfig};
use crate::error::Error;

/// What a 429 says was exceeded.
pub const KEY_RATE: &str = "too many requests with this credential";
pub const SANDBOX_RATE: &str = "too many requests to this sandbox";
pub const SANDBOX_CONNECTIONS: &str = "too many connections open to this sandbox";
pub const AUTH_FAILURES: &str = "too many failed authentication attempts from this address";

/// Ids are the gateway's own random strings (and token subjects an identity provider
/// issues), so the fast seeded hasher the route table uses is safe here; client addresses,
/// which anyone can choose, keep the standard library's SipHash.
type KeyedLimiter =
    RateLimiter<Arc<str>, DashMapStateStore<Arc<str>, foldhash::fast::RandomState>, DefaultClock>;
type AddressLimiter =
    RateLimiter<IpAddr, DashMapStateStore<IpAddr>, DefaultClock, StateInformationMiddleware>;

/// One rate: a limiter per key, and the policy its 429 states.
struct Rate {
    limiter: KeyedLimiter,
    /// Requests that may come at once (the bucket's size: `RateLimit-Limit`).
    limit: u32,
    /// Seconds in which a whole burst is replenished (`RateLimit-Policy: {limit};w={window}`).
    window: u64,
    what: &'static str,
}

impl Rate {
    /// `per_second` requests a second with bursts of `burst` (default: one second's worth);
    /// `None` for no limit (unset or 0).
    fn new(per_second: Option<f64>, burst: Option<u32>, what: &'static str) -> Option<Arc<Rate>> {
        let per_second = per_second.filter(|&r| r > 0.0)?;
        let limit = burst.unwrap_or_else(|| per_second.ceil() as u32).max(1);
        let limiter = RateLimiter::dashmap_with_clock_and_hasher(
            quota(per_second, limit)?,
            DefaultClock::default(),
            foldhash::fast::RandomState::default(),
        );
        Some(Arc::new(Rate {
            limiter,
            limit,
            window: window(limit, per_second),
            what,
        }))
    }

    fn take(&self, key: &Arc<str>) -> Result<(), Error> {
        self.limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Error::RateLimited {
                what: self.what,
                limit: self.limit,
                window: Some(self.window),
                retry_after: whole_seconds(wait),
            }
        })
    }
}

/// `per_second` with bursts of `burst`.
fn quota(per_second: f64, burst: u32) -> Option<Quota> {
    Some(
        Quota::with_period(Duration::from_secs_f64(1.0 / per_second))?
            .allow_burst(NonZeroU32::new(burst)?),
    )
}

/// Seconds to replenish `limit` requests at `per_second` (at least 1).
fn window(limit: u32, per_second: f64) -> u64 {
    (f64::from(limit) / per_second).ceil().max(1.0) as u64
}

/// A wait as the whole seconds `Retry-After` carries, rounded up (at least 1).
fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// The limits that apply to one team (or, for every team without its own, the global ones).
struct Rules {
    per_key: Option<Arc<Rate>>,
    per_sandbox: Option<Arc<Rate>>,
    /// `usize::MAX`: no cap.
    max_connections: usize,
}

impl Rules {
    fn global(config: &Config) -> Rules {
        Rules {
            per_key: Rate::new(config.rate_limit_per_key, config.rate_limit_burst, KEY_RATE),
            per_sandbox: Rate::new(
                config.rate_limit_per_sandbox,
                config.rate_limit_burst,
                SANDBOX_RATE,
            ),
            max_connections: config.max_connections_per_sandbox.unwrap_or(usize::MAX),
        }
    }

    /// A team's rules: its own values where it sets them (a rate or cap of 0 is none), the
    /// global ones elsewhere. A team that changes neither rate nor burst shares the global
    /// limiters (keys and sandbox ids are unique across teams).
    fn team(config: &Config, team: &TeamConfig, global: &Rules) -> Rules {
        let burst = team.rate_limit_burst.or(config.rate_limit_burst);
        let rate = |own: Option<f64>,
                    global_rate: Option<f64>,
                    shared: &Option<Arc<Rate>>,
                    what| match (own, team.rate_limit_burst) {
            (None, None) => shared.clone(),
            (own, _) => Rate::new(own.or(global_rate), burst, what),
        };
        Rules {
            per_key: rate(
                team.rate_limit_per_key,
                config.rate_limit_per_key,
                &global.per_key,
                KEY_RATE,
            ),
            per_sandbox: rate(
                team.rate_limit_per_sandbox,
                config.rate_limit_per_sandbox,
                &global.per_sandbox,
                SANDBOX_RATE,
            ),
            max_connections: match team.max_connections_per_sandbox {
                Some(0) => usize::MAX,
                Some(n) => n,
                None => global.max_connections,
            },
        }
    }
}

/// The throttle on refused credentials per client address.
struct Throttle {
    failures: AddressLimiter,
    /// Addresses whose budget is spent, and until when.
    blocked: RwLock<HashMap<IpAddr, Instant>>,
    /// `blocked.len()`, read without the lock: while nothing is blocked (the normal case) a
    /// request pays one relaxed load for the throttle.
    blocked_count: AtomicUsize,
    /// One failure is replenished every `period`.
    period: Duration,
    limit: u32,
    window: u64,
}

impl Throttle {
    fn new(per_minute: Option<f64>, burst: u32) -> Option<Throttle> {
        let per_second = per_minute.filter(|&r| r > 0.0)? / 60.0;
        let limit = burst.max(1);
        Some(Throttle {
            failures: RateLimiter::dashmap(quota(per_second, limit)?)
                .with_middleware::<StateInformationMiddleware>(),
            blocked: RwLock::default(),
            blocked_count: AtomicUsize::new(0),
            period: Duration::from_secs_f64(1.0 / per_second),
            limit,
            window: window(limit, per_second),
        })
    }

    fn refusal(&self, wait: Duration) -> Error {
        Error::RateLimited {
            what: AUTH_FAILURES,
            limit: self.limit,
            window: Some(self.window),
            retry_after: whole_seconds(wait),
        }
    }
}

/// The address a throttle counts under: IPv4 addresses one by one, IPv6 addresses by their
/// /64 (one host commonly has a whole /64 to choose from).
fn throttle_key(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        v4 => v4,
    }
}

/// Every rate limit of one gateway.
pub struct Rates {
    global: Rules,
    /// Teams with rules of their own (`[teams.<name>]`).
    teams: HashMap<Box<str>, Rules>,
    throttle: Option<Throttle>,
}

impl Rates {
    pub fn new(config: &Config) -> Rates {
        let global = Rules::global(config);
        let teams = config
            .teams
            .iter()
            .map(|(name, team)| (name.as_str().into(), Rules::team(config, team, &global)))
            .collect();
        Rates {
            global,
            teams,
            throttle: Throttle::new(config.auth_failures_per_minute, config.auth_failure_burst),
        }
    }

    fn rules(&self, team: &str) -> &Rules {
        if self.teams.is_empty() {
            return &self.global;
        }
        self.teams.get(team).unwrap_or(&self.global)
    }

    /// Takes one token of the rate of the credential `subject` of `team`.
    pub fn take_key(&self, team: &str, subject: &Arc<str>) -> Result<(), Error> {
        match &self.rules(team).per_key {
            Some(rate) => rate.take(subject),
            None => Ok(()),
        }
    }

    /// Takes one token of the rate of sandbox `id` of `team`.
    pub fn take_sandbox(&self, team: &str, id: &Arc<str>) -> Result<(), Error> {
        match &self.rules(team).per_sandbox {
            Some(rate) => rate.take(id),
            None => Ok(()),
        }
    }

    /// How many requests and upgraded streams may be open at once to a sandbox of `team`
    /// (`usize::MAX`: no cap).
    pub fn max_connections(&self, team: &str) -> usize {
        self.rules(team).max_connections
    }

    /// Whether `client` has spent its budget of refused credentials: then its requests get
    /// 429 before any credential is looked at. A read: the check step calls it.
    pub fn throttled(&self, client: IpAddr) -> Result<(), Error> {
        let Some(t) = &self.throttle else {
            return Ok(());
        };
        if t.blocked_count.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let until = read(&t.blocked).get(&throttle_key(client)).copied();
        match until.map(|u| u.saturating_duration_since(Instant::now())) {
            Some(wait) if !wait.is_zero() => Err(t.refusal(wait)),
            _ => Ok(()),
        }
    }

    /// Counts a refused credential from `client` (the finish step of its request). The
    /// failure that spends the budget throttles the address until one more is allowed.
    pub fn auth_failed(&self, client: IpAddr) {
        let Some(t) = &self.throttle else {
            return;
        };
        let key = throttle_key(client);
        let until = match t.failures.check_key(&key) {
            Ok(state) if state.remaining_burst_capacity() > 0 => return,
            // At most one period until the next failure conforms again.
            Ok(_) => Instant::now() + t.period,
            // Failures that raced past the check while the budget ran out.
            Err(not_until) => not_until.earliest_possible(),
        };
        let mut blocked = write(&t.blocked);
        let entry = blocked.entry(key).or_insert(until);
        *entry = (*entry).max(until);
        t.blocked_count.store(blocked.len(), Ordering::Relaxed);
    }

    /// Drops state that no longer limits anything (the gateway's periodic sweep).
    pub fn sweep(&self) {
        let rules = std::iter::once(&self.global).chain(self.teams.values());
        for rules in rules {
            for rate in [&rules.per_key, &rules.per_sandbox].into_iter().flatten() {
                rate.limiter.retain_recent();
                rate.limiter.shrink_to_fit();
            }
        }
        if let Some(t) = &self.throttle {
            t.failures.retain_recent();
            t.failures.shrink_to_fit();
            let now = Instant::now();
            let mut blocked = write(&t.blocked);
            blocked.retain(|_, until| *until > now);
            t.blocked_count.store(blocked.len(), Ordering::Relaxed);
        }
    }

    /// Keys, sandboxes and addresses whose state is kept (for `/health/proxy`).
    pub fn tracked(&self) -> usize {
        let rules = std::iter::once(&self.global).chain(self.teams.values());
        let rates: usize = rules
            .flat_map(|r| [&r.per_key, &r.per_sandbox])
            .flatten()
            .map(|r| r.limiter.len())
            .sum();
        rates + self.throttle.as_ref().map_or(0, |t| t.failures.len())
    }
}

/// The refusal of a request over its sandbox's connection cap.
pub fn too_many_connections(cap: usize) -> Error {
    Error::RateLimited {
        what: SANDBOX_CONNECTIONS,
        limit: u32::try_from(cap).unwrap_or(u32::MAX),
        window: None,
        retry_after: 1,
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(f: impl FnOnce(&mut Config)) -> Config {
        let mut c = Config::for_data_dir("unused");
        f(&mut c);
        c
    }

    fn key(s: &str) -> Arc<str> {
        s.into()
    }

    /// Rates slow enough that nothing is replenished while a test runs.
    const SLOW: f64 = 0.001;

    #[test]
    fn a_key_gets_its_burst_and_then_429_with_the_policy() {
        let rates = Rates::new(&config(|c| {
            c.rate_limit_per_key = Some(SLOW);
            c.rate_limit_burst = Some(3);
        }));
        let (a, b) = (key("key-a"), key("key-b"));
        for _ in 0..3 {
            rates.take_key("t", &a).unwrap();
        }
        match rates.take_key("t", &a) {
            Err(Error::RateLimited {
                what,
                limit,
                window,
                retry_after,
            }) => {
                assert_eq!((what, limit, window), (KEY_RATE, 3, Some(3000)));
                assert!((990..=1000).contains(&retry_after), "{retry_after}");
            }
            other => panic!("{other:?}"),
        }
        // Another key, and the sandbox rate (unset), are unaffected.
        rates.take_key("t", &b).unwrap();
        rates.take_sandbox("t", &a).unwrap();
        assert_eq!(rates.max_connections("t"), usize::MAX);
    }

    #[test]
    fn team_rules_override_the_global_ones() {
        let rates = Rates::new(&config(|c| {
            c.rate_limit_per_key = Some(SLOW);
            c.rate_limit_burst = Some(1);
            c.max_connections_per_sandbox = Some(2);
            c.teams.insert(
                "big".into(),
                TeamConfig {
                    rate_limit_burst: Some(3),
                    rate_limit_per_sandbox: Some(SLOW),
                    max_connections_per_sandbox: Some(0),
                    ..Default::default()
                },
            );
            c.teams.insert(
                "free".into(),
                TeamConfig {
                    rate_limit_per_key: Some(0.0),
                    ..Default::default()
                },
            );
        }));
        let k = key("k");
        rates.take_key("small", &k).unwrap();
        assert!(rates.take_key("small", &k).is_err());
        let k = key("k2");
        for _ in 0..3 {
            rates.take_key("big", &k).unwrap();
        }
        assert!(rates.take_key("big", &k).is_err());
        for _ in 0..100 {
            rates.take_key("free", &k).unwrap();
        }
        // "big" has a sandbox rate of its own (burst 3), the others none.
        let sb = key("sb-x");
        for _ in 0..3 {
            rates.take_sandbox("big", &sb).unwrap();
        }
        assert!(rates.take_sandbox("big", &sb).is_err());
        rates.take_sandbox("small", &key("sb-y")).unwrap();
        assert_eq!(rates.max_connections("small"), 2);
        assert_eq!(rates.max_connections("big"), usize::MAX);
        assert_eq!(rates.max_connections("free"), 2);
    }

    #[test]
    fn failed_credentials_throttle_their_address_only() {
        let rates = Rates::new(&config(|c| {
            c.auth_failures_per_minute = Some(1.0);
            c.auth_failure_burst = 3;
        }));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for _ in 0..2 {
            rates.auth_failed(ip("192.0.2.1"));
            rates.throttled(ip("192.0.2.1")).unwrap();
        }
        rates.auth_failed(ip("192.0.2.1"));
        match rates.throttled(ip("192.0.2.1")) {
            Err(Error::RateLimited {
                what, retry_after, ..
            }) => {
                assert_eq!(what, AUTH_FAILURES);
                assert!((1..=60).contains(&retry_after), "{retry_after}");
            }
            other => panic!("{other:?}"),
        }
        rates.throttled(ip("192.0.2.2")).unwrap();
        // IPv6 addresses count by their /64.
        for i in 1..=3 {
            rates.auth_failed(ip(&format!("2001:db8::{i}")));
        }
        assert!(rates.throttled(ip("2001:db8::ffff")).is_err());
        assert!(rates.throttled(ip("2001:db8:0:1::1")).is_ok());
        // The sweep keeps what still limits.
        rates.sweep();
        assert!(rates.throttled(ip("192.0.2.1")).is_err());
        assert!(rates.tracked() >= 2);
    }

    #[test]
    fn connection_cap_refusal_says_so() {
        match too_many_connections(4) {
            Error::RateLimited {
                what,
                limit,
                window,
                retry_after,
            } => assert_eq!(
                (what, limit, window, retry_after),
                (SANDBOX_CONNECTIONS, 4, None, 1)
            ),
            other => panic!("{other:?}"),
        }
    }
}
