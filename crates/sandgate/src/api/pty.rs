//! `GET /sandboxes/{id}/pty`: an interactive terminal over a WebSocket. Binary frames carry
//! the terminal's bytes both ways; text frames carry JSON control messages: from the client
//! `{"type":"resize","cols","rows"}`, `{"type":"signal","signal":"SIGINT"}`,
//! `{"type":"ping"}`; from the gateway first `{"type":"hello","session","offset"}` (`offset`:
//! the position of the next output byte), then `{"type":"replay_truncated","requested",
//! "available_from"}` when a reconnect asked for output no longer kept, `{"type":"exit",
//! "exit_code","signal"}` and `{"type":"pong"}`. The session outlives the socket
//! (`crate::exec::terminals`): `?session=<id>&since=<bytes received>` re-attaches and
//! replays what was missed.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::exec::{acquire, new_exec_id, signal_number};
use super::ws::{switching_protocols, websocket_key};
use super::{audited, ApiPath, AppState, Caller};
use crate::audit::Actor;
use crate::backend::exec::{ExecError, ExecExit, ExecSpec, TtySize};
use crate::error::Error;
use crate::exec::terminals::Terminal;
use crate::routes::Use;

/// The shell a terminal runs: bash when the sandbox has it, else sh.
const SHELL: &str = "if command -v bash >/dev/null 2>&1; then exec bash -i; else exec sh -i; fi";
/// A ping goes out after this long without a frame from the client, and the socket is given
/// up (the session detached) after `SILENCE_LIMIT`.
const PING_EVERY: Duration = Duration::from_secs(20);
const SILENCE_LIMIT: Duration = Duration::from_secs(60);

pub fn router() -> Router<AppState> {
    Router::new().route("/sandboxes/{id}/pty", get(open))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PtyQuery {
    cols: Option<u16>,
    rows: Option<u16>,
    /// Re-attach this session.
    session: Option<String>,
    /// Output bytes already received (replay from there).
    since: Option<u64>,
}

fn size(q: &PtyQuery) -> Result<TtySize, Error> {
    let (cols, rows) = (q.cols.unwrap_or(80), q.rows.unwrap_or(24));
    if !(1..=1000).contains(&cols) || !(1..=1000).contains(&rows) {
        return Err(Error::Validation(
            "cols and rows must be from 1 to 1000".into(),
        ));
    }
    Ok(TtySize { cols, rows })
}

fn backend_error(id: &str, e: ExecError) -> Error {
    match e {
        ExecError::NotRunning => Error::NotRunning {
            id: id.to_string(),
            status: "not running".into(),
        },
        ExecError::Unsupported(what) => Error::ExecUnsupported(what),
        ExecError::NotStarted { message, .. } => Error::StartFailed(message),
        ExecError::Backend(e) => Error::internal(e),
    }
}

async fn open(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
    super::ApiQuery(q): super::ApiQuery<PtyQuery>,
    mut req: Request,
) -> Result<Response, Error> {
    let accept = derive_accept_key(websocket_key(req.headers())?.as_bytes());
    let size = size(&q)?;
    let term = match &q.session {
        Some(session) => {
            caller.sandbox(&state, &id).await?;
            state
                .terminals
                .get(&id, session)
                .ok_or_else(|| Error::ExecNotFound(session.clone()))?
        }
        None => {
            let started = start(&state, &caller, &id, size).await;
            audited(&state, &actor, "sandbox.terminal", Some(&id), started)?
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let since = q.since;
    let protocol = chosen_protocol(req.headers());
    let open = state.metrics.stream(crate::metrics::Stream::Terminal);
    tokio::spawn(async move {
        let _open = open;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let config = WebSocketConfig::default().max_message_size(Some(1 << 20));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let owner = term.attach();
        if q.session.is_some() {
            term.resize(size).await;
        }
        show(&term, owner, since, ws, &state.stopping).await;
        state.terminals.detach(&term, owner);
    });
    switching_protocols(&accept, protocol)
}

/// The subprotocol the gateway speaks back, when the client offered it (a browser fails a
/// handshake that offered protocols and got none). A credential offered beside it is never
/// echoed.
fn chosen_protocol(headers: &http::HeaderMap) -> Option<&'static str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "sandgate.v1")
        .then_some("sandgate.v1")
}

/// Starts a new session's shell.
async fn start(
    state: &AppState,
    caller: &Caller,
    id: &str,
    size: TtySize,
) -> Result<Arc<Terminal>, Error> {
    let (sb, in_use, entry) = acquire(state, caller, id).await?;
    if !state.terminals.room(id) {
        return Err(Error::ExecLimit(format!(
            "sandbox {id} has {} terminal sessions already",
            crate::exec::terminals::MAX_PER_SANDBOX
        )));
    }
    let session = format!("pt-{}", &new_exec_id()[3..]);
    let spec = ExecSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), SHELL.into()],
        env: Default::default(),
        cwd: None,
        stdin: true,
        tag: session.clone(),
    };
    let handle = state
        .manager
        .backend()
        .pty(&sb, spec, size)
        .await
        .map_err(|e| backend_error(id, e))?;
    let hold = (in_use, entry.count(Use::Terminal));
    Ok(state.terminals.start(
        session,
        sb.id.clone(),
        handle,
        state.config.exec_kill_grace,
        hold,
    ))
}

/// A control message from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Control {
    Resize { cols: u16, rows: u16 },
    Signal { signal: Value },
    Ping,
}

/// Shows `term` on `ws` until the socket ends, the shell ends, or another socket takes over.
async fn show(
    term: &Terminal,
    owner: u64,
    since: Option<u64>,
    ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    stopping: &tokio_util::sync::CancellationToken,
) {
    let (mut sink, mut stream) = ws.split();
    let mut changed = term.subscribe();
    let (_, _, total) = term.since(u64::MAX);
    let mut cursor = since.unwrap_or(0);
    if cursor > total {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Library(4400),
                reason: "since is past the end of the output".into(),
            })))
            .await;
        return;
    }
    let hello = json!({"type": "hello", "session": term.id, "offset": cursor});
    if sink.send(Message::text(hello.to_string())).await.is_err() {
        return;
    }
    let mut last_heard = tokio::time::Instant::now();
    loop {
        // Output from the cursor on, and the end when it came.
        let (pieces, exit, _) = term.since(cursor);
        for (at, bytes) in pieces {
            if at > cursor {
                let note =
                    json!({"type": "replay_truncated", "requested": cursor, "available_from": at});
                if sink.send(Message::text(note.to_string())).await.is_err() {
                    return;
                }
            }
            cursor = at + bytes.len() as u64;
            if sink
                .send(Message::Binary(Bytes::from(bytes)))
                .await
                .is_err()
            {
                return;
            }
        }
        if let Some(exit) = exit {
            let (code, signal) = match exit {
                ExecExit::Exited(c) => (Some(c), None),
                ExecExit::Signaled(s) => (None, Some(s)),
                _ => (None, None),
            };
            let end = json!({"type": "exit", "exit_code": code, "signal": signal});
            let _ = sink.send(Message::text(end.to_string())).await;
            let _ = sink.close().await;
            return;
        }
        if term.owner() != owner {
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Library(4001),
                    reason: "taken over".into(),
                })))
                .await;
            return;
        }
        tokio::select! {
            () = stopping.cancelled() => {
                let _ = sink.send(super::ws::going_away()).await;
                return;
            }
            r = changed.changed() => if r.is_err() { return },
            msg = stream.next() => {
                last_heard = tokio::time::Instant::now();
                match msg {
                    Some(Ok(Message::Binary(b))) => {
                        if !term.write(b).await {
                            return;
                        }
                    }
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(t.as_str()) {
                        Ok(Control::Resize { cols, rows }) if cols > 0 && rows > 0 => {
                            term.resize(TtySize { cols, rows }).await;
                        }
                        Ok(Control::Signal { signal }) => {
                            if let Some(n) = signal_number(&signal) {
                                term.signal(n).await;
                            }
                        }
                        Ok(Control::Ping) => {
                            let pong = Message::text(r#"{"type":"pong"}"#);
                            if sink.send(pong).await.is_err() {
                                return;
                            }
                        }
                        // Typed text from a client that sends keystrokes as text frames.
                        _ if !t.starts_with('{')
                            && !term.write(Bytes::copy_from_slice(t.as_bytes())).await =>
                        {
                            return;
                        }
                        _ => {}
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
            () = tokio::time::sleep(PING_EVERY) => {
                if last_heard.elapsed() >= SILENCE_LIMIT
                    || sink.send(Message::Ping(Bytes::new())).await.is_err()
                {
                    return;
                }
            }
        }
    }
}
