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
    pub labels: std::collections::BTreeMap<String, String>,
    /// Seconds without use before the idle reaper acts on it (0: never; `null`: the
    /// gateway's).
    pub idle_timeout: Option<u64>,
    /// What it can reach outside itself: `none`, `egress` or `host` (shared-host processes).
    pub network: crate::model::Network,
    /// The HTTP path its health checks GET (`null`: they only connect).
    pub health_path: Option<String>,
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
    /// Seed 003: whether the sandbox is up (the port check lives in `/health/sandboxes`):
    /// at least one of its instances is.
    pub ready: bool,
    /// Instances it runs (`replicas` at create).
    pub replicas: u32,
    /// Each instance (the first is the sandbox's own, where commands, files and terminals
    /// run): what the balancer sees of it.
    pub instances: Vec<InstanceView>,
    /// Commands running in it and command sockets (`/ws`) open to it right now.
    pub connections: Connections,
    pub ip_address: Option<String>,
    /// Seed 003 (kubernetes backend): the sandbox's Service and its namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Seed 004: seconds since the Unix epoch.
    pub created_at: f64,
    pub created: String,
    pub updated: String,
}

/// One instance of a sandbox, as the balancer sees it.
#[derive(Debug, Serialize)]
pub struct InstanceView {
    /// The sandbox's id for instance 0; an instance's own id (not routable) for the others.
    pub id: String,
    pub status: Status,
    pub status_reason: Option<String>,
    /// Its dev server passed its last checks (or it is running and nothing checks).
    pub ready: bool,
    /// What the health checks say: `unknown`, `ready` or `not_ready`.
    pub health: crate::routes::Health,
    /// The host port its server binds (processes sharing the host network).
    pub allocated_port: Option<u16>,
    /// Proxied requests to it in flight now.
    pub in_flight: usize,
}

impl InstanceView {
    fn new(sb: &Sandbox, entry: Option<&crate::routes::Entry>, checks_run: bool) -> InstanceView {
        InstanceView {
            id: sb.id.clone(),
            status: sb.status,
            status_reason: sb.status_reason.clone(),
            ready: entry.is_some_and(|e| e.ready(checks_run)),
            health: entry.map_or(crate::routes::Health::Unknown, |e| e.health()),
            allocated_port: sb.allocated_port,
            in_flight: entry.map_or(0, |e| e.in_flight()),
        }
    }
}

impl SandboxView {
    pub fn new(sb: &Sandbox, state: &AppState) -> SandboxView {
        let proxy_enabled = sb.dev_server && sb.port.is_some();
        // Its route: what the checks say of it, and what is using it now.
        let entry = state.routes.get(&sb.id);
        let base = &state.public_base;
        let host_url = match (proxy_enabled, sb.port) {
            (true, Some(port)) => Some(format!(
                "http://{port}-{}.{}:{}/",
                sb.id, state.config.domain, state.bound_port
            )),
            _ => None,
        };
        let checks_run = state.config.health_interval.is_some();
        let service = state.manager.backend().service(sb);
        let mut instances = vec![InstanceView::new(sb, entry.as_deref(), checks_run)];
        if let Some(e) = &entry {
            instances.extend(
                e.instances()
                    .iter()
                    .map(|i| InstanceView::new(i, Some(i), checks_run)),
            );
        }
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
            labels: sb.labels.clone(),
            idle_timeout: sb.idle_timeout,
            network: sb.network,
            health_path: sb.health_path.clone(),
            port: sb.port,
            allocated_port: sb.allocated_port,
            proxy_enabled,
            public: sb.public,
            public_ports: sb.public_ports.clone(),
            dev_server_url: proxy_enabled.then(|| format!("{base}/sandbox/{}/", sb.id)),
            host_url,
            ready: instances.iter().any(|i| i.ready),
            replicas: sb.replicas,
            instances,
            connections: {
                let (exec, ws, pty) = entry.as_ref().map_or((0, 0, 0), |e| e.connections());
                Connections { exec, ws, pty }
            },
            ip_address: sb.ip_address.clone(),
            service: service.as_ref().map(|s| s.name.clone()),
            namespace: service.map(|s| s.namespace),
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
    /// Where the next page starts (`?cursor=`), when `limit` cut this one short.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// `GET /sandboxes` filters: `owner`, `name`, `runtime` (exact), `status` (comma-separated),
/// `label` (repeatable: `key=value`, or `key` for "has it"); pages with `limit` and `cursor`.
#[derive(Debug, Default)]
struct ListQuery {
    owner: Option<String>,
    name: Option<String>,
    runtime: Option<String>,
    status: Option<Vec<String>>,
    labels: Vec<(String, Option<String>)>,
    limit: Option<usize>,
    cursor: Option<String>,
}

impl ListQuery {
    fn parse(pairs: Vec<(String, String)>) -> Result<ListQuery, Error> {
        let mut q = ListQuery::default();
        for (k, v) in pairs {
            match k.as_str() {
                "owner" => q.owner = Some(v),
                "name" => q.name = Some(v),
                "runtime" => q.runtime = Some(v),
                "status" => q.status = Some(v.split(',').map(str::to_string).collect()),
                "label" => q.labels.push(match v.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (v, None),
                }),
                "limit" => {
                    let n = v.parse::<usize>().ok().filter(|n| (1..=1000).contains(n));
                    q.limit =
                        Some(n.ok_or_else(|| {
                            Error::Validation("limit must be from 1 to 1000".into())
                        })?);
                }
                "cursor" => q.cursor = Some(v),
                other => {
                    return Err(Error::BadRequest(format!(
                        "unknown query parameter {other:?}: one of owner, name, runtime, \
                         status, label, limit, cursor"
                    )))
                }
            }
        }
        Ok(q)
    }

    fn matches(&self, sb: &Sandbox) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| have == Some(w))
        };
        eq(&self.owner, Some(&sb.owner))
            && eq(&self.name, sb.name.as_deref())
            && eq(&self.runtime, Some(&sb.runtime))
            && self
                .status
                .as_ref()
                .is_none_or(|s| s.iter().any(|s| s == sb.status.as_str()))
            && self.labels.iter().all(|(k, v)| match v {
                Some(v) => sb.labels.get(k) == Some(v),
                None => sb.labels.contains_key(k),
            })
    }
}

async fn list(
    State(state): State<AppState>,
    Caller(caller): Caller,
    super::ApiQuery(pairs): super::ApiQuery<Vec<(String, String)>>,
) -> Result<Json<impl Serialize>, Error> {
    let q = ListQuery::parse(pairs)?;
    // The store lists in creation order (then id): a cursor is the last id of a page.
    let all = state.manager.list().await?;
    let mut visible = all
        .iter()
        .filter(|sb| caller.sees(&sb.team) && q.matches(sb))
        .peekable();
    if let Some(cursor) = &q.cursor {
        let mut skipped = false;
        for sb in visible.by_ref() {
            if &sb.id == cursor {
                skipped = true;
                break;
            }
        }
        if !skipped {
            return Err(Error::Validation(format!(
                "cursor {cursor:?} is not a sandbox of this listing"
            )));
        }
    }
    let limit = q.limit.unwrap_or(usize::MAX);
    let page: Vec<&Sandbox> = visible.by_ref().take(limit).collect();
    let next_cursor = (visible.peek().is_some() && page.len() == limit)
        .then(|| page.last().map(|sb| sb.id.clone()))
        .flatten();
    let sandboxes: Vec<SandboxView> = page.iter().map(|sb| SandboxView::new(sb, &state)).collect();
    Ok(Json(List {
        count: sandboxes.len(),
        sandboxes,
        next_cursor,
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

/// `PATCH /sandboxes/{id}`: which ports answer without a credential.
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<crate::manager::UpdateSandbox>,
) -> Result<Json<SandboxView>, Error> {
    let done = async {
        caller.sandbox(&state, &id).await?;
        state.manager.update(&id, req).await
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

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    follow: Option<bool>,
    tail: Option<usize>,
    timestamps: Option<bool>,
}

/// The sandbox's captured stdout and stderr, streamed as plain text: all of it or its last
/// `tail` lines, and with `follow=true` what it writes next, until the client leaves.
async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    super::ApiQuery(q): super::ApiQuery<LogsQuery>,
) -> Result<Response, Error> {
    let sb = caller.sandbox(&state, &id).await?;
    state.routes.touch(&id);
    let options = crate::backend::LogOptions {
        follow: q.follow.unwrap_or(false),
        tail: q.tail,
        timestamps: q.timestamps.unwrap_or(false),
    };
    let stream = state
        .manager
        .backend()
        .logs(&sb, options)
        .await
        .map_err(|e| match e {
            crate::backend::BackendError::Unsupported { backend, operation } => {
                Error::BackendUnsupported { backend, operation }
            }
            other => Error::internal(other),
        })?;
    let body = Body::from_stream(stream);
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}
