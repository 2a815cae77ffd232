//! One validated `Config`, merged from a TOML file < environment < command-line flags.
//!
//! The seeds' variable names are honoured (`GATEWAY_PORT`, `PORT`, `PROXY_TIMEOUT`,
//! `MAX_CONCURRENT_REQUESTS`, `MAX_RETRIES`, `AUTH_ENABLED`, ...). Every setting is listed in the
//! README's configuration table; keep the two in step.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

pub use crate::model::Limits;

/// Configuration errors: reported once, clearly, and the process exits with status 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Which backend runs sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Local child processes (the embedded default; nothing to install).
    Process,
    /// Containers on a Docker engine (`DOCKER_HOST`, else the local socket).
    Docker,
    /// agent-sandbox `Sandbox` resources on a Kubernetes cluster (`KUBECONFIG` or
    /// `~/.kube/config`, else in-cluster config).
    Kubernetes,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Process => "process",
            BackendKind::Docker => "docker",
            BackendKind::Kubernetes => "kubernetes",
        }
    }
}

/// `--network`: what a sandbox whose create names no network gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DefaultNetwork {
    /// Its own loopback only.
    None,
    /// Outbound connections through the gateway host (NAT).
    Egress,
}

/// Whether sandboxes get namespaces of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// `sandbox` when the gateway has the privilege (root, CAP_SYS_ADMIN) and bubblewrap is
    /// installed, else `netns` when privileged, else `none`.
    #[default]
    Auto,
    /// Every sandbox in its own namespaces, as its own unprivileged user, on a read-only view
    /// of the host's system directories with only its working tree writable (bubblewrap and
    /// setpriv); refuse to start without it.
    Sandbox,
    /// Every sandbox in its own network (and PID) namespace, as the gateway's user on the
    /// host's filesystem; refuse to start without it.
    Netns,
    /// Sandboxes share the host network and listen on allocated host ports.
    None,
}

/// `sandgate serve` flags. Every flag is optional so that file and environment values can show
/// through; the merged, validated result is [`Config`].
#[derive(Debug, Default, Clone, Args)]
pub struct ServeArgs {
    /// TOML configuration file (lowest precedence: file < environment < flags).
    #[arg(long, env = "SANDGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on: an IP address, or `localhost` (127.0.0.1).
    #[arg(long, env = "GATEWAY_HOST", value_parser = parse_host)]
    pub host: Option<IpAddr>,
    /// Port to listen on (0 picks a free port). Also read from `PORT` when `GATEWAY_PORT` is unset.
    #[arg(long, env = "GATEWAY_PORT")]
    pub port: Option<u16>,
    /// Directory for the SQLite database, sandbox working directories and logs.
    #[arg(long, env = "SANDGATE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database URL (default: `sqlite://<data-dir>/sandgate.db`).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Backend that runs sandboxes.
    #[arg(long, env = "SANDGATE_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,
    /// Kubernetes backend: the namespace whose `Sandbox` resources are watched and created,
    /// or a comma-separated list: all are watched, the first gets what the API creates.
    #[arg(long, env = "SANDGATE_KUBE_NAMESPACE")]
    pub kube_namespace: Option<String>,
    /// Kubernetes backend: a kubeconfig file (default: `KUBECONFIG` or `~/.kube/config`,
    /// else the in-cluster config).
    #[arg(long, env = "SANDGATE_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes backend: the service name `/sandboxes` reports, `{name}` standing for the
    /// Sandbox's name (agent-sandbox's headless Service: `{name}`; seed 003: `sandbox-{name}`).
    #[arg(long, env = "SANDGATE_KUBE_SERVICE")]
    pub kube_service: Option<String>,
    /// Kubernetes backend: the port `/{user}/{name}/` routes reach on a sandbox's pod.
    #[arg(long, env = "SANDGATE_KUBE_PORT")]
    pub kube_port: Option<u16>,
    /// Kubernetes backend: seconds between full re-lists of the `Sandbox` resources.
    #[arg(long, env = "SANDGATE_KUBE_RESYNC")]
    pub kube_resync: Option<f64>,
    /// Sandbox isolation: own user, filesystem view and namespaces (`sandbox`), own network
    /// namespaces only (`netns`), shared host (`none`), or `auto` (the strongest available).
    #[arg(long, env = "SANDGATE_ISOLATION", value_enum)]
    pub isolation: Option<Isolation>,
    /// Host paths every `sandbox`-isolated sandbox sees read-only, comma-separated (besides
    /// /usr, /etc and /opt), e.g. a toolchain installed under /srv.
    #[arg(long, env = "SANDGATE_SANDBOX_RO_PATHS", value_delimiter = ',')]
    pub sandbox_ro_paths: Option<Vec<PathBuf>>,
    /// Seconds the gateway keeps serving after SIGTERM with `/health/ready` answering 503, so
    /// a load balancer stops sending before connections drain (e.g. 5 behind Kubernetes).
    #[arg(long, env = "SANDGATE_SHUTDOWN_DELAY")]
    pub shutdown_delay: Option<f64>,
    /// Seconds between health checks of each running sandbox's dev-server port (a TCP
    /// connect); 0 turns them off (every running sandbox counts as ready).
    #[arg(long, env = "SANDGATE_HEALTH_INTERVAL")]
    pub health_interval: Option<f64>,
    /// Passed checks in a row that make a sandbox ready.
    #[arg(long, env = "SANDGATE_HEALTH_RISE")]
    pub health_rise: Option<u32>,
    /// Failed checks in a row that make a sandbox not ready (its requests then get 503
    /// sandbox_not_ready after a short wait).
    #[arg(long, env = "SANDGATE_HEALTH_FALL")]
    pub health_fall: Option<u32>,
    /// Whether requests, upstream connections and lifecycle operations are recorded for
    /// `GET /metrics` (Prometheus).
    #[arg(long, env = "SANDGATE_METRICS", value_enum)]
    pub metrics: Option<Switch>,
    /// A second listener serving only `GET /metrics`, with no credential (bind it where only
    /// the scraper reaches, e.g. 127.0.0.1:9464 or a pod IP); the main listener's /metrics
    /// needs an admin credential once authentication is on.
    #[arg(long, env = "SANDGATE_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Whether each request (and each upgraded stream, when it ends) writes an access-log
    /// line (target `sandgate::access`).
    #[arg(long, env = "SANDGATE_ACCESS_LOG", value_enum)]
    pub access_log: Option<Switch>,
    /// How log lines are written to standard error: `text` (colour only on a terminal) or
    /// `json` (one object per line).
    #[arg(long, env = "SANDGATE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Outbound network of a sandbox whose create names none: `none` (its own loopback) or
    /// `egress` (NAT to the outside, never to the gateway host, other sandboxes or
    /// --egress-deny); `sandbox` isolation only.
    #[arg(long, env = "SANDGATE_NETWORK", value_enum)]
    pub network: Option<DefaultNetwork>,
    /// IPv4 range carved into a /30 per egress sandbox (host side .1, sandbox .2).
    #[arg(long, env = "SANDGATE_EGRESS_SUBNET")]
    pub egress_subnet: Option<String>,
    /// Ranges egress sandboxes may not reach, comma-separated (default: RFC 1918 and
    /// 100.64.0.0/10; link-local (cloud metadata), loopback, multicast and the egress subnet
    /// are always refused, and so are the gateway host's own addresses).
    #[arg(long, env = "SANDGATE_EGRESS_DENY", value_delimiter = ',')]
    pub egress_deny: Option<Vec<String>>,
    /// Base domain for host routing: `{port}-{id}.{domain}`.
    #[arg(long, env = "SANDGATE_DOMAIN")]
    pub domain: Option<String>,
    /// Public base URL used in `dev_server_url` (default: `http://<host>:<port>`).
    #[arg(long, env = "SANDGATE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Host ports handed to sandboxes, as `LOW-HIGH`.
    #[arg(long, env = "SANDGATE_PORT_RANGE")]
    pub port_range: Option<String>,
    /// Seconds allowed to connect to a sandbox and receive its response head (never applied to a
    /// body or WebSocket in progress).
    #[arg(long, env = "PROXY_TIMEOUT")]
    pub proxy_timeout: Option<f64>,
    /// Seconds a client may take to send a request head; a kept-alive connection may idle as
    /// long between requests before the gateway closes it.
    #[arg(long, env = "SANDGATE_HEADER_TIMEOUT")]
    pub header_timeout: Option<f64>,
    /// Proxied requests in flight before new ones get 503 with `Retry-After`.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// Extra connection attempts when a sandbox port refuses a connection (it may be opening).
    #[arg(long, env = "MAX_RETRIES")]
    pub max_retries: Option<u32>,
    /// How requests are spread over a sandbox's instances (`replicas`): `round-robin`,
    /// `least-connections` (fewest requests in flight), `random`, or `sticky` (one client
    /// address stays on one instance while it is ready).
    #[arg(long, env = "LOAD_BALANCER_STRATEGY", value_enum)]
    pub load_balancer_strategy: Option<Strategy>,
    /// Connection failures or timeouts in a row to a sandbox port that open its circuit
    /// (requests then get 503 circuit_open at once); 0 turns circuit breaking off.
    #[arg(long, env = "SANDGATE_CIRCUIT_FAILURES")]
    pub circuit_failures: Option<u32>,
    /// Seconds an open circuit refuses requests before one trial request goes through.
    #[arg(long, env = "SANDGATE_CIRCUIT_OPEN")]
    pub circuit_open: Option<f64>,
    /// Seconds a stopping sandbox gets between SIGTERM and SIGKILL.
    #[arg(long, env = "SANDGATE_STOP_GRACE")]
    pub stop_grace: Option<f64>,
    /// Seconds without use (proxied request, WebSocket traffic, API call) after which a
    /// persistent sandbox is stopped and an ephemeral one deleted; 0 never reaps.
    #[arg(long, env = "SANDGATE_IDLE_TIMEOUT")]
    pub idle_timeout: Option<f64>,
    /// Seconds a request to a stopped persistent sandbox waits for it to start and open its
    /// port before getting 503 with `Retry-After`.
    #[arg(long, env = "SANDGATE_WAKE_TIMEOUT")]
    pub wake_timeout: Option<f64>,
    /// Threads serving connections, each with its own event loop (default: one per core).
    #[arg(long, env = "SANDGATE_WORKERS")]
    pub workers: Option<usize>,
    /// Largest control-API request body, in bytes.
    #[arg(long, env = "SANDGATE_API_BODY_LIMIT")]
    pub api_body_limit: Option<usize>,
    /// Whether plain HTTP/1.1 requests take the fast lane (`on`) or every request goes through
    /// hyper's general path (`off`). Both apply the same request policy.
    #[arg(long, env = "SANDGATE_FAST_LANE", value_enum)]
    pub fast_lane: Option<Switch>,
    /// Seconds a request body may stall (no bytes from the client) before the gateway cuts it
    /// (408 if nothing was forwarded yet).
    #[arg(long, env = "SANDGATE_BODY_TIMEOUT")]
    pub body_timeout: Option<f64>,
    /// Proxied requests in flight from one client address (default: a quarter of
    /// MAX_CONCURRENT_REQUESTS), so slow clients from one address cannot hold every slot.
    #[arg(long, env = "SANDGATE_MAX_REQUESTS_PER_CLIENT")]
    pub max_requests_per_client: Option<usize>,
    /// Seconds a command run through the exec API may take when its request names no
    /// `timeout_ms`; then its process group is killed.
    #[arg(long, env = "SANDGATE_EXEC_TIMEOUT")]
    pub exec_timeout: Option<f64>,
    /// Longest `timeout_ms` an exec request may ask for, in seconds.
    #[arg(long, env = "SANDGATE_EXEC_MAX_TIMEOUT")]
    pub exec_max_timeout: Option<f64>,
    /// Largest `max_output_bytes` an exec request may ask for (per stream).
    #[arg(long, env = "SANDGATE_EXEC_MAX_OUTPUT_BYTES")]
    pub exec_max_output_bytes: Option<usize>,
    /// Seconds a killed command gets between SIGTERM and SIGKILL.
    #[arg(long, env = "SANDGATE_EXEC_KILL_GRACE")]
    pub exec_kill_grace: Option<f64>,
    /// Largest file `PUT /sandboxes/{id}/files` accepts, in bytes.
    #[arg(long, env = "SANDGATE_FILES_MAX_UPLOAD_BYTES")]
    pub files_max_upload_bytes: Option<u64>,
    /// Extra `Host` names the control API answers to, comma-separated (besides IP addresses,
    /// `localhost`, the domain and the public URL's host); `*` accepts any.
    #[arg(long, env = "SANDGATE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Option<Vec<String>>,
    /// Protocols a client may switch to through the proxy (`Upgrade`), comma-separated.
    #[arg(long, env = "SANDGATE_UPGRADE_PROTOCOLS", value_delimiter = ',')]
    pub upgrade_protocols: Option<Vec<String>>,
    /// PEM certificate chain (leaf first) to serve HTTPS with (h2 and http/1.1 by ALPN);
    /// needs --tls-key. Reloaded when the file changes.
    #[arg(long, env = "SANDGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert's certificate.
    #[arg(long, env = "SANDGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require a credential (API key, token, preview cookie) for the API and the proxy
    /// (default true). `false` is allowed only when the gateway listens on a loopback address.
    #[arg(long, env = "AUTH_ENABLED")]
    pub auth_enabled: Option<bool>,
    /// Requests per second one API key (or token subject) may make, API and proxy together
    /// (fractions allowed); 0 or unset: no limit.
    #[arg(long, env = "SANDGATE_RATE_LIMIT_PER_KEY")]
    pub rate_limit_per_key: Option<f64>,
    /// Requests per second one sandbox may receive through the proxy; 0 or unset: no limit.
    #[arg(long, env = "SANDGATE_RATE_LIMIT_PER_SANDBOX")]
    pub rate_limit_per_sandbox: Option<f64>,
    /// Requests of each rate limit that may arrive at once (default: one second's worth).
    #[arg(long, env = "SANDGATE_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// Proxied requests and upgraded streams open at once to one sandbox; 0 or unset: no cap.
    #[arg(long, env = "SANDGATE_MAX_CONNECTIONS_PER_SANDBOX")]
    pub max_connections_per_sandbox: Option<usize>,
    /// Refused credentials per minute from one client address (after the burst) before its
    /// requests get 429 without being checked; 0 turns the throttle off.
    #[arg(long, env = "SANDGATE_AUTH_FAILURES_PER_MINUTE")]
    pub auth_failures_per_minute: Option<f64>,
    /// Refused credentials from one address that may come at once before the throttle bites.
    #[arg(long, env = "SANDGATE_AUTH_FAILURE_BURST")]
    pub auth_failure_burst: Option<u32>,
    /// Client address ranges (CIDR, comma-separated) the gateway serves; others get 403
    /// `AUTH_004`. Unset: every address.
    #[arg(long, env = "SANDGATE_ALLOWED_IPS", value_delimiter = ',')]
    pub allowed_ips: Option<Vec<String>>,
    /// Proxy address ranges (CIDR, comma-separated) whose `X-Forwarded-For` is believed.
    #[arg(long, env = "SANDGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// The `default` team's owner key (at least 32 characters), instead of one generated on
    /// the first start into `<data-dir>/admin.key`. Environment only, so it never shows in
    /// `ps`.
    #[arg(skip)]
    pub admin_key: Option<String>,
    /// Which credentials are accepted besides API keys: `jwt` (the default: Bearer tokens
    /// from `POST /auth/token` and, when configured, an identity provider) or `api_key` only.
    #[arg(long, env = "AUTH_PROVIDER", value_enum)]
    pub auth_provider: Option<AuthProvider>,
    /// Lifetime in seconds of tokens from `POST /auth/token`.
    #[arg(long, env = "AUTH_TOKEN_EXPIRY")]
    pub auth_token_expiry: Option<u64>,
    /// PEM public key (RSA or EC P-256) of an identity provider whose JWTs are accepted.
    #[arg(long, env = "SANDGATE_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// JWKS of an identity provider whose JWTs are accepted: a file, or an https:// URL
    /// (fetched at start and every 10 minutes).
    #[arg(long, env = "SANDGATE_JWT_JWKS")]
    pub jwt_jwks: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted when fetching a JWKS URL, besides the system's.
    #[arg(long, env = "SANDGATE_JWT_JWKS_CA")]
    pub jwt_jwks_ca: Option<PathBuf>,
    /// Required `iss` of identity-provider tokens.
    #[arg(long, env = "SANDGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of identity-provider tokens.
    #[arg(long, env = "SANDGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The identity-provider claim naming the caller's team.
    #[arg(long, env = "SANDGATE_JWT_TEAM_CLAIM")]
    pub jwt_team_claim: Option<String>,
    /// The identity-provider claim naming the caller's role (`admin`, `member`, `viewer`).
    #[arg(long, env = "SANDGATE_JWT_ROLE_CLAIM")]
    pub jwt_role_claim: Option<String>,
    /// Days audit records are kept (0: forever).
    #[arg(long, env = "SANDGATE_AUDIT_RETENTION_DAYS")]
    pub audit_retention_days: Option<u32>,
    /// Validate the configuration, print it, and exit (non-zero on a bad configuration).
    #[arg(long)]
    pub check_config: bool,
}

/// `--host`: an IP address, or `localhost` for 127.0.0.1 (the one name that needs no
/// resolver and means one thing).
pub fn parse_host(s: &str) -> Result<IpAddr, String> {
    if s.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is neither an IP address nor localhost"))
}

fn host_from_file<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    s.map(|s| parse_host(&s).map_err(serde::de::Error::custom))
        .transpose()
}

/// The configuration file: same settings as the flags, in snake_case, plus runtime definitions.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default, deserialize_with = "host_from_file")]
    host: Option<IpAddr>,
    port: Option<u16>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    backend: Option<BackendKind>,
    isolation: Option<Isolation>,
    sandbox_ro_paths: Option<Vec<PathBuf>>,
    network: Option<DefaultNetwork>,
    shutdown_delay: Option<f64>,
    health_interval: Option<f64>,
    health_rise: Option<u32>,
    health_fall: Option<u32>,
    metrics: Option<Switch>,
    metrics_addr: Option<std::net::SocketAddr>,
    access_log: Option<Switch>,
    log_format: Option<LogFormat>,
    egress_subnet: Option<String>,
    egress_deny: Option<Vec<Cidr>>,
    domain: Option<String>,
    public_url: Option<String>,
    port_range: Option<String>,
    proxy_timeout: Option<f64>,
    header_timeout: Option<f64>,
    max_concurrent_requests: Option<usize>,
    max_retries: Option<u32>,
    load_balancer_strategy: Option<Strategy>,
    circuit_failures: Option<u32>,
    circuit_open: Option<f64>,
    stop_grace: Option<f64>,
    idle_timeout: Option<f64>,
    wake_timeout: Option<f64>,
    workers: Option<usize>,
    api_body_limit: Option<usize>,
    fast_lane: Option<Switch>,
    body_timeout: Option<f64>,
    max_requests_per_client: Option<usize>,
    exec_timeout: Option<f64>,
    exec_max_timeout: Option<f64>,
    exec_max_output_bytes: Option<usize>,
    exec_kill_grace: Option<f64>,
    files_max_upload_bytes: Option<u64>,
    allowed_hosts: Option<Vec<String>>,
    upgrade_protocols: Option<Vec<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    auth_enabled: Option<bool>,
    auth_provider: Option<AuthProvider>,
    auth_token_expiry: Option<u64>,
    jwt_public_key: Option<PathBuf>,
    jwt_jwks: Option<PathBuf>,
    jwt_jwks_ca: Option<PathBuf>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    jwt_team_claim: Option<String>,
    jwt_role_claim: Option<String>,
    audit_retention_days: Option<u32>,
    rate_limit_per_key: Option<f64>,
    rate_limit_per_sandbox: Option<f64>,
    rate_limit_burst: Option<u32>,
    max_connections_per_sandbox: Option<usize>,
    auth_failures_per_minute: Option<f64>,
    auth_failure_burst: Option<u32>,
    allowed_ips: Option<Vec<Cidr>>,
    trusted_proxies: Option<Vec<Cidr>>,
    #[serde(default)]
    teams: BTreeMap<String, TeamConfig>,
    #[serde(default)]
    runtimes: BTreeMap<String, RuntimeConfig>,
    #[serde(default)]
    docker: DockerConfig,
    #[serde(default)]
    kubernetes: KubeFileConfig,
}

/// `[kubernetes]` in the configuration file (the same settings as the `--kube-*` flags).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct KubeFileConfig {
    namespace: Option<String>,
    kubeconfig: Option<PathBuf>,
    service: Option<String>,
    port: Option<u16>,
    resync: Option<f64>,
}

/// The Kubernetes backend's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeConfig {
    /// The namespaces whose `Sandbox` resources are watched (never empty); the first is where
    /// the API creates them.
    pub namespaces: Vec<String>,
    /// A kubeconfig file (`None`: `KUBECONFIG` or `~/.kube/config`, else in-cluster config).
    pub kubeconfig: Option<PathBuf>,
    /// The service name reported for a Sandbox, `{name}` standing for its name.
    pub service: String,
    /// The port `/{user}/{name}/` routes reach on a sandbox's pod.
    pub port: u16,
    /// Between full re-lists of the `Sandbox` resources.
    pub resync: Duration,
}

impl KubeConfig {
    /// The namespace the API creates Sandboxes in: the first one named.
    pub fn namespace(&self) -> &str {
        self.namespaces.first().map_or("default", String::as_str)
    }
}

impl Default for KubeConfig {
    fn default() -> KubeConfig {
        KubeConfig {
            namespaces: vec!["default".into()],
            kubeconfig: None,
            service: "{name}".into(),
            port: 8888,
            resync: Duration::from_secs(30),
        }
    }
}

/// A runtime defined (or overridden) in the configuration file. Unset fields keep the
/// built-in runtime's values.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// The program that must be installed for this runtime (process backend; on `PATH`).
    pub program: Option<String>,
    /// Default dev-server command, run with `sh -c`; `$PORT` holds the port to listen on.
    pub command: Option<String>,
    /// The image a Docker sandbox of this runtime runs (it must exist on the engine).
    pub image: Option<String>,
    /// How many sandboxes of this runtime to keep started and waiting for a create (a warm
    /// pool; 0 or absent: none). At most [`MAX_WARM`].
    pub warm: Option<usize>,
    /// Kubernetes backend: the agent-sandbox `SandboxWarmPool` (in the backend's namespace) a
    /// create of this runtime claims a pre-warmed Sandbox from, through a `SandboxClaim`.
    pub warm_pool: Option<String>,
    /// Kubernetes backend: the size of a persistent volume (a `volumeClaimTemplates` entry,
    /// e.g. `"1Gi"`) for each Sandbox's `/sandbox`, so its files outlive a stop; absent: an
    /// `emptyDir`.
    pub volume_size: Option<String>,
}

/// The largest warm pool of one runtime.
pub const MAX_WARM: usize = 64;

/// `[docker]` in the configuration file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// Default limits for every container; a create request may set its own.
    #[serde(flatten)]
    pub limits: Limits,
    /// Docker network containers join (default: the engine's default bridge).
    pub network: Option<String>,
}

/// `[teams.<name>]` in the configuration file: a team's own limits and address rules, each
/// overriding the global setting of the same name (a rate or cap of 0: none for this team).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TeamConfig {
    pub rate_limit_per_key: Option<f64>,
    pub rate_limit_per_sandbox: Option<f64>,
    pub rate_limit_burst: Option<u32>,
    pub max_connections_per_sandbox: Option<usize>,
    /// Where this team's credentials are accepted from, within the global `allowed_ips`.
    pub allowed_ips: Option<Vec<Cidr>>,
}

/// An address range in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`); a bare address is a
/// range of one. Host bits are cleared (`192.168.1.7/24` is `192.168.1.0/24`), and an
/// IPv4-mapped IPv6 range is the IPv4 range it maps (client addresses are compared in
/// their canonical form, `IpAddr::to_canonical`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    /// The network address and prefix length of an IPv4 range.
    pub fn ipv4(&self) -> Option<(std::net::Ipv4Addr, u8)> {
        match self.net {
            IpAddr::V4(net) => Some((net, self.len)),
            IpAddr::V6(_) => None,
        }
    }

    /// Whether `ip` (in its canonical form) lies in this range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask(u32::from(ip).into(), 32, self.len) == u32::from(net).into()
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask(u128::from(ip), 128, self.len) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `bits` with all but the first `len` of its `width` bits cleared.
fn mask(bits: u128, width: u8, len: u8) -> u128 {
    let host = width - len;
    if host >= 128 {
        0
    } else {
        bits >> host << host
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let s = s.trim();
        let bad = || {
            format!("{s:?} is not an IP address or CIDR range (like 10.0.0.0/8 or 2001:db8::/32)")
        };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= width)
                .ok_or_else(bad)?,
            None => width,
        };
        let (addr, len, width) = match addr {
            IpAddr::V6(v6) if len >= 96 && v6.to_ipv4_mapped().is_some() => {
                (IpAddr::V6(v6).to_canonical(), len - 96, 32)
            }
            other => (other, len, width),
        };
        let net = match addr {
            IpAddr::V4(v4) => {
                IpAddr::from(std::net::Ipv4Addr::from(
                    mask(u32::from(v4).into(), width, len) as u32,
                ))
            }
            IpAddr::V6(v6) => {
                IpAddr::from(std::net::Ipv6Addr::from(mask(u128::from(v6), width, len)))
            }
        };
        Ok(Cidr { net, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

impl std::fmt::Debug for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The merged, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub backend: BackendKind,
    pub isolation: Isolation,
    /// Host paths bound read-only into `sandbox`-isolated sandboxes (absolute).
    pub sandbox_ro_paths: Vec<PathBuf>,
    /// The configuration file read, if any (hidden from sandboxes: it may hold secrets).
    pub config_file: Option<PathBuf>,
    /// This program (`sandgate`), whose `log-writer` subcommand stamps sandbox output; not a
    /// setting (an embedding, such as the test harness, points it at the binary).
    pub program: PathBuf,
    /// The network of a sandbox whose create names none (where the backend can choose).
    pub network: crate::model::Network,
    /// Serving on, not ready, after SIGTERM.
    pub shutdown_delay: Duration,
    /// Between health checks of each running sandbox's port (`None`: no checks).
    pub health_interval: Option<Duration>,
    /// Passes in a row that make a sandbox ready.
    pub health_rise: u32,
    /// Failures in a row that make it not ready.
    pub health_fall: u32,
    /// Requests and operations are recorded for `/metrics`.
    pub metrics: bool,
    /// The metrics-only listener's address.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// An access-log line per finished request.
    pub access_log: bool,
    pub log_format: LogFormat,
    /// IPv4 range of egress sandboxes' links (a /30 each).
    pub egress_subnet: Cidr,
    /// Ranges egress sandboxes may not reach (besides those always refused).
    pub egress_deny: Vec<Cidr>,
    pub domain: String,
    pub public_url: Option<String>,
    pub port_range: RangeInclusive<u16>,
    pub proxy_timeout: Duration,
    /// How long a client may take to send a request head, and a kept-alive connection idle.
    pub header_timeout: Duration,
    pub max_concurrent_requests: usize,
    pub max_retries: u32,
    /// How requests are spread over a sandbox's instances.
    pub load_balancer_strategy: Strategy,
    /// Failures in a row that open a port's circuit (0: no circuit breaking).
    pub circuit_failures: u32,
    /// How long an open circuit refuses requests.
    pub circuit_open: Duration,
    pub stop_grace: Duration,
    /// `None`: never reap idle sandboxes.
    pub idle_timeout: Option<Duration>,
    pub wake_timeout: Duration,
    pub workers: usize,
    pub api_body_limit: usize,
    /// Plain HTTP/1.1 requests take the fast lane.
    pub fast_lane: bool,
    /// How long a request body may stall before it is cut.
    pub body_timeout: Duration,
    /// Proxied requests in flight from one client address.
    pub max_requests_per_client: usize,
    /// Default time limit of an exec.
    pub exec_timeout: Duration,
    /// Longest time limit an exec may ask for.
    pub exec_max_timeout: Duration,
    /// Largest per-stream output cap an exec may ask for.
    pub exec_max_output_bytes: usize,
    /// Between SIGTERM and SIGKILL when a command is killed.
    pub exec_kill_grace: Duration,
    /// Largest file upload.
    pub files_max_upload_bytes: u64,
    /// Extra `Host` names the control API answers to (lowercase, without port; `*`: any).
    pub allowed_hosts: Vec<String>,
    /// Protocols clients may upgrade to through the proxy (lowercase).
    pub upgrade_protocols: Vec<String>,
    /// Every request needs a credential.
    pub auth_enabled: bool,
    /// A configured owner key for the `default` team (`SANDGATE_ADMIN_KEY`).
    pub admin_key: Option<Secret>,
    pub auth_provider: AuthProvider,
    /// HS256 secret of minted tokens (`TOKEN_SECRET`; else one generated into the store).
    pub token_secret: Option<Secret>,
    /// Lifetime of minted tokens, in seconds.
    pub auth_token_expiry: u64,
    pub jwt: JwtConfig,
    /// Days audit records are kept (`None`: forever).
    pub audit_retention_days: Option<u32>,
    /// `Some`: the listener speaks TLS only (`crate::tls`); `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Requests per second per API key or token subject (`None`: no limit).
    pub rate_limit_per_key: Option<f64>,
    /// Requests per second per sandbox, through the proxy (`None`: no limit).
    pub rate_limit_per_sandbox: Option<f64>,
    /// Requests of each rate that may come at once (`None`: one second's worth).
    pub rate_limit_burst: Option<u32>,
    /// Proxied requests and upgraded streams open at once per sandbox (`None`: no cap).
    pub max_connections_per_sandbox: Option<usize>,
    /// Refused credentials per minute per client address (`None`: no throttle).
    pub auth_failures_per_minute: Option<f64>,
    /// Refused credentials from one address that may come at once.
    pub auth_failure_burst: u32,
    /// Client addresses served (empty: every address).
    pub allowed_ips: Vec<Cidr>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Per-team overrides (`[teams.<name>]`).
    pub teams: BTreeMap<String, TeamConfig>,
    pub runtimes: BTreeMap<String, RuntimeConfig>,
    pub docker: DockerConfig,
    pub kubernetes: KubeConfig,
}

/// The certificate and key files of a TLS listener. Both are given or neither; their contents
/// are read and checked by `crate::tls`, at startup and on every reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
}

/// A secret from the environment: shown as `<redacted>` by `Debug` (`--check-config` prints
/// the configuration), read with `expose`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

/// Credentials accepted besides API keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AuthProvider {
    /// API keys and Bearer JWTs (minted by the gateway, or an identity provider's).
    Jwt,
    /// API keys only.
    ApiKey,
}

/// An external identity provider whose tokens are accepted.
#[derive(Debug, Clone, Default)]
pub struct JwtConfig {
    pub public_key: Option<PathBuf>,
    pub jwks: Option<PathBuf>,
    pub jwks_ca: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub team_claim: String,
    pub role_claim: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `time LEVEL target: message key=value …`.
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

/// How the proxy picks one of a sandbox's ready instances (`LOAD_BALANCER_STRATEGY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Each in turn.
    #[default]
    RoundRobin,
    /// The one with the fewest requests in flight (ties in turn).
    LeastConnections,
    /// Any, uniformly.
    Random,
    /// The same one for the same client address while it is ready (rendezvous hashing: an
    /// instance leaving moves only its own clients).
    Sticky,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::LeastConnections => "least-connections",
            Strategy::Random => "random",
            Strategy::Sticky => "sticky",
        }
    }
}

/// `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

pub const DEFAULT_PORT: u16 = 8070;
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 20000..=29999;

impl Config {
    /// Defaults for a data directory: what `sandgate serve` uses with no flags.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Config {
        // Absolute, so every path handed to a sandbox (`HOME`, its working tree) is too.
        let data_dir = data_dir.into();
        let data_dir = std::path::absolute(&data_dir).unwrap_or(data_dir);
        Config {
            host: IpAddr::from([127, 0, 0, 1]),
            port: DEFAULT_PORT,
            database_url: sqlite_url(&data_dir),
            data_dir,
            backend: BackendKind::Process,
            isolation: Isolation::Auto,
            sandbox_ro_paths: Vec::new(),
            config_file: None,
            program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("sandgate")),
            network: crate::model::Network::None,
            shutdown_delay: Duration::ZERO,
            health_interval: Some(Duration::from_secs(2)),
            health_rise: 1,
            health_fall: 2,
            metrics: true,
            metrics_addr: None,
            access_log: true,
            log_format: LogFormat::Text,
            egress_subnet: "10.201.0.0/16".parse().expect("a valid CIDR"),
            egress_deny: [
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
            ]
            .iter()
            .map(|c| c.parse().expect("a valid CIDR"))
            .collect(),
            domain: "localhost".into(),
            public_url: None,
            port_range: DEFAULT_PORT_RANGE,
            proxy_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(30),
            max_concurrent_requests: 10_000,
            max_retries: 3,
            load_balancer_strategy: Strategy::RoundRobin,
            circuit_failures: 5,
            circuit_open: Duration::from_secs(10),
            stop_grace: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(3600)),
            wake_timeout: Duration::from_secs(15),
            workers: default_workers(),
            api_body_limit: 1024 * 1024,
            fast_lane: true,
            body_timeout: Duration::from_secs(30),
            max_requests_per_client: 10_000 / 4,
            exec_timeout: Duration::from_secs(300),
            exec_max_timeout: Duration::from_secs(3600),
            exec_max_output_bytes: 64 * 1024 * 1024,
            exec_kill_grace: Duration::from_secs(2),
            files_max_upload_bytes: 2 << 30,
            allowed_hosts: Vec::new(),
            upgrade_protocols: vec!["websocket".into()],
            auth_enabled: true,
            admin_key: None,
            auth_provider: AuthProvider::Jwt,
            token_secret: None,
            auth_token_expiry: 3600,
            jwt: JwtConfig {
                team_claim: "team".into(),
                role_claim: "role".into(),
                ..JwtConfig::default()
            },
            audit_retention_days: Some(90),
            tls: None,
            rate_limit_per_key: None,
            rate_limit_per_sandbox: None,
            rate_limit_burst: None,
            max_connections_per_sandbox: None,
            auth_failures_per_minute: Some(10.0),
            auth_failure_burst: 5,
            allowed_ips: Vec::new(),
            trusted_proxies: Vec::new(),
            teams: BTreeMap::new(),
            runtimes: BTreeMap::new(),
            docker: DockerConfig::default(),
            kubernetes: KubeConfig::default(),
        }
    }

    /// Merges file < environment < flags (clap already merged environment and flags) and
    /// validates the result. `env` is consulted for the variables clap cannot express (`PORT`).
    pub fn load(
        args: &ServeArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let env_port = match env("PORT") {
            Some(v) if !v.is_empty() => Some(v.trim().parse::<u16>().map_err(|_| {
                ConfigError::Invalid(format!("PORT must be a port number (0-65535), got {v:?}"))
            })?),
            _ => None,
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("sandgate-data"));
        let mut c = Config::for_data_dir(data_dir);
        c.host = args.host.or(file.host).unwrap_or(c.host);
        c.port = args.port.or(env_port).or(file.port).unwrap_or(c.port);
        if let Some(url) = args.database_url.clone().or(file.database_url) {
            c.database_url = url;
        }
        c.backend = args.backend.or(file.backend).unwrap_or(c.backend);
        c.isolation = args.isolation.or(file.isolation).unwrap_or(c.isolation);
        if let Some(paths) = args.sandbox_ro_paths.clone().or(file.sandbox_ro_paths) {
            c.sandbox_ro_paths = paths;
        }
        c.config_file = args.config.clone();
        if let Some(n) = args.network.or(file.network) {
            c.network = match n {
                DefaultNetwork::None => crate::model::Network::None,
                DefaultNetwork::Egress => crate::model::Network::Egress,
            };
        }
        if let Some(secs) = args.shutdown_delay.or(file.shutdown_delay) {
            c.shutdown_delay = if secs == 0.0 {
                Duration::ZERO
            } else {
                seconds("SANDGATE_SHUTDOWN_DELAY", secs)?
            };
        }
        match args.health_interval.or(file.health_interval) {
            Some(0.0) => c.health_interval = None,
            Some(secs) => c.health_interval = Some(seconds("SANDGATE_HEALTH_INTERVAL", secs)?),
            None => {}
        }
        c.health_rise = args
            .health_rise
            .or(file.health_rise)
            .unwrap_or(c.health_rise);
        c.health_fall = args
            .health_fall
            .or(file.health_fall)
            .unwrap_or(c.health_fall);
        if let Some(m) = args.metrics.or(file.metrics) {
            c.metrics = m == Switch::On;
        }
        c.metrics_addr = args.metrics_addr.or(file.metrics_addr);
        if let Some(a) = args.access_log.or(file.access_log) {
            c.access_log = a == Switch::On;
        }
        c.log_format = args.log_format.or(file.log_format).unwrap_or(c.log_format);
        if let Some(s) = args
            .egress_subnet
            .as_deref()
            .or(file.egress_subnet.as_deref())
        {
            c.egress_subnet = s.parse().map_err(|e| {
                ConfigError::Invalid(format!("egress_subnet (SANDGATE_EGRESS_SUBNET): {e}"))
            })?;
        }
        if let Some(deny) = cidr_list("SANDGATE_EGRESS_DENY", &args.egress_deny)? {
            c.egress_deny = deny;
        } else if let Some(deny) = file.egress_deny {
            c.egress_deny = deny;
        }
        c.domain = args.domain.clone().or(file.domain).unwrap_or(c.domain);
        c.public_url = args.public_url.clone().or(file.public_url);
        if let Some(range) = args.port_range.as_deref().or(file.port_range.as_deref()) {
            c.port_range = parse_port_range(range)?;
        }
        if let Some(secs) = args.proxy_timeout.or(file.proxy_timeout) {
            c.proxy_timeout = seconds("PROXY_TIMEOUT", secs)?;
        }
        if let Some(secs) = args.header_timeout.or(file.header_timeout) {
            c.header_timeout = seconds("SANDGATE_HEADER_TIMEOUT", secs)?;
        }
        c.max_concurrent_requests = args
            .max_concurrent_requests
            .or(file.max_concurrent_requests)
            .unwrap_or(c.max_concurrent_requests);
        c.max_retries = args
            .max_retries
            .or(file.max_retries)
            .unwrap_or(c.max_retries);
        c.load_balancer_strategy = args
            .load_balancer_strategy
            .or(file.load_balancer_strategy)
            .unwrap_or(c.load_balancer_strategy);
        c.circuit_failures = args
            .circuit_failures
            .or(file.circuit_failures)
            .unwrap_or(c.circuit_failures);
        if let Some(secs) = args.circuit_open.or(file.circuit_open) {
            c.circuit_open = seconds("SANDGATE_CIRCUIT_OPEN", secs)?;
        }
        if let Some(secs) = args.stop_grace.or(file.stop_grace) {
            c.stop_grace = seconds("SANDGATE_STOP_GRACE", secs)?;
        }
        match args.idle_timeout.or(file.idle_timeout) {
            Some(0.0) => c.idle_timeout = None,
            Some(secs) => c.idle_timeout = Some(seconds("SANDGATE_IDLE_TIMEOUT", secs)?),
            None => {}
        }
        if let Some(secs) = args.wake_timeout.or(file.wake_timeout) {
            c.wake_timeout = seconds("SANDGATE_WAKE_TIMEOUT", secs)?;
        }
        c.workers = args.workers.or(file.workers).unwrap_or(c.workers);
        c.api_body_limit = args
            .api_body_limit
            .or(file.api_body_limit)
            .unwrap_or(c.api_body_limit);
        if let Some(lane) = args.fast_lane.or(file.fast_lane) {
            c.fast_lane = lane == Switch::On;
        }
        if let Some(secs) = args.body_timeout.or(file.body_timeout) {
            c.body_timeout = seconds("SANDGATE_BODY_TIMEOUT", secs)?;
        }
        c.max_requests_per_client = args
            .max_requests_per_client
            .or(file.max_requests_per_client)
            .unwrap_or((c.max_concurrent_requests / 4).max(1));
        if let Some(secs) = args.exec_timeout.or(file.exec_timeout) {
            c.exec_timeout = seconds("SANDGATE_EXEC_TIMEOUT", secs)?;
        }
        if let Some(secs) = args.exec_max_timeout.or(file.exec_max_timeout) {
            c.exec_max_timeout = seconds("SANDGATE_EXEC_MAX_TIMEOUT", secs)?;
        }
        c.exec_max_output_bytes = args
            .exec_max_output_bytes
            .or(file.exec_max_output_bytes)
            .unwrap_or(c.exec_max_output_bytes);
        if let Some(secs) = args.exec_kill_grace.or(file.exec_kill_grace) {
            c.exec_kill_grace = seconds("SANDGATE_EXEC_KILL_GRACE", secs)?;
        }
        c.files_max_upload_bytes = args
            .files_max_upload_bytes
            .or(file.files_max_upload_bytes)
            .unwrap_or(c.files_max_upload_bytes);
        if let Some(hosts) = args.allowed_hosts.clone().or(file.allowed_hosts) {
            c.allowed_hosts = lowercase_list(hosts);
        }
        if let Some(protocols) = args.upgrade_protocols.clone().or(file.upgrade_protocols) {
            c.upgrade_protocols = lowercase_list(protocols);
        }
        c.tls = match (
            args.tls_cert.clone().or(file.tls_cert),
            args.tls_key.clone().or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => return Err(ConfigError::Invalid(
                "--tls-cert (SANDGATE_TLS_CERT, tls_cert) is set but --tls-key (SANDGATE_TLS_KEY, \
                 tls_key) is not: TLS needs the certificate's private key too"
                    .into(),
            )),
            (None, Some(_)) => return Err(ConfigError::Invalid(
                "--tls-key (SANDGATE_TLS_KEY, tls_key) is set but --tls-cert (SANDGATE_TLS_CERT, \
                 tls_cert) is not: TLS needs the certificate too"
                    .into(),
            )),
        };
        // A rate or cap of 0 is "none" (a team's 0 overrides a global value: kept as is).
        c.rate_limit_per_key = args
            .rate_limit_per_key
            .or(file.rate_limit_per_key)
            .filter(|&r| r != 0.0);
        c.rate_limit_per_sandbox = args
            .rate_limit_per_sandbox
            .or(file.rate_limit_per_sandbox)
            .filter(|&r| r != 0.0);
        c.rate_limit_burst = args.rate_limit_burst.or(file.rate_limit_burst);
        c.max_connections_per_sandbox = args
            .max_connections_per_sandbox
            .or(file.max_connections_per_sandbox)
            .filter(|&n| n != 0);
        if let Some(r) = args
            .auth_failures_per_minute
            .or(file.auth_failures_per_minute)
        {
            c.auth_failures_per_minute = Some(r).filter(|&r| r != 0.0);
        }
        c.auth_failure_burst = args
            .auth_failure_burst
            .or(file.auth_failure_burst)
            .unwrap_or(c.auth_failure_burst);
        if file.allowed_ips.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::Invalid(
                "allowed_ips = [] would refuse every address; leave it out to allow any".into(),
            ));
        }
        c.allowed_ips = cidr_list("SANDGATE_ALLOWED_IPS", &args.allowed_ips)?
            .or(file.allowed_ips)
            .unwrap_or_default();
        c.trusted_proxies = cidr_list("SANDGATE_TRUSTED_PROXIES", &args.trusted_proxies)?
            .or(file.trusted_proxies)
            .unwrap_or_default();
        c.teams = file.teams;
        c.runtimes = file.runtimes;
        c.docker = file.docker;
        let kube = file.kubernetes;
        if let Some(ns) = args.kube_namespace.clone().or(kube.namespace) {
            // Empty items are skipped; a list with none (an empty variable) is as good as unset.
            let namespaces: Vec<String> = ns
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(String::from)
                .collect();
            if !namespaces.is_empty() {
                c.kubernetes.namespaces = namespaces;
            }
        }
        c.kubernetes.kubeconfig = args.kubeconfig.clone().or(kube.kubeconfig);
        if let Some(service) = args.kube_service.clone().or(kube.service) {
            c.kubernetes.service = service;
        }
        if let Some(port) = args.kube_port.or(kube.port) {
            c.kubernetes.port = port;
        }
        if let Some(secs) = args.kube_resync.or(kube.resync) {
            c.kubernetes.resync = seconds("SANDGATE_KUBE_RESYNC", secs)?;
        }
        c.auth_enabled = args.auth_enabled.or(file.auth_enabled).unwrap_or(true);
        c.admin_key = args
            .admin_key
            .clone()
            .or_else(|| env("SANDGATE_ADMIN_KEY"))
            .filter(|k| !k.is_empty())
            .map(Secret);
        c.auth_provider = args
            .auth_provider
            .or(file.auth_provider)
            .unwrap_or(c.auth_provider);
        c.token_secret = env("TOKEN_SECRET").filter(|k| !k.is_empty()).map(Secret);
        c.auth_token_expiry = args
            .auth_token_expiry
            .or(file.auth_token_expiry)
            .unwrap_or(c.auth_token_expiry);
        c.jwt.public_key = args.jwt_public_key.clone().or(file.jwt_public_key);
        c.jwt.jwks = args.jwt_jwks.clone().or(file.jwt_jwks);
        c.jwt.jwks_ca = args.jwt_jwks_ca.clone().or(file.jwt_jwks_ca);
        c.jwt.issuer = args.jwt_issuer.clone().or(file.jwt_issuer);
        c.jwt.audience = args.jwt_audience.clone().or(file.jwt_audience);
        if let Some(claim) = args.jwt_team_claim.clone().or(file.jwt_team_claim) {
            c.jwt.team_claim = claim;
        }
        if let Some(claim) = args.jwt_role_claim.clone().or(file.jwt_role_claim) {
            c.jwt.role_claim = claim;
        }
        match args.audit_retention_days.or(file.audit_retention_days) {
            Some(0) => c.audit_retention_days = None,
            Some(days) => c.audit_retention_days = Some(days),
            None => {}
        }
        c.validate()?;
        Ok(c)
    }

    /// The effective configuration as a TOML document that `--config` reads back to the same
    /// configuration (`--check-config`): every setting with its value, `auto` ones resolved
    /// (`workers`), unset optional ones left out. Secrets, which only the environment sets
    /// (`SANDGATE_ADMIN_KEY`, `TOKEN_SECRET`), are never printed.
    pub fn to_toml(&self) -> String {
        use toml::Value as V;
        let mut t = toml::Table::new();
        let mut put = |k: &str, v: V| {
            t.insert(k.to_string(), v);
        };
        let text = |s: &str| V::String(s.to_string());
        let path = |p: &std::path::Path| V::String(p.display().to_string());
        let secs = |d: Duration| V::Float(d.as_secs_f64());
        let int = |n: u64| V::Integer(i64::try_from(n).unwrap_or(i64::MAX));
        let strings = |items: Vec<String>| V::Array(items.into_iter().map(V::String).collect());
        let cidrs = |c: &[Cidr]| strings(c.iter().map(ToString::to_string).collect());
        put("host", V::String(self.host.to_string()));
        put("port", int(self.port.into()));
        put("data_dir", path(&self.data_dir));
        put("database_url", text(&redact_password(&self.database_url)));
        put("backend", text(self.backend.as_str()));
        let isolation = match self.isolation {
            Isolation::Auto => "auto",
            Isolation::Sandbox => "sandbox",
            Isolation::Netns => "netns",
            Isolation::None => "none",
        };
        put("isolation", text(isolation));
        put(
            "sandbox_ro_paths",
            strings(
                self.sandbox_ro_paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            ),
        );
        put("network", text(self.network.as_str()));
        put("shutdown_delay", secs(self.shutdown_delay));
        put(
            "health_interval",
            self.health_interval.map_or(V::Float(0.0), secs),
        );
        put("health_rise", int(self.health_rise.into()));
        put("health_fall", int(self.health_fall.into()));
        put("metrics", text(if self.metrics { "on" } else { "off" }));
        if let Some(addr) = self.metrics_addr {
            put("metrics_addr", V::String(addr.to_string()));
        }
        put(
            "access_log",
            text(if self.access_log { "on" } else { "off" }),
        );
        put(
            "log_format",
            text(match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }),
        );
        put("egress_subnet", V::String(self.egress_subnet.to_string()));
        put("egress_deny", cidrs(&self.egress_deny));
        put("domain", text(&self.domain));
        if let Some(url) = &self.public_url {
            put("public_url", text(url));
        }
        put(
            "port_range",
            V::String(format!(
                "{}-{}",
                self.port_range.start(),
                self.port_range.end()
            )),
        );
        put("proxy_timeout", secs(self.proxy_timeout));
        put("header_timeout", secs(self.header_timeout));
        put(
            "max_concurrent_requests",
            int(self.max_concurrent_requests as u64),
        );
        put("max_retries", int(self.max_retries.into()));
        put(
            "load_balancer_strategy",
            text(self.load_balancer_strategy.as_str()),
        );
        put("circuit_failures", int(self.circuit_failures.into()));
        put("circuit_open", secs(self.circuit_open));
        put("stop_grace", secs(self.stop_grace));
        put(
            "idle_timeout",
            self.idle_timeout.map_or(V::Float(0.0), secs),
        );
        put("wake_timeout", secs(self.wake_timeout));
        put("workers", int(self.workers as u64));
        put("api_body_limit", int(self.api_body_limit as u64));
        put("fast_lane", text(if self.fast_lane { "on" } else { "off" }));
        put("body_timeout", secs(self.body_timeout));
        put(
            "max_requests_per_client",
            int(self.max_requests_per_client as u64),
        );
        put("exec_timeout", secs(self.exec_timeout));
        put("exec_max_timeout", secs(self.exec_max_timeout));
        put(
            "exec_max_output_bytes",
            int(self.exec_max_output_bytes as u64),
        );
        put("exec_kill_grace", secs(self.exec_kill_grace));
        put("files_max_upload_bytes", int(self.files_max_upload_bytes));
        put("allowed_hosts", strings(self.allowed_hosts.clone()));
        put("upgrade_protocols", strings(self.upgrade_protocols.clone()));
        if let Some(tls) = &self.tls {
            put("tls_cert", path(&tls.cert));
            put("tls_key", path(&tls.key));
        }
        put("auth_enabled", V::Boolean(self.auth_enabled));
        let provider = match self.auth_provider {
            AuthProvider::Jwt => "jwt",
            AuthProvider::ApiKey => "api_key",
        };
        put("auth_provider", text(provider));
        put("auth_token_expiry", int(self.auth_token_expiry));
        let jwt = &self.jwt;
        for (key, value) in [
            ("jwt_public_key", &jwt.public_key),
            ("jwt_jwks", &jwt.jwks),
            ("jwt_jwks_ca", &jwt.jwks_ca),
        ] {
            if let Some(p) = value {
                put(key, path(p));
            }
        }
        for (key, value) in [("jwt_issuer", &jwt.issuer), ("jwt_audience", &jwt.audience)] {
            if let Some(v) = value {
                put(key, text(v));
            }
        }
        put("jwt_team_claim", text(&jwt.team_claim));
        put("jwt_role_claim", text(&jwt.role_claim));
        put(
            "audit_retention_days",
            int(self.audit_retention_days.unwrap_or(0).into()),
        );
        if let Some(r) = self.rate_limit_per_key {
            put("rate_limit_per_key", V::Float(r));
        }
        if let Some(r) = self.rate_limit_per_sandbox {
            put("rate_limit_per_sandbox", V::Float(r));
        }
        if let Some(b) = self.rate_limit_burst {
            put("rate_limit_burst", int(b.into()));
        }
        if let Some(n) = self.max_connections_per_sandbox {
            put("max_connections_per_sandbox", int(n as u64));
        }
        put(
            "auth_failures_per_minute",
            V::Float(self.auth_failures_per_minute.unwrap_or(0.0)),
        );
        put("auth_failure_burst", int(self.auth_failure_burst.into()));
        if !self.allowed_ips.is_empty() {
            put("allowed_ips", cidrs(&self.allowed_ips));
        }
        put("trusted_proxies", cidrs(&self.trusted_proxies));
        let limits = |l: &Limits, t: &mut toml::Table| {
            if let Some(c) = l.cpus {
                t.insert("cpus".into(), V::Float(c));
            }
            if let Some(m) = l.memory_mb {
                t.insert("memory_mb".into(), int(m));
            }
            if let Some(p) = l.pids_limit {
                t.insert("pids_limit".into(), V::Integer(p));
            }
        };
        let mut teams = toml::Table::new();
        for (name, team) in &self.teams {
            let mut tt = toml::Table::new();
            if let Some(r) = team.rate_limit_per_key {
                tt.insert("rate_limit_per_key".into(), V::Float(r));
            }
            if let Some(r) = team.rate_limit_per_sandbox {
                tt.insert("rate_limit_per_sandbox".into(), V::Float(r));
            }
            if let Some(b) = team.rate_limit_burst {
                tt.insert("rate_limit_burst".into(), int(b.into()));
            }
            if let Some(n) = team.max_connections_per_sandbox {
                tt.insert("max_connections_per_sandbox".into(), int(n as u64));
            }
            if let Some(ips) = &team.allowed_ips {
                tt.insert("allowed_ips".into(), cidrs(ips));
            }
            teams.insert(name.clone(), V::Table(tt));
        }
        let mut runtimes = toml::Table::new();
        for (name, rt) in &self.runtimes {
            let mut rtt = toml::Table::new();
            for (key, value) in [
                ("program", &rt.program),
                ("command", &rt.command),
                ("image", &rt.image),
            ] {
                if let Some(v) = value {
                    rtt.insert(key.into(), text(v));
                }
            }
            if let Some(n) = rt.warm {
                rtt.insert("warm".into(), int(n as u64));
            }
            if let Some(pool) = &rt.warm_pool {
                rtt.insert("warm_pool".into(), text(pool));
            }
            if let Some(size) = &rt.volume_size {
                rtt.insert("volume_size".into(), text(size));
            }
            runtimes.insert(name.clone(), V::Table(rtt));
        }
        let mut docker = toml::Table::new();
        limits(&self.docker.limits, &mut docker);
        if let Some(n) = &self.docker.network {
            docker.insert("network".into(), text(n));
        }
        put("teams", V::Table(teams));
        put("runtimes", V::Table(runtimes));
        put("docker", V::Table(docker));
        let k = &self.kubernetes;
        let mut kube = toml::Table::new();
        kube.insert("namespace".into(), text(&k.namespaces.join(",")));
        if let Some(path) = &k.kubeconfig {
            kube.insert("kubeconfig".into(), text(&path.display().to_string()));
        }
        kube.insert("service".into(), text(&k.service));
        kube.insert("port".into(), int(k.port.into()));
        kube.insert("resync".into(), secs(k.resync));
        put("kubernetes", V::Table(kube));
        t.to_string()
    }

    /// Checks every invariant the rest of the gateway relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !valid_domain(&self.domain) {
            return bad(format!(
                "domain {:?} is not a valid DNS name (lowercase labels of a-z, 0-9 and '-')",
                self.domain
            ));
        }
        if let Some(p) = self.sandbox_ro_paths.iter().find(|p| !p.is_absolute()) {
            return bad(format!(
                "sandbox_ro_paths (SANDGATE_SANDBOX_RO_PATHS) must be absolute paths, got {}",
                p.display()
            ));
        }
        if !(1..=100).contains(&self.health_rise) || !(1..=100).contains(&self.health_fall) {
            return bad(
                "health_rise and health_fall (SANDGATE_HEALTH_RISE, SANDGATE_HEALTH_FALL) must \
                 be from 1 to 100"
                    .into(),
            );
        }
        match self.egress_subnet.ipv4() {
            Some((_, len)) if (8..=30).contains(&len) => {}
            _ => {
                return bad(format!(
                    "egress_subnet (SANDGATE_EGRESS_SUBNET) must be an IPv4 range from /8 to \
                     /30, got {}",
                    self.egress_subnet
                ))
            }
        }
        if self.max_concurrent_requests == 0 {
            return bad("MAX_CONCURRENT_REQUESTS must be at least 1".into());
        }
        if !(1..=1024).contains(&self.workers) {
            return bad(format!(
                "workers must be from 1 to 1024, got {}",
                self.workers
            ));
        }
        if self.max_requests_per_client == 0 {
            return bad("SANDGATE_MAX_REQUESTS_PER_CLIENT must be at least 1".into());
        }
        if self.body_timeout.is_zero() {
            return bad("SANDGATE_BODY_TIMEOUT must be greater than 0".into());
        }
        if self.exec_timeout > self.exec_max_timeout {
            return bad("SANDGATE_EXEC_TIMEOUT must not exceed SANDGATE_EXEC_MAX_TIMEOUT".into());
        }
        if !(1..=1 << 30).contains(&self.exec_max_output_bytes) {
            return bad("SANDGATE_EXEC_MAX_OUTPUT_BYTES must be from 1 to 1 GiB".into());
        }
        for p in &self.upgrade_protocols {
            if p.is_empty() || !p.bytes().all(is_token_byte) {
                return bad(format!("upgrade protocol {p:?} is not an HTTP token"));
            }
            if p == "h2c" {
                return bad("upgrade protocol h2c cannot be proxied (clients may use h2c with the gateway itself)".into());
            }
        }
        for h in &self.allowed_hosts {
            if h != "*" && !(h.starts_with('.') && valid_domain(&h[1..])) && !valid_domain(h) {
                return bad(format!(
                    "allowed host {h:?} must be a DNS name, .suffix or *"
                ));
            }
        }
        if self.max_retries > 20 {
            return bad("MAX_RETRIES must be at most 20".into());
        }
        if self.api_body_limit < 1024 {
            return bad("api_body_limit must be at least 1024 bytes".into());
        }
        if self.proxy_timeout.is_zero() {
            return bad("PROXY_TIMEOUT must be greater than 0".into());
        }
        if self.header_timeout.is_zero() {
            return bad("SANDGATE_HEADER_TIMEOUT must be greater than 0".into());
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return bad(format!(
                    "public_url {url:?} must start with http:// or https://"
                ));
            }
        }
        if !(self.database_url.starts_with("sqlite:")
            || self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            return bad(format!(
                "database_url {:?}: only sqlite: and postgres:// URLs are supported",
                self.database_url
            ));
        }
        if self.port_range.contains(&self.port) && self.port != 0 {
            return bad(format!(
                "the gateway port {} lies inside the sandbox port range {}-{}",
                self.port,
                self.port_range.start(),
                self.port_range.end()
            ));
        }
        for (name, rt) in &self.runtimes {
            if !crate::model::valid_label(name) {
                return bad(format!("runtime name {name:?} must be a lowercase label"));
            }
            let blank = |v: &Option<String>| v.as_ref().is_some_and(|v| v.trim().is_empty());
            if blank(&rt.program) || blank(&rt.command) || blank(&rt.image) {
                return bad(format!(
                    "runtime {name:?}: program, command and image must not be empty"
                ));
            }
            if rt.warm.is_some_and(|n| n > MAX_WARM) {
                return bad(format!(
                    "runtime {name:?}: warm is at most {MAX_WARM} sandboxes"
                ));
            }
            if let Some(pool) = &rt.warm_pool {
                if self.backend != BackendKind::Kubernetes {
                    return bad(format!(
                        "runtime {name:?}: warm_pool names a Kubernetes SandboxWarmPool; it needs \
                         the kubernetes backend, not {}",
                        self.backend.as_str()
                    ));
                }
                if !crate::model::valid_label(pool) {
                    return bad(format!(
                        "runtime {name:?}: warm_pool {pool:?} is not a SandboxWarmPool name"
                    ));
                }
                if rt.warm.is_some_and(|n| n > 0) {
                    return bad(format!(
                        "runtime {name:?}: warm (the gateway's own pool) and warm_pool (the \
                         cluster's) exclude each other"
                    ));
                }
            }
            if let Some(size) = &rt.volume_size {
                if self.backend != BackendKind::Kubernetes {
                    return bad(format!(
                        "runtime {name:?}: volume_size sizes a Kubernetes persistent volume; it \
                         needs the kubernetes backend, not {}",
                        self.backend.as_str()
                    ));
                }
                if !is_quantity(size) {
                    return bad(format!(
                        "runtime {name:?}: volume_size {size:?} is not a size like \"1Gi\" or \
                         \"500Mi\""
                    ));
                }
                if rt.warm_pool.is_some() {
                    return bad(format!(
                        "runtime {name:?}: volume_size does not apply to warm_pool Sandboxes \
                         (their SandboxTemplate decides their volumes)"
                    ));
                }
            }
        }
        let kube = &self.kubernetes;
        if kube.namespaces.is_empty() {
            return bad("kube_namespace names no namespace".into());
        }
        for (i, ns) in kube.namespaces.iter().enumerate() {
            if !crate::model::valid_label(ns) {
                return bad(format!(
                    "kube_namespace {ns:?} is not a Kubernetes namespace name"
                ));
            }
            if kube.namespaces[..i].contains(ns) {
                return bad(format!("kube_namespace names {ns:?} twice"));
            }
        }
        if kube.port == 0 {
            return bad("kube_port must be between 1 and 65535".into());
        }
        if kube.resync.is_zero() {
            return bad("kube_resync must be more than 0 seconds".into());
        }
        if let Err(e) = self.docker.limits.validate() {
            return bad(format!("[docker] {e}"));
        }
        if !self.auth_enabled && !self.host.is_loopback() {
            return bad(format!(
                "AUTH_ENABLED=false is allowed only on a loopback address, and the gateway \
                 listens on {}: anyone who can reach it could run code in its sandboxes",
                self.host
            ));
        }
        if !(60..=30 * 24 * 3600).contains(&self.auth_token_expiry) {
            return bad("AUTH_TOKEN_EXPIRY must be from 60 seconds to 30 days".into());
        }
        if self
            .token_secret
            .as_ref()
            .is_some_and(|s| s.expose().len() < 32)
        {
            return bad("TOKEN_SECRET must be at least 32 bytes".into());
        }
        if self.jwt.public_key.is_some() && self.jwt.jwks.is_some() {
            return bad("set one of --jwt-public-key and --jwt-jwks, not both".into());
        }
        if (self.jwt.public_key.is_some() || self.jwt.jwks.is_some())
            && self.auth_provider == AuthProvider::ApiKey
        {
            return bad(
                "an identity provider's key is configured but AUTH_PROVIDER=api_key".into(),
            );
        }
        let rate = |name: &str, r: Option<f64>| match r {
            Some(r) if !r.is_finite() || !(0.0..=1e6).contains(&r) => Err(ConfigError::Invalid(
                format!("{name} must be a number from 0 (no limit) to 1000000, got {r}"),
            )),
            _ => Ok(()),
        };
        let burst = |name: &str, b: Option<u32>| match b {
            Some(b) if !(1..=1_000_000).contains(&b) => Err(ConfigError::Invalid(format!(
                "{name} must be from 1 to 1000000, got {b}"
            ))),
            _ => Ok(()),
        };
        rate("SANDGATE_RATE_LIMIT_PER_KEY", self.rate_limit_per_key)?;
        rate(
            "SANDGATE_RATE_LIMIT_PER_SANDBOX",
            self.rate_limit_per_sandbox,
        )?;
        rate(
            "SANDGATE_AUTH_FAILURES_PER_MINUTE",
            self.auth_failures_per_minute,
        )?;
        burst("SANDGATE_RATE_LIMIT_BURST", self.rate_limit_burst)?;
        burst("SANDGATE_AUTH_FAILURE_BURST", Some(self.auth_failure_burst))?;
        for (name, team) in &self.teams {
            if !crate::model::valid_label(name) {
                return bad(format!("[teams.{name}]: a team name is a lowercase label"));
            }
            rate(
                &format!("[teams.{name}] rate_limit_per_key"),
                team.rate_limit_per_key,
            )?;
            rate(
                &format!("[teams.{name}] rate_limit_per_sandbox"),
                team.rate_limit_per_sandbox,
            )?;
            burst(
                &format!("[teams.{name}] rate_limit_burst"),
                team.rate_limit_burst,
            )?;
            if team.allowed_ips.as_ref().is_some_and(Vec::is_empty) {
                return bad(format!(
                    "[teams.{name}] allowed_ips = [] would refuse every address; leave it out \
                     to allow any"
                ));
            }
        }
        if let Some(key) = self.admin_key.as_ref().map(Secret::expose) {
            if !(32..=256).contains(&key.len())
                || !key.bytes().all(|b| b.is_ascii_graphic() && b != b',')
            {
                return bad(
                    "SANDGATE_ADMIN_KEY must be 32 to 256 visible ASCII characters, without \
                     spaces or commas"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// The base URL clients use to reach this gateway (`https` when it serves TLS).
    pub fn public_base(&self, bound_port: u16) -> String {
        let scheme = self.scheme();
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => match self.host {
                IpAddr::V6(ip) => format!("{scheme}://[{ip}]:{bound_port}"),
                IpAddr::V4(ip) if ip.is_unspecified() => {
                    format!("{scheme}://127.0.0.1:{bound_port}")
                }
                ip => format!("{scheme}://{ip}:{bound_port}"),
            },
        }
    }

    /// The scheme clients reach the gateway by: `https` with TLS on, else `http`.
    pub fn scheme(&self) -> &'static str {
        match self.tls {
            Some(_) => "https",
            None => "http",
        }
    }
}

/// A comma-separated list of CIDR ranges from a flag or variable; empty items are skipped,
/// and a list with none (an empty variable) is as good as unset.
fn cidr_list(name: &str, items: &Option<Vec<String>>) -> Result<Option<Vec<Cidr>>, ConfigError> {
    let Some(items) = items else {
        return Ok(None);
    };
    let list = items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<Cidr>, _>>()?;
    Ok(Some(list).filter(|l| !l.is_empty()))
}

/// Trimmed, lowercased, without empty items.
fn lowercase_list(items: Vec<String>) -> Vec<String> {
    items
        .into_iter()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A storage size as Kubernetes quantities write one: a positive whole number and a binary
/// or decimal suffix (`1Gi`, `500Mi`, `10G`).
fn is_quantity(s: &str) -> bool {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (number, suffix) = s.split_at(digits);
    !number.is_empty()
        && number.bytes().any(|b| b != b'0')
        && digits <= 12
        && ["Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T"].contains(&suffix)
}

/// A `tchar` of RFC 9110 §5.6.2.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One event loop per core (`crate::workers`).
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A database URL with its password (if any) replaced: `--check-config` never prints one
/// (give PostgreSQL's in `PGPASSWORD` or `~/.pgpass` to keep the printed URL usable).
fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
        None => url.to_string(),
    }
}

fn sqlite_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("sandgate.db").display())
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn seconds(name: &str, secs: f64) -> Result<Duration, ConfigError> {
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(ConfigError::Invalid(format!(
            "{name} must be a number of seconds between 0 and 86400, got {secs}"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `LOW-HIGH` (inclusive) into a port range.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, ConfigError> {
    let err = || {
        ConfigError::Invalid(format!(
            "port range {s:?} must look like LOW-HIGH with 1024 <= LOW <= HIGH <= 65535"
        ))
    };
    let (lo, hi) = s.trim().split_once('-').ok_or_else(err)?;
    let lo: u16 = lo.trim().parse().map_err(|_| err())?;
    let hi: u16 = hi.trim().parse().map_err(|_| err())?;
    if lo < 1024 || lo > hi {
        return Err(err());
    }
    Ok(lo..=hi)
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty() && d.len() <= 253 && d.split('.').all(crate::model::valid_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_passwords_are_never_printed() {
        assert_eq!(
            redact_password("postgres://sg:hunter2@db:5432/sandgate"),
            "postgres://sg:<redacted>@db:5432/sandgate"
        );
        for kept in ["postgres://sg@db/sandgate", "sqlite:///var/lib/sandgate.db"] {
            assert_eq!(redact_password(kept), kept);
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::load(&ServeArgs::default(), no_env).unwrap();
        assert_eq!(c.port, 8070);
        assert_eq!(c.host.to_string(), "127.0.0.1");
        let dir = std::env::current_dir().unwrap().join("sandgate-data");
        assert_eq!(c.data_dir, dir);
        assert_eq!(
            c.database_url,
            format!("sqlite://{}", dir.join("sandgate.db").display())
        );
        assert_eq!(c.backend, BackendKind::Process);
        assert_eq!(c.proxy_timeout, Duration::from_secs(30));
    }

    /// `--check-config`'s TOML, saved and read back with `--config`, is the same
    /// configuration: for the defaults, and for one that sets nearly everything.
    #[test]
    fn the_printed_configuration_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let round_trip = |c: &Config, n: usize| {
            let path = dir.path().join(format!("printed-{n}.toml"));
            std::fs::write(&path, c.to_toml()).unwrap();
            let args = ServeArgs {
                config: Some(path.clone()),
                ..Default::default()
            };
            let mut back =
                Config::load(&args, no_env).unwrap_or_else(|e| panic!("{e}\n{}", c.to_toml()));
            assert_eq!(back.config_file, Some(path));
            back.config_file = c.config_file.clone();
            assert_eq!(format!("{back:#?}"), format!("{c:#?}"), "{}", c.to_toml());
        };
        round_trip(&Config::load(&ServeArgs::default(), no_env).unwrap(), 0);
        let full = dir.path().join("full.toml");
        std::fs::write(
            &full,
            "host = \"::1\"\nport = 9000\ndata_dir = \"/srv/sg\"\nbackend = \"docker\"\n\
             isolation = \"none\"\nsandbox_ro_paths = [\"/srv/tools\"]\nnetwork = \"egress\"\n\
             egress_subnet = \"10.9.0.0/20\"\negress_deny = [\"203.0.113.0/24\"]\n\
             domain = \"sb.example.test\"\npublic_url = \"https://sb.example.test\"\n\
             port_range = \"30000-30100\"\nproxy_timeout = 2.5\nidle_timeout = 0\n\
             workers = 3\nfast_lane = \"off\"\nallowed_hosts = [\"gw.example.test\"]\n\
             auth_enabled = false\nauth_provider = \"jwt\"\njwt_issuer = \"https://idp\"\n\
             jwt_jwks = \"/etc/jwks.json\"\naudit_retention_days = 0\n\
             rate_limit_per_key = 5\nrate_limit_burst = 7\nmax_connections_per_sandbox = 9\n\
             auth_failures_per_minute = 0\nallowed_ips = [\"10.0.0.0/8\"]\n\
             trusted_proxies = [\"192.0.2.1\"]\n\
             [teams.acme]\nrate_limit_per_key = 0\nallowed_ips = [\"192.0.2.0/24\"]\n\
             [runtimes.ruby]\nprogram = \"ruby\"\ncommand = \"ruby -run -e httpd . -p $PORT\"\n\
             [docker]\ncpus = 0.5\nmemory_mb = 256\nnetwork = \"sg\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(full),
            ..Default::default()
        };
        let mut c = Config::load(&args, no_env).unwrap();
        c.config_file = None;
        round_trip(&c, 1);
        let printed = c.to_toml();
        assert!(printed.contains("workers = 3"), "{printed}");
        assert!(!printed.contains("token_secret"), "{printed}");
    }

    #[test]
    fn file_is_overridden_by_env_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "port = 9000\nproxy_timeout = 5\ndomain = \"example.test\"\n\
             [runtimes.ruby]\nprogram = \"ruby\"\ncommand = \"ruby -run -e httpd . -p $PORT\"\n",
        )
        .unwrap();
        let mut args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let c = Config::load(&args, no_env).unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.domain, "example.test");
        assert_eq!(c.proxy_timeout, Duration::from_secs(5));
        assert_eq!(c.runtimes["ruby"].program.as_deref(), Some("ruby"));
        // PORT (seed 003) beats the file; GATEWAY_PORT/--port (clap) beat PORT.
        let c = Config::load(&args, |k| (k == "PORT").then(|| "9100".to_string())).unwrap();
        assert_eq!(c.port, 9100);
        args.port = Some(9200);
        let c = Config::load(&args, |k| (k == "PORT").then(|| "9100".to_string())).unwrap();
        assert_eq!(c.port, 9200);
    }

    #[test]
    fn bad_values_are_refused_with_a_clear_message() {
        let cases: Vec<(ServeArgs, &str)> = vec![
            (
                ServeArgs {
                    port_range: Some("30000-20000".into()),
                    ..Default::default()
                },
                "port range",
            ),
            (
                ServeArgs {
                    proxy_timeout: Some(0.0),
                    ..Default::default()
                },
                "PROXY_TIMEOUT",
            ),
            (
                ServeArgs {
                    max_concurrent_requests: Some(0),
                    ..Default::default()
                },
                "MAX_CONCURRENT_REQUESTS",
            ),
            (
                ServeArgs {
                    domain: Some("Bad_Domain".into()),
                    ..Default::default()
                },
                "domain",
            ),
            (
                ServeArgs {
                    auth_enabled: Some(false),
                    host: Some(IpAddr::from([0, 0, 0, 0])),
                    ..Default::default()
                },
                "AUTH_ENABLED=false",
            ),
            (
                ServeArgs {
                    port: Some(20001),
                    ..Default::default()
                },
                "inside the sandbox port range",
            ),
        ];
        for (args, needle) in cases {
            let err = Config::load(&args, no_env).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        }
        let err = Config::load(&ServeArgs::default(), |k| {
            (k == "PORT").then(|| "http".to_string())
        })
        .unwrap_err();
        assert!(err.to_string().contains("PORT"));
    }

    #[test]
    fn kube_namespaces_are_a_list_whose_first_gets_creates() {
        let load = |ns: &str| {
            let args = ServeArgs {
                kube_namespace: Some(ns.into()),
                ..Default::default()
            };
            Config::load(&args, no_env)
        };
        let c = load("team-a, team-b").unwrap();
        assert_eq!(c.kubernetes.namespaces, ["team-a", "team-b"]);
        assert_eq!(c.kubernetes.namespace(), "team-a");
        assert!(c.to_toml().contains("namespace = \"team-a,team-b\""));
        assert_eq!(
            Config::load(&ServeArgs::default(), no_env)
                .unwrap()
                .kubernetes
                .namespace(),
            "default"
        );
        assert_eq!(load(" , ").unwrap().kubernetes.namespaces, ["default"]);
        for (bad, says) in [
            ("a,Team_B", "not a Kubernetes namespace name"),
            ("a,b,a", "names \"a\" twice"),
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    /// `text` as the configuration file (written in `dir`), loaded with no environment.
    fn load_file(dir: &std::path::Path, text: &str) -> Result<Config, ConfigError> {
        let path = dir.join("c.toml");
        std::fs::write(&path, text).unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        Config::load(&args, no_env)
    }

    #[test]
    fn volume_size_is_a_kubernetes_quantity_on_the_kubernetes_backend() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| load_file(dir.path(), text);
        let kube = "backend = \"kubernetes\"\n[runtimes.py]\n";
        let c = load(&format!("{kube}volume_size = \"2Gi\"\n")).unwrap();
        assert_eq!(c.runtimes["py"].volume_size.as_deref(), Some("2Gi"));
        assert!(c.to_toml().contains("volume_size = \"2Gi\""));
        for bad in ["2 Gi", "Gi", "0Gi", "2GB", "-1Gi", "1.5Gi"] {
            let err = load(&format!("{kube}volume_size = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("is not a size"), "{bad}: {err}");
        }
        let err = load("[runtimes.py]\nvolume_size = \"1Gi\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kubernetes backend"), "{err}");
        let err = load(&format!("{kube}volume_size = \"1Gi\"\nwarm_pool = \"p\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("SandboxTemplate"), "{err}");
    }

    #[test]
    fn warm_pool_needs_the_kubernetes_backend() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| load_file(dir.path(), text);
        let pooled = "[runtimes.py]\nwarm_pool = \"py-pool\"\n";
        let c = load(&format!("backend = \"kubernetes\"\n{pooled}")).unwrap();
        assert_eq!(c.runtimes["py"].warm_pool.as_deref(), Some("py-pool"));
        assert!(c.to_toml().contains("warm_pool = \"py-pool\""));
        let err = load(pooled).unwrap_err().to_string();
        assert!(err.contains("kubernetes backend"), "{err}");
        let err = load(&format!("backend = \"kubernetes\"\n{pooled}warm = 2\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exclude each other"), "{err}");
        let err = load("backend = \"kubernetes\"\n[runtimes.py]\nwarm_pool = \"Bad_Pool\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a SandboxWarmPool name"), "{err}");
    }

    #[test]
    fn tls_needs_both_files_and_makes_the_public_base_https() {
        let cert = || Some(PathBuf::from("cert.pem"));
        let key = || Some(PathBuf::from("key.pem"));
        let c = Config::load(&ServeArgs::default(), no_env).unwrap();
        assert_eq!(c.tls, None);
        assert_eq!(c.public_base(8070), "http://127.0.0.1:8070");
        let args = ServeArgs {
            tls_cert: cert(),
            tls_key: key(),
            ..Default::default()
        };
        let c = Config::load(&args, no_env).unwrap();
        let files = c.tls.clone().expect("TLS on");
        assert_eq!((files.cert, files.key), (cert().unwrap(), key().unwrap()));
        assert_eq!(c.scheme(), "https");
        assert_eq!(c.public_base(8443), "https://127.0.0.1:8443");
        for (tls_cert, tls_key, needle) in [
            (cert(), None, "but --tls-key"),
            (None, key(), "but --tls-cert"),
        ] {
            let args = ServeArgs {
                tls_cert,
                tls_key,
                ..Default::default()
            };
            let err = Config::load(&args, no_env).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        // From the file, and a flag wins over it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "tls_cert = \"a.pem\"\ntls_key = \"b.pem\"\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            tls_key: key(),
            ..Default::default()
        };
        let files = Config::load(&args, no_env).unwrap().tls.unwrap();
        assert_eq!(files.cert, PathBuf::from("a.pem"));
        assert_eq!(files.key, PathBuf::from("key.pem"));
    }

    #[test]
    fn cidr_ranges_parse_and_match() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(c("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert_eq!(c("192.168.1.7/24").to_string(), "192.168.1.0/24");
        assert_eq!(c(" 127.0.0.2 ").to_string(), "127.0.0.2/32");
        assert!(c("127.0.0.2").contains(ip("::ffff:127.0.0.2")));
        assert!(!c("127.0.0.2").contains(ip("127.0.0.3")));
        assert!(c("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!c("0.0.0.0/0").contains(ip("::1")));
        assert!(c("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!c("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(c("::/0").contains(ip("::1")));
        assert_eq!(c("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "example.com",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rate_limits_allowlists_and_teams_from_file_env_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "rate_limit_per_key = 5\nallowed_ips = [\"10.0.0.0/8\"]\n\
             [teams.acme]\nrate_limit_per_key = 0\nmax_connections_per_sandbox = 3\n\
             allowed_ips = [\"192.0.2.0/24\", \"2001:db8::1\"]\n",
        )
        .unwrap();
        let mut args = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let c = Config::load(&args, no_env).unwrap();
        assert_eq!(c.rate_limit_per_key, Some(5.0));
        assert_eq!(c.rate_limit_per_sandbox, None);
        assert_eq!(c.auth_failures_per_minute, Some(10.0));
        assert_eq!(c.allowed_ips, vec!["10.0.0.0/8".parse::<Cidr>().unwrap()]);
        let acme = &c.teams["acme"];
        assert_eq!(acme.rate_limit_per_key, Some(0.0));
        assert_eq!(acme.max_connections_per_sandbox, Some(3));
        assert_eq!(acme.allowed_ips.as_ref().unwrap().len(), 2);
        // Flags (and their environment variables) beat the file; 0 turns a limit off.
        args.rate_limit_per_key = Some(0.0);
        args.auth_failures_per_minute = Some(0.0);
        args.trusted_proxies = Some(vec!["127.0.0.1".into(), " ".into()]);
        args.allowed_ips = Some(vec![String::new()]);
        let c = Config::load(&args, no_env).unwrap();
        assert_eq!(c.rate_limit_per_key, None);
        assert_eq!(c.auth_failures_per_minute, None);
        assert_eq!(c.trusted_proxies.len(), 1);
        // An empty list from the environment is unset: the file's list stands.
        assert_eq!(c.allowed_ips.len(), 1);
        args.allowed_ips = Some(vec!["10.0.0.0/8".into(), "nonsense".into()]);
        let err = Config::load(&args, no_env).unwrap_err().to_string();
        assert!(
            err.contains("SANDGATE_ALLOWED_IPS") && err.contains("nonsense"),
            "{err}"
        );
        for (text, needle) in [
            ("rate_limit_per_key = -1\n", "SANDGATE_RATE_LIMIT_PER_KEY"),
            ("rate_limit_burst = 0\n", "SANDGATE_RATE_LIMIT_BURST"),
            ("allowed_ips = []\n", "allowed_ips"),
            ("allowed_ips = [\"10.0.0.0/40\"]\n", "10.0.0.0/40"),
            ("[teams.Acme]\nrate_limit_per_key = 1\n", "lowercase label"),
            (
                "[teams.acme]\nallowed_ips = []\n",
                "[teams.acme] allowed_ips",
            ),
            (
                "[teams.acme]\nrate_limit_per_sandbox = 1e9\n",
                "rate_limit_per_sandbox",
            ),
            (
                "[teams.acme]\nmax_conections_per_sandbox = 1\n",
                "max_conections",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let args = ServeArgs {
                config: Some(path.clone()),
                ..Default::default()
            };
            let err = Config::load(&args, no_env).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "prot = 9000\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let err = Config::load(&args, no_env).unwrap_err().to_string();
        assert!(err.contains("prot"), "{err}");
    }
}
