//! Local-process backend: each sandbox is a supervised child process group with its own working
//! directory and log file under the data directory, listening on its allocated port (`PORT`).
//!
//! With the privilege to do so (root with CAP_SYS_ADMIN), each sandbox runs in namespaces of
//! its own: it listens on its own `127.0.0.1:PORT` (default 3000), two sandboxes may bind the
//! same port, and the proxy connects from inside the namespace, so a sandbox can reach neither
//! another sandbox nor the host's services through it. `isolation = sandbox` (bubblewrap and
//! setpriv installed; see [`jail`]) also gives it its own uid and a filesystem view of its
//! own; `netns` (`unshare`) leaves it root on the host's filesystem. Without the privilege
//! (`shared-host`), each sandbox listens on an allocated host port.
//!
//! Children run in their own process group with stdout/stderr written straight to a file, so
//! they outlive a crashed gateway undisturbed; the restarted gateway re-adopts them (verified by
//! pid and kernel start time, so a recycled pid is never mistaken for a sandbox).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

pub mod egress;
mod exec;
pub mod jail;
mod logs;
mod pty;
pub mod reaper;

pub use logs::run_writer as run_log_writer;

use super::exec::{tagged_processes, ExecError, ExecHandle, ExecSpec};
use super::{Backend, BackendError, Exit, LogStream, Started};
use crate::model::{Network, Sandbox};
use crate::runtimes::Runtime;

const LOG_FILE: &str = "sandbox.log";
const WORK_DIR: &str = "work";

/// The handle stored in `backend_ref`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct ProcRef {
    pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    start: u64,
    /// A jailed sandbox's PID 1 (pid, start time), whose namespaces are the sandbox's (the
    /// leader, bubblewrap, stays in the host's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    init: Option<(i32, u64)>,
    /// A jailed sandbox's uid (and gid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
}

impl ProcRef {
    fn new(pid: i32, start: u64) -> ProcRef {
        ProcRef {
            pid,
            start,
            init: None,
            uid: None,
        }
    }

    /// The process whose namespaces are the sandbox's.
    fn namespaces(&self) -> ProcRef {
        match self.init {
            Some((pid, start)) => ProcRef::new(pid, start),
            None => *self,
        }
    }
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

/// PID 1 of a jailed sandbox, run as the sandbox's user: the same duties as [`ISOLATE_INIT`]
/// (bubblewrap brings loopback up), after giving back the standard input bubblewrap closed.
const JAIL_INIT: &str = r#"exec 0</dev/null
trap 'kill -TERM -1 2>/dev/null' TERM INT HUP
if [ "$2" = egress ]; then
  # The gateway links the namespace once this process runs: wait (up to 5 s) for the route.
  n=0
  until awk '$1 == "eth0" && $2 == "00000000" { found = 1 } END { exit !found }' /proc/net/route; do
    n=$((n + 1)); [ "$n" -gt 500 ] && break; sleep 0.01
  done
fi
/bin/sh -c "$1" &
child=$!
wait "$child"
status=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; status=$?; done
exit "$status""#;

/// How far process sandboxes are kept apart.
pub enum ProcessIsolation {
    /// Host network, allocated host ports, the gateway's user.
    SharedHost,
    /// Own namespaces (`unshare`), the gateway's user and filesystem.
    Netns,
    /// Own namespaces, uid and filesystem view (bubblewrap; see [`jail`]), and outbound
    /// network on request (`egress`, when the programs it needs are installed).
    Sandbox {
        jail: Box<jail::Jail>,
        egress: Option<egress::Egress>,
        /// The network of a sandbox whose create names none.
        network: Network,
    },
}

pub struct ProcessBackend {
    root: PathBuf,
    grace: Duration,
    exits: UnboundedSender<Exit>,
    /// Whether each sandbox has namespaces of its own.
    isolated: bool,
    jail: Option<std::sync::Arc<jail::Jail>>,
    egress: Option<std::sync::Arc<egress::Egress>>,
    network: Network,
    /// The program whose `log-writer` subcommand stamps sandbox output (this gateway's own).
    log_writer: Option<PathBuf>,
}

impl ProcessBackend {
    /// `root` holds one directory per sandbox; exits are reported on `exits`.
    pub fn new(
        root: PathBuf,
        grace: Duration,
        exits: UnboundedSender<Exit>,
        isolation: ProcessIsolation,
    ) -> ProcessBackend {
        let (isolated, jail, egress, network) = match isolation {
            ProcessIsolation::SharedHost => (false, None, None, Network::Host),
            ProcessIsolation::Netns => (true, None, None, Network::None),
            ProcessIsolation::Sandbox {
                jail,
                egress,
                network,
            } => (
                true,
                Some(std::sync::Arc::from(jail)),
                egress.map(std::sync::Arc::new),
                network,
            ),
        };
        ProcessBackend {
            root,
            grace,
            exits,
            isolated,
            jail,
            egress,
            network,
            log_writer: None,
        }
    }

    /// Sandbox output goes through `program log-writer` (the gateway's own executable), which
    /// gives each line its time.
    pub fn with_log_writer(mut self, program: PathBuf) -> ProcessBackend {
        self.log_writer = Some(program);
        self
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

impl ProcessBackend {
    /// The environment a sandbox starts with: nothing of the gateway's own (no secrets leak).
    fn base_env(&self, sb: &Sandbox) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let (path, home) = match &self.jail {
            Some(_) => (jail::PATH.to_string(), jail::HOME.to_string()),
            None => (
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
                self.work(sb).display().to_string(),
            ),
        };
        env.insert("PATH".to_string(), path);
        env.insert("HOME".into(), home);
        env.insert("LANG".into(), "C.UTF-8".into());
        env.insert("SANDBOX_ID".into(), sb.id.clone());
        env.extend(sb.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let port = if self.isolated {
            sb.port
        } else {
            sb.allocated_port
        };
        if let Some(port) = port {
            env.insert("PORT".into(), port.to_string());
            env.insert("HOST".into(), "127.0.0.1".into());
        }
        env
    }

    fn work(&self, sb: &Sandbox) -> PathBuf {
        self.dir(sb).join(WORK_DIR)
    }

    /// Where a command's working directory `cwd` (relative to the working tree) is, as the
    /// command sees it.
    fn command_dir(&self, sb: &Sandbox, cwd: Option<&str>) -> PathBuf {
        let base = match &self.jail {
            Some(_) => PathBuf::from(jail::HOME),
            None => self.work(sb),
        };
        cwd.map_or_else(|| base.clone(), |c| base.join(c))
    }
}

/// The sandbox's PID 1 as bubblewrap reports it on its info pipe (`{"child-pid": N, …}`),
/// once it runs as `uid`; `None` if bubblewrap ended (or stalled) before.
async fn read_child_pid(reader: std::fs::File, uid: u32) -> Option<i32> {
    let read = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut text = String::new();
        reader.take(64 * 1024).read_to_string(&mut text).ok()?;
        let info: serde_json::Value = serde_json::from_str(&text).ok()?;
        let pid = info["child-pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())?;
        jail_ready(pid, uid).then_some(pid)
    });
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .ok()?
        .ok()?
}

/// Waits (up to 30 s) until bubblewrap's child `init` runs as `uid`: it switches only after
/// the sandbox's root and mounts are complete, so a command joining its namespaces earlier
/// would see them half built. False if it ends or stalls first.
fn jail_ready(init: i32, uid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pause = Duration::from_micros(200);
    loop {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{init}/status")) else {
            return false;
        };
        let real = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        if real == Some(uid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Kernel start time of `pid`, or `None` if it does not exist.
fn start_time(pid: i32) -> Option<u64> {
    // From field 3 (state) on; the start time is field 22.
    stat_fields(pid)?.split(' ').nth(19)?.parse().ok()
}

/// `/proc/<pid>/stat` from field 3 (the state) on. The command name (field 2) may contain
/// spaces and parentheses: the fields start after the last `)`.
fn stat_fields(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat[stat.rfind(')')? + 2..].to_string())
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

/// Signals every process carrying the sandbox's id (`SANDBOX_ID=<id>` in its environment):
/// what the gateway started for it, wherever it went.
fn kill_tagged(sb: &Sandbox, signal: Signal) {
    let own = format!("SANDBOX_ID={}", sb.id).into_bytes();
    for pid in tagged_processes(&own) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
    }
}

/// Waits until the group led by `pgid` and the jailed sandbox's `init` are gone.
async fn wait_gone(pgid: i32, init: Option<ProcRef>, limit: Duration) -> bool {
    let started = Instant::now();
    if !wait_group_gone(pgid, limit).await {
        return false;
    }
    let Some(init) = init else {
        return true;
    };
    let mut pause = Duration::from_millis(5);
    while is_same_process(init) && !is_zombie(init.pid) {
        if started.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    true
}

/// Whether `pid` has exited and waits to be reaped.
fn is_zombie(pid: i32) -> bool {
    stat_fields(pid).is_some_and(|f| f.starts_with('Z'))
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
    /// Where a sandbox's output goes: the write end of a pipe read by a log writer
    /// (`sandgate log-writer`, in a process group of its own so it outlives a crashed
    /// gateway as the sandbox does), or the log file itself if no writer can be started.
    fn log_writer(
        &self,
        log_path: &std::path::Path,
    ) -> Result<(std::fs::File, Option<tokio::task::JoinHandle<()>>), BackendError> {
        let direct = || -> Result<_, BackendError> {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path)?;
            Ok((file, None))
        };
        let Some(program) = &self.log_writer else {
            return direct();
        };
        let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(std::io::Error::from)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg("log-writer")
            .arg(log_path)
            .env_clear()
            .stdin(Stdio::from(reader))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        let gate = reaper::spawning();
        match cmd.spawn() {
            Ok(mut child) => {
                let pid = child.id().map(|p| p as i32);
                if let Some(pid) = pid {
                    reaper::own(pid);
                }
                drop(gate);
                // Ends when the pipe's last writer closes it (the sandbox, or this start
                // failing before the sandbox ran).
                let done = tokio::spawn(async move {
                    let _ = child.wait().await;
                    if let Some(pid) = pid {
                        reaper::disown(pid);
                    }
                });
                Ok((std::fs::File::from(writer), Some(done)))
            }
            Err(e) => {
                drop(gate);
                tracing::warn!(program = %program.display(), error = %e,
                    "cannot start the log writer; logging without timestamps");
                direct()
            }
        }
    }

    fn handle(&self, r: ProcRef) -> Started {
        Started {
            backend_ref: serde_json::to_string(&r).ok(),
            ip_address: Some(Ipv4Addr::LOCALHOST.to_string()),
            // `unshare` lives in the sandbox's namespace itself; bubblewrap's child does.
            netns_pid: self.isolated.then_some(r.namespaces().pid),
        }
    }
}

#[async_trait]
impl Backend for ProcessBackend {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn isolation(&self) -> &'static str {
        match (&self.jail, self.isolated) {
            (Some(_), _) => "sandbox",
            (None, true) => "netns",
            (None, false) => "shared-host",
        }
    }

    async fn check_runtime(&self, runtime: &Runtime) -> Result<(), String> {
        if let Some(jail) = &self.jail {
            return if jail.program_visible(&runtime.program) {
                Ok(())
            } else {
                Err(format!(
                    "runtime {:?} needs the program {:?}, which sandboxes cannot see: it is \
                     not on their PATH ({}) nor under /usr, /etc, /opt or sandbox_ro_paths",
                    runtime.name,
                    runtime.program,
                    jail::PATH
                ))
            };
        }
        if crate::runtimes::program_installed(&runtime.program) {
            Ok(())
        } else {
            Err(format!(
                "runtime {:?} needs the program {:?}, which is not installed on this host",
                runtime.name, runtime.program
            ))
        }
    }

    fn network(&self, requested: Option<Network>) -> Result<Network, String> {
        match (&self.jail, self.isolated) {
            (None, false) => match requested {
                Some(Network::None) => Err("network \"none\" needs isolation: shared-host \
                                            sandboxes use the host's network"
                    .into()),
                _ => Ok(Network::Host),
            },
            (None, true) => match requested {
                Some(Network::Egress) => {
                    Err("network \"egress\" needs isolation = sandbox (bubblewrap)".into())
                }
                _ => Ok(Network::None),
            },
            (Some(_), _) => match requested.unwrap_or(self.network) {
                Network::Egress if self.egress.is_none() => Err("network \"egress\" needs the \
                     ip and nft programs on the gateway host (apt install iproute2 nftables)"
                    .into()),
                n => Ok(n),
            },
        }
    }

    async fn closed(&self) {
        if let Some(egress) = &self.egress {
            let egress = egress.clone();
            let _ = tokio::task::spawn_blocking(move || egress.remove_firewall()).await;
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
        let log_path = dir.join(LOG_FILE);
        // Before the command's first line.
        logs::mark_first(
            &log_path,
            &format!("starting (generation {})", sb.generation),
        );
        let (output, writer) = self.log_writer(&log_path)?;
        // A jailed sandbox's leader reports the sandbox's PID 1 on this pipe; its uid.
        let mut jailed: Option<(std::fs::File, u32)> = None;
        let mut cmd = if let Some(jail) = &self.jail {
            let (jail, dir, work, id) = (jail.clone(), dir.clone(), work.clone(), sb.id.clone());
            let (u, args) = tokio::task::spawn_blocking(move || {
                let u = jail.uid(&dir)?;
                let etc = dir.join("etc");
                jail.prepare(&etc, &work, &id, u)?;
                let args = jail.bwrap_args(&jail::Layout {
                    work: &work,
                    etc: &etc,
                    hostname: &id,
                    uid: u,
                    init: &["/bin/sh", "-c", JAIL_INIT, "sandgate-init"],
                });
                Ok::<_, std::io::Error>((u, args))
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|prepared| prepared)
            .map_err(|e| BackendError::Start(format!("preparing the sandbox: {e}")))?;
            let (reader, writer) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(std::io::Error::from)?;
            jailed = Some((std::fs::File::from(reader), u));
            let mut c = tokio::process::Command::new("bwrap");
            c.args(args)
                .arg(&sb.command)
                .arg(sb.network.as_str())
                .stdin(Stdio::from(writer));
            c
        } else if self.isolated {
            let mut c = tokio::process::Command::new("unshare");
            c.args(["--net", "--pid", "--mount-proc", "--fork", "--kill-child"])
                .args(["/bin/sh", "-c", ISOLATE_INIT, "sandgate-init"])
                .arg(&sb.command)
                .stdin(Stdio::null());
            c
        } else {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(&sb.command).stdin(Stdio::null());
            c
        };
        cmd.current_dir(&work)
            .env_clear()
            .envs(self.base_env(sb))
            .stdout(output.try_clone()?)
            .stderr(output)
            .process_group(0)
            .kill_on_drop(false);
        let gate = reaper::spawning();
        let spawned = cmd.spawn();
        // The command keeps its copy of the info pipe's write end until it is dropped.
        drop(cmd);
        let mut child = spawned
            .map_err(|e| BackendError::Start(format!("cannot start the sandbox process: {e}")))?;
        let pid = child
            .id()
            .ok_or_else(|| BackendError::Start("the process exited at once".into()))?
            as i32;
        reaper::own(pid);
        drop(gate);
        let mut handle = ProcRef::new(pid, start_time(pid).unwrap_or(0));
        if let Some((reader, u)) = jailed {
            // A jailed start that cannot finish leaves nothing: its init and leader killed.
            let abort = |init: Option<i32>, child: tokio::process::Child, why: String| async move {
                let mut child = child;
                if let Some(init) = init {
                    let _ = nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGKILL);
                }
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                reaper::disown(pid);
                BackendError::Start(why)
            };
            let Some(init) = read_child_pid(reader, u).await else {
                let last = logs::tail_text(&log_path, 5);
                let why = format!("bubblewrap could not set the sandbox up: {last}");
                return Err(abort(None, child, why).await);
            };
            handle.init = Some((init, start_time(init).unwrap_or(0)));
            handle.uid = Some(u);
            if let (Network::Egress, Some(egress)) = (sb.network, &self.egress) {
                let (egress, slot) = (egress.clone(), u - jail::UID_BASE);
                let linked = tokio::task::spawn_blocking(move || egress.attach(init, slot))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                if let Err(e) = linked {
                    let why = format!("cannot give the sandbox its outbound network: {e}");
                    return Err(abort(Some(init), child, why).await);
                }
            }
        }
        let (id, generation, exits) = (sb.id.clone(), sb.generation, self.exits.clone());
        tokio::spawn(async move {
            let status = child.wait().await;
            reaper::disown(pid);
            // The writer ends when every holder of the pipe has; its last lines come before
            // the exit's marker (bounded: an escapee may still hold the pipe).
            if let Some(done) = writer {
                let _ = tokio::time::timeout(Duration::from_secs(2), done).await;
            }
            use std::os::unix::process::ExitStatusExt;
            let (code, signal) = match status {
                Ok(s) => (s.code(), s.signal()),
                Err(_) => (None, None),
            };
            // Read before the marker below is appended.
            let last_output = (code != Some(0))
                .then(|| logs::tail_text(&log_path, 5))
                .filter(|t| !t.is_empty());
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
                last_output,
            });
        });
        Ok(self.handle(handle))
    }

    async fn stop(&self, sb: &Sandbox) -> Result<(), BackendError> {
        let Some(r) = parse_ref(sb) else {
            // No handle: a create the gateway crashed in. Whatever it started carries the
            // sandbox's id.
            kill_tagged(sb, Signal::SIGKILL);
            return Ok(());
        };
        // A jailed sandbox's PID 1 leads a session of its own; the leader (bubblewrap) ends
        // when it does.
        let init = r
            .init
            .map(|(pid, start)| ProcRef::new(pid, start))
            .filter(|i| is_same_process(*i));
        // The group outlives its leader only if the leader is the process we started.
        if !is_same_process(r) && !group_alive(r.pid) && init.is_none() {
            kill_tagged(sb, Signal::SIGKILL);
            return Ok(());
        }
        // Commands run in a shared-host sandbox lead process groups of their own: they are
        // found by the sandbox id every one of its processes inherits. (An isolated sandbox's
        // commands die with its PID namespace.)
        let commands = |signal: Signal| {
            if !self.isolated {
                kill_tagged(sb, signal);
            }
        };
        logs::mark(&self.dir(sb).join(LOG_FILE), "stopping (requested)");
        let send = |signal: Signal| match init {
            // The init passes SIGTERM on to everything in the sandbox.
            Some(i) => {
                let _ = nix::sys::signal::kill(Pid::from_raw(i.pid), signal);
                if signal == Signal::SIGKILL {
                    let _ = killpg(Pid::from_raw(r.pid), signal);
                }
            }
            None => {
                let _ = killpg(Pid::from_raw(r.pid), signal);
            }
        };
        send(Signal::SIGTERM);
        commands(Signal::SIGTERM);
        if wait_gone(r.pid, init, self.grace).await {
            commands(Signal::SIGKILL);
            return Ok(());
        }
        tracing::warn!(sandbox = %sb.id, "did not stop within the grace period; killing");
        send(Signal::SIGKILL);
        commands(Signal::SIGKILL);
        if wait_gone(r.pid, init, Duration::from_secs(5)).await {
            Ok(())
        } else {
            Err(BackendError::Stop(format!(
                "process group {} survived SIGKILL",
                r.pid
            )))
        }
    }

    async fn remove(&self, sb: &Sandbox) -> Result<(), BackendError> {
        let dir = self.dir(sb);
        if let Some(jail) = &self.jail {
            jail.release(&dir);
        }
        let mut attempt = 0;
        loop {
            match tokio::fs::remove_dir_all(&dir).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                // Something still ending (a log line being appended) wrote as it went.
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty && attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
                Ok(()) => return Ok(()),
            }
        }
    }

    async fn adopt(&self, sb: &Sandbox) -> Result<Option<Started>, BackendError> {
        let Some(r) = parse_ref(sb) else {
            return Ok(None);
        };
        if !is_same_process(r) {
            // The leader is gone; make sure nothing of it lingers (a jailed sandbox's init,
            // in a session of its own, included).
            if group_alive(r.pid) {
                let _ = killpg(Pid::from_raw(r.pid), Signal::SIGKILL);
            }
            kill_tagged(sb, Signal::SIGKILL);
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
                last_output: None,
            });
        });
        Ok(Some(Started {
            netns_pid: sb.netns_pid,
            ..self.handle(r)
        }))
    }

    /// Its leader (pid and start time, from the handle) no longer exists.
    async fn ended(&self, sb: &Sandbox) -> bool {
        parse_ref(sb).is_some_and(|r| !is_same_process(r))
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
        Ok(self.work(sb))
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
        assert!(is_same_process(ProcRef::new(me, t)));
        assert!(!is_same_process(ProcRef::new(me, t + 1)));
        assert_eq!(start_time(i32::MAX), None);
    }
}
