//! Terminals in a container: an exec created with `Tty`, started over a connection of our own
//! to the engine that is upgraded (`Upgrade: tcp`) into the raw terminal stream. bollard's
//! `start_exec` is not used here: on a Unix socket its decoder waits for a newline before it
//! hands on terminal output (a prompt would never show) and takes a chunk starting with a byte
//! 0–2 for a multiplexing header. Resizes go through the engine's `resize` call; kills as for
//! any command ([`super::exec`]).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::exec::{CreateExecOptions, ResizeExecOptions};
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

use super::exec::{exit_status, DockerExec};
use super::{container_name, engine_is_local, status_of, DockerBackend, WORK_DIR};
use crate::backend::exec::{
    ExecControl, ExecError, ExecSpec, PtyHandle, StartKind, TtySize, EXEC_TAG_VAR,
};
use crate::model::Sandbox;

impl DockerBackend {
    pub(super) async fn pty_in(
        &self,
        sb: &Sandbox,
        spec: ExecSpec,
        size: TtySize,
    ) -> Result<PtyHandle, ExecError> {
        if spec.argv.is_empty() {
            return Err(ExecError::not_started(StartKind::Other, "empty argv"));
        }
        let Some(socket) = engine_socket() else {
            return Err(ExecError::Unsupported(
                "docker (terminals need the engine's Unix socket)",
            ));
        };
        let container = container_name(&sb.id);
        let cwd = match &spec.cwd {
            None => WORK_DIR.to_string(),
            Some(c) if c.starts_with('/') => c.clone(),
            Some(c) => format!("{WORK_DIR}/{c}"),
        };
        let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.push(format!("{EXEC_TAG_VAR}={}", spec.tag));
        if !spec.env.contains_key("TERM") {
            env.push("TERM=xterm-256color".into());
        }
        let created = self
            .docker
            .create_exec(
                &container,
                CreateExecOptions {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(true),
                    env: Some(env),
                    cmd: Some(spec.argv.clone()),
                    working_dir: Some(cwd),
                    // Not ctrl-p,ctrl-q: a user typing them would be cut off.
                    detach_keys: Some("ctrl-@,ctrl-@,ctrl-@,ctrl-@".into()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| match status_of(&e) {
                Some(404 | 409) => ExecError::NotRunning,
                _ => ExecError::Backend(format!("creating the exec: {e}")),
            })?;
        let version = self.docker.client_version().to_string();
        let stream = hijack(&socket, &version, &created.id, size)
            .await
            .map_err(|e| ExecError::Backend(format!("starting the terminal: {e}")))?;
        let (read, write) = tokio::io::split(TokioIo::new(stream));
        let ended = Arc::new(tokio::sync::Notify::new());
        let sent = Arc::new(AtomicU64::new(0));
        let exit = {
            let (docker, id, sent) = (self.docker.clone(), created.id.clone(), sent.clone());
            let ended = ended.clone();
            async move {
                let first = Arc::new(std::sync::Mutex::new(None));
                exit_status(docker, id, ended, first, sent).await
            }
            .boxed()
        };
        let control = Arc::new(DockerTerminal {
            exec: DockerExec {
                docker: self.docker.clone(),
                container,
                exec_id: created.id.clone(),
                tag: spec.tag,
                local: engine_is_local(),
                sent,
            },
        });
        let _ = control
            .exec
            .docker
            .resize_exec(
                &created.id,
                ResizeExecOptions {
                    height: size.rows,
                    width: size.cols,
                },
            )
            .await;
        Ok(PtyHandle {
            input: Box::new(write),
            output: Box::new(NotifyOnEof {
                inner: read,
                ended: Some(ended),
            }),
            exit,
            control,
        })
    }
}

/// The engine's Unix socket (`DOCKER_HOST=unix://…`, else the default).
fn engine_socket() -> Option<String> {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if !h.is_empty() => h.strip_prefix("unix://").map(str::to_string),
        _ => Some("/var/run/docker.sock".into()),
    }
}

/// `POST /exec/{id}/start` on a connection of its own, upgraded to the raw stream.
async fn hijack(
    socket: &str,
    version: &str,
    exec_id: &str,
    size: TtySize,
) -> Result<hyper::upgrade::Upgraded, String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("{socket}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let body =
        serde_json::json!({"Detach": false, "Tty": true, "ConsoleSize": [size.rows, size.cols]});
    let req = http::Request::post(format!("/v{version}/exec/{exec_id}/start"))
        .header(http::header::HOST, "docker")
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, "tcp")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
        return Err(format!("the engine answered {}", resp.status()));
    }
    hyper::upgrade::on(resp).await.map_err(|e| e.to_string())
}

/// Tells the exit watcher when the terminal's output ends.
struct NotifyOnEof<R> {
    inner: R,
    ended: Option<Arc<tokio::sync::Notify>>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for NotifyOnEof<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let eof = matches!(&polled, std::task::Poll::Ready(Ok(())) if buf.filled().len() == before)
            || matches!(&polled, std::task::Poll::Ready(Err(_)));
        if eof {
            if let Some(n) = self.ended.take() {
                n.notify_one();
            }
        }
        polled
    }
}

struct DockerTerminal {
    exec: DockerExec,
}

#[async_trait]
impl ExecControl for DockerTerminal {
    async fn resize(&self, size: TtySize) -> Result<(), ExecError> {
        self.exec
            .docker
            .resize_exec(
                &self.exec.exec_id,
                ResizeExecOptions {
                    height: size.rows,
                    width: size.cols,
                },
            )
            .await
            .map_err(|e| ExecError::Backend(format!("resizing the terminal: {e}")))
    }

    async fn signal(&self, signal: i32) -> Result<(), ExecError> {
        self.exec.signal(signal).await
    }

    async fn kill(&self, grace: Duration) {
        self.exec.kill(grace).await
    }
}
