//! Warm pools (`[runtimes.X] warm = N`): a create that matches what the pool runs claims a
//! pre-started sandbox and is served at once; the pool refills in the background; waiting
//! sandboxes are nobody's (not listed, not found, not routed); a waiting sandbox that dies is
//! replaced; restarts (crash and graceful) leak no process, directory or record.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{
    eventually, fixture_path, fixture_program, sandbox_processes, wait_sandbox_processes_gone,
    Client, Lane, SpawnedGateway, TestGateway, READY_TIMEOUT,
};

/// A runtime `web` whose dev server is the fixture, with a pool of `warm`.
fn web_runtime(warm: usize) -> sandgate::config::RuntimeConfig {
    sandgate::config::RuntimeConfig {
        program: Some(fixture_path().into()),
        command: Some(format!("exec {}", fixture_program())),
        image: None,
        warm: Some(warm),
        ..Default::default()
    }
}

/// The same, as a configuration file.
fn web_config(dir: &Path, warm: usize) -> String {
    let path = dir.join("sandgate.toml");
    std::fs::write(
        &path,
        format!(
            "[runtimes.web]\nprogram = {:?}\ncommand = {:?}\nwarm = {warm}\n",
            fixture_path(),
            format!("exec {}", fixture_program())
        ),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

/// One series of the exposition (`name{labels}` exactly), if present.
async fn series(gw: &Client, name: &str) -> Option<f64> {
    let text = gw.get("/metrics").send().await.text();
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

async fn waiting(gw: &Client) -> f64 {
    waiting_for(gw, "web").await
}

pub(crate) async fn claims(gw: &Client, result: &str) -> f64 {
    series(
        gw,
        &format!("sandgate_warm_pool_claims_total{{result=\"{result}\"}}"),
    )
    .await
    .unwrap_or(0.0)
}

/// Waits until `n` sandboxes wait in the `web` pool.
async fn pool_holds(gw: &Client, n: usize) {
    pool_of_holds(gw, "web", n, READY_TIMEOUT).await;
}

/// Waits (at most `within`) until `n` sandboxes wait in `runtime`'s pool.
pub(crate) async fn pool_of_holds(gw: &Client, runtime: &str, n: usize, within: Duration) {
    eventually(
        within,
        &format!("{n} sandboxes wait in the {runtime} pool"),
        || async move { (waiting_for(gw, runtime).await == n as f64).then_some(()) },
    )
    .await;
}

/// The sandboxes the gateway keeps a directory for (process backend), listed or not.
fn directories(data_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(data_dir.join("sandboxes"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The sandboxes that exist but the API does not list: those waiting in the pool.
async fn hidden(gw: &Client, data_dir: &Path) -> BTreeSet<String> {
    let listed: BTreeSet<String> = gw
        .list()
        .await
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect();
    directories(data_dir)
        .difference(&listed)
        .filter(|id| !sandbox_processes(id).is_empty())
        .cloned()
        .collect()
}

async fn a_matching_create_claims_a_waiting_sandbox_and_the_pool_refills(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| {
            c.runtimes.insert("web".into(), web_runtime(2));
        })
        .start()
        .await;
    pool_holds(&gw, 2).await;
    let pools = gw.get("/health/pools").send().await;
    pools.expect(200);
    let report = &pools.json()["pools"];
    assert_eq!(report[0]["runtime"], "web", "{report}");
    assert_eq!(report[0]["size"], 2, "{report}");
    assert_eq!(report[0]["ready"], 2, "{report}");
    assert!(!pools.text().contains("sb-"), "no sandbox id: {report}");
    let pooled = hidden(&gw, gw.data_dir()).await;
    assert_eq!(pooled.len(), 2, "two sandboxes run, unlisted: {pooled:?}");
    assert_eq!(gw.count().await, 0, "waiting sandboxes are nobody's");

    // Nobody reaches a waiting sandbox: not the API, not the proxy.
    for id in &pooled {
        gw.get(&format!("/sandboxes/{id}"))
            .send()
            .await
            .expect_error(404, "sandbox_not_found");
        gw.get(&format!("/sandbox/{id}/"))
            .send()
            .await
            .expect_error(404, "sandbox_not_found");
        gw.post(&format!("/sandboxes/{id}/exec"))
            .json(&json!({"command": "true"}))
            .send()
            .await
            .expect_error(404, "sandbox_not_found");
    }

    // A create that names the runtime claims one: it is the user's at once, and serves.
    let began = Instant::now();
    let r = gw
        .post("/sandboxes")
        .json(&json!({
            "runtime": "web", "owner": "alice", "name": "site",
            "labels": {"stage": "dev"}, "mode": "persistent", "idle_timeout": 0
        }))
        .send()
        .await;
    r.expect(201);
    let v = r.json();
    let id = v["id"].as_str().unwrap().to_string();
    let first = gw.get(&format!("/sandbox/{id}/")).send().await;
    let to_first_byte = began.elapsed();
    assert!(pooled.contains(&id), "{id} was not one of {pooled:?}");
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(v["status"], "running");
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["owner"], "alice");
    assert_eq!(v["path"], "alice/site");
    assert_eq!(v["labels"]["stage"], "dev");
    assert_eq!(v["mode"], "persistent");
    assert_eq!(v["idle_timeout"], 0);
    assert_eq!(v["runtime"], "web");
    assert!(
        to_first_byte < Duration::from_secs(2),
        "create to first byte took {to_first_byte:?}"
    );
    gw.get("/alice/site/").send().await.expect(200);
    assert_eq!(gw.sandbox(&id).await["ready"], true);
    assert_eq!(claims(&gw, "claimed").await, 1.0);

    // The pool refills with a new one.
    pool_holds(&gw, 2).await;
    let refilled = hidden(&gw, gw.data_dir()).await;
    assert_eq!(refilled.len(), 2, "{refilled:?}");
    assert!(!refilled.contains(&id));

    // A create the pool cannot serve (its own environment) starts one the usual way.
    let own = gw
        .create(&json!({"runtime": "web", "env": {"A": "1"}}))
        .await;
    let own_id = own["id"].as_str().unwrap();
    assert!(!refilled.contains(own_id));
    assert_eq!(claims(&gw, "missed").await, 1.0);
    gw.wait_ready(own_id).await;

    // A claim refused (the name is taken) hands the sandbox back: still two waiting, unseen.
    gw.post("/sandboxes")
        .json(&json!({"runtime": "web", "owner": "alice", "name": "site"}))
        .send()
        .await
        .expect_error(409, "conflict");
    assert_eq!(waiting(&gw).await, 2.0);
    assert_eq!(hidden(&gw, gw.data_dir()).await, refilled);

    // A waiting sandbox that dies is removed and replaced.
    let victim = refilled.iter().next().unwrap().clone();
    for pid in sandbox_processes(&victim) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    eventually(
        READY_TIMEOUT,
        "the dead warm sandbox is replaced",
        || async {
            let now = hidden(&gw, gw.data_dir()).await;
            let gone = !directories(gw.data_dir()).contains(&victim);
            (gone && now.len() == 2 && waiting(&gw).await == 2.0).then_some(())
        },
    )
    .await;

    // Concurrent creates: two claim, the rest start their own; every one is distinct.
    let before = claims(&gw, "claimed").await;
    let creates: Vec<_> = (0..4)
        .map(|_| {
            let c = (*gw).clone();
            tokio::spawn(async move { c.create(&json!({"runtime": "web"})).await })
        })
        .collect();
    let mut ids = BTreeSet::new();
    for c in creates {
        let v = c.await.unwrap();
        ids.insert(v["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids.len(), 4);
    assert!(claims(&gw, "claimed").await - before >= 2.0);
    for id in &ids {
        gw.wait_ready(id).await;
        gw.get(&format!("/sandbox/{id}/")).send().await.expect(200);
    }

    // Shutdown removes what waits; nothing of it is left running.
    pool_holds(&gw, 2).await;
    let last = hidden(&gw, gw.data_dir()).await;
    let data_dir = gw.data_dir().to_path_buf();
    gw.shutdown().await;
    for id in &last {
        wait_sandbox_processes_gone(id, Duration::from_secs(5)).await;
        assert!(!directories(&data_dir).contains(id), "{id} left behind");
    }
}

both_lanes!(a_matching_create_claims_a_waiting_sandbox_and_the_pool_refills);

/// A crash leaves the waiting sandboxes running and the next gateway puts them back in the
/// pool (same processes); a graceful stop removes them and the next gateway starts new ones.
#[tokio::test(flavor = "multi_thread")]
async fn warm_sandboxes_survive_restarts_without_leaking() {
    let conf = tempfile::tempdir().unwrap();
    let config = web_config(conf.path(), 2);
    let mut gw = SpawnedGateway::start(8, &["--config", &config]).await;
    pool_holds(&gw, 2).await;
    let pooled = hidden(&gw, gw.data_dir()).await;
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    let pids: Vec<Vec<i32>> = pooled.iter().map(|id| sandbox_processes(id)).collect();

    gw.kill().await;
    gw.restart().await;
    pool_holds(&gw, 2).await;
    assert_eq!(
        hidden(&gw, gw.data_dir()).await,
        pooled,
        "the same sandboxes wait again\n{}",
        gw.log()
    );
    let again: Vec<Vec<i32>> = pooled.iter().map(|id| sandbox_processes(id)).collect();
    assert_eq!(pids, again, "re-adopted, not restarted");
    let v = gw.create(&json!({"runtime": "web"})).await;
    let id = v["id"].as_str().unwrap().to_string();
    assert!(pooled.contains(&id), "a re-adopted one is claimed");
    gw.get(&format!("/sandbox/{id}/")).send().await.expect(200);

    pool_holds(&gw, 2).await;
    let waiting_now = hidden(&gw, gw.data_dir()).await;
    assert!(gw.terminate().await.success(), "{}", gw.log());
    for waiting in &waiting_now {
        wait_sandbox_processes_gone(waiting, Duration::from_secs(5)).await;
        assert!(!directories(gw.data_dir()).contains(waiting));
    }

    gw.restart().await;
    pool_holds(&gw, 2).await;
    let fresh = hidden(&gw, gw.data_dir()).await;
    assert_eq!(fresh.len(), 2);
    assert!(
        fresh.is_disjoint(&waiting_now),
        "new sandboxes after a graceful stop"
    );
    // The claimed one is the user's: kept (stopped by the graceful stop), listed.
    assert_eq!(gw.sandbox(&id).await["status"], "stopped");
    assert_eq!(gw.count().await, 1);
    gw.delete_sandbox(&id).await;
    assert!(gw.terminate().await.success(), "{}", gw.log());
    for waiting in &fresh {
        wait_sandbox_processes_gone(waiting, Duration::from_secs(5)).await;
    }
}

/// A pool whose runtime cannot start counts its failures, backs off and leaves nothing
/// behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_that_cannot_start_backs_off_and_leaves_nothing() {
    let gw = TestGateway::builder()
        .config(|c| {
            c.runtimes.insert(
                "broken".into(),
                sandgate::config::RuntimeConfig {
                    program: Some("sh".into()),
                    command: Some("exit 3".into()),
                    image: None,
                    warm: Some(1),
                    ..Default::default()
                },
            );
        })
        .start()
        .await;
    eventually(READY_TIMEOUT, "a fill was tried and failed", || async {
        let failed = series(&gw, "sandgate_warm_pool_fills_total{result=\"failed\"}").await;
        (failed >= Some(1.0)).then_some(())
    })
    .await;
    eventually(
        READY_TIMEOUT,
        "the failed warm sandbox is removed",
        || async { directories(gw.data_dir()).is_empty().then_some(()) },
    )
    .await;
    assert_eq!(gw.count().await, 0);
    assert_eq!(waiting_for(&gw, "broken").await, 0.0);
    gw.shutdown().await;
}

pub(crate) async fn waiting_for(gw: &Client, runtime: &str) -> f64 {
    series(
        gw,
        &format!("sandgate_warm_pool_sandboxes{{runtime=\"{runtime}\",state=\"ready\"}}"),
    )
    .await
    .unwrap_or(0.0)
}

/// Waiting sandboxes hold ports of the range too; a user's create that finds the range full
/// removes one of them instead of failing.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_port_range_makes_room_for_a_user_create() {
    let gw = TestGateway::builder()
        .ports(3)
        .config(|c| {
            c.runtimes.insert("web".into(), web_runtime(2));
        })
        .start()
        .await;
    pool_holds(&gw, 2).await;
    // Its own environment: not served by the pool, so it needs a port of its own.
    let own = |n: &str| json!({"runtime": "web", "env": {"N": n}});
    // Three users' sandboxes take the three ports, whatever the pool holds.
    for n in ["a", "b", "c"] {
        let v = gw.create(&own(n)).await;
        let id = v["id"].as_str().unwrap();
        gw.wait_ready(id).await;
        gw.get(&format!("/sandbox/{id}/")).send().await.expect(200);
    }
    assert_eq!(waiting(&gw).await, 0.0, "the waiting sandboxes made room");
    assert_eq!(gw.count().await, 3);
    // The range is the users' now: the pool cannot refill, and a fourth create is refused.
    gw.post("/sandboxes")
        .json(&own("d"))
        .send()
        .await
        .expect_error(503, "ports_exhausted");
    gw.shutdown().await;
}
