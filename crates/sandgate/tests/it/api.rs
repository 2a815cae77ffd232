//! The control API: create, list, inspect, stop/start, delete, logs, every refusal's status
//! and error shape, the cross-site guard (host, origin, media type), and answers that reach a
//! client still sending its body (lingering close).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request};
use sandgate::config::RuntimeConfig;
use serde_json::{json, Value};

use crate::common::{
    eventually, fixture_body, send_h2, Reply, TestGateway, READY_TIMEOUT, REQUEST_TIMEOUT,
};

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

#[tokio::test(flavor = "multi_thread")]
async fn state_changing_bodies_must_be_json() {
    let gw = TestGateway::start().await;
    let body = fixture_body().to_string();
    let cases: Vec<(&str, Option<&str>, String)> =
        vec![
        ("text/plain", Some("text/plain"), body.clone()),
        ("no Content-Type", None, body.clone()),
        ("+json parameter", Some("text/plain; charset=+json"), body.clone()),
        ("unknown parameter", Some("application/json; foo=bar"), body.clone()),
        ("json-ish type", Some("application/jsonx"), body.clone()),
        (
            "form",
            Some("application/x-www-form-urlencoded"),
            "runtime=shell&command=id".into(),
        ),
        (
            "multipart",
            Some("multipart/form-data; boundary=XyZ"),
            "--XyZ\r\nContent-Disposition: form-data; name=\"runtime\"\r\n\r\nshell\r\n--XyZ--\r\n"
                .into(),
        ),
    ];
    for (what, ctype, body) in cases {
        let mut req = gw.post("/sandboxes").body(body);
        if let Some(ctype) = ctype {
            req = req.header("content-type", ctype);
        }
        let message = req.send().await.expect_error(415, "unsupported_media_type");
        assert!(message.contains("application/json"), "{what}: {message}");
        assert_eq!(gw.count().await, 0, "{what} created a sandbox");
    }
    // The same body as JSON (with the one parameter allowed) creates it.
    let r = gw
        .post("/sandboxes")
        .header("content-type", "Application/JSON; charset=UTF-8")
        .body(body)
        .send()
        .await;
    r.expect(201);
    let id = r.json()["id"].as_str().expect("id").to_string();
    // Body-less state changes carry no media type and need none.
    gw.post(&format!("/sandboxes/{id}/stop"))
        .send()
        .await
        .expect(200);
    gw.delete(&format!("/sandboxes/{id}"))
        .send()
        .await
        .expect(200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn state_changes_from_another_origin_are_403() {
    let gw = TestGateway::start().await;
    for origin in ["http://evil.example", "null", "http://10.9.8.7:8070"] {
        let r = gw
            .post("/sandboxes")
            .header("origin", origin)
            .json(&fixture_body())
            .send()
            .await;
        r.expect_error(403, "forbidden_origin");
        // A body-less create (a cross-site form or fetch needs no preflight) too.
        gw.post("/sandboxes")
            .header("origin", origin)
            .send()
            .await
            .expect_error(403, "forbidden_origin");
    }
    assert_eq!(gw.count().await, 0);
    // Reads are not refused by origin (a rebound page is stopped by its Host instead).
    gw.get("/sandboxes")
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect(200);
    // The gateway's own origin, by address or by name, may change state.
    let own = gw.url("");
    let port = gw.addr.port();
    let r = gw
        .post("/sandboxes")
        .header("origin", &own)
        .json(&fixture_body())
        .send()
        .await;
    r.expect(201);
    let id = r.json()["id"].as_str().expect("id").to_string();
    gw.delete(&format!("/sandboxes/{id}"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect_error(403, "forbidden_origin");
    gw.delete(&format!("/sandboxes/{id}"))
        .header("origin", &format!("http://localhost:{port}"))
        .send()
        .await
        .expect(200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_only_to_its_own_host_names() {
    let gw = TestGateway::builder()
        .config(|c| c.allowed_hosts = vec!["api.test".into(), ".corp.test".into()])
        .start()
        .await;
    let port = gw.addr.port();
    // DNS rebinding: a page at evil.example whose name now points at the gateway.
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("x.localhost:{port}"),
        format!("api.test.evil.example:{port}"),
    ] {
        let r = gw.get("/sandboxes").header("host", &host).send().await;
        let message = r.expect_error(421, "forbidden_host");
        assert!(message.contains(&host), "{message}");
        gw.post("/sandboxes")
            .header("host", &host)
            .json(&fixture_body())
            .send()
            .await
            .expect_error(421, "forbidden_host");
        gw.get("/health")
            .header("host", &host)
            .send()
            .await
            .expect_error(421, "forbidden_host");
    }
    assert_eq!(gw.count().await, 0);
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
        format!("[::1]:{port}"),
        "api.test".to_string(),
        format!("API.test:{port}"),
        "build.corp.test".to_string(),
    ] {
        gw.get("/sandboxes")
            .header("host", &host)
            .send()
            .await
            .expect(200);
    }
    // HTTP/2: the `:authority` is the name checked.
    let h2 = |authority: &str| {
        Request::builder()
            .uri(format!("http://{authority}/sandboxes"))
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let evil = send_h2(gw.addr, h2(&format!("evil.example:{port}"))).await;
    let evil = Reply::read(evil.expect("h2 response")).await.expect("body");
    evil.expect_error(421, "forbidden_host");
    let own = send_h2(gw.addr, h2(&gw.addr.to_string())).await;
    Reply::read(own.expect("h2 response"))
        .await
        .expect("body")
        .expect(200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_paths_and_methods_have_the_error_shape() {
    let gw = TestGateway::start().await;
    for (method, path, status, code) in [
        (Method::GET, "/sandboxes/%ff%fe", 400, "bad_request"),
        (Method::POST, "/sandboxes/%ff%fe/stop", 400, "bad_request"),
        (Method::GET, "/sandboxes/%2e%2e", 400, "invalid_sandbox_id"),
        (
            Method::DELETE,
            "/sandboxes/%2e%2e",
            400,
            "invalid_sandbox_id",
        ),
        (Method::PUT, "/sandboxes", 405, "method_not_allowed"),
        (Method::GET, "/nowhere", 404, "not_found"),
    ] {
        let r = gw.req(method.clone(), path).send().await;
        r.expect_error(status, code);
    }
    gw.shutdown().await;
}

/// A client that writes its whole request before it reads anything, in Python: `http` mode is
/// `http.client` sending `POST /sandboxes` with a 5 MiB JSON body as one buffer (`bytes`), as a
/// file with a `Content-Length` (`file`: written 8 KiB at a time) or `chunked`; `raw` mode is a
/// socket sending the given head, then 5 MiB at once. Prints the status, `x-sandgate-error`
/// and body as JSON.
const WRITE_THEN_READ: &str = r#"
import http.client, io, json, socket, sys
mode, port = sys.argv[1], int(sys.argv[2])
big = b'{"command": "' + b"x" * (5 << 20) + b'"}'
if mode == "http":
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    headers = {"Content-Type": "application/json"}
    if sys.argv[3] == "chunked":
        body = (big[i:i + 65536] for i in range(0, len(big), 65536))
    elif sys.argv[3] == "file":
        body = io.BytesIO(big)
        headers["Content-Length"] = str(len(big))
    else:
        body = big
    conn.request("POST", "/sandboxes", body=body, headers=headers)
    resp = conn.getresponse()
    out = {"status": resp.status, "error": resp.getheader("x-sandgate-error"),
           "body": resp.read().decode()}
else:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(sys.argv[3].encode().replace(b"\n", b"\r\n") + big)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = dict(l.lower().split(": ", 1) for l in lines[1:])
    out = {"status": int(lines[0].split()[1]), "error": fields.get("x-sandgate-error"),
           "body": body.decode()}
print(json.dumps(out))
"#;

/// Runs `WRITE_THEN_READ`; `Err` holds what the client failed with.
async fn write_then_read(args: &[&str]) -> Result<Value, String> {
    let run = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(WRITE_THEN_READ)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(REQUEST_TIMEOUT, run)
        .await
        .expect("the python client finishes")
        .expect("python3 runs");
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("").to_string());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("the client prints JSON"))
}

fn assert_gateway_error(v: &Value, status: u16, code: &str) {
    assert_eq!(v["status"], status, "{v}");
    assert_eq!(v["error"], code, "{v}");
    let body: Value = serde_json::from_str(v["body"].as_str().unwrap_or("")).expect("JSON body");
    assert_eq!(body["error"]["code"], code, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_early_413_reaches_a_client_that_writes_its_whole_body_first() {
    let gw = TestGateway::start().await;
    let port = gw.addr.port().to_string();
    // Without lingering, `file` and `chunked` fail with EPIPE or ECONNRESET; `bytes` often
    // passes regardless (one write, which loopback's socket buffers take whole).
    let mut results = Vec::new();
    for framing in ["bytes", "file", "chunked"] {
        results.push((framing, write_then_read(&["http", &port, framing]).await));
    }
    for (framing, result) in results {
        let v = result.unwrap_or_else(|e| panic!("{framing}: the client failed: {e}"));
        assert_gateway_error(&v, 413, "payload_too_large");
    }
    assert_eq!(gw.count().await, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fast_lane_400_reaches_a_client_that_writes_its_whole_body_first() {
    let gw = TestGateway::start().await;
    let head = format!(
        "POST /sandbox/sb-aaaaaaaaaaaaaaaa/ HTTP/1.1\nHost: {}\nContent-Length: {}\n\
         Transfer-Encoding: chunked\n\n",
        gw.addr,
        5 << 20
    );
    let v = write_then_read(&["raw", &gw.addr.port().to_string(), &head])
        .await
        .unwrap_or_else(|e| panic!("the client failed: {e}"));
    assert_gateway_error(&v, 400, "bad_request");
    assert!(v["body"].as_str().unwrap_or("").contains("framing"), "{v}");
    // The gateway still serves others once the lingering connection is gone.
    tokio::time::sleep(Duration::from_millis(10)).await;
    gw.get("/health").send().await.expect(200);
    gw.shutdown().await;
}

/// Browsers get pages, everything else JSON: the gateway's root says what it is (no
/// credential needed), an unknown route is a 404 page, a sandbox whose server is still
/// starting is a page that retries by itself, and one that failed says why.
#[tokio::test(flavor = "multi_thread")]
async fn browsers_get_pages_that_say_what_to_do() {
    let gw = crate::common::auth_gateway(crate::common::Lane::Fast, |_| {}).await;
    let r = gw.get("/").header("accept", "text/html").send().await;
    r.expect(200);
    assert!(r.header("content-type").starts_with("text/html"));
    assert!(r.text().contains("/health"), "{}", r.text());
    let v = gw.get("/").send().await.expect(200).json();
    assert_eq!(v["name"], "sandgate", "{v}");
    let open = TestGateway::start().await;
    let r = open
        .get("/nowhere")
        .header("accept", "text/html")
        .send()
        .await;
    assert_eq!(r.status, 404);
    assert!(r.header("content-type").starts_with("text/html"));
    open.get("/nowhere")
        .send()
        .await
        .expect_error(404, "not_found");
    // Running, its server not up yet: a page that refreshes itself.
    let slow = open
        .create_program("sleep 30;", &crate::common::fixture_program(), json!({}))
        .await;
    let r = open
        .get(&slow.path("/"))
        .header("accept", "text/html")
        .send()
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("http-equiv=\"refresh\""), "{}", r.text());
    // Failed: the reason and the last lines it printed are on the page.
    let v = open
        .create(&json!({"runtime": "shell", "dev_server": true,
                        "command": "echo 'Error: Cannot find module vite' >&2; exit 3"}))
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    crate::common::eventually(
        Duration::from_secs(10),
        "the sandbox has failed",
        || async { (open.sandbox(&id).await["status"] == "failed").then_some(()) },
    )
    .await;
    let r = open
        .get(&format!("/sandbox/{id}/"))
        .header("accept", "text/html")
        .send()
        .await;
    assert_eq!(r.status, 409);
    assert!(r.text().contains("exited with code 3"), "{}", r.text());
    assert!(
        r.text()
            .contains("last output: Error: Cannot find module vite"),
        "{}",
        r.text()
    );
    let v = open.sandbox(&id).await;
    assert!(
        v["status_reason"]
            .as_str()
            .is_some_and(|r| r.ends_with("last output: Error: Cannot find module vite")),
        "{v}"
    );
    open.delete_sandbox(&slow.id).await;
}

/// Labels on create and in every object, list filters and pages, and `PATCH` of mode,
/// labels and the sandbox's own idle timeout, which the reaper honours.
#[tokio::test(flavor = "multi_thread")]
async fn labels_filters_pages_and_a_sandboxs_own_idle_timeout() {
    let gw = TestGateway::start().await;
    let mut ids = Vec::new();
    for (i, (owner, tier)) in [
        ("ann", "web"),
        ("ann", "job"),
        ("bob", "web"),
        ("bob", "web"),
    ]
    .into_iter()
    .enumerate()
    {
        let v = gw
            .create(
                &json!({"runtime": "shell", "owner": owner, "name": format!("s{i}"),
                            "labels": {"tier": tier, "team.example/n": i.to_string()}}),
            )
            .await;
        assert_eq!(v["labels"]["tier"], tier, "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let list = |q: String| {
        let gw = gw.client.clone();
        async move {
            gw.get(&format!("/sandboxes?{q}"))
                .send()
                .await
                .expect(200)
                .json()
        }
    };
    let v = list("owner=ann".into()).await;
    assert_eq!(v["count"], 2, "{v}");
    let v = list("label=tier=web".into()).await;
    assert_eq!(v["count"], 3, "{v}");
    let v = list("label=tier=web&owner=bob&status=running,stopped".into()).await;
    assert_eq!(v["count"], 2, "{v}");
    let v = list("label=nothere".into()).await;
    assert_eq!(v["count"], 0, "{v}");
    // Pages of two, in creation order, each naming where the next starts.
    let first = list("limit=2".into()).await;
    assert_eq!(first["count"], 2);
    let cursor = first["next_cursor"].as_str().unwrap().to_string();
    assert_eq!(cursor, ids[1]);
    let second = list(format!("limit=2&cursor={cursor}")).await;
    let got: Vec<_> = second["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].clone())
        .collect();
    assert_eq!(got, vec![json!(ids[2]), json!(ids[3])]);
    assert!(second.get("next_cursor").is_none(), "{second}");
    for bad in ["limit=0", "limit=x", "cursor=sb-aaaaaaaaaaaaaaaa"] {
        gw.get(&format!("/sandboxes?{bad}"))
            .send()
            .await
            .expect_error(422, "validation_failed");
    }
    gw.get("/sandboxes?colour=red")
        .send()
        .await
        .expect_error(400, "bad_request");
    gw.post("/sandboxes")
        .json(&json!({"runtime": "shell", "labels": {"Bad Key": "x"}}))
        .send()
        .await
        .expect_error(422, "validation_failed");
    // PATCH: labels merge (null removes), mode, and an idle timeout of the sandbox's own.
    let id = &ids[0];
    let v = gw
        .req(Method::PATCH, &format!("/sandboxes/{id}"))
        .json(&json!({"labels": {"tier": null, "new": "yes"}, "mode": "persistent", "idle_timeout": 1}))
        .send()
        .await;
    v.expect(200);
    let v = v.json();
    assert_eq!(
        v["labels"],
        json!({"new": "yes", "team.example/n": "0"}),
        "{v}"
    );
    assert_eq!(v["mode"], "persistent");
    assert_eq!(v["idle_timeout"], 1);
    // The gateway reaps nothing by default here; this sandbox's own second does.
    crate::common::eventually(
        Duration::from_secs(15),
        "the sandbox is stopped",
        || async {
            let v = list("owner=ann&name=s0".to_string()).await;
            (v["sandboxes"][0]["status"] == "stopped").then_some(())
        },
    )
    .await;
    let v = list("owner=bob".into()).await;
    assert!(
        v["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "running"),
        "{v}"
    );
    let v = gw
        .req(Method::PATCH, &format!("/sandboxes/{id}"))
        .json(&json!({"idle_timeout": null}))
        .send()
        .await
        .json();
    assert_eq!(v["idle_timeout"], Value::Null, "{v}");
}

/// `GET /sandboxes/{id}/logs?tail=N` gives the last lines, `follow=true` streams what the
/// sandbox writes next until the client leaves, `timestamps=true` starts each line with the
/// time it was written, and the log has lifecycle markers.
#[tokio::test(flavor = "multi_thread")]
async fn logs_tail_follow_and_lifecycle_markers() {
    let gw = TestGateway::start().await;
    let v = gw
        .create(&json!({"runtime": "shell", "dev_server": false, "mode": "persistent",
                        "command": "for i in 1 2 3 4 5; do echo line-$i; done; while read x; do :; done < /dev/null; exec sleep 1000"}))
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    let path = format!("/sandboxes/{id}/logs");
    crate::common::eventually(Duration::from_secs(10), "five lines are logged", || async {
        let r = gw.get(&path).send().await;
        r.text().contains("line-5").then_some(())
    })
    .await;
    let all = gw.get(&path).send().await.text();
    assert!(
        all.starts_with("[sandgate] starting (generation 1)\n"),
        "{all}"
    );
    // With timestamps, each line starts with the time it was written.
    let stamped = gw
        .get(&format!("{path}?timestamps=true"))
        .send()
        .await
        .text();
    let lines: Vec<&str> = stamped.lines().collect();
    assert!(lines.len() >= 6, "{stamped}");
    let mut last = String::new();
    for (line, want) in lines.iter().zip([
        "[sandgate] starting (generation 1)",
        "line-1",
        "line-2",
        "line-3",
        "line-4",
        "line-5",
    ]) {
        let (time, rest) = line.split_once(' ').expect("a time and a line");
        assert_eq!(rest, want, "{stamped}");
        assert!(
            chrono::DateTime::parse_from_rfc3339(time).is_ok() && time.ends_with('Z'),
            "{line}"
        );
        assert!(*time >= *last.as_str(), "times run forward: {stamped}");
        last = time.to_string();
    }
    let r = gw
        .get(&format!("{path}?tail=1&timestamps=true"))
        .send()
        .await
        .text();
    assert!(
        r.ends_with(" line-5\n") && r.len() == 25 + "line-5\n".len(),
        "{r}"
    );
    let r = gw.get(&format!("{path}?tail=2")).send().await.text();
    assert_eq!(r, "line-4\nline-5\n");
    // Following: what a command writes into the log file arrives while the stream is open.
    let resp = gw
        .get(&format!("{path}?follow=true&tail=1"))
        .send_streaming()
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    read_until("line-5", &mut body, &mut seen).await;
    gw.post(&format!("/sandboxes/{id}/stop"))
        .send()
        .await
        .expect(200);
    // The stop's markers arrive while following.
    read_until("[sandgate] stopping (requested)", &mut body, &mut seen).await;
    read_until("[sandgate] e", &mut body, &mut seen).await;
    assert!(
        seen.contains("ended by signal") || seen.contains("exited with code"),
        "{seen}"
    );
    drop(body);
    gw.get(&format!("{path}?tails=1"))
        .send()
        .await
        .expect_error(400, "bad_request");
}

/// Reads `body` into `seen` until it holds `want` (bounded).
pub(crate) async fn read_until(want: &str, body: &mut hyper::body::Incoming, seen: &mut String) {
    use http_body_util::BodyExt;
    let read = async {
        while !seen.contains(want) {
            let frame = body.frame().await.expect("open").expect("frame");
            if let Ok(d) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&d));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("no {want:?} within 10 s; got {seen:?}"));
}
