//! The WorkerPool controller: read → build the workers' Deployment (pure, `build_deployment`) → size it from the
//! dispatcher's load (pure, `desired_replicas`) → apply under flowtel's field manager → status (written on change).
//! A pool costs apiserver writes per scaling step, never per run.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowtel_crds::WorkerPool;
use flowtel_crds::worker_pool::WorkerPoolStatus;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, ProjectedVolumeSource, ServiceAccountTokenProjection, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::dispatch::Dispatcher;
use crate::runtime::conditions::set_condition;
use crate::runtime::{FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, env_from_field as field, env_var as plain};

/// The label naming a worker's pool.
pub const POOL_LABEL: &str = "flowtel.dev/pool";
/// The annotation on the workers' Deployment with a hash of what flowtel applied: an unchanged Deployment is not
/// applied again (each pool reconcile would otherwise cost a write, and a busy pool is reconciled as its queue grows).
const APPLIED_HASH: &str = "flowtel.dev/applied-hash";
/// How often, at most, a pool's status is written for its queue alone.
const QUEUE_STATUS_EVERY: Duration = Duration::from_secs(10);
/// Where the init container puts the agent, and the agent's path in the worker.
const AGENT_DIR: &str = "/flowtel-agent";
const AGENT_VOLUME: &str = "flowtel-agent";
/// The worker's ServiceAccount token, projected whatever the pod's automount says: the dispatcher serves a worker
/// only with its pool's identity (`auth.rs`).
const TOKEN_VOLUME: &str = "flowtel-token";
const TOKEN_DIR: &str = "/var/run/secrets/flowtel";

/// What the pool controller is given.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// The image the agent is copied from (the operator's own).
    pub agent_image: String,
    /// The dispatch URL the workers ask.
    pub dispatch_url: String,
}

/// Errors of one pool reconcile, one per step.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the WorkerPool has no namespace")]
    NoNamespace,
    #[error("applying the workers' Deployment: {0}")]
    ApplyDeployment(#[source] kube::Error),
    #[error("writing the pool's status: {0}")]
    WriteStatus(#[source] kube::Error),
}

struct Context {
    client: Client,
    dispatcher: Dispatcher,
    settings: PoolSettings,
    deployments: kube::runtime::reflector::Store<Deployment>,
    pools: kube::runtime::reflector::Store<WorkerPool>,
    /// When each pool last needed as many workers as it has (its scale-down waits from there).
    busy_at: Mutex<HashMap<String, Instant>>,
    /// When each pool's status was last written.
    status_written: Mutex<HashMap<String, Instant>>,
}

/// The workers' Deployment's name.
pub fn deployment_name(pool: &str) -> String {
    crate::runtime::names::shorten(&format!("{pool}-workers"), 63)
}

/// The workers' Deployment: the pool's template with the agent copied in by an init container and put in front of
/// the first container's command.
pub fn build_deployment(pool: &WorkerPool, settings: &PoolSettings, replicas: i32) -> Deployment {
    let name = pool.name_any();
    let namespace = pool.namespace().unwrap_or_default();
    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (POOL_LABEL.to_string(), crate::runtime::names::shorten(&name, 63)),
    ]);
    let mut template = pool.spec.template.clone();
    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels.get_or_insert_with(Default::default).extend(labels.clone());
    let pod = template.spec.get_or_insert_with(Default::default);
    // A worker runs until it is scaled away: Always keeps it, and its agent, up.
    pod.restart_policy = Some("Always".into());
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: AGENT_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    });
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    path: "token".into(),
                    expiration_seconds: Some(3600),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mount = VolumeMount { name: AGENT_VOLUME.into(), mount_path: AGENT_DIR.into(), ..Default::default() };
    let token_mount = VolumeMount {
        name: TOKEN_VOLUME.into(),
        mount_path: TOKEN_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let agent = format!("{AGENT_DIR}/flowtel");
    pod.init_containers.get_or_insert_with(Vec::new).insert(
        0,
        Container {
            name: "flowtel-agent".into(),
            image: Some(settings.agent_image.clone()),
            command: Some(vec!["/usr/local/bin/flowtel".into(), "install-agent".into(), agent.clone()]),
            volume_mounts: Some(vec![mount.clone()]),
            ..Default::default()
        },
    );
    if let Some(main) = pod.containers.first_mut() {
        let mut command = vec![agent, "worker".into(), "--".into()];
        command.extend(main.command.take().unwrap_or_default());
        command.extend(main.args.take().unwrap_or_default());
        main.command = Some(command);
        main.volume_mounts.get_or_insert_with(Vec::new).extend([mount, token_mount]);
        let env = main.env.get_or_insert_with(Vec::new);
        env.push(plain("FLOWTEL_DISPATCH_URL", &settings.dispatch_url));
        env.push(plain("FLOWTEL_POOL", format!("{namespace}/{name}")));
        env.push(plain("FLOWTEL_TOKEN_FILE", format!("{TOKEN_DIR}/token")));
        env.push(field("POD_NAME", "metadata.name"));
        env.push(field("POD_NAMESPACE", "metadata.namespace"));
        env.push(field("NODE_NAME", "spec.nodeName"));
    }
    Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(&name)),
            namespace: Some(namespace),
            labels: Some(labels.clone()),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector { match_labels: Some(labels), ..Default::default() },
            template,
            ..Default::default()
        },
        status: None,
    }
}

/// How many workers: the load (queued plus running attempts) within the bounds; a pool larger than its load
/// shrinks only once it has been so for `scale_down_after` (`busy_at`: when it last was not).
pub fn desired_replicas(
    current: i32,
    load: usize,
    pool: &WorkerPool,
    busy_at: Instant,
    now: Instant,
) -> (i32, Option<Duration>) {
    let bounds = &pool.spec.replicas;
    let wanted = i32::try_from(load).unwrap_or(i32::MAX).clamp(bounds.min, bounds.max);
    let current = current.clamp(bounds.min, bounds.max);
    if wanted >= current {
        return (wanted, None);
    }
    let after = Duration::from_secs(u64::try_from(bounds.scale_down_after_seconds).unwrap_or(0));
    let idle_for = now.duration_since(busy_at);
    if idle_for >= after { (wanted, None) } else { (current, Some(after - idle_for)) }
}

/// Runs the pool controller until SIGTERM. `load_changes` names the pools whose load grew (from the dispatcher).
pub async fn run(
    client: Client,
    namespace: Option<String>,
    dispatcher: Dispatcher,
    settings: PoolSettings,
    load_changes: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<WorkerPool>>,
    auth: Option<super::auth::Authenticator>,
) {
    let pools: Api<WorkerPool> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let deployments: Api<Deployment> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (store, writer) = kube::runtime::reflector::store();
    let deployment_stream = watcher(deployments, watcher::Config::default().labels(POOL_LABEL))
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    let controller = Controller::new(pools, watcher::Config::default());
    let context = Arc::new(Context {
        client,
        dispatcher,
        settings,
        deployments: store,
        pools: controller.store(),
        busy_at: Mutex::default(),
        status_written: Mutex::default(),
    });
    if let Some(auth) = auth {
        auth.read_pools_from(controller.store());
    }
    controller
        .owns_stream(deployment_stream)
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(load_changes))
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|_| futures::future::ready(()))
        .await;
}

fn error_policy(pool: Arc<WorkerPool>, error: &PoolError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(pool = %pool.name_any(), %error, "pool reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(pool: Arc<WorkerPool>, ctx: Arc<Context>) -> Result<Action, PoolError> {
    let namespace = pool.namespace().ok_or(PoolError::NoNamespace)?;
    let key = format!("{namespace}/{}", pool.name_any());
    let name = deployment_name(&pool.name_any());
    let existing = ctx.deployments.get(&ObjectRef::new(&name).within(&namespace));
    let current = existing.as_ref().and_then(|d| d.spec.replicas).unwrap_or(pool.spec.replicas.min);
    let load = ctx.dispatcher.load(&key);
    let now = Instant::now();
    forget_deleted_pools(&ctx);
    let busy_at = {
        let mut busy = ctx.busy_at.lock().unwrap_or_else(|e| e.into_inner());
        let at = busy.entry(key.clone()).or_insert(now);
        if i32::try_from(load).unwrap_or(i32::MAX) >= current {
            *at = now;
        }
        *at
    };
    let (replicas, recheck) = desired_replicas(current, load, &pool, busy_at, now);
    let mut desired = build_deployment(&pool, &ctx.settings, replicas);
    let hash = applied_hash(&desired);
    let applied = existing.as_ref().and_then(|d| d.metadata.annotations.as_ref()?.get(APPLIED_HASH).cloned());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    if applied.as_deref() != Some(hash.as_str()) {
        desired.metadata.annotations = Some(BTreeMap::from([(APPLIED_HASH.to_string(), hash)]));
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
        deployments.patch(&name, &params, &Patch::Apply(&desired)).await.map_err(PoolError::ApplyDeployment)?;
    }
    let ready = existing.as_ref().and_then(|d| d.status.as_ref()?.ready_replicas).unwrap_or(0);
    let (queued, busy, oldest) = ctx.dispatcher.queue_state(&key);
    let mut status = pool_status(&pool, replicas, ready, jiff::Timestamp::now());
    status.queued = Some(i32::try_from(queued).unwrap_or(i32::MAX));
    status.busy = Some(i32::try_from(busy).unwrap_or(i32::MAX));
    status.oldest_queued_seconds = Some(oldest.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
    let last_written = ctx.status_written.lock().unwrap_or_else(|e| e.into_inner()).get(&key).copied();
    let write = status_worth_writing(pool.status.as_ref(), &status, last_written, now);
    if write {
        let pools: Api<WorkerPool> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch =
            json!({"apiVersion": WorkerPool::api_version(&()), "kind": WorkerPool::kind(&()), "status": status});
        pools.patch_status(&pool.name_any(), &params, &Patch::Apply(&patch)).await.map_err(PoolError::WriteStatus)?;
        ctx.status_written.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), now);
    }
    // A queue the status does not show yet is written once the throttle allows.
    let stale_queue = !write && pool.status.as_ref() != Some(&status);
    let recheck = recheck.or(stale_queue.then_some(QUEUE_STATUS_EVERY));
    // A pool above its floor looks again after the scale-down delay: its load may have dropped meanwhile.
    let after = Duration::from_secs(u64::try_from(pool.spec.replicas.scale_down_after_seconds).unwrap_or(0).max(1));
    let recheck = recheck.or((replicas > pool.spec.replicas.min).then_some(after));
    Ok(recheck.map_or_else(Action::await_change, Action::requeue))
}

/// Drops what is remembered of pools no longer in the cache (a deleted pool gets no reconcile of its own).
fn forget_deleted_pools(ctx: &Context) {
    let exists = |key: &String| {
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        ctx.pools.get(&ObjectRef::new(name).within(namespace)).is_some()
    };
    ctx.busy_at.lock().unwrap_or_else(|e| e.into_inner()).retain(|key, _| exists(key));
    ctx.status_written.lock().unwrap_or_else(|e| e.into_inner()).retain(|key, _| exists(key));
}

/// A hash of the Deployment flowtel applies (`APPLIED_HASH`).
fn applied_hash(desired: &Deployment) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(desired).unwrap_or_default().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Whether to write the pool's status: always when its size, readiness or conditions change; for its queue alone
/// (queued, busy, oldest wait), at most every `QUEUE_STATUS_EVERY`, so a busy pool costs a write per 10 s, not per
/// run.
pub fn status_worth_writing(
    stored: Option<&WorkerPoolStatus>,
    planned: &WorkerPoolStatus,
    last_written: Option<Instant>,
    now: Instant,
) -> bool {
    let Some(stored) = stored else { return true };
    if stored == planned {
        return false;
    }
    let without_queue =
        |s: &WorkerPoolStatus| WorkerPoolStatus { queued: None, busy: None, oldest_queued_seconds: None, ..s.clone() };
    without_queue(stored) != without_queue(planned)
        || last_written.is_none_or(|at| now.duration_since(at) >= QUEUE_STATUS_EVERY)
}

/// The pool's status: its size, and Ready once a worker is.
pub fn pool_status(pool: &WorkerPool, replicas: i32, ready: i32, now: jiff::Timestamp) -> WorkerPoolStatus {
    let mut status = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    let (value, reason, message) = if ready > 0 {
        ("True", "WorkersReady", format!("{ready} of {replicas} workers ready"))
    } else {
        ("False", "NoWorkerReady", format!("0 of {replicas} workers ready"))
    };
    set_condition(&mut status.conditions, "Ready", value, reason, &message, generation, now);
    status.replicas = Some(replicas);
    status.ready_replicas = Some(ready);
    status.observed_generation = generation;
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> WorkerPool {
        serde_json::from_value(json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": "sync", "namespace": "team", "uid": "u1"},
            "spec": {
                "template": {"spec": {"containers": [{"name": "main", "image": "sync:1", "command": ["/usr/local/bin/sync"], "args": ["--fast"]}]}},
                "replicas": {"min": 1, "max": 5, "scaleDownAfterSeconds": 60}
            }
        }))
        .expect("pool")
    }

    #[test]
    fn the_agent_goes_in_front_of_the_pools_command() {
        let settings = PoolSettings { agent_image: "flowtel:1".into(), dispatch_url: "http://d:8090".into() };
        let d = build_deployment(&pool(), &settings, 2);
        let spec = d.spec;
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.expect("pod");
        let main = &pod.containers[0];
        assert_eq!(
            main.command.as_deref(),
            Some(&["/flowtel-agent/flowtel", "worker", "--", "/usr/local/bin/sync", "--fast"].map(String::from)[..])
        );
        assert_eq!(main.args, None);
        let env: Vec<&str> = main.env.iter().flatten().map(|e| e.name.as_str()).collect();
        assert_eq!(
            env,
            ["FLOWTEL_DISPATCH_URL", "FLOWTEL_POOL", "FLOWTEL_TOKEN_FILE", "POD_NAME", "POD_NAMESPACE", "NODE_NAME"]
        );
        assert_eq!(pod.init_containers.expect("init")[0].image.as_deref(), Some("flowtel:1"));
    }

    #[test]
    fn the_queue_alone_is_written_at_most_every_ten_seconds() {
        let now = Instant::now();
        let stored = pool_status(&pool(), 2, 2, jiff::Timestamp::now());
        let busier = WorkerPoolStatus { queued: Some(5), busy: Some(2), ..stored.clone() };
        assert!(!status_worth_writing(Some(&stored), &stored, None, now), "nothing changed");
        assert!(!status_worth_writing(Some(&stored), &busier, Some(now), now + Duration::from_secs(3)));
        assert!(status_worth_writing(Some(&stored), &busier, Some(now), now + Duration::from_secs(10)));
        let grown = WorkerPoolStatus { replicas: Some(3), ..busier.clone() };
        assert!(status_worth_writing(Some(&stored), &grown, Some(now), now), "a size change at once");
    }

    #[test]
    fn the_pool_follows_its_load_up_at_once_and_down_after_the_delay() {
        let p = pool();
        let now = Instant::now();
        assert_eq!(desired_replicas(1, 4, &p, now, now), (4, None));
        assert_eq!(desired_replicas(1, 40, &p, now, now), (5, None), "at most max");
        let (kept, recheck) = desired_replicas(4, 0, &p, now, now + Duration::from_secs(10));
        assert_eq!((kept, recheck), (4, Some(Duration::from_secs(50))));
        assert_eq!(desired_replicas(4, 0, &p, now, now + Duration::from_secs(61)), (1, None), "down to min");
    }
}
