//! Loki in single-binary mode: OTLP logs in (`/otlp/v1/logs`), chunks and index on a claimed volume, retention
//! enforced by the compactor.

use serde_json::{Value, json};

use super::{Backend, Component, Stack, StackObject};

pub const HTTP_PORT: i32 = 3100;
const GRPC_PORT: i32 = 9095;
const UID: i64 = 10001;

/// loki.yaml (keys from Loki 3's configuration reference): no multi-tenancy, filesystem storage with the tsdb
/// index (schema v13, required for OTLP's structured metadata), retention by the compactor.
pub fn config(stack: &Stack<'_>) -> Value {
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

pub fn build(stack: &Stack<'_>) -> Vec<StackObject> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-level blocks of Loki 3's configuration reference (grafana.com/docs/loki/latest/configure/).
    const DOCUMENTED: [&str; 20] = [
        "target",
        "auth_enabled",
        "server",
        "distributor",
        "querier",
        "query_range",
        "ruler",
        "ingester",
        "ingester_client",
        "index_gateway",
        "storage_config",
        "chunk_store_config",
        "schema_config",
        "compactor",
        "limits_config",
        "frontend",
        "table_manager",
        "memberlist",
        "common",
        "analytics",
    ];

    #[test]
    fn the_config_uses_documented_keys_and_enforces_the_retention() {
        let stack: flowtel_crds::TelemetryStack = serde_json::from_value(json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack",
            "metadata": {"name": "s", "namespace": "ns"}, "spec": {"loki": {"retention": "72h"}},
        }))
        .expect("stack");
        let config = config(&Stack::new(&stack, 0.0).expect("view"));
        for key in config.as_object().expect("a mapping").keys() {
            assert!(DOCUMENTED.contains(&key.as_str()), "{key} is not a documented Loki block");
        }
        assert_eq!(config["limits_config"]["retention_period"], "72h");
        assert_eq!(config["compactor"]["retention_enabled"], true, "retention is enforced only by the compactor");
        assert_eq!(config["limits_config"]["allow_structured_metadata"], true, "OTLP ingestion needs it");
        assert_eq!(config["schema_config"]["configs"][0]["schema"], "v13");
    }
}
