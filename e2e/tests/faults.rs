//! The WorkflowRun controller through the faults a production cluster meets: kube-apiserver and etcd restarted
//! (data kept) and the collector killed and restarted, each while runs are in flight. These restart the shared
//! local control plane, so they live in a test binary of their own (cargo runs test binaries one at a time) and
//! run one at a time within it.

use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunPhase;
use flowtel_e2e::{
    Collector, Operator, TEST_MANAGER, TestNamespace, client, cluster_kubeconfig, eventually, install_crds, repo_root,
    run, simple_run,
};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams};

/// One fault at a time: the others would see it too.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const FINISH: Duration = Duration::from_secs(240);

async fn restart(component: &str) {
    // The same cluster the tests use (its state directory is beside the kubeconfig).
    let state = cluster_kubeconfig().parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let mut cmd = std::process::Command::new(repo_root().join("e2e/cluster"));
    cmd.args(["restart", component]).env("FLOWTEL_CLUSTER_DIR", state);
    tokio::task::spawn_blocking(move || run(&mut cmd)).await.expect("join").expect("restart");
}

async fn submit(runs: &Api<WorkflowRun>, prefix: &str, count: usize, workflow: &str, duration: &str) {
    for i in 0..count {
        let name = format!("{prefix}-{i}");
        let run = simple_run(&name, workflow, duration);
        // The apiserver may still be settling after a restart: retry the submission, never lose it.
        eventually(&format!("{name} submitted"), Duration::from_secs(60), async || {
            runs.patch(&name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await.ok()
        })
        .await;
    }
}

fn exported(r: &WorkflowRun) -> bool {
    r.status.as_ref().and_then(|s| s.telemetry.as_ref()).is_some_and(|t| t.finished)
}

/// Waits until all `count` runs are terminal and exported; asserts each succeeded, one Job each, counted once.
async fn all_finish_counted_once(runs: &Api<WorkflowRun>, jobs: &Api<Job>, collector: &Collector, count: usize) {
    let list = eventually("every run terminal and exported", FINISH, async || {
        let list = runs.list(&ListParams::default()).await.ok()?.items;
        (list.len() == count && list.iter().all(exported)).then_some(list)
    })
    .await;
    for r in &list {
        let phase = r.status.as_ref().and_then(|s| s.phase);
        assert_eq!(phase, Some(WorkflowRunPhase::Succeeded), "{:?}: {:#?}", r.metadata.name, r.status);
    }
    let job_count = jobs.list(&ListParams::default()).await.expect("jobs").items.len();
    assert_eq!(job_count, count, "one Job per run");
    // A failed write retried by the same process never counts twice; a kill outside an export window neither.
    let total = eventually("workflow.run.status for every run", Duration::from_secs(30), async || {
        let n = collector.total_across_processes("workflow.run.status", "wf-faults");
        (n >= count as i64).then_some(n)
    })
    .await;
    assert_eq!(total, count as i64, "workflow.run.status");
    assert_eq!(collector.total_across_processes("workflow.run.total", "wf-faults"), count as i64, "workflow.run.total");
}

#[tokio::test]
async fn runs_in_flight_finish_across_apiserver_and_etcd_restarts() {
    let _serial = SERIAL.lock().await;
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "faults-control-plane").await.expect("namespace");
    let collector = Collector::start("faults-control-plane").await.expect("collector");
    let operator = Operator::start(&ns.name, &collector.endpoint, &[]).await.expect("operator");
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    submit(&runs, "before", 10, "wf-faults", "3s").await;
    restart("kube-apiserver").await;
    submit(&runs, "between", 10, "wf-faults", "3s").await;
    restart("etcd").await;
    submit(&runs, "after", 10, "wf-faults", "1s").await;
    all_finish_counted_once(&runs, &jobs, &collector, 30).await;
    assert_eq!(operator.get("/readyz").await.map(|(code, _)| code), Some(200), "ready again");
}

#[tokio::test]
async fn runs_across_a_collector_restart_and_an_operator_kill_are_counted_once() {
    let _serial = SERIAL.lock().await;
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "faults-collector").await.expect("namespace");
    let mut collector = Collector::start("faults-collector").await.expect("collector");
    let mut operator = Operator::start(&ns.name, &collector.endpoint, &[]).await.expect("operator");
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    submit(&runs, "before", 10, "wf-faults", "2s").await;
    // Killed once what it received is on file: a collector's in-memory buffers die with it, which is the
    // collector's durability (a persistent queue), not the operator's counting.
    eventually("the first runs' reports on file", Duration::from_secs(60), async || {
        (collector.total_across_processes("workflow.run.total", "wf-faults") >= 10).then_some(())
    })
    .await;
    collector.kill();
    // These end while nothing can be exported: each run's one report (at its end) waits, retried, for the collector.
    submit(&runs, "during", 10, "wf-faults", "1s").await;
    eventually("the runs that ended during the outage, their reports not out", Duration::from_secs(60), async || {
        let list = runs.list(&ListParams::default()).await.ok()?.items;
        let during = list.iter().filter(|r| r.metadata.name.as_deref().is_some_and(|n| n.starts_with("during-")));
        let ended = during.filter(|r| r.status.as_ref().is_some_and(|s| s.completion_time.is_some()));
        (ended.filter(|r| !exported(r)).count() == 10).then_some(())
    })
    .await;
    eventually("the operator's exports failing", Duration::from_secs(30), async || {
        (operator.counter("flowtel_telemetry_export_failures_total").await? >= 1).then_some(())
    })
    .await;
    assert_eq!(collector.total_across_processes("workflow.run.status", "wf-faults"), 10, "nothing got through");
    collector.restart().await.expect("collector restarted");
    eventually("the outage's reports out after it", Duration::from_secs(60), async || {
        (collector.total_across_processes("workflow.run.status", "wf-faults") >= 20).then_some(())
    })
    .await;
    // Killed once those reports are recorded too: a kill between an export and the status write recording it is
    // the one window a restart re-counts (docs/workflow-runs.md, "The run's own telemetry"), not what this test is about.
    eventually("the outage's reports recorded", Duration::from_secs(60), async || {
        let list = runs.list(&ListParams::default()).await.ok()?.items;
        (list.iter().filter(|r| exported(r)).count() == 20).then_some(())
    })
    .await;
    operator.kill();
    operator.restart().await.expect("operator restarted");
    all_finish_counted_once(&runs, &jobs, &collector, 20).await;
}
