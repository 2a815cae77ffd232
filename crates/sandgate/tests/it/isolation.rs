//! Isolated process sandboxes. `isolation = netns`: each sandbox has its own network and PID
//! namespaces, binds its own 127.0.0.1:3000, and the proxy dials inside it. `isolation =
//! sandbox` (the `auto` default where bubblewrap is installed) also jails it: its own uid
//! without privilege, a root of its own with only its working tree writable, and nothing of
//! other sandboxes, the gateway or the host's processes in view. Without the privilege these
//! tests print `SKIPPED` and pass, except under CI (`CI` set), where the jailed ones fail.

use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use sandgate::config::Isolation;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{
    eventually, jail_or_skip, sandbox_processes, wait_processes_gone, wait_sandbox_processes_gone,
    Client, SpawnedGateway, TestGateway, READY_TIMEOUT,
};

fn netns_or_skip() -> bool {
    let ok = sandgate::backend::process::isolation_available();
    if !ok {
        eprintln!("SKIPPED: no network-namespace privilege (root, CAP_SYS_ADMIN, unshare, ip)");
    }
    ok
}

async fn isolated_gateway() -> TestGateway {
    TestGateway::builder()
        .isolation(Isolation::Netns)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_sandboxes_share_a_port_and_are_reachable_by_every_route() {
    if !netns_or_skip() {
        return;
    }
    let gw = isolated_gateway().await;
    let health = gw.get("/health").send().await.expect(200).json();
    assert_eq!(health["isolation"], "netns", "{health}");
    let a = gw.create_fixture().await;
    let b = gw.create_fixture().await;
    // Both listen on 127.0.0.1:3000 at the same time: each in a namespace of its own.
    for sb in [&a, &b] {
        assert_eq!(sb.port, 3000, "{}", sb.view);
        assert!(sb.view["allocated_port"].is_null(), "{}", sb.view);
        let host = format!("3000-{}.localhost:{}", sb.id, gw.addr.port());
        let v = gw
            .get("/echo/by-host")
            .header("host", &host)
            .send()
            .await
            .expect(200)
            .json();
        assert_eq!(v["headers"]["host"], "localhost:3000", "{v}");
        let r = gw.get(&format!("/sandbox/{}/", sb.id)).send().await;
        r.expect(200);
        assert_eq!(r.text(), "fixture ok");
    }
    // A WebSocket through a namespace dial.
    let mut ws = gw.websocket(&a.path("/ws"), None).await;
    ws.send(Message::text("inside")).await.expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo within 5 s")
        .expect("a message")
        .expect("no error");
    assert_eq!(echoed, Message::text("inside"));
    drop(ws);
    let ready = gw.get("/health/sandboxes").send().await.expect(200).json();
    assert_eq!(ready["ready"], 2, "{ready}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_sandboxes_advertise_their_proxy_urls() {
    if !netns_or_skip() {
        return;
    }
    let gw = isolated_gateway().await;
    let sb = gw.create_fixture().await;
    let v = &sb.view;
    // The sandbox is proxied (the route above answers), so the object must say so.
    assert_eq!(v["proxy_enabled"], true, "{v}");
    assert_eq!(
        v["dev_server_url"],
        json!(gw.url(&format!("/sandbox/{}/", sb.id))),
        "{v}"
    );
    assert_eq!(
        v["host_url"],
        json!(format!(
            "http://3000-{}.localhost:{}/",
            sb.id,
            gw.addr.port()
        )),
        "{v}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_host_route_never_reaches_the_hosts_own_services() {
    if !netns_or_skip() {
        return;
    }
    let gw = isolated_gateway().await;
    let sb = gw.create_fixture().await;
    // A service on the gateway host's loopback.
    let host_service = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = host_service.local_addr().unwrap().port();
    let host = format!("{port}-{}.localhost:{}", sb.id, gw.addr.port());
    let r = gw.get("/").header("host", &host).send().await;
    let message = r.expect_error(502, "upstream_unreachable");
    assert!(message.contains(&port.to_string()), "{message}");
    assert!(
        host_service.accept().now_or_never().is_none(),
        "the proxy connected to the host's service through a sandbox route"
    );
    gw.shutdown().await;
}

// ---- Jailed sandboxes (`isolation = sandbox`: bubblewrap, setpriv) ----

/// Runs `command` in sandbox `id` through the API.
async fn sh(gw: &Client, id: &str, command: &str) -> Value {
    gw.exec(id, &json!({ "command": command })).await
}

/// Runs `command` in `id`, expecting it to fail with `needle` in its output.
async fn refused(gw: &Client, id: &str, command: &str, needle: &str) {
    let v = sh(gw, id, command).await;
    assert_ne!(v["exit_code"], 0, "{command} succeeded: {v}");
    let out = format!("{}{}", v["stdout"], v["stderr"]);
    assert!(
        out.contains(needle),
        "{command}: expected {needle:?} in {v}"
    );
}

/// `field` of `/proc/<pid>/status`, as the host sees it.
fn status_field(pid: i32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
}

fn assert_unprivileged(what: &str, status: &str, uid: u32) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{what}: no {name} in {status}"))
    };
    let uid = uid.to_string();
    assert_eq!(
        field("Uid").split_whitespace().collect::<Vec<_>>(),
        [uid.as_str(); 4],
        "{what}"
    );
    for caps in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(caps), "0000000000000000", "{what}: {caps}");
    }
    assert_eq!(field("NoNewPrivs"), "1", "{what}");
}

/// Two jailed sandboxes, a host process and a secret under a read-only path: each sandbox
/// runs as a uid of its own without privilege (its server, its commands and its terminal's
/// shell), writes only its own tree (files it makes there, and files the API uploads, are
/// its own), and sees neither the other sandbox, the gateway's store, `/root`, the secret,
/// nor any process outside itself, which it cannot signal either.
#[tokio::test(flavor = "multi_thread")]
async fn jailed_sandboxes_see_only_their_own_tree_as_their_own_user() {
    if !jail_or_skip() {
        return;
    }
    let extra = tempfile::tempdir().expect("tempdir");
    std::fs::write(extra.path().join("tool.txt"), "visible").unwrap();
    let secret = extra.path().join("sandgate.toml");
    std::fs::write(&secret, "token_secret = \"s3cret\"\n").unwrap();
    let (ro, config_file) = (extra.path().to_path_buf(), secret.clone());
    let gw = TestGateway::builder()
        .isolation(Isolation::Sandbox)
        .config(move |c| {
            c.sandbox_ro_paths.push(ro);
            c.config_file = Some(config_file);
        })
        .start()
        .await;
    let health = gw.get("/health").send().await.expect(200).json();
    assert_eq!(health["isolation"], "sandbox", "{health}");
    let a = gw.create_fixture().await;
    let b = gw.create_fixture().await;
    let data = gw.data_dir().to_path_buf();
    let mut canary = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .expect("sleep");
    let canary_pid = canary.id();

    // Users: one each, never root, and nothing that grants privilege.
    let uid = |v: Value| -> u32 {
        v["stdout"]
            .as_str()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("id -u: {v}"))
    };
    let (ua, ub) = (
        uid(sh(&gw, &a.id, "id -u").await),
        uid(sh(&gw, &b.id, "id -u").await),
    );
    assert!(ua != 0 && ub != 0 && ua != ub, "uids {ua} and {ub}");
    let v = sh(&gw, &a.id, "cat /proc/self/status").await;
    assert_unprivileged("a command", v["stdout"].as_str().unwrap(), ua);
    let servers: Vec<i32> = sandbox_processes(&a.id)
        .into_iter()
        .filter(|p| status_field(*p, "Uid").is_some_and(|u| u.starts_with(&ua.to_string())))
        .collect();
    assert!(
        servers.len() >= 2,
        "init and the fixture run as {ua}: {servers:?}"
    );
    for pid in servers {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert_unprivileged(&format!("sandbox process {pid}"), &status, ua);
    }
    let v = sh(&gw, &a.id, "whoami; echo $HOME; pwd").await;
    assert_eq!(v["stdout"], "sandbox\n/sandbox\n/sandbox\n", "{v}");

    // Its own tree, and nothing else, is writable; what lands there is its own.
    sh(&gw, &a.id, "touch /sandbox/mine").await;
    let work_a = data.join("sandboxes").join(&a.id).join("work");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(work_a.join("mine")).unwrap().uid(), ua);
    gw.req(
        hyper::Method::PUT,
        &format!("/sandboxes/{}/files?path=up/loaded.txt", a.id),
    )
    .header("content-type", "application/octet-stream")
    .body("uploaded")
    .send()
    .await
    .expect(201);
    for made in ["up", "up/loaded.txt"] {
        let meta = std::fs::metadata(work_a.join(made)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (ua, ua), "{made}");
    }
    sh(&gw, &a.id, "echo more >> up/loaded.txt && rm -r up").await;
    for dir in ["/usr", "/etc", "/"] {
        refused(&gw, &a.id, &format!("touch {dir}/x"), "").await;
    }
    refused(&gw, &a.id, "touch /usr/x", "Read-only file system").await;

    // The gateway's data directory, the other sandbox, the host's home: not there at all.
    let d = data.display();
    refused(&gw, &a.id, &format!("ls {d}"), "No such file").await;
    refused(&gw, &a.id, &format!("cat {d}/sandgate.db"), "No such file").await;
    let b_work = format!("{d}/sandboxes/{}/work", b.id);
    refused(&gw, &a.id, &format!("ls {b_work}"), "No such file").await;
    refused(&gw, &a.id, &format!("echo x > {b_work}/f"), "").await;
    refused(&gw, &a.id, "ls -A /root", "No such file").await;
    // A read-only path is there, the configuration file in it is not.
    let v = sh(
        &gw,
        &a.id,
        &format!(
            "cat {}/tool.txt; cat {}",
            extra.path().display(),
            secret.display()
        ),
    )
    .await;
    assert_eq!(v["stdout"], "visible", "{v}");

    // Processes: only its own are visible, and nothing outside can be signalled.
    let v = sh(&gw, &a.id, "ls /proc | grep -c '^[0-9]'").await;
    let seen: u32 = v["stdout"].as_str().unwrap().trim().parse().unwrap();
    assert!(seen <= 8, "sandbox sees {seen} processes: {v}");
    let b_pids = sandbox_processes(&b.id);
    for pid in b_pids
        .iter()
        .copied()
        .chain([canary_pid as i32, std::process::id() as i32])
    {
        refused(&gw, &a.id, &format!("kill -9 {pid}"), "").await;
    }
    // Even everything it may signal at once.
    sh(&gw, &a.id, "kill -9 -1; true").await;
    assert!(
        canary.try_wait().unwrap().is_none(),
        "the host process died"
    );
    for pid in &b_pids {
        assert!(crate::common::process_alive(*pid), "sandbox B's {pid} died");
    }
    let r = gw.get(&format!("/sandbox/{}/", b.id)).send().await;
    r.expect(200);
    let _ = canary.kill();
    let _ = canary.wait();
    gw.shutdown().await;
}

/// A jailed sandbox's terminal shell runs as the sandbox's user and owns its terminal.
#[tokio::test(flavor = "multi_thread")]
async fn jailed_terminal_shells_are_the_sandbox_user() {
    if !jail_or_skip() {
        return;
    }
    let gw = TestGateway::builder()
        .isolation(Isolation::Sandbox)
        .start()
        .await;
    let v = gw.create(&json!({"runtime": "shell"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    let uid = sh(&gw, &id, "id -u").await["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .to_string();
    let mut term = gw.websocket(&format!("/sandboxes/{id}/pty"), None).await;
    term.send(Message::Binary(
        b"echo U=$(id -u) T=$(stat -L -c %u /proc/self/fd/0)\n"
            .to_vec()
            .into(),
    ))
    .await
    .expect("send");
    let want = format!("U={uid} T={uid}");
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(&want) {
        let msg = tokio::time::timeout_at(deadline, term.next())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} in {seen:?}"))
            .expect("a message")
            .expect("no error");
        match msg {
            Message::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Message::Text(t) => seen.push_str(&t),
            _ => {}
        }
    }
    drop(term);
    gw.shutdown().await;
}

/// Deleting an isolated sandbox ends every process in it, one that left its process group and
/// ignores SIGTERM included, and removes its directory.
async fn delete_leaves_no_process_behind(isolation: Isolation) {
    let gw = TestGateway::builder().isolation(isolation).start().await;
    let sb = gw
        .create_fixture_with(
            "setsid sh -c 'trap \"\" TERM; exec sleep 1000' & sleep 1000 &",
            json!({}),
        )
        .await;
    // The leader, the init, the fixture and the two sleeps.
    let procs = eventually(READY_TIMEOUT, "the sandbox's processes run", || async {
        let p = sandbox_processes(&sb.id);
        (p.len() >= 5).then_some(p)
    })
    .await;
    gw.delete_sandbox(&sb.id).await;
    wait_processes_gone(
        procs,
        Duration::from_secs(5),
        "a process of the deleted sandbox",
    )
    .await;
    wait_sandbox_processes_gone(&sb.id, Duration::from_secs(5)).await;
    assert!(
        !gw.data_dir().join("sandboxes").join(&sb.id).exists(),
        "the sandbox's directory outlived it"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn isolated_delete_leaves_no_process_behind() {
    if netns_or_skip() {
        delete_leaves_no_process_behind(Isolation::Netns).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jailed_delete_leaves_no_process_behind() {
    if jail_or_skip() {
        delete_leaves_no_process_behind(Isolation::Sandbox).await;
    }
}

/// A jailed sandbox outlives a crashed gateway and is re-adopted whole: commands still run in
/// it as its user.
#[tokio::test(flavor = "multi_thread")]
async fn jailed_sandboxes_are_readopted_after_a_crash() {
    if !jail_or_skip() {
        return;
    }
    let mut gw = SpawnedGateway::start(2, &["--isolation", "sandbox"]).await;
    let sb = gw.create_fixture().await;
    let before = sh(&gw, &sb.id, "id -u; touch before").await;
    gw.kill().await;
    gw.restart().await;
    let v = gw.sandbox(&sb.id).await;
    assert_eq!(v["status"], "running", "{v}\n{}", gw.log());
    gw.wait_ready(&sb.id).await;
    let after = sh(&gw, &sb.id, "id -u; ls before").await;
    assert_eq!(
        after["stdout"].as_str().unwrap(),
        format!("{}before\n", before["stdout"].as_str().unwrap()),
        "{after}"
    );
    gw.delete_sandbox(&sb.id).await;
    wait_sandbox_processes_gone(&sb.id, Duration::from_secs(5)).await;
    assert!(gw.terminate().await.success(), "{}", gw.log());
}
