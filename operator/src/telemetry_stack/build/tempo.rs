//! Tempo in single-binary mode: OTLP in, blocks on a claimed volume, kept for the stack's trace retention.

use serde_json::{Value, json};

use super::{Backend, Component, Stack, StackObject};

pub const HTTP_PORT: i32 = 3200;
pub const OTLP_GRPC_PORT: i32 = 4317;
pub const OTLP_HTTP_PORT: i32 = 4318;
const UID: i64 = 10001;

/// tempo.yaml (keys from Tempo's configuration reference): the distributor's OTLP receivers, local storage
/// with its WAL, and the compactor's `block_retention` as the retention.
pub fn config(stack: &Stack) -> Value {
    let t = &stack.stack.spec.tempo;
    json!({
        "stream_over_http_enabled": true,
        "server": {"http_listen_port": HTTP_PORT},
        "distributor": {"receivers": {"otlp": {"protocols": {
            "grpc": {"endpoint": format!("0.0.0.0:{OTLP_GRPC_PORT}")},
            "http": {"endpoint": format!("0.0.0.0:{OTLP_HTTP_PORT}")},
        }}}},
        "ingester": {"max_block_duration": "5m"},
        "compactor": {"compaction": {"block_retention": t.retention}},
        "storage": {"trace": {
            "backend": "local",
            "wal": {"path": "/var/tempo/wal"},
            "local": {"path": "/var/tempo/blocks"},
        }},
        "usage_report": {"reporting_enabled": false},
    })
}

pub fn build(stack: &Stack) -> Vec<StackObject> {
    let t = &stack.stack.spec.tempo;
    let config_yaml = super::yaml(&config(stack));
    let config_name = stack.object_name(Component::Tempo, Some("config"));
    let ports = [("http", HTTP_PORT), ("otlp-grpc", OTLP_GRPC_PORT), ("otlp-http", OTLP_HTTP_PORT)];
    vec![
        super::config_map(stack, Component::Tempo, config_name.clone(), &[("tempo.yaml", &config_yaml)]),
        super::service(stack, Component::Tempo, &ports),
        super::backend_statefulset(
            stack,
            Backend {
                component: Component::Tempo,
                image: &t.image,
                uid: UID,
                replicas: 1,
                args: vec!["-config.file=/etc/tempo/tempo.yaml".into()],
                config_name,
                config_dir: "/etc/tempo",
                config_text: &config_yaml,
                data_dir: "/var/tempo",
                storage: &t.storage,
                ports: &ports,
                ready_path: "/ready",
                resources: super::resources(&t.resources, "250m", "512Mi", "2Gi"),
            },
        ),
    ]
}
