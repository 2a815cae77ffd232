//! sandgate: one secure entry point that creates sandboxes and proxies HTTP, WebSocket and
//! streaming traffic to the ports inside them.
//!
//! Crate map, by layer (each module imports only from the layers below it):
//! - [`server`], [`workers`]: the listener, one event loop per core ([`event_loop`]), TLS
//!   handshakes for a [`tls`] listener.
//! - [`fastlane`], [`hyperlane`]: the two proxy lanes (plain HTTP/1.1 from socket buffers;
//!   hyper's h1 + h2c for everything else).
//! - [`gateway`]: what both lanes share.
//! - [`policy`]: the one request policy (check, admit, finish).
//! - [`proxy`], [`api`]: forwarding, pooling, upgrades, the field table; the control API.
//! - [`manager`], [`admission`], [`rates`], [`addresses`], [`routing`], [`lifecycle`]: every
//!   change to a sandbox; what an admitted request holds; rate limits and the
//!   failed-credential throttle; client addresses and allowlists; request → route; the idle
//!   reaper.
//! - [`auth`], [`audit`]: who a request acts as; the audit log.
//! - [`backend`], [`store`], [`routes`], [`runtimes`], [`error`], [`tls`], [`config`]: what
//!   runs sandboxes; durable state; the in-memory route table; runtimes; errors; certificates
//!   (loaded, reloaded); configuration.
//! - [`model`]: the sandbox record, ids, statuses.

pub mod access;
pub mod addresses;
pub mod admission;
pub mod api;
pub mod audit;
pub mod auth;
pub mod backend;
pub mod balance;
pub mod breaker;
pub mod config;
pub mod datadir;
pub mod error;
pub mod event_loop;
pub mod exec;
pub mod exec_files;
pub mod fastlane;
pub mod files;
pub mod gateway;
pub mod hyperlane;
pub mod lifecycle;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod proxy;
pub mod rates;
pub mod routes;
pub mod routing;
pub mod runtimes;
pub mod server;
pub mod store;
pub mod tls;
pub mod warm;
pub mod workers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admission::Limits;
use crate::api::AppState;
use crate::audit::Audit;
use crate::auth::Auth;
use crate::backend::docker::DockerBackend;
use crate::backend::process::{self, ProcessBackend, ProcessIsolation};
use crate::backend::Backend;
use crate::config::{BackendKind, Config, Isolation};
use crate::manager::Manager;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::rates::Rates;
use crate::routes::Routes;
use crate::store::{SqlStore, Store};
use crate::workers::Workers;

/// Why the gateway could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Locked(#[from] datadir::LockError),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("authentication: {0}")]
    Auth(#[from] auth::LoadError),
    #[error("startup reconciliation failed: {0}")]
    Reconcile(#[from] error::Error),
    #[error("isolation = netns, but this gateway cannot create network namespaces (needs root with CAP_SYS_ADMIN and the unshare and ip programs)")]
    NoIsolation,
    #[error("isolation = sandbox, but this gateway cannot jail sandboxes (needs root with CAP_SYS_ADMIN and the bwrap and setpriv programs: apt install bubblewrap util-linux)")]
    NoJail,
    #[error("the sandboxes' uid range ({first}-{last}) is in use on this host: {0}", first = process::jail::UID_BASE, last = process::jail::UID_BASE + process::jail::UID_COUNT - 1)]
    UidClash(String),
    #[error("kubernetes backend: {0}")]
    Kube(#[from] backend::kubernetes::KubeError),
    #[error("docker backend: {0}")]
    Docker(String),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics listener {addr} (SANDGATE_METRICS_ADDR): {source}")]
    MetricsListener {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// How far process sandboxes are kept apart on this host.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ProcessMode {
    Sandbox,
    Netns,
    SharedHost,
}

/// `isolation` resolved on this host (`auto`: the strongest it allows); an explicit mode it
/// cannot give is an error.
fn process_mode(isolation: Isolation) -> Result<ProcessMode, RunError> {
    let (jail, netns) = (process::jail::available(), process::isolation_available());
    Ok(match isolation {
        Isolation::None => ProcessMode::SharedHost,
        Isolation::Auto | Isolation::Sandbox if jail => ProcessMode::Sandbox,
        Isolation::Sandbox => return Err(RunError::NoJail),
        Isolation::Auto | Isolation::Netns if netns => ProcessMode::Netns,
        Isolation::Netns => return Err(RunError::NoIsolation),
        Isolation::Auto => ProcessMode::SharedHost,
    })
}

/// What `isolation` means on this host for the process backend (`auto` resolved), as
/// `/health` will report it; a refused explicit mode says so.
pub fn resolved_isolation(config: &Config) -> &'static str {
    if config.backend == BackendKind::Docker {
        return "container (netns or published ports: decided when the engine answers)";
    }
    match process_mode(config.isolation) {
        Ok(ProcessMode::Sandbox) => "sandbox",
        Ok(ProcessMode::Netns) => "netns",
        Ok(ProcessMode::SharedHost) => "shared-host",
        Err(_) => "refused: this host lacks what it needs",
    }
}

/// Builds the configured backend.
async fn build_backend(
    config: &Config,
    store: &dyn Store,
    sandboxes_dir: std::path::PathBuf,
    exits: tokio::sync::mpsc::UnboundedSender<backend::Exit>,
    observed: tokio::sync::mpsc::UnboundedSender<backend::kubernetes::Observed>,
    shutdown: &CancellationToken,
) -> Result<Arc<dyn Backend>, RunError> {
    Ok(match config.backend {
        BackendKind::Process => {
            let jail = || -> Result<ProcessIsolation, RunError> {
                if let Some(clash) = process::jail::range_clash() {
                    return Err(RunError::UidClash(clash));
                }
                // What a sandbox must not see even where a bound directory would show it.
                let mut hidden = vec![config.data_dir.clone()];
                hidden.extend(config.config_file.clone());
                hidden.extend(config.tls.as_ref().map(|t| t.key.clone()));
                let hidden = hidden
                    .into_iter()
                    .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
                    .collect();
                let mut jail = process::jail::Jail::new(
                    sandboxes_dir.clone(),
                    config.sandbox_ro_paths.clone(),
                    hidden,
                );
                // Behind systemd-resolved's loopback stub, sandboxes read its upstreams.
                if let Some((source, target)) = process::egress::resolver_bind() {
                    jail = jail.with_file(source, target);
                }
                let egress = if process::egress::available() {
                    let id = datadir::gateway_id(&config.data_dir)?;
                    Some(process::egress::Egress::new(
                        &id,
                        &config.egress_subnet,
                        &config.egress_deny,
                    ))
                } else {
                    tracing::warn!(
                        "network = egress is unavailable: install iproute2 and nftables"
                    );
                    None
                };
                Ok(ProcessIsolation::Sandbox {
                    jail: Box::new(jail),
                    egress,
                    network: config.network,
                })
            };
            let isolation = match process_mode(config.isolation)? {
                ProcessMode::Sandbox => jail()?,
                ProcessMode::Netns => {
                    if config.isolation == Isolation::Auto {
                        tracing::warn!(
                            "isolation: netns (sandboxes run as root on the host's filesystem); \
                             install bubblewrap for isolation = sandbox"
                        );
                    }
                    ProcessIsolation::Netns
                }
                ProcessMode::SharedHost => ProcessIsolation::SharedHost,
            };
            Arc::new(
                ProcessBackend::new(sandboxes_dir, config.stop_grace, exits, isolation)
                    .with_log_writer(config.program.clone()),
            )
        }
        BackendKind::Docker => Arc::new(
            DockerBackend::open(config, store, exits)
                .await
                .map_err(RunError::Docker)?,
        ),
        BackendKind::Kubernetes => {
            let kube = backend::kubernetes::KubeBackend::connect(config).await?;
            kube.watch(observed, shutdown.child_token());
            Arc::new(kube)
        }
    })
}

/// Runs the gateway on an already-bound listener until `shutdown` fires; then drains
/// connections and, for backends whose sandboxes must not outlive the gateway (processes),
/// stops every running sandbox (records are kept, marked `stopped`). Containers keep running
/// and are re-adopted by the next start.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let config = Arc::new(config);
    // First, so that bad certificate files stop the gateway before anything else starts.
    let tls = match &config.tls {
        Some(files) => Some(Arc::new(tls::Tls::load(files)?)),
        None => None,
    };
    // Bound first too: an address in use stops the gateway before anything starts.
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::MetricsListener { addr, source })?,
        ),
        None => None,
    };
    let data_dir = &config.data_dir;
    let sandboxes_dir = data_dir.join("sandboxes");
    std::fs::create_dir_all(&sandboxes_dir).map_err(|source| RunError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    // Before the store or any sandbox is touched: a second gateway here must change nothing.
    let mut dir_lock = datadir::lock(data_dir)?;
    dir_lock.record(listener.local_addr()?)?;
    let store: Arc<dyn Store> = Arc::new(SqlStore::open(&config.database_url).await?);
    // On a store shared with other gateways: their changes, and the lease on background
    // duties (followed until the very end, after this gateway's own last writes).
    let following = CancellationToken::new();
    // An early return (a failed start) stops following too.
    let _following_guard = following.clone().drop_guard();
    let follow = store.follow(following.clone()).await;
    let auth = Arc::new(Auth::load(store.clone(), &config).await?);
    let audit = Audit::start(store.clone());
    let (exits_tx, exits_rx) = tokio::sync::mpsc::unbounded_channel();
    let (observed_tx, observed_rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = build_backend(
        &config,
        store.as_ref(),
        sandboxes_dir,
        exits_tx,
        observed_tx,
        &shutdown,
    )
    .await?;
    let routes = Arc::new(Routes::default());
    let metrics = Arc::new(Metrics::new(config.workers, config.metrics));
    let mut manager = Manager::new(
        config.clone(),
        store,
        backend.clone(),
        routes.clone(),
        metrics.clone(),
    );
    let mut changes = None;
    if let Some(f) = follow {
        manager = manager.with_leader(f.leader);
        changes = Some(f.changes);
    }
    let manager = Arc::new(manager);
    if manager.leads() {
        manager.reconcile().await?;
    } else {
        // Another gateway holds the lease: it reconciles; this one only routes.
        manager.resync_routes().await?;
    }
    // On a shared store the lease holder also records the exits of sandboxes whose watcher
    // (another gateway) died.
    let ended_sweeper = changes
        .is_some()
        .then(|| tokio::spawn(lifecycle::sweep_ended(manager.clone(), following.clone())));
    let follower = changes.map(|changes| {
        tokio::spawn(lifecycle::follow_store(
            manager.clone(),
            auth.clone(),
            routes.clone(),
            config.idle_timeout,
            changes,
            following.clone(),
        ))
    });
    let exit_watcher = tokio::spawn(manager.clone().watch_exits(exits_rx));
    // The Kubernetes backend's view of the cluster (nothing comes on other backends).
    let observer = tokio::spawn(manager.clone().watch_observed(observed_rx));
    // Cancelled when the listeners stop accepting (below): upgraded streams end then.
    let stop = CancellationToken::new();
    let proxy = Arc::new(
        Proxy::new(
            backend,
            config.proxy_timeout,
            config.body_timeout,
            config.max_retries,
            config.workers,
        )
        .with_scheme(config.scheme())
        .with_metrics(metrics.clone())
        .with_stopping(stop.clone()),
    );
    let limits = Arc::new(
        Limits::new(
            config.max_concurrent_requests,
            config.max_requests_per_client,
            config.workers,
            metrics.clone(),
        )
        .with_access_log(config.access_log)
        .with_circuit(admission::CircuitRule {
            failures: config.circuit_failures,
            open_ms: config.circuit_open.as_millis() as u64,
        }),
    );
    let rates = Arc::new(Rates::new(&config));
    let bound_port = listener.local_addr()?.port();
    let sweeper = {
        let proxy = proxy.clone();
        let auth = auth.clone();
        let rates = rates.clone();
        let token = shutdown.clone();
        let store = manager.store().clone();
        let retention = config.audit_retention_days;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            let mut ticks: u64 = 0;
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        // Hourly (and at start): audit records past their retention go.
                        if let (Some(days), 0) = (retention, ticks % 240) {
                            let before = chrono::Utc::now() - chrono::Duration::days(days.into());
                            if let Err(e) = store.prune_audit(before).await {
                                tracing::warn!(error = %e, "could not prune the audit log");
                            }
                        }
                        if ticks % 40 == 39 {
                            auth.refresh_jwks().await;
                        }
                        ticks += 1;
                        proxy.pool().sweep();
                        proxy.raw_pools().iter().for_each(|p| p.sweep());
                        rates.sweep();
                        auth.flush_last_used().await;
                        auth.sweep();
                    }
                }
            }
        })
    };
    let cert_watcher = tls
        .as_ref()
        .map(|tls| tokio::spawn(tls.clone().watch(tls::RELOAD_POLL, shutdown.child_token())));
    let reaper = tokio::spawn(lifecycle::reap_idle(
        manager.clone(),
        routes.clone(),
        config.idle_timeout,
        shutdown.clone(),
    ));
    let warmer = tokio::spawn(lifecycle::keep_warm(manager.clone(), shutdown.clone()));
    let checker = config.health_interval.map(|interval| {
        tokio::spawn(lifecycle::check_health(
            routes.clone(),
            manager.backend().clone(),
            interval,
            config.health_rise,
            config.health_fall,
            metrics.clone(),
            shutdown.clone(),
        ))
    });
    let execs: Arc<exec::registry::Registry> = Default::default();
    let terminals: Arc<exec::terminals::Terminals> = Default::default();
    let state = AppState {
        public_base: config.public_base(bound_port).into(),
        config: config.clone(),
        auth: auth.clone(),
        audit: audit.clone(),
        manager: manager.clone(),
        routes,
        proxy,
        limits,
        metrics: metrics.clone(),
        rates,
        execs: execs.clone(),
        terminals: terminals.clone(),
        bound_port,
        started: Instant::now(),
        draining: shutdown.clone(),
        stopping: stop.clone(),
    };
    tracing::info!(
        addr = %listener.local_addr()?,
        scheme = config.scheme(),
        backend = config.backend.as_str(),
        data_dir = %config.data_dir.display(),
        auth = if config.auth_enabled { "required" } else { "off" },
        "sandgate listening"
    );
    if !config.auth_enabled {
        tracing::warn!(
            "authentication is off (AUTH_ENABLED=false): the gateway is open to anyone who \
             can reach its loopback address"
        );
    }
    let metrics_server = match metrics_listener {
        Some(listener) => {
            tracing::info!(addr = %listener.local_addr()?, "metrics listening");
            let app = axum::Router::new()
                .route("/metrics", axum::routing::get(api::metrics::scrape))
                .with_state(state.clone());
            let stop = stop.clone();
            Some(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::warn!(error = %e, "the metrics listener stopped");
                }
            }))
        }
        None => None,
    };
    let mut gateway = gateway::Gateway::new(state);
    gateway.tls = tls.as_ref().map(|tls| tls.acceptor());
    let gateway = Arc::new(gateway);
    // Each extra worker gets a listening socket of its own on the same address (one
    // SO_REUSEPORT group, see `workers`); this loop keeps the one it was given.
    let listener = listener.into_std()?;
    // Shutting down: `/health/ready` turns 503 at once (`draining`, which is `shutdown`), the
    // listeners keep serving for `shutdown_delay` so a load balancer sees it and stops
    // sending, then they stop accepting and drain.
    let delayed_stop = {
        let (shutdown, stop, delay) = (shutdown.clone(), stop.clone(), config.shutdown_delay);
        tokio::spawn(async move {
            shutdown.cancelled().await;
            if !delay.is_zero() {
                tracing::info!(
                    ?delay,
                    "shutting down: not ready; serving on until the delay ends"
                );
                tokio::time::sleep(delay).await;
            }
            stop.cancel();
        })
    };
    let mut workers = Workers::spawn(config.workers - 1, &listener, &gateway, &stop)?;
    let served = server::serve(listener, gateway, stop.clone()).await;
    if served.is_err() {
        // This loop cannot listen: stop everything the usual way, then report why.
        shutdown.cancel();
        stop.cancel();
    }
    delayed_stop.abort();
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    workers.drained().await;
    let _ = reaper.await;
    // Starts of warm sandboxes in flight finish or clean up before the manager stops.
    let _ = warmer.await;
    if let Some(checker) = checker {
        let _ = checker.await;
    }
    // Commands and terminals end with the gateway, even in containers that outlive it.
    tokio::join!(execs.kill_all(), terminals.kill_all());
    manager.shutdown().await;
    workers.finish().await;
    sweeper.abort();
    auth.flush_last_used().await;
    audit.flush().await;
    access::flush();
    exit_watcher.abort();
    following.cancel();
    if let Some(follower) = follower {
        let _ = follower.await;
    }
    if let Some(sweeper) = ended_sweeper {
        let _ = sweeper.await;
    }
    observer.abort();
    drop(dir_lock);
    if let Some(watcher) = cert_watcher {
        watcher.abort();
    }
    Ok(served?)
}
