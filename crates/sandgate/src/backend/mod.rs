//! The `Backend` trait: what runs sandboxes (local processes, Docker containers, Kubernetes
//! agent-sandbox resources) and how the proxy reaches a sandbox's port.

pub mod docker;
pub mod exec;
pub mod kubernetes;
pub mod netns;
pub mod process;

use std::net::SocketAddr;

use async_trait::async_trait;

use crate::model::{Network, Sandbox};
use crate::runtimes::Runtime;
use exec::{ExecError, ExecHandle, ExecSpec};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("could not start the sandbox: {0}")]
    Start(String),
    #[error("could not stop the sandbox: {0}")]
    Stop(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The backend cannot do this at all (a 501, never a failure of the sandbox).
    #[error("the {backend} backend cannot {operation}")]
    Unsupported {
        backend: &'static str,
        /// What was asked, as a verb phrase: `stream logs`.
        operation: &'static str,
    },
}

/// The cluster Service in front of a sandbox (kubernetes backend), for seed 003's listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    pub name: String,
    pub namespace: String,
}

/// How the files API reaches a sandbox's working tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilesAt {
    /// A path on this host (opened and confined by `crate::files`).
    Host(std::path::PathBuf),
    /// Only through commands [`Backend::exec`] runs, relative to the directory they start in
    /// (a pod elsewhere: `crate::exec_files`).
    Exec,
}

/// A sandbox's output, streamed.
pub type LogStream = futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>;

/// What part of a sandbox's output to stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogOptions {
    /// Keep streaming what it writes from now on, until the reader leaves.
    pub follow: bool,
    /// Only the last this many lines of what it wrote so far.
    pub tail: Option<usize>,
    /// Prefix each line with the time it was written (where the backend records it).
    pub timestamps: bool,
}

/// What a successful start hands back, to be stored with the sandbox.
#[derive(Debug, Clone, Default)]
pub struct Started {
    /// Backend-owned handle (process: pid and start time; Docker: container id).
    pub backend_ref: Option<String>,
    pub ip_address: Option<String>,
    /// A process inside the sandbox's own network namespace, when it has one: the proxy
    /// connects from inside it.
    pub netns_pid: Option<i32>,
}

impl Started {
    /// Records what a backend start (or re-adoption) handed back on the sandbox's record.
    pub fn apply_to(self, sb: &mut Sandbox) {
        sb.backend_ref = self.backend_ref;
        sb.ip_address = self.ip_address;
        sb.netns_pid = self.netns_pid;
    }
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
    /// The last lines the sandbox printed, when it failed (for the failure's reason).
    pub last_output: Option<String>,
}

/// Where the proxy connects for one port of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upstream {
    /// A socket on the gateway's own network.
    Tcp(SocketAddr),
    /// `127.0.0.1:port` inside the network namespace of process `pid`.
    Netns { pid: i32, port: u16 },
}

impl Upstream {
    /// The port dialed, as the sandbox sees it.
    pub fn port(self) -> u16 {
        match self {
            Upstream::Tcp(addr) => addr.port(),
            Upstream::Netns { port, .. } => port,
        }
    }

    /// Opens a TCP connection to this upstream, with `TCP_NODELAY` set.
    pub async fn dial(self) -> std::io::Result<tokio::net::TcpStream> {
        let stream = match self {
            Upstream::Tcp(addr) => tokio::net::TcpStream::connect(addr).await?,
            Upstream::Netns { pid, port } => netns::connect(pid, port).await?,
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// One health check of this port, bounded by [`CHECK_TIMEOUT`]: it accepts a connection
    /// and, with `path`, answers `GET path` with a 2xx or 3xx status.
    pub async fn probe(self, path: Option<&str>) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let check = async {
            let mut stream = self.dial().await.ok()?;
            let Some(path) = path else {
                return Some(true);
            };
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: sandgate-health\r\n\
                 Connection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut head = [0u8; 16];
            let mut got = 0;
            while got < head.len() {
                match stream.read(&mut head[got..]).await.ok()? {
                    0 => break,
                    n => got += n,
                }
            }
            // `HTTP/1.1 204 …`: the status code's first digit.
            let line = &head[..got];
            Some(line.starts_with(b"HTTP/1.") && matches!(line.get(9), Some(b'2' | b'3')))
        };
        matches!(
            tokio::time::timeout(CHECK_TIMEOUT, check).await,
            Ok(Some(true))
        )
    }
}

/// One health check's connect and answer, at most.
pub const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

#[async_trait]
pub trait Backend: Send + Sync {
    /// `process`, `docker`, ...: reported by `/health`.
    fn kind(&self) -> &'static str;
    /// How sandboxes are isolated from each other and the host, for `/health`.
    fn isolation(&self) -> &'static str;
    /// Whether a clean gateway shutdown stops this backend's sandboxes (processes must not
    /// outlive the gateway) or leaves them running for the next gateway to re-adopt.
    fn stop_on_shutdown(&self) -> bool {
        true
    }
    /// Whether a sandbox's handle (`backend_ref`) names something that outlives a stop or a
    /// failed start (a cluster resource suspended in place, found by it again), so it is
    /// kept; else it is forgotten once the sandbox no longer runs.
    fn handle_outlives_stop(&self) -> bool {
        false
    }
    /// Kubernetes backend: whether a watch report of the resource `reference` at `version`
    /// is news, asked under the sandbox's lock as the report is applied (`listed`: it comes
    /// from a full list, which is always current). `false` for a report older than what the
    /// gateway itself saw of it.
    fn fresh(&self, reference: &str, version: Option<&str>, listed: bool) -> bool {
        let _ = (reference, version, listed);
        true
    }
    /// Whether sandboxes of `runtime` can be created here (its program is installed, its image
    /// exists); the message says what is missing, for a 400.
    async fn check_runtime(&self, runtime: &Runtime) -> Result<(), String>;
    /// Whether dev-server sandboxes need a host port from the allocator (no own namespace).
    fn needs_host_port(&self) -> bool;
    /// The dev-server port a sandbox gets when the create names none (`None`: the
    /// allocated host port).
    fn default_port(&self) -> Option<u16>;
    /// The network a new sandbox gets when it asks for `requested` (absent: the gateway's
    /// `network` where the backend can choose); a message saying why not otherwise.
    /// Containers join the engine's configured network: `egress`.
    fn network(&self, requested: Option<Network>) -> Result<Network, String> {
        match requested {
            None | Some(Network::Egress) => Ok(Network::Egress),
            Some(other) => Err(format!(
                "network {:?} is not available on the {} backend",
                other.as_str(),
                self.kind()
            )),
        }
    }
    /// Called once at a clean shutdown, after every sandbox that must not outlive the gateway
    /// has stopped: removes what the backend set up for all of them.
    async fn closed(&self) {}
    /// Starts the sandbox's process or container. Must leave nothing behind on error.
    async fn start(&self, sandbox: &Sandbox) -> Result<Started, BackendError>;
    /// Stops it (gracefully, then forcibly). Stopping something already gone is not an error.
    async fn stop(&self, sandbox: &Sandbox) -> Result<(), BackendError>;
    /// Removes everything the sandbox owned (files, containers). Called after `stop`.
    async fn remove(&self, sandbox: &Sandbox) -> Result<(), BackendError>;
    /// After a gateway restart: whether the recorded sandbox still runs; if so the backend
    /// resumes watching it, will report its exit, and returns its (refreshed) handle.
    async fn adopt(&self, sandbox: &Sandbox) -> Result<Option<Started>, BackendError>;
    /// Whether the sandbox's process or container has certainly ended, seen from outside
    /// (by any gateway, not only the one watching it): on a shared store the lease holder
    /// asks this of every running sandbox, so one whose watcher died is not `running` for
    /// ever. `false` when it runs or cannot be told (the default).
    async fn ended(&self, sandbox: &Sandbox) -> bool {
        let _ = sandbox;
        false
    }
    /// Where the proxy connects for `port` of `sandbox`, or `None` if it does not expose it.
    /// A sandbox with its own network namespace exposes every port of it; one on the host
    /// network only its dev-server port, at its allocated host port.
    fn upstream(&self, sb: &Sandbox, port: u16) -> Option<Upstream> {
        if let Some(pid) = sb.netns_pid {
            return (port != 0).then_some(Upstream::Netns { pid, port });
        }
        let target = sb.target_port(port)?;
        Some(Upstream::Tcp(SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST,
            target,
        ))))
    }
    /// The cluster Service in front of the sandbox, where there is one.
    fn service(&self, sb: &Sandbox) -> Option<ServiceRef> {
        let _ = sb;
        None
    }
    /// The sandbox's captured stdout and stderr so far, as a stream of bytes (empty if it has
    /// printed nothing yet).
    async fn logs(
        &self,
        sandbox: &Sandbox,
        options: LogOptions,
    ) -> Result<LogStream, BackendError> {
        let _ = (sandbox, options);
        Err(BackendError::Unsupported {
            backend: self.kind(),
            operation: "stream logs",
        })
    }
    /// Starts one command inside the running sandbox, as its own user, in its namespaces or
    /// container, with its working tree and environment (see [`exec`]).
    async fn exec(&self, sandbox: &Sandbox, spec: ExecSpec) -> Result<ExecHandle, ExecError> {
        let _ = (sandbox, spec);
        Err(ExecError::Unsupported(self.kind()))
    }
    /// Starts `spec` (a shell) on a new terminal of `size` inside the running sandbox.
    async fn pty(
        &self,
        sandbox: &Sandbox,
        spec: ExecSpec,
        size: exec::TtySize,
    ) -> Result<exec::PtyHandle, ExecError> {
        let _ = (sandbox, spec, size);
        Err(ExecError::Unsupported(self.kind()))
    }
    /// A path on this host to the sandbox's working tree, for the files API (which resolves
    /// everything beneath it): a directory of the data directory, or a running container's
    /// through `/proc/<pid>/root`.
    async fn working_tree(&self, sandbox: &Sandbox) -> Result<std::path::PathBuf, ExecError> {
        let _ = sandbox;
        Err(ExecError::Unsupported(self.kind()))
    }
    /// How the files API reaches the sandbox's working tree: by default the host path
    /// [`working_tree`](Backend::working_tree) gives.
    async fn files_at(&self, sandbox: &Sandbox) -> Result<FilesAt, ExecError> {
        self.working_tree(sandbox).await.map(FilesAt::Host)
    }
}
