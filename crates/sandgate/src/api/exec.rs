//! `POST /sandboxes/{id}/exec`: runs one command in a sandbox and answers its result, 200
//! whatever the command did (a failed command is a result, not an HTTP error), as one JSON
//! document or, when `Accept` asks for `application/x-ndjson` or `text/event-stream`, as
//! events while it runs. Team-scoped
//! like every sandbox route, woken like a proxied request, and counted as use for the idle
//! reaper while the command runs.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{audited, ApiJson, ApiPath, AppState, Caller};
use crate::audit::Actor;
use crate::backend::exec::ExecHandle;
use crate::backend::exec::{ExecError, ExecSpec};
use crate::error::Error;
use crate::exec::events::{Encoder, Format};
use crate::exec::{self, Encoding, Outcome, RunLimits, StartError};
use crate::model::{Mode, Sandbox, Status as SandboxStatus};
use crate::routes::{Counted, Entry, InUse, Use};
use futures_util::StreamExt;
use std::sync::Arc;

/// Largest shell command, and largest environment value.
const MAX_COMMAND: usize = 64 * 1024;
/// Largest argv, all arguments together.
const MAX_ARGV: usize = 256 * 1024;
const MAX_ENV: usize = 256;
/// Default per-stream output cap of one exec.
const DEFAULT_MAX_OUTPUT: usize = 1024 * 1024;
/// How much of a command an audit record keeps.
const AUDIT_COMMAND: usize = 256;

pub fn router() -> Router<AppState> {
    Router::new().route(
        "/sandboxes/{id}/exec",
        post(exec_http).get(super::exec_jobs::list),
    )
}

/// The body of `POST /sandboxes/{id}/exec`. Unknown fields are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// A shell command, run as `/bin/sh -c command`.
    pub command: Option<String>,
    /// A program and its arguments, run without a shell.
    pub argv: Option<Vec<String>>,
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Text given to the command on stdin (then EOF).
    pub stdin: Option<String>,
    /// Bytes given on stdin, base64.
    pub stdin_base64: Option<String>,
    pub timeout_ms: Option<u64>,
    /// Per stream.
    pub max_output_bytes: Option<usize>,
    /// Answer 202 at once and keep the command running (`GET …/exec/{exec_id}` and friends).
    #[serde(default)]
    pub background: bool,
    /// Background only: keep stdin open for `POST …/exec/{exec_id}/stdin`.
    #[serde(default)]
    pub stdin_open: bool,
}

/// A checked exec request, whichever entry point it came from.
pub struct ExecRequest {
    pub background: bool,
    pub stdin_open: bool,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub stdin: Option<Bytes>,
    pub limits: RunLimits,
    /// What the audit log records (the command, cut).
    pub summary: String,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Validation(msg.into())
}

fn no_nul(what: &str, s: &str) -> Result<(), Error> {
    if s.contains('\0') {
        return Err(invalid(format!("{what} must not contain NUL")));
    }
    Ok(())
}

impl ExecBody {
    pub fn check(self, state: &AppState) -> Result<ExecRequest, Error> {
        let argv = match (self.command, self.argv) {
            (Some(c), None) => {
                if c.trim().is_empty() || c.len() > MAX_COMMAND {
                    return Err(invalid(format!(
                        "command must be non-empty and at most {MAX_COMMAND} bytes"
                    )));
                }
                no_nul("command", &c)?;
                vec!["/bin/sh".to_string(), "-c".to_string(), c]
            }
            (None, Some(argv)) => {
                if argv.first().is_none_or(|p| p.is_empty())
                    || argv.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_ARGV
                {
                    return Err(invalid(format!(
                        "argv must name a program and be at most {MAX_ARGV} bytes in all"
                    )));
                }
                for a in &argv {
                    no_nul("argv", a)?;
                }
                argv
            }
            _ => {
                return Err(invalid(
                    "give exactly one of command (a shell command) or argv",
                ))
            }
        };
        if let Some(cwd) = &self.cwd {
            if cwd.is_empty() || cwd.len() > 4096 {
                return Err(invalid("cwd must be a path of 1 to 4096 bytes"));
            }
            no_nul("cwd", cwd)?;
        }
        check_env(&self.env)?;
        let stdin = match (self.stdin, self.stdin_base64) {
            (Some(_), Some(_)) => return Err(invalid("give stdin or stdin_base64, not both")),
            (Some(text), None) => Some(Bytes::from(text)),
            (None, Some(b64)) => {
                use base64::Engine;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| invalid(format!("stdin_base64 is not base64: {e}")))?;
                Some(Bytes::from(bytes))
            }
            (None, None) => None,
        };
        if self.stdin_open && !self.background {
            return Err(invalid("stdin_open needs background: true"));
        }
        let limits = run_limits(state, self.timeout_ms, self.max_output_bytes)?;
        let summary = summarize(&argv);
        Ok(ExecRequest {
            background: self.background,
            stdin_open: self.stdin_open,
            argv,
            env: self.env,
            cwd: self.cwd,
            stdin,
            limits,
            summary,
        })
    }
}

/// The limits of one run: the request's, within the gateway's.
pub fn run_limits(
    state: &AppState,
    timeout_ms: Option<u64>,
    max_output: Option<usize>,
) -> Result<RunLimits, Error> {
    let c = &state.config;
    let max_ms = c.exec_max_timeout.as_millis() as u64;
    let timeout = match timeout_ms {
        None => c.exec_timeout,
        Some(ms) if (1..=max_ms).contains(&ms) => Duration::from_millis(ms),
        Some(_) => {
            return Err(invalid(format!(
                "timeout_ms must be from 1 to {max_ms} (the gateway's exec_max_timeout)"
            )))
        }
    };
    let max_output = match max_output {
        None => DEFAULT_MAX_OUTPUT.min(c.exec_max_output_bytes),
        Some(n) if (1..=c.exec_max_output_bytes).contains(&n) => n,
        Some(_) => {
            return Err(invalid(format!(
                "max_output_bytes must be from 1 to {} (the gateway's exec_max_output_bytes)",
                c.exec_max_output_bytes
            )))
        }
    };
    Ok(RunLimits {
        timeout,
        max_output,
        kill_grace: c.exec_kill_grace,
    })
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), Error> {
    if env.len() > MAX_ENV {
        return Err(invalid(format!("at most {MAX_ENV} environment variables")));
    }
    for (k, v) in env {
        if !crate::manager::valid_env_key(k) || v.contains('\0') || v.len() > MAX_COMMAND {
            return Err(invalid(format!("invalid environment variable {k:?}")));
        }
        // A command may point PORT elsewhere, but not drop the mark that finds its processes.
        if k.starts_with("SANDGATE_") {
            return Err(invalid(format!(
                "environment variable {k} is the gateway's to set (SANDGATE_*)"
            )));
        }
    }
    Ok(())
}

/// The command as the audit log shows it.
fn summarize(argv: &[String]) -> String {
    let text = match argv {
        [sh, c, cmd] if sh == "/bin/sh" && c == "-c" => cmd.clone(),
        _ => argv.join(" "),
    };
    let mut end = text.len().min(AUDIT_COMMAND);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// A running sandbox to run commands in, held in use (the idle reaper spares it) until the
/// guard drops. A stopped persistent sandbox is started first, as a proxied request would.
pub async fn acquire(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<(Sandbox, InUse, Arc<Entry>), Error> {
    // The route table has every sandbox's current record: a running one needs no store read.
    let mut sb = match state.routes.get(id) {
        Some(e) if e.status == SandboxStatus::Running && caller.0.sees(&e.team) => {
            Sandbox::clone(&e)
        }
        _ => caller.sandbox(state, id).await?,
    };
    match sb.status {
        SandboxStatus::Running => {}
        SandboxStatus::Stopped if sb.mode == Mode::Persistent => {
            tracing::info!(sandbox = %id, "waking for a command");
            sb = tokio::time::timeout(state.config.wake_timeout, state.manager.start(id))
                .await
                .map_err(|_| Error::Starting(id.to_string()))??;
        }
        status => {
            return Err(Error::NotRunning {
                id: id.to_string(),
                status: status.to_string(),
            })
        }
    }
    let entry = state
        .routes
        .get(id)
        .ok_or_else(|| Error::SandboxNotFound(id.to_string()))?;
    let cap = state.rates.max_connections(&sb.team);
    let in_use = entry
        .try_in_use(cap)
        .ok_or_else(|| crate::rates::too_many_connections(cap))?;
    Ok((sb, in_use, entry))
}

/// A fresh exec id: `ex-` and 16 characters of the sandbox-id alphabet.
pub fn new_exec_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::thread_rng();
    let id: String = (0..16)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("ex-{id}")
}

/// Starts `req`'s command in `sb`: its handle, or the outcome of a command that could not
/// start. Errors are the gateway's (the sandbox is not running, the backend failed).
pub async fn start(
    state: &AppState,
    sb: &Sandbox,
    exec_id: &str,
    req: &ExecRequest,
) -> Result<Result<ExecHandle, Outcome>, Error> {
    let spec = ExecSpec {
        argv: req.argv.clone(),
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        stdin: req.stdin.is_some() || req.stdin_open,
        tag: exec_id.to_string(),
    };
    match state.manager.backend().exec(sb, spec).await {
        Ok(handle) => Ok(Ok(handle)),
        Err(ExecError::NotStarted { kind, message }) => Ok(Err(Outcome::not_started(
            kind,
            message,
            req.limits.max_output,
        ))),
        Err(ExecError::NotRunning) => Err(Error::NotRunning {
            id: sb.id.clone(),
            status: "not running".into(),
        }),
        Err(ExecError::Unsupported(kind)) => Err(Error::ExecUnsupported(kind)),
        Err(ExecError::Backend(e)) => Err(Error::internal(e)),
    }
}

/// Starts `req` in `sb` and runs it to its end. A command that cannot start is an outcome.
pub async fn run(
    state: &AppState,
    sb: &Sandbox,
    exec_id: &str,
    req: ExecRequest,
) -> Result<Outcome, Error> {
    Ok(match start(state, sb, exec_id, &req).await? {
        Ok(handle) => exec::run(handle, req.stdin, req.limits, None).await,
        Err(not_started) => not_started,
    })
}

/// How long a streamed exec may be silent before a `keepalive` event.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// Answers with the command's events as they happen (`start`, output, `keepalive`, `exit`).
/// The run lives in a task of its own that ends, killing the command, when the client goes.
async fn stream(
    state: &AppState,
    sb: Sandbox,
    in_use: (InUse, Counted),
    exec_id: String,
    req: ExecRequest,
    format: Format,
) -> Result<Response, Error> {
    let started = start(state, &sb, &exec_id, &req).await?;
    let (body_tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let _in_use = in_use;
        let mut enc = Encoder::new(format);
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let first = enc.event(
            "start",
            serde_json::json!({"exec_id": exec_id, "sandbox_id": sb.id, "time": time}),
        );
        if body_tx.send(first).await.is_err() {
            return;
        }
        let outcome = match started {
            Err(not_started) => not_started,
            Ok(handle) => {
                let (chunk_tx, mut chunk_rx) = tokio::sync::mpsc::channel(8);
                let run = exec::run(handle, req.stdin, req.limits, Some(chunk_tx));
                tokio::pin!(run);
                let outcome = loop {
                    let keepalive = tokio::time::sleep(KEEPALIVE);
                    let event = tokio::select! {
                        biased;
                        // The client is gone: dropping the run kills the command.
                        () = body_tx.closed() => return,
                        Some(chunk) = chunk_rx.recv() => enc.chunk(chunk),
                        outcome = &mut run => break outcome,
                        () = keepalive => Some(enc.event("keepalive", serde_json::json!({}))),
                    };
                    if let Some(event) = event {
                        if body_tx.send(event).await.is_err() {
                            return;
                        }
                    }
                };
                while let Ok(chunk) = chunk_rx.try_recv() {
                    if let Some(event) = enc.chunk(chunk) {
                        let _ = body_tx.send(event).await;
                    }
                }
                outcome
            }
        };
        for event in enc.flush() {
            let _ = body_tx.send(event).await;
        }
        let mut exit =
            serde_json::to_value(ExecResult::new(exec_id, sb.id, outcome)).unwrap_or_default();
        if let Some(fields) = exit.as_object_mut() {
            for k in ["stdout", "stderr", "encoding"] {
                fields.remove(k);
            }
        }
        let _ = body_tx.send(enc.event("exit", exit)).await;
    });
    Ok(event_response(body_rx, format))
}

/// A response streaming the events `rx` receives (each its own body frame), until the sender
/// is done; never buffered by the gateway or a front proxy.
pub fn event_response(mut rx: tokio::sync::mpsc::Receiver<Bytes>, format: Format) -> Response {
    let events = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let body = axum::body::Body::from_stream(events.map(Ok::<_, std::convert::Infallible>));
    (
        [
            (http::header::CONTENT_TYPE, format.content_type()),
            (http::header::CACHE_CONTROL, "no-cache"),
            (http::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        body,
    )
        .into_response()
}

/// A signal by number (`2`) or name (`"SIGINT"`, `"INT"`), if it is one (1 to 64).
pub fn signal_number(v: &serde_json::Value) -> Option<i32> {
    use serde_json::Value;
    match v {
        Value::Number(n) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        Value::String(s) => {
            let name = if s.starts_with("SIG") {
                s.clone()
            } else {
                format!("SIG{s}")
            };
            name.parse::<nix::sys::signal::Signal>()
                .ok()
                .map(|s| s as i32)
        }
        _ => None,
    }
    .filter(|n| (1..=64).contains(n))
}

/// The JSON result of an exec.
#[derive(Debug, Serialize)]
pub struct ExecResult {
    pub exec_id: String,
    pub sandbox_id: String,
    /// `exited`, `signaled`, `timed_out`, `not_started`; background commands also `running`
    /// and `killed`.
    pub status: &'static str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub encoding: Encoding,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub duration_ms: u64,
    pub start_error: Option<StartError>,
}

impl ExecResult {
    pub fn new(exec_id: String, sandbox_id: String, o: Outcome) -> ExecResult {
        let (stdout, stderr, encoding) = exec::render(&o);
        ExecResult {
            exec_id,
            sandbox_id,
            status: o.status.as_str(),
            exit_code: o.exit_code,
            signal: o.signal,
            timed_out: o.timed_out,
            stdout,
            stderr,
            encoding,
            stdout_truncated: o.stdout.truncated(),
            stderr_truncated: o.stderr.truncated(),
            stdout_bytes: o.stdout.total(),
            stderr_bytes: o.stderr.total(),
            duration_ms: o.duration.as_millis() as u64,
            start_error: o.start_error,
        }
    }
}

/// Records the start of an exec in the audit log (the command, cut; never stdin or env
/// values).
pub fn audit_start(state: &AppState, actor: &Actor, id: &str, via: &str, summary: &str) {
    state.audit.record(
        actor,
        "sandbox.exec",
        Some(id),
        "ok",
        Some(format!("via={via} command={summary}")),
    );
}

async fn exec_http(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
    headers: http::HeaderMap,
    ApiJson(body): ApiJson<ExecBody>,
) -> Result<Response, Error> {
    let acquired = acquire(&state, &caller, &id).await;
    let (sb, in_use, entry) = match acquired {
        Ok(a) => a,
        Err(e) => return audited(&state, &actor, "sandbox.exec", Some(&id), Err(e)),
    };
    let req = body.check(&state)?;
    audit_start(&state, &actor, &id, "http", &req.summary);
    let exec_id = new_exec_id();
    let format = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_accept);
    let running = entry.count(Use::Command);
    if req.background {
        return super::exec_jobs::start_background(&state, sb, (in_use, running), exec_id, req)
            .await;
    }
    if let Some(format) = format {
        return stream(&state, sb, (in_use, running), exec_id, req, format).await;
    }
    let outcome = run(&state, &sb, &exec_id, req).await?;
    drop((in_use, running));
    Ok(Json(ExecResult::new(exec_id, sb.id, outcome)).into_response())
}
