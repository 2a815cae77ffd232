//! Background lifecycle tasks: the idle reaper, which stops persistent sandboxes and deletes
//! ephemeral ones after `idle_timeout` without use (a WebSocket disconnect only makes a
//! sandbox idle; it never destroys it), and the health checker, which connects to each
//! running sandbox's dev-server port and records whether it answers.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::manager::Manager;
use crate::model::Status;
use crate::routes::{Health, Routes};

/// The idle timeout of a sandbox: its own (`Some(0)`: never), else the gateway's.
fn timeout_of(own: Option<u64>, default: Option<Duration>) -> Option<Duration> {
    match own {
        Some(0) => None,
        Some(secs) => Some(Duration::from_secs(secs)),
        None => default,
    }
}

/// Checks for idle sandboxes every quarter of the shortest idle timeout in force (between
/// 100 ms and 5 s) until cancelled. `default` is the gateway's `idle_timeout`; a sandbox's
/// own overrides it.
pub async fn reap_idle(
    manager: Arc<Manager>,
    routes: Arc<Routes>,
    default: Option<Duration>,
    shutdown: CancellationToken,
) {
    loop {
        let entries = routes.all();
        let shortest = entries
            .iter()
            .filter_map(|e| timeout_of(e.idle_timeout, default))
            .min()
            .unwrap_or(Duration::from_secs(120));
        // At most 5 s: a sandbox whose own timeout was just shortened is seen soon.
        let period = (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        for entry in routes.all() {
            let Some(idle) = timeout_of(entry.idle_timeout, default) else {
                continue;
            };
            if entry.status != Status::Running
                || entry.busy()
                || entry.idle_ms() < idle.as_millis() as i64
            {
                continue;
            }
            if let Err(e) = manager.reap_if_idle(&entry.id, idle).await {
                tracing::warn!(sandbox = %entry.id, error = %e, "could not reap idle sandbox");
            }
        }
    }
}

/// How long the filler lets a just-claimed sandbox have the machine before starting its
/// replacement.
const REFILL_DELAY: Duration = Duration::from_millis(50);

/// Warm sandboxes started at once, at most.
const PARALLEL_FILLS: usize = 2;

/// Keeps every warm pool at its size: starts a sandbox for a pool that is short (at most
/// [`PARALLEL_FILLS`] at a time), waits for a claim or a loss otherwise, and after a failed
/// start waits out the pool's backoff. On shutdown it lets the starts in flight clean up.
pub async fn keep_warm(manager: Arc<Manager>, shutdown: CancellationToken) {
    let mut fills = tokio::task::JoinSet::new();
    loop {
        // Sandboxes a claim found unfit: removed here, so its create did not wait for it.
        for id in manager.warm().take_condemned() {
            let manager = manager.clone();
            fills.spawn(async move { manager.discard(&id).await });
        }
        while fills.len() < PARALLEL_FILLS && !shutdown.is_cancelled() {
            let Some(runtime) = manager.warm().begin_fill() else {
                break;
            };
            let (manager, cancel) = (manager.clone(), shutdown.clone());
            fills.spawn(async move {
                let result = manager.fill_pool(&runtime, &cancel).await;
                if let Err(e) = &result {
                    if !cancel.is_cancelled() {
                        tracing::warn!(%runtime, error = %e, "could not start a warm sandbox");
                    }
                }
                manager.warm().filled(&runtime, result.is_ok());
            });
        }
        let retry = manager.warm().next_retry();
        tokio::select! {
            _ = shutdown.cancelled() => {
                while fills.join_next().await.is_some() {}
                return;
            }
            Some(_) = fills.join_next(), if !fills.is_empty() => {}
            _ = manager.warm().changed() => {
                // A claim was just made: its sandbox's first requests come now; its
                // replacement's start (a fork, namespaces, a server starting) can wait a
                // moment rather than compete with them for the cores.
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(REFILL_DELAY) => {}
                }
            }
            _ = tokio::time::sleep(retry.unwrap_or(Duration::MAX)), if retry.is_some() => {}
        }
    }
}

/// How often the health checker looks for work: a sandbox not yet judged since it started is
/// checked every tick, the others every `interval`.
const CHECK_TICK: Duration = Duration::from_millis(250);

/// Checks each running sandbox's dev-server port (a connect, at most a second: [`crate::backend::Upstream::probe`]) every
/// `interval` (a sandbox not checked since it started: at once), recording the result: `rise`
/// passes in a row make it ready, `fall` failures not ready. Changes are logged. Runs until
/// cancelled.
pub async fn check_health(
    routes: Arc<Routes>,
    backend: Arc<dyn Backend>,
    interval: Duration,
    rise: u32,
    fall: u32,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    use futures_util::StreamExt;
    let due_ms = interval.as_millis() as i64;
    loop {
        let due: Vec<_> = routes
            .all_instances()
            .into_iter()
            .filter(|e| e.health_checked())
            // Not yet judged (just started): every tick, so it is ready soon after it listens.
            .filter(|e| {
                let report = e.health_report();
                report.state == Health::Unknown
                    || report.checked_ms_ago.is_none_or(|ago| ago >= due_ms)
            })
            .collect();
        let checks = futures_util::stream::iter(due).for_each_concurrent(64, |entry| {
            let backend = backend.clone();
            let metrics = &metrics;
            async move {
                let Some(upstream) = entry.port.and_then(|p| backend.upstream(&entry, p)) else {
                    return;
                };
                let ok = upstream.probe(entry.health_path.as_deref()).await;
                let changed = entry.record_check(ok, rise, fall);
                metrics.health_check(ok, changed.is_some());
                if let Some(now) = changed {
                    tracing::info!(sandbox = %entry.id, health = ?now, "health check changed");
                }
            }
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = checks => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_TICK) => {}
        }
    }
}
