//! `GET /ws/{sandbox_id}`: seed 004's command socket. The client sends text frames
//! `{"command", "request_id"?}`; each command runs like `POST /sandboxes/{id}/exec` (the same
//! engine: timeouts, kills, caps, audit) and its answer is one text frame with exactly seed
//! 004's keys `request_id, command, success, output, error, returncode, timestamp`, sent when
//! it finishes: several commands run at once and answer in completion order. A bad message
//! gets an error frame and the socket stays open. Closing the socket (or losing it: a ping
//! every 20 s, 60 s of silence ends it) kills its running commands; the sandbox keeps
//! running and becomes idle.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::exec::{acquire, audit_start, new_exec_id, run, ExecBody, ExecRequest};
use super::{audited, ApiPath, AppState, Caller};
use crate::audit::Actor;
use crate::auth::Principal;
use crate::error::Error;
use crate::exec::{self, Outcome};
use crate::model::Sandbox;
use crate::routes::Use;

/// Commands one socket may have running at once.
const MAX_IN_FLIGHT: usize = 16;
/// A ping goes out after this long without a frame from the client...
const PING_EVERY: Duration = Duration::from_secs(20);
/// ...and the socket is given up after this long without one.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);

pub fn router() -> Router<AppState> {
    Router::new().route("/ws/{id}", get(socket))
}

/// The `Sec-WebSocket-Key` of a WebSocket opening handshake (RFC 6455 §4.2.1), or why this
/// is not one.
pub(super) fn websocket_key(headers: &HeaderMap) -> Result<&HeaderValue, Error> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return Err(Error::BadRequest(
            "this is a WebSocket endpoint: connect with a WebSocket client (Upgrade: websocket)"
                .into(),
        ));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION) != Some(&HeaderValue::from_static("13")) {
        return Err(Error::BadRequest("Sec-WebSocket-Version must be 13".into()));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| Error::BadRequest("Sec-WebSocket-Key is missing".into()))
}

async fn socket(
    State(state): State<AppState>,
    caller: Caller,
    actor: Actor,
    ApiPath(id): ApiPath<String>,
    mut req: Request,
) -> Result<Response, Error> {
    let accept = derive_accept_key(websocket_key(req.headers())?.as_bytes());
    let (sb, in_use, entry) = match acquire(&state, &caller, &id).await {
        Ok(a) => a,
        Err(e) => return audited(&state, &actor, "sandbox.connect", Some(&id), Err(e)),
    };
    let _ = audited(&state, &actor, "sandbox.connect", Some(&id), Ok(()));
    let on_upgrade = hyper::upgrade::on(&mut req);
    let open = entry.count(Use::Socket);
    let counted = state.metrics.stream(crate::metrics::Stream::Commands);
    let limit = state.config.api_body_limit;
    let session = Session {
        state,
        sandbox: sb,
        principal: caller.0,
        actor,
    };
    tokio::spawn(async move {
        let _held = (in_use, open, counted);
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        session.serve(ws).await;
    });
    switching_protocols(&accept, None)
}

/// The answer that completes a WebSocket handshake, selecting `protocol` if given.
pub(super) fn switching_protocols(
    accept: &str,
    protocol: Option<&'static str>,
) -> Result<Response, Error> {
    let mut resp = (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (
                header::SEC_WEBSOCKET_ACCEPT,
                HeaderValue::from_str(accept).map_err(Error::internal)?,
            ),
        ],
    )
        .into_response();
    if let Some(p) = protocol {
        resp.headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    Ok(resp)
}

/// A client's message: `{"command", "request_id"?, "timeout_ms"?}` (other keys ignored).
#[derive(Debug, Deserialize)]
struct Message004 {
    command: Option<Value>,
    request_id: Option<Value>,
    timeout_ms: Option<u64>,
}

struct Session {
    state: AppState,
    sandbox: Sandbox,
    principal: Principal,
    actor: Actor,
}

/// Seed 004's answer frame: exactly its seven keys.
fn frame(
    request_id: &str,
    command: Option<&str>,
    output: String,
    error: String,
    returncode: Option<i32>,
) -> Message {
    let timestamp = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3f")
        .to_string();
    Message::text(
        json!({
            "request_id": request_id,
            "command": command,
            "success": returncode == Some(0),
            "output": output,
            "error": error,
            "returncode": returncode,
            "timestamp": timestamp,
        })
        .to_string(),
    )
}

/// The answer to a command that ran (or could not).
fn answer(request_id: &str, command: &str, o: &Outcome) -> Message {
    let mut error = exec::lossy(&o.stderr);
    if let Some(note) = exec::note(o) {
        error.push_str(&note);
    }
    // Python's `subprocess` convention, which the seed's clients read: -N for signal N.
    let returncode = o.exit_code.or(o.signal.map(|s| -s));
    frame(
        request_id,
        Some(command),
        exec::lossy(&o.stdout),
        error,
        returncode,
    )
}

/// The close frame a socket gets when the gateway shuts down: 1001, going away.
pub(super) fn going_away() -> Message {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    Message::Close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "the gateway is shutting down".into(),
    }))
}

fn generated_id() -> String {
    format!("req-{}", &new_exec_id()[3..])
}

impl Session {
    async fn serve(self, ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>) {
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(MAX_IN_FLIGHT * 2);
        // One writer, so answers never interleave; it pings an idle client.
        let writer = tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => m,
                        None => break,
                    },
                    () = tokio::time::sleep(PING_EVERY) => Message::Ping(Bytes::new()),
                };
                if sink.send(msg).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        // Dropping the set (the socket is gone) aborts its runs, which kills their commands.
        let mut running: JoinSet<()> = JoinSet::new();
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(SILENCE_LIMIT, stream.next()) => next,
                Some(_) = running.join_next(), if !running.is_empty() => continue,
                () = self.state.stopping.cancelled() => {
                    let _ = tx.send(going_away()).await;
                    break;
                }
            };
            let msg = match next {
                Ok(Some(Ok(msg))) => msg,
                // Closed, broken or silent for too long.
                _ => break,
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(_) => break,
                Message::Binary(_) => {
                    let reply = frame(
                        &generated_id(),
                        None,
                        String::new(),
                        "binary frames are not commands: send a JSON text frame".into(),
                        None,
                    );
                    if tx.send(reply).await.is_err() {
                        break;
                    }
                    continue;
                }
                _ => continue, // ping, pong: the silence timer is reset
            };
            if let Some(reply) = self.command(text.as_str(), &mut running, &tx) {
                if tx.send(reply).await.is_err() {
                    break;
                }
            }
        }
        running.abort_all();
        while running.join_next().await.is_some() {}
        drop(tx);
        let _ = writer.await;
    }

    /// Starts the command in `text`, or returns the error frame answering it.
    fn command(
        &self,
        text: &str,
        running: &mut JoinSet<()>,
        tx: &tokio::sync::mpsc::Sender<Message>,
    ) -> Option<Message> {
        let msg: Message004 = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => {
                return Some(frame(
                    &generated_id(),
                    None,
                    String::new(),
                    format!(
                    "invalid message: {e}; send {{\"command\": \"...\", \"request_id\": \"...\"}}"
                ),
                    None,
                ))
            }
        };
        let request_id = match &msg.request_id {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => generated_id(),
        };
        let command = match &msg.command {
            Some(Value::String(c)) => c.clone(),
            _ => {
                return Some(frame(
                    &request_id,
                    None,
                    String::new(),
                    "invalid message: \"command\" (a string) is required".into(),
                    None,
                ))
            }
        };
        let refuse =
            |why: String| Some(frame(&request_id, Some(&command), String::new(), why, None));
        if running.len() >= MAX_IN_FLIGHT {
            return refuse(format!(
                "{MAX_IN_FLIGHT} commands are running on this socket already; wait for one"
            ));
        }
        // Every command spends a token of the credential's rate limit, as a request would.
        if let Err(e) = self
            .state
            .rates
            .take_key(&self.principal.team, &self.principal.subject)
        {
            return refuse(e.to_string());
        }
        let req: ExecRequest = match (ExecBody {
            command: Some(command.clone()),
            timeout_ms: msg.timeout_ms,
            ..Default::default()
        })
        .check(&self.state)
        {
            Ok(r) => r,
            Err(e) => return refuse(e.to_string()),
        };
        audit_start(
            &self.state,
            &self.actor,
            &self.sandbox.id,
            "ws",
            &req.summary,
        );
        let (state, sandbox, tx) = (self.state.clone(), self.sandbox.clone(), tx.clone());
        running.spawn(async move {
            let _running = state.routes.get(&sandbox.id).map(|e| e.count(Use::Command));
            let reply = match run(&state, &sandbox, &new_exec_id(), req).await {
                Ok(outcome) => answer(&request_id, &command, &outcome),
                Err(e) => frame(
                    &request_id,
                    Some(&command),
                    String::new(),
                    e.to_string(),
                    None,
                ),
            };
            let _ = tx.send(reply).await;
        });
        None
    }
}
