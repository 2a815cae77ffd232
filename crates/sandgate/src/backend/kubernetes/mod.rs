//! Kubernetes backend: each sandbox is an agent-sandbox `Sandbox` resource
//! (`agents.x-k8s.io`, v1beta1, else v1alpha1: the newest served version, found by discovery)
//! in one namespace, driven through kube-rs with `DynamicObject`s (see `docs/kubernetes.md`).
//!
//! A watch on the namespace's Sandboxes, re-listed every `resync` and after `410 Gone`,
//! reports what the cluster holds ([`Observed`]) whoever created it (the API or `kubectl`);
//! the manager folds that into the store and the route table. The proxy dials the pod's IP
//! (`status.podIPs`) on the asked port. The `Ready` condition is authoritative; a suspended
//! Sandbox (`operatingMode: Suspended`, v1alpha1 `replicas: 0`) is stopped. A runtime
//! naming a `SandboxWarmPool` gets its Sandboxes through `SandboxClaim`s (`claims.rs`).

mod claims;
mod discovery;
mod exec;
mod logs;
mod pty;
mod seen;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::Client;
use serde_json::{json, Value};

use super::exec::{ExecError, ExecHandle, ExecSpec};
use super::{Backend, BackendError, LogStream, Started, Upstream};
use crate::config::{Config, KubeConfig};
use crate::model::{self, Sandbox};
use crate::runtimes::{Runtime, Runtimes};
pub use discovery::{derived_id, discovered, Discovered, Observed};

/// The agent-sandbox API group.
pub const GROUP: &str = "agents.x-k8s.io";
/// Served versions in order of preference.
pub const VERSIONS: [&str; 2] = ["v1beta1", "v1alpha1"];
/// The label naming a sandbox's user: its `/{user}/{name}/` route (seed 003).
pub const LABEL_USER: &str = "user";
/// The label carrying the sandgate id of a Sandbox the gateway created.
pub const LABEL_ID: &str = "sandgate.dev/sandbox";
/// The annotation carrying the `name` a create asked for (the resource is named by its id).
pub const ANNOTATION_NAME: &str = "sandgate.dev/name";
/// The runtime recorded for Sandboxes the gateway discovered rather than created.
pub const DISCOVERED_RUNTIME: &str = "kubernetes";
/// The pod annotation naming the container `kubectl exec` and `kubectl logs` pick.
pub const ANNOTATION_DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";
/// The working directory of the Sandboxes the gateway makes, where commands start and the
/// files API's tree is (as on Docker): an `emptyDir` volume, writable whatever the image's
/// user, living as long as the pod; or, for a runtime with `volume_size`, a persistent
/// volume claimed from a `volumeClaimTemplates` entry, which outlives a stop.
pub const WORK_DIR: &str = "/sandbox";
const WORK_VOLUME: &str = "sandbox";
/// How long a start waits for the Sandbox to report `Ready` and a pod IP.
const START_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot load the Kubernetes client configuration: {0}")]
    Config(String),
    #[error("cannot reach the Kubernetes API: {0}")]
    Unreachable(String),
    #[error("the cluster serves no Sandbox kind of {GROUP} ({0}); is agent-sandbox installed?")]
    NoSandboxKind(String),
}

pub struct KubeBackend {
    client: Client,
    /// The Sandboxes of the namespace the API creates in (the first configured).
    api: Api<DynamicObject>,
    /// That namespace's pods, for exec (a Sandbox's pod is named after it).
    pods: Api<Pod>,
    resource: ApiResource,
    config: KubeConfig,
    runtimes: Runtimes,
    /// SandboxClaims and SandboxWarmPools, where the cluster serves them.
    claims: Option<claims::Claims>,
    /// What the gateway itself last saw of each Sandbox (against a lagging watch).
    seen: seen::Seen,
}

impl KubeBackend {
    /// Loads the client configuration (`kubeconfig`, else `KUBECONFIG` or `~/.kube/config`,
    /// else in-cluster: kube's `Config::infer`),
    /// and finds the newest served version of the Sandbox kind.
    pub async fn connect(config: &Config) -> Result<KubeBackend, KubeError> {
        let kc = &config.kubernetes;
        let client_config = match &kc.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .map_err(|e| KubeError::Config(e.to_string()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?,
        };
        let client =
            Client::try_from(client_config).map_err(|e| KubeError::Config(e.to_string()))?;
        let group = kube::discovery::group(&client, GROUP)
            .await
            .map_err(|e| match e {
                kube::Error::Discovery(d) => KubeError::NoSandboxKind(d.to_string()),
                other => KubeError::Unreachable(other.to_string()),
            })?;
        let resource = VERSIONS
            .iter()
            .find_map(|v| {
                group
                    .versioned_resources(v)
                    .into_iter()
                    .find(|(ar, _)| ar.kind == "Sandbox")
                    .map(|(ar, _)| ar)
            })
            .ok_or_else(|| {
                KubeError::NoSandboxKind(format!(
                    "served versions: {}",
                    group.versions().collect::<Vec<_>>().join(", ")
                ))
            })?;
        tracing::info!(
            version = %resource.api_version,
            namespaces = %kc.namespaces.join(","),
            "found the Sandbox kind"
        );
        let home = kc.namespace();
        let claims = claims::Claims::discover(&client, home).await?;
        let pods = Api::namespaced(client.clone(), home);
        let api = Api::namespaced_with(client.clone(), home, &resource);
        Ok(KubeBackend {
            client,
            api,
            pods,
            resource,
            config: kc.clone(),
            runtimes: Runtimes::new(&config.runtimes),
            claims,
            seen: seen::Seen::default(),
        })
    }

    /// The served version in use (`v1beta1` or `v1alpha1`).
    pub fn version(&self) -> &str {
        &self.resource.version
    }

    /// The `SandboxWarmPool` a sandbox's runtime claims from, if it names one.
    fn warm_pool(&self, sb: &Sandbox) -> Option<String> {
        self.runtimes.get(&sb.runtime)?.warm_pool.clone()
    }

    /// Waits, bounded by [`START_WAIT`], for Sandbox `name` of `api` (recorded as
    /// `reference`) to be Ready with a pod IP, which it returns; later changes come through
    /// the watch, from the Ready state on (see [`seen`]).
    async fn wait_ready(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        reference: &str,
    ) -> Option<String> {
        let deadline = tokio::time::Instant::now() + START_WAIT;
        let mut pause = Duration::from_millis(50);
        while tokio::time::Instant::now() < deadline {
            let obj = api.get_opt(name).await.ok().flatten();
            if let Some(obj) = obj {
                if let Some(d) = discovered(&obj, self.config.namespace()) {
                    if d.ready && d.pod_ip.is_some() {
                        self.saw(reference, &obj);
                        return d.pod_ip;
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
        None
    }

    /// The service name reported for Sandbox `resource`.
    pub fn service_name(&self, resource: &str) -> String {
        self.config.service.replace("{name}", resource)
    }

    /// Where a sandbox's Sandbox is. Its reference (`backend_ref`, recorded at start or
    /// discovery, else its id) is the resource's name in the namespace the API creates in,
    /// `namespace/name` in another watched one.
    fn locate<'a>(&'a self, sb: &'a Sandbox) -> Located<'a> {
        let (namespace, name) = self.locate_name(sb);
        let home = namespace == self.config.namespace();
        Located {
            home,
            name,
            reference: sb.backend_ref.as_deref().unwrap_or(&sb.id),
            api: if home {
                self.api.clone()
            } else {
                Api::namespaced_with(self.client.clone(), namespace, &self.resource)
            },
            pods: if home {
                self.pods.clone()
            } else {
                Api::namespaced(self.client.clone(), namespace)
            },
        }
    }

    /// Notes the state of a Sandbox the gateway itself saw (see [`seen`]).
    fn saw(&self, reference: &str, obj: &DynamicObject) {
        self.seen
            .saw(reference, obj.metadata.resource_version.as_deref());
    }

    /// A sandbox's Sandbox's namespace and name (see [`KubeBackend::locate`]), without the
    /// APIs.
    fn locate_name<'a>(&'a self, sb: &'a Sandbox) -> (&'a str, &'a str) {
        let reference = sb.backend_ref.as_deref().unwrap_or(&sb.id);
        reference
            .split_once('/')
            .unwrap_or((self.config.namespace(), reference))
    }

    /// The spec change that suspends (`false`) or resumes a Sandbox in the served version.
    fn running_patch(&self, running: bool) -> Value {
        if self.resource.version == "v1alpha1" {
            json!({"spec": {"replicas": i32::from(running)}})
        } else {
            let mode = if running { "Running" } else { "Suspended" };
            json!({"spec": {"operatingMode": mode}})
        }
    }

    /// The Sandbox to create for `sb`: its pod template from the runtime's image, the
    /// sandbox's command, environment and limits, working in [`WORK_DIR`]; the `user` label
    /// from its owner.
    fn object(&self, sb: &Sandbox) -> Result<DynamicObject, BackendError> {
        let runtime = self.runtimes.get(&sb.runtime).ok_or_else(|| {
            BackendError::Start(format!("runtime {:?} is no longer configured", sb.runtime))
        })?;
        let mut env: Vec<Value> = vec![json!({"name": "SANDBOX_ID", "value": sb.id})];
        if let Some(port) = sb.port {
            env.push(json!({"name": "PORT", "value": port.to_string()}));
            env.push(json!({"name": "HOST", "value": "0.0.0.0"}));
        }
        env.extend(sb.env.iter().map(|(k, v)| json!({"name": k, "value": v})));
        let mut limits = serde_json::Map::new();
        if let Some(cpus) = sb.limits.cpus {
            limits.insert("cpu".into(), json!(format!("{}m", (cpus * 1000.0).round())));
        }
        if let Some(mb) = sb.limits.memory_mb {
            limits.insert("memory".into(), json!(format!("{mb}Mi")));
        }
        let mut container = json!({
            "name": "sandbox",
            "image": runtime.image,
            "command": ["/bin/sh", "-c", sb.command],
            "env": env,
            "workingDir": WORK_DIR,
            "volumeMounts": [{"name": WORK_VOLUME, "mountPath": WORK_DIR}],
        });
        if !limits.is_empty() {
            container["resources"] = json!({"limits": limits});
        }
        if let Some(port) = sb.port {
            container["ports"] = json!([{"containerPort": port}]);
        }
        let mut spec = json!({
            "podTemplate": {"spec": {
                "containers": [container],
                "volumes": [{"name": WORK_VOLUME, "emptyDir": {}}],
            }},
            "service": true,
        });
        if let Some(size) = &runtime.volume_size {
            // agent-sandbox's controller makes a PVC from each template and puts it in the
            // pod in place of the volume of the same name (StatefulSet semantics): the
            // emptyDir above becomes the claim, which outlives the pod.
            spec["volumeClaimTemplates"] = json!([{
                "metadata": {"name": WORK_VOLUME},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": size}},
                },
            }]);
        }
        if let Some(obj) = self.running_patch(true)["spec"].as_object() {
            for (k, v) in obj {
                spec[k] = v.clone();
            }
        }
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
        Ok(obj)
    }
}

/// A sandbox's Sandbox: whether it is in the first namespace, its name, the reference
/// recorded for it, and the APIs of its namespace.
struct Located<'a> {
    /// In the namespace the API creates in (where warm-pool claims are).
    home: bool,
    name: &'a str,
    reference: &'a str,
    api: Api<DynamicObject>,
    pods: Api<Pod>,
}

impl Located<'_> {
    /// The container of its pod that commands, terminals and logs use (see
    /// [`default_container`]), read from the Sandbox: a pod with sidecars refuses an exec or
    /// log that names none. `None` when the Sandbox cannot be read: the exec then says why.
    async fn container(&self) -> Option<String> {
        match self.api.get_opt(self.name).await {
            Ok(obj) => obj.as_ref().and_then(default_container),
            Err(e) => {
                tracing::debug!(sandbox = %self.reference, error = %e, "reading the Sandbox's containers");
                None
            }
        }
    }
}

/// The container `kubectl` would pick in a Sandbox's pod: the one its pod template's
/// `kubectl.kubernetes.io/default-container` annotation names, else the first.
pub fn default_container(obj: &DynamicObject) -> Option<String> {
    let template = obj.data.get("spec")?.get("podTemplate")?;
    let containers = template.get("spec")?.get("containers")?.as_array()?;
    let names = || {
        containers
            .iter()
            .filter_map(|c| c.get("name").and_then(Value::as_str))
    };
    let named = template
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(ANNOTATION_DEFAULT_CONTAINER))
        .and_then(Value::as_str)
        .filter(|wanted| names().any(|n| n == *wanted));
    named.or_else(|| names().next()).map(str::to_string)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

#[async_trait]
impl Backend for KubeBackend {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn isolation(&self) -> &'static str {
        "pod"
    }

    fn stop_on_shutdown(&self) -> bool {
        // The cluster owns Sandboxes: they outlive the gateway.
        false
    }

    /// A stopped Sandbox is suspended in place: its name (a discovered one's is not its id)
    /// and namespace still find it.
    fn handle_outlives_stop(&self) -> bool {
        true
    }

    /// See [`seen`].
    fn fresh(&self, reference: &str, version: Option<&str>, listed: bool) -> bool {
        if listed {
            self.seen.listed(reference, version);
            return true;
        }
        self.seen.fresh(reference, version)
    }

    async fn check_runtime(&self, runtime: &Runtime) -> Result<(), String> {
        // Images are the cluster's to pull; a missing one shows in the Sandbox's status.
        // A warm pool must exist, and the cluster must serve claims.
        let Some(pool) = &runtime.warm_pool else {
            return Ok(());
        };
        let claims = self
            .claims
            .as_ref()
            .ok_or_else(|| claims::ClaimError::NotServed.to_string())?;
        claims.pool(pool).await.map(drop).map_err(|e| e.to_string())
    }

    fn needs_host_port(&self) -> bool {
        false
    }

    fn default_port(&self) -> Option<u16> {
        Some(self.config.port)
    }

    async fn start(&self, sb: &Sandbox) -> Result<Started, BackendError> {
        let at = self.locate(sb);
        let name = at.name;
        let fail = |e: kube::Error| BackendError::Start(format!("Sandbox {name}: {e}"));
        let existing = at.api.get_opt(name).await.map_err(fail)?;
        if let (None, Some(pool)) = (&existing, self.warm_pool(sb)) {
            return self.start_claimed(sb, &pool).await;
        }
        let answer = if existing.is_some() {
            let patch = Patch::Merge(self.running_patch(true));
            at.api
                .patch(name, &PatchParams::default(), &patch)
                .await
                .map_err(fail)?
        } else {
            let obj = self.object(sb)?;
            at.api
                .create(&PostParams::default(), &obj)
                .await
                .map_err(fail)?
        };
        // A bounded wait for the pod: the watch reports whatever comes later (the Ready state
        // it waited for is what the gateway saw; else the API's answer).
        let ip_address = self.wait_ready(&at.api, name, at.reference).await;
        if ip_address.is_none() {
            self.saw(at.reference, &answer);
        }
        Ok(Started {
            ip_address,
            backend_ref: Some(at.reference.to_string()),
            netns_pid: None,
        })
    }

    async fn stop(&self, sb: &Sandbox) -> Result<(), BackendError> {
        if sb.status == model::Status::Deleting {
            // Deleting the Sandbox (`remove`, next) takes its pod with it; suspending it first
            // would only send every watch a late event of a Sandbox about to go, which another
            // replica, not knowing of the deletion, could record as a new sandbox.
            return Ok(());
        }
        let at = self.locate(sb);
        let name = at.name;
        let patch = Patch::Merge(self.running_patch(false));
        match at.api.patch(name, &PatchParams::default(), &patch).await {
            Ok(written) => {
                self.saw(at.reference, &written);
                Ok(())
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(BackendError::Stop(format!("Sandbox {name}: {e}"))),
        }
    }

    async fn remove(&self, sb: &Sandbox) -> Result<(), BackendError> {
        let at = self.locate(sb);
        let name = at.name;
        self.release_claim(sb).await?;
        match at.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(BackendError::Stop(format!("Sandbox {name}: {e}"))),
        }
    }

    async fn adopt(&self, sb: &Sandbox) -> Result<Option<Started>, BackendError> {
        let at = self.locate(sb);
        let name = at.name;
        let obj = at
            .api
            .get_opt(name)
            .await
            .map_err(|e| BackendError::Start(format!("Sandbox {name}: {e}")))?;
        Ok(obj
            .as_ref()
            .and_then(|o| discovered(o, self.config.namespace()))
            .filter(|d| !d.suspended)
            .map(|d| Started {
                backend_ref: Some(d.reference),
                ip_address: d.pod_ip,
                netns_pid: None,
            }))
    }

    /// Runs the command in the Sandbox's pod (named after it) through `pods/exec`.
    async fn exec(&self, sb: &Sandbox, spec: ExecSpec) -> Result<ExecHandle, ExecError> {
        if sb.status != model::Status::Running {
            return Err(ExecError::NotRunning);
        }
        let at = self.locate(sb);
        let container = at.container().await;
        exec::run(&at.pods, at.name, container.as_deref(), spec).await
    }

    /// A shell on a terminal in the Sandbox's pod: a `pods/exec` with a TTY.
    async fn pty(
        &self,
        sb: &Sandbox,
        spec: ExecSpec,
        size: super::exec::TtySize,
    ) -> Result<super::exec::PtyHandle, ExecError> {
        if sb.status != model::Status::Running {
            return Err(ExecError::NotRunning);
        }
        let at = self.locate(sb);
        let container = at.container().await;
        pty::open(&at.pods, at.name, container.as_deref(), spec, size).await
    }

    /// Files are reached through `pods/exec`, in the container's working directory.
    async fn files_at(&self, _sb: &Sandbox) -> Result<super::FilesAt, ExecError> {
        Ok(super::FilesAt::Exec)
    }

    fn service(&self, sb: &Sandbox) -> Option<super::ServiceRef> {
        let at = self.locate_name(sb);
        Some(super::ServiceRef {
            name: self.service_name(at.1),
            namespace: at.0.to_string(),
        })
    }

    /// Any port of the sandbox's pod, at its IP.
    fn upstream(&self, sb: &Sandbox, port: u16) -> Option<Upstream> {
        let ip: IpAddr = sb.ip_address.as_deref()?.parse().ok()?;
        (port != 0).then_some(Upstream::Tcp(SocketAddr::new(ip, port)))
    }

    /// The log of the Sandbox's pod (`pods/{name}/log`).
    async fn logs(
        &self,
        sb: &Sandbox,
        options: super::LogOptions,
    ) -> Result<LogStream, BackendError> {
        let at = self.locate(sb);
        let container = at.container().await;
        logs::stream(&at.pods, at.name, container.as_deref(), options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_pod_template(template: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
            "metadata": {"name": "s", "namespace": "default"},
            "spec": {"podTemplate": template}
        }))
        .expect("a Sandbox")
    }

    #[test]
    fn the_default_container_is_the_annotated_one_else_the_first() {
        let two = json!([{"name": "proxy"}, {"name": "app"}]);
        let plain = with_pod_template(json!({"spec": {"containers": two}}));
        assert_eq!(default_container(&plain).as_deref(), Some("proxy"));
        let annotated = |name: &str| {
            with_pod_template(json!({
                "metadata": {"annotations": {ANNOTATION_DEFAULT_CONTAINER: name}},
                "spec": {"containers": two}
            }))
        };
        assert_eq!(default_container(&annotated("app")).as_deref(), Some("app"));
        assert_eq!(
            default_container(&annotated("gone")).as_deref(),
            Some("proxy"),
            "an annotation naming no container of the pod is ignored, as kubectl does"
        );
        assert_eq!(default_container(&with_pod_template(json!({}))), None);
    }
}
