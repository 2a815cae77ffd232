//! The kubernetes backend against the fake API server (`common::fake_kube`; no real cluster
//! can be installed here): discovery of `kubectl`-made Sandboxes and their routes, readiness
//! (503 `sandbox_not_ready`), create/stop/start/delete through the API on v1beta1 and
//! v1alpha1, a watch restarted by `410 Gone`, and an API-server outage during which the last
//! known routes keep serving; any port of the pod through the host route; several watched
//! namespaces; commands and terminals through pod exec (in the container kubectl would pick),
//! logs through the pod's log; two gateway replicas on one PostgreSQL store. The pods are one HTTP fixture on 127.0.0.1 (every Sandbox's pod IP in the fake), so
//! the proxy really forwards.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, Uri};
use sandgate::config::BackendKind;
use serde_json::{json, Value};

use crate::common::fake_kube::FakeKube;
use crate::common::{eventually, GatewayBuilder, Lane, TestGateway};

mod claims;

/// Within this, a change in the cluster shows in the gateway (the issue asks for a second;
/// the bound leaves room for a loaded machine).
const SEEN: Duration = Duration::from_secs(5);

/// The "pod": answers every request with what it received.
async fn pod() -> SocketAddr {
    let app = axum::Router::new().fallback(|method: Method, uri: Uri, body: Bytes| async move {
        axum::Json(
            json!({"pod": true, "method": method.as_str(), "path": uri.path(),
            "body": String::from_utf8_lossy(&body)}),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn gateway(fake: &FakeKube, pod: SocketAddr) -> GatewayBuilder {
    let kubeconfig = fake.kubeconfig.clone();
    TestGateway::builder().config(move |c| {
        c.backend = BackendKind::Kubernetes;
        c.kubernetes.kubeconfig = Some(kubeconfig);
        c.kubernetes.port = pod.port();
        c.kubernetes.resync = Duration::from_secs(30);
    })
}

/// A Sandbox as `kubectl apply` sends it (agent-sandbox's sample, with a `user` label).
fn sandbox(name: &str, user: Option<&str>) -> Value {
    let mut obj = json!({
        "apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
        "metadata": {"name": name, "namespace": "default", "labels": {}},
        "spec": {"podTemplate": {"spec": {"containers": [
            {"name": "python", "image": "python:3-slim", "ports": [{"containerPort": 8888}]}]}},
            "operatingMode": "Running"},
    });
    if let Some(user) = user {
        obj["metadata"]["labels"]["user"] = json!(user);
    }
    obj
}

/// Waits until `path` answers `status`, returning the answer.
async fn until(gw: &TestGateway, method: Method, path: &str, status: u16) -> crate::common::Reply {
    eventually(SEEN, &format!("{method} {path} answers {status}"), || {
        let req = gw
            .req(method.clone(), path)
            .body("{\"command\": \"ls -la\"}");
        async move {
            let r = req.try_send().await.ok()?;
            (r.status.as_u16() == status).then_some(r)
        }
    })
    .await
}

async fn discovery_routes_and_readiness(lane: Lane) {
    let fake = FakeKube::start(&["v1beta1", "v1alpha1"]).await;
    let pod = pod().await;
    fake.apply(sandbox("my-sandbox", Some("alice")));
    let gw = gateway(&fake, pod).lane(lane).start().await;

    // Seed 003's example: the sandbox's own service answers `execute`.
    let r = until(&gw, Method::POST, "/alice/my-sandbox/execute", 200).await;
    let body = r.json();
    assert_eq!(body["path"], "/execute");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["body"], "{\"command\": \"ls -la\"}");

    // Made with kubectl while the gateway runs: routable within the bound; no label: `default`.
    let applied = std::time::Instant::now();
    fake.apply(sandbox("plain", None));
    let r = until(&gw, Method::GET, "/default/plain/x?y=1", 200).await;
    let seen = applied.elapsed();
    eprintln!("a kubectl-made Sandbox was routed after {seen:?}");
    assert!(seen < Duration::from_secs(1), "routed after {seen:?}");
    assert_eq!(r.json()["path"], "/x");

    // Any port of the pod through the host route: a second server of the "pod" on another
    // port than the path route's.
    let other = self::pod().await;
    let plain_id = discovered_id(&gw, "default", "plain").await;
    let host = format!("{}-{plain_id}.localhost:{}", other.port(), gw.addr.port());
    let r = gw.get("/by-host").header("host", &host).send().await;
    assert_eq!(r.expect(200).json()["path"], "/by-host");
    let (listener, unused) = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        (l, port)
    };
    drop(listener);
    let host = format!("{unused}-{plain_id}.localhost:{}", gw.addr.port());
    let r = gw.get("/").header("host", &host).send().await;
    assert_eq!(
        r.status.as_u16(),
        502,
        "a port nothing listens on: {:?}",
        r.body
    );
    // Seed 003's listing fields: path, service, namespace, ready; its /health shape.
    // `ready`: Ready in the cluster and (with health checks on) its port passed them.
    let plain = eventually(SEEN, "plain is listed ready", || async {
        let listed = gw.list().await;
        listed
            .into_iter()
            .find(|s| s["name"] == "plain" && s["ready"] == true)
    })
    .await;
    assert_eq!(plain["owner"], "default");
    assert_eq!(plain["path"], "default/plain");
    assert_eq!(plain["service"], "plain");
    assert_eq!(plain["namespace"], "default");
    let health = gw.get("/health").send().await.expect(200).json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["sandboxes"], 2, "{health}");
    assert!(health["timestamp"].is_string());
    // Unknown: 404.
    gw.get("/alice/nope/")
        .send()
        .await
        .expect_error(404, "not_found");

    // Ready false: 503 sandbox_not_ready with Retry-After; Ready again: served.
    fake.set_ready("default", "my-sandbox", false);
    let r = until(&gw, Method::GET, "/alice/my-sandbox/", 503).await;
    r.expect_error(503, "sandbox_not_ready");
    assert!(!r.header("retry-after").is_empty());
    fake.set_ready("default", "my-sandbox", true);
    until(&gw, Method::GET, "/alice/my-sandbox/", 200).await;

    // Made while its controller has not made it Ready: 503 until it is.
    fake.set_auto_ready(false);
    fake.apply(sandbox("pending", Some("alice")));
    until(&gw, Method::GET, "/alice/pending/", 503)
        .await
        .expect_error(503, "sandbox_not_ready");
    fake.set_ready("default", "pending", true);
    until(&gw, Method::GET, "/alice/pending/", 200).await;

    // kubectl delete: gone from the routes and the API.
    fake.remove("default", "plain");
    until(&gw, Method::GET, "/default/plain/", 404).await;
    assert!(gw.list().await.iter().all(|s| s["name"] != "plain"));

    // Deleted through the API, then made again with kubectl under the same name: a new
    // Sandbox, routed again (late events of the deleted one are ignored, this one is not).
    let id = discovered_id(&gw, "alice", "my-sandbox").await;
    gw.delete_sandbox(&id).await;
    eventually(SEEN, "the cluster no longer has my-sandbox", || async {
        fake.get("default", "my-sandbox").is_none().then_some(())
    })
    .await;
    fake.apply(sandbox("my-sandbox", Some("alice")));
    fake.set_ready("default", "my-sandbox", true);
    until(&gw, Method::GET, "/alice/my-sandbox/", 200).await;
}

async fn watch_restarts_and_outages(lane: Lane) {
    let fake = FakeKube::start(&["v1beta1", "v1alpha1"]).await;
    let pod = pod().await;
    fake.apply(sandbox("one", Some("alice")));
    fake.apply(sandbox("two", Some("alice")));
    let gw = gateway(&fake, pod).lane(lane).start().await;
    until(&gw, Method::GET, "/alice/one/", 200).await;
    until(&gw, Method::GET, "/alice/two/", 200).await;

    // Deleted while no watch could hear it: the next watch gets 410 Gone, lists again, and
    // the vanished Sandbox goes.
    fake.delete_unannounced("default", "two");
    until(&gw, Method::GET, "/alice/two/", 404).await;
    until(&gw, Method::GET, "/alice/one/", 200).await;

    // The API server goes away: once the watch has been refused (and retried), the last
    // known routes keep serving.
    fake.set_down(true);
    eventually(
        SEEN,
        "the watch retries against the down API server",
        || async { (fake.refused() >= 2).then_some(()) },
    )
    .await;
    for _ in 0..10 {
        gw.get("/alice/one/").send().await.expect(200);
    }
    // Back: the watch resumes and new Sandboxes appear.
    fake.set_down(false);
    fake.apply(sandbox("three", Some("bob")));
    until(&gw, Method::GET, "/bob/three/", 200).await;
    until(&gw, Method::GET, "/alice/one/", 200).await;
}

/// A Sandbox in namespace `ns`.
fn sandbox_in(ns: &str, name: &str, user: &str) -> Value {
    let mut obj = sandbox(name, Some(user));
    obj["metadata"]["namespace"] = json!(ns);
    obj
}

/// The listed sandbox named `name`.
async fn listed(gw: &TestGateway, name: &str) -> Value {
    gw.list()
        .await
        .into_iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

/// Several namespaces: each is watched (and listed again) on its own; the API creates in the
/// first; a Sandbox of another is routed, listed with its namespace, stopped, started and
/// reached by exec there; one list never removes another namespace's sandboxes; an unwatched
/// namespace is not seen.
async fn several_namespaces(lane: Lane) {
    let fake = FakeKube::start(&["v1beta1"]).await;
    let pod = pod().await;
    fake.apply(sandbox_in("team-a", "one", "alice"));
    fake.apply(sandbox_in("team-b", "two", "bob"));
    fake.apply(sandbox_in("team-c", "three", "carol"));
    let gw = gateway(&fake, pod)
        .config(|c| {
            c.kubernetes.namespaces = vec!["team-a".into(), "team-b".into()];
            // Lists come often: a list of one namespace must leave the other's alone.
            c.kubernetes.resync = Duration::from_millis(300);
        })
        .lane(lane)
        .start()
        .await;
    until(&gw, Method::GET, "/alice/one/", 200).await;
    let r = until(&gw, Method::GET, "/bob/two/x", 200).await;
    assert_eq!(r.json()["path"], "/x");
    gw.get("/carol/three/")
        .send()
        .await
        .expect_error(404, "not_found");
    let two = listed(&gw, "two").await;
    assert_eq!(two["namespace"], "team-b", "{two}");
    assert_eq!(two["service"], "two");
    assert_eq!(listed(&gw, "one").await["namespace"], "team-a");

    // Many lists of each namespace later, the other's sandboxes are the same records, and
    // were routed all along.
    let id = two["id"].as_str().expect("an id").to_string();
    let lists = (fake.lists("team-a"), fake.lists("team-b"));
    let mut served = 0;
    while fake.lists("team-a") < lists.0 + 3 || fake.lists("team-b") < lists.1 + 3 {
        gw.get("/bob/two/").send().await.expect(200);
        gw.get("/alice/one/").send().await.expect(200);
        served += 1;
        assert!(served < 100_000, "the watches do not list again");
    }
    let again = listed(&gw, "two").await;
    assert_eq!(again["id"], id.as_str());
    assert_eq!(
        again["created_at"], two["created_at"],
        "the record was never dropped"
    );

    // Exec, stop and start act in the Sandbox's own namespace.
    let r = gw.exec(&id, &json!({"command": "echo from-b"})).await;
    assert_eq!(r["stdout"], "from-b\n", "{r}");
    gw.post(&format!("/sandboxes/{id}/stop"))
        .send()
        .await
        .expect(200);
    assert_eq!(
        fake.get("team-b", "two").expect("kept")["spec"]["operatingMode"],
        "Suspended"
    );
    gw.post(&format!("/sandboxes/{id}/start"))
        .send()
        .await
        .expect(200);
    assert_eq!(
        fake.get("team-b", "two").expect("kept")["spec"]["operatingMode"],
        "Running"
    );
    until(&gw, Method::GET, "/bob/two/", 200).await;

    // The API creates in the first namespace.
    let made = gw
        .create(
            &json!({"runtime": "shell", "dev_server": true, "command": "serve",
            "name": "made", "owner": "dave"}),
        )
        .await;
    let made_id = made["id"].as_str().expect("an id");
    assert_eq!(made["namespace"], "team-a", "{made}");
    assert!(fake.get("team-a", made_id).is_some(), "{:?}", fake.names());
    until(&gw, Method::GET, "/dave/made/", 200).await;

    // Gone from one namespace without any watch hearing it (410, both list again): only it
    // goes. kubectl delete in the other: it goes too.
    fake.delete_unannounced("team-a", "one");
    until(&gw, Method::GET, "/alice/one/", 404).await;
    gw.get("/bob/two/").send().await.expect(200);
    gw.get("/dave/made/").send().await.expect(200);
    fake.remove("team-b", "two");
    until(&gw, Method::GET, "/bob/two/", 404).await;

    // Deleted through the API in the other namespace: gone from the cluster there.
    fake.apply(sandbox_in("team-b", "four", "erin"));
    until(&gw, Method::GET, "/erin/four/", 200).await;
    let four = listed(&gw, "four").await;
    gw.delete_sandbox(four["id"].as_str().expect("an id")).await;
    assert!(fake.get("team-b", "four").is_none(), "{:?}", fake.names());
    until(&gw, Method::GET, "/erin/four/", 404).await;
}

both_lanes!(
    discovery_routes_and_readiness,
    watch_restarts_and_outages,
    several_namespaces
);

/// Create, stop, start and delete through the API, on the served version's spec fields.
async fn lifecycle_on(versions: &[&'static str]) {
    let fake = FakeKube::start(versions).await;
    let pod = pod().await;
    // Seed 003's service name, as a template.
    let gw = gateway(&fake, pod)
        .config(|c| c.kubernetes.service = "sandbox-{name}".into())
        .start()
        .await;
    let body = json!({"runtime": "shell", "dev_server": true, "command": "serve", "name": "made",
        "owner": "bob", "memory_mb": 256});
    let created = gw.create(&body).await;
    let id = created["id"].as_str().expect("an id").to_string();
    assert_eq!(created["status"], "running", "{created}");
    assert_eq!(created["service"], format!("sandbox-{id}"));
    assert_eq!(created["namespace"], "default");
    let obj = fake.get("default", &id).expect("a Sandbox named by the id");
    assert_eq!(obj["metadata"]["labels"]["user"], "bob");
    assert_eq!(obj["metadata"]["annotations"]["sandgate.dev/name"], "made");
    let template = &obj["spec"]["podTemplate"]["spec"];
    let container = &template["containers"][0];
    assert_eq!(container["command"], json!(["/bin/sh", "-c", "serve"]));
    assert_eq!(container["resources"]["limits"]["memory"], "256Mi");
    // Commands and files work in /sandbox, an emptyDir volume (as on Docker).
    assert_eq!(container["workingDir"], "/sandbox");
    assert_eq!(
        container["volumeMounts"],
        json!([{"name": "sandbox", "mountPath": "/sandbox"}])
    );
    assert_eq!(
        template["volumes"],
        json!([{"name": "sandbox", "emptyDir": {}}])
    );
    let r = gw
        .req(
            Method::PUT,
            &format!("/sandboxes/{id}/files?path=notes/a.txt"),
        )
        .header("content-type", "application/octet-stream")
        .body("written")
        .send()
        .await;
    r.expect(201);
    let r = gw.exec(&id, &json!({"command": "cat notes/a.txt"})).await;
    assert_eq!(r["stdout"], "written", "{r}");
    let r = until(&gw, Method::GET, "/bob/made/hello", 200).await;
    assert_eq!(r.json()["path"], "/hello");
    until(&gw, Method::GET, &format!("/sandbox/{id}/hello"), 200).await;

    let running = |o: &Value| {
        if versions[0] == "v1beta1" {
            o["spec"]["operatingMode"] == "Running"
        } else {
            o["spec"]["replicas"] == 1
        }
    };
    assert!(running(&obj), "{obj}");
    let stopped = gw.post(&format!("/sandboxes/{id}/stop")).send().await;
    assert_eq!(stopped.expect(200).json()["status"], "stopped");
    let obj = fake.get("default", &id).expect("kept while stopped");
    assert!(!running(&obj), "{obj}");
    let started = gw.post(&format!("/sandboxes/{id}/start")).send().await;
    assert_eq!(started.expect(200).json()["status"], "running");
    assert!(running(&fake.get("default", &id).expect("the Sandbox")));
    until(&gw, Method::GET, "/bob/made/", 200).await;

    gw.delete(&format!("/sandboxes/{id}"))
        .send()
        .await
        .expect(200);
    assert!(fake.get("default", &id).is_none(), "{:?}", fake.names());
    until(&gw, Method::GET, "/bob/made/", 404).await;

    // Replicas are not supported here yet: refused, nothing created.
    let r = gw
        .post("/sandboxes")
        .json(&json!({"runtime": "shell", "dev_server": true, "command": "serve", "replicas": 2}))
        .send()
        .await;
    r.expect_error(422, "validation_failed");
    assert!(fake.names().is_empty(), "{:?}", fake.names());
}

/// Watch events older than a stop the gateway made (here held back until after it, as a
/// lagging watch delivers them) do not undo it: the record is not rewritten by them, and a
/// start right after works (it once met "cannot be started while creating").
#[tokio::test(flavor = "multi_thread")]
async fn events_older_than_a_stop_do_not_undo_it() {
    let fake = FakeKube::start(&["v1alpha1"]).await;
    let pod = pod().await;
    let gw = gateway(&fake, pod).start().await;
    fake.hold_watch();
    let made = gw
        .create(
            &json!({"runtime": "shell", "dev_server": true, "command": "serve",
            "name": "held", "owner": "hal"}),
        )
        .await;
    assert_eq!(made["status"], "running", "{made}");
    let id = made["id"].as_str().expect("an id").to_string();
    let stopped = gw.post(&format!("/sandboxes/{id}/stop")).send().await;
    assert_eq!(stopped.expect(200).json()["status"], "stopped");
    let before = gw.sandbox(&id).await;

    // The create's events (made, then Ready with a pod IP) and the stop's arrive now.
    fake.release_watch();
    fake.apply(sandbox("marker", Some("ops")));
    until(&gw, Method::GET, "/ops/marker/", 200).await;
    let after = gw.sandbox(&id).await;
    assert_eq!(after["status"], "stopped", "{after}");
    assert_eq!(
        after["updated"], before["updated"],
        "a stale event rewrote {after}"
    );
    let started = gw.post(&format!("/sandboxes/{id}/start")).send().await;
    assert_eq!(started.expect(200).json()["status"], "running");
    until(&gw, Method::GET, "/hal/held/", 200).await;
}

/// A runtime with `volume_size` gets a `volumeClaimTemplates` entry for `/sandbox`: its files
/// outlive a stop and a start (the fake, like agent-sandbox's controller, puts the claim in
/// place of the pod's volume of that name); without it `/sandbox` is an `emptyDir`, empty
/// again after a stop.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_keeps_files_across_a_stop() {
    let fake = FakeKube::start(&["v1beta1"]).await;
    let pod = pod().await;
    let gw = gateway(&fake, pod)
        .config(|c| {
            c.runtimes.insert(
                "kept".into(),
                sandgate::config::RuntimeConfig {
                    volume_size: Some("2Gi".into()),
                    ..Default::default()
                },
            );
        })
        .start()
        .await;
    for (runtime, kept) in [("kept", true), ("shell", false)] {
        let made = gw
            .create(&json!({"runtime": runtime, "command": "serve"}))
            .await;
        let id = made["id"].as_str().expect("an id").to_string();
        let templates =
            fake.get("default", &id).expect("the Sandbox")["spec"]["volumeClaimTemplates"].clone();
        if kept {
            assert_eq!(
                templates,
                json!([{"metadata": {"name": "sandbox"}, "spec": {"accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "2Gi"}}}}])
            );
        } else {
            assert!(templates.is_null(), "{templates}");
        }
        gw.req(Method::PUT, &format!("/sandboxes/{id}/files?path=a.txt"))
            .header("content-type", "application/octet-stream")
            .body("kept?")
            .send()
            .await
            .expect(201);
        for step in ["stop", "start"] {
            gw.post(&format!("/sandboxes/{id}/{step}"))
                .send()
                .await
                .expect(200);
        }
        let r = gw
            .exec(
                &id,
                &json!({"command": "cat a.txt 2>/dev/null || echo gone"}),
            )
            .await;
        let want = if kept { "kept?" } else { "gone\n" };
        assert_eq!(r["stdout"], want, "{runtime}: {r}");
        gw.delete_sandbox(&id).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_v1beta1() {
    lifecycle_on(&["v1beta1", "v1alpha1"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_v1alpha1_only() {
    lifecycle_on(&["v1alpha1"]).await;
}

/// Commands run in the Sandbox's pod through `pods/exec` over the WebSocket channel protocol
/// (the fake's "pod" is this machine): stdout and stderr apart, the exit code, env, stdin, cwd, a
/// timeout that kills the command through another exec, and a command waking a stopped one.
#[tokio::test(flavor = "multi_thread")]
async fn exec_through_the_pod_exec_api() {
    let fake = FakeKube::start(&["v1beta1"]).await;
    let pod = pod().await;
    fake.apply(sandbox("runner", Some("carol")));
    let gw = gateway(&fake, pod).start().await;
    until(&gw, Method::GET, "/carol/runner/", 200).await;
    let id = gw
        .list()
        .await
        .into_iter()
        .find(|s| s["name"] == "runner")
        .and_then(|s| s["id"].as_str().map(str::to_string))
        .expect("runner is listed");

    let r = gw
        .exec(
            &id,
            &json!({"command": "echo out; echo err >&2; printf %s \"$X\"; exit 3", "env": {"X": "x"}}),
        )
        .await;
    assert_eq!(r["exit_code"], 3, "{r}");
    assert_eq!(r["stdout"], "out\nx");
    assert_eq!(r["stderr"], "err\n");

    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = dir.path().to_str().expect("utf-8").to_string();
    let r = gw
        .exec(
            &id,
            &json!({"command": "pwd; cat", "cwd": cwd, "stdin": "given"}),
        )
        .await;
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(r["stdout"], format!("{cwd}\ngiven"));

    // A timeout ends the command (found in the pod by its tag) and keeps its output.
    let r = gw
        .exec(
            &id,
            &json!({"command": "echo started; exec sleep 30", "timeout_ms": 1000}),
        )
        .await;
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["stdout"], "started\n");

    // A stopped Sandbox (discovered ones are persistent) is resumed by a command.
    gw.post(&format!("/sandboxes/{id}/stop"))
        .send()
        .await
        .expect(200);
    assert_eq!(
        fake.get("default", "runner").expect("kept")["spec"]["operatingMode"],
        "Suspended"
    );
    let r = gw.exec(&id, &json!({"command": "echo again"})).await;
    assert_eq!(r["stdout"], "again\n", "{r}");
    assert_eq!(
        fake.get("default", "runner").expect("kept")["spec"]["operatingMode"],
        "Running"
    );
}

/// A pod with a sidecar: commands and logs go to the container kubectl would pick (the pod
/// template's `kubectl.kubernetes.io/default-container`, else the first), never to none (the
/// API server refuses an exec or a log naming no container of a pod that has several).
#[tokio::test(flavor = "multi_thread")]
async fn exec_and_logs_pick_the_default_container() {
    let fake = FakeKube::start(&["v1beta1"]).await;
    let pod = pod().await;
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let container = |name: &str, dir: Option<&tempfile::TempDir>| {
        let mut c =
            json!({"name": name, "image": "busybox", "env": [{"name": "WHO", "value": name}]});
        if let Some(dir) = dir {
            c["workingDir"] = json!(dir.path().to_str().expect("utf-8"));
        }
        c
    };
    // Annotated: the sidecar comes first, the annotation names the app.
    let mut annotated = sandbox("annotated", Some("frank"));
    annotated["spec"]["podTemplate"]["metadata"] =
        json!({"annotations": {"kubectl.kubernetes.io/default-container": "app"}});
    annotated["spec"]["podTemplate"]["spec"]["containers"] =
        json!([container("proxy", None), container("app", Some(&dirs[0]))]);
    fake.apply(annotated);
    // Not annotated: the first.
    let mut first = sandbox("first", Some("frank"));
    first["spec"]["podTemplate"]["spec"]["containers"] =
        json!([container("main", Some(&dirs[1])), container("proxy", None)]);
    fake.apply(first);
    let gw = gateway(&fake, pod).start().await;

    for (name, who, dir) in [("annotated", "app", &dirs[0]), ("first", "main", &dirs[1])] {
        let id = discovered_id(&gw, "frank", name).await;
        let r = gw.exec(&id, &json!({"command": "pwd; echo $WHO"})).await;
        assert_eq!(
            r["stdout"],
            format!("{}\n{who}\n", dir.path().display()),
            "{name}: {r}"
        );
        fake.log("default", name, "hello");
        let r = gw.get(&format!("/sandboxes/{id}/logs")).send().await;
        assert_eq!(r.expect(200).text(), "hello\n", "{name}");
    }
}

/// The Deployment's real setup: two gateway processes on one PostgreSQL store, both watching
/// the cluster. A kubectl-made Sandbox is one record routed by both; one created through A
/// is routed by B within a second; deleted through B, it is gone from both and from the
/// cluster, and neither replica's watch brings it back; with A killed, B serves on.
#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_on_postgres_share_the_cluster() {
    use crate::common::postgres::PgServer;
    let Some(server) = PgServer::start() else {
        return;
    };
    let url = server.database("replicas_kube");
    let fake = FakeKube::start(&["v1beta1"]).await;
    let pod = pod().await;
    fake.apply(sandbox("shared", Some("alice")));
    let (mut a, b, _config) = crate::postgres::two_replicas(
        &format!(
            "backend = \"kubernetes\"\n[kubernetes]\nkubeconfig = \"{}\"\nport = {}\n",
            fake.kubeconfig.display(),
            pod.port()
        ),
        &url,
    )
    .await;
    let routed = |gw: &'static str, c: &crate::common::Client, path: &str, status: u16| {
        let what = format!("{gw}: GET {path} answers {status}");
        let (c, path) = (c.clone(), path.to_string());
        async move {
            eventually(SEEN, &what, || async {
                let r = c.get(&path).try_send().await.ok()?;
                (r.status.as_u16() == status).then_some(())
            })
            .await
        }
    };
    routed("A", &a, "/alice/shared/", 200).await;
    routed("B", &b, "/alice/shared/", 200).await;
    for gw in [&a, &b] {
        let listed = gw.list().await;
        let shared: Vec<_> = listed.iter().filter(|s| s["name"] == "shared").collect();
        assert_eq!(shared.len(), 1, "one record for both watches: {listed:?}");
    }

    // Created through A: B routes it within a second of A's answer.
    let made = a
        .create(
            &json!({"runtime": "shell", "dev_server": true, "command": "serve",
            "name": "made", "owner": "bob"}),
        )
        .await;
    let answered = std::time::Instant::now();
    let id = made["id"].as_str().expect("an id").to_string();
    routed("B", &b, "/bob/made/", 200).await;
    let took = answered.elapsed();
    assert!(took < Duration::from_secs(1), "B routed it after {took:?}");

    // Deleted through B while the watches lag (their events held until after B removed the
    // record): gone from the cluster and both replicas, and A, which does not know of the
    // deletion, never records it again from a late event (a delete makes no stop patch).
    fake.hold_watch();
    b.delete(&format!("/sandboxes/{id}"))
        .send()
        .await
        .expect(200);
    assert!(fake.get("default", &id).is_none(), "{:?}", fake.names());
    fake.release_watch();
    routed("A", &a, "/bob/made/", 404).await;
    fake.apply(sandbox("marker", Some("ops")));
    routed("A", &a, "/ops/marker/", 200).await;
    routed("B", &b, "/ops/marker/", 200).await;
    for gw in [&a, &b] {
        assert!(gw.list().await.iter().all(|s| s["id"] != id.as_str()));
        gw.get("/bob/made/").send().await.expect(404);
    }
    assert!(
        !a.log()
            .lines()
            .any(|l| l.contains(&id) && l.contains("discovered a Sandbox")),
        "A recorded the deleted Sandbox again from a late event:\n{}",
        a.log()
    );

    // A dies: B serves on, and sees the cluster change.
    a.kill().await;
    b.get("/alice/shared/").send().await.expect(200);
    fake.remove("default", "shared");
    routed("B", &b, "/alice/shared/", 404).await;
    eprintln!("kubernetes replicas: B routed A's Sandbox after {took:?}");
}

/// The gateway's id of a discovered Sandbox, once it is routable.
async fn discovered_id(gw: &TestGateway, user: &str, name: &str) -> String {
    until(gw, Method::GET, &format!("/{user}/{name}/"), 200).await;
    gw.list()
        .await
        .into_iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["id"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("{name} is listed"))
}

/// How many processes of terminal `session` (the fake's pod is this machine) have a command
/// line starting with `cmdline` (arguments separated by NUL).
fn running(session: &str, cmdline: &str) -> usize {
    crate::exec::processes_with(&format!("SANDGATE_EXEC={session}"))
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.starts_with(cmdline))
        })
        .count()
}

/// A terminal through `pods/exec` with a TTY (the fake runs the shell on a real terminal of
/// this machine): typed input reaches the shell, stderr comes merged into the output, a resize
/// shows in `stty size`, signals interrupt what runs, the shell's exit code is reported.
/// Closing the socket detaches the session; the gateway's end of it ends the shell and what it
/// runs in the pod, although the exec's stream closing alone does not (as in a cluster).
#[tokio::test(flavor = "multi_thread")]
async fn terminal_through_a_tty_exec() {
    use crate::pty::{keys, text, until as shown};
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let fake = FakeKube::start(&["v1beta1"]).await;
    let pod = pod().await;
    fake.apply(sandbox("term", Some("dave")));
    let gw = gateway(&fake, pod)
        .config(|c| c.exec_kill_grace = Duration::from_millis(500))
        .start()
        .await;
    let id = discovered_id(&gw, "dave", "term").await;

    let mut ws = gw
        .websocket(&format!("/sandboxes/{id}/pty?cols=80&rows=24"), None)
        .await;
    let hello = text(&mut ws).await;
    assert_eq!(hello["type"], "hello", "{hello}");
    // The answers, not the typed lines (which show `$((…))`).
    keys(&mut ws, "stty size; echo sg-$((6*7))\n").await;
    let (out, _) = shown(&mut ws, "sg-42").await;
    assert!(
        String::from_utf8_lossy(&out).contains("24 80"),
        "the first size: {:?}",
        String::from_utf8_lossy(&out)
    );
    keys(&mut ws, "echo to-err-$((2+2)) >&2\n").await;
    shown(&mut ws, "to-err-4").await;
    ws.send(Message::text(
        json!({"type": "resize", "cols": 100, "rows": 30}).to_string(),
    ))
    .await
    .expect("send");
    keys(&mut ws, "stty size\n").await;
    shown(&mut ws, "30 100").await;
    // Ctrl-C goes in-band to the program in the foreground; other signals through another
    // exec, to the terminal's processes (the interactive shell ignores SIGTERM).
    let session = hello["session"].as_str().expect("a session").to_string();
    for (program, signal, after, answer) in [
        ("sleep 37", "SIGINT", "after-int-$((1+1))", "after-int-2"),
        ("sleep 38", "SIGTERM", "after-term-$((2+2))", "after-term-4"),
    ] {
        keys(&mut ws, &format!("{program}\n")).await;
        let cmdline = program.replace(' ', "\0");
        eventually(SEEN, &format!("{program} runs"), || {
            let n = running(&session, &cmdline);
            async move { (n > 0).then_some(()) }
        })
        .await;
        ws.send(Message::text(
            json!({"type": "signal", "signal": signal}).to_string(),
        ))
        .await
        .expect("send");
        keys(&mut ws, &format!("echo {after}\n")).await;
        shown(&mut ws, answer).await;
    }
    keys(&mut ws, "exit 3\n").await;
    let end = loop {
        let t = text(&mut ws).await;
        if t["type"] == "exit" {
            break t;
        }
    };
    assert_eq!(end["exit_code"], 3, "{end}");

    // A second session runs a program, and its socket closes: the session lives on.
    let mut ws = gw.websocket(&format!("/sandboxes/{id}/pty"), None).await;
    let session = text(&mut ws).await["session"]
        .as_str()
        .expect("a session")
        .to_string();
    keys(&mut ws, "sleep 41\n").await;
    let tag = format!("SANDGATE_EXEC={session}");
    let sleeping = || running(&session, "sleep\x0041");
    eventually(SEEN, "sleep runs in the pod", || async {
        (sleeping() > 0).then_some(())
    })
    .await;
    ws.close(None).await.expect("close");
    let v = gw.sandbox(&id).await;
    assert_eq!(v["connections"]["pty"], 1, "detached, not ended: {v}");
    assert!(sleeping() > 0, "a detached session's program runs on");
    // The gateway ends its sessions when it stops: through another exec, in the pod.
    gw.shutdown().await;
    eventually(SEEN, "the terminal's processes are gone", || async {
        crate::exec::processes_with(&tag).is_empty().then_some(())
    })
    .await;
}

/// Logs through `pods/{name}/log`: all of it, the last lines, times before the lines, and a
/// follow that sees a later line and ends when the pod goes (the Sandbox is stopped), after
/// which the log is empty.
#[tokio::test(flavor = "multi_thread")]
async fn logs_through_the_pod_log_api() {
    let fake = FakeKube::start(&["v1beta1"]).await;
    let pod = pod().await;
    fake.apply(sandbox("logger", Some("erin")));
    for i in 1..=3 {
        fake.log("default", "logger", &format!("line-{i}"));
    }
    let gw = gateway(&fake, pod).start().await;
    let id = discovered_id(&gw, "erin", "logger").await;
    let path = format!("/sandboxes/{id}/logs");

    let r = gw.get(&path).send().await;
    assert_eq!(r.expect(200).text(), "line-1\nline-2\nline-3\n");
    assert_eq!(r.header("content-type"), "text/plain; charset=utf-8");
    let r = gw.get(&format!("{path}?tail=1")).send().await;
    assert_eq!(r.expect(200).text(), "line-3\n");
    let stamped = gw
        .get(&format!("{path}?tail=2&timestamps=true"))
        .send()
        .await
        .expect(200)
        .text();
    let lines: Vec<&str> = stamped.lines().collect();
    assert_eq!(lines.len(), 2, "{stamped}");
    for (line, want) in lines.iter().zip(["line-2", "line-3"]) {
        let (time, rest) = line.split_once(' ').expect("a time and a line");
        assert_eq!(rest, want, "{stamped}");
        assert!(
            chrono::DateTime::parse_from_rfc3339(time).is_ok() && time.ends_with('Z'),
            "{line}"
        );
    }

    // Following: a line printed later arrives while the stream is open.
    let resp = gw
        .get(&format!("{path}?follow=true&tail=1"))
        .send_streaming()
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    crate::api::read_until("line-3", &mut body, &mut seen).await;
    fake.log("default", "logger", "line-4");
    crate::api::read_until("line-4", &mut body, &mut seen).await;
    assert_eq!(seen, "line-3\nline-4\n");
    // Stopped: the pod goes, the follow ends, and there is no log left to read.
    gw.post(&format!("/sandboxes/{id}/stop"))
        .send()
        .await
        .expect(200);
    let ended = tokio::time::timeout(SEEN, async {
        use http_body_util::BodyExt;
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the follow ended with the pod");
    let r = gw.get(&path).send().await;
    assert_eq!(r.expect(200).text(), "");
}

/// `path=` for the files API: every byte but letters and digits percent-encoded.
fn query_path(path: &str) -> String {
    path.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A `PUT` to `uri` whose body is what is sent on the channel, as it is sent (an `Err` breaks
/// the request off mid-body); the answer once the body has ended.
#[allow(clippy::type_complexity)]
fn streamed_upload(
    addr: SocketAddr,
    uri: &str,
) -> (
    tokio::sync::mpsc::Sender<Result<Bytes, String>>,
    tokio::task::JoinHandle<Result<crate::common::Reply, String>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(4);
    let body = http_body_util::StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async {
        let frame = rx
            .recv()
            .await?
            .map(hyper::body::Frame::data)
            .map_err(std::io::Error::other);
        Some((frame, rx))
    }));
    let req = hyper::Request::builder()
        .method(Method::PUT)
        .uri(uri)
        .header("host", addr.to_string())
        .header("content-type", "application/octet-stream")
        .body(body)
        .expect("request");
    let answer = tokio::spawn(async move {
        let resp = crate::common::send_request(addr, None, req).await?;
        crate::common::Reply::read(resp).await
    });
    (tx, answer)
}

/// Temporary upload files left in `dir`.
fn upload_temps(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read the tree")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".sandgate-upload-"))
        .collect()
}

/// The files API through `pods/exec` (one `sh` script per operation; the fake's "pod" is this
/// machine, in the pod template's `workingDir`): streamed binary uploads and downloads, the
/// answers of the host-path implementation (`sandgate::files::Tree` on the same directory is
/// the reference for listings), atomic uploads, hostile names passed as arguments, and paths
/// or planted links leading outside refused with the same errors as on every other backend.
#[tokio::test(flavor = "multi_thread")]
async fn files_through_the_pod_exec_api() {
    use sandgate::files::{FilesError, Found, Tree};
    let fake = FakeKube::start(&["v1beta1"]).await;
    let pod = pod().await;
    let work = tempfile::tempdir().expect("tempdir");
    let root = work.path().join("tree");
    std::fs::create_dir(&root).expect("the tree");
    let mut obj = sandbox("files", Some("dave"));
    obj["spec"]["podTemplate"]["spec"]["containers"][0]["workingDir"] =
        json!(root.to_str().expect("utf-8"));
    fake.apply(obj);
    let gw = gateway(&fake, pod)
        .config(|c| c.files_max_upload_bytes = 4 << 20)
        .start()
        .await;
    until(&gw, Method::GET, "/dave/files/", 200).await;
    let id = gw
        .list()
        .await
        .into_iter()
        .find(|s| s["name"] == "files")
        .and_then(|s| s["id"].as_str().map(str::to_string))
        .expect("files is listed");
    let files = format!("/sandboxes/{id}/files");
    let url = |query: &str| format!("{files}?{query}");
    let put = |query: &str, body: Vec<u8>| {
        gw.req(Method::PUT, &url(query))
            .header("content-type", "application/octet-stream")
            .body(body)
    };

    // A few MiB of every byte value, up and down unchanged.
    let data: Vec<u8> = (0..(3u32 << 20) + 7)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let r = put("path=bin/blob.bin", data.clone()).send().await;
    r.expect(201);
    assert_eq!(
        r.json(),
        json!({"path": "bin/blob.bin", "size": data.len(), "mode": "0644"})
    );
    assert!(std::fs::read(root.join("bin/blob.bin")).expect("written") == data);
    let r = gw.get(&url("path=bin/blob.bin")).send().await;
    r.expect(200);
    assert_eq!(r.body.len(), data.len());
    assert!(r.body == data, "the download differs from the upload");
    assert_eq!(r.header("content-length"), data.len().to_string());
    assert_eq!(r.header("content-type"), "application/octet-stream");
    assert_eq!(
        r.header("content-disposition"),
        "attachment; filename=\"blob.bin\""
    );
    assert_eq!(r.header("x-content-type-options"), "nosniff");

    // Replaced (200), or refused when it must be new; a directory is never replaced.
    put("path=bin/blob.bin", b"v2".to_vec())
        .send()
        .await
        .expect(200);
    put("path=bin/blob.bin&overwrite=false", b"v3".to_vec())
        .send()
        .await
        .expect_error(412, "already_exists");
    put("path=bin", b"x".to_vec())
        .send()
        .await
        .expect_error(412, "already_exists");
    assert_eq!(
        std::fs::read(root.join("bin/blob.bin")).expect("kept"),
        b"v2"
    );
    // Parents are created, modes set; directories made.
    put("path=a/b/c.sh&mode=755", b"echo made".to_vec())
        .send()
        .await
        .expect(201);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(root.join("a/b/c.sh"))
            .expect("c.sh")
            .permissions(),
    );
    assert_eq!(mode & 0o7777, 0o755);
    let r = put("path=a/empty&dir=true", Vec::new()).send().await;
    r.expect(201);
    assert_eq!(
        r.json(),
        json!({"path": "a/empty", "size": 0, "mode": "0755"})
    );
    put("path=a/empty&dir=true", Vec::new())
        .send()
        .await
        .expect(200);
    put("path=a/b/c.sh&dir=true", Vec::new())
        .send()
        .await
        .expect_error(412, "already_exists");
    // A parent that is a file: nothing there, as on a host path.
    put("path=a/b/c.sh/x", b"x".to_vec())
        .send()
        .await
        .expect_error(404, "file_not_found");

    // Links the sandbox planted: outside (absolute, chained, to a file, to a directory the
    // gateway could write) and inside.
    std::fs::write(work.path().join("canary"), "canary").expect("canary");
    let link = |target: &std::path::Path, name: &str| {
        std::os::unix::fs::symlink(target, root.join(name)).expect("link")
    };
    link(std::path::Path::new("/"), "escape");
    link(std::path::Path::new("escape"), "chain");
    link(&work.path().join("canary"), "pw");
    link(work.path(), "out");
    link(std::path::Path::new("a/b"), "inside");
    link(&root.join("a/b"), "absolute");
    let fifo = std::process::Command::new("mkfifo")
        .arg(root.join("fifo"))
        .status()
        .expect("mkfifo");
    assert!(fifo.success());

    // Listings: the host-path implementation's answer on the same tree, field for field.
    let tree = Tree::open(&root).expect("open the tree");
    for path in ["", "a", "a/b", "bin", "inside"] {
        let got = gw
            .get(&url(&format!("path={path}")))
            .send()
            .await
            .expect(200)
            .json();
        let Ok(Found::Dir(want)) = tree.read(path) else {
            panic!("{path} is a directory");
        };
        assert_eq!(got, serde_json::to_value(want).expect("json"), "{path}");
    }

    // An absolute link is outside wherever it points, as `RESOLVE_BENEATH` has it.
    for outside in [
        "escape/etc/passwd",
        "chain/etc",
        "pw",
        "escape",
        "out/canary",
        "absolute",
        "absolute/c.sh",
    ] {
        gw.get(&url(&format!("path={outside}")))
            .send()
            .await
            .expect_error(403, "path_outside_sandbox");
        assert!(
            matches!(tree.read(outside), Err(FilesError::Outside(_))),
            "{outside}: the host-path answer differs"
        );
    }
    put("path=out/x", b"x".to_vec())
        .send()
        .await
        .expect_error(403, "path_outside_sandbox");
    assert!(!work.path().join("x").exists());
    // Neither a file nor a directory: refused, as on a host path (not asked of the host-path
    // `Tree` here: its read opens the FIFO and waits for a writer).
    gw.get(&url("path=fifo"))
        .send()
        .await
        .expect_error(400, "invalid_path");
    let r = gw.get(&url("path=inside/c.sh")).send().await;
    assert_eq!(r.expect(200).text(), "echo made");
    // Writes and deletes through a relative link that stays inside work, as on a host path.
    put("path=inside/new.txt", b"n".to_vec())
        .send()
        .await
        .expect(201);
    assert_eq!(std::fs::read(root.join("a/b/new.txt")).expect("new"), b"n");
    gw.delete(&url("path=inside/new.txt"))
        .send()
        .await
        .expect(200);
    assert!(!root.join("a/b/new.txt").exists());
    // A write at a link's name replaces the link, never what it points to.
    put("path=pw", b"evil".to_vec()).send().await.expect(200);
    assert_eq!(
        std::fs::read_to_string(work.path().join("canary")).expect("canary"),
        "canary"
    );
    assert_eq!(std::fs::read(root.join("pw")).expect("pw"), b"evil");

    // Hostile names are arguments, never shell text.
    let hostile = "-x $(touch pwned) `touch pwned2` 'q' \"dq\"\n;&|<>*?.txt";
    let r = put(&format!("path={}", query_path(hostile)), b"h".to_vec())
        .send()
        .await;
    r.expect(201);
    assert_eq!(r.json()["path"], hostile);
    assert_eq!(std::fs::read(root.join(hostile)).expect("hostile"), b"h");
    let r = gw
        .get(&url(&format!("path={}", query_path(hostile))))
        .send()
        .await;
    assert_eq!(r.expect(200).text(), "h");
    let listed = gw.get(&url("path=")).send().await.expect(200).json();
    assert!(
        listed["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["name"] == hostile),
        "{listed}"
    );
    let dash = "-rf $(x)";
    put(&format!("path={}/in", query_path(dash)), b"i".to_vec())
        .send()
        .await
        .expect(201);
    gw.delete(&url(&format!("path={}", query_path(dash))))
        .send()
        .await
        .expect_error(409, "conflict");
    gw.delete(&url(&format!("path={}&recursive=true", query_path(dash))))
        .send()
        .await
        .expect(200);
    gw.delete(&url(&format!("path={}", query_path(hostile))))
        .send()
        .await
        .expect(200);
    assert!(!root.join(hostile).exists() && !root.join(dash).exists());
    assert!(root.join("a/b/c.sh").exists(), "a leading dash reached rm");
    for pwned in ["pwned", "pwned2"] {
        assert!(!root.join(pwned).exists() && !std::path::Path::new(pwned).exists());
    }

    // Lexically bad paths: refused before anything runs, as on every backend.
    for bad in [
        "../x",
        "/etc/passwd",
        "a/../../x",
        "%2e%2e/x",
        "a%00b",
        "a//b",
    ] {
        let q = format!("path={bad}");
        gw.get(&url(&q))
            .send()
            .await
            .expect_error(400, "invalid_path");
        put(&q, b"x".to_vec())
            .send()
            .await
            .expect_error(400, "invalid_path");
        gw.delete(&url(&q))
            .send()
            .await
            .expect_error(400, "invalid_path");
    }
    gw.get(&url("path=nope"))
        .send()
        .await
        .expect_error(404, "file_not_found");
    gw.delete(&url("path=nope"))
        .send()
        .await
        .expect_error(404, "file_not_found");

    // Deletes: a link itself, a directory only when asked to take its contents.
    gw.delete(&url("path=out&recursive=true"))
        .send()
        .await
        .expect(200);
    assert!(work.path().join("canary").exists());
    gw.delete(&url("path=a"))
        .send()
        .await
        .expect_error(409, "conflict");
    gw.delete(&url("path=a/empty")).send().await.expect(200);
    gw.delete(&url("path=a&recursive=true"))
        .send()
        .await
        .expect(200);
    assert!(!root.join("a").exists());
    gw.get(&url("path=a/b/c.sh"))
        .send()
        .await
        .expect_error(404, "file_not_found");
    gw.delete(&url("path="))
        .send()
        .await
        .expect_error(400, "invalid_path");

    // Atomic: while an upload streams, the old file stays whole and the bytes go to a
    // temporary file beside it; the rename comes with the body's end.
    std::fs::write(root.join("atomic.txt"), "old").expect("old");
    let (tx, upload) = streamed_upload(gw.addr, &url("path=atomic.txt"));
    tx.send(Ok(Bytes::from(vec![b'n'; 100_000])))
        .await
        .expect("send");
    eventually(SEEN, "the first bytes are in a temporary file", || async {
        let temps = upload_temps(&root);
        let size = temps
            .first()
            .and_then(|t| std::fs::metadata(root.join(t)).ok())
            .map(|m| m.len());
        (size == Some(100_000)).then_some(())
    })
    .await;
    assert_eq!(std::fs::read(root.join("atomic.txt")).expect("old"), b"old");
    tx.send(Ok(Bytes::from_static(b"ew"))).await.expect("send");
    drop(tx);
    let r = upload.await.expect("the upload").expect("an answer");
    assert_eq!(r.expect(200).json()["size"], 100_002);
    assert_eq!(
        std::fs::metadata(root.join("atomic.txt"))
            .expect("new")
            .len(),
        100_002
    );
    assert!(upload_temps(&root).is_empty());

    // An upload over the limit, or one whose client leaves, leaves nothing behind.
    put("path=big", vec![b'b'; (4 << 20) + 1])
        .send()
        .await
        .expect_error(413, "payload_too_large");
    let (tx, upload) = streamed_upload(gw.addr, &url("path=atomic.txt"));
    tx.send(Ok(Bytes::from(vec![b'l'; 1000])))
        .await
        .expect("send");
    eventually(SEEN, "the abandoned upload has begun", || async {
        (!upload_temps(&root).is_empty()).then_some(())
    })
    .await;
    // The client's body fails: it abandons the request mid-body.
    tx.send(Err("gone".into())).await.expect("send");
    let _ = upload.await;
    eventually(SEEN, "abandoned uploads are removed", || async {
        upload_temps(&root).is_empty().then_some(())
    })
    .await;
    assert!(!root.join("big").exists());
    assert_eq!(
        std::fs::metadata(root.join("atomic.txt"))
            .expect("kept")
            .len(),
        100_002
    );
}

/// An image without the tools the files scripts need (here: only `env` and `sh` on its
/// `PATH`): `400 unsupported_operation` naming the missing one, for reads and writes alike.
#[tokio::test(flavor = "multi_thread")]
async fn files_name_a_missing_tool() {
    let fake = FakeKube::start(&["v1beta1"]).await;
    let pod = pod().await;
    let bin = tempfile::tempdir().expect("tempdir");
    let tree = tempfile::tempdir().expect("tempdir");
    for (tool, at) in [("env", "/usr/bin/env"), ("sh", "/bin/sh")] {
        std::os::unix::fs::symlink(at, bin.path().join(tool)).expect("link");
    }
    let mut obj = sandbox("bare", Some("erin"));
    let container = &mut obj["spec"]["podTemplate"]["spec"]["containers"][0];
    container["workingDir"] = json!(tree.path().to_str().expect("utf-8"));
    container["env"] = json!([{"name": "PATH", "value": bin.path().to_str().expect("utf-8")}]);
    fake.apply(obj);
    let gw = gateway(&fake, pod).start().await;
    until(&gw, Method::GET, "/erin/bare/", 200).await;
    let id = gw
        .list()
        .await
        .into_iter()
        .find(|s| s["name"] == "bare")
        .and_then(|s| s["id"].as_str().map(str::to_string))
        .expect("bare is listed");
    let message = gw
        .get(&format!("/sandboxes/{id}/files?path="))
        .send()
        .await
        .expect_error(400, "unsupported_operation");
    assert!(message.contains("needs stat"), "{message}");
    let message = gw
        .req(Method::PUT, &format!("/sandboxes/{id}/files?path=x"))
        .header("content-type", "application/octet-stream")
        .body("x")
        .send()
        .await
        .expect_error(400, "unsupported_operation");
    assert!(message.contains("needs mkdir"), "{message}");
    assert!(!tree.path().join("x").exists());
}
