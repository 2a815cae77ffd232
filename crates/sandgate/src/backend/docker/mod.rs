//! Docker backend: each sandbox is a container `sandgate-{id}` on a Docker engine, driven
//! through the Engine API (bollard; `DOCKER_HOST`, else the local socket), never the CLI.
//!
//! Containers carry the labels `sandgate.sandbox`, `sandgate.team`, `sandgate.gateway` (this
//! gateway's id, kept in `<data_dir>/gateway-id`) and `sandgate.generation` (the generation
//! that created the container), and the CPU, memory and process limits of the sandbox. They
//! run with `no-new-privileges` and without the default capabilities a dev server has no use
//! for ([`DROPPED_CAPS`]). The runtime's image must already be on the engine: nothing is ever
//! pulled.
//!
//! Reaching ports: with the privilege to enter namespaces and a local engine
//! (`container+netns`), the proxy connects to `127.0.0.1:port` inside the container's network
//! namespace (through its init process), so a dev server bound to localhost is reachable on
//! any port and nothing is published. Otherwise (`container+published-ports`) the sandbox's
//! port is published on `127.0.0.1:{allocated_port}` and the server must listen on `0.0.0.0`
//! (`HOST` says so).
//!
//! A stopped container is kept (its files are the sandbox's state) and started again by the
//! next start; `remove` deletes it with its anonymous volumes. A task per running container
//! waits on it and reports its exit, like the process backend does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HostConfig, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedSender;

mod exec;
mod pty;

use super::exec::{ExecError, ExecHandle, ExecSpec};
use super::{Backend, BackendError, Exit, LogStream, Started};
use crate::config::{Config, Isolation};
use crate::datadir::{gateway_id, GATEWAY_ID_FILE};
use crate::model::Sandbox;
use crate::runtimes::{Runtime, Runtimes};
use crate::store::Store;

/// Dev-server port of a container when the create names none.
pub const DEFAULT_PORT: u16 = 3000;
/// Capabilities of Docker's default set that containers are created without: raw sockets
/// (packet spoofing on the sandbox network), device nodes, audit records, file capabilities,
/// capability transfer and `chroot`. What package managers and dev servers use (`chown`,
/// file ownership, `setuid`/`setgid` to drop to a user, `kill`, binding ports below 1024) stays.
pub const DROPPED_CAPS: [&str; 6] = [
    "NET_RAW",
    "MKNOD",
    "AUDIT_WRITE",
    "SETFCAP",
    "SETPCAP",
    "SYS_CHROOT",
];

pub const LABEL_SANDBOX: &str = "sandgate.sandbox";
pub const LABEL_TEAM: &str = "sandgate.team";
pub const LABEL_GATEWAY: &str = "sandgate.gateway";
pub const LABEL_GENERATION: &str = "sandgate.generation";
/// The published-port spec the container was created with (empty in netns mode); a start
/// re-creates a stopped container whose spec no longer matches.
pub const LABEL_PORTS: &str = "sandgate.ports";
/// Working directory (and `HOME`) of a sandbox inside its container.
pub const WORK_DIR: &str = "/sandbox";
/// Bound for reaching the engine at startup.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The container name of sandbox `id`.
pub fn container_name(id: &str) -> String {
    format!("sandgate-{id}")
}

/// The HTTP status of an engine error answer, if it is one.
fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_not_found(e: &DockerError) -> bool {
    status_of(e) == Some(404)
}

/// Whether the engine answers on the local machine, so container pids are ours to enter.
fn engine_is_local() -> bool {
    match std::env::var("DOCKER_HOST") {
        Ok(h) if !h.is_empty() => h.starts_with("unix://"),
        _ => true,
    }
}

pub struct DockerBackend {
    docker: Docker,
    gateway: String,
    runtimes: Runtimes,
    network: Option<String>,
    grace: Duration,
    /// Connect inside containers' network namespaces (else: published ports).
    netns: bool,
    exits: UnboundedSender<Exit>,
}

impl DockerBackend {
    /// Connects to the engine (`DOCKER_HOST`, else the local socket), agrees on an API
    /// version, and picks how ports are reached from `config.isolation`. Exits are reported on
    /// `exits`.
    pub async fn connect(
        config: &Config,
        gateway: String,
        exits: UnboundedSender<Exit>,
    ) -> Result<DockerBackend, String> {
        let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "the local socket".into());
        let unreachable = |e: &dyn std::fmt::Display| {
            format!(
                "cannot reach the Docker engine at {host}: {e} \
                 (is dockerd running? DOCKER_HOST selects another engine)"
            )
        };
        let docker = Docker::connect_with_defaults().map_err(|e| unreachable(&e))?;
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| unreachable(&format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(&e))?;
        let can_enter = super::netns::available() && engine_is_local();
        let netns = match config.isolation {
            Isolation::None => false,
            Isolation::Auto => can_enter,
            // A container already has its own user and filesystem; `sandbox` asks for the
            // same namespace dial as `netns`.
            Isolation::Netns | Isolation::Sandbox if can_enter => true,
            Isolation::Netns | Isolation::Sandbox => {
                return Err(
                    "isolation = netns or sandbox needs root with CAP_SYS_ADMIN \
                            and a Docker engine on this machine"
                        .into(),
                )
            }
        };
        tracing::info!(
            gateway = %gateway,
            api = %docker.client_version(),
            mode = if netns { "netns" } else { "published ports" },
            "connected to the Docker engine"
        );
        Ok(DockerBackend::with_client(
            docker, config, gateway, exits, netns,
        ))
    }

    fn with_client(
        docker: Docker,
        config: &Config,
        gateway: String,
        exits: UnboundedSender<Exit>,
        netns: bool,
    ) -> DockerBackend {
        DockerBackend {
            docker,
            gateway,
            runtimes: Runtimes::new(&config.runtimes),
            network: config.docker.network.clone(),
            grace: config.stop_grace,
            netns,
            exits,
        }
    }

    /// Startup in one step: this gateway's id from the data directory, [`connect`], then
    /// [`cleanup_orphans`] against every sandbox the store knows. Doing that before the
    /// manager reconciles is equivalent to doing it after: reconciling never adds records,
    /// and it removes the containers of the records it deletes itself.
    ///
    /// [`connect`]: DockerBackend::connect
    /// [`cleanup_orphans`]: DockerBackend::cleanup_orphans
    pub async fn open(
        config: &Config,
        store: &dyn Store,
        exits: UnboundedSender<Exit>,
    ) -> Result<DockerBackend, String> {
        let gateway = gateway_id(&config.data_dir).map_err(|e| {
            format!(
                "gateway id in {}: {e}",
                config.data_dir.join(GATEWAY_ID_FILE).display()
            )
        })?;
        let backend = DockerBackend::connect(config, gateway, exits).await?;
        let known: HashSet<String> = store
            .list()
            .await
            .map_err(|e| format!("listing sandboxes: {e}"))?
            .into_iter()
            .map(|sb| sb.id)
            .collect();
        if let Err(e) = backend.cleanup_orphans(&known).await {
            tracing::warn!(error = %e, "could not clean up orphan containers");
        }
        Ok(backend)
    }

    /// This gateway's instance id (the `sandgate.gateway` label of its containers).
    pub fn gateway_id(&self) -> &str {
        &self.gateway
    }

    /// Whether the proxy connects inside containers' network namespaces.
    pub fn uses_netns(&self) -> bool {
        self.netns
    }

    /// Force-removes every container labelled with this gateway's id whose sandbox is not in
    /// `known` (left by a crash between creating a container and recording it, or by a record
    /// removed behind the gateway's back). Returns how many were removed.
    pub async fn cleanup_orphans(&self, known: &HashSet<String>) -> Result<usize, BackendError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_GATEWAY}={}", self.gateway)],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| BackendError::Stop(format!("cannot list containers: {e}")))?;
        let mut removed = 0;
        for c in containers {
            let sandbox = c.labels.as_ref().and_then(|l| l.get(LABEL_SANDBOX));
            if sandbox.is_some_and(|s| known.contains(s)) {
                continue;
            }
            let Some(cid) = c.id.as_deref() else {
                continue;
            };
            tracing::info!(container = %cid, sandbox = ?sandbox, "removing orphan container");
            match self.remove_container(cid).await {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!(container = %cid, error = %e, "orphan not removed"),
            }
        }
        Ok(removed)
    }

    fn runtime(&self, sb: &Sandbox) -> Result<&Runtime, BackendError> {
        self.runtimes.get(&sb.runtime).ok_or_else(|| {
            BackendError::Start(format!("runtime {:?} is no longer configured", sb.runtime))
        })
    }

    /// The published-port spec: `127.0.0.1:{allocated}->{port}/tcp`, or empty in netns mode.
    fn ports_spec(&self, sb: &Sandbox) -> String {
        match (self.netns, sb.port, sb.allocated_port) {
            (false, Some(port), Some(host)) => format!("127.0.0.1:{host}->{port}/tcp"),
            _ => String::new(),
        }
    }

    /// The container's environment, on top of the image's (which supplies `PATH`).
    fn env(&self, sb: &Sandbox) -> Vec<String> {
        let mut env = BTreeMap::new();
        env.insert("HOME".to_string(), WORK_DIR.to_string());
        env.insert("SANDBOX_ID".into(), sb.id.clone());
        env.extend(sb.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(port) = sb.port {
            env.insert("PORT".into(), port.to_string());
            // Published ports reach the container's own address, never its loopback.
            let host = if self.netns { "127.0.0.1" } else { "0.0.0.0" };
            env.insert("HOST".into(), host.into());
        }
        env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// The container to create for `sb`.
    fn spec(&self, sb: &Sandbox) -> Result<ContainerCreateBody, BackendError> {
        let image = self.runtime(sb)?.image.clone();
        let labels = HashMap::from([
            (LABEL_SANDBOX.to_string(), sb.id.clone()),
            (LABEL_TEAM.to_string(), sb.team.clone()),
            (LABEL_GATEWAY.to_string(), self.gateway.clone()),
            (LABEL_GENERATION.to_string(), sb.generation.to_string()),
            (LABEL_PORTS.to_string(), self.ports_spec(sb)),
        ]);
        let mut host = HostConfig {
            nano_cpus: sb.limits.cpus.map(|c| (c * 1e9).round() as i64),
            memory: sb
                .limits
                .memory_mb
                .map(|m| (m as i64).saturating_mul(1024 * 1024)),
            pids_limit: sb.limits.pids_limit,
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            // A real PID 1 passes signals on and reaps zombies, so stops are prompt.
            init: Some(true),
            // No privilege gained through setuid binaries or file capabilities.
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            cap_drop: Some(DROPPED_CAPS.iter().map(|c| c.to_string()).collect()),
            // `none`: loopback only (the proxy dials inside the container's namespace).
            network_mode: match sb.network {
                crate::model::Network::None => Some("none".into()),
                _ => self.network.clone(),
            },
            ..Default::default()
        };
        let mut exposed = None;
        if let (false, Some(port), Some(allocated)) = (self.netns, sb.port, sb.allocated_port) {
            let key = format!("{port}/tcp");
            exposed = Some(vec![key.clone()]);
            host.port_bindings = Some(HashMap::from([(
                key,
                Some(vec![PortBinding {
                    host_ip: Some(Ipv4Addr::LOCALHOST.to_string()),
                    host_port: Some(allocated.to_string()),
                }]),
            )]));
        }
        Ok(ContainerCreateBody {
            image: Some(image),
            cmd: Some(vec!["/bin/sh".into(), "-c".into(), sb.command.clone()]),
            // `[""]` resets the image's entrypoint: the command runs as given.
            entrypoint: Some(vec![String::new()]),
            env: Some(self.env(sb)),
            working_dir: Some(WORK_DIR.into()),
            labels: Some(labels),
            exposed_ports: exposed,
            host_config: Some(host),
            ..Default::default()
        })
    }

    async fn inspect(&self, container: &str) -> Result<Option<ContainerInspectResponse>, String> {
        match self.docker.inspect_container(container, None).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(format!("cannot inspect container {container}: {e}")),
        }
    }

    async fn remove_container(&self, container: &str) -> Result<(), BackendError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // "removal already in progress": someone else is finishing the job.
            Err(e) if status_of(&e) == Some(409) && e.to_string().contains("in progress") => Ok(()),
            Err(e) => Err(BackendError::Stop(format!(
                "cannot remove container {container}: {e}"
            ))),
        }
    }

    async fn stop_container(&self, container: &str) -> Result<(), BackendError> {
        let secs = self.grace.as_secs_f64().ceil().clamp(1.0, 86_400.0) as i32;
        let options = StopContainerOptionsBuilder::default().t(secs).build();
        // The engine answers once the container has stopped: allow the grace and some.
        let docker = (self.docker.clone()).with_timeout(Duration::from_secs(secs as u64 + 60));
        match docker.stop_container(container, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if matches!(status_of(&e), Some(304 | 404)) => Ok(()),
            Err(e) => Err(BackendError::Stop(format!(
                "cannot stop container {container}: {e}"
            ))),
        }
    }

    /// What a running container hands back to the manager; `None` if it does not run.
    fn handle(&self, info: &ContainerInspectResponse) -> Option<(Started, String)> {
        let state = info.state.as_ref()?;
        if state.running != Some(true) {
            return None;
        }
        let pid = state
            .pid
            .filter(|p| *p > 0)
            .and_then(|p| i32::try_from(p).ok());
        let ip = info
            .network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref())
            .and_then(|nets| {
                let mut ips: Vec<_> = nets
                    .iter()
                    .filter_map(|(name, ep)| {
                        Some((
                            name.clone(),
                            ep.ip_address.clone().filter(|a| !a.is_empty())?,
                        ))
                    })
                    .collect();
                ips.sort();
                ips.into_iter().next().map(|(_, ip)| ip)
            });
        let started = Started {
            backend_ref: info.id.clone(),
            ip_address: ip,
            netns_pid: if self.netns { pid } else { None },
        };
        Some((started, state.started_at.clone().unwrap_or_default()))
    }

    /// Reports the exit of this incarnation (`started_at`) of container `cid` as an exit of
    /// `(id, generation)`. Ends quietly when the manager is gone.
    fn watch(&self, cid: String, started_at: String, id: String, generation: i64) {
        let docker = self.docker.clone();
        let exits = self.exits.clone();
        tokio::spawn(async move {
            let code = loop {
                let waited = async {
                    docker
                        .wait_container(&cid, None::<WaitContainerOptions>)
                        .next()
                        .await
                };
                let result = tokio::select! {
                    _ = exits.closed() => return,
                    r = waited => r,
                };
                match result {
                    Some(Ok(resp)) => break Some(resp.status_code),
                    Some(Err(DockerError::DockerContainerWaitError { code, .. })) => {
                        break Some(code)
                    }
                    Some(Err(e)) if is_not_found(&e) => break None,
                    // A timed-out long poll or a broken connection: look before waiting again.
                    _ => {
                        tokio::select! {
                            _ = exits.closed() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        match docker.inspect_container(&cid, None).await {
                            Ok(info) => {
                                let state = info.state.unwrap_or_default();
                                let same = state.started_at.as_deref() == Some(&started_at);
                                if state.running == Some(true) && same {
                                    continue;
                                }
                                break if same { state.exit_code } else { None };
                            }
                            Err(e) if is_not_found(&e) => break None,
                            Err(_) => continue,
                        }
                    }
                }
            };
            let _ = exits.send(Exit {
                id,
                generation,
                code: code.map(|c| i32::try_from(c).unwrap_or(i32::MAX)),
                signal: None,
                last_output: None,
            });
        });
    }
}

#[async_trait]
impl Backend for DockerBackend {
    /// Containers join the engine's configured network (`egress`), or none at all when
    /// asked, which needs the namespace dial (published ports need a network).
    fn network(
        &self,
        requested: Option<crate::model::Network>,
    ) -> Result<crate::model::Network, String> {
        use crate::model::Network;
        match requested {
            None | Some(Network::Egress) => Ok(Network::Egress),
            Some(Network::None) if self.netns => Ok(Network::None),
            Some(Network::None) => Err("network \"none\" needs containers reached through \
                 their namespace (container+netns: a local engine and root); with published \
                 ports a container needs a network"
                .into()),
            Some(other) => Err(format!("network {:?} is not available", other.as_str())),
        }
    }

    fn kind(&self) -> &'static str {
        "docker"
    }

    fn stop_on_shutdown(&self) -> bool {
        // The engine owns containers: they keep running and the next gateway re-adopts them.
        false
    }

    fn isolation(&self) -> &'static str {
        if self.netns {
            "container+netns"
        } else {
            "container+published-ports"
        }
    }

    async fn check_runtime(&self, runtime: &Runtime) -> Result<(), String> {
        match self.docker.inspect_image(&runtime.image).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Err(format!(
                "image {} for runtime {} is not present on the Docker engine; \
                 pull or build it first",
                runtime.image, runtime.name
            )),
            Err(e) => Err(format!(
                "cannot check image {} for runtime {} on the Docker engine: {e}",
                runtime.image, runtime.name
            )),
        }
    }

    fn needs_host_port(&self) -> bool {
        !self.netns
    }

    fn default_port(&self) -> Option<u16> {
        Some(DEFAULT_PORT)
    }

    async fn start(&self, sb: &Sandbox) -> Result<Started, BackendError> {
        let name = container_name(&sb.id);
        let spec = self.spec(sb)?;
        let existing = self.inspect(&name).await.map_err(BackendError::Start)?;
        let label = |k: &str| {
            let c = existing.as_ref()?;
            let labels = c.config.as_ref()?.labels.as_ref()?;
            labels.get(k).map(String::as_str)
        };
        if existing.is_some() && label(LABEL_SANDBOX) != Some(sb.id.as_str()) {
            return Err(BackendError::Start(format!(
                "a container named {name} exists and does not belong to this sandbox"
            )));
        }
        // Ports are published at creation: a container made for other ports is made anew.
        let reusable =
            existing.is_some() && label(LABEL_PORTS).unwrap_or("") == self.ports_spec(sb);
        let mut created = false;
        let running = existing
            .as_ref()
            .and_then(|c| c.state.as_ref())
            .is_some_and(|s| s.running == Some(true));
        if reusable {
            if running {
                // Left running by an older incarnation: restarted, so the command runs afresh
                // and this generation's exit is the one reported.
                self.stop_container(&name).await?;
            }
        } else {
            if existing.is_some() {
                tracing::info!(sandbox = %sb.id, "re-creating a container that no longer fits");
                self.remove_container(&name).await?;
            }
            let options = CreateContainerOptionsBuilder::default().name(&name).build();
            self.docker
                .create_container(Some(options), spec)
                .await
                .map_err(|e| BackendError::Start(format!("cannot create container: {e}")))?;
            created = true;
        }
        let started = async {
            self.docker
                .start_container(&name, None)
                .await
                .map_err(|e| format!("cannot start container: {e}"))?;
            let info = self.inspect(&name).await?.ok_or("the container vanished")?;
            Ok::<_, String>(info)
        }
        .await;
        let info = match started {
            Ok(info) => info,
            Err(e) => {
                if created {
                    // Leave nothing behind.
                    if let Err(re) = self.remove_container(&name).await {
                        tracing::error!(
                            sandbox = %sb.id,
                            error = %re,
                            "could not remove a container that failed to start"
                        );
                    }
                } else {
                    let _ = self.stop_container(&name).await;
                }
                return Err(BackendError::Start(e));
            }
        };
        let cid = info.id.clone().unwrap_or(name);
        match self.handle(&info) {
            Some((started, started_at)) => {
                self.watch(cid, started_at, sb.id.clone(), sb.generation);
                Ok(started)
            }
            None => {
                // Already exited: the watcher reports it at once, as for a process.
                let started_at = info
                    .state
                    .as_ref()
                    .and_then(|s| s.started_at.clone())
                    .unwrap_or_default();
                self.watch(cid.clone(), started_at, sb.id.clone(), sb.generation);
                Ok(Started {
                    backend_ref: Some(cid),
                    ip_address: None,
                    netns_pid: None,
                })
            }
        }
    }

    async fn stop(&self, sb: &Sandbox) -> Result<(), BackendError> {
        // The name is authoritative: a recorded id may be stale.
        self.stop_container(&container_name(&sb.id)).await
    }

    async fn remove(&self, sb: &Sandbox) -> Result<(), BackendError> {
        self.remove_container(&container_name(&sb.id)).await
    }

    async fn adopt(&self, sb: &Sandbox) -> Result<Option<Started>, BackendError> {
        let name = container_name(&sb.id);
        let mut info = None;
        if let Some(cid) = &sb.backend_ref {
            info = self.inspect(cid).await.map_err(BackendError::Start)?;
        }
        if info.is_none() {
            info = self.inspect(&name).await.map_err(BackendError::Start)?;
        }
        let Some(info) = info else {
            return Ok(None);
        };
        let ours = info
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get(LABEL_SANDBOX))
            .is_some_and(|s| *s == sb.id);
        if !ours {
            return Ok(None);
        }
        let Some((started, started_at)) = self.handle(&info) else {
            return Ok(None);
        };
        let cid = info.id.clone().unwrap_or(name);
        self.watch(cid, started_at, sb.id.clone(), sb.generation);
        Ok(Some(started))
    }

    /// Its container (by the recorded id) is gone or not running; an engine that cannot be
    /// asked says nothing.
    async fn ended(&self, sb: &Sandbox) -> bool {
        let Some(cid) = &sb.backend_ref else {
            return false;
        };
        match self.inspect(cid).await {
            Ok(Some(info)) => info.state.as_ref().and_then(|s| s.running) == Some(false),
            Ok(None) => true,
            Err(_) => false,
        }
    }

    async fn logs(&self, sb: &Sandbox, opts: super::LogOptions) -> Result<LogStream, BackendError> {
        let tail = opts
            .tail
            .map_or_else(|| "all".to_string(), |n| n.to_string());
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(opts.follow)
            .timestamps(opts.timestamps)
            .tail(&tail)
            .build();
        let id = sb.id.clone();
        let stream = self
            .docker
            .logs(&container_name(&sb.id), Some(options))
            .filter_map(move |item| {
                let item = match item {
                    Ok(out) => Some(Ok(out.into_bytes())),
                    // A container that never started, or is gone, has no logs: an empty stream.
                    Err(e) if is_not_found(&e) => None,
                    Err(e) => {
                        tracing::debug!(sandbox = %id, error = %e, "container logs ended");
                        Some(Err(io::Error::other(e)))
                    }
                };
                std::future::ready(item)
            });
        Ok(stream.boxed())
    }

    async fn exec(&self, sb: &Sandbox, spec: ExecSpec) -> Result<ExecHandle, ExecError> {
        self.exec_in(sb, spec).await
    }

    async fn pty(
        &self,
        sb: &Sandbox,
        spec: ExecSpec,
        size: super::exec::TtySize,
    ) -> Result<super::exec::PtyHandle, ExecError> {
        self.pty_in(sb, spec, size).await
    }

    /// The container's `/sandbox` through its init's `/proc/<pid>/root`: this needs the engine
    /// on this machine and the privilege to look into other processes (the namespace
    /// connector's condition).
    async fn working_tree(&self, sb: &Sandbox) -> Result<std::path::PathBuf, ExecError> {
        if !(engine_is_local() && super::netns::available()) {
            return Err(ExecError::Unsupported(
                "docker (files need a local engine and CAP_SYS_ADMIN)",
            ));
        }
        let info = self
            .docker
            .inspect_container(&container_name(&sb.id), None)
            .await
            .map_err(|e| match status_of(&e) {
                Some(404) => ExecError::NotRunning,
                _ => ExecError::Backend(format!("inspecting the container: {e}")),
            })?;
        let pid = info
            .state
            .as_ref()
            .filter(|s| s.running == Some(true))
            .and_then(|s| s.pid)
            .filter(|p| *p > 0)
            .ok_or(ExecError::NotRunning)?;
        Ok(std::path::PathBuf::from(format!(
            "/proc/{pid}/root{WORK_DIR}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Upstream;
    use std::net::SocketAddr;

    #[test]
    fn gateway_id_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = gateway_id(dir.path()).unwrap();
        assert!(a.starts_with("gw-") && a.len() == 19, "{a}");
        assert!(crate::model::valid_label(&a));
        assert_eq!(gateway_id(dir.path()).unwrap(), a);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(gateway_id(other.path()).unwrap(), a);
        // No temporary files are left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(GATEWAY_ID_FILE)]);
    }

    fn backend(netns: bool) -> DockerBackend {
        // Never dialed: building a container spec needs no engine.
        let docker =
            Docker::connect_with_http("http://127.0.0.1:1", 5, bollard::API_DEFAULT_VERSION)
                .unwrap();
        let mut config = Config::for_data_dir("/nonexistent");
        config.docker.network = Some("sandboxes".into());
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        DockerBackend::with_client(docker, &config, "gw-test".into(), tx, netns)
    }

    fn sandbox() -> Sandbox {
        Sandbox {
            runtime: "busybox".into(),
            dev_server: true,
            command: "exec httpd -f -p 127.0.0.1:$PORT".into(),
            env: [("PORT", "1"), ("HOME", "/root"), ("A", "b")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            limits: crate::model::Limits {
                cpus: Some(1.5),
                memory_mb: Some(128),
                pids_limit: Some(100),
            },
            port: Some(3000),
            allocated_port: Some(20001),
            generation: 2,
            network: crate::model::Network::Egress,
            ..Sandbox::blank("sb-abcdefghijklmnop")
        }
    }

    #[tokio::test]
    async fn container_spec_carries_labels_limits_env_and_ports() {
        let sb = sandbox();
        let spec = backend(true).spec(&sb).unwrap();
        assert_eq!(spec.image.as_deref(), Some("busybox:latest"));
        assert_eq!(
            spec.cmd.unwrap(),
            vec!["/bin/sh", "-c", "exec httpd -f -p 127.0.0.1:$PORT"]
        );
        let labels = spec.labels.unwrap();
        assert_eq!(labels[LABEL_SANDBOX], sb.id);
        assert_eq!(labels[LABEL_TEAM], "default");
        assert_eq!(labels[LABEL_GATEWAY], "gw-test");
        assert_eq!(labels[LABEL_GENERATION], "2");
        assert_eq!(labels[LABEL_PORTS], "");
        let host = spec.host_config.unwrap();
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.memory, Some(128 * 1024 * 1024));
        assert_eq!(host.pids_limit, Some(100));
        assert_eq!(
            host.security_opt.as_deref(),
            Some(&["no-new-privileges:true".to_string()][..])
        );
        assert_eq!(host.cap_drop.unwrap(), DROPPED_CAPS);
        assert_eq!(host.network_mode.as_deref(), Some("sandboxes"));
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
        assert!(host.port_bindings.is_none() && spec.exposed_ports.is_none());
        // The gateway's PORT and HOST win over the request's; its HOME does not.
        let env = spec.env.unwrap();
        for want in [
            "PORT=3000",
            "HOST=127.0.0.1",
            "HOME=/root",
            "A=b",
            "SANDBOX_ID=sb-abcdefghijklmnop",
        ] {
            assert!(env.iter().any(|e| e == want), "{want} in {env:?}");
        }
        assert_eq!(env.len(), 5, "{env:?}");

        let spec = backend(false).spec(&sb).unwrap();
        assert_eq!(spec.exposed_ports.unwrap(), vec!["3000/tcp"]);
        let bindings = spec.host_config.unwrap().port_bindings.unwrap();
        let b = bindings["3000/tcp"].clone().unwrap();
        assert_eq!(b[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(b[0].host_port.as_deref(), Some("20001"));
        assert_eq!(
            spec.labels.unwrap()[LABEL_PORTS],
            "127.0.0.1:20001->3000/tcp"
        );
        assert!(spec.env.unwrap().iter().any(|e| e == "HOST=0.0.0.0"));
    }

    #[tokio::test]
    async fn upstreams_enter_the_namespace_or_use_the_published_port() {
        let mut sb = sandbox();
        let published = backend(false);
        let tcp = |p| Some(Upstream::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, p))));
        assert_eq!(published.upstream(&sb, 3000), tcp(20001));
        assert_eq!(published.upstream(&sb, 20001), tcp(20001));
        assert_eq!(published.upstream(&sb, 4000), None);
        sb.netns_pid = Some(42);
        sb.allocated_port = None;
        let netns = backend(true);
        assert_eq!(
            netns.upstream(&sb, 4000),
            Some(Upstream::Netns {
                pid: 42,
                port: 4000
            })
        );
        assert_eq!(netns.upstream(&sb, 0), None);
        assert!(!netns.needs_host_port() && published.needs_host_port());
        assert_eq!(netns.isolation(), "container+netns");
        assert_eq!(published.isolation(), "container+published-ports");
    }

    #[test]
    fn container_names() {
        assert_eq!(
            container_name("sb-abcdefghijklmnop"),
            "sandgate-sb-abcdefghijklmnop"
        );
    }
}
