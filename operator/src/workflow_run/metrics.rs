//! The WorkflowRun controller's own metrics on the admin port's `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone)]
pub struct ControllerMetrics {
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub status_writes: Counter,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Counter::default(),
            errors: Family::default(),
            duration: Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
            status_writes: Counter::default(),
        };
        registry.register("flowtel_reconciles", "Completed WorkflowRun reconciles", m.reconciles.clone());
        registry.register("flowtel_reconcile_errors", "Failed WorkflowRun reconciles, by error kind", m.errors.clone());
        registry.register(
            "flowtel_reconcile_duration_seconds",
            "Duration of WorkflowRun reconciles",
            m.duration.clone(),
        );
        registry.register("flowtel_status_writes", "WorkflowRun status writes", m.status_writes.clone());
        m
    }

    /// Counted when done, so a reader of /metrics sees the effects of every reconcile it counts.
    pub fn reconciled(&self, took: Duration, error: Option<&'static str>) {
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.errors.get_or_create(&ErrorLabels { error: kind.into() }).inc();
        }
        self.reconciles.inc();
    }
}
