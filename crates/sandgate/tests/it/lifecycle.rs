//! Sandbox processes: deleting kills the whole process group and removes the directory, and
//! nothing the tests started outlives its sandbox or the gateway.

use std::time::Duration;

use serde_json::json;

use crate::common::{
    eventually, pgid_of, sandbox_processes, wait_process_gone, wait_processes_gone, Lane,
    TestGateway, READY_TIMEOUT,
};

async fn delete_kills_the_whole_process_group_and_removes_the_directory(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    // A background child the sandbox's main process does not wait for.
    let sb = gw.create_fixture_with("sleep 1000 &", json!({})).await;
    let procs = eventually(READY_TIMEOUT, "the fixture and its sleep run", || async {
        let p = sandbox_processes(&sb.id);
        (p.len() >= 2).then_some(p)
    })
    .await;
    assert!(
        procs.contains(&sb.pid),
        "{procs:?} lacks the leader {}",
        sb.pid
    );
    for &pid in &procs {
        assert_eq!(
            pgid_of(pid),
            Some(sb.pid),
            "{pid} is in the sandbox's group"
        );
    }
    let dir = gw.data_dir().join("sandboxes").join(&sb.id);
    assert!(dir.is_dir(), "{} exists while running", dir.display());

    gw.delete_sandbox(&sb.id).await;
    // The delete answered only after the group was gone; allow PID 1 a moment to reap.
    wait_processes_gone(
        procs,
        Duration::from_secs(5),
        "a process of the deleted sandbox",
    )
    .await;
    assert_eq!(sandbox_processes(&sb.id), Vec::<i32>::new());
    assert!(!dir.exists(), "{} removed on delete", dir.display());
    gw.shutdown().await;
}

async fn no_fixture_process_remains_after_all_sandboxes_are_deleted(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(gw.create_fixture().await.id);
    }
    let stopped = gw.create_fixture().await;
    gw.post(&format!("/sandboxes/{}/stop", stopped.id))
        .send()
        .await
        .expect(200);
    ids.push(stopped.id);
    let pids = gw.pids.all();
    assert_eq!(pids.len(), 4, "every fixture was recorded");
    for id in &ids {
        gw.delete_sandbox(id).await;
    }
    assert_eq!(gw.count().await, 0);
    for pid in pids {
        wait_process_gone(pid, Duration::from_secs(5), "a deleted sandbox's fixture").await;
    }
    for id in &ids {
        assert_eq!(sandbox_processes(id), Vec::<i32>::new(), "{id}");
    }
    let left = std::fs::read_dir(gw.data_dir().join("sandboxes"))
        .expect("sandboxes dir")
        .count();
    assert_eq!(left, 0, "sandbox directories left behind");
    gw.shutdown().await;
}

async fn shutdown_stops_every_sandbox(lane: Lane) {
    let gw = TestGateway::on(lane).await;
    let a = gw.create_fixture().await;
    let b = gw.create_fixture().await;
    gw.shutdown().await;
    // run() returns only after stopping them.
    for pid in [a.pid, b.pid] {
        wait_process_gone(pid, Duration::from_secs(5), "a fixture after shutdown").await;
    }
}

both_lanes!(
    delete_kills_the_whole_process_group_and_removes_the_directory,
    no_fixture_process_remains_after_all_sandboxes_are_deleted,
    shutdown_stops_every_sandbox,
);
