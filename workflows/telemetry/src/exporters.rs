//! The providers behind the library: OTLP gRPC exporters with bounded queues and timeouts, counted so that
//! shutdown can say what was lost; the console fallback behind a circuit breaker ([`crate::fallback`]); the
//! `tracing` bridge that exports logs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry::trace::TracerProvider;
use opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge;
use opentelemetry_otlp::{LogExporter, MetricExporter, RetryPolicy, SpanExporter, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{BatchLogProcessor, LogBatch, SdkLoggerProvider};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider, SpanData, Tracer};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::fallback::{self, Breaker};
use crate::{InitError, TelemetryOptions};

/// What went out and what did not, per signal.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    spans_ended: AtomicU64,
    spans_exported: AtomicU64,
    spans_to_console: AtomicU64,
    logs_emitted: AtomicU64,
    logs_exported: AtomicU64,
    logs_to_console: AtomicU64,
    metric_points_to_console: AtomicU64,
}

impl Counts {
    pub(crate) fn span_ended(&self) {
        self.spans_ended.fetch_add(1, Ordering::Relaxed);
    }
}

/// What `shutdown` could not export: queue overflow and timed-out exports (dropped), and what the fallback printed on
/// the console instead (the endpoint was down: the pod's log holds it, one `otel-fallback` line each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    pub spans_dropped: u64,
    pub logs_dropped: u64,
    pub spans_to_console: u64,
    pub logs_to_console: u64,
    pub metric_points_to_console: u64,
    /// The final metrics flush failed (the backend was down): the last interval's points are lost.
    pub metrics_flush_failed: bool,
    /// Some provider did not finish within the deadline.
    pub timed_out: bool,
}

/// Counts spans the OTLP exporter delivered; sends them to the console while the breaker is open or when the
/// endpoint refused them.
#[derive(Debug)]
struct CountingSpans {
    inner: SpanExporter,
    counts: Arc<Counts>,
    breaker: Arc<Breaker>,
}

impl opentelemetry_sdk::trace::SpanExporter for CountingSpans {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len() as u64;
        let counts = self.counts.clone();
        let breaker = self.breaker.clone();
        // Kept to print if the endpoint refuses the batch (the exporter takes it by value).
        let attempt = breaker.try_endpoint(Instant::now()).then(|| self.inner.export(batch.clone()));
        async move {
            if let Some(export) = attempt {
                let result = export.await;
                breaker.record(result.is_ok(), Instant::now());
                if result.is_ok() {
                    counts.spans_exported.fetch_add(n, Ordering::Relaxed);
                    return result;
                }
            }
            fallback::print(&batch.iter().map(fallback::span_line).collect::<Vec<_>>());
            counts.spans_to_console.fetch_add(n, Ordering::Relaxed);
            Ok(())
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Counts log records the OTLP exporter delivered; like spans, the console takes them while the endpoint is down.
#[derive(Debug)]
struct CountingLogs {
    inner: LogExporter,
    counts: Arc<Counts>,
    breaker: Arc<Breaker>,
}

impl opentelemetry_sdk::logs::LogExporter for CountingLogs {
    fn export(&self, batch: LogBatch<'_>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.iter().count() as u64;
        let counts = self.counts.clone();
        let breaker = self.breaker.clone();
        // The batch borrows its records: the console lines are made now, and printed only if needed.
        let lines: Vec<String> = batch.iter().map(|(record, _)| fallback::log_line(record)).collect();
        let attempt = breaker.try_endpoint(Instant::now()).then(|| self.inner.export(batch));
        async move {
            if let Some(export) = attempt {
                let result = export.await;
                breaker.record(result.is_ok(), Instant::now());
                if result.is_ok() {
                    counts.logs_exported.fetch_add(n, Ordering::Relaxed);
                    return result;
                }
            }
            fallback::print(&lines);
            counts.logs_to_console.fetch_add(n, Ordering::Relaxed);
            Ok(())
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The metric exporter behind its breaker: the points of a refused or skipped export go to the console.
#[derive(Debug)]
struct FallbackMetrics {
    inner: MetricExporter,
    counts: Arc<Counts>,
    breaker: Arc<Breaker>,
}

impl PushMetricExporter for FallbackMetrics {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        if self.breaker.try_endpoint(Instant::now()) {
            let result = self.inner.export(metrics).await;
            self.breaker.record(result.is_ok(), Instant::now());
            if result.is_ok() {
                return result;
            }
        }
        let lines = fallback::metric_lines(metrics);
        fallback::print(&lines);
        self.counts.metric_points_to_console.fetch_add(lines.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// Counts the events the log bridge turns into records.
struct CountEvents(Arc<Counts>);

impl<S: tracing::Subscriber> Layer<S> for CountEvents {
    fn on_event(&self, _event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.logs_emitted.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub(crate) struct Providers {
    tracer: SdkTracerProvider,
    meter: SdkMeterProvider,
    logger: Option<SdkLoggerProvider>,
}

/// Log records of the exporters' own transport would feed back into the exporter.
fn bridge_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new()
        .with_default(tracing::Level::INFO)
        .with_target("hyper", tracing::level_filters::LevelFilter::OFF)
        .with_target("h2", tracing::level_filters::LevelFilter::OFF)
        .with_target("tonic", tracing::level_filters::LevelFilter::OFF)
        .with_target("tower", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry_sdk", tracing::level_filters::LevelFilter::OFF)
        .with_target("opentelemetry_otlp", tracing::level_filters::LevelFilter::OFF)
}

/// Transient failures are retried, briefly: the SDK's recommended policy (3 retries from 100 ms up to 1.6 s) makes
/// the first export to a refused endpoint cost the workflow about 0.9 s before the breaker can open; these retries
/// add at most about 80 ms.
fn quick_retries() -> RetryPolicy {
    RetryPolicy::recommended()
        .with_max_retries(2)
        .with_initial_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_millis(40))
        .with_max_jitter(Duration::from_millis(10))
}

fn exporter_error(signal: &'static str, endpoint: &str, e: impl std::fmt::Display) -> InitError {
    InitError::Exporter { signal, endpoint: endpoint.into(), message: e.to_string() }
}

pub(crate) fn build(options: &TelemetryOptions) -> Result<(Providers, Tracer, Meter, Arc<Counts>), InitError> {
    let counts = Arc::new(Counts::default());
    let service = [
        KeyValue::new("service.name", options.service()),
        KeyValue::new("service.version", options.version()),
        KeyValue::new("deployment.environment", options.environment.clone()),
    ];
    // Traces and logs carry the run's identity; metrics only the service's (see `metrics`).
    let full = Resource::builder_empty()
        .with_attributes(options.resource_attributes().into_iter().map(|(k, v)| KeyValue::new(k, v)))
        .with_attributes(service.clone())
        .build();
    let service_only = Resource::builder_empty().with_attributes(service).build();

    let mut tracer_provider = SdkTracerProvider::builder().with_resource(full.clone());
    let mut meter_provider = SdkMeterProvider::builder().with_resource(service_only);
    let mut logger = None;
    let endpoint = options.endpoint();
    if let Some(endpoint) = &endpoint {
        let timeout = options.export_timeout;
        // One breaker per signal: an endpoint may serve one signal and refuse another (a collector without a logs
        // pipeline answers Unimplemented), and that must not send the others to the console.
        let breaker = || Arc::new(Breaker::new(fallback::COOL_DOWN));
        let spans = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .with_retry_policy(quick_retries())
            .build()
            .map_err(|e| exporter_error("span", endpoint, e))?;
        let span_batches =
            opentelemetry_sdk::trace::BatchConfigBuilder::default().with_max_queue_size(options.queue_size).build();
        let processor =
            BatchSpanProcessor::builder(CountingSpans { inner: spans, counts: counts.clone(), breaker: breaker() })
                .with_batch_config(span_batches)
                .build();
        tracer_provider = tracer_provider.with_span_processor(processor);

        let metrics = MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .with_retry_policy(quick_retries())
            .with_temporality(Temporality::Delta)
            .build()
            .map_err(|e| exporter_error("metric", endpoint, e))?;
        let metrics = FallbackMetrics { inner: metrics, counts: counts.clone(), breaker: breaker() };
        meter_provider =
            meter_provider.with_reader(PeriodicReader::builder(metrics).with_interval(Duration::from_secs(10)).build());

        let logs = LogExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .with_retry_policy(quick_retries())
            .build()
            .map_err(|e| exporter_error("log", endpoint, e))?;
        let log_batches =
            opentelemetry_sdk::logs::BatchConfigBuilder::default().with_max_queue_size(options.queue_size).build();
        let processor =
            BatchLogProcessor::builder(CountingLogs { inner: logs, counts: counts.clone(), breaker: breaker() })
                .with_batch_config(log_batches)
                .build();
        logger = Some(SdkLoggerProvider::builder().with_resource(full).with_log_processor(processor).build());
    }
    let tracer_provider = tracer_provider.build();
    let meter_provider = meter_provider.build();
    let tracer = tracer_provider.tracer("flowtel-telemetry");
    let meter = meter_provider.meter("flowtel-telemetry");

    // The console: always without an endpoint (the fallback), else when asked.
    let console = (endpoint.is_none() || options.console_exporter).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
    });
    let bridge = logger
        .as_ref()
        .map(|l| OpenTelemetryTracingBridge::new(l).and_then(CountEvents(counts.clone())).with_filter(bridge_filter()));
    // `tracing` spans (`#[instrument]`) become spans of the trace too, children of the span current where they
    // start; their events stay log records (the bridge) and are not span events too.
    let spans = logger.as_ref().map(|_| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer_provider.tracer("flowtel-telemetry-tracing"))
            .with_tracked_inactivity(false)
            .with_filter(bridge_filter())
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| meta.is_span()))
    });
    // A subscriber the program installed itself stays: the bridge is then the program's to add.
    let _ = tracing_subscriber::registry().with(console).with(bridge).with(spans).try_init();
    Ok((Providers { tracer: tracer_provider, meter: meter_provider, logger }, tracer, meter, counts))
}

impl Providers {
    /// Flushes and stops every provider, each signal with the whole `deadline` and all at once (one slow signal no
    /// longer eats the time of the others). Blocks the calling thread for at most `deadline`; returns whether the
    /// metrics flush failed, and whether the deadline passed first.
    pub(crate) fn shutdown_blocking(self, deadline: Duration) -> (bool, bool) {
        let (done, results) = std::sync::mpsc::channel();
        let meter = self.meter;
        let metrics_done = done.clone();
        std::thread::spawn(move || {
            let _ = metrics_done.send(Some(meter.shutdown_with_timeout(deadline).is_err()));
        });
        let tracer = self.tracer;
        let spans_done = done.clone();
        std::thread::spawn(move || {
            let _ = tracer.shutdown_with_timeout(deadline);
            let _ = spans_done.send(None);
        });
        if let Some(logger) = self.logger {
            let logs_done = done.clone();
            std::thread::spawn(move || {
                let _ = logger.shutdown_with_timeout(deadline);
                let _ = logs_done.send(None);
            });
        }
        drop(done);
        let until = std::time::Instant::now() + deadline;
        let mut metrics_flush_failed = true;
        loop {
            match results.recv_timeout(until.saturating_duration_since(std::time::Instant::now())) {
                Ok(Some(failed)) => metrics_flush_failed = failed,
                Ok(None) => {}
                // Every signal answered.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return (metrics_flush_failed, false),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return (true, true),
            }
        }
    }

    /// Exports what is buffered now, without stopping (a panic, SIGTERM), each signal within `deadline`.
    pub(crate) fn flush_blocking(&self, deadline: Duration) {
        let (meter, tracer, logger) = (self.meter.clone(), self.tracer.clone(), self.logger.clone());
        let (done, results) = std::sync::mpsc::channel::<()>();
        let signals: [Box<dyn FnOnce() + Send>; 3] = [
            Box::new(move || drop(tracer.force_flush())),
            Box::new(move || drop(meter.force_flush())),
            Box::new(move || drop(logger.map(|l| l.force_flush()))),
        ];
        for flush in signals {
            let done = done.clone();
            std::thread::spawn(move || {
                flush();
                let _ = done.send(());
            });
        }
        drop(done);
        let until = std::time::Instant::now() + deadline;
        while results.recv_timeout(until.saturating_duration_since(std::time::Instant::now())).is_ok() {}
    }

    pub(crate) fn is_exporting(&self) -> bool {
        self.logger.is_some()
    }
}

/// What `shutdown` could not export, from the counts and the flush's outcome.
pub(crate) fn report(exporting: bool, counts: &Counts, metrics_flush_failed: bool, timed_out: bool) -> ShutdownReport {
    // Without an endpoint nothing is exported on purpose (the console fallback): nothing counts as dropped.
    let lost = |done: &AtomicU64, went: &AtomicU64, printed: &AtomicU64| {
        if exporting {
            done.load(Ordering::Relaxed).saturating_sub(went.load(Ordering::Relaxed) + printed.load(Ordering::Relaxed))
        } else {
            0
        }
    };
    ShutdownReport {
        spans_dropped: lost(&counts.spans_ended, &counts.spans_exported, &counts.spans_to_console),
        logs_dropped: lost(&counts.logs_emitted, &counts.logs_exported, &counts.logs_to_console),
        spans_to_console: counts.spans_to_console.load(Ordering::Relaxed),
        logs_to_console: counts.logs_to_console.load(Ordering::Relaxed),
        metric_points_to_console: counts.metric_points_to_console.load(Ordering::Relaxed),
        metrics_flush_failed: exporting && metrics_flush_failed,
        timed_out,
    }
}
