//! Browser previews and public ports, in both lanes: a preview URL is exchanged once for a
//! host-only HttpOnly cookie (303 to the same URL without the token) that opens its own
//! sandbox (and port) only, never another sandbox or the API, never reaches the sandbox, and
//! stops when the sandbox's previews are revoked; path routes get a cookie scoped to their
//! prefix; public ports need no credential.

use futures_util::{SinkExt, StreamExt};
use hyper::StatusCode;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{auth_gateway, team_key, Client, Lane};

/// `(host header, path and query)` of a preview URL.
fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    (authority.to_string(), path.to_string())
}

/// The `name=value` part of a `Set-Cookie`.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

async fn preview(gw: &Client, id: &str, body: serde_json::Value) -> serde_json::Value {
    let r = gw
        .post(&format!("/sandboxes/{id}/preview-tokens"))
        .json(&body)
        .send()
        .await;
    r.expect(201);
    r.json()
}

async fn a_preview_url_opens_its_sandbox_in_a_browser_and_nothing_else(lane: Lane) {
    let gw = auth_gateway(lane, |_| {}).await;
    let (key, _) = team_key(&gw, "acme", "member").await;
    let member = gw.with_key(&key);
    let a = member.create_fixture().await;
    let b = member.create_fixture().await;
    let v = preview(&member, &a.id, json!({})).await;
    assert!(
        v["expires_at"].is_string() && v["token"].as_str().unwrap().starts_with("sgp_"),
        "{v}"
    );
    let (host, path) = split_url(v["url"].as_str().unwrap());
    assert_eq!(
        host.split(':').next().unwrap(),
        format!("{}-{}.localhost", a.port, a.id)
    );
    // The exchange: 303 to the URL without the token, and the cookie.
    let r = gw
        .get(&format!("{path}&x=1"))
        .header("host", &host)
        .send()
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text());
    assert_eq!(r.header("location"), "/?x=1");
    let set = r.header("set-cookie").to_string();
    assert!(set.starts_with("sandgate_preview=sgp_"), "{set}");
    for attr in ["Path=/;", "HttpOnly", "SameSite=Lax", "Max-Age="] {
        assert!(set.contains(attr), "{attr} missing: {set}");
    }
    assert!(!set.contains("Domain"), "host-only: {set}");
    let cookie = format!("{}; theme=dark", cookie_pair(&set));
    // The page, its assets: no headers but the cookie; the sandbox never sees it.
    let r = gw
        .get("/")
        .header("host", &host)
        .header("cookie", &cookie)
        .send()
        .await;
    r.expect(200);
    assert_eq!(r.text(), "fixture ok");
    let seen = gw
        .get("/echo/asset.js?v=1")
        .header("host", &host)
        .header("cookie", &cookie)
        .send()
        .await
        .expect(200)
        .json();
    assert_eq!(seen["headers"]["cookie"], "theme=dark", "{seen}");
    assert!(
        !seen.to_string().contains("sgp_") && !seen.to_string().contains("sandgate_token"),
        "{seen}"
    );
    // Its WebSockets (Vite's HMR channel) too.
    let mut req = format!("ws://{}/ws", gw.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("host", host.parse().unwrap());
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("websocket with the preview cookie");
    ws.send(Message::text("hi")).await.unwrap();
    assert!(ws.next().await.unwrap().unwrap().is_text());
    // Never another sandbox, never the API.
    let host_b = format!("{}-{}.localhost", b.port, b.id);
    gw.get("/")
        .header("host", &host_b)
        .header("cookie", &cookie)
        .send()
        .await
        .expect_error(401, "AUTH_002");
    gw.get(&format!("/sandbox/{}/", b.id))
        .header("cookie", &cookie)
        .send()
        .await
        .expect_error(401, "AUTH_002");
    gw.get("/sandboxes")
        .header("cookie", &cookie)
        .send()
        .await
        .expect_error(401, "AUTH_002");
    // A token for one sandbox opened on another's host is refused outright.
    gw.get(&path)
        .header("host", &host_b)
        .send()
        .await
        .expect_error(401, "AUTH_001");
    // Revoked: the cookie stops working.
    member
        .delete(&format!("/sandboxes/{}/preview-tokens", a.id))
        .send()
        .await
        .expect(200);
    gw.get("/")
        .header("host", &host)
        .header("cookie", &cookie)
        .send()
        .await
        .expect_error(401, "AUTH_002");
    gw.get(&path)
        .header("host", &host)
        .send()
        .await
        .expect_error(401, "AUTH_001");
    gw.shutdown().await;
}

async fn path_route_previews_are_scoped_to_their_prefix(lane: Lane) {
    let gw = auth_gateway(lane, |_| {}).await;
    let (key, _) = team_key(&gw, "acme", "member").await;
    let member = gw.with_key(&key);
    let a = member.create_fixture().await;
    let v = preview(&member, &a.id, json!({"ttl": 600})).await;
    let path_url = v["path_url"].as_str().unwrap();
    let path = &path_url[path_url.find("/sandbox/").unwrap()..];
    let r = gw.get(path).send().await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(r.header("location"), format!("/sandbox/{}/", a.id));
    let set = r.header("set-cookie").to_string();
    assert!(set.contains(&format!("Path=/sandbox/{}/;", a.id)), "{set}");
    let max_age: i64 = set
        .split("Max-Age=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((590..=600).contains(&max_age), "{set}");
    let cookie = cookie_pair(&set);
    let r = gw
        .get(&format!("/sandbox/{}/", a.id))
        .header("cookie", &cookie)
        .send()
        .await;
    assert_eq!(r.text(), "fixture ok");
    gw.shutdown().await;
}

async fn port_scoped_previews_and_public_ports(lane: Lane) {
    let gw = auth_gateway(lane, |_| {}).await;
    let (key, _) = team_key(&gw, "acme", "member").await;
    let member = gw.with_key(&key);
    let a = member.create_fixture().await;
    let host = format!("{}-{}.localhost", a.port, a.id);
    // A token for another port does not open this one.
    let v = preview(&member, &a.id, json!({"port": a.port + 1})).await;
    let (_, path) = split_url(v["url"].as_str().unwrap());
    gw.get(&path)
        .header("host", &host)
        .send()
        .await
        .expect_error(401, "AUTH_001");
    member
        .post(&format!("/sandboxes/{}/preview-tokens", a.id))
        .json(&json!({"ttl": 0}))
        .send()
        .await
        .expect_error(422, "validation_failed");
    // Public port: no credential; made private again: 401.
    gw.get("/")
        .header("host", &host)
        .send()
        .await
        .expect_error(401, "AUTH_002");
    let r = member
        .req(hyper::Method::PATCH, &format!("/sandboxes/{}", a.id))
        .json(&json!({"public_ports": [a.port]}))
        .send()
        .await;
    r.expect(200);
    assert_eq!(r.json()["public_ports"], json!([a.port]));
    gw.get("/").header("host", &host).send().await.expect(200);
    gw.get(&format!("/sandbox/{}/", a.id))
        .send()
        .await
        .expect(200);
    // No exchange on a public port: a stray token parameter is dropped on the way.
    let seen = gw
        .get("/echo?sandgate_token=zzz&a=1")
        .header("host", &host)
        .send()
        .await
        .expect(200)
        .json();
    assert_eq!(seen["query"], "a=1", "{seen}");
    // Public ports never open the API.
    gw.get(&format!("/sandboxes/{}", a.id))
        .send()
        .await
        .expect_error(401, "AUTH_002");
    member
        .req(hyper::Method::PATCH, &format!("/sandboxes/{}", a.id))
        .json(&json!({"public_ports": []}))
        .send()
        .await
        .expect(200);
    gw.get("/")
        .header("host", &host)
        .send()
        .await
        .expect_error(401, "AUTH_002");
    member
        .req(hyper::Method::PATCH, &format!("/sandboxes/{}", a.id))
        .json(&json!({"public_ports": [0]}))
        .send()
        .await
        .expect_error(422, "validation_failed");
    // Public at create.
    let b = member
        .create_fixture_with("", json!({"public": true}))
        .await;
    assert_eq!(b.view["public"], true);
    gw.get(&format!("/sandbox/{}/", b.id))
        .send()
        .await
        .expect(200);
    gw.shutdown().await;
}

/// In a real browser (headless Chromium) with no headers of its own: the preview URL of a page
/// on the host route and on the path route; the page loads its script, which fetches and opens
/// a WebSocket through the gateway on the cookie alone, and the sandbox never sees that cookie.
/// Another sandbox's page in the same browser stays 401.
async fn a_preview_works_in_a_real_browser(lane: Lane) {
    if !crate::common::browser::available() {
        return;
    }
    let gw = auth_gateway(lane, |_| {}).await;
    let (key, _) = team_key(&gw, "acme", "member").await;
    let member = gw.with_key(&key);
    let a = member.create_fixture().await;
    let b = member.create_fixture().await;
    let v = preview(&member, &a.id, json!({})).await;
    let host_url = v["url"]
        .as_str()
        .unwrap()
        .replace("/?sandgate_token", "/page?sandgate_token");
    let path_url = v["path_url"]
        .as_str()
        .unwrap()
        .replace("/?sandgate_token", "/page?sandgate_token");
    let mut browser = crate::common::browser::Browser::start().await;
    for url in [&host_url, &path_url] {
        let tab = browser.open(url).await;
        let out = browser
            .wait_for(
                &tab,
                "document.getElementById('out')?.textContent ?? ''",
                |t| t.starts_with("ws ok") || t.starts_with("failed") || t == "ws failed",
            )
            .await;
        assert_eq!(
            out, "ws ok: hello from the page; fetch saw cookie: none",
            "{url}"
        );
        let href = browser.eval(&tab, "location.href").await;
        assert!(!href.as_str().unwrap().contains("sandgate_token"), "{href}");
    }
    let other = format!(
        "http://{}-{}.localhost:{}/page",
        b.port,
        b.id,
        gw.addr.port()
    );
    let tab = browser.open(&other).await;
    let title = browser
        .wait_for(&tab, "document.title", |t| !t.is_empty())
        .await;
    assert!(title.starts_with("401"), "{title}");
    drop(browser);
    gw.shutdown().await;
}

both_lanes!(
    a_preview_works_in_a_real_browser,
    a_preview_url_opens_its_sandbox_in_a_browser_and_nothing_else,
    path_route_previews_are_scoped_to_their_prefix,
    port_scoped_previews_and_public_ports,
);
