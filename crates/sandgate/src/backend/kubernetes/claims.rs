//! Warm-pool claims: a create of a runtime naming a `SandboxWarmPool` makes a `SandboxClaim`
//! (agent-sandbox's `extensions.agents.x-k8s.io`) named by the sandbox id, waits for the
//! Sandbox the claim controller hands it (`status.sandbox.name`) and labels that Sandbox as
//! the gateway's; the ownership rules that keep unclaimed pool members out of discovery.

use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::Client;
use serde_json::json;

use super::{
    is_not_found, KubeBackend, KubeError, ANNOTATION_NAME, LABEL_ID, LABEL_USER, START_WAIT,
    VERSIONS,
};
use crate::backend::{BackendError, Started};
use crate::model::{self, Sandbox};

/// agent-sandbox's extensions API group (`SandboxClaim`, `SandboxWarmPool`).
pub const EXT_GROUP: &str = "extensions.agents.x-k8s.io";
const CLAIM_KIND: &str = "SandboxClaim";
const POOL_KIND: &str = "SandboxWarmPool";
/// The claim's `Ready` reasons that retrying will not change soon: the controller names a
/// missing pool or template, or refuses the claim's metadata.
const TERMINAL_REASONS: [&str; 4] = [
    "WarmPoolNotFound",
    "TemplateNotFound",
    "InvalidMetadata",
    "EnvVarsInjectionRejected",
];

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "the cluster serves no SandboxClaim kind of {EXT_GROUP}; are agent-sandbox's \
         extensions installed?"
    )]
    NotServed,
    #[error("SandboxWarmPool {pool:?} not found in namespace {namespace:?}")]
    NoPool { pool: String, namespace: String },
    #[error("SandboxWarmPool {pool:?}: {source}")]
    PoolApi {
        pool: String,
        #[source]
        source: kube::Error,
    },
    #[error("SandboxClaim {claim} was deleted before it got a Sandbox")]
    Gone { claim: String },
    #[error("SandboxClaim {claim}: {reason}: {message}")]
    Refused {
        claim: String,
        reason: String,
        message: String,
    },
    #[error(
        "SandboxClaim {claim}: SandboxWarmPool {pool:?} handed over no Sandbox within {}s",
        .waited.as_secs()
    )]
    NotSupplied {
        claim: String,
        pool: String,
        waited: Duration,
    },
    #[error("SandboxClaim {claim}: {source}")]
    Api {
        claim: String,
        #[source]
        source: kube::Error,
    },
}

impl From<ClaimError> for BackendError {
    fn from(e: ClaimError) -> BackendError {
        BackendError::Start(e.to_string())
    }
}

/// The namespace's SandboxClaims and SandboxWarmPools, in the served version.
#[derive(Clone)]
pub struct Claims {
    claims: Api<DynamicObject>,
    pools: Api<DynamicObject>,
    resource: ApiResource,
    namespace: String,
}

impl Claims {
    /// The newest served version of the extensions group that has both kinds, or `None` when
    /// the group is not served (warm-pool runtimes then fail their create with a 400).
    pub async fn discover(client: &Client, namespace: &str) -> Result<Option<Claims>, KubeError> {
        let group = match kube::discovery::group(client, EXT_GROUP).await {
            Ok(group) => group,
            Err(kube::Error::Discovery(_)) => return Ok(None),
            Err(other) => return Err(KubeError::Unreachable(other.to_string())),
        };
        let found = VERSIONS.iter().find_map(|v| {
            let resources = group.versioned_resources(v);
            let kind = |k: &str| {
                resources
                    .iter()
                    .find(|(ar, _)| ar.kind == k)
                    .map(|(ar, _)| ar.clone())
            };
            Some((kind(CLAIM_KIND)?, kind(POOL_KIND)?))
        });
        let Some((claim, pool)) = found else {
            return Ok(None);
        };
        tracing::info!(version = %claim.api_version, "found the SandboxClaim kind");
        Ok(Some(Claims {
            claims: Api::namespaced_with(client.clone(), namespace, &claim),
            pools: Api::namespaced_with(client.clone(), namespace, &pool),
            resource: claim,
            namespace: namespace.to_string(),
        }))
    }

    /// The pool, or why a create cannot claim from it.
    pub async fn pool(&self, pool: &str) -> Result<DynamicObject, ClaimError> {
        match self.pools.get_opt(pool).await {
            Ok(Some(obj)) => Ok(obj),
            Ok(None) => Err(ClaimError::NoPool {
                pool: pool.into(),
                namespace: self.namespace.clone(),
            }),
            Err(source) => Err(ClaimError::PoolApi {
                pool: pool.into(),
                source,
            }),
        }
    }

    /// The claim for `sb` on `pool`: named by the sandbox id, labelled like the Sandboxes the
    /// gateway makes. v1beta1 names the pool (`spec.warmPoolRef`); v1alpha1 names the pool's
    /// template and the pool (`spec.sandboxTemplateRef`, `spec.warmpool`).
    fn object(&self, sb: &Sandbox, pool: &DynamicObject) -> DynamicObject {
        let pool_name = pool.metadata.name.clone().unwrap_or_default();
        let spec = if self.resource.version == "v1alpha1" {
            let template = pool.data["spec"]["sandboxTemplateRef"]["name"].clone();
            json!({"sandboxTemplateRef": {"name": template}, "warmpool": pool_name})
        } else {
            json!({"warmPoolRef": {"name": pool_name}})
        };
        let mut obj = DynamicObject::new(&sb.id, &self.resource).data(json!({"spec": spec}));
        obj.metadata.labels = Some(
            [
                (LABEL_USER.to_string(), sb.owner.clone()),
                (LABEL_ID.to_string(), sb.id.clone()),
            ]
            .into(),
        );
        if let Some(name) = &sb.name {
            obj.metadata.annotations = Some([(ANNOTATION_NAME.to_string(), name.clone())].into());
        }
        obj
    }

    /// Claims a Sandbox from `pool` for `sb` (an existing claim of that name is waited on,
    /// as after an interrupted create) and returns the Sandbox's name. On failure the claim
    /// is deleted, and with it any Sandbox it got late.
    pub async fn claim(&self, sb: &Sandbox, pool: &str) -> Result<String, ClaimError> {
        let found = self.pool(pool).await?;
        let api = |source| ClaimError::Api {
            claim: sb.id.clone(),
            source,
        };
        match self
            .claims
            .create(&PostParams::default(), &self.object(sb, &found))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(api(e)),
        }
        let result = self.bound(&sb.id, pool).await;
        if result.is_err() {
            if let Err(e) = self.release(&sb.id).await {
                tracing::warn!(claim = %sb.id, error = %e, "could not delete a failed SandboxClaim");
            }
        }
        result
    }

    /// Waits, bounded by the start wait, for the claim to name its Sandbox.
    async fn bound(&self, claim: &str, pool: &str) -> Result<String, ClaimError> {
        let deadline = tokio::time::Instant::now() + START_WAIT;
        let mut pause = Duration::from_millis(20);
        loop {
            // An unanswered read is retried until the deadline, like an unanswered claim.
            let obj = match self.claims.get_opt(claim).await {
                Ok(None) => {
                    return Err(ClaimError::Gone {
                        claim: claim.into(),
                    })
                }
                Ok(Some(obj)) => Some(obj),
                Err(e) => {
                    tracing::debug!(claim, error = %e, "reading a SandboxClaim");
                    None
                }
            };
            let status = obj.as_ref().map(|o| &o.data["status"]);
            if let Some(name) = status
                .and_then(|s| s["sandbox"]["name"].as_str())
                .filter(|n| !n.is_empty())
            {
                return Ok(name.to_string());
            }
            let refused = status
                .and_then(|s| s["conditions"].as_array())
                .into_iter()
                .flatten()
                .find(|c| {
                    c["type"] == "Ready"
                        && c["status"] == "False"
                        && TERMINAL_REASONS.iter().any(|r| c["reason"] == *r)
                });
            if let Some(c) = refused {
                return Err(ClaimError::Refused {
                    claim: claim.into(),
                    reason: c["reason"].as_str().unwrap_or_default().into(),
                    message: c["message"].as_str().unwrap_or_default().into(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClaimError::NotSupplied {
                    claim: claim.into(),
                    pool: pool.into(),
                    waited: START_WAIT,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Deletes claim `name` (already gone: fine); the cluster's garbage collector deletes the
    /// Sandbox it owns.
    pub async fn release(&self, name: &str) -> Result<(), ClaimError> {
        match self.claims.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(source) => Err(ClaimError::Api {
                claim: name.into(),
                source,
            }),
        }
    }
}

/// The name of the `kind` object of the extensions group that controls `obj`, if one does.
fn controller_of<'a>(obj: &'a DynamicObject, kind: &str) -> Option<&'a str> {
    obj.metadata
        .owner_references
        .as_deref()?
        .iter()
        .find(|r| {
            r.controller == Some(true)
                && r.kind == kind
                && r.api_version.split('/').next() == Some(EXT_GROUP)
        })
        .map(|r| r.name.as_str())
}

/// A pool member nobody has claimed yet: its `SandboxWarmPool` controls it.
pub fn unclaimed(obj: &DynamicObject) -> bool {
    controller_of(obj, POOL_KIND).is_some()
}

/// The SandboxClaim that controls a Sandbox, if one does.
pub fn claimed_by(obj: &DynamicObject) -> Option<&str> {
    controller_of(obj, CLAIM_KIND)
}

/// The claim of a gateway's claimed Sandbox: the claim controlling it is named by the sandbox
/// id the Sandbox is labelled with.
pub fn gateway_claim(obj: &DynamicObject) -> Option<&str> {
    let id = obj.metadata.labels.as_ref()?.get(LABEL_ID)?;
    claimed_by(obj).filter(|claim| claim == id)
}

/// A Sandbox a gateway's claim (named by a sandbox id) got but the gateway has not labelled
/// yet: not shown until it carries the id, so no record appears under another id meanwhile.
pub fn in_handover(obj: &DynamicObject) -> bool {
    let labelled = obj
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_ID));
    !labelled && claimed_by(obj).is_some_and(model::valid_id)
}

impl KubeBackend {
    /// A create on a warm-pool runtime: claims a Sandbox from `pool`, labels it as `sb`'s
    /// (`user`, the id, the name annotation: what discovery reads), and waits for it as a
    /// start does.
    pub(super) async fn start_claimed(
        &self,
        sb: &Sandbox,
        pool: &str,
    ) -> Result<Started, BackendError> {
        let claims = self.claims.as_ref().ok_or(ClaimError::NotServed)?;
        let claimed = std::time::Instant::now();
        let name = claims.claim(sb, pool).await?;
        let mut meta = json!({"labels": {LABEL_USER: sb.owner, LABEL_ID: sb.id}});
        if let Some(n) = &sb.name {
            meta["annotations"] = json!({ANNOTATION_NAME: n});
        }
        let patch = Patch::Merge(json!({ "metadata": meta }));
        if let Err(e) = self.api.patch(&name, &PatchParams::default(), &patch).await {
            let _ = claims.release(&sb.id).await;
            return Err(BackendError::Start(format!(
                "labelling Sandbox {name} of SandboxClaim {}: {e}",
                sb.id
            )));
        }
        tracing::info!(sandbox = %sb.id, resource = %name, pool, took = ?claimed.elapsed(), "claimed a warm Sandbox");
        Ok(Started {
            ip_address: self.wait_ready(&self.api, &name, &name).await,
            backend_ref: Some(name),
            netns_pid: None,
        })
    }

    /// Before a Sandbox is deleted: deletes the SandboxClaim that controls it (else its
    /// controller would make another Sandbox for it), or, for a warm-pool create that got no
    /// Sandbox, the claim named by the sandbox id.
    pub(super) async fn release_claim(&self, sb: &Sandbox) -> Result<(), BackendError> {
        let Some(claims) = &self.claims else {
            return Ok(());
        };
        let at = self.locate(sb);
        if !at.home {
            // Claims are made in the namespace the API creates in; elsewhere, a Sandbox's
            // claim is its maker's business.
            return Ok(());
        }
        let name = at.name;
        let owner = at
            .api
            .get_opt(name)
            .await
            .map_err(|e| BackendError::Stop(format!("Sandbox {name}: {e}")))?
            .and_then(|obj| claimed_by(&obj).map(str::to_string));
        match owner.or_else(|| self.warm_pool(sb).map(|_| sb.id.clone())) {
            Some(claim) => claims
                .release(&claim)
                .await
                .map_err(|e| BackendError::Stop(e.to_string())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn sandbox(owner: Value, labels: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
            "metadata": {"name": "pool-abcde", "namespace": "default", "labels": labels,
                "ownerReferences": [owner]},
            "spec": {}
        }))
        .expect("a Sandbox")
    }

    fn owner(kind: &str, name: &str) -> Value {
        json!({"apiVersion": format!("{EXT_GROUP}/v1beta1"), "kind": kind, "name": name,
            "uid": "u", "controller": true, "blockOwnerDeletion": true})
    }

    #[test]
    fn ownership_tells_pool_members_claims_and_handovers_apart() {
        let pooled = sandbox(owner(POOL_KIND, "pool"), json!({}));
        assert!(unclaimed(&pooled) && claimed_by(&pooled).is_none());
        assert!(!in_handover(&pooled));

        let id = model::new_id();
        let ours = sandbox(owner(CLAIM_KIND, &id), json!({}));
        assert!(!unclaimed(&ours));
        assert_eq!(claimed_by(&ours), Some(id.as_str()));
        assert!(
            in_handover(&ours),
            "claimed by the gateway, not labelled yet"
        );
        let labelled = sandbox(owner(CLAIM_KIND, &id), json!({LABEL_ID: id}));
        assert!(!in_handover(&labelled));
        assert_eq!(gateway_claim(&labelled), Some(id.as_str()));
        assert_eq!(gateway_claim(&ours), None, "not labelled yet");
        let relabelled = sandbox(owner(CLAIM_KIND, &id), json!({LABEL_ID: model::new_id()}));
        assert_eq!(gateway_claim(&relabelled), None, "another sandbox's label");

        let theirs = sandbox(owner(CLAIM_KIND, "my-claim"), json!({}));
        assert!(
            !in_handover(&theirs),
            "someone else's claim is shown at once"
        );

        let mut other_group = owner(POOL_KIND, "pool");
        other_group["apiVersion"] = json!("example.com/v1");
        assert!(!unclaimed(&sandbox(other_group, json!({}))));
        let mut not_controller = owner(POOL_KIND, "pool");
        not_controller["controller"] = json!(false);
        assert!(!unclaimed(&sandbox(not_controller, json!({}))));
    }
}
