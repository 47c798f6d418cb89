//! The telemetry finalizer: it holds a run's deletion until its report was exported (or dropped after the timeout),
//! and only while the operator exports the run's telemetry at all.

use std::sync::Arc;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunStatus;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::context::Context;
use super::plan;
use crate::runtime::slim::Slim;

/// Holds a run's deletion until its telemetry was exported (or dropped after the timeout).
pub const FINALIZER: &str = "flowtel.dev/telemetry";

/// Whether the run holds the telemetry finalizer, and what to do about it.
#[derive(Debug, PartialEq)]
pub enum FinalizerStep {
    Continue,
    /// Patch the finalizers to this list; when `then_stop`, the reconcile ends (the patch's event brings it back).
    Patch {
        finalizers: Vec<String>,
        then_stop: bool,
    },
    Stop,
}

/// Pure: the finalizer is held only while the operator exports telemetry, and goes once a deleted run's telemetry is
/// in status.
pub fn finalizer_step(run: &WorkflowRun, stored: &WorkflowRunStatus, exports: bool) -> FinalizerStep {
    let has = run.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = run.metadata.deletion_timestamp.is_some();
    let without = || run.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    let reported = plan::is_terminal(stored) && stored.telemetry.as_ref().is_some_and(|t| t.finished);
    match (exports, deleting, has) {
        (_, true, false) => FinalizerStep::Stop,
        (false, _, true) => FinalizerStep::Patch { finalizers: without(), then_stop: true },
        (false, false, false) => FinalizerStep::Continue,
        // Over and reported already (restored from a backup, or from before an endpoint was set): nothing is left
        // to guard, and a finalizer would cost a write per such run at every start.
        (true, false, false) if reported => FinalizerStep::Continue,
        // Added, and the reconcile goes on: the start report and the first attempt need not wait for the echo.
        (true, false, false) => {
            let mut finalizers = run.finalizers().to_vec();
            finalizers.push(FINALIZER.into());
            FinalizerStep::Patch { finalizers, then_stop: false }
        }
        (true, true, true) if reported => FinalizerStep::Patch { finalizers: without(), then_stop: true },
        (true, _, true) => FinalizerStep::Continue,
    }
}

/// Patches the finalizers of this copy of the run; returns the patched copy, or None when the copy was stale (a
/// conflict: the newer copy's watch event brings the run back) or the run is gone.
pub async fn patch_finalizers(
    run: &WorkflowRun,
    ctx: &Context,
    finalizers: &[String],
) -> Result<Option<Arc<WorkflowRun>>, kube::Error> {
    let runs: Api<Slim<WorkflowRun>> = Api::namespaced(ctx.client.clone(), &run.namespace().unwrap_or_default());
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": run.resource_version()}});
    match runs.patch(&run.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(patched) => {
            let patched = Arc::new(patched.into_inner());
            ctx.wrote(&patched);
            Ok(Some(patched))
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtel_crds::workflow_run::{TelemetryReport, WorkflowRunPhase};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

    fn run(finalizers: &[&str], deleting: bool) -> WorkflowRun {
        let mut run: WorkflowRun = serde_json::from_value(json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": "r", "namespace": "ns", "uid": "u", "finalizers": finalizers},
            "spec": {"workflowName": "w", "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}}}
        }))
        .expect("run");
        if deleting {
            run.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        }
        run
    }

    fn status(phase: WorkflowRunPhase, finished: bool) -> WorkflowRunStatus {
        WorkflowRunStatus {
            phase: Some(phase),
            start_time: Some(MicroTime(jiff::Timestamp::UNIX_EPOCH)),
            telemetry: Some(TelemetryReport { started: true, finished, dropped: false }),
            ..Default::default()
        }
    }

    #[test]
    fn the_finalizer_is_held_only_while_telemetry_is_exported() {
        let running = status(WorkflowRunPhase::Running, false);
        let done = status(WorkflowRunPhase::Succeeded, true);
        let add = FinalizerStep::Patch { finalizers: vec![FINALIZER.into()], then_stop: false };
        assert_eq!(finalizer_step(&run(&[], false), &running, true), add);
        assert_eq!(finalizer_step(&run(&[FINALIZER], false), &running, true), FinalizerStep::Continue);
        assert_eq!(finalizer_step(&run(&[FINALIZER], true), &running, true), FinalizerStep::Continue);
        let remove = FinalizerStep::Patch { finalizers: vec!["other".into()], then_stop: true };
        assert_eq!(finalizer_step(&run(&["other", FINALIZER], true), &done, true), remove);
        assert_eq!(finalizer_step(&run(&[], false), &running, false), FinalizerStep::Continue, "no exporter");
        let drop_it = FinalizerStep::Patch { finalizers: vec![], then_stop: true };
        assert_eq!(finalizer_step(&run(&[FINALIZER], false), &running, false), drop_it);
        assert_eq!(finalizer_step(&run(&[], true), &running, true), FinalizerStep::Stop);
        assert_eq!(finalizer_step(&run(&[], false), &done, true), FinalizerStep::Continue, "reported: none added");
    }
}
