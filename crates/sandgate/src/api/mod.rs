//! The control API (axum): sandboxes and health. Each submodule exposes `router()`; this module
//! joins them behind the cross-site guard (`guard`), adds the JSON 404/405 fallbacks and the
//! body and path extractors that map every rejection onto the gateway's error shape.

pub mod audit;
pub mod exec;
pub mod exec_jobs;
pub mod execute;
pub mod files;
pub mod guard;
pub mod health;
pub mod keys;
pub mod metrics;
pub mod pty;
pub mod sandboxes;
pub mod ui;
pub mod ws;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::Router;
use http::request::Parts;
use serde::de::DeserializeOwned;

use crate::admission::Limits;
use crate::audit::{Actor, Audit};
use crate::auth::{Auth, Principal};
use crate::config::Config;
use crate::error::Error;
use crate::manager::Manager;
use crate::proxy::Proxy;
use crate::rates::Rates;
use crate::routes::Routes;

/// Everything handlers need; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub auth: Arc<Auth>,
    pub audit: Arc<Audit>,
    pub manager: Arc<Manager>,
    pub routes: Arc<Routes>,
    pub proxy: Arc<Proxy>,
    /// Admission limits and finish counters.
    pub limits: Arc<Limits>,
    /// What `/metrics` reports.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Rate limits and the failed-credential throttle.
    pub rates: Arc<Rates>,
    /// Background commands.
    pub execs: Arc<crate::exec::registry::Registry>,
    /// Terminal sessions.
    pub terminals: Arc<crate::exec::terminals::Terminals>,
    /// Base URL of this gateway as clients reach it (for `dev_server_url`).
    pub public_base: Arc<str>,
    pub bound_port: u16,
    pub started: Instant,
    /// Cancelled when the gateway starts shutting down (`/health/ready` turns 503).
    pub draining: tokio_util::sync::CancellationToken,
    /// Cancelled when the listeners stop and connections drain (`--shutdown-delay` after
    /// `draining`): the gateway's own WebSockets close with 1001 (going away).
    pub stopping: tokio_util::sync::CancellationToken,
}

pub fn router(state: AppState) -> Router {
    let guard = Arc::new(guard::Guard::new(&state.config));
    Router::new()
        .merge(sandboxes::router())
        .merge(health::router())
        .merge(keys::router())
        .merge(audit::router())
        .merge(exec::router())
        .merge(exec_jobs::router())
        .merge(execute::router())
        .merge(ws::router())
        .merge(files::router())
        .merge(pty::router())
        .merge(metrics::router())
        .merge(ui::router())
        .route("/", axum::routing::get(index))
        .fallback(|req: Request| async move {
            let html = crate::error::wants_html(req.headers());
            Error::RouteNotFound(format!("{} {}", req.method(), req.uri().path()))
                .to_response(html)
                .map(axum::body::Body::from)
        })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(axum::middleware::from_fn_with_state(guard, guard::check))
        .layer(axum::middleware::from_fn(route_template))
        .with_state(state)
}

/// Hands the matched route's template (`/sandboxes/{id}`) on with the response, where the
/// finish step names the request by it (metrics never see a raw path).
async fn route_template(req: Request, next: axum::middleware::Next) -> axum::response::Response {
    let matched = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let mut resp = next.run(req).await;
    if let Some(m) = matched {
        resp.extensions_mut().insert(m);
    }
    resp
}

/// `GET /`: what this is, as a small page for browsers and JSON for everything else.
async fn index(headers: http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    let version = env!("CARGO_PKG_VERSION");
    if crate::error::wants_html(&headers) {
        let page = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>sandgate</title>\
             <style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;\
             color:#222}}</style></head><body><h1>sandgate {version}</h1>\
             <p>A gateway for sandboxes: a control API to create and manage them, and a proxy \
             to every port inside them.</p><ul><li><a href=\"/health\">/health</a>: is it up\
             </li><li><code>/sandboxes</code>: the control API (with a credential)</li>\
             <li><code>/sandbox/{{id}}/</code>, <code>/{{owner}}/{{name}}/</code>, \
             <code>{{port}}-{{id}}.{{domain}}</code>: a sandbox's ports</li></ul>\
             <p>The API and its routes: the README of the sandgate repository.</p></body></html>"
        );
        return (
            [(http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
            page,
        )
            .into_response();
    }
    axum::Json(serde_json::json!({
        "name": "sandgate",
        "version": version,
        "health": "/health",
        "api": "/sandboxes",
        "proxy": ["/sandbox/{id}/", "/{owner}/{name}/", "{port}-{id}.{domain}"],
    }))
    .into_response()
}

/// A JSON body, read up to the configured limit. An empty body deserialises as `T::default()`
/// (seed 004 creates sandboxes with a bare `POST /sandboxes`). Its media type was checked by
/// `guard`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Error> {
        let limit = state.config.api_body_limit;
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| Error::PayloadTooLarge(limit))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(ApiJson(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))
    }
}

/// Who the request acts as, as the request policy decided (`crate::policy`): every route
/// that needs a credential takes this; a route the policy let through without one cannot.
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or(Error::Unauthenticated)
    }
}

impl Caller {
    /// The sandbox `id` if this caller may see it; another team's is "not found".
    pub async fn sandbox(
        &self,
        state: &AppState,
        id: &str,
    ) -> Result<crate::model::Sandbox, Error> {
        let sb = state.manager.get(id).await?;
        if !self.0.sees(&sb.team) {
            return Err(Error::SandboxNotFound(id.to_string()));
        }
        Ok(sb)
    }
}

/// The client's address, as the lane that served the request saw it.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let p = parts.extensions.get::<Principal>();
        Ok(Actor {
            team: p.map(|p| p.team.to_string()),
            subject: p.map(|p| p.subject.to_string()),
            client: parts
                .extensions
                .get::<ClientAddr>()
                .map(|c| c.0.to_string()),
        })
    }
}

/// Records a control action and its outcome in the audit log; returns the outcome.
pub fn audited<T>(
    state: &AppState,
    actor: &Actor,
    action: &str,
    target: Option<&str>,
    result: Result<T, Error>,
) -> Result<T, Error> {
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.status_and_code().1,
    };
    let details = result.as_ref().err().map(|e| e.to_string());
    state.audit.record(actor, action, target, outcome, details);
    result
}

/// Query parameters; a rejection (an unknown or mistyped parameter) becomes a 400 in the
/// gateway's error shape instead of axum's plain text.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e| Error::BadRequest(format!("invalid query: {}", e.body_text())))
    }
}

/// Path parameters; a rejection (percent-decoding to invalid UTF-8, a wrong type) becomes a
/// 400 in the gateway's error shape instead of axum's plain text.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<AppState> for ApiPath<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|e| Error::BadRequest(format!("invalid path: {}", e.body_text())))
    }
}
