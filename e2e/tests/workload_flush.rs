//! The workload library flushes what a workflow recorded however its process ends: here stopped by SIGTERM, as
//! Kubernetes stops a pod, in the middle of a step, against the real collector.

use std::process::Stdio;
use std::time::Duration;

use flowtel_e2e::{Collector, attribute, eventually, flowtel_binary};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn a_workflow_stopped_by_sigterm_mid_step_flushes_what_it_recorded_and_exits_143() {
    let collector = Collector::start("workload-sigterm").await.expect("collector");
    // Every external call fails and is retried after a 5 s attempt: the first retry is recorded (and logged) long
    // before the run could end on its own; the metric reader's own period (10 s) has not come.
    let mut child = tokio::process::Command::new(flowtel_binary().expect("flowtel").with_file_name("sync"))
        .env_clear()
        .env("OTEL_SERVICE_NAME", "sync")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.endpoint)
        .env("OTEL_RESOURCE_ATTRIBUTES", "workflow.name=sync,workflow.run_id=sigterm-1,workflow.attempt=1")
        .env("WORKFLOW_CONSOLE", "1")
        .env("WORKFLOW_FLAKY_PERCENT", "100")
        .env("WORKFLOW_STEP_MS", "5000")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sync");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let retried = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("transient failure; retrying") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(retried, Ok(true), "the workflow logs its first retry");
    let pid = child.id().expect("pid").to_string();
    let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(sent.success(), "SIGTERM sent");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits").expect("status");
    assert_eq!(status.code(), Some(143), "ends as SIGTERM would, after the flush");

    // The retry recorded before the signal reached the collector.
    let retries = eventually("workflow.retry.count flushed on SIGTERM", Duration::from_secs(30), async || {
        let n = collector.total_across_processes("workflow.retry.count", "sync");
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(retries, 1);
    let points: Vec<String> = collector
        .documents("metrics")
        .iter()
        .flat_map(|d| d["resourceMetrics"].as_array().cloned().unwrap_or_default())
        .filter_map(|rm| attribute(&rm["resource"], "service.name"))
        .collect();
    assert!(points.iter().all(|s| s == "sync"), "{points:?}");
}
