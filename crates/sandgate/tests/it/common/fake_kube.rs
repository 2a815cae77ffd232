//! A fake Kubernetes API server for the kubernetes backend's tests: real HTTP on
//! 127.0.0.1:0, serving agent-sandbox's `Sandbox` kind the way the real API server does
//! where the backend depends on it: discovery (`/apis`, `/apis/{group}/{version}`), list
//! with a `resourceVersion`, watch streams with bookmarks, `410 Gone` (an `ERROR` event) for
//! a resource version older than its history, create/get/delete, JSON merge patch, and the
//! status subresource (a patch of the object ignores `status`; one of `/status` changes only
//! it). A small "controller" marks a Sandbox Ready with pod IP 127.0.0.1 (or suspends it) the
//! way agent-sandbox's does, unless told to hold readiness back. Pod exec speaks the WebSocket
//! channel protocol (`v5.channel.k8s.io`: stdin 0, stdout 1, stderr 2, a closing `Status` on 3,
//! close 255) and runs the command on this machine (the fake's "pod"), in the container's
//! `workingDir` and with its `env` when the pod template gives them; with `tty=true` on a
//! real pseudo-terminal (stderr merged into stdout, resizes from channel 4), and, as in a real
//! cluster, a client that leaves does not end the command. A pod exists while its Sandbox has a
//! pod IP; its log (`pods/{name}/log`: `follow`, `tailLines`, `timestamps`) is a buffer the
//! test appends to ([`FakeKube::log`]), gone with the Sandbox. Not implemented: server-side
//! apply's field ownership, label selectors, pagination, pod objects, closing stdin of a TTY
//! exec, a fresh log for a resumed Sandbox's new pod, the log's `sinceSeconds`/`limitBytes`.
//! Warm pools and claims (agent-sandbox's extensions group) are in `fake_kube/claims.rs`.

mod claims;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::broadcast;

pub const GROUP: &str = "agents.x-k8s.io";

/// One change, as a watch delivers it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    namespace: String,
    object: Value,
}

#[derive(Debug)]
struct Inner {
    rv: u64,
    /// (namespace, name) → object.
    objects: BTreeMap<(String, String), Value>,
    /// Every change since `oldest`; a watch from before it gets `410 Gone`.
    history: Vec<Change>,
    oldest: u64,
    versions: Vec<&'static str>,
    down: bool,
    /// Requests answered 503 while down.
    refused: u64,
    auto_ready: bool,
    /// Bumped to end every open watch stream.
    epoch: u64,
    /// (namespace, pod name) → the pod's log: (RFC 3339 time, line with its newline).
    logs: BTreeMap<(String, String), Vec<(String, String)>>,
    /// SandboxWarmPools and SandboxClaims.
    ext: claims::Extensions,
    /// While `Some`, changes are kept here instead of reaching open watches: a watch that
    /// delivers events late ([`FakeKube::hold_watch`]).
    held: Option<Vec<Change>>,
    /// namespace → how many times its Sandboxes were listed (not watched).
    lists: BTreeMap<String, u64>,
}

#[derive(Clone)]
pub struct FakeKube {
    inner: Arc<Mutex<Inner>>,
    changes: broadcast::Sender<Change>,
    /// Bumped on every change and every log line: following logs re-check.
    log_changes: Arc<tokio::sync::watch::Sender<u64>>,
    pub kubeconfig: PathBuf,
    /// The kubeconfig's directory, and the pods' `emptyDir` volumes under `volumes/`.
    dir: Arc<tempfile::TempDir>,
}

type Shared = State<FakeKube>;

impl FakeKube {
    /// Serves `versions` of the Sandbox kind (newest first, e.g. `["v1beta1", "v1alpha1"]`).
    pub async fn start(versions: &[&'static str]) -> FakeKube {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\nclusters:\n- name: fake\n  \
                 cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    \
                 cluster: fake\n    user: fake\n    namespace: default\nusers:\n- name: fake\n  \
                 user:\n    token: fake-token\n"
            ),
        )
        .expect("write kubeconfig");
        let (changes, _) = broadcast::channel(1024);
        let fake = FakeKube {
            inner: Arc::new(Mutex::new(Inner {
                rv: 100,
                objects: BTreeMap::new(),
                history: Vec::new(),
                oldest: 100,
                versions: versions.to_vec(),
                down: false,
                refused: 0,
                auto_ready: true,
                epoch: 0,
                logs: BTreeMap::new(),
                ext: Default::default(),
                held: None,
                lists: BTreeMap::new(),
            })),
            changes,
            log_changes: Arc::new(tokio::sync::watch::channel(0).0),
            kubeconfig,
            dir: Arc::new(dir),
        };
        let app = Router::new()
            .route("/apis", get(api_groups))
            .route("/apis/{group}/{version}", get(api_resources))
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/sandboxes",
                get(list_or_watch).post(create),
            )
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/sandboxes/{name}",
                get(get_one).patch(patch).delete(delete),
            )
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/sandboxes/{name}/status",
                get(get_one).patch(patch_status),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}/exec",
                get(exec).post(exec),
            )
            .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(pod_log))
            .merge(claims::routes())
            .fallback(|| async { status(404, "NotFound", "the server could not find it") })
            .with_state(fake.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        fake
    }

    /// Everything answers 503 and open watches end (`true`), or the server is back.
    pub fn set_down(&self, down: bool) {
        let mut inner = self.lock();
        inner.down = down;
        inner.epoch += 1;
    }

    /// How many requests were refused while down.
    pub fn refused(&self) -> u64 {
        self.lock().refused
    }

    /// Whether new and resumed Sandboxes become Ready on their own.
    pub fn set_auto_ready(&self, on: bool) {
        self.lock().auto_ready = on;
    }

    /// Removes a Sandbox without any watch hearing of it: the history is compacted and open
    /// watches end, so the client's next watch gets `410 Gone` and must list again.
    pub fn delete_unannounced(&self, ns: &str, name: &str) {
        let mut inner = self.lock();
        inner.objects.remove(&(ns.into(), name.into()));
        inner.rv += 1;
        inner.history.clear();
        inner.oldest = inner.rv;
        inner.epoch += 1;
    }

    /// Adds a Sandbox as `kubectl apply` would (server-side fields filled in), then runs the
    /// controller on it.
    pub fn apply(&self, mut obj: Value) {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        obj["metadata"]["namespace"] = json!(ns);
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("a name")
            .to_string();
        let mut inner = self.lock();
        let kind = if inner.objects.contains_key(&(ns.clone(), name.clone())) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        obj["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
        obj["metadata"]["creationTimestamp"] = json!("2026-08-01T00:00:00Z");
        self.store(&mut inner, kind, &ns, &name, obj);
        self.reconcile(&mut inner, &ns, &name);
    }

    /// Sets the Sandbox's `Ready` condition and pod IP, as its controller would.
    pub fn set_ready(&self, ns: &str, name: &str, ready: bool) {
        let mut inner = self.lock();
        let Some(mut obj) = inner.objects.get(&(ns.into(), name.into())).cloned() else {
            panic!("no Sandbox {ns}/{name}");
        };
        obj["status"] = ready_status(name, ns, ready, false);
        self.store(&mut inner, "MODIFIED", ns, name, obj);
    }

    /// Deletes a Sandbox as `kubectl delete` would: watches hear of it.
    pub fn remove(&self, ns: &str, name: &str) {
        let mut inner = self.lock();
        if let Some(obj) = inner.objects.get(&(ns.into(), name.into())).cloned() {
            self.store(&mut inner, "DELETED", ns, name, obj);
        }
    }

    /// The stored object, if any.
    pub fn get(&self, ns: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&(ns.into(), name.into())).cloned()
    }

    /// Appends `line` to the log of the Sandbox's pod, as its container printing it would.
    pub fn log(&self, ns: &str, name: &str, line: &str) {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        self.lock()
            .logs
            .entry((ns.into(), name.into()))
            .or_default()
            .push((time, format!("{line}\n")));
        self.log_changes.send_modify(|n| *n += 1);
    }

    /// Whether the Sandbox has a pod: it runs and its controller gave it an IP.
    fn has_pod(&self, ns: &str, name: &str) -> bool {
        self.get(ns, name)
            .is_some_and(|o| o["status"]["podIPs"].is_array())
    }

    /// How many times namespace `ns`'s Sandboxes were listed: a watch's list at its start,
    /// after `410 Gone`, and at each resync.
    pub fn lists(&self, ns: &str) -> u64 {
        self.lock().lists.get(ns).copied().unwrap_or(0)
    }

    /// Where `dir` of a container of Sandbox `ns/name`'s pod is on this machine: a volume
    /// mounted there is a directory of the fake's, made on first use: one the Sandbox's
    /// `volumeClaimTemplates` name (its claim, which the controller puts in place of the pod's
    /// volume of that name) lives as long as the Sandbox, an `emptyDir` as long as the pod;
    /// any other path is itself.
    fn host_dir(
        &self,
        ns: &str,
        name: &str,
        sandbox: &Value,
        container: &Value,
        dir: &str,
    ) -> PathBuf {
        let mounted = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["mountPath"] == dir)
            .and_then(|m| m["name"].as_str());
        let claimed = mounted.filter(|volume| {
            sandbox["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|t| t["metadata"]["name"] == *volume)
        });
        let empty_dir = mounted.filter(|volume| {
            sandbox["spec"]["podTemplate"]["spec"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| v["name"] == *volume && v["emptyDir"].is_object())
        });
        let kind = match (claimed, empty_dir) {
            (Some(volume), _) => ("claims", volume),
            (None, Some(volume)) => ("volumes", volume),
            (None, None) => return PathBuf::from(dir),
        };
        let path = self
            .dir
            .path()
            .join(kind.0)
            .join(ns)
            .join(name)
            .join(kind.1);
        std::fs::create_dir_all(&path).expect("a volume's directory");
        path
    }

    /// The pod of Sandbox `ns/name` went: its `emptyDir` volumes go with it.
    fn drop_volumes(&self, ns: &str, name: &str) {
        let _ = std::fs::remove_dir_all(self.dir.path().join("volumes").join(ns).join(name));
    }

    /// Every stored object's name.
    pub fn names(&self) -> Vec<String> {
        self.lock().objects.keys().map(|(_, n)| n.clone()).collect()
    }

    /// From now on, open watches get no events until [`FakeKube::release_watch`]: the
    /// changes happen (lists and gets see them), their events arrive late, in order.
    pub fn hold_watch(&self) {
        self.lock().held.get_or_insert_with(Vec::new);
    }

    /// Delivers the held events, in order, and every later one at once.
    pub fn release_watch(&self) {
        let held = self.lock().held.take().unwrap_or_default();
        for change in held {
            let _ = self.changes.send(change);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("fake state")
    }

    /// Stores `obj` under a new resource version and tells the watches.
    fn store(&self, inner: &mut Inner, kind: &'static str, ns: &str, name: &str, mut obj: Value) {
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let key = (ns.to_string(), name.to_string());
        // `metadata.generation`, as the API server keeps it: 1 when made, one more at each
        // change of the spec; status and metadata changes leave it.
        if kind != "DELETED" {
            let generation = match inner.objects.get(&key) {
                None => 1,
                Some(old) => {
                    let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    if old["spec"] == obj["spec"] {
                        g
                    } else {
                        g + 1
                    }
                }
            };
            obj["metadata"]["generation"] = json!(generation);
        }
        if kind == "DELETED" {
            inner.objects.remove(&key);
            // The pod, and its log, go with the Sandbox.
            inner.logs.remove(&key);
            self.drop_volumes(ns, name);
            // The Sandbox's claims go with it.
            let _ = std::fs::remove_dir_all(self.dir.path().join("claims").join(ns).join(name));
        } else {
            inner.objects.insert(key, obj.clone());
        }
        let change = Change {
            rv: inner.rv,
            kind,
            namespace: ns.into(),
            object: obj.clone(),
        };
        inner.history.push(change.clone());
        match &mut inner.held {
            Some(held) => held.push(change),
            None => {
                let _ = self.changes.send(change);
            }
        }
        self.log_changes.send_modify(|n| *n += 1);
        if kind == "DELETED" {
            // After the deletion's event: the pool's refill comes later in the history.
            claims::sandbox_deleted(self, inner, ns, &obj);
        }
    }

    /// agent-sandbox's controller, reduced: a running Sandbox gets a Ready pod at 127.0.0.1,
    /// a suspended one loses it.
    fn reconcile(&self, inner: &mut Inner, ns: &str, name: &str) {
        if !inner.auto_ready {
            return;
        }
        let Some(mut obj) = inner.objects.get(&(ns.into(), name.into())).cloned() else {
            return;
        };
        let spec = &obj["spec"];
        let suspended =
            spec["operatingMode"] == "Suspended" || spec["replicas"].as_i64() == Some(0);
        let status = ready_status(name, ns, !suspended, suspended);
        if suspended {
            // No pod while suspended: its volumes went with it.
            self.drop_volumes(ns, name);
        }
        if obj["status"] != status {
            obj["status"] = status;
            self.store(inner, "MODIFIED", ns, name, obj);
        }
    }
}

/// A Sandbox status as agent-sandbox writes it.
pub fn ready_status(name: &str, ns: &str, ready: bool, suspended: bool) -> Value {
    let flag = |b: bool| if b { "True" } else { "False" };
    let mut status = json!({
        "serviceFQDN": format!("{name}.{ns}.svc.cluster.local"),
        "service": name,
        "conditions": [
            {"type": "Ready", "status": flag(ready), "reason": if ready { "DependenciesReady" } else { "PodNotReady" },
             "lastTransitionTime": "2026-08-01T00:00:00Z", "message": ""},
            {"type": "Suspended", "status": flag(suspended), "reason": "", "lastTransitionTime": "2026-08-01T00:00:00Z", "message": ""},
        ],
    });
    if ready {
        status["podIPs"] = json!(["127.0.0.1"]);
    }
    status
}

/// A Kubernetes `Status` error body.
fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn unavailable() -> Response {
    status(503, "ServiceUnavailable", "the fake API server is down")
}

/// The refusal of a request while down (503), or for a `group`/`version` not served (404).
fn refusal(fake: &FakeKube, group: &str, version: &str) -> Option<Response> {
    let mut inner = fake.lock();
    if inner.down {
        inner.refused += 1;
        return Some(unavailable());
    }
    if group != GROUP || !inner.versions.contains(&version) {
        return Some(status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    None
}

/// The object as the asked version shows it.
fn at_version(mut obj: Value, version: &str) -> Value {
    obj["apiVersion"] = json!(format!("{GROUP}/{version}"));
    obj["kind"] = json!("Sandbox");
    obj
}

async fn api_groups(State(fake): Shared) -> Response {
    let mut inner = fake.lock();
    if inner.down {
        inner.refused += 1;
        return unavailable();
    }
    let versions: Vec<Value> = inner
        .versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{GROUP}/{v}"), "version": v}))
        .collect();
    let ext_versions: Vec<Value> = inner
        .versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{}/{v}", claims::EXT_GROUP), "version": v}))
        .collect();
    axum::Json(
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
             "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}},
            {"name": GROUP, "versions": versions, "preferredVersion": versions[0]},
            {"name": claims::EXT_GROUP, "versions": ext_versions, "preferredVersion": ext_versions[0]},
        ]}),
    )
    .into_response()
}

async fn api_resources(
    State(fake): Shared,
    Path((group, version)): Path<(String, String)>,
) -> Response {
    if group == claims::EXT_GROUP {
        return refusal(&fake, GROUP, &version).unwrap_or_else(|| claims::api_resources(&version));
    }
    if let Some(r) = refusal(&fake, &group, &version) {
        return r;
    }
    let verbs = json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ]);
    axum::Json(json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": format!("{group}/{version}"), "resources": [
        {"name": "sandboxes", "singularName": "sandbox", "namespaced": true, "kind": "Sandbox", "verbs": verbs},
        {"name": "sandboxes/status", "singularName": "", "namespaced": true, "kind": "Sandbox", "verbs": ["get", "patch", "update"]},
    ]}))
    .into_response()
}

async fn list_or_watch(
    State(fake): Shared,
    Path((group, version, ns)): Path<(String, String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if let Some(r) = refusal(&fake, &group, &version) {
        return r;
    }
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch(fake, version, ns, &q);
    }
    let mut inner = fake.lock();
    *inner.lists.entry(ns.clone()).or_default() += 1;
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((n, _), _)| *n == ns)
        .map(|(_, o)| at_version(o.clone(), &version))
        .collect();
    axum::Json(
        json!({"kind": "SandboxList", "apiVersion": format!("{GROUP}/{version}"),
        "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}),
    )
    .into_response()
}

/// A watch from `resourceVersion`: the history after it, then live changes, with a bookmark
/// every 200 ms (when asked for), until `timeoutSeconds` or the fake ends open watches.
fn watch(fake: FakeKube, version: String, ns: String, q: &BTreeMap<String, String>) -> Response {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(300u64);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let line = |v: Value| Ok(Bytes::from(format!("{v}\n")));
    let (backlog, epoch, mut live) = {
        let inner = fake.lock();
        if from < inner.oldest {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from} ({})", inner.oldest)}});
            return Response::new(Body::from(format!("{gone}\n")));
        }
        let backlog: Vec<Change> = inner
            .history
            .iter()
            .filter(|c| c.rv > from && c.namespace == ns)
            .cloned()
            .collect();
        (backlog, (inner.epoch, inner.rv), fake.changes.subscribe())
    };
    let (epoch, seen) = epoch;
    tokio::spawn(async move {
        // The newest version this watch has delivered everything up to: what a bookmark
        // says (never a change still on its way).
        let mut last = from.max(seen);
        let event =
            |c: &Change| json!({"type": c.kind, "object": at_version(c.object.clone(), &version)});
        for c in &backlog {
            if tx.send(line(event(c))).await.is_err() {
                return;
            }
        }
        let end = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(end);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            if fake.lock().epoch != epoch {
                return;
            }
            tokio::select! {
                _ = &mut end => return,
                _ = tick.tick() => {
                    if bookmarks {
                        let mark = json!({"type": "BOOKMARK", "object": {"kind": "Sandbox",
                            "apiVersion": format!("{GROUP}/{version}"),
                            "metadata": {"resourceVersion": last.to_string()}}});
                        if tx.send(line(mark)).await.is_err() {
                            return;
                        }
                    }
                }
                c = live.recv() => match c {
                    Ok(c) if c.rv > last => {
                        last = c.rv;
                        if c.namespace == ns && tx.send(line(event(&c))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
            }
        }
    });
    Response::new(Body::from_stream(tokio_stream_from(rx)))
}

/// An mpsc receiver as a stream.
fn tokio_stream_from(
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) })
}

async fn create(
    State(fake): Shared,
    Path((group, version, ns)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
    if let Some(r) = refusal(&fake, &group, &version) {
        return r;
    }
    let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON");
    };
    let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
        return status(422, "Invalid", "metadata.name: Required value");
    };
    if obj["spec"]["podTemplate"].is_null() {
        return status(422, "Invalid", "spec.podTemplate: Required value");
    }
    let mut inner = fake.lock();
    if inner.objects.contains_key(&(ns.clone(), name.clone())) {
        return status(
            409,
            "AlreadyExists",
            &format!("sandboxes.{GROUP} \"{name}\" already exists"),
        );
    }
    // The status subresource: a create cannot set it.
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
    obj["metadata"]["creationTimestamp"] = json!("2026-08-01T00:00:00Z");
    fake.store(&mut inner, "ADDED", &ns, &name, obj);
    fake.reconcile(&mut inner, &ns, &name);
    let stored = inner.objects.get(&(ns, name)).cloned().unwrap_or_default();
    (
        StatusCode::CREATED,
        axum::Json(at_version(stored, &version)),
    )
        .into_response()
}

async fn get_one(
    State(fake): Shared,
    Path((group, version, ns, name)): Path<(String, String, String, String)>,
) -> Response {
    if let Some(r) = refusal(&fake, &group, &version) {
        return r;
    }
    match fake.get(&ns, &name) {
        Some(o) => axum::Json(at_version(o, &version)).into_response(),
        None => status(
            404,
            "NotFound",
            &format!("sandboxes.{GROUP} \"{name}\" not found"),
        ),
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

async fn patch_any(
    fake: FakeKube,
    path: (String, String, String, String),
    headers: HeaderMap,
    body: Bytes,
    status_only: bool,
) -> Response {
    let (group, version, ns, name) = path;
    if let Some(r) = refusal(&fake, &group, &version) {
        return r;
    }
    let ctype = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Merge patch; server-side apply is taken as a merge (no field ownership).
    if !ctype.starts_with("application/merge-patch+json")
        && !ctype.starts_with("application/apply-patch")
    {
        return status(
            415,
            "UnsupportedMediaType",
            &format!("the fake takes merge patches, not {ctype}"),
        );
    }
    let Ok(mut patch) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON");
    };
    let mut inner = fake.lock();
    let Some(mut obj) = inner.objects.get(&(ns.clone(), name.clone())).cloned() else {
        return status(
            404,
            "NotFound",
            &format!("sandboxes.{GROUP} \"{name}\" not found"),
        );
    };
    if status_only {
        patch = json!({"status": patch.get("status").cloned().unwrap_or(Value::Null)});
    } else if let Some(p) = patch.as_object_mut() {
        p.remove("status");
    }
    merge(&mut obj, &patch);
    fake.store(&mut inner, "MODIFIED", &ns, &name, obj);
    if !status_only {
        fake.reconcile(&mut inner, &ns, &name);
    }
    let stored = inner.objects.get(&(ns, name)).cloned().unwrap_or_default();
    axum::Json(at_version(stored, &version)).into_response()
}

async fn patch(
    State(fake): Shared,
    Path(p): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_any(fake, p, headers, body, false).await
}

async fn patch_status(
    State(fake): Shared,
    Path(p): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_any(fake, p, headers, body, true).await
}

async fn delete(
    State(fake): Shared,
    Path((group, version, ns, name)): Path<(String, String, String, String)>,
) -> Response {
    if let Some(r) = refusal(&fake, &group, &version) {
        return r;
    }
    let mut inner = fake.lock();
    let Some(obj) = inner.objects.get(&(ns.clone(), name.clone())).cloned() else {
        return status(
            404,
            "NotFound",
            &format!("sandboxes.{GROUP} \"{name}\" not found"),
        );
    };
    fake.store(&mut inner, "DELETED", &ns, &name, obj.clone());
    axum::Json(at_version(obj, &version)).into_response()
}

/// `pods/{name}/exec` over a WebSocket (`v5.channel.k8s.io`): runs the `command` query
/// parameters here (in the first container's `workingDir`, when it has one, and with its
/// `env`), relaying stdin, stdout and stderr on their channels and ending with the
/// `Status` the kubelet sends (`NonZeroExitCode` with an `ExitCode` cause on failure).
async fn exec(
    State(fake): Shared,
    Path((ns, name)): Path<(String, String)>,
    mut req: axum::extract::Request,
) -> Response {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    if fake.lock().down {
        return unavailable();
    }
    let sandbox = fake
        .get(&ns, &name)
        .filter(|o| o["status"]["podIPs"].is_array());
    let Some(sandbox) = sandbox else {
        return status(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    // Commands start in the container's working directory with its environment, as the
    // kubelet's do.
    let query = req.uri().query().unwrap_or("").to_string();
    let asked = url_pairs(&query)
        .into_iter()
        .find_map(|(k, v)| (k == "container").then_some(v));
    let container = match pod_container(&sandbox, &name, asked.as_deref()) {
        Ok(container) => container,
        Err(message) => return status(400, "BadRequest", &message),
    };
    let cwd = container["workingDir"]
        .as_str()
        .map(|dir| fake.host_dir(&ns, &name, &sandbox, container, dir));
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
        .collect();
    let mut argv = Vec::new();
    let (mut stdin, mut tty) = (false, false);
    for (k, v) in url_pairs(&query) {
        match k.as_str() {
            "command" => argv.push(v),
            "stdin" => stdin = v == "true",
            // With a TTY the kubelet ignores `stderr`: the terminal merges it into stdout.
            "tty" => tty = v == "true",
            _ => {}
        }
    }
    let protocols = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if !protocols
        .split(',')
        .any(|p| p.trim() == "v5.channel.k8s.io")
    {
        return status(400, "BadRequest", "the fake speaks v5.channel.k8s.io only");
    }
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return status(400, "BadRequest", "not a WebSocket upgrade");
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let io = hyper_util::rt::TokioIo::new(upgraded);
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            io,
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        if tty {
            run_tty(ws, argv).await;
        } else {
            run_exec(ws, argv, stdin, cwd, env).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .header("sec-websocket-protocol", "v5.channel.k8s.io")
        .body(Body::empty())
        .unwrap_or_default()
}

/// The query's pairs, percent-decoded.
fn url_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = String::from_utf8_lossy(&bytes[i + 1..i + 3]);
                if let Ok(b) = u8::from_str_radix(&hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A message of the exec protocol: the channel byte, then the data.
fn frame(channel: u8, data: &[u8]) -> tokio_tungstenite::tungstenite::Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    tokio_tungstenite::tungstenite::Message::binary(v)
}

/// The `Status` an exec with no command ends with.
const NO_COMMAND: &[u8] =
    br#"{"metadata":{},"status":"Failure","message":"no command","reason":"BadRequest","code":400}"#;

async fn run_exec<S>(
    ws: tokio_tungstenite::WebSocketStream<S>,
    argv: Vec<String>,
    stdin: bool,
    cwd: Option<PathBuf>,
    env: Vec<(String, String)>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut tx, mut rx) = ws.split();
    let Some((program, args)) = argv.split_first() else {
        let _ = tx.send(frame(3, NO_COMMAND)).await;
        return;
    };
    let mut command = tokio::process::Command::new(program);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    command.envs(env);
    let child = command
        .args(args)
        .stdin(if stdin {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            let st = json!({"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                "message": format!("failed to create containerd task: exec: \"{program}\": executable file not found in $PATH ({e})")});
            let _ = tx.send(frame(3, st.to_string().as_bytes())).await;
            let _ = tx.close().await;
            return;
        }
    };
    let mut child_in = child.stdin.take();
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let (mut out_buf, mut err_buf) = (vec![0u8; 16384], vec![0u8; 16384]);
    let (mut out_open, mut err_open, mut client_open) = (true, true, true);
    while out_open || err_open {
        tokio::select! {
            n = out.read(&mut out_buf), if out_open => match n {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => { let _ = tx.send(frame(1, &out_buf[..n])).await; }
            },
            n = err.read(&mut err_buf), if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => { let _ = tx.send(frame(2, &err_buf[..n])).await; }
            },
            m = rx.next(), if client_open => match m {
                Some(Ok(Message::Binary(b))) if b.first() == Some(&0) => {
                    if let Some(w) = child_in.as_mut() {
                        let _ = w.write_all(&b[1..]).await;
                    }
                }
                Some(Ok(Message::Binary(b))) if b.as_ref() == [255, 0] => child_in = None,
                Some(Ok(_)) => {}
                // The client left: the kubelet ends the exec's stream, not the process.
                _ => {
                    client_open = false;
                    child_in = None;
                }
            },
        }
    }
    let code = child.wait().await.ok().and_then(|s| s.code()).unwrap_or(-1);
    let st = exit_status(code);
    let _ = tx.send(frame(3, st.to_string().as_bytes())).await;
    let _ = tx.close().await;
}

/// The kubelet's closing `Status` for a command that ended with `code`.
fn exit_status(code: i32) -> Value {
    if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
    }
}

/// A TTY exec: the command on a real pseudo-terminal of this machine as its session leader,
/// stdin (0) typed into it, its output (stderr included) on stdout (1), `{"Width","Height"}`
/// on the resize channel (4) set its size. When the client leaves, the terminal stays open
/// and the command runs on (as in a real cluster: nothing hangs it up); the fake drains its
/// output until it ends.
async fn run_tty<S>(ws: tokio_tungstenite::WebSocketStream<S>, argv: Vec<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut tx, mut rx) = ws.split();
    let Some((program, args)) = argv.split_first() else {
        let _ = tx.send(frame(3, NO_COMMAND)).await;
        return;
    };
    let spawned = pty_process::open().and_then(|(pty, pts)| {
        let child = pty_process::Command::new(program).args(args).spawn(pts)?;
        Ok((pty, child))
    });
    let (pty, mut child) = match spawned {
        Ok(opened) => opened,
        Err(e) => {
            let st = json!({"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                "message": format!("failed to create containerd task: exec: \"{program}\": executable file not found in $PATH ({e})")});
            let _ = tx.send(frame(3, st.to_string().as_bytes())).await;
            let _ = tx.close().await;
            return;
        }
    };
    let (mut read, mut write) = pty.into_split();
    let mut buf = vec![0u8; 16384];
    let mut client_open = true;
    loop {
        tokio::select! {
            // EOF or EIO: every process holding the terminal is gone.
            n = read.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if client_open && tx.send(frame(1, &buf[..n])).await.is_err() {
                        client_open = false;
                    }
                }
            },
            m = rx.next(), if client_open => match m {
                Some(Ok(Message::Binary(b))) if b.first() == Some(&0) => {
                    let _ = write.write_all(&b[1..]).await;
                }
                Some(Ok(Message::Binary(b))) if b.first() == Some(&4) => {
                    let size: Value = serde_json::from_slice(&b[1..]).unwrap_or_default();
                    let dim = |k: &str| size[k].as_u64().and_then(|v| u16::try_from(v).ok());
                    if let (Some(w), Some(h)) = (dim("Width"), dim("Height")) {
                        let _ = write.resize(pty_process::Size::new(h, w));
                    }
                }
                Some(Ok(_)) => {}
                _ => client_open = false,
            },
        }
    }
    // A process killed by a signal ends as the runtime reports it: 128 + the signal.
    let code = match child.wait().await {
        Ok(s) => s
            .code()
            .or_else(|| std::os::unix::process::ExitStatusExt::signal(&s).map(|n| 128 + n))
            .unwrap_or(-1),
        Err(_) => -1,
    };
    if client_open {
        let _ = tx
            .send(frame(3, exit_status(code).to_string().as_bytes()))
            .await;
        let _ = tx.close().await;
    }
}

/// The container of a Sandbox's pod an exec or a log asks for (`asked`), as the API server
/// picks it: the one named, else the only one; a pod with several refuses a request naming
/// none, and any pod one naming a container it does not have (both 400 with the real message,
/// returned here).
fn pod_container<'a>(
    sandbox: &'a Value,
    pod: &str,
    asked: Option<&str>,
) -> Result<&'a Value, String> {
    let containers = sandbox["spec"]["podTemplate"]["spec"]["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    match (asked, containers) {
        (None, [only]) => Ok(only),
        (None, _) => {
            let names: Vec<&str> = containers
                .iter()
                .filter_map(|c| c["name"].as_str())
                .collect();
            Err(format!(
                "a container name must be specified for pod {pod}, choose one of: [{}]",
                names.join(" ")
            ))
        }
        (Some(asked), _) => containers
            .iter()
            .find(|c| c["name"] == asked)
            .ok_or_else(|| format!("container {asked} is not valid for pod {pod}")),
    }
}

/// `pods/{name}/log`: the pod's log buffer as plain text, its last `tailLines` lines, each
/// line after its time with `timestamps=true`; with `follow=true` what is appended next,
/// until the pod goes (its Sandbox is deleted or suspended) or the client leaves.
async fn pod_log(
    State(fake): Shared,
    Path((ns, name)): Path<(String, String)>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    if fake.lock().down {
        return unavailable();
    }
    if !fake.has_pod(&ns, &name) {
        return status(404, "NotFound", &format!("pods \"{name}\" not found"));
    }
    let sandbox = fake.get(&ns, &name).unwrap_or_default();
    if let Err(message) = pod_container(&sandbox, &name, q.get("container").map(String::as_str)) {
        return status(400, "BadRequest", &message);
    }
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true");
    let (follow, timestamps) = (flag("follow"), flag("timestamps"));
    let tail: Option<usize> = q.get("tailLines").and_then(|t| t.parse().ok());
    let key = (ns.clone(), name.clone());
    let render = move |lines: &[(String, String)]| -> String {
        lines
            .iter()
            .map(|(time, line)| {
                if timestamps {
                    format!("{time} {line}")
                } else {
                    line.clone()
                }
            })
            .collect()
    };
    let mut changed = fake.log_changes.subscribe();
    let (backlog, mut sent) = {
        let inner = fake.lock();
        let lines = inner.logs.get(&key).map(Vec::as_slice).unwrap_or_default();
        let from = tail.map_or(0, |n| lines.len().saturating_sub(n));
        (render(&lines[from..]), lines.len())
    };
    let text = [("content-type", "text/plain")];
    if !follow {
        return (text, backlog).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        if tx.send(Ok(Bytes::from(backlog))).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                () = tx.closed() => return,
                r = changed.changed() => if r.is_err() { return },
            }
            if !fake.has_pod(&ns, &name) {
                return;
            }
            let more = {
                let inner = fake.lock();
                let lines = inner.logs.get(&key).map(Vec::as_slice).unwrap_or_default();
                let more = render(lines.get(sent..).unwrap_or_default());
                sent = lines.len();
                more
            };
            if !more.is_empty() && tx.send(Ok(Bytes::from(more))).await.is_err() {
                return;
            }
        }
    });
    (text, Body::from_stream(tokio_stream_from(rx))).into_response()
}
