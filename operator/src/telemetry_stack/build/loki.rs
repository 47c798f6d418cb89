//! Loki in single-binary mode: OTLP logs in (`/otlp/v1/logs`), chunks and index on a claimed volume, retention
//! enforced by the compactor.

use serde_json::{Value, json};

use super::{Backend, Component, Stack, StackObject};

pub const HTTP_PORT: i32 = 3100;
const GRPC_PORT: i32 = 9095;
const UID: i64 = 10001;

/// loki.yaml (keys from Loki 3's configuration reference): no multi-tenancy, filesystem storage with the tsdb
/// index (schema v13, required for OTLP's structured metadata), retention by the compactor.
pub fn config(stack: &Stack) -> Value {
    let l = &stack.stack.spec.loki;
    json!({
        "auth_enabled": false,
        "server": {"http_listen_port": HTTP_PORT, "grpc_listen_port": GRPC_PORT},
        "common": {
            "instance_addr": "127.0.0.1",
            "path_prefix": "/var/loki",
            "replication_factor": 1,
            "ring": {"kvstore": {"store": "inmemory"}},
            "storage": {"filesystem": {
                "chunks_directory": "/var/loki/chunks",
                "rules_directory": "/var/loki/rules",
            }},
        },
        "schema_config": {"configs": [{
            "from": "2024-01-01", "store": "tsdb", "object_store": "filesystem", "schema": "v13",
            "index": {"prefix": "index_", "period": "24h"},
        }]},
        "limits_config": {"retention_period": l.retention, "allow_structured_metadata": true},
        "compactor": {
            "working_directory": "/var/loki/compactor",
            "retention_enabled": true,
            "delete_request_store": "filesystem",
        },
        "analytics": {"reporting_enabled": false},
    })
}

pub fn build(stack: &Stack) -> Vec<StackObject> {
    let l = &stack.stack.spec.loki;
    let config_yaml = super::yaml(&config(stack));
    let config_name = stack.object_name(Component::Loki, Some("config"));
    let ports = [("http", HTTP_PORT), ("grpc", GRPC_PORT)];
    vec![
        super::config_map(stack, Component::Loki, config_name.clone(), &[("loki.yaml", &config_yaml)]),
        super::service(stack, Component::Loki, &ports),
        super::backend_statefulset(
            stack,
            Backend {
                component: Component::Loki,
                image: &l.image,
                uid: UID,
                replicas: 1,
                args: vec!["-config.file=/etc/loki/loki.yaml".into(), "-target=all".into()],
                config_name,
                config_dir: "/etc/loki",
                config_text: &config_yaml,
                data_dir: "/var/loki",
                storage: &l.storage,
                ports: &ports,
                ready_path: "/ready",
                resources: super::resources(&l.resources, "250m", "512Mi", "2Gi"),
            },
        ),
    ]
}
