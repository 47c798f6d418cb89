//! The pure core of the WorkflowRun reconcile: from the run, what the caches show of its Jobs and pods, and the
//! time, compute the desired status and the one action to take. No I/O here, so every rule is unit-tested.

use std::hash::{DefaultHasher, Hash};

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::{
    AttemptClassification, AttemptStatus, RetryPolicy, TelemetryReport, WorkflowRunPhase, WorkflowRunStatus,
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::ResourceExt;

use super::job::{DISRUPTED_JOB_REASON, attempt_of, job_name, started_at};
use crate::runtime::ids;

/// Condition types.
pub const SUCCEEDED: &str = "Succeeded";
pub const TELEMETRY_DEGRADED: &str = "TelemetryDegraded";
pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
/// The reasons of a run's conditions and Events (CamelCase, as the API conventions ask).
pub mod reason {
    pub const PENDING: &str = "Pending";
    pub const RUNNING: &str = "Running";
    pub const RETRYING: &str = "Retrying";
    pub const SUCCEEDED_REASON: &str = "Succeeded";
    pub const CANCELLED: &str = "Cancelled";
    /// Kubernetes' own word for a Job past its deadline, reused for a run past its own.
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    pub const POD_FORBIDDEN: &str = "PodForbidden";
    pub const POD_CREATION_FAILED: &str = "PodCreationFailed";
    pub const PERMANENT_FAILURE: &str = "PermanentFailure";
    pub const RETRY_LIMIT_EXCEEDED: &str = "RetryLimitExceeded";
    pub const DISRUPTION_LIMIT_EXCEEDED: &str = "DisruptionLimitExceeded";
    pub const JOB_NAME_CONFLICT: &str = "JobNameConflict";
    pub const JOB_REJECTED: &str = "JobRejected";
    /// A pooled run's pool does not exist, refuses what the run asks, or no dispatcher runs: nothing was executed.
    pub const POOL_NOT_FOUND: &str = "PoolNotFound";
    pub const NOT_ALLOWED_BY_POOL: &str = "NotAllowedByPool";
    pub const POOLING_DISABLED: &str = "PoolingDisabled";
    pub const TELEMETRY_DROPPED: &str = "TelemetryDropped";
    pub const TELEMETRY_HEALTHY: &str = "TelemetryHealthy";
    pub const ATTEMPT_STARTED: &str = "AttemptStarted";
    pub const ATTEMPT_FINISHED: &str = "AttemptFinished";
}

/// Attempts kept in status; older ones are dropped (their counts stay in `attemptCount`, `transientFailures` and
/// `disruptions`, which the retry limits are checked against).
pub const MAX_ATTEMPTS_KEPT: usize = 32;

/// Operator-wide defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    pub default_deadline_seconds: i64,
    pub default_ttl_seconds: i64,
    /// How long the status write that records a started attempt (phase Running) waits for the attempt's end, so
    /// that a short attempt costs one status write instead of two. Zero writes it before the Job is created.
    pub running_status_delay: SignedDuration,
}

/// What the caches show, and what the telemetry exporter reports.
#[derive(Clone)]
pub struct Observation<'a> {
    pub now: Timestamp,
    /// Jobs controlled by this run.
    pub jobs: Vec<&'a Job>,
    /// Pods of this run that have ended (the watch sees no others: `TERMINAL_PODS`).
    pub pods: Vec<&'a Pod>,
    /// Why the run's telemetry is degraded, when it is (no endpoint, export failures).
    pub telemetry_degraded: Option<(String, String)>,
    /// Whether the operator exports run telemetry at all; when it does not, the TTL does not wait for it.
    pub exports_telemetry: bool,
    /// Why the first attempt may not start yet (reason, message): the referenced TelemetryStack is not ready.
    /// The run stays Pending, bounded by its deadline.
    pub waiting_for: Option<(String, String)>,
    /// Why the open attempt's Job has created no pod, from the Job's `FailedCreate` Event (read only when the
    /// Job has had no pod for `POD_CREATE_GRACE`).
    pub pod_creation_failure: Option<PodCreationFailure>,
}

/// A pod the apiserver refused to create for the open attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct PodCreationFailure {
    /// Refused by the namespace's Pod Security level: the same pod never will be admitted.
    pub forbidden: bool,
    /// The apiserver's message.
    pub message: String,
}

impl PodCreationFailure {
    /// From the job controller's `FailedCreate` message: PodSecurity admission refusals are final; anything else
    /// (a quota, a webhook down) may pass later.
    pub fn from_message(message: &str) -> Self {
        Self { forbidden: message.contains("violates PodSecurity"), message: message.to_string() }
    }
}

/// The pods the planner reads: only ended ones (their exit codes, reasons and disruptions decide an attempt), so a
/// pod costs the operator no watch event while it is created, scheduled and started. Whether an attempt's Job has a
/// pod at all is read from the Job's counters (`attempt_has_a_pod`).
pub const TERMINAL_PODS: &str = "status.phase!=Pending,status.phase!=Running";

/// Whether the attempt's Job has created a pod: one of its ended pods is cached, or the Job counts one.
pub fn attempt_has_a_pod(jobs: &[&Job], pods: &[&Pod], attempt: &AttemptStatus) -> bool {
    let counted = |job: &Job| {
        job.status.as_ref().is_some_and(|s| {
            let uncounted = s.uncounted_terminated_pods.as_ref();
            [s.active, s.succeeded, s.failed, s.terminating, s.ready].into_iter().flatten().any(|n| n > 0)
                || uncounted.is_some_and(|u| u.succeeded.iter().chain(u.failed.iter()).flatten().next().is_some())
        })
    };
    pods.iter().any(|p| attempt_of(&p.metadata) == Some(attempt.number))
        || jobs.iter().any(|j| j.name_any() == attempt.job_name && counted(j))
}

/// How long an attempt's Job may have no pod before the reconcile reads why (a pod normally appears within
/// milliseconds; the read is the one uncached read, so it waits for a Job that is really stuck).
pub const POD_CREATE_GRACE: SignedDuration = SignedDuration::from_secs(3);
/// How often a run whose pod cannot be created (quota) looks again.
const POD_CREATE_RECHECK: SignedDuration = SignedDuration::from_secs(10);

/// The one thing to do besides writing status.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    None,
    /// Create the Job of this attempt, started at `started_at`, with what remains of the run's deadline.
    CreateJob {
        attempt: i32,
        started_at: Timestamp,
        deadline_seconds: i64,
    },
    /// Delete the active Job (cancel, deadline).
    DeleteJob {
        name: String,
    },
    /// The TTL after completion passed: delete the run.
    DeleteRun,
}

/// A Kubernetes Event to record.
#[derive(Clone, Debug, PartialEq)]
pub struct EventNote {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: WorkflowRunStatus,
    pub action: Action,
    /// When to look again even if nothing changes (backoff end, deadline, TTL).
    pub requeue_after: Option<std::time::Duration>,
    pub events: Vec<EventNote>,
    /// A status to write before the action: the attempt whose Job the action deletes, open, when status has not
    /// recorded it yet (its Job was adopted). A crash after the delete would otherwise lose the attempt, and the
    /// run's start, with the Job.
    pub record_first: Option<WorkflowRunStatus>,
}

/// How soon a run whose failed Job's pod has not shown its end yet is looked at again.
const POD_LAG_RECHECK: SignedDuration = SignedDuration::from_secs(5);
/// How long after its Job failed an attempt waits for its pod's end (exit codes) before the Job's verdict stands.
const POD_END_WAIT: SignedDuration = SignedDuration::from_secs(15);

/// How an attempt ended, read from its pod (exit codes, DisruptionTarget) or, when the pod is gone, its Job.
#[derive(Clone, Debug, PartialEq)]
struct Outcome {
    classification: AttemptClassification,
    exit_code: Option<i32>,
    reason: String,
    /// The container that failed first (the `step_name` of `workflow.retry.count`).
    container: Option<String>,
}

pub fn is_terminal(status: &WorkflowRunStatus) -> bool {
    matches!(status.phase, Some(WorkflowRunPhase::Succeeded | WorkflowRunPhase::Failed))
}

/// Milliseconds are what the operator observes and reports; the extra digits would only be noise.
pub fn now_ms(now: Timestamp) -> Timestamp {
    Timestamp::from_millisecond(now.as_millisecond()).unwrap_or(now)
}

fn micro(t: Timestamp) -> MicroTime {
    MicroTime(t)
}

fn classify_exit(code: i32, retry: &RetryPolicy) -> AttemptClassification {
    if retry.permanent_exit_codes.contains(&code) {
        return AttemptClassification::Permanent;
    }
    match &retry.transient_exit_codes {
        Some(transient) if !transient.contains(&code) => AttemptClassification::Permanent,
        _ => AttemptClassification::Transient,
    }
}

fn pod_outcome(pod: &Pod, retry: &RetryPolicy) -> Option<Outcome> {
    let status = pod.status.as_ref()?;
    let disrupted = status.conditions.iter().flatten().any(|c| c.type_ == "DisruptionTarget" && c.status == "True");
    match status.phase.as_deref()? {
        "Succeeded" => Some(Outcome {
            classification: AttemptClassification::Succeeded,
            exit_code: Some(0),
            reason: "Completed".into(),
            container: None,
        }),
        "Failed" => {
            // The first container to exit non-zero decides (earliest finish, then spec order).
            let first_failed = status
                .container_statuses
                .iter()
                .flatten()
                .filter_map(|c| {
                    let t = c.state.as_ref()?.terminated.as_ref()?;
                    (t.exit_code != 0).then(|| (t.finished_at.as_ref().map(|f| f.0), c.name.clone(), t))
                })
                .min_by_key(|(finished, _, _)| *finished);
            let (exit_code, container, term_reason) = match first_failed {
                Some((_, name, t)) => (Some(t.exit_code), Some(name), t.reason.clone()),
                None => (None, None, None),
            };
            if disrupted {
                return Some(Outcome {
                    classification: AttemptClassification::Disruption,
                    exit_code,
                    reason: "DisruptionTarget".into(),
                    container,
                });
            }
            let classification = exit_code.map_or(AttemptClassification::Transient, |c| classify_exit(c, retry));
            let reason = term_reason.or_else(|| status.reason.clone()).unwrap_or_else(|| "Error".into());
            Some(Outcome { classification, exit_code, reason, container })
        }
        _ => None,
    }
}

/// What the planner reads of a pod beyond its identity (`pod_outcome`; `attempt_of` and its creation time are
/// fixed): its phase once terminal, its reason, its disruption and its containers' ends. A pod changes several
/// times on its way (scheduled, started, ready, its finalizer removed) and none of those changes a plan, so none
/// of them costs a reconcile (`runtime::triggers`).
pub fn pod_signature(pod: &Pod, h: &mut DefaultHasher) {
    let Some(status) = pod.status.as_ref() else { return };
    status.phase.as_deref().filter(|p| matches!(*p, "Succeeded" | "Failed")).hash(h);
    status.reason.hash(h);
    for c in status.conditions.iter().flatten().filter(|c| c.type_ == "DisruptionTarget") {
        c.status.hash(h);
    }
    for c in status.container_statuses.iter().flatten() {
        if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            (&c.name, t.exit_code, &t.reason, t.finished_at.as_ref().map(|f| f.0.as_millisecond())).hash(h);
        }
    }
}

/// The Job conditions the planner reads (`job_outcome`); others (SuccessCriteriaMet, Suspended) never change a plan.
const JOB_ENDS: [&str; 3] = ["Complete", "Failed", "FailureTarget"];

/// What the planner reads of a Job beyond its identity (`job_outcome`): the conditions of its end that hold, with
/// their reasons. Its counters, readiness and other conditions change while it runs and never change a plan.
pub fn job_signature(job: &Job, h: &mut DefaultHasher) {
    for c in job_ends(job) {
        (&c.type_, &c.reason).hash(h);
    }
}

/// Whether the Job shows an end the planner reads.
pub fn job_has_ended(job: &Job) -> bool {
    job_ends(job).next().is_some()
}

/// The Job's conditions of its end (`JOB_ENDS`) that hold.
fn job_ends(job: &Job) -> impl Iterator<Item = &k8s_openapi::api::batch::v1::JobCondition> {
    let conditions = job.status.iter().flat_map(|s| s.conditions.iter().flatten());
    conditions.filter(|c| c.status == "True" && JOB_ENDS.contains(&c.type_.as_str()))
}

/// When the Job's failure was first recorded (FailureTarget precedes Failed).
fn job_failed_at(job: &Job) -> Option<Timestamp> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .filter(|c| c.status == "True" && matches!(c.type_.as_str(), "Failed" | "FailureTarget"))
        .filter_map(|c| c.last_transition_time.as_ref().map(|t| t.0))
        .min()
}

fn job_outcome(job: &Job) -> Option<Outcome> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let finished = |t: &str| conditions.iter().find(|c| c.type_ == t && c.status == "True");
    if finished("Complete").is_some() {
        return Some(Outcome {
            classification: AttemptClassification::Succeeded,
            exit_code: Some(0),
            reason: "Completed".into(),
            container: None,
        });
    }
    // FailureTarget comes first: the Job controller sets it, then stops the pods, then sets Failed.
    let failed = finished("Failed").or_else(|| finished("FailureTarget"))?;
    let reason = failed.reason.clone().unwrap_or_else(|| "JobFailed".into());
    // A Job deadline is the run's deadline reaching the pod: never retried. The pod failure policy names a
    // disruption (see job.rs).
    let classification = match reason.as_str() {
        reason::DEADLINE_EXCEEDED => AttemptClassification::Permanent,
        DISRUPTED_JOB_REASON => AttemptClassification::Disruption,
        _ => AttemptClassification::Transient,
    };
    Some(Outcome { classification, exit_code: None, reason, container: None })
}

pub use crate::runtime::conditions::set_condition;

/// Delay before retry number `n` (from 1): `min(base * factor^(n-1), max)` seconds.
pub fn backoff_seconds(retry: &RetryPolicy, n: i32) -> i64 {
    let b = &retry.backoff;
    let mut delay = i64::from(b.base_seconds);
    for _ in 1..n.max(1) {
        delay = delay.saturating_mul(i64::from(b.factor));
        if delay >= i64::from(b.max_seconds) {
            break;
        }
    }
    delay.min(i64::from(b.max_seconds))
}

/// The Job's deadline is a backstop for when the operator is down: what remains of the run's, rounded up plus a
/// second, because the Job controller counts from a startTime truncated to whole seconds and must not fire first.
fn job_deadline_seconds(now: Timestamp, deadline_at: Timestamp) -> i64 {
    let remaining_ms = deadline_at.duration_since(now).as_millis();
    i64::try_from((remaining_ms + 999) / 1000).unwrap_or(i64::MAX).max(1) + 1
}

pub fn until(now: Timestamp, at: Timestamp) -> std::time::Duration {
    let d = at.duration_since(now);
    std::time::Duration::try_from(d.max(SignedDuration::ZERO)).unwrap_or_default()
}

/// Sets the phase and the conditions that follow from it.
fn set_phase(
    status: &mut WorkflowRunStatus,
    phase: WorkflowRunPhase,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    // Succeeded (as Knative and Tekton name it), and the kstatus conventions GitOps tools read: Reconciling while
    // the run goes on (InProgress), Ready when it succeeded (Current), Stalled when it failed (Failed).
    let (succeeded, ready, reconciling, stalled) = match phase {
        WorkflowRunPhase::Succeeded => ("True", "True", "False", "False"),
        WorkflowRunPhase::Failed => ("False", "False", "False", "True"),
        _ => ("Unknown", "False", "True", "False"),
    };
    let conditions = &mut status.conditions;
    set_condition(conditions, SUCCEEDED, succeeded, reason, message, generation, now);
    set_condition(conditions, READY, ready, reason, message, generation, now);
    set_condition(conditions, RECONCILING, reconciling, reason, message, generation, now);
    set_condition(conditions, STALLED, stalled, reason, message, generation, now);
    status.phase = Some(phase);
}

struct Planner<'a> {
    run: &'a WorkflowRun,
    obs: &'a Observation<'a>,
    status: WorkflowRunStatus,
    action: Action,
    requeue_at: Option<Timestamp>,
    events: Vec<EventNote>,
    /// The status recording the adopted attempt as running, when this plan adopted one that is still open.
    adopted: Option<WorkflowRunStatus>,
    record_first: Option<WorkflowRunStatus>,
}

impl Planner<'_> {
    fn requeue_at(&mut self, at: Timestamp) {
        self.requeue_at = Some(self.requeue_at.map_or(at, |r| r.min(at)));
    }

    fn event(&mut self, warning: bool, reason: &'static str, note: String) {
        self.events.push(EventNote { warning, reason, note });
    }

    fn phase(&mut self, phase: WorkflowRunPhase, reason: &str, message: &str) {
        set_phase(&mut self.status, phase, reason, message, self.run.metadata.generation, self.obs.now);
    }

    fn finish(&mut self, phase: WorkflowRunPhase, reason: &'static str, message: String) {
        let now = self.obs.now;
        self.phase(phase, reason, &message);
        self.status.completion_time = Some(micro(now));
        self.status.next_attempt_time = None;
        if let Some(start) = &self.status.start_time {
            self.status.duration_ms = Some(now.as_millisecond() - start.0.as_millisecond());
        }
        self.event(phase == WorkflowRunPhase::Failed, reason, message);
    }

    fn start_attempt(&mut self, number: i32, deadline_at: Timestamp) {
        let now = self.obs.now;
        self.record_attempt(number, now);
        self.phase(WorkflowRunPhase::Running, reason::RUNNING, &format!("attempt {number} is running"));
        let deadline_seconds = job_deadline_seconds(now, deadline_at);
        self.action = Action::CreateJob { attempt: number, started_at: now, deadline_seconds };
    }

    fn record_attempt(&mut self, number: i32, started: Timestamp) {
        self.status.attempts.push(AttemptStatus {
            number,
            job_name: job_name(&self.run.name_any(), number),
            start_time: Some(micro(started)),
            ..Default::default()
        });
        if self.status.attempts.len() > MAX_ATTEMPTS_KEPT {
            self.status.attempts.remove(0);
        }
        self.status.attempt_count = Some(number);
        self.status.next_attempt_time = None;
        self.event(false, reason::ATTEMPT_STARTED, format!("attempt {number} started"));
    }

    /// Records the attempts whose Jobs exist while status does not name them yet: the write of their start waited
    /// (`Settings::running_status_delay`), or a crash came between the create and the write. An attempt's Job name
    /// is fixed by its number, so a Job is never created twice for one attempt, and the Job says when it started.
    fn adopt_unrecorded_attempts(&mut self) -> bool {
        let mut adopted = false;
        loop {
            let next = match self.status.attempts.last() {
                None => 1,
                Some(a) if a.classification.is_some() => a.number.saturating_add(1),
                Some(_) => return adopted,
            };
            let name = job_name(&self.run.name_any(), next);
            let Some(job) = self.obs.jobs.iter().find(|j| j.name_any() == name) else { return adopted };
            let started = started_at(job).unwrap_or(self.obs.now);
            self.record_attempt(next, started);
            adopted = true;
            self.observe_current_attempt();
        }
    }

    /// Reads the current attempt's end from its pod or Job, if it ended.
    fn observe_current_attempt(&mut self) {
        let retry = &self.run.spec.retry;
        let Some(current) = self.status.attempts.last() else { return };
        if current.end_time.is_some() {
            return;
        }
        let number = current.number;
        let job_name = current.job_name.clone();
        let pod = self
            .obs
            .pods
            .iter()
            .filter(|p| attempt_of(&p.metadata) == Some(number))
            .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let pod_name = pod.map(|p| p.name_any());
        let job_object = self.obs.jobs.iter().find(|j| j.name_any() == job_name);
        let job = job_object.and_then(|j| job_outcome(j));
        let from_pod = pod.and_then(|p| pod_outcome(p, retry));
        // A Job fails only after its pod did, but the pods' watch may deliver the pod's end after the Job's (two
        // streams; a relist): the pod's exit code decides, so a generic Job failure waits for it, for a while (a
        // pod deleted meanwhile never comes).
        let pod_end_expected_until = job_object
            .and_then(|j| job_failed_at(j))
            .and_then(|at| at.checked_add(POD_END_WAIT).ok())
            .filter(|until| *until > self.obs.now && from_pod.is_none());
        let outcome = match job {
            // A Job deadline kills the pod (exit 137), which alone would look transient: the Job's reason wins.
            Some(o) if o.reason == reason::DEADLINE_EXCEEDED => Some(o),
            Some(o) if o.classification == AttemptClassification::Transient && pod_end_expected_until.is_some() => {
                let again = self.obs.now.saturating_add(POD_LAG_RECHECK).unwrap_or(self.obs.now);
                self.requeue_at(pod_end_expected_until.map_or(again, |until| until.min(again)));
                None
            }
            job => from_pod.or(job),
        };
        let now = self.obs.now;
        let Some(a) = self.status.attempts.last_mut() else { return };
        if let Some(o) = outcome {
            // Recorded with the outcome only: a write just for the pod's name would cost a status write per run.
            a.pod_name = pod_name;
            a.end_time = Some(micro(now));
            a.exit_code = o.exit_code;
            a.reason = Some(o.reason.clone());
            a.classification = Some(o.classification);
            let note = match (o.classification, o.exit_code) {
                (AttemptClassification::Succeeded, _) => format!("attempt {number} succeeded"),
                (c, Some(code)) => format!("attempt {number} failed with exit code {code} ({c:?})"),
                (c, None) => format!("attempt {number} failed: {} ({c:?})", o.reason),
            };
            a.container = o.container;
            let warning = o.classification != AttemptClassification::Succeeded;
            self.event(warning, reason::ATTEMPT_FINISHED, note);
            self.count_outcome(o.classification);
        }
    }

    /// Ends the active attempt (cancel, deadline) and deletes its Job.
    fn stop_active_attempt(&mut self, reason: &str) {
        let now = self.obs.now;
        if let Some(a) = self.status.attempts.last_mut().filter(|a| a.end_time.is_none()) {
            a.end_time = Some(micro(now));
            a.reason = Some(reason.into());
            a.classification = Some(AttemptClassification::Permanent);
            self.action = Action::DeleteJob { name: a.job_name.clone() };
            self.record_first = self.adopted.take();
        }
    }

    /// The counter in status of attempts that ended as `class`, if it has one.
    fn counter(&mut self, class: AttemptClassification) -> Option<&mut Option<i32>> {
        match class {
            AttemptClassification::Transient => Some(&mut self.status.transient_failures),
            AttemptClassification::Disruption => Some(&mut self.status.disruptions),
            _ => None,
        }
    }

    fn count_outcome(&mut self, class: AttemptClassification) {
        if let Some(counter) = self.counter(class) {
            *counter = Some(counter.unwrap_or_default().saturating_add(1));
        }
    }

    /// How many attempts ended as `class`, in all. A status written before the counters existed counts what it
    /// kept in `attempts`.
    fn count(&mut self, class: AttemptClassification) -> i32 {
        let kept = self.status.attempts.iter().filter(|a| a.classification == Some(class)).count();
        let kept = i32::try_from(kept).unwrap_or(i32::MAX);
        self.counter(class).map_or(kept, |c| *c.get_or_insert(kept))
    }

    fn plan(mut self, settings: &Settings) -> Plan {
        let now = self.obs.now;
        let spec = &self.run.spec;
        let generation = self.run.metadata.generation;
        self.status.observed_generation = generation;
        if self.status.trace_id.is_none() {
            self.status.trace_id = self.run.uid().map(|uid| ids::trace_id(&uid).to_string());
        }
        match &self.obs.telemetry_degraded {
            Some((reason, message)) => {
                let conditions = &mut self.status.conditions;
                if set_condition(conditions, TELEMETRY_DEGRADED, "True", reason, message, generation, now) {
                    self.event(true, TELEMETRY_DEGRADED, format!("{reason}: {message}"));
                }
            }
            None => {
                _ = set_condition(
                    &mut self.status.conditions,
                    TELEMETRY_DEGRADED,
                    "False",
                    reason::TELEMETRY_HEALTHY,
                    "run telemetry is exported",
                    generation,
                    now,
                );
            }
        }
        // Counters first: a status from before they existed counts its kept attempts, before any is observed.
        self.count(AttemptClassification::Transient);
        self.count(AttemptClassification::Disruption);
        if self.status.telemetry.is_none() {
            self.status.telemetry = Some(TelemetryReport::default());
        }
        if is_terminal(&self.status) {
            return self.after_finish(settings);
        }
        let adopted = self.adopt_unrecorded_attempts();
        let start = match &self.status.start_time {
            Some(t) => t.0,
            None => {
                // The run started with its first attempt when that started before status said so.
                let first = self.status.attempts.first().and_then(|a| a.start_time.as_ref()).map(|t| t.0);
                let start = first.map_or(now, |t| t.min(now));
                self.status.start_time = Some(micro(start));
                self.phase(WorkflowRunPhase::Pending, reason::PENDING, "the run was accepted");
                start
            }
        };
        if let Some(open) = self.status.attempts.last().filter(|a| adopted && a.end_time.is_none()) {
            let mut recording = self.status.clone();
            let message = format!("attempt {} is running", open.number);
            set_phase(&mut recording, WorkflowRunPhase::Running, reason::RUNNING, &message, generation, now);
            self.adopted = Some(recording);
        }

        let deadline = spec.active_deadline_seconds.unwrap_or(settings.default_deadline_seconds);
        let deadline_at = start.saturating_add(SignedDuration::from_secs(deadline)).unwrap_or(start);
        self.observe_current_attempt();
        // An attempt whose pod succeeded is a success even when seen after the deadline or a cancel: the work was done
        // (its Job carries the deadline too, so it cannot have run past it by more than the backstop second).
        let succeeded =
            self.status.attempts.last().and_then(|a| a.classification) == Some(AttemptClassification::Succeeded);

        if succeeded {
            self.advance(deadline_at);
        } else if spec.cancel || self.run.metadata.deletion_timestamp.is_some() {
            self.stop_active_attempt(reason::CANCELLED);
            self.finish(WorkflowRunPhase::Failed, reason::CANCELLED, "the run was cancelled".into());
        } else if now >= deadline_at {
            self.stop_active_attempt(reason::DEADLINE_EXCEEDED);
            self.finish(WorkflowRunPhase::Failed, reason::DEADLINE_EXCEEDED, format!("the run exceeded {deadline}s"));
        } else {
            self.advance(deadline_at);
        }
        if !is_terminal(&self.status) {
            self.requeue_at(deadline_at);
            let stored = self.run.status.as_ref().map_or(&[][..], |s| s.attempts.as_slice());
            if settings.running_status_delay.is_positive()
                && let Some(started) = unrecorded_start(stored, &self.status)
            {
                self.requeue_at(started.saturating_add(settings.running_status_delay).unwrap_or(now));
            }
        }
        self.into_plan()
    }

    /// Decides what follows the last attempt: nothing (running), a retry, or the end of the run.
    fn advance(&mut self, deadline_at: Timestamp) {
        let now = self.obs.now;
        let retry = &self.run.spec.retry;
        let Some(last) = self.status.attempts.last().cloned() else {
            match self.obs.waiting_for.clone() {
                Some((reason, message)) => self.phase(WorkflowRunPhase::Pending, &reason, &message),
                None => self.start_attempt(1, deadline_at),
            }
            return;
        };
        let Some(class) = last.classification else {
            if let Some(failure) = self.obs.pod_creation_failure.clone() {
                if failure.forbidden {
                    self.stop_active_attempt(reason::POD_FORBIDDEN);
                    self.finish(WorkflowRunPhase::Failed, reason::POD_FORBIDDEN, failure.message);
                } else {
                    // Transient (a quota): the Job keeps trying; the run says why it waits, bounded by its deadline.
                    self.phase(WorkflowRunPhase::Pending, reason::POD_CREATION_FAILED, &failure.message);
                    self.requeue_at(now.saturating_add(POD_CREATE_RECHECK).unwrap_or(now));
                }
                return;
            }
            self.phase(WorkflowRunPhase::Running, reason::RUNNING, &format!("attempt {} is running", last.number));
            // A Job that never gets a pod says why only in an Event: looked at once the grace has passed.
            if !attempt_has_a_pod(&self.obs.jobs, &self.obs.pods, &last)
                && let Some(started) = &last.start_time
            {
                let grace_ends = started.0.saturating_add(POD_CREATE_GRACE).unwrap_or(now);
                let look =
                    if grace_ends > now { grace_ends } else { now.saturating_add(POD_CREATE_RECHECK).unwrap_or(now) };
                self.requeue_at(look);
            }
            // Status records an attempt before its Job is created: a crash in between, or a Job deleted under a
            // running attempt, leaves an open attempt without a Job, which is (re)created under the same name.
            if !self.obs.jobs.iter().any(|j| j.name_any() == last.job_name) {
                self.action = Action::CreateJob {
                    attempt: last.number,
                    started_at: last.start_time.as_ref().map_or(now, |t| t.0),
                    deadline_seconds: job_deadline_seconds(now, deadline_at),
                };
            }
            return;
        };
        let next_delay = match class {
            AttemptClassification::Succeeded => {
                self.finish(
                    WorkflowRunPhase::Succeeded,
                    reason::SUCCEEDED_REASON,
                    format!("attempt {} succeeded", last.number),
                );
                return;
            }
            AttemptClassification::Permanent => {
                let reason = if last.reason.as_deref() == Some(reason::DEADLINE_EXCEEDED) {
                    reason::DEADLINE_EXCEEDED
                } else {
                    reason::PERMANENT_FAILURE
                };
                self.finish(WorkflowRunPhase::Failed, reason, format!("attempt {} failed permanently", last.number));
                return;
            }
            AttemptClassification::Transient => {
                let failures = self.count(AttemptClassification::Transient);
                if failures > retry.limit {
                    self.finish(
                        WorkflowRunPhase::Failed,
                        reason::RETRY_LIMIT_EXCEEDED,
                        format!("{} retries used, limit {}", failures - 1, retry.limit),
                    );
                    return;
                }
                backoff_seconds(retry, failures)
            }
            AttemptClassification::Disruption => {
                let disruptions = self.count(AttemptClassification::Disruption);
                if disruptions > retry.disruption_limit {
                    self.finish(
                        WorkflowRunPhase::Failed,
                        reason::DISRUPTION_LIMIT_EXCEEDED,
                        format!("{disruptions} disruptions, limit {}", retry.disruption_limit),
                    );
                    return;
                }
                // A disrupted pod did nothing wrong: it is replaced at once, outside the retry budget.
                0
            }
        };
        let ended = last.end_time.map_or(now, |t| t.0);
        let next_at = match &self.status.next_attempt_time {
            Some(t) => t.0,
            None => {
                let at = ended.saturating_add(SignedDuration::from_secs(next_delay)).unwrap_or(ended);
                self.status.next_attempt_time = Some(micro(at));
                at
            }
        };
        if now >= next_at {
            self.start_attempt(last.number + 1, deadline_at);
        } else {
            self.phase(
                WorkflowRunPhase::Retrying,
                reason::RETRYING,
                &format!("attempt {} starts after the backoff", last.number + 1),
            );
            self.requeue_at(next_at);
        }
    }

    fn after_finish(mut self, settings: &Settings) -> Plan {
        let now = self.obs.now;
        let exported = self.status.telemetry.as_ref().is_some_and(|t| t.finished) || !self.obs.exports_telemetry;
        // The TTL starts once the run's telemetry left: deleting earlier would lose the only record of it.
        if exported {
            let delete_at = ttl_expiry(self.run, &self.status, settings, now);
            if now >= delete_at {
                if self.run.metadata.deletion_timestamp.is_none() {
                    self.action = Action::DeleteRun;
                }
            } else {
                self.requeue_at(delete_at);
            }
        }
        self.into_plan()
    }

    fn into_plan(self) -> Plan {
        let now = self.obs.now;
        Plan {
            requeue_after: self.requeue_at.map(|at| until(now, at)),
            status: self.status,
            action: self.action,
            events: self.events,
            record_first: self.record_first,
        }
    }
}

/// The start of the attempt that `planned` adds to the `stored` attempts, when that start is all it adds that a
/// write would be for: the attempt is open and running, and the attempts before it are as stored. Recording it may
/// wait (`Settings::running_status_delay`): its Job's name and start are fixed (`adopt_unrecorded_attempts`), so a
/// short attempt's start and end go in one write.
pub fn unrecorded_start(stored: &[AttemptStatus], planned: &WorkflowRunStatus) -> Option<Timestamp> {
    let (last, before) = planned.attempts.split_last()?;
    let only_the_start =
        last.end_time.is_none() && planned.phase == Some(WorkflowRunPhase::Running) && stored == before;
    only_the_start.then_some(())?;
    last.start_time.as_ref().map(|t| t.0)
}

/// When a finished run is deleted: its completion plus its TTL (the spec's, or the default).
fn ttl_expiry(run: &WorkflowRun, status: &WorkflowRunStatus, settings: &Settings, now: Timestamp) -> Timestamp {
    let ttl = run.spec.ttl_seconds_after_finished.map_or(settings.default_ttl_seconds, i64::from);
    let done = status.completion_time.as_ref().map_or(now, |t| t.0);
    done.saturating_add(SignedDuration::from_secs(ttl)).unwrap_or(done)
}

/// A run that is over, whose report is out and whose status describes its current generation: all that is left
/// is its TTL. Planning it would change nothing, so the reconcile skips the plan, and the cache keeps only what
/// the TTL needs (`settled_ttl`).
pub fn is_settled(run: &WorkflowRun) -> bool {
    run.metadata.deletion_timestamp.is_none()
        && run.status.as_ref().is_some_and(|s| {
            s.completion_time.is_some()
                && s.telemetry.as_ref().is_some_and(|t| t.finished)
                && s.observed_generation == run.metadata.generation
        })
}

/// For a settled run: when its TTL ends.
pub fn settled_ttl(run: &WorkflowRun, settings: &Settings, now: Timestamp) -> Timestamp {
    ttl_expiry(run, &run.status.clone().unwrap_or_default(), settings, now)
}

/// The desired status and the next action for `run`.
pub fn plan(run: &WorkflowRun, obs: &Observation<'_>, settings: &Settings) -> Plan {
    let planner = Planner {
        run,
        obs,
        status: run.status.clone().unwrap_or_default(),
        action: Action::None,
        requeue_at: None,
        events: Vec::new(),
        adopted: None,
        record_first: None,
    };
    planner.plan(settings)
}

/// The attempt's Job could not be created (the apiserver rejected it, or its name is taken by a Job this run does
/// not own): the run ends Failed with that reason, so bad input is reported once instead of retried forever.
pub fn reject_attempt(
    mut plan: Plan,
    reason: &'static str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Plan {
    let status = &mut plan.status;
    if let Some(a) = status.attempts.last_mut() {
        a.end_time = Some(micro(now));
        a.reason = Some(reason.into());
        a.classification = Some(AttemptClassification::Permanent);
    }
    // Every condition a failed run carries (kstatus reads Stalled): a refused Job ends the run as any failure does.
    set_phase(status, WorkflowRunPhase::Failed, reason, message, generation, now);
    status.completion_time = Some(micro(now));
    status.next_attempt_time = None;
    if let Some(start) = &status.start_time {
        status.duration_ms = Some(now.as_millisecond() - start.0.as_millisecond());
    }
    plan.action = Action::None;
    plan.requeue_after = None;
    plan.events.push(EventNote { warning: true, reason, note: message.to_string() });
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn settings() -> Settings {
        Settings {
            default_deadline_seconds: 3600,
            default_ttl_seconds: 600,
            running_status_delay: SignedDuration::ZERO,
        }
    }

    fn run(retry: serde_json::Value) -> WorkflowRun {
        serde_json::from_value(json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": "uid-1", "generation": 1},
            "spec": {"workflowName": "w", "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}},
                     "retry": retry}
        }))
        .expect("run")
    }

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("time")
    }

    fn pod(attempt: i32, phase: &str, exit: Option<i32>, disrupted: bool) -> Pod {
        let mut conditions = vec![];
        if disrupted {
            conditions.push(json!({"type": "DisruptionTarget", "status": "True"}));
        }
        let statuses = match exit {
            Some(code) => json!([{"name": "main", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
                "state": {"terminated": {"exitCode": code, "reason": if code == 0 {"Completed"} else {"Error"}}}}]),
            None => json!([]),
        };
        serde_json::from_value(json!({
            "metadata": {"name": format!("r-{attempt}-abc"), "labels": {"flowtel.dev/attempt": attempt.to_string()}},
            "status": {"phase": phase, "conditions": conditions, "containerStatuses": statuses}
        }))
        .expect("pod")
    }

    /// What the caches show, with healthy telemetry and nothing else to wait for.
    fn observation<'a>(now: Timestamp, jobs: Vec<&'a Job>, pods: Vec<&'a Pod>) -> Observation<'a> {
        Observation {
            now,
            jobs,
            pods,
            telemetry_degraded: None,
            exports_telemetry: true,
            waiting_for: None,
            pod_creation_failure: None,
        }
    }

    fn step(run: &mut WorkflowRun, pods: &[Pod], now: Timestamp) -> Plan {
        let p = plan(run, &observation(now, vec![], pods.iter().collect()), &settings());
        run.status = Some(p.status.clone());
        p
    }

    fn with_failure(run: &WorkflowRun, job: &Job, failure: Option<PodCreationFailure>, now: Timestamp) -> Plan {
        let obs = Observation { pod_creation_failure: failure, ..observation(now, vec![job], vec![]) };
        plan(run, &obs, &settings())
    }

    #[test]
    fn a_job_with_no_pod_is_looked_at_after_the_grace_and_a_pod_security_refusal_fails_the_run() {
        let mut r = run(json!({"limit": 3}));
        step(&mut r, &[], t(0));
        let job: Job = serde_json::from_value(json!({"metadata": {"name": "r-1"}})).expect("job");
        let p = with_failure(&r, &job, None, t(1));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Running));
        assert_eq!(p.requeue_after, Some(std::time::Duration::from_secs(2)), "looked at once the 3 s grace ends");
        let p = with_failure(&r, &job, None, t(4));
        assert_eq!(p.requeue_after, Some(std::time::Duration::from_secs(10)), "past the grace: no hot loop");
        // The watch sees no running pod: the Job's counters say it has one.
        let counting: Job =
            serde_json::from_value(json!({"metadata": {"name": "r-1"}, "status": {"active": 1}})).expect("job");
        let p = with_failure(&r, &counting, None, t(1));
        assert_ne!(p.requeue_after, Some(std::time::Duration::from_secs(2)), "a pod: nothing to look at");
        let attempt = &r.status.as_ref().expect("status").attempts[0];
        assert!(attempt_has_a_pod(&[&counting], &[], attempt));
        assert!(!attempt_has_a_pod(&[&job], &[], attempt));
        let uncounted: Job = serde_json::from_value(
            json!({"metadata": {"name": "r-1"}, "status": {"uncountedTerminatedPods": {"failed": ["u"]}}}),
        )
        .expect("job");
        assert!(attempt_has_a_pod(&[&uncounted], &[], attempt));
        let other: Job =
            serde_json::from_value(json!({"metadata": {"name": "r-2"}, "status": {"active": 1}})).expect("job");
        assert!(!attempt_has_a_pod(&[&other], &[], attempt), "another attempt's Job");
        assert!(attempt_has_a_pod(&[&job], &[&pod(1, "Failed", Some(1), false)], attempt));
        let message = "Error creating: pods \"r-1-x\" is forbidden: violates PodSecurity \"restricted:latest\": ...";
        let p = with_failure(&r, &job, Some(PodCreationFailure::from_message(message)), t(4));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Failed), "never retried: the same pod is never admitted");
        let c = p.status.conditions.iter().find(|c| c.type_ == SUCCEEDED).expect("condition");
        assert_eq!((c.reason.as_str(), c.message.as_str()), ("PodForbidden", message));
        assert_eq!(p.action, Action::DeleteJob { name: "r-1".into() });
        assert!(p.events.iter().any(|e| e.warning && e.reason == "PodForbidden"));
    }

    #[test]
    fn a_quota_refusal_keeps_the_run_pending_and_a_pod_that_appears_makes_it_running_again() {
        let mut r = run(json!({}));
        step(&mut r, &[], t(0));
        let job: Job = serde_json::from_value(json!({"metadata": {"name": "r-1"}})).expect("job");
        let message = "Error creating: pods \"r-1-x\" is forbidden: exceeded quota: pods, requested: pods=1";
        let p = with_failure(&r, &job, Some(PodCreationFailure::from_message(message)), t(5));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Pending));
        let c = p.status.conditions.iter().find(|c| c.type_ == SUCCEEDED).expect("condition");
        assert_eq!((c.reason.as_str(), c.message.as_str()), ("PodCreationFailed", message));
        assert_eq!(p.action, Action::None, "the Job keeps trying");
        assert_eq!(p.requeue_after, Some(std::time::Duration::from_secs(10)));
        r.status = Some(p.status);
        let counting: Job =
            serde_json::from_value(json!({"metadata": {"name": "r-1"}, "status": {"active": 1}})).expect("job");
        let p = with_failure(&r, &counting, None, t(20));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Running));
    }

    #[test]
    fn first_visit_starts_attempt_one() {
        let mut r = run(json!({}));
        let p = step(&mut r, &[], t(0));
        assert_eq!(p.action, Action::CreateJob { attempt: 1, started_at: t(0), deadline_seconds: 3601 });
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Running));
        assert_eq!(p.status.attempts[0].job_name, "r-1");
        assert_eq!(p.status.trace_id.as_deref().map(str::len), Some(32));
        let succeeded = p.status.conditions.iter().find(|c| c.type_ == SUCCEEDED).expect("condition");
        assert_eq!(succeeded.status, "Unknown");
    }

    /// An attempt's Job as the operator creates it (`job::build_job`): named and annotated by the attempt.
    fn attempt_job(attempt: i32, started: Timestamp) -> Job {
        serde_json::from_value(json!({"metadata": {
            "name": format!("r-{attempt}"),
            "labels": {"flowtel.dev/attempt": attempt.to_string()},
            "annotations": {"flowtel.dev/started-at": started.to_string()}
        }}))
        .expect("job")
    }

    fn delayed(seconds: i64) -> Settings {
        Settings { running_status_delay: SignedDuration::from_secs(seconds), ..settings() }
    }

    #[test]
    fn a_job_whose_start_status_has_not_recorded_is_adopted_never_created_again() {
        let r = run(json!({}));
        let p = plan(&r, &observation(t(0), vec![], vec![]), &delayed(3));
        assert_eq!(p.action, Action::CreateJob { attempt: 1, started_at: t(0), deadline_seconds: 3601 });
        assert_eq!(p.requeue_after, Some(std::time::Duration::from_secs(3)), "the write waits 3 s, then goes");
        // The write waited (or a crash came first): status still says nothing, and the Job is there.
        let job = attempt_job(1, t(0));
        let p = plan(&r, &observation(t(1), vec![&job], vec![]), &delayed(3));
        assert_eq!(p.action, Action::None, "adopted, not created again");
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Running));
        assert_eq!(p.status.start_time, Some(micro(t(0))), "the run started with its Job");
        assert_eq!(p.status.attempts[0].start_time, Some(micro(t(0))));
        assert_eq!(p.requeue_after, Some(std::time::Duration::from_secs(2)));
        // Its end comes before any write: start and end are recorded together, as one attempt.
        let done = pod(1, "Succeeded", Some(0), false);
        let p = plan(&r, &observation(t(2), vec![&job], vec![&done]), &delayed(3));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Succeeded));
        assert_eq!((p.status.attempt_count, p.status.attempts.len(), p.status.duration_ms), (Some(1), 1, Some(2000)));
        let reasons: Vec<_> = p.events.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, ["AttemptStarted", "AttemptFinished", "Succeeded"]);
        // Cancelled meanwhile: the adopted attempt's Job is deleted.
        let mut cancelled = r.clone();
        cancelled.spec.cancel = true;
        let p = plan(&cancelled, &observation(t(1), vec![&job], vec![]), &delayed(3));
        assert_eq!(p.action, Action::DeleteJob { name: "r-1".into() });
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Failed));
        // ...once status records the attempt, open: a crash after the delete must not lose it (and start it again).
        let first = p.record_first.expect("the attempt is recorded before its Job goes");
        assert_eq!(first.phase, Some(WorkflowRunPhase::Running));
        assert_eq!((first.attempts.len(), first.attempts[0].end_time.clone()), (1, None));
        assert_eq!(first.start_time, Some(micro(t(0))));
        // A recorded attempt needs no such write.
        cancelled.status = Some(first);
        let p = plan(&cancelled, &observation(t(1), vec![&job], vec![]), &delayed(3));
        assert_eq!((p.action, p.record_first), (Action::DeleteJob { name: "r-1".into() }, None));
        // Past the deadline, the same: the run's deadline counts from its Job's start.
        let mut short = r.clone();
        short.spec.active_deadline_seconds = Some(1);
        let p = plan(&short, &observation(t(2), vec![&job], vec![]), &delayed(3));
        assert_eq!(p.action, Action::DeleteJob { name: "r-1".into() });
        assert!(p.record_first.is_some());
    }

    #[test]
    fn the_next_attempts_job_is_adopted_after_a_recorded_failure() {
        let mut r = run(json!({"limit": 2, "backoff": {"baseSeconds": 5, "factor": 1, "maxSeconds": 5}}));
        step(&mut r, &[], t(0));
        let failed = pod(1, "Failed", Some(1), false);
        step(&mut r, std::slice::from_ref(&failed), t(1));
        let p = plan(&r, &observation(t(6), vec![], vec![&failed]), &delayed(3));
        assert_eq!(p.action, Action::CreateJob { attempt: 2, started_at: t(6), deadline_seconds: 3595 });
        let second = attempt_job(2, t(6));
        let (first_job, ok) = (attempt_job(1, t(0)), pod(2, "Succeeded", Some(0), false));
        let p = plan(&r, &observation(t(7), vec![&first_job, &second], vec![&failed, &ok]), &delayed(3));
        assert_eq!(p.action, Action::None);
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Succeeded));
        let numbers: Vec<_> = p.status.attempts.iter().map(|a| (a.number, a.start_time.clone())).collect();
        assert_eq!(numbers, [(1, Some(micro(t(0)))), (2, Some(micro(t(6))))]);
        assert_eq!(p.status.transient_failures, Some(1), "the recorded failure is counted once");
    }

    #[test]
    fn success_ends_the_run() {
        let mut r = run(json!({}));
        step(&mut r, &[], t(0));
        let p = step(&mut r, &[pod(1, "Succeeded", Some(0), false)], t(2));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Succeeded));
        assert_eq!(p.status.duration_ms, Some(2000));
        assert_eq!(p.action, Action::None);
    }

    #[test]
    fn transient_failure_retries_after_backoff_then_succeeds() {
        let mut r = run(json!({"limit": 1, "backoff": {"baseSeconds": 5, "factor": 2, "maxSeconds": 60}}));
        step(&mut r, &[], t(0));
        let failed = pod(1, "Failed", Some(3), false);
        let p = step(&mut r, std::slice::from_ref(&failed), t(1));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Retrying));
        assert_eq!(p.requeue_after, Some(std::time::Duration::from_secs(5)));
        assert_eq!(p.status.attempts[0].classification, Some(AttemptClassification::Transient));
        let p = step(&mut r, std::slice::from_ref(&failed), t(6));
        assert_eq!(p.action, Action::CreateJob { attempt: 2, started_at: t(6), deadline_seconds: 3595 });
        let p = step(&mut r, &[failed, pod(2, "Succeeded", Some(0), false)], t(8));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Succeeded));
        assert_eq!(p.status.attempt_count, Some(2));
    }

    #[test]
    fn permanent_exit_code_is_not_retried_and_the_budget_ends_retries() {
        let mut r = run(json!({"limit": 3, "permanentExitCodes": [42]}));
        step(&mut r, &[], t(0));
        let p = step(&mut r, &[pod(1, "Failed", Some(42), false)], t(1));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Failed));
        let c = p.status.conditions.iter().find(|c| c.type_ == SUCCEEDED).expect("condition");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "PermanentFailure"));

        let mut r = run(json!({"limit": 0}));
        step(&mut r, &[], t(0));
        let p = step(&mut r, &[pod(1, "Failed", Some(1), false)], t(1));
        assert_eq!(
            p.status.conditions.iter().find(|c| c.type_ == SUCCEEDED).map(|c| c.reason.as_str()),
            Some("RetryLimitExceeded")
        );
    }

    #[test]
    fn only_listed_transient_codes_retry() {
        let mut r = run(json!({"limit": 3, "transientExitCodes": [3]}));
        step(&mut r, &[], t(0));
        let p = step(&mut r, &[pod(1, "Failed", Some(4), false)], t(1));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Failed));
    }

    #[test]
    fn disruption_retries_at_once_without_using_the_budget() {
        let mut r = run(json!({"limit": 0}));
        step(&mut r, &[], t(0));
        let p = step(&mut r, &[pod(1, "Failed", Some(137), true)], t(1));
        assert_eq!(p.action, Action::CreateJob { attempt: 2, started_at: t(1), deadline_seconds: 3600 });
        assert_eq!(p.status.attempts[0].classification, Some(AttemptClassification::Disruption));
    }

    #[test]
    fn deadline_and_cancel_stop_the_active_job() {
        let mut r = run(json!({}));
        r.spec.active_deadline_seconds = Some(10);
        step(&mut r, &[], t(0));
        let p = step(&mut r, &[], t(11));
        assert_eq!(p.action, Action::DeleteJob { name: "r-1".into() });
        assert_eq!(
            p.status.conditions.iter().find(|c| c.type_ == SUCCEEDED).map(|c| c.reason.as_str()),
            Some("DeadlineExceeded")
        );

        let mut r = run(json!({}));
        step(&mut r, &[], t(0));
        r.spec.cancel = true;
        let p = step(&mut r, &[], t(1));
        assert_eq!(p.action, Action::DeleteJob { name: "r-1".into() });
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Failed));
    }

    #[test]
    fn ttl_counts_only_after_export() {
        let mut r = run(json!({}));
        r.spec.ttl_seconds_after_finished = Some(10);
        step(&mut r, &[], t(0));
        step(&mut r, &[pod(1, "Succeeded", Some(0), false)], t(1));
        let p = step(&mut r, &[], t(100));
        assert_eq!(p.action, Action::None, "not exported yet");
        if let Some(s) = r.status.as_mut() {
            s.telemetry = Some(TelemetryReport { started: true, finished: true, dropped: false });
        }
        assert_eq!(step(&mut r, &[], t(100)).action, Action::DeleteRun);
    }

    #[test]
    fn a_finished_run_plans_no_change() {
        let mut r = run(json!({}));
        step(&mut r, &[], t(0));
        step(&mut r, &[pod(1, "Succeeded", Some(0), false)], t(1));
        let before = r.status.clone();
        let p = step(&mut r, &[], t(50));
        assert_eq!(Some(p.status), before, "status of a finished run must not move");
    }

    #[test]
    fn a_rejected_job_ends_the_run_with_the_reason() {
        let mut r = run(json!({}));
        let p = step(&mut r, &[], t(0));
        let p = reject_attempt(p, "JobRejected", "spec.template: invalid", Some(1), t(0));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Failed));
        assert_eq!(p.status.attempts[0].classification, Some(AttemptClassification::Permanent));
        assert!(p.events.iter().any(|e| e.warning && e.reason == "JobRejected"));
        // As GitOps tools read a failed run (kstatus: Stalled; not InProgress forever).
        let condition = |t: &str| p.status.conditions.iter().find(|c| c.type_ == t).map(|c| c.status.as_str());
        let kstatus = [SUCCEEDED, READY, RECONCILING, STALLED].map(condition);
        assert_eq!(kstatus, [Some("False"), Some("False"), Some("False"), Some("True")]);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let r = run(json!({"backoff": {"baseSeconds": 10, "factor": 3, "maxSeconds": 60}}));
        let got: Vec<i64> = (1..=4).map(|n| backoff_seconds(&r.spec.retry, n)).collect();
        assert_eq!(got, [10, 30, 60, 60]);
    }

    fn reason(p: &Plan) -> Option<&str> {
        p.status.conditions.iter().find(|c| c.type_ == SUCCEEDED).map(|c| c.reason.as_str())
    }

    /// Drives a run whose every attempt ends with `outcome` (a pod of `pod(n)`) until it is terminal.
    fn run_to_the_end(r: &mut WorkflowRun, pod: impl Fn(i32) -> Pod) -> Plan {
        let mut now = 0;
        let mut p = step(r, &[], t(now));
        for _ in 0..2000 {
            if is_terminal(&p.status) {
                return p;
            }
            now += 1;
            let current = p.status.attempts.last().map_or(0, |a| a.number);
            p = step(r, &[pod(current)], t(now));
        }
        panic!("the run never ended: {:?}", p.status.phase);
    }

    #[test]
    fn retry_limits_above_the_attempts_kept_are_enforced() {
        let backoff = json!({"baseSeconds": 1, "factor": 1, "maxSeconds": 1});
        let mut r = run(json!({"limit": 40, "backoff": backoff}));
        let p = run_to_the_end(&mut r, |n| pod(n, "Failed", Some(1), false));
        assert_eq!(reason(&p), Some("RetryLimitExceeded"));
        assert_eq!(p.status.attempt_count, Some(41));
        assert_eq!(p.status.transient_failures, Some(41));
        assert_eq!(p.status.attempts.len(), MAX_ATTEMPTS_KEPT);

        let mut r = run(json!({"limit": 0, "disruptionLimit": 40}));
        let p = run_to_the_end(&mut r, |n| pod(n, "Failed", Some(137), true));
        assert_eq!(reason(&p), Some("DisruptionLimitExceeded"));
        assert_eq!(p.status.attempt_count, Some(41));
        assert_eq!(p.status.disruptions, Some(41));
        assert_eq!(p.status.transient_failures, Some(0));
    }

    #[test]
    fn counts_from_before_the_counters_existed_are_taken_from_the_attempts() {
        let mut r = run(json!({"limit": 1, "backoff": {"baseSeconds": 1, "factor": 1, "maxSeconds": 1}}));
        step(&mut r, &[], t(0));
        step(&mut r, &[pod(1, "Failed", Some(1), false)], t(1));
        if let Some(s) = r.status.as_mut() {
            s.transient_failures = None;
        }
        let p = step(&mut r, &[pod(1, "Failed", Some(1), false)], t(3));
        assert_eq!(p.status.transient_failures, Some(1));
        assert_eq!(p.action, Action::CreateJob { attempt: 2, started_at: t(3), deadline_seconds: 3598 });
    }

    #[test]
    fn a_job_failed_by_its_disruption_rule_is_a_disruption_even_without_its_pod() {
        let mut r = run(json!({"limit": 0}));
        step(&mut r, &[], t(0));
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "r-1"},
            "status": {"conditions": [{"type": "Failed", "status": "True", "reason": DISRUPTED_JOB_REASON}]}
        }))
        .expect("job");
        let obs = observation(t(5), vec![&job], vec![]);
        let p = plan(&r, &obs, &settings());
        assert_eq!(p.status.attempts[0].classification, Some(AttemptClassification::Disruption));
        assert_eq!(p.status.disruptions, Some(1));
        assert_eq!(p.action, Action::CreateJob { attempt: 2, started_at: t(5), deadline_seconds: 3596 });
    }

    #[test]
    fn a_failed_job_waits_a_while_for_its_pods_end_which_decides() {
        let mut r = run(json!({"limit": 3, "permanentExitCodes": [42]}));
        step(&mut r, &[], t(0));
        let job: Job = serde_json::from_value(json!({
            "metadata": {"name": "r-1"},
            "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                "lastTransitionTime": t(10).to_string()}]}
        }))
        .expect("job");
        let at = |now: Timestamp, pods: Vec<&Pod>| plan(&r, &observation(now, vec![&job], pods), &settings());
        let waiting = at(t(11), vec![]);
        assert_eq!(waiting.status.attempts[0].classification, None, "the pod's end is on its way");
        assert_eq!(waiting.requeue_after, Some(std::time::Duration::from_secs(5)));
        let failed = pod(1, "Failed", Some(42), false);
        let p = at(t(12), vec![&failed]);
        assert_eq!(p.status.attempts[0].classification, Some(AttemptClassification::Permanent), "its exit code");
        let late = at(t(24), vec![]);
        assert_eq!(late.requeue_after, Some(std::time::Duration::from_secs(1)), "no later than the wait's end");
        let p = at(t(25), vec![]);
        assert_eq!(p.status.attempts[0].classification, Some(AttemptClassification::Transient), "the Job's verdict");
        let mut undated = job.clone();
        if let Some(c) = undated.status.as_mut().and_then(|s| s.conditions.as_mut()) {
            c[0].last_transition_time = None;
        }
        let obs = observation(t(11), vec![&undated], vec![]);
        let p = plan(&r, &obs, &settings());
        assert_eq!(p.status.attempts[0].classification, Some(AttemptClassification::Transient), "no time: no wait");
    }

    fn signature<K>(o: &K, sign: fn(&K, &mut DefaultHasher)) -> u64 {
        let mut h = DefaultHasher::new();
        sign(o, &mut h);
        std::hash::Hasher::finish(&h)
    }

    /// Only signature changes wake a run (`runtime::triggers`): two states of a pod or a Job with one signature must
    /// plan alike, and the states a run waits for must differ from those before them.
    #[test]
    fn a_childs_signature_covers_everything_its_outcome_reads() {
        let retry: RetryPolicy = serde_json::from_value(json!({"transientExitCodes": [3]})).expect("retry");
        let mut pods = vec![];
        for phase in ["Pending", "Running", "Succeeded", "Failed", "Unknown"] {
            for exit in [None, Some(0), Some(1), Some(3)] {
                for disrupted in [false, true] {
                    pods.push(pod(1, phase, exit, disrupted));
                    let mut ready = pod(1, phase, exit, disrupted);
                    ready.metadata.finalizers = Some(vec!["batch.kubernetes.io/job-tracking".into()]);
                    ready.status.as_mut().expect("status").pod_ip = Some("10.0.0.1".into());
                    pods.push(ready);
                }
            }
        }
        for a in &pods {
            for b in &pods {
                if signature(a, pod_signature) == signature(b, pod_signature) {
                    assert_eq!(pod_outcome(a, &retry), pod_outcome(b, &retry), "{a:?}\n{b:?}");
                }
            }
        }
        let running = signature(&pod(1, "Running", None, false), pod_signature);
        assert_eq!(running, signature(&pod(1, "Pending", None, false), pod_signature), "starting wakes nothing");
        assert_ne!(running, signature(&pod(1, "Failed", Some(3), false), pod_signature));

        let job = |conditions: Value, active: i32| -> Job {
            serde_json::from_value(json!({"metadata": {"name": "r-1"},
                "status": {"active": active, "conditions": conditions}}))
            .expect("job")
        };
        let mut jobs = vec![];
        for conditions in [
            json!([]),
            json!([{"type": "Complete", "status": "True"}]),
            json!([{"type": "Complete", "status": "False"}]),
            json!([{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"}]),
            json!([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]),
            json!([{"type": "Failed", "status": "True", "reason": DISRUPTED_JOB_REASON}]),
            json!([{"type": "SuccessCriteriaMet", "status": "True"}]),
        ] {
            jobs.extend([job(conditions.clone(), 0), job(conditions, 1)]);
        }
        for a in &jobs {
            for b in &jobs {
                if signature(a, job_signature) == signature(b, job_signature) {
                    assert_eq!(job_outcome(a), job_outcome(b), "{a:?}\n{b:?}");
                }
            }
        }
        assert_eq!(signature(&jobs[0], job_signature), signature(&jobs[1], job_signature), "counters wake nothing");
        assert_ne!(signature(&jobs[0], job_signature), signature(&jobs[2], job_signature));
        assert_eq!(signature(&jobs[0], job_signature), signature(&jobs[12], job_signature), "nor a condition unread");
    }

    #[test]
    fn a_success_seen_after_the_deadline_is_a_success() {
        let mut r = run(json!({}));
        r.spec.active_deadline_seconds = Some(10);
        step(&mut r, &[], t(0));
        let p = step(&mut r, &[pod(1, "Succeeded", Some(0), false)], t(30));
        assert_eq!(p.status.phase, Some(WorkflowRunPhase::Succeeded));
        assert_eq!(p.action, Action::None, "no Job to delete");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum PodSeen {
            Nothing,
            Running,
            Succeeded,
            Failed(i32),
            Disrupted,
        }

        fn pod_seen() -> impl Strategy<Value = PodSeen> {
            prop_oneof![
                Just(PodSeen::Nothing),
                Just(PodSeen::Running),
                Just(PodSeen::Succeeded),
                (1..=255i32).prop_map(PodSeen::Failed),
                Just(PodSeen::Disrupted),
            ]
        }

        fn spec() -> impl Strategy<Value = (serde_json::Value, Option<i64>)> {
            (
                0..=100i32,
                0..=60i32,
                proptest::collection::vec(1..=255i32, 0..4),
                0..=5i32,
                1..=10i32,
                0..=20i32,
                proptest::option::of(1..=400i64),
            )
                .prop_map(|(limit, disruption_limit, permanent, base, factor, extra, deadline)| {
                    let retry = json!({
                        "limit": limit, "disruptionLimit": disruption_limit, "permanentExitCodes": permanent,
                        "backoff": {"baseSeconds": base, "factor": factor, "maxSeconds": base + extra}
                    });
                    (retry, deadline)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]
            #[test]
            fn the_planner_keeps_its_invariants(
                (retry, deadline) in spec(),
                steps in proptest::collection::vec((0..30i64, pod_seen(), proptest::bool::weighted(0.02)), 1..120),
            ) {
                let mut r = run(retry);
                r.spec.active_deadline_seconds = deadline;
                let limit = r.spec.retry.limit;
                let disruption_limit = r.spec.retry.disruption_limit;
                let mut now = 0;
                let mut before = step(&mut r, &[], t(now)).status;
                for (advance, seen, cancel) in steps {
                    now += advance;
                    r.spec.cancel |= cancel;
                    let current = before.attempts.last().map_or(0, |a| a.number);
                    let pods: Vec<Pod> = match seen {
                        PodSeen::Nothing => vec![],
                        PodSeen::Running => vec![pod(current, "Running", None, false)],
                        PodSeen::Succeeded => vec![pod(current, "Succeeded", Some(0), false)],
                        PodSeen::Failed(code) => vec![pod(current, "Failed", Some(code), false)],
                        PodSeen::Disrupted => vec![pod(current, "Failed", Some(137), true)],
                    };
                    let p = step(&mut r, &pods, t(now));
                    let after = &p.status;
                    // Attempt numbers only grow; a new attempt only follows an ended one.
                    prop_assert!(after.attempt_count >= before.attempt_count);
                    let numbers: Vec<i32> = after.attempts.iter().map(|a| a.number).collect();
                    prop_assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{:?}", numbers);
                    if let Action::CreateJob { attempt, .. } = p.action {
                        // The next attempt, or the open one whose Job is not there (none is, in this model).
                        let open = before.attempts.last().filter(|a| a.end_time.is_none()).map(|a| a.number);
                        let next = before.attempt_count.unwrap_or_default() + 1;
                        prop_assert!(attempt == next || Some(attempt) == open, "{} {:?}", attempt, before.attempt_count);
                        prop_assert_eq!(after.attempts.last().map(|a| a.number), Some(attempt));
                    }
                    // At most one attempt is open, and only the last.
                    let open = after.attempts.iter().filter(|a| a.end_time.is_none()).count();
                    prop_assert!(open <= 1);
                    prop_assert!(after.attempts.iter().rev().skip(1).all(|a| a.end_time.is_some()));
                    // A terminal phase never changes.
                    if is_terminal(&before) {
                        prop_assert_eq!(after.phase, before.phase);
                        prop_assert_eq!(&after.completion_time, &before.completion_time);
                    }
                    // Counts never exceed the limits (the one that crossed a limit ends the run).
                    prop_assert!(after.transient_failures.unwrap_or_default() <= limit + 1);
                    prop_assert!(after.disruptions.unwrap_or_default() <= disruption_limit + 1);
                    prop_assert!(after.attempts.len() <= MAX_ATTEMPTS_KEPT);
                    before = after.clone();
                }
            }
        }
    }
}
