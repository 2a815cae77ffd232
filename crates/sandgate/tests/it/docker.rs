//! The Docker backend on a real engine: containers are labelled and limited, a server bound to
//! 127.0.0.1 inside a container is reachable through every route, two sandboxes bind the same
//! port, failed creates leave nothing, published ports work as the fallback, a crashed
//! gateway's successor re-adopts, marks and cleans up containers, and a gracefully stopped
//! one's containers keep running and are re-adopted. No registry is reachable, so the test
//! images are built here `FROM scratch` (busybox-static and the fixture with its libraries).
//!
//! Without an engine these tests print `SKIPPED: no Docker engine: ...` and pass, except under
//! `CI=true`, where a missing engine fails them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, ContainerInspectResponse, ContainerSummary};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, EventsOptionsBuilder,
    KillContainerOptions, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use sandgate::backend::docker::{
    container_name, DROPPED_CAPS, LABEL_GATEWAY, LABEL_GENERATION, LABEL_SANDBOX, LABEL_TEAM,
};
use sandgate::config::{BackendKind, Isolation, RuntimeConfig};
use serde_json::{json, Value};

use crate::common::{
    eventually, fixture_path, Client, GatewayBuilder, SpawnedGateway, TestGateway, READY_TIMEOUT,
};

/// busybox (every applet linked in /bin) and the fixture at `/sandgate-fixture`, with the
/// shared libraries it needs; its entrypoint fails, so a sandbox runs only if the backend
/// resets it.
pub(crate) const TEST_IMAGE: &str = "sandgate-test-docker:latest";
/// An image whose user does not exist (it has no `/etc/passwd`): creating a container works,
/// starting it fails.
const UNSTARTABLE_IMAGE: &str = "sandgate-test-unstartable:latest";
/// Bound for container operations the tests wait on (create, start, stop with grace).
const CONTAINER_TIMEOUT: Duration = Duration::from_secs(30);

static TEST_IMAGE_BUILT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
static UNSTARTABLE_IMAGE_BUILT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

// ---------------------------------------------------------------------------------------------
// Engine, images, cleanup
// ---------------------------------------------------------------------------------------------

/// A client for the engine the gateway will use, or `None` (after saying so loudly) when no
/// engine answers. Under `CI=true` a missing engine is a failure.
pub(crate) async fn engine() -> Option<Docker> {
    let connect = async {
        let docker = Docker::connect_with_defaults().map_err(|e| e.to_string())?;
        let docker = tokio::time::timeout(Duration::from_secs(10), docker.negotiate_version())
            .await
            .map_err(|_| "no answer within 10 s".to_string())?
            .map_err(|e| e.to_string())?;
        docker.ping().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(docker)
    };
    match connect.await {
        Ok(docker) => Some(docker),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and no Docker engine answers: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: no Docker engine: {e}");
            None
        }
    }
}

/// The engine, with both test images built; `None` if the test is to be skipped.
pub(crate) async fn engine_with_images() -> Option<Docker> {
    let docker = engine().await?;
    TEST_IMAGE_BUILT
        .get_or_init(|| build_image(&docker, TEST_IMAGE, test_image_context()))
        .await;
    UNSTARTABLE_IMAGE_BUILT
        .get_or_init(|| build_image(&docker, UNSTARTABLE_IMAGE, unstartable_image_context()))
        .await;
    Some(docker)
}

/// Whether the gateway (this process, or the binary it runs) may enter namespaces.
pub(crate) fn netns_or_skip() -> bool {
    let ok = sandgate::backend::netns::available();
    if !ok {
        eprintln!("SKIPPED: no CAP_SYS_ADMIN here, so no namespace connector to test");
    }
    ok
}

pub(crate) async fn build_image(docker: &Docker, tag: &str, context: Vec<u8>) {
    // The image the tag named before, removed once the tag moves: each run would otherwise
    // leave one untagged image (tens of MB) behind on the engine.
    let before = docker.inspect_image(tag).await.ok().and_then(|i| i.id);
    let options = BuildImageOptionsBuilder::default()
        .t(tag)
        .rm(true)
        .forcerm(true)
        .build();
    let mut stream = docker.build_image(
        options,
        None,
        Some(bollard::body_full(bytes::Bytes::from(context))),
    );
    let mut log = String::new();
    let outcome = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| e.to_string())?;
            if let Some(detail) = info.error_detail {
                return Err(detail.message.unwrap_or_default());
            }
            if let Some(line) = info.stream {
                log.push_str(&line);
            }
        }
        Ok(())
    })
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("building {tag} failed: {e}\n{log}"),
        Err(_) => panic!("building {tag} took over 300 s\n{log}"),
    }
    let after = docker
        .inspect_image(tag)
        .await
        .unwrap_or_else(|e| panic!("{tag} is not there after building it: {e}\n{log}"));
    if let Some(old) = before.filter(|old| after.id.as_ref() != Some(old)) {
        // Still used by a container of a test running now: it goes with a later build.
        let none: Option<bollard::query_parameters::RemoveImageOptions> = None;
        let _ = docker.remove_image(&old, none, None).await;
    }
}

/// A tar build context: `Dockerfile`, files under `rootfs/` (copied from the host) and
/// symlinks.
struct Context(tar::Builder<Vec<u8>>);

impl Context {
    fn new(dockerfile: &str) -> Context {
        let mut c = Context(tar::Builder::new(Vec::new()));
        c.bytes("Dockerfile", dockerfile.as_bytes(), 0o644);
        c
    }

    fn bytes(&mut self, path: &str, data: &[u8], mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        self.0.append_data(&mut h, path, data).expect("tar entry");
    }

    /// Copies host file `from` (following symlinks) to `to` inside the image.
    fn file(&mut self, to: &str, from: &Path) {
        let data = std::fs::read(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
        self.bytes(&format!("rootfs{to}"), &data, 0o755);
    }

    fn symlink(&mut self, at: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        self.0
            .append_link(&mut h, format!("rootfs{at}"), target)
            .expect("tar symlink");
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().expect("tar")
    }
}

/// The shared libraries `binary` loads (empty for a static binary), as `ldd` resolves them.
pub(crate) fn shared_libraries(binary: &str) -> Vec<String> {
    let Ok(out) = std::process::Command::new("ldd").arg(binary).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

fn test_image_context() -> Vec<u8> {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox is missing: install busybox-static"
    );
    let mut c = Context::new(
        "FROM scratch\nCOPY rootfs/ /\nENV PATH=/bin\n\
         ENTRYPOINT [\"/bin/false\"]\nCMD [\"/bin/sh\"]\n",
    );
    c.file("/bin/busybox", busybox);
    let applets = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" {
            c.symlink(&format!("/bin/{applet}"), "busybox");
        }
    }
    // The fixture is an ordinary (dynamically linked) Rust binary: bring its libraries along,
    // at the paths its loader looks for them.
    c.file("/sandgate-fixture", Path::new(fixture_path()));
    for lib in shared_libraries(fixture_path()) {
        c.file(&lib, Path::new(&lib));
    }
    c.finish()
}

fn unstartable_image_context() -> Vec<u8> {
    Context::new("FROM scratch\nUSER nobody\n").finish()
}

/// Containers labelled with `gateway` (running or not).
async fn containers_of(docker: &Docker, gateway: &str) -> Vec<ContainerSummary> {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("{LABEL_GATEWAY}={gateway}")],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    docker
        .list_containers(Some(options))
        .await
        .expect("list containers")
}

pub(crate) async fn inspect(docker: &Docker, name: &str) -> Option<ContainerInspectResponse> {
    match docker.inspect_container(name, None).await {
        Ok(c) => Some(c),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => None,
        Err(e) => panic!("inspect {name}: {e}"),
    }
}

async fn remove_container(docker: &Docker, name: &str) {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(name, Some(options)).await {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {}
        Err(e) => panic!("remove {name}: {e}"),
    }
}

pub(crate) fn running(c: &ContainerInspectResponse) -> bool {
    c.state.as_ref().and_then(|s| s.running) == Some(true)
}

fn label<'a>(c: &'a ContainerInspectResponse, key: &str) -> Option<&'a str> {
    c.config
        .as_ref()?
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The actions (`create`, `start`, `destroy`, ...) of the engine's events about containers of
/// `gateway` since `since` (unix seconds), in order.
async fn container_events(docker: &Docker, gateway: &str, since: u64) -> Vec<String> {
    let filters = HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        (
            "label".to_string(),
            vec![format!("{LABEL_GATEWAY}={gateway}")],
        ),
    ]);
    // `until` one second ahead: the stream ends once that moment has passed.
    let options = EventsOptionsBuilder::default()
        .since(&since.to_string())
        .until(&(unix_time() + 1).to_string())
        .filters(&filters)
        .build();
    let events = docker.events(Some(options)).collect::<Vec<_>>();
    tokio::time::timeout(Duration::from_secs(10), events)
        .await
        .expect("the events stream ends")
        .into_iter()
        .map(|e| e.expect("event").action.unwrap_or_default())
        .collect()
}

/// Asserts that no container of `gateway` is left.
async fn assert_no_containers(docker: &Docker, gateway: &str) {
    let left: Vec<_> = containers_of(docker, gateway)
        .await
        .into_iter()
        .map(|c| c.names.unwrap_or_default().join(","))
        .collect();
    assert!(left.is_empty(), "containers left behind: {left:?}");
}

/// Removes every container of the registered gateways and every registered container when
/// dropped, so a failing test leaks nothing on the engine.
#[derive(Default)]
pub(crate) struct Leftovers(Mutex<(Vec<String>, Vec<String>)>);

impl Leftovers {
    pub(crate) fn gateway(&self, id: &str) {
        self.0.lock().unwrap().0.push(id.to_string());
    }

    fn container(&self, name: &str) {
        self.0.lock().unwrap().1.push(name.to_string());
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let (gateways, names) = std::mem::take(&mut *self.0.lock().unwrap());
        on_engine_now(|docker| async move {
            let mut all = names;
            for g in &gateways {
                for c in containers_of(&docker, g).await {
                    all.extend(c.id);
                }
            }
            for name in all {
                let options = RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .v(true)
                    .build();
                let _ = docker.remove_container(&name, Some(options)).await;
            }
        });
    }
}

/// Runs `clean` against the engine (if one answers) to its end, from a `Drop`: which cannot
/// await and may run inside a runtime, so on a thread and runtime of its own.
pub(crate) fn on_engine_now<F, Fut>(clean: F)
where
    F: FnOnce(Docker) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let cleanup = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let Ok(docker) = Docker::connect_with_defaults() else {
                return;
            };
            let Ok(docker) = docker.negotiate_version().await else {
                return;
            };
            clean(docker).await;
        });
    });
    let _ = cleanup.join();
}

// ---------------------------------------------------------------------------------------------
// Gateway helpers
// ---------------------------------------------------------------------------------------------

/// A gateway on the Docker backend whose `shell` runtime runs the test image.
pub(crate) fn docker_gateway(isolation: Isolation) -> GatewayBuilder {
    TestGateway::builder().config(move |c| {
        c.backend = BackendKind::Docker;
        c.isolation = isolation;
        c.stop_grace = Duration::from_secs(2);
        c.runtimes.insert(
            "shell".into(),
            RuntimeConfig {
                image: Some(TEST_IMAGE.into()),
                ..Default::default()
            },
        );
    })
}

/// The real binary on the Docker backend, its runtime `runtime` running the test image with
/// `settings` (TOML lines) added; the configuration file lives as long as the returned dir.
async fn spawned_docker_gateway(
    runtime: &str,
    settings: &str,
) -> (SpawnedGateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sandgate.toml");
    std::fs::write(
        &config,
        format!(
            "backend = \"docker\"\nstop_grace = 2\n[runtimes.{runtime}]\n\
             image = \"{TEST_IMAGE}\"\n{settings}"
        ),
    )
    .unwrap();
    let gw = SpawnedGateway::start(4, &["--config", config.to_str().unwrap()]).await;
    (gw, dir)
}

pub(crate) fn gateway_id_of(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("gateway-id"))
        .expect("the gateway wrote its id")
        .trim()
        .to_string()
}

/// Polls `path` (with `host` as the Host header, if given) until it answers 200 with `body`.
async fn wait_body(client: &Client, path: &str, host: Option<&str>, body: &str) {
    let what = format!("{path} (host {host:?}) answers {body:?}");
    eventually(READY_TIMEOUT, &what, || async {
        let mut req = client.get(path);
        if let Some(host) = host {
            req = req.header("host", host);
        }
        let r = req.try_send().await.ok()?;
        (r.status == 200 && r.body == body).then_some(())
    })
    .await
}

async fn wait_status(client: &Client, id: &str, status: &str) -> Value {
    eventually(
        CONTAINER_TIMEOUT,
        &format!("sandbox {id} is {status}"),
        || async {
            let v = client.sandbox(id).await;
            (v["status"] == status).then_some(v)
        },
    )
    .await
}

/// A shell command serving `text` with busybox httpd on `127.0.0.1:{port}` (default `$PORT`).
fn httpd(text: &str, port: Option<u16>, foreground: bool) -> String {
    let port = port.map_or("$PORT".to_string(), |p| p.to_string());
    let dir = format!("www{}", port.trim_start_matches('$'));
    let run = if foreground { "exec httpd -f" } else { "httpd" };
    format!(
        "mkdir -p {dir} && echo {text} > {dir}/index.html && {run} -p 127.0.0.1:{port} -h {dir}"
    )
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn containers_are_labelled_limited_and_reachable_on_localhost_through_every_route() {
    let Some(docker) = engine_with_images().await else {
        return;
    };
    if !netns_or_skip() {
        return;
    }
    let leftovers = Leftovers::default();
    let gw = docker_gateway(Isolation::Auto).start().await;
    let gateway = gateway_id_of(gw.data_dir());
    leftovers.gateway(&gateway);
    let health = gw.get("/health").send().await.expect(200).json();
    assert_eq!(health["backend"], "docker", "{health}");
    assert_eq!(health["isolation"], "container+netns", "{health}");

    // A fixture on 127.0.0.1:$PORT (3000), and an httpd on 127.0.0.1:4000, both localhost-only;
    // the httpd also serves what the kernel says of the container's privileges.
    let command = format!(
        "{} && grep -E '^(NoNewPrivs|CapBnd):' /proc/self/status > www4000/status.txt \
         && exec /sandgate-fixture",
        httpd("second", Some(4000), false)
    );
    let a = gw
        .create(&json!({
            "runtime": "shell", "command": command, "owner": "alice", "name": "web",
            "cpus": 0.5, "memory_mb": 64, "pids_limit": 64, "env": {"GREETING": "hi"},
        }))
        .await;
    let a_id = a["id"].as_str().unwrap().to_string();
    assert_eq!(a["status"], "running", "{a}");
    assert_eq!(a["port"], 3000, "{a}");
    assert_eq!(
        a["allocated_port"],
        Value::Null,
        "no host port is needed: {a}"
    );

    let c = inspect(&docker, &container_name(&a_id))
        .await
        .expect("the container exists");
    assert!(running(&c));
    assert_eq!(label(&c, LABEL_SANDBOX), Some(a_id.as_str()));
    assert_eq!(label(&c, LABEL_TEAM), Some("default"));
    assert_eq!(label(&c, LABEL_GATEWAY), Some(gateway.as_str()));
    assert_eq!(label(&c, LABEL_GENERATION), Some("1"));
    let host = c.host_config.clone().unwrap();
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.memory, Some(64 * 1024 * 1024));
    assert_eq!(host.pids_limit, Some(64));
    assert_eq!(
        host.security_opt.clone().unwrap_or_default(),
        ["no-new-privileges:true"]
    );
    assert_eq!(host.cap_drop.clone().unwrap_or_default(), DROPPED_CAPS);
    assert_eq!(
        host.restart_policy
            .and_then(|p| p.name)
            .map(|n| n.to_string()),
        Some("no".to_string())
    );
    assert!(
        host.port_bindings.unwrap_or_default().is_empty(),
        "nothing is published"
    );
    let env = c.config.clone().unwrap().env.unwrap_or_default();
    for want in [
        "PORT=3000",
        "HOST=127.0.0.1",
        &format!("SANDBOX_ID={a_id}"),
        "GREETING=hi",
    ] {
        assert!(env.iter().any(|e| e == want), "{want} in {env:?}");
    }
    let ip = a["ip_address"].as_str().expect("ip_address").to_string();
    let networks = c.network_settings.clone().unwrap().networks.unwrap();
    assert!(
        networks
            .values()
            .any(|n| n.ip_address.as_deref() == Some(ip.as_str())),
        "{ip} is the container's address: {networks:?}"
    );

    // Every route reaches the localhost-only servers.
    wait_body(&gw, &format!("/sandbox/{a_id}/"), None, "fixture ok").await;
    wait_body(&gw, "/alice/web/", None, "fixture ok").await;
    let host_3000 = format!("3000-{a_id}.localhost");
    wait_body(&gw, "/", Some(&host_3000), "fixture ok").await;
    let host_4000 = format!("4000-{a_id}.localhost");
    wait_body(&gw, "/", Some(&host_4000), "second\n").await;
    // Inside, as the kernel sees it: no privilege gain, and the dropped capabilities are gone
    // from the bounding set while the rest of Docker's default set is kept.
    let status = gw
        .get("/status.txt")
        .header("host", &host_4000)
        .send()
        .await
        .expect(200)
        .text();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or_else(|| panic!("CapBnd in {status}"));
    // Bit numbers from linux/capability.h.
    for (name, bit) in [
        ("NET_RAW", 13),
        ("MKNOD", 27),
        ("AUDIT_WRITE", 29),
        ("SETFCAP", 31),
        ("SETPCAP", 8),
        ("SYS_CHROOT", 18),
    ] {
        assert_eq!(bounding & (1 << bit), 0, "{name} still in {bounding:#x}");
    }
    for (name, bit) in [
        ("CHOWN", 0),
        ("SETUID", 7),
        ("NET_BIND_SERVICE", 10),
        ("KILL", 5),
    ] {
        assert_ne!(
            bounding & (1 << bit),
            0,
            "{name} missing from {bounding:#x}"
        );
    }
    // ...which the host itself cannot reach on the container's address.
    let direct: SocketAddr = format!("{ip}:3000").parse().unwrap();
    let dialed = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(direct),
    )
    .await;
    assert!(
        !matches!(dialed, Ok(Ok(_))),
        "the fixture listens on localhost only, yet {direct} accepted a connection"
    );
    // The container's output comes from the engine's logs API.
    let logs = gw
        .get(&format!("/sandboxes/{a_id}/logs"))
        .send()
        .await
        .expect(200)
        .text();
    assert!(logs.contains("listening on"), "{logs:?}");
    let listed = gw.list().await;
    let item = listed.iter().find(|s| s["id"] == a_id.as_str()).unwrap();
    assert_eq!(item["status"], "running");
    assert_eq!(item["ip_address"], ip.as_str());

    // A second sandbox binding the same port; both are reached, each its own.
    let b = gw
        .create(&json!({"runtime": "shell", "command": httpd("sandbox-b", None, true)}))
        .await;
    let b_id = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["port"], 3000, "{b}");
    wait_body(&gw, &format!("/sandbox/{b_id}/"), None, "sandbox-b\n").await;
    wait_body(&gw, &format!("/sandbox/{a_id}/"), None, "fixture ok").await;
    let b_container = inspect(&docker, &container_name(&b_id)).await.unwrap();

    // Stop keeps the container; start runs the same container again.
    let v = gw
        .post(&format!("/sandboxes/{b_id}/stop"))
        .send()
        .await
        .expect(200)
        .json();
    assert_eq!(v["status"], "stopped", "{v}");
    let stopped = inspect(&docker, &container_name(&b_id)).await.unwrap();
    assert!(!running(&stopped), "stopped container is not running");
    gw.get(&format!("/sandbox/{b_id}/"))
        .send()
        .await
        .expect_error(409, "sandbox_not_running");
    let v = gw
        .post(&format!("/sandboxes/{b_id}/start"))
        .send()
        .await
        .expect(200)
        .json();
    assert_eq!(v["status"], "running", "{v}");
    let restarted = inspect(&docker, &container_name(&b_id)).await.unwrap();
    assert_eq!(
        restarted.id, b_container.id,
        "the same container runs again"
    );
    wait_body(&gw, &format!("/sandbox/{b_id}/"), None, "sandbox-b\n").await;

    // A container killed behind the gateway's back is noticed.
    docker
        .kill_container(&container_name(&b_id), None)
        .await
        .expect("kill");
    let v = wait_status(&gw, &b_id, "failed").await;
    assert!(
        v["status_reason"].as_str().unwrap_or("").contains("137"),
        "{v}"
    );

    // Delete removes the container.
    gw.delete_sandbox(&b_id).await;
    assert!(inspect(&docker, &container_name(&b_id)).await.is_none());
    gw.delete_sandbox(&a_id).await;
    assert!(inspect(&docker, &container_name(&a_id)).await.is_none());
    assert_no_containers(&docker, &gateway).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_creates_leave_nothing_behind() {
    let Some(docker) = engine_with_images().await else {
        return;
    };
    let leftovers = Leftovers::default();
    let gw = docker_gateway(Isolation::Auto)
        .config(|c| {
            c.runtimes.insert(
                "ghost".into(),
                RuntimeConfig {
                    image: Some("sandgate-test-missing:never-built".into()),
                    ..Default::default()
                },
            );
            c.runtimes.insert(
                "unstartable".into(),
                RuntimeConfig {
                    image: Some(UNSTARTABLE_IMAGE.into()),
                    ..Default::default()
                },
            );
        })
        .start()
        .await;
    let gateway = gateway_id_of(gw.data_dir());
    leftovers.gateway(&gateway);

    // A missing image is refused up front, naming the image; nothing is pulled.
    let message = gw
        .post("/sandboxes")
        .json(&json!({"runtime": "ghost", "command": "exec sleep 1000"}))
        .send()
        .await
        .expect_error(400, "bad_request");
    assert!(
        message.contains("sandgate-test-missing:never-built")
            && message.contains("not present on the Docker engine"),
        "{message}"
    );
    assert!(
        docker
            .inspect_image("sandgate-test-missing:never-built")
            .await
            .is_err(),
        "nothing was pulled"
    );

    // A container that is created but cannot start is removed again.
    let since = unix_time();
    let message = gw
        .post("/sandboxes")
        .json(&json!({"runtime": "unstartable", "command": "exec sleep 1000"}))
        .send()
        .await
        .expect_error(500, "start_failed");
    assert!(
        message.contains("start"),
        "the client is told why: {message}"
    );
    let actions = container_events(&docker, &gateway, since).await;
    assert!(
        actions.iter().any(|a| a == "create") && actions.iter().any(|a| a == "destroy"),
        "a container was created and then removed: {actions:?}"
    );

    assert_eq!(gw.count().await, 0, "no record is left");
    assert_no_containers(&docker, &gateway).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_namespaces_ports_are_published_on_loopback() {
    let Some(docker) = engine_with_images().await else {
        return;
    };
    let leftovers = Leftovers::default();
    let gw = docker_gateway(Isolation::None).ports(2).start().await;
    let gateway = gateway_id_of(gw.data_dir());
    leftovers.gateway(&gateway);
    let health = gw.get("/health").send().await.expect(200).json();
    assert_eq!(health["isolation"], "container+published-ports", "{health}");

    // HOST tells the server where a published port can reach it.
    let sb = gw
        .create(&json!({"runtime": "shell", "command": "exec /sandgate-fixture --host \"$HOST\""}))
        .await;
    let id = sb["id"].as_str().unwrap().to_string();
    assert_eq!(sb["port"], 3000, "{sb}");
    let allocated = sb["allocated_port"].as_u64().expect("a host port") as u16;
    let (lo, hi) = gw.port_range();
    assert!((lo..=hi).contains(&allocated), "{allocated} in {lo}-{hi}");

    let c = inspect(&docker, &container_name(&id)).await.unwrap();
    let bindings = c.host_config.clone().unwrap().port_bindings.unwrap();
    let binding = bindings["3000/tcp"].clone().unwrap();
    assert_eq!(binding.len(), 1, "{bindings:?}");
    assert_eq!(binding[0].host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(binding[0].host_port, Some(allocated.to_string()));
    let env = c.config.unwrap().env.unwrap_or_default();
    assert!(env.iter().any(|e| e == "HOST=0.0.0.0"), "{env:?}");

    wait_body(&gw, &format!("/sandbox/{id}/"), None, "fixture ok").await;
    wait_body(
        &gw,
        "/",
        Some(&format!("3000-{id}.localhost")),
        "fixture ok",
    )
    .await;
    wait_body(
        &gw,
        "/",
        Some(&format!("{allocated}-{id}.localhost")),
        "fixture ok",
    )
    .await;
    // Only the sandbox's own port is routed.
    gw.get("/")
        .header("host", &format!("4000-{id}.localhost"))
        .send()
        .await
        .expect_error(400, "port_not_exposed");

    gw.delete_sandbox(&id).await;
    assert_no_containers(&docker, &gateway).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_gateway_readopts_marks_and_cleans_up_containers() {
    let Some(docker) = engine_with_images().await else {
        return;
    };
    if !netns_or_skip() {
        return;
    }
    let leftovers = Leftovers::default();
    let (mut gw, _config) = spawned_docker_gateway("shell", "").await;
    let fixture = json!({"runtime": "shell", "command": "exec /sandgate-fixture"});
    let a = gw.create(&fixture).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = gw.create(&fixture).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    gw.wait_ready(&a).await;
    gw.wait_ready(&b).await;
    let a_before = inspect(&docker, &container_name(&a)).await.unwrap();
    let gateway = label(&a_before, LABEL_GATEWAY).unwrap().to_string();
    leftovers.gateway(&gateway);

    // The gateway dies without any cleanup; its containers keep running.
    gw.kill().await;
    assert!(running(
        &inspect(&docker, &container_name(&a)).await.unwrap()
    ));
    // Meanwhile: b's container is removed behind its back, and two containers appear that
    // it has no record of: one labelled with its id (an orphan), one of another gateway.
    remove_container(&docker, &container_name(&b)).await;
    let orphan = format!("sandgate-test-orphan-{gateway}");
    let foreign = format!("sandgate-test-foreign-{gateway}");
    leftovers.container(&orphan);
    leftovers.container(&foreign);
    for (name, owner) in [(&orphan, gateway.as_str()), (&foreign, "gw-someone-else")] {
        let body = ContainerCreateBody {
            image: Some(TEST_IMAGE.into()),
            entrypoint: Some(vec![String::new()]),
            cmd: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                "exec sleep 1000".into(),
            ]),
            labels: Some(HashMap::from([
                (LABEL_GATEWAY.to_string(), owner.to_string()),
                (LABEL_SANDBOX.to_string(), "sb-aaaaaaaaaaaaaaaa".to_string()),
            ])),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        docker
            .create_container(Some(options), body)
            .await
            .expect("create");
        docker.start_container(name, None).await.expect("start");
    }

    gw.restart().await;
    // a was re-adopted, not restarted.
    let v = gw.sandbox(&a).await;
    assert_eq!(v["status"], "running", "{v}\n{}", gw.log());
    gw.wait_ready(&a).await;
    let a_after = inspect(&docker, &container_name(&a)).await.unwrap();
    assert_eq!(a_after.id, a_before.id);
    assert_eq!(
        a_after.state.as_ref().unwrap().started_at,
        a_before.state.as_ref().unwrap().started_at,
        "the container was not restarted"
    );
    // b is known to be gone.
    let v = gw.sandbox(&b).await;
    assert_eq!(v["status"], "stopped", "{v}");
    assert_eq!(
        v["status_reason"], "not running after gateway restart",
        "{v}"
    );
    // The orphan is removed; another gateway's container is left alone.
    assert!(inspect(&docker, &orphan).await.is_none(), "orphan removed");
    assert!(inspect(&docker, &foreign).await.is_some(), "foreign kept");
    remove_container(&docker, &foreign).await;

    // The re-adopted container is watched again: its death is noticed.
    docker
        .kill_container(&container_name(&a), None)
        .await
        .expect("kill");
    wait_status(&gw, &a, "failed").await;
    // Starting b creates its container anew.
    let v = gw
        .post(&format!("/sandboxes/{b}/start"))
        .send()
        .await
        .expect(200)
        .json();
    assert_eq!(v["status"], "running", "{v}");
    gw.wait_ready(&b).await;
    let b_container = inspect(&docker, &container_name(&b)).await.unwrap();

    // A graceful stop leaves containers running (the engine owns them); the next gateway
    // re-adopts the same container without restarting it.
    assert!(gw.terminate().await.success(), "{}", gw.log());
    let kept = inspect(&docker, &container_name(&b)).await.unwrap();
    assert!(
        running(&kept),
        "a clean gateway stop leaves containers running"
    );
    gw.restart().await;
    let v = gw.sandbox(&b).await;
    assert_eq!(v["status"], "running", "{v}");
    gw.wait_ready(&b).await;
    let again = inspect(&docker, &container_name(&b)).await.unwrap();
    assert_eq!(again.id, b_container.id, "the same container runs on");
    assert_eq!(
        again.state.as_ref().and_then(|s| s.started_at.clone()),
        kept.state.as_ref().and_then(|s| s.started_at.clone()),
        "re-adopted, not restarted"
    );

    gw.delete_sandbox(&a).await;
    gw.delete_sandbox(&b).await;
    assert_no_containers(&docker, &gateway).await;
    assert!(gw.terminate().await.success(), "{}", gw.log());
}

/// `"network": "none"`: the container has loopback only and is still reached through its
/// namespace; a gateway that reaches containers through published ports refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn network_none_containers_have_only_loopback() {
    if engine_with_images().await.is_none() || !netns_or_skip() {
        return;
    }
    let leftovers = Leftovers::default();
    let gw = docker_gateway(Isolation::Auto).start().await;
    leftovers.gateway(&gateway_id_of(gw.data_dir()));
    let v = gw
        .create(&json!({"runtime": "shell", "network": "none",
                        "command": httpd("offline", None, true)}))
        .await;
    assert_eq!(v["network"], "none", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_body(&gw, &format!("/sandbox/{id}/"), None, "offline\n").await;
    let v = gw.exec(&id, &json!({"command": "ls /sys/class/net"})).await;
    assert_eq!(v["stdout"], "lo\n", "{v}");
    let other = gw.create(&json!({"runtime": "shell"})).await;
    assert_eq!(other["network"], "egress", "{other}");
    gw.delete_sandbox(&id).await;
    gw.delete_sandbox(other["id"].as_str().unwrap()).await;
    gw.shutdown().await;

    let published = docker_gateway(Isolation::None).ports(2).start().await;
    leftovers.gateway(&gateway_id_of(published.data_dir()));
    published
        .post("/sandboxes")
        .json(&json!({"runtime": "shell", "network": "none"}))
        .send()
        .await
        .expect_error(422, "validation_failed");
    published.shutdown().await;
}

/// A warm pool on the Docker backend: the pool's containers run before any create, a create
/// claims one (same container, served at once), the pool refills; the waiting containers
/// outlive a crash and wait again under the next gateway, unrestarted; a graceful stop removes
/// them (and keeps the claimed one's, which the engine owns) and the next gateway starts new
/// ones.
#[tokio::test(flavor = "multi_thread")]
async fn warm_containers_are_claimed_and_wait_across_restarts() {
    use crate::warm::{claims, pool_of_holds};
    let Some(docker) = engine_with_images().await else {
        return;
    };
    if !netns_or_skip() {
        return;
    }
    let leftovers = Leftovers::default();
    let (mut gw, _config) =
        spawned_docker_gateway("web", "command = \"exec /sandgate-fixture\"\nwarm = 2\n").await;
    let gateway = gateway_id_of(gw.data_dir());
    leftovers.gateway(&gateway);
    pool_of_holds(&gw, "web", 2, CONTAINER_TIMEOUT).await;
    let started = |cs: &[ContainerSummary]| -> HashMap<String, String> {
        cs.iter()
            .map(|c| {
                let labels = c.labels.clone().unwrap_or_default();
                (
                    labels[LABEL_SANDBOX].clone(),
                    c.id.clone().unwrap_or_default(),
                )
            })
            .collect()
    };
    let pooled = started(&containers_of(&docker, &gateway).await);
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    assert_eq!(gw.count().await, 0, "waiting containers are nobody's");

    let began = std::time::Instant::now();
    let v = gw.create(&json!({"runtime": "web", "owner": "bob"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    gw.get(&format!("/sandbox/{id}/")).send().await.expect(200);
    let warm_first_byte = began.elapsed();
    assert!(pooled.contains_key(&id), "{id} not in {pooled:?}");
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(claims(&gw, "claimed").await, 1.0);
    println!("docker create-to-first-byte from the pool: {warm_first_byte:?}");

    pool_of_holds(&gw, "web", 2, CONTAINER_TIMEOUT).await;
    let before = started(&containers_of(&docker, &gateway).await);
    assert_eq!(before.len(), 3, "{before:?}");

    // A crash: the same containers wait again, unrestarted, none added or lost.
    gw.kill().await;
    gw.restart().await;
    pool_of_holds(&gw, "web", 2, CONTAINER_TIMEOUT).await;
    let after = started(&containers_of(&docker, &gateway).await);
    assert_eq!(after, before, "the same containers, none added or lost");
    for container in after.values() {
        let c = docker.inspect_container(container, None).await.unwrap();
        assert!(running(&c), "{container} runs");
    }
    assert_eq!(gw.count().await, 1);
    gw.get(&format!("/sandbox/{id}/")).send().await.expect(200);
    let v = gw.create(&json!({"runtime": "web"})).await;
    let second = v["id"].as_str().unwrap().to_string();
    assert!(
        before.contains_key(&second),
        "a re-adopted container is claimed"
    );
    gw.get(&format!("/sandbox/{second}/"))
        .send()
        .await
        .expect(200);

    // A graceful stop removes the waiting containers only; the next gateway starts new ones.
    pool_of_holds(&gw, "web", 2, CONTAINER_TIMEOUT).await;
    assert!(gw.terminate().await.success(), "{}", gw.log());
    let left = started(&containers_of(&docker, &gateway).await);
    let kept: std::collections::BTreeSet<&String> = left.keys().collect();
    assert_eq!(
        kept,
        [&id, &second].into_iter().collect(),
        "only the claimed containers outlive a graceful stop"
    );
    gw.restart().await;
    pool_of_holds(&gw, "web", 2, CONTAINER_TIMEOUT).await;
    assert_eq!(containers_of(&docker, &gateway).await.len(), 4);
    gw.get(&format!("/sandbox/{id}/")).send().await.expect(200);

    gw.delete_sandbox(&id).await;
    gw.delete_sandbox(&second).await;
    assert!(gw.terminate().await.success(), "{}", gw.log());
}

/// A create whose client goes away while the container starts still finishes: the sandbox
/// ends up running and recorded as such (not left `creating` with a container nobody
/// records), and deleting it leaves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_whose_client_leaves_still_finishes() {
    use tokio::io::AsyncWriteExt;
    let Some(docker) = engine_with_images().await else {
        return;
    };
    if !netns_or_skip() {
        return;
    }
    let gw = docker_gateway(Isolation::Netns).start().await;
    let gateway = gateway_id_of(gw.data_dir());
    let leftovers = Leftovers::default();
    leftovers.gateway(&gateway);
    let body = json!({"runtime": "shell", "command": "exec /sandgate-fixture"}).to_string();
    let mut raw = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "POST /sandboxes HTTP/1.1\r\nHost: {}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        gw.addr,
        body.len()
    );
    raw.write_all(request.as_bytes()).await.unwrap();
    // Gone once the record exists, while the engine creates and starts the container (a few
    // hundred ms more).
    eventually(CONTAINER_TIMEOUT, "the create is recorded", || async {
        (!gw.list().await.is_empty()).then_some(())
    })
    .await;
    drop(raw);

    let v = eventually(
        CONTAINER_TIMEOUT,
        "the abandoned create is recorded",
        || async {
            let list = gw.list().await;
            list.into_iter()
                .next()
                .filter(|v| v["status"] != "creating")
        },
    )
    .await;
    assert_eq!(v["status"], "running", "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    gw.wait_ready(&id).await;
    gw.get(&format!("/sandbox/{id}/")).send().await.expect(200);
    gw.delete_sandbox(&id).await;
    assert_no_containers(&docker, &gateway).await;
    gw.shutdown().await;
}

/// A sandbox of two instances on the Docker backend: two containers, requests spread over
/// both; a container killed behind the gateway's back fails no request (the refused dial
/// moves to the other) and is restarted; a delete removes both.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_are_containers_of_their_own_and_share_the_requests() {
    if engine_with_images().await.is_none() || !netns_or_skip() {
        return;
    }
    let Some(docker) = engine().await else {
        return;
    };
    let leftovers = Leftovers::default();
    let gw = docker_gateway(Isolation::Auto).start().await;
    let gateway = gateway_id_of(gw.data_dir());
    leftovers.gateway(&gateway);
    let serve_id = "mkdir -p www && echo $SANDBOX_ID > www/index.html && \
                    exec httpd -f -p 127.0.0.1:$PORT -h www";
    let v = gw
        .create(&json!({"runtime": "shell", "command": serve_id, "replicas": 2}))
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    let instances: Vec<String> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(instances.len(), 2, "{v}");
    assert_eq!(containers_of(&docker, &gateway).await.len(), 2);
    for i in &instances {
        let c = inspect(&docker, &format!("sandgate-{i}"))
            .await
            .expect("its container");
        assert!(running(&c));
        assert_eq!(label(&c, "sandgate.sandbox"), Some(i.as_str()));
    }
    let path = format!("/sandbox/{id}/");
    eventually(CONTAINER_TIMEOUT, "both instances are ready", || async {
        let v = gw.sandbox(&id).await;
        v["instances"]
            .as_array()?
            .iter()
            .all(|i| i["ready"] == true)
            .then_some(())
    })
    .await;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..10 {
        let r = gw.get(&path).send().await;
        r.expect(200);
        *seen.entry(r.text().trim().to_string()).or_default() += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.values().all(|&n| n == 5), "{seen:?}");

    // Killed behind the gateway's back: no request fails, the other answers them all.
    docker
        .kill_container(
            &format!("sandgate-{}", instances[1]),
            None::<KillContainerOptions>,
        )
        .await
        .expect("kill");
    for _ in 0..10 {
        let r = gw.get(&path).send().await;
        r.expect(200);
        assert_eq!(r.text().trim(), id);
    }
    // Restarted on its own (the same container, started again), it answers its share again.
    eventually(
        CONTAINER_TIMEOUT,
        "the killed instance answers again",
        || async {
            let r = gw.get(&path).try_send().await.ok()?;
            (r.status == 200 && r.text().trim() == instances[1]).then_some(())
        },
    )
    .await;
    gw.delete_sandbox(&id).await;
    assert_no_containers(&docker, &gateway).await;
    gw.shutdown().await;
}
