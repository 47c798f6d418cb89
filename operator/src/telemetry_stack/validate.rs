//! Checks the apiserver's schema cannot make: pure functions of the stack (and of what exists beside it), each
//! failure naming the field. The collector configuration check mirrors `otelcol validate` of flowtel's collector
//! build for the components the generated configurations use (the e2e tests hold the two to the same verdicts).

use flowtel_crds::telemetry_stack::{CollectorMode, TelemetryStackSpec};
use serde_json::Value;

/// One reason a stack cannot be rolled out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// The field at fault, as `kubectl explain` spells it (`spec.collector.configOverride`).
    pub field: String,
    pub message: String,
    /// The condition reason: CamelCase, stable, for alerts and `kubectl wait`.
    pub reason: &'static str,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn invalid(field: &str, message: impl Into<String>) -> Invalid {
    Invalid { field: field.into(), message: message.into(), reason: "InvalidSpec" }
}

/// The rules the CRD's CEL also enforces, checked again for `flowtel render` (no apiserver) and for objects stored
/// before a rule existed.
pub fn spec(spec: &TelemetryStackSpec) -> Vec<Invalid> {
    let mut out = Vec::new();
    let c = &spec.collector;
    if c.spike_limit_percent >= c.memory_limit_percent {
        out.push(invalid("spec.collector.spikeLimitPercent", "must be below memoryLimitPercent"));
    }
    if let Some(a) = &c.autoscaling
        && a.min_replicas > a.max_replicas
    {
        out.push(invalid(
            "spec.collector.autoscaling.minReplicas",
            format!("minReplicas {} exceeds maxReplicas {}", a.min_replicas, a.max_replicas),
        ));
    }
    if c.persistent_queue.is_some() && c.mode != CollectorMode::StatefulSet {
        out.push(invalid("spec.collector.persistentQueue", "needs mode StatefulSet"));
    }
    if c.tail_sampling.is_some() {
        let many = c.mode == CollectorMode::DaemonSet
            || c.replicas > 1
            || c.autoscaling.as_ref().is_some_and(|a| a.max_replicas > 1);
        if many {
            out.push(invalid(
                "spec.collector.tailSampling",
                "needs a single collector replica: the trace-id routing tier (loadbalancing exporter) does not build \
                 at the pinned collector release",
            ));
        }
    }
    if c.external_endpoint.is_some() && c.enabled {
        out.push(invalid("spec.collector.externalEndpoint", "set enabled to false to use an external collector"));
    }
    let backends = [
        ("prometheus", spec.prometheus.enabled, spec.prometheus.external_url.is_some()),
        ("tempo", spec.tempo.enabled, spec.tempo.external_url.is_some()),
        ("loki", spec.loki.enabled, spec.loki.external_url.is_some()),
    ];
    for (name, enabled, external) in backends {
        if enabled && external {
            out.push(invalid(&format!("spec.{name}.externalUrl"), "set enabled to false to use an external backend"));
        }
    }
    let external_only = [
        ("spec.tempo.externalApi", spec.tempo.external_api.is_some(), spec.tempo.external_url.is_none()),
        ("spec.tempo.externalQueryUrl", spec.tempo.external_query_url.is_some(), spec.tempo.external_url.is_none()),
        ("spec.loki.externalApi", spec.loki.external_api.is_some(), spec.loki.external_url.is_none()),
    ];
    for (field, set, no_url) in external_only {
        if set && no_url {
            out.push(invalid(field, "describes an external backend: set externalUrl (and enabled: false)"));
        }
    }
    let any_backend = backends.iter().any(|(_, enabled, external)| *enabled || *external);
    if spec.grafana.enabled && !any_backend {
        out.push(invalid(
            "spec.grafana.enabled",
            "grafana is enabled but every datasource (prometheus, tempo, loki) is disabled with no externalUrl",
        ));
    }
    if c.enabled && !any_backend {
        out.push(invalid(
            "spec.collector.enabled",
            "the collector is enabled but has no backend to export to (prometheus, tempo and loki are all disabled)",
        ));
    }
    for (field, retention) in [
        ("spec.prometheus.retention", &spec.prometheus.retention),
        ("spec.tempo.retention", &spec.tempo.retention),
        ("spec.loki.retention", &spec.loki.retention),
    ] {
        if !is_duration(retention) {
            out.push(invalid(field, format!("{retention:?} is not a duration such as 30d, 1h or 90m")));
        }
    }
    out
}

/// A Prometheus-style duration: digits and one unit (ms, s, m, h, d, w, y).
fn is_duration(text: &str) -> bool {
    let digits = text.chars().take_while(char::is_ascii_digit).count();
    digits > 0 && ["ms", "s", "m", "h", "d", "w", "y"].contains(&&text[digits..])
}

/// The component types flowtel's collector build holds, by section (the contrib image the stack deploys holds
/// them too). A configuration naming another type is refused, as `otelcol validate` of that build refuses it.
const KNOWN: [(&str, &[&str]); 5] = [
    ("receivers", &["otlp"]),
    (
        "processors",
        &[
            "batch",
            "memory_limiter",
            "attributes",
            "tail_sampling",
            "deltatocumulative",
            "delta_to_cumulative",
            "transform",
            "interval",
        ],
    ),
    ("exporters", &["otlp", "otlp_grpc", "otlphttp", "otlp_http", "file"]),
    ("extensions", &["health_check", "file_storage"]),
    ("connectors", &[]),
];

const SIGNALS: [&str; 3] = ["traces", "metrics", "logs"];

fn component_type(id: &str) -> &str {
    id.split_once('/').map_or(id, |(t, _)| t)
}

fn as_map<'a>(value: &'a Value, at: &str) -> Result<Option<&'a serde_json::Map<String, Value>>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Object(m) => Ok(Some(m)),
        other => Err(format!("{at}: expected a mapping, found {}", kind(other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn string_list(value: Option<&Value>, at: &str) -> Result<Vec<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(|| format!("{at}: expected component ids (strings)")))
            .collect(),
        Some(other) => Err(format!("{at}: expected a list, found {}", kind(other))),
    }
}

/// A collector configuration's structure: known sections and component types, pipelines that receive and export,
/// every reference defined, and the settings of the components flowtel generates.
pub fn collector_config(config: &Value) -> Result<(), String> {
    let top = as_map(config, "the configuration")?.ok_or("the configuration is empty")?;
    for key in top.keys() {
        if !matches!(key.as_str(), "receivers" | "processors" | "exporters" | "extensions" | "connectors" | "service") {
            return Err(format!("'{key}' is not a collector configuration section"));
        }
    }
    for (section, types) in KNOWN {
        let Some(components) = top.get(section).map(|v| as_map(v, section)).transpose()?.flatten() else {
            continue;
        };
        for (id, settings) in components {
            let t = component_type(id);
            if t.is_empty() || id.ends_with('/') {
                return Err(format!("{section}: '{id}' is not a valid component id"));
            }
            if !types.contains(&t) {
                return Err(format!("{section}: unknown type {t:?} for id {id:?} (valid values: {types:?})"));
            }
            component_settings(section, t, id, settings)?;
        }
    }
    let defined = |section: &str, id: &str| top.get(section).and_then(|s| s.get(id)).is_some();
    let service = top.get("service").map(|v| as_map(v, "service")).transpose()?.flatten().ok_or("service: missing")?;
    for key in service.keys() {
        if !matches!(key.as_str(), "extensions" | "pipelines" | "telemetry") {
            return Err(format!("service: '{key}' is not a service setting"));
        }
    }
    for id in string_list(service.get("extensions"), "service.extensions")? {
        if !defined("extensions", &id) {
            return Err(format!("service.extensions: references extension {id:?} which is not configured"));
        }
    }
    let pipelines = service
        .get("pipelines")
        .map(|v| as_map(v, "service.pipelines"))
        .transpose()?
        .flatten()
        .filter(|p| !p.is_empty())
        .ok_or("service.pipelines: at least one pipeline must be configured")?;
    for (id, pipeline) in pipelines {
        let at = format!("service.pipelines.{id}");
        if !SIGNALS.contains(&component_type(id)) {
            return Err(format!("{at}: unknown signal {:?} (traces, metrics or logs)", component_type(id)));
        }
        let pipeline = as_map(pipeline, &at)?.ok_or_else(|| format!("{at}: must have at least one receiver"))?;
        for key in pipeline.keys() {
            if !matches!(key.as_str(), "receivers" | "processors" | "exporters") {
                return Err(format!("{at}: '{key}' is not a pipeline setting"));
            }
        }
        for (list, section, what) in [
            ("receivers", "receivers", "receiver"),
            ("processors", "processors", "processor"),
            ("exporters", "exporters", "exporter"),
        ] {
            let ids = string_list(pipeline.get(list), &format!("{at}.{list}"))?;
            if ids.is_empty() && list != "processors" {
                return Err(format!("{at}: must have at least one {what}"));
            }
            let mut seen = std::collections::BTreeSet::new();
            for r in &ids {
                if !defined(section, r) {
                    return Err(format!("{at}: references {what} {r:?} which is not configured"));
                }
                if !seen.insert(r) {
                    return Err(format!("{at}: references {what} {r:?} more than once"));
                }
            }
        }
    }
    // A sending queue's storage must be a configured storage extension.
    if let Some(exporters) = top.get("exporters").and_then(Value::as_object) {
        for (id, settings) in exporters {
            if let Some(storage) = settings.pointer("/sending_queue/storage").and_then(Value::as_str)
                && !defined("extensions", storage)
            {
                return Err(format!("exporters.{id}.sending_queue.storage: extension {storage:?} is not configured"));
            }
        }
    }
    Ok(())
}

/// The settings of the components flowtel generates: unknown keys and values their own validation refuses.
fn component_settings(section: &str, t: &str, id: &str, settings: &Value) -> Result<(), String> {
    let at = format!("{section}.{id}");
    let Some(map) = as_map(settings, &at)? else { return Ok(()) };
    let allow = |keys: &[&str]| -> Result<(), String> {
        match map.keys().find(|k| !keys.contains(&k.as_str())) {
            Some(k) => Err(format!("{at}: has invalid keys: {k}")),
            None => Ok(()),
        }
    };
    let int = |key: &str| map.get(key).and_then(Value::as_i64).unwrap_or(0);
    match (section, t) {
        ("processors", "memory_limiter") => {
            allow(&[
                "check_interval",
                "limit_mib",
                "spike_limit_mib",
                "limit_percentage",
                "spike_limit_percentage",
                "min_gc_interval_when_soft_limited",
                "min_gc_interval_when_hard_limited",
            ])?;
            let interval = map.get("check_interval").and_then(Value::as_str).unwrap_or("0s");
            if interval.trim_start_matches('0').is_empty() || interval.starts_with("0s") || interval.starts_with('-') {
                return Err(format!("{at}: checkInterval must be greater than zero"));
            }
            let (limit_mib, limit_pct) = (int("limit_mib"), int("limit_percentage"));
            if limit_mib <= 0 && limit_pct <= 0 {
                return Err(format!("{at}: memoryLimitMiB or memoryLimitPercentage must be greater than zero"));
            }
            if limit_pct > 0 && (limit_pct > 100 || int("spike_limit_percentage") >= limit_pct) {
                return Err(format!(
                    "{at}: memoryLimitPercentage and memorySpikePercentage must be greater than zero and less than or \
                     equal to hundred, and the spike below the limit"
                ));
            }
        }
        ("processors", "batch") => {
            allow(&[
                "timeout",
                "send_batch_size",
                "send_batch_max_size",
                "metadata_keys",
                "metadata_cardinality_limit",
            ])?;
            let (size, max) = (int("send_batch_size"), int("send_batch_max_size"));
            if max > 0 && max < size {
                return Err(format!("{at}: send_batch_max_size must be greater or equal to send_batch_size"));
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal() -> Value {
        json!({
            "receivers": {"otlp": {"protocols": {"grpc": {}}}},
            "processors": {"batch": {}},
            "exporters": {"otlp_grpc/tempo": {"endpoint": "tempo:4317"}},
            "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"], "exporters": ["otlp_grpc/tempo"]}}},
        })
    }

    #[test]
    fn a_minimal_configuration_passes() {
        assert_eq!(collector_config(&minimal()), Ok(()));
    }

    #[test]
    fn each_broken_configuration_is_refused_with_what_is_wrong() {
        let cases: [(&str, Value, &str); 7] = [
            ("/service/pipelines/traces/exporters", json!(["otlp_grpc/nowhere"]), "not configured"),
            ("/service/pipelines/traces/receivers", json!([]), "at least one receiver"),
            ("/processors/kafka", json!({}), "unknown type \"kafka\""),
            ("/processors/batch", json!({"send_batch_size": 10, "send_batch_max_size": 5}), "send_batch_max_size"),
            ("/processors/batch", json!({"sendbatchsize": 10}), "invalid keys: sendbatchsize"),
            (
                "/service/pipelines/spans",
                json!({"receivers": ["otlp"], "exporters": ["otlp_grpc/tempo"]}),
                "unknown signal",
            ),
            ("/service/extensions", json!(["health_check"]), "not configured"),
        ];
        for (path, value, expected) in cases {
            let mut config = minimal();
            let (parent, key) = path.rsplit_once('/').unwrap();
            config.pointer_mut(parent).unwrap()[key] = value;
            let verdict = collector_config(&config);
            assert!(
                matches!(&verdict, Err(m) if m.contains(expected)),
                "{path}: expected an error containing {expected:?}, got {verdict:?}"
            );
        }
    }

    #[test]
    fn an_external_backends_api_without_its_url_names_the_field() {
        let stack: TelemetryStackSpec = serde_json::from_value(json!({
            "tempo": {"externalQueryUrl": "http://jaeger:16686"},
            "loki": {"enabled": false, "externalApi": "VictoriaLogs"},
        }))
        .expect("spec");
        let fields: Vec<String> = spec(&stack).into_iter().map(|i| i.field).collect();
        assert_eq!(fields, ["spec.tempo.externalQueryUrl", "spec.loki.externalApi"]);
    }

    #[test]
    fn durations_are_digits_and_one_unit() {
        for good in ["30d", "1h", "90m", "500ms", "2w"] {
            assert!(is_duration(good), "{good}");
        }
        for bad in ["30 days", "d", "1.5h", "", "1hh", "-1h"] {
            assert!(!is_duration(bad), "{bad}");
        }
    }
}
