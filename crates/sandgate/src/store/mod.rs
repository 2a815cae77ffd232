//! Durable sandbox state behind the `Store` trait; SQLite is the embedded default,
//! PostgreSQL (`DATABASE_URL=postgres://…`) the store replicas share.
//!
//! The store owns port allocation, so a port is never handed out twice, even across restarts
//! and replicas: a sandbox's `allocated_port` is unique in the table and released when its
//! row is deleted.

mod engine;
pub mod pg;
mod sql;

use std::ops::RangeInclusive;

use async_trait::async_trait;

use chrono::{DateTime, Utc};

use crate::model::Sandbox;

pub use engine::Engine;
pub use sql::{is_postgres, SqlStore};

/// A record a gateway changed, as announced to the others on a shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Sandbox(String),
    Key(String),
    Team(String),
    /// Sandboxes used through some gateway lately (so the one running the idle reaper does
    /// not take them for idle): not a record change.
    Used(Vec<String>),
    /// Changes may have been missed (the listener (re)connected, or the periodic safety
    /// net): re-read everything.
    Resync,
}

impl Change {
    /// The `NOTIFY` payload: `<kind>:<id>`.
    pub fn to_payload(&self) -> String {
        match self {
            Change::Sandbox(id) => format!("sandbox:{id}"),
            Change::Key(id) => format!("key:{id}"),
            Change::Team(id) => format!("team:{id}"),
            Change::Used(ids) => format!("used:{}", ids.join(",")),
            Change::Resync => "resync:".into(),
        }
    }

    pub fn parse(payload: &str) -> Option<Change> {
        let (kind, id) = payload.split_once(':')?;
        let id = id.to_string();
        Some(match kind {
            "sandbox" => Change::Sandbox(id),
            "key" => Change::Key(id),
            "team" => Change::Team(id),
            "used" => Change::Used(id.split(',').map(str::to_string).collect()),
            "resync" => Change::Resync,
            _ => return None,
        })
    }
}

/// What a gateway on a shared store follows: the other gateways' changes, and whether it
/// holds the lease on background duties.
pub struct Follow {
    pub changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
    pub leader: tokio::sync::watch::Receiver<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    PortsExhausted(String),
    #[error("name {0:?} is taken")]
    NameTaken(String),
    #[error("team {0:?} already exists")]
    TeamExists(String),
    #[error("corrupt record {id}: {message}")]
    Corrupt { id: String, message: String },
}

/// An API key as stored: never the secret, only its SHA-256 (see `crate::auth::keys`).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    /// The lookup id (the public part of the key).
    pub id: String,
    pub team: String,
    pub name: String,
    /// `owner`, `admin`, `member` or `viewer`.
    pub role: String,
    pub hash: [u8; 32],
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A team: every sandbox, key and audit record belongs to one.
#[derive(Debug, Clone, PartialEq)]
pub struct TeamRecord {
    pub id: String,
    pub created_at: DateTime<Utc>,
}

/// One audit record: who did what to which target, from where, with what result.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Assigned by the store (0 before it is written).
    pub id: i64,
    pub at: DateTime<Utc>,
    pub team: Option<String>,
    /// The key id or token subject.
    pub subject: Option<String>,
    /// The client's address.
    pub client: Option<String>,
    pub action: String,
    /// What the action was on (a sandbox id, a key id, a team).
    pub target: Option<String>,
    /// `ok`, or the error code.
    pub result: String,
    pub details: Option<String>,
}

/// Which audit records to read.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this team's (`None`: every team's).
    pub team: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub action: Option<String>,
    pub target: Option<String>,
    pub limit: u32,
}

/// Decides whether a host port is usable right now (e.g. nothing else is bound to it).
pub type PortProbe<'a> = &'a (dyn Fn(u16) -> bool + Send + Sync);

#[async_trait]
pub trait Store: Send + Sync {
    /// Inserts a new sandbox. With `port_range`, first allocates the next free port of the
    /// range that `probe` accepts, writing it to `sandbox.allocated_port`.
    async fn create(
        &self,
        sandbox: &mut Sandbox,
        port_range: Option<RangeInclusive<u16>>,
        probe: PortProbe<'_>,
    ) -> Result<(), StoreError>;
    /// Writes every mutable field of an existing sandbox (not who it belongs to: see `claim`).
    async fn update(&self, sandbox: &Sandbox) -> Result<(), StoreError>;
    /// Makes a sandbox waiting in a warm pool the one `sandbox` describes (its team, owner,
    /// name, settings, `created_at`; `pool` cleared), only if it still waits: false if it was
    /// claimed or removed meanwhile. A name the owner already uses is `NameTaken`.
    async fn claim(&self, sandbox: &Sandbox) -> Result<bool, StoreError>;
    async fn get(&self, id: &str) -> Result<Option<Sandbox>, StoreError>;
    async fn list(&self) -> Result<Vec<Sandbox>, StoreError>;
    /// Removes the record, releasing its port.
    async fn delete(&self, id: &str) -> Result<(), StoreError>;
    /// Inserts a key; with `replace`, a key of the same id is overwritten (the configured
    /// admin key, re-read at every start).
    async fn put_key(&self, key: &KeyRecord, replace: bool) -> Result<(), StoreError>;
    /// Inserts `key` only if no active key exists, atomically across gateways sharing the
    /// store: whether it was inserted (a first start's owner key).
    async fn put_first_key(&self, key: &KeyRecord) -> Result<bool, StoreError>;
    /// Every key not revoked (expired ones included: they answer "expired", not "unknown").
    async fn keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    /// Marks a key revoked; false if there was no such active key.
    async fn revoke_key(&self, id: &str) -> Result<bool, StoreError>;
    /// Records when keys were last used (written in batches, at most once a minute a key).
    async fn touch_keys(&self, used: &[(String, DateTime<Utc>)]) -> Result<(), StoreError>;
    async fn create_team(&self, id: &str) -> Result<TeamRecord, StoreError>;
    async fn teams(&self) -> Result<Vec<TeamRecord>, StoreError>;
    /// Appends audit records in one transaction.
    async fn append_audit(&self, records: &[AuditRecord]) -> Result<(), StoreError>;
    /// Audit records, oldest first.
    async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError>;
    /// Deletes audit records older than `before`; returns how many.
    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// The named secret, created with `fresh` the first time it is asked for (every gateway
    /// on this store then agrees on it).
    async fn secret(&self, name: &str, fresh: &str) -> Result<String, StoreError>;
    /// Whether the store answers (for health checks).
    async fn ping(&self) -> Result<(), StoreError>;
    /// On a shared store, tells the other gateways these sandboxes were used through this one
    /// lately (see [`Change::Used`]); nothing otherwise.
    async fn announce_use(&self, _ids: &[String]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether other gateways may share this store (they then follow each other's writes).
    fn shared(&self) -> bool {
        false
    }
    /// On a shared store, starts following it until `shutdown`; `None` on a store only this
    /// gateway uses (it then always holds the lease on background duties).
    async fn follow(&self, _shutdown: tokio_util::sync::CancellationToken) -> Option<Follow> {
        None
    }
}
