//! The sandbox record and its vocabulary: ids, statuses, modes and name validation.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The team every sandbox belongs to until authentication brings real teams.
pub const DEFAULT_TEAM: &str = "default";
/// The owner used by `/{owner}/{name}/` routes when a create names none (seed 003's `default`).
pub const DEFAULT_OWNER: &str = "default";

/// First path segments that belong to the gateway, so no `/{owner}/{name}/` route may use them.
pub const RESERVED_OWNERS: &[&str] = &[
    "sandbox",
    "sandboxes",
    "health",
    "ws",
    "api",
    "metrics",
    "static",
    "favicon.ico",
    "auth",
    "teams",
    "ui",
];

const ID_PREFIX: &str = "sb-";
const ID_RANDOM_LEN: usize = 16;
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// A new unguessable, DNS-label-safe sandbox id: `sb-` and 16 base32 characters (80 bits).
pub fn new_id() -> String {
    let mut rng = rand::thread_rng();
    let mut id = String::with_capacity(ID_PREFIX.len() + ID_RANDOM_LEN);
    id.push_str(ID_PREFIX);
    for _ in 0..ID_RANDOM_LEN {
        id.push(BASE32[rng.gen_range(0..32)] as char);
    }
    id
}

/// The current time at the store's precision (milliseconds), so records round-trip exactly.
pub fn now() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(3)
}

/// Whether `s` has the exact shape of a sandbox id.
pub fn valid_id(s: &str) -> bool {
    s.len() == ID_PREFIX.len() + ID_RANDOM_LEN
        && s.starts_with(ID_PREFIX)
        && s.as_bytes()[ID_PREFIX.len()..]
            .iter()
            .all(|&b| IN_BASE32[b as usize])
}

/// `IN_BASE32[b]`: whether byte `b` is in `BASE32` (ids are checked on every proxied request).
const IN_BASE32: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < BASE32.len() {
        t[BASE32[i] as usize] = true;
        i += 1;
    }
    t
};

/// A DNS-label-like name: 1..=63 of `a-z`, `0-9`, `-`, not starting or ending with `-`.
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Lifecycle of a sandbox. `Creating` and `Deleting` are transient and finished by the
/// reconciler if the gateway dies in the middle of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Running,
    Stopping,
    Stopped,
    /// The sandbox's process exited on its own with a failure.
    Failed,
    Deleting,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 6] = [
        Status::Creating,
        Status::Running,
        Status::Stopping,
        Status::Stopped,
        Status::Failed,
        Status::Deleting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Running => "running",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
            Status::Deleting => "deleting",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "creating" => Status::Creating,
            "running" => Status::Running,
            "stopping" => Status::Stopping,
            "stopped" => Status::Stopped,
            "failed" => Status::Failed,
            "deleting" => Status::Deleting,
            other => return Err(format!("unknown status {other:?}")),
        })
    }
}

/// Ephemeral sandboxes are removed when idle; persistent ones are stopped and can be restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Ephemeral,
    Persistent,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ephemeral => "ephemeral",
            Mode::Persistent => "persistent",
        }
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ephemeral" => Ok(Mode::Ephemeral),
            "persistent" => Ok(Mode::Persistent),
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

/// Resource limits for one sandbox (Docker backend; the process backend records them).
#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPUs (fractions allowed).
    pub cpus: Option<f64>,
    /// Memory in MiB.
    pub memory_mb: Option<u64>,
    /// Maximum number of processes.
    pub pids_limit: Option<i64>,
}

impl Limits {
    /// `self`, with unset values taken from `defaults`.
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            cpus: self.cpus.or(defaults.cpus),
            memory_mb: self.memory_mb.or(defaults.memory_mb),
            pids_limit: self.pids_limit.or(defaults.pids_limit),
        }
    }

    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(c) = self.cpus {
            if !(c.is_finite() && c > 0.0 && c <= 1024.0) {
                return Err(format!("cpus must be between 0 and 1024, got {c}"));
            }
        }
        if self.memory_mb.is_some_and(|m| m < 6) {
            return Err("memory_mb must be at least 6".into());
        }
        if self.pids_limit.is_some_and(|p| p < 1) {
            return Err("pids_limit must be at least 1".into());
        }
        Ok(())
    }
}

/// One sandbox, as stored. The store is the source of truth; the route table holds copies.
#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    pub id: String,
    pub team: String,
    pub owner: String,
    pub name: Option<String>,
    pub runtime: String,
    pub mode: Mode,
    pub dev_server: bool,
    /// The command that runs (the runtime's default dev-server command unless given).
    pub command: String,
    pub env: BTreeMap<String, String>,
    /// CPU, memory and process limits (enforced by the Docker backend).
    pub limits: Limits,
    /// The port the dev server listens on inside the sandbox, as clients name it.
    pub port: Option<u16>,
    /// The host port the allocator handed out (process backend: what the server binds).
    pub allocated_port: Option<u16>,
    pub status: Status,
    /// Why the sandbox is in its status (exit code, error), for humans.
    pub status_reason: Option<String>,
    /// Backend-owned handle (process: pid and start time), opaque to everyone else.
    pub backend_ref: Option<String>,
    pub ip_address: Option<String>,
    /// A process inside the sandbox's own network namespace (isolated processes, containers).
    pub netns_pid: Option<i32>,
    /// Bumped on every start, so a cached route never reaches an older incarnation.
    pub generation: i64,
    /// Every port answers without a credential.
    pub public: bool,
    /// These ports answer without a credential.
    pub public_ports: Vec<u16>,
    /// Bumped to revoke every preview token of the sandbox.
    pub preview_generation: i64,
    /// Path routes forward the path with its route prefix (`/sandbox/{id}`, `/{owner}/{name}`)
    /// instead of stripping it: for apps built to live under that base path.
    pub keep_prefix: bool,
    /// String metadata for the user's own bookkeeping (filterable in lists).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Seconds without use before the idle reaper acts on this sandbox (`None`: the
    /// gateway's `idle_timeout`; `Some(0)`: never).
    pub idle_timeout: Option<u64>,
    /// What the sandbox can reach outside itself.
    pub network: Network,
    /// An HTTP path its health checks GET (2xx or 3xx passes) instead of only connecting.
    pub health_path: Option<String>,
    /// The runtime whose warm pool it waits in, until a create claims it (`None`: a user's
    /// sandbox). A waiting sandbox is nobody's: the API and the proxy never show it.
    pub pool: Option<String>,
    /// How many instances the sandbox runs, itself included (its own record's; 1 for an
    /// instance record). The proxy spreads requests over the ready ones.
    pub replicas: u32,
    /// The sandbox this record is an extra instance of (`None`: a sandbox, its instance 0).
    /// An instance record is nobody's to see: the API shows it only in its sandbox's
    /// `instances`, and only the balancer routes to it.
    pub replica_of: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A sandbox's outbound network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Its own loopback only.
    #[default]
    None,
    /// Outbound connections through the gateway host (NAT), never to the host itself, other
    /// sandboxes or denied ranges.
    Egress,
    /// The host's own network, shared (no isolation); never asked for, only reported.
    Host,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Egress => "egress",
            Network::Host => "host",
        }
    }

    pub fn parse(s: &str) -> Option<Network> {
        [Network::None, Network::Egress, Network::Host]
            .into_iter()
            .find(|n| n.as_str() == s)
    }
}

/// What a path route does with its prefix (`/sandbox/{id}`, `/{owner}/{name}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathPrefix {
    /// Removed: the app sees `/`-rooted paths (most dev servers, by default).
    #[default]
    Strip,
    /// Forwarded: for an app built to live under that base path (`vite --base`).
    Keep,
}

impl Sandbox {
    /// Whether the proxy may route to `port` of this sandbox, and the port to dial if so.
    /// With a shared host network the logical dev-server port maps to the allocated one.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        let allocated = self.allocated_port?;
        (Some(port) == self.port || port == allocated).then_some(allocated)
    }

    /// Whether `port` answers without a credential.
    pub fn is_public(&self, port: u16) -> bool {
        self.public || self.public_ports.contains(&port)
    }

    /// Forgets the backend handle of a sandbox that no longer runs.
    pub fn clear_handle(&mut self) {
        self.backend_ref = None;
        self.netns_pid = None;
    }

    /// Whether the API shows this record as a sandbox: not waiting in a warm pool, not an
    /// extra instance of another.
    pub fn listed(&self) -> bool {
        self.pool.is_none() && self.replica_of.is_none()
    }

    /// The path prefix for `/{owner}/{name}/` routing, when the sandbox has a name.
    pub fn path(&self) -> Option<String> {
        self.name.as_ref().map(|n| format!("{}/{}", self.owner, n))
    }
}

impl Sandbox {
    /// A record with every setting at its default: the default team and owner, no name, no
    /// ports, `creating`, generation 1, created now. Callers set what they know.
    pub fn blank(id: &str) -> Sandbox {
        let now = now();
        Sandbox {
            id: id.into(),
            team: DEFAULT_TEAM.into(),
            owner: DEFAULT_OWNER.into(),
            name: None,
            runtime: String::new(),
            mode: Mode::Ephemeral,
            dev_server: false,
            command: String::new(),
            env: BTreeMap::new(),
            limits: Limits::default(),
            port: None,
            allocated_port: None,
            status: Status::Creating,
            status_reason: None,
            backend_ref: None,
            ip_address: None,
            netns_pid: None,
            generation: 1,
            public: false,
            public_ports: Vec::new(),
            preview_generation: 0,
            keep_prefix: false,
            labels: Default::default(),
            idle_timeout: None,
            network: Network::None,
            health_path: None,
            pool: None,
            replicas: 1,
            replica_of: None,
            created_at: now,
            updated_at: now,
        }
    }
}

#[cfg(test)]
impl Sandbox {
    /// A running sandbox with defaults, for unit tests.
    pub fn for_tests(id: &str) -> Sandbox {
        Sandbox {
            runtime: "shell".into(),
            dev_server: true,
            command: "true".into(),
            port: Some(3000),
            allocated_port: Some(20001),
            status: Status::Running,
            ..Sandbox::blank(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dns_safe_and_validated() {
        for _ in 0..100 {
            let id = new_id();
            assert!(valid_id(&id), "{id}");
            assert!(valid_label(&id), "{id}");
        }
        assert!(!valid_id("sb-ABCDEFGHIJKLMNOP"));
        assert!(!valid_id("sb-abc"));
        assert!(!valid_id("xx-abcdefghijklmnop"));
        assert!(!valid_id("sb-abcdefghijklmno1")); // '1' is not base32
    }

    #[test]
    fn labels() {
        assert!(valid_label("alice"));
        assert!(valid_label("my-sandbox-2"));
        assert!(!valid_label("-x"));
        assert!(!valid_label("x-"));
        assert!(!valid_label("Alice"));
        assert!(!valid_label("a_b"));
        assert!(!valid_label(""));
        assert!(!valid_label(&"a".repeat(64)));
    }

    #[test]
    fn statuses_round_trip() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
        }
    }
}
