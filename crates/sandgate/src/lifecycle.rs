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

/// How often the health checker looks for work: a sandbox not yet judged since it started is
/// checked every tick, the others every `interval`.
const CHECK_TICK: Duration = Duration::from_millis(250);
/// One check's connect, at most.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks each running sandbox's dev-server port (a connect, at most [`CHECK_TIMEOUT`]) every
/// `interval` (a sandbox not checked since it started: at once), recording the result: `rise`
/// passes in a row make it ready, `fall` failures not ready. Changes are logged. Runs until
/// cancelled.
pub async fn check_health(
    routes: Arc<Routes>,
    backend: Arc<dyn Backend>,
    interval: Duration,
    rise: u32,
    fall: u32,
    shutdown: CancellationToken,
) {
    use futures_util::StreamExt;
    let due_ms = interval.as_millis() as i64;
    loop {
        let due: Vec<_> = routes
            .all()
            .into_iter()
            .filter(|e| e.status == Status::Running && e.dev_server && e.port.is_some())
            // Not yet judged (just started): every tick, so it is ready soon after it listens.
            .filter(|e| {
                let report = e.health_report();
                report.state == Health::Unknown
                    || report.checked_ms_ago.is_none_or(|ago| ago >= due_ms)
            })
            .collect();
        let checks = futures_util::stream::iter(due).for_each_concurrent(64, |entry| {
            let backend = backend.clone();
            async move {
                let Some(upstream) = entry.port.and_then(|p| backend.upstream(&entry, p)) else {
                    return;
                };
                let ok = matches!(
                    tokio::time::timeout(CHECK_TIMEOUT, upstream.dial()).await,
                    Ok(Ok(_))
                );
                if let Some(now) = entry.record_check(ok, rise, fall) {
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
