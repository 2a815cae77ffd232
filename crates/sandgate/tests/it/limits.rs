//! Rate limits, connection caps, the failed-credential throttle and address rules, over real
//! sockets in both lanes: per key (API and proxy alike, counted once even where the fast lane
//! hands a request to hyper's lane), per sandbox, per team; brute force from one address
//! against another; allowlists, global and per team; `X-Forwarded-For` believed only from a
//! trusted proxy.

use hyper::StatusCode;
use sandgate::config::{Config, TeamConfig};
use serde_json::{json, Value};

use crate::auth::{key, ADMIN};
use crate::common::{
    eventually, wait_in_flight, Client, Lane, Reply, TestGateway, TestSandbox, READY_TIMEOUT,
};

/// One request per 1000 s: nothing is replenished while a test runs, so a burst is exact.
const SLOW: f64 = 0.001;

/// A gateway with authentication on (owner key `ADMIN`), configured by `tweak`.
async fn gateway(lane: Lane, tweak: impl FnOnce(&mut Config) + Send + 'static) -> TestGateway {
    TestGateway::builder()
        .lane(lane)
        .config(|c| {
            c.auth_enabled = true;
            c.admin_key = Some(ADMIN.into());
        })
        .config(tweak)
        .start()
        .await
}

fn team(f: impl FnOnce(&mut TeamConfig)) -> TeamConfig {
    let mut t = TeamConfig::default();
    f(&mut t);
    t
}

/// A fixture sandbox created with `creator` (one API request), waited for through
/// `/health/sandboxes` as the owner: no request reaches it through the proxy, so none of
/// its, or its creator's, rate is spent.
async fn quiet_fixture(gw: &Client, creator: &str) -> TestSandbox {
    let sb = gw
        .with_key(creator)
        .create_program("", &crate::common::fixture_program(), json!({}))
        .await;
    let owner = gw.with_key(ADMIN);
    eventually(READY_TIMEOUT, "the fixture listens", || async {
        let v = owner.get("/health/sandboxes").send().await.json();
        let ready = v["sandboxes"]
            .as_array()?
            .iter()
            .any(|s| s["id"] == sb.id.as_str() && s["ready"] == true);
        ready.then_some(())
    })
    .await;
    sb
}

/// Asserts a 429 `rate_limited` with `Retry-After` and the ratelimit-headers-06 fields.
#[track_caller]
fn assert_limited(r: &Reply, limit: u32, policy: Option<&str>) -> String {
    let message = r.expect_error(429, "rate_limited");
    assert_eq!(r.header("ratelimit-limit"), limit.to_string(), "{r:?}");
    assert_eq!(r.header("ratelimit-remaining"), "0", "{r:?}");
    let retry: u64 = r
        .header("retry-after")
        .parse()
        .expect("Retry-After seconds");
    assert!(retry >= 1, "{r:?}");
    assert_eq!(r.header("ratelimit-reset"), retry.to_string(), "{r:?}");
    assert_eq!(r.header("ratelimit-policy"), policy.unwrap_or(""), "{r:?}");
    message
}

/// A key's burst is shared by the API and every proxy route, and a request the fast lane
/// hands to hyper's lane (the API, a WebSocket upgrade) takes one token, not two: exactly
/// `burst` requests pass. Another key of the same team is unaffected.
async fn per_key_rate_covers_api_and_proxy_once_each(lane: Lane) {
    let gw = gateway(lane, |c| {
        c.teams.insert(
            "metered".into(),
            team(|t| {
                t.rate_limit_per_key = Some(SLOW);
                t.rate_limit_burst = Some(5);
            }),
        );
    })
    .await;
    let creator = key(&gw, "metered", "member").await;
    let tested = key(&gw, "metered", "member").await;
    let other = key(&gw, "metered", "member").await;
    let sb = quiet_fixture(&gw, &creator).await;
    let g = gw.with_key(&tested);
    g.get(&sb.path("/")).send().await.expect(200);
    g.get("/sandboxes").send().await.expect(200);
    let mut ws = g.websocket(&sb.path("/ws"), None).await;
    ws.close(None).await.unwrap();
    g.get(&format!("/sandboxes/{}", sb.id))
        .send()
        .await
        .expect(200);
    g.get(&sb.path("/echo")).send().await.expect(200);
    // The sixth request, on any route, is refused.
    let r = g.get(&sb.path("/")).send().await;
    let message = assert_limited(&r, 5, Some("5;w=5000"));
    assert!(message.contains("credential"), "{message}");
    assert_limited(&g.get("/sandboxes").send().await, 5, Some("5;w=5000"));
    let r = g
        .get(&sb.path("/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await;
    assert_limited(&r, 5, Some("5;w=5000"));
    // Another key (of the same team) has a bucket of its own.
    let o = gw.with_key(&other);
    o.get(&sb.path("/")).send().await.expect(200);
    o.get("/sandboxes").send().await.expect(200);
    // Public routes take no token.
    g.get("/health").send().await.expect(200);
    gw.shutdown().await;
}

/// A sandbox's rate counts every key's requests to it; a team's own burst beats the global
/// one; the API about a sandbox does not count against its proxy rate.
async fn per_sandbox_rate_with_a_team_override(lane: Lane) {
    let gw = gateway(lane, |c| {
        c.rate_limit_per_sandbox = Some(SLOW);
        c.rate_limit_burst = Some(2);
        c.teams
            .insert("big".into(), team(|t| t.rate_limit_burst = Some(4)));
    })
    .await;
    let (x, y) = (
        key(&gw, "small", "member").await,
        key(&gw, "small", "member").await,
    );
    let big = key(&gw, "big", "member").await;
    let small_sb = quiet_fixture(&gw, &x).await;
    let big_sb = quiet_fixture(&gw, &big).await;
    gw.with_key(&x)
        .get(&small_sb.path("/"))
        .send()
        .await
        .expect(200);
    gw.with_key(&y)
        .get(&small_sb.path("/"))
        .send()
        .await
        .expect(200);
    gw.with_key(&x)
        .get(&format!("/sandboxes/{}", small_sb.id))
        .send()
        .await
        .expect(200);
    let r = gw.with_key(&x).get(&small_sb.path("/")).send().await;
    let message = assert_limited(&r, 2, Some("2;w=2000"));
    assert!(message.contains("sandbox"), "{message}");
    // The host route is the same sandbox.
    let host = format!("{}-{}.localhost", small_sb.port, small_sb.id);
    let r = gw.with_key(&y).get("/").header("host", &host).send().await;
    assert_limited(&r, 2, Some("2;w=2000"));
    // Team "big" has a burst of 4.
    let gb = gw.with_key(&big);
    for _ in 0..4 {
        gb.get(&big_sb.path("/")).send().await.expect(200);
    }
    assert_limited(&gb.get(&big_sb.path("/")).send().await, 4, Some("4;w=4000"));
    gw.shutdown().await;
}

/// At `max_connections_per_sandbox` requests in flight to a sandbox the next one gets 429;
/// other sandboxes are unaffected, and the slot is free again once a response has ended.
async fn connections_per_sandbox_are_capped(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| c.max_connections_per_sandbox = Some(2))
        .start()
        .await;
    let sb = gw.create_fixture().await;
    let other = gw.create_fixture().await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let req = gw.get(&sb.path("/delay/2000"));
            tokio::spawn(req.send())
        })
        .collect();
    wait_in_flight(&gw, 2).await;
    let r = gw.get(&sb.path("/")).send().await;
    let message = assert_limited(&r, 2, None);
    assert!(message.contains("connections"), "{message}");
    gw.get(&other.path("/")).send().await.expect(200);
    for h in held {
        assert_eq!(h.await.unwrap().expect(200).text(), "delayed");
    }
    eventually(READY_TIMEOUT, "a place is free again", || async {
        let r = gw.get(&sb.path("/")).send().await;
        (r.status == StatusCode::OK).then_some(())
    })
    .await;
    gw.shutdown().await;
}

/// Refused credentials from one address: the budget's worth are checked (401), then every
/// request from it that needs a credential gets 429 before any is checked, a good key's too
/// (else the answer would tell a guess that hit). Another address is unaffected.
async fn brute_force_is_throttled_per_address(lane: Lane) {
    let gw = gateway(lane, |c| {
        c.auth_failures_per_minute = Some(1.0);
        c.auth_failure_burst = 3;
    })
    .await;
    let member = key(&gw, "acme", "member").await;
    let none = "/sandbox/sb-aaaaaaaaaaaaaaaa/";
    let bad = "sgk_nonsense";
    // Three failures, on the API and a proxy route alike, each counted once.
    gw.get("/sandboxes")
        .header("x-api-key", bad)
        .send()
        .await
        .expect_error(401, "AUTH_001");
    gw.get(none)
        .header("x-api-key", bad)
        .send()
        .await
        .expect_error(401, "AUTH_001");
    gw.get("/sandboxes")
        .header("authorization", &format!("Bearer {bad}"))
        .send()
        .await
        .expect_error(401, "AUTH_001");
    let r = gw.get(none).header("x-api-key", bad).send().await;
    let message = assert_limited(&r, 3, Some("3;w=180"));
    assert!(message.contains("failed authentication"), "{message}");
    assert_limited(
        &gw.get("/sandboxes")
            .header("x-api-key", &member)
            .send()
            .await,
        3,
        Some("3;w=180"),
    );
    assert_limited(&gw.get("/sandboxes").send().await, 3, Some("3;w=180"));
    gw.get("/health").send().await.expect(200);
    // Another address: checked as usual.
    let elsewhere = gw.connecting_from("127.0.0.2");
    elsewhere
        .get("/sandboxes")
        .header("x-api-key", bad)
        .send()
        .await
        .expect_error(401, "AUTH_001");
    elsewhere
        .get("/sandboxes")
        .header("x-api-key", &member)
        .send()
        .await
        .expect(200);
    elsewhere
        .get(none)
        .header("x-api-key", &member)
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    // Throttled requests are not failures: four were refused credentials.
    let auth = gw.get("/health/auth").send().await.expect(200).json();
    assert_eq!(auth["failures_total"], 4, "{auth}");
    gw.shutdown().await;
}

/// `allowed_ips`: another address gets 403 `AUTH_004` before anything else is decided
/// (no 401, no health), an allowed one is served.
async fn only_allowed_addresses_are_served(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .client_from("127.0.0.2")
        .config(|c| {
            c.auth_enabled = true;
            c.admin_key = Some(ADMIN.into());
            c.allowed_ips = vec!["127.0.0.2/32".parse().unwrap()];
        })
        .start()
        .await;
    let owner = gw.with_key(ADMIN);
    let sb = owner.create_fixture().await;
    owner.get(&sb.path("/")).send().await.expect(200);
    let refused = gw.connecting_from("127.0.0.1");
    let proxied = sb.path("/");
    for path in [
        "/health",
        "/sandboxes",
        &proxied,
        "/sandbox/sb-aaaaaaaaaaaaaaaa/",
    ] {
        let r = refused.get(path).send().await;
        r.expect_error(403, "AUTH_004");
        let r = refused.with_key(ADMIN).get(path).send().await;
        r.expect_error(403, "AUTH_004");
    }
    // Not even a refused credential is counted for a refused address.
    let auth = owner.get("/health/auth").send().await.expect(200).json();
    assert_eq!(auth["failures_total"], 0, "{auth}");
    gw.shutdown().await;
}

/// A team's `allowed_ips`: its credentials work only from there; other teams' anywhere.
async fn a_team_allowlist_binds_its_credentials(lane: Lane) {
    let gw = gateway(lane, |c| {
        c.teams.insert(
            "office".into(),
            team(|t| t.allowed_ips = Some(vec!["127.0.0.2".parse().unwrap()])),
        );
    })
    .await;
    let office = key(&gw, "office", "member").await;
    let other = key(&gw, "remote", "member").await;
    let at_office = gw.connecting_from("127.0.0.2").with_key(&office);
    let sb = at_office.create_fixture().await;
    let away = gw.with_key(&office);
    away.get("/sandboxes")
        .send()
        .await
        .expect_error(403, "AUTH_004");
    away.get(&sb.path("/"))
        .send()
        .await
        .expect_error(403, "AUTH_004");
    at_office.get(&sb.path("/")).send().await.expect(200);
    gw.with_key(&other)
        .get("/sandboxes")
        .send()
        .await
        .expect(200);
    gw.shutdown().await;
}

/// `X-Forwarded-For` is believed only from a trusted proxy, for the allowlist and for what
/// the sandbox is told: the one address the gateway resolved.
async fn forwarded_for_is_believed_only_from_trusted_proxies(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| {
            c.allowed_ips = ["127.0.0.1", "203.0.113.0/24"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
            c.trusted_proxies = vec!["127.0.0.2".parse().unwrap()];
        })
        .start()
        .await;
    let sb = gw.create_fixture().await;
    let seen = |r: Reply| -> Value { r.expect(200).json()["headers"]["x-forwarded-for"].clone() };
    // An untrusted peer's header is ignored (and not passed on).
    let r = gw
        .get(&sb.path("/echo"))
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await;
    assert_eq!(seen(r), "127.0.0.1");
    let r = gw
        .connecting_from("127.0.0.3")
        .get(&sb.path("/echo"))
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await;
    r.expect_error(403, "AUTH_004");
    // A trusted proxy's is believed: the rightmost address that is not a trusted proxy.
    let proxy = gw.connecting_from("127.0.0.2");
    let r = proxy
        .get(&sb.path("/echo"))
        .header("x-forwarded-for", "198.51.100.1, 203.0.113.7")
        .send()
        .await;
    assert_eq!(seen(r), "203.0.113.7");
    let r = proxy
        .get(&sb.path("/echo"))
        .header("x-forwarded-for", "198.51.100.1")
        .header("x-forwarded-for", "203.0.113.8, 127.0.0.2")
        .send()
        .await;
    assert_eq!(seen(r), "203.0.113.8");
    proxy
        .get("/health")
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .expect(200);
    for xff in [
        None,
        Some("198.51.100.1"),
        Some("203.0.113.7, 198.51.100.1"),
    ] {
        let mut req = proxy.get(&sb.path("/echo"));
        if let Some(v) = xff {
            req = req.header("x-forwarded-for", v);
        }
        req.send().await.expect_error(403, "AUTH_004");
    }
    gw.shutdown().await;
}

both_lanes!(
    per_key_rate_covers_api_and_proxy_once_each,
    per_sandbox_rate_with_a_team_override,
    connections_per_sandbox_are_capped,
    brute_force_is_throttled_per_address,
    only_allowed_addresses_are_served,
    a_team_allowlist_binds_its_credentials,
    forwarded_for_is_believed_only_from_trusted_proxies,
);

/// The defaults never bite: no rate, no cap, every address, and a throttle that needs
/// several refused credentials in a row.
#[tokio::test(flavor = "multi_thread")]
async fn the_defaults_limit_nothing_normal() {
    let c = Config::for_data_dir("unused");
    assert_eq!(c.rate_limit_per_key, None);
    assert_eq!(c.rate_limit_per_sandbox, None);
    assert_eq!(c.max_connections_per_sandbox, None);
    assert!(c.allowed_ips.is_empty() && c.trusted_proxies.is_empty());
    assert!(c.auth_failure_burst >= 5);
    let gw = TestGateway::start().await;
    let sb = gw.create_fixture().await;
    let many: Vec<_> = (0..40)
        .map(|_| tokio::spawn(gw.get(&sb.path("/")).send()))
        .collect();
    for r in many {
        assert_eq!(r.await.unwrap().status, StatusCode::OK);
    }
    let v = gw.get("/health/proxy").send().await.expect(200).json();
    assert_eq!(v["rate_limits"]["per_key"], Value::Null, "{v}");
    gw.shutdown().await;
}
