//! Background commands: `POST /sandboxes/{id}/exec` with `"background": true` answers 202
//! at once; then `GET /sandboxes/{id}/exec` (the list), `GET /sandboxes/{id}/exec/{exec_id}`
//! (status and output so far), `GET …/logs` (replay, and with `follow=true` live output until
//! the end), `POST …/stdin`, `POST …/signal` and `DELETE …` (kill a running command, forget a
//! finished one). Another sandbox's exec id is not found.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::exec::{event_response, signal_number, start, ExecRequest, ExecResult};
use super::{audited, ApiJson, ApiPath, AppState, Caller};
use crate::audit::Actor;
use crate::backend::exec::Chunk;
use crate::error::Error;
use crate::exec::events::{Encoder, Format};
use crate::exec::registry::{Job, JobError, Snapshot};
use crate::exec::{Outcome, Status};
use crate::model::Sandbox;

/// How long a followed log may be silent before a `keepalive` event.
const KEEPALIVE: Duration = Duration::from_secs(10);

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/sandboxes/{id}/exec/{exec_id}",
            get(show).delete(kill_or_forget),
        )
        .route("/sandboxes/{id}/exec/{exec_id}/logs", get(logs))
        .route("/sandboxes/{id}/exec/{exec_id}/stdin", post(stdin))
        .route("/sandboxes/{id}/exec/{exec_id}/signal", post(signal))
}

impl From<JobError> for Error {
    fn from(e: JobError) -> Error {
        match e {
            JobError::TooMany(_) => Error::ExecLimit(e.to_string()),
            JobError::NoStdin | JobError::Ended => Error::Conflict(e.to_string()),
        }
    }
}

/// Starts `req` in the background: 202 with its id and `Location`. A command that could not
/// start is final at once: 200 with its result.
pub async fn start_background<H: Send + 'static>(
    state: &AppState,
    sb: Sandbox,
    hold: H,
    exec_id: String,
    req: ExecRequest,
) -> Result<Response, Error> {
    state.execs.admit(&sb.id)?;
    let handle = match start(state, &sb, &exec_id, &req).await? {
        Ok(handle) => handle,
        Err(not_started) => {
            return Ok(Json(ExecResult::new(exec_id, sb.id, not_started)).into_response())
        }
    };
    let job = state.execs.spawn(
        exec_id,
        sb.id.clone(),
        req.summary,
        handle,
        req.stdin,
        req.stdin_open,
        req.limits,
        hold,
    );
    let location = format!("/sandboxes/{}/exec/{}", sb.id, job.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(view(&job.snapshot(), true)),
    )
        .into_response())
}

/// A background command as JSON: the exec result's shape, `status` `running` while it runs
/// and `killed` when `DELETE` ended it.
fn view(s: &Snapshot, output: bool) -> Value {
    let f = s.finished.clone();
    let outcome = Outcome {
        status: f.as_ref().map_or(Status::Exited, |f| f.status),
        exit_code: f.as_ref().and_then(|f| f.exit_code),
        signal: f.as_ref().and_then(|f| f.signal),
        timed_out: f.as_ref().is_some_and(|f| f.timed_out),
        stdout: s.stdout.clone(),
        stderr: s.stderr.clone(),
        duration: f.as_ref().map_or(s.running_for, |f| f.duration),
        start_error: f.as_ref().and_then(|f| f.start_error.clone()),
    };
    let mut result = ExecResult::new(s.exec_id.clone(), s.sandbox_id.clone(), outcome);
    result.status = match &f {
        None => "running",
        Some(f) if f.killed => "killed",
        Some(f) => f.status.as_str(),
    };
    let mut v = serde_json::to_value(result).unwrap_or_default();
    if let Some(fields) = v.as_object_mut() {
        fields.insert("command".into(), Value::String(s.command.clone()));
        fields.insert(
            "started_at".into(),
            Value::String(
                s.started_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            ),
        );
        if !output {
            for k in ["stdout", "stderr", "encoding"] {
                fields.remove(k);
            }
        }
    }
    v
}

/// The job `exec_id` of sandbox `id`, if the caller may see the sandbox.
async fn job(
    state: &AppState,
    caller: &Caller,
    id: &str,
    exec_id: &str,
) -> Result<std::sync::Arc<Job>, Error> {
    caller.sandbox(state, id).await?;
    state
        .execs
        .get(id, exec_id)
        .ok_or_else(|| Error::ExecNotFound(exec_id.to_string()))
}

/// `GET /sandboxes/{id}/exec`: the sandbox's kept background commands, without output.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, Error> {
    caller.sandbox(&state, &id).await?;
    let execs: Vec<Value> = state
        .execs
        .list(&id)
        .iter()
        .map(|j| view(&j.snapshot(), false))
        .collect();
    Ok(Json(
        serde_json::json!({"count": execs.len(), "execs": execs}),
    ))
}

#[derive(Debug, Deserialize)]
struct ShowQuery {
    output: Option<bool>,
}

async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, exec_id)): ApiPath<(String, String)>,
    super::ApiQuery(q): super::ApiQuery<ShowQuery>,
) -> Result<Json<Value>, Error> {
    let job = job(&state, &caller, &id, &exec_id).await?;
    Ok(Json(view(&job.snapshot(), q.output.unwrap_or(true))))
}

async fn kill_or_forget(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath((id, exec_id)): ApiPath<(String, String)>,
) -> Result<Response, Error> {
    let job = job(&state, &caller, &id, &exec_id).await?;
    if job.running() {
        audited(&state, &actor, "sandbox.exec.kill", Some(&id), Ok(()))?;
        job.kill().await;
        return Ok(Json(view(&job.snapshot(), true)).into_response());
    }
    state.execs.forget(&id, &exec_id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    signal: Option<Value>,
}

async fn signal(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath((id, exec_id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<SignalBody>,
) -> Result<Json<Value>, Error> {
    let job = job(&state, &caller, &id, &exec_id).await?;
    let Some(number) = body.signal.as_ref().and_then(signal_number) else {
        return Err(Error::Validation(
            "signal must be a signal name (\"SIGINT\") or number (2)".into(),
        ));
    };
    let sent = job.signal(number).await.map_err(Error::from);
    audited(&state, &actor, "sandbox.exec.signal", Some(&id), sent)?;
    Ok(Json(
        serde_json::json!({"exec_id": exec_id, "signal": number, "sent": true}),
    ))
}

#[derive(Debug, Deserialize)]
struct StdinQuery {
    eof: Option<bool>,
}

/// `POST …/stdin`: the body's bytes (`application/octet-stream`) go to the command's stdin;
/// `?eof=true` closes it after them.
async fn stdin(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, exec_id)): ApiPath<(String, String)>,
    super::ApiQuery(q): super::ApiQuery<StdinQuery>,
    body: Body,
) -> Result<StatusCode, Error> {
    let job = job(&state, &caller, &id, &exec_id).await?;
    let limit = state.config.api_body_limit;
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| Error::PayloadTooLarge(limit))?;
    if !bytes.is_empty() {
        job.write_stdin(Some(bytes)).await?;
    }
    if q.eof.unwrap_or(false) {
        job.write_stdin(None).await?;
    }
    state.routes.touch(&id);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct LogsQuery {
    follow: Option<bool>,
    stdout_offset: Option<u64>,
    stderr_offset: Option<u64>,
}

/// `GET …/logs`: the output kept from the offsets on, as events (NDJSON, or SSE when asked),
/// a `truncated` event for what is no longer kept, and `exit` once the command has ended;
/// with `follow=true`, live output until then.
async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, exec_id)): ApiPath<(String, String)>,
    super::ApiQuery(q): super::ApiQuery<LogsQuery>,
    headers: http::HeaderMap,
) -> Result<Response, Error> {
    let job = job(&state, &caller, &id, &exec_id).await?;
    let format = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_accept)
        .unwrap_or(Format::Ndjson);
    let follow = q.follow.unwrap_or(false);
    let mut enc = Encoder::new(format);
    enc.resume(q.stdout_offset.unwrap_or(0), q.stderr_offset.unwrap_or(0));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut changed = job.subscribe();
        loop {
            let (pieces, finished) = job.since(enc.consumed());
            let mut events = Vec::new();
            for (stream, at, bytes) in pieces {
                events.extend(enc.skip_to(stream, at));
                let chunk = match stream {
                    0 => Chunk::Stdout(bytes.into()),
                    _ => Chunk::Stderr(bytes.into()),
                };
                events.extend(enc.chunk(chunk));
            }
            if finished.is_some() {
                events.extend(enc.flush());
                events.push(enc.event("exit", exit_fields(&job.snapshot())));
            }
            for e in events {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            if finished.is_some() || !follow {
                return;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                () = tokio::time::sleep(KEEPALIVE) => {
                    if tx.send(enc.event("keepalive", serde_json::json!({}))).await.is_err() {
                        return;
                    }
                }
                () = tx.closed() => return,
            }
        }
    });
    Ok(event_response(rx, format))
}

/// The `exit` event of a followed log: the result without its output.
fn exit_fields(s: &Snapshot) -> Value {
    let mut v = view(s, false);
    if let Some(fields) = v.as_object_mut() {
        fields.remove("command");
    }
    v
}
