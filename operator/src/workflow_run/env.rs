//! Where a Job's environment is decided: the OpenTelemetry variables flowtel adds to every container of an attempt.
//!
//! Rules (docs/workflow-runs.md, "The injected environment"):
//! - a variable the user set wins; flowtel only adds what is missing;
//! - a user `OTEL_RESOURCE_ATTRIBUTES` (a plain value) is merged key by key, the user's keys winning;
//! - `OTEL_RESOURCE_ATTRIBUTES` goes last, after the downward-API variables it references as `$(VAR)`, because
//!   Kubernetes expands `$(VAR)` only for variables defined earlier in the list.

use k8s_openapi::api::core::v1::EnvVar;

use crate::runtime::{env_from_field as field_ref, env_var as plain};

/// Downward-API variable holding the pod's name (the name the OpenTelemetry Operator uses too).
pub const POD_NAME_VAR: &str = "OTEL_RESOURCE_ATTRIBUTES_POD_NAME";
/// Downward-API variable holding the node's name.
pub const NODE_NAME_VAR: &str = "OTEL_RESOURCE_ATTRIBUTES_NODE_NAME";

/// What the injected environment is made of, for one attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Injection {
    /// The workflow name: `OTEL_SERVICE_NAME` and `workflow.name`.
    pub workflow_name: String,
    /// `service.version`.
    pub service_version: String,
    /// The run's UID: `workflow.run_id`.
    pub run_uid: String,
    pub attempt: i32,
    pub namespace: String,
    pub job_name: String,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, when an endpoint is known.
    pub otlp_endpoint: Option<String>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or `http/protobuf`).
    pub otlp_protocol: String,
    /// W3C trace context naming the attempt's span.
    pub traceparent: String,
}

impl Injection {
    /// Resource attributes flowtel sets, in order.
    fn resource_attributes(&self) -> Vec<(&'static str, String)> {
        vec![
            ("service.version", self.service_version.clone()),
            ("workflow.name", self.workflow_name.clone()),
            ("workflow.run_id", self.run_uid.clone()),
            ("workflow.attempt", self.attempt.to_string()),
            ("k8s.namespace.name", self.namespace.clone()),
            ("k8s.job.name", self.job_name.clone()),
            ("k8s.pod.name", format!("$({POD_NAME_VAR})")),
            ("k8s.node.name", format!("$({NODE_NAME_VAR})")),
        ]
    }
}

/// Merges `OTEL_RESOURCE_ATTRIBUTES` values: the user's `key=value` pairs first and winning, then ours for keys
/// the user did not set (read and written by the library's parser: values percent-encoded, as the spec has them).
fn merge_resource_attributes(user: Option<&str>, ours: &[(&'static str, String)]) -> String {
    let mut pairs = flowtel_telemetry::resource_attributes::parse(user.unwrap_or_default());
    for (k, v) in ours {
        if !pairs.iter().any(|(uk, _)| uk == k) {
            pairs.push((k.to_string(), v.clone()));
        }
    }
    flowtel_telemetry::resource_attributes::format(&pairs)
}

/// A container's environment with flowtel's variables added.
pub fn inject(user_env: &[EnvVar], injection: &Injection) -> Vec<EnvVar> {
    let is_set = |name: &str| user_env.iter().any(|e| e.name == name);
    let user_attributes = user_env.iter().find(|e| e.name == "OTEL_RESOURCE_ATTRIBUTES");
    // A user OTEL_RESOURCE_ATTRIBUTES from valueFrom cannot be merged: it wins whole and stays where it is.
    let merge_attributes = user_attributes.is_none_or(|e| e.value_from.is_none());

    let mut env: Vec<EnvVar> =
        user_env.iter().filter(|e| !(merge_attributes && e.name == "OTEL_RESOURCE_ATTRIBUTES")).cloned().collect();
    let mut add = |var: EnvVar| {
        if !is_set(&var.name) {
            env.push(var);
        }
    };
    add(plain("OTEL_SERVICE_NAME", &injection.workflow_name));
    if let Some(endpoint) = &injection.otlp_endpoint {
        add(plain("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint));
        add(plain("OTEL_EXPORTER_OTLP_PROTOCOL", &injection.otlp_protocol));
    }
    add(plain("OTEL_PROPAGATORS", "tracecontext,baggage"));
    add(plain("TRACEPARENT", &injection.traceparent));
    add(field_ref(POD_NAME_VAR, "metadata.name"));
    add(field_ref(NODE_NAME_VAR, "spec.nodeName"));
    if merge_attributes {
        let user_value = user_attributes.and_then(|e| e.value.as_deref());
        env.push(plain(
            "OTEL_RESOURCE_ATTRIBUTES",
            merge_resource_attributes(user_value, &injection.resource_attributes()),
        ));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn injection() -> Injection {
        Injection {
            workflow_name: "sync".into(),
            service_version: "1.0".into(),
            run_uid: "uid-1".into(),
            attempt: 2,
            namespace: "ns".into(),
            job_name: "run-2".into(),
            otlp_endpoint: Some("http://collector:4317".into()),
            otlp_protocol: "grpc".into(),
            traceparent: "00-aa-bb-01".into(),
        }
    }

    fn value<'a>(env: &'a [EnvVar], name: &str) -> Option<&'a str> {
        env.iter().find(|e| e.name == name).and_then(|e| e.value.as_deref())
    }

    #[test]
    fn injects_everything_into_an_empty_environment() {
        let env = inject(&[], &injection());
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "OTEL_SERVICE_NAME",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "OTEL_PROPAGATORS",
                "TRACEPARENT",
                POD_NAME_VAR,
                NODE_NAME_VAR,
                "OTEL_RESOURCE_ATTRIBUTES",
            ]
        );
        assert_eq!(
            value(&env, "OTEL_RESOURCE_ATTRIBUTES"),
            Some(
                "service.version=1.0,workflow.name=sync,workflow.run_id=uid-1,workflow.attempt=2,\
                 k8s.namespace.name=ns,k8s.job.name=run-2,k8s.pod.name=$(OTEL_RESOURCE_ATTRIBUTES_POD_NAME),\
                 k8s.node.name=$(OTEL_RESOURCE_ATTRIBUTES_NODE_NAME)"
            )
        );
    }

    #[test]
    fn user_variables_win_and_resource_attributes_merge_key_by_key() {
        let user = vec![
            plain("MODE", "full"),
            plain("OTEL_SERVICE_NAME", "custom"),
            plain("OTEL_RESOURCE_ATTRIBUTES", "team=data, workflow.name=mine"),
        ];
        let env = inject(&user, &injection());
        assert_eq!(value(&env, "OTEL_SERVICE_NAME"), Some("custom"));
        assert_eq!(env.iter().filter(|e| e.name == "OTEL_SERVICE_NAME").count(), 1);
        assert_eq!(env[0].name, "MODE");
        let attrs = value(&env, "OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
        assert!(attrs.starts_with("team=data,workflow.name=mine,service.version=1.0,"), "{attrs}");
        assert_eq!(attrs.matches("workflow.name=").count(), 1);
        assert_eq!(env.last().map(|e| e.name.as_str()), Some("OTEL_RESOURCE_ATTRIBUTES"));
    }

    #[test]
    fn no_endpoint_means_no_endpoint_variables() {
        let env = inject(&[], &Injection { otlp_endpoint: None, ..injection() });
        assert!(value(&env, "OTEL_EXPORTER_OTLP_ENDPOINT").is_none());
        assert!(value(&env, "TRACEPARENT").is_some());
    }
}
