//! Background lifecycle tasks: the idle reaper, which stops persistent sandboxes and deletes
//! ephemeral ones after `idle_timeout` without use (a WebSocket disconnect only makes a
//! sandbox idle; it never destroys it), the health checker, which connects to each
//! running sandbox's dev-server port and records whether it answers, and, on a store shared
//! by several gateways, the follower, which applies the others' changes to this gateway's
//! route and key tables and runs reconcile when this gateway takes the lease on background
//! duties (the reaper runs only while it holds it).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::backend::Backend;
use crate::manager::Manager;
use crate::model::Status;
use crate::routes::{Health, Routes};
use crate::store::Change;

/// The idle timeout of a sandbox: its own (`Some(0)`: never), else the gateway's.
fn timeout_of(own: Option<u64>, default: Option<Duration>) -> Option<Duration> {
    match own {
        Some(0) => None,
        Some(secs) => Some(Duration::from_secs(secs)),
        None => default,
    }
}

/// How often the reaper looks: a quarter of the shortest idle timeout in force, between
/// 100 ms and 5 s (at most 5 s: a sandbox whose own timeout was just shortened is seen soon).
fn reap_period(routes: &Routes, default: Option<Duration>) -> Duration {
    let shortest = routes
        .all()
        .iter()
        .filter_map(|e| timeout_of(e.idle_timeout, default))
        .min()
        .unwrap_or(Duration::from_secs(120));
    (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
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
        let period = reap_period(&routes, default);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        // On a shared store one gateway reaps: the holder of the lease.
        if !manager.leads() {
            continue;
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

/// How often the lease holder of a shared store looks for sandboxes that ended unreported.
pub const SWEEP_ENDED: Duration = Duration::from_secs(5);

/// On a shared store: while this gateway holds the lease, every [`SWEEP_ENDED`] it looks for
/// running sandboxes whose process or container ended with nobody watching
/// ([`Manager::sweep_ended`]: a dead follower's), until cancelled.
pub async fn sweep_ended(manager: Arc<Manager>, shutdown: CancellationToken) {
    let mut suspects = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(SWEEP_ENDED);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !manager.leads() {
            suspects.clear();
            continue;
        }
        if let Err(e) = manager.sweep_ended(&mut suspects).await {
            tracing::warn!(error = %e, "looking for sandboxes that ended unreported");
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

/// How often a gateway that does not hold the lease checks whether to report use.
const USE_TICK: Duration = Duration::from_millis(100);

/// On a shared store: applies each change another gateway announces (and this one's own,
/// harmlessly) to the route table or the key table, re-reads everything on a resync, and
/// runs reconcile each time this gateway takes the lease. While another gateway holds the
/// lease, it also reports the sandboxes used through this one as often as the reaper looks,
/// so that gateway's reaper counts that use too. Runs until `changes` closes or `shutdown`.
pub async fn follow_store(
    manager: Arc<Manager>,
    auth: Arc<Auth>,
    routes: Arc<Routes>,
    idle_default: Option<Duration>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
    shutdown: CancellationToken,
) {
    let mut leader = manager.leader();
    // Whoever held the lease at start has reconciled already.
    leader.borrow_and_update();
    // Checked every [`USE_TICK`] (a sandbox whose timeout is short is seen within one),
    // reported as often as the reaper looks.
    let mut tick = tokio::time::interval(USE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let period = reap_period(&routes, idle_default);
                if manager.leads() || reported.elapsed() < period {
                    continue;
                }
                reported = tokio::time::Instant::now();
                // Used since the last report (with slack for the tick's own lateness), or
                // in use right now (a long response, a WebSocket).
                let recent = (period + USE_TICK).as_millis() as i64;
                let used: Vec<String> = routes
                    .all()
                    .into_iter()
                    .filter(|e| e.busy() || e.idle_ms() < recent)
                    .map(|e| e.id.clone())
                    .collect();
                if !used.is_empty() {
                    if let Err(e) = manager.store().announce_use(&used).await {
                        tracing::warn!(error = %e, "could not report sandbox use to the store");
                    }
                }
            }
            taken = leader.changed() => {
                if taken.is_err() {
                    // The lease's task ended (shutting down): nothing more to take.
                    shutdown.cancelled().await;
                    return;
                }
                if *leader.borrow_and_update() {
                    tracing::info!("took the lease on background duties: reconciling");
                    if let Err(e) = manager.reconcile().await {
                        tracing::warn!(error = %e, "reconcile after taking the lease failed");
                    }
                }
            }
            change = changes.recv() => {
                let Some(change) = change else { return };
                let applied = match &change {
                    Change::Sandbox(id) => manager.refresh_route(id).await,
                    Change::Key(_) => auth.resync_keys().await.map_err(Into::into),
                    Change::Team(_) => auth.resync_teams().await.map_err(Into::into),
                    // Only the reaper's gateway counts it: a follower touching its own entries
                    // would report them again, its own echo keeping them alive for ever.
                    Change::Used(ids) => {
                        if manager.leads() {
                            ids.iter().for_each(|id| routes.touch(id));
                        }
                        Ok(())
                    }
                    Change::Resync => {
                        let keys = auth.resync_keys().await;
                        let teams = auth.resync_teams().await;
                        manager
                            .resync_routes()
                            .await
                            .and(keys.map_err(Into::into))
                            .and(teams.map_err(Into::into))
                    }
                };
                if let Err(e) = applied {
                    tracing::warn!(?change, error = %e, "could not apply a change from the store");
                }
            }
        }
    }
}
