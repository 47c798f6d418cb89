//! The provisioned "Workflow runs" dashboard over the ten seed metrics of the user's system.
//!
//! The stack's Prometheus names OTLP metrics by the translation its generated configuration pins
//! (UnderscoreEscapingWithoutSuffixes): the spec's names with dots as underscores, no `_total` or unit appended
//! (`workflow_step_status`, `workflow_run_duration_ms_bucket`).

use serde_json::{Value, json};

/// The dashboard's uid, stable across provisioning (links and the README use it).
pub const UID: &str = "flowtel-workflow-runs";

/// One panel: its title, unit and PromQL queries (expression, legend).
pub struct Panel {
    pub title: &'static str,
    pub unit: &'static str,
    pub queries: Vec<(String, &'static str)>,
}

fn panel(title: &'static str, unit: &'static str, expr: &str, legend: &'static str) -> Panel {
    Panel { title, unit, queries: vec![(expr.to_string(), legend)] }
}

/// p50, p95 and p99 of a histogram by workflow.
fn quantiles(title: &'static str, metric: &str) -> Panel {
    let queries =
        [("0.5", "p50 {{workflow_name}}"), ("0.95", "p95 {{workflow_name}}"), ("0.99", "p99 {{workflow_name}}")]
            .into_iter()
            .map(|(q, legend)| {
                (
                    format!(
                        "histogram_quantile({q}, sum by (le, workflow_name) (rate({metric}_bucket[$__rate_interval])))"
                    ),
                    legend,
                )
            })
            .collect();
    Panel { title, unit: "ms", queries }
}

/// The panels, in dashboard order.
pub fn panels() -> Vec<Panel> {
    vec![
        panel(
            "Run rate",
            "reqps",
            "sum by (workflow_name) (rate(workflow_run_total[$__rate_interval]))",
            "{{workflow_name}}",
        ),
        panel(
            "Success ratio",
            "percentunit",
            "sum by (workflow_name) (rate(workflow_run_status{status=\"success\"}[$__rate_interval])) / \
             sum by (workflow_name) (rate(workflow_run_status[$__rate_interval]))",
            "{{workflow_name}}",
        ),
        panel(
            "Runs by status",
            "reqps",
            "sum by (workflow_name, status) (rate(workflow_run_status[$__rate_interval]))",
            "{{workflow_name}} {{status}}",
        ),
        quantiles("Run duration", "workflow_run_duration_ms"),
        panel(
            "Retries",
            "reqps",
            "sum by (workflow_name, step_name) (rate(workflow_retry_count[$__rate_interval]))",
            "{{workflow_name}} {{step_name}}",
        ),
        panel(
            "Step duration p95",
            "ms",
            "histogram_quantile(0.95, sum by (le, workflow_name, step_name) \
             (rate(workflow_step_duration_ms_bucket[$__rate_interval])))",
            "{{workflow_name}} {{step_name}}",
        ),
        panel(
            "Step statuses",
            "reqps",
            "sum by (workflow_name, step_name, status) (rate(workflow_step_status[$__rate_interval]))",
            "{{workflow_name}} {{step_name}} {{status}}",
        ),
        panel(
            "Image uploads",
            "reqps",
            "sum by (workflow_name) (rate(workflow_image_uploaded[$__rate_interval]))",
            "{{workflow_name}}",
        ),
        panel(
            "Image bytes uploaded",
            "Bps",
            "sum by (workflow_name) (rate(workflow_image_size_bytes_sum[$__rate_interval]))",
            "{{workflow_name}}",
        ),
        panel(
            "DB upserts",
            "reqps",
            "sum by (workflow_name, table_name) (rate(workflow_db_upsert[$__rate_interval]))",
            "{{workflow_name}} {{table_name}}",
        ),
        panel(
            "DB upsert duration p95",
            "ms",
            "histogram_quantile(0.95, sum by (le, workflow_name, table_name) \
             (rate(workflow_db_upsert_duration_ms_bucket[$__rate_interval])))",
            "{{workflow_name}} {{table_name}}",
        ),
    ]
}

/// Every PromQL expression of the dashboard, with `$__rate_interval` as Grafana substitutes it (for parsing).
pub fn expressions() -> Vec<String> {
    panels().into_iter().flat_map(|p| p.queries).map(|(expr, _)| expr.replace("$__rate_interval", "5m")).collect()
}

/// The dashboard JSON Grafana provisions.
pub fn json() -> Value {
    let panels: Vec<Value> = panels()
        .into_iter()
        .enumerate()
        .map(|(i, Panel { title, unit, queries })| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dashboard_expression_parses_as_promql() {
        let expressions = expressions();
        assert_eq!(expressions.len(), 13, "every panel's queries are checked");
        for expr in expressions {
            if let Err(e) = promql_parser::parser::parse(&expr) {
                panic!("{expr}: {e}");
            }
        }
    }

    #[test]
    fn a_broken_expression_is_refused_by_the_same_parser() {
        assert!(promql_parser::parser::parse("sum by (workflow_name (rate(workflow_run_total[5m]))").is_err());
    }

    #[test]
    fn the_dashboard_covers_the_ten_seed_metrics() {
        let all = expressions().join("\n");
        for metric in [
            "workflow_run_total",
            "workflow_run_duration_ms",
            "workflow_run_status",
            "workflow_step_duration_ms",
            "workflow_step_status",
            "workflow_retry_count",
            "workflow_image_uploaded",
            "workflow_image_size_bytes",
            "workflow_db_upsert",
            "workflow_db_upsert_duration_ms",
        ] {
            assert!(all.contains(metric), "{metric} has no panel");
        }
    }
}
