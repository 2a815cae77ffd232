//! Orphans of shared-host sandboxes. A command's background process (`(server &)`) outlives
//! its parent; the kernel hands it to the nearest "child subreaper" ancestor, else to PID 1,
//! which may never reap it (the gateway is often PID 1 in a container). `sandgate serve` makes
//! the gateway that subreaper ([`enable`]) and reaps what it is handed, never a child of its
//! own: the gateway's children are waited for by tokio (their exit codes are results), and a
//! reaper calling `waitpid(-1)` would steal them. So every spawn registers its child under a
//! read lock ([`spawning`]), and the reaper, holding the write lock, waits only for zombies
//! it finds among the gateway's children that are not registered.
//!
//! An isolated sandbox's orphans go to its own PID 1 (the kernel never hands a process to a
//! subreaper outside its PID namespace), which reaps them.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Held for reading while a child is spawned and registered; for writing while reaping.
static SPAWNING: RwLock<()> = RwLock::new(());
/// The gateway's own children (tokio waits for them).
static OWNED: LazyLock<Mutex<HashSet<i32>>> = LazyLock::new(Default::default);

/// Held across spawning a child and [`own`]ing it.
pub fn spawning() -> RwLockReadGuard<'static, ()> {
    SPAWNING.read().unwrap_or_else(|e| e.into_inner())
}

/// Registers a child the gateway itself spawned (call under [`spawning`]).
pub fn own(pid: i32) {
    OWNED.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
}

/// The child `pid` has been waited for.
pub fn disown(pid: i32) {
    OWNED.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid);
}

/// Makes this process the subreaper of everything it starts, and reaps the orphans it is
/// handed until `shutdown`. Only `sandgate serve` calls this: in a test process the orphans'
/// reaper could take children the test itself waits for.
pub async fn enable(shutdown: tokio_util::sync::CancellationToken) {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper; orphans go to PID 1");
        return;
    }
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).ok();
    loop {
        reap();
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = async {
                match sigchld.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Waits for every zombie child that is not the gateway's own.
fn reap() {
    let _gate = SPAWNING.write().unwrap_or_else(|e| e.into_inner());
    let owned = OWNED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for pid in children() {
        if owned.contains(&pid) || !is_zombie(pid) {
            continue;
        }
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }
}

/// This process's children, from every thread's `children` list.
fn children() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            rest.chars().next()
        })
        == Some('Z')
}
