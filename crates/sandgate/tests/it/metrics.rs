//! `GET /metrics`: requests by method, status class and route template in both lanes (never a
//! raw path or a sandbox id), upstream errors and retries, open streams (proxied, terminal,
//! commands), lifecycle operations (create, stop, wake, start, delete), health checks and
//! verdicts, sandboxes by status and health, the process's figures; the exposition passes
//! `promtool check metrics` and a real Prometheus server scrapes it; the `--metrics-addr`
//! listener needs no credential while the main listener's `/metrics` needs an owner's.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{
    auth_gateway, eventually, team_key, Client, Lane, TestGateway, ADMIN_KEY, READY_TIMEOUT,
};

/// The value of one series (`name{labels}` exactly as exposed), if present.
pub(crate) fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

fn requests(text: &str, method: &str, status: &str, route: &str) -> f64 {
    value(
        text,
        &format!(
            "http_server_request_duration_seconds_count{{method=\"{method}\",status=\"{status}\",http_route=\"{route}\"}}"
        ),
    )
    .unwrap_or(0.0)
}

pub(crate) async fn scrape(gw: &Client) -> String {
    let r = gw.get("/metrics").send().await;
    r.expect(200);
    assert_eq!(
        r.header("content-type"),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    r.text()
}

/// `promtool check metrics` (Debian's `prometheus` package) accepts the exposition.
async fn promtool_accepts(text: &str) {
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("promtool (apt install prometheus; .ci/run installs it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Proxied requests are counted by route template and status class, whichever lane serves
/// them; the control API's by its own templates; errors by reason; nothing names a sandbox.
async fn requests_are_counted_by_route_template(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        // No health checks: the never-listening sandbox below is "running", so its request
        // reaches the dial (and fails there) instead of waiting as not ready.
        .config(|c| c.health_interval = None)
        .start()
        .await;
    let sb = gw.create_fixture().await;
    let before = scrape(&gw).await;
    for _ in 0..3 {
        gw.get(&sb.path("/1k")).send().await.expect(200);
    }
    gw.get(&sb.path("/status/404")).send().await.expect(404);
    gw.get("/sandbox/sb-zzzzzzzzzzzzzzzz/x")
        .send()
        .await
        .expect(404);
    gw.get(&format!("/sandbox/{}", sb.id))
        .send()
        .await
        .expect(308);
    let host = format!("{}-{}.localhost", sb.port, sb.id);
    gw.get("/1k").header("host", &host).send().await.expect(200);
    gw.post("/sandboxes/sb-zzzzzzzzzzzzzzzz/start")
        .send()
        .await
        .expect(404);
    // A dev server that never listens: refused, retried, then 502.
    let down = gw
        .create_program("", "sleep 1000", json!({"dev_server": true}))
        .await;
    gw.get(&down.path("/")).send().await.expect(502);

    let text = scrape(&gw).await;
    let delta = |m: &str, s: &str, r: &str| requests(&text, m, s, r) - requests(&before, m, s, r);
    assert_eq!(delta("GET", "2xx", "/sandbox/{id}/*"), 3.0, "{text}");
    assert_eq!(delta("GET", "4xx", "/sandbox/{id}/*"), 2.0, "{text}");
    assert_eq!(delta("GET", "3xx", "/sandbox/{id}"), 1.0, "{text}");
    assert_eq!(delta("GET", "2xx", "{port}-{id}.{domain}"), 1.0, "{text}");
    assert_eq!(delta("GET", "5xx", "/sandbox/{id}/*"), 1.0, "{text}");
    // The control API, by its router's templates.
    assert!(
        requests(&text, "POST", "2xx", "/sandboxes") >= 2.0,
        "{text}"
    );
    assert_eq!(delta("POST", "4xx", "/sandboxes/{id}/start"), 1.0, "{text}");
    assert!(requests(&text, "GET", "2xx", "/metrics") >= 1.0, "{text}");
    // Bounded labels: no sandbox id, no raw path.
    for needle in [&sb.id, &down.id, "zzzzzzzz", "/1k", "/status/404"] {
        assert!(
            !text.contains(needle),
            "{needle} in the exposition:\n{text}"
        );
    }
    // The failed request: its reason, the dial's retries, connect times.
    assert!(
        value(&text, "sandgate_upstream_errors_total{reason=\"refused\"}").unwrap() >= 1.0,
        "{text}"
    );
    assert!(
        value(&text, "sandgate_upstream_retries_total{kind=\"connect\"}").unwrap() >= 1.0,
        "{text}"
    );
    assert!(value(&text, "sandgate_upstream_connect_duration_seconds_count").unwrap() >= 1.0);
    // Sandboxes by status, lifecycle operations, the process.
    assert_eq!(
        value(
            &text,
            "sandgate_sandboxes{backend=\"process\",status=\"running\"}"
        ),
        Some(2.0),
        "{text}"
    );
    assert!(
        value(
            &text,
            "sandgate_lifecycle_duration_seconds_count{operation=\"create\",outcome=\"ok\"}"
        )
        .unwrap()
            >= 2.0,
        "{text}"
    );
    assert!(value(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(value(&text, "process_open_fds").unwrap() > 0.0);
    assert_eq!(value(&text, "sandgate_proxy_active_requests"), Some(0.0));
    promtool_accepts(&text).await;
    gw.shutdown().await;
}

/// A proxied WebSocket counts as an open stream while it lasts; its request is recorded
/// as it switches (101).
async fn open_streams_are_counted(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let sb = gw.create_fixture().await;
    let mut ws = gw.websocket(&sb.path("/ws"), None).await;
    ws.send(Message::text("ping")).await.unwrap();
    let echoed = ws.next().await.expect("an echo").unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "ping");
    let text = scrape(&gw).await;
    assert_eq!(
        value(&text, "sandgate_open_streams{kind=\"proxied\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        requests(&text, "GET", "1xx", "/sandbox/{id}/*"),
        1.0,
        "{text}"
    );
    ws.close(None).await.unwrap();
    drop(ws);
    eventually(READY_TIMEOUT, "the stream is counted closed", || async {
        let text = scrape(&gw).await;
        (value(&text, "sandgate_open_streams{kind=\"proxied\"}") == Some(0.0)).then_some(())
    })
    .await;
    gw.shutdown().await;
}

both_lanes!(
    requests_are_counted_by_route_template,
    open_streams_are_counted
);

/// The families a scrape of the request path does not reach: lifecycle operations other than
/// create (stop, start, wake, delete), health checks by result, their verdicts' changes and
/// the sandboxes by health, and the terminal and command streams the API opens.
#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_health_and_api_streams_are_counted() {
    let gw = TestGateway::builder()
        .config(|c| c.health_interval = Some(Duration::from_millis(100)))
        .start()
        .await;
    let count = |text: &str, series: &str| value(text, series).unwrap_or(0.0);
    let operation = |op: &str| {
        format!("sandgate_lifecycle_duration_seconds_count{{operation=\"{op}\",outcome=\"ok\"}}")
    };

    // Health: a dev server that answers passes and turns ready; one that never listens fails.
    let sb = gw
        .create_fixture_with("", json!({"mode": "persistent"}))
        .await;
    let down = gw
        .create_program("", "sleep 1000", json!({"dev_server": true}))
        .await;
    let text = eventually(READY_TIMEOUT, "checks passed and failed", || async {
        let text = scrape(&gw).await;
        (count(&text, "sandgate_health_checks_total{result=\"pass\"}") >= 1.0
            && count(&text, "sandgate_health_checks_total{result=\"fail\"}") >= 2.0
            && count(&text, "sandgate_sandbox_health{state=\"not_ready\"}") == 1.0)
            .then_some(text)
    })
    .await;
    assert!(
        count(&text, "sandgate_health_changes_total{to=\"ready\"}") >= 1.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "sandgate_sandbox_health{state=\"ready\"}"),
        Some(1.0),
        "{text}"
    );

    // Stop, wake (a request to the stopped persistent sandbox), stop, start, delete.
    gw.post(&format!("/sandboxes/{}/stop", sb.id))
        .send()
        .await
        .expect(200);
    gw.get(&sb.path("/")).send().await.expect(200);
    gw.post(&format!("/sandboxes/{}/stop", sb.id))
        .send()
        .await
        .expect(200);
    gw.post(&format!("/sandboxes/{}/start", sb.id))
        .send()
        .await
        .expect(200);
    gw.delete_sandbox(&down.id).await;
    let text = scrape(&gw).await;
    for (op, at_least) in [
        ("stop", 2.0),
        ("wake", 1.0),
        ("start", 1.0),
        ("delete", 1.0),
    ] {
        assert!(
            count(&text, &operation(op)) >= at_least,
            "{op}: {}\n{text}",
            count(&text, &operation(op))
        );
    }

    // A terminal and a command socket are open streams while they last.
    let terminal = gw
        .websocket(&format!("/sandboxes/{}/pty?cols=80&rows=24", sb.id), None)
        .await;
    let commands = gw.websocket(&format!("/ws/{}", sb.id), None).await;
    let text = scrape(&gw).await;
    for kind in ["terminal", "commands"] {
        assert_eq!(
            value(&text, &format!("sandgate_open_streams{{kind=\"{kind}\"}}")),
            Some(1.0),
            "{kind}: {text}"
        );
    }
    drop((terminal, commands));
    eventually(
        READY_TIMEOUT,
        "the API streams are counted closed",
        || async {
            let text = scrape(&gw).await;
            ["terminal", "commands"]
                .iter()
                .all(|k| {
                    value(&text, &format!("sandgate_open_streams{{kind=\"{k}\"}}")) == Some(0.0)
                })
                .then_some(())
        },
    )
    .await;
    promtool_accepts(&scrape(&gw).await).await;
    gw.shutdown().await;
}

/// A free port on 127.0.0.1 (bound and released: the gateway binds it next).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// With authentication on, the main listener's `/metrics` needs an owner's credential
/// (its figures span every team); the `--metrics-addr` listener serves it with none, and
/// nothing else. Credentials are counted by result.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_an_owner_except_on_their_own_listener() {
    let addr = free_addr();
    let gw = auth_gateway(Lane::Fast, move |c| c.metrics_addr = Some(addr)).await;
    gw.get("/metrics")
        .send()
        .await
        .expect_error(401, "AUTH_002");
    let (member, _) = team_key(&gw, "blue", "admin").await;
    gw.with_key(&member)
        .get("/metrics")
        .send()
        .await
        .expect(403);
    gw.get("/sandboxes")
        .header("x-api-key", "sgk_not-a-real-key-0000000000000000000000")
        .send()
        .await
        .expect(401);
    let text = scrape(&gw.with_key(ADMIN_KEY)).await;
    assert!(text.contains("sandgate_build_info{version="), "{text}");
    assert!(
        value(&text, "sandgate_auth_total{result=\"missing\"}").unwrap() >= 1.0,
        "{text}"
    );
    assert!(value(&text, "sandgate_auth_total{result=\"invalid\"}").unwrap() >= 1.0);
    assert!(value(&text, "sandgate_auth_total{result=\"forbidden\"}").unwrap() >= 1.0);
    assert!(value(&text, "sandgate_auth_total{result=\"accepted\"}").unwrap() >= 1.0);

    let own = Client::new(addr, gw.pids.clone());
    let text = scrape(&own).await;
    assert!(text.contains("http_server_request_duration_seconds_bucket{"));
    promtool_accepts(&text).await;
    own.get("/sandboxes").send().await.expect(404);
    own.get("/health").send().await.expect(404);
    gw.shutdown().await;
}

/// A real Prometheus server (Debian's `prometheus` package), started by the test, scrapes
/// the metrics listener and answers a query for a proxied request's series.
#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_gateway() {
    let metrics = free_addr();
    let gw = TestGateway::builder()
        .config(move |c| c.metrics_addr = Some(metrics))
        .start()
        .await;
    let sb = gw.create_fixture().await;
    for _ in 0..5 {
        gw.get(&sb.path("/1k")).send().await.expect(200);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
             - job_name: sandgate\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let web = free_addr();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (apt install prometheus; .ci/run installs it)");
    let query = "sum(http_server_request_duration_seconds_count{job=\"sandgate\",\
                 http_route=\"/sandbox/{id}/*\",status=\"2xx\"})";
    let api = Client::new(web, gw.pids.clone());
    let path = format!(
        "/api/v1/query?query={}",
        query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    );
    let got = eventually(
        Duration::from_secs(60),
        "Prometheus has scraped",
        || async {
            let r = api.get(&path).try_send().await.ok()?;
            let v: serde_json::Value = serde_json::from_str(&r.text()).ok()?;
            let value = v["data"]["result"][0]["value"][1].as_str()?.to_string();
            Some(value)
        },
    )
    .await;
    // What the gateway itself says (no request to a sandbox since).
    let own = scrape(&Client::new(metrics, gw.pids.clone())).await;
    let expected = requests(&own, "GET", "2xx", "/sandbox/{id}/*");
    assert!(expected >= 5.0, "{own}");
    assert_eq!(got, expected.to_string(), "Prometheus's answer to {query}");
    let targets = api.get("/api/v1/targets").send().await.json();
    assert_eq!(
        targets["data"]["activeTargets"][0]["health"], "up",
        "{targets}"
    );
    prometheus.kill().await.ok();
    gw.shutdown().await;
}

/// Connection failures in a row to a sandbox port open its circuit: requests then get
/// `503 circuit_open` with `Retry-After` at once, without a connection attempt; after the
/// open time one trial goes through: while the port is still down it opens the circuit
/// again, once the server listens it closes it. The transitions are counted.
async fn an_open_circuit_answers_at_once_until_a_trial_closes_it(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| {
            c.health_interval = None;
            c.max_retries = 0;
            c.circuit_failures = 3;
            c.circuit_open = Duration::from_millis(300);
        })
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // The fixture starts listening only once the test says so.
    let sb = gw.create_fixture_held(&go).await;
    for _ in 0..3 {
        gw.get(&sb.path("/")).send().await.expect(502);
    }
    let r = gw.get(&sb.path("/")).send().await;
    r.expect_error(503, "circuit_open");
    assert_eq!(r.header("retry-after"), "1");
    let text = scrape(&gw).await;
    // The refused request made no connection attempt.
    assert_eq!(
        value(&text, "sandgate_upstream_errors_total{reason=\"refused\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "sandgate_circuit_transitions_total{to=\"open\"}"),
        Some(1.0)
    );
    assert_eq!(value(&text, "sandgate_circuits_open"), Some(1.0), "{text}");
    // Still down: the trial fails (502) and the circuit opens again.
    eventually(
        READY_TIMEOUT,
        "a trial request reaches the port",
        || async {
            let r = gw.get(&sb.path("/")).send().await;
            (r.status == 502).then_some(())
        },
    )
    .await;
    gw.get(&sb.path("/"))
        .send()
        .await
        .expect_error(503, "circuit_open");
    // The server listens: the next trial closes the circuit.
    std::fs::write(&go, b"").unwrap();
    eventually(READY_TIMEOUT, "a trial closes the circuit", || async {
        let r = gw.get(&sb.path("/")).send().await;
        (r.status == 200).then_some(())
    })
    .await;
    for _ in 0..3 {
        gw.get(&sb.path("/")).send().await.expect(200);
    }
    let text = scrape(&gw).await;
    assert_eq!(
        value(&text, "sandgate_circuit_transitions_total{to=\"open\"}"),
        Some(2.0),
        "{text}"
    );
    assert!(
        value(
            &text,
            "sandgate_circuit_transitions_total{to=\"half_open\"}"
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(
        value(&text, "sandgate_circuit_transitions_total{to=\"closed\"}"),
        Some(1.0)
    );
    assert_eq!(value(&text, "sandgate_circuits_open"), Some(0.0), "{text}");
    gw.shutdown().await;
}

both_lanes!(an_open_circuit_answers_at_once_until_a_trial_closes_it);
