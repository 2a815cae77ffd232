//! `/sandboxes` (and seed 000's `POST /sandbox`): create, list, inspect, start, stop, delete
//! and read logs. One response object serves seeds 000, 003 and 004 (see the README).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;

use super::{audited, ApiJson, ApiPath, AppState, Caller};
use crate::audit::Actor;
use crate::error::Error;
use crate::manager::CreateSandbox;
use crate::model::{Sandbox, Status};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(create).get(list))
        .route("/sandbox", post(create))
        .route("/sandboxes/{id}", get(inspect).delete(remove).patch(update))
        .route(
            "/sandboxes/{id}/preview-tokens",
            post(issue_preview).delete(revoke_previews),
        )
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
    /// Whether path routes forward their prefix (`keep`) or strip it (`strip`).
    pub path_prefix: crate::model::PathPrefix,
    pub port: Option<u16>,
    pub allocated_port: Option<u16>,
    pub proxy_enabled: bool,
    /// Every port answers without a credential.
    pub public: bool,
    /// These ports answer without a credential.
    pub public_ports: Vec<u16>,
    pub dev_server_url: Option<String>,
    /// Host route for the dev-server port: `{port}-{id}.{domain}`.
    pub host_url: Option<String>,
    /// Seed 003: whether the sandbox is up (the port check lives in `/health/sandboxes`).
    pub ready: bool,
    /// Commands running in it and command sockets (`/ws`) open to it right now.
    pub connections: Connections,
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
            path_prefix: if sb.keep_prefix {
                crate::model::PathPrefix::Keep
            } else {
                crate::model::PathPrefix::Strip
            },
            port: sb.port,
            allocated_port: sb.allocated_port,
            proxy_enabled,
            public: sb.public,
            public_ports: sb.public_ports.clone(),
            dev_server_url: proxy_enabled.then(|| format!("{base}/sandbox/{}/", sb.id)),
            host_url,
            ready: sb.status == Status::Running,
            connections: {
                let (exec, ws, pty) = state
                    .routes
                    .get(&sb.id)
                    .map_or((0, 0, 0), |e| e.connections());
                Connections { exec, ws, pty }
            },
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

/// Seed 004's "connected" sandboxes: what is using one right now.
#[derive(Debug, Serialize)]
pub struct Connections {
    pub exec: usize,
    pub ws: usize,
    /// Terminal sessions (attached or waiting to be re-attached).
    pub pty: usize,
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
    actor: Actor,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Result<Response, Error> {
    let created = state.manager.create(req, &caller.0.team).await;
    let target = created.as_ref().ok().map(|sb| sb.id.clone());
    let sb = audited(&state, &actor, "sandbox.create", target.as_deref(), created)?;
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
    actor: Actor,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SandboxView>, Error> {
    let done = async {
        caller.sandbox(&state, &id).await?;
        state.manager.start(&id).await
    }
    .await;
    let sb = audited(&state, &actor, "sandbox.start", Some(&id), done)?;
    Ok(Json(SandboxView::new(&sb, &state)))
}

async fn stop(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SandboxView>, Error> {
    let done = async {
        caller.sandbox(&state, &id).await?;
        state.manager.stop(&id).await
    }
    .await;
    let sb = audited(&state, &actor, "sandbox.stop", Some(&id), done)?;
    Ok(Json(SandboxView::new(&sb, &state)))
}

async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, Error> {
    let done = async {
        caller.sandbox(&state, &id).await?;
        state.manager.delete(&id).await
    }
    .await;
    audited(&state, &actor, "sandbox.delete", Some(&id), done)?;
    Ok(Json(serde_json::json!({
        "id": id,
        "sandbox_id": id,
        "status": "deleted",
        "message": format!("Sandbox {id} successfully deleted"),
    })))
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Access {
    public: Option<bool>,
    public_ports: Option<Vec<u16>>,
    path_prefix: Option<crate::model::PathPrefix>,
}

/// `PATCH /sandboxes/{id}`: which ports answer without a credential.
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<Access>,
) -> Result<Json<SandboxView>, Error> {
    let done = async {
        caller.sandbox(&state, &id).await?;
        state
            .manager
            .set_access(&id, req.public, req.public_ports, req.path_prefix)
            .await
    }
    .await;
    let sb = audited(&state, &actor, "sandbox.update", Some(&id), done)?;
    Ok(Json(SandboxView::new(&sb, &state)))
}

/// Preview tokens live at most this long (a week); the default is an hour.
const MAX_PREVIEW_TTL: i64 = 7 * 24 * 3600;

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewRequest {
    port: Option<u16>,
    /// Seconds.
    ttl: Option<i64>,
}

/// `POST /sandboxes/{id}/preview-tokens`: a URL that opens the sandbox in a browser with no
/// headers (the token is exchanged for a cookie on first use).
async fn issue_preview(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<PreviewRequest>,
) -> Result<Response, Error> {
    let issued = issue_preview_for(&state, &caller, &id, req).await;
    audited(&state, &actor, "preview.issue", Some(&id), issued)
}

async fn issue_preview_for(
    state: &AppState,
    caller: &Caller,
    id: &str,
    req: PreviewRequest,
) -> Result<Response, Error> {
    let state = state.clone();
    let sb = caller.sandbox(&state, id).await?;
    let ttl = req.ttl.unwrap_or(3600);
    if !(1..=MAX_PREVIEW_TTL).contains(&ttl) {
        return Err(Error::Validation(format!(
            "ttl must be from 1 to {MAX_PREVIEW_TTL} seconds"
        )));
    }
    if req.port == Some(0) {
        return Err(Error::Validation("port must be from 1 to 65535".into()));
    }
    let Some(port) = req.port.or(sb.port) else {
        return Err(Error::Validation(
            "the sandbox has no dev-server port: name one".into(),
        ));
    };
    let (token, expires) = state.auth.issue_preview(&sb, req.port, ttl);
    let base = &state.public_base;
    let scheme = if base.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    let url = format!(
        "{scheme}://{port}-{}.{}:{}/?sandgate_token={token}",
        sb.id, state.config.domain, state.bound_port
    );
    let path_url = format!("{base}/sandbox/{}/?sandgate_token={token}", sb.id);
    let expires_at = chrono::DateTime::from_timestamp(expires, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({
            "token": token,
            "url": url,
            "path_url": path_url,
            "port": port,
            "expires_at": expires_at,
        })),
    )
        .into_response())
}

/// `DELETE /sandboxes/{id}/preview-tokens`: every preview token of the sandbox stops working.
async fn revoke_previews(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, Error> {
    let done = async {
        caller.sandbox(&state, &id).await?;
        state.manager.revoke_previews(&id).await
    }
    .await;
    audited(&state, &actor, "preview.revoke", Some(&id), done)?;
    Ok(Json(serde_json::json!({"id": id, "status": "revoked"})))
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
