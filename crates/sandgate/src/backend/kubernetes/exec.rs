//! Commands in a Sandbox's pod through the `pods/exec` WebSocket API: the argv that carries
//! the environment, working directory and tag the API cannot, the exit read off the closing
//! `Status`, and signals delivered by another exec that finds the tagged processes.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, AttachedProcess};

use crate::backend::exec::{
    Chunk, ExecControl, ExecError, ExecExit, ExecHandle, ExecSpec, StartKind,
};

/// What an exec's buffers between the WebSocket and its streams hold before they push back
/// (kube's default, 1 KiB, moves commands' and files' bytes a kilobyte at a time).
pub(super) const BUFFER: usize = 64 * 1024;

/// The argv that runs `spec` through the pod exec API, which takes neither environment nor
/// working directory: `env` sets them (the tag included), `sh` changes directory.
pub(super) fn exec_argv(spec: &ExecSpec) -> Vec<String> {
    let mut argv = vec!["env".to_string()];
    argv.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    argv.push(format!(
        "{}={}",
        crate::backend::exec::EXEC_TAG_VAR,
        spec.tag
    ));
    if let Some(cwd) = &spec.cwd {
        argv.extend(["/bin/sh", "-c", "cd -- \"$0\" || exit 127; exec \"$@\""].map(String::from));
        argv.push(cwd.clone());
    }
    argv.extend(spec.argv.iter().cloned());
    argv
}

/// The exec's end: its closing `Status`, read once the message loop has ended (it ends with
/// the status, then closes the output streams; dropping it instead would abort that).
pub(super) fn exit_of(
    mut attached: AttachedProcess,
) -> futures_util::future::BoxFuture<'static, ExecExit> {
    let status = attached.take_status();
    async move {
        let status = match status {
            Some(status) => status.await,
            None => None,
        };
        let _ = attached.join().await;
        exec_exit(status)
    }
    .boxed()
}

/// What the exec API's closing `Status` says about the command.
pub(super) fn exec_exit(
    status: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>,
) -> ExecExit {
    let Some(status) = status else {
        return ExecExit::Unknown;
    };
    if status.status.as_deref() == Some("Success") {
        return ExecExit::Exited(0);
    }
    let code = status
        .details
        .as_ref()
        .and_then(|d| d.causes.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.reason.as_deref() == Some("ExitCode"))
        .and_then(|c| c.message.as_deref()?.parse().ok());
    let message = status.message.unwrap_or_default();
    match code {
        Some(code) => ExecExit::Exited(code),
        None => ExecExit::NotStarted {
            kind: if message.contains("not found") {
                StartKind::NotFound
            } else {
                StartKind::Other
            },
            message,
        },
    }
}

/// Signals an exec's processes: found in the pod by their tag, through another exec.
pub(super) struct PodExecControl {
    pub(super) pods: Api<Pod>,
    pub(super) pod: String,
    pub(super) tag: String,
}

impl PodExecControl {
    async fn send(&self, signal: &str) -> Result<(), ExecError> {
        let needle = format!("{}={}", crate::backend::exec::EXEC_TAG_VAR, self.tag);
        let script = "for p in /proc/[0-9]*; do \
             tr '\\0' '\\n' < \"$p/environ\" 2>/dev/null | grep -qxF \"$1\" && kill -\"$0\" \"${p#/proc/}\"; \
             done; true";
        let argv = ["/bin/sh", "-c", script, signal, needle.as_str()];
        let ap = AttachParams::default().stderr(false);
        let mut attached = self
            .pods
            .exec(&self.pod, argv, &ap)
            .await
            .map_err(|e| ExecError::Backend(format!("pod {}: {e}", self.pod)))?;
        if let Some(status) = attached.take_status() {
            status.await;
        }
        Ok(())
    }
}

#[async_trait]
impl ExecControl for PodExecControl {
    async fn signal(&self, signal: i32) -> Result<(), ExecError> {
        self.send(&signal.to_string()).await
    }

    async fn kill(&self, grace: Duration) {
        let _ = self.send("TERM").await;
        tokio::time::sleep(grace.min(Duration::from_secs(10))).await;
        let _ = self.send("KILL").await;
    }
}

/// Runs `spec` in `pod` (in `container`, else the pod's only one) through `pods/exec`:
/// output, exit and a control that signals the command's processes by their tag.
pub(super) async fn run(
    pods: &Api<Pod>,
    pod: &str,
    container: Option<&str>,
    spec: ExecSpec,
) -> Result<ExecHandle, ExecError> {
    let pod = pod.to_string();
    let mut ap = AttachParams::default()
        .stdin(spec.stdin)
        .max_stdin_buf_size(BUFFER)
        .max_stdout_buf_size(BUFFER)
        .max_stderr_buf_size(BUFFER);
    if let Some(container) = container {
        ap = ap.container(container);
    }
    let mut attached: AttachedProcess = pods
        .exec(&pod, exec_argv(&spec), &ap)
        .await
        .map_err(|e| ExecError::Backend(format!("pod {pod}: {e}")))?;
    let stdin = attached
        .stdin()
        .map(|w| Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
    let read = |r: Option<_>, chunk: fn(bytes::Bytes) -> Chunk| {
        r.map(|r| tokio_util::io::ReaderStream::new(r).map(move |b| b.map(chunk)))
    };
    let stdout = read(attached.stdout(), Chunk::Stdout);
    let stderr = read(attached.stderr(), Chunk::Stderr);
    let output = match (stdout, stderr) {
        (Some(o), Some(e)) => futures_util::stream::select(o, e).boxed(),
        (Some(o), None) => o.boxed(),
        (None, Some(e)) => e.boxed(),
        (None, None) => futures_util::stream::empty().boxed(),
    };
    Ok(ExecHandle {
        stdin,
        output,
        exit: exit_of(attached),
        control: std::sync::Arc::new(PodExecControl {
            pods: pods.clone(),
            pod,
            tag: spec.tag,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn exec_argv_and_exit() {
        let spec = ExecSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), "ls".into()],
            env: [("A".to_string(), "1".to_string())].into(),
            cwd: Some("/work".into()),
            stdin: false,
            tag: "t1".into(),
        };
        let argv = exec_argv(&spec);
        assert_eq!(argv[..3], ["env", "A=1", "SANDGATE_EXEC=t1"]);
        assert_eq!(argv[argv.len() - 4..], ["/work", "/bin/sh", "-c", "ls"]);

        let status = |v: Value| Some(serde_json::from_value(v).expect("a Status"));
        assert_eq!(
            exec_exit(status(json!({"status": "Success"}))),
            ExecExit::Exited(0)
        );
        assert_eq!(
            exec_exit(status(
                json!({"status": "Failure", "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": "7"}]}})
            )),
            ExecExit::Exited(7)
        );
        assert!(matches!(
            exec_exit(status(json!({"status": "Failure",
                "message": "exec: \"nope\": executable file not found in $PATH"}))),
            ExecExit::NotStarted {
                kind: StartKind::NotFound,
                ..
            }
        ));
        assert_eq!(exec_exit(None), ExecExit::Unknown);
    }
}
