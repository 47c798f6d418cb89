//! The provisioned "Workflow runs" dashboard over the ten seed metrics of the user's system.
//!
//! Prometheus names OTLP metrics by its default translation (UnderscoreEscapingWithSuffixes): dots become
//! underscores, counters end in `_total`, and a unit the name does not already spell is appended, so the
//! `ms`-unit histograms read `*_duration_ms_milliseconds_*` and `workflow.image.size_bytes` (unit `By`) keeps its
//! name.

use serde_json::{Value, json};

/// The dashboard's uid, stable across provisioning (links and the README use it).
pub const UID: &str = "flowtel-workflow-runs";

/// Each panel: title, unit, and its PromQL queries with their legends.
pub fn panels() -> Vec<(&'static str, &'static str, Vec<(String, &'static str)>)> {
    let quantiles = |metric: &str, by: &str| -> Vec<(String, &'static str)> {
        [("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")]
            .into_iter()
            .map(|(q, legend)| {
                let legend: &'static str = match (legend, by) {
                    ("p50", _) => "p50 {{workflow_name}}",
                    ("p95", _) => "p95 {{workflow_name}}",
                    _ => "p99 {{workflow_name}}",
                };
                (format!("histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[$__rate_interval])))"), legend)
            })
            .collect()
    };
    vec![
        (
            "Run rate",
            "reqps",
            vec![("sum by (workflow_name) (rate(workflow_run_total[$__rate_interval]))".into(), "{{workflow_name}}")],
        ),
        (
            "Success ratio",
            "percentunit",
            vec![(
                "sum by (workflow_name) (rate(workflow_run_status_total{status=\"success\"}[$__rate_interval])) / \
                 sum by (workflow_name) (rate(workflow_run_status_total[$__rate_interval]))"
                    .into(),
                "{{workflow_name}}",
            )],
        ),
        (
            "Runs by status",
            "reqps",
            vec![(
                "sum by (workflow_name, status) (rate(workflow_run_status_total[$__rate_interval]))".into(),
                "{{workflow_name}} {{status}}",
            )],
        ),
        ("Run duration", "ms", quantiles("workflow_run_duration_ms_milliseconds", "workflow_name")),
        (
            "Retries",
            "reqps",
            vec![(
                "sum by (workflow_name, step_name) (rate(workflow_retry_count_total[$__rate_interval]))".into(),
                "{{workflow_name}} {{step_name}}",
            )],
        ),
        (
            "Step duration p95",
            "ms",
            vec![(
                "histogram_quantile(0.95, sum by (le, workflow_name, step_name) \
                 (rate(workflow_step_duration_ms_milliseconds_bucket[$__rate_interval])))"
                    .into(),
                "{{workflow_name}} {{step_name}}",
            )],
        ),
        (
            "Step statuses",
            "reqps",
            vec![(
                "sum by (workflow_name, step_name, status) (rate(workflow_step_status_total[$__rate_interval]))".into(),
                "{{workflow_name}} {{step_name}} {{status}}",
            )],
        ),
        (
            "Image uploads",
            "reqps",
            vec![(
                "sum by (workflow_name) (rate(workflow_image_uploaded_total[$__rate_interval]))".into(),
                "{{workflow_name}}",
            )],
        ),
        (
            "Image bytes uploaded",
            "Bps",
            vec![(
                "sum by (workflow_name) (rate(workflow_image_size_bytes_sum[$__rate_interval]))".into(),
                "{{workflow_name}}",
            )],
        ),
        (
            "DB upserts",
            "reqps",
            vec![(
                "sum by (workflow_name, table_name) (rate(workflow_db_upsert_total[$__rate_interval]))".into(),
                "{{workflow_name}} {{table_name}}",
            )],
        ),
        (
            "DB upsert duration p95",
            "ms",
            vec![(
                "histogram_quantile(0.95, sum by (le, workflow_name, table_name) \
                 (rate(workflow_db_upsert_duration_ms_milliseconds_bucket[$__rate_interval])))"
                    .into(),
                "{{workflow_name}} {{table_name}}",
            )],
        ),
    ]
}

/// Every PromQL expression of the dashboard, with `$__rate_interval` as Grafana substitutes it (for parsing).
pub fn expressions() -> Vec<String> {
    panels().into_iter().flat_map(|(_, _, q)| q).map(|(expr, _)| expr.replace("$__rate_interval", "5m")).collect()
}

/// The dashboard JSON Grafana provisions.
pub fn json() -> Value {
    let panels: Vec<Value> = panels()
        .into_iter()
        .enumerate()
        .map(|(i, (title, unit, queries))| {
            let targets: Vec<Value> = queries
                .into_iter()
                .enumerate()
                .map(|(j, (expr, legend))| {
                    json!({
                        "refId": char::from(b'A' + j as u8).to_string(),
                        "datasource": {"type": "prometheus", "uid": "prometheus"},
                        "expr": expr,
                        "legendFormat": legend,
                        "exemplar": unit == "ms",
                    })
                })
                .collect();
            json!({
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "prometheus"},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i / 2) * 8},
                "targets": targets,
            })
        })
        .collect();
    json!({
        "uid": UID,
        "title": "Workflow runs",
        "tags": ["flowtel"],
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": []},
        "panels": panels,
    })
}
