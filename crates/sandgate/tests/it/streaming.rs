//! Streaming through the proxy: server-sent events arrive as they are sent, and 1 GiB in either
//! direction passes in bounded gateway memory (measured on the real binary's /proc status).

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Method, Request, StatusCode};

use crate::common::{send_request, Lane, RepeatBody, SpawnedGateway, TestGateway};

pub(crate) const GIB: u64 = 1 << 30;
/// How much the gateway's peak RSS may grow over its baseline while moving 1 GiB.
const MEMORY_SLACK_KIB: u64 = 100 * 1024;
/// Bound for one 1 GiB transfer (debug builds on a small machine).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(300);

async fn sse_first_event_arrives_while_the_stream_stays_open(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    let resp = gw.get(&sb.path("/sse-hold")).send_streaming().await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut body = resp.into_body();
    // The upstream never ends this stream: the event must arrive on its own, not at the end.
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event arrives within 5 s while the stream is held open")
        .expect("a frame, not the end of the stream")
        .expect("no body error");
    let data = frame.into_data().expect("a data frame");
    assert_eq!(&data[..], b"data: first\n\n");
    assert!(!hyper::body::Body::is_end_stream(&body));
    drop(body);

    // A finite stream delivers every event, in order.
    let r = gw
        .get(&sb.path("/sse?events=3&interval_ms=20"))
        .send()
        .await;
    r.expect(200);
    assert_eq!(
        r.text(),
        "data: event-0\n\ndata: event-1\n\ndata: event-2\n\n"
    );
    gw.shutdown().await;
}

/// The gateway's memory before and after `transfer`, asserting the peak stayed in bounds.
pub(crate) async fn assert_bounded_memory<F: std::future::Future<Output = ()>>(
    gw: &SpawnedGateway,
    what: &str,
    transfer: F,
) {
    let before = gw.memory();
    tokio::time::timeout(TRANSFER_TIMEOUT, transfer)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TRANSFER_TIMEOUT:?}"));
    let after = gw.memory();
    eprintln!("{what}: gateway memory before {before:?}, after {after:?}");
    assert!(
        after.hwm_kib <= before.rss_kib + MEMORY_SLACK_KIB,
        "{what}: gateway peak RSS {} KiB exceeds baseline {} KiB + {} KiB",
        after.hwm_kib,
        before.rss_kib,
        MEMORY_SLACK_KIB
    );
}

async fn one_gib_download_streams_in_bounded_memory(lane: Lane) {
    let gw = SpawnedGateway::start_on(lane, 2, &[]).await;
    let sb = gw.create_fixture().await;
    // Warm up the path (pool, buffers) before taking the baseline.
    gw.get(&sb.path("/bytes/1048576")).send().await.expect(200);
    let path = sb.path(&format!("/bytes/{GIB}"));
    assert_bounded_memory(&gw, "1 GiB download", async {
        let resp = gw.get(&path).send_streaming().await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-length"], GIB.to_string().as_str());
        let mut body = resp.into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("download body frame");
            if let Some(data) = frame.data_ref() {
                // Spot-check the content without a byte-by-byte pass over 1 GiB.
                assert!(data.first().is_none_or(|&b| b == b'x'));
                received += data.len() as u64;
            }
        }
        assert_eq!(received, GIB);
    })
    .await;
    gw.delete_sandbox(&sb.id).await;
}

async fn one_gib_upload_streams_in_bounded_memory(lane: Lane) {
    let gw = SpawnedGateway::start_on(lane, 2, &[]).await;
    let sb = gw.create_fixture().await;
    gw.req(Method::PUT, &sb.path("/upload"))
        .body(vec![b'w'; 1 << 20])
        .send()
        .await
        .expect(200);
    let path = sb.path("/upload");
    let addr = gw.addr;
    assert_bounded_memory(&gw, "1 GiB upload", async {
        let req = Request::builder()
            .method(Method::POST)
            .uri(path.as_str())
            .header("host", addr.to_string())
            .header("content-type", "application/octet-stream")
            .body(RepeatBody::new(GIB))
            .unwrap();
        let resp = send_request(addr, None, req).await.expect("upload");
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["bytes"], GIB, "{v}");
    })
    .await;
    gw.delete_sandbox(&sb.id).await;
}

both_lanes!(
    sse_first_event_arrives_while_the_stream_stays_open,
    one_gib_download_streams_in_bounded_memory,
    one_gib_upload_streams_in_bounded_memory,
);
