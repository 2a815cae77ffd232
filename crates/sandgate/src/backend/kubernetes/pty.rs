//! Terminals in a Sandbox's pod: a `pods/exec` with `tty=true` (stdin and stdout; with a
//! TTY the kubelet merges stderr into stdout), its size sent on the resize channel (4) at once
//! and on every resize, the exit read off the closing `Status`. Closing the exec's stream does
//! not end the process in a real cluster, so kills and signals go, as for commands, through
//! another exec that finds the terminal's processes by their tag ([`super::exec`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, TerminalSize};

use super::exec::{exec_argv, exit_of, PodExecControl, BUFFER};
use crate::backend::exec::{ExecControl, ExecError, ExecSpec, PtyHandle, StartKind, TtySize};

/// Sends a terminal size on the exec's resize channel.
type Resize = Box<dyn Fn(TerminalSize) -> Result<(), String> + Send + Sync>;

fn terminal_size(size: TtySize) -> TerminalSize {
    TerminalSize {
        width: size.cols,
        height: size.rows,
    }
}

/// Starts `spec` on a new terminal of `size` in `pod`.
pub(super) async fn open(
    pods: &Api<Pod>,
    pod: &str,
    container: Option<&str>,
    mut spec: ExecSpec,
    size: TtySize,
) -> Result<PtyHandle, ExecError> {
    if spec.argv.is_empty() {
        return Err(ExecError::not_started(StartKind::Other, "empty argv"));
    }
    spec.env
        .entry("TERM".into())
        .or_insert_with(|| "xterm-256color".into());
    let mut ap = AttachParams::interactive_tty()
        .max_stdin_buf_size(BUFFER)
        .max_stdout_buf_size(BUFFER);
    if let Some(container) = container {
        ap = ap.container(container);
    }
    let mut attached = pods
        .exec(pod, exec_argv(&spec), &ap)
        .await
        .map_err(|e| match e {
            // The Sandbox's pod is gone (suspended, or being replaced).
            kube::Error::Api(status) if status.code == 404 => ExecError::NotRunning,
            e => ExecError::Backend(format!("pod {pod}: {e}")),
        })?;
    let (Some(input), Some(output), Some(sizes)) = (
        attached.stdin(),
        attached.stdout(),
        attached.terminal_size(),
    ) else {
        return Err(ExecError::Backend(
            "the exec has no terminal streams".into(),
        ));
    };
    // Each send goes through a fresh clone: a sender always has room for one message of its
    // own, so a resize is never refused for a full queue.
    let resize: Resize = Box::new(move |s| sizes.clone().try_send(s).map_err(|e| e.to_string()));
    resize(terminal_size(size)).map_err(ExecError::Backend)?;
    Ok(PtyHandle {
        input: Box::new(input),
        output: Box::new(output),
        exit: exit_of(attached),
        control: Arc::new(PodTerminal {
            exec: PodExecControl {
                pods: pods.clone(),
                pod: pod.to_string(),
                tag: spec.tag,
            },
            resize,
        }),
    })
}

struct PodTerminal {
    exec: PodExecControl,
    resize: Resize,
}

#[async_trait]
impl ExecControl for PodTerminal {
    async fn resize(&self, size: TtySize) -> Result<(), ExecError> {
        (self.resize)(terminal_size(size))
            .map_err(|e| ExecError::Backend(format!("resizing the terminal: {e}")))
    }

    async fn signal(&self, signal: i32) -> Result<(), ExecError> {
        self.exec.signal(signal).await
    }

    async fn kill(&self, grace: Duration) {
        self.exec.kill(grace).await
    }
}
