//! The audit log: every control action (create, delete, start, stop, key and token changes,
//! team changes, preview tokens) and every refused credential, recorded with time, team,
//! subject, client address, action, target and result. Each record is a structured log line
//! at once (`target: sandgate::audit`) and a row written by a background task in batches, so
//! recording never waits on the store (the request policy records refusals synchronously).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::store::{AuditRecord, Store};

/// Records waiting for the writer at most; beyond that they are counted as dropped (the log
/// line was still written).
const QUEUE: usize = 10_000;
/// Records written in one transaction at most.
const BATCH: usize = 256;

enum Msg {
    Record(AuditRecord),
    Flush(oneshot::Sender<()>),
}

pub struct Audit {
    tx: mpsc::Sender<Msg>,
    dropped: AtomicU64,
}

/// What an action was done by, for a record.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub team: Option<String>,
    pub subject: Option<String>,
    pub client: Option<String>,
}

impl Audit {
    /// The audit log and its writer task (which ends once the log is dropped).
    pub fn start(store: Arc<dyn Store>) -> Arc<Audit> {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(store, rx));
        Arc::new(Audit {
            tx,
            dropped: AtomicU64::new(0),
        })
    }

    /// Records `action` on `target` by `actor` with `result` (`ok` or an error code).
    pub fn record(
        &self,
        actor: &Actor,
        action: &str,
        target: Option<&str>,
        result: &str,
        details: Option<String>,
    ) {
        let rec = AuditRecord {
            id: 0,
            at: crate::model::now(),
            team: actor.team.clone(),
            subject: actor.subject.clone(),
            client: actor.client.clone(),
            action: action.to_string(),
            target: target.map(str::to_string),
            result: result.to_string(),
            details,
        };
        tracing::info!(
            target: "sandgate::audit",
            action = %rec.action,
            result = %rec.result,
            team = rec.team.as_deref().unwrap_or("-"),
            subject = rec.subject.as_deref().unwrap_or("-"),
            client = rec.client.as_deref().unwrap_or("-"),
            target_id = rec.target.as_deref().unwrap_or("-"),
            details = rec.details.as_deref().unwrap_or(""),
            "audit"
        );
        if self.tx.try_send(Msg::Record(rec)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records not written to the store because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until every record queued so far is in the store.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
    }
}

async fn write(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Msg>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut waiting = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(r) => batch.push(r),
                Msg::Flush(done) => waiting.push(done),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            if let Err(e) = store.append_audit(&batch).await {
                tracing::error!(error = %e, records = batch.len(), "could not write audit records");
            }
            batch.clear();
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}
