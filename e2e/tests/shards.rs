//! Two shards for one namespace (`--shard 0/2`, `--shard 1/2`), each electing its leader on its own Lease: a run
//! labelled flowtel.dev/shard=1 is shard 1's alone; every other run (no label, "0", a value naming no shard) is
//! shard 0's. With one shard down, its runs wait untouched while the other shard's finish, and they finish once it
//! is back; each Job is created once and carries its run's label.

use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunPhase;
use flowtel_e2e::{
    Operator, TEST_MANAGER, TestNamespace, apply_chart_template, client, eventually, install_crds, kubectl,
    operator_writes, run, simple_run,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};

const SHARD_LABEL: &str = "flowtel.dev/shard";
const WAIT: Duration = Duration::from_secs(60);
/// How long an unowned run is watched staying untouched after the owned ones finished.
const QUIET: Duration = Duration::from_secs(5);

async fn shard(ns: &str, index: u32) -> Operator {
    let shard = format!("{index}/2");
    let extra = ["--shard", shard.as_str(), "--leader-elect", "--leader-elect-namespace", ns];
    Operator::start_tagged(ns, &format!("-shard-{index}"), None, &extra, &[]).await.expect("operator")
}

async fn submit(runs: &Api<WorkflowRun>, name: &str, shard: Option<&str>) {
    let mut run = simple_run(name, "wf-shards", "1s");
    if let Some(shard) = shard {
        run["metadata"]["labels"] = serde_json::json!({ SHARD_LABEL: shard });
    }
    runs.patch(name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await.expect("submit");
}

async fn succeeded(runs: &Api<WorkflowRun>, names: &[&str]) {
    eventually(&format!("{names:?} Succeeded"), WAIT, async || {
        for name in names {
            let run = runs.get(name).await.ok()?;
            (run.status.as_ref()?.phase == Some(WorkflowRunPhase::Succeeded)).then_some(())?;
        }
        Some(())
    })
    .await;
}

/// Neither a status nor a Job: no operator has touched the run.
async fn untouched(runs: &Api<WorkflowRun>, jobs: &Api<Job>, name: &str) -> bool {
    let run = runs.get(name).await.expect("run");
    let selector = format!("flowtel.dev/run={name}");
    let its_jobs = jobs.list(&ListParams::default().labels(&selector)).await.expect("jobs").items;
    run.status.is_none() && its_jobs.is_empty()
}

/// Holds `untouched` for every run in `names` through a quiet period.
async fn stay_untouched(runs: &Api<WorkflowRun>, jobs: &Api<Job>, names: &[&str]) {
    let until = tokio::time::Instant::now() + QUIET;
    while tokio::time::Instant::now() < until {
        for name in names {
            assert!(untouched(runs, jobs, name).await, "{name} belongs to the stopped shard but was touched");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn each_run_is_reconciled_by_the_one_shard_its_label_names() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "shards").await.expect("namespace");
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);

    // Shard 1 alone: its run finishes; shard 0's (no label, "0", "7" which names no shard of two) wait untouched.
    let mut second = shard(&ns.name, 1).await;
    submit(&runs, "unlabelled", None).await;
    submit(&runs, "zero", Some("0")).await;
    submit(&runs, "stray", Some("7")).await;
    submit(&runs, "one", Some("1")).await;
    succeeded(&runs, &["one"]).await;
    stay_untouched(&runs, &jobs, &["unlabelled", "zero", "stray"]).await;

    // Shard 0 starts: its runs finish.
    let _first = shard(&ns.name, 0).await;
    succeeded(&runs, &["unlabelled", "zero", "stray"]).await;

    // Shard 1 killed: a new run of its waits while shard 0's new run finishes; back, shard 1 finishes it.
    second.kill();
    submit(&runs, "one-later", Some("1")).await;
    submit(&runs, "unlabelled-later", None).await;
    succeeded(&runs, &["unlabelled-later"]).await;
    stay_untouched(&runs, &jobs, &["one-later"]).await;
    second.restart().await.expect("shard 1 restarts");
    succeeded(&runs, &["one-later"]).await;

    // Each shard led on its own Lease, held by a different process.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let mut holders = Vec::new();
    for name in ["flowtel-shard-0", "flowtel-shard-1"] {
        let lease = leases.get(name).await.unwrap_or_else(|e| panic!("Lease {name}: {e}"));
        holders.push(lease.spec.and_then(|s| s.holder_identity).unwrap_or_default());
    }
    assert!(!holders[0].is_empty() && holders[0] != holders[1], "two holders: {holders:?}");
    assert!(leases.get_opt("flowtel").await.expect("leases").is_none(), "no shard took the unsharded Lease");

    // One Job per run, created once, labelled as its run.
    let all = jobs.list(&ListParams::default()).await.expect("jobs").items;
    assert_eq!(all.len(), 6, "one Job per run: {:?}", all.iter().map(|j| j.name_any()).collect::<Vec<_>>());
    for job in &all {
        let run = runs.get(&job.labels()["flowtel.dev/run"]).await.expect("the Job's run");
        assert_eq!(job.labels().get(SHARD_LABEL), run.labels().get(SHARD_LABEL), "{}", job.name_any());
    }
    let creates: u64 = operator_writes(&ns.name).iter().filter(|(k, _)| k == "create jobs").map(|(_, n)| n).sum();
    assert_eq!(creates, 6, "each Job created once: {:?}", operator_writes(&ns.name));
}

/// A merge patch of the run's labels: Err(the apiserver's message) when refused.
async fn relabel(runs: &Api<WorkflowRun>, name: &str, labels: serde_json::Value, dry_run: bool) -> Result<(), String> {
    let params = PatchParams { dry_run, ..PatchParams::default() };
    let patch = serde_json::json!({"metadata": {"labels": labels}});
    runs.patch(name, &params, &Patch::Merge(&patch)).await.map(|_| ()).map_err(|e| e.to_string())
}

#[tokio::test]
async fn the_charts_policy_keeps_a_runs_shard_label_from_changing() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "shard-label").await.expect("namespace");
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let file = apply_chart_template("flowtel", "shards=2", "templates/shard-label-policy.yaml").expect("the policy");

    submit(&runs, "labelled", Some("1")).await;
    submit(&runs, "unlabelled", None).await;
    // In force once a known change is refused (policies reach admission asynchronously).
    eventually("the policy in force", WAIT, async || {
        relabel(&runs, "labelled", serde_json::json!({SHARD_LABEL: "0"}), true).await.is_err().then_some(())
    })
    .await;
    for (name, labels) in [
        ("labelled", serde_json::json!({SHARD_LABEL: "0"})),
        ("labelled", serde_json::json!({SHARD_LABEL: null})),
        ("unlabelled", serde_json::json!({SHARD_LABEL: "1"})),
    ] {
        let refused = relabel(&runs, name, labels.clone(), false).await.expect_err(&format!("{name}: {labels}"));
        assert!(refused.contains("metadata.labels[flowtel.dev/shard] cannot change"), "{name}: {refused}");
    }
    // Other labels, and the same value again, still change freely.
    relabel(&runs, "labelled", serde_json::json!({"team": "data", SHARD_LABEL: "1"}), false)
        .await
        .expect("other labels");
    relabel(&runs, "unlabelled", serde_json::json!({"team": "data"}), false).await.expect("other labels");
    let labelled = runs.get("labelled").await.expect("run");
    assert_eq!(labelled.labels().get(SHARD_LABEL).map(String::as_str), Some("1"));
    run(kubectl().args(["delete", "--ignore-not-found", "-f"]).arg(&file)).expect("policy removed");
}
