//! What every WorkflowRun reconcile shares: the client, the caches, the exporter, the settings, the write economy,
//! and the apiserver-freshness gate that guards a report's export.

use std::time::{Duration, Instant};

use flowtel_crds::{TelemetryStack, WorkerPool, WorkflowRun};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};

use super::economy::Economy;
use super::index;
use super::metrics::ControllerMetrics;
use super::plan::Settings;
use crate::telemetry::Telemetry;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub jobs: Store<Job>,
    pub pods: Store<Pod>,
    pub stacks: Store<TelemetryStack>,
    pub pools: Store<WorkerPool>,
    /// Hands pooled runs' attempts to workers; None when this operator serves no dispatch endpoint.
    pub dispatcher: Option<crate::pool::dispatch::Dispatcher>,
    /// Job and pod names by run.
    pub job_index: index::RunIndex,
    pub pod_index: index::RunIndex,
    pub telemetry: Telemetry<ObjectRef<WorkflowRun>>,
    /// Runs started per referenced TelemetryStack (the stack controller scales collectors by it).
    pub rates: crate::runtime::rates::RunRates,
    /// The planner's settings, as the economy adjusts them (`Economy::settings`).
    pub settings: Settings,
    /// The workload's OTLP endpoint when a run references no TelemetryStack.
    pub default_otlp_endpoint: Option<String>,
    /// Whether Normal Events are published (each is an apiserver write: opt-in); Warnings always are.
    pub normal_events: bool,
    pub recorder: Recorder,
    pub metrics: ControllerMetrics,
    /// Everything that saves writes, reconciles or echoes, behind one switch (`economy.rs`).
    pub economy: Economy,
    /// When a write of ours (or a read from etcd) last succeeded; None after a failure (unreachable, 5xx, 429).
    pub api_answered: std::sync::Mutex<Option<Instant>>,
}

/// A report is exported only when the apiserver wrote to etcd this recently: the export is recorded by the
/// status write that follows it, and a kill while that write hangs (etcd or the apiserver restarting) would
/// export it again. Busy, writes keep this fresh; idle, a read from etcd confirms it.
const API_FRESH: Duration = Duration::from_millis(500);

impl Context {
    /// The apiserver failed to answer (unreachable, 5xx, 429): the next report waits for a read from etcd.
    pub fn note_outage(&self) {
        *self.api_answered.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn note_answer(&self) {
        *self.api_answered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// A copy of the run as the apiserver answered our write.
    pub fn wrote(&self, copy: &std::sync::Arc<WorkflowRun>) {
        self.note_answer();
        self.economy.wrote(copy);
    }

    /// Before a run asks for a report: unless a write succeeded within API_FRESH, read the run from etcd (a GET
    /// without resourceVersion is a quorum read), which hangs or fails while a write could not succeed either.
    pub async fn await_apiserver(&self, run: &WorkflowRun) -> Result<(), kube::Error> {
        let fresh =
            self.api_answered.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| t.elapsed() < API_FRESH);
        if !fresh {
            let runs: Api<WorkflowRun> = Api::namespaced(self.client.clone(), &run.namespace().unwrap_or_default());
            runs.get_metadata_opt(&run.name_any()).await?;
            self.note_answer();
        }
        Ok(())
    }
}
