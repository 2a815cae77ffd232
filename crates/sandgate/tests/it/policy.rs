//! The request policy, in both lanes: every request is finished exactly once, a refused
//! request never wakes a sandbox, only configured protocol switches are spliced, absolute-form
//! targets are routed by their URL, gateway credentials in odd spellings never pass, one client
//! address cannot take every slot, and a stalled upload is cut.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{eventually, Client, Lane, TestGateway, READY_TIMEOUT};

const WAIT: Duration = Duration::from_secs(20);

/// `/health/proxy`'s finish counters.
async fn finished(gw: &Client) -> Value {
    gw.get("/health/proxy").send().await.expect(200).json()["finished"].clone()
}

/// Connects from `local` (any address in 127.0.0.0/8 is this machine).
async fn connect_from(local: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Writes `req` and reads until the peer closes or a whole response with `Content-Length`
/// arrived; returns the text read.
async fn exchange(s: &mut TcpStream, req: &str) -> String {
    s.write_all(req.as_bytes()).await.unwrap();
    read_one(s).await
}

async fn read_one(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, async {
        loop {
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if len.is_some_and(|len| buf.len() >= end + 4 + len) {
                    break;
                }
            }
        }
    })
    .await
    .expect("a response in time");
    String::from_utf8_lossy(&buf).into_owned()
}

fn echo_json(resp: &str) -> Value {
    let body = &resp[resp.find("\r\n\r\n").expect("a head") + 4..];
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"))
}

async fn every_request_is_finished_exactly_once(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    let count = |v: &Value, k: &str| v[k].as_u64().unwrap();
    let before = finished(&gw).await;
    for _ in 0..5 {
        gw.get(&sb.path("/")).send().await.expect(200);
    }
    // Refused by the policy: answered, never forwarded.
    gw.get("/sandbox/sb-aaaaaaaaaaaaaaaa/")
        .send()
        .await
        .expect(404);
    let after = finished(&gw).await;
    assert_eq!(count(&after, "forwarded") - count(&before, "forwarded"), 5);
    // The 404, and the /health/proxy read that took `before` (each read counts only once it
    // has answered).
    assert_eq!(count(&after, "answered") - count(&before, "answered"), 2);

    let mut ws = gw.websocket(&sb.path("/ws"), None).await;
    ws.send(Message::text("hi")).await.unwrap();
    assert!(ws.next().await.is_some());
    ws.close(None).await.unwrap();
    drop(ws);
    let done = eventually(READY_TIMEOUT, "the WebSocket's finish is counted", || {
        let gw = gw.client.clone();
        let after = after.clone();
        async move {
            let done = finished(&gw).await;
            (count(&done, "upgraded") > count(&after, "upgraded")).then_some(done)
        }
    })
    .await;
    assert_eq!(count(&done, "upgraded") - count(&after, "upgraded"), 1);
    assert_eq!(count(&done, "forwarded"), count(&after, "forwarded"));
    gw.shutdown().await;
}

async fn a_refused_request_never_wakes_a_stopped_sandbox(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw
        .create_fixture_with("", json!({"mode": "persistent"}))
        .await;
    gw.post(&format!("/sandboxes/{}/stop", sb.id))
        .send()
        .await
        .expect(200);
    // A transfer coding other than chunked alone: refused by the policy in both lanes.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let resp = exchange(
        &mut s,
        &format!(
            "POST {} HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            sb.path("/echo")
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("x-sandgate-error: bad_request"), "{resp}");
    assert_eq!(gw.sandbox(&sb.id).await["status"], "stopped");
    // An allowed request does wake it.
    gw.get(&sb.path("/")).send().await.expect(200);
    assert_eq!(gw.sandbox(&sb.id).await["status"], "running");
    gw.shutdown().await;
}

async fn only_configured_protocol_switches_are_spliced(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    // h2c: not spliced; the sandbox answers the request as plain HTTP/1.1.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let resp = exchange(
        &mut s,
        &format!(
            "GET {} HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            sb.path("/echo")
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let v = echo_json(&resp);
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert!(
            v["headers"].get(gone).is_none(),
            "{gone} reached the sandbox: {v}"
        );
    }
    // The same connection carries on as HTTP/1.1.
    let resp = exchange(
        &mut s,
        &format!("GET {} HTTP/1.1\r\nHost: gw\r\n\r\n", sb.path("/")),
    )
    .await;
    assert!(resp.ends_with("fixture ok"), "{resp}");
    // WebSocket (the default list) is spliced.
    let mut ws = gw.websocket(&sb.path("/ws"), None).await;
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    gw.shutdown().await;
}

async fn an_absolute_form_target_is_routed_by_its_url(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    let port = gw.addr.port();
    // The URL names the sandbox's host route; the Host field names the API.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let resp = exchange(
        &mut s,
        &format!(
            "GET http://{}-{}.localhost:{port}/echo/abs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n",
            sb.port, sb.id
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(echo_json(&resp)["path"], "/echo/abs");
    // The URL names the gateway itself; the Host field names the sandbox: the API answers.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let resp = exchange(
        &mut s,
        &format!(
            "GET http://127.0.0.1:{port}/health HTTP/1.1\r\nHost: {}-{}.localhost\r\n\r\n",
            sb.port, sb.id
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"backend\""), "the API answered: {resp}");
    gw.shutdown().await;
}

async fn credentials_in_any_spelling_never_reach_a_sandbox(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let resp = exchange(
        &mut s,
        &format!(
            "GET {} HTTP/1.1\r\nHost: gw\r\nX_API_Key: secret1\r\nX-Api-Key: secret2\r\n\
             Transfer_Encoding: chunked\r\nCookie: app=1; SANDGATE_session=secret3\r\n\r\n",
            sb.path("/echo/q?a=1&sandgate_token=secret4&b=2")
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let v = echo_json(&resp);
    assert!(
        !v.to_string().contains("secret"),
        "a credential passed: {v}"
    );
    assert_eq!(v["query"], "a=1&b=2", "{v}");
    assert_eq!(v["headers"]["cookie"], "app=1", "{v}");
    gw.shutdown().await;
}

async fn one_client_address_cannot_take_every_slot(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| {
            c.max_concurrent_requests = 4;
            c.max_requests_per_client = 2;
        })
        .start()
        .await;
    let sb = gw.create_fixture().await;
    let slow = format!(
        "GET {} HTTP/1.1\r\nHost: gw\r\n\r\n",
        sb.path("/delay/3000")
    );
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.2", gw.addr).await;
        s.write_all(slow.as_bytes()).await.unwrap();
        held.push(s);
    }
    // Both slow requests are admitted before the third asks.
    crate::common::wait_in_flight(&gw, 2).await;
    let mut third = connect_from("127.0.0.2", gw.addr).await;
    let resp = exchange(&mut third, &slow).await;
    assert!(resp.starts_with("HTTP/1.1 429"), "{resp}");
    assert!(
        resp.contains("x-sandgate-error: too_many_requests"),
        "{resp}"
    );
    assert!(resp.contains("retry-after: 1"), "{resp}");
    // Another address is still served.
    let mut other = connect_from("127.0.0.3", gw.addr).await;
    let resp = exchange(
        &mut other,
        &format!("GET {} HTTP/1.1\r\nHost: gw\r\n\r\n", sb.path("/")),
    )
    .await;
    assert!(resp.ends_with("fixture ok"), "{resp}");
    for mut s in held {
        assert!(read_one(&mut s).await.ends_with("delayed"));
    }
    gw.shutdown().await;
}

/// As many stalled uploads as `MAX_CONCURRENT_REQUESTS` cannot lock another client out, and
/// each is cut after the body timeout (408: the sandbox had not answered yet).
async fn stalled_uploads_neither_lock_others_out_nor_stay_forever(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| {
            c.max_concurrent_requests = 4;
            c.max_requests_per_client = 2;
            c.body_timeout = Duration::from_millis(800);
        })
        .start()
        .await;
    let sb = gw.create_fixture().await;
    let upload = format!(
        "POST {} HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000\r\n\r\nfirst bytes",
        sb.path("/upload")
    );
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = connect_from("127.0.0.4", gw.addr).await;
        s.write_all(upload.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    let mut other = connect_from("127.0.0.5", gw.addr).await;
    let resp = exchange(
        &mut other,
        &format!("GET {} HTTP/1.1\r\nHost: gw\r\n\r\n", sb.path("/")),
    )
    .await;
    assert!(resp.ends_with("fixture ok"), "{resp}");
    let mut statuses = Vec::new();
    for mut s in stalled {
        let resp = read_one(&mut s).await;
        statuses.push(resp.get(9..12).unwrap_or("").to_string());
    }
    statuses.sort();
    assert_eq!(statuses, ["408", "408", "429", "429"], "{statuses:?}");
    let v = gw.get("/health/proxy").send().await.json();
    assert_eq!(v["in_flight"], 0, "{v}");
    gw.shutdown().await;
}

/// A request body that stalls while the response already streams is cut as well: the
/// exchange ends (the client sees the response end early) instead of holding its slot.
async fn a_body_stalled_under_a_streaming_response_is_cut(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| c.body_timeout = Duration::from_millis(500))
        .start()
        .await;
    let sb = gw.create_fixture().await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\nfew",
        sb.path("/answer-early")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("the connection stays open"),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let events = text.matches("data: ").count();
    assert!(events < 20, "the whole stream came through: {text}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    crate::common::wait_in_flight(&gw, 0).await;
    gw.shutdown().await;
}

both_lanes!(
    a_body_stalled_under_a_streaming_response_is_cut,
    every_request_is_finished_exactly_once,
    a_refused_request_never_wakes_a_stopped_sandbox,
    only_configured_protocol_switches_are_spliced,
    an_absolute_form_target_is_routed_by_its_url,
    credentials_in_any_spelling_never_reach_a_sandbox,
    one_client_address_cannot_take_every_slot,
    stalled_uploads_neither_lock_others_out_nor_stay_forever,
);
