//! `TelemetryStack`: an OpenTelemetry Collector plus Prometheus, Tempo, Loki and Grafana, wired together.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A telemetry stack: an OpenTelemetry Collector that receives OTLP from workloads and the operator, Prometheus for
/// metrics, Tempo for traces, Loki for logs and Grafana with those as datasources. Defaults follow the
/// user's original telemetry system: memory limiter at 75 %, batches of 1000, traces kept 1h, metrics 30d.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "flowtel.dev",
    version = "v1alpha1",
    kind = "TelemetryStack",
    plural = "telemetrystacks",
    doc = "An OpenTelemetry Collector plus Prometheus, Tempo, Loki and Grafana, deployed and wired together.",
    shortname = "tstack",
    category = "flowtel",
    namespaced,
    status = "TelemetryStackStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"OTLP","type":"string","jsonPath":".status.endpoints.otlpGrpc"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("!self.grafana.enabled || self.prometheus.enabled || has(self.prometheus.externalUrl) || self.tempo.enabled || has(self.tempo.externalUrl) || self.loki.enabled || has(self.loki.externalUrl)")
    .message("grafana is enabled but every datasource (prometheus, tempo, loki) is disabled with no externalUrl").field_path(".grafana.enabled").reason(Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct TelemetryStackSpec {
    /// The OpenTelemetry Collector.
    #[serde(default)]
    pub collector: CollectorSpec,
    /// Prometheus, the metrics backend.
    #[serde(default)]
    pub prometheus: PrometheusSpec,
    /// Tempo, the traces backend.
    #[serde(default)]
    pub tempo: TempoSpec,
    /// Loki, the logs backend.
    #[serde(default)]
    pub loki: LokiSpec,
    /// Grafana, with Prometheus, Tempo and Loki as datasources.
    #[serde(default)]
    pub grafana: GrafanaSpec,
}

/// How the collector is deployed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CollectorMode {
    /// A Deployment behind a Service, scaled by `replicas`.
    #[default]
    Deployment,
    /// One collector per node.
    DaemonSet,
    /// A StatefulSet, for persistent sending queues.
    StatefulSet,
}

/// The OpenTelemetry Collector: OTLP in, memory limiter first, batches out to the backends.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.spikeLimitPercent < self.memoryLimitPercent")
    .message("spikeLimitPercent must be below memoryLimitPercent").field_path(".spikeLimitPercent").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.persistentQueue) || self.mode == 'StatefulSet'")
    .message("persistentQueue needs mode StatefulSet (each replica keeps its queue on its own volume)").field_path(".persistentQueue").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.tailSampling) || (self.mode != 'DaemonSet' && self.replicas <= 1 && (!has(self.autoscaling) || self.autoscaling.maxReplicas <= 1))")
    .message("tailSampling needs a single collector replica: all spans of a trace must meet in one sampler, and the trace-id routing tier (the loadbalancing exporter) does not build at the pinned collector release").field_path(".tailSampling").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.externalEndpoint) || !self.enabled")
    .message("externalEndpoint replaces the deployed collector: set enabled to false").field_path(".externalEndpoint").reason(Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct CollectorSpec {
    /// Whether the collector is deployed.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// An OTLP gRPC endpoint of a collector run elsewhere, used instead of deploying one (with `enabled: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_endpoint: Option<String>,
    /// Collector image.
    #[serde(default = "default_collector_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// How the collector is deployed.
    #[serde(default)]
    pub mode: CollectorMode,
    /// Collector replicas (Deployment and StatefulSet modes) when `autoscaling` is unset.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// A HorizontalPodAutoscaler for the collector (Deployment and StatefulSet modes); `replicas` is then ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// CPU and memory requests and limits of each collector (default: 200m / 256Mi requested, 1Gi limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The memory limiter's limit, as a percentage of the container's memory limit.
    #[serde(default = "default_memory_limit_percent")]
    #[schemars(range(min = 10, max = 95))]
    pub memory_limit_percent: i32,
    /// The memory limiter's spike allowance, as a percentage of the container's memory limit.
    #[serde(default = "default_spike_limit_percent")]
    #[schemars(range(min = 0, max = 90))]
    pub spike_limit_percent: i32,
    /// Items (spans, metric points, log records) per exported batch.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 100000))]
    pub batch_size: i32,
    /// Tail sampling: keep every error trace, every trace slower than a threshold and a percentage of the rest.
    /// Unset: every trace is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_sampling: Option<TailSamplingSpec>,
    /// Metric attributes that would explode the number of series, dropped or hashed before export.
    #[serde(default)]
    pub cardinality_guard: CardinalityGuardSpec,
    /// A persistent sending queue on a volume per replica (mode StatefulSet), so a restarted collector exports what
    /// it had queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_queue: Option<PersistentQueueSpec>,
    /// Collector configuration (YAML) merged over the generated one: maps merge key by key, anything else
    /// replaces. The result is validated like the generated part; an invalid result leaves the running
    /// collector on its last good configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_override: Option<String>,
}

impl Default for CollectorSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            external_endpoint: None,
            image: default_collector_image(),
            mode: CollectorMode::default(),
            replicas: 1,
            autoscaling: None,
            resources: None,
            memory_limit_percent: default_memory_limit_percent(),
            spike_limit_percent: default_spike_limit_percent(),
            batch_size: default_batch_size(),
            tail_sampling: None,
            cardinality_guard: CardinalityGuardSpec::default(),
            persistent_queue: None,
            config_override: None,
        }
    }
}

/// A HorizontalPodAutoscaler for the collector.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas")
    .message("minReplicas must not exceed maxReplicas").field_path(".minReplicas").reason(Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest replicas.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: i32,
    /// Most replicas.
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// Average CPU utilisation the autoscaler aims at, in percent of the request.
    #[serde(default = "default_cpu_target")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_percent: i32,
    /// Average memory utilisation the autoscaler aims at, in percent of the request; unset: CPU only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_memory_percent: Option<i32>,
    /// WorkflowRuns started per second that one replica carries: flowtel raises the minimum to the observed rate
    /// of runs referencing this stack divided by this figure (never above maxReplicas).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub runs_per_second_per_replica: Option<i32>,
}

/// Tail sampling policies.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TailSamplingSpec {
    /// Traces slower than this are always kept, in milliseconds.
    #[serde(default = "default_latency_threshold_ms")]
    #[schemars(range(min = 1, max = 86400000))]
    pub latency_threshold_ms: i64,
    /// Percentage of the other traces (neither failed nor slow) kept.
    #[serde(default = "default_sampled_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: i32,
    /// The sampler decides when a run ends (its `workflow.run` span, which the operator exports last, reached it),
    /// a second later for stragglers; this is how long it waits at most, in seconds, for a trace whose run never
    /// reports (set it above the runs' usual duration).
    #[serde(default = "default_decision_wait_seconds")]
    #[schemars(range(min = 1, max = 600))]
    pub decision_wait_seconds: i32,
}

/// What happens to the attributes the guard lists.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CardinalityAction {
    /// The attribute is removed from metric points: the series collapse.
    #[default]
    Drop,
    /// The value is replaced by its SHA-256: series are kept but the raw value never reaches the backend.
    Hash,
}

/// Metric attributes dropped or hashed before export.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CardinalityGuardSpec {
    /// Attribute keys (default: `phone_id`).
    #[serde(default = "default_guarded_attributes")]
    #[schemars(length(max = 64))]
    pub attributes: Vec<String>,
    /// Drop or Hash.
    #[serde(default)]
    pub action: CardinalityAction,
}

impl Default for CardinalityGuardSpec {
    fn default() -> Self {
        Self { attributes: default_guarded_attributes(), action: CardinalityAction::default() }
    }
}

/// The collector's persistent sending queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PersistentQueueSpec {
    /// Size of each replica's queue volume.
    #[serde(default = "default_queue_size")]
    pub size: Quantity,
    /// StorageClass of the volume; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// Persistent storage of a backend.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of the volume claimed per replica (default 10Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// StorageClass of the volume; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// Prometheus, receiving the collector's metrics.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.externalUrl) || !self.enabled")
    .message("externalUrl replaces the deployed backend: set enabled to false").field_path(".externalUrl").reason(Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSpec {
    /// Whether Prometheus is deployed.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Base URL of a Prometheus run elsewhere (with `enabled: false`): the collector writes to its OTLP receiver
    /// and Grafana reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_url: Option<String>,
    /// Prometheus image.
    #[serde(default = "default_prometheus_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Prometheus replicas.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 10))]
    pub replicas: i32,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Storage for the TSDB.
    #[serde(default)]
    pub storage: StorageSpec,
    /// How long metrics are kept (a Prometheus duration such as 30d).
    #[serde(default = "default_metrics_retention")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h|d|w|y)$"))]
    pub retention: String,
    /// Most bytes the TSDB keeps (a Prometheus size such as 50GB); unset: bounded by time only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(B|KB|MB|GB|TB|PB|EB)$"))]
    pub retention_size: Option<String>,
}

impl Default for PrometheusSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            external_url: None,
            image: default_prometheus_image(),
            replicas: 1,
            resources: None,
            storage: StorageSpec::default(),
            retention: default_metrics_retention(),
            retention_size: None,
        }
    }
}

/// Tempo, receiving the collector's traces.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.externalUrl) || !self.enabled")
    .message("externalUrl replaces the deployed backend: set enabled to false").field_path(".externalUrl").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("has(self.externalUrl) || (!has(self.externalApi) && !has(self.externalQueryUrl))")
    .message("externalApi and externalQueryUrl describe an external backend: set externalUrl").field_path(".externalUrl").reason(Reason::FieldValueRequired))]
#[serde(rename_all = "camelCase")]
pub struct TempoSpec {
    /// Whether Tempo is deployed.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Base URL of a trace backend run elsewhere (with `enabled: false`): the collector exports OTLP/HTTP to
    /// `<externalUrl>/v1/traces`, and Grafana reads it unless `externalQueryUrl` says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_url: Option<String>,
    /// Which API the external backend serves: `Tempo` (when unset), or `Jaeger` (v2), which Grafana reads with its
    /// Jaeger datasource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_api: Option<TraceApi>,
    /// Where Grafana reads traces when that is not `externalUrl` (Tempo's HTTP API on 3200, Jaeger's query
    /// service on 16686, while OTLP arrives on 4318).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_query_url: Option<String>,
    /// Tempo image.
    #[serde(default = "default_tempo_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Storage for trace blocks.
    #[serde(default)]
    pub storage: StorageSpec,
    /// How long traces are kept (a duration such as 1h).
    #[serde(default = "default_traces_retention")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h|d|w|y)$"))]
    pub retention: String,
}

impl Default for TempoSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            external_url: None,
            external_api: None,
            external_query_url: None,
            image: default_tempo_image(),
            resources: None,
            storage: StorageSpec::default(),
            retention: default_traces_retention(),
        }
    }
}

/// Loki, receiving the collector's logs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.externalUrl) || !self.enabled")
    .message("externalUrl replaces the deployed backend: set enabled to false").field_path(".externalUrl").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("has(self.externalUrl) || !has(self.externalApi)")
    .message("externalApi describes an external backend: set externalUrl").field_path(".externalUrl").reason(Reason::FieldValueRequired))]
#[serde(rename_all = "camelCase")]
pub struct LokiSpec {
    /// Whether Loki is deployed.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Base URL of a log backend run elsewhere (with `enabled: false`): the collector exports OTLP/HTTP to it (at
    /// the path its API takes) and Grafana reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_url: Option<String>,
    /// Which API the external backend serves: `Loki` (when unset; OTLP at `/otlp/v1/logs`), or `VictoriaLogs` (OTLP at
    /// `/insert/opentelemetry/v1/logs`, read by Grafana's VictoriaLogs datasource plugin, which Grafana installs at
    /// start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_api: Option<LogApi>,
    /// Loki image.
    #[serde(default = "default_loki_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Storage for log chunks.
    #[serde(default)]
    pub storage: StorageSpec,
    /// How long logs are kept (a duration such as 168h).
    #[serde(default = "default_logs_retention")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h|d|w|y)$"))]
    pub retention: String,
}

impl Default for LokiSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            external_url: None,
            external_api: None,
            image: default_loki_image(),
            resources: None,
            storage: StorageSpec::default(),
            retention: default_logs_retention(),
        }
    }
}

/// The API of an external trace backend.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TraceApi {
    /// Grafana Tempo.
    #[default]
    Tempo,
    /// Jaeger v2 (Apache-2.0; OTLP in, its query API out).
    Jaeger,
}

/// The API of an external log backend.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LogApi {
    /// Grafana Loki.
    #[default]
    Loki,
    /// VictoriaLogs (Apache-2.0; OTLP in, LogsQL out).
    VictoriaLogs,
}

/// Grafana, with the stack's backends as datasources and flowtel's dashboards.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrafanaSpec {
    /// Whether Grafana is deployed.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Grafana image.
    #[serde(default = "default_grafana_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Grafana replicas. Each keeps its users and sessions in its own SQLite database on its pod's disk, so with more
    /// than one a login works on one pod and not on the next: keep 1 (datasources and dashboards are provisioned, so
    /// a restart loses nothing flowtel configures).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 10))]
    pub replicas: i32,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Secret (keys `admin-user`, `admin-password`) holding the admin login. When unset, flowtel generates a
    /// random password into a Secret of its own: there is never a default password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_credentials_secret_ref: Option<SecretRef>,
}

impl Default for GrafanaSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            image: default_grafana_image(),
            replicas: 1,
            resources: None,
            admin_credentials_secret_ref: None,
        }
    }
}

/// A reference to a Secret in the stack's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Observed state of a TelemetryStack.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryStackStatus {
    /// Readiness of each component.
    #[serde(default)]
    pub components: ComponentsStatus,
    /// Where workloads and people reach the stack.
    #[serde(default)]
    pub endpoints: Endpoints,
    /// Conditions by the Kubernetes API conventions, `Ready` among them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Readiness of each component of the stack.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentsStatus {
    /// The collector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector: Option<ComponentStatus>,
    /// Prometheus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<ComponentStatus>,
    /// Tempo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tempo: Option<ComponentStatus>,
    /// Loki.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loki: Option<ComponentStatus>,
    /// Grafana.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grafana: Option<ComponentStatus>,
}

/// Readiness of one component.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// Whether every desired replica is ready.
    pub ready: bool,
    /// Desired replicas.
    #[serde(default)]
    pub replicas: i32,
    /// Ready replicas.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Why the component is not ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Endpoints of the stack, as in-cluster URLs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// OTLP over gRPC (the collector, port 4317).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_grpc: Option<String>,
    /// OTLP over HTTP (the collector, port 4318).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_http: Option<String>,
    /// Prometheus' HTTP API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<String>,
    /// Tempo's HTTP API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tempo: Option<String>,
    /// Loki's HTTP API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loki: Option<String>,
    /// Grafana's UI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grafana: Option<String>,
}

fn enabled() -> bool {
    true
}

fn one() -> i32 {
    1
}

fn default_collector_image() -> String {
    "otel/opentelemetry-collector-contrib:0.165.1".into()
}

fn default_prometheus_image() -> String {
    "prom/prometheus:v3.8.0".into()
}

fn default_tempo_image() -> String {
    "grafana/tempo:2.9.0".into()
}

fn default_loki_image() -> String {
    "grafana/loki:3.6.0".into()
}

fn default_grafana_image() -> String {
    "grafana/grafana:12.3.0".into()
}

fn default_memory_limit_percent() -> i32 {
    75
}

fn default_spike_limit_percent() -> i32 {
    20
}

fn default_batch_size() -> i32 {
    1000
}

fn default_cpu_target() -> i32 {
    70
}

fn default_latency_threshold_ms() -> i64 {
    5_000
}

fn default_sampled_percent() -> i32 {
    10
}

fn default_decision_wait_seconds() -> i32 {
    300
}

fn default_guarded_attributes() -> Vec<String> {
    vec!["phone_id".into()]
}

fn default_queue_size() -> Quantity {
    Quantity("2Gi".into())
}

fn default_metrics_retention() -> String {
    "30d".into()
}

fn default_traces_retention() -> String {
    "1h".into()
}

fn default_logs_retention() -> String {
    "168h".into()
}
