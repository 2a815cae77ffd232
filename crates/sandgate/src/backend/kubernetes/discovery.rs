//! What the cluster holds: a Sandbox object read in the backend's terms ([`Discovered`]),
//! the stable id of one the gateway did not create, and the watch that reports every change
//! (and a full list after each `410 Gone` and resync) to the manager.

use std::net::IpAddr;

use futures_util::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::{KubeBackend, ANNOTATION_NAME, LABEL_ID, LABEL_USER};
use crate::model;

/// One Sandbox as the cluster reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    /// The sandgate id: the `sandgate.dev/sandbox` label, else derived from namespace/name.
    pub id: String,
    /// The resource's name.
    pub resource: String,
    pub namespace: String,
    /// What the gateway records for it (`backend_ref`): its name in the namespace the API
    /// creates in, `namespace/name` in another watched one.
    pub reference: String,
    /// The `user` label (absent: `default`).
    pub owner: String,
    /// The route name: the `sandgate.dev/name` annotation, else the resource's name.
    pub name: Option<String>,
    /// Whether the gateway created it (it carries the id label).
    pub created_here: bool,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// Suspended by its spec (`operatingMode: Suspended`, or `replicas: 0`).
    pub suspended: bool,
    /// The pod's first IP.
    pub pod_ip: Option<String>,
    /// The object's `resourceVersion`, to tell a report older than what the gateway saw.
    pub version: Option<String>,
}

/// What the watch reports to the manager.
#[derive(Debug, Clone)]
pub enum Observed {
    /// A Sandbox was added or changed.
    Applied(Discovered),
    /// A Sandbox went (by id).
    Deleted(String),
    /// A full list of one watched namespace: every Sandbox it has; `listed_at` is when the
    /// list began, so records written since are not mistaken for vanished ones.
    Snapshot {
        namespace: String,
        all: Vec<Discovered>,
        listed_at: chrono::DateTime<chrono::Utc>,
    },
}

/// The id of a Sandbox the gateway did not create: `sb-` and 16 base32 characters of a hash
/// of its namespace and name, so every gateway derives the same one.
pub fn derived_id(namespace: &str, name: &str) -> String {
    const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let mut id = String::from("sb-");
    id.extend(
        digest
            .iter()
            .take(16)
            .map(|b| BASE32[(b & 31) as usize] as char),
    );
    id
}

/// What a Sandbox object says, in the backend's terms (`home`: the namespace the API creates
/// in); `None` for one that is no user's sandbox: a warm-pool member nobody claimed, or one
/// a gateway's claim got and has not labelled yet (see `claims.rs`).
pub fn discovered(obj: &DynamicObject, home: &str) -> Option<Discovered> {
    if super::claims::unclaimed(obj) || super::claims::in_handover(obj) {
        return None;
    }
    let meta = &obj.metadata;
    let resource = meta.name.clone()?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let labels = meta.labels.clone().unwrap_or_default();
    let id_label = labels.get(LABEL_ID).filter(|id| model::valid_id(id));
    let id = id_label
        .cloned()
        .unwrap_or_else(|| derived_id(&namespace, &resource));
    let owner = labels
        .get(LABEL_USER)
        .filter(|u| model::valid_label(u) && !model::RESERVED_OWNERS.contains(&u.as_str()))
        .cloned()
        .unwrap_or_else(|| model::DEFAULT_OWNER.into());
    let name = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_NAME))
        .cloned()
        .or_else(|| id_label.is_none().then(|| resource.clone()))
        .filter(|n| model::valid_label(n));
    let spec = obj.data.get("spec");
    let suspended = spec.is_some_and(|s| {
        s.get("operatingMode").and_then(Value::as_str) == Some("Suspended")
            || s.get("replicas").and_then(Value::as_i64) == Some(0)
    });
    let status = obj.data.get("status");
    let ready = status
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        });
    let pod_ip = status
        .and_then(|s| s.get("podIPs"))
        .and_then(Value::as_array)
        .and_then(|ips| ips.iter().filter_map(Value::as_str).next())
        .filter(|ip| ip.parse::<IpAddr>().is_ok())
        .map(str::to_string);
    let reference = if namespace == home {
        resource.clone()
    } else {
        format!("{namespace}/{resource}")
    };
    Some(Discovered {
        version: meta.resource_version.clone(),
        id,
        resource,
        namespace,
        reference,
        owner,
        name,
        created_here: id_label.is_some(),
        ready,
        suspended,
        pod_ip,
    })
}

impl KubeBackend {
    /// Watches each configured namespace's Sandboxes until `stop`, reporting on `to`: per
    /// namespace a full list first (and after every `410 Gone` and every resync), then each
    /// change. A watch retries with backoff while the API server is unreachable; nothing is
    /// reported meanwhile, so the route table keeps the last known state.
    pub fn watch(&self, to: UnboundedSender<Observed>, stop: CancellationToken) {
        let home = self.config.namespace();
        for namespace in &self.config.namespaces {
            let api = Api::namespaced_with(self.client.clone(), namespace, &self.resource);
            // Claims are made in the first namespace only.
            let claims = self.claims.clone().filter(|_| namespace == home);
            tokio::spawn(watch_namespace(
                Watched {
                    api,
                    namespace: namespace.clone(),
                    home: home.to_string(),
                    claims,
                    seen: self.seen.clone(),
                },
                self.config.resync,
                to.clone(),
                stop.clone(),
            ));
        }
    }
}

/// What one namespace's watch watches.
struct Watched {
    api: Api<DynamicObject>,
    namespace: String,
    /// The namespace the API creates in.
    home: String,
    /// That namespace's claims, when this is it and the cluster serves them.
    claims: Option<super::claims::Claims>,
    seen: super::seen::Seen,
}

impl Watched {
    /// A Sandbox is going: when it was claimed by a gateway, its claim goes too (deleted
    /// with `kubectl`, the claim controller would otherwise make it another, which nobody
    /// would ever see or delete). Deleting a claim that is already gone is no error.
    fn release_claim_of(&self, obj: &DynamicObject) {
        let (Some(claims), Some(claim)) = (&self.claims, super::claims::gateway_claim(obj)) else {
            return;
        };
        let (claims, claim) = (claims.clone(), claim.to_string());
        tokio::spawn(async move {
            if let Err(e) = claims.release(&claim).await {
                tracing::warn!(claim = %claim, error = %e, "deleting the claim of a deleted Sandbox");
            }
        });
    }
}

/// One namespace's watch (see [`KubeBackend::watch`]).
async fn watch_namespace(
    watched: Watched,
    resync: std::time::Duration,
    to: UnboundedSender<Observed>,
    stop: CancellationToken,
) {
    let Watched {
        api,
        namespace,
        home,
        ..
    } = &watched;
    let read = |obj: &DynamicObject| discovered(obj, home);
    loop {
        let stream = watcher::watcher(api.clone(), watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let deadline = tokio::time::sleep(resync);
        let mut deadline = std::pin::pin!(deadline);
        let mut listing: Option<(Vec<Discovered>, chrono::DateTime<chrono::Utc>)> = None;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                _ = to.closed() => return,
                _ = &mut deadline => break,
                e = stream.next() => e,
            };
            let report = match event {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, namespace = %namespace, "watching Sandboxes");
                    continue;
                }
                Some(Ok(Event::Init)) => {
                    listing = Some((Vec::new(), model::now()));
                    continue;
                }
                Some(Ok(Event::InitApply(obj))) => {
                    if let (Some((all, _)), Some(d)) = (&mut listing, read(&obj)) {
                        if obj.metadata.deletion_timestamp.is_none() {
                            all.push(d);
                        }
                    }
                    continue;
                }
                Some(Ok(Event::InitDone)) => match listing.take() {
                    Some((all, listed_at)) => Observed::Snapshot {
                        namespace: namespace.clone(),
                        all,
                        listed_at,
                    },
                    None => continue,
                },
                Some(Ok(Event::Apply(obj))) => match read(&obj) {
                    Some(d) if obj.metadata.deletion_timestamp.is_some() => {
                        watched.release_claim_of(&obj);
                        watched.seen.forget(&d.reference);
                        Observed::Deleted(d.id)
                    }
                    Some(d) => Observed::Applied(d),
                    None => continue,
                },
                Some(Ok(Event::Delete(obj))) => {
                    watched.release_claim_of(&obj);
                    match read(&obj) {
                        Some(d) => {
                            watched.seen.forget(&d.reference);
                            Observed::Deleted(d.id)
                        }
                        None => continue,
                    }
                }
            };
            if to.send(report).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sandbox(v: Value) -> DynamicObject {
        serde_json::from_value(v).expect("a Sandbox")
    }

    #[test]
    fn discovery_reads_labels_readiness_and_pod_ip() {
        let d = discovered(&sandbox(json!({
            "apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
            "metadata": {"name": "my-sandbox", "namespace": "default", "labels": {"user": "alice"}},
            "spec": {"operatingMode": "Running"},
            "status": {"podIPs": ["10.0.0.7"], "conditions": [{"type": "Ready", "status": "True"}]}
        })), "default")
        .expect("discovered");
        assert_eq!(d.owner, "alice");
        assert_eq!(d.name.as_deref(), Some("my-sandbox"));
        assert!(d.ready && !d.suspended && !d.created_here);
        assert_eq!(d.pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(d.id, derived_id("default", "my-sandbox"));
        assert_eq!(
            d.reference, "my-sandbox",
            "in the namespace the API creates in"
        );
        assert!(model::valid_id(&d.id));

        let d = discovered(
            &sandbox(json!({
                "apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox",
                "metadata": {"name": "x", "namespace": "ns", "labels": {"user": "sandboxes"}},
                "spec": {"replicas": 0},
                "status": {"conditions": [{"type": "Ready", "status": "False"}]}
            })),
            "default",
        )
        .expect("discovered");
        assert_eq!(d.owner, "default", "a reserved user label is not a route");
        assert!(!d.ready && d.suspended && d.pod_ip.is_none());
        assert_eq!(d.reference, "ns/x", "in another watched namespace");
    }
}
