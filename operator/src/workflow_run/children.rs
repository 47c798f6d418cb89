//! The read step's view of a run's children: its Jobs and pods from the caches (through the run index), and, for an
//! attempt stuck without a pod, why the job controller could not create one.

use std::sync::Arc;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunStatus;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::ObjectRef;

use super::context::Context;
use super::{job, plan};

/// The run's Jobs and pods, from the caches through the run index.
pub fn read_children(run: &WorkflowRun, ctx: &Context) -> (Vec<Arc<Job>>, Vec<Arc<Pod>>) {
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
    // The last recorded attempt's Job and the next one's, created here and not cached yet (the economy): with
    // `running_status_delay` a Job exists before status names its attempt, and a run cancelled before the cache
    // shows the Job would otherwise end as never started, its Job left running (found by `e2e/chaos`).
    let recorded = run.status.as_ref().map_or(0, |s| i32::try_from(s.attempts.len()).unwrap_or(i32::MAX));
    let names = (recorded.max(1)..=recorded.saturating_add(1)).map(|attempt| job::job_name(&name, attempt));
    ctx.economy.add_uncached(&mut jobs, run, names);
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

/// Why the open attempt's Job has no pod, once it has had none for the grace: the job controller's latest
/// `FailedCreate` Event about it. This list is the reconcile's one uncached read, and only a stuck run makes it
/// (instead of a dry-run pod create per attempt, which would cost every run a request and the operator the right
/// to create pods).
pub async fn pod_creation_failure(
    run: &WorkflowRun,
    ctx: &Context,
    stored: &WorkflowRunStatus,
    jobs: &[Arc<Job>],
    pods: &[Arc<Pod>],
) -> Result<Option<plan::PodCreationFailure>, kube::Error> {
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
