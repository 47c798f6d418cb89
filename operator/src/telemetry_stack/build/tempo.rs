//! Tempo in single-binary mode: OTLP in, blocks on a claimed volume, kept for the stack's trace retention.

use serde_json::{Value, json};

use super::{Backend, Component, Stack, StackObject};

pub const HTTP_PORT: i32 = 3200;
pub const OTLP_GRPC_PORT: i32 = 4317;
pub const OTLP_HTTP_PORT: i32 = 4318;
const UID: i64 = 10001;

/// tempo.yaml (keys from Tempo's configuration reference): the distributor's OTLP receivers, local storage
/// with its WAL, and the compactor's `block_retention` as the retention.
pub fn config(stack: &Stack<'_>) -> Value {
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

pub fn build(stack: &Stack<'_>) -> Vec<StackObject> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-level blocks of Tempo's configuration reference (grafana.com/docs/tempo/latest/configuration/).
    const DOCUMENTED: [&str; 16] = [
        "target",
        "http_api_prefix",
        "server",
        "distributor",
        "ingester",
        "metrics_generator",
        "query_frontend",
        "querier",
        "compactor",
        "storage",
        "memberlist",
        "overrides",
        "usage_report",
        "cache",
        "stream_over_http_enabled",
        "multitenancy_enabled",
    ];

    #[test]
    fn the_config_uses_documented_keys_and_sets_the_retention() {
        let stack: flowtel_crds::TelemetryStack = serde_json::from_value(json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack",
            "metadata": {"name": "s", "namespace": "ns"}, "spec": {"tempo": {"retention": "2h"}},
        }))
        .expect("stack");
        let config = config(&Stack::new(&stack, 0.0).expect("view"));
        for key in config.as_object().expect("a mapping").keys() {
            assert!(DOCUMENTED.contains(&key.as_str()), "{key} is not a documented Tempo block");
        }
        assert_eq!(config["compactor"]["compaction"]["block_retention"], "2h");
        assert_eq!(config["storage"]["trace"]["backend"], "local");
        assert_eq!(config["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"], "0.0.0.0:4317");
    }
}
