//! API keys, tokens and teams: `POST/GET /auth/keys`, `DELETE /auth/keys/{id}` (admins, for
//! their team; the owner, for any), `POST /auth/token` (a JWT for an API key) and
//! `POST/GET /teams` (the owner). A key's secret is shown once, in the answer to its creation;
//! afterwards only its id, name, role and use times.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{audited, ApiJson, ApiPath, AppState, Caller};
use crate::audit::Actor;
use crate::auth::{KeyEntry, Role, Via};
use crate::error::Error;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/auth/keys", get(list_keys).post(create_key))
        .route("/auth/keys/{id}", delete(revoke_key))
        .route("/auth/token", axum::routing::post(mint_token))
        .route("/teams", get(list_teams).post(create_team))
}

/// The longest lifetime a key may be given: ten years.
const MAX_EXPIRES_IN: u64 = 10 * 365 * 24 * 3600;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: Option<String>,
    role: Option<String>,
    team: Option<String>,
    /// Seconds until the key stops working.
    expires_in: Option<u64>,
}

fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[derive(Serialize)]
struct KeyView {
    id: String,
    name: String,
    role: String,
    team: String,
    created_at: String,
    expires_at: Option<String>,
    last_used_at: Option<String>,
    expired: bool,
}

impl KeyView {
    fn new(k: &KeyEntry) -> KeyView {
        let r = &k.record;
        KeyView {
            id: r.id.clone(),
            name: r.name.clone(),
            role: r.role.clone(),
            team: r.team.clone(),
            created_at: time(&r.created_at),
            expires_at: r.expires_at.as_ref().map(time),
            last_used_at: k.last_used().as_ref().map(time),
            expired: r.expires_at.is_some_and(|t| t <= Utc::now()),
        }
    }
}

async fn create_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    actor: Actor,
    ApiJson(req): ApiJson<CreateKey>,
) -> Result<impl IntoResponse, Error> {
    let created = new_key(&state, &caller, req).await;
    let target = created
        .as_ref()
        .ok()
        .map(|(_, v)| v["id"].as_str().unwrap_or("").to_string());
    audited(&state, &actor, "key.create", target.as_deref(), created).map(|(r, _)| r)
}

async fn new_key(
    state: &AppState,
    caller: &crate::auth::Principal,
    req: CreateKey,
) -> Result<((StatusCode, Json<serde_json::Value>), serde_json::Value), Error> {
    let name = req.name.unwrap_or_default();
    if name.trim().is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(Error::Validation(
            "name must be 1 to 100 characters without control characters".into(),
        ));
    }
    let role: Role = req
        .role
        .as_deref()
        .unwrap_or("member")
        .parse()
        .map_err(Error::Validation)?;
    if role > caller.role {
        return Err(Error::Forbidden(format!(
            "a {} key cannot create a {role} key",
            caller.role
        )));
    }
    let team = req.team.unwrap_or_else(|| caller.team.to_string());
    if team != *caller.team {
        if caller.role != Role::Owner {
            return Err(Error::Forbidden(
                "only the owner creates keys for another team".into(),
            ));
        }
        let teams = state.manager.store().teams().await?;
        if !teams.iter().any(|t| t.id == team) {
            return Err(Error::TeamNotFound(team));
        }
    }
    let expires_at = match req.expires_in {
        Some(0) | Some(MAX_EXPIRES_IN..) => {
            return Err(Error::Validation(format!(
                "expires_in must be from 1 to {MAX_EXPIRES_IN} seconds"
            )))
        }
        Some(secs) => Some(crate::model::now() + chrono::Duration::seconds(secs as i64)),
        None => None,
    };
    let (entry, key) = state
        .auth
        .create_key(&team, name.trim(), role, expires_at)
        .await?;
    tracing::info!(key = %entry.record.id, team = %team, role = %role, by = %caller.subject, "API key created");
    let mut body = serde_json::to_value(KeyView::new(&entry)).map_err(Error::internal)?;
    body["key"] = json!(key);
    body["message"] = json!("store this key now: it is not shown again");
    let summary = json!({"id": entry.record.id});
    Ok(((StatusCode::CREATED, Json(body)), summary))
}

async fn list_keys(
    State(state): State<AppState>,
    Caller(caller): Caller,
) -> Json<serde_json::Value> {
    let keys: Vec<KeyView> = state
        .auth
        .keys_for(&caller)
        .iter()
        .map(|k| KeyView::new(k))
        .collect();
    Json(json!({ "count": keys.len(), "keys": keys }))
}

async fn revoke_key(
    State(state): State<AppState>,
    Caller(caller): Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, Error> {
    let revoked = match state.auth.revoke(&caller, &id).await {
        Ok(Some(entry)) => Ok(entry),
        Ok(None) => Err(Error::KeyNotFound(id.clone())),
        Err(e) => Err(e),
    };
    let entry = audited(&state, &actor, "key.revoke", Some(&id), revoked)?;
    tracing::info!(key = %id, team = %entry.record.team, by = %caller.subject, "API key revoked");
    Ok(Json(json!({ "id": id, "status": "revoked" })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintToken {
    /// Seconds the token lives (at most `AUTH_TOKEN_EXPIRY`, the default).
    expires_in: Option<u64>,
}

/// `POST /auth/token`: seed 002's Bearer token for the API key that asks, carrying its team
/// and role. Only a key mints (a token cannot extend itself); a revoked key's tokens stop
/// working with it.
async fn mint_token(
    State(state): State<AppState>,
    Caller(caller): Caller,
    actor: Actor,
    ApiJson(req): ApiJson<MintToken>,
) -> Result<Json<serde_json::Value>, Error> {
    let minted = mint(&state, &caller, req);
    audited(&state, &actor, "token.mint", Some(&caller.subject), minted)
}

fn mint(
    state: &AppState,
    caller: &crate::auth::Principal,
    req: MintToken,
) -> Result<Json<serde_json::Value>, Error> {
    if caller.via != Via::Key {
        return Err(Error::Forbidden("tokens are minted with an API key".into()));
    }
    if req.expires_in == Some(0) {
        return Err(Error::Validation(
            "expires_in must be at least 1 second".into(),
        ));
    }
    let Some((token, ttl)) = state.auth.mint(caller, req.expires_in)? else {
        return Err(Error::RouteNotFound(
            "POST /auth/token (tokens are off: AUTH_PROVIDER=api_key)".into(),
        ));
    };
    tracing::info!(key = %caller.subject, team = %caller.team, ttl, "token minted");
    Ok(Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": ttl,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTeam {
    name: Option<String>,
}

async fn create_team(
    State(state): State<AppState>,
    Caller(caller): Caller,
    actor: Actor,
    ApiJson(req): ApiJson<CreateTeam>,
) -> Result<impl IntoResponse, Error> {
    let name = req.name.clone().unwrap_or_default();
    let created = new_team(&state, &caller, req).await;
    audited(&state, &actor, "team.create", Some(&name), created)
}

async fn new_team(
    state: &AppState,
    caller: &crate::auth::Principal,
    req: CreateTeam,
) -> Result<(StatusCode, Json<serde_json::Value>), Error> {
    let name = req.name.unwrap_or_default();
    if !crate::model::valid_label(&name) {
        return Err(Error::Validation(format!(
            "team name {name:?} must be a lowercase label of 1-63 characters (a-z, 0-9, '-')"
        )));
    }
    let team = state.manager.store().create_team(&name).await?;
    state.auth.team_created(&team.id);
    tracing::info!(team = %name, by = %caller.subject, "team created");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": team.id, "name": team.id, "created_at": time(&team.created_at) })),
    ))
}

async fn list_teams(State(state): State<AppState>) -> Result<Json<serde_json::Value>, Error> {
    let teams = state.manager.store().teams().await?;
    let sandboxes = state.routes.all();
    let items: Vec<_> = teams
        .iter()
        .map(|t| {
            json!({
                "id": t.id,
                "name": t.id,
                "created_at": time(&t.created_at),
                "sandboxes": sandboxes.iter().filter(|s| s.team == t.id).count(),
            })
        })
        .collect();
    Ok(Json(json!({ "count": items.len(), "teams": items })))
}
