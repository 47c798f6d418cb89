//! One WorkflowRun reconcile, as a pipeline of named steps, each with its own error:
//! finalizer (`finalizer.rs`) → read (caches only) → report (`export.rs`: telemetry for what status recorded) →
//! plan (pure, `plan.rs`) → act (the attempt's Job, built in `job.rs`, its environment decided in `env.rs`) →
//! record status (only on change) → events (`events.rs`). What saves writes, reconciles or echoes is the economy's
//! (`economy.rs`), asked at each step and switched off with `--write-economy off`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::{WorkflowRunPhase, WorkflowRunStatus};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action as ControllerAction;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

pub use super::context::Context;
use super::economy::{Replay, Replayed};
use super::export::{self, Reports};
pub use super::finalizer::FINALIZER;
use super::finalizer::{FinalizerStep, finalizer_step, patch_finalizers};
use super::job::{self, OtlpTarget};
use super::plan::{self, Action, Observation};
use super::{children, events, pooled, target};
use crate::runtime::slim::Slim;

/// The field manager of everything flowtel writes.
pub const FIELD_MANAGER: &str = crate::runtime::FIELD_MANAGER;
/// When to look again at a run whose finalizer patch met a newer copy (a conflict): once the cache has caught up.
/// Not `await_change`: during a relist the controller runs on old copies, and the fresh one arrives without an
/// event of its own.
const CONFLICT_RECHECK: Duration = Duration::from_secs(1);

/// Errors of one reconcile, one per step that can fail.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("patching the run's finalizers: {0}")]
    PatchFinalizers(#[source] kube::Error),
    #[error("deleting the run at the end of its TTL: {0}")]
    DeleteRun(#[source] kube::Error),
    #[error("confirming the apiserver writes before the run's report is exported: {0}")]
    AwaitApiserver(#[source] kube::Error),
    #[error("reading why the attempt's Job creates no pod: {0}")]
    ReadPodFailure(#[source] kube::Error),
    #[error("building the attempt's Job: {0}")]
    BuildJob(#[from] job::BuildError),
    #[error("creating the attempt's Job: {0}")]
    CreateJob(#[source] kube::Error),
    #[error("reading the Job whose create met a conflict: {0}")]
    ReadConflictingJob(#[source] kube::Error),
    #[error("reading the run's WorkerPool, which the cache does not hold yet: {0}")]
    ReadPool(#[source] kube::Error),
    #[error("deleting the attempt's Job: {0}")]
    DeleteJob(#[source] kube::Error),
    #[error("writing the run's status: {0}")]
    WriteStatus(#[source] kube::Error),
}

impl ReconcileError {
    fn kube_error(&self) -> Option<&kube::Error> {
        match self {
            Self::PatchFinalizers(e)
            | Self::DeleteRun(e)
            | Self::AwaitApiserver(e)
            | Self::ReadPodFailure(e)
            | Self::CreateJob(e)
            | Self::ReadConflictingJob(e)
            | Self::ReadPool(e)
            | Self::DeleteJob(e)
            | Self::WriteStatus(e) => Some(e),
            Self::BuildJob(_) => None,
        }
    }

    /// The `error` label of `flowtel_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self.kube_error() {
            Some(kube::Error::Api(_)) => "api",
            Some(_) => "kube",
            None => "build",
        }
    }

    /// Whether the apiserver failed to answer (unreachable, 5xx, 429), as opposed to refusing.
    fn is_outage(&self) -> bool {
        match self.kube_error() {
            Some(kube::Error::Api(s)) => s.code >= 500 || s.code == 429,
            Some(kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_)) => true,
            _ => false,
        }
    }
}

pub async fn reconcile(run: Arc<WorkflowRun>, ctx: Arc<Context>) -> Result<ControllerAction, ReconcileError> {
    // No span of its own: kube-runtime's ("reconciling object") already names the run and what woke it.
    let started = Instant::now();
    let run = ctx.economy.newest(run);
    let result = reconcile_run(&run, &ctx).await;
    if result.as_ref().err().is_some_and(ReconcileError::is_outage) {
        ctx.note_outage();
    }
    ctx.metrics.reconciled(started.elapsed(), result.as_ref().err().map(ReconcileError::metric_label));
    result
}

pub fn error_policy(run: Arc<WorkflowRun>, error: &ReconcileError, _ctx: Arc<Context>) -> ControllerAction {
    tracing::warn!(run = %run.name_any(), namespace = run.namespace().unwrap_or_default(), %error, "reconcile failed");
    ControllerAction::requeue(Duration::from_secs(5))
}

async fn reconcile_run(run: &WorkflowRun, ctx: &Context) -> Result<ControllerAction, ReconcileError> {
    // Logged inside kube-runtime's span, which names what triggered the reconcile.
    tracing::debug!(version = run.resource_version().unwrap_or_default(), "reconciling");
    // The run's own watch events wait until this reconcile says whether what it wrote needs another look. An error
    // drops `busy`: what it held is left to the error policy's retry.
    let busy = ctx.economy.reconciling(run);
    let mut written = vec![];
    let next = reconcile_body(run, ctx, &mut written).await?;
    let ours: Vec<String> = written.iter().filter_map(|copy| copy.resource_version()).collect();
    let look_again = busy.is_some_and(|busy| busy.finish(&ours, next.look_at_last));
    let requeue = if look_again { Some(Duration::ZERO) } else { next.requeue };
    Ok(requeue.map_or_else(ControllerAction::await_change, ControllerAction::requeue))
}

/// What a reconcile's body decided: when to look again, and whether the last copy it wrote needs a look of its own
/// (then that copy's watch event wakes the run; else the economy may hold it back).
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
    pooled::stop_if_over(run, ctx);
    if let Some(next) = hold_finalizer(run, ctx, &stored, written).await? {
        return Ok(next);
    }
    if plan::is_settled(run) {
        return expire(run, ctx).await;
    }
    let read = read(run, ctx, &stored).await?;
    let mut obs = read.observation();
    let settings = ctx.settings.clone();
    let mut plan = plan::plan(run, &obs, &settings);
    plan.status.telemetry = Some(read.reports.report.clone());
    let ended = export::export_the_end_first(run, ctx, &stored, &plan.status);
    if let Some(ended) = ended.await.map_err(ReconcileError::AwaitApiserver)? {
        // Planned again with the export's verdict, so TelemetryDegraded is right in the one terminal write.
        obs.telemetry_degraded = ended.degraded.or(read.target_degraded.clone());
        plan = plan::plan(run, &obs, &settings);
        plan.status.telemetry = Some(ended.report);
    }
    let (plan, status_written) = act_and_record(run, ctx, plan, &stored, &read.target, obs.now, written).await?;
    pooled::note_recorded(run, ctx, if status_written { &plan.status } else { &stored });
    // Events describe the changes a status write records; a deferred change is announced when it is written.
    if status_written {
        for note in plan.events.iter().filter(|n| n.warning || ctx.normal_events) {
            events::publish(ctx, run, note).await;
        }
    }
    let requeue = [plan.requeue_after, read.reports.retry_after].into_iter().flatten().min();
    let Some(latest) = written.last() else { return Ok(Next::after(requeue)) };
    // The echo of the last write would cost a reconcile; this one answers for it when it can.
    let replay = || replay(latest, ctx, &obs, read.target_degraded.clone());
    Ok(match ctx.economy.quiet_after(latest, &settings, replay) {
        Some(after) => Next::after(after),
        None => Next { requeue, look_at_last: true },
    })
}

/// The finalizer step: None to go on, or how the reconcile ends here.
async fn hold_finalizer(
    run: &WorkflowRun,
    ctx: &Context,
    stored: &WorkflowRunStatus,
    written: &mut Vec<Arc<WorkflowRun>>,
) -> Result<Option<Next>, ReconcileError> {
    match finalizer_step(run, stored, target::reports_exported(run, ctx)) {
        FinalizerStep::Continue => Ok(None),
        FinalizerStep::Stop => Ok(Some(Next::after(None))),
        FinalizerStep::Patch { finalizers, then_stop } => {
            let patched = patch_finalizers(run, ctx, &finalizers).await.map_err(ReconcileError::PatchFinalizers)?;
            let Some(patched) = patched else { return Ok(Some(Next::after(Some(CONFLICT_RECHECK)))) };
            written.push(patched);
            Ok(then_stop.then_some(Next { requeue: None, look_at_last: true }))
        }
    }
}

/// A settled run: nothing but its TTL is left (and the cache may hold only that much of it).
async fn expire(run: &WorkflowRun, ctx: &Context) -> Result<Next, ReconcileError> {
    let now = jiff::Timestamp::now();
    let delete_at = plan::settled_ttl(run, &ctx.settings, now);
    if now < delete_at {
        return Ok(Next::after(Some(plan::until(now, delete_at))));
    }
    delete_run(run, ctx).await?;
    Ok(Next::after(None))
}

/// What the read step found: the run's children, where its telemetry goes, where its reports stand.
struct Read {
    jobs: Vec<Arc<Job>>,
    pods: Vec<Arc<Pod>>,
    target: OtlpTarget,
    target_degraded: Option<(String, String)>,
    reports: Reports,
    reports_exported: bool,
    pod_creation_failure: Option<plan::PodCreationFailure>,
}

impl Read {
    fn observation(&self) -> Observation<'_> {
        Observation {
            now: plan::now_ms(jiff::Timestamp::now()),
            jobs: self.jobs.iter().map(Arc::as_ref).collect(),
            pods: self.pods.iter().map(Arc::as_ref).collect(),
            telemetry_degraded: self.reports.degraded.clone().or(self.target_degraded.clone()),
            exports_telemetry: self.reports_exported,
            waiting_for: target::waiting_for(&self.target_degraded),
            pod_creation_failure: self.pod_creation_failure.clone(),
        }
    }
}

/// The read step: caches only, but for the apiserver-freshness gate before a report and a stuck attempt's Events.
async fn read(run: &WorkflowRun, ctx: &Context, stored: &WorkflowRunStatus) -> Result<Read, ReconcileError> {
    // A pooled run's attempts are the dispatcher's; its Jobs and pods are what they stand for (`pooled.rs`).
    let pooled = run.spec.pool.is_some();
    let (jobs, pods) = if pooled { pooled::observe(run, ctx) } else { children::read_children(run, ctx) };
    let (target, target_degraded) = target::telemetry_target(run, ctx);
    let reports_exported = target::reports_exported(run, ctx);
    if reports_exported && export::asks_for_a_report(stored) {
        ctx.await_apiserver(run).await.map_err(ReconcileError::AwaitApiserver)?;
    }
    let reports = export::report_and_await(run, ctx, stored).await;
    let pod_creation_failure = if pooled {
        None
    } else {
        children::pod_creation_failure(run, ctx, stored, &jobs, &pods).await.map_err(ReconcileError::ReadPodFailure)?
    };
    Ok(Read { jobs, pods, target, target_degraded, reports, reports_exported, pod_creation_failure })
}

/// The act and record steps. A new attempt is recorded before its Job is created, unless that write waits
/// (`running_status_delay`): then a crash after the create finds the Job, named by the attempt, and the planner
/// takes the attempt from it; it never starts twice. The planner re-creates a Job that is missing. Deletions go
/// first: a crash after them is planned again, never leaves a Job running. Returns the plan as carried out (a Job
/// the apiserver refused ends the run) and whether status was written.
async fn act_and_record(
    run: &WorkflowRun,
    ctx: &Context,
    mut plan: plan::Plan,
    stored: &WorkflowRunStatus,
    target: &OtlpTarget,
    now: jiff::Timestamp,
    written: &mut Vec<Arc<WorkflowRun>>,
) -> Result<(plan::Plan, bool), ReconcileError> {
    let mut recorded = stored.clone();
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
    if let ActOutcome::JobRefused { reason, message } = act(run, ctx, &plan.action, target).await? {
        plan = plan::reject_attempt(plan, reason, &message, run.metadata.generation, now);
    }
    if let Some(copy) = write_status(run, ctx, &plan.status, &recorded).await? {
        status_written = true;
        written.push(copy);
    }
    Ok((plan, status_written))
}

/// What reconciling `written` would do, replayed with this reconcile's observation of the Jobs, pods and stack
/// (`Economy::quiet_after` decides from it whether the write's echo may be held back).
fn replay(
    written: &WorkflowRun,
    ctx: &Context,
    obs: &Observation<'_>,
    target_degraded: Option<(String, String)>,
) -> Replay {
    let stored = written.status.clone().unwrap_or_default();
    if finalizer_step(written, &stored, target::reports_exported(written, ctx)) != FinalizerStep::Continue {
        return Replay::Acts;
    }
    if plan::is_settled(written) {
        return Replay::Settled;
    }
    if export::asks_for_a_report(&stored) {
        return Replay::Acts;
    }
    let reports = export::report_telemetry(written, ctx, &stored);
    let obs = Observation { telemetry_degraded: reports.degraded.or(target_degraded), ..obs.clone() };
    let mut plan = plan::plan(written, &obs, &ctx.settings);
    plan.status.telemetry = Some(reports.report);
    Replay::Planned(Box::new(Replayed { plan, stored, retry_after: reports.retry_after }))
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
            if run.spec.pool.is_some() {
                let pool = pooled::pool_for_dispatch(run, ctx).await.map_err(ReconcileError::ReadPool)?;
                return Ok(match pooled::dispatch(run, ctx, pool, *attempt, *started_at, target, *deadline_seconds)? {
                    Ok(()) => ActOutcome::Done,
                    Err((reason, message)) => ActOutcome::JobRefused { reason, message },
                });
            }
            let desired = job::build_job(run, *attempt, *started_at, target, Some(*deadline_seconds))?;
            let job_name = desired.name_any();
            if ctx.economy.was_created(&ns, &job_name) {
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
                    ctx.economy.created(created_job);
                    super::crash_point("after-job-create");
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // Ours already (a retried reconcile) or someone else's; the cache may lag behind a create.
                    let existing = match ctx.jobs.get(&ObjectRef::new(&job_name).within(&ns)) {
                        Some(j) => Some(j),
                        None => {
                            jobs_api.get_opt(&job_name).await.map_err(ReconcileError::ReadConflictingJob)?.map(Arc::new)
                        }
                    };
                    let uid = run.uid().unwrap_or_default();
                    if !existing.is_some_and(|j| job::is_controlled_by(&j, &uid)) {
                        let message = format!("Job {job_name} exists and is not controlled by this run");
                        return Ok(ActOutcome::JobRefused { reason: plan::reason::JOB_NAME_CONFLICT, message });
                    }
                }
                // The template is invalid for a Job: say so once, with the apiserver's words, and end the run.
                Err(kube::Error::Api(s)) if s.code == 400 || s.code == 422 || s.code == 413 => {
                    let message = format!("spec.template: the apiserver rejected Job {job_name}: {}", s.message);
                    return Ok(ActOutcome::JobRefused { reason: plan::reason::JOB_REJECTED, message });
                }
                Err(e) => return Err(ReconcileError::CreateJob(e)),
            }
        }
        Action::DeleteJob { name } if run.spec.pool.is_some() => pooled::stop(run, ctx, name),
        Action::DeleteJob { name } => {
            let dp = DeleteParams { propagation_policy: Some(PropagationPolicy::Background), ..Default::default() };
            match jobs_api.delete(name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(ReconcileError::DeleteJob(e)),
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
        Err(e) => Err(ReconcileError::DeleteRun(e)),
    }
}

/// Writes the planned status when it is worth a write; returns the written copy when it wrote.
async fn write_status(
    run: &WorkflowRun,
    ctx: &Context,
    planned: &WorkflowRunStatus,
    stored: &WorkflowRunStatus,
) -> Result<Option<Arc<WorkflowRun>>, ReconcileError> {
    if !ctx.economy.worth_writing(run, planned, stored, &ctx.settings, jiff::Timestamp::now()) {
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
    let answer = runs.patch_status(&run.name_any(), &params, &Patch::Apply(&patch)).await;
    let written = Arc::new(answer.map_err(ReconcileError::WriteStatus)?.into_inner());
    ctx.wrote(&written);
    ctx.metrics.status_writes.inc();
    tracing::debug!(
        uid = run.uid().unwrap_or_default(),
        phase = ?planned.phase,
        telemetry = ?planned.telemetry,
        version = written.resource_version().unwrap_or_default(),
        "status written"
    );
    if plan::is_terminal(planned) && !plan::is_terminal(stored) {
        super::crash_point("after-terminal-status");
    }
    if planned.phase == Some(WorkflowRunPhase::Retrying) {
        super::crash_point("during-backoff");
    }
    Ok(written)
}
