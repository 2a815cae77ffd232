//! Background lifecycle tasks: the idle reaper, which stops persistent sandboxes and deletes
//! ephemeral ones after `idle_timeout` without use (a WebSocket disconnect only makes a
//! sandbox idle; it never destroys it).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::manager::Manager;
use crate::model::Status;
use crate::routes::Routes;

/// Checks for idle sandboxes every quarter of `idle` (between 100 ms and 30 s) until cancelled.
pub async fn reap_idle(
    manager: Arc<Manager>,
    routes: Arc<Routes>,
    idle: Duration,
    shutdown: CancellationToken,
) {
    let period = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    let idle_ms = idle.as_millis() as i64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let due = routes
            .all()
            .into_iter()
            .filter(|e| e.status == Status::Running && !e.busy() && e.idle_ms() >= idle_ms);
        for entry in due {
            if let Err(e) = manager.reap_if_idle(&entry.id, idle).await {
                tracing::warn!(sandbox = %entry.id, error = %e, "could not reap idle sandbox");
            }
        }
    }
}
