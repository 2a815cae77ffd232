//! Warm-pool runtimes on the kubernetes backend against the fake's pool and claim controller
//! (`common::fake_kube::claims`): a create claims a pre-warmed Sandbox through a
//! `SandboxClaim` (v1beta1 and v1alpha1 shapes), unclaimed pool members are never listed nor
//! routed, the claimed one is exec'd in, stopped, started and deleted with its claim, a
//! restarted gateway re-adopts it, an empty pool's claim gets a cold Sandbox, a pool that
//! cannot supply fails the create at once and a claim nobody answers after the start wait,
//! leaving no claim.

use axum::http::Method;
use sandgate::config::RuntimeConfig;
use serde_json::{json, Value};

use super::{gateway, pod, sandbox, until, SEEN};
use crate::common::fake_kube::FakeKube;
use crate::common::{eventually, Lane, SpawnedGateway, TestGateway};

const NS: &str = "default";

/// A runtime claiming from `pool`.
fn pooled(pool: &str) -> RuntimeConfig {
    RuntimeConfig {
        warm_pool: Some(pool.into()),
        ..Default::default()
    }
}

/// Applies Sandbox `marker` and waits until it is routed: the watch has then delivered
/// everything before it, pool members included.
async fn watch_caught_up(gw: &crate::common::Client, fake: &FakeKube, marker: &str) {
    fake.apply(sandbox(marker, Some("ops")));
    until_client(gw, &format!("/ops/{marker}/"), 200).await;
}

/// No pool member of `pool` in the listing nor in the routes.
async fn pool_hidden(gw: &crate::common::Client, fake: &FakeKube, pool: &str) {
    let members = fake.pool_members(NS, pool);
    assert!(!members.is_empty(), "the pool has members to hide");
    let listed = gw.list().await;
    for m in &members {
        assert!(
            listed
                .iter()
                .all(|s| s["name"] != m.as_str() && s["service"] != m.as_str()),
            "pool member {m} is listed: {listed:?}"
        );
        gw.get(&format!("/default/{m}/"))
            .send()
            .await
            .expect_error(404, "not_found");
    }
}

async fn claims_on(versions: &[&'static str], lane: Lane) {
    let fake = FakeKube::start(versions).await;
    let pod = pod().await;
    fake.add_pool(NS, "py", 2);
    let gw = gateway(&fake, pod)
        .lane(lane)
        .config(|c| {
            c.runtimes.insert("pooled".into(), pooled("py"));
        })
        .start()
        .await;
    watch_caught_up(&gw, &fake, "m1").await;
    pool_hidden(&gw, &fake, "py").await;
    let before = fake.pool_members(NS, "py");

    let asked = std::time::Instant::now();
    let created = gw
        .create(
            &json!({"runtime": "pooled", "dev_server": true, "command": "serve",
            "name": "warm", "owner": "dave"}),
        )
        .await;
    eprintln!(
        "a create claimed a warm Sandbox in {:?} ({})",
        asked.elapsed(),
        versions[0]
    );
    assert_eq!(created["status"], "running", "{created}");
    let id = created["id"].as_str().expect("an id").to_string();
    let resource = created["service"].as_str().expect("a service").to_string();
    assert!(before.contains(&resource), "{resource} not from {before:?}");

    // The claim: named by the id, labelled, on the pool in the served version's shape.
    let claim = fake.claim(NS, &id).expect("a SandboxClaim named by the id");
    assert_eq!(claim["metadata"]["labels"]["user"], "dave");
    assert_eq!(claim["metadata"]["labels"]["sandgate.dev/sandbox"], id);
    if versions[0] == "v1beta1" {
        assert_eq!(claim["spec"]["warmPoolRef"]["name"], "py", "{claim}");
    } else {
        assert_eq!(claim["spec"]["warmpool"], "py", "{claim}");
        assert_eq!(claim["spec"]["sandboxTemplateRef"]["name"], "py-template");
    }
    assert_eq!(claim["status"]["sandbox"]["name"], resource);
    // The claimed Sandbox: the claim's, labelled as the gateway's; the pool refilled.
    let obj = fake.get(NS, &resource).expect("the claimed Sandbox");
    assert_eq!(
        obj["metadata"]["ownerReferences"][0]["kind"],
        "SandboxClaim"
    );
    assert_eq!(obj["metadata"]["ownerReferences"][0]["name"], id);
    assert_eq!(obj["metadata"]["labels"]["user"], "dave");
    assert_eq!(obj["metadata"]["labels"]["sandgate.dev/sandbox"], id);
    assert_eq!(obj["metadata"]["annotations"]["sandgate.dev/name"], "warm");
    assert_eq!(fake.pool_members(NS, "py").len(), 2);
    assert!(!fake.pool_members(NS, "py").contains(&resource));

    let r = until(&gw, Method::GET, "/dave/warm/hello", 200).await;
    assert_eq!(r.json()["path"], "/hello");
    until(&gw, Method::GET, &format!("/sandbox/{id}/hello"), 200).await;
    // Listed once, with its owner and name; the refilled pool's members still hidden.
    watch_caught_up(&gw, &fake, "m2").await;
    let listed = gw.list().await;
    let mine: Vec<&Value> = listed.iter().filter(|s| s["id"] == id.as_str()).collect();
    assert_eq!(mine.len(), 1, "{listed:?}");
    assert_eq!(mine[0]["owner"], "dave");
    assert_eq!(mine[0]["name"], "warm");
    assert_eq!(
        listed.len(),
        3,
        "two markers and the claimed one: {listed:?}"
    );
    pool_hidden(&gw, &fake, "py").await;

    // Exec runs in the claimed Sandbox's pod.
    let r = gw.exec(&id, &json!({"command": "echo in-pod"})).await;
    assert_eq!(r["stdout"], "in-pod\n", "{r}");

    // Stop and start patch the claimed Sandbox.
    let suspended =
        |o: &Value| o["spec"]["operatingMode"] == "Suspended" || o["spec"]["replicas"] == 0;
    let stopped = gw.post(&format!("/sandboxes/{id}/stop")).send().await;
    assert_eq!(stopped.expect(200).json()["status"], "stopped");
    assert!(suspended(
        &fake.get(NS, &resource).expect("kept while stopped")
    ));
    let started = gw.post(&format!("/sandboxes/{id}/start")).send().await;
    assert_eq!(started.expect(200).json()["status"], "running");
    assert!(!suspended(&fake.get(NS, &resource).expect("the Sandbox")));
    until(&gw, Method::GET, "/dave/warm/", 200).await;

    // Delete: the claim goes, and the Sandbox with it; the pool is untouched. The watch
    // delivers the delete's own events (its stop's patch, then the deletion) only after the
    // gateway has forgotten the record: the late patch does not bring it back as a
    // discovered sandbox.
    fake.hold_watch();
    gw.delete(&format!("/sandboxes/{id}"))
        .send()
        .await
        .expect(200);
    assert!(fake.claim(NS, &id).is_none(), "{:?}", fake.claim_names());
    assert!(fake.get(NS, &resource).is_none(), "{:?}", fake.names());
    until(&gw, Method::GET, "/dave/warm/", 404).await;
    fake.release_watch();
    watch_caught_up(&gw, &fake, "m3").await;
    gw.get("/dave/warm/")
        .send()
        .await
        .expect_error(404, "not_found");
    assert!(gw.list().await.iter().all(|s| s["id"] != id.as_str()));
    assert_eq!(fake.pool_members(NS, "py").len(), 2);
    pool_hidden(&gw, &fake, "py").await;

    // A member deleted with kubectl is replaced; the replacement is hidden too.
    let gone = fake.pool_members(NS, "py")[0].clone();
    fake.remove(NS, &gone);
    let members = fake.pool_members(NS, "py");
    assert!(
        members.len() == 2 && !members.contains(&gone),
        "{members:?}"
    );
    watch_caught_up(&gw, &fake, "m4").await;
    pool_hidden(&gw, &fake, "py").await;
    assert_eq!(gw.list().await.len(), 4, "the four markers only");
}

async fn warm_pool_claims(lane: Lane) {
    claims_on(&["v1beta1", "v1alpha1"], lane).await;
}

both_lanes!(warm_pool_claims);

#[tokio::test(flavor = "multi_thread")]
async fn warm_pool_claims_v1alpha1_only() {
    claims_on(&["v1alpha1"], Lane::Hyper).await;
}

/// A missing pool is a 400 before anything is made; a pool that cannot supply (empty, its
/// template missing) fails the create at once with the controller's reason, leaving no claim
/// and no record.
#[tokio::test(flavor = "multi_thread")]
async fn pools_that_cannot_supply_fail_the_create() {
    let fake = FakeKube::start(&["v1beta1", "v1alpha1"]).await;
    let pod = pod().await;
    fake.add_pool(NS, "small", 1);
    let gw: TestGateway = gateway(&fake, pod)
        .config(|c| {
            c.runtimes.insert("small".into(), pooled("small"));
            c.runtimes.insert("nowhere".into(), pooled("nope"));
        })
        .start()
        .await;
    let body = |runtime: &str| json!({"runtime": runtime, "dev_server": true, "command": "x"});

    let r = gw.post("/sandboxes").json(&body("nowhere")).send().await;
    r.expect_error(400, "bad_request");
    let message = r.json()["error"]["message"].clone();
    let message = message.as_str().unwrap_or_default();
    assert!(
        message.contains("SandboxWarmPool \"nope\" not found"),
        "{message}"
    );
    assert!(fake.claim_names().is_empty(), "{:?}", fake.claim_names());

    // The only member is claimed, and the pool can make no more.
    fake.set_pool_supply(false);
    let first = gw.create(&body("small")).await;
    assert_eq!(first["status"], "running", "{first}");
    assert!(fake.pool_members(NS, "small").is_empty());
    let asked = std::time::Instant::now();
    let r = gw.post("/sandboxes").json(&body("small")).send().await;
    r.expect_error(500, "start_failed");
    assert!(r.text().contains("TemplateNotFound"), "{}", r.text());
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(10),
        "failed at once, not after the start wait: {:?}",
        asked.elapsed()
    );
    let first_id = first["id"].as_str().expect("an id");
    assert_eq!(fake.claim_names(), vec![first_id.to_string()]);
    let listed = gw.list().await;
    assert_eq!(listed.len(), 1, "{listed:?}");

    // Supplied again: the next create gets one.
    fake.set_pool_supply(true);
    let again = gw.create(&body("small")).await;
    assert_eq!(again["status"], "running", "{again}");
}

/// A gateway killed and restarted on the same data directory (the real binary) re-adopts
/// the claimed Sandbox: same id, running, routed; the pool's members still hidden.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_gateway_readopts_a_claimed_sandbox() {
    let fake = FakeKube::start(&["v1beta1", "v1alpha1"]).await;
    let pod = pod().await;
    fake.add_pool(NS, "py", 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("sandgate.toml");
    std::fs::write(
        &config,
        format!(
            "backend = \"kubernetes\"\n[runtimes.pooled]\nwarm_pool = \"py\"\n\
             [kubernetes]\nkubeconfig = \"{}\"\nport = {}\n",
            fake.kubeconfig.display(),
            pod.port()
        ),
    )
    .expect("config");
    let config = config.display().to_string();
    let mut gw = SpawnedGateway::start(1, &["--config", &config]).await;
    let created = gw
        .create(
            &json!({"runtime": "pooled", "dev_server": true, "command": "x",
            "name": "kept", "owner": "erin"}),
        )
        .await;
    let id = created["id"].as_str().expect("an id").to_string();
    until_client(&gw, "/erin/kept/", 200).await;

    gw.kill().await;
    gw.restart().await;
    until_client(&gw, "/erin/kept/", 200).await;
    watch_caught_up(&gw, &fake, "m1").await;
    let listed = gw.list().await;
    let kept: Vec<&Value> = listed.iter().filter(|s| s["name"] == "kept").collect();
    assert_eq!(kept.len(), 1, "{listed:?}");
    assert_eq!(kept[0]["id"], id.as_str());
    assert_eq!(kept[0]["status"], "running");
    assert_eq!(kept[0]["owner"], "erin");
    pool_hidden(&gw, &fake, "py").await;
    gw.delete(&format!("/sandboxes/{id}"))
        .send()
        .await
        .expect(200);
    assert!(fake.claim_names().is_empty(), "{:?}", fake.claim_names());
}

/// A claimed Sandbox deleted with `kubectl`: the record goes and so does its claim, so the
/// claim controller's replacement (which nobody would see: claimed by a gateway, never
/// labelled) is not left running; the pool refills.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_delete_of_a_claimed_sandbox_releases_its_claim() {
    let fake = FakeKube::start(&["v1beta1"]).await;
    let pod = pod().await;
    fake.add_pool(NS, "py", 1);
    let gw = gateway(&fake, pod)
        .config(|c| {
            c.runtimes.insert("pooled".into(), pooled("py"));
        })
        .start()
        .await;
    let created = gw
        .create(
            &json!({"runtime": "pooled", "dev_server": true, "command": "x",
            "name": "doomed", "owner": "gina"}),
        )
        .await;
    let id = created["id"].as_str().expect("an id").to_string();
    until(&gw, Method::GET, "/gina/doomed/", 200).await;
    let claimed = fake.claimed(NS, &id);
    assert_eq!(claimed.len(), 1, "{claimed:?}");

    fake.remove(NS, &claimed[0]);
    until(&gw, Method::GET, "/gina/doomed/", 404).await;
    eventually(
        SEEN,
        "the claim and its replacement Sandbox are gone",
        || async {
            (fake.claim_names().is_empty() && fake.claimed(NS, &id).is_empty()).then_some(())
        },
    )
    .await;
    assert!(gw.list().await.iter().all(|s| s["id"] != id.as_str()));
    assert_eq!(fake.pool_members(NS, "py").len(), 1, "the pool refilled");
    assert_eq!(
        fake.names().len(),
        1,
        "nothing else is left: {:?}",
        fake.names()
    );
}

/// `until` for any client (the real binary's).
async fn until_client(gw: &crate::common::Client, path: &str, status: u16) {
    eventually(SEEN, &format!("GET {path} answers {status}"), || async {
        let r = gw.get(path).try_send().await.ok()?;
        (r.status.as_u16() == status).then_some(())
    })
    .await;
}

/// A pool with nothing waiting still serves a claim: its controller makes a cold Sandbox
/// named after the claim (the sandbox id), which is the sandbox's like an adopted one.
#[tokio::test(flavor = "multi_thread")]
async fn an_empty_pool_gives_a_cold_sandbox() {
    let fake = FakeKube::start(&["v1beta1", "v1alpha1"]).await;
    let pod = pod().await;
    fake.add_pool(NS, "empty", 0);
    let gw = gateway(&fake, pod)
        .config(|c| {
            c.runtimes.insert("cold".into(), pooled("empty"));
        })
        .start()
        .await;
    let created = gw
        .create(
            &json!({"runtime": "cold", "dev_server": true, "command": "x",
            "name": "chilly", "owner": "finn"}),
        )
        .await;
    assert_eq!(created["status"], "running", "{created}");
    let id = created["id"].as_str().expect("an id").to_string();
    assert_eq!(
        created["service"],
        id.as_str(),
        "a cold Sandbox is named after its claim"
    );
    let obj = fake.get(NS, &id).expect("the cold Sandbox");
    assert_eq!(
        obj["metadata"]["ownerReferences"][0]["kind"],
        "SandboxClaim"
    );
    assert_eq!(obj["metadata"]["labels"]["user"], "finn");
    until(&gw, Method::GET, "/finn/chilly/", 200).await;
    gw.delete(&format!("/sandboxes/{id}"))
        .send()
        .await
        .expect(200);
    assert!(fake.claim_names().is_empty(), "{:?}", fake.claim_names());
    assert!(fake.names().is_empty(), "{:?}", fake.names());
    until(&gw, Method::GET, "/finn/chilly/", 404).await;
}

/// With the claim controller not answering (no status at all), a create gives up after the
/// start wait (20 s) with a clear error instead of hanging, and deletes its claim.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_nobody_answers_fails_after_the_start_wait() {
    let fake = FakeKube::start(&["v1beta1", "v1alpha1"]).await;
    let pod = pod().await;
    fake.add_pool(NS, "py", 1);
    fake.set_claims_held(true);
    let gw = gateway(&fake, pod)
        .config(|c| {
            c.runtimes.insert("pooled".into(), pooled("py"));
        })
        .start()
        .await;
    let asked = std::time::Instant::now();
    let r = gw
        .post("/sandboxes")
        .json(&json!({"runtime": "pooled", "dev_server": true, "command": "x"}))
        .send()
        .await;
    let took = asked.elapsed();
    r.expect_error(500, "start_failed");
    let message = r.json()["error"]["message"].clone();
    let message = message.as_str().unwrap_or_default();
    assert!(
        message.contains("handed over no Sandbox within 20s"),
        "{message}"
    );
    assert!(
        took >= std::time::Duration::from_secs(20) && took < std::time::Duration::from_secs(40),
        "bounded by the start wait: {took:?}"
    );
    assert!(fake.claim_names().is_empty(), "{:?}", fake.claim_names());
    assert_eq!(fake.pool_members(NS, "py").len(), 1, "the pool untouched");
    assert!(gw.list().await.is_empty());
}
