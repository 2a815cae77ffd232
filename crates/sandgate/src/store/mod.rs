//! Durable sandbox state behind the `Store` trait; SQLite is the embedded default.
//!
//! The store owns port allocation, so a port is never handed out twice, even across restarts:
//! a sandbox's `allocated_port` is unique in the table and released when its row is deleted.

mod sqlite;

use std::ops::RangeInclusive;

use async_trait::async_trait;

use crate::model::Sandbox;

pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    PortsExhausted(String),
    #[error("name {0:?} is taken")]
    NameTaken(String),
    #[error("corrupt record {id}: {message}")]
    Corrupt { id: String, message: String },
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
    /// Writes every mutable field of an existing sandbox.
    async fn update(&self, sandbox: &Sandbox) -> Result<(), StoreError>;
    async fn get(&self, id: &str) -> Result<Option<Sandbox>, StoreError>;
    async fn list(&self) -> Result<Vec<Sandbox>, StoreError>;
    /// Removes the record, releasing its port.
    async fn delete(&self, id: &str) -> Result<(), StoreError>;
    /// Whether the store answers (for health checks).
    async fn ping(&self) -> Result<(), StoreError>;
}
