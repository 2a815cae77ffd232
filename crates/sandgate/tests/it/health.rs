//! Health endpoints: `/health`, `/health/sandboxes` (per-sandbox readiness) and
//! `/health/proxy`.

use serde_json::json;

use crate::common::{eventually, TestGateway, READY_TIMEOUT};

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

#[tokio::test(flavor = "multi_thread")]
async fn health_sandboxes_reports_readiness() {
    let gw = TestGateway::start().await;
    let up = gw.create_fixture().await;
    // A dev server that never listens.
    let down = gw
        .create_program("", "sleep 1000", json!({"dev_server": true}))
        .await;
    let v = eventually(READY_TIMEOUT, "/health/sandboxes lists both", || async {
        let v = gw.get("/health/sandboxes").try_send().await.ok()?.json();
        (v["count"] == 2).then_some(v)
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
    assert_eq!(entry(&down.id)["ready"], false, "{v}");
    assert_eq!(v["ready"], 1, "{v}");
    gw.shutdown().await;
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
