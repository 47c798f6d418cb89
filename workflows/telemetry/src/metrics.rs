//! The ten workflow metrics of the user's system, with exactly its names, labels and duration buckets.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `workflow.run.total` | counter | `workflow_name` |
//! | `workflow.run.duration_ms` | histogram | `workflow_name` |
//! | `workflow.run.status` | counter | `workflow_name`, `status` |
//! | `workflow.step.duration_ms` | histogram | `workflow_name`, `step_name` |
//! | `workflow.step.status` | counter | `workflow_name`, `step_name`, `status` |
//! | `workflow.retry.count` | counter | `workflow_name`, `step_name` |
//! | `workflow.image.uploaded` | counter | `workflow_name`, `phone_id` |
//! | `workflow.image.size_bytes` | histogram | `workflow_name`, `phone_id` |
//! | `workflow.db.upsert` | counter | `workflow_name`, `table_name` |
//! | `workflow.db.upsert.duration_ms` | histogram | `workflow_name`, `table_name` |
//!
//! Durations use the user's boundaries ([`DURATION_BOUNDARIES`], milliseconds); image sizes use
//! [`SIZE_BOUNDARIES`] (bytes). Metrics are exported with delta temporality and a resource of the service only
//! (`service.name`, `service.version`, `deployment.environment`; not the run's pod or Job), so the points of every
//! run of a workflow add up to one series per label set instead of a series per run; the stack's collector turns
//! them cumulative (`deltatocumulative`). `phone_id` is a high-cardinality label: the TelemetryStack's cardinality
//! guard drops or hashes it by default.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};

use crate::RunMetrics;

/// The user's duration buckets, in milliseconds.
pub const DURATION_BOUNDARIES: [f64; 11] =
    [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];
/// Image size buckets, in bytes: 10 KB to 50 MB.
pub const SIZE_BOUNDARIES: [f64; 9] =
    [10_000.0, 50_000.0, 100_000.0, 250_000.0, 500_000.0, 1_000_000.0, 2_500_000.0, 10_000_000.0, 50_000_000.0];

pub(crate) struct Instruments {
    run_total: Counter<u64>,
    run_duration: Histogram<f64>,
    run_status: Counter<u64>,
    step_duration: Histogram<f64>,
    step_status: Counter<u64>,
    retry_count: Counter<u64>,
    image_uploaded: Counter<u64>,
    image_size: Histogram<f64>,
    db_upsert: Counter<u64>,
    db_upsert_duration: Histogram<f64>,
}

impl Instruments {
    pub(crate) fn new(meter: &Meter) -> Self {
        let counter = |name: &'static str, description: &'static str| {
            meter.u64_counter(name).with_description(description).build()
        };
        let duration = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_description(description)
                .with_unit("ms")
                .with_boundaries(DURATION_BOUNDARIES.to_vec())
                .build()
        };
        Self {
            run_total: counter("workflow.run.total", "Total workflow runs"),
            run_duration: duration("workflow.run.duration_ms", "Workflow duration"),
            run_status: counter("workflow.run.status", "Workflow status"),
            step_duration: duration("workflow.step.duration_ms", "Step duration"),
            step_status: counter("workflow.step.status", "Step status"),
            retry_count: counter("workflow.retry.count", "Retry count"),
            image_uploaded: counter("workflow.image.uploaded", "Images uploaded"),
            image_size: meter
                .f64_histogram("workflow.image.size_bytes")
                .with_description("Image sizes")
                .with_unit("By")
                .with_boundaries(SIZE_BOUNDARIES.to_vec())
                .build(),
            db_upsert: counter("workflow.db.upsert", "DB upsert operations"),
            db_upsert_duration: duration("workflow.db.upsert.duration_ms", "DB upsert duration"),
        }
    }
}

fn workflow(name: &str) -> KeyValue {
    KeyValue::new("workflow_name", name.to_string())
}

/// A whole run (`recordWorkflowRun`): `workflow.run.total`, `workflow.run.duration_ms` and `workflow.run.status`.
/// Under flowtel ([`RunMetrics::Operator`]) it records none of them: the operator counts the run once, across its
/// own restarts and the run's attempts, and a workload counting too would count every attempt again.
pub fn record_workflow_run(workflow_name: &str, duration_ms: f64, status: &str) {
    let Some(g) = crate::global() else { return };
    if g.run_metrics == RunMetrics::Operator {
        return;
    }
    let i = &g.instruments;
    i.run_total.add(1, &[workflow(workflow_name)]);
    i.run_duration.record(duration_ms, &[workflow(workflow_name)]);
    i.run_status.add(1, &[workflow(workflow_name), KeyValue::new("status", status.to_string())]);
}

/// One step (`recordWorkflowStep`): `workflow.step.duration_ms` and `workflow.step.status`.
pub fn record_workflow_step(workflow_name: &str, step_name: &str, duration_ms: f64, status: &str) {
    let Some(g) = crate::global() else { return };
    let step = KeyValue::new("step_name", step_name.to_string());
    g.instruments.step_duration.record(duration_ms, &[workflow(workflow_name), step.clone()]);
    g.instruments.step_status.add(1, &[workflow(workflow_name), step, KeyValue::new("status", status.to_string())]);
}

/// One retry of a step (`recordRetry`): `workflow.retry.count`.
pub fn record_retry(workflow_name: &str, step_name: &str) {
    let Some(g) = crate::global() else { return };
    g.instruments.retry_count.add(1, &[workflow(workflow_name), KeyValue::new("step_name", step_name.to_string())]);
}

/// One uploaded image (`recordImageUpload`): `workflow.image.uploaded` and `workflow.image.size_bytes`.
pub fn record_image_upload(workflow_name: &str, phone_id: &str, size_bytes: u64) {
    let Some(g) = crate::global() else { return };
    let labels = [workflow(workflow_name), KeyValue::new("phone_id", phone_id.to_string())];
    g.instruments.image_uploaded.add(1, &labels);
    g.instruments.image_size.record(size_bytes as f64, &labels);
}

/// One upsert of `count` rows (`recordDbUpsert`): `workflow.db.upsert` (+count) and
/// `workflow.db.upsert.duration_ms`.
pub fn record_db_upsert(workflow_name: &str, table_name: &str, count: u64, duration_ms: f64) {
    let Some(g) = crate::global() else { return };
    let labels = [workflow(workflow_name), KeyValue::new("table_name", table_name.to_string())];
    g.instruments.db_upsert.add(count, &labels);
    g.instruments.db_upsert_duration.record(duration_ms, &labels);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    use opentelemetry_sdk::metrics::{InMemoryMetricExporterBuilder, PeriodicReader, SdkMeterProvider, Temporality};

    /// One exported metric: name, unit, histogram boundaries, value (or count), attribute keys.
    type Exported = (String, String, Vec<f64>, f64, Vec<String>);

    /// What the instruments export, by metric name.
    fn exported(record: impl FnOnce(&Instruments)) -> Vec<Exported> {
        let exporter = InMemoryMetricExporterBuilder::new().with_temporality(Temporality::Delta).build();
        let provider =
            SdkMeterProvider::builder().with_reader(PeriodicReader::builder(exporter.clone()).build()).build();
        record(&Instruments::new(&provider.meter("test")));
        provider.force_flush().expect("flush");
        let mut out = Vec::new();
        for rm in exporter.get_finished_metrics().expect("metrics") {
            for sm in rm.scope_metrics() {
                for m in sm.metrics() {
                    let (bounds, value, keys) = match m.data() {
                        AggregatedMetrics::U64(MetricData::Sum(s)) => {
                            let p = s.data_points().next().expect("a point");
                            (Vec::new(), p.value() as f64, p.attributes().map(|kv| kv.key.to_string()).collect())
                        }
                        AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                            let p = h.data_points().next().expect("a point");
                            (
                                p.bounds().collect(),
                                p.count() as f64,
                                p.attributes().map(|kv| kv.key.to_string()).collect(),
                            )
                        }
                        other => panic!("unexpected {other:?}"),
                    };
                    let mut keys: Vec<String> = keys;
                    keys.sort();
                    out.push((m.name().to_string(), m.unit().to_string(), bounds, value, keys));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn the_ten_metrics_carry_the_users_names_units_labels_and_buckets() {
        let wf = || KeyValue::new("workflow_name", "sync");
        let got = exported(|i| {
            i.run_total.add(1, &[wf()]);
            i.run_duration.record(1200.0, &[wf()]);
            i.run_status.add(1, &[wf(), KeyValue::new("status", "success")]);
            i.step_duration.record(30.0, &[wf(), KeyValue::new("step_name", "fetch")]);
            i.step_status.add(1, &[wf(), KeyValue::new("step_name", "fetch"), KeyValue::new("status", "success")]);
            i.retry_count.add(2, &[wf(), KeyValue::new("step_name", "fetch")]);
            i.image_uploaded.add(1, &[wf(), KeyValue::new("phone_id", "p1")]);
            i.image_size.record(120_000.0, &[wf(), KeyValue::new("phone_id", "p1")]);
            i.db_upsert.add(5, &[wf(), KeyValue::new("table_name", "phones")]);
            i.db_upsert_duration.record(7.0, &[wf(), KeyValue::new("table_name", "phones")]);
        });
        let duration = DURATION_BOUNDARIES.to_vec();
        let keys = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let expected = vec![
            ("workflow.db.upsert".into(), "".into(), vec![], 5.0, keys(&["table_name", "workflow_name"])),
            (
                "workflow.db.upsert.duration_ms".into(),
                "ms".into(),
                duration.clone(),
                1.0,
                keys(&["table_name", "workflow_name"]),
            ),
            (
                "workflow.image.size_bytes".into(),
                "By".into(),
                SIZE_BOUNDARIES.to_vec(),
                1.0,
                keys(&["phone_id", "workflow_name"]),
            ),
            ("workflow.image.uploaded".into(), "".into(), vec![], 1.0, keys(&["phone_id", "workflow_name"])),
            ("workflow.retry.count".into(), "".into(), vec![], 2.0, keys(&["step_name", "workflow_name"])),
            ("workflow.run.duration_ms".into(), "ms".into(), duration.clone(), 1.0, keys(&["workflow_name"])),
            ("workflow.run.status".into(), "".into(), vec![], 1.0, keys(&["status", "workflow_name"])),
            ("workflow.run.total".into(), "".into(), vec![], 1.0, keys(&["workflow_name"])),
            ("workflow.step.duration_ms".into(), "ms".into(), duration, 1.0, keys(&["step_name", "workflow_name"])),
            ("workflow.step.status".into(), "".into(), vec![], 1.0, keys(&["status", "step_name", "workflow_name"])),
        ];
        assert_eq!(got, expected);
    }
}
