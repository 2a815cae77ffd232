//! The fake API server's share of agent-sandbox's extensions group
//! (`extensions.agents.x-k8s.io`, the same versions as the Sandbox kind): `SandboxWarmPool`
//! and `SandboxClaim` objects (list, create, get, delete, and `GET …/status`) and a small
//! controller doing what agent-sandbox's does where the gateway depends on it:
//!
//! - a pool with `spec.replicas: N` keeps N Sandboxes (`{pool}-{suffix}`, like its
//!   `generateName`) controlled by it (a controller `ownerReference`) and labelled
//!   `agents.x-k8s.io/warm-pool-sandbox`; the Sandbox controller makes them Ready;
//! - a claim (`spec.warmPoolRef.name`, v1alpha1 `spec.warmpool` with `spec.sandboxTemplateRef`)
//!   adopts one in a single change (the pool's label and ownership removed, the claim made its
//!   controller), records it in `status.sandbox.name` (and `podIPs`), the
//!   `agents.x-k8s.io/sandbox-name` annotation and a `Ready` condition; the pool refills;
//! - an empty pool makes the claim a cold Sandbox named after the claim; a missing pool gives
//!   the claim `Ready=False` `WarmPoolNotFound`; a pool told it cannot supply (its template
//!   "missing") gives `TemplateNotFound` once it is empty; a held controller answers no claim;
//! - deleting a claim or pool deletes the Sandboxes it controls (garbage collection, done at
//!   once), a pool member's deletion refills its pool, and a claim whose Sandbox is deleted
//!   directly gets another (from the pool, else cold).
//!
//! Not implemented: templates (`SandboxTemplate` is not served; members get a fixed pod
//! template), patches and watches of claims and pools, claim `env`, lifecycle/expiry,
//! `additionalPodMetadata`, `podIPs` mirrored after adoption, update strategies.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use std::collections::BTreeMap;

use super::{status, unavailable, FakeKube, Inner};

pub const EXT_GROUP: &str = "extensions.agents.x-k8s.io";
/// The label the real pool controller puts on its members.
pub const POOL_LABEL: &str = "agents.x-k8s.io/warm-pool-sandbox";

/// The extensions group's objects and the controller's knobs.
#[derive(Debug, Default)]
pub struct Extensions {
    /// (namespace, name) → SandboxWarmPool.
    pools: BTreeMap<(String, String), Value>,
    /// (namespace, name) → SandboxClaim.
    claims: BTreeMap<(String, String), Value>,
    /// Pools cannot make Sandboxes (their template is "missing").
    no_supply: bool,
    /// The claim controller does nothing (as when it is not running).
    held: bool,
    /// For member names.
    made: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Pool,
    Claim,
}

impl Kind {
    fn from_plural(plural: &str) -> Option<Kind> {
        match plural {
            "sandboxwarmpools" => Some(Kind::Pool),
            "sandboxclaims" => Some(Kind::Claim),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Pool => "SandboxWarmPool",
            Kind::Claim => "SandboxClaim",
        }
    }
    fn plural(self) -> &'static str {
        match self {
            Kind::Pool => "sandboxwarmpools",
            Kind::Claim => "sandboxclaims",
        }
    }
    fn objects(self, ext: &mut Extensions) -> &mut BTreeMap<(String, String), Value> {
        match self {
            Kind::Pool => &mut ext.pools,
            Kind::Claim => &mut ext.claims,
        }
    }
}

/// The extensions group's routes (added to the fake's router).
pub fn routes() -> Router<FakeKube> {
    Router::new()
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}",
            get(list).post(create),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
            get(get_one).delete(delete),
        )
        .route(
            "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}/status",
            get(get_one),
        )
}

/// `/apis/extensions.agents.x-k8s.io/{version}`: both kinds and their status subresources.
pub fn api_resources(version: &str) -> Response {
    let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
    let mut resources = Vec::new();
    for kind in [Kind::Claim, Kind::Pool] {
        resources.push(
            json!({"name": kind.plural(), "singularName": kind.name().to_lowercase(),
            "namespaced": true, "kind": kind.name(), "verbs": verbs}),
        );
        resources.push(
            json!({"name": format!("{}/status", kind.plural()), "singularName": "",
            "namespaced": true, "kind": kind.name(), "verbs": ["get", "patch", "update"]}),
        );
    }
    axum::Json(json!({"kind": "APIResourceList", "apiVersion": "v1",
        "groupVersion": format!("{EXT_GROUP}/{version}"), "resources": resources}))
    .into_response()
}

/// Why a request is refused: the fake is down (503), or another group, an unserved version
/// or an unknown plural (404).
enum Refused {
    Down,
    NotFound,
}

impl Refused {
    fn response(self) -> Response {
        match self {
            Refused::Down => unavailable(),
            Refused::NotFound => status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        }
    }
}

/// The kind a request is for, or why it is refused.
fn refusal(fake: &FakeKube, group: &str, version: &str, plural: &str) -> Result<Kind, Refused> {
    let mut inner = fake.lock();
    if inner.down {
        inner.refused += 1;
        return Err(Refused::Down);
    }
    match Kind::from_plural(plural) {
        Some(kind) if group == EXT_GROUP && inner.versions.contains(&version) => Ok(kind),
        _ => Err(Refused::NotFound),
    }
}

fn at_version(mut obj: Value, kind: Kind, version: &str) -> Value {
    obj["apiVersion"] = json!(format!("{EXT_GROUP}/{version}"));
    obj["kind"] = json!(kind.name());
    obj
}

fn not_found(kind: Kind, name: &str) -> Response {
    status(
        404,
        "NotFound",
        &format!("{}.{EXT_GROUP} \"{name}\" not found", kind.plural()),
    )
}

async fn list(
    State(fake): State<FakeKube>,
    Path((group, version, ns, plural)): Path<(String, String, String, String)>,
    Query(_q): Query<BTreeMap<String, String>>,
) -> Response {
    let kind = match refusal(&fake, &group, &version, &plural) {
        Ok(k) => k,
        Err(r) => return r.response(),
    };
    let mut inner = fake.lock();
    let rv = inner.rv.to_string();
    let items: Vec<Value> = kind
        .objects(&mut inner.ext)
        .iter()
        .filter(|((n, _), _)| *n == ns)
        .map(|(_, o)| at_version(o.clone(), kind, &version))
        .collect();
    axum::Json(json!({"kind": format!("{}List", kind.name()),
        "apiVersion": format!("{EXT_GROUP}/{version}"),
        "metadata": {"resourceVersion": rv}, "items": items}))
    .into_response()
}

async fn get_one(
    State(fake): State<FakeKube>,
    Path((group, version, ns, plural, name)): Path<(String, String, String, String, String)>,
) -> Response {
    let kind = match refusal(&fake, &group, &version, &plural) {
        Ok(k) => k,
        Err(r) => return r.response(),
    };
    let mut inner = fake.lock();
    match kind.objects(&mut inner.ext).get(&(ns, name.clone())) {
        Some(o) => axum::Json(at_version(o.clone(), kind, &version)).into_response(),
        None => not_found(kind, &name),
    }
}

async fn create(
    State(fake): State<FakeKube>,
    Path((group, version, ns, plural)): Path<(String, String, String, String)>,
    body: Bytes,
) -> Response {
    let kind = match refusal(&fake, &group, &version, &plural) {
        Ok(k) => k,
        Err(r) => return r.response(),
    };
    let Ok(mut obj) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "not JSON");
    };
    let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) else {
        return status(422, "Invalid", "metadata.name: Required value");
    };
    // The CRDs' required fields, per version.
    let required = match (kind, version.as_str()) {
        (Kind::Claim, "v1alpha1") => (
            "spec.sandboxTemplateRef.name",
            &obj["spec"]["sandboxTemplateRef"]["name"],
        ),
        (Kind::Claim, _) => ("spec.warmPoolRef.name", &obj["spec"]["warmPoolRef"]["name"]),
        (Kind::Pool, _) => (
            "spec.sandboxTemplateRef.name",
            &obj["spec"]["sandboxTemplateRef"]["name"],
        ),
    };
    if !required.1.is_string() {
        return status(422, "Invalid", &format!("{}: Required value", required.0));
    }
    let mut inner = fake.lock();
    if kind
        .objects(&mut inner.ext)
        .contains_key(&(ns.clone(), name.clone()))
    {
        return status(
            409,
            "AlreadyExists",
            &format!("{}.{EXT_GROUP} \"{name}\" already exists", kind.plural()),
        );
    }
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
    admit(&mut inner, &ns, &name, &mut obj);
    kind.objects(&mut inner.ext)
        .insert((ns.clone(), name.clone()), obj);
    match kind {
        Kind::Pool => fill(&fake, &mut inner, &ns, &name),
        Kind::Claim => bind(&fake, &mut inner, &ns, &name),
    }
    let stored = kind.objects(&mut inner.ext).get(&(ns, name)).cloned();
    (
        StatusCode::CREATED,
        axum::Json(at_version(stored.unwrap_or_default(), kind, &version)),
    )
        .into_response()
}

async fn delete(
    State(fake): State<FakeKube>,
    Path((group, version, ns, plural, name)): Path<(String, String, String, String, String)>,
) -> Response {
    let kind = match refusal(&fake, &group, &version, &plural) {
        Ok(k) => k,
        Err(r) => return r.response(),
    };
    let mut inner = fake.lock();
    let Some(obj) = kind
        .objects(&mut inner.ext)
        .remove(&(ns.clone(), name.clone()))
    else {
        return not_found(kind, &name);
    };
    collect_garbage(&fake, &mut inner, &ns, kind, &name);
    axum::Json(at_version(obj, kind, &version)).into_response()
}

/// Server-side fields of a new object.
fn admit(inner: &mut Inner, ns: &str, name: &str, obj: &mut Value) {
    inner.rv += 1;
    obj["metadata"]["namespace"] = json!(ns);
    obj["metadata"]["uid"] = json!(format!("uid-{ns}-{name}-{}", inner.rv));
    obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    obj["metadata"]["creationTimestamp"] = json!("2026-08-01T00:00:00Z");
}

/// A controller `ownerReference` to `owner` of `kind`.
fn controller_ref(kind: Kind, owner: &Value) -> Value {
    json!({"apiVersion": format!("{EXT_GROUP}/v1beta1"), "kind": kind.name(),
        "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
        "controller": true, "blockOwnerDeletion": true})
}

/// The name of the `kind` object that controls Sandbox `obj`.
fn controller(obj: &Value, kind: Kind) -> Option<String> {
    obj["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|r| r["controller"] == true && r["kind"] == kind.name())
        .and_then(|r| r["name"].as_str().map(str::to_string))
}

/// The Sandboxes of namespace `ns` that `owner` (a `kind`) controls, by name.
fn controlled(inner: &Inner, ns: &str, kind: Kind, owner: &str) -> Vec<String> {
    inner
        .objects
        .iter()
        .filter(|((n, _), o)| n == ns && controller(o, kind).as_deref() == Some(owner))
        .map(|((_, name), _)| name.clone())
        .collect()
}

/// A Sandbox as the pool controller (or a cold claim) makes it: the template's pod.
fn member(name: &str, ns: &str, labels: Value, owner: Value) -> Value {
    json!({"apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
            "ownerReferences": [owner]},
        "spec": {"podTemplate": {"spec": {"containers": [
            {"name": "sandbox", "image": "python:3-slim", "ports": [{"containerPort": 8888}]}]}}}})
}

/// Tops pool `pool` up to its `spec.replicas` Ready members.
fn fill(fake: &FakeKube, inner: &mut Inner, ns: &str, pool: &str) {
    let Some(obj) = inner.ext.pools.get(&(ns.into(), pool.into())).cloned() else {
        return;
    };
    if inner.ext.no_supply {
        return;
    }
    let want = obj["spec"]["replicas"].as_u64().unwrap_or(1) as usize;
    let mut have = controlled(inner, ns, Kind::Pool, pool).len();
    while have < want {
        inner.ext.made += 1;
        let name = format!("{pool}-{:05x}", inner.ext.made);
        let mut sb = member(
            &name,
            ns,
            json!({POOL_LABEL: pool}),
            controller_ref(Kind::Pool, &obj),
        );
        sb["metadata"]["uid"] = json!(format!("uid-{ns}-{name}"));
        sb["metadata"]["creationTimestamp"] = json!("2026-08-01T00:00:00Z");
        fake.store(inner, "ADDED", ns, &name, sb);
        fake.reconcile(inner, ns, &name);
        have += 1;
    }
}

/// The claim controller: gives claim `claim` a Sandbox (adopted from its pool, else cold), or
/// a `Ready=False` condition saying why not.
fn bind(fake: &FakeKube, inner: &mut Inner, ns: &str, claim: &str) {
    let key = (ns.to_string(), claim.to_string());
    let Some(mut obj) = inner.ext.claims.get(&key).cloned() else {
        return;
    };
    if obj["status"]["sandbox"]["name"].is_string() || inner.ext.held {
        return;
    }
    let spec = &obj["spec"];
    let pool = spec["warmPoolRef"]["name"]
        .as_str()
        .or(spec["warmpool"].as_str())
        .unwrap_or_default()
        .to_string();
    let condition = |reason: &str, message: String| {
        json!({"type": "Ready", "status": "False", "reason": reason, "message": message,
            "lastTransitionTime": "2026-08-01T00:00:00Z"})
    };
    let pool_exists = inner.ext.pools.contains_key(&(ns.into(), pool.clone()));
    let candidate = controlled(inner, ns, Kind::Pool, &pool)
        .into_iter()
        .find(|n| inner.objects[&(ns.to_string(), n.clone())]["status"]["podIPs"].is_array());
    let sandbox = if !pool_exists {
        obj["status"] = json!({"conditions": [condition("WarmPoolNotFound",
            format!("SandboxWarmPool \"{pool}\" not found"))]});
        None
    } else if let Some(name) = candidate {
        // Adoption: one change moves the Sandbox from the pool to the claim.
        let mut sb = inner.objects[&(ns.to_string(), name.clone())].clone();
        if let Some(labels) = sb["metadata"]["labels"].as_object_mut() {
            labels.remove(POOL_LABEL);
            labels.insert("agents.x-k8s.io/launch-type".into(), json!("warm"));
        }
        sb["metadata"]["ownerReferences"] = json!([controller_ref(Kind::Claim, &obj)]);
        fake.store(inner, "MODIFIED", ns, &name, sb);
        Some(name)
    } else if inner.ext.no_supply {
        obj["status"] = json!({"conditions": [condition("TemplateNotFound",
            format!("SandboxTemplate of SandboxWarmPool \"{pool}\" not found"))]});
        None
    } else {
        // Cold start: a Sandbox named after the claim.
        let mut sb = member(claim, ns, json!({}), controller_ref(Kind::Claim, &obj));
        sb["metadata"]["uid"] = json!(format!("uid-{ns}-{claim}"));
        fake.store(inner, "ADDED", ns, claim, sb);
        fake.reconcile(inner, ns, claim);
        Some(claim.to_string())
    };
    if let Some(name) = sandbox {
        let ips = inner.objects[&(ns.to_string(), name.clone())]["status"]["podIPs"].clone();
        obj["metadata"]["annotations"]["agents.x-k8s.io/sandbox-name"] = json!(name);
        obj["status"] = json!({"sandbox": {"name": name, "podIPs": ips},
            "conditions": [{"type": "Ready", "status": "True", "reason": "DependenciesReady",
                "message": "", "lastTransitionTime": "2026-08-01T00:00:00Z"}]});
    }
    inner.rv += 1;
    obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
    inner.ext.claims.insert(key, obj);
    fill(fake, inner, ns, &pool);
}

/// After claim or pool `name` went: the Sandboxes it controlled go too.
fn collect_garbage(fake: &FakeKube, inner: &mut Inner, ns: &str, kind: Kind, name: &str) {
    for sb in controlled(inner, ns, kind, name) {
        if let Some(obj) = inner.objects.get(&(ns.to_string(), sb.clone())).cloned() {
            fake.store(inner, "DELETED", ns, &sb, obj);
        }
    }
}

/// Called as Sandbox `obj` is deleted: a pool member's pool refills.
pub fn sandbox_deleted(fake: &FakeKube, inner: &mut Inner, ns: &str, obj: &Value) {
    if let Some(pool) = controller(obj, Kind::Pool) {
        fill(fake, inner, ns, &pool);
    }
    // A claim whose Sandbox was deleted directly gets another.
    if let Some(claim) = controller(obj, Kind::Claim) {
        let key = (ns.to_string(), claim.clone());
        if let Some(c) = inner.ext.claims.get_mut(&key) {
            c["status"] = json!({});
            bind(fake, inner, ns, &claim);
        }
    }
}

impl FakeKube {
    /// Adds a `SandboxWarmPool` of `replicas` as `kubectl apply` would; the controller fills it.
    pub fn add_pool(&self, ns: &str, name: &str, replicas: u32) {
        let mut obj = json!({"apiVersion": format!("{EXT_GROUP}/v1beta1"),
            "kind": "SandboxWarmPool",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": replicas, "sandboxTemplateRef": {"name": format!("{name}-template")}}});
        let mut inner = self.lock();
        admit(&mut inner, ns, name, &mut obj);
        inner.ext.pools.insert((ns.into(), name.into()), obj);
        fill(self, &mut inner, ns, name);
    }

    /// Whether pools can make Sandboxes (`false`: their template is "missing": no refills,
    /// no cold starts).
    pub fn set_pool_supply(&self, on: bool) {
        let mut inner = self.lock();
        inner.ext.no_supply = !on;
        let pools: Vec<(String, String)> = inner.ext.pools.keys().cloned().collect();
        for (ns, pool) in pools {
            fill(self, &mut inner, &ns, &pool);
        }
    }

    /// Whether the claim controller is stopped: new claims get no Sandbox and no status.
    pub fn set_claims_held(&self, held: bool) {
        self.lock().ext.held = held;
    }

    /// The stored claim, if any.
    pub fn claim(&self, ns: &str, name: &str) -> Option<Value> {
        self.lock()
            .ext
            .claims
            .get(&(ns.into(), name.into()))
            .cloned()
    }

    /// Every claim's name.
    pub fn claim_names(&self) -> Vec<String> {
        self.lock()
            .ext
            .claims
            .keys()
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// The names of the Sandboxes pool `pool` controls (its unclaimed members).
    pub fn pool_members(&self, ns: &str, pool: &str) -> Vec<String> {
        controlled(&self.lock(), ns, Kind::Pool, pool)
    }

    /// The Sandboxes claim `claim` controls, by name.
    pub fn claimed(&self, ns: &str, claim: &str) -> Vec<String> {
        controlled(&self.lock(), ns, Kind::Claim, claim)
    }
}
