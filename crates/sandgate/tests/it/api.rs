//! The control API: create, list, inspect, stop/start, delete, logs, and every refusal's status
//! and error shape.

use std::collections::BTreeMap;

use hyper::Method;
use sandgate::config::RuntimeConfig;
use serde_json::json;

use crate::common::{eventually, fixture_body, TestGateway, READY_TIMEOUT};

#[tokio::test(flavor = "multi_thread")]
async fn create_returns_201_with_the_sandbox() {
    let gw = TestGateway::start().await;
    let (lo, hi) = gw.port_range();
    for endpoint in ["/sandboxes", "/sandbox"] {
        let r = gw.post(endpoint).json(&fixture_body()).send().await;
        r.expect(201);
        let v = r.json();
        let id = v["id"].as_str().expect("id").to_string();
        assert!(id.starts_with("sb-"), "{v}");
        assert_eq!(v["sandbox_id"], json!(id), "{v}");
        assert_eq!(v["status"], "running", "{v}");
        assert_eq!(v["runtime"], "shell", "{v}");
        assert_eq!(v["proxy_enabled"], true, "{v}");
        assert_eq!(
            v["dev_server_url"],
            json!(gw.url(&format!("/sandbox/{id}/"))),
            "{v}"
        );
        let port = v["allocated_port"].as_u64().expect("allocated_port") as u16;
        assert!((lo..=hi).contains(&port), "port {port} outside {lo}-{hi}");
        assert!(v["created_at"].as_f64().expect("created_at number") > 1.6e9);
        assert_eq!(r.header("location"), format!("/sandboxes/{id}"));
        gw.leader(&id, None).await;
        gw.wait_ready(&id).await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_has_count_and_sandboxes_with_path_and_ready() {
    let gw = TestGateway::start().await;
    assert_eq!(gw.count().await, 0);
    let named = gw
        .create_fixture_with("", json!({"owner": "alice", "name": "web"}))
        .await;
    let plain = gw.create_fixture().await;
    let list = gw.list().await;
    assert_eq!(list.len(), 2);
    let find = |id: &str| {
        list.iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("{id} not listed in {list:?}"))
            .clone()
    };
    let n = find(&named.id);
    assert_eq!(n["path"], "alice/web", "{n}");
    assert_eq!(n["ready"], true, "{n}");
    assert_eq!(n["status"], "running", "{n}");
    let p = find(&plain.id);
    assert!(p["path"].is_null(), "{p}");
    assert_eq!(p["ready"], true, "{p}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_and_delete_by_id() {
    let gw = TestGateway::start().await;
    let sb = gw.create_fixture().await;
    let r = gw.get(&format!("/sandboxes/{}", sb.id)).send().await;
    r.expect(200);
    let v = r.json();
    assert_eq!(v["id"], json!(sb.id));
    assert_eq!(v["status"], "running");
    assert_eq!(v["allocated_port"], json!(sb.allocated_port));

    gw.delete_sandbox(&sb.id).await;
    gw.get(&format!("/sandboxes/{}", sb.id))
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    gw.delete(&format!("/sandboxes/{}", sb.id))
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    gw.get(&sb.path("/"))
        .send()
        .await
        .expect_error(404, "sandbox_not_found");
    assert_eq!(gw.count().await, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_gives_409_on_the_proxy_and_start_makes_it_reachable_again() {
    let gw = TestGateway::start().await;
    let sb = gw.create_fixture().await;
    let r = gw.post(&format!("/sandboxes/{}/stop", sb.id)).send().await;
    r.expect(200);
    assert_eq!(r.json()["status"], "stopped");
    crate::common::wait_process_gone(sb.pid, READY_TIMEOUT, "the stopped fixture").await;

    let r = gw.get(&sb.path("/")).send().await;
    let message = r.expect_error(409, "sandbox_not_running");
    assert!(message.contains("stopped"), "{message}");
    assert!(r.text().contains("status: stopped"), "{}", r.text());

    let r = gw.post(&format!("/sandboxes/{}/start", sb.id)).send().await;
    r.expect(200);
    assert_eq!(r.json()["status"], "running");
    gw.leader(&sb.id, Some(sb.pid)).await;
    gw.wait_ready(&sb.id).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_runtime_is_400_naming_it() {
    let gw = TestGateway::start().await;
    let r = gw
        .post("/sandboxes")
        .json(&json!({"runtime": "cobol-on-rails"}))
        .send()
        .await;
    let message = r.expect_error(400, "bad_request");
    assert!(message.contains("cobol-on-rails"), "{message}");
    assert_eq!(gw.count().await, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_whose_program_is_missing_is_400() {
    let gw = TestGateway::builder()
        .config(|c| {
            c.runtimes = BTreeMap::from([(
                "ghost".to_string(),
                RuntimeConfig {
                    program: Some("definitely-missing-xyz".into()),
                    command: Some("exec definitely-missing-xyz".into()),
                    ..Default::default()
                },
            )]);
        })
        .start()
        .await;
    let r = gw
        .post("/sandboxes")
        .json(&json!({"runtime": "ghost"}))
        .send()
        .await;
    let message = r.expect_error(400, "bad_request");
    assert!(message.contains("definitely-missing-xyz"), "{message}");
    assert!(message.contains("not installed"), "{message}");
    assert_eq!(gw.count().await, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_create_bodies_are_refused_and_create_nothing() {
    let gw = TestGateway::builder()
        .config(|c| c.api_body_limit = 1024)
        .start()
        .await;
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"runtime\": ".into(),
            400,
            "bad_request",
        ),
        (
            "wrong type",
            json!({"dev_server": "yes"}).to_string(),
            400,
            "bad_request",
        ),
        (
            "unknown field",
            json!({"runtime": "shell", "bogus": 1}).to_string(),
            400,
            "bad_request",
        ),
        (
            "oversized",
            json!({"runtime": "shell", "command": "x".repeat(4096)}).to_string(),
            413,
            "payload_too_large",
        ),
    ];
    for (what, body, status, code) in cases {
        let r = gw
            .post("/sandboxes")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let message = r.expect_error(status, code);
        if what == "unknown field" {
            assert!(message.contains("bogus"), "{what}: {message}");
        }
        assert_eq!(gw.count().await, 0, "{what} created a sandbox");
    }
    // Nothing was allocated either: the first real create gets the first port.
    let sb = gw.create_fixture().await;
    assert_eq!(sb.allocated_port, gw.port_range().0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_ids_are_400_and_unknown_ids_404() {
    let gw = TestGateway::start().await;
    let unknown = "sb-aaaaaaaaaaaaaaaa";
    for (method, path) in [
        (Method::GET, "/sandboxes/not-an-id".to_string()),
        (Method::DELETE, "/sandboxes/not-an-id".to_string()),
        (Method::POST, "/sandboxes/not-an-id/stop".to_string()),
        (Method::GET, "/sandbox/not-an-id/".to_string()),
    ] {
        let r = gw.req(method.clone(), &path).send().await;
        let message = r.expect_error(400, "invalid_sandbox_id");
        assert!(message.contains("not-an-id"), "{method} {path}: {message}");
    }
    for (method, path) in [
        (Method::GET, format!("/sandboxes/{unknown}")),
        (Method::DELETE, format!("/sandboxes/{unknown}")),
        (Method::POST, format!("/sandboxes/{unknown}/start")),
        (Method::POST, format!("/sandboxes/{unknown}/stop")),
        (Method::GET, format!("/sandboxes/{unknown}/logs")),
        (Method::GET, format!("/sandbox/{unknown}/")),
    ] {
        let r = gw.req(method.clone(), &path).send().await;
        let message = r.expect_error(404, "sandbox_not_found");
        assert!(message.contains(unknown), "{method} {path}: {message}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exhausted_port_range_is_503_with_a_clear_message() {
    let gw = TestGateway::builder().ports(1).start().await;
    let (lo, _) = gw.port_range();
    let sb = gw.create_fixture().await;
    assert_eq!(sb.allocated_port, lo);
    let r = gw.post("/sandboxes").json(&fixture_body()).send().await;
    let message = r.expect_error(503, "ports_exhausted");
    assert!(
        message.contains("no free port") && message.contains(&format!("{lo}-{lo}")),
        "{message}"
    );
    assert!(!r.header("retry-after").is_empty(), "no Retry-After");
    assert_eq!(gw.count().await, 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_return_what_the_command_printed() {
    let gw = TestGateway::start().await;
    let sb = gw
        .create_fixture_with(
            "echo hello-from-the-sandbox; echo to-stderr >&2;",
            json!({}),
        )
        .await;
    let path = format!("/sandboxes/{}/logs", sb.id);
    let text = eventually(
        READY_TIMEOUT,
        "the logs hold the fixture's line",
        || async {
            let r = gw.get(&path).try_send().await.ok()?;
            let t = r.text();
            (r.status == 200 && t.contains("listening on")).then_some((r, t))
        },
    )
    .await;
    let (r, text) = text;
    assert!(r.header("content-type").starts_with("text/plain"));
    assert!(text.contains("hello-from-the-sandbox"), "{text}");
    assert!(text.contains("to-stderr"), "{text}");
    assert!(
        text.contains(&format!("listening on 127.0.0.1:{}", sb.allocated_port)),
        "{text}"
    );
    gw.shutdown().await;
}
