//! Resilience against a misbehaving sandbox server, in both lanes: upstream timeouts count
//! against a port's circuit breaker like refused connections do, so once it opens a request
//! gets `503 circuit_open` at once instead of waiting out `PROXY_TIMEOUT` again; `MAX_RETRIES`
//! retries only connection attempts (a refused port is dialled `MAX_RETRIES + 1` times),
//! and a request whose bytes reached the server is never sent again unless it is idempotent
//! and has no body.
//!
//! The misbehaving server is a listener of the test's own on the sandbox's allocated port
//! (127.0.0.1), in place of a dev server (the sandbox runs `sleep`), or no listener at all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{eventually, Lane, TestGateway, READY_TIMEOUT};
use crate::metrics::{scrape, value};

/// A server on 127.0.0.1:`port` that accepts connections and never answers (nor closes
/// them); counts what it accepted. Stops when dropped.
struct Silent {
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Silent {
    async fn on(port: u16) -> Silent {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the sandbox's port");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });
        Silent { accepted, task }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A sandbox whose dev-server port nothing of its own listens on (it runs `sleep`), for a
/// listener of the test's to take.
async fn portless_sandbox(gw: &TestGateway) -> crate::common::TestSandbox {
    let sb = gw.create_program("", "sleep 1000", json!({})).await;
    assert!(sb.allocated_port > 0, "{}", sb.view);
    sb
}

/// A port that accepts connections but never answers: each request waits `PROXY_TIMEOUT` and
/// gets 504; after `circuit_failures` of them the circuit is open, and the next request gets
/// `503 circuit_open` with `Retry-After` at once (well within the timeout), without a
/// connection to the port.
async fn timeouts_open_the_circuit(lane: Lane) {
    const TIMEOUT: Duration = Duration::from_millis(1500);
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| {
            // No checks: their connections would reach the silent server too.
            c.health_interval = None;
            c.proxy_timeout = TIMEOUT;
            c.circuit_failures = 2;
            c.circuit_open = Duration::from_secs(30);
        })
        .start()
        .await;
    let sb = portless_sandbox(&gw).await;
    let silent = Silent::on(sb.allocated_port).await;
    for i in 0..2 {
        let began = Instant::now();
        gw.get(&sb.path("/"))
            .send()
            .await
            .expect_error(504, "upstream_timeout");
        let took = began.elapsed();
        assert!(took >= TIMEOUT, "request {i} timed out after {took:?}");
    }
    let began = Instant::now();
    let r = gw.get(&sb.path("/")).send().await;
    let took = began.elapsed();
    r.expect_error(503, "circuit_open");
    let retry_after: u64 = r
        .header("retry-after")
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {:?}", r.header("retry-after")));
    assert!((1..=30).contains(&retry_after), "Retry-After {retry_after}");
    assert!(
        took < TIMEOUT,
        "the open circuit answered after {took:?}, not at once (timeout {TIMEOUT:?})"
    );
    let text = scrape(&gw).await;
    assert_eq!(
        value(&text, "sandgate_upstream_errors_total{reason=\"timeout\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "sandgate_circuit_transitions_total{to=\"open\"}"),
        Some(1.0),
        "{text}"
    );
    // Two connections (each dial is timed), none for the refused request.
    assert_eq!(
        value(&text, "sandgate_upstream_connect_duration_seconds_count"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(silent.accepted(), 2);
    gw.shutdown().await;
}

/// A hand-written HTTP/1.1 server on 127.0.0.1:`port` that logs every request it receives
/// whole (connection number, method, path, body) and answers `200 ok`, keeping the
/// connection, except for paths under `/drop`: those it closes the connection on without a
/// word. Stops when dropped.
struct Scripted {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    connection: usize,
    method: String,
    path: String,
    body: String,
}

impl Scripted {
    async fn on(port: u16) -> Scripted {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the sandbox's port");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((stream, _)) = listener.accept().await {
                n += 1;
                tokio::spawn(Scripted::serve(stream, n, log.clone()));
            }
        });
        Scripted { seen, task }
    }

    async fn serve(mut s: TcpStream, connection: usize, log: Arc<Mutex<Vec<Seen>>>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let mut words = head.split(' ');
            let method = words.next().unwrap_or_default().to_string();
            let path = words.next().unwrap_or_default().to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < head_end + len {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
            buf.drain(..head_end + len);
            let drop = path.starts_with("/drop");
            log.lock().unwrap().push(Seen {
                connection,
                method,
                path,
                body,
            });
            if drop {
                return;
            }
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if s.write_all(ok).await.is_err() {
                return;
            }
        }
    }

    /// Every request received so far, in order.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request whose bytes reached the server, which then closed the connection without
/// answering, gets `502 upstream_error` and is not sent again when it is not idempotent
/// (`POST`, with or without a body) or has a body (`PUT` with one): the server saw it exactly
/// once. A body-less `GET`
/// failed so on a kept connection is sent once more on a fresh one (the rule's other side,
/// which also shows the server would see a resend).
async fn a_request_whose_bytes_were_sent_is_not_sent_again(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| {
            // One event loop, so every request finds the kept connection in its pool.
            c.workers = 1;
            c.health_interval = None;
            c.circuit_failures = 0;
            // A resent request with a body would wait for it (it is sent without): not long.
            c.proxy_timeout = Duration::from_secs(5);
        })
        .start()
        .await;
    let sb = portless_sandbox(&gw).await;
    let server = Scripted::on(sb.allocated_port).await;
    for (method, body, times) in [
        ("POST", "x=1", 1),
        ("POST", "", 1),
        ("PUT", "x=2", 1),
        ("GET", "", 2),
    ] {
        // A kept connection to the server first.
        let before = server.seen().len();
        gw.get(&sb.path("/ok")).send().await.expect(200);
        let kept = server.seen()[before].connection;
        eventually(READY_TIMEOUT, "the upstream connection is kept", || async {
            let v = gw.get("/health/proxy").send().await.json();
            (v["idle_upstream_connections"] == 1).then_some(())
        })
        .await;
        let path = format!("/drop/{method}");
        let r = gw
            .req(method.parse().unwrap(), &sb.path(&path))
            .body(body)
            .send()
            .await;
        r.expect_error(502, "upstream_error");
        let got: Vec<Seen> = server.seen()[before + 1..].to_vec();
        assert_eq!(got.len(), times, "{method} {path} was received: {got:?}");
        for s in &got {
            assert_eq!(
                (s.method.as_str(), s.path.as_str(), s.body.as_str()),
                (method, path.as_str(), body),
                "{got:?}"
            );
        }
        assert_eq!(
            got[0].connection, kept,
            "sent on the kept connection: {got:?}"
        );
        if times == 2 {
            assert_ne!(
                got[1].connection, kept,
                "sent again on a fresh one: {got:?}"
            );
        }
    }
    let text = scrape(&gw).await;
    assert_eq!(
        value(&text, "sandgate_upstream_retries_total{kind=\"resend\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "sandgate_upstream_retries_total{kind=\"connect\"}"),
        Some(0.0),
        "{text}"
    );
    gw.shutdown().await;
}

/// With `MAX_RETRIES` = N, a port that refuses connections is dialled N + 1 times per
/// request (N retries counted in `sandgate_upstream_retries_total{kind="connect"}`), then the
/// request gets `502 upstream_unreachable`; with 0, once.
async fn a_refused_port_is_dialled_max_retries_plus_one_times(lane: Lane) {
    for retries in [2u32, 0] {
        let gw = TestGateway::builder()
            .lane(lane)
            .config(move |c| {
                c.health_interval = None;
                c.circuit_failures = 0;
                c.max_retries = retries;
            })
            .start()
            .await;
        // Nothing listens on its port.
        let sb = portless_sandbox(&gw).await;
        for _ in 0..2 {
            gw.get(&sb.path("/"))
                .send()
                .await
                .expect_error(502, "upstream_unreachable");
        }
        let text = scrape(&gw).await;
        assert_eq!(
            value(&text, "sandgate_upstream_retries_total{kind=\"connect\"}"),
            Some(f64::from(2 * retries)),
            "MAX_RETRIES {retries}: {text}"
        );
        assert_eq!(
            value(&text, "sandgate_upstream_errors_total{reason=\"refused\"}"),
            Some(2.0),
            "{text}"
        );
        gw.shutdown().await;
    }
}

both_lanes!(
    timeouts_open_the_circuit,
    a_request_whose_bytes_were_sent_is_not_sent_again,
    a_refused_port_is_dialled_max_retries_plus_one_times,
);
