//! What a WorkflowRun reports, as a pure function of its status: one report at its end (as the user's original
//! library records a run when it ends): `workflow.run.total`, `workflow.run.status`, `workflow.run.duration_ms`,
//! `workflow.retry.count` and the spans `workflow.run` and `workflow.attempt`, timed by what status recorded (never
//! by the time of export).
//!
//! Exactly once across restarts (the KEP-2307 pattern): the report is exported before the status write that records
//! it (`status.telemetry.finished`, with the write after the terminal one), so a crash can only re-export what was
//! exported in the milliseconds before that write; span ids are derived from the UID, so a trace backend keeps one
//! span even then.

use std::borrow::Cow;
use std::time::SystemTime;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::{AttemptClassification, WorkflowRunPhase, WorkflowRunStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::ResourceExt;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use super::plan::SUCCEEDED;
use crate::runtime::ids;
use crate::telemetry::{CounterAdd, HistogramRecord, Report};

pub const RUN_TOTAL: &str = "workflow.run.total";
pub const RUN_STATUS: &str = "workflow.run.status";
pub const RUN_DURATION: &str = "workflow.run.duration_ms";
pub const RETRY_COUNT: &str = "workflow.retry.count";

/// Default `workflow.run.duration_ms` boundaries, from the user's telemetry system.
pub const DEFAULT_DURATION_BOUNDARIES: [f64; 11] =
    [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// The exporter's key of a run's one report (as the export journal has noted it since runs had two).
pub fn key(run_uid: &str) -> String {
    format!("{run_uid}/finished")
}

fn workflow_label(run: &WorkflowRun) -> KeyValue {
    KeyValue::new("workflow_name", run.spec.workflow_name.clone())
}

/// `workflow.run.total`.
pub fn started(run: &WorkflowRun) -> Report {
    Report {
        counters: vec![CounterAdd {
            name: RUN_TOTAL,
            description: "Total workflow runs",
            value: 1,
            attributes: vec![workflow_label(run)],
        }],
        ..Report::default()
    }
}

/// The `status` label of `workflow.run.status`: `success`, `failure` or `cancelled`.
pub fn status_label(status: &WorkflowRunStatus) -> &'static str {
    let cancelled = status.conditions.iter().any(|c| c.type_ == SUCCEEDED && c.reason == "Cancelled");
    match status.phase {
        Some(WorkflowRunPhase::Succeeded) => "success",
        _ if cancelled => "cancelled",
        _ => "failure",
    }
}

fn system_time(t: &MicroTime) -> SystemTime {
    SystemTime::from(t.0)
}

/// Retries by step (the container that failed), in the order first seen. Status keeps the last attempts only;
/// retries older than those are counted against the oldest step still known.
fn retries_by_step(status: &WorkflowRunStatus) -> Vec<(String, u64)> {
    let attempts = &status.attempts;
    let mut by_step: Vec<(String, u64)> = Vec::new();
    let mut kept = 0u64;
    for (i, a) in attempts.iter().enumerate() {
        // A transient failure that a later attempt followed was retried.
        if a.classification == Some(AttemptClassification::Transient) && i + 1 < attempts.len() {
            kept += 1;
            let step = a.container.clone().unwrap_or_else(|| "main".into());
            match by_step.iter_mut().find(|(s, _)| *s == step) {
                Some((_, n)) => *n += 1,
                None => by_step.push((step, 1)),
            }
        }
    }
    let last_not_retried = attempts.last().is_some_and(|a| a.classification == Some(AttemptClassification::Transient));
    let failures = u64::try_from(status.transient_failures.unwrap_or_default()).unwrap_or_default();
    let all = failures.saturating_sub(u64::from(last_not_retried));
    if all > kept {
        match by_step.first_mut() {
            Some((_, n)) => *n += all - kept,
            None => by_step.push(("main".into(), all - kept)),
        }
    }
    by_step
}

/// The run's terminal report, from its terminal status. None while status lacks the times it needs. With
/// `with_start` (always, unless a status written by an older flowtel recorded a separate start report), it counts
/// the run (`workflow.run.total`) too.
pub fn finished(run: &WorkflowRun, status: &WorkflowRunStatus, with_start: bool) -> Option<Report> {
    let uid = run.uid()?;
    let start = system_time(status.start_time.as_ref()?);
    let end = system_time(status.completion_time.as_ref()?);
    let trace_id = ids::trace_id(&uid);
    let scope = InstrumentationScope::builder("flowtel").with_version(env!("CARGO_PKG_VERSION")).build();
    let context =
        |span_id: SpanId| SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, TraceState::default());
    let label = status_label(status);
    let run_status = if label == "success" {
        Status::Ok
    } else {
        let reason = status.conditions.iter().find(|c| c.type_ == SUCCEEDED).map(|c| c.reason.clone());
        Status::error(reason.unwrap_or_default())
    };
    let common = [
        KeyValue::new("workflow.name", run.spec.workflow_name.clone()),
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
    for a in &status.attempts {
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
    let name = workflow_label(run);
    let mut counters = if with_start { started(run).counters } else { Vec::new() };
    counters.push(CounterAdd {
        name: RUN_STATUS,
        description: "Workflow status",
        value: 1,
        attributes: vec![name.clone(), KeyValue::new("status", label)],
    });
    counters.extend(retries_by_step(status).into_iter().map(|(step, n)| CounterAdd {
        name: RETRY_COUNT,
        description: "Retry count",
        value: n,
        attributes: vec![name.clone(), KeyValue::new("step_name", step)],
    }));
    let histograms = vec![HistogramRecord {
        name: RUN_DURATION,
        description: "Workflow duration",
        unit: "ms",
        value: status.duration_ms.unwrap_or_default() as f64,
        attributes: vec![name],
    }];
    Some(Report { counters, histograms, spans })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtel_crds::workflow_run::AttemptStatus;

    fn attempt(number: i32, class: AttemptClassification, container: &str) -> AttemptStatus {
        AttemptStatus {
            number,
            job_name: format!("r-{number}"),
            classification: Some(class),
            container: Some(container.into()),
            ..Default::default()
        }
    }

    #[test]
    fn retries_count_each_retried_failure_by_step_and_the_ones_status_no_longer_keeps() {
        use AttemptClassification::{Succeeded, Transient};
        let mut status = WorkflowRunStatus {
            attempts: vec![attempt(1, Transient, "fetch"), attempt(2, Transient, "upload"), attempt(3, Succeeded, "")],
            transient_failures: Some(2),
            ..Default::default()
        };
        assert_eq!(retries_by_step(&status), [("fetch".to_string(), 1), ("upload".to_string(), 1)]);
        // 41 attempts, 40 transient failures, only the last 32 kept (31 failures, then the success).
        status.attempts = (10..=40).map(|n| attempt(n, Transient, "main")).collect();
        status.attempts.push(attempt(41, Succeeded, ""));
        status.transient_failures = Some(40);
        assert_eq!(retries_by_step(&status), [("main".to_string(), 40)]);
        // The limit ran out: the last failure was not retried.
        status.attempts.pop();
        assert_eq!(retries_by_step(&status), [("main".to_string(), 39)]);
    }
}
