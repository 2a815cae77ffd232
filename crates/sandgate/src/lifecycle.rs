//! Background lifecycle tasks: the idle reaper, which stops persistent sandboxes and deletes
//! ephemeral ones after `idle_timeout` without use (a WebSocket disconnect only makes a
//! sandbox idle; it never destroys it).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::manager::Manager;
use crate::model::Status;
use crate::routes::Routes;

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
