//! The desired Job of one attempt: a pure function of the run, the attempt number and the telemetry target.

use std::collections::BTreeMap;

use flowtel_crds::WorkflowRun;
use k8s_openapi::api::batch::v1::{
    Job, JobSpec, PodFailurePolicy, PodFailurePolicyOnPodConditionsPattern, PodFailurePolicyRule,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use super::env::{Injection, inject};
use crate::runtime::shards::SHARD_LABEL;
use crate::runtime::{ids, names};

pub use crate::runtime::{MANAGED_BY, MANAGED_BY_LABEL};
pub const WORKFLOW_LABEL: &str = "flowtel.dev/workflow";
pub const RUN_LABEL: &str = "flowtel.dev/run";
pub const ATTEMPT_LABEL: &str = "flowtel.dev/attempt";
/// Annotation on attempt pods naming their run (the run label may be shortened), to map pod events to the run.
pub const RUN_NAME_ANNOTATION: &str = "flowtel.dev/run-name";
/// Annotation on an attempt's Job: when the attempt started (RFC 3339, milliseconds). Status may record the attempt
/// only after its Job exists (`plan::unrecorded_start`); the attempt is then taken from the Job with this time.
pub const STARTED_AT_ANNOTATION: &str = "flowtel.dev/started-at";
/// The Job condition reason the pod failure policy below gives a disrupted attempt.
pub const DISRUPTED_JOB_REASON: &str = "PodFailurePolicy";

/// Errors building an attempt's Job.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BuildError {
    #[error("the WorkflowRun has no {0} yet")]
    MissingMetadata(&'static str),
}

/// Where the workload sends its telemetry.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpTarget {
    pub endpoint: Option<String>,
    pub protocol: String,
}

/// `name` when it fits in 63 characters (a label value and a Job name, whose pods' labels repeat it), else a
/// prefix and a hash of the whole, so distinct long names stay distinct.
pub fn shorten(name: &str) -> String {
    names::shorten(name, 63)
}

/// The deterministic Job name of an attempt: `<run>-<attempt>`, shortened when longer than 63 characters.
pub fn job_name(run_name: &str, attempt: i32) -> String {
    shorten(&format!("{run_name}-{attempt}"))
}

/// Labels on an attempt's Job and its pods; the run's shard label, as it is, so the shard that owns the run
/// watches them too.
pub fn labels(run: &WorkflowRun, attempt: i32) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (WORKFLOW_LABEL.to_string(), run.spec.workflow_name.clone()),
        (RUN_LABEL.to_string(), shorten(&run.name_any())),
        (ATTEMPT_LABEL.to_string(), attempt.to_string()),
    ]);
    if let Some(shard) = run.labels().get(SHARD_LABEL) {
        labels.insert(SHARD_LABEL.to_string(), shard.clone());
    }
    labels
}

/// `service.version`: the template's `app.kubernetes.io/version` label, else the first container's image tag (a
/// pooled run's: its pool's template).
pub fn service_version(template: &k8s_openapi::api::core::v1::PodTemplateSpec) -> String {
    if let Some(v) = template.metadata.as_ref().and_then(|m| m.labels.as_ref()?.get("app.kubernetes.io/version")) {
        return v.clone();
    }
    let image = template.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.clone());
    image
        .and_then(|i| {
            let last = i.rsplit('/').next()?.to_string();
            last.split_once(':').map(|(_, tag)| tag.to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// What attempt `attempt`'s environment is made of (`env.rs` turns it into variables), for a Job or a pooled run.
pub fn injection(
    run: &WorkflowRun,
    attempt: i32,
    target: &OtlpTarget,
    service_version: String,
) -> Result<Injection, BuildError> {
    let uid = run.uid().ok_or(BuildError::MissingMetadata("uid"))?;
    let namespace = run.namespace().ok_or(BuildError::MissingMetadata("namespace"))?;
    Ok(Injection {
        workflow_name: run.spec.workflow_name.clone(),
        service_version,
        traceparent: ids::traceparent(&uid, attempt),
        run_uid: uid,
        attempt,
        namespace,
        job_name: job_name(&run.name_any(), attempt),
        otlp_endpoint: target.endpoint.clone(),
        otlp_protocol: target.protocol.clone(),
    })
}

/// The Job of attempt `attempt` (from 1), started at `started_at`. `deadline_seconds` is what remains of the run's
/// deadline, so the Job controller stops the pod even when the operator is down.
pub fn build_job(
    run: &WorkflowRun,
    attempt: i32,
    started_at: jiff::Timestamp,
    target: &OtlpTarget,
    deadline_seconds: Option<i64>,
) -> Result<Job, BuildError> {
    run.uid().ok_or(BuildError::MissingMetadata("uid"))?;
    let namespace = run.namespace().ok_or(BuildError::MissingMetadata("namespace"))?;
    let owner = run.controller_owner_ref(&()).ok_or(BuildError::MissingMetadata("name or uid"))?;
    let name = job_name(&run.name_any(), attempt);
    let labels = labels(run, attempt);
    let injection = injection(run, attempt, target, service_version(&run.spec.template))?;

    let mut template = k8s_openapi::api::core::v1::PodTemplateSpec::clone(&run.spec.template);
    let meta = template.metadata.get_or_insert_with(Default::default);
    meta.labels.get_or_insert_with(Default::default).extend(labels.clone());
    meta.annotations.get_or_insert_with(Default::default).insert(RUN_NAME_ANNOTATION.into(), run.name_any());
    let pod = template.spec.get_or_insert_with(Default::default);
    // flowtel owns retries: a restarted container would hide the exit code that classifies the attempt.
    pod.restart_policy = Some("Never".into());
    for c in pod.init_containers.iter_mut().flatten().chain(pod.containers.iter_mut()) {
        c.env = Some(inject(c.env.as_deref().unwrap_or_default(), &injection));
    }

    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(STARTED_AT_ANNOTATION.to_string(), started_at.to_string())])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: deadline_seconds.map(|s| s.max(1)),
            // The Job keeps the fact that its pod was disrupted: an evicted pod may be gone before the operator
            // (down, restarting) reads its DisruptionTarget condition.
            pod_failure_policy: Some(PodFailurePolicy {
                rules: vec![PodFailurePolicyRule {
                    action: "FailJob".into(),
                    on_pod_conditions: Some(vec![PodFailurePolicyOnPodConditionsPattern {
                        type_: "DisruptionTarget".into(),
                        status: Some("True".into()),
                    }]),
                    on_exit_codes: None,
                }],
            }),
            template,
            ..Default::default()
        }),
        status: None,
    })
}

/// The attempt a Job or pod belongs to, from its label.
pub fn attempt_of(meta: &ObjectMeta) -> Option<i32> {
    meta.labels.as_ref()?.get(ATTEMPT_LABEL)?.parse().ok()
}

/// When the Job's attempt started: its annotation, else (a Job from before it) its creation.
pub fn started_at(job: &Job) -> Option<jiff::Timestamp> {
    let annotated = job.annotations().get(STARTED_AT_ANNOTATION).and_then(|t| t.parse().ok());
    annotated.or_else(|| job.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// The WorkflowRun controlling `job`, if any.
pub fn owning_run(job: &Job) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    job.owner_references().iter().find(|o| o.kind == "WorkflowRun" && o.controller == Some(true))
}

/// Whether `job` is controlled by the run with `run_uid` (the only Jobs flowtel adopts).
pub fn is_controlled_by(job: &Job, run_uid: &str) -> bool {
    job.owner_references().iter().any(|o| o.controller == Some(true) && o.uid == run_uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_run() -> WorkflowRun {
        let mut run: WorkflowRun = serde_json::from_value(serde_json::json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": "nightly-sync", "namespace": "data", "uid": "0d4a3b0e-8f8e-4d0a-9b1c-6e2f3a4b5c6d"},
            "spec": {
                "workflowName": "sync",
                "template": {
                    "metadata": {"labels": {"app": "sync"}},
                    "spec": {"containers": [
                        {"name": "main", "image": "registry.example/sync:1.4.2",
                         "env": [{"name": "MODE", "value": "full"},
                                 {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "team=data"}]},
                        {"name": "uploader", "image": "registry.example/uploader:2.0",
                         "env": [{"name": "OTEL_SERVICE_NAME", "value": "uploader"}]}
                    ]}
                }
            }
        }))
        .expect("valid sample");
        run.status = None;
        run
    }

    fn started() -> jiff::Timestamp {
        "2026-11-30T16:00:00.125Z".parse().expect("timestamp")
    }

    #[test]
    fn the_attempts_start_is_read_back_from_its_job() {
        let target = OtlpTarget { endpoint: None, protocol: "grpc".into() };
        let mut job = build_job(&sample_run(), 1, started(), &target, None).expect("job builds");
        assert_eq!(started_at(&job), Some(started()));
        job.annotations_mut().clear();
        assert_eq!(started_at(&job), None);
        let created = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-11-30T16:00:01Z".parse().expect("t"));
        job.metadata.creation_timestamp = Some(created.clone());
        assert_eq!(started_at(&job), Some(created.0), "a Job without the annotation: its creation");
    }

    #[test]
    fn long_names_are_shortened_with_a_hash() {
        assert_eq!(job_name("run", 2), "run-2");
        let long = "a".repeat(70);
        let a = job_name(&long, 1);
        let b = job_name(&long, 2);
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
    }

    /// Golden file (insta: a drift fails with a diff and leaves `testdata/job-attempt-2.snap.new`; `cargo insta
    /// review`, or `INSTA_UPDATE=always`, accepts it).
    #[test]
    fn job_of_attempt_two_matches_golden() {
        let target =
            OtlpTarget { endpoint: Some("http://otel-collector.telemetry:4317".into()), protocol: "grpc".into() };
        let job = build_job(&sample_run(), 2, started(), &target, Some(540)).expect("job builds");
        let yaml = serde_yaml_ng::to_string(&job).expect("yaml");
        insta::with_settings!({snapshot_path => "testdata", prepend_module_to_snapshot => false, omit_expression => true}, {
            insta::assert_snapshot!("job-attempt-2", yaml);
        });
    }

    #[test]
    fn the_runs_shard_label_goes_on_its_job_and_pods_as_it_is() {
        let target = OtlpTarget { endpoint: None, protocol: "grpc".into() };
        let unsharded = build_job(&sample_run(), 1, started(), &target, None).expect("job builds");
        assert!(!unsharded.labels().contains_key(SHARD_LABEL));
        let mut run = sample_run();
        run.labels_mut().insert(SHARD_LABEL.into(), "3".into());
        let job = build_job(&run, 1, started(), &target, None).expect("job builds");
        let pod_labels =
            job.spec.as_ref().and_then(|s| s.template.metadata.as_ref()?.labels.clone()).unwrap_or_default();
        assert_eq!(job.labels().get(SHARD_LABEL).map(String::as_str), Some("3"));
        assert_eq!(pod_labels.get(SHARD_LABEL).map(String::as_str), Some("3"));
    }

    #[test]
    fn version_comes_from_the_image_tag() {
        assert_eq!(service_version(&sample_run().spec.template), "1.4.2");
    }
}
