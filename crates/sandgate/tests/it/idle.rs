//! Idle reaping and waking: unused sandboxes are deleted (ephemeral) or stopped (persistent)
//! after `idle_timeout`, a request wakes a stopped persistent sandbox, and traffic in progress
//! counts as use.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::StatusCode;
use serde_json::json;

use crate::common::{eventually, wait_process_gone, Lane, TestGateway, READY_TIMEOUT};

async fn idle_sandboxes_are_deleted_or_stopped_by_mode(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| c.idle_timeout = Some(Duration::from_secs(1)))
        .start()
        .await;
    let ephemeral = gw.create_fixture().await;
    let persistent = gw
        .create_fixture_with("", json!({"mode": "persistent"}))
        .await;
    // `GET /sandboxes` is not use of any one sandbox, so polling it does not keep them alive.
    let list = eventually(
        READY_TIMEOUT,
        "the reaper deletes the ephemeral and stops the persistent sandbox",
        || async {
            let list = gw.list().await;
            let gone = !list.iter().any(|s| s["id"] == ephemeral.id.as_str());
            let stopped = list
                .iter()
                .any(|s| s["id"] == persistent.id.as_str() && s["status"] == "stopped");
            (gone && stopped).then_some(list)
        },
    )
    .await;
    assert_eq!(list.len(), 1, "{list:?}");
    for pid in [ephemeral.pid, persistent.pid] {
        wait_process_gone(pid, Duration::from_secs(5), "a reaped fixture").await;
    }
    gw.shutdown().await;
}

async fn a_request_wakes_a_stopped_persistent_sandbox(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw
        .create_fixture_with("", json!({"mode": "persistent"}))
        .await;
    gw.post(&format!("/sandboxes/{}/stop", sb.id))
        .send()
        .await
        .expect(200);
    wait_process_gone(sb.pid, READY_TIMEOUT, "the stopped fixture").await;
    // The request itself starts it and is answered once the port opens.
    let r = gw.get(&sb.path("/")).send().await;
    r.expect(200);
    assert_eq!(r.text(), "fixture ok");
    let v = gw.sandbox(&sb.id).await;
    assert_eq!(v["status"], "running", "{v}");
    gw.leader(&sb.id, Some(sb.pid)).await;
    gw.shutdown().await;
}

async fn a_response_still_streaming_keeps_its_sandbox_in_use(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| c.idle_timeout = Some(Duration::from_secs(1)))
        .start()
        .await;
    let sb = gw.create_fixture().await;
    // 15 events 200 ms apart: about 3 s of steady traffic, three idle timeouts long.
    let resp = gw
        .get(&sb.path("/sse?events=15&interval_ms=200"))
        .send_streaming()
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(15), resp.into_body().collect())
        .await
        .expect("the stream ends within 15 s");
    let text = match body {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(e) => panic!("the stream broke: {e}"),
    };
    let events = text.matches("data: event-").count();
    assert_eq!(events, 15, "the sandbox was reaped mid-stream: {text:?}");
    let v = gw.get(&format!("/sandboxes/{}", sb.id)).send().await.json();
    assert_eq!(v["status"], "running", "{v}");
    gw.shutdown().await;
}

both_lanes!(
    idle_sandboxes_are_deleted_or_stopped_by_mode,
    a_request_wakes_a_stopped_persistent_sandbox,
    a_response_still_streaming_keeps_its_sandbox_in_use,
);
