//! The OpenTelemetry Collector: its generated configuration (merged with the user's override) and its workload,
//! Service, PodDisruptionBudget and HorizontalPodAutoscaler.

use flowtel_crds::telemetry_stack::{CardinalityAction, CollectorMode, CollectorSpec};
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec, MetricTarget,
    ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EnvVar, HTTPGetAction, PodSpec, PodTemplateSpec, Probe, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::{BuildError, Component, Stack, StackObject};

pub const OTLP_GRPC_PORT: i32 = 4317;
pub const OTLP_HTTP_PORT: i32 = 4318;
pub const HEALTH_PORT: i32 = 13133;
const CONFIG_FILE: &str = "collector.yaml";
const CONFIG_DIR: &str = "/etc/otelcol";
const QUEUE_DIR: &str = "/var/lib/otelcol/queue";
/// The collector images run as this user.
const UID: i64 = 10001;

/// The collector's objects and the configuration they carry.
pub struct Built {
    pub objects: Vec<StackObject>,
    pub config_yaml: String,
}

/// The generated configuration, before the user's override: OTLP in; memory_limiter first, batch last; one
/// pipeline per signal that has a backend.
pub fn generated_config(stack: &Stack<'_>) -> Value {
    let c = &stack.stack.spec.collector;
    let persistent = c.persistent_queue.is_some() && c.mode == CollectorMode::StatefulSet;
    // A persistent queue keeps what a backend cannot take yet for as long as the backend is down (bounded by the
    // queue's volume): retried without the default five-minute limit, after which the exporter would drop it.
    let queue = |mut exporter: Value| {
        if persistent {
            exporter["sending_queue"] = json!({"enabled": true, "storage": "file_storage/queue"});
            exporter["retry_on_failure"] = json!({"enabled": true, "max_elapsed_time": "0s"});
        }
        exporter
    };
    let batch = json!({
        "send_batch_size": c.batch_size,
        "send_batch_max_size": c.batch_size,
        "timeout": "1s",
    });
    let mut processors = json!({
        "memory_limiter": {
            "check_interval": "1s",
            "limit_percentage": c.memory_limit_percent,
            "spike_limit_percentage": c.spike_limit_percent,
        },
        "batch": batch,
    });
    let mut exporters = serde_json::Map::new();
    let mut pipelines = serde_json::Map::new();

    // Traces → Tempo (OTLP gRPC when deployed), or an external backend over OTLP HTTP (Tempo or Jaeger).
    let traces_exporter = match (stack.tempo_otlp_grpc(), stack.traces_otlp_http()) {
        (Some(grpc), _) => {
            exporters.insert("otlp_grpc/tempo".into(), queue(json!({"endpoint": grpc, "tls": {"insecure": true}})));
            Some("otlp_grpc/tempo")
        }
        (None, Some(endpoint)) => {
            exporters.insert("otlp_http/tempo".into(), queue(json!({"traces_endpoint": endpoint})));
            Some("otlp_http/tempo")
        }
        (None, None) => None,
    };
    if let Some(exporter) = traces_exporter {
        let mut chain = vec!["memory_limiter"];
        if let Some(t) = &c.tail_sampling {
            processors["tail_sampling"] = tail_sampling(t);
            chain.push("tail_sampling");
        }
        chain.push("batch");
        pipelines.insert("traces".into(), pipeline(&chain, exporter));
    }

    // Metrics → Prometheus' OTLP receiver, summed exactly whatever the number of workload processes and collector
    // replicas (docs/metrics-aggregation.md). Workloads and the operator export deltas under a stream identity
    // without any process in it, so that series are bounded by label values; concurrent processes therefore share
    // streams, and `deltatocumulative` drops a point not newer than the last one it summed. Each delta is
    // restamped with its arrival time after `batch`, which hands points on one at a time, so every point of a
    // stream is newer than the one before and is summed. `interval` then forwards each stream's latest total once
    // per interval (Prometheus stores one sample per millisecond per series), and every replica labels what it
    // sums with its own `service.instance.id`, so two replicas never write one series.
    if let Some(url) = stack.prometheus_url() {
        exporters.insert(
            "otlp_http/prometheus".into(),
            queue(json!({"metrics_endpoint": format!("{url}/api/v1/otlp/v1/metrics")})),
        );
        let mut chain = vec!["memory_limiter", "batch"];
        if let Some(guard) = cardinality_guard(c) {
            processors["attributes/cardinality"] = guard;
            chain.push("attributes/cardinality");
        }
        processors["transform/arrival"] = arrival_stamp();
        processors["deltatocumulative"] = json!({"max_stale": AGGREGATE_MAX_STALE});
        processors["interval"] = json!({"interval": AGGREGATE_INTERVAL});
        chain.extend(["transform/arrival", "deltatocumulative", "interval"]);
        pipelines.insert("metrics".into(), pipeline(&chain, "otlp_http/prometheus"));
    }

    // Logs → the log backend's OTLP endpoint (Loki's, or VictoriaLogs').
    if let Some(endpoint) = stack.logs_otlp_http() {
        exporters.insert("otlp_http/loki".into(), queue(json!({"logs_endpoint": endpoint})));
        pipelines.insert("logs".into(), pipeline(&["memory_limiter", "batch"], "otlp_http/loki"));
    }

    let mut extensions = json!({"health_check": {"endpoint": format!("0.0.0.0:{HEALTH_PORT}")}});
    let mut enabled_extensions = vec!["health_check"];
    if persistent {
        extensions["file_storage/queue"] = json!({"directory": QUEUE_DIR, "create_directory": true});
        enabled_extensions.push("file_storage/queue");
    }
    json!({
        "extensions": extensions,
        "receivers": {"otlp": {"protocols": {
            "grpc": {"endpoint": format!("0.0.0.0:{OTLP_GRPC_PORT}")},
            "http": {"endpoint": format!("0.0.0.0:{OTLP_HTTP_PORT}")},
        }}},
        "processors": processors,
        "exporters": exporters,
        "service": {"extensions": enabled_extensions, "pipelines": pipelines},
    })
}

/// How often each summed stream goes to Prometheus.
const AGGREGATE_INTERVAL: &str = "10s";
/// A stream idle this long is forgotten (its next point starts a new total, which Prometheus reads as a counter
/// reset); longer than any gap between runs of a workflow that runs at all often.
const AGGREGATE_MAX_STALE: &str = "1h";
/// The environment variable naming this collector replica (the pod's name, or the host's).
const REPLICA_ENV: &str = "HOSTNAME";

/// Delta points restamped with their arrival (start = time = now), and every resource named after the replica
/// that sums it.
fn arrival_stamp() -> Value {
    json!({
        "error_mode": "ignore",
        "metric_statements": [
            {
                "context": "resource",
                "statements": [format!("set(resource.attributes[\"service.instance.id\"], \"${{env:{REPLICA_ENV}}}\")")],
            },
            {
                "context": "datapoint",
                "statements": [
                    "set(datapoint.time, Now()) where metric.aggregation_temporality == AGGREGATION_TEMPORALITY_DELTA",
                    "set(datapoint.start_time, datapoint.time) where metric.aggregation_temporality == AGGREGATION_TEMPORALITY_DELTA",
                ],
            },
        ],
    })
}

fn pipeline(processors: &[&str], exporter: &str) -> Value {
    json!({"receivers": ["otlp"], "processors": processors, "exporters": [exporter]})
}

/// Sampling by the run's outcome, decided when the run ends: the operator exports the trace's root, `workflow.run`
/// (with the run's status and attempts), at the run's end, after the workload's spans, so the decision waits for
/// that root (plus a second for stragglers) rather than a fixed window; `decision_wait` only bounds a trace whose
/// run never reports. Kept: every failed run (an error status anywhere in its trace), every retried run (more than
/// one attempt), every run slower than the threshold, and `percent` of the rest, chosen by trace id.
fn tail_sampling(t: &flowtel_crds::telemetry_stack::TailSamplingSpec) -> Value {
    json!({
        "decision_wait": format!("{}s", t.decision_wait_seconds),
        "decision_wait_after_root_received": "1s",
        "policies": [
            {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
            {"name": "retried", "type": "numeric_attribute", "numeric_attribute": {"key": "workflow.attempts", "min_value": 2}},
            {"name": "slow", "type": "latency", "latency": {"threshold_ms": t.latency_threshold_ms}},
            {"name": "rest", "type": "probabilistic", "probabilistic": {"sampling_percentage": t.percent}},
        ],
    })
}

/// The attributes processor over metric points: each listed attribute deleted or hashed.
fn cardinality_guard(c: &CollectorSpec) -> Option<Value> {
    if c.cardinality_guard.attributes.is_empty() {
        return None;
    }
    let action = match c.cardinality_guard.action {
        CardinalityAction::Drop => "delete",
        CardinalityAction::Hash => "hash",
    };
    let actions: Vec<Value> =
        c.cardinality_guard.attributes.iter().map(|key| json!({"key": key, "action": action})).collect();
    Some(json!({"actions": actions}))
}

/// Merges `overlay` into `base`: maps key by key, anything else replaces.
pub fn merge(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(base), Value::Object(overlay)) => {
            for (key, value) in overlay {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// The configuration the collector runs: the generated one with the user's override merged over it.
pub fn config(stack: &Stack<'_>) -> Result<Value, BuildError> {
    let mut config = generated_config(stack);
    if let Some(text) = &stack.stack.spec.collector.config_override {
        let overlay: Value = serde_yaml_ng::from_str(text).map_err(|e| BuildError::Invalid {
            field: "spec.collector.configOverride".into(),
            message: format!("not valid YAML: {e}"),
        })?;
        match overlay {
            Value::Null => {}
            Value::Object(_) => merge(&mut config, overlay),
            _ => {
                return Err(BuildError::Invalid {
                    field: "spec.collector.configOverride".into(),
                    message: "must be a YAML mapping (receivers, processors, exporters, extensions, service)".into(),
                });
            }
        }
    }
    Ok(config)
}

/// GOMEMLIMIT: 80 % of the container's memory limit, so Go's collector gives memory back before the kernel kills
/// it (the memory limiter refuses data before that).
fn go_memory_limit(c: &CollectorSpec) -> Option<String> {
    let limits = super::resources(&c.resources, "200m", "256Mi", "1Gi").limits?;
    let bytes = quantity_bytes(&limits.get("memory")?.0)?;
    Some(format!("{}MiB", bytes * 8 / 10 / (1024 * 1024)))
}

/// Bytes of a memory quantity (binary and decimal suffixes, plain integers).
pub fn quantity_bytes(q: &str) -> Option<u64> {
    const SUFFIXES: [(&str, u64); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    for (suffix, factor) in SUFFIXES {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok()?.checked_mul(factor);
        }
    }
    q.parse().ok()
}

/// Replicas the HPA keeps at least: the user's minimum, raised to the observed run rate over what one replica
/// carries, never above the maximum.
pub fn hpa_minimum(c: &CollectorSpec, observed_runs_per_second: f64) -> Option<(i32, i32)> {
    let a = c.autoscaling.as_ref()?;
    let needed = match a.runs_per_second_per_replica {
        Some(per) if observed_runs_per_second > 0.0 => (observed_runs_per_second / f64::from(per)).ceil() as i32,
        _ => 0,
    };
    Some((a.min_replicas.max(needed).min(a.max_replicas), a.max_replicas))
}

pub fn build(stack: &Stack<'_>) -> Result<Built, BuildError> {
    let c = &stack.stack.spec.collector;
    let config_yaml = super::yaml(&config(stack)?);
    let config_name = stack.object_name(Component::Collector, Some("config"));
    let name = stack.object_name(Component::Collector, None);
    let ports = [("otlp-grpc", OTLP_GRPC_PORT), ("otlp-http", OTLP_HTTP_PORT)];
    let persistent = c.persistent_queue.as_ref().filter(|_| c.mode == CollectorMode::StatefulSet);

    let mut env = Vec::new();
    if let Some(limit) = go_memory_limit(c) {
        env.push(EnvVar { name: "GOMEMLIMIT".into(), value: Some(limit), ..EnvVar::default() });
    }
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    if persistent.is_some() {
        mounts.push(VolumeMount { name: "queue".into(), mount_path: QUEUE_DIR.into(), ..VolumeMount::default() });
    }
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(HEALTH_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(10),
        ..Probe::default()
    };
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(stack.pod_labels(Component::Collector)),
            annotations: Some(super::hash_annotation(&config_yaml)),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            security_context: Some(super::restricted_pod(UID)),
            containers: vec![Container {
                name: "otelcol".into(),
                image: Some(c.image.clone()),
                args: Some(vec![format!("--config={CONFIG_DIR}/{CONFIG_FILE}")]),
                ports: Some(super::container_ports(&[
                    ("otlp-grpc", OTLP_GRPC_PORT),
                    ("otlp-http", OTLP_HTTP_PORT),
                    ("health", HEALTH_PORT),
                ])),
                env: Some(env),
                resources: Some(super::resources(&c.resources, "200m", "256Mi", "1Gi")),
                readiness_probe: Some(probe("/")),
                liveness_probe: Some(probe("/")),
                security_context: Some(super::restricted_container()),
                volume_mounts: Some(mounts),
                ..Container::default()
            }],
            volumes: Some(vec![Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: config_name.clone(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        }),
    };
    let selector =
        LabelSelector { match_labels: Some(stack.selector(Component::Collector)), ..LabelSelector::default() };
    let autoscaled = hpa_minimum(c, stack.observed_runs_per_second).filter(|_| c.mode != CollectorMode::DaemonSet);
    // Under an HPA the replica count is the autoscaler's: flowtel leaves the field out of what it applies.
    let replicas = if autoscaled.is_some() { None } else { Some(c.replicas) };
    let metadata = stack.metadata(Component::Collector, name.clone());

    let mut objects =
        vec![super::config_map(stack, Component::Collector, config_name, &[(CONFIG_FILE, config_yaml.as_str())])];
    objects.push(super::service(stack, Component::Collector, &ports));
    let (workload, scale_kind) = match c.mode {
        CollectorMode::Deployment => (
            StackObject::Deployment(Deployment {
                metadata: metadata.clone(),
                spec: DeploymentSpec { replicas, selector: selector.clone(), template, ..DeploymentSpec::default() },
                ..Deployment::default()
            }),
            "Deployment",
        ),
        CollectorMode::StatefulSet => (
            StackObject::StatefulSet(StatefulSet {
                metadata: metadata.clone(),
                spec: StatefulSetSpec {
                    replicas,
                    service_name: Some(name.clone()),
                    selector: selector.clone(),
                    template,
                    volume_claim_templates: persistent
                        .map(|q| vec![super::claim("queue", q.size.clone(), q.storage_class_name.clone())]),
                    ..StatefulSetSpec::default()
                },
                ..StatefulSet::default()
            }),
            "StatefulSet",
        ),
        CollectorMode::DaemonSet => (
            StackObject::DaemonSet(DaemonSet {
                metadata: metadata.clone(),
                spec: DaemonSetSpec { selector: selector.clone(), template, ..DaemonSetSpec::default() },
                ..DaemonSet::default()
            }),
            "DaemonSet",
        ),
    };
    objects.push(workload);
    if c.mode != CollectorMode::DaemonSet {
        objects.push(StackObject::PodDisruptionBudget(PodDisruptionBudget {
            metadata: metadata.clone(),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(selector),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        }));
    }
    if let (Some((min, max)), Some(a)) = (autoscaled, &c.autoscaling) {
        let mut metrics = vec![resource_metric("cpu", a.target_cpu_percent)];
        if let Some(memory) = a.target_memory_percent {
            metrics.push(resource_metric("memory", memory));
        }
        objects.push(StackObject::HorizontalPodAutoscaler(HorizontalPodAutoscaler {
            metadata,
            spec: HorizontalPodAutoscalerSpec {
                scale_target_ref: CrossVersionObjectReference {
                    api_version: Some("apps/v1".into()),
                    kind: scale_kind.into(),
                    name,
                },
                min_replicas: Some(min),
                max_replicas: max,
                metrics: Some(metrics),
                ..HorizontalPodAutoscalerSpec::default()
            },
            ..HorizontalPodAutoscaler::default()
        }));
    }
    Ok(Built { objects, config_yaml })
}

fn resource_metric(name: &str, percent: i32) -> MetricSpec {
    MetricSpec {
        type_: "Resource".into(),
        resource: Some(ResourceMetricSource {
            name: name.into(),
            target: MetricTarget {
                type_: "Utilization".into(),
                average_utilization: Some(percent),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtel_crds::telemetry_stack::AutoscalingSpec;

    fn autoscaled(min: i32, max: i32, per: Option<i32>) -> CollectorSpec {
        CollectorSpec {
            autoscaling: Some(AutoscalingSpec {
                min_replicas: min,
                max_replicas: max,
                target_cpu_percent: 70,
                target_memory_percent: None,
                runs_per_second_per_replica: per,
            }),
            ..CollectorSpec::default()
        }
    }

    #[test]
    fn the_hpa_minimum_follows_the_run_rate_within_its_bounds() {
        assert_eq!(hpa_minimum(&CollectorSpec::default(), 500.0), None);
        assert_eq!(hpa_minimum(&autoscaled(2, 10, None), 500.0), Some((2, 10)));
        assert_eq!(hpa_minimum(&autoscaled(2, 10, Some(50)), 0.0), Some((2, 10)));
        assert_eq!(hpa_minimum(&autoscaled(2, 10, Some(50)), 116.0), Some((3, 10)), "116 runs/s: 3 replicas");
        assert_eq!(hpa_minimum(&autoscaled(2, 10, Some(50)), 5_000.0), Some((10, 10)), "never above the maximum");
    }

    #[test]
    fn memory_quantities_and_gomemlimit() {
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("512M"), Some(512_000_000));
        assert_eq!(quantity_bytes("1000"), Some(1000));
        assert_eq!(quantity_bytes("lots"), None);
        assert_eq!(go_memory_limit(&CollectorSpec::default()).as_deref(), Some("819MiB"), "80 % of the 1Gi default");
    }

    #[test]
    fn an_override_merges_maps_and_replaces_the_rest() {
        let mut base = serde_json::json!({"a": {"b": 1, "c": [1, 2]}, "d": 1});
        merge(&mut base, serde_json::json!({"a": {"c": [3], "e": 2}}));
        assert_eq!(base, serde_json::json!({"a": {"b": 1, "c": [3], "e": 2}, "d": 1}));
    }
}
