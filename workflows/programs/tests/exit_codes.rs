//! Each workflow as its own process, with no collector at all (the console fallback): its exit code says what
//! happened, as the WorkflowRun's retry policy reads it (0, 75 transient, 65 permanent).

use std::process::Command;

fn run(bin: &str, env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(bin)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_RESOURCE_ATTRIBUTES")
        .env_remove("TRACEPARENT")
        .env("WORKFLOW_STEP_MS", "1")
        .envs(env.iter().copied())
        .output()
        .expect("the workflow runs");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn every_workflow_exits_by_its_failure_class() {
    for bin in [
        env!("CARGO_BIN_EXE_sync"),
        env!("CARGO_BIN_EXE_discovery"),
        env!("CARGO_BIN_EXE_enrichment"),
        env!("CARGO_BIN_EXE_oset"),
    ] {
        let (code, log) = run(bin, &[]);
        assert_eq!(code, 0, "{bin}: {log}");
        assert!(log.contains("workflow started"), "{bin}: the console fallback shows the log: {log}");
        assert_eq!(run(bin, &[("WORKFLOW_FAIL", "permanent")]).0, 65, "{bin}");
        assert_eq!(run(bin, &[("WORKFLOW_FAIL", "transient")]).0, 75, "{bin}");
        // Flaky calls are retried in-process: the run still succeeds.
        assert_eq!(run(bin, &[("WORKFLOW_FLAKY_PERCENT", "30")]).0, 0, "{bin}");
    }
}

#[test]
fn transient_once_fails_only_the_first_attempt() {
    let bin = env!("CARGO_BIN_EXE_sync");
    let first = [("WORKFLOW_FAIL", "transient-once"), ("OTEL_RESOURCE_ATTRIBUTES", "workflow.attempt=1")];
    assert_eq!(run(bin, &first).0, 75);
    let second = [("WORKFLOW_FAIL", "transient-once"), ("OTEL_RESOURCE_ATTRIBUTES", "workflow.attempt=2")];
    assert_eq!(run(bin, &second).0, 0);
}

#[test]
fn an_unreachable_collector_never_stalls_or_fails_the_workflow_and_its_telemetry_goes_to_the_console() {
    // Nothing listens on port 9: the first export fails and opens the breaker; every span, log record and metric
    // point then goes to the console (the pod's log) instead of being dropped, and the workflow still succeeds.
    let (code, log) = run(env!("CARGO_BIN_EXE_sync"), &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")]);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("otel-fallback span name=\"workflow sync\""), "the root span on the console: {log}");
    assert!(log.contains("otel-fallback log ") && log.contains("workflow started"), "{log}");
    assert!(log.contains("otel-fallback metric name=workflow.step.status kind=sum"), "{log}");
    assert!(log.contains("telemetry not exported") && log.contains("spans_dropped: 0, logs_dropped: 0"), "{log}");
    assert!(!log.contains("spans_to_console: 0,"), "{log}");
}
