//! The WorkflowRun controller: this file wires the watches, caches and the controller; `reconcile.rs` holds the
//! reconcile's steps, `plan.rs` its pure core, `job.rs` the attempt's Job (its environment in `env.rs`),
//! `report.rs` what a run reports as telemetry and `economy.rs` everything that only saves writes and reconciles.

mod children;
pub mod context;
pub mod economy;
pub mod env;
mod events;
pub mod export;
pub mod finalizer;
pub mod index;
pub mod job;
pub mod metrics;
#[cfg(test)]
mod mocked;
pub mod plan;
pub mod pooled;
pub mod reconcile;
pub mod report;
pub mod target;

use std::sync::Arc;

use flowtel_crds::workflow_run::WorkflowRunStatus;
use flowtel_crds::{TelemetryStack, WorkerPool, WorkflowRun};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::runtime::rates::RunRates;
use crate::runtime::readiness::{Gate, SyncTracker};
use crate::runtime::shards::Shard;
use crate::runtime::slim::{self, Skips, Slim, Watched};
use crate::runtime::triggers::Changes;
use crate::telemetry::Telemetry;
use job::{MANAGED_BY, MANAGED_BY_LABEL, RUN_NAME_ANNOTATION};
pub use metrics::ControllerMetrics;
use plan::Settings;
pub use reconcile::{Context, FIELD_MANAGER, FINALIZER};

/// Where the controller watches.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// One namespace, or all when None.
    pub namespace: Option<String>,
    /// The runs this process owns, with their Jobs and pods (`runtime::shards`).
    pub shard: Shard,
}

fn api<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match &scope.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The pieces `run` needs beyond the client.
pub struct ControllerSettings {
    pub scope: Scope,
    pub settings: Settings,
    pub default_otlp_endpoint: Option<String>,
    pub concurrency: u16,
    /// The write economy on (the default) or off, the correctness reference (`economy.rs`).
    pub write_economy: bool,
    /// Normal Events too (attempt started or finished, run succeeded); Warnings (failures, retries, cancels) always.
    pub normal_events: bool,
    /// The dispatcher of pooled runs, when this operator serves one (`--dispatch-addr`).
    pub dispatcher: Option<crate::pool::dispatch::Dispatcher>,
}

/// Runs the controller until SIGTERM or SIGINT. `synced` opens when every watch has delivered its first list;
/// `notifications` are the runs whose telemetry reports changed state.
pub async fn run(
    client: Client,
    telemetry: Telemetry<ObjectRef<WorkflowRun>>,
    notifications: mpsc::UnboundedReceiver<ObjectRef<WorkflowRun>>,
    config: ControllerSettings,
    metrics: ControllerMetrics,
    synced: Gate,
    rates: RunRates,
) {
    let sync = SyncTracker::new(5, synced);
    let economy = economy::Economy::new(config.write_economy);
    // The runs' watch starts once the Jobs, pods and stacks are cached: a run reconciled before would find no Job
    // and create one again (a conflict on every run after each restart or takeover).
    let children_synced = Gate::standalone("workflowrun-children-synced");
    let children = SyncTracker::new(4, children_synced.clone());
    let job_index = index::RunIndex::default();
    let pod_index = index::RunIndex::default();
    // Job status carries no exit codes or disruption conditions, the pods do: both are watched, trimmed, indexed;
    // only ended pods, as the planner reads no others.
    let shard = config.scope.shard.selector();
    let (jobs, job_stream) = managed_children(
        api::<Slim<Job>>(&client, &config.scope),
        managed(shard.as_deref()),
        [&sync, &children],
        "jobs",
        &job_index,
        |j: &Job| {
            let run = job::owning_run(j)?;
            Some(((j.namespace()?, run.name.clone()), j.name_any()))
        },
        // A new Job wakes nothing: its run's reconcile created it (and a restart lists it). Its end does.
        economy.child_filter(plan::job_signature, plan::job_has_ended),
    );
    let (pods, pod_stream) = managed_children(
        api::<Slim<Pod>>(&client, &config.scope),
        managed(shard.as_deref()).fields(plan::TERMINAL_PODS),
        [&sync, &children],
        "pods",
        &pod_index,
        |p: &Pod| Some(((p.namespace()?, p.annotations().get(RUN_NAME_ANNOTATION)?.clone()), p.name_any())),
        // Pods are seen only once they ended (`TERMINAL_PODS`): the first sighting is the end.
        economy.child_filter(plan::pod_signature, |_| true),
    );
    let (stacks, stacks_writer) = reflector::store();
    let stack_stream = watcher(api::<Slim<TelemetryStack>>(&client, &config.scope), watcher::Config::default())
        .default_backoff()
        .map_ok(slim::unwrap_event)
        .reflect(stacks_writer)
        .inspect(sync.watch("telemetrystacks"))
        .inspect(children.watch("telemetrystacks"))
        .touched_objects();

    // Pooled runs read their pool (its command, what it allows) from this cache; a pool's change wakes no run.
    let (pools, pools_writer) = reflector::store();
    let pool_stream = watcher(api::<Slim<WorkerPool>>(&client, &config.scope), watcher::Config::default())
        .default_backoff()
        .map_ok(slim::unwrap_event)
        .reflect(pools_writer)
        .inspect(sync.watch("workerpools"))
        .inspect(children.watch("workerpools"))
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(pool_stream);

    // The runs' own reflector, so readiness can wait on it like on the others; managedFields are never read.
    let (runs_store, runs_writer) = reflector::store();
    let runs_api = api::<Slim<WorkflowRun>>(&client, &config.scope);
    let runs_synced = sync.watch("workflowruns");
    let mut owned_runs = watcher::Config::default();
    if let Some(shard) = &shard {
        owned_runs = owned_runs.labels(shard);
    }
    let context = Arc::new(Context {
        client: client.clone(),
        jobs: jobs.clone(),
        pods: pods.clone(),
        stacks: stacks.clone(),
        pools,
        dispatcher: config.dispatcher,
        job_index,
        pod_index,
        telemetry,
        settings: economy.settings(config.settings),
        default_otlp_endpoint: config.default_otlp_endpoint,
        normal_events: config.normal_events,
        recorder: Recorder::new(client.clone(), Reporter { controller: "flowtel".into(), instance: None }),
        metrics,
        economy,
        api_answered: std::sync::Mutex::new(None),
        rates,
    });
    let echoes = context.clone();
    // A new leader's dispatcher learns which runs existed before it (`Dispatcher::listed`).
    let first_list = context.dispatcher.clone();
    let run_stream = futures::stream::once(async move {
        children_synced.opened().await;
        watcher(runs_api, owned_runs)
            .default_backoff()
            .map_ok(slim::unwrap_event)
            .modify(trim_for_cache)
            .reflect(runs_writer)
            .inspect(move |event| {
                if let (Some(dispatcher), Ok(event)) = (&first_list, event) {
                    match event {
                        watcher::Event::InitApply(run) if run.metadata.uid.is_some() => {
                            dispatcher.listed(run.metadata.uid.as_deref());
                        }
                        watcher::Event::InitDone => dispatcher.listed(None),
                        _ => {}
                    }
                }
            })
            .inspect(runs_synced)
            .filter(move |event| futures::future::ready(echoes.economy.passes_run_event(event)))
            .touched_objects()
    })
    .flatten();
    let controller = Controller::for_stream(run_stream, runs_store.clone());
    let runs_for_stacks = runs_store.clone();
    // A settled run (over, its report out) reads nothing of its Job or pod: the later of their two ends wakes nothing.
    let unsettled = {
        let runs = runs_store.clone();
        let all = context.economy.wakes_settled_runs();
        move |run: ObjectRef<WorkflowRun>| (all || !runs.get(&run).is_some_and(|r| plan::is_settled(&r))).then_some(run)
    };
    let unsettled_for_pods = unsettled.clone();
    controller
        .watches_stream(job_stream, move |job: Job| {
            let owner = job::owning_run(&job)?;
            unsettled(ObjectRef::new(&owner.name).within(&job.namespace()?))
        })
        .watches_stream(pod_stream, move |pod: Pod| {
            let name = pod.annotations().get(RUN_NAME_ANNOTATION)?.clone();
            unsettled_for_pods(ObjectRef::new(&name).within(&pod.namespace()?))
        })
        // A stack that changes (becomes Ready, moves its endpoint) concerns the unfinished runs that reference it:
        // a run waiting for it starts without an operator restart.
        .watches_stream(stack_stream, move |stack: TelemetryStack| {
            let namespace = stack.namespace().unwrap_or_default();
            let name = stack.name_any();
            runs_for_stacks
                .state()
                .into_iter()
                .filter(|r| {
                    r.namespace().as_deref() == Some(namespace.as_str())
                        && r.spec.telemetry_stack_ref.as_ref().is_some_and(|s| s.name == name)
                        && r.status.as_ref().and_then(|s| s.completion_time.as_ref()).is_none()
                })
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect::<Vec<_>>()
        })
        .reconcile_on(UnboundedReceiverStream::new(notifications))
        .with_config(kube::runtime::controller::Config::default().concurrency(config.concurrency))
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Crash points (the `failpoints` feature, tests only: `FLOWTEL_CRASH_AT=<point>` aborts the process there, as a
/// crash would, so the end-to-end tests can show that a restart never double-counts; see `main.rs`). Without the
/// feature they compile to nothing.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn crash_point(point: &str) {
    fail::fail_point!(point);
}

// What each watch's cache never reads, skipped while decoding (runtime::slim). The planner reads a Job's and a
// pod's metadata and status only; a run is read whole (a stack's impl is with its controller).
impl Skips for Job {
    const SKIPPED: &'static [&'static str] = &["spec"];
}
impl Skips for Pod {
    const SKIPPED: &'static [&'static str] = &["spec"];
}
impl Skips for WorkflowRun {}
impl Skips for WorkerPool {}

/// What the cache keeps of a run: never managedFields (skipped while decoding) or kubectl's last-applied copy of the
/// whole object; and once the run is settled (over, reported, status current), only what its TTL needs, since the
/// reconcile of a settled run reads nothing else (`plan::is_settled`, the same test, decides both). Retained
/// finished runs are most of the cache at 10M runs a day. Writes are merge patches of status or finalizers, so a
/// trimmed copy never overwrites what it lacks; a change to the run (a new generation, a deletion) arrives whole
/// and is no longer settled.
fn trim_for_cache(run: &mut WorkflowRun) {
    // One empty template for all settled runs: each would otherwise keep its own (1.8 KiB, however empty).
    static EMPTY_TEMPLATE: std::sync::LazyLock<Arc<PodTemplateSpec>> = std::sync::LazyLock::new(Arc::default);
    run.annotations_mut().remove("kubectl.kubernetes.io/last-applied-configuration");
    if plan::is_settled(run) {
        run.spec.template = EMPTY_TEMPLATE.clone();
        if let Some(status) = run.status.as_mut() {
            *status = WorkflowRunStatus {
                phase: status.phase,
                completion_time: status.completion_time.take(),
                telemetry: status.telemetry.take(),
                observed_generation: status.observed_generation,
                ..WorkflowRunStatus::default()
            };
        }
    }
}

/// The objects flowtel manages (label managed-by=flowtel) in this shard (`shard`: its selector, if any).
fn managed(shard: Option<&str>) -> watcher::Config {
    let labels = match shard {
        None => format!("{MANAGED_BY_LABEL}={MANAGED_BY}"),
        Some(shard) => format!("{MANAGED_BY_LABEL}={MANAGED_BY},{shard}"),
    };
    watcher::Config::default().labels(&labels)
}

/// A cached, trimmed and run-indexed watch of `selection`; only the events `changes` passes wake their run.
fn managed_children<K>(
    api: Api<Slim<K>>,
    selection: watcher::Config,
    trackers: [&SyncTracker; 2],
    what: &'static str,
    index: &index::RunIndex,
    key: impl Fn(&K) -> Option<((String, String), String)> + Send + 'static,
    mut changes: Changes<K>,
) -> (Store<K>, impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static)
where
    K: Watched,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, selection)
        .default_backoff()
        .map_ok(slim::unwrap_event)
        .reflect(writer)
        .inspect(trackers[0].watch(what))
        .inspect(trackers[1].watch(what))
        .inspect(index.observe(key))
        .filter(move |event| futures::future::ready(changes.pass(event)))
        .touched_objects();
    (store, stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real watch events from kube-apiserver 1.37 (a bench run): decoded without spec and managedFields, with what
    /// the planner reads intact.
    #[test]
    fn the_children_watches_decode_real_events_without_what_the_planner_never_reads() {
        fn added<K: Skips + serde::de::DeserializeOwned>(event: &str) -> K {
            match serde_json::from_str::<kube::core::WatchEvent<Slim<K>>>(event).unwrap() {
                kube::core::WatchEvent::Added(o) => o.into_inner(),
                _ => panic!("an ADDED event"),
            }
        }
        let job: Job = added(include_str!("testdata/watch-event-job.json"));
        assert_eq!((job.spec.as_ref(), job.metadata.managed_fields.as_ref()), (None, None));
        assert!(job::owning_run(&job).is_some());
        let pod: Pod = added(include_str!("testdata/watch-event-pod.json"));
        assert_eq!((pod.spec.as_ref(), pod.metadata.managed_fields.as_ref()), (None, None));
        assert_eq!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded"));
        assert!(pod.annotations().contains_key(RUN_NAME_ANNOTATION));
    }

    fn run(status: serde_json::Value) -> WorkflowRun {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": "r", "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "keep": "1"}},
            "spec": {"workflowName": "w", "template": {"spec": {"containers": [{"name": "main", "image": "app"}]}}},
            "status": status
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_finished_exported_run_is_cached_without_its_template_a_running_one_with_it() {
        let mut finished = run(
            serde_json::json!({"completionTime": "2026-11-30T05:00:00.000000Z", "telemetry": {"started": true, "finished": true}}),
        );
        let mut another = finished.clone();
        trim_for_cache(&mut finished);
        trim_for_cache(&mut another);
        assert!(finished.spec.template.spec.is_none());
        assert!(Arc::ptr_eq(&finished.spec.template, &another.spec.template), "settled runs share one template");
        assert_eq!(finished.annotations().get("keep").map(String::as_str), Some("1"));
        assert!(!finished.annotations().contains_key("kubectl.kubernetes.io/last-applied-configuration"));
        // Over, but its report not yet exported: the report is built from the run, template labels included.
        let mut unreported = run(serde_json::json!({"completionTime": "2026-11-30T05:00:00.000000Z"}));
        trim_for_cache(&mut unreported);
        assert!(unreported.spec.template.spec.is_some());
        let mut running = run(serde_json::json!({"phase": "Running"}));
        trim_for_cache(&mut running);
        assert!(running.spec.template.spec.is_some());
    }
}
