//! flowtel's workload telemetry library: what a workflow calls to be observable, with the API of the user's
//! original TypeScript library (`initializeTelemetry`, `startSpan`/`endSpan`, `traceAsyncFunction`,
//! `recordWorkflowRun`, `recordWorkflowStep`, `recordRetry`, `recordImageUpload`, `recordDbUpsert`,
//! `classifyError`, `shutdownTelemetry`) in Rust.
//!
//! - [`initialize_telemetry`] reads what flowtel injects into an attempt's Job (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//!   `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `TRACEPARENT`) plus explicit [`TelemetryOptions`]; the
//!   workflow's spans continue the trace named by `TRACEPARENT`, under the attempt's span.
//! - Metrics have exactly the user's names, labels and duration buckets ([`metrics`]).
//! - Under flowtel the run-level metrics (`workflow.run.total`, `.status`, `.duration_ms`) come from the operator,
//!   which counts each run once across restarts: [`record_workflow_run`] then records none of them
//!   ([`RunMetrics`]).
//! - `tracing` events are exported as OTLP logs carrying the current trace and span ids.
//! - It never stalls or crashes the workflow when the backend is down: bounded queues, export timeouts, a circuit
//!   breaker that sends every signal to the console (the pod's log) once an export failed, so that the endpoint is
//!   waited for at most once per cool-down, and what was dropped or printed reported by
//!   [`TelemetryHandle::shutdown`].
//! - What was recorded is flushed however the process ends: [`TelemetryHandle::shutdown`], the handle dropped
//!   without it (an early return), a panic, or SIGTERM (Kubernetes stopping the pod: flushed, then the process exits
//!   with 143 unless [`TelemetryOptions::exit_on_sigterm`] leaves SIGTERM to the program).

mod config;
mod errors;
mod exporters;
mod fallback;
pub mod metrics;
pub mod resource_attributes;
mod spans;

pub use config::{RunMetrics, TelemetryOptions};
pub use errors::{ErrorClass, ErrorKind, ExitCode, RetryPolicy, classify_error, retry};
pub use exporters::ShutdownReport;
pub use metrics::{record_db_upsert, record_image_upload, record_retry, record_workflow_run, record_workflow_step};
pub use spans::{Outcome, SpanKind, SpanOptions, WorkflowSpan, end_span, start_span, trace_async};

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::Context;

/// What `initialize_telemetry` set up, shared by the free functions.
struct Global {
    tracer: opentelemetry_sdk::trace::Tracer,
    instruments: metrics::Instruments,
    /// The context the workflow's spans descend from: the attempt span named by `TRACEPARENT`, if any.
    parent: Context,
    run_metrics: RunMetrics,
    counts: std::sync::Arc<exporters::Counts>,
    /// For the flush on panic and SIGTERM.
    providers: exporters::Providers,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();

fn global() -> Option<&'static Global> {
    GLOBAL.get()
}

/// Errors setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("telemetry is already initialised in this process")]
    AlreadyInitialised,
    #[error("building the OTLP {signal} exporter for {endpoint}: {message}")]
    Exporter { signal: &'static str, endpoint: String, message: String },
}

/// How long a flush may take when the process ends without [`TelemetryHandle::shutdown`] (the handle dropped, a
/// panic, SIGTERM).
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(5);

/// The providers, kept so that [`TelemetryHandle::shutdown`] can flush them. Dropped without `shutdown`, it flushes
/// and stops them itself (blocking, at most [`FLUSH_DEADLINE`]).
#[must_use = "dropping the handle at once flushes and stops telemetry: keep it until the work is done"]
pub struct TelemetryHandle {
    providers: Option<exporters::Providers>,
}

/// Sets telemetry up for this process (once): OTLP gRPC exporters when an endpoint is known, console output
/// otherwise or in addition (`console_exporter`). Call it inside a Tokio runtime.
pub fn initialize_telemetry(options: TelemetryOptions) -> Result<TelemetryHandle, InitError> {
    if GLOBAL.get().is_some() {
        return Err(InitError::AlreadyInitialised);
    }
    let (providers, tracer, meter, counts) = exporters::build(&options)?;
    let instruments = metrics::Instruments::new(&meter);
    let parent = options.parent_context();
    let run_metrics = options.run_metrics();
    GLOBAL
        .set(Global { tracer, instruments, parent, run_metrics, counts, providers: providers.clone() })
        .map_err(|_| InitError::AlreadyInitialised)?;
    flush_on_panic();
    if options.exit_on_sigterm {
        flush_on_sigterm();
    }
    Ok(TelemetryHandle { providers: Some(providers) })
}

/// A panic flushes what was recorded before the process unwinds or aborts (then the previous hook runs).
fn flush_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Some(g) = global() {
            g.providers.flush_blocking(FLUSH_DEADLINE);
        }
        previous(info);
    }));
}

/// SIGTERM (Kubernetes stopping the pod) flushes what was recorded, then ends the process as SIGTERM would
/// (exit code 143). Outside a Tokio runtime, or where signals cannot be caught, nothing is installed.
fn flush_on_sigterm() {
    #[cfg(unix)]
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let Ok(mut sigterm) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return;
        };
        runtime.spawn(async move {
            if sigterm.recv().await.is_some() {
                if let Some(g) = global() {
                    let providers = g.providers.clone();
                    let _ = tokio::task::spawn_blocking(move || providers.flush_blocking(FLUSH_DEADLINE)).await;
                }
                std::process::exit(128 + 15);
            }
        });
    }
}

impl TelemetryHandle {
    /// Flushes and stops every exporter within `deadline` (the user's `shutdownTelemetry`); reports what could not
    /// be exported. Never blocks past the deadline.
    pub async fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        let counts = global().map(|g| g.counts.clone()).unwrap_or_default();
        let Some(providers) = self.providers.take() else { return ShutdownReport::default() };
        let exporting = providers.is_exporting();
        let (metrics_flush_failed, timed_out) =
            tokio::task::spawn_blocking(move || providers.shutdown_blocking(deadline)).await.unwrap_or((true, true));
        exporters::report(exporting, &counts, metrics_flush_failed, timed_out)
    }
}

impl Drop for TelemetryHandle {
    fn drop(&mut self) {
        if let Some(providers) = self.providers.take() {
            let _ = providers.shutdown_blocking(FLUSH_DEADLINE);
        }
    }
}
