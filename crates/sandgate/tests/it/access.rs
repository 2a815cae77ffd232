//! Request ids and the access log: every request gets an `x-request-id` (the client's if
//! sane), which the sandbox receives and the response carries; W3C `traceparent` reaches the
//! sandbox; one access-log line per request or upgraded stream when it ends, in JSON or
//! text, with the fields an operator needs (the credential's subject, never the credential)
//! and nothing a terminal would colour.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{eventually, Lane, SpawnedGateway, TestGateway, READY_TIMEOUT};

fn is_generated(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The client's sane id is kept, forwarded and returned; a missing or insane one is replaced
/// by a new one that the sandbox and the response both get; the sandbox's own id does not
/// replace the gateway's; gateway-made errors carry one too; `traceparent` reaches the
/// sandbox unchanged.
async fn request_ids_reach_the_sandbox_and_come_back(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;

    let r = gw
        .get(&sb.path("/echo/a"))
        .header("x-request-id", "client-id-7")
        .send()
        .await;
    r.expect(200);
    assert_eq!(r.header("x-request-id"), "client-id-7");
    assert_eq!(r.json()["headers"]["x-request-id"], "client-id-7");

    for insane in [None, Some("has space"), Some(&*"x".repeat(65))] {
        let mut req = gw.get(&sb.path("/echo/b"));
        if let Some(v) = insane {
            req = req.header("x-request-id", v);
        }
        let r = req.send().await;
        r.expect(200);
        let id = r.header("x-request-id").to_string();
        assert!(is_generated(&id), "{insane:?} gave {id}");
        assert_eq!(r.json()["headers"]["x-request-id"], id.as_str());
    }
    // Two requests, two ids.
    let a = gw.get(&sb.path("/")).send().await;
    let b = gw.get(&sb.path("/")).send().await;
    assert_ne!(a.header("x-request-id"), b.header("x-request-id"));

    let r = gw.get(&sb.path("/own-request-id")).send().await;
    r.expect(200);
    assert!(
        is_generated(r.header("x-request-id")),
        "{:?}",
        r.header("x-request-id")
    );

    let r = gw
        .get("/sandbox/sb-zzzzzzzzzzzzzzzz/")
        .header("x-request-id", "lost-1")
        .send()
        .await;
    r.expect(404);
    assert_eq!(r.header("x-request-id"), "lost-1");
    let r = gw
        .get("/sandboxes")
        .header("x-request-id", "api-1")
        .send()
        .await;
    r.expect(200);
    assert_eq!(r.header("x-request-id"), "api-1");

    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = gw
        .get(&sb.path("/echo/c"))
        .header("traceparent", tp)
        .header("tracestate", "vendor=1")
        .send()
        .await;
    let headers = &r.json()["headers"];
    assert_eq!(headers["traceparent"], tp);
    assert_eq!(headers["tracestate"], "vendor=1");
    gw.shutdown().await;
}

both_lanes!(request_ids_reach_the_sandbox_and_come_back);

/// The access-log lines of a gateway's log (JSON format).
fn access_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "sandgate::access")
        .collect()
}

/// One JSON line per request when it ends, naming the request id the client saw, the
/// route template, host, path without the query, status, duration, sandbox, port, client,
/// and an error flag; an upgraded stream gets its line when it closes.
async fn access_log_lines_in_json(lane: Lane) {
    let gw = SpawnedGateway::start_on(lane, 4, &["--log-format", "json"]).await;
    let sb = gw.create_fixture().await;
    let r = gw.get(&sb.path("/echo/x?secret=hunter2")).send().await;
    r.expect(200);
    let id = r.header("x-request-id").to_string();
    let body_len = r.body.len();
    gw.get("/sandbox/sb-zzzzzzzzzzzzzzzz/x")
        .send()
        .await
        .expect(404);
    // Request bodies: a sized one and a chunked one (counted as it decodes: 11 bytes).
    gw.post(&sb.path("/upload"))
        .header("x-request-id", "sized-upload")
        .body(vec![b'x'; 3000])
        .send()
        .await
        .expect(200);
    let mut raw = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let chunked = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nx-request-id: chunked-upload\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
        sb.path("/upload"),
        gw.addr
    );
    raw.write_all(chunked.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let mut ws = gw.websocket(&sb.path("/ws"), None).await;
    ws.send(Message::text("hi")).await.unwrap();
    ws.next().await.expect("echo").unwrap();
    ws.close(None).await.unwrap();
    drop(ws);

    let lines = eventually(READY_TIMEOUT, "the stream's line is written", || async {
        let lines = access_lines(&gw.log());
        lines.iter().any(|l| l["kind"] == "stream").then_some(lines)
    })
    .await;
    let line = lines
        .iter()
        .find(|l| l["request_id"] == id.as_str())
        .unwrap_or_else(|| panic!("no line for {id} in {lines:#?}"));
    assert_eq!(line["kind"], "request", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["route"], "/sandbox/{id}/*", "{line}");
    assert_eq!(line["path"], sb.path("/echo/x"), "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["sandbox"], sb.id.as_str(), "{line}");
    assert_eq!(line["port"], sb.port, "{line}");
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    assert_eq!(line["flag"], "-", "{line}");
    assert!(line["duration_ms"].as_f64().unwrap() >= 0.0, "{line}");
    assert_eq!(line["bytes_sent"], body_len, "{line}");
    assert_eq!(line["bytes_received"], 0, "{line}");
    for (id, size) in [("sized-upload", 3000), ("chunked-upload", 11)] {
        let l = lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id} in {lines:#?}"));
        assert_eq!(l["bytes_received"], size, "{l}");
        assert_eq!(l["status"], 200, "{l}");
    }
    // A new connection to the sandbox was timed; a kept one is null.
    assert!(
        lines.iter().any(|l| l["upstream_connect_ms"]
            .as_f64()
            .is_some_and(|ms| ms >= 0.0)),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l["upstream_connect_ms"].is_null() || l["upstream_connect_ms"].is_number()),
        "{lines:#?}"
    );
    assert!(line["timestamp"].as_str().is_some(), "{line}");
    assert!(
        !gw.log().contains("hunter2"),
        "a query value reached the log"
    );

    let missing = lines
        .iter()
        .find(|l| l["status"] == 404 && l["path"] == "/sandbox/sb-zzzzzzzzzzzzzzzz/x")
        .unwrap_or_else(|| panic!("no 404 line in {lines:#?}"));
    assert_eq!(missing["flag"], "NR", "{missing}");
    let stream = lines.iter().find(|l| l["kind"] == "stream").unwrap();
    assert_eq!(stream["status"], 101, "{stream}");
    assert_eq!(stream["route"], "/sandbox/{id}/*", "{stream}");
    // The control API's lines name the router's template.
    assert!(
        lines
            .iter()
            .any(|l| l["route"] == "/sandboxes" && l["method"] == "POST" && l["status"] == 201),
        "{lines:#?}"
    );
}

both_lanes!(access_log_lines_in_json);

/// With authentication on: a line names the credential's subject (the key's id, never the
/// key) and the Host the client sent; a sandbox whose port refuses gets flag `UF`.
async fn access_log_names_subject_host_and_refusals(lane: Lane) {
    let gw = SpawnedGateway::start_on(
        lane,
        4,
        &[
            "--log-format",
            "json",
            "--auth-enabled",
            "true",
            "--health-interval",
            "0",
        ],
    )
    .await;
    let key = std::fs::read_to_string(gw.data_dir().join("admin.key")).expect("admin.key");
    let key = key.trim().to_string();
    let owner = gw.with_key(&key);
    let sb = owner.create_fixture().await;
    let r = owner
        .get(&sb.path("/echo/x"))
        .header("x-request-id", "with-subject")
        .send()
        .await;
    r.expect(200);
    let down = owner
        .create_program("", "sleep 1000", json!({"dev_server": true}))
        .await;
    owner
        .get(&down.path("/"))
        .header("x-request-id", "refused")
        .send()
        .await
        .expect(502);
    let keys = owner.get("/auth/keys").send().await.expect(200).json();
    let lines = eventually(READY_TIMEOUT, "both lines are written", || async {
        let lines = access_lines(&gw.log());
        let has = |id: &str| lines.iter().any(|l| l["request_id"] == id);
        (has("with-subject") && has("refused")).then_some(lines)
    })
    .await;
    let find = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id} in {lines:#?}"))
            .clone()
    };
    let line = find("with-subject");
    let subject = line["subject"].as_str().expect("a subject").to_string();
    let key_ids: Vec<&str> = keys["keys"]
        .as_array()
        .or(keys.as_array())
        .expect("a key list")
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert!(
        key_ids.contains(&subject.as_str()),
        "{subject} not in {key_ids:?}"
    );
    assert_eq!(line["host"], gw.addr.to_string(), "{line}");
    let refused = find("refused");
    assert_eq!(refused["status"], 502, "{refused}");
    assert_eq!(refused["flag"], "UF", "{refused}");
    assert_eq!(refused["subject"], subject.as_str(), "{refused}");
    // (The first start prints the generated key once, by design; no request line has it.)
    assert!(
        lines.iter().all(|l| !l.to_string().contains(&key)),
        "the key reached an access line"
    );
}

both_lanes!(access_log_names_subject_host_and_refusals);

/// Text lines (the default) on a file: no colour codes, values printed plainly, one line per
/// request with its id; `--access-log off` writes none.
#[tokio::test(flavor = "multi_thread")]
async fn access_log_text_has_no_colour_codes_and_can_be_turned_off() {
    let gw = SpawnedGateway::start(2, &[]).await;
    let r = gw.get("/sandboxes").send().await;
    r.expect(200);
    let id = r.header("x-request-id").to_string();
    let log = eventually(READY_TIMEOUT, "the line is written", || async {
        let log = gw.log();
        log.contains(&id).then_some(log)
    })
    .await;
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
    assert!(!log.contains("Some("), "{log}");
    let line = log.lines().find(|l| l.contains(&id)).unwrap();
    assert!(line.contains("sandgate::access"), "{line}");
    assert!(line.contains("route=/sandboxes"), "{line}");
    assert!(line.contains("status=200"), "{line}");
    drop(gw);

    let gw = SpawnedGateway::start(2, &["--access-log", "off"]).await;
    let r = gw.get("/sandboxes").send().await;
    r.expect(200);
    let id = r.header("x-request-id").to_string();
    gw.get("/health").send().await.expect(200);
    assert!(!gw.log().contains(&id), "{}", gw.log());
    assert!(!gw.log().contains("sandgate::access"), "{}", gw.log());
}
