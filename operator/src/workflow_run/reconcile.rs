//! One WorkflowRun reconcile, as named steps:
//! finalizer → read (caches only) → report (telemetry for what status recorded) → plan (pure, `plan.rs`) →
//! act (the attempt's Job, built in `job.rs`, its environment decided in `env.rs`) → write status (only on change)
//! → events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowtel_crds::workflow_run::{TelemetryReport, WorkflowRunPhase, WorkflowRunStatus};
use flowtel_crds::{TelemetryStack, WorkflowRun};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action as ControllerAction;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::index;
use super::job::{self, OtlpTarget};
use super::metrics::ControllerMetrics;
use super::plan::{self, Action, Observation, Settings};
use super::report::{self, ReportKind};
use crate::runtime::expiring::ExpiringMap;
use crate::runtime::slim::Slim;
use crate::runtime::triggers::OwnWrites;
use crate::telemetry::{Destination, RETRY_EVERY, ReportState, Telemetry};

/// The field manager of everything flowtel writes.
pub const FIELD_MANAGER: &str = crate::runtime::FIELD_MANAGER;
/// Holds a run's deletion until its telemetry was exported (or dropped after the timeout).
pub const FINALIZER: &str = "flowtel.dev/telemetry";
/// A backstop for a report that stays pending: the worker's notification normally comes first.
const PENDING_RECHECK: Duration = Duration::from_secs(10);
/// When to look again at a run whose finalizer patch met a newer copy (a conflict): once the cache has caught up.
/// Not `await_change`: during a relist the controller runs on old copies, and the fresh one arrives without an
/// event of its own.
const CONFLICT_RECHECK: Duration = Duration::from_secs(1);

/// Crash points (the `failpoints` feature, tests only: `FLOWTEL_CRASH_AT=<point>` aborts the process there, as a
/// crash would, so the end-to-end tests can show that a restart never double-counts; see `main.rs`). Without the
/// feature they compile to nothing.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn crash_point(point: &str) {
    fail::fail_point!(point);
}

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("building the attempt's Job: {0}")]
    Build(#[from] job::BuildError),
}

impl ReconcileError {
    /// The `error` label of `flowtel_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(_)) => "api",
            Self::Kube(_) => "kube",
            Self::Build(_) => "build",
        }
    }
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
    pub telemetry: Telemetry<ObjectRef<WorkflowRun>>,
    /// Runs started per referenced TelemetryStack (the stack controller scales collectors by it).
    pub rates: crate::runtime::rates::RunRates,
    pub settings: Settings,
    /// The workload's OTLP endpoint when a run references no TelemetryStack.
    pub default_otlp_endpoint: Option<String>,
    /// Whether Normal Events are published (each is an apiserver write: opt-in); Warnings always are.
    pub normal_events: bool,
    pub recorder: Recorder,
    pub metrics: ControllerMetrics,
    /// Jobs this process created lately (namespace, name), as the create returned them without their spec: until
    /// the Job cache shows one, a reconcile reads it from here (`read_children`) and does not create it again.
    pub created_jobs: ExpiringMap<(String, String), Arc<Job>>,
    /// The runs as this process last wrote them, and the watch events of those writes, held back when they need not
    /// wake their run.
    pub own_writes: Arc<OwnWrites<WorkflowRun>>,
    /// When a write of ours (or a read from etcd) last succeeded; None after a failure (unreachable, 5xx, 429).
    pub api_answered: std::sync::Mutex<Option<Instant>>,
}

/// A report is exported only when the apiserver wrote to etcd this recently: the export is recorded by the
/// status write that follows it, and a kill while that write hangs (etcd or the apiserver restarting) would
/// export it again. Busy, writes keep this fresh; idle, a read from etcd confirms it.
const API_FRESH: Duration = Duration::from_millis(500);

impl Context {
    fn note_outage(&self, error: &ReconcileError) {
        let outage = match error {
            ReconcileError::Kube(kube::Error::Api(s)) => s.code >= 500 || s.code == 429,
            ReconcileError::Kube(kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_)) => {
                true
            }
            _ => false,
        };
        if outage {
            *self.api_answered.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    fn note_answer(&self) {
        *self.api_answered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Before a run asks for a report: unless a write succeeded within API_FRESH, read the run from etcd (a GET
    /// without resourceVersion is a quorum read), which hangs or fails while a write could not succeed either.
    async fn await_apiserver(&self, run: &WorkflowRun) -> Result<(), ReconcileError> {
        let fresh =
            self.api_answered.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| t.elapsed() < API_FRESH);
        if !fresh {
            let runs: Api<WorkflowRun> = Api::namespaced(self.client.clone(), &run.namespace().unwrap_or_default());
            runs.get_metadata_opt(&run.name_any()).await?;
            self.note_answer();
        }
        Ok(())
    }
}

/// Whether this reconcile may ask for a report: a new run's start, or a finished run's end.
fn asks_for_a_report(stored: &WorkflowRunStatus) -> bool {
    let report = stored.telemetry.clone().unwrap_or_default();
    plan::is_terminal(stored) && !report.finished
}

/// Remembers a copy this process wrote.
fn wrote(ctx: &Context, copy: &Arc<WorkflowRun>) {
    ctx.note_answer();
    ctx.own_writes.wrote(copy.clone());
}

/// The reasons a run waits for its TelemetryStack (and its telemetry is degraded meanwhile): it does not exist, or
/// serves no OTLP endpoint yet. Its telemetry is never sent elsewhere meanwhile.
pub const STACK_NOT_FOUND: &str = "TelemetryStackNotFound";
pub const STACK_NOT_READY: &str = "TelemetryStackNotReady";

/// Where the run's own report (run metrics, run and attempt spans) goes: its TelemetryStack's collector when it
/// names one, else the operator's default endpoint.
fn report_destination(run: &WorkflowRun, ctx: &Context) -> Destination {
    let Some(reference) = &run.spec.telemetry_stack_ref else { return Destination::Default };
    let key = ObjectRef::<TelemetryStack>::new(&reference.name).within(&run.namespace().unwrap_or_default());
    match ctx.stacks.get(&key) {
        None => Destination::Unavailable { reason: STACK_NOT_FOUND.into() },
        Some(stack) => match stack.status.as_ref().and_then(|s| s.endpoints.otlp_grpc.clone()) {
            Some(endpoint) => Destination::Endpoint(endpoint),
            None => Destination::Unavailable { reason: STACK_NOT_READY.into() },
        },
    }
}

/// Whether the run's report is exported at all (a finalizer holds the run until it is).
fn reports_exported(run: &WorkflowRun, ctx: &Context) -> bool {
    ctx.telemetry.exports_to(&report_destination(run, ctx))
}

/// The workload's telemetry target, and why telemetry is degraded when it is.
fn telemetry_target(run: &WorkflowRun, ctx: &Context) -> (OtlpTarget, Option<(String, String)>) {
    let default = OtlpTarget { endpoint: ctx.default_otlp_endpoint.clone(), protocol: "grpc".into() };
    let Some(reference) = &run.spec.telemetry_stack_ref else {
        let degraded = default.endpoint.is_none().then(|| {
            (
                "NoOtlpEndpoint".to_string(),
                "no TelemetryStack referenced and the operator has no --otlp-endpoint".into(),
            )
        });
        return (default, degraded);
    };
    let key = ObjectRef::<TelemetryStack>::new(&reference.name).within(&run.namespace().unwrap_or_default());
    match ctx.stacks.get(&key) {
        None => (
            OtlpTarget { endpoint: None, protocol: "grpc".into() },
            Some((
                STACK_NOT_FOUND.into(),
                format!(
                    "spec.telemetryStackRef: TelemetryStack {} not found; the first attempt waits for it",
                    reference.name
                ),
            )),
        ),
        Some(stack) => match stack.status.as_ref().and_then(|s| s.endpoints.otlp_grpc.clone()) {
            Some(endpoint) => (OtlpTarget { endpoint: Some(endpoint), protocol: "grpc".into() }, None),
            None => (
                OtlpTarget { endpoint: None, protocol: "grpc".into() },
                Some((
                    STACK_NOT_READY.into(),
                    format!(
                        "TelemetryStack {} has no OTLP endpoint yet; the first attempt waits for it",
                        reference.name
                    ),
                )),
            ),
        },
    }
}

/// The longest object name whose Events the recorder can name: it names them `<name>.<16 hex digits>`, and an
/// Event's name is at most 253 characters.
const RECORDER_NAME_MAX: usize = 253 - 17;

async fn publish(ctx: &Context, run: &WorkflowRun, note: &plan::EventNote) {
    let type_ = if note.warning { EventType::Warning } else { EventType::Normal };
    let reference = run.object_ref(&());
    let result = if run.name_any().len() <= RECORDER_NAME_MAX {
        let event = Event {
            type_,
            reason: note.reason.into(),
            note: Some(note.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        ctx.recorder.publish(&event, &reference).await
    } else {
        publish_for_long_name(ctx, run, note, reference).await
    };
    // Visible: a refused Event (RBAC) must not pass unnoticed; an outage costs one line per event at most.
    if let Err(e) = result {
        tracing::warn!(error = %e, "publishing an event failed");
    }
}

/// The same Event, named by the apiserver from a prefix (the recorder's name would be too long).
async fn publish_for_long_name(
    ctx: &Context,
    run: &WorkflowRun,
    note: &plan::EventNote,
    reference: k8s_openapi::api::core::v1::ObjectReference,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    let namespace = run.namespace().unwrap_or_default();
    let prefix: String = run.name_any().chars().take(200).collect();
    let event = K8sEvent {
        metadata: ObjectMeta {
            // A trailing dash is the one separator a generateName may end with.
            generate_name: Some(format!("{}-", prefix.trim_end_matches(['-', '.']))),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        action: Some("Reconcile".into()),
        reason: Some(note.reason.into()),
        note: Some(note.note.clone()),
        type_: Some(if note.warning { "Warning" } else { "Normal" }.into()),
        event_time: Some(MicroTime(jiff::Timestamp::now())),
        regarding: Some(reference),
        reporting_controller: Some(FIELD_MANAGER.into()),
        reporting_instance: Some(FIELD_MANAGER.into()),
        ..K8sEvent::default()
    };
    let events: Api<K8sEvent> = Api::namespaced(ctx.client.clone(), &namespace);
    events.create(&PostParams::default(), &event).await.map(|_| ())
}

/// The run's Jobs and pods, from the caches through the run index.
fn read_children(run: &WorkflowRun, ctx: &Context) -> (Vec<Arc<Job>>, Vec<Arc<Pod>>) {
    let ns = run.namespace().unwrap_or_default();
    let name = run.name_any();
    let uid = run.uid().unwrap_or_default();
    let mut jobs: Vec<Arc<Job>> = ctx
        .job_index
        .names(&ns, &name)
        .iter()
        .filter_map(|n| ctx.jobs.get(&ObjectRef::new(n).within(&ns)))
        .filter(|j| job::is_controlled_by(j, &uid))
        .collect();
    // The last recorded attempt's Job and the next one's, created here and not cached yet: with
    // `running_status_delay` a Job exists before status names its attempt, and a run cancelled before the cache
    // shows the Job would otherwise end as never started, its Job left running (found by `e2e/chaos`).
    let recorded = run.status.as_ref().map_or(0, |s| i32::try_from(s.attempts.len()).unwrap_or(i32::MAX));
    let names =
        (recorded.max(1)..=recorded.saturating_add(1)).map(|attempt| (ns.clone(), job::job_name(&name, attempt)));
    add_uncached(&mut jobs, names, &ctx.created_jobs, &uid);
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

/// Adds to `jobs` (the cached ones) the Jobs of `keys` (namespace, name) that this process created and the cache
/// does not show yet; forgets the created ones the cache shows (the cache answers for them from now on).
fn add_uncached(
    jobs: &mut Vec<Arc<Job>>,
    keys: impl IntoIterator<Item = (String, String)>,
    created: &ExpiringMap<(String, String), Arc<Job>>,
    run_uid: &str,
) {
    for key in keys {
        if jobs.iter().any(|j| j.metadata.name.as_deref() == Some(key.1.as_str())) {
            created.take(&key);
        } else if let Some(job) = created.get(&key).filter(|j| job::is_controlled_by(j, run_uid)) {
            jobs.push(job);
        }
    }
}

/// Why the open attempt's Job has no pod, once it has had none for the grace: the job controller's latest
/// `FailedCreate` Event about it. This list is the reconcile's one uncached read, and only a stuck run makes it
/// (instead of a dry-run pod create per attempt, which would cost every run a request and the operator the right
/// to create pods).
async fn pod_creation_failure(
    run: &WorkflowRun,
    ctx: &Context,
    stored: &WorkflowRunStatus,
    jobs: &[Arc<Job>],
    pods: &[Arc<Pod>],
) -> Result<Option<plan::PodCreationFailure>, ReconcileError> {
    let Some(attempt) = stored.attempts.last().filter(|a| a.classification.is_none()) else { return Ok(None) };
    let Some(job) = jobs.iter().find(|j| j.name_any() == attempt.job_name) else { return Ok(None) };
    let (jobs_seen, pods_seen): (Vec<&Job>, Vec<&Pod>) =
        (jobs.iter().map(Arc::as_ref).collect(), pods.iter().map(Arc::as_ref).collect());
    if stored.completion_time.is_some() || plan::attempt_has_a_pod(&jobs_seen, &pods_seen, attempt) {
        return Ok(None);
    }
    let now = jiff::Timestamp::now();
    let stuck_since = attempt.start_time.as_ref().and_then(|t| t.0.checked_add(plan::POD_CREATE_GRACE).ok());
    if stuck_since.is_none_or(|t| t > now) {
        return Ok(None);
    }
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let fields = format!("involvedObject.kind=Job,involvedObject.name={},reason=FailedCreate", attempt.job_name);
    let list = events.list(&ListParams::default().fields(&fields)).await?;
    ctx.note_answer();
    let latest =
        list.items.iter().filter(|e| e.involved_object.uid.is_none() || e.involved_object.uid == job.uid()).max_by_key(
            |e| e.last_timestamp.as_ref().map(|t| t.0).or(e.metadata.creation_timestamp.as_ref().map(|t| t.0)),
        );
    Ok(latest.and_then(|e| e.message.as_deref()).map(plan::PodCreationFailure::from_message))
}

/// Where the run's telemetry reports stand.
#[derive(Debug, Default, PartialEq)]
struct Reports {
    /// What status will say about the reports.
    report: TelemetryReport,
    /// Set when an export failed or was dropped, or nothing is exported.
    degraded: Option<(String, String)>,
    /// Look again then: an export is being retried, or is pending.
    retry_after: Option<Duration>,
    /// A report said something definite (exported, failing, dropped, disabled); without it the condition stands.
    verdict: bool,
    /// A report on its way that this reconcile can wait for, to record it with its own status write.
    awaiting: Option<String>,
}

impl Reports {
    fn absorb(&mut self, kind: ReportKind, state: ReportState) {
        self.verdict |= state != ReportState::Pending;
        let settled = |r: &mut TelemetryReport| match kind {
            ReportKind::Started => r.started = true,
            ReportKind::Finished => r.finished = true,
        };
        match state {
            ReportState::Exported => settled(&mut self.report),
            ReportState::Dropped { .. } => {
                settled(&mut self.report);
                self.report.dropped = true;
            }
            ReportState::Failing { reason } => {
                self.degraded = Some((reason, "exporting the run's telemetry failed; retrying".into()));
                self.retry_after = Some(RETRY_EVERY);
            }
            ReportState::Pending => self.retry_after = Some(PENDING_RECHECK),
            ReportState::Disabled => {
                let message = "the operator has no --otlp-endpoint: the run's own telemetry is not exported";
                self.degraded = Some(("NoOtlpEndpoint".into(), message.into()));
            }
        }
    }
}

/// Reasons that say where the workload's telemetry goes; they are decided afresh on every reconcile.
const TARGET_REASONS: [&str; 3] = [STACK_NOT_FOUND, STACK_NOT_READY, "NoOtlpEndpoint"];

/// The export degradation status records, if any.
fn degraded_in(stored: &WorkflowRunStatus) -> Option<(String, String)> {
    let c = stored.conditions.iter().find(|c| c.type_ == plan::TELEMETRY_DEGRADED && c.status == "True")?;
    (!TARGET_REASONS.contains(&c.reason.as_str())).then(|| (c.reason.clone(), c.message.clone()))
}

fn report_telemetry(run: &WorkflowRun, ctx: &Context, stored: &WorkflowRunStatus) -> Reports {
    let mut out = Reports { report: stored.telemetry.clone().unwrap_or_default(), ..Reports::default() };
    let Some(uid) = run.uid() else { return out };
    let object = ObjectRef::from_obj(run);
    // One report per run, at its end: `workflow.run.total` goes with the others (as in the user's original
    // library, which records a run when it ends), so a kill can re-count a run only in the milliseconds between that
    // one export and the status write recording it. A status from before this carried a separate start report
    // (`started`); its end report does not count the start again.
    if plan::is_terminal(stored) && !out.report.finished {
        let with_start = !out.report.started;
        let key = report::key(&uid, ReportKind::Finished);
        let destination = report_destination(run, ctx);
        let state = ctx
            .telemetry
            .report(&key, &destination, object, || report::finished(run, stored, with_start).unwrap_or_default());
        if state == ReportState::Pending {
            out.awaiting = Some(key);
        }
        if state == ReportState::Exported {
            // Exported, not yet recorded: the window the export journal closes.
            crash_point("after-export");
        }
        out.absorb(ReportKind::Finished, state);
        // `finished` in status always implies `started`: a finished run is never visited again.
        out.report.started |= out.report.finished;
    }
    if !out.verdict {
        // Nothing new about the exports: what status says stands (a start that failed stays degraded until the end
        // report went out), so the condition flips only on a real change.
        out.degraded = degraded_in(stored);
    }
    if out.report.dropped && out.degraded.is_none() {
        let message = "some of the run's telemetry was not exported before the drop timeout";
        out.degraded = Some(("TelemetryDropped".into(), message.into()));
    }
    out
}

/// What carrying out the plan's action came to.
#[derive(Debug, PartialEq)]
enum ActOutcome {
    Done,
    /// The attempt's Job cannot exist (rejected, or its name is taken): the run ends with this reason.
    JobRefused {
        reason: &'static str,
        message: String,
    },
}

/// Carries out the plan's action.
async fn act(
    run: &WorkflowRun,
    ctx: &Context,
    action: &Action,
    target: &OtlpTarget,
) -> Result<ActOutcome, ReconcileError> {
    let ns = run.namespace().unwrap_or_default();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    match action {
        Action::None => {}
        Action::CreateJob { attempt, started_at, deadline_seconds } => {
            if *attempt == 1
                && let Some(stack) = &run.spec.telemetry_stack_ref
            {
                ctx.rates.record(&ns, &stack.name, Instant::now());
            }
            let desired = job::build_job(run, *attempt, *started_at, target, Some(*deadline_seconds))?;
            let job_name = desired.name_any();
            let created = (ns.clone(), job_name.clone());
            if ctx.created_jobs.get(&created).is_some() {
                return Ok(ActOutcome::Done);
            }
            // Created, never applied: the apiserver refuses a name that exists, so a Job someone else created in
            // the meantime is never taken over.
            let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..PostParams::default() };
            match jobs_api.create(&params, &desired).await {
                Ok(mut created_job) => {
                    ctx.note_answer();
                    // What the Job cache keeps of it (`Skips for Job`): the planner reads metadata and status only.
                    created_job.spec = None;
                    created_job.metadata.managed_fields = None;
                    ctx.created_jobs.insert(created, Arc::new(created_job));
                    crash_point("after-job-create");
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // Ours already (a retried reconcile) or someone else's; the cache may lag behind a create.
                    let existing = match ctx.jobs.get(&ObjectRef::new(&job_name).within(&ns)) {
                        Some(j) => Some(j),
                        None => jobs_api.get_opt(&job_name).await?.map(Arc::new),
                    };
                    let uid = run.uid().unwrap_or_default();
                    if !existing.is_some_and(|j| job::is_controlled_by(&j, &uid)) {
                        let message = format!("Job {job_name} exists and is not controlled by this run");
                        return Ok(ActOutcome::JobRefused { reason: "JobNameConflict", message });
                    }
                }
                // The template is invalid for a Job: say so once, with the apiserver's words, and end the run.
                Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 || s.code == 413 => {
                    let message = format!("spec.template: the apiserver rejected Job {job_name}: {}", s.message);
                    return Ok(ActOutcome::JobRefused { reason: "JobRejected", message });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Action::DeleteJob { name } => {
            let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
            match jobs_api.delete(name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        Action::DeleteRun => delete_run(run, ctx).await?,
    }
    Ok(ActOutcome::Done)
}

/// The TTL ended: the run goes (its Jobs with it, by owner reference).
async fn delete_run(run: &WorkflowRun, ctx: &Context) -> Result<(), ReconcileError> {
    let runs: Api<WorkflowRun> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    match runs.delete(&run.name_any(), &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether the planned status is worth a write. Not when nothing changed; not for the start of an attempt within
/// `running_status_delay` of it (its end, if it comes by then, is recorded with it); not for a deleted run that
/// already finished and reported (deletion bumps the generation; nothing is left to record); and not for a change
/// of the telemetry bookkeeping alone (`status.telemetry` and the `TelemetryDegraded` condition) unless it settles
/// the finished report: the rest rides along with the run's next change, so a collector outage never adds writes.
fn worth_writing(
    run: &WorkflowRun,
    planned: &WorkflowRunStatus,
    stored: &WorkflowRunStatus,
    settings: &Settings,
    now: jiff::Timestamp,
) -> bool {
    if planned == stored {
        return false;
    }
    if let Some(started) = plan::unrecorded_start(&stored.attempts, planned)
        && started.saturating_add(settings.running_status_delay).is_ok_and(|at| now < at)
    {
        return false;
    }
    let reported = stored.telemetry.clone().unwrap_or_default();
    if run.metadata.deletion_timestamp.is_some() && reported.finished {
        return false;
    }
    if stored.start_time.is_none() {
        return true;
    }
    let bookkeeping_only = {
        let mut p = planned.clone();
        p.telemetry = stored.telemetry.clone();
        p.conditions.retain(|c| c.type_ != plan::TELEMETRY_DEGRADED);
        let mut s = stored.clone();
        s.conditions.retain(|c| c.type_ != plan::TELEMETRY_DEGRADED);
        p == s
    };
    let settles_finished = planned.telemetry.as_ref().is_some_and(|t| t.finished) && !reported.finished;
    !bookkeeping_only || settles_finished
}

/// Writes the planned status when it is worth a write; returns the written copy when it wrote.
async fn write_status(
    run: &WorkflowRun,
    ctx: &Context,
    planned: &WorkflowRunStatus,
    stored: &WorkflowRunStatus,
) -> Result<Option<Arc<WorkflowRun>>, ReconcileError> {
    if !worth_writing(run, planned, stored, &ctx.settings, jiff::Timestamp::now()) {
        return Ok(None);
    }
    put_status(run, ctx, planned, stored).await.map(Some)
}

/// Writes `planned` as the run's status.
async fn put_status(
    run: &WorkflowRun,
    ctx: &Context,
    planned: &WorkflowRunStatus,
    stored: &WorkflowRunStatus,
) -> Result<Arc<WorkflowRun>, ReconcileError> {
    // The answer is decoded as the watch's events are, without managedFields (`runtime::slim`).
    let runs: Api<Slim<WorkflowRun>> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": WorkflowRun::api_version(&()), "kind": WorkflowRun::kind(&()), "status": planned});
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let written = Arc::new(runs.patch_status(&run.name_any(), &params, &Patch::Apply(&patch)).await?.into_inner());
    wrote(ctx, &written);
    ctx.metrics.status_writes.inc();
    tracing::debug!(
        uid = run.uid().unwrap_or_default(),
        phase = ?planned.phase,
        telemetry = ?planned.telemetry,
        version = written.resource_version().unwrap_or_default(),
        "status written"
    );
    if plan::is_terminal(planned) && !plan::is_terminal(stored) {
        crash_point("after-terminal-status");
    }
    if planned.phase == Some(WorkflowRunPhase::Retrying) {
        crash_point("during-backoff");
    }
    Ok(written)
}

/// Whether the run holds the telemetry finalizer, and what to do about it.
#[derive(Debug, PartialEq)]
enum FinalizerStep {
    Continue,
    /// Patch the finalizers to this list; when `then_stop`, the reconcile ends (the patch's event brings it back).
    Patch {
        finalizers: Vec<String>,
        then_stop: bool,
    },
    Stop,
}

/// Pure: the finalizer is held only while the operator exports telemetry, and goes once a deleted run's telemetry is
/// in status.
fn finalizer_step(run: &WorkflowRun, stored: &WorkflowRunStatus, exports: bool) -> FinalizerStep {
    let has = run.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = run.metadata.deletion_timestamp.is_some();
    let without = || run.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    let reported = plan::is_terminal(stored) && stored.telemetry.as_ref().is_some_and(|t| t.finished);
    match (exports, deleting, has) {
        (_, true, false) => FinalizerStep::Stop,
        (false, _, true) => FinalizerStep::Patch { finalizers: without(), then_stop: true },
        (false, false, false) => FinalizerStep::Continue,
        // Over and reported already (restored from a backup, or from before an endpoint was set): nothing is left
        // to guard, and a finalizer would cost a write per such run at every start.
        (true, false, false) if reported => FinalizerStep::Continue,
        // Added, and the reconcile goes on: the start report and the first attempt need not wait for the echo.
        (true, false, false) => {
            let mut finalizers = run.finalizers().to_vec();
            finalizers.push(FINALIZER.into());
            FinalizerStep::Patch { finalizers, then_stop: false }
        }
        (true, true, true) if reported => FinalizerStep::Patch { finalizers: without(), then_stop: true },
        (true, _, true) => FinalizerStep::Continue,
    }
}

/// Patches the finalizers of this copy of the run; returns the patched copy, or None when the copy was stale (a
/// conflict: the newer copy's watch event brings the run back) or the run is gone.
async fn patch_finalizers(
    run: &WorkflowRun,
    ctx: &Context,
    finalizers: &[String],
) -> Result<Option<Arc<WorkflowRun>>, ReconcileError> {
    let runs: Api<Slim<WorkflowRun>> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": run.resource_version()}});
    match runs.patch(&run.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(patched) => {
            let patched = Arc::new(patched.into_inner());
            wrote(ctx, &patched);
            Ok(Some(patched))
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub async fn reconcile(run: Arc<WorkflowRun>, ctx: Arc<Context>) -> Result<ControllerAction, ReconcileError> {
    // No span of its own: kube-runtime's ("reconciling object") already names the run and what woke it.
    let started = Instant::now();
    // A copy we wrote since the cache's (its event still to come) is the run as it is.
    let run = ctx.own_writes.newest(run);
    let result = reconcile_run(&run, &ctx).await;
    if let Err(e) = &result {
        ctx.note_outage(e);
    }
    ctx.metrics.reconciled(started.elapsed(), result.as_ref().err().map(ReconcileError::metric_label));
    result
}

async fn reconcile_run(run: &WorkflowRun, ctx: &Context) -> Result<ControllerAction, ReconcileError> {
    // Logged inside kube-runtime's span, which names what triggered the reconcile.
    tracing::debug!(version = run.resource_version().unwrap_or_default(), "reconciling");
    // The run's own watch events wait until this reconcile says whether what it wrote needs another look.
    let busy = run.uid().map(|uid| ctx.own_writes.busy(uid));
    let mut written = vec![];
    // An error drops `busy`: what it held is left to the error policy's retry.
    let next = reconcile_body(run, ctx, &mut written).await?;
    let ours: Vec<u64> = written.iter().filter_map(|copy| copy.resource_version()?.parse().ok()).collect();
    let look_again = busy.is_some_and(|busy| busy.finish(&ours, next.look_at_last));
    let requeue = if look_again { Some(Duration::ZERO) } else { next.requeue };
    Ok(requeue.map_or_else(ControllerAction::await_change, ControllerAction::requeue))
}

/// What a reconcile's body decided: when to look again, and whether the last copy it wrote needs a look of its own
/// (then that copy's watch event wakes the run; else it is held back, `OwnWrites`).
struct Next {
    requeue: Option<Duration>,
    look_at_last: bool,
}

impl Next {
    fn after(requeue: Option<Duration>) -> Self {
        Self { requeue, look_at_last: false }
    }
}

/// The reconcile's steps; `written` collects the copies its writes produced, latest last.
async fn reconcile_body(
    run: &WorkflowRun,
    ctx: &Context,
    written: &mut Vec<Arc<WorkflowRun>>,
) -> Result<Next, ReconcileError> {
    let stored = run.status.clone().unwrap_or_default();
    let exports = reports_exported(run, ctx);
    match finalizer_step(run, &stored, exports) {
        FinalizerStep::Continue => {}
        FinalizerStep::Stop => return Ok(Next::after(None)),
        FinalizerStep::Patch { finalizers, then_stop } => {
            let Some(patched) = patch_finalizers(run, ctx, &finalizers).await? else {
                return Ok(Next::after(Some(CONFLICT_RECHECK)));
            };
            written.push(patched);
            if then_stop {
                return Ok(Next { requeue: None, look_at_last: true });
            }
        }
    }
    if plan::is_settled(run) {
        // Nothing but its TTL is left (and the cache may hold only that much of it).
        let now = jiff::Timestamp::now();
        let delete_at = plan::settled_ttl(run, &ctx.settings, now);
        if now < delete_at {
            return Ok(Next::after(Some(plan::until(now, delete_at))));
        }
        delete_run(run, ctx).await?;
        return Ok(Next::after(None));
    }
    let (jobs, pods) = read_children(run, ctx);
    let (target, target_degraded) = telemetry_target(run, ctx);
    if exports && asks_for_a_report(&stored) {
        ctx.await_apiserver(run).await?;
    }
    let mut reports = report_telemetry(run, ctx, &stored);
    // A report on its way to a healthy collector is waited for here (milliseconds), so its status write follows
    // at once rather than after a trip through the work queue, which under load can take seconds: a kill in
    // between would count it twice.
    if let Some(key) = reports.awaiting.take()
        && ctx.telemetry.is_healthy()
    {
        ctx.telemetry.settled(&key).await;
        reports = report_telemetry(run, ctx, &stored);
    }
    let pod_creation_failure = pod_creation_failure(run, ctx, &stored, &jobs, &pods).await?;
    let mut obs = Observation {
        now: plan::now_ms(jiff::Timestamp::now()),
        jobs: jobs.iter().map(Arc::as_ref).collect(),
        pods: pods.iter().map(Arc::as_ref).collect(),
        telemetry_degraded: reports.degraded.or(target_degraded.clone()),
        exports_telemetry: exports,
        waiting_for: target_degraded
            .clone()
            .filter(|(reason, _)| [STACK_NOT_FOUND, STACK_NOT_READY].contains(&reason.as_str())),
        pod_creation_failure,
    };
    let mut plan = plan::plan(run, &obs, &ctx.settings);
    plan.status.telemetry = Some(reports.report);
    if let Some(ended) = export_the_end_with_it(run, ctx, &stored, &plan.status).await? {
        // Planned again with the export's verdict, so TelemetryDegraded is right in the one terminal write.
        obs.telemetry_degraded = ended.degraded.or(target_degraded.clone());
        plan = plan::plan(run, &obs, &ctx.settings);
        plan.status.telemetry = Some(ended.report);
    }
    // A new attempt is recorded before its Job is created, unless that write waits (`running_status_delay`): then
    // a crash after the create finds the Job, named by the attempt, and the planner takes the attempt from it; it
    // never starts twice. The planner re-creates a Job that is missing. Deletions go first: a crash after them is
    // planned again, never leaves a Job running.
    let mut recorded = stored;
    let mut status_written = false;
    if let Some(first) = plan.record_first.as_ref().filter(|_| matches!(plan.action, Action::DeleteJob { .. })) {
        written.push(put_status(run, ctx, first, &recorded).await?);
        recorded = first.clone();
    }
    if matches!(plan.action, Action::CreateJob { .. })
        && let Some(copy) = write_status(run, ctx, &plan.status, &recorded).await?
    {
        recorded = plan.status.clone();
        status_written = true;
        written.push(copy);
    }
    if let ActOutcome::JobRefused { reason, message } = act(run, ctx, &plan.action, &target).await? {
        plan = plan::reject_attempt(plan, reason, &message, run.metadata.generation, obs.now);
    }
    if let Some(copy) = write_status(run, ctx, &plan.status, &recorded).await? {
        status_written = true;
        written.push(copy);
    }
    // Events describe the changes a status write records; a deferred change is announced when it is written.
    if status_written {
        for note in plan.events.iter().filter(|n| n.warning || ctx.normal_events) {
            publish(ctx, run, note).await;
        }
    }
    let requeue = [plan.requeue_after, reports.retry_after].into_iter().flatten().min();
    let Some(latest) = written.last() else { return Ok(Next::after(requeue)) };
    // The echo of the last write would cost a reconcile; this one answers for it when it can.
    Ok(match quiet_after(latest, ctx, &obs, target_degraded) {
        Some(after) => Next::after(after),
        None => Next { requeue, look_at_last: true },
    })
}

/// Whether reconciling `written` (the copy this reconcile wrote last) would do nothing but look again later, and
/// when: what its watch event's reconcile would return. Decided the way that reconcile would decide, with this
/// reconcile's observation of the Jobs, pods and stack; None when it would act (a report to ask for, a Job to
/// create or delete, a status to write, a finalizer to change, a TTL that is over), and its event must wake the
/// run. Someone else's change that the write's copy carries (a deletion, a new generation) shows up here too.
fn quiet_after(
    written: &WorkflowRun,
    ctx: &Context,
    obs: &Observation<'_>,
    target_degraded: Option<(String, String)>,
) -> Option<Option<Duration>> {
    let status = written.status.clone().unwrap_or_default();
    if finalizer_step(written, &status, reports_exported(written, ctx)) != FinalizerStep::Continue {
        return None;
    }
    let now = jiff::Timestamp::now();
    if plan::is_settled(written) {
        let delete_at = plan::settled_ttl(written, &ctx.settings, now);
        return (now < delete_at).then(|| Some(plan::until(now, delete_at)));
    }
    if asks_for_a_report(&status) {
        return None;
    }
    let reports = report_telemetry(written, ctx, &status);
    let obs = Observation { telemetry_degraded: reports.degraded.or(target_degraded), ..obs.clone() };
    let mut replanned = plan::plan(written, &obs, &ctx.settings);
    replanned.status.telemetry = Some(reports.report);
    let idle = match &replanned.action {
        Action::None => true,
        // Created by this process, not yet in the cache: `act` would skip it.
        Action::CreateJob { attempt, .. } => {
            let name = job::job_name(&written.name_any(), *attempt);
            ctx.created_jobs.get(&(written.namespace().unwrap_or_default(), name)).is_some()
        }
        Action::DeleteJob { .. } | Action::DeleteRun => false,
    };
    let quiet = idle && !worth_writing(written, &replanned.status, &status, &ctx.settings, obs.now);
    quiet.then(|| [replanned.requeue_after, reports.retry_after].into_iter().flatten().min())
}

/// How long a run that ends in this reconcile waits for its report to reach a healthy collector before its terminal
/// status is written without it.
const END_EXPORT_WAIT: Duration = Duration::from_secs(1);

/// A run that ends in this reconcile: its one report goes out first (milliseconds, to a healthy collector), so that
/// a single status write records the end and the export (a write per run saved). An export that takes longer, or
/// a collector that is failing, leaves the report to the next reconcile, as for any terminal run.
async fn export_the_end_with_it(
    run: &WorkflowRun,
    ctx: &Context,
    stored: &WorkflowRunStatus,
    planned: &WorkflowRunStatus,
) -> Result<Option<Reports>, ReconcileError> {
    let ends_now = !plan::is_terminal(stored) && plan::is_terminal(planned);
    if !ends_now || !reports_exported(run, ctx) || !ctx.telemetry.is_healthy() {
        return Ok(None);
    }
    ctx.await_apiserver(run).await?;
    let mut reports = report_telemetry(run, ctx, planned);
    if let Some(key) = reports.awaiting.take() {
        let _ = tokio::time::timeout(END_EXPORT_WAIT, ctx.telemetry.settled(&key)).await;
        reports = report_telemetry(run, ctx, planned);
    }
    Ok(reports.report.finished.then_some(reports))
}

pub fn error_policy(run: Arc<WorkflowRun>, error: &ReconcileError, _ctx: Arc<Context>) -> ControllerAction {
    tracing::warn!(run = %run.name_any(), namespace = run.namespace().unwrap_or_default(), %error, "reconcile failed");
    ControllerAction::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

    fn owned_job(name: &str, owner_uid: &str) -> Arc<Job> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns", "ownerReferences": [
                {"apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun", "name": "r", "uid": owner_uid, "controller": true}
            ]}}))
            .expect("job"),
        )
    }

    #[test]
    fn a_job_created_here_is_read_until_the_cache_shows_it_then_forgotten() {
        let created = ExpiringMap::new(Duration::from_secs(60));
        let key = |n: &str| ("ns".to_string(), n.to_string());
        created.insert(key("r-1"), owned_job("r-1", "u"));
        created.insert(key("r-2"), owned_job("r-2", "someone-else"));
        // Not cached yet: read from what the create returned; another run's Job of that name is not this run's.
        let mut jobs = vec![];
        add_uncached(&mut jobs, [key("r-1"), key("r-2")], &created, "u");
        assert_eq!(jobs.iter().map(|j| j.name_any()).collect::<Vec<_>>(), ["r-1"]);
        // Cached: the cache's copy alone, and the created one forgotten.
        let mut jobs = vec![owned_job("r-1", "u")];
        add_uncached(&mut jobs, [key("r-1")], &created, "u");
        assert_eq!(jobs.len(), 1);
        assert!(created.get(&key("r-1")).is_none());
    }

    fn run(finalizers: &[&str], deleting: bool) -> WorkflowRun {
        let mut run: WorkflowRun = serde_json::from_value(json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": "u", "finalizers": finalizers},
            "spec": {"workflowName": "w", "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}}}
        }))
        .expect("run");
        if deleting {
            run.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        }
        run
    }

    fn status(phase: WorkflowRunPhase, finished: bool) -> WorkflowRunStatus {
        WorkflowRunStatus {
            phase: Some(phase),
            start_time: Some(MicroTime(jiff::Timestamp::UNIX_EPOCH)),
            telemetry: Some(TelemetryReport { started: true, finished, dropped: false }),
            ..Default::default()
        }
    }

    fn degraded(s: &mut WorkflowRunStatus, reason: &str) {
        plan::set_condition(
            &mut s.conditions,
            plan::TELEMETRY_DEGRADED,
            "True",
            reason,
            "m",
            None,
            jiff::Timestamp::UNIX_EPOCH,
        );
    }

    #[test]
    fn the_finalizer_is_held_only_while_telemetry_is_exported() {
        let running = status(WorkflowRunPhase::Running, false);
        let done = status(WorkflowRunPhase::Succeeded, true);
        let add = FinalizerStep::Patch { finalizers: vec![FINALIZER.into()], then_stop: false };
        assert_eq!(finalizer_step(&run(&[], false), &running, true), add);
        assert_eq!(finalizer_step(&run(&[FINALIZER], false), &running, true), FinalizerStep::Continue);
        assert_eq!(finalizer_step(&run(&[FINALIZER], true), &running, true), FinalizerStep::Continue);
        let remove = FinalizerStep::Patch { finalizers: vec!["other".into()], then_stop: true };
        assert_eq!(finalizer_step(&run(&["other", FINALIZER], true), &done, true), remove);
        assert_eq!(finalizer_step(&run(&[], false), &running, false), FinalizerStep::Continue, "no exporter");
        let drop_it = FinalizerStep::Patch { finalizers: vec![], then_stop: true };
        assert_eq!(finalizer_step(&run(&[FINALIZER], false), &running, false), drop_it);
        assert_eq!(finalizer_step(&run(&[], true), &running, true), FinalizerStep::Stop);
        assert_eq!(finalizer_step(&run(&[], false), &done, true), FinalizerStep::Continue, "reported: none added");
    }

    fn settings(running_status_delay: i64) -> Settings {
        Settings {
            default_deadline_seconds: 3600,
            default_ttl_seconds: 600,
            running_status_delay: jiff::SignedDuration::from_secs(running_status_delay),
        }
    }

    fn writes(run: &WorkflowRun, planned: &WorkflowRunStatus, stored: &WorkflowRunStatus) -> bool {
        worth_writing(run, planned, stored, &settings(0), jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn an_attempts_start_alone_waits_the_delay_and_goes_with_anything_else() {
        let r = run(&[FINALIZER], false);
        let at = |s: i64| jiff::Timestamp::from_second(s).expect("t");
        let attempt = |number: i32, ended: bool| flowtel_crds::workflow_run::AttemptStatus {
            number,
            job_name: format!("r-{number}"),
            start_time: Some(MicroTime(at(10 * i64::from(number)))),
            end_time: ended.then(|| MicroTime(at(10 * i64::from(number) + 1))),
            classification: ended.then_some(flowtel_crds::workflow_run::AttemptClassification::Transient),
            ..Default::default()
        };
        let first = WorkflowRunStatus { attempts: vec![attempt(1, false)], ..status(WorkflowRunPhase::Running, false) };
        let none = WorkflowRunStatus::default();
        assert!(!worth_writing(&r, &first, &none, &settings(3), at(12)), "within the delay");
        assert!(worth_writing(&r, &first, &none, &settings(3), at(13)), "the delay is over");
        assert!(worth_writing(&r, &first, &none, &settings(0), at(10)), "no delay: before the Job");
        // The next attempt after a recorded failure waits the same way; an end recorded with it does not.
        let retrying =
            WorkflowRunStatus { attempts: vec![attempt(1, true)], ..status(WorkflowRunPhase::Retrying, false) };
        let second = WorkflowRunStatus {
            attempts: vec![attempt(1, true), attempt(2, false)],
            ..status(WorkflowRunPhase::Running, false)
        };
        assert!(!worth_writing(&r, &second, &retrying, &settings(3), at(21)));
        assert!(worth_writing(&r, &second, &first, &settings(3), at(21)), "attempt 1's end goes at once");
        let ended = WorkflowRunStatus { attempts: vec![attempt(1, true)], ..status(WorkflowRunPhase::Failed, false) };
        assert!(worth_writing(&r, &ended, &none, &settings(3), at(11)), "an end goes at once");
    }

    #[test]
    fn telemetry_bookkeeping_alone_waits_for_the_next_change_of_a_running_run() {
        let r = run(&[FINALIZER], false);
        let stored = status(WorkflowRunPhase::Running, false);
        assert!(!writes(&r, &stored, &stored));
        let mut planned = stored.clone();
        degraded(&mut planned, "ExportFailed");
        assert!(!writes(&r, &planned, &stored), "a degraded flip alone rides along");
        planned.telemetry = Some(TelemetryReport { started: true, finished: false, dropped: true });
        assert!(!writes(&r, &planned, &stored), "a dropped start alone rides along");
        planned.phase = Some(WorkflowRunPhase::Retrying);
        assert!(writes(&r, &planned, &stored), "with a real change it is written");

        let done = status(WorkflowRunPhase::Succeeded, false);
        let mut exported = done.clone();
        exported.telemetry = Some(TelemetryReport { started: true, finished: true, dropped: false });
        assert!(writes(&r, &exported, &done), "the finished report of a finished run is written");
        let mut start_dropped = done.clone();
        start_dropped.telemetry = Some(TelemetryReport { started: true, finished: false, dropped: true });
        degraded(&mut start_dropped, "TelemetryDropped");
        assert!(!writes(&r, &start_dropped, &done), "a dropped start waits for the finished report");
        assert!(!writes(&run(&[FINALIZER], true), &exported, &exported));
        let mut first = status(WorkflowRunPhase::Running, false);
        degraded(&mut first, "NoOtlpEndpoint");
        assert!(writes(&r, &first, &WorkflowRunStatus::default()), "the first write always goes");
    }

    #[test]
    fn report_states_map_to_status_and_conditions() {
        let mut r = Reports::default();
        r.absorb(ReportKind::Started, ReportState::Pending);
        assert_eq!((r.report.started, r.degraded.clone(), r.retry_after), (false, None, Some(PENDING_RECHECK)));
        r.absorb(ReportKind::Started, ReportState::Failing { reason: "ExportFailed".into() });
        assert_eq!(r.degraded.as_ref().map(|d| d.0.as_str()), Some("ExportFailed"));
        assert_eq!(r.retry_after, Some(RETRY_EVERY));
        let mut r = Reports::default();
        r.absorb(ReportKind::Finished, ReportState::Dropped { reason: "ExportFailed".into() });
        assert!(r.report.finished && r.report.dropped && !r.report.started);
        let mut r = Reports::default();
        r.absorb(ReportKind::Started, ReportState::Disabled);
        assert_eq!(r.degraded.map(|d| d.0), Some("NoOtlpEndpoint".to_string()));
        assert!(!r.report.started, "nothing is recorded as exported when nothing is");
    }
}
