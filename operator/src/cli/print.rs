//! Pure: what `kubectl flowtel` prints for runs, attempts and traces.

use std::fmt::Write as _;

use flowtel_crds::telemetry_stack::TraceApi;
use flowtel_crds::workflow_run::{AttemptClassification, WorkflowRunStatus};
use flowtel_crds::{TelemetryStack, WorkflowRun};
use jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use crate::workflow_run::plan::SUCCEEDED;

/// The reason of the run's `Succeeded` condition (why it is where it is), if any.
pub fn reason(status: &WorkflowRunStatus) -> String {
    status.conditions.iter().find(|c| c.type_ == SUCCEEDED).map(|c| c.reason.clone()).unwrap_or_default()
}

/// A duration as people read it: `850ms`, `4.2s`, `3m4s`, `2h5m`, `3d4h`.
pub fn human(duration: SignedDuration) -> String {
    let ms = duration.as_millis().max(0);
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{:.1}s", ms as f64 / 1000.0),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

fn since(then: Timestamp, now: Timestamp) -> String {
    human(now.duration_since(then))
}

/// The run's duration: recorded once it is over, else so far.
fn duration(status: &WorkflowRunStatus, now: Timestamp) -> String {
    match (status.duration_ms, status.start_time.as_ref()) {
        (Some(ms), _) => human(SignedDuration::from_millis(ms)),
        (None, Some(start)) => since(start.0, now),
        (None, None) => String::new(),
    }
}

fn phase(status: &WorkflowRunStatus) -> String {
    status.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "Pending".into())
}

fn classification(c: Option<AttemptClassification>) -> String {
    c.map(|c| format!("{c:?}")).unwrap_or_default()
}

/// Columns padded to their widest cell.
fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| rows.iter().map(|r| r.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("   ").trim_end());
    }
    out
}

/// `get`: one line per run.
pub fn table(runs: &[WorkflowRun], now: Timestamp) -> String {
    let mut rows =
        vec![["NAME", "WORKFLOW", "PHASE", "REASON", "ATTEMPTS", "AGE", "DURATION"].map(String::from).to_vec()];
    for run in runs {
        let status = run.status.clone().unwrap_or_default();
        let age = run.metadata.creation_timestamp.as_ref().map(|t| since(t.0, now)).unwrap_or_default();
        rows.push(vec![
            run.name_any(),
            run.spec.workflow_name.clone(),
            phase(&status),
            reason(&status),
            status.attempt_count.unwrap_or(0).to_string(),
            age,
            duration(&status, now),
        ]);
    }
    columns(&rows)
}

/// `describe`: the run, its attempts, its conditions.
pub fn describe(run: &WorkflowRun, now: Timestamp) -> String {
    let status = run.status.clone().unwrap_or_default();
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        if !value.is_empty() {
            let _ = writeln!(out, "{:<14}{value}", format!("{name}:"));
        }
    };
    field("Name", run.name_any());
    field("Namespace", run.namespace().unwrap_or_default());
    field("Workflow", run.spec.workflow_name.clone());
    field("Phase", phase(&status));
    field("Reason", reason(&status));
    let message = status.conditions.iter().find(|c| c.type_ == SUCCEEDED).map(|c| c.message.clone());
    field("Message", message.unwrap_or_default());
    field("Started", status.start_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default());
    field("Finished", status.completion_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default());
    field("Duration", duration(&status, now));
    field("Next attempt", status.next_attempt_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default());
    field("Trace ID", status.trace_id.clone().unwrap_or_default());
    field("Stack", run.spec.telemetry_stack_ref.as_ref().map(|r| r.name.clone()).unwrap_or_default());
    let retries = format!(
        "{} transient failure(s), {} disruption(s)",
        status.transient_failures.unwrap_or(0),
        status.disruptions.unwrap_or(0)
    );
    field("Retries", retries);
    let telemetry = status.telemetry.clone().unwrap_or_default();
    let exported = match (telemetry.finished, telemetry.dropped, telemetry.started) {
        (true, _, _) => "start and end exported",
        (false, true, _) => "dropped (the collector stayed unreachable)",
        (false, false, true) => "start exported",
        (false, false, false) => "not yet",
    };
    field("Telemetry", exported.into());
    let mut rows =
        vec![["#", "JOB", "POD", "STARTED", "DURATION", "EXIT", "CLASS", "REASON"].map(String::from).to_vec()];
    for a in &status.attempts {
        let took = match (&a.start_time, &a.end_time) {
            (Some(s), Some(e)) => human(e.0.duration_since(s.0)),
            (Some(s), None) => since(s.0, now),
            _ => String::new(),
        };
        rows.push(vec![
            a.number.to_string(),
            a.job_name.clone(),
            a.pod_name.clone().unwrap_or_default(),
            a.start_time.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
            took,
            a.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            classification(a.classification),
            a.reason.clone().unwrap_or_default(),
        ]);
    }
    let kept = status.attempts.len();
    let count = status.attempt_count.unwrap_or(0);
    let _ = writeln!(
        out,
        "Attempts:     {count}{}",
        if usize::try_from(count).unwrap_or(0) > kept { format!(" (the last {kept} kept)") } else { String::new() }
    );
    if kept > 0 {
        for line in columns(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    let _ = writeln!(out, "Conditions:");
    for c in &status.conditions {
        let _ = writeln!(out, "  {} = {} ({}) {}", c.type_, c.status, c.reason, c.message);
    }
    out
}

/// `watch`: the run in one line (phase, reason, attempt, duration so far).
pub fn watch_line(run: &WorkflowRun, now: Timestamp) -> String {
    let status = run.status.clone().unwrap_or_default();
    let last = status.attempts.last();
    let attempt = match last {
        Some(a) => format!(
            " attempt {}{}{}",
            a.number,
            a.exit_code.map(|c| format!(" exit {c}")).unwrap_or_default(),
            a.classification.map(|c| format!(" {c:?}")).unwrap_or_default()
        ),
        None => String::new(),
    };
    let reason = reason(&status);
    let reason = if reason.is_empty() { String::new() } else { format!(" ({reason})") };
    let took = duration(&status, now);
    let took = if took.is_empty() || status.completion_time.is_none() { String::new() } else { format!(" in {took}") };
    format!("{} {}{reason}{attempt}{took}", run.name_any(), phase(&status))
}

/// `trace`: the trace id, its page in the stack's Grafana (or `grafana_url`, e.g. after a port-forward), and in
/// the trace backend's own UI or API.
pub fn trace_links(trace_id: &str, stack: Option<&TelemetryStack>, grafana_url: Option<&str>) -> String {
    let mut out = format!("trace   {trace_id}\n");
    let api = stack
        .map(|s| if s.spec.tempo.enabled { TraceApi::Tempo } else { s.spec.tempo.external_api.unwrap_or_default() });
    let endpoints = stack.and_then(|s| s.status.as_ref()).map(|s| s.endpoints.clone()).unwrap_or_default();
    let grafana = grafana_url.map(String::from).or(endpoints.grafana);
    if let Some(grafana) = grafana {
        let (uid, kind) = match api.unwrap_or_default() {
            TraceApi::Tempo => ("tempo", "tempo"),
            TraceApi::Jaeger => ("jaeger", "jaeger"),
        };
        let pane = serde_json::json!({"trace": {
            "datasource": uid,
            "queries": [{"refId": "A", "datasource": {"type": kind, "uid": uid}, "queryType": "traceql", "query": trace_id}],
            "range": {"from": "now-24h", "to": "now"},
        }});
        let panes = utf8_percent_encode(&pane.to_string(), NON_ALPHANUMERIC).to_string();
        let _ =
            writeln!(out, "grafana {}/explore?schemaVersion=1&orgId=1&panes={panes}", grafana.trim_end_matches('/'));
    }
    match (api, endpoints.tempo) {
        (Some(TraceApi::Tempo), Some(tempo)) => {
            let _ = writeln!(out, "tempo   {}/api/v2/traces/{trace_id}", tempo.trim_end_matches('/'));
        }
        (Some(TraceApi::Jaeger), Some(jaeger)) => {
            let _ = writeln!(out, "jaeger  {}/trace/{trace_id}", jaeger.trim_end_matches('/'));
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(status: serde_json::Value) -> WorkflowRun {
        serde_json::from_value(json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun",
            "metadata": {"name": "nightly", "namespace": "ns", "creationTimestamp": "2026-12-07T10:00:00Z"},
            "spec": {"workflowName": "sync", "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}}},
            "status": status
        }))
        .expect("run")
    }

    fn failed() -> WorkflowRun {
        run(json!({
            "phase": "Failed", "attemptCount": 3, "transientFailures": 1, "disruptions": 1,
            "startTime": "2026-12-07T10:00:01.000000Z", "completionTime": "2026-12-07T10:03:05.000000Z",
            "durationMs": 184000, "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
            "attempts": [
                {"number": 2, "jobName": "nightly-2", "podName": "nightly-2-abcde", "exitCode": 137,
                 "startTime": "2026-12-07T10:01:00.000000Z", "endTime": "2026-12-07T10:01:30.000000Z",
                 "classification": "Disruption", "reason": "DisruptionTarget"},
                {"number": 3, "jobName": "nightly-3", "podName": "nightly-3-fghij", "exitCode": 2,
                 "startTime": "2026-12-07T10:03:00.000000Z", "endTime": "2026-12-07T10:03:05.000000Z",
                 "classification": "Permanent", "reason": "Error"}
            ],
            "conditions": [{"type": "Succeeded", "status": "False", "reason": "PermanentFailure",
                "message": "attempt 3 exited with code 2", "lastTransitionTime": "2026-12-07T10:03:05Z"}]
        }))
    }

    fn at(t: &str) -> Timestamp {
        t.parse().expect("timestamp")
    }

    #[test]
    fn durations_read_as_people_say_them() {
        let cases = [(850, "850ms"), (4_200, "4.2s"), (184_000, "3m4s"), (7_500_000, "2h5m"), (273_600_000, "3d4h")];
        for (ms, text) in cases {
            assert_eq!(human(SignedDuration::from_millis(ms)), text);
        }
    }

    #[test]
    fn a_table_shows_phase_reason_attempts_and_a_human_duration() {
        let pending = run(json!(null));
        let table = table(&[failed(), pending], at("2026-12-07T10:05:00Z"));
        assert_eq!(
            table,
            "NAME      WORKFLOW   PHASE     REASON             ATTEMPTS   AGE    DURATION\n\
             nightly   sync       Failed    PermanentFailure   3          5m0s   3m4s\n\
             nightly   sync       Pending                      0          5m0s\n"
        );
    }

    #[test]
    fn describe_lists_the_kept_attempts_with_exit_codes_and_classes() {
        let text = describe(&failed(), at("2026-12-07T10:05:00Z"));
        for expected in [
            "Reason:       PermanentFailure",
            "Message:      attempt 3 exited with code 2",
            "Trace ID:     4bf92f3577b34da6a3ce929d0e0e4736",
            "Retries:      1 transient failure(s), 1 disruption(s)",
            "Attempts:     3 (the last 2 kept)",
            "  2   nightly-2   nightly-2-abcde   2026-12-07T10:01:00Z   30.0s      137    Disruption   DisruptionTarget",
            "  3   nightly-3   nightly-3-fghij   2026-12-07T10:03:00Z   5.0s       2      Permanent    Error",
            "  Succeeded = False (PermanentFailure) attempt 3 exited with code 2",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
    }

    #[test]
    fn a_watch_line_names_the_last_attempt_and_the_end() {
        assert_eq!(
            watch_line(&failed(), at("2026-12-07T10:05:00Z")),
            "nightly Failed (PermanentFailure) attempt 3 exit 2 Permanent in 3m4s"
        );
        assert_eq!(watch_line(&run(json!(null)), at("2026-12-07T10:05:00Z")), "nightly Pending");
    }

    #[test]
    fn a_trace_links_to_the_stacks_grafana_and_its_backend() {
        let stack: TelemetryStack = serde_json::from_value(json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack", "metadata": {"name": "team"},
            "spec": {"tempo": {"enabled": false, "externalApi": "Jaeger", "externalUrl": "http://j:4318"}},
            "status": {"endpoints": {"tempo": "http://jaeger.ns.svc:16686", "grafana": "http://team-grafana.ns.svc:3000"}}
        }))
        .expect("stack");
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let text = trace_links(id, Some(&stack), None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("trace   {id}"));
        assert!(lines[1].starts_with("grafana http://team-grafana.ns.svc:3000/explore?schemaVersion=1&orgId=1&panes="));
        assert!(lines[1].contains("%22uid%22%3A%22jaeger%22") && lines[1].contains(id), "{}", lines[1]);
        assert_eq!(lines[2], format!("jaeger  http://jaeger.ns.svc:16686/trace/{id}"));
        let own = trace_links(id, Some(&stack), Some("http://localhost:3000/"));
        assert!(own.contains("grafana http://localhost:3000/explore?"), "{own}");
        assert_eq!(trace_links(id, None, None), format!("trace   {id}\n"), "no stack: the id alone");
    }
}
