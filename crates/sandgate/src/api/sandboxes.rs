//! `/sandboxes` (and seed 000's `POST /sandbox`): create, list, inspect, start, stop, delete
//! and read logs. One response object serves seeds 000, 003 and 004 (see the README).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::{ApiJson, ApiPath, AppState, Caller};
use crate::error::Error;
use crate::manager::CreateSandbox;
use crate::model::{Sandbox, Status};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(create).get(list))
        .route("/sandbox", post(create))
        .route("/sandboxes/{id}", get(inspect).delete(remove))
        .route("/sandboxes/{id}/start", post(start))
        .route("/sandboxes/{id}/stop", post(stop))
        .route("/sandboxes/{id}/logs", get(logs))
}

/// The sandbox as clients see it: a superset of the seeds' shapes.
#[derive(Debug, Serialize)]
pub struct SandboxView {
    pub id: String,
    /// Seed 004's name for `id`.
    pub sandbox_id: String,
    pub status: Status,
    pub status_reason: Option<String>,
    pub runtime: String,
    pub mode: &'static str,
    pub dev_server: bool,
    pub command: String,
    pub env: std::collections::BTreeMap<String, String>,
    pub team: String,
    pub owner: String,
    pub name: Option<String>,
    /// Seed 003: `owner/name`, routable as `/{owner}/{name}/`.
    pub path: Option<String>,
    pub port: Option<u16>,
    pub allocated_port: Option<u16>,
    pub proxy_enabled: bool,
    pub dev_server_url: Option<String>,
    /// Host route for the dev-server port: `{port}-{id}.{domain}`.
    pub host_url: Option<String>,
    /// Seed 003: whether the sandbox is up (the port check lives in `/health/sandboxes`).
    pub ready: bool,
    pub ip_address: Option<String>,
    /// Seed 004: seconds since the Unix epoch.
    pub created_at: f64,
    pub created: String,
    pub updated: String,
}

impl SandboxView {
    pub fn new(sb: &Sandbox, state: &AppState) -> SandboxView {
        let proxy_enabled = sb.dev_server && sb.port.is_some();
        let base = &state.public_base;
        let host_url = match (proxy_enabled, sb.port) {
            (true, Some(port)) => Some(format!(
                "http://{port}-{}.{}:{}/",
                sb.id, state.config.domain, state.bound_port
            )),
            _ => None,
        };
        SandboxView {
            id: sb.id.clone(),
            sandbox_id: sb.id.clone(),
            status: sb.status,
            status_reason: sb.status_reason.clone(),
            runtime: sb.runtime.clone(),
            mode: sb.mode.as_str(),
            dev_server: sb.dev_server,
            command: sb.command.clone(),
            env: sb.env.clone(),
            team: sb.team.clone(),
            owner: sb.owner.clone(),
            name: sb.name.clone(),
            path: sb.path(),
            port: sb.port,
            allocated_port: sb.allocated_port,
            proxy_enabled,
            dev_server_url: proxy_enabled.then(|| format!("{base}/sandbox/{}/", sb.id)),
            host_url,
            ready: sb.status == Status::Running,
            ip_address: sb.ip_address.clone(),
            created_at: sb.created_at.timestamp_millis() as f64 / 1000.0,
            created: sb
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            updated: sb
                .updated_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }
}

#[derive(Serialize)]
struct Created {
    #[serde(flatten)]
    sandbox: SandboxView,
    message: String,
}

async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Result<Response, Error> {
    let sb = state.manager.create(req, &caller.0.team).await?;
    let body = Created {
        message: format!("Sandbox {} created successfully", sb.id),
        sandbox: SandboxView::new(&sb, &state),
    };
    let location = format!("/sandboxes/{}", sb.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response())
}

#[derive(Serialize)]
struct List {
    count: usize,
    sandboxes: Vec<SandboxView>,
}

async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Result<Json<impl Serialize>, Error> {
    let sandboxes: Vec<_> = state
        .manager
        .list()
        .await?
        .iter()
        .filter(|sb| caller.sees(&sb.team))
        .map(|sb| SandboxView::new(sb, &state))
        .collect();
    Ok(Json(List {
        count: sandboxes.len(),
        sandboxes,
    }))
}

async fn inspect(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SandboxView>, Error> {
    let sb = caller.sandbox(&state, &id).await?;
    state.routes.touch(&id);
    Ok(Json(SandboxView::new(&sb, &state)))
}

async fn start(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SandboxView>, Error> {
    caller.sandbox(&state, &id).await?;
    let sb = state.manager.start(&id).await?;
    Ok(Json(SandboxView::new(&sb, &state)))
}

async fn stop(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SandboxView>, Error> {
    caller.sandbox(&state, &id).await?;
    let sb = state.manager.stop(&id).await?;
    Ok(Json(SandboxView::new(&sb, &state)))
}

async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, Error> {
    caller.sandbox(&state, &id).await?;
    state.manager.delete(&id).await?;
    Ok(Json(serde_json::json!({
        "id": id,
        "sandbox_id": id,
        "status": "deleted",
        "message": format!("Sandbox {id} successfully deleted"),
    })))
}

/// The sandbox's captured stdout and stderr, streamed as plain text.
async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, Error> {
    let sb = caller.sandbox(&state, &id).await?;
    state.routes.touch(&id);
    let stream = state
        .manager
        .backend()
        .logs(&sb)
        .await
        .map_err(Error::internal)?;
    let body = Body::from_stream(stream);
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}
