//! Authentication and tenancy over real sockets, in both lanes: keys by hash, teams that cannot
//! see each other ("not found", never "forbidden"), the role table walked route by route, the
//! gateway's credentials never reaching a sandbox, and the first start that writes
//! `admin.key` for the README's quick start.

use hyper::StatusCode;
use serde_json::{json, Value};

pub(crate) use crate::common::ADMIN_KEY as ADMIN;
use crate::common::{auth_gateway, team_key, Client, Lane, SpawnedGateway, TestGateway};

async fn gateway(lane: Lane) -> TestGateway {
    auth_gateway(lane, |_| {}).await
}

pub(crate) async fn key(gw: &Client, team: &str, role: &str) -> String {
    team_key(gw, team, role).await.0
}

/// A fixture sandbox of the team `key` belongs to.
async fn fixture(gw: &Client, key: &str) -> String {
    gw.with_key(key).create_fixture().await.id
}

async fn no_credential_is_401_and_keys_work_in_both_spellings(lane: Lane) {
    let gw = gateway(lane).await;
    let member = key(&gw, "acme", "member").await;
    let id = fixture(&gw, &member).await;
    for path in ["/sandboxes".to_string(), format!("/sandbox/{id}/")] {
        let r = gw.get(&path).send().await;
        r.expect_error(401, "AUTH_002");
        assert_eq!(r.header("www-authenticate"), "Bearer realm=\"sandgate\"");
        let r = gw
            .get(&path)
            .header("x-api-key", "sgk_nonsense")
            .send()
            .await;
        r.expect_error(401, "AUTH_001");
        assert!(r.header("www-authenticate").contains("invalid_token"));
        gw.get(&path)
            .header("x-api-key", &member)
            .send()
            .await
            .expect(200);
        let bearer = format!("Bearer {member}");
        gw.get(&path)
            .header("authorization", &bearer)
            .send()
            .await
            .expect(200);
    }
    // The host route and an unknown sandbox: 401 without a credential, whatever exists.
    let host = format!(
        "{}-{id}.localhost",
        gw.with_key(&member).sandbox(&id).await["port"]
    );
    gw.get("/")
        .header("host", &host)
        .send()
        .await
        .expect_error(401, "AUTH_002");
    gw.get("/")
        .header("host", &host)
        .header("x-api-key", &member)
        .send()
        .await
        .expect(200);
    gw.get("/sandbox/sb-aaaaaaaaaaaaaaaa/")
        .send()
        .await
        .expect_error(401, "AUTH_002");
    // A mistyped key says so; a browser gets a page saying how to authenticate.
    let mut typo = member.clone().into_bytes();
    typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
    let r = gw
        .get("/sandboxes")
        .header("x-api-key", std::str::from_utf8(&typo).unwrap())
        .send()
        .await;
    let v = r.json();
    assert!(
        v["error"]["details"].as_str().unwrap().contains("checksum"),
        "{v}"
    );
    let r = gw
        .get("/sandboxes")
        .header("accept", "text/html")
        .send()
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.text().contains("X-API-Key"), "{}", r.text());
    // Public health needs nothing; /health/auth tells no secret.
    let auth = gw.get("/health/auth").send().await.expect(200).json();
    assert_eq!(auth["enabled"], true);
    assert!(auth["failures_total"].as_u64().unwrap() >= 2, "{auth}");
    assert!(!auth.to_string().contains(&member[..20]));
    gw.shutdown().await;
}

async fn another_teams_sandbox_is_not_found_everywhere(lane: Lane) {
    let gw = gateway(lane).await;
    let a = key(&gw, "team-a", "member").await;
    let b = key(&gw, "team-b", "member").await;
    let id = fixture(&gw, &a).await;
    let port = gw.with_key(&a).sandbox(&id).await["port"].as_u64().unwrap();
    let gb = gw.with_key(&b);
    let sbpath = format!("/sandboxes/{id}");
    gb.get(&sbpath)
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    gb.get(&format!("{sbpath}/logs"))
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    for action in ["start", "stop"] {
        gb.post(&format!("{sbpath}/{action}"))
            .send()
            .await
            .expect_error(404, "sandbox_not_found");
    }
    gb.delete(&sbpath)
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    gb.get(&format!("/sandbox/{id}/"))
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    gb.get("/")
        .header("host", &format!("{port}-{id}.localhost"))
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    assert_eq!(
        gb.get("/sandboxes").send().await.expect(200).json()["count"],
        0
    );
    let health = gb.get("/health/sandboxes").send().await.expect(200).json();
    assert_eq!(health["count"], 0, "{health}");
    // Its own team, and the owner, see it.
    assert_eq!(
        gw.with_key(&a)
            .get("/sandboxes")
            .send()
            .await
            .expect(200)
            .json()["count"],
        1
    );
    let all = gw
        .with_key(ADMIN)
        .get("/sandboxes")
        .send()
        .await
        .expect(200)
        .json();
    assert_eq!(all["sandboxes"][0]["team"], "team-a");
    gw.with_key(&a)
        .get(&format!("/sandbox/{id}/"))
        .send()
        .await
        .expect(200);
    gw.with_key(&a).delete_sandbox(&id).await;
    gw.shutdown().await;
}

async fn revoked_and_expired_keys_stop_at_once(lane: Lane) {
    let gw = gateway(lane).await;
    let admin = key(&gw, "ops", "admin").await;
    let ga = gw.with_key(&admin);
    let r = ga
        .post("/auth/keys")
        .json(&json!({"name": "ci", "role": "member"}))
        .send()
        .await;
    r.expect(201);
    let v = r.json();
    let (member, member_id) = (
        v["key"].as_str().unwrap().to_string(),
        v["id"].as_str().unwrap().to_string(),
    );
    let id = fixture(&gw, &member).await;
    let gm = gw.with_key(&member);
    gm.get(&format!("/sandbox/{id}/")).send().await.expect(200);
    // Listing never shows a secret, and records use.
    let list = ga.get("/auth/keys").send().await.expect(200).json();
    assert!(!list.to_string().contains(&member), "{list}");
    let mine: Vec<&Value> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["id"] == member_id)
        .collect();
    assert_eq!(mine.len(), 1);
    assert!(mine[0]["last_used_at"].is_string(), "{list}");
    assert!(list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["team"] == "ops"));
    // An admin cannot mint an owner key or a key of another team.
    ga.post("/auth/keys")
        .json(&json!({"name": "x", "role": "owner"}))
        .send()
        .await
        .expect_error(403, "AUTH_003");
    ga.post("/auth/keys")
        .json(&json!({"name": "x", "team": "default"}))
        .send()
        .await
        .expect_error(403, "AUTH_003");
    ga.post("/auth/keys")
        .json(&json!({"name": "", "role": "member"}))
        .send()
        .await
        .expect_error(422, "validation_failed");
    ga.post("/auth/keys")
        .json(&json!({"name": "x", "role": "root"}))
        .send()
        .await
        .expect_error(422, "validation_failed");
    // Revoked: the next request, API or proxy, on a kept-alive connection or not, is refused.
    ga.delete(&format!("/auth/keys/{member_id}"))
        .send()
        .await
        .expect(200);
    gm.get(&format!("/sandbox/{id}/"))
        .send()
        .await
        .expect_error(401, "AUTH_001");
    gm.get("/sandboxes")
        .send()
        .await
        .expect_error(401, "AUTH_001");
    ga.delete(&format!("/auth/keys/{member_id}"))
        .send()
        .await
        .expect_error(404, "key_not_found");
    // Another team's admin cannot see or revoke this team's keys.
    let other = key(&gw, "elsewhere", "admin").await;
    gw.with_key(&other)
        .delete(&format!("/auth/keys/{}", &admin[4..14]))
        .send()
        .await
        .expect_error(404, "key_not_found");
    // An expired key says so.
    let r = ga
        .post("/auth/keys")
        .json(&json!({"name": "short", "role": "viewer", "expires_in": 1}))
        .send()
        .await;
    r.expect(201);
    let short = r.json()["key"].as_str().unwrap().to_string();
    crate::common::eventually(
        std::time::Duration::from_secs(5),
        "the key expires",
        || async {
            let r = gw.with_key(&short).get("/sandboxes").send().await;
            (r.status == StatusCode::UNAUTHORIZED).then(|| r.json())
        },
    )
    .await["error"]["details"]
        .as_str()
        .unwrap()
        .contains("expired")
        .then_some(())
        .expect("details say the key expired");
    gw.shutdown().await;
}

/// Every route with every role (and none): 401 without a credential except on public routes,
/// 403 `AUTH_003` where the role lacks the permission, and otherwise the route's own answer.
async fn the_permission_table(lane: Lane) {
    let gw = gateway(lane).await;
    let keys = [
        ("owner", ADMIN.to_string()),
        ("admin", key(&gw, "t", "admin").await),
        ("member", key(&gw, "t", "member").await),
        ("viewer", key(&gw, "t", "viewer").await),
    ];
    let id = fixture(&gw, &keys[2].1).await;
    let none = "sb-aaaaaaaaaaaaaaaa";
    // (method, path, body, roles allowed; `*` = no credential needed)
    let routes: Vec<(&str, String, Option<Value>, &[&str])> = vec![
        ("GET", "/health".into(), None, &["*"]),
        ("GET", "/health/auth".into(), None, &["*"]),
        ("GET", "/health/proxy".into(), None, &["*"]),
        (
            "GET",
            "/health/sandboxes".into(),
            None,
            &["owner", "admin", "member", "viewer"],
        ),
        (
            "GET",
            "/sandboxes".into(),
            None,
            &["owner", "admin", "member", "viewer"],
        ),
        (
            "GET",
            format!("/sandboxes/{id}"),
            None,
            &["owner", "admin", "member", "viewer"],
        ),
        (
            "GET",
            format!("/sandboxes/{id}/logs"),
            None,
            &["owner", "admin", "member", "viewer"],
        ),
        (
            "POST",
            "/sandboxes".into(),
            Some(json!({"runtime": "nope"})),
            &["owner", "admin", "member"],
        ),
        (
            "POST",
            "/sandbox".into(),
            Some(json!({"runtime": "nope"})),
            &["owner", "admin", "member"],
        ),
        (
            "POST",
            format!("/sandboxes/{none}/start"),
            None,
            &["owner", "admin", "member"],
        ),
        (
            "POST",
            format!("/sandboxes/{none}/stop"),
            None,
            &["owner", "admin", "member"],
        ),
        (
            "DELETE",
            format!("/sandboxes/{none}"),
            None,
            &["owner", "admin", "member"],
        ),
        (
            "PATCH",
            format!("/sandboxes/{none}"),
            Some(json!({})),
            &["owner", "admin", "member"],
        ),
        (
            "POST",
            format!("/sandboxes/{none}/preview-tokens"),
            None,
            &["owner", "admin", "member"],
        ),
        (
            "DELETE",
            format!("/sandboxes/{none}/preview-tokens"),
            None,
            &["owner", "admin", "member"],
        ),
        (
            "POST",
            format!("/sandboxes/{none}/exec"),
            Some(json!({"command": "true"})),
            &["owner", "admin", "member"],
        ),
        (
            "GET",
            format!("/sandboxes/{none}/exec/ex-aaaaaaaaaaaaaaaa"),
            None,
            &["owner", "admin", "member"],
        ),
        (
            "GET",
            format!("/ws/{none}"),
            None,
            &["owner", "admin", "member"],
        ),
        (
            "GET",
            format!("/sandboxes/{none}/pty"),
            None,
            &["owner", "admin", "member"],
        ),
        (
            "GET",
            format!("/sandboxes/{none}/files"),
            None,
            &["owner", "admin", "member", "viewer"],
        ),
        (
            "DELETE",
            format!("/sandboxes/{none}/files?path=x"),
            None,
            &["owner", "admin", "member"],
        ),
        (
            "GET",
            format!("/ui/sandboxes/{none}/terminal"),
            None,
            &["*"],
        ),
        ("GET", "/ui/assets/terminal.js".into(), None, &["*"]),
        (
            "POST",
            "/auth/token".into(),
            None,
            &["owner", "admin", "member", "viewer"],
        ),
        ("GET", "/auth/keys".into(), None, &["owner", "admin"]),
        (
            "POST",
            "/auth/keys".into(),
            Some(json!({"name": ""})),
            &["owner", "admin"],
        ),
        (
            "DELETE",
            "/auth/keys/nosuchkey0".into(),
            None,
            &["owner", "admin"],
        ),
        ("GET", "/audit".into(), None, &["owner", "admin"]),
        ("GET", "/teams".into(), None, &["owner"]),
        (
            "POST",
            "/teams".into(),
            Some(json!({"name": "Bad Name"})),
            &["owner"],
        ),
        (
            "GET",
            format!("/sandbox/{id}/"),
            None,
            &["owner", "admin", "member", "viewer"],
        ),
        (
            "HEAD",
            format!("/sandbox/{id}/"),
            None,
            &["owner", "admin", "member", "viewer"],
        ),
        (
            "POST",
            format!("/sandbox/{id}/echo"),
            Some(json!({})),
            &["owner", "admin", "member"],
        ),
        (
            "DELETE",
            format!("/sandbox/{id}/echo"),
            None,
            &["owner", "admin", "member"],
        ),
    ];
    for (method, path, body, allowed) in &routes {
        let send = |key: Option<&str>| {
            let mut r = gw.req(method.parse().unwrap(), path);
            if let Some(k) = key {
                r = r.header("x-api-key", k);
            }
            if let Some(b) = body {
                r = r.json(b);
            }
            r.send()
        };
        let r = send(None).await;
        if allowed.contains(&"*") {
            assert!(
                r.status.is_success(),
                "{method} {path} without a key: {}",
                r.status
            );
            continue;
        }
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a key"
        );
        for (role, k) in &keys {
            let r = send(Some(k)).await;
            if allowed.contains(role) {
                assert!(
                    r.status != StatusCode::UNAUTHORIZED && r.status != StatusCode::FORBIDDEN,
                    "{role} {method} {path}: {} {}",
                    r.status,
                    r.text()
                );
            } else {
                assert_eq!(
                    r.status,
                    StatusCode::FORBIDDEN,
                    "{role} {method} {path}: {}",
                    r.text()
                );
                if *method != "HEAD" {
                    r.expect_error(403, "AUTH_003");
                }
            }
        }
    }
    // A viewer reads through the proxy but cannot open a WebSocket (two-way) to it.
    let viewer = gw.with_key(&keys[3].1);
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/sandbox/{id}/ws", gw.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-api-key", keys[3].1.parse().unwrap());
    let err = tokio_tungstenite::client_async(req, stream)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    drop(viewer);
    gw.with_key(&keys[2].1)
        .websocket(&format!("/sandbox/{id}/ws"), None)
        .await;
    gw.shutdown().await;
}

/// The gateway's credentials are stripped before a request reaches a sandbox, for each
/// credential kind and each route kind; an `Authorization` the gateway did not use passes.
async fn gateway_credentials_never_reach_a_sandbox(lane: Lane) {
    let gw = gateway(lane).await;
    let member = key(&gw, "acme", "member").await;
    let gm = gw.with_key(&member);
    let sb = gm
        .create_fixture_with("", json!({"owner": "alice", "name": "app"}))
        .await;
    let id = sb.id.clone();
    let host = format!("{}-{id}.localhost", sb.port);
    let token = gm.post("/auth/token").send().await.expect(200).json()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let routes: [(String, Option<&str>); 3] = [
        (format!("/sandbox/{id}/echo"), None),
        ("/alice/app/echo".to_string(), None),
        ("/echo".to_string(), Some(host.as_str())),
    ];
    for (path, host) in &routes {
        let with_host = |r: crate::common::Req| match host {
            Some(h) => r.header("host", h),
            None => r,
        };
        // X-API-Key
        let seen = with_host(gw.get(path).header("x-api-key", &member))
            .send()
            .await
            .expect(200)
            .json();
        let h = &seen["headers"];
        assert!(h.get("x-api-key").is_none(), "{path}: {seen}");
        // Authorization: Bearer <key>
        let seen = with_host(
            gw.get(path)
                .header("authorization", &format!("Bearer {member}")),
        )
        .send()
        .await
        .expect(200)
        .json();
        assert!(
            seen["headers"].get("authorization").is_none(),
            "{path}: {seen}"
        );
        assert!(!seen.to_string().contains(&member[..14]), "{path}: {seen}");
        // Authorization: Bearer <minted JWT>.
        let seen = with_host(
            gw.get(&format!("{path}?q=1"))
                .header("authorization", &format!("Bearer {token}")),
        )
        .send()
        .await
        .expect(200)
        .json();
        assert!(
            seen["headers"].get("authorization").is_none(),
            "{path}: {seen}"
        );
        assert_eq!(seen["query"], "q=1", "{path}: {seen}");
        // The app's own Authorization passes when the gateway used X-API-Key.
        let seen = with_host(
            gw.get(path)
                .header("x-api-key", &member)
                .header("authorization", "Basic YXBwOnNlY3JldA=="),
        )
        .send()
        .await
        .expect(200)
        .json();
        assert_eq!(
            seen["headers"]["authorization"], "Basic YXBwOnNlY3JldA==",
            "{path}"
        );
    }
    gm.delete_sandbox(&id).await;
    gw.shutdown().await;
}

both_lanes!(
    no_credential_is_401_and_keys_work_in_both_spellings,
    another_teams_sandbox_is_not_found_everywhere,
    revoked_and_expired_keys_stop_at_once,
    the_permission_table,
    gateway_credentials_never_reach_a_sandbox,
);

/// The README's quick start: a first start with authentication on (the default) writes the
/// owner key to `<data-dir>/admin.key` (0600), prints it once, and that key works; a restart
/// keeps it and prints nothing.
#[tokio::test(flavor = "multi_thread")]
async fn first_start_writes_the_owner_key_for_the_quick_start() {
    use std::os::unix::fs::PermissionsExt;
    let mut gw = SpawnedGateway::start(4, &["--auth-enabled", "true"]).await;
    let path = gw.data_dir().join("admin.key");
    let meta = std::fs::metadata(&path).expect("admin.key written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let key = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert!(key.starts_with("sgk_"), "{key}");
    let log = std::fs::read_to_string(gw.data_dir().join("gateway.log")).unwrap();
    assert_eq!(log.matches(&key).count(), 1, "printed once: {log}");
    gw.get("/sandboxes")
        .send()
        .await
        .expect_error(401, "AUTH_002");
    let owner = gw.with_key(&key);
    owner.get("/sandboxes").send().await.expect(200);
    let teams = owner.get("/teams").send().await.expect(200).json();
    assert_eq!(teams["teams"][0]["id"], "default");
    gw.terminate().await;
    gw.restart().await;
    gw.with_key(&key).get("/sandboxes").send().await.expect(200);
    assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), key);
    let log = std::fs::read_to_string(gw.data_dir().join("gateway.log")).unwrap();
    assert_eq!(log.matches(&key).count(), 1, "not printed again: {log}");
}

/// With authentication off (loopback only), `/health/auth` says the gateway is open.
#[tokio::test(flavor = "multi_thread")]
async fn an_open_gateway_says_so() {
    let gw = TestGateway::start().await;
    let v = gw.get("/health/auth").send().await.expect(200).json();
    assert_eq!(v["status"], "open");
    assert_eq!(v["enabled"], false);
    gw.get("/sandboxes").send().await.expect(200);
    gw.shutdown().await;
}
