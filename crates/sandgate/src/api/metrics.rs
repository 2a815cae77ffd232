//! `GET /metrics`: Prometheus's text exposition of what [`crate::metrics`] recorded, and the
//! gauges read at scrape time (sandboxes by backend, status and health, requests in flight,
//! idle upstream connections, the process's own figures). On the main listener it needs an
//! owner's credential once authentication is on (its figures span every team); the
//! `--metrics-addr` listener serves it alone, with none.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::header::CONTENT_TYPE;

use super::AppState;
use crate::metrics::{self, Exposition};
use crate::model::Status;
use crate::routes::Health;

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(scrape))
}

pub async fn scrape(State(state): State<AppState>) -> Response {
    ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], render(&state)).into_response()
}

/// The whole exposition.
pub fn render(state: &AppState) -> String {
    let mut out = Exposition::default();
    state.metrics.render(&mut out);

    out.family(
        "sandgate_build_info",
        "The running build: its version.",
        "gauge",
    );
    out.sample(
        "sandgate_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );

    let entries = state.routes.all();
    // Health is per instance (a sandbox with replicas counts each).
    let instances = state.routes.all_instances();
    let backend = state.manager.backend().kind();
    out.family(
        "sandgate_sandboxes",
        "Sandboxes by backend and status.",
        "gauge",
    );
    for status in Status::ALL {
        let n = entries.iter().filter(|e| e.status == status).count();
        out.sample(
            "sandgate_sandboxes",
            &[("backend", backend), ("status", status.as_str())],
            n as f64,
        );
    }
    out.family(
        "sandgate_sandbox_health",
        "Running sandbox instances with a dev server, by what their health checks say.",
        "gauge",
    );
    for (health, name) in [
        (Health::Unknown, "unknown"),
        (Health::Ready, "ready"),
        (Health::NotReady, "not_ready"),
    ] {
        let n = instances
            .iter()
            .filter(|e| e.health_checked() && e.health() == health)
            .count();
        out.sample("sandgate_sandbox_health", &[("state", name)], n as f64);
    }

    let pools = state.manager.warm().report();
    if !pools.is_empty() {
        out.family(
            "sandgate_warm_pool_sandboxes",
            "Sandboxes of each runtime's warm pool, by state (target: its configured size).",
            "gauge",
        );
    }
    for pool in pools {
        for (name, n) in [
            ("ready", pool.ready),
            ("starting", pool.starting),
            ("target", pool.target),
        ] {
            out.sample(
                "sandgate_warm_pool_sandboxes",
                &[("runtime", &pool.runtime), ("state", name)],
                n as f64,
            );
        }
    }

    let open: usize = entries
        .iter()
        .map(|e| e.breakers().open_count(e.generation))
        .sum();
    out.single(
        "sandgate_circuits_open",
        "Sandbox ports whose circuit is open or half-open now.",
        "gauge",
        open as f64,
    );
    out.single(
        "sandgate_proxy_active_requests",
        "Requests to sandboxes in flight (responses still streaming included).",
        "gauge",
        state.limits.in_flight() as f64,
    );
    out.single(
        "sandgate_proxy_max_requests",
        "MAX_CONCURRENT_REQUESTS: requests to sandboxes in flight at most.",
        "gauge",
        state.limits.max() as f64,
    );
    out.single(
        "sandgate_upstream_idle_connections",
        "Kept connections to sandboxes waiting for a request.",
        "gauge",
        state.proxy.idle_upstreams() as f64,
    );
    metrics::render_process(&mut out);
    out.into_string()
}
