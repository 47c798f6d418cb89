//! Prometheus: OTLP receiver and exemplar storage on, retention by time (and size when asked), a claimed TSDB.

use serde_json::{Value, json};

use super::{Backend, Component, Stack, StackObject};

pub const HTTP_PORT: i32 = 9090;
const UID: i64 = 65534;

pub struct Built {
    pub objects: Vec<StackObject>,
    pub config_yaml: String,
}

/// prometheus.yml: OTLP metric names pinned to the spec's, resource attributes promoted to labels (workflow and Kubernetes identity), an
/// out-of-order window for OTLP pushes that arrive late, and Prometheus scraping itself.
pub fn config() -> Value {
    json!({
        "global": {"scrape_interval": "30s", "evaluation_interval": "30s"},
        "otlp": {
            // Metric names exactly as the spec spells them, dots as underscores (`workflow_run_duration_ms_bucket`,
            // `workflow_step_status`): no unit or `_total` suffix appended, whatever the Prometheus default.
            "translation_strategy": "UnderscoreEscapingWithoutSuffixes",
            "promote_resource_attributes": [
                "service.name", "service.namespace", "service.instance.id", "service.version",
                "deployment.environment", "k8s.namespace.name", "k8s.job.name", "k8s.pod.name",
            ],
        },
        "storage": {"tsdb": {"out_of_order_time_window": "30m"}},
        "scrape_configs": [
            {"job_name": "prometheus", "static_configs": [{"targets": [format!("localhost:{HTTP_PORT}")]}]},
        ],
    })
}

pub fn build(stack: &Stack<'_>) -> Built {
    let p = &stack.stack.spec.prometheus;
    let config_yaml = super::yaml(&config());
    let config_name = stack.object_name(Component::Prometheus, Some("config"));
    let mut args = vec![
        "--config.file=/etc/prometheus/prometheus.yml".to_string(),
        "--storage.tsdb.path=/prometheus".into(),
        format!("--storage.tsdb.retention.time={}", p.retention),
        "--web.enable-otlp-receiver".into(),
        "--enable-feature=exemplar-storage".into(),
        format!("--web.listen-address=:{HTTP_PORT}"),
    ];
    if let Some(size) = &p.retention_size {
        args.push(format!("--storage.tsdb.retention.size={size}"));
    }
    let ports = [("http", HTTP_PORT)];
    let objects = vec![
        super::config_map(stack, Component::Prometheus, config_name.clone(), &[("prometheus.yml", &config_yaml)]),
        super::service(stack, Component::Prometheus, &ports),
        super::backend_statefulset(
            stack,
            Backend {
                component: Component::Prometheus,
                image: &p.image,
                uid: UID,
                replicas: p.replicas,
                args,
                config_name,
                config_dir: "/etc/prometheus",
                config_text: &config_yaml,
                data_dir: "/prometheus",
                storage: &p.storage,
                ports: &ports,
                ready_path: "/-/ready",
                resources: super::resources(&p.resources, "250m", "512Mi", "2Gi"),
            },
        ),
    ];
    Built { objects, config_yaml }
}
