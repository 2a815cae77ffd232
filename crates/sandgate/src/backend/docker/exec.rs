//! Commands run in a container through the Engine's exec API (`create_exec`, `start_exec`
//! attached, `inspect_exec` for the exit code), never `setns` from the gateway: a command stays
//! inside the container's cgroup, seccomp and capability set. The container's init
//! (`init: true`) reaps its orphans.
//!
//! The exec API has no kill. Every command carries its tag ([`EXEC_TAG_VAR`]); a kill signals
//! the tagged processes through this machine's `/proc` when the engine is local, else through a
//! second exec running a small `sh` sweep inside the container (best effort: it needs `sh`).
//! Docker reports a death by signal `n` as exit code `128 + n`; it is reported as a signal
//! only for a signal the gateway sent itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::Docker;
use futures_util::{FutureExt, StreamExt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::Notify;

use super::{container_name, engine_is_local, is_not_found, status_of, DockerBackend, WORK_DIR};
use crate::backend::exec::{
    tagged_processes, Chunk, ExecControl, ExecError, ExecExit, ExecHandle, ExecSpec, StartKind,
    EXEC_TAG_VAR,
};
use crate::model::Sandbox;

/// What runc prints (as the exec's output, exit code 126 or 127) when it could not start the
/// command: the command never ran.
const OCI_START_FAILED: &str = "OCI runtime exec failed";

impl DockerBackend {
    pub(super) async fn exec_in(
        &self,
        sb: &Sandbox,
        spec: ExecSpec,
    ) -> Result<ExecHandle, ExecError> {
        if spec.argv.is_empty() {
            return Err(ExecError::not_started(StartKind::Other, "empty argv"));
        }
        let container = container_name(&sb.id);
        let cwd = match &spec.cwd {
            None => WORK_DIR.to_string(),
            Some(c) if c.starts_with('/') => c.clone(),
            Some(c) => format!("{WORK_DIR}/{c}"),
        };
        let mut env: BTreeMap<&str, &str> = spec
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.insert(EXEC_TAG_VAR, &spec.tag);
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let created = self
            .docker
            .create_exec(
                &container,
                CreateExecOptions {
                    attach_stdin: Some(spec.stdin),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(false),
                    env: Some(env),
                    cmd: Some(spec.argv.clone()),
                    working_dir: Some(cwd),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| match status_of(&e) {
                Some(404 | 409) => ExecError::NotRunning,
                _ => ExecError::Backend(format!("creating the exec: {e}")),
            })?;
        let started = self
            .docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: Some(64 * 1024),
                }),
            )
            .await
            .map_err(|e| {
                if is_not_found(&e) {
                    ExecError::NotRunning
                } else {
                    ExecError::Backend(format!("starting the exec: {e}"))
                }
            })?;
        let StartExecResults::Attached { output, input } = started else {
            return Err(ExecError::Backend("the engine detached the exec".into()));
        };
        let ended = Arc::new(Notify::new());
        let first = Arc::new(std::sync::Mutex::new(None::<String>));
        let output = {
            let (ended, first) = (ended.clone(), first.clone());
            let mut seen = false;
            output
                .filter_map(move |item| {
                    let chunk = match item {
                        Ok(LogOutput::StdOut { message }) => Some(Ok(Chunk::Stdout(message))),
                        Ok(LogOutput::StdErr { message }) => Some(Ok(Chunk::Stderr(message))),
                        Ok(LogOutput::Console { message }) => Some(Ok(Chunk::Stdout(message))),
                        Ok(LogOutput::StdIn { .. }) => None,
                        Err(e) => Some(Err(std::io::Error::other(e.to_string()))),
                    };
                    if let (false, Some(Ok(Chunk::Stdout(m) | Chunk::Stderr(m)))) = (seen, &chunk) {
                        seen = true;
                        let text = String::from_utf8_lossy(m);
                        if text.starts_with(OCI_START_FAILED) {
                            *first.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(text.trim_end().to_string());
                        }
                    }
                    std::future::ready(chunk)
                })
                .chain(futures_util::stream::poll_fn(move |_| {
                    ended.notify_one();
                    std::task::Poll::Ready(None)
                }))
                .boxed()
        };
        let sent = Arc::new(AtomicU64::new(0));
        let exit = exit_status(
            self.docker.clone(),
            created.id.clone(),
            ended,
            first,
            sent.clone(),
        )
        .boxed();
        let stdin = spec
            .stdin
            .then(|| Box::new(input) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
        Ok(ExecHandle {
            stdin,
            output,
            exit,
            control: Arc::new(DockerExec {
                docker: self.docker.clone(),
                container,
                exec_id: created.id,
                tag: spec.tag,
                local: engine_is_local(),
                sent,
            }),
        })
    }
}

/// Waits for the exec to end (its output ending is the usual sign; the engine is asked again
/// with a backoff in case the output outlives it) and reads its exit code.
pub(super) async fn exit_status(
    docker: Docker,
    exec_id: String,
    ended: Arc<Notify>,
    first: Arc<std::sync::Mutex<Option<String>>>,
    sent: Arc<AtomicU64>,
) -> ExecExit {
    let mut pause = Duration::from_millis(5);
    let mut output_ended = false;
    loop {
        if !output_ended {
            tokio::select! {
                () = ended.notified() => output_ended = true,
                () = tokio::time::sleep(pause) => {}
            }
        } else {
            tokio::time::sleep(pause).await;
        }
        pause = (pause * 2).min(Duration::from_millis(250));
        let Ok(info) = docker.inspect_exec(&exec_id).await else {
            return ExecExit::Unknown;
        };
        if info.running == Some(true) {
            continue;
        }
        let Some(code) = info.exit_code else {
            continue;
        };
        let code = code as i32;
        let started_msg = first.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let (Some(message), 126 | 127) = (started_msg, code) {
            return ExecExit::NotStarted {
                kind: start_kind(&message),
                message,
            };
        }
        let by_us = sent.load(Ordering::Relaxed);
        let signal = code - 128;
        return if (1..64).contains(&signal) && by_us & (1 << signal) != 0 {
            ExecExit::Signaled(signal)
        } else {
            ExecExit::Exited(code)
        };
    }
}

/// The kind of a runc start failure, from its message.
fn start_kind(message: &str) -> StartKind {
    if message.contains("chdir to cwd") {
        StartKind::BadCwd
    } else if message.contains("executable file not found") || message.contains("no such file") {
        StartKind::NotFound
    } else if message.contains("permission denied") {
        StartKind::PermissionDenied
    } else {
        StartKind::Other
    }
}

pub(super) struct DockerExec {
    pub(super) docker: Docker,
    pub(super) container: String,
    pub(super) exec_id: String,
    pub(super) tag: String,
    /// The engine shares this machine's `/proc`.
    pub(super) local: bool,
    /// The signals the gateway sent, one bit each.
    pub(super) sent: Arc<AtomicU64>,
}

impl DockerExec {
    fn entry(&self) -> Vec<u8> {
        format!("{EXEC_TAG_VAR}={}", self.tag).into_bytes()
    }

    async fn running(&self) -> bool {
        matches!(
            self.docker.inspect_exec(&self.exec_id).await,
            Ok(info) if info.running == Some(true)
        )
    }

    /// Sends `signal` to every process carrying the tag; whether any was found.
    async fn send(&self, signal: Signal) -> bool {
        self.sent.fetch_or(1 << (signal as i32), Ordering::Relaxed);
        if self.local {
            let pids = tagged_processes(&self.entry());
            if !pids.is_empty() {
                for pid in &pids {
                    let _ = kill(Pid::from_raw(*pid), signal);
                }
                return true;
            }
            if !self.running().await {
                return false;
            }
        }
        self.sweep_inside(signal as i32).await
    }

    /// Signals the tagged processes from a second exec inside the container.
    async fn sweep_inside(&self, signal: i32) -> bool {
        let script = format!(
            "for p in /proc/[0-9]*; do \
               if tr '\\0' '\\n' < $p/environ 2>/dev/null | grep -qx '{EXEC_TAG_VAR}={tag}'; then \
                 kill -{signal} ${{p#/proc/}} 2>/dev/null; fi; done",
            tag = self.tag
        );
        let Ok(created) = self
            .docker
            .create_exec(
                &self.container,
                CreateExecOptions::<String> {
                    cmd: Some(vec!["/bin/sh".into(), "-c".into(), script]),
                    ..Default::default()
                },
            )
            .await
        else {
            return false;
        };
        self.docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: true,
                    ..Default::default()
                }),
            )
            .await
            .is_ok()
    }

    async fn gone_within(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut pause = Duration::from_millis(5);
        loop {
            let left = if self.local {
                !tagged_processes(&self.entry()).is_empty()
            } else {
                self.running().await
            };
            if !left {
                return true;
            }
            if tokio::time::Instant::now() + pause > deadline {
                return false;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

#[async_trait]
impl ExecControl for DockerExec {
    async fn signal(&self, signal: i32) -> Result<(), ExecError> {
        let signal = Signal::try_from(signal)
            .map_err(|_| ExecError::Backend(format!("no signal number {signal}")))?;
        self.send(signal).await;
        Ok(())
    }

    async fn kill(&self, grace: Duration) {
        if !self.send(Signal::SIGTERM).await {
            return;
        }
        if !self.gone_within(grace).await {
            self.send(Signal::SIGKILL).await;
            self.gone_within(Duration::from_secs(5)).await;
        }
    }
}
