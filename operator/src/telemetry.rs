//! The operator's own telemetry of each run: `workflow.*` metrics and the run's spans, exported over OTLP by a
//! background worker, so reconciliation never waits on a collector.
//!
//! Exactly once across restarts (the KEP-2307 pattern): the reconcile first records the run's transition in
//! status, then asks for the export here, and writes `status.telemetry.{started,finished}` only after the worker
//! reported the export succeeded. A crash between the export and that status write re-exports once after the
//! restart (same span ids, so a trace backend keeps one span; a metrics backend sees one duplicate increment):
//! the only duplicate possible.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::{AttemptClassification, WorkflowRunPhase, WorkflowRunStatus};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::mpsc;

use crate::workflow_run::ids;

/// Default `workflow.run.duration_ms` boundaries, from the user's telemetry system.
pub const DEFAULT_DURATION_BOUNDARIES: [f64; 11] =
    [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// Errors setting up the exporters.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP {signal} exporter for {endpoint}: {message}")]
    Exporter { signal: &'static str, endpoint: String, message: String },
}

/// Which report of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReportKind {
    /// `workflow.run.total`.
    Started,
    /// `workflow.run.status`, `workflow.run.duration_ms`, `workflow.retry.count` and the spans.
    Finished,
}

/// Where a report stands.
#[derive(Clone, Debug, PartialEq)]
pub enum ReportState {
    /// Queued or being exported.
    Pending,
    /// Exported: record it in status.
    Exported,
    /// The last export failed; it is retried until the drop timeout.
    Failing { reason: String },
    /// Not exported within the drop timeout: record it as dropped (counted on /metrics).
    Dropped { reason: String },
}

#[derive(Debug)]
struct Entry {
    state: ReportState,
    first_try: Instant,
    last_try: Instant,
    /// When the reconcile recorded the result in status. The entry is kept a while after that: a reconcile that
    /// still reads the previous status from its cache must get "exported" again, not a second export.
    recorded_at: Option<Instant>,
}

/// The shortest interval between two export attempts of one report; the reconcile looks again after it.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// How long a report's result is remembered after it reached status (far longer than any cache lag).
const REMEMBER: Duration = Duration::from_secs(600);

/// Counters of the exporter itself, shown on the admin port's `/metrics`.
#[derive(Default, Debug)]
pub struct ExportStats {
    pub exported: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    pub dropped: std::sync::atomic::AtomicU64,
    pub queue_full: std::sync::atomic::AtomicU64,
}

struct Request {
    key: (String, ReportKind),
    object: ObjectRef<WorkflowRun>,
    report: Report,
}

enum Report {
    Started {
        workflow: String,
    },
    Finished {
        workflow: String,
        status: &'static str,
        duration_ms: f64,
        retried_steps: Vec<String>,
        spans: Vec<SpanData>,
    },
}

struct Instruments {
    run_total: Counter<u64>,
    run_status: Counter<u64>,
    run_duration: Histogram<f64>,
    retry_count: Counter<u64>,
}

/// Handle used by reconciles; cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    queue: mpsc::Sender<Request>,
    entries: Arc<Mutex<HashMap<(String, ReportKind), Entry>>>,
    drop_after: Duration,
    pub stats: Arc<ExportStats>,
}

/// OTLP target and tuning of the exporter.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// OTLP gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    pub export_timeout: Duration,
    /// How long a run's telemetry is retried before it is dropped (and counted).
    pub drop_after: Duration,
    pub duration_boundaries: Vec<f64>,
    pub queue_capacity: usize,
}

impl Telemetry {
    /// Starts the export worker. `notify` receives the run of every report that changed state, to reconcile it.
    pub fn start(
        config: &ExportConfig,
        notify: mpsc::UnboundedSender<ObjectRef<WorkflowRun>>,
    ) -> Result<Self, TelemetryError> {
        let err = |signal: &'static str, e: &dyn std::fmt::Display| TelemetryError::Exporter {
            signal,
            endpoint: config.endpoint.clone(),
            message: e.to_string(),
        };
        // Each operator process is its own series of cumulative counters: name it, as a restart resets them.
        let host =
            std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_else(|_| "flowtel".into());
        let resource = Resource::builder()
            .with_service_name("flowtel")
            .with_attribute(KeyValue::new("service.instance.id", format!("{host}-{}", std::process::id())))
            .build();
        let metric_exporter = MetricExporter::builder()
            .with_tonic()
            .with_endpoint(&config.endpoint)
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|e| err("metrics", &e))?;
        let meter_provider =
            SdkMeterProvider::builder().with_periodic_exporter(metric_exporter).with_resource(resource.clone()).build();
        let mut span_exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(&config.endpoint)
            .with_timeout(config.export_timeout)
            .build()
            .map_err(|e| err("traces", &e))?;
        span_exporter.set_resource(&resource);

        let meter = meter_provider.meter("flowtel");
        let instruments = Instruments {
            run_total: meter.u64_counter("workflow.run.total").with_description("Total workflow runs").build(),
            run_status: meter.u64_counter("workflow.run.status").with_description("Workflow status").build(),
            run_duration: meter
                .f64_histogram("workflow.run.duration_ms")
                .with_description("Workflow duration")
                .with_unit("ms")
                .with_boundaries(config.duration_boundaries.clone())
                .build(),
            retry_count: meter.u64_counter("workflow.retry.count").with_description("Retry count").build(),
        };
        let (queue, rx) = mpsc::channel(config.queue_capacity);
        let telemetry = Self { queue, entries: Arc::default(), drop_after: config.drop_after, stats: Arc::default() };
        let worker = Worker {
            rx,
            meter_provider,
            span_exporter,
            instruments,
            entries: telemetry.entries.clone(),
            stats: telemetry.stats.clone(),
            notify,
            recorded: HashMap::new(),
        };
        tokio::spawn(worker.run());
        Ok(telemetry)
    }

    /// Asks for `kind` of `run` to be exported (once) and says where it stands. Never waits on the network.
    pub fn report(&self, run: &WorkflowRun, kind: ReportKind) -> ReportState {
        let Some(uid) = run.uid() else { return ReportState::Pending };
        let key = (uid, kind);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get_mut(&key) {
            match &entry.state {
                ReportState::Failing { reason } if entry.first_try.elapsed() >= self.drop_after => {
                    self.stats.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    entry.state = ReportState::Dropped { reason: reason.clone() };
                }
                ReportState::Failing { .. } => {
                    // Retry, at most every RETRY_EVERY: an endpoint that refuses at once would otherwise turn
                    // fail → notify → reconcile → re-send into a busy loop. Metrics recorded before are not
                    // recorded again.
                    let failing = entry.state.clone();
                    if entry.last_try.elapsed() >= RETRY_EVERY && self.enqueue(&key, run, kind) {
                        entry.state = ReportState::Pending;
                        entry.last_try = Instant::now();
                    }
                    return failing;
                }
                _ => {}
            }
            return entry.state.clone();
        }
        let state = if self.enqueue(&key, run, kind) {
            ReportState::Pending
        } else {
            ReportState::Failing { reason: "ExportQueueFull".into() }
        };
        if entries.len().is_multiple_of(1024) {
            entries.retain(|_, e| e.recorded_at.is_none_or(|t| t.elapsed() < REMEMBER));
        }
        let now = Instant::now();
        entries.insert(key, Entry { state: state.clone(), first_try: now, last_try: now, recorded_at: None });
        state
    }

    /// Marks a run's report as recorded in status; it is forgotten some minutes later.
    pub fn recorded(&self, run: &WorkflowRun, kind: ReportKind) {
        if let Some(uid) = run.uid()
            && let Some(entry) = self.entries.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&(uid, kind))
        {
            entry.recorded_at.get_or_insert_with(Instant::now);
        }
    }

    fn enqueue(&self, key: &(String, ReportKind), run: &WorkflowRun, kind: ReportKind) -> bool {
        let Some(report) = build_report(run, kind) else { return false };
        let request = Request { key: key.clone(), object: ObjectRef::from_obj(run), report };
        match self.queue.try_send(request) {
            Ok(()) => true,
            Err(_) => {
                self.stats.queue_full.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }
        }
    }
}

fn status_label(status: &WorkflowRunStatus) -> &'static str {
    let cancelled =
        status.conditions.iter().any(|c| c.type_ == crate::workflow_run::plan::SUCCEEDED && c.reason == "Cancelled");
    match status.phase {
        Some(WorkflowRunPhase::Succeeded) => "success",
        _ if cancelled => "cancelled",
        _ => "failure",
    }
}

fn system_time(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime) -> SystemTime {
    SystemTime::from(t.0)
}

/// The run's report, built from what status recorded (not from the time of export).
fn build_report(run: &WorkflowRun, kind: ReportKind) -> Option<Report> {
    let workflow = run.spec.workflow_name.clone();
    if kind == ReportKind::Started {
        return Some(Report::Started { workflow });
    }
    let status = run.status.as_ref()?;
    let uid = run.uid()?;
    let trace_id = ids::trace_id(&uid);
    let scope = InstrumentationScope::builder("flowtel").with_version(env!("CARGO_PKG_VERSION")).build();
    let context =
        |span_id: SpanId| SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, TraceState::default());
    let start = system_time(status.start_time.as_ref()?);
    let end = system_time(status.completion_time.as_ref()?);
    let label = status_label(status);
    let run_status = if label == "success" {
        Status::Ok
    } else {
        let reason = status
            .conditions
            .iter()
            .find(|c| c.type_ == crate::workflow_run::plan::SUCCEEDED)
            .map(|c| c.reason.clone())
            .unwrap_or_default();
        Status::error(reason)
    };
    let common = [
        KeyValue::new("workflow.name", workflow.clone()),
        KeyValue::new("workflow.run_id", uid.clone()),
        KeyValue::new("k8s.namespace.name", run.namespace().unwrap_or_default()),
    ];
    let mut spans = vec![SpanData {
        span_context: context(ids::run_span_id(&uid)),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Server,
        name: Cow::Borrowed("workflow.run"),
        start_time: start,
        end_time: end,
        attributes: common
            .iter()
            .cloned()
            .chain([
                KeyValue::new("workflow.status", label),
                KeyValue::new("workflow.attempts", i64::from(status.attempt_count.unwrap_or_default())),
            ])
            .collect(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: run_status,
        instrumentation_scope: scope.clone(),
    }];
    let mut retried_steps = Vec::new();
    for (i, a) in status.attempts.iter().enumerate() {
        let failed = a.classification.is_some_and(|c| c != AttemptClassification::Succeeded);
        let mut attributes: Vec<KeyValue> = common.to_vec();
        attributes.push(KeyValue::new("workflow.attempt", i64::from(a.number)));
        attributes.push(KeyValue::new("k8s.job.name", a.job_name.clone()));
        if let Some(pod) = &a.pod_name {
            attributes.push(KeyValue::new("k8s.pod.name", pod.clone()));
        }
        if let Some(code) = a.exit_code {
            attributes.push(KeyValue::new("process.exit.code", i64::from(code)));
        }
        if let Some(c) = a.classification {
            attributes.push(KeyValue::new("workflow.attempt.classification", format!("{c:?}")));
        }
        let attempt_end = a.end_time.as_ref().map_or(end, system_time);
        let mut events = SpanEvents::default();
        if failed {
            events.events.push(opentelemetry::trace::Event::new(
                "attempt.failed",
                attempt_end,
                vec![
                    KeyValue::new("reason", a.reason.clone().unwrap_or_default()),
                    KeyValue::new("exit_code", i64::from(a.exit_code.unwrap_or(-1))),
                ],
                0,
            ));
        }
        // Every failed attempt that a later attempt followed was a retry.
        if failed && i + 1 < status.attempts.len() && a.classification != Some(AttemptClassification::Disruption) {
            retried_steps.push(a.container.clone().unwrap_or_else(|| "main".into()));
        }
        spans.push(SpanData {
            span_context: context(ids::attempt_span_id(&uid, a.number)),
            parent_span_id: ids::run_span_id(&uid),
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed("workflow.attempt"),
            start_time: a.start_time.as_ref().map_or(start, system_time),
            end_time: attempt_end,
            attributes,
            dropped_attributes_count: 0,
            events,
            links: SpanLinks::default(),
            status: if failed { Status::error(a.reason.clone().unwrap_or_default()) } else { Status::Ok },
            instrumentation_scope: scope.clone(),
        });
    }
    let duration_ms = status.duration_ms.unwrap_or_default() as f64;
    Some(Report::Finished { workflow, status: label, duration_ms, retried_steps, spans })
}

struct Worker {
    rx: mpsc::Receiver<Request>,
    meter_provider: SdkMeterProvider,
    span_exporter: SpanExporter,
    instruments: Instruments,
    entries: Arc<Mutex<HashMap<(String, ReportKind), Entry>>>,
    stats: Arc<ExportStats>,
    notify: mpsc::UnboundedSender<ObjectRef<WorkflowRun>>,
    /// Metrics recorded in this process (and when), so a retried export does not count them twice.
    recorded: HashMap<(String, ReportKind), Instant>,
}

impl Worker {
    async fn run(mut self) {
        const BATCH: usize = 512;
        let mut batch = Vec::with_capacity(BATCH);
        while self.rx.recv_many(&mut batch, BATCH).await > 0 {
            let requests = std::mem::take(&mut batch);
            if self.recorded.len() > 100_000 {
                // A run's export is retried for drop_after at most; an hour covers it many times over.
                self.recorded.retain(|_, at| at.elapsed() < Duration::from_secs(3600));
            }
            let mut spans = Vec::new();
            for r in &requests {
                let first = self.recorded.insert(r.key.clone(), Instant::now()).is_none();
                match &r.report {
                    Report::Started { workflow } => {
                        if first {
                            self.instruments.run_total.add(1, &[KeyValue::new("workflow_name", workflow.clone())]);
                        }
                    }
                    Report::Finished { workflow, status, duration_ms, retried_steps, spans: s } => {
                        if first {
                            let name = KeyValue::new("workflow_name", workflow.clone());
                            self.instruments.run_status.add(1, &[name.clone(), KeyValue::new("status", *status)]);
                            self.instruments.run_duration.record(*duration_ms, std::slice::from_ref(&name));
                            for step in retried_steps {
                                self.instruments
                                    .retry_count
                                    .add(1, &[name.clone(), KeyValue::new("step_name", step.clone())]);
                            }
                        }
                        spans.extend(s.iter().cloned());
                    }
                }
            }
            let spans_result = if spans.is_empty() { Ok(()) } else { self.span_exporter.export(spans).await };
            // force_flush blocks on the export; keep it off the async workers.
            let provider = self.meter_provider.clone();
            let metrics_result = tokio::task::spawn_blocking(move || provider.force_flush())
                .await
                .unwrap_or_else(|e| Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(e.to_string())));
            let outcome = match (spans_result, metrics_result) {
                (Ok(()), Ok(())) => {
                    self.stats.exported.fetch_add(requests.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    ReportState::Exported
                }
                (Err(e), _) | (_, Err(e)) => {
                    self.stats.failed.fetch_add(requests.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(error = %e, runs = requests.len(), "exporting run telemetry failed");
                    ReportState::Failing { reason: "ExportFailed".into() }
                }
            };
            {
                let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
                for r in &requests {
                    if let Some(entry) = entries.get_mut(&r.key) {
                        entry.state = outcome.clone();
                    }
                }
            }
            for r in requests {
                let _ = self.notify.send(r.object);
            }
        }
    }
}
