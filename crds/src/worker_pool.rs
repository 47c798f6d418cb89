//! `WorkerPool`: warm worker pods of one workflow image that execute pooled WorkflowRuns, one process per run.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Warm workers of one workflow image. A WorkflowRun that names the pool (`spec.pool`) is executed by one of them
/// as a fresh process of the pool's command, with the environment its Job would have had, instead of a Job and a
/// pod of its own: a run then costs the apiserver its create and its status writes only.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flowtel.dev",
    version = "v1alpha1",
    kind = "WorkerPool",
    plural = "workerpools",
    doc = "Warm worker pods of one workflow image that execute pooled WorkflowRuns, one process per run.",
    shortname = "wp",
    category = "flowtel",
    namespaced,
    status = "WorkerPoolStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Workers","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self.replicas.max >= self.replicas.min")
    .message("replicas.max must be at least replicas.min").field_path(".replicas.max").reason(Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolSpec {
    /// The workers' pod. Its first container's image runs the runs, and its `command` (required) with its `args`
    /// is the one program a worker executes for each run. flowtel adds its agent (copied in by an init container)
    /// in front of that command. The ServiceAccount, resources and security context are shared by every run the
    /// pool executes.
    #[x_kube(validation = Rule::new("size(self.spec.containers) > 0 && has(self.spec.containers[0].command) && size(self.spec.containers[0].command) > 0")
        .message("the first container must set command: the program each run executes").field_path(".spec.containers").reason(Reason::FieldValueRequired))]
    pub template: PodTemplateSpec,

    /// Names of the environment variables a run may set (`spec.pool.env` of a WorkflowRun). A run setting any
    /// other is refused before anything runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub allowed_env: Vec<String>,

    /// Whether a run may append arguments (`spec.pool.args`) to the pool's command.
    #[serde(default)]
    pub allow_args: bool,

    /// How many workers run: between `min` and `max`, following queued and running runs.
    #[serde(default)]
    pub replicas: PoolReplicas,
}

/// The pool's size bounds and how fast it shrinks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolReplicas {
    /// Workers kept when idle (0 scales to nothing; the first run then waits for a worker to start).
    #[serde(default = "default_min")]
    #[schemars(range(min = 0, max = 10000))]
    pub min: i32,
    /// Most workers at once.
    #[serde(default = "default_max")]
    #[schemars(range(min = 1, max = 10000))]
    pub max: i32,
    /// Seconds the pool stays larger than its load needs before it shrinks.
    #[serde(default = "default_scale_down_after")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_after_seconds: i32,
}

impl Default for PoolReplicas {
    fn default() -> Self {
        Self { min: default_min(), max: default_max(), scale_down_after_seconds: default_scale_down_after() }
    }
}

fn default_min() -> i32 {
    1
}

fn default_max() -> i32 {
    10
}

fn default_scale_down_after() -> i32 {
    60
}

/// Observed state of a WorkerPool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerPoolStatus {
    /// Workers asked for (the workers' Deployment's replicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Workers whose pods are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Runs waiting for a worker, as last written (at most every 10 s while it changes; the operator's
    /// `flowtel_pool_queue_depth` is live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<i32>,
    /// Workers running a run, as last written (at most every 10 s while it changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub busy: Option<i32>,
    /// How long the oldest waiting run has waited, in seconds, as last written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_queued_seconds: Option<i64>,
    /// Ready: the workers' Deployment is available; Stalled: the pool cannot be built (the message names the field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
