//! `kubectl flowtel` as a user runs it: the plugin found by kubectl on PATH, against the real control plane and a
//! running operator (KWOK simulates the pods; the logs of a real container are read in `real_node.rs`).

use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::{RetryPolicy, WorkflowRunPhase};
use flowtel_e2e::runs::RunBuilder;
use flowtel_e2e::{
    Collector, Operator, TEST_MANAGER, TestNamespace, client, eventually, install_crds, kubectl_flowtel as plugin,
};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

const WAIT: Duration = Duration::from_secs(90);

/// A namespace of its own with an operator (and its collector) watching it; the operator and the collector stop when
/// the returned pair is dropped.
async fn operator_for(test: &str) -> (TestNamespace, Api<WorkflowRun>, (Operator, Collector)) {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, test).await.expect("namespace");
    let collector = Collector::start(test).await.expect("collector");
    let operator = Operator::start(&ns.name, &collector.endpoint, &[]).await.expect("operator");
    let runs: Api<WorkflowRun> = Api::namespaced(client, &ns.name);
    (ns, runs, (operator, collector))
}

#[tokio::test]
async fn kubectl_flowtel_watches_describes_reruns_and_traces_a_run() {
    let (ns, runs, _operator) = operator_for("cli").await;
    let retry: RetryPolicy =
        serde_json::from_value(serde_json::json!({"limit": 2, "backoff": {"baseSeconds": 1}})).expect("retry");
    let flaky = RunBuilder::new("flaky", "wf-cli")
        .runs_for("1s")
        .label("sim.flowtel.dev/outcome", "fail-once")
        .annotation("sim.flowtel.dev/exit-code", "3")
        .retry(retry)
        .build();
    runs.patch("flaky", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&flaky)).await.expect("run");

    // watch: a line per change until the end, exit 0 for a run that Succeeded.
    let (ok, watched, stderr) = plugin(&ns.name, &["watch", "flaky"]);
    assert!(ok, "watch: {stderr}");
    let lines: Vec<&str> = watched.lines().collect();
    assert!(lines.iter().any(|l| l.contains("attempt 1 exit 3 Transient")), "the retried attempt: {watched}");
    let last = lines.last().copied().unwrap_or_default();
    assert!(last.starts_with("flaky Succeeded (Succeeded) attempt 2 exit 0 Succeeded in "), "{watched}");

    let run = runs.get("flaky").await.expect("run");
    let status = run.status.clone().expect("status");
    assert_eq!(status.phase, Some(WorkflowRunPhase::Succeeded));

    // get and describe: the reason, the attempts with their exit codes and classes, the trace id.
    let (ok, table, stderr) = plugin(&ns.name, &["get"]);
    assert!(ok, "get: {stderr}");
    let row: Vec<&str> = table.lines().find(|l| l.starts_with("flaky ")).expect(&table).split_whitespace().collect();
    assert_eq!(&row[..5], ["flaky", "wf-cli", "Succeeded", "Succeeded", "2"], "{table}");
    let (ok, described, stderr) = plugin(&ns.name, &["describe", "flaky"]);
    assert!(ok, "describe: {stderr}");
    let trace_id = status.trace_id.clone().expect("trace id");
    for expected in ["Phase:        Succeeded", "Attempts:     2", &format!("Trace ID:     {trace_id}"), "Transient"] {
        assert!(described.contains(expected), "{expected:?} in {described}");
    }
    let attempt_1: Vec<&str> =
        described.lines().find(|l| l.trim_start().starts_with("1 ")).expect(&described).split_whitespace().collect();
    assert_eq!((attempt_1[1], attempt_1[5], attempt_1[6]), ("flaky-1", "3", "Transient"), "{described}");

    // trace: the id (no stack: nothing else to link to).
    let (ok, trace, stderr) = plugin(&ns.name, &["trace", "flaky"]);
    assert!(ok, "trace: {stderr}");
    assert_eq!(trace, format!("trace   {trace_id}\n"));

    // rerun: a new run, the same spec, linked by a label; it runs to its own end.
    let (ok, created, stderr) = plugin(&ns.name, &["rerun", "flaky", "--name", "flaky-again"]);
    assert!(ok, "rerun: {stderr}");
    assert_eq!(created.trim(), "workflowrun.flowtel.dev/flaky-again created");
    let again = runs.get("flaky-again").await.expect("the rerun");
    assert_eq!(again.labels().get("flowtel.dev/rerun-of").map(String::as_str), Some("flaky"));
    assert_eq!(again.spec, run.spec);
    let (ok, generated, stderr) = plugin(&ns.name, &["rerun", "flaky"]);
    assert!(ok && generated.starts_with("workflowrun.flowtel.dev/flaky-"), "{generated} {stderr}");
    eventually("the rerun Succeeded after its own retry", WAIT, async || {
        let s = runs.get("flaky-again").await.ok()?.status?;
        (s.phase == Some(WorkflowRunPhase::Succeeded) && s.attempt_count == Some(2)).then_some(())
    })
    .await;

    // Bad input: a clear error naming what is missing, and a failing exit.
    let (ok, _, stderr) = plugin(&ns.name, &["describe", "nope"]);
    assert!(!ok && stderr.contains(&format!("WorkflowRun nope not found in namespace {}", ns.name)), "{stderr}");
    let (ok, _, stderr) = plugin(&ns.name, &["logs", "flaky", "--attempt", "7"]);
    assert!(!ok && stderr.contains("WorkflowRun flaky has no attempt 7 (attempts kept: 1, 2)"), "{stderr}");
}

#[tokio::test]
async fn kubectl_flowtel_watch_exits_1_for_a_failed_run() {
    let (ns, runs, _operator) = operator_for("cli-failed").await;
    let doomed = RunBuilder::new("doomed", "wf-cli")
        .runs_for("1s")
        .label("sim.flowtel.dev/outcome", "fail")
        .annotation("sim.flowtel.dev/exit-code", "2")
        .build();
    runs.patch("doomed", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&doomed)).await.expect("run");
    let (ok, watched, _) = plugin(&ns.name, &["watch", "doomed"]);
    assert!(!ok, "a Failed run: exit 1");
    assert!(watched.lines().last().is_some_and(|l| l.starts_with("doomed Failed (")), "{watched}");
}
