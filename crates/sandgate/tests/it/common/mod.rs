//! Test harness: an in-process gateway (`TestGateway`), the real binary (`SpawnedGateway`), a
//! small hyper client (over TLS too: `tls`), fixture sandboxes, and bounded polling
//! (`eventually`).
//!
//! Every sandbox command the harness builds writes its shell's pid (= the fixture's pid after
//! `exec`, and the sandbox's process-group id) to a file, so tests can check what is still
//! alive, and so a panicking test still kills what it started.

use std::future::Future;
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderValue, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use sandgate::config::{Config, Isolation};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

pub mod browser;
pub mod fake_kube;
pub mod postgres;
pub mod tls;

/// Bound for one request/response exchange (head and collected body).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for "the sandbox's port answers" and similar readiness polls.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// First sandbox port handed to tests; blocks of `PORTS_PER_GATEWAY` follow. Below the
/// kernel's ephemeral range (32768+), so listeners on port 0 never take them.
const FIRST_TEST_PORT: u16 = 24000;
const LAST_TEST_PORT: u16 = 32760;
pub const PORTS_PER_GATEWAY: u16 = 20;
static NEXT_PORT: AtomicU16 = AtomicU16::new(FIRST_TEST_PORT);

/// A block of sandbox ports no other gateway in this test process uses.
pub fn port_block() -> u16 {
    let lo = NEXT_PORT.fetch_add(PORTS_PER_GATEWAY, Ordering::Relaxed);
    assert!(
        lo + PORTS_PER_GATEWAY <= LAST_TEST_PORT,
        "the test port space {FIRST_TEST_PORT}-{LAST_TEST_PORT} is used up"
    );
    lo
}

/// The fixture upstream binary built by Cargo for these tests.
/// Whether this machine can jail sandboxes (root, bubblewrap, setpriv); says `SKIPPED` when
/// it cannot, and fails under CI (`CI` set), where they must run.
pub fn jail_or_skip() -> bool {
    let ok = sandgate::backend::process::jail::available();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run jailed sandboxes (root, bubblewrap, setpriv)"
        );
        eprintln!("SKIPPED: no privilege to jail sandboxes (root, bwrap, setpriv)");
    }
    ok
}

/// The directory holding the fixture (bound read-only into jailed sandboxes).
pub fn fixture_dir() -> PathBuf {
    Path::new(fixture_path())
        .parent()
        .expect("the fixture's directory")
        .to_path_buf()
}

pub fn fixture_path() -> &'static str {
    env!("CARGO_BIN_EXE_sandgate-fixture")
}

/// The fixture, quoted for `sh -c`.
pub fn fixture_program() -> String {
    format!("'{}'", fixture_path())
}

/// The create body for a fixture dev server.
pub fn fixture_body() -> Value {
    json!({"runtime": "shell", "dev_server": true, "command": format!("exec {}", fixture_program())})
}

/// Polls `f` (about every 25 ms) until it yields `Some`, for at most `within`; panics naming
/// `what` if it never does. Each attempt is itself cut off at the deadline.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(_) => panic!("timed out after {within:?} waiting until {what}"),
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting until {what}");
        }
        // Poll interval, not synchronisation: the loop re-checks the condition.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Waits until `/health/proxy` counts `n` forwarded requests in flight.
pub async fn wait_in_flight(gw: &Client, n: u64) {
    eventually(
        READY_TIMEOUT,
        &format!("{n} requests are in flight"),
        || async {
            let v = gw.get("/health/proxy").send().await.json();
            (v["in_flight"] == n).then_some(())
        },
    )
    .await
}

/// Kernel start time of `pid` (`/proc/<pid>/stat` field 22), if it exists (zombies included).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether `pid` is a live process. A zombie has terminated (only its reaping is pending, which
/// is PID 1's job for an orphan), so it counts as gone.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Waits (bounded) until `pid` has terminated.
pub async fn wait_process_gone(pid: i32, within: Duration, what: &str) {
    eventually(
        within,
        &format!("{what} (pid {pid}) has exited"),
        || async move { (!process_alive(pid)).then_some(()) },
    )
    .await
}

/// Waits until every one of `pids` has exited.
pub async fn wait_processes_gone(
    pids: impl IntoIterator<Item = i32>,
    within: Duration,
    what: &str,
) {
    for pid in pids {
        wait_process_gone(pid, within, what).await;
    }
}

/// Process-group id of `pid` (`/proc/<pid>/stat` field 5).
pub fn pgid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(2)?.parse().ok()
}

/// Every live process started for sandbox `id`: the gateway gives each sandbox process
/// `SANDBOX_ID=<id>` in its environment, and children inherit it. Works the same with and
/// without namespaces (pids are the host's).
pub fn sandbox_processes(id: &str) -> Vec<i32> {
    let needle = format!("SANDBOX_ID={id}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == needle.as_bytes()))
        })
        .filter(|&pid| process_alive(pid))
        .collect();
    pids.sort_unstable();
    pids
}

/// The leader (process-group id) of sandbox `id`'s processes, other than `not`; waits for it.
pub async fn sandbox_leader(id: &str, not: Option<i32>) -> i32 {
    eventually(
        READY_TIMEOUT,
        &format!("sandbox {id} has a process-group leader"),
        || async {
            sandbox_processes(id)
                .into_iter()
                .find(|&pid| pgid_of(pid) == Some(pid) && Some(pid) != not)
        },
    )
    .await
}

/// Waits until no process of sandbox `id` is left.
pub async fn wait_sandbox_processes_gone(id: &str, within: Duration) {
    eventually(
        within,
        &format!("every process of sandbox {id} has exited"),
        || async { sandbox_processes(id).is_empty().then_some(()) },
    )
    .await
}

/// Pids (process-group ids) of sandboxes a test started, with their start times so a recycled
/// pid is never signalled.
#[derive(Clone, Default)]
pub struct PidRegistry(Arc<Mutex<Vec<(i32, u64)>>>);

impl PidRegistry {
    pub fn record(&self, pid: i32) {
        let start = start_time(pid).unwrap_or(0);
        self.0.lock().unwrap().push((pid, start));
    }

    pub fn all(&self) -> Vec<i32> {
        self.0.lock().unwrap().iter().map(|(p, _)| *p).collect()
    }

    /// SIGKILLs the process group of every recorded sandbox that is still there: the safety
    /// net that keeps a failed test from leaking processes.
    pub fn kill_leftovers(&self) {
        for (pid, start) in self.0.lock().unwrap().iter().copied() {
            let ours = match start_time(pid) {
                Some(t) => t == start,
                // The leader is gone; the group id cannot be reused while members remain.
                None => true,
            };
            if ours && killpg(Pid::from_raw(pid), None).is_ok() {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------------------------

/// Connects to `addr`, from the local address `from` if given (any address in 127.0.0.0/8
/// is this machine, so tests can be several clients).
pub async fn connect(addr: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(local) = from else {
        return TcpStream::connect(addr).await;
    };
    let socket = match local {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(addr).await
}

/// Sends one request on a fresh HTTP/1.1 connection to `addr`, from the local address `from`
/// if given.
pub async fn send_request<B>(
    addr: SocketAddr,
    from: Option<IpAddr>,
    req: Request<B>,
) -> Result<Response<Incoming>, String>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = connect(addr, from)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake with {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tx.send_request(req)
        .await
        .map_err(|e| format!("request to {addr}: {e}"))
}

/// Sends one request on a fresh HTTP/2 prior-knowledge (h2c) connection to `addr`.
pub async fn send_h2(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| format!("h2 handshake with {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    tx.send_request(req)
        .await
        .map_err(|e| format!("h2 request to {addr}: {e}"))
}

/// A fully read response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub async fn read(resp: Response<Incoming>) -> Result<Reply, String> {
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body ({e}); status {}, body {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// A header as text, or "" if absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<non-utf8>"))
            .unwrap_or("")
    }

    /// Asserts the status, with the body in the message when it differs.
    #[track_caller]
    pub fn expect(&self, status: u16) -> &Reply {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; headers {:?}, body {:?}",
            self.headers,
            self.text()
        );
        self
    }

    /// Asserts a gateway-made error: status, `x-sandgate-error`, and the JSON shape
    /// `{"error":{"code","message","details"}}`. Returns the message.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> String {
        self.expect(status);
        assert_eq!(
            self.header("x-sandgate-error"),
            code,
            "x-sandgate-error header"
        );
        assert!(
            self.header("content-type").starts_with("application/json"),
            "content-type {:?}",
            self.header("content-type")
        );
        let v = self.json();
        let err = v["error"]
            .as_object()
            .unwrap_or_else(|| panic!("no error object in {v}"));
        assert_eq!(err.get("code"), Some(&json!(code)), "{v}");
        assert!(err.contains_key("details"), "no details key in {v}");
        let message = err["message"].as_str().unwrap_or("").to_string();
        assert!(!message.is_empty(), "empty message in {v}");
        message
    }
}

/// Sends one request on a fresh connection: HTTP/1.1, over TLS if `tls` is given.
async fn send_over(
    addr: SocketAddr,
    from: Option<IpAddr>,
    tls: Option<&TlsConnector>,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, String> {
    match tls {
        None => send_request(addr, from, req).await,
        Some(tls) => tls::send_request(addr, tls, req).await,
    }
}

/// A request under construction; `Host` defaults to the gateway's address.
pub struct Req {
    addr: SocketAddr,
    /// The local address to connect from (default: the system's choice, 127.0.0.1).
    from: Option<IpAddr>,
    /// Sent as `X-API-Key` unless the request names a credential of its own.
    key: Option<String>,
    /// Sent over TLS with this client (a TLS gateway's).
    tls: Option<TlsConnector>,
    method: Method,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Req {
    pub fn new(addr: SocketAddr, method: Method, path: &str) -> Req {
        Req {
            addr,
            from: None,
            key: None,
            tls: None,
            method,
            path: path.to_string(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The headers of a WebSocket opening handshake (RFC 6455 §4.1).
    pub fn websocket_handshake(self) -> Req {
        self.header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Req {
        self.body = body.into();
        self
    }

    pub fn json(self, v: &Value) -> Req {
        self.header("content-type", "application/json")
            .body(v.to_string())
    }

    pub fn build(&self) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(self.method.clone())
            .uri(self.path.as_str());
        if !self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("host"))
        {
            b = b.header(HOST, self.addr.to_string());
        }
        let own_credential = self.headers.iter().any(|(k, _)| {
            k.eq_ignore_ascii_case("x-api-key") || k.eq_ignore_ascii_case("authorization")
        });
        if let (Some(key), false) = (&self.key, own_credential) {
            b = b.header("x-api-key", key.as_str());
        }
        for (k, v) in &self.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        b.body(Full::new(self.body.clone())).expect("valid request")
    }

    /// The response head; the body is left to the caller to stream.
    pub async fn send_streaming(self) -> Response<Incoming> {
        let what = format!("{} {}", self.method, self.path);
        let sent = send_over(self.addr, self.from, self.tls.as_ref(), self.build());
        tokio::time::timeout(REQUEST_TIMEOUT, sent)
            .await
            .unwrap_or_else(|_| panic!("{what}: no response head within {REQUEST_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
    }

    /// Sends and reads the whole body; connection errors and timeouts are `Err`.
    pub async fn try_send(self) -> Result<Reply, String> {
        let what = format!("{} {}", self.method, self.path);
        let exchange = async {
            let resp = send_over(self.addr, self.from, self.tls.as_ref(), self.build()).await?;
            Reply::read(resp).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("{what}: no complete response within {REQUEST_TIMEOUT:?}"))?
            .map_err(|e| format!("{what}: {e}"))
    }

    pub async fn send(self) -> Reply {
        self.try_send().await.unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A streamed request body of `n` bytes (64 KiB static chunks, nothing buffered), sent with an
/// exact `Content-Length`.
pub struct RepeatBody {
    remaining: u64,
}

const CHUNK: usize = 64 * 1024;
static UPLOAD_CHUNK: [u8; CHUNK] = [b'u'; CHUNK];

impl RepeatBody {
    pub fn new(n: u64) -> RepeatBody {
        RepeatBody { remaining: n }
    }
}

impl Body for RepeatBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK as u64) as usize;
        self.remaining -= n as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &UPLOAD_CHUNK[..n],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

// ---------------------------------------------------------------------------------------------
// Client: what tests do against any gateway
// ---------------------------------------------------------------------------------------------

/// A sandbox created by the harness.
#[derive(Debug, Clone)]
pub struct TestSandbox {
    pub id: String,
    /// The sandbox's process-group leader (host pid): the shell that `exec`ed into the
    /// command, or `unshare` for an isolated sandbox.
    pub pid: i32,
    /// The host port handed out (0 when the backend allocates none).
    pub allocated_port: u16,
    /// The dev-server port as clients name it.
    pub port: u16,
    /// The create response.
    pub view: Value,
}

impl TestSandbox {
    /// `/sandbox/{id}{rest}`.
    pub fn path(&self, rest: &str) -> String {
        format!("/sandbox/{}{rest}", self.id)
    }
}

/// Talks to one gateway; cheap to clone into tasks.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub pids: PidRegistry,
    /// The API key every request carries (`X-API-Key`), if any.
    pub key: Option<String>,
    /// A TLS gateway's client (HTTP/1.1 by ALPN); `None` for plain HTTP.
    pub tls: Option<TlsConnector>,
    /// The local address every connection comes from (default: the system's choice).
    pub from: Option<IpAddr>,
}

impl Client {
    pub fn new(addr: SocketAddr, pids: PidRegistry) -> Client {
        Client {
            addr,
            pids,
            key: None,
            tls: None,
            from: None,
        }
    }

    /// This client, connecting from the local address `from` (e.g. `127.0.0.2`).
    pub fn connecting_from(&self, from: &str) -> Client {
        Client {
            from: Some(from.parse().expect("an IP address")),
            ..self.clone()
        }
    }

    /// This client, sending `key` as `X-API-Key` on every request.
    pub fn with_key(&self, key: &str) -> Client {
        Client {
            key: Some(key.to_string()),
            ..self.clone()
        }
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    pub fn req(&self, method: Method, path: &str) -> Req {
        let mut req = Req::new(self.addr, method, path);
        req.tls = self.tls.clone();
        req.key = self.key.clone();
        req.from = self.from;
        req
    }

    pub fn get(&self, path: &str) -> Req {
        self.req(Method::GET, path)
    }

    pub fn post(&self, path: &str) -> Req {
        self.req(Method::POST, path)
    }

    pub fn delete(&self, path: &str) -> Req {
        self.req(Method::DELETE, path)
    }

    /// `GET /sandboxes/{id}`, which must answer 200.
    pub async fn sandbox(&self, id: &str) -> Value {
        self.get(&format!("/sandboxes/{id}"))
            .send()
            .await
            .expect(200)
            .json()
    }

    /// `GET /sandboxes`, checked for the `{count, sandboxes}` shape.
    pub async fn list(&self) -> Vec<Value> {
        let r = self.get("/sandboxes").send().await;
        r.expect(200);
        let v = r.json();
        let list = v["sandboxes"]
            .as_array()
            .unwrap_or_else(|| panic!("no sandboxes array in {v}"))
            .clone();
        assert_eq!(v["count"], json!(list.len()), "count field in {v}");
        list
    }

    pub async fn count(&self) -> usize {
        self.list().await.len()
    }

    /// Waits for sandbox `id`'s process-group leader (other than `not`) and records it.
    pub async fn leader(&self, id: &str, not: Option<i32>) -> i32 {
        let pid = sandbox_leader(id, not).await;
        self.pids.record(pid);
        pid
    }

    /// `POST /sandboxes/{id}/exec` with `body`, expecting 200: the command's result.
    pub async fn exec(&self, id: &str, body: &Value) -> Value {
        let r = self
            .post(&format!("/sandboxes/{id}/exec"))
            .json(body)
            .send()
            .await;
        r.expect(200);
        r.json()
    }

    /// `POST /sandboxes` with `body`, expecting 201.
    pub async fn create(&self, body: &Value) -> Value {
        let r = self.post("/sandboxes").json(body).send().await;
        r.expect(201);
        r.json()
    }

    /// Creates a sandbox running `prelude` then `program` with `dev_server: true`, merged with
    /// `extra`; does not wait for its port.
    pub async fn create_program(&self, prelude: &str, program: &str, extra: Value) -> TestSandbox {
        let command = format!("{prelude} exec {program}");
        let mut body = json!({"runtime": "shell", "dev_server": true, "command": command});
        if let Value::Object(extra) = extra {
            for (k, v) in extra {
                body[k] = v;
            }
        }
        let view = self.create(&body).await;
        let id = view["id"].as_str().expect("id").to_string();
        let allocated_port = view["allocated_port"].as_u64().unwrap_or(0) as u16;
        let port = view["port"].as_u64().expect("a dev-server port") as u16;
        let pid = self.leader(&id, None).await;
        TestSandbox {
            id,
            pid,
            allocated_port,
            port,
            view,
        }
    }

    /// Creates a fixture sandbox whose server starts listening only once the file `go`
    /// exists (the test creates it when it wants the server up); does not wait for it.
    pub async fn create_fixture_held(&self, go: &std::path::Path) -> TestSandbox {
        self.create_program(
            &format!("until [ -e {} ]; do sleep 0.05; done;", go.display()),
            &fixture_program(),
            json!({}),
        )
        .await
    }

    /// Creates a sandbox running the fixture and waits until it answers through the proxy.
    pub async fn create_fixture(&self) -> TestSandbox {
        self.create_fixture_with("", json!({})).await
    }

    /// Like `create_fixture`, with a shell `prelude` (e.g. `sleep 1000 &`) and extra create
    /// fields.
    pub async fn create_fixture_with(&self, prelude: &str, extra: Value) -> TestSandbox {
        let sb = self
            .create_program(prelude, &fixture_program(), extra)
            .await;
        self.wait_ready(&sb.id).await;
        sb
    }

    /// Polls `GET /sandbox/{id}/` until the fixture answers "fixture ok".
    pub async fn wait_ready(&self, id: &str) {
        let path = format!("/sandbox/{id}/");
        eventually(
            READY_TIMEOUT,
            &format!("sandbox {id} answers through the proxy"),
            || async {
                let r = self.get(&path).try_send().await.ok()?;
                (r.status == StatusCode::OK && r.body == "fixture ok").then_some(())
            },
        )
        .await;
        // And its health checks have seen it answer (`ready` in the sandbox object).
        let sandbox = format!("/sandboxes/{id}");
        eventually(READY_TIMEOUT, &format!("sandbox {id} is ready"), || async {
            let r = self.get(&sandbox).try_send().await.ok()?;
            (r.status == StatusCode::OK && r.json()["ready"] == true).then_some(())
        })
        .await
    }

    /// `DELETE /sandboxes/{id}`, expecting 200.
    pub async fn delete_sandbox(&self, id: &str) {
        let r = self.delete(&format!("/sandboxes/{id}")).send().await;
        r.expect(200);
        assert_eq!(r.json()["status"], "deleted");
    }

    /// Opens a WebSocket to `path`, with `host` as the Host header if given.
    pub async fn websocket(
        &self,
        path: &str,
        host: Option<&str>,
    ) -> tokio_tungstenite::WebSocketStream<TcpStream> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}{path}", self.addr)
            .into_client_request()
            .expect("websocket request");
        if let Some(host) = host {
            req.headers_mut()
                .insert(HOST, HeaderValue::from_str(host).expect("host"));
        }
        if let Some(key) = &self.key {
            req.headers_mut()
                .insert("x-api-key", HeaderValue::from_str(key).expect("key"));
        }
        let stream = connect(self.addr, self.from).await.expect("connect");
        let (ws, resp) = tokio::time::timeout(
            REQUEST_TIMEOUT,
            tokio_tungstenite::client_async(req, stream),
        )
        .await
        .expect("websocket handshake within the timeout")
        .unwrap_or_else(|e| panic!("websocket handshake to {path}: {e}"));
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy lanes
// ---------------------------------------------------------------------------------------------

/// Which proxy lane serves plain HTTP/1.1 requests: the parity suite runs every proxy test
/// with each (`--fast-lane on|off`), as linkerd runs one transparency suite against several
/// proxy setups. A test only one lane passes is a bug in that lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Fast,
    Hyper,
}

impl Lane {
    /// The `--fast-lane` value.
    pub fn flag(self) -> &'static str {
        match self {
            Lane::Fast => "on",
            Lane::Hyper => "off",
        }
    }
}

/// Instantiates each listed `async fn name(lane: Lane)` as two tests, `name::fast_lane` and
/// `name::hyper_lane`.
macro_rules! both_lanes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread")]
                async fn fast_lane() {
                    super::$name(crate::common::Lane::Fast).await
                }
                #[tokio::test(flavor = "multi_thread")]
                async fn hyper_lane() {
                    super::$name(crate::common::Lane::Hyper).await
                }
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// In-process gateway
// ---------------------------------------------------------------------------------------------

type Tweak = Box<dyn FnOnce(&mut Config) + Send>;

/// Configures and starts a `TestGateway`.
pub struct GatewayBuilder {
    ports: u16,
    isolation: Isolation,
    tweaks: Vec<Tweak>,
    tls: Option<TlsConnector>,
    from: Option<IpAddr>,
}

impl GatewayBuilder {
    /// How many sandbox ports the gateway may hand out (at most `PORTS_PER_GATEWAY`).
    pub fn ports(mut self, n: u16) -> GatewayBuilder {
        assert!((1..=PORTS_PER_GATEWAY).contains(&n));
        self.ports = n;
        self
    }

    /// Sandbox isolation (the harness default is `None`: shared host, allocated ports).
    pub fn isolation(mut self, isolation: Isolation) -> GatewayBuilder {
        self.isolation = isolation;
        self
    }

    /// The proxy lane plain HTTP/1.1 requests take.
    pub fn lane(self, lane: Lane) -> GatewayBuilder {
        self.config(move |c| c.fast_lane = lane == Lane::Fast)
    }

    /// Serves TLS with `certs`' files; the gateway's `client` speaks HTTP/1.1 over TLS,
    /// trusting `certs`' authority.
    pub fn tls(mut self, certs: &tls::CertDir) -> GatewayBuilder {
        self.tls = Some(certs.connector(&[b"http/1.1"]));
        let files = certs.files.clone();
        self.config(move |c| c.tls = Some(files))
    }

    /// The local address the gateway's `Client` (and its readiness probe) connects from.
    pub fn client_from(mut self, from: &str) -> GatewayBuilder {
        self.from = Some(from.parse().expect("an IP address"));
        self
    }

    /// Changes the configuration before the gateway starts.
    pub fn config(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> GatewayBuilder {
        self.tweaks.push(Box::new(f));
        self
    }

    pub async fn start(self) -> TestGateway {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let lo = port_block();
        let mut config = Config::for_data_dir(data_dir.path());
        config.port = 0;
        config.port_range = lo..=lo + self.ports - 1;
        config.isolation = self.isolation;
        // Jailed sandboxes see the fixture program where the tests run it from.
        config.sandbox_ro_paths = vec![fixture_dir()];
        // Sandbox output is stamped by the binary's `log-writer` (this process is the test).
        config.program = env!("CARGO_BIN_EXE_sandgate").into();
        // Authentication is its own suite (`auth`); the others talk to an open gateway. The
        // throttle on refused credentials is `limits`'s to test: a suite that walks many bad
        // credentials from 127.0.0.1 would otherwise meet it.
        config.auth_enabled = false;
        config.auth_failures_per_minute = None;
        for tweak in self.tweaks {
            tweak(&mut config);
        }
        config.validate().expect("the test configuration is valid");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let token = CancellationToken::new();
        let finished = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        // `sandgate::run`'s future is not `Send` (see the report), so it cannot be
        // `tokio::spawn`ed; it runs on a thread and runtime of its own, like the binary.
        {
            let (config, token, finished) = (config.clone(), token.clone(), finished.clone());
            std::thread::Builder::new()
                .name("sandgate-under-test".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("gateway runtime");
                    let result = rt.block_on(async move {
                        let listener = TcpListener::from_std(listener).expect("listener");
                        sandgate::run(config, listener, token).await
                    });
                    if let Err(e) = &result {
                        eprintln!("sandgate::run returned an error: {e}");
                    }
                    finished.store(true, Ordering::SeqCst);
                    let _ = done_tx.send(result.map_err(|e| e.to_string()));
                    rt.shutdown_timeout(Duration::from_secs(5));
                })
                .expect("spawn the gateway thread");
        }
        let mut client = Client::new(addr, PidRegistry::default());
        client.tls = self.tls;
        client.from = self.from;
        let gw = TestGateway {
            client,
            config,
            data_dir,
            token,
            done: Some(done_rx),
            clean: false,
        };
        eventually(READY_TIMEOUT, "the gateway answers /health", || async {
            assert!(
                !finished.load(Ordering::SeqCst),
                "sandgate::run returned early"
            );
            let r = gw.get("/health").try_send().await.ok()?;
            (r.status == StatusCode::OK).then_some(())
        })
        .await;
        gw
    }
}

/// `sandgate::run` on a listener bound to 127.0.0.1:0, with a fresh data directory and its own
/// block of sandbox ports.
pub struct TestGateway {
    pub client: Client,
    pub config: Config,
    data_dir: tempfile::TempDir,
    token: CancellationToken,
    done: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
    clean: bool,
}

impl Deref for TestGateway {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl TestGateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            ports: PORTS_PER_GATEWAY,
            isolation: Isolation::None,
            tweaks: Vec::new(),
            tls: None,
            from: None,
        }
    }

    pub async fn start() -> TestGateway {
        TestGateway::builder().start().await
    }

    /// A gateway whose plain HTTP/1.1 requests take `lane`.
    pub async fn on(lane: Lane) -> TestGateway {
        TestGateway::builder().lane(lane).start().await
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    pub fn port_range(&self) -> (u16, u16) {
        (
            *self.config.port_range.start(),
            *self.config.port_range.end(),
        )
    }

    /// Cancels the gateway and waits (bounded) for `run` to finish; it stops every sandbox.
    pub async fn shutdown(mut self) {
        self.token.cancel();
        let done = self.done.take().expect("not shut down twice");
        let result = tokio::time::timeout(Duration::from_secs(30), done)
            .await
            .expect("sandgate::run finishes within 30 s of shutdown")
            .expect("the gateway thread reported its result");
        result.expect("sandgate::run returned Ok");
        self.clean = true;
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.token.cancel();
        if !self.clean {
            // The test failed, or ended, before shutting down: the gateway's runtime ends now,
            // before it could stop its sandboxes, so do not leak them: the recorded leaders,
            // and every process tagged with one of its sandboxes' ids (made through the API
            // too, whose pids were never recorded).
            self.client.pids.kill_leftovers();
            let sandboxes = self.data_dir.path().join("sandboxes");
            for entry in std::fs::read_dir(sandboxes).into_iter().flatten().flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                for pid in sandbox_processes(&id) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------------

/// `sandgate serve --port 0 --data-dir D --port-range LO-HI`, signalled by its own pid. The
/// data directory outlives restarts (`kill`/`terminate` then `restart`).
pub struct SpawnedGateway {
    pub client: Client,
    data_dir: tempfile::TempDir,
    port_range: (u16, u16),
    extra_args: Vec<String>,
    child: Option<std::process::Child>,
    /// Kept open so the gateway never writes to a closed pipe.
    _stdout: Option<std::process::ChildStdout>,
    /// The network namespace (`ip netns` name) the gateway runs in, reached through a
    /// forwarder on the test's own loopback.
    netns: Option<String>,
    forwarder: Option<tokio::task::JoinHandle<()>>,
}

impl Deref for SpawnedGateway {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// Memory figures from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl SpawnedGateway {
    /// Starts the binary with `ports` sandbox ports and extra `serve` flags. Without
    /// `--isolation` or `--config` among them, `--isolation none` is added (shared host,
    /// allocated ports), as for `TestGateway`.
    pub async fn start(ports: u16, extra_args: &[&str]) -> SpawnedGateway {
        SpawnedGateway::launch(ports, extra_args, None).await
    }

    /// `start` for a gateway given `--tls-cert`/`--tls-key` among `extra_args`: its client
    /// speaks HTTP/1.1 over TLS with `tls`.
    pub async fn start_tls(ports: u16, extra_args: &[&str], tls: TlsConnector) -> SpawnedGateway {
        SpawnedGateway::launch(ports, extra_args, Some(tls)).await
    }

    async fn launch(ports: u16, extra_args: &[&str], tls: Option<TlsConnector>) -> SpawnedGateway {
        let mut extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        if !extra_args
            .iter()
            .any(|a| a == "--isolation" || a == "--config")
        {
            extra_args.extend(["--isolation".to_string(), "none".to_string()]);
        }
        if !extra_args.iter().any(|a| a == "--sandbox-ro-paths") {
            extra_args.extend([
                "--sandbox-ro-paths".to_string(),
                fixture_dir().display().to_string(),
            ]);
        }
        if !extra_args.iter().any(|a| a == "--auth-enabled") {
            extra_args.extend(["--auth-enabled".to_string(), "false".to_string()]);
        }
        let data_dir = tempfile::tempdir().expect("tempdir");
        let lo = port_block();
        let mut client = Client::new(
            "127.0.0.1:9".parse().expect("placeholder"),
            PidRegistry::default(),
        );
        client.tls = tls;
        let mut gw = SpawnedGateway {
            client,
            data_dir,
            port_range: (lo, lo + ports - 1),
            extra_args,
            child: None,
            _stdout: None,
            netns: None,
            forwarder: None,
        };
        gw.restart().await;
        gw
    }

    /// `start`, with the gateway inside network namespace `netns` (made by the test): the
    /// client reaches it through a forwarder on 127.0.0.1 that dials inside the namespace.
    pub async fn start_in_netns(ports: u16, extra_args: &[&str], netns: &str) -> SpawnedGateway {
        let mut extra: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        extra.extend([
            "--auth-enabled".to_string(),
            "false".to_string(),
            "--sandbox-ro-paths".to_string(),
            fixture_dir().display().to_string(),
        ]);
        let mut gw = SpawnedGateway {
            client: Client::new(
                "127.0.0.1:9".parse().expect("placeholder"),
                PidRegistry::default(),
            ),
            data_dir: tempfile::tempdir().expect("tempdir"),
            port_range: (port_block(), 0),
            extra_args: extra,
            child: None,
            _stdout: None,
            netns: Some(netns.to_string()),
            forwarder: None,
        };
        gw.port_range.1 = gw.port_range.0 + ports - 1;
        gw.restart().await;
        gw
    }

    pub fn port_range(&self) -> (u16, u16) {
        self.port_range
    }

    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// `start` with `--fast-lane` set for `lane`.
    pub async fn start_on(lane: Lane, ports: u16, extra_args: &[&str]) -> SpawnedGateway {
        let mut args = vec!["--fast-lane", lane.flag()];
        args.extend_from_slice(extra_args);
        SpawnedGateway::start(ports, &args).await
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("gateway running").id() as i32
    }

    /// Starts the binary (again) on the same data directory and port range; waits for the
    /// `listening on ADDR` line and a healthy `/health`.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "the gateway is still running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.path().join("gateway.log"))
            .expect("gateway log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_sandgate")]);
                c
            }
            None => std::process::Command::new(env!("CARGO_BIN_EXE_sandgate")),
        };
        cmd.arg("serve")
            .arg("--port")
            .arg("0")
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .arg("--port-range")
            .arg(format!("{}-{}", self.port_range.0, self.port_range.1))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        for var in [
            "SANDGATE_CONFIG",
            "GATEWAY_HOST",
            "GATEWAY_PORT",
            "PORT",
            "SANDGATE_DATA_DIR",
            "DATABASE_URL",
            "SANDGATE_BACKEND",
            "SANDGATE_ISOLATION",
            "SANDGATE_DOMAIN",
            "SANDGATE_PUBLIC_URL",
            "SANDGATE_PORT_RANGE",
            "PROXY_TIMEOUT",
            "MAX_CONCURRENT_REQUESTS",
            "MAX_RETRIES",
            "SANDGATE_STOP_GRACE",
            "SANDGATE_API_BODY_LIMIT",
            "AUTH_ENABLED",
            "SANDGATE_ADMIN_KEY",
            "SANDGATE_FAST_LANE",
            "SANDGATE_TLS_CERT",
            "SANDGATE_TLS_KEY",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().expect("spawn the sandgate binary");
        let stdout = child.stdout.take().expect("stdout");
        self.child = Some(child);
        let read = tokio::task::spawn_blocking(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            (reader.into_inner(), line)
        });
        let (stdout, line) = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .unwrap_or_else(|_| panic!("no `listening on` line within 30 s; log:\n{}", self.log()))
            .expect("reader task");
        self._stdout = Some(stdout);
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; log:\n{}", self.log()));
        self.client.addr = addr;
        if self.netns.is_some() {
            // `ip netns exec` becomes the gateway: its pid's namespace is the gateway's.
            let pid = self.pid();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the forwarder");
            self.client.addr = listener.local_addr().expect("forwarder address");
            if let Some(old) = self.forwarder.take() {
                old.abort();
            }
            self.forwarder = Some(tokio::spawn(async move {
                while let Ok((mut conn, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        if let Ok(mut inner) =
                            sandgate::backend::netns::connect(pid, addr.port()).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut conn, &mut inner).await;
                        }
                    });
                }
            }));
        }
        let client = self.client.clone();
        eventually(READY_TIMEOUT, "the spawned gateway answers /health", || {
            let client = client.clone();
            async move {
                let r = client.get("/health").try_send().await.ok()?;
                (r.status == StatusCode::OK).then_some(())
            }
        })
        .await;
    }

    /// Sends `signal` to the gateway's pid and waits (bounded) for it to exit.
    async fn signal_and_wait(
        &mut self,
        signal: Signal,
        within: Duration,
    ) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("gateway running");
        kill(Pid::from_raw(child.id() as i32), signal).expect("signal the gateway");
        let status = eventually(within, &format!("the gateway exits after {signal}"), || {
            let status = child.try_wait().expect("try_wait");
            async move { status }
        })
        .await;
        self._stdout = None;
        status
    }

    /// SIGKILL: the gateway dies without any cleanup.
    pub async fn kill(&mut self) {
        let status = self
            .signal_and_wait(Signal::SIGKILL, Duration::from_secs(10))
            .await;
        assert!(!status.success());
    }

    /// SIGTERM: graceful shutdown; returns the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30))
            .await
    }

    /// The gateway's current and peak resident memory.
    pub fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/<pid>/status"))
        };
        Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }

    /// What the gateway wrote to stderr (all incarnations).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.path().join("gateway.log")).unwrap_or_default()
    }
}

impl Drop for SpawnedGateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Graceful first, so the gateway stops its sandboxes; bounded, then forced.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut exited = false;
            while !exited && Instant::now() < deadline {
                exited = matches!(child.try_wait(), Ok(Some(_)));
                if !exited {
                    // Drop cannot await: poll the exit with a short blocking pause.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if !exited {
                // Not reaped yet, so the pid is still this child's.
                let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
            }
        }
        self.client.pids.kill_leftovers();
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

/// The configured owner key of gateways from [`auth_gateway`] (`SANDGATE_ADMIN_KEY`).
pub const ADMIN_KEY: &str = "test-owner-key-0123456789abcdefghijklmnop";

/// A gateway on `lane` with authentication on and [`ADMIN_KEY`] as its owner key, changed by
/// `tweak`.
pub async fn auth_gateway(
    lane: Lane,
    tweak: impl FnOnce(&mut Config) + Send + 'static,
) -> TestGateway {
    TestGateway::builder()
        .lane(lane)
        .config(|c| {
            c.auth_enabled = true;
            c.admin_key = Some(ADMIN_KEY.into());
        })
        .config(tweak)
        .start()
        .await
}

/// Creates `team` if needed (as the owner) and a key of `role` in it: `(key, key id)`.
pub async fn team_key(gw: &Client, team: &str, role: &str) -> (String, String) {
    let owner = gw.with_key(ADMIN_KEY);
    let r = owner
        .post("/teams")
        .json(&json!({"name": team}))
        .send()
        .await;
    assert!(
        r.status == StatusCode::CREATED || r.status == StatusCode::CONFLICT,
        "{}",
        r.text()
    );
    let r = owner
        .post("/auth/keys")
        .json(&json!({"name": format!("{team} {role}"), "role": role, "team": team}))
        .send()
        .await;
    r.expect(201);
    let v = r.json();
    assert_eq!(
        (v["role"].as_str(), v["team"].as_str()),
        (Some(role), Some(team))
    );
    let key = v["key"].as_str().expect("key").to_string();
    assert!(key.starts_with("sgk_") && key.len() >= 40, "{key}");
    (key, v["id"].as_str().expect("id").to_string())
}
