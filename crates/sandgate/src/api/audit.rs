//! `GET /audit?since=&action=&sandbox=&limit=`: the audit log, oldest first, for admins (their
//! team's records) and the owner (every record, including refused credentials, which belong to
//! no team).

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, Caller};
use crate::auth::Role;
use crate::error::Error;
use crate::store::AuditFilter;

pub fn router() -> Router<AppState> {
    Router::new().route("/audit", get(read))
}

const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    /// RFC 3339 time or Unix seconds.
    since: Option<String>,
    action: Option<String>,
    sandbox: Option<String>,
    limit: Option<u32>,
}

fn parse_since(s: &str) -> Result<DateTime<Utc>, Error> {
    if let Ok(secs) = s.parse::<i64>() {
        return DateTime::from_timestamp(secs, 0)
            .ok_or_else(|| Error::Validation(format!("since {s:?} is out of range")));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            Error::Validation(format!(
                "since {s:?} must be an RFC 3339 time or Unix seconds"
            ))
        })
}

async fn read(
    State(state): State<AppState>,
    Caller(caller): Caller,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, Error> {
    let Query(p) = params.map_err(|e| Error::BadRequest(e.body_text()))?;
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(Error::Validation(format!(
            "limit must be from 1 to {MAX_LIMIT}"
        )));
    }
    let filter = AuditFilter {
        team: (caller.role != Role::Owner).then(|| caller.team.to_string()),
        since: p.since.as_deref().map(parse_since).transpose()?,
        action: p.action,
        target: p.sandbox,
        limit,
    };
    let records = state.manager.store().audit(&filter).await?;
    let items: Vec<_> = records
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "time": r.at.to_rfc3339_opts(SecondsFormat::Millis, true),
                "team": r.team,
                "subject": r.subject,
                "client": r.client,
                "action": r.action,
                "target": r.target,
                "result": r.result,
                "details": r.details,
            })
        })
        .collect();
    Ok(Json(json!({
        "count": items.len(),
        "records": items,
        "dropped": state.audit.dropped(),
    })))
}
