//! The seeds' own ways to run code, as views of the one exec engine (`api::exec`): seed 002's
//! `POST /api/v1/sandbox/execute` (`run_code`, the code on stdin), and seed 003's
//! `POST /{owner}/{name}/execute` for a sandbox without a dev server of its own (one with a
//! dev server receives that path through the proxy, as any other).

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::exec::{acquire, audit_start, new_exec_id, run, run_limits, ExecRequest, ExecResult};
use super::{audited, ApiJson, ApiPath, AppState, Caller};
use crate::audit::Actor;
use crate::error::Error;
use crate::exec::{self, Outcome, Status};
use crate::routes::Use;

/// Operations of seed 002's `execute`.
const OPERATIONS: &str = "run_code";
/// Languages of `run_code`, as `(names, argv reading the program from stdin)`.
const LANGUAGES: &[(&[&str], &[&str])] = &[
    (&["python", "python3"], &["python3", "-"]),
    (&["javascript", "js", "node"], &["node", "-"]),
    (&["bash"], &["bash", "-s"]),
    (&["sh"], &["/bin/sh", "-s"]),
];
const LANGUAGE_NAMES: &str = "python, python3, javascript, js, node, bash, sh";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/sandbox/execute", post(execute_seed002))
        .route("/{owner}/{name}/execute", post(execute_seed003))
}

/// Seed 002's body: `{"sandbox_id", "operation", "payload": {"code", "language"}}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Execute {
    sandbox_id: Option<String>,
    operation: Option<String>,
    payload: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunCode {
    code: String,
    language: String,
    timeout_ms: Option<u64>,
}

async fn execute_seed002(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiJson(body): ApiJson<Execute>,
) -> Result<Json<Value>, Error> {
    let Some(id) = body.sandbox_id.filter(|s| !s.is_empty()) else {
        return Err(Error::Validation("sandbox_id is required".into()));
    };
    let operation = body.operation.unwrap_or_default();
    if operation != "run_code" {
        return Err(Error::UnsupportedOperation(format!(
            "unsupported operation {operation:?}; supported: {OPERATIONS}"
        )));
    }
    let payload: RunCode =
        serde_json::from_value(body.payload.unwrap_or(Value::Null)).map_err(|e| {
            Error::BadRequest(format!(
                "payload must be {{\"code\": string, \"language\": string}}: {e}"
            ))
        })?;
    let Some((_, argv)) = LANGUAGES
        .iter()
        .find(|(names, _)| names.contains(&payload.language.as_str()))
    else {
        return Err(Error::UnsupportedLanguage(format!(
            "unsupported language {:?}; supported: {LANGUAGE_NAMES}",
            payload.language
        )));
    };
    let (sb, _in_use, entry) = match acquire(&state, &caller, &id).await {
        Ok(a) => a,
        Err(e) => return audited(&state, &actor, "sandbox.exec", Some(&id), Err(e)),
    };
    let req = ExecRequest {
        background: false,
        stdin_open: false,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Default::default(),
        cwd: None,
        summary: format!("run_code {}", payload.language),
        stdin: Some(Bytes::from(payload.code)),
        limits: run_limits(&state, payload.timeout_ms, None)?,
    };
    audit_start(&state, &actor, &id, "seed002", &req.summary);
    let _running = entry.count(Use::Command);
    let exec_id = new_exec_id();
    let outcome = run(&state, &sb, &exec_id, req).await?;
    let success = outcome.status == Status::Exited && outcome.exit_code == Some(0);
    let mut answer =
        serde_json::to_value(ExecResult::new(exec_id, sb.id, outcome)).map_err(Error::internal)?;
    if let Some(fields) = answer.as_object_mut() {
        fields.insert("success".into(), json!(success));
        fields.insert("operation".into(), json!(operation));
        fields.insert("language".into(), json!(payload.language));
    }
    Ok(Json(answer))
}

/// Seed 003's body: `{"command": "ls -la"}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Command {
    command: Option<String>,
    timeout_ms: Option<u64>,
}

async fn execute_seed003(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath((owner, name)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<Command>,
) -> Result<Json<Value>, Error> {
    let path = format!("{owner}/{name}");
    let Some(entry) = state.routes.get_by_path(&owner, &name) else {
        return Err(Error::SandboxNotFound(path));
    };
    if !caller.0.sees(&entry.team) {
        return Err(Error::SandboxNotFound(path));
    }
    let id = entry.id.clone();
    let (sb, _in_use, entry) = match acquire(&state, &caller, &id).await {
        Ok(a) => a,
        Err(e) => return audited(&state, &actor, "sandbox.exec", Some(&id), Err(e)),
    };
    let req = super::exec::ExecBody {
        command: body.command,
        timeout_ms: body.timeout_ms,
        ..Default::default()
    }
    .check(&state)?;
    audit_start(&state, &actor, &id, "seed003", &req.summary);
    let _running = entry.count(Use::Command);
    let outcome = run(&state, &sb, &new_exec_id(), req).await?;
    Ok(Json(plain(&outcome)))
}

/// Seed 003's answer: `{"stdout", "stderr", "exit_code"}`, text (invalid UTF-8 replaced);
/// what has no exit code (a timeout, a signal, a command that never ran) says why on stderr.
fn plain(o: &Outcome) -> Value {
    let mut stderr = exec::lossy(&o.stderr);
    if let Some(note) = exec::note(o) {
        stderr.push_str(&note);
    }
    json!({
        "stdout": exec::lossy(&o.stdout),
        "stderr": stderr,
        "exit_code": o.exit_code,
    })
}
