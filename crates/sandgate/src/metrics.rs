//! Prometheus metrics: where the finish step, the proxy, the lifecycle and the health checker
//! record, and the text exposition `GET /metrics` serves.
//!
//! Every label value comes from a fixed set (methods, status classes, route templates, a
//! few reasons and kinds), so the number of series is bounded whatever the traffic: never a
//! raw path, sandbox id or key (the agent-sandbox router has no per-sandbox label by design).
//!
//! The request histogram is on the proxy's hot path: each event loop has a table of its own
//! (one histogram per method × status class × route, 128 bytes each), so recording a request
//! is a bucket search and two relaxed additions on a cache line no other core writes; a
//! scrape sums the loops. No allocation and no lock per request. The control API's requests
//! (not the hot path) are kept by route template in a small map under a mutex.
//! Why this is written here rather than with the `metrics` or `prometheus-client` crates:
//! docs/observability.md.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// OpenTelemetry's buckets for `http.server.request.duration` (seconds).
pub const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Buckets for connecting to a sandbox port (loopback or a bridge: well under a millisecond
/// when all is well).
pub const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

/// Buckets for lifecycle operations (a process starts in milliseconds, a container in
/// seconds, an image pull in minutes).
pub const LIFECYCLE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Slots of a histogram: at most 14 bounds, `+Inf`, and the sum.
const SLOTS: usize = 16;

/// A histogram of durations: a count per bucket (not cumulative) and the sum in nanoseconds.
/// Its bounds are the family's (one of the `*_BUCKETS`), given when observing and rendering.
#[repr(align(128))]
pub struct Histogram {
    slots: [AtomicU64; SLOTS],
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            slots: [const { AtomicU64::new(0) }; SLOTS],
        }
    }
}

/// The bucket of `d` among `bounds` (`bounds.len()`: `+Inf`), and `d` in nanoseconds.
fn bucket(bounds: &[f64], d: Duration) -> (usize, u64) {
    let secs = d.as_secs_f64();
    let i = bounds
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(bounds.len());
    (i, d.as_nanos().min(u64::MAX as u128) as u64)
}

impl Histogram {
    pub fn observe(&self, bounds: &[f64], d: Duration) {
        let (i, nanos) = bucket(bounds, d);
        self.slots[i].fetch_add(1, Ordering::Relaxed);
        self.slots[SLOTS - 1].fetch_add(nanos, Ordering::Relaxed);
    }

    fn add_to(&self, into: &mut Snapshot) {
        for (i, s) in self.slots.iter().enumerate() {
            into.0[i] += s.load(Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        self.add_to(&mut s);
        s
    }
}

/// A histogram's values at one moment (summed over loops).
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Snapshot([u64; SLOTS]);

impl Snapshot {
    /// `observe` on values held under a lock.
    fn observe(&mut self, bounds: &[f64], d: Duration) {
        let (i, nanos) = bucket(bounds, d);
        self.0[i] += 1;
        self.0[SLOTS - 1] += nanos;
    }

    pub fn count(&self) -> u64 {
        self.0[..SLOTS - 1].iter().sum()
    }
}

/// The request methods the label names (OpenTelemetry's known methods; others are `_OTHER`).
pub const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "_OTHER",
];

/// The label of a request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method(u8);

impl Method {
    pub fn of(method: &str) -> Method {
        let i = METHODS[..9].iter().position(|m| *m == method).unwrap_or(9);
        Method(i as u8)
    }

    pub fn as_str(self) -> &'static str {
        METHODS[self.0 as usize]
    }
}

/// Status classes: `none` for a request that ended without a response (the client left).
const STATUSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_class(status: u16) -> usize {
    match status {
        100..=599 => (status / 100) as usize,
        _ => 0,
    }
}

/// The route template a request matched, for the `http_route` label. The control API's
/// routes are named by their own templates (`/sandboxes/{id}`), recorded apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RouteLabel {
    /// Refused before any route was known (bad framing, an address not allowed), or a path
    /// the control API does not have.
    Unmatched,
    /// `{port}-{id}.{domain}`.
    Host,
    /// `/sandbox/{id}/…`.
    Id,
    /// `/{owner}/{name}/…`.
    Path,
    /// `/sandbox/{id}` (redirected to add the slash).
    IdRedirect,
    /// `/{owner}/{name}` (redirected to add the slash).
    PathRedirect,
    /// The control API: the template is the router's; `api` for a request refused before
    /// the router saw it (a missing credential).
    Api,
}

impl RouteLabel {
    /// The `http_route` label.
    pub fn as_str(self) -> &'static str {
        ROUTES[self as usize]
    }
}

const ROUTES: [&str; 7] = [
    "unmatched",
    "{port}-{id}.{domain}",
    "/sandbox/{id}/*",
    "/{owner}/{name}/*",
    "/sandbox/{id}",
    "/{owner}/{name}",
    "api",
];

/// How a request's credential fared, for `sandgate_auth_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AuthResult {
    /// No credential was needed, or authentication is off.
    None,
    /// A credential (key, token, identity provider's token, preview cookie) was accepted.
    Accepted,
    /// No credential where one was needed (401).
    Missing,
    /// A credential that is invalid, expired or revoked (401).
    Invalid,
    /// A valid credential without the permission, or from an address its team refuses (403).
    Forbidden,
}

const AUTH_RESULTS: [&str; 5] = ["none", "accepted", "missing", "invalid", "forbidden"];

/// Why a request to a sandbox failed on the sandbox's side (Envoy's response flags: `UF`,
/// `UT`, …), for `sandgate_upstream_errors_total` and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum UpstreamError {
    /// The port refused the connection (`UF`).
    Refused,
    /// The connection could not be made otherwise (`UF`).
    Unreachable,
    /// No response within `PROXY_TIMEOUT` (`UT`).
    Timeout,
    /// The sandbox broke HTTP: a malformed head, a reset, a close before a response (`UPE`).
    Protocol,
}

const UPSTREAM_ERRORS: [&str; 4] = ["refused", "unreachable", "timeout", "protocol"];

/// Kinds of long-lived stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stream {
    /// A proxied protocol switch (WebSocket) to a sandbox.
    Proxied,
    /// The gateway's interactive terminal (`/sandboxes/{id}/pty`).
    Terminal,
    /// The gateway's command socket (`/ws/{id}`).
    Commands,
}

const STREAMS: [&str; 3] = ["proxied", "terminal", "commands"];

/// Lifecycle operations timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Operation {
    Create,
    Start,
    Stop,
    /// A stopped persistent sandbox started by a request to it.
    Wake,
    Delete,
}

const OPERATIONS: [&str; 5] = ["create", "start", "stop", "wake", "delete"];

/// Retries of connection attempts, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Retry {
    /// The port refused a connection (it may be opening just now): dialled again.
    Connect,
    /// A kept connection the sandbox had closed: a body-less idempotent request sent again
    /// on a fresh one.
    Resend,
    /// An instance of a sandbox with replicas refused the connection: sent to another.
    Failover,
}

const RETRIES: [&str; 3] = ["connect", "resend", "failover"];

const TABLE: usize = METHODS.len() * STATUSES.len() * ROUTES.len();

/// One event loop's request histograms.
struct LoopTable {
    requests: Box<[Histogram]>,
}

fn table_index(method: Method, status: u16, route: RouteLabel) -> usize {
    let route = route as usize;
    (method.0 as usize * STATUSES.len() + status_class(status)) * ROUTES.len() + route
}

/// One request as the finish step reports it.
#[derive(Debug, Clone, Copy)]
pub struct Finish {
    pub method: Method,
    pub route: RouteLabel,
    /// 0: no response was sent.
    pub status: u16,
    pub elapsed: Duration,
    pub auth: AuthResult,
    pub upstream_error: Option<UpstreamError>,
}

/// A control-API series: method, status class, route template.
type ApiSeries = (u8, u8, Box<str>);

/// Everything recorded, for one gateway.
pub struct Metrics {
    enabled: bool,
    loops: Box<[LoopTable]>,
    /// Control-API requests by (method, status class, template): a few dozen series, found
    /// by a linear search (the API is not the hot path).
    api: Mutex<Vec<(ApiSeries, Snapshot)>>,
    auth: [AtomicU64; AUTH_RESULTS.len()],
    upstream_errors: [AtomicU64; UPSTREAM_ERRORS.len()],
    connect: Histogram,
    retries: [AtomicU64; RETRIES.len()],
    streams: [AtomicI64; STREAMS.len()],
    /// By operation × outcome (ok, error).
    lifecycle: [Histogram; OPERATIONS.len() * 2],
    health_checks: [AtomicU64; 2],
    health_changes: [AtomicU64; 2],
    /// Creates of runtimes with a warm pool: claimed one, or started one the usual way.
    warm_claims: [AtomicU64; 2],
    /// Warm sandboxes started: ready and waiting, or failed (and removed).
    warm_fills: [AtomicU64; 2],
    /// Circuit state changes, by the state entered (open, half-open, closed).
    circuits: [AtomicU64; 3],
}

impl Metrics {
    /// Metrics for `loops` event loops; `enabled: false` records nothing (the benchmark's
    /// baseline) but still serves the gauges read at scrape time.
    pub fn new(loops: usize, enabled: bool) -> Metrics {
        Metrics {
            enabled,
            loops: (0..loops.max(1))
                .map(|_| LoopTable {
                    requests: (0..TABLE).map(|_| Histogram::default()).collect(),
                })
                .collect(),
            api: Mutex::new(Vec::new()),
            auth: Default::default(),
            upstream_errors: Default::default(),
            connect: Histogram::default(),
            retries: Default::default(),
            streams: Default::default(),
            lifecycle: Default::default(),
            health_checks: Default::default(),
            health_changes: Default::default(),
            warm_claims: Default::default(),
            warm_fills: Default::default(),
            circuits: Default::default(),
        }
    }

    /// The finish step of a request (proxied, or answered by the gateway on a proxy route).
    pub fn finish(&self, f: &Finish) {
        if !self.enabled {
            return;
        }
        let i = crate::event_loop::current().min(self.loops.len() - 1);
        self.loops[i].requests[table_index(f.method, f.status, f.route)]
            .observe(REQUEST_BUCKETS, f.elapsed);
        self.side_counts(f);
    }

    /// The finish step of a control-API request, named by its route template (`None`: no
    /// route matched).
    pub fn finish_api(&self, f: &Finish, template: Option<&str>) {
        if !self.enabled {
            return;
        }
        let Some(template) = template else {
            return self.finish(&Finish {
                route: RouteLabel::Unmatched,
                ..*f
            });
        };
        let key = (f.method.0, status_class(f.status) as u8, template);
        {
            let mut api = self.api.lock().unwrap_or_else(|e| e.into_inner());
            let i = match api.iter().position(|((m, s, t), _)| (*m, *s, &**t) == key) {
                Some(i) => i,
                None => {
                    api.push(((key.0, key.1, key.2.into()), Snapshot::default()));
                    api.len() - 1
                }
            };
            api[i].1.observe(REQUEST_BUCKETS, f.elapsed);
        }
        self.side_counts(f);
    }

    fn side_counts(&self, f: &Finish) {
        if f.auth != AuthResult::None {
            self.auth[f.auth as usize].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(e) = f.upstream_error {
            self.upstream_errors[e as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connection to a sandbox port was made in `d`.
    pub fn connected(&self, d: Duration) {
        if self.enabled {
            self.connect.observe(CONNECT_BUCKETS, d);
        }
    }

    pub fn retried(&self, kind: Retry) {
        self.retries[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A long-lived stream opened: counted until the guard drops.
    pub fn stream(self: &Arc<Self>, kind: Stream) -> StreamGuard {
        self.stream_opened(kind);
        StreamGuard {
            metrics: self.clone(),
            kind,
        }
    }

    pub fn stream_opened(&self, kind: Stream) {
        self.streams[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn stream_closed(&self, kind: Stream) {
        self.streams[kind as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// A lifecycle operation took `d` and succeeded (`ok`) or failed.
    pub fn lifecycle(&self, op: Operation, ok: bool, d: Duration) {
        self.lifecycle[op as usize * 2 + usize::from(!ok)].observe(LIFECYCLE_BUCKETS, d);
    }

    /// A health check passed or failed; `changed` when it turned the verdict.
    pub fn health_check(&self, ok: bool, changed: bool) {
        let i = usize::from(!ok);
        self.health_checks[i].fetch_add(1, Ordering::Relaxed);
        if changed {
            self.health_changes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A create of a runtime with a warm pool claimed a waiting sandbox (`hit`) or did not.
    pub fn warm_claim(&self, hit: bool) {
        self.warm_claims[usize::from(!hit)].fetch_add(1, Ordering::Relaxed);
    }

    /// A warm sandbox was started and waits (`ok`), or its start failed.
    pub fn warm_fill(&self, ok: bool) {
        self.warm_fills[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// A port's circuit changed state.
    pub fn circuit(&self, t: crate::breaker::Transition) {
        use crate::breaker::Transition as T;
        let i = match t {
            T::Opened => 0,
            T::HalfOpened => 1,
            T::Closed => 2,
        };
        self.circuits[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests recorded for `method`, `status` and `route` so far.
    #[cfg(test)]
    pub fn requests(&self, method: &str, status: u16, route: RouteLabel) -> u64 {
        let i = table_index(Method::of(method), status, route);
        self.loops
            .iter()
            .map(|l| l.requests[i].snapshot().count())
            .sum()
    }

    /// Writes every family this struct holds.
    pub fn render(&self, out: &mut Exposition) {
        out.family(
            "http_server_request_duration_seconds",
            "Duration of HTTP requests the gateway served, from a complete head to the end \
             of the response (to the protocol switch for upgrades).",
            "histogram",
        );
        for i in 0..TABLE {
            let mut sum = Snapshot::default();
            for l in self.loops.iter() {
                l.requests[i].add_to(&mut sum);
            }
            if sum.count() == 0 {
                continue;
            }
            let route = i % ROUTES.len();
            let status = (i / ROUTES.len()) % STATUSES.len();
            let method = i / ROUTES.len() / STATUSES.len();
            out.histogram(
                "http_server_request_duration_seconds",
                &[
                    ("method", METHODS[method]),
                    ("status", STATUSES[status]),
                    ("http_route", ROUTES[route]),
                ],
                REQUEST_BUCKETS,
                &sum,
            );
        }
        {
            let api = self.api.lock().unwrap_or_else(|e| e.into_inner());
            for ((m, s, t), snap) in api.iter() {
                out.histogram(
                    "http_server_request_duration_seconds",
                    &[
                        ("method", METHODS[*m as usize]),
                        ("status", STATUSES[*s as usize]),
                        ("http_route", t),
                    ],
                    REQUEST_BUCKETS,
                    snap,
                );
            }
        }
        out.counters(
            "sandgate_auth_total",
            "Requests by what their credential did: accepted, missing, invalid, forbidden.",
            "result",
            &AUTH_RESULTS[1..],
            &self.auth[1..],
        );
        out.counters(
            "sandgate_upstream_errors_total",
            "Requests to sandboxes that failed on the sandbox's side, by reason.",
            "reason",
            &UPSTREAM_ERRORS,
            &self.upstream_errors,
        );
        out.family(
            "sandgate_upstream_connect_duration_seconds",
            "Time to open a connection to a sandbox port.",
            "histogram",
        );
        out.histogram(
            "sandgate_upstream_connect_duration_seconds",
            &[],
            CONNECT_BUCKETS,
            &self.connect.snapshot(),
        );
        out.counters(
            "sandgate_upstream_retries_total",
            "Connection attempts made again: a refused dial, or a request resent on a fresh \
             connection after a kept one had closed (never a request whose bytes were sent).",
            "kind",
            &RETRIES,
            &self.retries,
        );
        out.family(
            "sandgate_open_streams",
            "Long-lived streams open now, by kind.",
            "gauge",
        );
        for (k, name) in STREAMS.iter().enumerate() {
            let n = self.streams[k].load(Ordering::Relaxed).max(0);
            out.sample("sandgate_open_streams", &[("kind", name)], n as f64);
        }
        out.family(
            "sandgate_lifecycle_duration_seconds",
            "Duration of sandbox lifecycle operations, by operation and outcome.",
            "histogram",
        );
        for (i, h) in self.lifecycle.iter().enumerate() {
            let snap = h.snapshot();
            let outcome = if i % 2 == 0 { "ok" } else { "error" };
            out.histogram(
                "sandgate_lifecycle_duration_seconds",
                &[("operation", OPERATIONS[i / 2]), ("outcome", outcome)],
                LIFECYCLE_BUCKETS,
                &snap,
            );
        }
        out.counters(
            "sandgate_health_checks_total",
            "Health checks of sandboxes' dev-server ports, by result.",
            "result",
            &["pass", "fail"],
            &self.health_checks,
        );
        out.counters(
            "sandgate_circuit_transitions_total",
            "Circuit breakers of sandbox ports that changed state, by the state entered.",
            "to",
            &["open", "half_open", "closed"],
            &self.circuits,
        );
        out.counters(
            "sandgate_health_changes_total",
            "Health verdicts that turned, by the state turned to.",
            "to",
            &["ready", "not_ready"],
            &self.health_changes,
        );
        out.counters(
            "sandgate_warm_pool_claims_total",
            "Creates of runtimes with a warm pool, by whether one waiting was claimed.",
            "result",
            &["claimed", "missed"],
            &self.warm_claims,
        );
        out.counters(
            "sandgate_warm_pool_fills_total",
            "Warm sandboxes started for a pool, by whether they came up and wait.",
            "result",
            &["ok", "failed"],
            &self.warm_fills,
        );
    }
}

/// Counts a long-lived stream as open until dropped.
pub struct StreamGuard {
    metrics: Arc<Metrics>,
    kind: Stream,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.stream_closed(self.kind);
    }
}

/// The Prometheus text exposition format (version 0.0.4) being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// The media type of [`Exposition`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Exposition {
    pub fn into_string(self) -> String {
        self.out
    }

    /// `# HELP` and `# TYPE` of a family; its samples follow.
    pub fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", number(value));
    }

    /// A family of one sample without labels.
    pub fn single(&mut self, name: &str, help: &str, kind: &str, value: f64) {
        self.family(name, help, kind);
        self.sample(name, &[], value);
    }

    /// A family of counters with one label.
    pub fn counters(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        values: &[&str],
        counts: &[AtomicU64],
    ) {
        self.family(name, help, "counter");
        for (v, c) in values.iter().zip(counts) {
            self.sample(name, &[(label, v)], c.load(Ordering::Relaxed) as f64);
        }
    }

    /// A histogram's series: cumulative `_bucket`s, `_sum` (seconds) and `_count`.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        bounds: &[f64],
        snap: &Snapshot,
    ) {
        let mut cumulative = 0;
        let mut le = String::new();
        for (i, bound) in bounds.iter().enumerate() {
            cumulative += snap.0[i];
            le.clear();
            let _ = write!(le, "{}", number(*bound));
            let _ = write!(self.out, "{name}_bucket");
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let count = snap.count();
        let _ = write!(self.out, "{name}_bucket");
        self.labels(labels, Some("+Inf"));
        let _ = writeln!(self.out, " {count}");
        let _ = write!(self.out, "{name}_sum");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", number(snap.0[SLOTS - 1] as f64 / 1e9));
        let _ = write!(self.out, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {count}");
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let mut first = true;
        for (k, v) in labels.iter().copied().chain(le.map(|le| ("le", le))) {
            if !first {
                self.out.push(',');
            }
            first = false;
            let _ = write!(self.out, "{k}=\"");
            for c in v.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }
}

/// A sample value as Prometheus reads it (`+Inf`, integers without a fraction).
fn number(v: f64) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    if v.is_nan() {
        return "NaN".into();
    }
    format!("{v}")
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The process's own figures (`process_*`, as the Prometheus client libraries name them),
/// read from `/proc/self` at scrape time.
pub fn render_process(out: &mut Exposition) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
        return;
    };
    let f: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let page = rustix::param::page_size() as f64;
    if let (Some(user), Some(system)) = (field(14), field(15)) {
        let cpu = (user + system) as f64 / ticks;
        out.single(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            "counter",
            cpu,
        );
    }
    if let Some(threads) = field(20) {
        out.single(
            "process_threads",
            "Number of OS threads.",
            "gauge",
            threads as f64,
        );
    }
    if let Some(vsize) = field(23) {
        out.single(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            "gauge",
            vsize as f64,
        );
    }
    if let Some(rss) = field(24) {
        out.single(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            "gauge",
            rss as f64 * page,
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        out.single(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            "gauge",
            boot as f64 + start as f64 / ticks,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let open = fds.count() as f64;
        out.single(
            "process_open_fds",
            "Number of open file descriptors.",
            "gauge",
            open,
        );
    }
    if let Some(limit) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
        out.single(
            "process_max_fds",
            "Maximum number of open file descriptors.",
            "gauge",
            limit as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_sum_is_in_seconds() {
        let h = Histogram::default();
        h.observe(REQUEST_BUCKETS, Duration::from_millis(3));
        h.observe(REQUEST_BUCKETS, Duration::from_millis(30));
        h.observe(REQUEST_BUCKETS, Duration::from_secs(60));
        let mut out = Exposition::default();
        out.histogram("x", &[("a", "b")], REQUEST_BUCKETS, &h.snapshot());
        let text = out.into_string();
        assert!(
            text.contains("x_bucket{a=\"b\",le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("x_bucket{a=\"b\",le=\"0.05\"} 2\n"), "{text}");
        assert!(text.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"), "{text}");
        assert!(text.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("x_sum{a=\"b\"} 60.033\n"), "{text}");
        assert!(text.contains("x_count{a=\"b\"} 3\n"), "{text}");
    }

    #[test]
    fn requests_are_kept_by_method_status_class_and_route_only() {
        let m = Metrics::new(2, true);
        let f = Finish {
            method: Method::of("GET"),
            route: RouteLabel::Id,
            status: 204,
            elapsed: Duration::from_millis(1),
            auth: AuthResult::Accepted,
            upstream_error: None,
        };
        m.finish(&f);
        m.finish(&Finish {
            method: Method::of("BREW"),
            status: 502,
            upstream_error: Some(UpstreamError::Refused),
            ..f
        });
        m.finish_api(&Finish { status: 201, ..f }, Some("/sandboxes"));
        m.finish_api(&Finish { status: 404, ..f }, None);
        assert_eq!(m.requests("GET", 200, RouteLabel::Id), 1);
        assert_eq!(m.requests("PROPFIND", 500, RouteLabel::Id), 1);
        assert_eq!(m.requests("GET", 400, RouteLabel::Unmatched), 1);
        // Refused before the router: `api`, not another route's series.
        m.finish(&Finish {
            route: RouteLabel::Api,
            status: 401,
            ..f
        });
        assert_eq!(m.requests("GET", 401, RouteLabel::Api), 1);
        assert_eq!(m.requests("GET", 401, RouteLabel::PathRedirect), 0);
        let mut out = Exposition::default();
        m.render(&mut out);
        let text = out.into_string();
        assert!(text.contains(
            "http_server_request_duration_seconds_count{method=\"_OTHER\",status=\"5xx\",\
             http_route=\"/sandbox/{id}/*\"} 1\n"
        ));
        assert!(text.contains(
            "http_server_request_duration_seconds_count{method=\"GET\",status=\"2xx\",\
             http_route=\"/sandboxes\"} 1\n"
        ));
        assert!(text.contains("sandgate_auth_total{result=\"accepted\"} 5\n"));
        assert!(text.contains("sandgate_upstream_errors_total{reason=\"refused\"} 1\n"));
        // One HELP and one TYPE per family.
        let types = text
            .lines()
            .filter(|l| l.starts_with("# TYPE http_server"))
            .count();
        assert_eq!(types, 1);
    }

    #[test]
    fn disabled_metrics_record_no_request() {
        let m = Metrics::new(1, false);
        m.finish(&Finish {
            method: Method::of("GET"),
            route: RouteLabel::Host,
            status: 200,
            elapsed: Duration::ZERO,
            auth: AuthResult::None,
            upstream_error: None,
        });
        assert_eq!(m.requests("GET", 200, RouteLabel::Host), 0);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition::default();
        out.sample("x", &[("t", "a\"b\\c\nd")], 1.0);
        assert_eq!(out.into_string(), "x{t=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn process_figures_are_read() {
        let mut out = Exposition::default();
        render_process(&mut out);
        let text = out.into_string();
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name} missing from {text}");
        }
    }
}
