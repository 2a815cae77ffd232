//! The deployment artifacts (issue 18 item 5): a container image of the gateway runs, and the
//! Kubernetes manifests hold what they promise.
//!
//! No registry is reachable here, so the image is `deploy/docker/Dockerfile.prebuilt` (the
//! root `Dockerfile`'s runtime stage, `FROM scratch`) built from the host-built binary, the
//! shared libraries it loads and busybox-static. A container of it must answer `/health/live`
//! and `/health/ready` through its published port 8080 (read-only root, no capabilities), run
//! the gateway as uid 10001, run a sandbox command, and on SIGTERM turn unready, drain and
//! exit 0. The manifests are parsed with PyYAML (Debian's `python3-yaml`) and checked field
//! by field, and the environment the Deployment gives the gateway goes through
//! `sandgate serve --check-config`.
//!
//! Without a Docker engine or PyYAML these tests print `SKIPPED: ...` and pass, except under
//! `CI=true`, where either missing fails them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::models::{ContainerCreateBody, ContainerInspectResponse, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptions, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::{eventually, Client, PidRegistry};
use crate::docker::{build_image, engine, on_engine_now, running, shared_libraries};

/// The image these tests build; one tag, so a run killed before its cleanup leaves at most one
/// image behind, which the next build replaces.
const IMAGE: &str = "sandgate-test-gateway:latest";
/// The unprivileged user of both Dockerfiles and of the Deployment's securityContext.
const UID: u32 = 10001;
/// The port the image's `PORT` names.
const PORT: u16 = 8080;
/// Bound for the container's gateway to answer, and for it to exit once signalled.
const CONTAINER_TIMEOUT: Duration = Duration::from_secs(60);
/// Valid stand-ins for the Secret's values (32 bytes or more, visible ASCII).
const ADMIN_KEY: &str = "sandgate-image-test-admin-key-0123456789abcdef";
const TOKEN_SECRET: &str = "sandgate-image-test-token-secret-0123456789abcdef";
/// `SANDGATE_SHUTDOWN_DELAY` of the test container: how long `/health/ready` answers 503
/// after SIGTERM before the gateway drains (the Deployment uses 5).
const SHUTDOWN_DELAY_SECS: u32 = 3;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

// ---------------------------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------------------------

/// A tar build context, written straight from the host's files (the debug binary is large).
struct Context(tar::Builder<Vec<u8>>);

impl Context {
    fn new() -> Context {
        Context(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_cksum();
        h
    }

    fn bytes(&mut self, path: &str, data: &[u8], mode: u32) {
        let mut h = Self::header(tar::EntryType::Regular, data.len() as u64, mode);
        self.0.append_data(&mut h, path, data).expect("tar entry");
    }

    /// Host file `from` (symlinks followed) at `path`.
    fn file(&mut self, path: &str, from: &Path, mode: u32) {
        let f = std::fs::File::open(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        let len = f.metadata().expect("metadata").len();
        let mut h = Self::header(tar::EntryType::Regular, len, mode);
        self.0.append_data(&mut h, path, f).expect("tar entry");
    }

    fn dir(&mut self, path: &str, mode: u32) {
        let mut h = Self::header(tar::EntryType::Directory, 0, mode);
        self.0
            .append_data(&mut h, path, std::io::empty())
            .expect("tar dir");
    }

    fn symlink(&mut self, path: &str, target: &str) {
        let mut h = Self::header(tar::EntryType::Symlink, 0, 0o777);
        self.0
            .append_link(&mut h, path, target)
            .expect("tar symlink");
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().expect("tar")
    }
}

/// The context `deploy/docker/Dockerfile.prebuilt` describes in its header.
fn image_context() -> Vec<u8> {
    let mut c = Context::new();
    c.bytes(
        "Dockerfile",
        read("deploy/docker/Dockerfile.prebuilt").as_bytes(),
        0o644,
    );
    let gateway = env!("CARGO_BIN_EXE_sandgate");
    c.file("rootfs/usr/local/bin/sandgate", Path::new(gateway), 0o755);
    for lib in shared_libraries(gateway) {
        c.file(&format!("rootfs{lib}"), Path::new(&lib), 0o755);
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox is missing: install busybox-static"
    );
    c.file("rootfs/bin/busybox", busybox, 0o755);
    let applets = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" {
            c.symlink(&format!("rootfs/bin/{applet}"), "busybox");
        }
    }
    c.bytes(
        "rootfs/etc/passwd",
        format!(
            "root:x:0:0:root:/root:/bin/sh\nsandgate:x:{UID}:{UID}::/var/lib/sandgate:/bin/false\n"
        )
        .as_bytes(),
        0o644,
    );
    c.bytes(
        "rootfs/etc/group",
        format!("root:x:0:\nsandgate:x:{UID}:\n").as_bytes(),
        0o644,
    );
    c.dir("rootfs/tmp", 0o1777);
    c.dir("rootfs/var/lib", 0o755);
    c.dir("data", 0o750);
    c.finish()
}

/// Removes the test container and the image when dropped, so a failing test leaks neither.
struct Cleanup {
    container: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let container = self.container.clone();
        on_engine_now(|docker| async move {
            let options = RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            let _ = docker.remove_container(&container, Some(options)).await;
            let options = RemoveImageOptions {
                force: false,
                noprune: false,
                ..Default::default()
            };
            let _ = docker.remove_image(IMAGE, Some(options), None).await;
        });
    }
}

/// The container `name`, which must exist.
async fn inspect(docker: &Docker, name: &str) -> ContainerInspectResponse {
    crate::docker::inspect(docker, name)
        .await
        .unwrap_or_else(|| panic!("container {name} is gone"))
}

/// Everything the container wrote to stdout and stderr (for failure messages).
async fn logs(docker: &Docker, name: &str) -> String {
    let options = LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail("all")
        .build();
    let mut stream = docker.logs(name, Some(options));
    let mut text = String::new();
    while let Some(Ok(chunk)) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
    }
    text
}

/// `/proc/<pid>/status`'s real, effective, saved and filesystem uids.
fn uids_of(pid: i64) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("a Uid: line");
    line.split_whitespace()
        .map(|u| u.parse().expect("a uid"))
        .collect()
}

/// TCP ports listening in `pid`'s network namespace (IPv4 and IPv6).
fn listening_ports(pid: i64) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN.
            if fields.len() > 3 && fields[3] == "0A" {
                if let Some((_, port)) = fields[1].rsplit_once(':') {
                    ports.extend(u16::from_str_radix(port, 16).ok());
                }
            }
        }
    }
    ports
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_runs_the_gateway_unprivileged_on_port_8080_and_drains_on_sigterm() {
    let Some(docker) = engine().await else {
        return;
    };
    let name = format!("sandgate-test-image-{}", std::process::id());
    let _cleanup = Cleanup {
        container: name.clone(),
    };
    build_image(&docker, IMAGE, image_context()).await;

    // The image itself: an unprivileged numeric user, PORT=8080, port 8080 declared.
    let image = docker.inspect_image(IMAGE).await.expect("inspect image");
    let config = image.config.expect("image config");
    assert_eq!(config.user.as_deref(), Some("10001:10001"), "{config:?}");
    let env = config.env.clone().unwrap_or_default();
    for var in [
        "PORT=8080",
        "GATEWAY_HOST=0.0.0.0",
        "SANDGATE_DATA_DIR=/var/lib/sandgate",
    ] {
        assert!(env.iter().any(|e| e == var), "{var} not in {env:?}");
    }
    assert_eq!(
        config.exposed_ports.as_deref(),
        Some(&["8080/tcp".to_string()][..]),
        "{config:?}"
    );

    // A container as the Deployment runs it: the Secret's variables and the drain delay set,
    // PORT, GATEWAY_HOST and the data directory left to the image; a read-only root
    // filesystem with a fresh /tmp and the data directory a volume (the Deployment's
    // emptyDirs), no capabilities, no privilege gains. Port 8080 is published on a free port
    // of 127.0.0.1.
    let body = ContainerCreateBody {
        image: Some(IMAGE.into()),
        env: Some(vec![
            "DATABASE_URL=sqlite:///var/lib/sandgate/sandgate.db".into(),
            format!("TOKEN_SECRET={TOKEN_SECRET}"),
            format!("SANDGATE_ADMIN_KEY={ADMIN_KEY}"),
            format!("SANDGATE_SHUTDOWN_DELAY={SHUTDOWN_DELAY_SECS}"),
            "SANDGATE_LOG_FORMAT=json".into(),
        ]),
        host_config: Some(HostConfig {
            port_bindings: Some(HashMap::from([(
                format!("{PORT}/tcp"),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: None,
                }]),
            )])),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([("/tmp".into(), "mode=1777".into())])),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::default().name(&name).build();
    docker
        .create_container(Some(options), body)
        .await
        .expect("create container");
    docker
        .start_container(&name, None)
        .await
        .expect("start container");
    let c = inspect(&docker, &name).await;
    let host_port: u16 = c
        .network_settings
        .as_ref()
        .and_then(|n| n.ports.as_ref())
        .and_then(|p| p.get(&format!("{PORT}/tcp")).cloned().flatten())
        .and_then(|b| b.first().and_then(|b| b.host_port.clone()))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("port {PORT} is not published: {:?}", c.network_settings));
    let addr = SocketAddr::from(([127, 0, 0, 1], host_port));
    let gw = Client::new(addr, PidRegistry::default());

    for path in ["/health/live", "/health/ready"] {
        eventually(
            CONTAINER_TIMEOUT,
            &format!("the container's gateway answers {path} with 200"),
            || async {
                if !running(&inspect(&docker, &name).await) {
                    panic!(
                        "the container stopped before answering {path}:\n{}",
                        logs(&docker, &name).await
                    );
                }
                let r = gw.get(path).try_send().await.ok()?;
                (r.status == 200).then_some(())
            },
        )
        .await;
    }

    // The gateway is the container's process 1, unprivileged, listening on 8080 only (the
    // metrics listener is off by default).
    let pid = inspect(&docker, &name)
        .await
        .state
        .and_then(|s| s.pid)
        .filter(|&p| p > 0)
        .expect("the container's pid");
    assert_eq!(uids_of(pid), vec![UID; 4], "the gateway's uids");
    assert_eq!(
        listening_ports(pid),
        BTreeSet::from([PORT]),
        "ports listening in the container"
    );

    // Authentication is on (the listener is not loopback) and the configured key works; the
    // store in the data directory is writable; a sandbox command runs, as the same user, and
    // sees the data directory (only) owned by that user.
    gw.get("/sandboxes")
        .send()
        .await
        .expect_error(401, "AUTH_002");
    let admin = gw.with_key(ADMIN_KEY);
    let health = admin.get("/health").send().await.expect(200).json();
    assert_eq!(health["backend"], "process", "{health}");
    // Unprivileged, no capabilities: `auto` isolation finds nothing stronger (docs/deploy.md).
    assert_eq!(health["isolation"], "shared-host", "{health}");
    assert_eq!(health["store"], "ok", "{health}");
    let sandbox = admin.create(&json!({"runtime": "shell"})).await;
    let id = sandbox["id"].as_str().expect("id");
    let command = "id -u; stat -c %u /var/lib/sandgate /var/lib /usr/local/bin/sandgate";
    let out = admin.exec(id, &json!({ "command": command })).await;
    assert_eq!(out["exit_code"], 0, "{out}");
    let uids: Vec<&str> = out["stdout"].as_str().unwrap_or("").lines().collect();
    let uid = UID.to_string();
    assert_eq!(uids, [uid.as_str(), uid.as_str(), "0", "0"], "{out}");

    // SIGTERM (what Kubernetes sends): /health/ready turns 503 for the shutdown delay while
    // /health/live still answers, then the gateway exits 0.
    docker
        .kill_container(
            &name,
            Some(KillContainerOptions {
                signal: "SIGTERM".into(),
            }),
        )
        .await
        .expect("signal the container");
    eventually(
        Duration::from_secs(SHUTDOWN_DELAY_SECS.into()),
        "/health/ready answers 503 after SIGTERM",
        || async {
            let r = gw.get("/health/ready").try_send().await.ok()?;
            (r.status == 503).then_some(())
        },
    )
    .await;
    let c = eventually(CONTAINER_TIMEOUT, "the container exits", || async {
        let c = inspect(&docker, &name).await;
        (!running(&c)).then_some(c)
    })
    .await;
    let exit = c.state.and_then(|s| s.exit_code);
    if exit != Some(0) {
        panic!(
            "the gateway exited with {exit:?}:\n{}",
            logs(&docker, &name).await
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The manifests and Dockerfiles
// ---------------------------------------------------------------------------------------------

/// Debian's Python, which `.ci/run` gives PyYAML (`python3-yaml`), else the first on `PATH`.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Every YAML document of `deploy/k8s/<file>` for each file, as JSON; `None` (after saying
/// so) when python3 has no PyYAML, a failure under `CI=true`.
fn manifests(files: &[&str]) -> Option<Vec<Vec<Value>>> {
    let has_yaml = std::process::Command::new(python())
        .args(["-c", "import yaml"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_yaml {
        assert!(
            !ci(),
            "CI=true and python3 cannot import yaml: install python3-yaml"
        );
        eprintln!("SKIPPED: python3 cannot import yaml (install python3-yaml)");
        return None;
    }
    let dir = repo_root().join("deploy/k8s");
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([list(yaml.safe_load_all(open(p))) for p in sys.argv[1:]], sys.stdout)",
        ])
        .args(files.iter().map(|f| dir.join(f)))
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the manifests do not parse as YAML:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("python's JSON"))
}

/// The one document of `kind` among `docs`.
fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind} in {docs:?}");
    found[0]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Variables `sandgate serve` reads: those `--help` lists, and the ones it reads from the
/// environment only (`Config::load`: `PORT`, `TOKEN_SECRET`, `SANDGATE_ADMIN_KEY`).
fn variables_the_gateway_reads() -> BTreeSet<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
        .args(["serve", "--help"])
        .output()
        .expect("sandgate serve --help");
    let help = String::from_utf8_lossy(&out.stdout);
    let mut names: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_string)
        .collect();
    assert!(names.contains("GATEWAY_PORT"), "{names:?}");
    names.extend(["PORT", "TOKEN_SECRET", "SANDGATE_ADMIN_KEY"].map(String::from));
    names
}

/// Runs `sandgate serve --check-config` with exactly `env`.
fn check_config(env: &BTreeMap<String, String>) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
        .args(["serve", "--check-config"])
        .env_clear()
        .envs(env)
        .output()
        .expect("sandgate serve --check-config")
}

#[test]
fn the_manifests_and_dockerfiles_hold_what_they_promise() {
    let files = [
        "namespace.yaml",
        "rbac.yaml",
        "secret.yaml",
        "deployment.yaml",
        "service.yaml",
        "kustomization.yaml",
    ];
    let Some(parsed) = manifests(&files) else {
        return;
    };
    let [namespaces, rbac, secret, deployment, service, kustomization] = &parsed[..] else {
        panic!("one list of documents per file: {parsed:?}");
    };

    // kustomization.yaml applies every other manifest in the directory.
    let mut on_disk: Vec<String> = std::fs::read_dir(repo_root().join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = strings(&kustomization[0]["resources"])
        .into_iter()
        .map(String::from)
        .collect();
    listed.sort();
    assert_eq!(listed, on_disk, "kustomization.yaml's resources");

    let namespace_names: Vec<&str> = namespaces
        .iter()
        .map(|n| n["metadata"]["name"].as_str().unwrap_or(""))
        .collect();

    // The Deployment: 2 replicas, probes on /health/live and /health/ready at 8080, resources,
    // unprivileged, read-only root, the Secret's variables.
    let d = one(deployment, "Deployment");
    let gateway_ns = d["metadata"]["namespace"].as_str().expect("namespace");
    assert!(namespace_names.contains(&gateway_ns), "{namespace_names:?}");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{containers:?}");
    let c = &containers[0];
    assert_eq!(c["ports"][0]["containerPort"], PORT);
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/health/live", "port": PORT})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/health/ready", "port": PORT})
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][resource].is_string(),
                "resources.{kind}.{resource}: {}",
                c["resources"]
            );
        }
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], UID);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.contains(&"/var/lib/sandgate"), "{mounts:?}");

    // Every variable is one the gateway reads; those from the Secret name its keys.
    let s = one(secret, "Secret");
    assert_eq!(s["metadata"]["namespace"], gateway_ns);
    let secret_name = s["metadata"]["name"].as_str().expect("secret name");
    let secret_data = s["stringData"].as_object().expect("stringData");
    for key in ["DATABASE_URL", "TOKEN_SECRET"] {
        assert!(secret_data.contains_key(key), "the Secret has no {key}");
    }
    // Two replicas share one store: PostgreSQL (a `sqlite:` URL would give each pod its own).
    let url = secret_data["DATABASE_URL"].as_str().expect("a URL");
    assert!(url.starts_with("postgres://"), "{url}");
    assert!(
        secret_data["TOKEN_SECRET"]
            .as_str()
            .is_some_and(|v| v.contains("REPLACE_ME")),
        "the example Secret's TOKEN_SECRET must be a placeholder"
    );
    let known = variables_the_gateway_reads();
    let mut shipped = BTreeMap::new();
    let mut from_secret = BTreeSet::new();
    for e in c["env"].as_array().expect("env") {
        let name = e["name"].as_str().expect("env name").to_string();
        assert!(known.contains(&name), "the gateway does not read {name}");
        if let Some(value) = e["value"].as_str() {
            shipped.insert(name, value.to_string());
        } else {
            let r = &e["valueFrom"]["secretKeyRef"];
            assert_eq!(r["name"], secret_name, "{e}");
            let key = r["key"].as_str().expect("key");
            let value = secret_data
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("the Secret has no key {key}"));
            shipped.insert(name.clone(), value.to_string());
            from_secret.insert(name);
        }
    }
    assert!(
        from_secret.is_superset(&BTreeSet::from([
            "DATABASE_URL".to_string(),
            "TOKEN_SECRET".to_string()
        ])),
        "{from_secret:?}"
    );
    assert_eq!(shipped.get("PORT").map(String::as_str), Some("8080"));

    // With the example Secret as shipped the gateway refuses to start (its placeholders are
    // too short to be secrets); with them replaced the same environment is accepted, on
    // 0.0.0.0:8080 with authentication on.
    let out = check_config(&shipped);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TOKEN_SECRET"),
        "{out:?}"
    );
    let replaced: BTreeMap<String, String> = shipped
        .iter()
        .map(|(k, v)| {
            let v = if v == "REPLACE_ME" {
                TOKEN_SECRET.to_string()
            } else {
                v.replace("REPLACE_ME", "password")
            };
            (k.clone(), v)
        })
        .collect();
    let out = check_config(&replaced);
    assert!(out.status.success(), "{out:?}");
    let effective = String::from_utf8_lossy(&out.stdout);
    for line in ["port = 8080", "host = \"0.0.0.0\"", "auth_enabled = true"] {
        assert!(
            effective.lines().any(|l| l == line),
            "{line:?} not in:\n{effective}"
        );
    }

    // The Service: a LoadBalancer from port 80 to the pods' 8080.
    let svc = one(service, "Service");
    assert_eq!(svc["metadata"]["namespace"], gateway_ns);
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    let ports = svc["spec"]["ports"].as_array().expect("ports");
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0]["port"], 80);
    assert_eq!(ports[0]["targetPort"], PORT);
    let labels = d["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .expect("pod labels");
    for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(labels.get(k), Some(v), "the Service selects {k}={v}");
    }

    // RBAC: the Deployment's ServiceAccount, bound to a Role granting exactly the issue's
    // verbs, in a namespace the manifests create.
    let sa = one(rbac, "ServiceAccount");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(sa["metadata"]["namespace"], gateway_ns);
    let role = one(rbac, "Role");
    let sandbox_ns = role["metadata"]["namespace"].as_str().expect("namespace");
    assert!(namespace_names.contains(&sandbox_ns), "{namespace_names:?}");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        let keys: BTreeSet<&str> = rule
            .as_object()
            .expect("rule")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["apiGroups", "resources", "verbs"]),
            "{rule}"
        );
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    granted.insert((group.to_string(), resource.to_string(), verb.to_string()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    let mut grant = |group: &str, resources: &[&str], verbs: &[&str]| {
        for r in resources {
            for v in verbs {
                expected.insert((group.to_string(), r.to_string(), v.to_string()));
            }
        }
    };
    grant("agents.x-k8s.io", &["sandboxes"], &["get", "list", "watch"]);
    grant("", &["services", "pods"], &["get", "list", "watch"]);
    grant(
        "agents.x-k8s.io",
        &["sandboxes"],
        &["create", "delete", "patch"],
    );
    // Warm pools: a claim is made, read until it names its Sandbox, and deleted; the pool is
    // read (it must exist; v1alpha1 claims name its template).
    grant(
        "extensions.agents.x-k8s.io",
        &["sandboxclaims"],
        &["create", "get", "delete"],
    );
    grant(
        "extensions.agents.x-k8s.io",
        &["sandboxwarmpools"],
        &["get"],
    );
    // pods/exec: `create` (SPDY, and WebSocket where upgrades are authorized as create),
    // `get` (WebSocket on older clusters).
    grant("", &["pods/exec"], &["create", "get"]);
    // pods/log: the logs route reads the pod's log.
    grant("", &["pods/log"], &["get"]);
    let extra: Vec<_> = granted.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "the Role grants {extra:?} beyond the issue's list, and lacks {missing:?}"
    );
    let binding = one(rbac, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], sandbox_ns);
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
               "name": role["metadata"]["name"]})
    );
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                "namespace": gateway_ns}])
    );

    // The Dockerfiles: the real one is multi-stage and builds the release binary; both run
    // it the same way, as the same numeric non-root user, on PORT=8080.
    let full = read("Dockerfile");
    let prebuilt = read("deploy/docker/Dockerfile.prebuilt");
    let instructions = |text: &str, word: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| l.split_whitespace().next() == Some(word))
            .map(str::to_string)
            .collect()
    };
    let froms = instructions(&full, "FROM");
    assert!(froms.len() >= 2, "not multi-stage: {froms:?}");
    assert!(
        full.contains("cargo build --release --locked --bin sandgate"),
        "the build stage builds the release binary"
    );
    for word in ["USER", "EXPOSE", "ENTRYPOINT", "CMD", "VOLUME"] {
        let a = instructions(&full, word);
        assert_eq!(a.last(), instructions(&prebuilt, word).last(), "{word}");
        assert!(a.last().is_some(), "the Dockerfile has no {word}");
    }
    assert_eq!(
        instructions(&full, "USER").last().map(String::as_str),
        Some("USER 10001:10001")
    );
    assert_eq!(
        instructions(&full, "EXPOSE").last().map(String::as_str),
        Some("EXPOSE 8080")
    );
    for text in [&full, &prebuilt] {
        for var in [
            "PORT=8080",
            "GATEWAY_HOST=0.0.0.0",
            "SANDGATE_DATA_DIR=/var/lib/sandgate",
        ] {
            assert!(text.contains(var), "{var} is not set");
        }
    }
    let ignore = read(".dockerignore");
    for entry in ["target/", ".git/", "**/node_modules/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == entry),
            ".dockerignore lacks {entry}"
        );
    }
}
