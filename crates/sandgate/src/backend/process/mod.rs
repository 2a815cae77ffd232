//! Local-process backend: each sandbox is a supervised child process group with its own working
//! directory and log file under the data directory, listening on its allocated port (`PORT`).
//!
//! With the privilege to do so (root with CAP_SYS_ADMIN, and `unshare` and `ip` installed),
//! each sandbox runs in its own network, PID and mount namespaces (`isolation = netns`): it
//! listens on its own `127.0.0.1:PORT` (default 3000), two sandboxes may bind the same port,
//! and the proxy connects from inside the namespace, so a sandbox can reach neither another
//! sandbox nor the host's services through it. Without the privilege (`shared-host`), each
//! sandbox listens on an allocated host port.
//!
//! Children run in their own process group with stdout/stderr written straight to a file, so
//! they outlive a crashed gateway undisturbed; the restarted gateway re-adopts them (verified by
//! pid and kernel start time, so a recycled pid is never mistaken for a sandbox).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

mod exec;
mod logs;
mod pty;
pub mod reaper;

use super::exec::{tagged_processes, ExecError, ExecHandle, ExecSpec};
use super::{Backend, BackendError, Exit, LogStream, Started};
use crate::model::Sandbox;
use crate::runtimes::Runtime;

const LOG_FILE: &str = "sandbox.log";
const WORK_DIR: &str = "work";

/// The handle stored in `backend_ref`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct ProcRef {
    pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    start: u64,
}

/// Dev-server port of an isolated sandbox when the create names none.
pub const ISOLATED_DEFAULT_PORT: u16 = 3000;

/// PID 1 of an isolated sandbox: brings loopback up, runs the command (`$1`), and passes
/// SIGTERM on to everything in the namespace (the kernel would drop a signal to a PID 1
/// without a handler, so a dev server exec'd as PID 1 could never stop gracefully).
const ISOLATE_INIT: &str = r#"ip link set lo up || exit 97
/bin/sh -c "$1" &
child=$!
trap 'kill -TERM -1 2>/dev/null' TERM INT HUP
wait "$child"
status=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
exit "$status""#;

pub struct ProcessBackend {
    root: PathBuf,
    grace: Duration,
    exits: UnboundedSender<Exit>,
    isolated: bool,
}

impl ProcessBackend {
    /// `root` holds one directory per sandbox; exits are reported on `exits`; `isolated`
    /// runs each sandbox in its own namespaces (see [`isolation_available`]).
    pub fn new(
        root: PathBuf,
        grace: Duration,
        exits: UnboundedSender<Exit>,
        isolated: bool,
    ) -> ProcessBackend {
        ProcessBackend {
            root,
            grace,
            exits,
            isolated,
        }
    }

    fn dir(&self, sb: &Sandbox) -> PathBuf {
        self.root.join(&sb.id)
    }
}

/// Whether sandboxes can get namespaces of their own here: the privilege to enter a network
/// namespace, and the `unshare` and `ip` programs.
pub fn isolation_available() -> bool {
    super::netns::available()
        && crate::runtimes::program_installed("unshare")
        && crate::runtimes::program_installed("ip")
}

/// The environment a sandbox starts with: nothing of the gateway's own (no secrets leak).
fn base_env(sb: &Sandbox, work: &Path, isolated: bool) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_string(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
    );
    env.insert("HOME".into(), work.display().to_string());
    env.insert("LANG".into(), "C.UTF-8".into());
    env.insert("SANDBOX_ID".into(), sb.id.clone());
    env.extend(sb.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let port = if isolated { sb.port } else { sb.allocated_port };
    if let Some(port) = port {
        env.insert("PORT".into(), port.to_string());
        env.insert("HOST".into(), "127.0.0.1".into());
    }
    env
}

/// Kernel start time of `pid`, or `None` if it does not exist.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // `rest` starts at field 3 (state); the start time is field 22.
    rest.split(' ').nth(19)?.parse().ok()
}

fn is_same_process(r: ProcRef) -> bool {
    start_time(r.pid) == Some(r.start)
}

/// Whether any process of the group led by `pgid` still exists.
fn group_alive(pgid: i32) -> bool {
    killpg(Pid::from_raw(pgid), None).is_ok()
}

fn parse_ref(sb: &Sandbox) -> Option<ProcRef> {
    serde_json::from_str(sb.backend_ref.as_deref()?).ok()
}

async fn wait_group_gone(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(5);
    while group_alive(pgid) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    true
}

impl ProcessBackend {
    fn handle(&self, r: ProcRef) -> Started {
        Started {
            backend_ref: serde_json::to_string(&r).ok(),
            ip_address: Some(Ipv4Addr::LOCALHOST.to_string()),
            // The leader (`unshare`) lives in the sandbox's namespace itself.
            netns_pid: self.isolated.then_some(r.pid),
        }
    }
}

#[async_trait]
impl Backend for ProcessBackend {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn isolation(&self) -> &'static str {
        if self.isolated {
            "netns"
        } else {
            "shared-host"
        }
    }

    async fn check_runtime(&self, runtime: &Runtime) -> Result<(), String> {
        if crate::runtimes::program_installed(&runtime.program) {
            Ok(())
        } else {
            Err(format!(
                "runtime {:?} needs the program {:?}, which is not installed on this host",
                runtime.name, runtime.program
            ))
        }
    }

    fn needs_host_port(&self) -> bool {
        !self.isolated
    }

    fn default_port(&self) -> Option<u16> {
        self.isolated.then_some(ISOLATED_DEFAULT_PORT)
    }

    async fn start(&self, sb: &Sandbox) -> Result<Started, BackendError> {
        let dir = self.dir(sb);
        let work = dir.join(WORK_DIR);
        tokio::fs::create_dir_all(&work).await?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG_FILE))?;
        let mut cmd = if self.isolated {
            let mut c = tokio::process::Command::new("unshare");
            c.args(["--net", "--pid", "--mount-proc", "--fork", "--kill-child"])
                .args(["/bin/sh", "-c", ISOLATE_INIT, "sandgate-init"])
                .arg(&sb.command);
            c
        } else {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(&sb.command);
            c
        };
        cmd.current_dir(&work)
            .env_clear()
            .envs(base_env(sb, &work, self.isolated))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        let log_path = dir.join(LOG_FILE);
        // Before the command's first line.
        logs::mark(
            &log_path,
            &format!("starting (generation {})", sb.generation),
        );
        let gate = reaper::spawning();
        let mut child = cmd
            .spawn()
            .map_err(|e| BackendError::Start(format!("cannot start the sandbox process: {e}")))?;
        let pid = child
            .id()
            .ok_or_else(|| BackendError::Start("the process exited at once".into()))?
            as i32;
        reaper::own(pid);
        drop(gate);
        let start = start_time(pid).unwrap_or(0);
        let (id, generation, exits) = (sb.id.clone(), sb.generation, self.exits.clone());
        tokio::spawn(async move {
            let status = child.wait().await;
            reaper::disown(pid);
            use std::os::unix::process::ExitStatusExt;
            let (code, signal) = match status {
                Ok(s) => (s.code(), s.signal()),
                Err(_) => (None, None),
            };
            logs::mark(
                &log_path,
                &match (code, signal) {
                    (Some(c), _) => format!("exited with code {c}"),
                    (None, Some(s)) => format!("ended by signal {s}"),
                    _ => "ended".to_string(),
                },
            );
            let _ = exits.send(Exit {
                id,
                generation,
                code,
                signal,
            });
        });
        Ok(self.handle(ProcRef { pid, start }))
    }

    async fn stop(&self, sb: &Sandbox) -> Result<(), BackendError> {
        // Commands run in a shared-host sandbox lead process groups of their own: they are
        // found by the sandbox id every one of its processes inherits. (An isolated sandbox's
        // commands die with its PID namespace.)
        let own = format!("SANDBOX_ID={}", sb.id).into_bytes();
        let commands = |signal: Signal| {
            if !self.isolated {
                for pid in tagged_processes(&own) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
                }
            }
        };
        let Some(r) = parse_ref(sb) else {
            commands(Signal::SIGKILL);
            return Ok(());
        };
        // The group outlives its leader only if the leader is the process we started.
        if !is_same_process(r) && !group_alive(r.pid) {
            commands(Signal::SIGKILL);
            return Ok(());
        }
        let pgid = Pid::from_raw(r.pid);
        let _ = killpg(pgid, Signal::SIGTERM);
        commands(Signal::SIGTERM);
        if wait_group_gone(r.pid, self.grace).await {
            commands(Signal::SIGKILL);
            return Ok(());
        }
        tracing::warn!(sandbox = %sb.id, "did not stop within the grace period; killing");
        let _ = killpg(pgid, Signal::SIGKILL);
        commands(Signal::SIGKILL);
        if wait_group_gone(r.pid, Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(BackendError::Stop(format!(
                "process group {} survived SIGKILL",
                r.pid
            )))
        }
    }

    async fn remove(&self, sb: &Sandbox) -> Result<(), BackendError> {
        match tokio::fs::remove_dir_all(self.dir(sb)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn adopt(&self, sb: &Sandbox) -> Result<Option<Started>, BackendError> {
        let Some(r) = parse_ref(sb) else {
            return Ok(None);
        };
        if !is_same_process(r) {
            // The leader is gone; make sure nothing of its group lingers.
            if group_alive(r.pid) {
                let _ = killpg(Pid::from_raw(r.pid), Signal::SIGKILL);
            }
            return Ok(None);
        }
        // Not our child any more: watch it by polling until it is gone.
        let (id, generation, exits) = (sb.id.clone(), sb.generation, self.exits.clone());
        tokio::spawn(async move {
            while is_same_process(r) && !exits.is_closed() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let _ = exits.send(Exit {
                id,
                generation,
                code: None,
                signal: None,
            });
        });
        Ok(Some(Started {
            netns_pid: sb.netns_pid,
            ..self.handle(r)
        }))
    }

    async fn logs(&self, sb: &Sandbox, opts: super::LogOptions) -> Result<LogStream, BackendError> {
        logs::stream(self.dir(sb).join(LOG_FILE), opts).await
    }

    async fn exec(&self, sb: &Sandbox, spec: ExecSpec) -> Result<ExecHandle, ExecError> {
        self.exec_in(sb, spec).await
    }

    async fn pty(
        &self,
        sb: &Sandbox,
        spec: ExecSpec,
        size: super::exec::TtySize,
    ) -> Result<super::exec::PtyHandle, ExecError> {
        self.pty_in(sb, spec, size).await
    }

    async fn working_tree(&self, sb: &Sandbox) -> Result<PathBuf, ExecError> {
        Ok(self.dir(sb).join(WORK_DIR))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_reads_our_own_process() {
        let me = std::process::id() as i32;
        let t = start_time(me).expect("own start time");
        assert!(t > 0);
        assert!(is_same_process(ProcRef { pid: me, start: t }));
        assert!(!is_same_process(ProcRef {
            pid: me,
            start: t + 1
        }));
        assert_eq!(start_time(i32::MAX), None);
    }
}
