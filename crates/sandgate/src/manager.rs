//! The sandbox manager: the one place that changes sandboxes. It validates creates, drives the
//! backend, writes the store first and the route table second, reacts to exits, reconciles
//! after a restart and stops everything on shutdown. Operations on one sandbox are serialised.
//! It also keeps the warm pools: sandboxes started ahead of time that a matching create claims
//! (see [`crate::warm`] and `docs/warm-pools.md`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::backend::kubernetes::{Discovered, Observed, DISCOVERED_RUNTIME};
use crate::backend::{Backend, Exit};
use crate::config::Config;
use crate::error::Error;
use crate::metrics::{Metrics, Operation};
use crate::model::{
    self, Limits, Mode, Sandbox, Status, DEFAULT_OWNER, DEFAULT_TEAM, RESERVED_OWNERS,
};
use crate::routes::Routes;
use crate::runtimes::{Runtime, Runtimes};
use crate::store::Store;
use crate::warm::Pools;

const MAX_COMMAND: usize = 64 * 1024;
const MAX_ENV: usize = 256;
/// What a sandbox without a dev server runs: it stays up as an environment for commands.
const IDLE_COMMAND: &str = "exec sleep 2147483647";

/// The body of `POST /sandboxes` (and `POST /sandbox`). Unknown fields are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    pub runtime: Option<String>,
    pub mode: Option<Mode>,
    pub dev_server: Option<bool>,
    pub command: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub name: Option<String>,
    #[serde(alias = "user")]
    pub owner: Option<String>,
    pub port: Option<u16>,
    pub cpus: Option<f64>,
    pub memory_mb: Option<u64>,
    pub pids_limit: Option<i64>,
    /// Every port answers without a credential.
    pub public: Option<bool>,
    /// These ports answer without a credential.
    pub public_ports: Option<Vec<u16>>,
    /// Whether path routes keep their prefix (`keep`) or strip it (`strip`, the default).
    pub path_prefix: Option<model::PathPrefix>,
    /// String metadata.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Seconds without use before the idle reaper acts (0: never; absent: the gateway's).
    pub idle_timeout: Option<u64>,
    /// `none` or `egress` (absent: the gateway's `network` where the backend can choose).
    pub network: Option<model::Network>,
    /// An HTTP path the health checks GET (absent: they only connect).
    pub health_path: Option<String>,
    /// Instances to run (1..=16, default 1): the proxy spreads requests over the ready ones
    /// by `LOAD_BALANCER_STRATEGY`.
    pub replicas: Option<u32>,
}

/// A change to a sandbox's settings (`PATCH /sandboxes/{id}`): absent fields stay as they are.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSandbox {
    pub public: Option<bool>,
    pub public_ports: Option<Vec<u16>>,
    pub path_prefix: Option<model::PathPrefix>,
    pub mode: Option<Mode>,
    /// Merged into the labels; a `null` value removes that label.
    pub labels: Option<BTreeMap<String, Option<String>>>,
    /// Seconds (0: never); `null`: back to the gateway's `idle_timeout`.
    #[serde(default, deserialize_with = "present")]
    pub idle_timeout: Option<Option<u64>>,
}

/// Tells a field that is `null` (`Some(None)`) from one that is absent (`None`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// At most 32 labels; keys `[a-z0-9][a-z0-9._/-]{0,62}`, values at most 256 bytes without
/// control characters.
pub fn validate_labels<'a>(
    labels: impl Iterator<Item = (&'a String, Option<&'a String>)>,
) -> Result<(), Error> {
    for (k, v) in labels {
        let key_ok = k.len() <= 63
            && k.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && k.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'/' | b'-')
            });
        if !key_ok {
            return Err(Error::Validation(format!(
                "label key {k:?} must be 1-63 characters of a-z, 0-9, '.', '_', '/', '-', \
                 starting with a letter or digit"
            )));
        }
        if v.is_some_and(|v| v.len() > 256 || v.chars().any(char::is_control)) {
            return Err(Error::Validation(format!(
                "label {k:?}: values are at most 256 bytes, without control characters"
            )));
        }
    }
    Ok(())
}

/// The longest per-sandbox idle timeout: 30 days.
const MAX_IDLE_TIMEOUT: u64 = 30 * 24 * 3600;
/// Instances one sandbox may run.
pub const MAX_REPLICAS: u32 = 16;

pub struct Manager {
    config: Arc<Config>,
    store: Arc<dyn Store>,
    backend: Arc<dyn Backend>,
    routes: Arc<Routes>,
    runtimes: Runtimes,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Arc<Metrics>,
    warm: Pools,
    /// Instances that ended on their own: restarts in a row and when the last was made.
    restarts: Mutex<HashMap<String, (u32, std::time::Instant)>>,
    /// Whether this gateway holds the lease on background duties (the idle reaper,
    /// reconcile): always, unless the store is shared with other gateways.
    leader: tokio::sync::watch::Receiver<bool>,
    /// Sandboxes deleted here lately, and when, until the watch reports them gone: a watch
    /// event older than the deletion must not bring one back as a discovered sandbox
    /// (kubernetes backend).
    deleted: Mutex<HashMap<String, Deletion>>,
}

/// A sandbox deleted here lately (see `Manager::deleted`).
struct Deletion {
    at: std::time::Instant,
    /// The namespace of its Sandbox (kubernetes backend), whose list confirms it.
    namespace: Option<String>,
}

/// How long a deleted sandbox's id is remembered against late watch events.
const DELETED_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);

/// The first automatic restart of an instance that ended waits this long; each further one
/// in a row twice as long, up to [`RESTART_MAX`]. An instance that ran this long since its
/// last restart starts the count again.
const RESTART_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const RESTART_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// On a shared store, how long a record may sit in `creating`, `stopping` or `deleting`
/// before reconcile takes it for an operation cut short (younger, another gateway may still
/// be carrying it out).
const STALE_OPERATION: chrono::Duration = chrono::Duration::minutes(10);

/// How long a warm sandbox's dev server may take to accept connections before the fill is
/// given up (and retried later).
const POOL_READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs a lifecycle operation in a task of its own, so that it finishes even when its caller
/// is dropped halfway: a client that goes away, or a caller's timeout (a wake), would
/// otherwise cut it between the backend's work and the store's record of it (a process
/// started but recorded stopped, a sandbox half taken from a pool).
async fn finish_anyway<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    tokio::spawn(op).await.map_err(Error::internal)?
}

/// Whether two sandboxes run the same thing the same way: what a claim cannot change once it
/// runs (its command, environment, limits and network). Who owns it, its name, labels, mode,
/// public ports and health path are a claim's to set.
fn same_process(a: &Sandbox, b: &Sandbox) -> bool {
    a.runtime == b.runtime
        && a.dev_server == b.dev_server
        && a.command == b.command
        && a.env == b.env
        && a.limits == b.limits
        && a.network == b.network
}

/// At most 32 distinct ports, each 1..=65535.
fn validate_public_ports(ports: &[u16]) -> Result<(), Error> {
    if ports.len() > 32 || ports.contains(&0) {
        return Err(Error::Validation(
            "public_ports must list at most 32 ports from 1 to 65535".into(),
        ));
    }
    Ok(())
}

/// Variables the gateway gives every sandbox; a create may not set them (they would be
/// silently overridden, or override what the gateway promises).
pub fn reserved_env_key(k: &str) -> bool {
    matches!(k, "PORT" | "HOST" | "HOME" | "SANDBOX_ID") || k.starts_with("SANDGATE_")
}

/// An environment variable name a sandbox or a command may set: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_env_key(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

impl Manager {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        backend: Arc<dyn Backend>,
        routes: Arc<Routes>,
        metrics: Arc<Metrics>,
    ) -> Manager {
        let runtimes = Runtimes::new(&config.runtimes);
        let sizes = config
            .runtimes
            .iter()
            .filter_map(|(name, rt)| Some((name.clone(), rt.warm?)))
            .collect();
        Manager {
            warm: Pools::new(&sizes),
            config,
            store,
            backend,
            routes,
            runtimes,
            locks: Mutex::new(HashMap::new()),
            metrics,
            restarts: Mutex::new(HashMap::new()),
            leader: tokio::sync::watch::channel(true).1,
            deleted: Mutex::new(HashMap::new()),
        }
    }

    /// Shares the background duties with other gateways: `leader` says when this one holds
    /// their lease.
    pub fn with_leader(mut self, leader: tokio::sync::watch::Receiver<bool>) -> Manager {
        self.leader = leader;
        self
    }

    /// Whether this gateway runs the background duties now.
    pub fn leads(&self) -> bool {
        *self.leader.borrow()
    }

    /// The lease's changes (see [`Manager::with_leader`]).
    pub fn leader(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Re-reads one record into the route table after another gateway changed it: a record
    /// gone (or waiting in a warm pool) is not routed.
    pub async fn refresh_route(&self, id: &str) -> Result<(), Error> {
        match self.store.get(id).await? {
            Some(sb) if sb.pool.is_none() => self.routes.put(sb),
            _ => self.routes.remove(id),
        }
        Ok(())
    }

    /// Re-reads every record into the route table (what other gateways changed while this
    /// one was not listening), dropping routes whose record is gone.
    pub async fn resync_routes(&self) -> Result<(), Error> {
        let all = self.store.list().await?;
        let live: std::collections::HashSet<&str> = all
            .iter()
            .filter(|sb| sb.pool.is_none())
            .map(|sb| sb.id.as_str())
            .collect();
        for entry in self.routes.all_instances() {
            if !live.contains(entry.id.as_str()) {
                self.routes.remove(&entry.id);
            }
        }
        // Sandboxes before their instances, so each instance finds its sandbox's entry.
        let (sandboxes, instances): (Vec<_>, Vec<_>) = all
            .into_iter()
            .filter(|sb| sb.pool.is_none())
            .partition(|sb| sb.replica_of.is_none());
        for sb in sandboxes.into_iter().chain(instances) {
            self.routes.put(sb);
        }
        Ok(())
    }

    /// Runs a lifecycle operation, recording its duration: succeeded, or failed on the
    /// gateway's or backend's side (a refusal of the caller's request, 4xx, is not recorded).
    async fn timed<T>(
        &self,
        op: Operation,
        run: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let began = std::time::Instant::now();
        let result = run.await;
        let recorded = match &result {
            Ok(_) => Some(true),
            Err(e) if e.status_and_code().0.is_server_error() => Some(false),
            Err(_) => None,
        };
        if let Some(ok) = recorded {
            self.metrics.lifecycle(op, ok, began.elapsed());
        }
        result
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The warm pools.
    pub fn warm(&self) -> &Pools {
        &self.warm
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    fn forget_lock(&self, id: &str) {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.remove(id);
    }

    /// Checks a create request and turns it into a new sandbox record (not yet stored).
    fn prepare(&self, req: CreateSandbox) -> Result<(Sandbox, Runtime), Error> {
        let bad = |m: String| Err(Error::Validation(m));
        let runtime_name = req.runtime.unwrap_or_else(|| "shell".into());
        let Some(runtime) = self.runtimes.get(&runtime_name) else {
            let known: Vec<_> = self.runtimes.names().collect();
            return Err(Error::BadRequest(format!(
                "unknown runtime {runtime_name:?}; known runtimes: {}",
                known.join(", ")
            )));
        };
        if let Some(cmd) = &req.command {
            if cmd.trim().is_empty() || cmd.len() > MAX_COMMAND || cmd.contains('\0') {
                return bad(format!(
                    "command must be non-empty, at most {MAX_COMMAND} bytes, without NUL"
                ));
            }
        }
        let dev_server = req
            .dev_server
            .unwrap_or(req.command.is_some() || runtime.dev_server.is_some());
        let command = match (&req.command, dev_server) {
            (Some(c), _) => c.clone(),
            (None, true) => match &runtime.dev_server {
                Some(c) => c.clone(),
                None => {
                    return bad(format!(
                        "runtime {runtime_name:?} has no default dev server; pass a command"
                    ))
                }
            },
            (None, false) => IDLE_COMMAND.to_string(),
        };
        if req.env.len() > MAX_ENV {
            return bad(format!("at most {MAX_ENV} environment variables"));
        }
        for (k, v) in &req.env {
            if !valid_env_key(k) || v.contains('\0') || v.len() > MAX_COMMAND {
                return bad(format!("invalid environment variable {k:?}"));
            }
            if reserved_env_key(k) {
                return bad(format!(
                    "environment variable {k} is the gateway's to set \
                     (PORT, HOST, HOME, SANDBOX_ID and SANDGATE_*): remove it"
                ));
            }
        }
        let owner = req.owner.unwrap_or_else(|| DEFAULT_OWNER.into());
        if !model::valid_label(&owner) || RESERVED_OWNERS.contains(&owner.as_str()) {
            return bad(format!(
                "owner {owner:?} must be a lowercase label (a-z, 0-9, '-') and not one of: {}",
                RESERVED_OWNERS.join(", ")
            ));
        }
        if let Some(name) = &req.name {
            if !model::valid_label(name) {
                return bad(format!(
                    "name {name:?} must be a lowercase label of 1-63 characters (a-z, 0-9, '-')"
                ));
            }
        }
        if req.port == Some(0) {
            return bad("port must be from 1 to 65535".into());
        }
        if !dev_server && req.port.is_some() {
            return bad("port is only meaningful with dev_server: true".into());
        }
        let limits = Limits {
            cpus: req.cpus,
            memory_mb: req.memory_mb,
            pids_limit: req.pids_limit,
        };
        limits.validate().map_err(Error::Validation)?;
        if let Some(ports) = &req.public_ports {
            validate_public_ports(ports)?;
        }
        if req.labels.len() > 32 {
            return bad("at most 32 labels".into());
        }
        validate_labels(req.labels.iter().map(|(k, v)| (k, Some(v))))?;
        if req.idle_timeout.is_some_and(|t| t > MAX_IDLE_TIMEOUT) {
            return bad(format!(
                "idle_timeout is at most {MAX_IDLE_TIMEOUT} seconds"
            ));
        }
        if let Some(p) = &req.health_path {
            let printable = p.bytes().all(|b| (0x21..=0x7e).contains(&b));
            if !p.starts_with('/') || p.len() > 256 || !printable {
                return bad(format!(
                    "health_path {p:?} must be an absolute path of at most 256 printable \
                     characters without spaces (like \"/healthz\")"
                ));
            }
        }
        let replicas = req.replicas.unwrap_or(1);
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return bad(format!("replicas must be from 1 to {MAX_REPLICAS}"));
        }
        if replicas > 1 && self.backend.kind() == "kubernetes" {
            return bad("replicas above 1 are not supported on the kubernetes backend yet".into());
        }
        if replicas > 1 && !dev_server {
            return bad("replicas is only meaningful with a dev server to balance".into());
        }
        if req.network == Some(model::Network::Host) {
            return bad("network must be \"none\" or \"egress\"".into());
        }
        let network = self
            .backend
            .network(req.network)
            .map_err(Error::Validation)?;
        let sandbox = Sandbox {
            owner,
            name: req.name,
            runtime: runtime_name,
            mode: req.mode.unwrap_or_default(),
            dev_server,
            command,
            env: req.env,
            limits: limits.or(self.config.docker.limits),
            port: req.port,
            public: req.public.unwrap_or(false),
            public_ports: req.public_ports.unwrap_or_default(),
            keep_prefix: req.path_prefix == Some(model::PathPrefix::Keep),
            labels: req.labels,
            idle_timeout: req.idle_timeout,
            network,
            health_path: req.health_path,
            replicas,
            ..Sandbox::blank(&model::new_id())
        };
        Ok((sandbox, runtime.clone()))
    }

    /// Writes a changed record to the store, then the route table (a sandbox waiting in a
    /// warm pool is never routed).
    async fn save(&self, sb: &mut Sandbox) -> Result<(), Error> {
        sb.updated_at = model::now();
        self.store.update(sb).await?;
        if sb.pool.is_none() {
            self.routes.put(sb.clone());
        }
        Ok(())
    }

    /// Creates a sandbox of `team` and starts it, or claims one from its runtime's warm pool
    /// when the request matches what the pool runs.
    pub async fn create(
        self: &Arc<Self>,
        req: CreateSandbox,
        team: &str,
    ) -> Result<Sandbox, Error> {
        let (me, team) = (self.clone(), team.to_string());
        finish_anyway(async move { me.create_now(req, &team).await }).await
    }

    async fn create_now(&self, req: CreateSandbox, team: &str) -> Result<Sandbox, Error> {
        let (sb, runtime) = self.prepare(req)?;
        self.timed(Operation::Create, async {
            if let Some(claimed) = self.claim(&sb, team).await? {
                return Ok(claimed);
            }
            match self
                .create_prepared(sb.clone(), runtime.clone(), team)
                .await
            {
                // Waiting sandboxes hold ports of the range too: a user's create comes first.
                Err(Error::PortsExhausted(_)) if self.free_a_port().await => {
                    self.create_prepared(sb, runtime, team).await
                }
                other => other,
            }
        })
        .await
    }

    /// Removes one waiting sandbox (of any pool), freeing its port; false if none waits.
    async fn free_a_port(&self) -> bool {
        let Some(taken) = self.warm.take_any() else {
            return false;
        };
        tracing::info!(sandbox = %taken.id(), runtime = %taken.runtime(), "the port range is full: removing a warm sandbox for a create");
        self.discard(taken.id()).await;
        taken.release();
        true
    }

    /// What a runtime's warm pool runs: a create that names only the runtime.
    fn pool_template(&self, runtime: &str) -> Result<(Sandbox, Runtime), Error> {
        let (mut sb, rt) = self.prepare(CreateSandbox {
            runtime: Some(runtime.to_string()),
            ..CreateSandbox::default()
        })?;
        sb.pool = Some(runtime.to_string());
        Ok((sb, rt))
    }

    /// Whether a running sandbox's dev server (if it has one) accepts a connection, or with
    /// `path` answers it with a 2xx or 3xx.
    async fn serves(&self, sb: &Sandbox, path: Option<&str>) -> bool {
        match (sb.dev_server, sb.port) {
            (true, Some(port)) => match self.backend.upstream(sb, port) {
                Some(upstream) => upstream.probe(path).await,
                None => false,
            },
            _ => true,
        }
    }

    /// Takes a sandbox from `wanted`'s runtime's warm pool and makes it `wanted` (owner, name,
    /// labels and every other setting a running sandbox can change), if the pool runs what
    /// `wanted` asks for and has one that still serves. `None`: create one the usual way.
    async fn claim(&self, wanted: &Sandbox, team: &str) -> Result<Option<Sandbox>, Error> {
        if !self.warm.has(&wanted.runtime) {
            return Ok(None);
        }
        let (template, _) = self.pool_template(&wanted.runtime)?;
        if wanted.port.is_some() || wanted.replicas > 1 || !same_process(wanted, &template) {
            self.metrics.warm_claim(false);
            return Ok(None);
        }
        // `taken` hands the sandbox back if this create is dropped before it settles it.
        while let Some(taken) = self.warm.take(&wanted.runtime) {
            let id = taken.id().to_string();
            let lock = self.lock_for(&id);
            let guard = lock.lock().await;
            let mut sb = match self.store.get(&id).await? {
                Some(sb) if sb.pool.is_some() => sb,
                _ => {
                    // Removed meanwhile.
                    taken.release();
                    drop(guard);
                    self.forget_lock(&id);
                    continue;
                }
            };
            if sb.status != Status::Running || !self.serves(&sb, None).await {
                // The filler removes it (a stop can take seconds): this create goes on.
                tracing::warn!(sandbox = %id, status = %sb.status, "a warm sandbox stopped serving while it waited; removing it");
                taken.condemn();
                continue;
            }
            sb.pool = None;
            sb.team = team.to_string();
            sb.owner = wanted.owner.clone();
            sb.name = wanted.name.clone();
            sb.mode = wanted.mode;
            sb.public = wanted.public;
            sb.public_ports = wanted.public_ports.clone();
            sb.keep_prefix = wanted.keep_prefix;
            sb.labels = wanted.labels.clone();
            sb.idle_timeout = wanted.idle_timeout;
            sb.health_path = wanted.health_path.clone();
            sb.created_at = model::now();
            sb.updated_at = sb.created_at;
            // Refused (a name already taken): `taken` goes back, first in line.
            if !self.store.claim(&sb).await? {
                // Claimed or removed meanwhile (it was locked: should not happen).
                taken.release();
                continue;
            }
            self.routes.put(sb.clone());
            taken.release();
            // Its server was checked a moment ago: ready at once, unless the claim asks for a
            // health path it has not answered yet (the checker judges it within a tick).
            let ready = match &sb.health_path {
                None => true,
                Some(path) => self.serves(&sb, Some(path)).await,
            };
            if let (true, Some(entry)) = (ready, self.routes.get(&sb.id)) {
                for _ in 0..self.config.health_rise {
                    entry.record_check(true, self.config.health_rise, self.config.health_fall);
                }
            }
            self.routes.touch(&sb.id);
            self.metrics.warm_claim(true);
            tracing::info!(sandbox = %sb.id, runtime = %sb.runtime, "claimed from the warm pool");
            return Ok(Some(sb));
        }
        self.metrics.warm_claim(false);
        Ok(None)
    }

    /// Starts one sandbox for `runtime`'s warm pool and waits until its dev server accepts
    /// connections (at most [`POOL_READY_TIMEOUT`], or until `cancel`); then it waits in the
    /// pool. Whatever fails, nothing is left behind.
    pub async fn fill_pool(
        &self,
        runtime: &str,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), Error> {
        let (sb, rt) = self.pool_template(runtime)?;
        let outcome = match self.create_prepared(sb, rt, DEFAULT_TEAM).await {
            Ok(sb) => {
                let queued = self.queue_when_listening(runtime, &sb, cancel).await;
                if queued.is_err() {
                    self.discard(&sb.id).await;
                }
                queued
            }
            Err(e) => Err(e),
        };
        self.metrics.warm_fill(outcome.is_ok());
        outcome
    }

    /// Waits until a just-started warm sandbox's server accepts connections, then puts it in
    /// its pool (under its lock, so an exit handled meanwhile is seen).
    async fn queue_when_listening(
        &self,
        runtime: &str,
        sb: &Sandbox,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), Error> {
        let ended = || Error::StartFailed(format!("warm sandbox {} ended", sb.id));
        let began = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(10);
        while !self.serves(sb, None).await {
            // It may have ended (and been removed) meanwhile.
            if !self.still_waiting(&sb.id).await? {
                return Err(ended());
            }
            if began.elapsed() > POOL_READY_TIMEOUT {
                return Err(Error::StartFailed(format!(
                    "warm sandbox {} did not listen within {POOL_READY_TIMEOUT:?}",
                    sb.id
                )));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(Error::StartFailed("shutting down".into())),
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(std::time::Duration::from_millis(250));
        }
        let lock = self.lock_for(&sb.id);
        let _guard = lock.lock().await;
        if !self.still_waiting(&sb.id).await? {
            return Err(ended());
        }
        tracing::debug!(sandbox = %sb.id, runtime, "warm sandbox waiting");
        self.warm.put(runtime, sb.id.clone());
        Ok(())
    }

    /// Whether a warm sandbox's record is still there, running and unclaimed.
    async fn still_waiting(&self, id: &str) -> Result<bool, Error> {
        let sb = self.store.get(id).await?;
        Ok(sb.is_some_and(|sb| sb.status == Status::Running && sb.pool.is_some()))
    }

    /// Removes a waiting (or half-started, or condemned) warm sandbox, logging a failure.
    pub async fn discard(&self, id: &str) {
        self.warm.forget(id);
        let lock = self.lock_for(id);
        let guard = lock.lock().await;
        if let Ok(Some(mut sb)) = self.store.get(id).await {
            self.remove_warm_locked(&mut sb).await;
        }
        drop(guard);
        self.forget_lock(id);
    }

    /// Removes a warm sandbox whose lock the caller holds. A failure is logged, not returned:
    /// the sandbox is nobody's, and the next start's reconcile tries again.
    async fn remove_warm_locked(&self, sb: &mut Sandbox) {
        self.warm.forget(&sb.id);
        if let Err(e) = self.delete_locked(sb).await {
            tracing::error!(sandbox = %sb.id, error = %e, "could not remove a warm sandbox");
        }
    }

    async fn create_prepared(
        &self,
        mut sb: Sandbox,
        runtime: Runtime,
        team: &str,
    ) -> Result<Sandbox, Error> {
        sb.team = team.to_string();
        self.backend
            .check_runtime(&runtime)
            .await
            .map_err(Error::BadRequest)?;
        let lock = self.lock_for(&sb.id);
        let _guard = lock.lock().await;
        let range = (sb.dev_server && self.backend.needs_host_port())
            .then(|| self.config.port_range.clone());
        let probe = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        self.store.create(&mut sb, range, &probe).await?;
        if sb.dev_server && sb.port.is_none() {
            sb.port = self.backend.default_port().or(sb.allocated_port);
        }
        if sb.pool.is_none() {
            self.routes.put(sb.clone());
        }
        match self.backend.start(&sb).await {
            Ok(started) => {
                started.apply_to(&mut sb);
                sb.status = Status::Running;
                self.save(&mut sb).await?;
                tracing::info!(sandbox = %sb.id, runtime = %sb.runtime, port = ?sb.allocated_port, "created");
            }
            Err(e) => {
                // Leave nothing behind: no record, no port, no files.
                let _ = self.backend.remove(&sb).await;
                self.store.delete(&sb.id).await?;
                self.routes.remove(&sb.id);
                return Err(Error::StartFailed(e.to_string()));
            }
        }
        if let Err(e) = self.add_instances(&sb).await {
            // All of them or none: the instances made so far go with the sandbox.
            if let Err(e) = self.delete_locked(&mut sb).await {
                tracing::error!(sandbox = %sb.id, error = %e, "could not remove a sandbox whose instances failed");
            }
            return Err(e);
        }
        Ok(sb)
    }

    /// Creates and starts a new sandbox's extra instances (`replicas - 1`), at once; the
    /// caller holds the sandbox's lock. On a failure the ones made are left for the caller's
    /// delete to remove.
    async fn add_instances(&self, sb: &Sandbox) -> Result<(), Error> {
        let adds = (1..sb.replicas).map(|_| async {
            let now = model::now();
            let mut inst = sb.clone();
            inst.id = model::new_id();
            inst.name = None;
            inst.labels = BTreeMap::new();
            inst.replicas = 1;
            inst.replica_of = Some(sb.id.clone());
            inst.allocated_port = None;
            inst.status = Status::Creating;
            inst.status_reason = None;
            inst.generation = 1;
            inst.clear_handle();
            inst.ip_address = None;
            inst.created_at = now;
            inst.updated_at = now;
            let lock = self.lock_for(&inst.id);
            let _guard = lock.lock().await;
            let range = self
                .backend
                .needs_host_port()
                .then(|| self.config.port_range.clone());
            let probe = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
            self.store.create(&mut inst, range, &probe).await?;
            self.routes.put(inst.clone());
            self.start_one_locked(&mut inst).await
        });
        let results = futures_util::future::join_all(adds).await;
        results.into_iter().collect()
    }

    /// Starts one record's process or container (a sandbox's own or an instance's) whose lock
    /// the caller holds: a new incarnation, unless it is being created.
    async fn start_one_locked(&self, sb: &mut Sandbox) -> Result<(), Error> {
        if sb.status != Status::Creating {
            sb.generation += 1;
        }
        match self.backend.start(sb).await {
            Ok(started) => {
                started.apply_to(sb);
                sb.status = Status::Running;
                sb.status_reason = None;
                self.save(sb).await?;
                // A start is use: the idle clock restarts.
                self.routes.touch(&sb.id);
                Ok(())
            }
            Err(e) => {
                sb.status = Status::Failed;
                sb.status_reason = Some(e.to_string());
                self.forget_handle(sb);
                self.save(sb).await?;
                Err(Error::StartFailed(match &sb.replica_of {
                    Some(_) => format!("instance {}: {e}", sb.id),
                    None => e.to_string(),
                }))
            }
        }
    }

    /// A sandbox's extra instances as stored, oldest first.
    async fn instances_of(&self, id: &str) -> Result<Vec<Sandbox>, Error> {
        let mut all = self.store.list().await?;
        all.retain(|r| r.replica_of.as_deref() == Some(id));
        Ok(all)
    }

    /// Runs `op` on each of sandbox `sb`'s extra instances, at once, each under its own lock
    /// and as stored then; the first error is returned after all ran.
    async fn each_instance<F, Fut>(&self, sb: &Sandbox, op: F) -> Result<(), Error>
    where
        F: Fn(Sandbox) -> Fut,
        Fut: std::future::Future<Output = Result<(), Error>>,
    {
        // Only a sandbox of several instances has instance records (no store scan otherwise).
        if sb.replica_of.is_some() || sb.replicas <= 1 {
            return Ok(());
        }
        let instances = self.instances_of(&sb.id).await?;
        let op = &op;
        let runs = instances.into_iter().map(|inst| async move {
            let lock = self.lock_for(&inst.id);
            let guard = lock.lock().await;
            let result = match self.store.get(&inst.id).await? {
                Some(inst) => op(inst).await,
                None => Ok(()),
            };
            drop(guard);
            if self.store.get(&inst.id).await?.is_none() {
                self.forget_lock(&inst.id);
            }
            result
        });
        let results = futures_util::future::join_all(runs).await;
        results.into_iter().collect()
    }

    pub async fn get(&self, id: &str) -> Result<Sandbox, Error> {
        if !model::valid_id(id) {
            return Err(Error::InvalidId(id.to_string()));
        }
        self.store
            .get(id)
            .await?
            .filter(Sandbox::listed)
            .ok_or_else(|| Error::SandboxNotFound(id.to_string()))
    }

    /// Every user's sandbox (not those waiting in warm pools, nor extra instances).
    pub async fn list(&self) -> Result<Vec<Sandbox>, Error> {
        let mut all = self.store.list().await?;
        all.retain(Sandbox::listed);
        Ok(all)
    }

    /// Changes which ports answer without a credential (`None`: unchanged).
    /// Applies a `PATCH`: only the fields it names change.
    pub async fn update(&self, id: &str, req: UpdateSandbox) -> Result<Sandbox, Error> {
        let UpdateSandbox {
            public,
            public_ports,
            path_prefix,
            mode,
            labels,
            idle_timeout,
        } = req;
        if let Some(ports) = &public_ports {
            validate_public_ports(ports)?;
        }
        if let Some(labels) = &labels {
            validate_labels(labels.iter().map(|(k, v)| (k, v.as_ref())))?;
        }
        if idle_timeout.flatten().is_some_and(|t| t > MAX_IDLE_TIMEOUT) {
            return Err(Error::Validation(format!(
                "idle_timeout is at most {MAX_IDLE_TIMEOUT} seconds"
            )));
        }
        self.get(id).await?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let mut sb = self.get(id).await?;
        if let Some(p) = public {
            sb.public = p;
        }
        if let Some(ports) = public_ports {
            sb.public_ports = ports;
        }
        if let Some(p) = path_prefix {
            sb.keep_prefix = p == model::PathPrefix::Keep;
        }
        if let Some(m) = mode {
            sb.mode = m;
        }
        if let Some(labels) = labels {
            for (k, v) in labels {
                match v {
                    Some(v) => sb.labels.insert(k, v),
                    None => sb.labels.remove(&k),
                };
            }
            if sb.labels.len() > 32 {
                return Err(Error::Validation("at most 32 labels".into()));
            }
        }
        if let Some(t) = idle_timeout {
            sb.idle_timeout = t;
        }
        self.save(&mut sb).await?;
        Ok(sb)
    }

    /// Revokes every preview token of a sandbox issued so far.
    pub async fn revoke_previews(&self, id: &str) -> Result<Sandbox, Error> {
        self.get(id).await?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let mut sb = self.get(id).await?;
        sb.preview_generation += 1;
        self.save(&mut sb).await?;
        Ok(sb)
    }

    pub async fn stop(self: &Arc<Self>, id: &str) -> Result<Sandbox, Error> {
        let (me, id) = (self.clone(), id.to_string());
        finish_anyway(async move { me.timed(Operation::Stop, me.stop_by_id(&id)).await }).await
    }

    async fn stop_by_id(&self, id: &str) -> Result<Sandbox, Error> {
        self.get(id).await?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let mut sb = self.get(id).await?;
        self.stop_locked(&mut sb, "stopped by request").await?;
        Ok(sb)
    }

    /// Stops a sandbox whose lock the caller holds, and its extra instances.
    async fn stop_locked(&self, sb: &mut Sandbox, reason: &str) -> Result<(), Error> {
        let own = self.stop_one_locked(sb, reason).await;
        let instances = self
            .each_instance(sb, |mut inst| async move {
                self.stop_one_locked(&mut inst, reason).await
            })
            .await;
        own.and(instances)
    }

    /// Stops one record's process or container (a sandbox, or one of its instances).
    async fn stop_one_locked(&self, sb: &mut Sandbox, reason: &str) -> Result<(), Error> {
        if !matches!(
            sb.status,
            Status::Running | Status::Creating | Status::Stopping
        ) {
            return Ok(());
        }
        sb.status = Status::Stopping;
        self.save(sb).await?;
        let result = self.backend.stop(sb).await;
        match result {
            Ok(()) => {
                sb.status = Status::Stopped;
                sb.status_reason = Some(reason.to_string());
            }
            Err(e) => {
                sb.status = Status::Failed;
                sb.status_reason = Some(e.to_string());
            }
        }
        self.forget_handle(sb);
        self.save(sb).await
    }

    /// Stops (persistent) or deletes (ephemeral) a running sandbox unused for `idle`,
    /// re-checking under its lock so a request that just arrived keeps it alive.
    pub async fn reap_if_idle(&self, id: &str, idle: std::time::Duration) -> Result<(), Error> {
        let lock = self.lock_for(id);
        let guard = lock.lock().await;
        let Some(entry) = self.routes.get(id) else {
            return Ok(());
        };
        if entry.status != Status::Running
            || entry.busy()
            || entry.idle_ms() < idle.as_millis() as i64
        {
            return Ok(());
        }
        let mut sb = self.get(id).await?;
        let reason = format!("idle for {}s", idle.as_secs());
        tracing::info!(sandbox = %id, mode = sb.mode.as_str(), %reason, "reaping idle sandbox");
        match sb.mode {
            Mode::Persistent => self.stop_locked(&mut sb, &reason).await,
            Mode::Ephemeral => {
                self.delete_locked(&mut sb).await?;
                drop(guard);
                self.forget_lock(id);
                Ok(())
            }
        }
    }

    pub async fn start(self: &Arc<Self>, id: &str) -> Result<Sandbox, Error> {
        let (me, id) = (self.clone(), id.to_string());
        finish_anyway(async move { me.timed(Operation::Start, me.start_by_id(&id)).await }).await
    }

    async fn start_by_id(&self, id: &str) -> Result<Sandbox, Error> {
        self.get(id).await?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let mut sb = self.get(id).await?;
        match sb.status {
            Status::Running => {}
            Status::Stopped | Status::Failed => self.start_one_locked(&mut sb).await?,
            other => {
                return Err(Error::Conflict(format!(
                    "sandbox {id} cannot be started while {other}"
                )))
            }
        }
        // Its instances too: those stopped with it, and any that ended on their own.
        self.each_instance(&sb, |mut inst| async move {
            match inst.status {
                Status::Stopped | Status::Failed => self.start_one_locked(&mut inst).await,
                _ => Ok(()),
            }
        })
        .await?;
        Ok(sb)
    }

    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<(), Error> {
        let (me, id) = (self.clone(), id.to_string());
        finish_anyway(async move { me.timed(Operation::Delete, me.delete_by_id(&id)).await }).await
    }

    async fn delete_by_id(&self, id: &str) -> Result<(), Error> {
        self.get(id).await?;
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let mut sb = self.get(id).await?;
        self.delete_locked(&mut sb).await?;
        self.forget_lock(id);
        Ok(())
    }

    /// Deletes a sandbox whose lock the caller holds: its extra instances first, then itself.
    async fn delete_locked(&self, sb: &mut Sandbox) -> Result<(), Error> {
        if sb.replica_of.is_none() && sb.status != Status::Deleting {
            // Record the intent first: a crash from here on is finished by `reconcile`.
            sb.status = Status::Deleting;
            self.save(sb).await?;
        }
        self.each_instance(sb, |mut inst| async move {
            self.delete_one_locked(&mut inst).await
        })
        .await?;
        self.delete_one_locked(sb).await
    }

    /// Deletes one record: its process or container, files and port, then the record.
    async fn delete_one_locked(&self, sb: &mut Sandbox) -> Result<(), Error> {
        if sb.status != Status::Deleting {
            sb.status = Status::Deleting;
            self.save(sb).await?;
        }
        // Noted before the cluster is asked, so that its watch's report of the deletion,
        // however soon it comes, ends the note (events before it are late ones).
        self.remember_deleted(sb);
        self.backend.stop(sb).await.map_err(Error::internal)?;
        self.backend.remove(sb).await.map_err(Error::internal)?;
        self.store.delete(&sb.id).await?;
        self.routes.remove(&sb.id);
        tracing::info!(sandbox = %sb.id, "deleted");
        Ok(())
    }

    /// Forgets the backend handle of a sandbox that no longer runs, unless the backend's
    /// handle outlives a stop (see [`Backend::handle_outlives_stop`]).
    fn forget_handle(&self, sb: &mut Sandbox) {
        if self.backend.handle_outlives_stop() {
            // The pod, and with it its address, is gone.
            sb.netns_pid = None;
            sb.ip_address = None;
        } else {
            sb.clear_handle();
        }
    }

    /// Notes that `sb` is being deleted (see `deleted`), forgetting older deletions.
    fn remember_deleted(&self, sb: &Sandbox) {
        let now = std::time::Instant::now();
        let mut deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
        deleted.retain(|_, d| now.duration_since(d.at) < DELETED_MEMORY);
        let namespace = self.backend.service(sb).map(|s| s.namespace);
        deleted.insert(sb.id.clone(), Deletion { at: now, namespace });
    }

    /// Forgets the deletions the cluster has confirmed (`gone`): its watch reported them.
    fn forget_deleted(&self, gone: impl Fn(&str, &Deletion) -> bool) {
        let mut deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
        deleted.retain(|id, d| !gone(id, d));
    }

    /// Whether `id` was deleted here within [`DELETED_MEMORY`] and the cluster has not yet
    /// confirmed it.
    fn deleted_lately(&self, id: &str) -> bool {
        let deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
        deleted
            .get(id)
            .is_some_and(|d| d.at.elapsed() < DELETED_MEMORY)
    }

    /// Applies an exit reported by the backend, unless it belongs to an older incarnation or
    /// the manager itself is stopping the sandbox. An extra instance of a sandbox that runs
    /// is to be restarted: its id and when (with backoff) are returned.
    pub async fn on_exit(&self, exit: Exit) -> Option<(String, std::time::Duration)> {
        let lock = self.lock_for(&exit.id);
        let _guard = lock.lock().await;
        let Ok(Some(mut sb)) = self.store.get(&exit.id).await else {
            return None;
        };
        if sb.generation != exit.generation || sb.status != Status::Running {
            return None;
        }
        if sb.pool.is_some() {
            // Nobody's yet: it goes, and the pool starts another.
            tracing::warn!(sandbox = %sb.id, code = ?exit.code, signal = ?exit.signal, "a warm sandbox ended while it waited; removing it");
            self.remove_warm_locked(&mut sb).await;
            self.forget_lock(&sb.id);
            return None;
        }
        let (status, mut reason) = match (exit.code, exit.signal) {
            (Some(0), _) => (Status::Stopped, "exited with code 0".to_string()),
            (Some(c), _) => (Status::Failed, format!("exited with code {c}")),
            (None, Some(s)) => (Status::Failed, format!("killed by signal {s}")),
            (None, None) => (Status::Stopped, "exited".to_string()),
        };
        if let Some(last) = exit.last_output.filter(|_| status == Status::Failed) {
            // What a user needs to see on the failure page and in the API.
            let last: String = last.chars().take(600).collect();
            reason = format!("{reason}; last output: {last}");
        }
        tracing::info!(sandbox = %sb.id, %reason, "sandbox process ended");
        sb.status = status;
        sb.status_reason = Some(reason);
        sb.clear_handle();
        if let Err(e) = self.save(&mut sb).await {
            tracing::error!(sandbox = %sb.id, error = %e, "could not record exit");
        }
        sb.replica_of
            .is_some()
            .then(|| (sb.id.clone(), self.restart_delay(&sb.id)))
    }

    /// How long to wait before restarting instance `id` now: doubling for restarts in a row.
    fn restart_delay(&self, id: &str) -> std::time::Duration {
        let mut restarts = self.restarts.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let streak = match restarts.get(id) {
            Some(&(n, last)) if now.duration_since(last) < RESTART_MAX => n + 1,
            _ => 0,
        };
        restarts.insert(id.to_string(), (streak, now));
        RESTART_FIRST
            .saturating_mul(1 << streak.min(6))
            .min(RESTART_MAX)
    }

    /// Restarts an extra instance that ended on its own, if it is still ended and its
    /// sandbox still runs (a stop, delete or start meanwhile decides otherwise).
    async fn heal(&self, id: &str) {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Ok(Some(mut inst)) = self.store.get(id).await else {
            self.restarts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            return;
        };
        let running = match &inst.replica_of {
            Some(of) => self
                .routes
                .get(of)
                .is_some_and(|s| s.status == Status::Running),
            None => false,
        };
        if !running || !matches!(inst.status, Status::Failed | Status::Stopped) {
            return;
        }
        tracing::info!(sandbox = ?inst.replica_of, instance = %id, "restarting an instance that ended");
        if let Err(e) = self.start_one_locked(&mut inst).await {
            tracing::warn!(instance = %id, error = %e, "could not restart an instance");
        }
    }

    /// Consumes backend exit reports until the channel closes; an instance that ended is
    /// restarted after its backoff.
    pub async fn watch_exits(self: Arc<Self>, mut exits: UnboundedReceiver<Exit>) {
        while let Some(exit) = exits.recv().await {
            self.exited(exit).await;
        }
    }

    /// Applies an exit ([`Manager::on_exit`]); an instance that ended is restarted after its
    /// backoff.
    async fn exited(self: &Arc<Self>, exit: Exit) {
        if let Some((id, after)) = self.on_exit(exit).await {
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                me.heal(&id).await;
            });
        }
    }

    /// On a shared store, by the lease holder: finds running sandboxes whose process or
    /// container has ended although no gateway reported it (the one watching it died: a
    /// follower's sandboxes are watched only by it until the lease changes hands). One seen
    /// ended is a suspect; seen ended again at the next sweep with its record unchanged (a
    /// live watcher would have recorded the exit within milliseconds), its exit is applied
    /// here. `suspects` carries the suspects (id → generation and last write) between sweeps.
    pub async fn sweep_ended(
        self: &Arc<Self>,
        suspects: &mut HashMap<String, (i64, chrono::DateTime<chrono::Utc>)>,
    ) -> Result<(), Error> {
        let running: Vec<Sandbox> = self
            .store
            .list()
            .await?
            .into_iter()
            .filter(|sb| sb.status == Status::Running)
            .collect();
        let mut seen = HashMap::new();
        for sb in running {
            if !self.backend.ended(&sb).await {
                continue;
            }
            let mark = (sb.generation, sb.updated_at);
            if suspects.get(&sb.id) == Some(&mark) {
                tracing::warn!(sandbox = %sb.id, "a sandbox ended unreported (its gateway is gone): recording the exit");
                self.exited(Exit {
                    id: sb.id.clone(),
                    generation: sb.generation,
                    code: None,
                    signal: None,
                    last_output: None,
                })
                .await;
            } else {
                seen.insert(sb.id, mark);
            }
        }
        *suspects = seen;
        Ok(())
    }

    /// Consumes the Kubernetes backend's reports of the cluster's Sandboxes until the
    /// channel closes.
    pub async fn watch_observed(self: Arc<Self>, mut observed: UnboundedReceiver<Observed>) {
        while let Some(report) = observed.recv().await {
            self.observe(report).await;
        }
    }

    /// Folds one report of the cluster's Sandboxes into the store, then the route table.
    pub async fn observe(&self, report: Observed) {
        match report {
            Observed::Applied(d) => self.observe_one(d, false).await,
            Observed::Deleted(id) => {
                // The cluster confirms the deletion: an event after this one is of a new
                // Sandbox of the same name (re-created with kubectl), not a late one.
                self.forget_deleted(|deleted, _| deleted == id);
                self.observe_gone(&id, None).await
            }
            Observed::Snapshot {
                namespace,
                all,
                listed_at,
            } => {
                // The list is of one namespace: it says nothing of the others' Sandboxes.
                let listed = |ns: Option<&str>| ns.is_none_or(|ns| ns == namespace);
                let present: std::collections::HashSet<String> =
                    all.iter().map(|d| d.id.clone()).collect();
                self.forget_deleted(|deleted, d| {
                    listed(d.namespace.as_deref()) && !present.contains(deleted)
                });
                for d in all {
                    self.observe_one(d, true).await;
                }
                let known = match self.store.list().await {
                    Ok(known) => known,
                    Err(e) => {
                        tracing::warn!(error = %e, "listing sandboxes to resync");
                        return;
                    }
                };
                for sb in known {
                    let ns = self.backend.service(&sb).map(|s| s.namespace);
                    if sb.listed() && listed(ns.as_deref()) && !present.contains(&sb.id) {
                        self.observe_gone(&sb.id, Some(listed_at)).await;
                    }
                }
            }
        }
    }

    /// A Sandbox the cluster no longer has: its record goes, unless it was written after
    /// `listed_at` (a create under way when the list was taken) or is not yet backed by one.
    async fn observe_gone(&self, id: &str, listed_at: Option<chrono::DateTime<chrono::Utc>>) {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        let Ok(Some(sb)) = self.store.get(id).await else {
            return;
        };
        if sb.backend_ref.is_none() || listed_at.is_some_and(|t| sb.updated_at >= t) {
            return;
        }
        if let Err(e) = self.store.delete(id).await {
            tracing::warn!(sandbox = %id, error = %e, "could not forget a deleted Sandbox");
            return;
        }
        self.routes.remove(id);
        self.forget_lock(id);
        tracing::info!(sandbox = %id, "the Sandbox is gone from the cluster");
    }

    /// A Sandbox as the cluster reports it: a new record for one created elsewhere (with
    /// `kubectl`), else its record's status and pod IP brought up to date.
    async fn observe_one(&self, d: Discovered, listed: bool) {
        let lock = self.lock_for(&d.id);
        let _guard = lock.lock().await;
        // Asked under the lock: a create, start or stop holding it has noted what it saw, and
        // a report older than that (queued behind it) changes nothing.
        if !self
            .backend
            .fresh(&d.reference, d.version.as_deref(), listed)
        {
            return;
        }
        let status = if d.suspended {
            Status::Stopped
        } else if d.ready {
            Status::Running
        } else {
            Status::Creating
        };
        let ip = if status == Status::Running {
            d.pod_ip.clone()
        } else {
            None
        };
        let result = match self.store.get(&d.id).await {
            Ok(Some(mut sb)) => {
                if sb.status == Status::Deleting
                    || (sb.status == status
                        && sb.ip_address == ip
                        && sb.backend_ref.as_deref() == Some(d.reference.as_str()))
                {
                    return;
                }
                if sb.ip_address != ip {
                    // A cached route never reaches the previous pod.
                    sb.generation += 1;
                }
                sb.status = status;
                sb.status_reason =
                    (status == Status::Creating).then(|| "the Sandbox is not Ready".to_string());
                sb.ip_address = ip;
                sb.backend_ref = Some(d.reference.clone());
                self.save(&mut sb).await
            }
            // A late event of a Sandbox deleted here (a status write from before the delete,
            // say): not a new one.
            Ok(None) if self.deleted_lately(&d.id) => return,
            Ok(None) => self.adopt_discovered(&d, status, ip).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            tracing::warn!(sandbox = %d.id, resource = %d.resource, error = %e, "could not record a Sandbox");
        }
    }

    /// Records a Sandbox created outside the gateway: nobody's to reap (never idle),
    /// persistent, routed at `/{user}/{name}/` on the backend's port.
    async fn adopt_discovered(
        &self,
        d: &Discovered,
        status: Status,
        ip: Option<String>,
    ) -> Result<(), Error> {
        let mut sb = Sandbox {
            owner: d.owner.clone(),
            name: d.name.clone(),
            runtime: DISCOVERED_RUNTIME.into(),
            mode: Mode::Persistent,
            dev_server: true,
            port: self.backend.default_port(),
            status,
            backend_ref: Some(d.reference.clone()),
            ip_address: ip,
            idle_timeout: Some(0),
            network: model::Network::Egress,
            ..Sandbox::blank(&d.id)
        };
        self.store.create(&mut sb, None, &|_| true).await?;
        self.routes.put(sb);
        tracing::info!(sandbox = %d.id, resource = %d.resource, "discovered a Sandbox");
        Ok(())
    }

    /// After a restart (or, on a shared store, when this gateway takes the lease): loads
    /// every record into the route table, re-adopts what still runs, records what does not,
    /// and finishes interrupted creates and deletes. On a shared store an operation younger
    /// than [`STALE_OPERATION`] and warm sandboxes are left alone: another gateway may be
    /// carrying it out, or own them.
    pub async fn reconcile(&self) -> Result<(), Error> {
        let shared = self.store.shared();
        let all = self.store.list().await?;
        let sandboxes: std::collections::HashSet<String> = all
            .iter()
            .filter(|sb| sb.replica_of.is_none() && sb.status != Status::Deleting)
            .map(|sb| sb.id.clone())
            .collect();
        for listed in all {
            let lock = self.lock_for(&listed.id);
            let _guard = lock.lock().await;
            // Read again: deleting a sandbox above removed its instances.
            let Some(mut sb) = self.store.get(&listed.id).await? else {
                continue;
            };
            let in_flight = matches!(
                sb.status,
                Status::Creating | Status::Stopping | Status::Deleting
            ) && model::now() - sb.updated_at < STALE_OPERATION;
            if shared && (sb.pool.is_some() || in_flight) {
                if sb.pool.is_none() {
                    self.routes.put(sb);
                }
                continue;
            }
            if sb.pool.is_some() {
                self.readopt_warm(sb).await?;
                continue;
            }
            if sb
                .replica_of
                .as_ref()
                .is_some_and(|of| !sandboxes.contains(of))
            {
                // An instance whose sandbox is gone (a delete cut short): it goes too.
                tracing::info!(sandbox = %sb.id, "removing an instance of a deleted sandbox");
                self.delete_one_locked(&mut sb).await?;
                continue;
            }
            match sb.status {
                Status::Deleting => {
                    self.delete_locked(&mut sb).await?;
                    continue;
                }
                Status::Running => match self.backend.adopt(&sb).await {
                    Ok(Some(started)) => {
                        started.apply_to(&mut sb);
                        tracing::info!(sandbox = %sb.id, "re-adopted running sandbox");
                    }
                    Ok(None) => {
                        sb.status = Status::Stopped;
                        sb.status_reason = Some("not running after gateway restart".into());
                        self.forget_handle(&mut sb);
                    }
                    Err(e) => {
                        sb.status = Status::Failed;
                        sb.status_reason = Some(e.to_string());
                    }
                },
                Status::Creating | Status::Stopping => {
                    let _ = self.backend.stop(&sb).await;
                    sb.status = Status::Stopped;
                    sb.status_reason = Some("interrupted by a gateway restart".into());
                    self.forget_handle(&mut sb);
                }
                Status::Stopped | Status::Failed => {}
            }
            self.routes.put(sb.clone());
            self.store.update(&sb).await?;
        }
        Ok(())
    }

    /// After a restart, a warm sandbox still running what its pool runs waits in the pool
    /// again; any other (ended, interrupted, a pool that shrank or now runs something else)
    /// is removed.
    async fn readopt_warm(&self, mut sb: Sandbox) -> Result<(), Error> {
        let runtime = sb.pool.clone().unwrap_or_default();
        let current = match self.pool_template(&runtime) {
            Ok((template, _)) => same_process(&sb, &template),
            Err(_) => false,
        };
        if sb.status == Status::Running && current && self.warm.has_room(&runtime) {
            if let Ok(Some(started)) = self.backend.adopt(&sb).await {
                started.apply_to(&mut sb);
                self.store.update(&sb).await?;
                tracing::info!(sandbox = %sb.id, %runtime, "re-adopted warm sandbox");
                self.warm.put(&runtime, sb.id);
                return Ok(());
            }
        }
        tracing::info!(sandbox = %sb.id, %runtime, "removing a warm sandbox left from before the restart");
        // A failure is logged: it must not keep the gateway from starting.
        self.remove_warm_locked(&mut sb).await;
        Ok(())
    }

    /// Graceful shutdown: unless the backend's sandboxes may outlive the gateway (containers),
    /// stops every running sandbox so no process outlives it; the records stay, marked
    /// `stopped`, and can be started again. Warm sandboxes are removed on every backend:
    /// nobody's, they hold nothing worth keeping, and a gateway stopped for good must not
    /// leave them running.
    pub async fn shutdown(&self) {
        let mut waiting = self.warm.drain();
        waiting.extend(self.warm.take_condemned());
        let removals = waiting.iter().map(|id| self.discard(id));
        // On a shared store the other gateways serve these sandboxes on.
        if !self.backend.stop_on_shutdown() || self.store.shared() {
            futures_util::future::join_all(removals).await;
            return;
        }
        let running: Vec<_> = self
            .routes
            .all()
            .into_iter()
            .filter(|s| {
                s.status == Status::Running
                    || s.instances().iter().any(|i| i.status == Status::Running)
            })
            .collect();
        let stops = running.iter().map(|sb| async move {
            let lock = self.lock_for(&sb.id);
            let _guard = lock.lock().await;
            if let Ok(mut sb) = self.get(&sb.id).await {
                if let Err(e) = self.stop_locked(&mut sb, "gateway shut down").await {
                    tracing::error!(sandbox = %sb.id, error = %e, "could not stop on shutdown");
                }
            }
        });
        futures_util::future::join(
            futures_util::future::join_all(stops),
            futures_util::future::join_all(removals),
        )
        .await;
        self.backend.closed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys() {
        assert!(valid_env_key("PATH"));
        assert!(valid_env_key("_x1"));
        assert!(!valid_env_key("1X"));
        assert!(!valid_env_key("A-B"));
        assert!(!valid_env_key(""));
    }
}
