//! Kubernetes backend: each sandbox is an agent-sandbox `Sandbox` resource
//! (`agents.x-k8s.io`, v1beta1, else v1alpha1: the newest served version, found by discovery)
//! in one namespace, driven through kube-rs with `DynamicObject`s (see `docs/kubernetes.md`).
//!
//! A watch on the namespace's Sandboxes, re-listed every `resync` and after `410 Gone`,
//! reports what the cluster holds ([`Observed`]) whoever created it (the API or `kubectl`);
//! the manager folds that into the store and the route table. The proxy dials the pod's IP
//! (`status.podIPs`) on the asked port. The `Ready` condition is authoritative; a suspended
//! Sandbox (`operatingMode: Suspended`, v1alpha1 `replicas: 0`) is stopped.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, AttachParams, AttachedProcess, DeleteParams, DynamicObject, Patch, PatchParams, PostParams,
};
use kube::core::ApiResource;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::exec::{Chunk, ExecControl, ExecError, ExecExit, ExecHandle, ExecSpec, StartKind};
use super::{Backend, BackendError, LogStream, Started, Upstream};
use crate::config::{Config, KubeConfig};
use crate::model::{self, Sandbox};
use crate::runtimes::{Runtime, Runtimes};

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
/// How long a start waits for the Sandbox to report `Ready` and a pod IP.
const START_WAIT: Duration = Duration::from_secs(20);

/// One Sandbox as the cluster reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    /// The sandgate id: the `sandgate.dev/sandbox` label, else derived from namespace/name.
    pub id: String,
    /// The resource's name.
    pub resource: String,
    pub namespace: String,
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
}

/// What the watch reports to the manager.
#[derive(Debug, Clone)]
pub enum Observed {
    /// A Sandbox was added or changed.
    Applied(Discovered),
    /// A Sandbox went (by id).
    Deleted(String),
    /// A full list: every Sandbox there is; `listed_at` is when the list began, so records
    /// written since are not mistaken for vanished ones.
    Snapshot {
        all: Vec<Discovered>,
        listed_at: chrono::DateTime<chrono::Utc>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot load the Kubernetes client configuration: {0}")]
    Config(String),
    #[error("cannot reach the Kubernetes API: {0}")]
    Unreachable(String),
    #[error("the cluster serves no Sandbox kind of {GROUP} ({0}); is agent-sandbox installed?")]
    NoSandboxKind(String),
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

/// What a Sandbox object says, in the backend's terms.
pub fn discovered(obj: &DynamicObject) -> Option<Discovered> {
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
    Some(Discovered {
        id,
        resource,
        namespace,
        owner,
        name,
        created_here: id_label.is_some(),
        ready,
        suspended,
        pod_ip,
    })
}

pub struct KubeBackend {
    api: Api<DynamicObject>,
    /// The namespace's pods, for exec (a Sandbox's pod is named after it).
    pods: Api<Pod>,
    resource: ApiResource,
    config: KubeConfig,
    runtimes: Runtimes,
}

impl KubeBackend {
    /// Loads the client configuration (`kubeconfig`, else in-cluster, else `KUBECONFIG`),
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
            namespace = %kc.namespace,
            "found the Sandbox kind"
        );
        let pods = Api::namespaced(client.clone(), &kc.namespace);
        let api = Api::namespaced_with(client, &kc.namespace, &resource);
        Ok(KubeBackend {
            api,
            pods,
            resource,
            config: kc.clone(),
            runtimes: Runtimes::new(&config.runtimes),
        })
    }

    /// The served version in use (`v1beta1` or `v1alpha1`).
    pub fn version(&self) -> &str {
        &self.resource.version
    }

    /// The service name reported for Sandbox `resource`.
    pub fn service_name(&self, resource: &str) -> String {
        self.config.service.replace("{name}", resource)
    }

    /// The resource name of a sandbox: recorded at start or discovery, else its id.
    fn resource_name(sb: &Sandbox) -> &str {
        sb.backend_ref.as_deref().unwrap_or(&sb.id)
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
    /// sandbox's command, environment and limits; the `user` label from its owner.
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
        });
        if !limits.is_empty() {
            container["resources"] = json!({"limits": limits});
        }
        if let Some(port) = sb.port {
            container["ports"] = json!([{"containerPort": port}]);
        }
        let mut spec = json!({
            "podTemplate": {"spec": {"containers": [container]}},
            "service": true,
        });
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

    async fn get(&self, name: &str) -> Result<Option<DynamicObject>, kube::Error> {
        self.api.get_opt(name).await
    }

    /// Watches the namespace's Sandboxes until `stop`, reporting on `to`: a full list first
    /// (and after every `410 Gone` and every resync), then each change. The watch retries
    /// with backoff while the API server is unreachable; nothing is reported meanwhile, so
    /// the route table keeps the last known state.
    pub fn watch(&self, to: UnboundedSender<Observed>, stop: CancellationToken) {
        let api = self.api.clone();
        let resync = self.config.resync;
        tokio::spawn(async move {
            loop {
                let stream =
                    watcher::watcher(api.clone(), watcher::Config::default()).default_backoff();
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
                            tracing::warn!(error = %e, "watching Sandboxes");
                            continue;
                        }
                        Some(Ok(Event::Init)) => {
                            listing = Some((Vec::new(), model::now()));
                            continue;
                        }
                        Some(Ok(Event::InitApply(obj))) => {
                            if let (Some((all, _)), Some(d)) = (&mut listing, discovered(&obj)) {
                                if obj.metadata.deletion_timestamp.is_none() {
                                    all.push(d);
                                }
                            }
                            continue;
                        }
                        Some(Ok(Event::InitDone)) => match listing.take() {
                            Some((all, listed_at)) => Observed::Snapshot { all, listed_at },
                            None => continue,
                        },
                        Some(Ok(Event::Apply(obj))) => match discovered(&obj) {
                            Some(d) if obj.metadata.deletion_timestamp.is_some() => {
                                Observed::Deleted(d.id)
                            }
                            Some(d) => Observed::Applied(d),
                            None => continue,
                        },
                        Some(Ok(Event::Delete(obj))) => match discovered(&obj) {
                            Some(d) => Observed::Deleted(d.id),
                            None => continue,
                        },
                    };
                    if to.send(report).is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// The argv that runs `spec` through the pod exec API, which takes neither environment nor
/// working directory: `env` sets them (the tag included), `sh` changes directory.
fn exec_argv(spec: &ExecSpec) -> Vec<String> {
    let mut argv = vec!["env".to_string()];
    argv.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    argv.push(format!("{}={}", super::exec::EXEC_TAG_VAR, spec.tag));
    if let Some(cwd) = &spec.cwd {
        argv.extend(["/bin/sh", "-c", "cd -- \"$0\" || exit 127; exec \"$@\""].map(String::from));
        argv.push(cwd.clone());
    }
    argv.extend(spec.argv.iter().cloned());
    argv
}

/// What the exec API's closing `Status` says about the command.
fn exec_exit(status: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>) -> ExecExit {
    let Some(status) = status else {
        return ExecExit::Unknown;
    };
    if status.status.as_deref() == Some("Success") {
        return ExecExit::Exited(0);
    }
    let code = status
        .details
        .as_ref()
        .and_then(|d| d.causes.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.reason.as_deref() == Some("ExitCode"))
        .and_then(|c| c.message.as_deref()?.parse().ok());
    let message = status.message.unwrap_or_default();
    match code {
        Some(code) => ExecExit::Exited(code),
        None => ExecExit::NotStarted {
            kind: if message.contains("not found") {
                StartKind::NotFound
            } else {
                StartKind::Other
            },
            message,
        },
    }
}

/// Signals an exec's processes: found in the pod by their tag, through another exec.
struct PodExecControl {
    pods: Api<Pod>,
    pod: String,
    tag: String,
}

impl PodExecControl {
    async fn send(&self, signal: &str) -> Result<(), ExecError> {
        let needle = format!("{}={}", super::exec::EXEC_TAG_VAR, self.tag);
        let script = "for p in /proc/[0-9]*; do \
             tr '\\0' '\\n' < \"$p/environ\" 2>/dev/null | grep -qxF \"$1\" && kill -\"$0\" \"${p#/proc/}\"; \
             done; true";
        let argv = ["/bin/sh", "-c", script, signal, needle.as_str()];
        let ap = AttachParams::default().stderr(false);
        let mut attached = self
            .pods
            .exec(&self.pod, argv, &ap)
            .await
            .map_err(|e| ExecError::Backend(format!("pod {}: {e}", self.pod)))?;
        if let Some(status) = attached.take_status() {
            status.await;
        }
        Ok(())
    }
}

#[async_trait]
impl ExecControl for PodExecControl {
    async fn signal(&self, signal: i32) -> Result<(), ExecError> {
        self.send(&signal.to_string()).await
    }

    async fn kill(&self, grace: Duration) {
        let _ = self.send("TERM").await;
        tokio::time::sleep(grace.min(Duration::from_secs(10))).await;
        let _ = self.send("KILL").await;
    }
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

    async fn check_runtime(&self, _runtime: &Runtime) -> Result<(), String> {
        // Images are the cluster's to pull; a missing one shows in the Sandbox's status.
        Ok(())
    }

    fn needs_host_port(&self) -> bool {
        false
    }

    fn default_port(&self) -> Option<u16> {
        Some(self.config.port)
    }

    async fn start(&self, sb: &Sandbox) -> Result<Started, BackendError> {
        let name = Self::resource_name(sb).to_string();
        let fail = |e: kube::Error| BackendError::Start(format!("Sandbox {name}: {e}"));
        if self.get(&name).await.map_err(fail)?.is_some() {
            let patch = Patch::Merge(self.running_patch(true));
            self.api
                .patch(&name, &PatchParams::default(), &patch)
                .await
                .map_err(fail)?;
        } else {
            let obj = self.object(sb)?;
            self.api
                .create(&PostParams::default(), &obj)
                .await
                .map_err(fail)?;
        }
        // A bounded wait for the pod: the watch reports whatever comes later.
        let deadline = tokio::time::Instant::now() + START_WAIT;
        let mut pause = Duration::from_millis(50);
        let mut ip = None;
        while tokio::time::Instant::now() < deadline {
            let d = self.get(&name).await.ok().flatten();
            if let Some(d) = d.as_ref().and_then(discovered) {
                if d.ready && d.pod_ip.is_some() {
                    ip = d.pod_ip;
                    break;
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
        Ok(Started {
            backend_ref: Some(name),
            ip_address: ip,
            netns_pid: None,
        })
    }

    async fn stop(&self, sb: &Sandbox) -> Result<(), BackendError> {
        let name = Self::resource_name(sb);
        let patch = Patch::Merge(self.running_patch(false));
        match self.api.patch(name, &PatchParams::default(), &patch).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(BackendError::Stop(format!("Sandbox {name}: {e}"))),
        }
    }

    async fn remove(&self, sb: &Sandbox) -> Result<(), BackendError> {
        let name = Self::resource_name(sb);
        match self.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(BackendError::Stop(format!("Sandbox {name}: {e}"))),
        }
    }

    async fn adopt(&self, sb: &Sandbox) -> Result<Option<Started>, BackendError> {
        let name = Self::resource_name(sb).to_string();
        let obj = self
            .get(&name)
            .await
            .map_err(|e| BackendError::Start(format!("Sandbox {name}: {e}")))?;
        Ok(obj
            .as_ref()
            .and_then(discovered)
            .filter(|d| !d.suspended)
            .map(|d| Started {
                backend_ref: Some(name),
                ip_address: d.pod_ip,
                netns_pid: None,
            }))
    }

    /// Runs the command in the Sandbox's pod (named after it) through `pods/exec`.
    async fn exec(&self, sb: &Sandbox, spec: ExecSpec) -> Result<ExecHandle, ExecError> {
        if sb.status != model::Status::Running {
            return Err(ExecError::NotRunning);
        }
        let pod = Self::resource_name(sb).to_string();
        let ap = AttachParams::default().stdin(spec.stdin);
        let mut attached: AttachedProcess = self
            .pods
            .exec(&pod, exec_argv(&spec), &ap)
            .await
            .map_err(|e| ExecError::Backend(format!("pod {pod}: {e}")))?;
        let stdin = attached
            .stdin()
            .map(|w| Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>);
        let read = |r: Option<_>, chunk: fn(bytes::Bytes) -> Chunk| {
            r.map(|r| tokio_util::io::ReaderStream::new(r).map(move |b| b.map(chunk)))
        };
        let stdout = read(attached.stdout(), Chunk::Stdout);
        let stderr = read(attached.stderr(), Chunk::Stderr);
        let output = match (stdout, stderr) {
            (Some(o), Some(e)) => futures_util::stream::select(o, e).boxed(),
            (Some(o), None) => o.boxed(),
            (None, Some(e)) => e.boxed(),
            (None, None) => futures_util::stream::empty().boxed(),
        };
        let status = attached.take_status();
        let exit = async move {
            let status = match status {
                Some(status) => status.await,
                None => None,
            };
            // The message loop ends with the status, then closes the output streams
            // (dropping it instead would abort that).
            let _ = attached.join().await;
            exec_exit(status)
        }
        .boxed();
        Ok(ExecHandle {
            stdin,
            output,
            exit,
            control: std::sync::Arc::new(PodExecControl {
                pods: self.pods.clone(),
                pod,
                tag: spec.tag,
            }),
        })
    }

    fn service(&self, sb: &Sandbox) -> Option<super::ServiceRef> {
        Some(super::ServiceRef {
            name: self.service_name(Self::resource_name(sb)),
            namespace: self.config.namespace.clone(),
        })
    }

    /// Any port of the sandbox's pod, at its IP.
    fn upstream(&self, sb: &Sandbox, port: u16) -> Option<Upstream> {
        let ip: IpAddr = sb.ip_address.as_deref()?.parse().ok()?;
        (port != 0).then_some(Upstream::Tcp(SocketAddr::new(ip, port)))
    }

    async fn logs(
        &self,
        _sandbox: &Sandbox,
        _options: super::LogOptions,
    ) -> Result<LogStream, BackendError> {
        Err(BackendError::Io(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "logs are not available on the kubernetes backend yet",
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(v: Value) -> DynamicObject {
        serde_json::from_value(v).expect("a Sandbox")
    }

    #[test]
    fn exec_argv_and_exit() {
        let spec = ExecSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), "ls".into()],
            env: [("A".to_string(), "1".to_string())].into(),
            cwd: Some("/work".into()),
            stdin: false,
            tag: "t1".into(),
        };
        let argv = exec_argv(&spec);
        assert_eq!(argv[..3], ["env", "A=1", "SANDGATE_EXEC=t1"]);
        assert_eq!(argv[argv.len() - 4..], ["/work", "/bin/sh", "-c", "ls"]);

        let status = |v: Value| Some(serde_json::from_value(v).expect("a Status"));
        assert_eq!(
            exec_exit(status(json!({"status": "Success"}))),
            ExecExit::Exited(0)
        );
        assert_eq!(
            exec_exit(status(
                json!({"status": "Failure", "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": "7"}]}})
            )),
            ExecExit::Exited(7)
        );
        assert!(matches!(
            exec_exit(status(json!({"status": "Failure",
                "message": "exec: \"nope\": executable file not found in $PATH"}))),
            ExecExit::NotStarted {
                kind: StartKind::NotFound,
                ..
            }
        ));
        assert_eq!(exec_exit(None), ExecExit::Unknown);
    }

    #[test]
    fn discovery_reads_labels_readiness_and_pod_ip() {
        let d = discovered(&sandbox(json!({
            "apiVersion": "agents.x-k8s.io/v1beta1", "kind": "Sandbox",
            "metadata": {"name": "my-sandbox", "namespace": "default", "labels": {"user": "alice"}},
            "spec": {"operatingMode": "Running"},
            "status": {"podIPs": ["10.0.0.7"], "conditions": [{"type": "Ready", "status": "True"}]}
        })))
        .expect("discovered");
        assert_eq!(d.owner, "alice");
        assert_eq!(d.name.as_deref(), Some("my-sandbox"));
        assert!(d.ready && !d.suspended && !d.created_here);
        assert_eq!(d.pod_ip.as_deref(), Some("10.0.0.7"));
        assert_eq!(d.id, derived_id("default", "my-sandbox"));
        assert!(model::valid_id(&d.id));

        let d = discovered(&sandbox(json!({
            "apiVersion": "agents.x-k8s.io/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": "x", "namespace": "ns", "labels": {"user": "sandboxes"}},
            "spec": {"replicas": 0},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]}
        })))
        .expect("discovered");
        assert_eq!(d.owner, "default", "a reserved user label is not a route");
        assert!(!d.ready && d.suspended && d.pod_ip.is_none());
    }
}
