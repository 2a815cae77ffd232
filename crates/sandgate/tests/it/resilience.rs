//! Resilience against a misbehaving sandbox server, in both lanes: upstream timeouts count
//! against a port's circuit breaker like refused connections do, so once it opens a request
//! gets `503 circuit_open` at once instead of waiting out `PROXY_TIMEOUT` again.
//!
//! The misbehaving server is a listener of the test's own on the sandbox's allocated port
//! (127.0.0.1), in place of a dev server: the sandbox runs `sleep`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpListener;

use crate::common::{Lane, TestGateway};
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

both_lanes!(timeouts_open_the_circuit);
