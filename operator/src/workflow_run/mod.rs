//! The WorkflowRun controller. A reconcile is a pipeline:
//! read (caches only) → plan (pure, `plan.rs`) → build the attempt's Job (pure, `job.rs`, environment in `env.rs`)
//! → apply under one field manager → report telemetry (`crate::telemetry`) → write status only when it changed.

pub mod env;
pub mod ids;
pub mod index;
pub mod job;
pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use flowtel_crds::workflow_run::{TelemetryReport, WorkflowRunPhase, WorkflowRunStatus};
use flowtel_crds::{TelemetryStack, WorkflowRun};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PropagationPolicy};
use kube::runtime::controller::{Action as ControllerAction, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

use crate::telemetry::{ReportKind, ReportState, Telemetry};
use job::{MANAGED_BY, MANAGED_BY_LABEL, OtlpTarget, RUN_NAME_ANNOTATION};
use plan::{Action, Observation, Settings};

/// The field manager of everything flowtel writes.
pub const FIELD_MANAGER: &str = "flowtel";
/// How long the `started` telemetry flag may wait for another status change before it is written on its own.
const STARTED_FLAG_DEFER_SECONDS: i64 = 30;
/// Holds a run's deletion until its telemetry was exported (or dropped after the timeout).
pub const FINALIZER: &str = "flowtel.dev/telemetry";

/// Test hook: `FLOWTEL_CRASH_AT=<point>` aborts the process at that point, as a crash would, so the end-to-end
/// tests can show that a restart never double-counts. Points: `after-job-create`, `after-terminal-status`,
/// `during-backoff`.
fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT.get_or_init(|| std::env::var("FLOWTEL_CRASH_AT").ok()).as_deref() == Some(point) {
        tracing::error!(point, "FLOWTEL_CRASH_AT: aborting");
        std::process::abort();
    }
}

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building the attempt's Job: {0}")]
    Build(#[from] job::BuildError),
    #[error("Job {0} exists and is not controlled by this run")]
    JobNameConflict(String),
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub jobs: Store<Job>,
    pub pods: Store<Pod>,
    pub stacks: Store<TelemetryStack>,
    /// Job and pod names by run.
    pub job_index: index::RunIndex,
    pub pod_index: index::RunIndex,
    pub telemetry: Telemetry,
    pub settings: Settings,
    /// The workload's OTLP endpoint when a run references no TelemetryStack.
    pub default_otlp_endpoint: Option<String>,
    pub recorder: Recorder,
    pub stats: Arc<ReconcileStats>,
}

/// Counters for `/metrics`.
#[derive(Default, Debug)]
pub struct ReconcileStats {
    pub reconciles: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
    pub status_writes: std::sync::atomic::AtomicU64,
}

/// The workload's telemetry target, and why telemetry is degraded when it is.
fn telemetry_target(run: &WorkflowRun, ctx: &Context) -> (OtlpTarget, Option<(String, String)>) {
    let default = OtlpTarget { endpoint: ctx.default_otlp_endpoint.clone(), protocol: "grpc".into() };
    let Some(reference) = &run.spec.telemetry_stack_ref else {
        let degraded = default
            .endpoint
            .is_none()
            .then(|| ("NoOtlpEndpoint".to_string(), "no TelemetryStack referenced and no default endpoint".into()));
        return (default, degraded);
    };
    let key = ObjectRef::<TelemetryStack>::new(&reference.name).within(&run.namespace().unwrap_or_default());
    match ctx.stacks.get(&key) {
        None => (
            default,
            Some((
                "TelemetryStackNotFound".into(),
                format!(
                    "spec.telemetryStackRef: TelemetryStack {} not found; using the operator's default",
                    reference.name
                ),
            )),
        ),
        Some(stack) => match stack.status.as_ref().and_then(|s| s.endpoints.otlp_grpc.clone()) {
            Some(endpoint) => (OtlpTarget { endpoint: Some(endpoint), protocol: "grpc".into() }, None),
            None => (
                default,
                Some((
                    "TelemetryStackNotReady".into(),
                    format!("TelemetryStack {} has no OTLP endpoint yet; using the operator's default", reference.name),
                )),
            ),
        },
    }
}

async fn publish(ctx: &Context, run: &WorkflowRun, note: &plan::EventNote) {
    let event = Event {
        type_: if note.warning { EventType::Warning } else { EventType::Normal },
        reason: note.reason.into(),
        note: Some(note.note.clone()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &run.object_ref(&())).await {
        tracing::debug!(error = %e, "publishing an event failed");
    }
}

/// The run's Jobs and pods, from the caches through the run index.
fn read_children(run: &WorkflowRun, ctx: &Context) -> (Vec<Arc<Job>>, Vec<Arc<Pod>>) {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let uid = run.uid().unwrap_or_default();
    let jobs: Vec<Arc<Job>> = ctx
        .job_index
        .names(&ns, &name)
        .iter()
        .filter_map(|n| ctx.jobs.get(&ObjectRef::new(n).within(&ns)))
        .filter(|j| job::is_controlled_by(j, &uid))
        .collect();
    let job_names: Vec<String> = jobs.iter().map(|j| j.name_any()).collect();
    let pods = ctx
        .pod_index
        .names(&ns, &name)
        .iter()
        .filter_map(|n| ctx.pods.get(&ObjectRef::new(n).within(&ns)))
        .filter(|p| p.owner_references().iter().any(|o| o.kind == "Job" && job_names.contains(&o.name)))
        .collect();
    (jobs, pods)
}

/// Where the run's telemetry reports stand, for what status already recorded (the KEP-2307 order).
struct Reports {
    /// What status will say about the reports.
    report: TelemetryReport,
    /// Set when an export failed or was dropped.
    degraded: Option<(String, String)>,
    /// Look again soon: an export is being retried.
    retry_after: Option<Duration>,
}

fn report_telemetry(run: &WorkflowRun, ctx: &Context, stored: &WorkflowRunStatus) -> Reports {
    let mut out = Reports { report: stored.telemetry.clone().unwrap_or_default(), degraded: None, retry_after: None };
    let mut wanted = Vec::new();
    if stored.start_time.is_some() && !out.report.started {
        wanted.push(ReportKind::Started);
    }
    if plan::is_terminal(stored) && !out.report.finished {
        wanted.push(ReportKind::Finished);
    }
    for kind in wanted {
        match ctx.telemetry.report(run, kind) {
            ReportState::Exported => match kind {
                ReportKind::Started => out.report.started = true,
                ReportKind::Finished => out.report.finished = true,
            },
            ReportState::Dropped { reason } => {
                match kind {
                    ReportKind::Started => out.report.started = true,
                    ReportKind::Finished => {
                        out.report.finished = true;
                        out.report.dropped = true;
                    }
                }
                out.degraded = Some(("TelemetryDropped".into(), format!("run telemetry was dropped: {reason}")));
            }
            ReportState::Failing { reason } => {
                out.degraded = Some((reason, "exporting the run's telemetry failed; retrying".into()));
                out.retry_after = Some(crate::telemetry::RETRY_EVERY);
            }
            ReportState::Pending => {}
        }
    }
    out
}

/// Carries out the plan's action. A Job the apiserver rejects, or whose name another owner holds, ends the run
/// (recorded into `plan`) instead of failing the reconcile forever.
async fn apply_action(
    run: &WorkflowRun,
    ctx: &Context,
    plan: &mut plan::Plan,
    target: &OtlpTarget,
    now: jiff::Timestamp,
) -> Result<(), ReconcileError> {
    let ns = run.namespace().unwrap_or_default();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let generation = run.metadata.generation;
    match plan.action.clone() {
        Action::None => {}
        Action::CreateJob { attempt, deadline_seconds } => {
            let desired = job::build_job(run, attempt, target, Some(deadline_seconds))?;
            let job_name = desired.name_any();
            let existing = ctx.jobs.get(&ObjectRef::new(&job_name).within(&ns));
            if existing.as_ref().is_some_and(|j| !job::is_controlled_by(j, &run.uid().unwrap_or_default())) {
                let message = ReconcileError::JobNameConflict(job_name).to_string();
                plan::reject_attempt(plan, "JobNameConflict", &message, generation, now);
                return Ok(());
            }
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match jobs_api.patch(&job_name, &params, &Patch::Apply(&desired)).await {
                Ok(_) => crash_point("after-job-create"),
                // The template is invalid for a Job: say so once, with the apiserver's words, and end the run.
                Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 => {
                    let message = format!("spec.template: the apiserver rejected Job {job_name}: {}", s.message);
                    plan::reject_attempt(plan, "JobRejected", &message, generation, now);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Action::DeleteJob { name } => {
            let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
            match jobs_api.delete(&name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Action::DeleteRun => {
            let runs: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &ns);
            runs.delete(&run.name_any(), &DeleteParams::background()).await?;
        }
    }
    Ok(())
}

/// Writes the planned status when it is worth a write: any change, except (a) a deleted run that already finished
/// and reported (deletion bumps the generation; nothing is left to record), and (b) the `started` report alone,
/// early in a run: it rides along with the next change, or is written on its own once the run has run a while (a
/// crash in between re-exports `workflow.run.total` once, documented). Returns when to look again for (b).
async fn write_status(
    run: &WorkflowRun,
    ctx: &Context,
    planned: &WorkflowRunStatus,
    stored: &WorkflowRunStatus,
) -> Result<Option<Duration>, ReconcileError> {
    let reported = stored.telemetry.clone().unwrap_or_default();
    let report = planned.telemetry.clone().unwrap_or_default();
    let mut without_started = planned.clone();
    if let Some(t) = without_started.telemetry.as_mut() {
        t.started = reported.started;
    }
    let running_for = stored.start_time.as_ref().map(|t| jiff::Timestamp::now().duration_since(t.0).as_secs());
    let defer_started = Some(&without_started) == run.status.as_ref()
        && running_for.is_some_and(|secs| secs < STARTED_FLAG_DEFER_SECONDS);
    if defer_started {
        let left = STARTED_FLAG_DEFER_SECONDS - running_for.unwrap_or_default();
        return Ok(Some(Duration::from_secs(u64::try_from(left.max(1)).unwrap_or(1))));
    }
    let finished_and_deleting = run.metadata.deletion_timestamp.is_some() && reported.finished;
    if Some(planned) == run.status.as_ref() || finished_and_deleting {
        return Ok(None);
    }
    let runs: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": WorkflowRun::api_version(&()), "kind": WorkflowRun::kind(&()), "status": planned});
    runs.patch_status(&run.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    ctx.stats.status_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if plan::is_terminal(planned) && !plan::is_terminal(stored) {
        crash_point("after-terminal-status");
    }
    if planned.phase == Some(WorkflowRunPhase::Retrying) {
        crash_point("during-backoff");
    }
    if report.started && !reported.started {
        ctx.telemetry.recorded(run, ReportKind::Started);
    }
    if report.finished && !reported.finished {
        ctx.telemetry.recorded(run, ReportKind::Finished);
    }
    Ok(None)
}

/// Adds the finalizer on the first visit; removes it once a deleted run's telemetry is in status. Returns whether
/// the reconcile ends here.
async fn handle_finalizer(
    run: &WorkflowRun,
    ctx: &Context,
    stored: &WorkflowRunStatus,
) -> Result<bool, ReconcileError> {
    let runs: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let has_finalizer = run.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = run.metadata.deletion_timestamp.is_some();
    let finalizers: Vec<String> = match (deleting, has_finalizer) {
        (true, false) => return Ok(true),
        (false, false) => vec![FINALIZER.to_string()],
        // Deletion waits for the telemetry: the finalizer goes once the report is in status.
        (true, true) if plan::is_terminal(stored) && stored.telemetry.as_ref().is_some_and(|t| t.finished) => {
            run.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect()
        }
        _ => return Ok(false),
    };
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": run.resource_version()}});
    match runs.patch(&run.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    // Adding it: the patch's watch event brings the run back. Removing it: the run goes.
    Ok(true)
}

pub async fn reconcile(run: Arc<WorkflowRun>, ctx: Arc<Context>) -> Result<ControllerAction, ReconcileError> {
    let result = reconcile_run(&run, &ctx).await;
    // Counted when done, so a reader of /metrics sees the effects of every reconcile it counts.
    ctx.stats.reconciles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    result
}

async fn reconcile_run(run: &WorkflowRun, ctx: &Context) -> Result<ControllerAction, ReconcileError> {
    let stored = run.status.clone().unwrap_or_default();
    if handle_finalizer(run, ctx, &stored).await? {
        return Ok(ControllerAction::await_change());
    }
    // Read (caches only) → report telemetry for what status recorded → plan (pure) → act → write status.
    let (jobs, pods) = read_children(run, ctx);
    let (target, target_degraded) = telemetry_target(run, ctx);
    let reports = report_telemetry(run, ctx, &stored);
    let obs = Observation {
        now: plan::now_ms(jiff::Timestamp::now()),
        jobs: jobs.iter().map(Arc::as_ref).collect(),
        pods: pods.iter().map(Arc::as_ref).collect(),
        telemetry_degraded: reports.degraded.or(target_degraded),
    };
    let mut plan = plan::plan(run, &obs, &ctx.settings);
    plan.status.telemetry = Some(reports.report);
    apply_action(run, ctx, &mut plan, &target, obs.now).await?;
    let requeue_started = write_status(run, ctx, &plan.status, &stored).await?;
    for note in &plan.events {
        publish(ctx, run, note).await;
    }
    let requeue = [plan.requeue_after, reports.retry_after, requeue_started].into_iter().flatten().min();
    Ok(requeue.map_or_else(ControllerAction::await_change, ControllerAction::requeue))
}

pub fn error_policy(run: Arc<WorkflowRun>, error: &ReconcileError, ctx: Arc<Context>) -> ControllerAction {
    ctx.stats.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(run = %run.name_any(), namespace = ?run.namespace(), %error, "reconcile failed");
    ControllerAction::requeue(Duration::from_secs(5))
}

/// Where the controller watches.
#[derive(Clone, Debug)]
pub struct Scope {
    /// One namespace, or all when None.
    pub namespace: Option<String>,
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
}

/// Runs the controller until shutdown. `ready` flips when every watch has synced.
pub async fn run(
    client: Client,
    telemetry: Telemetry,
    notifications: mpsc::UnboundedReceiver<ObjectRef<WorkflowRun>>,
    config: ControllerSettings,
    stats: Arc<ReconcileStats>,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    let sync = SyncTracker::new(4, ready);
    let job_index = index::RunIndex::default();
    let pod_index = index::RunIndex::default();
    let (stacks, stacks_writer) = reflector::store();
    // Job status carries no exit codes or disruption conditions, the pods do: both are watched, trimmed, indexed.
    let (jobs, job_stream) =
        managed_children(api::<Job>(&client, &config.scope), &sync, "jobs", &job_index, |j: &Job| {
            let run = j.owner_references().iter().find(|o| o.kind == "WorkflowRun" && o.controller == Some(true))?;
            Some(((j.namespace()?, run.name.clone()), j.name_any()))
        });
    let (pods, pod_stream) =
        managed_children(api::<Pod>(&client, &config.scope), &sync, "pods", &pod_index, |p: &Pod| {
            Some(((p.namespace()?, p.annotations().get(RUN_NAME_ANNOTATION)?.clone()), p.name_any()))
        });
    let stack_stream = watcher(api::<TelemetryStack>(&client, &config.scope), watcher::Config::default())
        .default_backoff()
        .reflect(stacks_writer)
        .inspect(sync.watch("telemetrystacks"))
        .touched_objects()
        .for_each(|_| futures::future::ready(()));
    tokio::spawn(stack_stream);

    // The runs' own reflector, so readiness can wait on it like on the others.
    let (runs_store, runs_writer) = reflector::store();
    let run_stream = watcher(api::<WorkflowRun>(&client, &config.scope), watcher::Config::default())
        .default_backoff()
        .reflect(runs_writer)
        .inspect(sync.watch("workflowruns"))
        .touched_objects();
    let controller = Controller::for_stream(run_stream, runs_store.clone());
    let context = Arc::new(Context {
        client: client.clone(),
        jobs: jobs.clone(),
        pods: pods.clone(),
        stacks: stacks.clone(),
        job_index,
        pod_index,
        telemetry,
        settings: config.settings,
        default_otlp_endpoint: config.default_otlp_endpoint,
        recorder: Recorder::new(client.clone(), Reporter { controller: "flowtel".into(), instance: None }),
        stats,
    });
    let notifications = tokio_stream_from(notifications);
    controller
        .owns_stream(job_stream)
        .watches_stream(pod_stream, |pod: Pod| {
            let name = pod.annotations().get(RUN_NAME_ANNOTATION)?.clone();
            Some(ObjectRef::new(&name).within(&pod.namespace()?))
        })
        .reconcile_on(notifications)
        .with_config(kube::runtime::controller::Config::default().concurrency(config.concurrency))
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// A cached, trimmed and run-indexed watch of the objects flowtel manages (label managed-by=flowtel).
fn managed_children<K>(
    api: Api<K>,
    sync: &SyncTracker,
    what: &'static str,
    index: &index::RunIndex,
    key: impl Fn(&K) -> Option<((String, String), String)> + Send + 'static,
) -> (Store<K>, impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let (store, writer) = reflector::store();
    let stream = watcher(api, managed)
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer)
        .inspect(sync.watch(what))
        .inspect(index.observe(key))
        .touched_objects();
    (store, stream)
}

/// Flips `ready` once every watch delivered its initial list. (Awaiting `Store::wait_until_ready` beside the
/// controller, which awaits the same store, could miss the wake-up; the watch events themselves cannot.)
struct SyncTracker {
    pending: Arc<std::sync::atomic::AtomicUsize>,
    ready: Arc<std::sync::atomic::AtomicBool>,
}

impl SyncTracker {
    fn new(watches: usize, ready: Arc<std::sync::atomic::AtomicBool>) -> Self {
        Self { pending: Arc::new(watches.into()), ready }
    }

    fn watch<K>(&self, what: &'static str) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
        let pending = self.pending.clone();
        let ready = self.ready.clone();
        let mut synced = false;
        move |event| {
            if !synced && matches!(event, Ok(watcher::Event::InitDone)) {
                synced = true;
                tracing::info!(watch = what, "watch synced");
                if pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                    ready.store(true, std::sync::atomic::Ordering::SeqCst);
                    tracing::info!("every watch synced; ready");
                }
            }
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::UnboundedReceiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
