//! Health endpoints (seeds 002 and 003): `/health`, `/health/proxy`, `/health/sandboxes`
//! (what each sandbox's health checks say), `/health/auth`, and `/health/live` and
//! `/health/ready` for Kubernetes probes (ready turns 503 as soon as shutdown begins).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{AppState, Caller};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(overall))
        .route("/health/proxy", get(proxy))
        .route("/health/sandboxes", get(sandboxes))
        .route("/health/pools", get(pools))
        .route("/health/auth", get(auth))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
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
        // Whether this gateway runs the background duties (always, unless replicas share
        // a PostgreSQL store: then exactly one of them).
        "leader": state.manager.leads(),
    });
    let code = if store_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// Liveness (a Kubernetes `livenessProbe`): the process answers.
async fn live() -> Json<Value> {
    Json(json!({"status": "ok", "timestamp": now()}))
}

/// Readiness (a `readinessProbe`): the store answers and the gateway is not shutting down;
/// 503 otherwise, so a load balancer stops sending new connections before they drain.
async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let store_ok = state.manager.store().ping().await.is_ok();
    let draining = state.draining.is_cancelled();
    let ok = store_ok && !draining;
    let body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "store": if store_ok { "ok" } else { "unavailable" },
        "draining": draining,
        "timestamp": now(),
    });
    let code = if ok {
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

/// The caller's team's sandboxes (every team's for the owner), each with what its health
/// checks say: `ready` as in the sandbox object, `health` the checker's state.
/// The warm pools (`[runtimes.X] warm = N`): each runtime's size, how many sandboxes wait and
/// how many are starting. No sandbox id: waiting sandboxes are nobody's.
async fn pools(State(state): State<AppState>) -> Json<Value> {
    let pools: Vec<Value> = state
        .manager
        .warm()
        .report()
        .into_iter()
        .map(|p| {
            json!({
                "runtime": p.runtime,
                "size": p.target,
                "ready": p.ready,
                "starting": p.starting,
            })
        })
        .collect();
    Json(json!({
        "status": "ok",
        "pools": pools,
        "timestamp": now(),
    }))
}

async fn sandboxes(State(state): State<AppState>, Caller(caller): Caller) -> Json<Value> {
    let mut all = state.routes.all();
    all.retain(|sb| caller.sees(&sb.team));
    let checks_run = state.config.health_interval.is_some();
    let items: Vec<Value> = all
        .iter()
        .map(|sb| {
            let proxied = sb.dev_server && sb.port.is_some();
            let instances: Vec<Value> = std::iter::once(sb)
                .chain(sb.instances())
                .map(|i| {
                    json!({
                        "id": i.id,
                        "status": i.status,
                        "ready": i.ready(checks_run),
                        "health": proxied.then(|| i.health_report()),
                    })
                })
                .collect();
            json!({
                "id": sb.id,
                "path": sb.path(),
                "status": sb.status,
                "port": sb.port,
                "ready": instances.iter().any(|i| i["ready"] == true),
                "health": proxied.then(|| sb.health_report()),
                "instances": instances,
            })
        })
        .collect();
    let ready = items.iter().filter(|i| i["ready"] == true).count();
    Json(json!({
        "status": "ok",
        "count": items.len(),
        "ready": ready,
        "sandboxes": items,
        "timestamp": now(),
    }))
}
