//! The write economy: everything in the WorkflowRun controller whose only purpose is fewer apiserver writes,
//! reconciles or watch echoes. Off (`--write-economy off`), the controller is its correctness reference: every
//! watch event wakes its run, every reconcile reads the cache as it is, every change of status is written when it
//! is planned, and a run that ends is written before its report goes out.
//!
//! # Contract
//!
//! On or off, a run's outcome is the same: its phase, attempts (numbers, Jobs, exit codes, classifications),
//! reasons, retries, exported reports (each once) and Events. Only the number of writes, reconciles and the moment
//! a change reaches status may differ, and never past a change that must be recorded:
//! - a write that records a run's end, an attempt's end or classification, or the export of its report, is never
//!   skipped or delayed;
//! - a copy of the run substituted for the cached one (`newest`) is one this process wrote, and only until the
//!   watch delivers it;
//! - a Job counted as existing before the cache shows it (`add_uncached`) is one this process created, controlled
//!   by the run;
//! - an event held back (`passes_run_event`, `quiet_after`) is the echo of this process' own write whose reconcile
//!   would change nothing (the reconcile says so by replaying its plan on the written copy, `Replay`); it then asks
//!   to be looked at again when that reconcile would have.
//!
//! What the economy does when on:
//! 1. the echoes of the run's own writes wake it only when they need a look (`OwnWrites`);
//! 2. a reconcile reads the copy it wrote last until the cache has it (`newest`), and the Jobs it created until
//!    the cache shows them (`add_uncached`);
//! 3. a Job's creation, a Job or pod event that changes nothing the plan reads, and the children of a settled run
//!    wake nothing (`child_filter`, `wakes_settled_runs`);
//! 4. an attempt's start waits `running_status_delay` for its end before it is written alone, and telemetry
//!    bookkeeping alone rides along with the run's next change (`worth_writing`);
//! 5. a run that ends exports its report first (`end_export_wait`), so one status write records the end and the
//!    export.

use std::sync::Arc;
use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunStatus;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::runtime::watcher;

use super::job;
use super::plan::{self, Action, Plan, Settings};
use crate::runtime::expiring::ExpiringMap;
use crate::runtime::triggers::{Busy, Changes, OwnWrites, Signature};

/// How long a write's echo, or a created Job, is remembered without meeting the watch (a watch restarted in between).
const REMEMBER: Duration = Duration::from_secs(60);
/// How long a run that ends waits for its report to reach a healthy collector before its terminal status is
/// written without it.
const END_EXPORT_WAIT: Duration = Duration::from_secs(1);

/// The write economy of one controller (see the module's contract).
pub struct Economy {
    on: bool,
    own_writes: OwnWrites<WorkflowRun>,
    created_jobs: ExpiringMap<(String, String), Arc<Job>>,
}

/// What reconciling a copy this reconcile wrote would do, as far as the reconcile can tell without acting.
pub enum Replay {
    /// It would act before planning (a finalizer to change, a report to ask for).
    Acts,
    /// The run is settled: only its TTL is left.
    Settled,
    /// Planned on the written copy with this reconcile's observation.
    Planned(Box<Replayed>),
}

/// The plan a reconcile of the written copy would make.
pub struct Replayed {
    pub plan: Plan,
    /// The written copy's status.
    pub stored: WorkflowRunStatus,
    /// When an export in progress would have it look again.
    pub retry_after: Option<Duration>,
}

impl Economy {
    pub fn new(on: bool) -> Self {
        Self { on, own_writes: OwnWrites::new(REMEMBER), created_jobs: ExpiringMap::new(REMEMBER) }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// The planner's settings: off, an attempt's start is written before its Job is created.
    pub fn settings(&self, mut settings: Settings) -> Settings {
        if !self.on {
            settings.running_status_delay = SignedDuration::ZERO;
        }
        settings
    }

    /// Which events of a child kind wake its run: off, all of them.
    pub fn child_filter<K: kube::Resource>(&self, signature: Signature<K>, births: fn(&K) -> bool) -> Changes<K> {
        if self.on { Changes::quiet_births(signature, births) } else { Changes::passing_all(signature) }
    }

    /// Whether a child's event wakes its run when the run is settled (its reconcile then reads no child).
    pub fn wakes_settled_runs(&self) -> bool {
        !self.on
    }

    /// Whether a run's own watch event wakes it.
    pub fn passes_run_event(&self, event: &Result<watcher::Event<WorkflowRun>, watcher::Error>) -> bool {
        !self.on || self.own_writes.pass(event)
    }

    /// The run as the reconcile should read it: the copy this process wrote last, until the cache has it.
    pub fn newest(&self, cached: Arc<WorkflowRun>) -> Arc<WorkflowRun> {
        if self.on { self.own_writes.newest(cached) } else { cached }
    }

    /// A copy of the run as the apiserver answered our write.
    pub fn wrote(&self, copy: &Arc<WorkflowRun>) {
        if self.on {
            self.own_writes.wrote(copy.clone());
        }
    }

    /// Holds the run's watch events while its reconcile runs (None when off: they all pass).
    pub fn reconciling(&self, run: &WorkflowRun) -> Option<Busy<'_, WorkflowRun>> {
        self.on.then(|| run.uid().map(|uid| self.own_writes.busy(uid))).flatten()
    }

    /// A Job this process created, as the create returned it.
    pub fn created(&self, job: Job) {
        if !self.on {
            return;
        }
        let key = (job.namespace().unwrap_or_default(), job.name_any());
        self.created_jobs.insert(key, Arc::new(job));
    }

    /// Whether this process created the Job `name` in `namespace` lately (its create need not be sent again).
    pub fn was_created(&self, namespace: &str, name: &str) -> bool {
        self.on && self.created_jobs.get(&(namespace.to_string(), name.to_string())).is_some()
    }

    /// Adds to `jobs` (the cached ones) the Jobs named `names` that this process created for the run and the cache
    /// does not show yet; forgets the created ones the cache shows (it answers for them from now on).
    pub fn add_uncached(&self, jobs: &mut Vec<Arc<Job>>, run: &WorkflowRun, names: impl IntoIterator<Item = String>) {
        if !self.on {
            return;
        }
        let namespace = run.namespace().unwrap_or_default();
        let uid = run.uid().unwrap_or_default();
        for name in names {
            let key = (namespace.clone(), name);
            if jobs.iter().any(|j| j.metadata.name.as_deref() == Some(key.1.as_str())) {
                self.created_jobs.take(&key);
            } else if let Some(job) = self.created_jobs.get(&key).filter(|j| job::is_controlled_by(j, &uid)) {
                jobs.push(job);
            }
        }
    }

    /// Whether the planned status is worth a write. Never when nothing changed. Then, on only: not for the start of
    /// an attempt within `running_status_delay` of it (its end, if it comes by then, is recorded with it); not for a
    /// deleted run that already finished and reported (deletion bumps the generation; nothing is left to record);
    /// and not for a change of the telemetry bookkeeping alone (`status.telemetry` and the `TelemetryDegraded`
    /// condition) unless it settles the finished report: the rest rides along with the run's next change, so a
    /// collector outage never adds writes.
    pub fn worth_writing(
        &self,
        run: &WorkflowRun,
        planned: &WorkflowRunStatus,
        stored: &WorkflowRunStatus,
        settings: &Settings,
        now: Timestamp,
    ) -> bool {
        if planned == stored {
            return false;
        }
        if !self.on {
            return true;
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

    /// Whether the reconcile of `written` (the copy a reconcile wrote last) would do nothing but look again later,
    /// and when: Some(requeue) holds its echo back, None lets it wake the run. `replay` tells what that reconcile
    /// would do; someone else's change the copy carries (a deletion, a new generation) shows up there too.
    pub fn quiet_after(
        &self,
        written: &WorkflowRun,
        settings: &Settings,
        replay: impl FnOnce() -> Replay,
    ) -> Option<Option<Duration>> {
        if !self.on {
            return None;
        }
        let now = Timestamp::now();
        match replay() {
            Replay::Acts => None,
            Replay::Settled => {
                let delete_at = plan::settled_ttl(written, settings, now);
                (now < delete_at).then(|| Some(plan::until(now, delete_at)))
            }
            Replay::Planned(replayed) => {
                let Replayed { plan, stored, retry_after } = *replayed;
                let idle = match &plan.action {
                    Action::None => true,
                    // Created by this process, not yet in the cache: `act` would skip it.
                    Action::CreateJob { attempt, .. } => self.was_created(
                        &written.namespace().unwrap_or_default(),
                        &job::job_name(&written.name_any(), *attempt),
                    ),
                    Action::DeleteJob { .. } | Action::DeleteRun => false,
                };
                let quiet = idle && !self.worth_writing(written, &plan.status, &stored, settings, now);
                quiet.then(|| [plan.requeue_after, retry_after].into_iter().flatten().min())
            }
        }
    }

    /// How long a run that ends in this reconcile waits for its report before its terminal status is written
    /// (None: the end is written first and the report recorded by a later write).
    pub fn end_export_wait(&self) -> Option<Duration> {
        self.on.then_some(END_EXPORT_WAIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtel_crds::workflow_run::{TelemetryReport, WorkflowRunPhase};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
    use serde_json::json;

    fn owned_job(name: &str, owner_uid: &str) -> Job {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns", "ownerReferences": [
            {"apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun", "name": "r", "uid": owner_uid, "controller": true}
        ]}}))
        .expect("job")
    }

    fn run(deleting: bool) -> WorkflowRun {
        let mut run: WorkflowRun = serde_json::from_value(json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": "u"},
            "spec": {"workflowName": "w", "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}}}
        }))
        .expect("run");
        if deleting {
            run.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        }
        run
    }

    #[test]
    fn a_job_created_here_is_read_until_the_cache_shows_it_then_forgotten() {
        let economy = Economy::new(true);
        economy.created(owned_job("r-1", "u"));
        economy.created(owned_job("r-2", "someone-else"));
        let names = || ["r-1".to_string(), "r-2".to_string()];
        // Not cached yet: read from what the create returned; another run's Job of that name is not this run's.
        let mut jobs = vec![];
        economy.add_uncached(&mut jobs, &run(false), names());
        assert_eq!(jobs.iter().map(|j| j.name_any()).collect::<Vec<_>>(), ["r-1"]);
        // Cached: the cache's copy alone, and the created one forgotten.
        let mut jobs = vec![Arc::new(owned_job("r-1", "u"))];
        economy.add_uncached(&mut jobs, &run(false), names());
        assert_eq!(jobs.len(), 1);
        assert!(!economy.was_created("ns", "r-1"));
        // Off: nothing is remembered, the cache alone answers.
        let off = Economy::new(false);
        off.created(owned_job("r-1", "u"));
        let mut jobs = vec![];
        off.add_uncached(&mut jobs, &run(false), names());
        assert!(jobs.is_empty() && !off.was_created("ns", "r-1"));
    }

    fn status(phase: WorkflowRunPhase, finished: bool) -> WorkflowRunStatus {
        WorkflowRunStatus {
            phase: Some(phase),
            start_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
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
            Timestamp::UNIX_EPOCH,
        );
    }

    fn settings(running_status_delay: i64) -> Settings {
        Settings {
            default_deadline_seconds: 3600,
            default_ttl_seconds: 600,
            running_status_delay: SignedDuration::from_secs(running_status_delay),
        }
    }

    fn writes(run: &WorkflowRun, planned: &WorkflowRunStatus, stored: &WorkflowRunStatus) -> bool {
        Economy::new(true).worth_writing(run, planned, stored, &settings(0), Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn an_attempts_start_alone_waits_the_delay_and_goes_with_anything_else() {
        let r = run(false);
        let on = Economy::new(true);
        let at = |s: i64| Timestamp::from_second(s).expect("t");
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
        assert!(!on.worth_writing(&r, &first, &none, &settings(3), at(12)), "within the delay");
        assert!(on.worth_writing(&r, &first, &none, &settings(3), at(13)), "the delay is over");
        assert!(on.worth_writing(&r, &first, &none, &settings(0), at(10)), "no delay: before the Job");
        // The next attempt after a recorded failure waits the same way; an end recorded with it does not.
        let retrying =
            WorkflowRunStatus { attempts: vec![attempt(1, true)], ..status(WorkflowRunPhase::Retrying, false) };
        let second = WorkflowRunStatus {
            attempts: vec![attempt(1, true), attempt(2, false)],
            ..status(WorkflowRunPhase::Running, false)
        };
        assert!(!on.worth_writing(&r, &second, &retrying, &settings(3), at(21)));
        assert!(on.worth_writing(&r, &second, &first, &settings(3), at(21)), "attempt 1's end goes at once");
        let ended = WorkflowRunStatus { attempts: vec![attempt(1, true)], ..status(WorkflowRunPhase::Failed, false) };
        assert!(on.worth_writing(&r, &ended, &none, &settings(3), at(11)), "an end goes at once");
        // Off: every change is written at once, and the planner is told there is no delay.
        let off = Economy::new(false);
        assert!(off.worth_writing(&r, &first, &none, &settings(3), at(10)));
        assert!(!off.worth_writing(&r, &first, &first, &settings(3), at(10)), "no change, no write");
        assert_eq!(off.settings(settings(3)).running_status_delay, SignedDuration::ZERO);
    }

    #[test]
    fn telemetry_bookkeeping_alone_waits_for_the_next_change_of_a_running_run() {
        let r = run(false);
        let stored = status(WorkflowRunPhase::Running, false);
        assert!(!writes(&r, &stored, &stored));
        let mut planned = stored.clone();
        degraded(&mut planned, "ExportFailed");
        assert!(!writes(&r, &planned, &stored), "a degraded flip alone rides along");
        assert!(Economy::new(false).worth_writing(&r, &planned, &stored, &settings(0), Timestamp::UNIX_EPOCH));
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
        assert!(!writes(&run(true), &exported, &exported));
        let mut first = status(WorkflowRunPhase::Running, false);
        degraded(&mut first, "NoOtlpEndpoint");
        assert!(writes(&r, &first, &WorkflowRunStatus::default()), "the first write always goes");
    }

    #[test]
    fn off_every_echo_wakes_its_run() {
        let off = Economy::new(false);
        let r = Arc::new(run(false));
        assert!(off.quiet_after(&r, &settings(0), || Replay::Settled).is_none());
        assert!(off.reconciling(&r).is_none());
        assert!(off.passes_run_event(&Ok(watcher::Event::Apply(run(false)))));
        assert!(off.end_export_wait().is_none() && Economy::new(true).end_export_wait().is_some());
    }
}
