//! Running one command inside a sandbox: the seam every backend implements (processes enter
//! the sandbox's namespaces, Docker uses the Engine's exec API, Kubernetes will use
//! `pods/exec`). A backend starts the command and hands back its output, exit and a control
//! to signal or kill it; timeouts, capture and rendering live above it (`crate::exec`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

/// Environment variable naming the exec on every process it starts: it is inherited by every
/// descendant, so processes that left the exec's process group (`setsid`, double fork) are
/// still found and killed with it.
pub const EXEC_TAG_VAR: &str = "SANDGATE_EXEC";

/// What to run.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// The program and its arguments (`["/bin/sh", "-c", command]` for a shell command).
    pub argv: Vec<String>,
    /// Added to the sandbox's own environment (these win).
    pub env: BTreeMap<String, String>,
    /// Working directory: `None` is the sandbox's working tree; a relative path is under it;
    /// an absolute one is as the sandbox sees it.
    pub cwd: Option<String>,
    /// Whether the command gets a pipe on stdin (else `/dev/null`).
    pub stdin: bool,
    /// Unique per exec, exported as [`EXEC_TAG_VAR`].
    pub tag: String,
}

/// A piece of output, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// How the command's leader ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecExit {
    Exited(i32),
    Signaled(i32),
    /// It never ran (an engine that reports start failures only once started).
    NotStarted {
        kind: StartKind,
        message: String,
    },
    /// The backend could not tell (its engine lost track of it).
    Unknown,
}

/// Why a command could not start (it never ran: no exit code exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// The program does not exist in the sandbox.
    NotFound,
    /// It exists but may not be executed.
    PermissionDenied,
    /// The working directory does not exist or is not a directory.
    BadCwd,
    Other,
}

impl StartKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::NotFound => "not_found",
            StartKind::PermissionDenied => "permission_denied",
            StartKind::BadCwd => "bad_cwd",
            StartKind::Other => "other",
        }
    }

    /// The kind an `exec` failure's OS error stands for.
    pub fn of(e: &std::io::Error) -> StartKind {
        match e.kind() {
            std::io::ErrorKind::NotFound => StartKind::NotFound,
            std::io::ErrorKind::PermissionDenied => StartKind::PermissionDenied,
            _ => StartKind::Other,
        }
    }
}

impl fmt::Display for StartKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The sandbox has no running process or container to run the command in.
    #[error("the sandbox is not running")]
    NotRunning,
    /// The command could not be started; this is an outcome, not a gateway failure.
    #[error("the command could not start ({kind}): {message}")]
    NotStarted { kind: StartKind, message: String },
    /// This backend cannot run commands.
    #[error("the {0} backend cannot run commands")]
    Unsupported(&'static str),
    #[error("{0}")]
    Backend(String),
}

impl ExecError {
    pub fn not_started(kind: StartKind, message: impl Into<String>) -> ExecError {
        ExecError::NotStarted {
            kind,
            message: message.into(),
        }
    }
}

/// A terminal's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

/// A shell started on a terminal: its input and output are the terminal's (no separate
/// stderr).
pub struct PtyHandle {
    pub input: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    pub output: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    pub exit: BoxFuture<'static, ExecExit>,
    pub control: std::sync::Arc<dyn ExecControl>,
}

/// Signals and kills a running command: always its whole process group and everything
/// carrying its tag, never only the leader.
#[async_trait]
pub trait ExecControl: Send + Sync {
    /// Changes the size of the command's terminal (the kernel tells it with SIGWINCH).
    async fn resize(&self, size: TtySize) -> Result<(), ExecError> {
        let _ = size;
        Err(ExecError::Backend("this command has no terminal".into()))
    }
    /// Sends `signal` (a number, e.g. 2 for SIGINT) to the command's processes.
    async fn signal(&self, signal: i32) -> Result<(), ExecError>;
    /// SIGTERM, up to `grace` for everything to end, then SIGKILL; returns once nothing of
    /// the command is left (or the backend cannot tell).
    async fn kill(&self, grace: Duration);
}

/// A started command.
pub struct ExecHandle {
    /// The command's stdin when the spec asked for one; shutting it down is EOF.
    pub stdin: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    /// Stdout and stderr as read, in order per stream; ends once both reached EOF.
    pub output: BoxStream<'static, std::io::Result<Chunk>>,
    /// Resolves when the leader has ended (its output may still be arriving).
    pub exit: BoxFuture<'static, ExecExit>,
    pub control: std::sync::Arc<dyn ExecControl>,
}

/// Live processes (as this gateway's `/proc` shows them) whose environment holds `tag`
/// (`SANDGATE_EXEC=<tag>`) as one whole entry.
pub fn tagged_processes(tag: &[u8]) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|entry| entry == tag))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_process_by_its_tag_only_as_a_whole_entry() {
        let tag = format!("{EXEC_TAG_VAR}=unit-{}", std::process::id());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(EXEC_TAG_VAR, tag.split('=').nth(1).unwrap())
            .env("OTHER", &tag)
            .spawn()
            .unwrap();
        // Until the child has `exec`ed, its environment is still the parent's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let found = loop {
            let found = tagged_processes(tag.as_bytes());
            if !found.is_empty() || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(found, vec![child.id() as i32]);
        assert!(tagged_processes(format!("{tag}x").as_bytes()).is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(tagged_processes(tag.as_bytes()).is_empty());
    }
}
