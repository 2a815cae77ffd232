//! Commands run in a process sandbox. Shared-host: a child of the gateway in the sandbox's
//! working tree, with its clean environment. Isolated: a short-lived thread joins the
//! sandbox's mount, network and PID namespaces (`setns`, the `netns` pattern: the thread dies
//! right after, so nothing leaks to other work) and spawns the command there, so it sees the
//! sandbox's loopback and `/proc` and is a process of the sandbox's PID namespace.
//!
//! Every command leads its own process group and carries a tag ([`EXEC_TAG_VAR`]); a kill
//! signals the group and every process with the tag, so a `setsid` escapee dies too.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio_util::io::ReaderStream;

use super::{group_alive, is_same_process, parse_ref, wait_group_gone, ProcRef, ProcessBackend};
use crate::backend::exec::{
    tagged_processes, Chunk, ExecControl, ExecError, ExecExit, ExecHandle, ExecSpec, StartKind,
    EXEC_TAG_VAR,
};
use crate::model::Sandbox;

/// Read size for a command's pipes.
const READ_CHUNK: usize = 64 * 1024;

impl ProcessBackend {
    pub(super) async fn exec_in(
        &self,
        sb: &Sandbox,
        spec: ExecSpec,
    ) -> Result<ExecHandle, ExecError> {
        let leader = parse_ref(sb)
            .filter(|r| is_same_process(*r))
            .ok_or(ExecError::NotRunning)?;
        let Some(program) = spec.argv.first() else {
            return Err(ExecError::not_started(StartKind::Other, "empty argv"));
        };
        let cwd = self.command_dir(sb, spec.cwd.as_deref());
        let mut env = self.base_env(sb);
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.insert(EXEC_TAG_VAR.into(), spec.tag.clone());
        let mut cmd = tokio::process::Command::new(program);
        if let Some(uid) = leader.uid {
            cmd.uid(uid).gid(uid);
            lead_session(&mut cmd);
        } else {
            // Its own process group (the id the kills use), without the session: see
            // `lead_session` for why only a jailed command needs one.
            cmd.process_group(0);
        }
        cmd.args(&spec.argv[1..])
            .current_dir(&cwd)
            .env_clear()
            .envs(env)
            .stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Kills are explicit (a timeout, a disconnect, `DELETE`): a command outlives the
            // response only when it was started to.
            .kill_on_drop(false);
        let program = program.clone();
        let mut spawn = move || {
            let _gate = super::reaper::spawning();
            let child = cmd.spawn().map_err(|e| {
                ExecError::not_started(StartKind::of(&e), spawn_message(&program, &e))
            })?;
            if let Some(pid) = child.id() {
                super::reaper::own(pid as i32);
            }
            Ok(child)
        };
        let mut child = if self.isolated {
            spawn_inside(leader, cwd, spawn).await?
        } else {
            check_cwd(&cwd)?;
            spawn()?
        };
        let pgid = child
            .id()
            .map(|p| p as i32)
            .ok_or_else(|| ExecError::Backend("the command vanished at once".into()))?;
        let stdout = child.stdout.take().map(|s| {
            ReaderStream::with_capacity(s, READ_CHUNK)
                .map(|r| r.map(Chunk::Stdout))
                .boxed()
        });
        let stderr = child.stderr.take().map(|s| {
            ReaderStream::with_capacity(s, READ_CHUNK)
                .map(|r| r.map(Chunk::Stderr))
                .boxed()
        });
        let output = match (stdout, stderr) {
            (Some(o), Some(e)) => futures_util::stream::select(o, e).boxed(),
            _ => return Err(ExecError::Backend("the command's pipes are missing".into())),
        };
        let stdin = child
            .stdin
            .take()
            .map(|w| Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
        let exit = async move {
            let status = child.wait().await;
            super::reaper::disown(pgid);
            exit_of(status)
        }
        .boxed();
        Ok(ExecHandle {
            stdin,
            output,
            exit,
            control: Arc::new(ProcessExec {
                pgid,
                tag: format!("{EXEC_TAG_VAR}={}", spec.tag).into_bytes(),
            }),
        })
    }
}

/// Makes a jailed command lead a session of its own (and so a process group whose id is its
/// pid). Left in the gateway's session, it would share its controlling terminal when the
/// gateway runs in one, and could open `/dev/tty` to read the operator's keys or push
/// keystrokes into their shell (`TIOCSTI`) for it to run after the gateway exits.
/// `std`'s `setsid` for commands is unstable, and the crate denies `unsafe` otherwise.
///
/// Only jailed commands get it: a `pre_exec` closure makes `std` fork the whole gateway
/// instead of `posix_spawn`ing (a jailed command's uid change forces that anyway), which cost
/// an unjailed exec 0.85 ms of its 1.9 (docs/benchmarks.md); and an unjailed command runs as
/// the gateway's own user (root with `netns`), which reaches the operator's terminal with or
/// without a session of its own.
#[allow(unsafe_code)]
fn lead_session(cmd: &mut tokio::process::Command) {
    // SAFETY: the closure runs in the child between fork and exec and calls only `setsid`,
    // which is async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
}

/// How a waited-for child ended.
pub(super) fn exit_of(status: std::io::Result<std::process::ExitStatus>) -> ExecExit {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => ExecExit::Exited(code),
            (None, Some(sig)) => ExecExit::Signaled(sig),
            _ => ExecExit::Unknown,
        },
        Err(_) => ExecExit::Unknown,
    }
}

pub(super) fn spawn_message(program: &str, e: &std::io::Error) -> String {
    match StartKind::of(e) {
        StartKind::NotFound => format!("{program}: command not found"),
        StartKind::PermissionDenied => format!("{program}: permission denied"),
        _ => format!("{program}: {e}"),
    }
}

/// A missing working directory is told apart from a missing program (both are `ENOENT` from
/// the spawn itself).
pub(super) fn check_cwd(cwd: &Path) -> Result<(), ExecError> {
    if cwd.is_dir() {
        Ok(())
    } else {
        Err(ExecError::not_started(
            StartKind::BadCwd,
            format!("{}: no such directory", cwd.display()),
        ))
    }
}

/// Runs `spawn` (which starts a child) inside the namespaces of the sandbox led by `leader`,
/// after checking that `cwd` exists there. For a jailed sandbox (`leader.uid`), the thread
/// also joins its IPC and UTS namespaces, sets `no_new_privs` and empties its capability
/// bounding set, all inherited by the child (which `spawn` gives the sandbox's uid).
pub(super) async fn spawn_inside<T: Send + 'static>(
    leader: ProcRef,
    cwd: PathBuf,
    spawn: impl FnOnce() -> Result<T, ExecError> + Send + 'static,
) -> Result<T, ExecError> {
    let jailed = leader.uid.is_some();
    let holder = leader.namespaces();
    let open = |ns: &str| std::fs::File::open(format!("/proc/{}/ns/{ns}", holder.pid));
    let namespaces = (open("mnt"), open("net"), open("pid_for_children"));
    let (Ok(mnt), Ok(net), Ok(pid)) = namespaces else {
        return Err(ExecError::NotRunning);
    };
    let extra = if jailed {
        match (open("ipc"), open("uts")) {
            (Ok(ipc), Ok(uts)) => Some((ipc, uts)),
            _ => return Err(ExecError::NotRunning),
        }
    } else {
        None
    };
    // The descriptors now pin the namespaces; make sure they are the sandbox's, not those of
    // a process that reused its pid.
    if !is_same_process(holder) {
        return Err(ExecError::NotRunning);
    }
    let runtime = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("exec-spawn".into())
        .spawn(move || {
            let enter = || -> Result<T, ExecError> {
                let ns_err = |e: nix::Error| ExecError::Backend(format!("setns: {e}"));
                // A thread sharing its filesystem context may not join a mount namespace.
                nix::sched::unshare(CloneFlags::CLONE_FS).map_err(ns_err)?;
                nix::sched::setns(&mnt, CloneFlags::CLONE_NEWNS).map_err(ns_err)?;
                nix::sched::setns(&net, CloneFlags::CLONE_NEWNET).map_err(ns_err)?;
                nix::sched::setns(&pid, CloneFlags::CLONE_NEWPID).map_err(ns_err)?;
                if let Some((ipc, uts)) = &extra {
                    nix::sched::setns(ipc, CloneFlags::CLONE_NEWIPC).map_err(ns_err)?;
                    nix::sched::setns(uts, CloneFlags::CLONE_NEWUTS).map_err(ns_err)?;
                    drop_privileges()?;
                }
                check_cwd(&cwd)?;
                let _runtime = runtime.enter();
                spawn()
            };
            let _ = tx.send(enter());
        })
        .map_err(|e| ExecError::Backend(format!("cannot start the spawner thread: {e}")))?;
    rx.await
        .map_err(|_| ExecError::Backend("the spawner thread vanished".into()))?
}

/// On the spawner thread of a jailed sandbox: nothing the child executes may gain privileges
/// (`no_new_privs`: setuid programs and file capabilities grant nothing), and no capability
/// stays in its bounding set.
fn drop_privileges() -> Result<(), ExecError> {
    use rustix::thread::{remove_capability_from_bounding_set, CapabilitySet};
    let err = |e: rustix::io::Errno| ExecError::Backend(format!("dropping privileges: {e}"));
    rustix::thread::set_no_new_privs(true).map_err(err)?;
    for bit in 0..64 {
        match remove_capability_from_bounding_set(CapabilitySet::from_bits_retain(1 << bit)) {
            // Past the last capability this kernel knows.
            Err(rustix::io::Errno::INVAL) => break,
            other => other.map_err(err)?,
        }
    }
    Ok(())
}

/// Signals one process command: its group, and everything carrying its tag.
pub(super) struct ProcessExec {
    pub(super) pgid: i32,
    /// `SANDGATE_EXEC=<tag>`, as it appears in `/proc/<pid>/environ`.
    pub(super) tag: Vec<u8>,
}

impl ProcessExec {
    fn send(&self, signal: Signal) {
        let group = Pid::from_raw(self.pgid);
        let to_group = group_alive(self.pgid) && killpg(group, signal).is_ok();
        for pid in tagged_processes(&self.tag) {
            let pid = Pid::from_raw(pid);
            // One still in the group got it from killpg: signalled again, a handled signal
            // (a shell's trap) would run twice. Only those that left the group are sent it.
            if to_group && nix::unistd::getpgid(Some(pid)) == Ok(group) {
                continue;
            }
            let _ = kill(pid, signal);
        }
    }
}

#[async_trait]
impl ExecControl for ProcessExec {
    async fn signal(&self, signal: i32) -> Result<(), ExecError> {
        let signal = Signal::try_from(signal)
            .map_err(|_| ExecError::Backend(format!("no signal number {signal}")))?;
        self.send(signal);
        Ok(())
    }

    async fn kill(&self, grace: Duration) {
        self.send(Signal::SIGTERM);
        if !wait_group_gone(self.pgid, grace).await || !tagged_processes(&self.tag).is_empty() {
            self.send(Signal::SIGKILL);
            wait_group_gone(self.pgid, Duration::from_secs(5)).await;
        }
    }
}
