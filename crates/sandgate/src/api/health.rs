//! Health endpoints (seeds 002 and 003): `/health`, `/health/proxy`, `/health/sandboxes`
//! (per-sandbox readiness: does its port accept a connection?) and `/health/auth`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{AppState, Caller};
use crate::backend::Upstream;
use crate::model::Status;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(overall))
        .route("/health/proxy", get(proxy))
        .route("/health/sandboxes", get(sandboxes))
        .route("/health/auth", get(auth))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn overall(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let store_ok = state.manager.store().ping().await.is_ok();
    let backend = state.manager.backend();
    let body = json!({
        "status": if store_ok { "ok" } else { "degraded" },
        "sandboxes": state.routes.len(),
        "timestamp": now(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "backend": backend.kind(),
        "isolation": backend.isolation(),
        "store": if store_ok { "ok" } else { "unavailable" },
    });
    let code = if store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn proxy(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "in_flight": state.limits.in_flight(),
        "max_concurrent_requests": state.limits.max(),
        "max_requests_per_client": state.config.max_requests_per_client,
        "finished": state.limits.finished(),
        "rate_limits": {
            "per_key": state.config.rate_limit_per_key,
            "per_sandbox": state.config.rate_limit_per_sandbox,
            "max_connections_per_sandbox": state.config.max_connections_per_sandbox,
            "tracked": state.rates.tracked(),
        },
        "idle_upstream_connections": state.proxy.idle_upstreams(),
        "timeout_seconds": state.config.proxy_timeout.as_secs_f64(),
        "max_retries": state.config.max_retries,
        "timestamp": now(),
    }))
}

/// Authentication status: never a secret or a key id.
async fn auth(State(state): State<AppState>) -> Json<Value> {
    let auth = &state.auth;
    let enabled = auth.enabled();
    Json(json!({
        "status": if enabled { "ok" } else { "open" },
        "enabled": enabled,
        "message": if enabled {
            "every request needs a credential"
        } else {
            "authentication is off (AUTH_ENABLED=false): anyone who reaches this address may use the gateway"
        },
        "providers": auth.providers(),
        "keys": auth.key_count(),
        "cache_size": auth.cache_size(),
        "failures_total": auth.failures(),
        "failures_last_minute": auth.recent_failures(),
        "timestamp": now(),
    }))
}

/// Whether something accepts connections at `upstream` right now.
async fn port_open(upstream: Upstream) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(500), upstream.dial()).await,
        Ok(Ok(_))
    )
}

/// The caller's team's sandboxes (every team's for the owner), each with a port check.
async fn sandboxes(State(state): State<AppState>, Caller(caller): Caller) -> Json<Value> {
    let mut all = state.routes.all();
    all.retain(|sb| caller.sees(&sb.team));
    let backend = state.manager.backend();
    let checks = all.iter().map(|sb| {
        let upstream = sb.port.and_then(|p| backend.upstream(sb, p));
        async move {
            let ready = match (sb.status, upstream) {
                (Status::Running, Some(u)) => port_open(u).await,
                (Status::Running, None) => true,
                _ => false,
            };
            json!({
                "id": sb.id,
                "path": sb.path(),
                "status": sb.status,
                "port": sb.port,
                "ready": ready,
            })
        }
    });
    let items = futures_util::future::join_all(checks).await;
    let ready = items.iter().filter(|i| i["ready"] == true).count();
    Json(json!({
        "status": "ok",
        "count": items.len(),
        "ready": ready,
        "sandboxes": items,
        "timestamp": now(),
    }))
}
