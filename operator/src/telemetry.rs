//! The exporter of reports: metric increments and finished spans that a controller hands over, exported over OTLP
//! by one background worker so that a reconcile never waits on a collector. It knows reports, keyed by a string
//! the caller chooses, never the objects they describe.
//!
//! A caller asks for a report with [`Telemetry::report`] on every reconcile until it is `Exported` or `Dropped`,
//! and records that outcome in the object's status, which is what makes the export happen once across restarts
//! (see `workflow_run/report.rs` for the order). The worker notifies the caller's `N` whenever a report's state
//! changed. A report that is neither exported nor failed within `drop_after` (a dead worker, a collector that
//! never answers) is dropped and counted: nothing waits on telemetry forever.
//!
//! Each report names its [`Destination`]: the operator's default endpoint, or the collector of the TelemetryStack
//! its run names. The worker keeps one set of exporters per endpoint in use (at most [`MAX_ENDPOINTS`], the least
//! recently used closed first) and exports each batch endpoint by endpoint, so that a run's telemetry lands in its
//! own stack, and a stack that cannot be reached fails only its own reports (one that does not answer delays the
//! batch by at most the export timeout).
//!
//! Metrics are exported with delta temporality, and only by the worker's own flush after each batch (the periodic
//! reader is idle): an increment is counted by the backend exactly when the flush that carried it succeeded, and
//! a failed flush loses it, so the report is retried (or given up) without anything counted twice or left behind
//! in a cumulative counter to surface later. A backend that wants cumulative series converts (the collector's
//! `deltatocumulative` processor, Prometheus' `otlp-deltatocumulative`).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, mpsc, watch};

use crate::runtime::expiring::Expiring;
use crate::runtime::readiness::Gate;

pub mod journal;

use journal::{Fact, Journal, JournalError, Recalled};

/// Errors setting up the exporters.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP {signal} exporter for {endpoint}: {message}")]
    Exporter { signal: &'static str, endpoint: String, message: String },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Where a report goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// The operator's default endpoint (`--otlp-endpoint`), if it has one.
    Default,
    /// An OTLP gRPC endpoint of its own: the collector of the run's TelemetryStack.
    Endpoint(String),
    /// Named, but not reachable now (a TelemetryStack that does not exist or serves no endpoint yet): the report
    /// fails with `reason` and is retried until it is reachable or the drop timeout, never sent elsewhere.
    Unavailable { reason: String },
}

/// Endpoints with exporters open at once, at most.
pub const MAX_ENDPOINTS: usize = 64;

/// `value` added to the counter `name`.
#[derive(Clone, Debug, PartialEq)]
pub struct CounterAdd {
    pub name: &'static str,
    pub description: &'static str,
    pub value: u64,
    pub attributes: Vec<KeyValue>,
}

/// `value` recorded into the histogram `name` (its boundaries come from [`ExportConfig::histogram_boundaries`]).
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramRecord {
    pub name: &'static str,
    pub description: &'static str,
    pub unit: &'static str,
    pub value: f64,
    pub attributes: Vec<KeyValue>,
}

/// What one report exports.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub counters: Vec<CounterAdd>,
    pub histograms: Vec<HistogramRecord>,
    pub spans: Vec<SpanData>,
}

/// Where a report stands.
#[derive(Clone, Debug, PartialEq)]
pub enum ReportState {
    /// Queued or being exported, and nothing failed so far.
    Pending,
    /// Exported: record it.
    Exported,
    /// The last export failed (a retry may be queued already); retried until the drop timeout.
    Failing { reason: String },
    /// Not exported within the drop timeout: record it as dropped (counted on /metrics).
    Dropped { reason: String },
    /// Nothing is exported for it: its destination is the default, and this operator has no default endpoint.
    Disabled,
}

/// The shortest interval between two export attempts of one report; the caller looks again after it.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// How long a report's outcome is remembered once it could be settled: far longer than any cache lag between the
/// status write that records it and the reconcile that reads it back.
const REMEMBER: Duration = Duration::from_secs(600);

/// Reports exported in one OTLP request at most.
const BATCH: usize = 512;

/// How long the worker, once a report is queued, waits for more to join its batch. Each batch costs two OTLP
/// requests (metrics, then spans) whatever its size, and runs end one by one: without the wait, nearly every run's
/// report went out alone. A run's terminal status waits for its export, so this is added to its end's latency.
const LINGER: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq)]
enum EntryState {
    Queued,
    Failed,
    Exported,
    Dropped,
}

#[derive(Debug)]
struct Entry {
    state: EntryState,
    first_try: Instant,
    last_try: Instant,
    last_failure: Option<String>,
    /// The report's metrics went out with a successful flush: a retry (its spans failed) must not send them again.
    metrics_exported: bool,
}

/// Report outcomes by key, forgotten in the order they joined once they can no longer be asked for.
#[derive(Default)]
struct Ledger {
    entries: Expiring<String, Entry>,
}

impl Ledger {
    fn expire(&mut self, keep: Duration) {
        self.entries.expire(keep);
    }

    fn insert(&mut self, key: String, entry: Entry) {
        let at = entry.first_try;
        self.entries.insert_at(key, entry, at);
    }

    /// Takes in what the journal recalled (oldest first): an exported report answers `Exported` at once; one whose
    /// metrics alone went out is retried at once, its spans only.
    fn recall(&mut self, recalled: Vec<Recalled>) {
        let now = Instant::now();
        for r in recalled {
            let at = now.checked_sub(r.age).unwrap_or(now);
            let (state, last_failure) = match r.fact {
                Fact::Exported => (EntryState::Exported, None),
                Fact::MetricsExported => (EntryState::Failed, Some("ExportInterrupted".to_string())),
            };
            let entry = Entry { state, first_try: at, last_try: at, last_failure, metrics_exported: true };
            self.insert(r.key, entry);
        }
    }

    /// What the journal must keep remembering: reports exported, wholly or their metrics.
    fn facts(&self) -> Vec<Recalled> {
        let mut facts: Vec<Recalled> = self
            .entries
            .iter()
            .filter_map(|(key, e)| {
                let fact = match (e.state, e.metrics_exported) {
                    (EntryState::Exported, _) => Fact::Exported,
                    (_, true) => Fact::MetricsExported,
                    _ => return None,
                };
                Some(Recalled { key: key.clone(), fact, age: e.first_try.elapsed() })
            })
            .collect();
        facts.sort_by_key(|f| std::cmp::Reverse(f.age));
        facts
    }
}

/// The exporter's own counters, on the admin port's `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct ExportMetrics {
    pub exported: PromCounter,
    pub failures: PromCounter,
    pub dropped: PromCounter,
    pub queue_full: PromCounter,
}

impl ExportMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("flowtel_telemetry_exported", "Reports exported", m.exported.clone());
        registry.register("flowtel_telemetry_export_failures", "Report exports that failed", m.failures.clone());
        registry.register("flowtel_telemetry_dropped", "Reports dropped after the drop timeout", m.dropped.clone());
        registry.register(
            "flowtel_telemetry_queue_full",
            "Reports refused by a full export queue",
            m.queue_full.clone(),
        );
        m
    }
}

/// OTLP target and tuning of the exporter.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// The default OTLP gRPC endpoint, e.g. `http://127.0.0.1:4317`; None: only reports with an endpoint of
    /// their own are exported.
    pub endpoint: Option<String>,
    pub export_timeout: Duration,
    /// How long a report is retried before it is dropped (and counted).
    pub drop_after: Duration,
    /// Explicit bucket boundaries by histogram name.
    pub histogram_boundaries: HashMap<&'static str, Vec<f64>>,
    pub queue_capacity: usize,
    /// Where the export journal lives (`journal`), if anywhere.
    pub journal: Option<std::path::PathBuf>,
}

struct Request<N> {
    key: String,
    /// The OTLP endpoint it goes to.
    endpoint: String,
    notify: N,
    report: Report,
}

struct Shared<N> {
    queue: mpsc::Sender<Request<N>>,
    default_endpoint: Option<String>,
    ledger: Mutex<Ledger>,
    drop_after: Duration,
    metrics: ExportMetrics,
    last_batch_failed: AtomicBool,
    shutdown: Notify,
    stopped: watch::Receiver<bool>,
    /// Bumped whenever a batch settled, for callers that wait for one report.
    settled: watch::Sender<u64>,
    /// Reports someone waits for (`settled`), by key: that caller reads the outcome, so no notification is sent.
    waited: Mutex<HashMap<String, usize>>,
    export_timeout: Duration,
}

impl<N> Shared<N> {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn waited(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.waited.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a batch's outcome in the ledger, wakes the callers waiting for one of its reports, and returns the
    /// notifications due: one per report no caller waits for.
    fn settle_batch(&self, requests: Vec<Request<N>>, failure: Option<&str>) -> Vec<N> {
        {
            let mut ledger = self.ledger();
            for r in &requests {
                // A dropped report stays dropped: status may already say so.
                if let Some(entry) = ledger.entries.get_mut(&r.key).filter(|e| e.state == EntryState::Queued) {
                    match failure {
                        None => entry.state = EntryState::Exported,
                        Some(reason) => {
                            entry.state = EntryState::Failed;
                            entry.last_failure = Some(reason.into());
                        }
                    }
                }
            }
        }
        // Waiters look at the ledger when woken, so only now. One still registered reads the ledger after it
        // stops waiting, woken or not, so it sees this outcome.
        self.settled.send_modify(|generation| *generation += 1);
        let waited = self.waited();
        requests.into_iter().filter(|r| !waited.contains_key(&r.key)).map(|r| r.notify).collect()
    }
}

/// A caller waiting for a report (`Telemetry::settled`), registered while it waits.
struct Waiting<'a, N> {
    shared: &'a Shared<N>,
    key: &'a str,
}

impl<'a, N> Waiting<'a, N> {
    fn register(shared: &'a Shared<N>, key: &'a str) -> Self {
        *shared.waited().entry(key.to_string()).or_default() += 1;
        Self { shared, key }
    }
}

impl<N> Drop for Waiting<'_, N> {
    fn drop(&mut self) {
        let mut waited = self.shared.waited();
        if let Some(count) = waited.get_mut(self.key) {
            *count -= 1;
            if *count == 0 {
                waited.remove(self.key);
            }
        }
    }
}

/// Handle used by reconciles; cheap to clone. `N` is what the worker sends back when a report's state changed.
pub struct Telemetry<N> {
    shared: Option<Arc<Shared<N>>>,
}

impl<N> Clone for Telemetry<N> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<N: Send + Sync + 'static> Telemetry<N> {
    /// An exporter that exports nothing: every report is `Disabled`.
    pub fn disabled() -> Self {
        Self { shared: None }
    }

    /// Starts the export worker. `notify` receives a report's `N` whenever its state changed. `worker_gate`
    /// closes (readiness fails) if the worker ever stops before shutdown.
    pub fn start(
        config: &ExportConfig,
        notify: mpsc::UnboundedSender<N>,
        metrics: ExportMetrics,
        worker_gate: Gate,
    ) -> Result<Self, TelemetryError> {
        // Each operator process is its own series of delta points: name it, as a restart starts them anew.
        let host =
            std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_else(|_| "flowtel".into());
        let resource = Resource::builder()
            .with_service_name("flowtel")
            .with_attribute(KeyValue::new("service.instance.id", format!("{host}-{}", std::process::id())))
            .build();
        // The default endpoint's exporters are opened now, so that a malformed one stops the operator at start.
        let mut endpoints = HashMap::new();
        if let Some(endpoint) = &config.endpoint {
            endpoints.insert(endpoint.clone(), Exporters::build(endpoint, config.export_timeout, &resource)?);
        }
        let (queue, rx) = mpsc::channel(config.queue_capacity);
        let (stopped_tx, stopped) = watch::channel(false);
        // What an earlier process in this pod exported and its objects may not record yet: not exported again.
        let mut ledger = Ledger::default();
        let journal = match &config.journal {
            None => None,
            Some(path) => {
                let (journal, recalled) = Journal::open(path, config.drop_after + REMEMBER)?;
                tracing::info!(path = %path.display(), reports = recalled.len(), "export journal read");
                ledger.recall(recalled);
                Some(journal)
            }
        };
        let shared = Arc::new(Shared {
            queue,
            default_endpoint: config.endpoint.clone(),
            ledger: Mutex::new(ledger),
            drop_after: config.drop_after,
            settled: watch::Sender::new(0),
            waited: Mutex::default(),
            export_timeout: config.export_timeout,
            metrics,
            last_batch_failed: AtomicBool::new(false),
            shutdown: Notify::new(),
            stopped,
        });
        let worker = Worker {
            rx,
            endpoints,
            resource,
            export_timeout: config.export_timeout,
            boundaries: config.histogram_boundaries.clone(),
            shared: shared.clone(),
            notify,
            journal,
        };
        // Supervised: whatever ends the worker closes the readiness gate, and reports stop waiting for it (the
        // closed queue fails every later request at once; queued ones are dropped after `drop_after`).
        let handle = tokio::spawn(worker.run());
        tokio::spawn(async move {
            match handle.await {
                Ok(()) => tracing::info!("telemetry export worker stopped"),
                Err(e) => tracing::error!(error = %e, "telemetry export worker died"),
            }
            worker_gate.set(false);
            let _ = stopped_tx.send(true);
        });
        Ok(Self { shared: Some(shared) })
    }

    /// Whether reports to `destination` are exported (not `Disabled`).
    pub fn exports_to(&self, destination: &Destination) -> bool {
        self.shared.as_ref().is_some_and(|s| *destination != Destination::Default || s.default_endpoint.is_some())
    }

    /// Whether exports currently succeed. While they fail, callers should not hold work up waiting for one.
    pub fn is_healthy(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| !s.last_batch_failed.load(Ordering::Relaxed) && !s.queue.is_closed())
    }

    /// Asks for the report `key` to be exported (once) and says where it stands. Never waits on the network.
    /// `build` is called only when the report is (re)queued.
    pub fn report(
        &self,
        key: &str,
        destination: &Destination,
        notify: N,
        build: impl FnOnce() -> Report,
    ) -> ReportState {
        let Some(shared) = self.shared.as_ref().filter(|_| self.exports_to(destination)) else {
            return ReportState::Disabled;
        };
        let mut ledger = shared.ledger();
        ledger.expire(shared.drop_after + REMEMBER);
        let now = Instant::now();
        let Some(entry) = ledger.entries.get_mut(key) else {
            let (state, last_failure) = match shared.enqueue(key, destination, notify, build) {
                Ok(()) => (EntryState::Queued, None),
                Err(reason) => (EntryState::Failed, Some(reason)),
            };
            let entry = Entry { state, first_try: now, last_try: now, last_failure, metrics_exported: false };
            let answer = entry.answer();
            ledger.insert(key.to_string(), entry);
            return answer;
        };
        let unsettled = matches!(entry.state, EntryState::Queued | EntryState::Failed);
        if unsettled && entry.first_try.elapsed() >= shared.drop_after {
            entry.state = EntryState::Dropped;
            shared.metrics.dropped.inc();
        } else if entry.state == EntryState::Failed && entry.last_try.elapsed() >= RETRY_EVERY {
            // Retry at most every RETRY_EVERY: an endpoint that refuses at once would otherwise turn
            // fail → notify → reconcile → re-send into a busy loop.
            entry.last_try = now;
            match shared.enqueue(key, destination, notify, build) {
                Ok(()) => entry.state = EntryState::Queued,
                Err(reason) => entry.last_failure = Some(reason),
            }
        }
        entry.answer()
    }

    /// Where the report `key` stands in this process, without asking for it (None: never asked here). `Pending`
    /// while it is queued (a retry too), as it may still go out; one queued past the drop timeout is `Dropped`.
    pub fn peek(&self, key: &str) -> Option<ReportState> {
        let shared = self.shared.as_ref()?;
        let ledger = shared.ledger();
        let entry = ledger.entries.get(key)?;
        Some(match entry.state {
            EntryState::Queued if entry.first_try.elapsed() >= shared.drop_after => {
                ReportState::Dropped { reason: "ExportTimedOut".into() }
            }
            EntryState::Queued => ReportState::Pending,
            _ => entry.answer(),
        })
    }

    /// Waits until the report `key` is no longer on its way (exported, failed, dropped), at most one export
    /// timeout. A caller that records the outcome right after keeps the window between an export and its
    /// record to that of one status write, instead of a trip through a busy work queue. The caller must look at
    /// the report after (`report` or `peek`), even when this wait was cut short: a report that settles while it
    /// is waited for sends no notification.
    pub async fn settled(&self, key: &str) {
        let Some(shared) = &self.shared else { return };
        let _waiting = Waiting::register(shared, key);
        // Subscribed before looking, so a batch that settles in between still wakes us.
        let mut generations = shared.settled.subscribe();
        let wait = async {
            while self.peek(key) == Some(ReportState::Pending) {
                if generations.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(shared.export_timeout + Duration::from_secs(1), wait).await;
    }

    /// Stops the worker after it exported what is queued, waiting at most `timeout`. Returns whether it stopped.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        let Some(shared) = &self.shared else { return true };
        shared.shutdown.notify_one();
        let mut stopped = shared.stopped.clone();
        tokio::time::timeout(timeout, stopped.wait_for(|s| *s)).await.is_ok()
    }
}

impl Entry {
    fn answer(&self) -> ReportState {
        let reason = || self.last_failure.clone().unwrap_or_else(|| "ExportTimedOut".into());
        match self.state {
            EntryState::Exported => ReportState::Exported,
            EntryState::Dropped => ReportState::Dropped { reason: reason() },
            // A queued retry keeps the last failure: the state flips only when an export succeeds.
            EntryState::Queued if self.last_failure.is_none() => ReportState::Pending,
            EntryState::Queued | EntryState::Failed => ReportState::Failing { reason: reason() },
        }
    }
}

impl<N> Shared<N> {
    fn enqueue(
        &self,
        key: &str,
        destination: &Destination,
        notify: N,
        build: impl FnOnce() -> Report,
    ) -> Result<(), String> {
        let endpoint = match destination {
            Destination::Default => self.default_endpoint.clone().ok_or("NoOtlpEndpoint")?,
            Destination::Endpoint(endpoint) => endpoint.clone(),
            Destination::Unavailable { reason } => return Err(reason.clone()),
        };
        match self.queue.try_send(Request { key: key.to_string(), endpoint, notify, report: build() }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.queue_full.inc();
                Err("ExportQueueFull".into())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err("ExportWorkerStopped".into()),
        }
    }
}

/// Adds to `batch` what `rx` receives within `linger`, up to `max` in all; true when `rx` closed meanwhile.
async fn gather<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, max: usize, linger: Duration) -> bool {
    let until = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        match tokio::time::timeout_at(until, rx.recv_many(batch, max - batch.len())).await {
            Ok(0) => return true,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    false
}

/// The exporters of one endpoint.
struct Exporters {
    meter_provider: SdkMeterProvider,
    meter: Meter,
    span_exporter: SpanExporter,
    counters: HashMap<&'static str, Counter<u64>>,
    histograms: HashMap<&'static str, Histogram<f64>>,
    last_used: Instant,
}

impl Exporters {
    fn build(endpoint: &str, timeout: Duration, resource: &Resource) -> Result<Self, TelemetryError> {
        let err = |signal: &'static str, e: &dyn std::fmt::Display| TelemetryError::Exporter {
            signal,
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        };
        let metric_exporter = MetricExporter::builder()
            .with_tonic()
            .with_temporality(Temporality::Delta)
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build()
            .map_err(|e| err("metrics", &e))?;
        // Only the worker's flushes export (see the module's comment): the periodic reader never fires on its own.
        let reader = PeriodicReader::builder(metric_exporter).with_interval(Duration::from_secs(365 * 86_400)).build();
        let meter_provider = SdkMeterProvider::builder().with_reader(reader).with_resource(resource.clone()).build();
        let mut span_exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .build()
            .map_err(|e| err("traces", &e))?;
        span_exporter.set_resource(resource);
        Ok(Self {
            meter: meter_provider.meter("flowtel"),
            meter_provider,
            span_exporter,
            counters: HashMap::new(),
            histograms: HashMap::new(),
            last_used: Instant::now(),
        })
    }

    fn record(&mut self, report: &Report, boundaries: &HashMap<&'static str, Vec<f64>>) {
        for c in &report.counters {
            let meter = &self.meter;
            self.counters
                .entry(c.name)
                .or_insert_with(|| meter.u64_counter(c.name).with_description(c.description).build())
                .add(c.value, &c.attributes);
        }
        for h in &report.histograms {
            let meter = &self.meter;
            self.histograms
                .entry(h.name)
                .or_insert_with(|| {
                    let builder = meter.f64_histogram(h.name).with_description(h.description).with_unit(h.unit);
                    match boundaries.get(h.name) {
                        Some(b) => builder.with_boundaries(b.clone()).build(),
                        None => builder.build(),
                    }
                })
                .record(h.value, &h.attributes);
        }
    }

    /// Flushes and closes the meter provider (off the async workers: it blocks on the export).
    async fn close(self) {
        let provider = self.meter_provider;
        let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
    }
}

struct Worker<N> {
    rx: mpsc::Receiver<Request<N>>,
    /// Exporters by endpoint, opened on first use.
    endpoints: HashMap<String, Exporters>,
    resource: Resource,
    export_timeout: Duration,
    boundaries: HashMap<&'static str, Vec<f64>>,
    shared: Arc<Shared<N>>,
    notify: mpsc::UnboundedSender<N>,
    journal: Option<Journal>,
}

type ExportError = opentelemetry_sdk::error::OTelSdkError;

impl<N: Send + Sync + 'static> Worker<N> {
    /// Writes `fact` for `keys` to the journal, if there is one. A failed write is logged: the report went out, and
    /// only a kill before its status records it would export it again.
    fn journal(&mut self, fact: Fact, keys: &[&str]) {
        let Some(journal) = self.journal.as_mut() else { return };
        if keys.is_empty() {
            return;
        }
        if let Err(e) = journal.append(fact, keys.iter().copied()) {
            tracing::warn!(error = %e, "cannot write the export journal");
        }
        if journal.wants_compaction() {
            let facts = self.shared.ledger().facts();
            if let Err(e) = journal.compact(&facts) {
                tracing::warn!(error = %e, "cannot compact the export journal");
            }
        }
    }

    async fn run(mut self) {
        loop {
            let mut batch = Vec::with_capacity(BATCH);
            let stopping = tokio::select! {
                biased;
                () = self.shared.shutdown.notified() => {
                    while let Ok(r) = self.rx.try_recv() {
                        batch.push(r);
                    }
                    true
                }
                n = self.rx.recv_many(&mut batch, BATCH) => n == 0 || gather(&mut self.rx, &mut batch, BATCH, LINGER).await,
            };
            // Drained in batches: one OTLP request per endpoint and BATCH reports.
            while !batch.is_empty() {
                let rest = batch.split_off(batch.len().min(BATCH));
                self.export_batch(batch).await;
                batch = rest;
            }
            if stopping {
                break;
            }
        }
        for (_, exporters) in self.endpoints.drain() {
            exporters.close().await;
        }
    }

    /// The exporters of `endpoint`, opened if need be (closing the least recently used beyond `MAX_ENDPOINTS`).
    async fn exporters<'a>(
        endpoints: &'a mut HashMap<String, Exporters>,
        endpoint: &str,
        timeout: Duration,
        resource: &Resource,
    ) -> Result<&'a mut Exporters, ExportError> {
        if !endpoints.contains_key(endpoint) {
            let opened = Exporters::build(endpoint, timeout, resource)
                .map_err(|e| ExportError::InternalFailure(e.to_string()))?;
            if endpoints.len() >= MAX_ENDPOINTS {
                let oldest = endpoints.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| k.clone());
                if let Some(exporters) = oldest.and_then(|k| endpoints.remove(&k)) {
                    exporters.close().await;
                }
            }
            endpoints.insert(endpoint.to_string(), opened);
        }
        let exporters = endpoints.get_mut(endpoint).ok_or(ExportError::AlreadyShutdown)?;
        exporters.last_used = Instant::now();
        Ok(exporters)
    }

    /// Exports one batch endpoint by endpoint: each endpoint's reports succeed or fail together, apart from the
    /// others'.
    async fn export_batch(&mut self, requests: Vec<Request<N>>) {
        let mut groups: Vec<Vec<Request<N>>> = Vec::new();
        for r in requests {
            match groups.iter_mut().find(|g| g[0].endpoint == r.endpoint) {
                Some(group) => group.push(r),
                None => groups.push(vec![r]),
            }
        }
        for group in groups {
            self.export_group(group).await;
        }
    }

    /// Exports the reports of one endpoint and settles their entries. A panic while exporting fails them, not the
    /// worker.
    async fn export_group(&mut self, requests: Vec<Request<N>>) {
        let endpoint = requests.first().map(|r| r.endpoint.clone()).unwrap_or_default();
        let result = AssertUnwindSafe(self.export(&endpoint, &requests)).catch_unwind().await;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, %endpoint, reports = requests.len(), "exporting telemetry failed");
                Some("ExportFailed")
            }
            Err(_) => {
                tracing::error!(%endpoint, reports = requests.len(), "exporting telemetry panicked");
                Some("ExportWorkerPanicked")
            }
        };
        if failure.is_none() {
            // Journalled before anyone is told, so that a status can only record what the journal knows.
            let exported: Vec<String> = {
                let ledger = self.shared.ledger();
                let queued =
                    |r: &&Request<N>| ledger.entries.get(&r.key).is_some_and(|e| e.state == EntryState::Queued);
                requests.iter().filter(queued).map(|r| r.key.clone()).collect()
            };
            self.journal(Fact::Exported, &exported.iter().map(String::as_str).collect::<Vec<_>>());
        }
        let count = requests.len() as u64;
        if tracing::enabled!(tracing::Level::DEBUG) {
            let keys: Vec<&str> = requests.iter().map(|r| r.key.as_str()).collect();
            tracing::debug!(?keys, %endpoint, failure, "export batch settled");
        }
        match failure {
            None => self.shared.metrics.exported.inc_by(count),
            Some(_) => self.shared.metrics.failures.inc_by(count),
        };
        self.shared.last_batch_failed.store(failure.is_some(), Ordering::Relaxed);
        for notify in self.shared.settle_batch(requests, failure) {
            let _ = self.notify.send(notify);
        }
    }

    /// Metrics first (recorded, then flushed: the deltas of exactly these reports), then spans.
    async fn export(&mut self, endpoint: &str, requests: &[Request<N>]) -> Result<(), ExportError> {
        let mut spans = Vec::new();
        let mut recorded = Vec::new();
        {
            let ledger = self.shared.ledger();
            for r in requests {
                let Some(entry) = ledger.entries.get(&r.key).filter(|e| e.state == EntryState::Queued) else {
                    continue;
                };
                if !entry.metrics_exported {
                    recorded.push(r);
                }
                spans.extend(r.report.spans.iter().cloned());
            }
        }
        if recorded.is_empty() && spans.is_empty() {
            return Ok(());
        }
        let exporters = Self::exporters(&mut self.endpoints, endpoint, self.export_timeout, &self.resource).await?;
        for r in &recorded {
            exporters.record(&r.report, &self.boundaries);
        }
        let provider = exporters.meter_provider.clone();
        if !recorded.is_empty() {
            // force_flush blocks on the export; keep it off the async workers.
            tokio::task::spawn_blocking(move || provider.force_flush())
                .await
                .unwrap_or_else(|e| Err(ExportError::InternalFailure(e.to_string())))?;
            {
                let mut ledger = self.shared.ledger();
                for r in &recorded {
                    if let Some(entry) = ledger.entries.get_mut(&r.key) {
                        entry.metrics_exported = true;
                    }
                }
            }
            // Should the spans fail and the process die before their retry, the metrics must not go out again.
            if !spans.is_empty() {
                let keys: Vec<&str> = recorded.iter().map(|r| r.key.as_str()).collect();
                self.journal(Fact::MetricsExported, &keys);
            }
        }
        if !spans.is_empty() {
            let exporters = self.endpoints.get(endpoint).ok_or(ExportError::AlreadyShutdown)?;
            exporters.span_exporter.export(spans).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle whose worker is never started: what the ledger says, without a network.
    fn idle(drop_after: Duration, capacity: usize) -> (Telemetry<u32>, mpsc::Receiver<Request<u32>>) {
        idle_with(drop_after, capacity, Some("http://default:4317"))
    }

    fn idle_with(
        drop_after: Duration,
        capacity: usize,
        default_endpoint: Option<&str>,
    ) -> (Telemetry<u32>, mpsc::Receiver<Request<u32>>) {
        let (queue, rx) = mpsc::channel(capacity);
        let (_tx, stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            queue,
            default_endpoint: default_endpoint.map(str::to_string),
            ledger: Mutex::default(),
            drop_after,
            metrics: ExportMetrics::default(),
            last_batch_failed: AtomicBool::new(false),
            shutdown: Notify::new(),
            stopped,
            settled: watch::Sender::new(0),
            waited: Mutex::default(),
            export_timeout: Duration::from_secs(5),
        });
        (Telemetry { shared: Some(shared) }, rx)
    }

    fn settle(t: &Telemetry<u32>, key: &str, failure: Option<&str>) {
        let shared = t.shared.as_ref().expect("enabled");
        let mut ledger = shared.ledger();
        let entry = ledger.entries.get_mut(key).expect("entry");
        match failure {
            None => entry.state = EntryState::Exported,
            Some(reason) => {
                entry.state = EntryState::Failed;
                entry.last_failure = Some(reason.into());
            }
        }
    }

    fn backdate(t: &Telemetry<u32>, key: &str, by: Duration) {
        let shared = t.shared.as_ref().expect("enabled");
        let mut ledger = shared.ledger();
        let entry = ledger.entries.get_mut(key).expect("entry");
        entry.first_try -= by;
        entry.last_try -= by;
    }

    #[test]
    fn reports_the_journal_recalls_are_not_exported_again_and_metrics_alone_retry_their_spans_only() {
        let (t, mut rx) = idle(Duration::from_secs(30), 8);
        let shared = t.shared.as_ref().expect("enabled");
        shared.ledger().recall(vec![
            Recalled { key: "metrics-only".into(), fact: Fact::MetricsExported, age: Duration::from_secs(10) },
            Recalled { key: "exported".into(), fact: Fact::Exported, age: Duration::from_secs(5) },
        ]);
        assert_eq!(t.report("exported", &Destination::Default, 1, Report::default), ReportState::Exported);
        assert!(rx.try_recv().is_err(), "nothing queued for a recalled export");
        // Its spans are sent again, its metrics not (they went out before the restart).
        assert_eq!(
            t.report("metrics-only", &Destination::Default, 2, Report::default),
            ReportState::Failing { reason: "ExportInterrupted".into() }
        );
        assert_eq!(rx.try_recv().map(|r| r.key).ok().as_deref(), Some("metrics-only"));
        assert!(shared.ledger().entries.get("metrics-only").is_some_and(|e| e.metrics_exported));
        let facts: Vec<(String, Fact)> = shared.ledger().facts().into_iter().map(|f| (f.key, f.fact)).collect();
        assert_eq!(facts, [("metrics-only".into(), Fact::MetricsExported), ("exported".into(), Fact::Exported)]);
    }

    #[test]
    fn a_report_is_queued_once_and_then_exported() {
        let (t, mut rx) = idle(Duration::from_secs(30), 8);
        assert_eq!(t.report("a", &Destination::Default, 1, Report::default), ReportState::Pending);
        assert_eq!(t.report("a", &Destination::Default, 1, Report::default), ReportState::Pending);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "asked twice, queued once");
        settle(&t, "a", None);
        assert_eq!(t.report("a", &Destination::Default, 1, Report::default), ReportState::Exported);
    }

    #[test]
    fn a_queued_retry_keeps_the_last_failure() {
        let (t, mut rx) = idle(Duration::from_secs(30), 8);
        t.report("a", &Destination::Default, 1, Report::default);
        settle(&t, "a", Some("ExportFailed"));
        let failing = ReportState::Failing { reason: "ExportFailed".into() };
        assert_eq!(t.report("a", &Destination::Default, 1, Report::default), failing);
        backdate(&t, "a", RETRY_EVERY);
        assert_eq!(
            t.report("a", &Destination::Default, 1, Report::default),
            failing,
            "requeued, still failing until it succeeds"
        );
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 2, "first try and one retry");
        assert_eq!(
            t.report("a", &Destination::Default, 1, Report::default),
            failing,
            "no second retry within RETRY_EVERY"
        );
        settle(&t, "a", None);
        assert_eq!(t.report("a", &Destination::Default, 1, Report::default), ReportState::Exported);
    }

    #[test]
    fn pending_and_failing_reports_are_dropped_after_the_timeout() {
        let (t, _rx) = idle(Duration::from_secs(30), 8);
        t.report("stuck", &Destination::Default, 1, Report::default);
        backdate(&t, "stuck", Duration::from_secs(31));
        assert_eq!(
            t.report("stuck", &Destination::Default, 1, Report::default),
            ReportState::Dropped { reason: "ExportTimedOut".into() }
        );
        t.report("failing", &Destination::Default, 1, Report::default);
        settle(&t, "failing", Some("ExportFailed"));
        backdate(&t, "failing", Duration::from_secs(31));
        assert_eq!(
            t.report("failing", &Destination::Default, 1, Report::default),
            ReportState::Dropped { reason: "ExportFailed".into() }
        );
        let dropped = t.shared.as_ref().map(|s| s.metrics.dropped.get());
        assert_eq!(dropped, Some(2));
    }

    #[test]
    fn a_full_queue_fails_the_report_and_a_closed_one_says_the_worker_stopped() {
        let (t, rx) = idle(Duration::from_secs(30), 1);
        assert_eq!(t.report("a", &Destination::Default, 1, Report::default), ReportState::Pending);
        assert_eq!(
            t.report("b", &Destination::Default, 2, Report::default),
            ReportState::Failing { reason: "ExportQueueFull".into() }
        );
        drop(rx);
        assert!(!t.is_healthy());
        assert_eq!(
            t.report("c", &Destination::Default, 3, Report::default),
            ReportState::Failing { reason: "ExportWorkerStopped".into() }
        );
    }

    #[test]
    fn outcomes_are_forgotten_in_insertion_order() {
        let mut ledger = Ledger::default();
        let old = Instant::now() - Duration::from_secs(100);
        for (key, at) in [("old", old), ("new", Instant::now())] {
            let entry = Entry {
                state: EntryState::Exported,
                first_try: at,
                last_try: at,
                last_failure: None,
                metrics_exported: true,
            };
            ledger.insert(key.into(), entry);
        }
        ledger.expire(Duration::from_secs(50));
        assert!(ledger.entries.get("old").is_none());
        assert!(ledger.entries.get("new").is_some());
    }

    #[test]
    fn peek_says_where_a_report_stands_without_queueing_it() {
        let (t, mut rx) = idle(Duration::from_secs(30), 8);
        assert_eq!(t.peek("a"), None);
        t.report("a", &Destination::Default, 1, Report::default);
        assert!(rx.try_recv().is_ok());
        settle(&t, "a", Some("ExportFailed"));
        backdate(&t, "a", RETRY_EVERY);
        assert_eq!(t.peek("a"), Some(ReportState::Failing { reason: "ExportFailed".into() }));
        assert!(rx.try_recv().is_err(), "a peek never retries");
        t.report("a", &Destination::Default, 1, Report::default);
        assert_eq!(t.peek("a"), Some(ReportState::Pending), "a queued retry may still go out");
        t.report("b", &Destination::Default, 2, Report::default);
        backdate(&t, "b", Duration::from_secs(31));
        assert_eq!(t.peek("b"), Some(ReportState::Dropped { reason: "ExportTimedOut".into() }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_takes_what_arrives_within_the_linger_and_no_more() {
        let (tx, mut rx) = mpsc::channel(16);
        for (after_ms, report) in [(30, 2), (49, 3), (51, 4)] {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                tx.send(report).await.unwrap();
            });
        }
        let mut batch = vec![1];
        assert!(!gather(&mut rx, &mut batch, 512, Duration::from_millis(50)).await);
        assert_eq!(batch, [1, 2, 3]);
        // A full batch goes at once; a closed queue says so.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut batch = vec![];
        tx.send(5).await.unwrap();
        tx.send(6).await.unwrap();
        assert!(!gather(&mut rx, &mut batch, 2, Duration::from_secs(3600)).await);
        assert_eq!(batch, [4, 5]);
        drop(tx);
        let mut batch = vec![];
        assert!(gather(&mut rx, &mut batch, 512, Duration::from_secs(3600)).await);
        assert_eq!(batch, [6]);
    }

    #[tokio::test]
    async fn settled_waits_for_the_batch_that_settles_the_report() {
        let (t, _rx) = idle(Duration::from_secs(30), 8);
        t.report("a", &Destination::Default, 1, Report::default);
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.settled("a").await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "still on its way");
        settle(&t, "a", None);
        if let Some(shared) = &t.shared {
            shared.settled.send_modify(|g| *g += 1);
        }
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("joined");
        assert_eq!(t.peek("a"), Some(ReportState::Exported));
    }

    #[tokio::test]
    async fn a_report_settled_while_waited_for_is_not_notified_and_the_waiter_sees_it() {
        let (t, mut rx) = idle(Duration::from_secs(30), 8);
        t.report("a", &Destination::Default, 1, Report::default);
        t.report("b", &Destination::Default, 2, Report::default);
        let (a, b) = (rx.try_recv().expect("a"), rx.try_recv().expect("b"));
        let shared = t.shared.clone().expect("enabled");
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move {
                t.settled("a").await;
                t.peek("a")
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(shared.settle_batch(vec![a, b], None), vec![2], "only the report nobody waits for");
        let seen = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken").expect("joined");
        assert_eq!(seen, Some(ReportState::Exported));
        assert!(shared.waited().is_empty(), "the waiter left");
        t.report("c", &Destination::Default, 3, Report::default);
        let c = rx.try_recv().expect("c");
        assert_eq!(shared.settle_batch(vec![c], None), vec![3], "no waiter: notified");
    }

    #[test]
    fn a_report_goes_to_its_own_endpoint_and_an_unreachable_one_fails_without_going_elsewhere() {
        let (t, mut rx) = idle(Duration::from_secs(30), 8);
        let stack = Destination::Endpoint("http://stack-collector.team.svc:4317".into());
        assert_eq!(t.report("a", &stack, 1, Report::default), ReportState::Pending);
        assert_eq!(t.report("b", &Destination::Default, 2, Report::default), ReportState::Pending);
        let endpoints: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok()).map(|r| r.endpoint).collect();
        assert_eq!(endpoints, ["http://stack-collector.team.svc:4317", "http://default:4317"]);

        let missing = Destination::Unavailable { reason: "TelemetryStackNotFound".into() };
        let failing = ReportState::Failing { reason: "TelemetryStackNotFound".into() };
        assert_eq!(t.report("c", &missing, 3, Report::default), failing);
        assert!(rx.try_recv().is_err(), "nothing queued, to the default or anywhere");
        backdate(&t, "c", RETRY_EVERY);
        assert_eq!(t.report("c", &stack, 3, Report::default), failing, "reachable now: queued, failing until it goes");
        assert_eq!(rx.try_recv().map(|r| r.endpoint).ok().as_deref(), Some("http://stack-collector.team.svc:4317"));
        backdate(&t, "c", Duration::from_secs(30));
        assert_eq!(
            t.report("c", &missing, 3, Report::default),
            ReportState::Dropped { reason: "TelemetryStackNotFound".into() }
        );
    }

    #[test]
    fn without_a_default_endpoint_only_reports_with_their_own_are_exported() {
        let (t, mut rx) = idle_with(Duration::from_secs(30), 8, None);
        assert!(!t.exports_to(&Destination::Default));
        assert_eq!(t.report("a", &Destination::Default, 1, Report::default), ReportState::Disabled);
        let stack = Destination::Endpoint("http://stack:4317".into());
        assert!(t.exports_to(&stack));
        assert_eq!(t.report("b", &stack, 2, Report::default), ReportState::Pending);
        assert_eq!(rx.try_recv().map(|r| r.key).ok().as_deref(), Some("b"));
    }

    #[test]
    fn disabled_exports_nothing() {
        let t = Telemetry::<u32>::disabled();
        assert_eq!(t.report("a", &Destination::Default, 1, Report::default), ReportState::Disabled);
        assert!(!t.is_healthy());
    }
}
