//! `WorkflowRun`: one run of a batch workflow, executed as one Kubernetes Job per attempt.

use std::sync::Arc;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A run of a batch workflow: flowtel launches the pod template as one Kubernetes Job per attempt, injects the
/// OpenTelemetry environment so the workload's spans join the run's trace, retries failed attempts by failure
/// class with backoff, and reports the run as metrics and spans.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flowtel.dev",
    version = "v1alpha1",
    kind = "WorkflowRun",
    plural = "workflowruns",
    doc = "A run of a batch workflow, executed as one Kubernetes Job per attempt with OpenTelemetry injected.",
    shortname = "wfr",
    category = "flowtel",
    namespaced,
    status = "WorkflowRunStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Workflow","type":"string","jsonPath":".spec.workflowName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Succeeded\")].reason"}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".status.attemptCount"}"#,
    printcolumn = r#"{"name":"Started","type":"date","jsonPath":".status.startTime"}"#,
    printcolumn = r#"{"name":"Finished","type":"date","jsonPath":".status.completionTime"}"#,
    printcolumn = r#"{"name":"Duration(ms)","type":"integer","jsonPath":".status.durationMs","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!has(oldSelf.cancel) || !oldSelf.cancel || (has(self.cancel) && self.cancel)")
    .message("cancel can only change from false to true").field_path(".cancel").reason(Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new("has(self.template) != has(self.pool)")
    .message("exactly one of template (a Job per attempt) and pool (a WorkerPool's workers) must be set").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("self.workflowName == oldSelf.workflowName && has(self.template) == has(oldSelf.template) && (!has(self.template) || self.template == oldSelf.template) && has(self.pool) == has(oldSelf.pool) && (!has(self.pool) || self.pool == oldSelf.pool) && self.retry == oldSelf.retry && has(self.telemetryStackRef) == has(oldSelf.telemetryStackRef) && (!has(self.telemetryStackRef) || self.telemetryStackRef == oldSelf.telemetryStackRef) && has(self.activeDeadlineSeconds) == has(oldSelf.activeDeadlineSeconds) && (!has(self.activeDeadlineSeconds) || self.activeDeadlineSeconds == oldSelf.activeDeadlineSeconds)")
    .message("the spec is immutable once the run exists, except cancel (false to true) and ttlSecondsAfterFinished").reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct WorkflowRunSpec {
    /// Name of the workflow this run belongs to. It becomes the `workflow_name` metric label, the
    /// `OTEL_SERVICE_NAME` of the workload and the `flowtel.dev/workflow` label, so it must be a valid label value.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"))]
    pub workflow_name: String,

    /// The pod each attempt runs: a full PodTemplateSpec, so every pod feature stays available. flowtel adds the
    /// OpenTelemetry environment to every container. `restartPolicy` must be `Never` (or unset, which flowtel
    /// sets to `Never`) so that every attempt's exit code stays visible. Exactly one of `template` and `pool`.
    // Shared (`Arc`): the operator's cache points every finished run at one empty template (inline, even an empty
    // template is 1.8 KiB per run).
    #[x_kube(validation = Rule::new("!has(self.spec.restartPolicy) || self.spec.restartPolicy == 'Never'")
        .message("must be Never: flowtel owns retries").field_path(".spec.restartPolicy").reason(Reason::FieldValueInvalid))]
    #[serde(default, skip_serializing_if = "is_unset")]
    pub template: Arc<PodTemplateSpec>,

    /// Run each attempt on a warm worker of a WorkerPool (in this namespace) instead of a Job of its own: a fresh
    /// process of the pool's command, with the environment a Job would have had. Exactly one of `template` and
    /// `pool`. See docs/pooled-execution.md for what a pool's runs share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolRun>,

    /// The TelemetryStack (in this namespace) whose OTLP endpoint the workload and the run's telemetry use.
    /// When unset, the operator's default endpoint applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_stack_ref: Option<TelemetryStackRef>,

    /// How failed attempts are retried.
    #[serde(default)]
    pub retry: RetryPolicy,

    /// Upper bound, in seconds, on the whole run across all its attempts and backoffs. When unset, the operator's
    /// default deadline applies, so a pod that never starts cannot hang a run forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,

    /// Seconds after the run finished (and its telemetry was exported) before it is deleted, with its Jobs. When
    /// unset, the operator's default applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,

    /// Set to true to stop the run: the active Job is deleted and the run ends Failed with reason Cancelled.
    /// It can only change from false to true.
    #[serde(default)]
    pub cancel: bool,
}

/// A template that was not given (a pooled run's): serialized as absent, so the CRD's rules see it absent.
fn is_unset(template: &Arc<PodTemplateSpec>) -> bool {
    **template == PodTemplateSpec::default()
}

/// What a pooled run asks of its WorkerPool: the pool, and what it adds to the pool's command.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolRun {
    /// Name of the WorkerPool, in the run's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Arguments appended to the pool's command; only when the pool sets `allowArgs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub args: Vec<String>,
    /// Environment variables for the run's process; only names the pool lists in `allowedEnv`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<PoolEnvVar>,
}

/// One environment variable of a pooled run: a plain value (a worker resolves no Secret or field references).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct PoolEnvVar {
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// A reference to a TelemetryStack in the run's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryStackRef {
    /// Name of the TelemetryStack.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Retry policy: which failed attempts are retried, how often and after how long.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.transientExitCodes) || self.transientExitCodes.all(c, !(c in self.permanentExitCodes))")
    .message("an exit code cannot be both transient and permanent").field_path(".transientExitCodes").reason(Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// How many times a failed attempt may be retried (retries, not attempts: 2 allows 3 attempts in all).
    #[serde(default = "default_retry_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub limit: i32,

    /// Delay before each retry.
    #[serde(default)]
    pub backoff: Backoff,

    /// Exit codes that mark a failure permanent: never retried.
    #[serde(default)]
    #[schemars(length(max = 64), inner(range(min = 1, max = 255)))]
    pub permanent_exit_codes: Vec<i32>,

    /// When set, the only exit codes that are retried; every other non-zero exit is permanent. When unset, every
    /// non-zero exit not listed in `permanentExitCodes` is transient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(range(min = 1, max = 255)))]
    pub transient_exit_codes: Option<Vec<i32>>,

    /// How many pod disruptions (eviction, node loss: the pod's `DisruptionTarget` condition) are retried
    /// without using the retry budget.
    #[serde(default = "default_disruption_limit")]
    #[schemars(range(min = 0, max = 1000))]
    pub disruption_limit: i32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            limit: default_retry_limit(),
            backoff: Backoff::default(),
            permanent_exit_codes: Vec::new(),
            transient_exit_codes: None,
            disruption_limit: default_disruption_limit(),
        }
    }
}

fn default_retry_limit() -> i32 {
    0
}

fn default_disruption_limit() -> i32 {
    10
}

/// Exponential backoff: retry n waits `min(baseSeconds * factor^(n-1), maxSeconds)`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.maxSeconds >= self.baseSeconds")
    .message("maxSeconds must be at least baseSeconds").field_path(".maxSeconds").reason(Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// Delay before the first retry, in seconds.
    #[serde(default = "default_backoff_base")]
    #[schemars(range(min = 0, max = 86400))]
    pub base_seconds: i32,

    /// Multiplier applied to the delay after each retry.
    #[serde(default = "default_backoff_factor")]
    #[schemars(range(min = 1, max = 10))]
    pub factor: i32,

    /// Longest delay between two attempts, in seconds.
    #[serde(default = "default_backoff_max")]
    #[schemars(range(min = 0, max = 86400))]
    pub max_seconds: i32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base_seconds: default_backoff_base(),
            factor: default_backoff_factor(),
            max_seconds: default_backoff_max(),
        }
    }
}

fn default_backoff_base() -> i32 {
    10
}

fn default_backoff_factor() -> i32 {
    2
}

fn default_backoff_max() -> i32 {
    300
}

/// Observed state of a WorkflowRun.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowRunStatus {
    /// Where the run is: Pending, Running, Retrying (waiting for the next attempt), Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<WorkflowRunPhase>,

    /// The attempts, oldest first; only the most recent ones are kept when there are many.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub attempts: Vec<AttemptStatus>,

    /// How many attempts were started in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub attempt_count: Option<i32>,

    /// How many attempts ended in a transient failure, in all (not only those kept in `attempts`): the retry budget
    /// `spec.retry.limit` is checked against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub transient_failures: Option<i32>,

    /// How many attempts ended in a pod disruption, in all: `spec.retry.disruptionLimit` is checked against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub disruptions: Option<i32>,

    /// When the operator saw the run start (millisecond precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<MicroTime>,

    /// When the operator saw the run end (millisecond precision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<MicroTime>,

    /// completionTime minus startTime, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<i64>,

    /// When the next attempt starts, while the run is Retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<MicroTime>,

    /// The run's trace id (32 hex digits), derived from its UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,

    /// What of the run's telemetry the operator has exported; recorded after each export succeeded, so that an
    /// operator restart never reports a run twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetryReport>,

    /// Conditions by the Kubernetes API conventions: `Succeeded` and `TelemetryDegraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Phase of a WorkflowRun.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkflowRunPhase {
    /// Accepted; no attempt has started yet.
    Pending,
    /// An attempt is running.
    Running,
    /// An attempt failed and the next one waits for its backoff.
    Retrying,
    /// An attempt succeeded.
    Succeeded,
    /// The run ended without success (permanent failure, retries exhausted, deadline, or cancelled).
    Failed,
}

/// One attempt: one Kubernetes Job.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptStatus {
    /// Attempt number, from 1.
    pub number: i32,
    /// Name of the attempt's Job.
    pub job_name: String,
    /// Name of the attempt's pod, once it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// When the attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<MicroTime>,
    /// When the attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<MicroTime>,
    /// Exit code of the first container that exited non-zero (0 on success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The container that exited non-zero first, which decided the attempt's classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Why the attempt ended, CamelCase (for example Completed, Error, DisruptionTarget, DeadlineExceeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How the outcome was classified for retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classification: Option<AttemptClassification>,
}

/// How a finished attempt counts for retries.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AttemptClassification {
    /// The attempt succeeded.
    Succeeded,
    /// A failure worth retrying; uses the retry budget.
    Transient,
    /// A failure that is never retried.
    Permanent,
    /// The pod was disrupted (evicted, node lost); retried without using the retry budget.
    Disruption,
}

/// Progress of the run's own telemetry export (metrics and spans from the operator).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryReport {
    /// `workflow.run.total` was exported for this run.
    #[serde(default)]
    pub started: bool,
    /// The terminal metrics and the run's spans were exported (or dropped, see `dropped`).
    #[serde(default)]
    pub finished: bool,
    /// Some of the run's telemetry (its start or its end) could not be exported before the export timeout and was
    /// dropped (and counted on the operator's `/metrics`).
    #[serde(default)]
    pub dropped: bool,
}
