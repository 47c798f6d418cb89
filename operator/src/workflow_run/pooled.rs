//! A pooled run's attempt (`spec.pool`): instead of a Job, an assignment to a worker of its WorkerPool, with the
//! environment the Job's container would have had (`env.rs`, the same function). The planner reads a pooled
//! attempt exactly as a Job's: what the dispatcher knows of it is shown to it as the Job and the ended pod the
//! attempt stands for (never written anywhere), so retries, exit-code classes, disruptions, deadlines and cancels
//! follow the same rules in both modes.

use std::collections::BTreeMap;
use std::sync::Arc;

use flowtel_crds::workflow_run::WorkflowRunStatus;
use flowtel_crds::{WorkerPool, WorkflowRun};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, EnvVar, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::context::Context;
use super::env::inject;
use super::job::{self, BuildError, DISRUPTED_JOB_REASON, OtlpTarget, RUN_NAME_ANNOTATION, STARTED_AT_ANNOTATION};
use super::plan::reason;
use crate::pool::dispatch::{AttemptState, Dispatched, Ending};
use crate::pool::protocol::{Assignment, RunName};

/// Why a pooled attempt was refused before anything ran (reason, message naming the field).
pub type Refusal = (&'static str, String);

/// The key of an attempt in the dispatcher: `<namespace>/<job name>`.
pub fn attempt_key(run: &WorkflowRun, attempt: i32) -> String {
    format!("{}/{}", run.namespace().unwrap_or_default(), job::job_name(&run.name_any(), attempt))
}

/// The run's pool from the cache, or why the run cannot use it.
pub fn pool_for(run: &WorkflowRun, ctx: &Context) -> Result<Arc<WorkerPool>, Refusal> {
    let Some(wanted) = &run.spec.pool else {
        return Err((reason::POOL_NOT_FOUND, "spec.pool: the run names no pool".into()));
    };
    let key = ObjectRef::<WorkerPool>::new(&wanted.name).within(&run.namespace().unwrap_or_default());
    let pool = ctx.pools.get(&key).ok_or_else(|| {
        (
            reason::POOL_NOT_FOUND,
            format!("spec.pool.name: WorkerPool {:?} does not exist in this namespace", wanted.name),
        )
    })?;
    check(run, &pool)?;
    Ok(pool)
}

/// What the run adds to the pool's command must be what the pool allows.
pub fn check(run: &WorkflowRun, pool: &WorkerPool) -> Result<(), Refusal> {
    let Some(wanted) = &run.spec.pool else { return Ok(()) };
    if !wanted.args.is_empty() && !pool.spec.allow_args {
        let message = format!("spec.pool.args: WorkerPool {:?} does not allow arguments (allowArgs)", pool.name_any());
        return Err((reason::NOT_ALLOWED_BY_POOL, message));
    }
    for (i, var) in wanted.env.iter().enumerate() {
        if !pool.spec.allowed_env.contains(&var.name) {
            let message = format!(
                "spec.pool.env[{i}].name: {:?} is not in WorkerPool {:?}'s allowedEnv",
                var.name,
                pool.name_any()
            );
            return Err((reason::NOT_ALLOWED_BY_POOL, message));
        }
    }
    Ok(())
}

/// The assignment of attempt `attempt`: the pool's command with the run's arguments, and the environment a Job's
/// container would have had (the run's variables, then flowtel's, by `env::inject`).
pub fn build_assignment(
    run: &WorkflowRun,
    pool: &WorkerPool,
    attempt: i32,
    target: &OtlpTarget,
    deadline_seconds: i64,
) -> Result<Assignment, BuildError> {
    let injection = job::injection(run, attempt, target, job::service_version(&pool.spec.template))?;
    let wanted = run.spec.pool.clone().unwrap_or_else(|| flowtel_crds::workflow_run::PoolRun {
        name: pool.name_any(),
        args: vec![],
        env: vec![],
    });
    let main = pool.spec.template.spec.as_ref().and_then(|s| s.containers.first());
    let mut argv: Vec<String> = main.and_then(|c| c.command.clone()).unwrap_or_default();
    argv.extend(main.and_then(|c| c.args.clone()).unwrap_or_default());
    argv.extend(wanted.args.iter().cloned());
    let user_env: Vec<EnvVar> = wanted
        .env
        .iter()
        .map(|v| EnvVar { name: v.name.clone(), value: Some(v.value.clone()), value_from: None })
        .collect();
    Ok(Assignment {
        key: attempt_key(run, attempt),
        run: RunName { namespace: injection.namespace.clone(), name: run.name_any() },
        argv,
        env: inject(&user_env, &injection),
        deadline_seconds: deadline_seconds.max(1),
    })
}

/// What the dispatcher knows of the run's recorded attempts and the next one, as the Jobs and ended pods the
/// planner reads.
pub fn observe(run: &WorkflowRun, ctx: &Context) -> (Vec<Arc<Job>>, Vec<Arc<Pod>>) {
    let Some(dispatcher) = ctx.dispatcher.as_ref() else { return (vec![], vec![]) };
    let attempts = run.status.as_ref().map(|s| s.attempts.as_slice()).unwrap_or_default();
    let recorded = attempts.last().map_or(0, |a| a.number);
    // Only a run its pool admits can have been handed out (else it ends refused, as it would have then).
    if dispatcher.is_young() && pool_for(run, ctx).is_ok() {
        may_run_elsewhere(run, dispatcher);
    }
    let (mut jobs, mut pods) = (Vec::new(), Vec::new());
    for number in recorded.max(1)..=recorded.saturating_add(1) {
        let Some(state) = dispatcher.state(&attempt_key(run, number)).filter(|s| *s != AttemptState::Stopped) else {
            continue;
        };
        // Unrecorded yet (`running_status_delay`), its start is the dispatcher's, as a Job's would be the Job's.
        let started = attempts
            .iter()
            .find(|a| a.number == number)
            .and_then(|a| a.start_time.as_ref())
            .map(|t| t.0)
            .or_else(|| dispatcher.started_at(&attempt_key(run, number)));
        let (job, pod) = as_job_and_pod(run, number, &state, started);
        jobs.push(Arc::new(job));
        pods.extend(pod.map(Arc::new));
    }
    (jobs, pods)
}

/// A new leader has not heard yet of the run's next attempt, which its predecessor may have handed out before the
/// start was written: it stands as unclaimed until a worker reports it or the fence passes (`Dispatcher::
/// may_run_elsewhere`), so this run's reconcile neither starts it again nor ends the run without it.
fn may_run_elsewhere(run: &WorkflowRun, dispatcher: &crate::pool::dispatch::Dispatcher) {
    let Some(wanted) = &run.spec.pool else { return };
    let status = run.status.clone().unwrap_or_default();
    if super::plan::is_terminal(&status)
        || status.next_attempt_time.as_ref().is_some_and(|t| t.0 > jiff::Timestamp::now())
    {
        return;
    }
    let next = match status.attempts.last() {
        None => 1,
        Some(last) if last.end_time.is_some() => last.number.saturating_add(1),
        // Recorded: `dispatch` knows what to do with it.
        Some(_) => return,
    };
    let namespace = run.namespace().unwrap_or_default();
    let name = RunName { namespace: namespace.clone(), name: run.name_any() };
    let uid = run.uid().unwrap_or_default();
    dispatcher.may_run_elsewhere(&format!("{namespace}/{}", wanted.name), &attempt_key(run, next), name, &uid);
}

/// The Job (and, once the attempt ended, the pod) that a pooled attempt stands for.
pub fn as_job_and_pod(
    run: &WorkflowRun,
    attempt: i32,
    state: &AttemptState,
    started: Option<jiff::Timestamp>,
) -> (Job, Option<Pod>) {
    let name = job::job_name(&run.name_any(), attempt);
    let labels = job::labels(run, attempt);
    let started = started.unwrap_or_else(jiff::Timestamp::now);
    let meta = |name: String| ObjectMeta {
        name: Some(name),
        namespace: run.namespace(),
        labels: Some(labels.clone()),
        annotations: Some(BTreeMap::from([
            (STARTED_AT_ANNOTATION.to_string(), started.to_string()),
            (RUN_NAME_ANNOTATION.to_string(), run.name_any()),
        ])),
        owner_references: run.controller_owner_ref(&()).map(|o| vec![o]),
        creation_timestamp: Some(Time(started)),
        ..Default::default()
    };
    let mut status = JobStatus { start_time: Some(Time(started)), active: Some(1), ..Default::default() };
    let Some(ending) = (match state {
        AttemptState::Ended(e) => Some(e),
        _ => None,
    }) else {
        return (Job { metadata: meta(name), spec: None, status: Some(status) }, None);
    };
    let at = Time(ending.finished_at);
    let condition = |type_: &str, reason: &str| JobCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        last_transition_time: Some(at.clone()),
        ..Default::default()
    };
    let succeeded = !ending.disrupted && ending.exit_code == Some(0);
    status.active = None;
    status.conditions = Some(if succeeded {
        vec![condition("Complete", "Completed")]
    } else if ending.disrupted {
        vec![condition("Failed", DISRUPTED_JOB_REASON)]
    } else if ending.reason == reason::DEADLINE_EXCEEDED {
        vec![condition("Failed", reason::DEADLINE_EXCEEDED)]
    } else {
        vec![condition("Failed", "BackoffLimitExceeded")]
    });
    let pod =
        ended_pod(meta(ending.worker.clone().unwrap_or_else(|| format!("{name}-lost"))), &name, ending, succeeded);
    (Job { metadata: meta(name), spec: None, status: Some(status) }, Some(pod))
}

/// The ended pod of a pooled attempt: named by its worker, owned by the attempt's Job (as the planner pairs them),
/// its container's end the process's.
fn ended_pod(mut metadata: ObjectMeta, job_name: &str, ending: &Ending, succeeded: bool) -> Pod {
    metadata.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "batch/v1".into(),
        kind: "Job".into(),
        name: job_name.into(),
        uid: String::new(),
        controller: Some(true),
        ..Default::default()
    }]);
    let terminated = ContainerStateTerminated {
        exit_code: ending.exit_code.unwrap_or(137),
        reason: Some(ending.reason.clone()),
        finished_at: Some(Time(ending.finished_at)),
        ..Default::default()
    };
    let conditions = ending.disrupted.then(|| {
        vec![PodCondition {
            type_: "DisruptionTarget".into(),
            status: "True".into(),
            reason: Some(ending.reason.clone()),
            ..Default::default()
        }]
    });
    Pod {
        metadata,
        spec: None,
        status: Some(PodStatus {
            phase: Some(if succeeded { "Succeeded" } else { "Failed" }.into()),
            conditions,
            container_statuses: Some(vec![ContainerStatus {
                name: "main".into(),
                state: Some(ContainerState { terminated: Some(terminated), ..Default::default() }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// The run's pool for a dispatch: from the cache, or, when the cache does not hold it, from the apiserver (a pool
/// applied together with its runs may reach the cache after them; only a pool the apiserver lacks is refused).
pub async fn pool_for_dispatch(
    run: &WorkflowRun,
    ctx: &Context,
) -> Result<Result<Arc<WorkerPool>, Refusal>, kube::Error> {
    let cached = pool_for(run, ctx);
    let Err((reason::POOL_NOT_FOUND, _)) = &cached else { return Ok(cached) };
    let Some(wanted) = &run.spec.pool else { return Ok(cached) };
    let pools: kube::Api<WorkerPool> = kube::Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let Some(pool) = pools.get_opt(&wanted.name).await? else { return Ok(cached) };
    Ok(check(run, &pool).map(|()| Arc::new(pool)))
}

/// Hands attempt `attempt`, started at `started_at`, to `pool` (the run's, or why it cannot have it), or says why it
/// cannot run.
pub fn dispatch(
    run: &WorkflowRun,
    ctx: &Context,
    pool: Result<Arc<WorkerPool>, Refusal>,
    attempt: i32,
    started_at: jiff::Timestamp,
    target: &OtlpTarget,
    deadline_seconds: i64,
) -> Result<Result<(), Refusal>, BuildError> {
    let Some(dispatcher) = ctx.dispatcher.as_ref() else {
        let message = "spec.pool: this operator runs no dispatcher (start it with --dispatch-addr)".to_string();
        return Ok(Err((reason::POOLING_DISABLED, message)));
    };
    let pool = match pool {
        Ok(pool) => pool,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let assignment = build_assignment(run, &pool, attempt, target, deadline_seconds)?;
    let recorded = run.status.as_ref().is_some_and(|s| s.attempts.iter().any(|a| a.number == attempt));
    let run_uid = run.uid().unwrap_or_default();
    let pool_key = format!("{}/{}", pool.namespace().unwrap_or_default(), pool.name_any());
    dispatcher.dispatch(&pool_key, assignment, Dispatched { started_at, recorded, run_uid });
    Ok(Ok(()))
}

/// The run is over or going: nothing of it may go on running on a worker (an attempt adopted by a new leader after
/// its predecessor recorded the end, the kill lost with it), and every end of it is recorded. A Job of a deleted run
/// goes with it by owner reference.
pub fn stop_if_over(run: &WorkflowRun, ctx: &Context) {
    let over = run.status.as_ref().is_some_and(super::plan::is_terminal) || run.meta().deletion_timestamp.is_some();
    if let (Some(dispatcher), true, true) = (ctx.dispatcher.as_ref(), over, run.spec.pool.is_some()) {
        let name = RunName { namespace: run.namespace().unwrap_or_default(), name: run.name_any() };
        dispatcher.stop_run(&name);
        dispatcher.recorded_run(&name);
    }
}

/// `status` is what the apiserver holds: the ends it records free their workers for new attempts.
pub fn note_recorded(run: &WorkflowRun, ctx: &Context, status: &WorkflowRunStatus) {
    let Some(dispatcher) = ctx.dispatcher.as_ref().filter(|_| run.spec.pool.is_some()) else { return };
    let ended: Vec<String> =
        status.attempts.iter().filter(|a| a.end_time.is_some()).map(|a| attempt_key(run, a.number)).collect();
    if !ended.is_empty() {
        dispatcher.recorded(&ended);
    }
}

/// Stops a pooled attempt (cancel, deadline).
pub fn stop(run: &WorkflowRun, ctx: &Context, job_name: &str) {
    if let Some(dispatcher) = ctx.dispatcher.as_ref() {
        dispatcher.stop(&format!("{}/{job_name}", run.namespace().unwrap_or_default()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtel_crds::workflow_run::AttemptClassification;

    fn run() -> WorkflowRun {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": "r", "namespace": "team", "uid": "0123-uid"},
            "spec": {"workflowName": "sync", "pool": {"name": "p", "args": ["--items=3"], "env": [{"name": "MODE", "value": "fast"}]}}
        }))
        .expect("run")
    }

    fn pool(allowed_env: &[&str], allow_args: bool) -> WorkerPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkerPool",
            "metadata": {"name": "p", "namespace": "team"},
            "spec": {"allowedEnv": allowed_env, "allowArgs": allow_args,
                "template": {"spec": {"containers": [{"name": "main", "image": "reg/sync:1.4", "command": ["/sync"]}]}}}
        }))
        .expect("pool")
    }

    #[test]
    fn a_pooled_attempt_gets_the_jobs_environment_and_the_pools_command() {
        let target = OtlpTarget { endpoint: Some("http://c:4317".into()), protocol: "grpc".into() };
        let a = build_assignment(&run(), &pool(&["MODE"], true), 2, &target, 30).expect("assignment");
        assert_eq!(a.key, "team/r-2");
        assert_eq!(a.argv, ["/sync", "--items=3"]);
        let value = |n: &str| a.env.iter().find(|e| e.name == n).and_then(|e| e.value.clone());
        assert_eq!(value("MODE").as_deref(), Some("fast"));
        assert_eq!(value("OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(), Some("http://c:4317"));
        assert_eq!(value("TRACEPARENT"), Some(crate::runtime::ids::traceparent("0123-uid", 2)));
        let attrs = value("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
        assert!(
            attrs.starts_with("service.version=1.4,workflow.name=sync,workflow.run_id=0123-uid,workflow.attempt=2,")
        );
    }

    #[test]
    fn what_the_pool_does_not_allow_is_refused_naming_the_field() {
        let refused = check(&run(), &pool(&[], true)).expect_err("env refused");
        assert_eq!(refused.0, reason::NOT_ALLOWED_BY_POOL);
        assert!(refused.1.starts_with("spec.pool.env[0].name: \"MODE\""), "{}", refused.1);
        let refused = check(&run(), &pool(&["MODE"], false)).expect_err("args refused");
        assert!(refused.1.starts_with("spec.pool.args:"), "{}", refused.1);
    }

    #[test]
    fn an_ended_process_reads_as_the_jobs_pod_would() {
        let ending = |exit_code, reason: &str, disrupted| {
            AttemptState::Ended(Ending {
                exit_code: Some(exit_code),
                reason: reason.into(),
                disrupted,
                worker: Some("w-1".into()),
                finished_at: jiff::Timestamp::now(),
            })
        };
        let run = run();
        let settings = super::super::plan::Settings {
            default_deadline_seconds: 3600,
            default_ttl_seconds: 60,
            running_status_delay: jiff::SignedDuration::ZERO,
        };
        for (state, expected) in [
            (ending(0, "Completed", false), AttemptClassification::Succeeded),
            (ending(1, "Error", false), AttemptClassification::Transient),
            (ending(143, "Fenced", true), AttemptClassification::Disruption),
        ] {
            let (job, pod) = as_job_and_pod(&run, 1, &state, None);
            let obs = super::super::plan::Observation {
                now: jiff::Timestamp::now(),
                jobs: vec![&job],
                pods: pod.iter().collect(),
                telemetry_degraded: None,
                exports_telemetry: false,
                waiting_for: None,
                pod_creation_failure: None,
            };
            let plan = super::super::plan::plan(&run, &obs, &settings);
            let first = plan.status.attempts.first().expect("attempt");
            assert_eq!(first.classification, Some(expected), "{state:?}");
        }
    }
}
