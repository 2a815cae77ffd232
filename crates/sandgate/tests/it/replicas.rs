//! Replicas and load balancing (`replicas: N`, `LOAD_BALANCER_STRATEGY`): a sandbox runs N
//! instances, each its own process and port; the proxy spreads requests over the ready ones
//! by the strategy (round-robin, least-connections, random, sticky by client address); an
//! instance that dies stops receiving traffic without failing an idempotent request, and is
//! restarted; one that is alive but fails its health checks, or whose circuit is open (or
//! on trial), gets no traffic until it recovers; the instances are nobody's to address and follow their
//! sandbox's stop, start and delete, and a gateway restart.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http::StatusCode;
use sandgate::config::Strategy;
use serde_json::{json, Value};

use crate::common::{
    eventually, sandbox_processes, wait_sandbox_processes_gone, Client, Lane, SpawnedGateway,
    TestGateway, TestSandbox, READY_TIMEOUT,
};

/// A gateway on `lane` balancing by `strategy`.
async fn gateway(lane: Lane, strategy: Strategy) -> TestGateway {
    TestGateway::builder()
        .lane(lane)
        .config(move |c| c.load_balancer_strategy = strategy)
        .start()
        .await
}

/// Creates a fixture sandbox of `n` instances and waits until every one is ready.
async fn create_replicated(gw: &Client, n: usize) -> (TestSandbox, Vec<String>) {
    let sb = gw.create_fixture_with("", json!({"replicas": n})).await;
    assert_eq!(sb.view["replicas"], n, "{}", sb.view);
    let ids = all_ready(gw, &sb.id, n).await;
    assert_eq!(ids[0], sb.id, "instance 0 is the sandbox itself");
    (sb, ids)
}

/// Waits until sandbox `id` lists `n` instances, all ready; their ids.
async fn all_ready(gw: &Client, id: &str, n: usize) -> Vec<String> {
    eventually(
        READY_TIMEOUT,
        &format!("{n} instances of {id} are ready"),
        || async {
            let v = gw.sandbox(id).await;
            let instances = v["instances"].as_array()?.clone();
            (instances.len() == n && instances.iter().all(|i| i["ready"] == true)).then(|| {
                instances
                    .iter()
                    .map(|i| i["id"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
        },
    )
    .await
}

/// Which instance answers `GET /whoami` through the sandbox's route, `n` times in a row.
async fn answers(gw: &Client, sb: &TestSandbox, n: usize) -> Vec<String> {
    let mut who = Vec::with_capacity(n);
    for i in 0..n {
        let r = gw.get(&sb.path("/whoami")).send().await;
        if r.status != StatusCode::OK {
            // What the gateway knew of the instances then, for the record.
            let v = gw.sandbox(&sb.id).await;
            panic!(
                "request {i} of {n}: {} {:?} (answered so far: {who:?}); instances: {}",
                r.status,
                r.text(),
                v["instances"]
            );
        }
        who.push(r.text());
    }
    who
}

fn tally(who: &[String]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for w in who {
        *t.entry(w.clone()).or_default() += 1;
    }
    t
}

async fn requests_take_turns_and_instances_are_nobodys(lane: Lane) {
    let gw = gateway(lane, Strategy::RoundRobin).await;
    let (sb, ids) = create_replicated(&gw, 3).await;
    let distinct: BTreeSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 3, "{ids:?}");
    // Each instance its own process and port.
    let ports: BTreeSet<_> = gw.sandbox(&sb.id).await["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["allocated_port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports.len(), 3);
    for id in &ids {
        assert!(!sandbox_processes(id).is_empty(), "instance {id} runs");
    }

    // Round-robin: 30 requests in a row, 10 to each.
    let who = answers(&gw, &sb, 30).await;
    let t = tally(&who);
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(t.values().all(|&n| n == 10), "{t:?}");
    assert!(t.keys().all(|k| ids.contains(k)), "{t:?} {ids:?}");

    // The instances are not sandboxes: not listed, not found, not routed by their ids.
    let listed = gw.list().await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    for other in &ids[1..] {
        gw.get(&format!("/sandboxes/{other}"))
            .send()
            .await
            .expect_error(404, "sandbox_not_found");
        gw.get(&format!("/sandbox/{other}/"))
            .send()
            .await
            .expect_error(404, "sandbox_not_found");
    }
    let health = gw.get("/health/sandboxes").send().await.expect(200).json();
    assert_eq!(health["count"], 1, "{health}");
    assert_eq!(
        health["sandboxes"][0]["instances"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    gw.shutdown().await;
}

async fn least_connections_avoids_the_busy_instance(lane: Lane) {
    let gw = gateway(lane, Strategy::LeastConnections).await;
    let (sb, ids) = create_replicated(&gw, 2).await;
    // A stream held open keeps one instance busy: everything else goes to the other.
    let held = gw.get(&sb.path("/sse-hold")).send_streaming().await;
    assert_eq!(held.status(), StatusCode::OK);
    let busy = eventually(
        READY_TIMEOUT,
        "one instance has a request in flight",
        || async {
            let v = gw.sandbox(&sb.id).await;
            v["instances"]
                .as_array()?
                .iter()
                .find(|i| i["in_flight"] == 1)
                .and_then(|i| i["id"].as_str().map(String::from))
        },
    )
    .await;
    let t = tally(&answers(&gw, &sb, 8).await);
    assert_eq!(t.len(), 1, "{t:?}");
    assert!(
        !t.contains_key(&busy),
        "the busy instance {busy} got requests: {t:?}"
    );
    // Once it ends, both share again (ties take turns).
    drop(held);
    eventually(READY_TIMEOUT, "the held stream ended", || async {
        let v = gw.sandbox(&sb.id).await;
        v["instances"]
            .as_array()?
            .iter()
            .all(|i| i["in_flight"] == 0)
            .then_some(())
    })
    .await;
    let t = tally(&answers(&gw, &sb, 8).await);
    assert_eq!(t.len(), 2, "{t:?} {ids:?}");
    assert!(t.values().all(|&n| n == 4), "{t:?}");
    gw.shutdown().await;
}

async fn random_reaches_every_instance(lane: Lane) {
    let gw = gateway(lane, Strategy::Random).await;
    let (sb, ids) = create_replicated(&gw, 2).await;
    // Each of 60 requests picks uniformly: one instance missing all is a 2^-59 event.
    let t = tally(&answers(&gw, &sb, 60).await);
    assert_eq!(t.len(), 2, "{t:?} {ids:?}");
    gw.shutdown().await;
}

async fn sticky_keeps_each_client_on_one_instance(lane: Lane) {
    let gw = gateway(lane, Strategy::Sticky).await;
    let (sb, ids) = create_replicated(&gw, 3).await;
    let mut homes = BTreeSet::new();
    // 16 client addresses: all on one instance would be a 3^-15 event.
    for n in 2..18 {
        let client = gw.connecting_from(&format!("127.0.0.{n}"));
        let t = tally(&answers(&client, &sb, 4).await);
        assert_eq!(
            t.len(),
            1,
            "client 127.0.0.{n} moved between instances: {t:?}"
        );
        homes.extend(t.into_keys());
    }
    assert!(
        homes.len() >= 2,
        "every client on one instance: {homes:?} of {ids:?}"
    );
    gw.shutdown().await;
}

async fn a_killed_instance_fails_no_idempotent_request(lane: Lane) {
    let gw = gateway(lane, Strategy::RoundRobin).await;
    let (sb, ids) = create_replicated(&gw, 3).await;
    // Pooled upstream connections to every instance.
    answers(&gw, &sb, 9).await;
    let victim = ids[1].clone();
    let killed = sandbox_processes(&victim);
    for &pid in &killed {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // At once, before the gateway has seen the exit: every request is answered, by the others.
    let who = answers(&gw, &sb, 30).await;
    let t = tally(&who);
    assert!(
        !t.contains_key(&victim),
        "the killed instance answered: {t:?}"
    );
    assert_eq!(t.values().sum::<usize>(), 30);
    // It is restarted on its own (after a second: a crash loop backs off), a new process, and
    // gets its share again.
    let again = eventually(READY_TIMEOUT, "the killed instance runs again", || async {
        let pids = sandbox_processes(&victim);
        (!pids.is_empty()).then_some(pids)
    })
    .await;
    assert!(
        again.iter().all(|p| !killed.contains(p)),
        "{again:?} {killed:?}"
    );
    all_ready(&gw, &sb.id, 3).await;
    let t = tally(&answers(&gw, &sb, 30).await);
    assert_eq!(t.get(&victim), Some(&10), "{t:?}");
    gw.shutdown().await;
}

/// Instance `id`'s working directory (its fixture's).
fn workdir(id: &str) -> std::path::PathBuf {
    let pid = *sandbox_processes(id).first().expect("the instance runs");
    std::fs::read_link(format!("/proc/{pid}/cwd")).expect("its working directory")
}

/// Waits until instance `id` of sandbox `sb` has `ready` as the API lists it.
async fn instance_ready_is(gw: &Client, sb: &str, id: &str, ready: bool) {
    eventually(
        READY_TIMEOUT,
        &format!("instance {id} has ready = {ready}"),
        || async {
            let v = gw.sandbox(sb).await;
            let i = v["instances"].as_array()?.iter().find(|i| i["id"] == id)?;
            (i["ready"] == ready).then_some(())
        },
    )
    .await
}

/// An instance whose server runs and answers but fails its health checks (`health_path`
/// answering 500) gets no request until its checks pass again; then it gets its share.
async fn an_instance_failing_its_checks_gets_no_traffic_until_it_recovers(lane: Lane) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(|c| {
            c.load_balancer_strategy = Strategy::RoundRobin;
            c.health_interval = Some(Duration::from_millis(100));
        })
        .start()
        .await;
    let sb = gw
        .create_fixture_with("", json!({"replicas": 2, "health_path": "/healthz"}))
        .await;
    let ids = all_ready(&gw, &sb.id, 2).await;
    let sick = workdir(&ids[1]).join("sick");
    assert_ne!(workdir(&ids[0]), workdir(&ids[1]));
    std::fs::write(&sick, b"").unwrap();
    instance_ready_is(&gw, &sb.id, &ids[1], false).await;
    // Alive: it answers on its own port.
    let port = gw.sandbox(&sb.id).await["instances"][1]["allocated_port"]
        .as_u64()
        .unwrap();
    let direct = crate::common::Req::new(
        std::net::SocketAddr::from(([127, 0, 0, 1], port as u16)),
        http::Method::GET,
        "/whoami",
    )
    .send()
    .await;
    assert_eq!(
        (direct.status, direct.text()),
        (StatusCode::OK, ids[1].clone())
    );
    let t = tally(&answers(&gw, &sb, 10).await);
    assert_eq!(t.get(&ids[0]), Some(&10), "{t:?}");
    // Well again: its share once its checks pass.
    std::fs::remove_file(&sick).unwrap();
    instance_ready_is(&gw, &sb.id, &ids[1], true).await;
    let t = tally(&answers(&gw, &sb, 10).await);
    assert_eq!(t.get(&ids[1]), Some(&5), "{t:?}");
    gw.shutdown().await;
}

/// A round-robin gateway whose circuits open at the first failure for `open`, a sandbox of
/// two instances, and the second one's processes stopped (SIGSTOP: it accepts connections and
/// answers nothing); the returned function signals them (SIGCONT to let them go on).
async fn one_instance_stopped(
    lane: Lane,
    timeout: Duration,
    open: Duration,
) -> (
    TestGateway,
    TestSandbox,
    Vec<String>,
    impl Fn(nix::sys::signal::Signal),
) {
    let gw = TestGateway::builder()
        .lane(lane)
        .config(move |c| {
            c.load_balancer_strategy = Strategy::RoundRobin;
            c.proxy_timeout = timeout;
            c.circuit_failures = 1;
            c.circuit_open = open;
        })
        .start()
        .await;
    let (sb, ids) = create_replicated(&gw, 2).await;
    let stopped = sandbox_processes(&ids[1]);
    let signal = move |s| {
        for &pid in &stopped {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s).unwrap();
        }
    };
    signal(nix::sys::signal::Signal::SIGSTOP);
    (gw, sb, ids, signal)
}

/// An instance that accepts connections but does not answer (its process stopped) times a
/// request out, which opens its circuit (`circuit_failures` 1): then every request goes to
/// the other instance, at once, until the open time is over and a trial finds it answering
/// again (the process continued), which closes the circuit and gives it its share again.
async fn an_instance_with_an_open_circuit_gets_no_traffic_until_it_recovers(lane: Lane) {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    let (gw, sb, ids, signal) = one_instance_stopped(lane, TIMEOUT, Duration::from_secs(4)).await;
    // Taking turns, one of the next two requests goes to the stopped instance and times out.
    let mut timed_out = 0;
    for _ in 0..2 {
        let r = gw.get(&sb.path("/whoami")).send().await;
        match r.status {
            StatusCode::OK => assert_eq!(r.text(), ids[0]),
            _ => {
                r.expect_error(504, "upstream_timeout");
                timed_out += 1;
            }
        }
    }
    assert_eq!(timed_out, 1);
    // Its circuit is open: everything goes to the other instance, none waits for a timeout.
    for i in 0..10 {
        let began = std::time::Instant::now();
        let r = gw.get(&sb.path("/whoami")).send().await;
        r.expect(200);
        assert_eq!(r.text(), ids[0], "request {i}");
        assert!(
            began.elapsed() < TIMEOUT,
            "request {i}: {:?}",
            began.elapsed()
        );
    }
    signal(nix::sys::signal::Signal::SIGCONT);
    // Once the open time is over, a trial reaches it and closes the circuit.
    eventually(READY_TIMEOUT, "the instance answers again", || async {
        let r = gw.get(&sb.path("/whoami")).send().await;
        (r.status == StatusCode::OK && r.text() == ids[1]).then_some(())
    })
    .await;
    let t = tally(&answers(&gw, &sb, 10).await);
    assert_eq!(t.get(&ids[1]), Some(&5), "{t:?}");
    gw.shutdown().await;
}

/// While an instance's half-open trial is under way (its process still stopped, so the
/// trial hangs until the timeout), every other request goes to the other instance: none is
/// sent to the instance on trial only to be refused with `503 circuit_open`.
async fn a_trial_in_flight_leaves_the_other_requests_to_the_others(lane: Lane) {
    use crate::metrics::{scrape, value};
    const TIMEOUT: Duration = Duration::from_secs(3);
    let (gw, sb, ids, signal) =
        one_instance_stopped(lane, TIMEOUT, Duration::from_millis(300)).await;
    let client: Client = (*gw).clone();
    let half_opened = |text: &str| {
        value(text, "sandgate_circuit_transitions_total{to=\"half_open\"}").unwrap_or(0.0)
    };
    // Requests in the background, one after another, until one is the trial (the circuit
    // opened at the first timeout, and its open time passed): it hangs on the stopped
    // process while the ones before it were answered.
    let mut pending = Vec::new();
    eventually(
        READY_TIMEOUT * 2,
        "a trial reaches the stopped instance",
        || {
            let c = client.clone();
            let path = sb.path("/whoami");
            pending.push(tokio::spawn(async move { c.get(&path).try_send().await }));
            let c = client.clone();
            async move { (half_opened(&scrape(&c).await) >= 1.0).then_some(()) }
        },
    )
    .await;
    // The trial is under way: the next requests all go to the other instance, at once.
    for i in 0..10 {
        let r = gw.get(&sb.path("/whoami")).send().await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {:?}", r.body);
        assert_eq!(r.text(), ids[0], "request {i}");
    }
    signal(nix::sys::signal::Signal::SIGCONT);
    for p in pending {
        let _ = p.await;
    }
    gw.shutdown().await;
}

both_lanes!(
    an_instance_failing_its_checks_gets_no_traffic_until_it_recovers,
    an_instance_with_an_open_circuit_gets_no_traffic_until_it_recovers,
    a_trial_in_flight_leaves_the_other_requests_to_the_others,
);

both_lanes!(
    requests_take_turns_and_instances_are_nobodys,
    least_connections_avoids_the_busy_instance,
    random_reaches_every_instance,
    sticky_keeps_each_client_on_one_instance,
    a_killed_instance_fails_no_idempotent_request,
);

#[tokio::test(flavor = "multi_thread")]
async fn instances_follow_their_sandbox_through_stop_start_and_delete() {
    let gw = TestGateway::builder().start().await;
    let (sb, ids) = create_replicated(&gw, 3).await;
    let r = gw.post(&format!("/sandboxes/{}/stop", sb.id)).send().await;
    r.expect(200);
    for id in &ids {
        wait_sandbox_processes_gone(id, Duration::from_secs(10)).await;
    }
    let v = gw.sandbox(&sb.id).await;
    let statuses: Vec<&Value> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["status"])
        .collect();
    assert!(statuses.iter().all(|s| *s == "stopped"), "{v}");
    assert_eq!(v["ready"], false);

    gw.post(&format!("/sandboxes/{}/start", sb.id))
        .send()
        .await
        .expect(200);
    let again = all_ready(&gw, &sb.id, 3).await;
    assert_eq!(again, ids, "the same instances, started again");
    let t = tally(&answers(&gw, &sb, 9).await);
    assert_eq!(t.len(), 3, "{t:?}");

    gw.delete_sandbox(&sb.id).await;
    for id in &ids {
        wait_sandbox_processes_gone(id, Duration::from_secs(10)).await;
    }
    assert!(gw.list().await.is_empty());
    // Nothing of them is left on disk either.
    for id in &ids {
        assert!(
            !gw.data_dir().join("sandboxes").join(id).exists(),
            "instance {id} left its directory"
        );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_asks_for_a_sensible_number_of_replicas() {
    let gw = TestGateway::builder().start().await;
    for bad in [json!(0), json!(17), json!(-1), json!("two")] {
        let r = gw
            .post("/sandboxes")
            .json(&json!({"runtime": "shell", "command": "sleep 100", "replicas": bad}))
            .send()
            .await;
        assert!(
            r.status == StatusCode::BAD_REQUEST || r.status == StatusCode::UNPROCESSABLE_ENTITY,
            "replicas {bad}: {} {}",
            r.status,
            r.text()
        );
    }
    let r = gw
        .post("/sandboxes")
        .json(&json!({"runtime": "shell", "dev_server": false, "replicas": 2}))
        .send()
        .await;
    assert!(r.status.is_client_error(), "{} {}", r.status, r.text());
    assert!(r.text().contains("replicas"), "{}", r.text());
    assert!(gw.list().await.is_empty());
    // A sandbox of one instance lists itself as its only instance.
    let sb = gw.create_fixture().await;
    let v = gw.sandbox(&sb.id).await;
    assert_eq!(v["replicas"], 1);
    assert_eq!(v["instances"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["instances"][0]["id"], sb.id.as_str());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_gateway_readopts_every_instance() {
    let mut gw = SpawnedGateway::start_on(Lane::Fast, 6, &[]).await;
    let (sb, ids) = create_replicated(&gw, 3).await;
    let pids: Vec<Vec<i32>> = ids.iter().map(|id| sandbox_processes(id)).collect();
    gw.kill().await;
    gw.restart().await;
    let again = all_ready(&gw, &sb.id, 3).await;
    assert_eq!(again, ids);
    let now: Vec<Vec<i32>> = ids.iter().map(|id| sandbox_processes(id)).collect();
    assert_eq!(now, pids, "the same processes, re-adopted");
    let t = tally(&answers(&gw, &sb, 9).await);
    assert_eq!(t.len(), 3, "{t:?}");

    // A clean stop stops every instance; the next start finds them stopped.
    assert!(gw.terminate().await.success(), "{}", gw.log());
    for id in &ids {
        wait_sandbox_processes_gone(id, Duration::from_secs(10)).await;
    }
    gw.restart().await;
    let v = gw.sandbox(&sb.id).await;
    let instances = v["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 3, "{v}");
    assert!(instances.iter().all(|i| i["status"] == "stopped"), "{v}");
    gw.delete_sandbox(&sb.id).await;
    assert!(gw.list().await.is_empty());
    assert!(gw.terminate().await.success(), "{}", gw.log());
}
