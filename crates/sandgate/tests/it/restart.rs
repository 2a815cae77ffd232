//! Gateway restarts on the same data directory (the real binary): a crash leaves sandboxes
//! running and the next gateway re-adopts them; a graceful stop stops them and they can be
//! started again; allocated ports are never handed out twice.

use std::time::Duration;

use hyper::{Request, StatusCode};

use crate::common::{
    eventually, fixture_body, process_alive, sandbox_processes, send_request, wait_process_gone,
    wait_sandbox_processes_gone, Lane, Reply, SpawnedGateway, READY_TIMEOUT,
};

async fn sigkill_leaves_sandboxes_running_and_restart_readopts_them(lane: Lane) {
    let mut gw = SpawnedGateway::start_on(lane, 2, &[]).await;
    let sb = gw.create_fixture().await;
    gw.kill().await;

    // The sandbox did not notice: same process, still serving on its port.
    assert!(process_alive(sb.pid), "the fixture died with the gateway");
    let direct: std::net::SocketAddr = ([127, 0, 0, 1], sb.allocated_port).into();
    let req = Request::builder()
        .uri("/")
        .header("host", direct.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        Reply::read(send_request(direct, None, req).await?).await
    })
    .await
    .expect("direct request within 10 s")
    .expect("the fixture answers directly");
    assert_eq!(r.status, StatusCode::OK);

    gw.restart().await;
    let v = gw.sandbox(&sb.id).await;
    assert_eq!(v["status"], "running", "{v}\n{}", gw.log());
    gw.wait_ready(&sb.id).await;
    assert!(process_alive(sb.pid), "re-adopted, not restarted");

    // The re-adopted process is still managed: deleting it stops it.
    gw.delete_sandbox(&sb.id).await;
    wait_process_gone(sb.pid, Duration::from_secs(5), "the re-adopted fixture").await;
    assert!(gw.terminate().await.success(), "{}", gw.log());
}

async fn sigterm_stops_sandboxes_and_restart_can_start_them(lane: Lane) {
    let mut gw = SpawnedGateway::start_on(lane, 2, &[]).await;
    let sb = gw.create_fixture().await;
    let status = gw.terminate().await;
    assert!(status.success(), "exit {status:?}\n{}", gw.log());
    // The gateway exits only after stopping its sandboxes.
    wait_process_gone(sb.pid, Duration::from_secs(3), "the fixture after SIGTERM").await;

    gw.restart().await;
    let v = gw.sandbox(&sb.id).await;
    assert_eq!(v["status"], "stopped", "{v}");
    gw.get(&sb.path("/"))
        .send()
        .await
        .expect_error(409, "sandbox_not_running");

    let r = gw.post(&format!("/sandboxes/{}/start", sb.id)).send().await;
    r.expect(200);
    assert_eq!(r.json()["status"], "running");
    let new_pid = gw.leader(&sb.id, Some(sb.pid)).await;
    gw.wait_ready(&sb.id).await;
    gw.delete_sandbox(&sb.id).await;
    wait_process_gone(new_pid, Duration::from_secs(5), "the restarted fixture").await;
    assert!(gw.terminate().await.success(), "{}", gw.log());
}

/// With several connection workers (`--workers 4`: the main event loop and three threads, each
/// with a listening socket of its own), sandboxes created and reached through any of them are
/// served, and SIGTERM still drains every worker and stops every sandbox.
async fn sigterm_with_four_workers_stops_sandboxes_created_through_each(lane: Lane) {
    let mut gw = SpawnedGateway::start_on(lane, 8, &["--workers", "4"]).await;
    // A worker may answer the readiness check before the last one is spawned.
    let pid = gw.pid();
    eventually(READY_TIMEOUT, "three worker threads run", || async move {
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("the gateway's threads")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("sandgate-worker"))
            .count();
        (threads == 3).then_some(())
    })
    .await;

    // Every request below is a new connection, so the kernel spreads them over the workers.
    let mut pids = Vec::new();
    for _ in 0..8 {
        let sb = gw.create_fixture().await;
        for _ in 0..4 {
            let r = gw.get(&sb.path("/")).send().await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        }
        pids.push(sb.pid);
    }
    let status = gw.terminate().await;
    assert!(status.success(), "exit {status:?}\n{}", gw.log());
    for pid in pids {
        wait_process_gone(pid, Duration::from_secs(3), "a fixture after SIGTERM").await;
    }
}

async fn ports_allocated_before_a_restart_are_not_handed_out_again(lane: Lane) {
    let mut gw = SpawnedGateway::start_on(lane, 3, &[]).await;
    let (lo, hi) = gw.port_range();
    let a = gw.create_fixture().await;
    let b = gw.create_fixture().await;
    assert_ne!(a.allocated_port, b.allocated_port);
    // Graceful stop: the processes end, so the ports are free as far as the OS is concerned;
    // only the gateway's records keep them taken.
    assert!(gw.terminate().await.success(), "{}", gw.log());
    gw.restart().await;

    let c = gw.create_fixture().await;
    assert!((lo..=hi).contains(&c.allocated_port));
    assert!(
        ![a.allocated_port, b.allocated_port].contains(&c.allocated_port),
        "port {} handed out again after a restart (a={}, b={})",
        c.allocated_port,
        a.allocated_port,
        b.allocated_port
    );
    gw.post("/sandboxes")
        .json(&fixture_body())
        .send()
        .await
        .expect_error(503, "ports_exhausted");

    for id in [&a.id, &b.id, &c.id] {
        gw.delete_sandbox(id).await;
    }
    assert!(gw.terminate().await.success(), "{}", gw.log());
}

both_lanes!(
    sigkill_leaves_sandboxes_running_and_restart_readopts_them,
    sigterm_stops_sandboxes_and_restart_can_start_them,
    sigterm_with_four_workers_stops_sandboxes_created_through_each,
    ports_allocated_before_a_restart_are_not_handed_out_again,
);

/// A second gateway on a data directory in use refuses to start, names the first (pid and
/// address), exits non-zero and changes nothing: the first's sandbox keeps running and
/// answering.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_gateway_on_the_same_data_directory_refuses_to_start() {
    let gw = SpawnedGateway::start(2, &[]).await;
    let sb = gw.create_fixture().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandgate"))
        .args([
            "serve",
            "--port",
            "0",
            "--isolation",
            "none",
            "--auth-enabled",
            "false",
        ])
        .arg("--data-dir")
        .arg(gw.data_dir())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("the second gateway exits at once")
        .expect("it runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("in use by another sandgate"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", gw.pid())), "{stderr}");
    assert!(
        stderr.contains(&format!("listening on {}", gw.addr)),
        "{stderr}"
    );
    assert!(
        crate::common::process_alive(sb.pid),
        "the sandbox was touched"
    );
    let r = gw.get(&sb.path("/")).send().await;
    r.expect(200);
    assert_eq!(gw.sandbox(&sb.id).await["status"], "running");
    gw.delete_sandbox(&sb.id).await;
}

/// A gateway killed while 20 creates are in flight leaves no orphan: after the restart every
/// sandbox the API lists as running has its processes and answers, every other one has none
/// (the interrupted creates' processes are found by the sandbox id they carry), and deleting
/// them all leaves nothing behind.
async fn a_crash_during_creates_leaves_no_orphan(isolation: &str) {
    let mut gw = SpawnedGateway::start(40, &["--isolation", isolation]).await;
    let creates: Vec<_> = (0..20)
        .map(|_| {
            let c = (*gw).clone();
            // The crash cuts some of them off: an error, not a panic.
            tokio::spawn(async move { c.post("/sandboxes").json(&fixture_body()).try_send().await })
        })
        .collect();
    // Kill once the first of them has started a process: the rest are in flight.
    eventually(READY_TIMEOUT, "a create starts a process", || async {
        let listed = gw.list().await;
        listed
            .iter()
            .any(|s| !sandbox_processes(s["id"].as_str().unwrap_or("-")).is_empty())
            .then_some(())
    })
    .await;
    gw.kill().await;
    for c in creates {
        let _ = c.await;
    }
    gw.restart().await;
    let listed = gw.list().await;
    assert!(!listed.is_empty(), "{}", gw.log());
    let running = listed.iter().filter(|s| s["status"] == "running").count();
    eprintln!(
        "after the crash: {} listed, {running} running",
        listed.len()
    );
    for sb in &listed {
        let id = sb["id"].as_str().unwrap().to_string();
        if sb["status"] == "running" {
            assert!(!sandbox_processes(&id).is_empty(), "{sb}");
            gw.wait_ready(&id).await;
        } else {
            eventually(
                Duration::from_secs(5),
                &format!("no process of {id}, listed {}", sb["status"]),
                || async { sandbox_processes(&id).is_empty().then_some(()) },
            )
            .await;
        }
    }
    for sb in &listed {
        gw.delete_sandbox(sb["id"].as_str().unwrap()).await;
    }
    for sb in &listed {
        wait_sandbox_processes_gone(sb["id"].as_str().unwrap(), Duration::from_secs(5)).await;
    }
    assert!(gw.terminate().await.success(), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_during_creates_leaves_no_orphan_shared_host() {
    a_crash_during_creates_leaves_no_orphan("none").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_during_creates_leaves_no_orphan_jailed() {
    if crate::common::jail_or_skip() {
        a_crash_during_creates_leaves_no_orphan("sandbox").await;
    }
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// A sandbox's log writer outlives a crashed gateway as the sandbox does: what it prints
/// while no gateway runs is in its log, with its times, after the restart; deleting the
/// sandbox ends the writer too.
#[tokio::test(flavor = "multi_thread")]
async fn logs_keep_flowing_across_a_crash() {
    let mut gw = SpawnedGateway::start(2, &[]).await;
    let v = gw
        .create(&serde_json::json!({"runtime": "shell", "dev_server": false,
            "command": "i=0; while :; do i=$((i+1)); echo tick-$i; sleep 0.1; done"}))
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    let logs = format!("/sandboxes/{id}/logs");
    let count = |text: &str| text.lines().filter(|l| l.contains("tick-")).count();
    eventually(READY_TIMEOUT, "ticks are logged", || async {
        (count(&gw.get(&logs).send().await.text()) >= 2).then_some(())
    })
    .await;
    gw.kill().await;
    let before = count(&String::from_utf8_lossy(
        &std::fs::read(
            gw.data_dir()
                .join("sandboxes")
                .join(&id)
                .join("sandbox.log"),
        )
        .unwrap(),
    ));
    // Written while no gateway runs.
    eventually(
        Duration::from_secs(10),
        "ticks go on being written",
        || async {
            let text = std::fs::read(
                gw.data_dir()
                    .join("sandboxes")
                    .join(&id)
                    .join("sandbox.log"),
            )
            .unwrap_or_default();
            (count(&String::from_utf8_lossy(&text)) >= before + 5).then_some(())
        },
    )
    .await;
    gw.restart().await;
    let stamped = gw
        .get(&format!("{logs}?timestamps=true"))
        .send()
        .await
        .text();
    let ticks: Vec<&str> = stamped.lines().filter(|l| l.contains("tick-")).collect();
    assert!(ticks.len() >= before + 5, "{stamped}");
    for line in &ticks {
        let (time, rest) = line.split_once(' ').unwrap();
        assert!(rest.starts_with("tick-"), "{line}");
        assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{line}");
    }
    let log_path = gw
        .data_dir()
        .join("sandboxes")
        .join(&id)
        .join("sandbox.log");
    let writer = processes_mentioning(&format!("log-writer\0{}", log_path.display()));
    assert_eq!(writer.len(), 1, "one writer for the sandbox");
    gw.delete_sandbox(&id).await;
    for pid in writer {
        wait_process_gone(
            pid,
            Duration::from_secs(5),
            "the deleted sandbox's log writer",
        )
        .await;
    }
    assert!(gw.terminate().await.success(), "{}", gw.log());
}
