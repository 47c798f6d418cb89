//! Where a run's telemetry goes: the workload's (the Job's OTLP environment) and the run's own report (run metrics,
//! run and attempt spans). Both go to the run's TelemetryStack when it names one, else to the operator's default
//! endpoint; a run whose stack is missing or not serving waits, and its telemetry is never sent elsewhere meanwhile.

use flowtel_crds::{TelemetryStack, WorkflowRun};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::context::Context;
use super::job::OtlpTarget;
use crate::telemetry::Destination;

/// The reasons a run waits for its TelemetryStack (and its telemetry is degraded meanwhile): it does not exist, or
/// serves no OTLP endpoint yet.
pub const STACK_NOT_FOUND: &str = "TelemetryStackNotFound";
pub const STACK_NOT_READY: &str = "TelemetryStackNotReady";
pub const NO_OTLP_ENDPOINT: &str = "NoOtlpEndpoint";

/// Reasons that say where the workload's telemetry goes; they are decided afresh on every reconcile.
pub const TARGET_REASONS: [&str; 3] = [STACK_NOT_FOUND, STACK_NOT_READY, NO_OTLP_ENDPOINT];

/// The run's stack's OTLP endpoint, or why there is none: Err(None) when the run names no stack.
fn stack_endpoint(run: &WorkflowRun, ctx: &Context) -> Result<String, Option<(&'static str, String)>> {
    let Some(reference) = &run.spec.telemetry_stack_ref else { return Err(None) };
    let key = ObjectRef::<TelemetryStack>::new(&reference.name).within(&run.namespace().unwrap_or_default());
    match ctx.stacks.get(&key) {
        None => Err(Some((STACK_NOT_FOUND, reference.name.clone()))),
        Some(stack) => match stack.status.as_ref().and_then(|s| s.endpoints.otlp_grpc.clone()) {
            Some(endpoint) => Ok(endpoint),
            None => Err(Some((STACK_NOT_READY, reference.name.clone()))),
        },
    }
}

/// Where the run's own report goes.
pub fn report_destination(run: &WorkflowRun, ctx: &Context) -> Destination {
    match stack_endpoint(run, ctx) {
        Ok(endpoint) => Destination::Endpoint(endpoint),
        Err(None) => Destination::Default,
        Err(Some((reason, _))) => Destination::Unavailable { reason: reason.into() },
    }
}

/// Whether the run's report is exported at all (a finalizer holds the run until it is).
pub fn reports_exported(run: &WorkflowRun, ctx: &Context) -> bool {
    ctx.telemetry.exports_to(&report_destination(run, ctx))
}

/// The workload's telemetry target, and why telemetry is degraded when it is (reason, message).
pub fn telemetry_target(run: &WorkflowRun, ctx: &Context) -> (OtlpTarget, Option<(String, String)>) {
    let target = |endpoint| OtlpTarget { endpoint, protocol: "grpc".into() };
    match stack_endpoint(run, ctx) {
        Ok(endpoint) => (target(Some(endpoint)), None),
        Err(None) => {
            let degraded = ctx.default_otlp_endpoint.is_none().then(|| {
                let message = "no TelemetryStack referenced and the operator has no --otlp-endpoint";
                (NO_OTLP_ENDPOINT.to_string(), message.to_string())
            });
            (target(ctx.default_otlp_endpoint.clone()), degraded)
        }
        Err(Some((reason, stack))) => {
            let message = if reason == STACK_NOT_FOUND {
                format!("spec.telemetryStackRef: TelemetryStack {stack} not found; the first attempt waits for it")
            } else {
                format!("TelemetryStack {stack} has no OTLP endpoint yet; the first attempt waits for it")
            };
            (target(None), Some((reason.to_string(), message)))
        }
    }
}

/// Why the run's first attempt must wait (its stack is missing or not serving), from the target's degradation.
pub fn waiting_for(degraded: &Option<(String, String)>) -> Option<(String, String)> {
    degraded.clone().filter(|(reason, _)| [STACK_NOT_FOUND, STACK_NOT_READY].contains(&reason.as_str()))
}
