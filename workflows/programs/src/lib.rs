//! What the four example workflows share: the knobs that inject failures, simulated work, and the run harness
//! (telemetry set up from what flowtel injects, a root span under the attempt's span, exit codes by the failure
//! class). Each workflow is a binary in `src/bin/`.
//!
//! Knobs (environment):
//!
//! | variable | default | effect |
//! | --- | --- | --- |
//! | `WORKFLOW_ITEMS` | 5 | phones (or records) the workflow processes |
//! | `WORKFLOW_STEP_MS` | 20 | simulated work per call, in milliseconds |
//! | `WORKFLOW_FLAKY_PERCENT` | 0 | share of external calls failing transiently (retried in-process, counted in `workflow.retry.count`) |
//! | `WORKFLOW_FAIL` | none | `transient` / `permanent`: the step named by `WORKFLOW_FAIL_STEP` fails for good; `transient-once`: only in attempt 1 |
//! | `WORKFLOW_FAIL_STEP` | the workflow's last step | which step fails |
//! | `WORKFLOW_SEED` | 1 | seed of the flaky calls and the simulated sizes |

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use flowtel_telemetry::{
    ErrorKind, Outcome, RetryPolicy, SpanKind, SpanOptions, TelemetryOptions, classify_error, end_span,
    initialize_telemetry, record_workflow_run, record_workflow_step, retry, start_span, trace_async,
};
use opentelemetry::trace::FutureExt;

/// A simulated failure.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{0}: connection reset by peer")]
    Transient(String),
    #[error("{0}: HTTP 400 invalid record")]
    Permanent(String),
}

/// The knobs, read once.
#[derive(Clone, Debug)]
pub struct Knobs {
    pub items: usize,
    pub step_ms: u64,
    pub flaky_percent: u64,
    pub fail: Option<ErrorKind>,
    pub fail_step: Option<String>,
    rng: std::sync::Arc<std::sync::Mutex<fastrand::Rng>>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn attempt() -> u32 {
    env("OTEL_RESOURCE_ATTRIBUTES")
        .and_then(|attrs| flowtel_telemetry::resource_attributes::get(&attrs, "workflow.attempt")?.parse().ok())
        .unwrap_or(1)
}

impl Knobs {
    pub fn from_env() -> Self {
        let fail = match env("WORKFLOW_FAIL").as_deref() {
            Some("transient") => Some(ErrorKind::Transient),
            Some("permanent") => Some(ErrorKind::Permanent),
            Some("transient-once") if attempt() == 1 => Some(ErrorKind::Transient),
            _ => None,
        };
        let number = |name: &str, default: u64| env(name).and_then(|v| v.parse().ok()).unwrap_or(default);
        Self {
            items: number("WORKFLOW_ITEMS", 5) as usize,
            step_ms: number("WORKFLOW_STEP_MS", 20),
            flaky_percent: number("WORKFLOW_FLAKY_PERCENT", 0).min(100),
            fail,
            fail_step: env("WORKFLOW_FAIL_STEP"),
            rng: std::sync::Arc::new(std::sync::Mutex::new(fastrand::Rng::with_seed(number("WORKFLOW_SEED", 1)))),
        }
    }

    /// A deterministic pseudo-random number (fastrand, seeded by `WORKFLOW_SEED`), for flaky calls and sizes.
    pub fn next(&self) -> u64 {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).u64(..)
    }

    /// Simulated work of one call; fails transiently `flaky_percent` of the time.
    pub async fn call(&self, what: &str) -> Result<(), SimError> {
        tokio::time::sleep(Duration::from_millis(self.step_ms)).await;
        if self.flaky_percent > 0 && self.next() % 100 < self.flaky_percent {
            return Err(SimError::Transient(what.into()));
        }
        Ok(())
    }

    /// The injected failure, if `step` is the one to fail.
    pub fn injected(&self, step: &str, last_step: &str) -> Result<(), SimError> {
        let target = self.fail_step.as_deref().unwrap_or(last_step);
        match self.fail {
            Some(ErrorKind::Transient) if step == target => Err(SimError::Transient(format!("{step} (injected)"))),
            Some(ErrorKind::Permanent) if step == target => Err(SimError::Permanent(format!("{step} (injected)"))),
            _ => Ok(()),
        }
    }

    /// An external call with in-process retries of transient failures (`workflow.retry.count`).
    pub async fn external(&self, workflow: &str, step: &str, what: &str) -> Result<(), SimError> {
        let policy =
            RetryPolicy { attempts: 5, base_delay: Duration::from_millis(10), max_delay: Duration::from_millis(200) };
        let options = SpanOptions::new(SpanKind::Client).attribute("step.name", step.to_string());
        trace_async(what.to_string(), options, retry(workflow, step, policy, || self.call(what))).await
    }
}

/// One step: a span `step.name`, `workflow.step.duration_ms` and `workflow.step.status`.
pub async fn step<T, Fut>(workflow: &str, name: &str, work: Fut) -> Result<T, SimError>
where
    Fut: Future<Output = Result<T, SimError>>,
{
    let started = Instant::now();
    let options = SpanOptions::new(SpanKind::Internal)
        .attribute("workflow.name", workflow.to_string())
        .attribute("step.name", name.to_string());
    let result = trace_async(format!("step {name}"), options, work).await;
    let status = if result.is_ok() { "success" } else { "failure" };
    record_workflow_step(workflow, name, started.elapsed().as_secs_f64() * 1000.0, status);
    result
}

/// Runs a workflow: telemetry from what flowtel injected, a root span (a child of the attempt span in
/// `TRACEPARENT`), the run recorded (by the library only outside flowtel), a bounded shutdown, and the exit code of
/// the failure class (0, 75 transient, 65 permanent; see `flowtel_telemetry::ExitCode`).
pub async fn run<Fut>(workflow: &'static str, body: impl FnOnce(Knobs) -> Fut) -> ExitCode
where
    Fut: Future<Output = Result<(), SimError>>,
{
    let mut options = TelemetryOptions::new(workflow);
    options.console_exporter = env("WORKFLOW_CONSOLE").is_some();
    let telemetry = match initialize_telemetry(options.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            // Telemetry never stops the work: run without it.
            eprintln!("telemetry disabled: {e}");
            None
        }
    };
    let started = Instant::now();
    let mut root = SpanOptions::new(SpanKind::Server).attribute("workflow.name", workflow);
    if let Some(run_id) = options.run_id() {
        root = root.attribute("workflow.run_id", run_id);
    }
    let span = start_span(format!("workflow {workflow}"), root);
    let knobs = Knobs::from_env();
    {
        // Logged inside the root span, so the record carries its trace and span ids.
        let _inside = span.context().attach();
        tracing::info!(workflow, items = knobs.items, "workflow started");
    }
    let result = body(knobs).with_context(span.context()).await;
    let (status, code) = match &result {
        Ok(()) => ("success", ExitCode::SUCCESS),
        Err(e) => {
            let class = classify_error(e);
            let _guard = span.context().attach();
            tracing::error!(workflow, error = %e, class = class.kind.as_str(), "workflow failed");
            ("failure", ExitCode::from(class.kind.exit_code() as u8))
        }
    };
    match &result {
        Ok(()) => end_span(span, Outcome::Success),
        Err(e) => end_span(span, Outcome::Failure(e)),
    }
    record_workflow_run(workflow, started.elapsed().as_secs_f64() * 1000.0, status);
    if let Some(t) = telemetry {
        let report = t.shutdown(Duration::from_secs(5)).await;
        if report != Default::default() {
            eprintln!("telemetry not exported: {report:?}");
        }
    }
    code
}
