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
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
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
#[serde(rename_all = "camelCase")]
pub struct CollectorSpec {
    /// Whether the collector is deployed.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Collector image.
    #[serde(default = "default_collector_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// How the collector is deployed.
    #[serde(default)]
    pub mode: CollectorMode,
    /// Collector replicas (Deployment and StatefulSet modes).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// CPU and memory requests and limits of each collector.
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
    /// Percentage of traces kept by head sampling (100 keeps every trace).
    #[serde(default = "default_sampling_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub sampling_percent: i32,
}

impl Default for CollectorSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            image: default_collector_image(),
            mode: CollectorMode::default(),
            replicas: 1,
            resources: None,
            memory_limit_percent: default_memory_limit_percent(),
            spike_limit_percent: default_spike_limit_percent(),
            batch_size: default_batch_size(),
            sampling_percent: default_sampling_percent(),
        }
    }
}

/// Persistent storage of a backend.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of the volume; when unset the backend uses an emptyDir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// StorageClass of the volume; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// Prometheus, receiving the collector's metrics.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSpec {
    /// Whether Prometheus is deployed.
    #[serde(default = "enabled")]
    pub enabled: bool,
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
}

impl Default for PrometheusSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            image: default_prometheus_image(),
            replicas: 1,
            resources: None,
            storage: StorageSpec::default(),
            retention: default_metrics_retention(),
        }
    }
}

/// Tempo, receiving the collector's traces.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TempoSpec {
    /// Whether Tempo is deployed.
    #[serde(default = "enabled")]
    pub enabled: bool,
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
            image: default_tempo_image(),
            resources: None,
            storage: StorageSpec::default(),
            retention: default_traces_retention(),
        }
    }
}

/// Loki, receiving the collector's logs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LokiSpec {
    /// Whether Loki is deployed.
    #[serde(default = "enabled")]
    pub enabled: bool,
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
            image: default_loki_image(),
            resources: None,
            storage: StorageSpec::default(),
            retention: default_logs_retention(),
        }
    }
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
    /// Grafana replicas.
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

fn default_sampling_percent() -> i32 {
    100
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
