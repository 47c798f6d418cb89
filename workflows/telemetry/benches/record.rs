//! The library's cost per call beside the same work done with the raw OpenTelemetry SDK (the same instruments,
//! boundaries and attributes built from the same `&str` arguments). Goal: ≤ 1.1× the raw SDK per call, and the
//! whole instrumentation of a typical run (`sync`: 4 steps, 5 spans, 3 retries, 3 images, 1 upsert) ≤ 2 µs of CPU.
//!
//!   cargo bench -p flowtel-telemetry --bench record
//!
//! Both sides export to an OTLP endpoint nobody listens on (the periodic reader's interval is far longer than a
//! run of the bench): the instruments aggregate for real, nothing is sent.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use flowtel_telemetry::metrics::DURATION_BOUNDARIES;
use flowtel_telemetry::{
    Outcome, SpanKind, SpanOptions, TelemetryOptions, end_span, initialize_telemetry, record_db_upsert,
    record_image_upload, record_retry, record_workflow_step, start_span,
};
use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider;
use opentelemetry::trace::{Span, Tracer, TracerProvider};
use opentelemetry_otlp::WithExportConfig;

const ENDPOINT: &str = "http://127.0.0.1:9";

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _enter = runtime.enter();
    let mut options = TelemetryOptions::new("bench");
    options.otlp_endpoint = Some(ENDPOINT.into());
    options.env.clear();
    let _telemetry = initialize_telemetry(options).expect("telemetry");

    // The raw SDK, set up the same way.
    let exporter =
        opentelemetry_otlp::MetricExporter::builder().with_tonic().with_endpoint(ENDPOINT).build().expect("exporter");
    let meters = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_reader(
            opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
                .with_interval(std::time::Duration::from_secs(3600))
                .build(),
        )
        .build();
    let meter = meters.meter("raw");
    let step_duration =
        meter.f64_histogram("raw.step.duration_ms").with_boundaries(DURATION_BOUNDARIES.to_vec()).build();
    let step_status = meter.u64_counter("raw.step.status").build();
    let retries = meter.u64_counter("raw.retry.count").build();
    let spans =
        opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(ENDPOINT).build().expect("spans");
    let tracers = opentelemetry_sdk::trace::SdkTracerProvider::builder().with_batch_exporter(spans).build();
    let tracer = tracers.tracer("raw");

    let (workflow, step) = (black_box("sync"), black_box("upload_images"));
    let mut g = c.benchmark_group("per call");
    g.bench_function("record_workflow_step", |b| b.iter(|| record_workflow_step(workflow, step, 42.0, "success")));
    g.bench_function("raw SDK: step duration + status", |b| {
        b.iter(|| {
            let labels =
                [KeyValue::new("workflow_name", workflow.to_string()), KeyValue::new("step_name", step.to_string())];
            step_duration.record(42.0, &labels);
            step_status.add(
                1,
                &[
                    KeyValue::new("workflow_name", workflow.to_string()),
                    KeyValue::new("step_name", step.to_string()),
                    KeyValue::new("status", "success".to_string()),
                ],
            );
        });
    });
    g.bench_function("record_retry", |b| b.iter(|| record_retry(workflow, step)));
    g.bench_function("raw SDK: retry counter", |b| {
        b.iter(|| {
            retries.add(
                1,
                &[KeyValue::new("workflow_name", workflow.to_string()), KeyValue::new("step_name", step.to_string())],
            );
        });
    });
    g.bench_function("record_image_upload", |b| b.iter(|| record_image_upload(workflow, "phone_1", 250_000)));
    g.bench_function("record_db_upsert", |b| b.iter(|| record_db_upsert(workflow, "processed_phones", 5, 12.0)));
    g.bench_function("start_span + end_span", |b| {
        b.iter(|| end_span(start_span("step upload_images", SpanOptions::new(SpanKind::Internal)), Outcome::Success));
    });
    g.bench_function("raw SDK: span start + end", |b| {
        b.iter(|| {
            let mut span = tracer
                .span_builder("step upload_images")
                .with_kind(opentelemetry::trace::SpanKind::Internal)
                .start(&tracer);
            span.set_status(opentelemetry::trace::Status::Ok);
            span.end();
        });
    });
    g.finish();

    c.bench_function("a typical run's instrumentation (sync)", |b| {
        b.iter(|| {
            let root = start_span("workflow sync", SpanOptions::new(SpanKind::Server));
            for s in ["fetch_source", "transform", "upsert_phones", "upload_images"] {
                let span = start_span(s, SpanOptions::new(SpanKind::Internal));
                record_workflow_step(workflow, s, 12.0, "success");
                end_span(span, Outcome::Success);
            }
            for _ in 0..3 {
                record_retry(workflow, "upload_images");
                record_image_upload(workflow, "phone_1", 250_000);
            }
            record_db_upsert(workflow, "processed_phones", 3, 8.0);
            end_span(root, Outcome::Success);
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
