//! Stateless replicas (issue 18 item 4): two real gateway processes on one PostgreSQL store
//! behave as one. A sandbox created through one is routed by the other within a second; a key
//! created through one works on the other and, revoked, is refused there within a second;
//! exactly one holds the lease on background duties (`/health` `leader`) and runs the idle
//! reaper, counting use through the other; when it is killed the other takes the lease
//! within a few seconds, serves on and lists every record; and the same the other way round.
//! On the Docker backend, two replicas share one engine's containers the same way.
//!
//! The PostgreSQL server is a throwaway one the test starts (`common::postgres`); without
//! PostgreSQL installed the test prints `SKIPPED:`, except under `CI=true`, where it fails.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::StatusCode;
use serde_json::json;

use crate::common::postgres::PgServer;
use crate::common::{eventually, Client, SpawnedGateway, READY_TIMEOUT};

/// How soon a change made through one replica must be in force on the other.
const PROPAGATION: Duration = Duration::from_secs(1);

/// Polls `ok` (at most [`READY_TIMEOUT`]) and returns how long it took to hold.
async fn time_until<F, Fut>(what: &str, mut ok: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let began = Instant::now();
    eventually(READY_TIMEOUT, what, || {
        let done = ok();
        async move { done.await.then_some(()) }
    })
    .await;
    began.elapsed()
}

/// Two gateway processes (A started first, so A leads) sharing the store at `url`, both
/// configured by `config` (TOML), which lives as long as the returned directory.
pub(crate) async fn two_replicas(
    config: &str,
    url: &str,
) -> (SpawnedGateway, SpawnedGateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sandgate.toml");
    std::fs::write(&path, config).expect("config");
    let args = [
        "--config",
        path.to_str().expect("utf-8"),
        "--database-url",
        url,
    ];
    let a = SpawnedGateway::start(2, &args).await;
    let b = SpawnedGateway::start(2, &args).await;
    (a, b, dir)
}

async fn leader(gw: &Client) -> bool {
    let v = gw.get("/health").send().await.expect(200).json();
    v["leader"].as_bool().expect("/health reports `leader`")
}

#[tokio::test]
async fn two_gateways_on_one_postgres_behave_as_one() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("replicas");
    let args = ["--database-url", &url, "--auth-enabled", "true"];
    let mut a = SpawnedGateway::start(4, &args).await;
    // The first gateway made the owner key (in the shared store) and wrote it to its data
    // directory; the second found it there.
    let admin = std::fs::read_to_string(a.data_dir().join("admin.key")).expect("admin.key");
    let admin = admin.trim();
    let b = SpawnedGateway::start(4, &args).await;
    assert!(
        !b.data_dir().join("admin.key").exists(),
        "the second gateway made an owner key of its own"
    );
    let (ca, cb) = (a.with_key(admin), b.with_key(admin));

    // Exactly one runs the background duties: the first one up.
    assert!(leader(&ca).await, "{}", a.log());
    assert!(!leader(&cb).await, "{}", b.log());

    // A sandbox created through A is routed by B within a second of A's answer.
    let sb = ca
        .create_program("", &crate::common::fixture_program(), json!({}))
        .await;
    let path = sb.path("/");
    let routed = time_until("B routes the sandbox A created", || async {
        let r = cb.get(&path).try_send().await;
        r.is_ok_and(|r| r.status != StatusCode::NOT_FOUND)
    })
    .await;
    assert!(routed < PROPAGATION, "B routed it after {routed:?}");
    cb.wait_ready(&sb.id).await;

    // A key created through A works on B; revoked through A, B refuses it within a second.
    let r = ca
        .post("/auth/keys")
        .json(&json!({"name": "replicated", "role": "member"}))
        .send()
        .await;
    r.expect(201);
    let v = r.json();
    let (key, key_id) = (
        v["key"].as_str().expect("key").to_string(),
        v["id"].as_str().expect("id").to_string(),
    );
    let member = b.with_key(&key);
    let accepted = time_until("B accepts the key A created", || async {
        member
            .get("/sandboxes")
            .try_send()
            .await
            .is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await;
    assert!(accepted < PROPAGATION, "B accepted it after {accepted:?}");
    member.get(&path).send().await.expect(200);
    ca.delete(&format!("/auth/keys/{key_id}"))
        .send()
        .await
        .expect(200);
    let refused = time_until("B refuses the key A revoked", || async {
        member
            .get("/sandboxes")
            .try_send()
            .await
            .is_ok_and(|r| r.status == StatusCode::UNAUTHORIZED)
    })
    .await;
    assert!(refused < PROPAGATION, "B refused it after {refused:?}");
    member.get(&path).send().await.expect(401);

    // Idle reaping: only the leader (A) reaps, and it counts use through B. 40 events 200 ms
    // apart streamed through B are 8 s of steady use: longer than the reaper's longest wait
    // (5 s, until it first sees this sandbox's 1 s timeout) plus that timeout, so it looks
    // while the stream runs, and must not reap.
    let idle = ca
        .create_fixture_with("", json!({"idle_timeout": 1, "mode": "persistent"}))
        .await;
    let resp = cb
        .get(&idle.path("/sse?events=40&interval_ms=200"))
        .send_streaming()
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(15), resp.into_body().collect())
        .await
        .expect("the stream ends within 15 s")
        .unwrap_or_else(|e| {
            panic!(
                "the stream broke ({e}): reaped?\nA:\n{}\nB:\n{}",
                a.log(),
                b.log()
            )
        });
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    assert_eq!(
        text.matches("data: event-").count(),
        40,
        "the leader reaped a sandbox in use through the other replica: {text:?}"
    );
    // Unused now: the leader stops it, and B sees that (`GET /sandboxes` is no use of any
    // one sandbox, so polling it does not keep this one alive).
    eventually(
        READY_TIMEOUT,
        "the leader stops the idle sandbox",
        || async {
            cb.list()
                .await
                .iter()
                .any(|s| s["id"] == idle.id.as_str() && s["status"] == "stopped")
                .then_some(())
        },
    )
    .await;
    assert!(
        a.log().contains("reaping idle sandbox") && !b.log().contains("reaping idle sandbox"),
        "the reaper ran elsewhere than on the leader\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );

    // A sandbox created through B, while A is still up.
    let sb2 = cb.create_fixture().await;

    // SIGKILL of the leader: B takes the lease within a few seconds and serves on.
    a.kill().await;
    let took = time_until("B takes the lease", || async { leader(&cb).await }).await;
    assert!(
        took < Duration::from_secs(5),
        "B took the lease after {took:?}"
    );
    cb.get(&path).send().await.expect(200);
    cb.get(&sb2.path("/")).send().await.expect(200);
    // Nothing was lost: both records are listed, and both sandboxes still run.
    let listed = cb.list().await;
    for id in [&sb.id, &sb2.id, &idle.id] {
        assert!(listed.iter().any(|s| s["id"] == id.as_str()), "{listed:?}");
    }
    for id in [&sb.id, &sb2.id] {
        let v = cb.sandbox(id).await;
        assert_eq!(v["status"], "running", "{v}\n{}", b.log());
    }
    // And it still creates sandboxes.
    let sb3 = cb.create_fixture().await;

    // A comes back as a follower (its routes read from the store at start), then B is
    // killed in turn: A takes the lease and serves everything, B's sandboxes included.
    a.restart().await;
    let ca = a.with_key(admin);
    assert!(!leader(&ca).await, "{}", a.log());
    for s in [&sb, &sb2, &sb3] {
        ca.get(&s.path("/")).send().await.expect(200);
    }
    let mut b = b;
    b.kill().await;
    eventually(Duration::from_secs(5), "A takes the lease back", || async {
        leader(&ca).await.then_some(())
    })
    .await;
    for s in [&sb, &sb2, &sb3] {
        ca.get(&s.path("/")).send().await.expect(200);
        assert_eq!(ca.sandbox(&s.id).await["status"], "running");
    }
    eprintln!(
        "replicas: routed after {routed:?}, key accepted after {accepted:?}, refused after \
         {refused:?}, lease taken {took:?} after the leader was killed"
    );
}

/// Every connection the gateways hold is cut (as a database restart or a network blip
/// would): each reconnects its listener and resyncs, and the lease is held again by exactly
/// one of them.
#[tokio::test]
async fn lost_connections_are_reconnected_and_resynced() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("blip");
    let a = SpawnedGateway::start(2, &["--database-url", &url]).await;
    let b = SpawnedGateway::start(2, &["--database-url", &url]).await;
    assert!(leader(&a).await && !leader(&b).await);
    server.sql(
        "blip",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    );
    // Created through A (its pool replaces the dead connections), routed by B once its
    // listener is back (the notification, or the resync every reconnect makes).
    let sb = a.create_fixture().await;
    b.wait_ready(&sb.id).await;
    for gw in [&a, &b] {
        assert!(
            gw.log().contains("change listener lost its connection"),
            "{}",
            gw.log()
        );
    }
    eventually(
        Duration::from_secs(10),
        "exactly one gateway holds the lease again",
        || async { (leader(&a).await != leader(&b).await).then_some(()) },
    )
    .await;
    // And the feed works again: a delete through B is seen by A.
    b.delete_sandbox(&sb.id).await;
    eventually(
        READY_TIMEOUT,
        "A drops the deleted sandbox's route",
        || async {
            let r = a.get(&sb.path("/")).try_send().await.ok()?;
            (r.status == StatusCode::NOT_FOUND).then_some(())
        },
    )
    .await;
}

/// Two gateways starting at the same moment on an empty database: one owner key exists
/// between them, written to exactly one data directory, and it works on both.
#[tokio::test]
async fn gateways_starting_together_make_one_owner_key() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("together");
    let args = ["--database-url", &url, "--auth-enabled", "true"];
    let (a, b) = tokio::join!(
        SpawnedGateway::start(2, &args),
        SpawnedGateway::start(2, &args)
    );
    let written: Vec<String> = [&a, &b]
        .iter()
        .filter_map(|gw| std::fs::read_to_string(gw.data_dir().join("admin.key")).ok())
        .collect();
    assert_eq!(written.len(), 1, "owner keys written: {written:?}");
    let key = written[0].trim();
    for gw in [&a, &b] {
        eventually(READY_TIMEOUT, "the owner key works on both", || async {
            let r = gw.with_key(key).get("/sandboxes").try_send().await.ok()?;
            (r.status == StatusCode::OK).then_some(())
        })
        .await;
    }
}

/// The Docker backend behind two replicas on one engine: a container created through A is
/// routed, run in, stopped and started through B; killed, A leaves it running, B (taking the
/// lease) keeps routing it and deletes it; the engine keeps nothing of either gateway.
#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_on_one_postgres_share_docker_sandboxes() {
    use crate::docker::{engine_with_images, gateway_id_of, inspect, netns_or_skip, running};
    use sandgate::backend::docker::container_name;
    let Some(docker) = engine_with_images().await else {
        return;
    };
    if !netns_or_skip() {
        return;
    }
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("replicas_docker");
    let (mut a, b, _config) = two_replicas(
        &format!(
            "backend = \"docker\"\nstop_grace = 2\n[runtimes.shell]\nimage = \"{}\"\n",
            crate::docker::TEST_IMAGE
        ),
        &url,
    )
    .await;
    let leftovers = crate::docker::Leftovers::default();
    leftovers.gateway(&gateway_id_of(a.data_dir()));
    leftovers.gateway(&gateway_id_of(b.data_dir()));

    let id = a
        .create(&json!({"runtime": "shell", "command": "exec /sandgate-fixture"}))
        .await["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let path = format!("/sandbox/{id}/");
    let routed = time_until("B routes the container A created", || async {
        let r = b.get(&path).try_send().await;
        r.is_ok_and(|r| r.status == StatusCode::OK)
    })
    .await;
    let r = b.exec(&id, &json!({"command": "echo through-b"})).await;
    assert_eq!(r["stdout"], "through-b\n", "{r}");

    // Stopped through B, started through A: one container, one record.
    let container = inspect(&docker, &container_name(&id))
        .await
        .expect("the container");
    b.post(&format!("/sandboxes/{id}/stop"))
        .send()
        .await
        .expect(200);
    assert!(!running(
        &inspect(&docker, &container_name(&id)).await.expect("kept")
    ));
    assert_eq!(a.sandbox(&id).await["status"], "stopped");
    a.post(&format!("/sandboxes/{id}/start"))
        .send()
        .await
        .expect(200);
    b.wait_ready(&id).await;
    b.get(&path).send().await.expect(200);

    // A dies: its container runs on, B takes the lease, routes and deletes it.
    a.kill().await;
    eventually(Duration::from_secs(5), "B takes the lease", || async {
        leader(&b).await.then_some(())
    })
    .await;
    let after = inspect(&docker, &container_name(&id)).await.expect("kept");
    assert!(
        running(&after) && after.id == container.id,
        "the same container runs"
    );
    b.get(&path).send().await.expect(200);
    assert_eq!(b.sandbox(&id).await["status"], "running", "{}", b.log());
    b.delete(&format!("/sandboxes/{id}"))
        .send()
        .await
        .expect(200);
    assert!(
        inspect(&docker, &container_name(&id)).await.is_none(),
        "removed"
    );
    eprintln!("docker replicas: B routed A's container after {routed:?}");
}

/// A follower's sandbox outlives the follower's SIGKILL, but then nothing watches it: when
/// it ends, the lease holder's sweep (every `lifecycle::SWEEP_ENDED`, confirmed at the next)
/// records the exit, so it is not `running` for ever, and a start brings it back.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_followers_sandbox_that_ends_is_recorded_by_the_leader() {
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("replicas_ended");
    let (a, mut b, _config) = two_replicas("", &url).await;
    assert!(leader(&a).await && !leader(&b).await);
    let sb = b.create_fixture().await;
    b.wait_ready(&sb.id).await;
    b.kill().await;
    a.get(&sb.path("/")).send().await.expect(200);

    let pids = crate::common::sandbox_processes(&sb.id);
    assert!(!pids.is_empty(), "the sandbox outlived its gateway");
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let killed = Instant::now();
    eventually(
        sandgate::lifecycle::SWEEP_ENDED * 4,
        "the leader records the exit",
        || async { (a.sandbox(&sb.id).await["status"] != "running").then_some(()) },
    )
    .await;
    let noticed = killed.elapsed();
    let v = a.sandbox(&sb.id).await;
    assert_eq!(v["status"], "stopped", "{v}\n{}", a.log());
    assert!(
        noticed < sandgate::lifecycle::SWEEP_ENDED * 3,
        "noticed after {noticed:?}"
    );
    a.post(&format!("/sandboxes/{}/start", sb.id))
        .send()
        .await
        .expect(200);
    a.wait_ready(&sb.id).await;
    a.get(&sb.path("/")).send().await.expect(200);
    // Deleted here: on a shared store A's graceful stop leaves its sandboxes to the other
    // replicas, and the test's safety net knows only the first incarnation's processes.
    a.delete_sandbox(&sb.id).await;
    assert!(
        crate::common::sandbox_processes(&sb.id).is_empty(),
        "the sandbox's processes outlived its deletion"
    );
    eprintln!("a dead follower's ended sandbox was recorded after {noticed:?}");
}
