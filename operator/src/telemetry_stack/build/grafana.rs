//! Grafana: datasources wired both ways (exemplars → Tempo, Tempo → Loki and → Prometheus, Loki's trace_id →
//! Tempo), the "Workflow runs" dashboard, and an admin login from a Secret (the user's, or one flowtel generates
//! with a random password: there is never a default).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, PodSpec,
    PodTemplateSpec, Probe, Secret, SecretKeySelector, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use flowtel_crds::telemetry_stack::{LogApi, TraceApi};

use super::{Component, Stack, StackObject};

pub const HTTP_PORT: i32 = 3000;
const UID: i64 = 472;
pub const ADMIN_USER_KEY: &str = "admin-user";
pub const ADMIN_PASSWORD_KEY: &str = "admin-password";

/// The Secret holding the admin login: the user's, else the one flowtel generates.
pub fn admin_secret_name(stack: &Stack<'_>) -> String {
    match &stack.stack.spec.grafana.admin_credentials_secret_ref {
        Some(r) => r.name.clone(),
        None => generated_secret_name(stack),
    }
}

pub fn generated_secret_name(stack: &Stack<'_>) -> String {
    stack.object_name(Component::Grafana, Some("admin"))
}

/// The generated admin Secret, with `password` drawn by the caller. Created once and never re-applied, so the
/// password stays what it was; deleted with the stack.
pub fn admin_secret(stack: &Stack<'_>, password: &str) -> Secret {
    Secret {
        metadata: stack.metadata(Component::Grafana, generated_secret_name(stack)),
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([
            (ADMIN_USER_KEY.to_string(), "admin".to_string()),
            (ADMIN_PASSWORD_KEY.to_string(), password.to_string()),
        ])),
        ..Secret::default()
    }
}

/// The trace datasource's uid and Grafana type for the stack's trace API.
fn trace_datasource(api: TraceApi) -> (&'static str, &'static str) {
    match api {
        TraceApi::Tempo => ("tempo", "tempo"),
        TraceApi::Jaeger => ("jaeger", "jaeger"),
    }
}

/// The log datasource's uid and Grafana type for the stack's log API.
fn log_datasource(api: LogApi) -> (&'static str, &'static str) {
    match api {
        LogApi::Loki => ("loki", "loki"),
        LogApi::VictoriaLogs => ("victorialogs", VICTORIALOGS_PLUGIN),
    }
}

/// Grafana's VictoriaLogs datasource: a plugin, installed when Grafana starts (an air-gapped Grafana needs an
/// image with it).
const VICTORIALOGS_PLUGIN: &str = "victoriametrics-logs-datasource";

/// The provisioned datasources, each only when its backend is deployed or external.
pub fn datasources(stack: &Stack<'_>) -> Value {
    let mut list = Vec::new();
    let (prometheus, traces, logs) = (stack.prometheus_url(), stack.tempo_url(), stack.loki_url());
    let (trace_uid, trace_type) = trace_datasource(stack.trace_api());
    let (log_uid, log_type) = log_datasource(stack.log_api());
    if let Some(url) = &prometheus {
        let mut json_data = json!({"httpMethod": "POST"});
        if traces.is_some() {
            json_data["exemplarTraceIdDestinations"] = json!([{"name": "trace_id", "datasourceUid": trace_uid}]);
        }
        list.push(json!({
            "name": "Prometheus", "uid": "prometheus", "type": "prometheus", "access": "proxy",
            "url": url, "isDefault": true, "editable": false, "jsonData": json_data,
        }));
    }
    if let Some(url) = &traces {
        let mut json_data = json!({"nodeGraph": {"enabled": true}});
        if logs.is_some() {
            json_data["tracesToLogsV2"] = json!({
                "datasourceUid": log_uid, "filterByTraceID": true, "spanStartTimeShift": "-1h",
                "spanEndTimeShift": "1h",
            });
            if stack.log_api() == LogApi::VictoriaLogs {
                // LogsQL, not LogQL: the trace id is a field of every OTLP log record.
                json_data["tracesToLogsV2"]["customQuery"] = json!(true);
                json_data["tracesToLogsV2"]["query"] = json!("trace_id:\"$${__trace.traceId}\"");
            }
            if stack.trace_api() == TraceApi::Tempo && stack.log_api() == LogApi::Loki {
                json_data["lokiSearch"] = json!({"datasourceUid": log_uid});
            }
        }
        if prometheus.is_some() {
            json_data["tracesToMetrics"] = json!({
                "datasourceUid": "prometheus", "spanStartTimeShift": "-1h", "spanEndTimeShift": "1h",
                "tags": [{"key": "service.name", "value": "service_name"}],
                "queries": [{"name": "Run rate", "query": "sum(rate(workflow_run_total{$$__tags}[5m]))"}],
            });
            if stack.trace_api() == TraceApi::Tempo {
                json_data["serviceMap"] = json!({"datasourceUid": "prometheus"});
            }
        }
        let name = match stack.trace_api() {
            TraceApi::Tempo => "Tempo",
            TraceApi::Jaeger => "Jaeger",
        };
        list.push(json!({
            "name": name, "uid": trace_uid, "type": trace_type, "access": "proxy", "url": url,
            "editable": false, "jsonData": json_data,
        }));
    }
    if let Some(url) = &logs {
        let mut json_data = json!({"maxLines": 1000});
        if traces.is_some() {
            // OTLP logs keep trace_id as structured metadata (Loki) or a field (VictoriaLogs), which Grafana
            // matches like a label.
            json_data["derivedFields"] = json!([{
                "name": "trace_id", "matcherType": "label", "matcherRegex": "trace_id",
                "datasourceUid": trace_uid, "url": "$${__value.raw}", "urlDisplayLabel": "Trace",
            }]);
        }
        let name = match stack.log_api() {
            LogApi::Loki => "Loki",
            LogApi::VictoriaLogs => "VictoriaLogs",
        };
        list.push(json!({
            "name": name, "uid": log_uid, "type": log_type, "access": "proxy", "url": url,
            "editable": false, "jsonData": json_data,
        }));
    }
    json!({"apiVersion": 1, "datasources": list})
}

/// The dashboard provider: files in the mounted dashboards directory, in a "flowtel" folder.
pub fn dashboard_provider() -> Value {
    json!({"apiVersion": 1, "providers": [{
        "name": "flowtel", "folder": "flowtel", "type": "file", "disableDeletion": true, "allowUiUpdates": false,
        "options": {"path": "/etc/grafana/provisioning/dashboards"},
    }]})
}

pub fn build(stack: &Stack<'_>) -> Vec<StackObject> {
    let g = &stack.stack.spec.grafana;
    let datasources_yaml = super::yaml(&datasources(stack));
    let provider_yaml = super::yaml(&dashboard_provider());
    let dashboard = serde_json::to_string_pretty(&super::dashboard::json()).unwrap_or_default();
    let datasources_name = stack.object_name(Component::Grafana, Some("datasources"));
    let dashboards_name = stack.object_name(Component::Grafana, Some("dashboards"));
    let secret = admin_secret_name(stack);
    let hashed = format!("{datasources_yaml}\n{provider_yaml}\n{dashboard}\n{secret}");
    let from_secret = |name: &str, key: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.clone(), key: key.into(), optional: Some(false) }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let plain = |name: &str, value: &str| EnvVar { name: name.into(), value: Some(value.into()), ..EnvVar::default() };
    let mount = |volume: &str, path: &str, read_only: bool| VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    };
    let config_volume = |volume: &str, config_map: &str| Volume {
        name: volume.into(),
        config_map: Some(ConfigMapVolumeSource { name: config_map.into(), ..ConfigMapVolumeSource::default() }),
        ..Volume::default()
    };
    let empty = |volume: &str| Volume {
        name: volume.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let mut env = vec![
        from_secret("GF_SECURITY_ADMIN_USER", ADMIN_USER_KEY),
        from_secret("GF_SECURITY_ADMIN_PASSWORD", ADMIN_PASSWORD_KEY),
        plain("GF_USERS_ALLOW_SIGN_UP", "false"),
        plain("GF_AUTH_ANONYMOUS_ENABLED", "false"),
        plain("GF_ANALYTICS_REPORTING_ENABLED", "false"),
        plain("GF_PATHS_DATA", "/var/lib/grafana"),
        plain("GF_PATHS_LOGS", "/var/log/grafana"),
    ];
    if stack.loki_url().is_some() && stack.log_api() == LogApi::VictoriaLogs {
        env.push(plain("GF_PLUGINS_PREINSTALL", VICTORIALOGS_PLUGIN));
    }
    let ports = [("http", HTTP_PORT)];
    let deployment = Deployment {
        metadata: stack.metadata(Component::Grafana, stack.object_name(Component::Grafana, None)),
        spec: DeploymentSpec {
            replicas: Some(g.replicas),
            selector: LabelSelector {
                match_labels: Some(stack.selector(Component::Grafana)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(stack.pod_labels(Component::Grafana)),
                    annotations: Some(super::hash_annotation(&hashed)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    security_context: Some(super::restricted_pod(UID)),
                    containers: vec![Container {
                        name: "grafana".into(),
                        image: Some(g.image.clone()),
                        ports: Some(super::container_ports(&ports)),
                        env: Some(env),
                        resources: Some(super::resources(&g.resources, "100m", "256Mi", "512Mi")),
                        readiness_probe: Some(Probe {
                            http_get: Some(HTTPGetAction {
                                path: Some("/api/health".into()),
                                port: IntOrString::String("http".into()),
                                ..HTTPGetAction::default()
                            }),
                            period_seconds: Some(10),
                            ..Probe::default()
                        }),
                        security_context: Some(super::restricted_container()),
                        volume_mounts: Some(vec![
                            mount("datasources", "/etc/grafana/provisioning/datasources", true),
                            mount("dashboards", "/etc/grafana/provisioning/dashboards", true),
                            mount("data", "/var/lib/grafana", false),
                            mount("logs", "/var/log/grafana", false),
                            mount("tmp", "/tmp", false),
                        ]),
                        ..Container::default()
                    }],
                    volumes: Some(vec![
                        config_volume("datasources", &datasources_name),
                        config_volume("dashboards", &dashboards_name),
                        empty("data"),
                        empty("logs"),
                        empty("tmp"),
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    };
    vec![
        super::config_map(stack, Component::Grafana, datasources_name, &[("datasources.yaml", &datasources_yaml)]),
        super::config_map(
            stack,
            Component::Grafana,
            dashboards_name,
            &[("provider.yaml", &provider_yaml), ("workflow-runs.json", &dashboard)],
        ),
        super::service(stack, Component::Grafana, &ports),
        StackObject::Deployment(deployment),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(spec: Value) -> flowtel_crds::TelemetryStack {
        serde_json::from_value(json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack",
            "metadata": {"name": "s", "namespace": "ns"}, "spec": spec,
        }))
        .expect("stack")
    }

    #[test]
    fn datasources_are_wired_both_ways_and_only_to_datasources_that_exist() {
        let stack = view(json!({}));
        let ds = datasources(&Stack::new(&stack, 0.0).expect("view"));
        let list = ds["datasources"].as_array().expect("list");
        let uids: Vec<&str> = list.iter().filter_map(|d| d["uid"].as_str()).collect();
        assert_eq!(uids, ["prometheus", "tempo", "loki"]);
        let by = |uid: &str| list.iter().find(|d| d["uid"] == uid).expect("datasource").clone();
        assert_eq!(by("prometheus")["jsonData"]["exemplarTraceIdDestinations"][0]["datasourceUid"], "tempo");
        assert_eq!(by("tempo")["jsonData"]["tracesToLogsV2"]["datasourceUid"], "loki");
        assert_eq!(by("tempo")["jsonData"]["tracesToMetrics"]["datasourceUid"], "prometheus");
        assert_eq!(by("loki")["jsonData"]["derivedFields"][0]["datasourceUid"], "tempo");
        assert_eq!(by("loki")["jsonData"]["derivedFields"][0]["matcherRegex"], "trace_id");

        // Without Loki nothing links to it.
        let stack = view(json!({"loki": {"enabled": false}}));
        let ds = datasources(&Stack::new(&stack, 0.0).expect("view"));
        let text = ds.to_string();
        assert!(!text.contains("\"loki\""), "{text}");
    }

    #[test]
    fn jaeger_and_victorialogs_get_their_own_datasources_wired_to_each_other() {
        let stack = view(json!({
            "tempo": {"enabled": false, "externalUrl": "http://jaeger:4318/", "externalApi": "Jaeger",
                      "externalQueryUrl": "http://jaeger:16686"},
            "loki": {"enabled": false, "externalUrl": "http://victorialogs:9428", "externalApi": "VictoriaLogs"},
        }));
        let stack = Stack::new(&stack, 0.0).expect("view");
        let ds = datasources(&stack);
        let list = ds["datasources"].as_array().expect("list");
        let by = |uid: &str| list.iter().find(|d| d["uid"] == uid).expect("datasource").clone();
        assert_eq!(
            list.iter().filter_map(|d| d["uid"].as_str()).collect::<Vec<_>>(),
            ["prometheus", "jaeger", "victorialogs"]
        );
        assert_eq!(by("jaeger")["type"], "jaeger");
        assert_eq!(by("jaeger")["url"], "http://jaeger:16686", "Grafana reads the query service, not OTLP");
        assert_eq!(by("victorialogs")["type"], VICTORIALOGS_PLUGIN);
        assert_eq!(by("prometheus")["jsonData"]["exemplarTraceIdDestinations"][0]["datasourceUid"], "jaeger");
        assert_eq!(by("jaeger")["jsonData"]["tracesToLogsV2"]["datasourceUid"], "victorialogs");
        assert_eq!(by("jaeger")["jsonData"]["tracesToLogsV2"]["query"], "trace_id:\"$${__trace.traceId}\"");
        assert_eq!(by("victorialogs")["jsonData"]["derivedFields"][0]["datasourceUid"], "jaeger");
        assert!(!ds.to_string().contains("\"tempo\""), "nothing links to a Tempo that is not there");
        assert_eq!(stack.traces_otlp_http().as_deref(), Some("http://jaeger:4318/v1/traces"));
        assert_eq!(stack.logs_otlp_http().as_deref(), Some("http://victorialogs:9428/insert/opentelemetry/v1/logs"));
        let objects = build(&stack);
        let text = serde_json::to_string(&objects.iter().map(StackObject::to_value).collect::<Vec<_>>()).expect("json");
        assert!(text.contains(&format!("\"GF_PLUGINS_PREINSTALL\",\"value\":\"{VICTORIALOGS_PLUGIN}\"")), "{text}");
    }

    #[test]
    fn the_admin_login_comes_from_a_secret_never_a_literal() {
        let stack = view(json!({"grafana": {"adminCredentialsSecretRef": {"name": "mine"}}}));
        let objects = build(&Stack::new(&stack, 0.0).expect("view"));
        let text = serde_json::to_string(&objects.iter().map(StackObject::to_value).collect::<Vec<_>>()).expect("json");
        assert!(text.contains("\"name\":\"mine\"") && !text.contains("admin-password\":\""), "no literal password");
        assert!(!text.contains("GF_SECURITY_ADMIN_PASSWORD\",\"value\""));
    }
}
