//! The `Backend` trait: what runs sandboxes (local processes now; Docker and Kubernetes slot in
//! behind the same trait) and how the proxy reaches a sandbox's port.

pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::model::Sandbox;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not start the sandbox: {0}")]
    Start(String),
    #[error("could not stop the sandbox: {0}")]
    Stop(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// What a successful start hands back, to be stored with the sandbox.
#[derive(Debug, Clone, Default)]
pub struct Started {
    /// Backend-owned handle (process: pid and start time; Docker: container id).
    pub backend_ref: Option<String>,
    pub ip_address: Option<String>,
}

/// A sandbox's process or container ended on its own (or was stopped).
#[derive(Debug, Clone)]
pub struct Exit {
    pub id: String,
    pub generation: i64,
    /// Exit code, when known (a re-adopted process has none).
    pub code: Option<i32>,
    /// Terminating signal, when known.
    pub signal: Option<i32>,
}

/// Where the proxy connects for one port of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upstream {
    Tcp(SocketAddr),
}

#[async_trait]
pub trait Backend: Send + Sync {
    /// `process`, `docker`, ...: reported by `/health`.
    fn kind(&self) -> &'static str;
    /// How sandboxes are isolated from each other and the host, for `/health`.
    fn isolation(&self) -> &'static str;
    /// Starts the sandbox's process or container. Must leave nothing behind on error.
    async fn start(&self, sandbox: &Sandbox) -> Result<Started, BackendError>;
    /// Stops it (gracefully, then forcibly). Stopping something already gone is not an error.
    async fn stop(&self, sandbox: &Sandbox) -> Result<(), BackendError>;
    /// Removes everything the sandbox owned (files, containers). Called after `stop`.
    async fn remove(&self, sandbox: &Sandbox) -> Result<(), BackendError>;
    /// After a gateway restart: whether the recorded sandbox still runs; if so the backend
    /// resumes watching it and will report its exit.
    async fn adopt(&self, sandbox: &Sandbox) -> Result<bool, BackendError>;
    /// The socket for `port` (already checked against the sandbox's exposed ports).
    fn upstream(&self, sandbox: &Sandbox, port: u16) -> Option<Upstream>;
    /// The sandbox's captured output, if the backend keeps it in a file.
    fn log_path(&self, sandbox: &Sandbox) -> Option<PathBuf>;
}
