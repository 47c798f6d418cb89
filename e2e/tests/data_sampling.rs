//! Sampling by the run's outcome: 1,000 WorkflowRuns on the real control plane (10 % failing), each run's workload
//! (`sync`) run with its Job's environment, the operator exporting each run's report to the run's TelemetryStack,
//! whose collector (flowtel's generated configuration with `tailSampling`, 10 %) decides when the run's root span
//! arrives at its end. In the trace backend: every failed run's whole trace, about 10 % of the others, and no trace
//! kept in part.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunPhase;
use flowtel_e2e::backends::{self, Options};
use flowtel_e2e::sync_runs::job_container_env;
use flowtel_e2e::{
    Operator, TEST_MANAGER, TestNamespace, client, eventually, flowtel_binary, http_get, install_crds, simple_run,
};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

const RUNS: usize = 1_000;
/// Runs submitted, and their workloads run, a wave at a time (the fake nodes hold 750 pods).
const WAVE: usize = 100;
const KEPT_PERCENT: i32 = 10;
const WAIT: Duration = Duration::from_secs(300);

fn failing(i: usize) -> bool {
    i.is_multiple_of(10)
}

/// A trace in Jaeger: its span names (empty when Jaeger does not have it).
async fn trace(jaeger: &str, trace_id: &str) -> Vec<String> {
    let Some((200, body)) = http_get(&format!("{jaeger}/api/traces/{trace_id}")).await else { return Vec::new() };
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    let spans = v["data"][0]["spans"].as_array().cloned().unwrap_or_default();
    spans.iter().filter_map(|s| s["operationName"].as_str().map(str::to_string)).collect()
}

/// Whole: the operator's run and attempt spans, the workflow's root and its four steps.
fn whole(names: &[String]) -> bool {
    let has = |n: &str| names.iter().any(|s| s == n);
    has("workflow.run")
        && has("workflow.attempt")
        && has("workflow sync")
        && names.iter().filter(|n| n.starts_with("step ")).count() == 4
}

#[tokio::test]
async fn a_thousand_runs_keep_every_failed_trace_whole_and_a_tenth_of_the_rest_decided_at_each_runs_end() {
    let backends = backends::start_with(
        "data-sampling",
        // Runs take about 10 s here: slower than a minute is slow.
        Options {
            collectors: 1,
            tail_sampling: Some(r#"{"percent": 10, "latencyThresholdMs": 60000}"#),
            ..Options::default()
        },
    )
    .await;
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "data-sampling").await.expect("namespace");
    let endpoint = format!("http://127.0.0.1:{}", backends.collector_grpc[0]);
    let _operator = Operator::start(&ns.name, &endpoint, &["--concurrency", "32"]).await.expect("operator");
    backends::external_stack(&client, &ns.name, "team", &endpoint).await;

    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    for wave in 0..RUNS / WAVE {
        let names: Vec<usize> = (wave * WAVE..(wave + 1) * WAVE).collect();
        let submissions = names.iter().map(|&i| {
            let runs = runs.clone();
            let name = format!("run-{i}");
            // The pod runs 10 s: the workload's spans are exported before the run ends and its root goes out.
            let mut run = simple_run(&name, "sync", "10s");
            run["spec"]["telemetryStackRef"] = json!({"name": "team"});
            if failing(i) {
                run["spec"]["template"]["metadata"]["labels"] = json!({"sim.flowtel.dev/outcome": "fail"});
            }
            async move { runs.patch(&name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await }
        });
        let submitted: Vec<_> = futures::stream::iter(submissions).buffer_unordered(16).collect().await;
        assert!(submitted.iter().all(Result::is_ok), "submitted");
        // Each run's workload, with its Job's environment, all of the wave at once.
        let mut children = Vec::new();
        for &i in &names {
            let job_name = format!("run-{i}-1");
            let job =
                eventually(&format!("Job {job_name}"), WAIT, async || jobs.get_opt(&job_name).await.ok().flatten())
                    .await;
            let mut command = Command::new(flowtel_binary().expect("flowtel").with_file_name("sync"));
            command.env_clear().envs(job_environment(&job, &format!("{job_name}-pod")));
            command.env("WORKFLOW_ITEMS", "1").env("WORKFLOW_STEP_MS", "1");
            if failing(i) {
                command.env("WORKFLOW_FAIL", "permanent");
            }
            children.push(command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("sync"));
        }
        for mut child in children {
            child.wait().expect("sync ran");
        }
    }

    // Every run ends with its report exported to the stack.
    let reported = |r: &WorkflowRun| r.status.as_ref().and_then(|s| s.telemetry.as_ref()).is_some_and(|t| t.finished);
    let all = eventually("every run ended and reported", WAIT, async || {
        let list = runs.list(&Default::default()).await.ok()?.items;
        (list.len() == RUNS && list.iter().all(reported)).then_some(list)
    })
    .await;
    let mut outcome: BTreeMap<String, (bool, String)> = BTreeMap::new();
    for r in &all {
        let status = r.status.clone().unwrap_or_default();
        let failed = status.phase == Some(WorkflowRunPhase::Failed);
        outcome.insert(r.metadata.name.clone().unwrap_or_default(), (failed, status.trace_id.unwrap_or_default()));
    }
    let failed = outcome.values().filter(|(f, _)| *f).count();
    assert_eq!(failed, RUNS / 10, "every tenth run failed");

    // Every failed run's trace is whole (decided when its root arrived), which also marks that the decisions ran.
    let jaeger = backends.jaeger_query.clone();
    for (name, (_, trace_id)) in outcome.iter().filter(|(_, (f, _))| *f) {
        eventually(&format!("the whole trace of failed run {name}"), WAIT, async || {
            whole(&trace(&jaeger, trace_id).await).then_some(())
        })
        .await;
    }
    // The others: kept whole or not at all; about the configured share.
    let mut kept = 0;
    for (name, (_, trace_id)) in outcome.iter().filter(|(_, (f, _))| !*f) {
        let names = trace(&jaeger, trace_id).await;
        assert!(names.is_empty() || whole(&names), "run {name}'s trace was kept in part: {names:?}");
        kept += usize::from(!names.is_empty());
    }
    let share = 100.0 * kept as f64 / (RUNS - failed) as f64;
    println!("kept {kept} of {} successful runs' traces: {share:.1} % (configured {KEPT_PERCENT} %)", RUNS - failed);
    // Binomial spread of 900 draws at 10 %: one standard deviation is 1 point; three keep this test from flaking.
    assert!((share - f64::from(KEPT_PERCENT)).abs() <= 3.0, "kept {share:.1} % of the successful runs");
}

/// The Job's container environment as its pod's process sees it (the kubelet's resolution, as the agent does it).
fn job_environment(job: &k8s_openapi::api::batch::v1::Job, pod_name: &str) -> Vec<(String, String)> {
    let namespace = job.metadata.namespace.clone().unwrap_or_default();
    flowtel::pool::agent::resolve_env(&job_container_env(job), pod_name, "kwok-node-0", &namespace)
}
