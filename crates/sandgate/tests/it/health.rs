//! Health endpoints: `/health`, `/health/sandboxes` (what each sandbox's health checks say),
//! `/health/proxy`, `/health/live` and `/health/ready`; a sandbox whose server fails its
//! checks is not ready and answers 503 `sandbox_not_ready`, in both lanes, unless it turns
//! ready while the request waits briefly for it; the checks' rise and fall thresholds
//! (`health_rise`, `health_fall`) decide when it turns ready and not ready.

use std::time::Duration;

use serde_json::json;

use crate::common::{eventually, Lane, SpawnedGateway, TestGateway, READY_TIMEOUT};

#[tokio::test(flavor = "multi_thread")]
async fn health_reports_status_sandboxes_and_timestamp() {
    let gw = TestGateway::start().await;
    let v = gw.get("/health").send().await.expect(200).json();
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["sandboxes"], 0, "{v}");
    assert!(
        v["timestamp"].as_str().is_some_and(|t| t.contains('T')),
        "{v}"
    );
    gw.create_fixture().await;
    let v = gw.get("/health").send().await.expect(200).json();
    assert_eq!(v["sandboxes"], 1, "{v}");
    gw.shutdown().await;
}

/// A gateway whose health checks run every 100 ms (rise 1, fall 2).
async fn checked_gateway(lane: Lane) -> TestGateway {
    TestGateway::builder()
        .lane(lane)
        .config(|c| c.health_interval = Some(Duration::from_millis(100)))
        .start()
        .await
}

/// `(state, streak)` of sandbox `id` in `/health/sandboxes`.
async fn check_state(gw: &crate::common::Client, id: &str) -> Option<(String, i64)> {
    let v = gw.get("/health/sandboxes").try_send().await.ok()?.json();
    let s = v["sandboxes"]
        .as_array()?
        .iter()
        .find(|s| s["id"] == id)?
        .clone();
    Some((
        s["health"]["state"].as_str()?.to_string(),
        s["health"]["streak"].as_i64()?,
    ))
}

/// With `health_rise` 3 and `health_fall` 3 (not the defaults, 1 and 2), a sandbox is judged
/// ready only once 3 checks in a row passed, and stays ready through 2 failed ones: the state
/// `/health/sandboxes` reports never turns before the streak reaches 3 either way.
#[tokio::test(flavor = "multi_thread")]
async fn rise_and_fall_thresholds_are_configurable() {
    let gw = TestGateway::builder()
        .config(|c| {
            c.health_interval = Some(Duration::from_millis(100));
            c.health_rise = 3;
            c.health_fall = 3;
        })
        .start()
        .await;
    let sb = create_killable_server(&gw).await;
    // Each state as first seen (the checker writes the streak before the state it leads to,
    // and the report reads the state first).
    let first_ready = eventually(READY_TIMEOUT, "the sandbox is judged ready", || async {
        let (state, streak) = check_state(&gw, &sb.id).await?;
        (state == "ready").then_some(streak)
    })
    .await;
    assert!(
        first_ready >= 3,
        "ready after {first_ready} passes in a row"
    );
    gw.exec(&sb.id, &json!({"command": "kill $(cat server.pid)"}))
        .await;
    let first_not_ready = eventually(READY_TIMEOUT, "its checks fail", || async {
        let (state, streak) = check_state(&gw, &sb.id).await?;
        (state == "not_ready").then_some(streak)
    })
    .await;
    assert!(
        first_not_ready <= -3,
        "not ready after {} failures in a row",
        -first_not_ready
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_sandboxes_reports_readiness() {
    let gw = checked_gateway(Lane::Fast).await;
    let up = gw.create_fixture().await;
    // A dev server that never listens.
    let down = gw
        .create_program("", "sleep 1000", json!({"dev_server": true}))
        .await;
    let v = eventually(READY_TIMEOUT, "the checks have judged both", || async {
        let v = gw.get("/health/sandboxes").try_send().await.ok()?.json();
        let judged = v["sandboxes"]
            .as_array()?
            .iter()
            .all(|s| s["health"]["state"] == "ready" || s["health"]["state"] == "not_ready");
        (v["count"] == 2 && judged).then_some(v)
    })
    .await;
    let entry = |id: &str| {
        v["sandboxes"]
            .as_array()
            .expect("sandboxes array")
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {v}"))
            .clone()
    };
    assert_eq!(entry(&up.id)["ready"], true, "{v}");
    assert_eq!(entry(&up.id)["health"]["state"], "ready", "{v}");
    assert_eq!(entry(&down.id)["ready"], false, "{v}");
    assert_eq!(entry(&down.id)["health"]["state"], "not_ready", "{v}");
    assert!(
        entry(&down.id)["health"]["streak"].as_i64().unwrap() <= -2,
        "{v}"
    );
    assert_eq!(v["ready"], 1, "{v}");
    // The sandbox object says the same.
    assert_eq!(gw.sandbox(&down.id).await["ready"], false);
    assert_eq!(gw.sandbox(&up.id).await["ready"], true);
    gw.shutdown().await;
}

/// A sandbox whose fixture server runs beside a shell that outlives it (its pid in
/// `server.pid` of the working tree): killing the server leaves the sandbox running.
async fn create_killable_server(gw: &TestGateway) -> crate::common::TestSandbox {
    let fixture = crate::common::fixture_program();
    gw.create_program(
        &format!("{fixture} & echo $! > server.pid; wait; exec sleep 1000;"),
        "true",
        json!({}),
    )
    .await
}

/// A running sandbox whose server went down fails its checks: `ready` turns false, and a
/// request to it waits briefly, then gets `503 sandbox_not_ready` with `Retry-After` (not a
/// 502 blaming the sandbox, nor a wait for `PROXY_TIMEOUT`); once the server is back, the
/// next request goes through at once and the checks say ready again.
async fn a_sandbox_whose_server_is_down_is_not_ready(lane: Lane) {
    let gw = checked_gateway(lane).await;
    let sb = create_killable_server(&gw).await;
    let state = |gw: &TestGateway, id: String| {
        let gw = (**gw).clone();
        async move {
            let v = gw.get("/health/sandboxes").send().await.json();
            v["sandboxes"]
                .as_array()
                .and_then(|a| a.iter().find(|s| s["id"] == id.as_str()).cloned())
                .map(|s| s["health"]["state"].as_str().unwrap_or("").to_string())
                .unwrap_or_default()
        }
    };
    eventually(READY_TIMEOUT, "the sandbox is ready", || async {
        (gw.sandbox(&sb.id).await["ready"] == true).then_some(())
    })
    .await;
    gw.exec(&sb.id, &json!({"command": "kill $(cat server.pid)"}))
        .await;
    eventually(READY_TIMEOUT, "its checks fail", || async {
        (state(&gw, sb.id.clone()).await == "not_ready").then_some(())
    })
    .await;
    assert_eq!(gw.sandbox(&sb.id).await["ready"], false);
    assert_eq!(gw.sandbox(&sb.id).await["status"], "running");
    let started = std::time::Instant::now();
    let r = gw.get(&sb.path("/")).send().await;
    r.expect_error(503, "sandbox_not_ready");
    assert_eq!(r.header("retry-after"), "2");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Back: started again as a background command of the sandbox.
    gw.post(&format!("/sandboxes/{}/exec", sb.id))
        .json(
            &json!({"command": format!("exec {}", crate::common::fixture_program()),
            "background": true}),
        )
        .send()
        .await
        .expect(202);
    eventually(READY_TIMEOUT, "the server answers again", || async {
        let r = gw.get(&sb.path("/")).try_send().await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    eventually(READY_TIMEOUT, "the sandbox is ready again", || async {
        (gw.sandbox(&sb.id).await["ready"] == true).then_some(())
    })
    .await;
    gw.shutdown().await;
}

both_lanes!(a_sandbox_whose_server_is_down_is_not_ready);

/// A request to a running sandbox whose checks said not ready waits briefly for it: when its
/// server starts listening during the wait, the request is answered by it (200), not with
/// 503, and the pass the wait saw is recorded (ready, with no check of the checker's since).
async fn a_request_waits_briefly_for_a_sandbox_to_turn_ready(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        // After the first judgement, the checker leaves the sandbox alone for the test.
        .config(|c| c.health_interval = Some(Duration::from_secs(600)))
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // The fixture starts listening only once the test says so.
    let sb = gw.create_fixture_held(&go).await;
    eventually(READY_TIMEOUT, "the sandbox is judged not ready", || async {
        let (state, _) = check_state(&gw, &sb.id).await?;
        (state == "not_ready").then_some(())
    })
    .await;
    let request = tokio::spawn({
        let (gw, path) = ((*gw).clone(), sb.path("/"));
        async move { gw.get(&path).send().await }
    });
    // It waits (admitted, in flight) for the server, which starts now; a request answered
    // without waiting is finished by then (and fails below).
    eventually(READY_TIMEOUT, "the request is in flight", || async {
        let v = gw.get("/health/proxy").send().await.json();
        (v["in_flight"] == 1 || request.is_finished()).then_some(())
    })
    .await;
    std::fs::write(&go, b"").unwrap();
    let r = request.await.unwrap();
    r.expect(200);
    assert_eq!(r.text(), "fixture ok");
    let (state, streak) = check_state(&gw, &sb.id).await.unwrap();
    assert_eq!((state.as_str(), streak), ("ready", 1));
    gw.shutdown().await;
}

both_lanes!(a_request_waits_briefly_for_a_sandbox_to_turn_ready);

/// `/health/live` and `/health/ready` for Kubernetes probes; `/health/ready` turns 503 as
/// soon as shutdown begins, while `--shutdown-delay` keeps the gateway serving.
#[tokio::test(flavor = "multi_thread")]
async fn liveness_and_readiness_probes() {
    let mut gw = SpawnedGateway::start(1, &["--shutdown-delay", "3"]).await;
    gw.get("/health/live").send().await.expect(200);
    let v = gw.get("/health/ready").send().await.expect(200).json();
    assert_eq!(v["status"], "ok", "{v}");
    let pid = gw.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let v = eventually(Duration::from_secs(2), "readiness turns 503", || async {
        let r = gw.get("/health/ready").try_send().await.ok()?;
        (r.status == 503).then(|| r.json())
    })
    .await;
    assert_eq!(v["draining"], true, "{v}");
    gw.get("/health/live").send().await.expect(200);
    assert!(gw.terminate().await.success(), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn health_proxy_answers() {
    let gw = TestGateway::builder()
        .config(|c| c.max_concurrent_requests = 7)
        .start()
        .await;
    let v = gw.get("/health/proxy").send().await.expect(200).json();
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["max_concurrent_requests"], 7, "{v}");
    assert_eq!(v["in_flight"], 0, "{v}");
    gw.shutdown().await;
}

/// With `health_path`, a check is a `GET` that must answer 2xx or 3xx: a server that accepts
/// connections but answers 503 there is not ready, and its requests get 503
/// `sandbox_not_ready`; a bad path is refused at create.
#[tokio::test(flavor = "multi_thread")]
async fn an_http_health_path_decides_readiness() {
    let gw = checked_gateway(Lane::Fast).await;
    let good = gw
        .create_program(
            "",
            &crate::common::fixture_program(),
            json!({"health_path": "/status/204"}),
        )
        .await;
    let sick = gw
        .create_program(
            "",
            &crate::common::fixture_program(),
            json!({"health_path": "/status/503"}),
        )
        .await;
    assert_eq!(sick.view["health_path"], "/status/503", "{}", sick.view);
    eventually(READY_TIMEOUT, "the checks judge both", || async {
        let v = gw.get("/health/sandboxes").send().await.json();
        let state = |id: &str| {
            v["sandboxes"]
                .as_array()
                .and_then(|a| a.iter().find(|s| s["id"] == id).cloned())
                .map(|s| s["health"]["state"].clone())
        };
        (state(&good.id)? == "ready" && state(&sick.id)? == "not_ready").then_some(())
    })
    .await;
    gw.get(&good.path("/")).send().await.expect(200);
    gw.get(&sick.path("/"))
        .send()
        .await
        .expect_error(503, "sandbox_not_ready");
    for bad in ["healthz", "/with space", "/\u{e9}"] {
        gw.post("/sandboxes")
            .json(&json!({"runtime": "shell", "health_path": bad}))
            .send()
            .await
            .expect_error(422, "validation_failed");
    }
    gw.shutdown().await;
}

/// When the gateway shuts down, its own WebSockets (seed 004's command socket, a terminal)
/// and proxied ones (between frames, in both lanes' gateways) are closed with 1001 (going
/// away) rather than cut.
async fn shutdown_closes_websockets_with_1001(lane: Lane) {
    use futures_util::SinkExt;
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;
    let mut gw = SpawnedGateway::start_on(lane, 2, &[]).await;
    let v = gw.create(&json!({"runtime": "shell"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let app = gw.create_fixture().await;
    let mut proxied = gw.websocket(&app.path("/ws"), None).await;
    proxied.send(Message::text("before")).await.unwrap();
    let echo = proxied.next().await.expect("an echo").unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "before");
    let mut sockets = [
        gw.websocket(&format!("/ws/{id}"), None).await,
        gw.websocket(&format!("/sandboxes/{id}/pty"), None).await,
        proxied,
    ];
    let pid = gw.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    for ws in sockets.iter_mut() {
        let code = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(msg) = ws.next().await {
                if let Ok(Message::Close(frame)) = msg {
                    return frame.map(|f| f.code);
                }
            }
            None
        })
        .await
        .expect("a close frame within 10 s");
        assert_eq!(code, Some(CloseCode::Away));
    }
    assert!(gw.terminate().await.success(), "{}", gw.log());
}

both_lanes!(shutdown_closes_websockets_with_1001);
