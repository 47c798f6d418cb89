//! One TelemetryStack reconcile, as named steps:
//! read (caches only) → validate (pure, `validate.rs`) → build the desired objects (pure, `build/`) → apply what
//! changed (server-side apply, field manager `flowtel`) → prune what the stack no longer wants → status (pure,
//! `status.rs`; written only on change) → a Warning event when the stack turns Degraded.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowtel_crds::TelemetryStack;
use flowtel_crds::telemetry_stack::TelemetryStackStatus;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::Caches;
use super::build::{self, Component, Kind, Stack, StackObject};
use super::status::{self, Problem, Workload};
use super::validate;
use crate::runtime::FIELD_MANAGER;
use crate::runtime::expiring::ExpiringMap;
use crate::runtime::rates::RunRates;

/// How often a stack whose collector minimum follows the run rate looks at the rate again.
const RATE_RECHECK: Duration = Duration::from_secs(30);
/// How often a stack waiting for the user's admin Secret asks again: flowtel cannot watch Secrets.
const SECRET_RECHECK: Duration = Duration::from_secs(10);

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building the stack's objects: {0}")]
    Build(#[from] build::BuildError),
    #[error("drawing the Grafana admin password: {0}")]
    Random(String),
    #[error("asking whether spec.grafana.adminCredentialsSecretRef exists (a dry-run create): {0}")]
    ProbeAdminSecret(#[source] kube::Error),
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub caches: Caches,
    pub rates: RunRates,
    pub recorder: Recorder,
    /// What this process applied lately (kind, namespace, name → applied hash), until the caches show it: a
    /// reconcile woken before they do (a workload's status changing) would otherwise apply the same object again.
    pub applied: ExpiringMap<(Kind, String, String), String>,
}

/// How long an apply is remembered: far longer than the caches take to show it.
pub const APPLIED_MEMORY: Duration = Duration::from_secs(10);

pub async fn reconcile(stack: Arc<TelemetryStack>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    if stack.metadata.deletion_timestamp.is_some() {
        // Owner references hand every object to the garbage collector.
        return Ok(Action::await_change());
    }
    let namespace = stack.namespace().unwrap_or_default();
    let rate = ctx.rates.per_second(&namespace, &stack.name_any(), Instant::now());
    let view = Stack::new(&stack, rate)?;

    // Validate, then build: any problem leaves every object as it is (the last good configuration keeps running).
    let mut problem = validate::spec(&stack.spec)
        .into_iter()
        .next()
        .map(|i| Problem { reason: i.reason.into(), message: i.to_string() });
    let desired = match build::desired(&view) {
        Ok(d) => Some(d),
        Err(build::BuildError::Invalid { field, message }) => {
            problem.get_or_insert(Problem {
                reason: status::reason::INVALID_COLLECTOR_CONFIG.into(),
                message: format!("{field}: {message}"),
            });
            None
        }
        Err(e) => return Err(e.into()),
    };
    if problem.is_none()
        && let Some(d) = &desired
        && let Some(config) = &d.collector_config
    {
        problem = check_collector_config(&stack, config);
    }
    if problem.is_none() {
        problem = missing_admin_secret(&view, &ctx.client).await?;
    }

    if let (None, Some(desired)) = (&problem, &desired) {
        ensure_admin_secret(&view, &ctx).await?;
        // Read before the apply: the Grafana Deployment as it was says whether the generated Secret was in use.
        let unused_secret = generated_secret_unused(&view, &ctx.caches);
        for object in &desired.objects {
            apply(&ctx, &namespace, object).await?;
        }
        prune(&view, &ctx, desired, unused_secret).await?;
    }

    let stored = stack.status.clone().unwrap_or_default();
    let computed =
        status::compute(&view, &stored, |c| workload(&ctx.caches, &view, c), problem.as_ref(), jiff::Timestamp::now());
    if stored != computed {
        write_status(&ctx.client, &stack, &computed).await?;
        if let Some(p) = &problem
            && newly_degraded(&stored, p)
        {
            warn(&ctx.recorder, &stack, p).await;
        }
    }
    let follows_rate =
        stack.spec.collector.autoscaling.as_ref().is_some_and(|a| a.runs_per_second_per_replica.is_some());
    let awaits_secret = problem.as_ref().is_some_and(|p| p.reason == status::reason::ADMIN_SECRET_NOT_FOUND);
    Ok(match (awaits_secret, follows_rate) {
        (true, _) => Action::requeue(SECRET_RECHECK),
        (false, true) => Action::requeue(RATE_RECHECK),
        (false, false) => Action::await_change(),
    })
}

pub fn error_policy(stack: Arc<TelemetryStack>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(stack = %stack.name_any(), namespace = stack.namespace().unwrap_or_default(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// The collector configuration, validated; the override is named when there is one (it is what broke it).
pub fn check_collector_config(stack: &TelemetryStack, config: &str) -> Option<Problem> {
    let parsed: serde_json::Value = match serde_yaml_ng::from_str(config) {
        Ok(v) => v,
        Err(e) => {
            return Some(Problem { reason: status::reason::INVALID_COLLECTOR_CONFIG.into(), message: e.to_string() });
        }
    };
    let error = validate::collector_config(&parsed).err()?;
    let field =
        if stack.spec.collector.config_override.is_some() { "spec.collector.configOverride" } else { "spec.collector" };
    Some(Problem { reason: status::reason::INVALID_COLLECTOR_CONFIG.into(), message: format!("{field}: {error}") })
}

/// Whether the user's admin Secret exists, asked without reading Secrets: flowtel holds no get, list or watch on
/// them (`docs/security.md`). A server-side dry-run create under the Secret's name answers 409 when it exists and
/// stores nothing when it does not; either way nothing of the Secret is returned.
async fn missing_admin_secret(stack: &Stack<'_>, client: &Client) -> Result<Option<Problem>, ReconcileError> {
    let grafana = &stack.stack.spec.grafana;
    let Some(reference) = grafana.admin_credentials_secret_ref.as_ref().filter(|_| grafana.enabled) else {
        return Ok(None);
    };
    let probe = Secret {
        metadata: kube::api::ObjectMeta { name: Some(reference.name.clone()), ..Default::default() },
        ..Secret::default()
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), &stack.namespace);
    let params = PostParams { dry_run: true, field_manager: Some(FIELD_MANAGER.into()) };
    match api.create(&params, &probe).await {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
        Ok(_) => Ok(Some(Problem {
            reason: status::reason::ADMIN_SECRET_NOT_FOUND.into(),
            message: format!(
                "spec.grafana.adminCredentialsSecretRef: Secret {} not found in namespace {} (keys admin-user, \
                 admin-password)",
                reference.name, stack.namespace
            ),
        })),
        Err(e) => Err(ReconcileError::ProbeAdminSecret(e)),
    }
}

/// Creates the generated Grafana admin Secret if it is absent, with a random password: never a default, never
/// logged, never re-applied (a 409 means it exists, and nothing of it is read). Deleted by hand, it is created again
/// at the stack's next reconcile.
async fn ensure_admin_secret(stack: &Stack<'_>, ctx: &Context) -> Result<(), ReconcileError> {
    let grafana = &stack.stack.spec.grafana;
    if !grafana.enabled || grafana.admin_credentials_secret_ref.is_some() {
        return Ok(());
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| ReconcileError::Random(e.to_string()))?;
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let secret = build::grafana::admin_secret(stack, &password);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &stack.namespace);
    match api.create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() }, &secret).await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The generated Secret's name when the stack no longer wants it but its Grafana Deployment, as cached, still reads
/// it (Grafana disabled, or a Secret of the user's named instead): Secrets are not cached, so this is how flowtel
/// knows there is one to prune.
fn generated_secret_unused(stack: &Stack<'_>, caches: &Caches) -> Option<String> {
    let grafana = &stack.stack.spec.grafana;
    if grafana.enabled && grafana.admin_credentials_secret_ref.is_none() {
        return None;
    }
    let name = build::grafana::generated_secret_name(stack);
    let Some(Workload::Deployment(deployment)) = workload(caches, stack, Component::Grafana) else { return None };
    let reads_it = deployment.spec.template.spec.is_some_and(|pod| {
        pod.containers
            .iter()
            .flat_map(|c| c.env.iter().flatten())
            .any(|v| v.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()).is_some_and(|r| r.name == name))
    });
    reads_it.then_some(name)
}

/// The cached copy's applied hash, for kinds flowtel applies.
fn cached_hash(caches: &Caches, kind: Kind, namespace: &str, name: &str) -> Option<String> {
    fn hash<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, namespace: &str, name: &str) -> Option<String> {
        let object = store.get(&ObjectRef::new(name).within(namespace))?;
        object.annotations().get(build::APPLIED_HASH_ANNOTATION).cloned()
    }
    match kind {
        Kind::ConfigMap => hash(&caches.config_maps, namespace, name),
        Kind::Service => hash(&caches.services, namespace, name),
        Kind::Deployment => hash(&caches.deployments, namespace, name),
        Kind::StatefulSet => hash(&caches.stateful_sets, namespace, name),
        Kind::DaemonSet => hash(&caches.daemon_sets, namespace, name),
        Kind::PodDisruptionBudget => hash(&caches.disruption_budgets, namespace, name),
        Kind::HorizontalPodAutoscaler => hash(&caches.autoscalers, namespace, name),
        Kind::Secret => None,
    }
}

async fn ssa<K>(client: &Client, namespace: &str, name: &str, object: &K) -> Result<(), kube::Error>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object)).await.map(|_| ())
}

/// Server-side apply of one object, skipped when the cache shows it applied with the same content.
async fn apply(ctx: &Context, namespace: &str, object: &StackObject) -> Result<(), ReconcileError> {
    let name = object.name();
    let key = (object.kind(), namespace.to_string(), name.clone());
    if let Some(hash) = object.applied_hash()
        && (cached_hash(&ctx.caches, object.kind(), namespace, &name).as_deref() == Some(hash)
            || ctx.applied.get(&key).as_deref() == Some(hash))
    {
        return Ok(());
    }
    let client = &ctx.client;
    match object {
        StackObject::ConfigMap(o) => ssa(client, namespace, &name, o).await?,
        StackObject::Secret(o) => ssa(client, namespace, &name, o).await?,
        StackObject::Service(o) => ssa(client, namespace, &name, o).await?,
        StackObject::Deployment(o) => ssa(client, namespace, &name, o).await?,
        StackObject::StatefulSet(o) => ssa(client, namespace, &name, o).await?,
        StackObject::DaemonSet(o) => ssa(client, namespace, &name, o).await?,
        StackObject::PodDisruptionBudget(o) => ssa(client, namespace, &name, o).await?,
        StackObject::HorizontalPodAutoscaler(o) => ssa(client, namespace, &name, o).await?,
    }
    if let Some(hash) = object.applied_hash() {
        ctx.applied.insert(key, hash.to_string());
    }
    tracing::debug!(kind = ?object.kind(), %name, %namespace, "applied");
    Ok(())
}

/// Objects of this stack (by controller owner) that it no longer wants.
fn stale<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, uid: &str, keep: &BTreeSet<String>) -> Vec<String> {
    store
        .state()
        .into_iter()
        .filter(|o| o.owner_references().iter().any(|r| r.controller == Some(true) && r.uid == uid))
        .map(|o| o.name_any())
        .filter(|name| !keep.contains(name))
        .collect()
}

async fn delete<K>(client: &Client, namespace: &str, names: Vec<String>) -> Result<(), kube::Error>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    for name in names {
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => tracing::info!(kind = %K::kind(&()), %name, %namespace, "pruned"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Deletes what a disabled component (or a changed mode) left behind.
async fn prune(
    stack: &Stack<'_>,
    ctx: &Context,
    desired: &build::Desired,
    unused_secret: Option<String>,
) -> Result<(), ReconcileError> {
    let Some(uid) = stack.stack.metadata.uid.clone() else { return Ok(()) };
    let keep = |kind: Kind| -> BTreeSet<String> {
        desired.objects.iter().filter(|o| o.kind() == kind).map(StackObject::name).collect()
    };
    let (c, ns, client) = (&ctx.caches, stack.namespace.as_str(), &ctx.client);
    delete::<ConfigMap>(client, ns, stale(&c.config_maps, &uid, &keep(Kind::ConfigMap))).await?;
    delete::<Service>(client, ns, stale(&c.services, &uid, &keep(Kind::Service))).await?;
    delete::<Deployment>(client, ns, stale(&c.deployments, &uid, &keep(Kind::Deployment))).await?;
    delete::<StatefulSet>(client, ns, stale(&c.stateful_sets, &uid, &keep(Kind::StatefulSet))).await?;
    delete::<DaemonSet>(client, ns, stale(&c.daemon_sets, &uid, &keep(Kind::DaemonSet))).await?;
    delete::<PodDisruptionBudget>(client, ns, stale(&c.disruption_budgets, &uid, &keep(Kind::PodDisruptionBudget)))
        .await?;
    delete::<HorizontalPodAutoscaler>(client, ns, stale(&c.autoscalers, &uid, &keep(Kind::HorizontalPodAutoscaler)))
        .await?;
    delete::<Secret>(client, ns, unused_secret.into_iter().collect()).await?;
    Ok(())
}

/// A component's workload from the caches (the kind its mode gives), when this stack owns it.
fn workload(caches: &Caches, stack: &Stack<'_>, component: Component) -> Option<Workload> {
    use flowtel_crds::telemetry_stack::CollectorMode;
    fn owned<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>, stack: &Stack<'_>, name: &str) -> Option<K> {
        let object = store.get(&ObjectRef::new(name).within(&stack.namespace))?;
        let uid = stack.stack.metadata.uid.as_deref()?;
        object.owner_references().iter().any(|o| o.uid == uid).then(|| (*object).clone())
    }
    let name = stack.object_name(component, None);
    match (component, stack.stack.spec.collector.mode) {
        (Component::Collector, CollectorMode::StatefulSet) => {
            owned(&caches.stateful_sets, stack, &name).map(Workload::StatefulSet)
        }
        (Component::Collector, CollectorMode::DaemonSet) => {
            owned(&caches.daemon_sets, stack, &name).map(Workload::DaemonSet)
        }
        (Component::Collector, CollectorMode::Deployment) | (Component::Grafana, _) => {
            owned(&caches.deployments, stack, &name).map(Workload::Deployment)
        }
        _ => owned(&caches.stateful_sets, stack, &name).map(Workload::StatefulSet),
    }
}

fn newly_degraded(stored: &TelemetryStackStatus, problem: &Problem) -> bool {
    !stored.conditions.iter().any(|c| {
        c.type_ == status::DEGRADED && c.status == "True" && c.reason == problem.reason && c.message == problem.message
    })
}

async fn write_status(
    client: &Client,
    stack: &TelemetryStack,
    status: &TelemetryStackStatus,
) -> Result<(), kube::Error> {
    let api: Api<TelemetryStack> = Api::namespaced(client.clone(), &stack.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": TelemetryStack::api_version(&()),
        "kind": TelemetryStack::kind(&()),
        "status": status,
    });
    api.patch_status(&stack.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    tracing::debug!(stack = %stack.name_any(), "status written");
    Ok(())
}

async fn warn(recorder: &Recorder, stack: &TelemetryStack, problem: &Problem) {
    let event = Event {
        type_: EventType::Warning,
        reason: problem.reason.clone(),
        note: Some(problem.message.chars().take(1024).collect()),
        action: "Validate".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &stack.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing an event failed");
    }
}
