//! One typed WorkflowRun builder, on `flowtel_crds`' own types, for the tests, the bench and the chaos run: a run of
//! one `main` container whose pod KWOK plays out as its `sim.flowtel.dev/*` annotations say.

use std::collections::BTreeMap;
use std::sync::Arc;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::{RetryPolicy, TelemetryStackRef, WorkflowRunSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// KWOK's simulated pod: how long it runs, how it ends and with which exit code (`e2e/kwok-stages.yaml`).
pub const SIM_DURATION: &str = "sim.flowtel.dev/duration";
pub const SIM_OUTCOME: &str = "sim.flowtel.dev/outcome";
pub const SIM_EXIT_CODE: &str = "sim.flowtel.dev/exit-code";

/// A WorkflowRun being built; `build` gives it typed, `json` as the apiserver takes it.
#[derive(Clone, Debug)]
pub struct RunBuilder {
    name: String,
    spec: WorkflowRunSpec,
    template: PodTemplateSpec,
}

impl RunBuilder {
    /// A run `name` of `workflow`: one container `main` of a placeholder image, nothing else set.
    pub fn new(name: &str, workflow: &str) -> Self {
        let template = PodTemplateSpec {
            metadata: Some(ObjectMeta::default()),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "main".into(),
                    image: Some("registry.example/app:1.0".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
        };
        let spec = WorkflowRunSpec {
            workflow_name: workflow.into(),
            template: Arc::default(),
            telemetry_stack_ref: None,
            retry: RetryPolicy::default(),
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            pool: None,
            cancel: false,
        };
        Self { name: name.into(), spec, template }
    }

    pub fn image(mut self, image: &str) -> Self {
        if let Some(c) = self.template.spec.as_mut().and_then(|s| s.containers.first_mut()) {
            c.image = Some(image.into());
        }
        self
    }

    /// How long KWOK lets the pod run (`1s`, `1h`).
    pub fn runs_for(self, duration: &str) -> Self {
        self.annotation(SIM_DURATION, duration)
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        let meta = self.template.metadata.get_or_insert_with(ObjectMeta::default);
        meta.annotations.get_or_insert_with(BTreeMap::new).insert(key.into(), value.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        let meta = self.template.metadata.get_or_insert_with(ObjectMeta::default);
        meta.labels.get_or_insert_with(BTreeMap::new).insert(key.into(), value.into());
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.spec.retry = retry;
        self
    }

    pub fn deadline_seconds(mut self, seconds: i64) -> Self {
        self.spec.active_deadline_seconds = Some(seconds);
        self
    }

    pub fn ttl_seconds(mut self, seconds: i32) -> Self {
        self.spec.ttl_seconds_after_finished = Some(seconds);
        self
    }

    pub fn stack(mut self, name: &str) -> Self {
        self.spec.telemetry_stack_ref = Some(TelemetryStackRef { name: name.into() });
        self
    }

    /// Executed by a worker of WorkerPool `pool` with `args` after its command, instead of a Job of the template.
    pub fn pool(mut self, pool: &str, args: &[&str]) -> Self {
        let args = args.iter().map(|a| (*a).to_string()).collect();
        self.spec.pool = Some(flowtel_crds::workflow_run::PoolRun { name: pool.into(), args, env: vec![] });
        self
    }

    pub fn build(self) -> WorkflowRun {
        let mut spec = self.spec;
        if spec.pool.is_none() {
            spec.template = Arc::new(self.template);
        }
        WorkflowRun::new(&self.name, spec)
    }

    /// The run as JSON, for a test that sends it as it is or changes it first.
    pub fn json(self) -> serde_json::Value {
        serde_json::to_value(self.build()).expect("a WorkflowRun serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_run_is_what_the_crd_takes() {
        let run = RunBuilder::new("r", "sync")
            .runs_for("1s")
            .label(SIM_OUTCOME, "fail")
            .retry(RetryPolicy { limit: 2, permanent_exit_codes: vec![42], ..RetryPolicy::default() })
            .deadline_seconds(5)
            .json();
        assert_eq!(run["apiVersion"], "flowtel.dev/v1alpha1");
        assert_eq!(run["kind"], "WorkflowRun");
        assert_eq!(run["metadata"]["name"], "r");
        assert_eq!(run["spec"]["workflowName"], "sync");
        assert_eq!(run["spec"]["template"]["metadata"]["annotations"][SIM_DURATION], "1s");
        assert_eq!(run["spec"]["template"]["metadata"]["labels"][SIM_OUTCOME], "fail");
        assert_eq!(run["spec"]["template"]["spec"]["containers"][0]["image"], "registry.example/app:1.0");
        assert_eq!(run["spec"]["retry"]["permanentExitCodes"], serde_json::json!([42]));
        assert_eq!(run["spec"]["activeDeadlineSeconds"], 5);
    }
}
