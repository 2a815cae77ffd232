//! What only a shared (PostgreSQL) store does: follows the other gateways' writes
//! (`LISTEN sandgate`, a full resync on every (re)connect and every [`RESYNC`]) and holds the
//! lease on background duties (a session-level advisory lock on a connection of its own: it
//! is released when that connection closes, so a gateway that dies hands it on).

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Change, Follow};

/// The notification channel every write is announced on.
pub const CHANNEL: &str = "sandgate";

/// The advisory lock whose holder runs the background duties (idle reaper, reconcile).
const LEASE: i64 = 0x5a6e_6761_7465_0002;

/// How often a follower re-reads everything even without a notification (the safety net
/// for a notification lost some other way).
pub const RESYNC: Duration = Duration::from_secs(30);

/// How often the lease is tried for, and its connection checked once held.
const LEASE_POLL: Duration = Duration::from_secs(1);

/// Starts following `pool`'s database until `shutdown`, having tried for the lease once (so
/// `leader` says at once whether this gateway starts as the holder).
pub async fn follow(pool: PgPool, shutdown: CancellationToken) -> Follow {
    let (changes_tx, changes) = mpsc::unbounded_channel();
    tokio::spawn(listen(pool.clone(), changes_tx, shutdown.clone()));
    let mut conn = pool.acquire().await.ok().map(|c| c.detach());
    let holds = match conn.as_mut() {
        Some(c) => try_lease(c).await,
        None => None,
    };
    if holds.is_none() {
        conn = None;
    }
    let holds = holds.unwrap_or(false);
    if holds {
        tracing::info!("store: this gateway holds the lease on background duties");
    }
    let (leader_tx, leader) = watch::channel(holds);
    tokio::spawn(hold_lease(pool, conn, leader_tx, shutdown));
    Follow { changes, leader }
}

/// Tries for the lease on `conn`: `None` if the connection failed.
async fn try_lease(conn: &mut sqlx::PgConnection) -> Option<bool> {
    let tried = sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(LEASE)
        .fetch_one(&mut *conn);
    match tokio::time::timeout(LEASE_POLL * 2, tried).await {
        Ok(Ok(got)) => Some(got),
        _ => None,
    }
}

async fn listen(pool: PgPool, out: mpsc::UnboundedSender<Change>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "store: cannot listen for changes; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "store: LISTEN failed; retrying");
            continue;
        }
        backoff = Duration::from_millis(100);
        // Anything written before LISTEN took effect is picked up by this resync.
        if out.send(Change::Resync).is_err() {
            return;
        }
        let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = resync.tick() => {
                    if out.send(Change::Resync).is_err() {
                        return;
                    }
                }
                got = listener.try_recv() => match got {
                    Ok(Some(n)) => match Change::parse(n.payload()) {
                        Some(change) => {
                            if out.send(change).is_err() {
                                return;
                            }
                        }
                        None => tracing::warn!(payload = n.payload(), "store: unknown change"),
                    },
                    // The connection was lost (notifications with it): start again.
                    Ok(None) | Err(_) => {
                        tracing::warn!("store: change listener lost its connection");
                        break;
                    }
                },
            }
        }
    }
}

/// Tries for the lease every [`LEASE_POLL`] on a connection of its own; once held, checks
/// that connection as often, and reports (on `leader`) whether this gateway holds it.
async fn hold_lease(
    pool: PgPool,
    mut conn: Option<sqlx::PgConnection>,
    leader: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(LEASE_POLL) => {}
        }
        let was = *leader.borrow();
        let holds = match conn.as_mut() {
            None => false,
            // Held: the lock lasts as long as the session.
            Some(c) if was => ping(c).await,
            Some(c) => match try_lease(c).await {
                Some(got) => got,
                None => {
                    conn = None;
                    false
                }
            },
        };
        if was && !holds {
            // Lost (the server restarted, the connection broke): never keep that session.
            conn = None;
        }
        if holds != was {
            tracing::info!(leader = holds, "store: background-duty lease changed hands");
            leader.send_replace(holds);
        }
        if conn.is_none() {
            match pool.acquire().await {
                Ok(c) => conn = Some(c.detach()),
                Err(e) => tracing::warn!(error = %e, "store: cannot try for the lease"),
            }
        }
    }
    leader.send_replace(false);
    if let Some(c) = conn {
        let _ = sqlx::Connection::close(c).await;
    }
}

/// Whether the lease's connection still answers (a lost session lost the lock with it).
async fn ping(conn: &mut sqlx::PgConnection) -> bool {
    let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut *conn);
    matches!(tokio::time::timeout(LEASE_POLL * 2, ping).await, Ok(Ok(1)))
}
