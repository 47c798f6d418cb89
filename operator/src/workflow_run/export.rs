//! The reconcile's report step: asks the exporter for the run's one report (built in `report.rs`) once the run is
//! over, and turns where the exports stand into what status says (`status.telemetry`, `TelemetryDegraded`).

use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::{TelemetryReport, WorkflowRunStatus};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::context::Context;
use super::plan;
use super::report;
use super::target::{self, NO_OTLP_ENDPOINT, TARGET_REASONS};
use crate::telemetry::{RETRY_EVERY, ReportState};

/// A backstop for a report that stays pending: the worker's notification normally comes first.
pub const PENDING_RECHECK: Duration = Duration::from_secs(10);

/// Where the run's telemetry reports stand.
#[derive(Debug, Default, PartialEq)]
pub struct Reports {
    /// What status will say about the reports.
    pub report: TelemetryReport,
    /// Set when an export failed or was dropped, or nothing is exported.
    pub degraded: Option<(String, String)>,
    /// Look again then: an export is being retried, or is pending.
    pub retry_after: Option<Duration>,
    /// A report said something definite (exported, failing, dropped, disabled); without it the condition stands.
    verdict: bool,
    /// A report on its way that this reconcile can wait for, to record it with its own status write.
    pub awaiting: Option<String>,
}

impl Reports {
    /// Takes in the state of the run's report.
    fn absorb(&mut self, state: ReportState) {
        self.verdict |= state != ReportState::Pending;
        match state {
            ReportState::Exported => self.report.finished = true,
            ReportState::Dropped { .. } => {
                self.report.finished = true;
                self.report.dropped = true;
            }
            ReportState::Failing { reason } => {
                self.degraded = Some((reason, "exporting the run's telemetry failed; retrying".into()));
                self.retry_after = Some(RETRY_EVERY);
            }
            ReportState::Pending => self.retry_after = Some(PENDING_RECHECK),
            ReportState::Disabled => {
                let message = "the operator has no --otlp-endpoint: the run's own telemetry is not exported";
                self.degraded = Some((NO_OTLP_ENDPOINT.into(), message.into()));
            }
        }
    }
}

/// Whether this reconcile may ask for a report: a finished run whose report is not recorded yet.
pub fn asks_for_a_report(stored: &WorkflowRunStatus) -> bool {
    let report = stored.telemetry.clone().unwrap_or_default();
    plan::is_terminal(stored) && !report.finished
}

/// The export degradation status records, if any.
fn degraded_in(stored: &WorkflowRunStatus) -> Option<(String, String)> {
    let c = stored.conditions.iter().find(|c| c.type_ == plan::TELEMETRY_DEGRADED && c.status == "True")?;
    (!TARGET_REASONS.contains(&c.reason.as_str())).then(|| (c.reason.clone(), c.message.clone()))
}

/// Asks for the run's report when `stored` is over, and says where the reports stand.
pub fn report_telemetry(run: &WorkflowRun, ctx: &Context, stored: &WorkflowRunStatus) -> Reports {
    let mut out = Reports { report: stored.telemetry.clone().unwrap_or_default(), ..Reports::default() };
    let Some(uid) = run.uid() else { return out };
    let object = ObjectRef::from_obj(run);
    // One report per run, at its end: `workflow.run.total` goes with the others (as in the user's original
    // library, which records a run when it ends), so a kill can re-count a run only in the milliseconds between that
    // one export and the status write recording it. A status from before this carried a separate start report
    // (`started`); its end report does not count the start again.
    if plan::is_terminal(stored) && !out.report.finished {
        let with_start = !out.report.started;
        let key = report::key(&uid);
        let destination = target::report_destination(run, ctx);
        let state = ctx
            .telemetry
            .report(&key, &destination, object, || report::finished(run, stored, with_start).unwrap_or_default());
        if state == ReportState::Pending {
            out.awaiting = Some(key);
        }
        if state == ReportState::Exported {
            // Exported, not yet recorded: the window the export journal closes.
            super::crash_point("after-export");
        }
        out.absorb(state);
        // `finished` in status always implies `started`: a finished run is never visited again.
        out.report.started |= out.report.finished;
    }
    if !out.verdict {
        // Nothing new about the exports: what status says stands (a start that failed stays degraded until the end
        // report went out), so the condition flips only on a real change.
        out.degraded = degraded_in(stored);
    }
    if out.report.dropped && out.degraded.is_none() {
        let message = "some of the run's telemetry was not exported before the drop timeout";
        out.degraded = Some((plan::reason::TELEMETRY_DROPPED.into(), message.into()));
    }
    out
}

/// The reports after asking for them, waiting (milliseconds, to a healthy collector) for one on its way, so that
/// its status write follows at once rather than after a trip through the work queue, which under load can take
/// seconds: a kill in between would count it twice.
pub async fn report_and_await(run: &WorkflowRun, ctx: &Context, stored: &WorkflowRunStatus) -> Reports {
    let mut reports = report_telemetry(run, ctx, stored);
    if let Some(key) = reports.awaiting.take()
        && ctx.telemetry.is_healthy()
    {
        ctx.telemetry.settled(&key).await;
        reports = report_telemetry(run, ctx, stored);
    }
    reports
}

/// A run that ends in this reconcile, with the economy on (`Economy::end_export_wait`): its one report goes out
/// first (milliseconds, to a healthy collector), so that a single status write records the end and the export. An
/// export that takes longer, or a collector that is failing, leaves the report to the next reconcile, as for any
/// terminal run.
pub async fn export_the_end_first(
    run: &WorkflowRun,
    ctx: &Context,
    stored: &WorkflowRunStatus,
    planned: &WorkflowRunStatus,
) -> Result<Option<Reports>, kube::Error> {
    let ends_now = !plan::is_terminal(stored) && plan::is_terminal(planned);
    let Some(wait) = ctx.economy.end_export_wait() else { return Ok(None) };
    if !ends_now || !target::reports_exported(run, ctx) || !ctx.telemetry.is_healthy() {
        return Ok(None);
    }
    ctx.await_apiserver(run).await?;
    let mut reports = report_telemetry(run, ctx, planned);
    if let Some(key) = reports.awaiting.take() {
        let _ = tokio::time::timeout(wait, ctx.telemetry.settled(&key)).await;
        reports = report_telemetry(run, ctx, planned);
    }
    Ok(reports.report.finished.then_some(reports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_states_map_to_status_and_conditions() {
        let mut r = Reports::default();
        r.absorb(ReportState::Pending);
        assert_eq!((r.report.finished, r.degraded.clone(), r.retry_after), (false, None, Some(PENDING_RECHECK)));
        r.absorb(ReportState::Failing { reason: "ExportFailed".into() });
        assert_eq!(r.degraded.as_ref().map(|d| d.0.as_str()), Some("ExportFailed"));
        assert_eq!(r.retry_after, Some(RETRY_EVERY));
        let mut r = Reports::default();
        r.absorb(ReportState::Dropped { reason: "ExportFailed".into() });
        assert!(r.report.finished && r.report.dropped);
        let mut r = Reports::default();
        r.absorb(ReportState::Disabled);
        assert_eq!(r.degraded.map(|d| d.0), Some(NO_OTLP_ENDPOINT.to_string()));
        assert!(!r.report.finished, "nothing is recorded as exported when nothing is");
    }
}
