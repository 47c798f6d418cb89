//! The pod simulation the controllers rely on, on the real control plane: the real Job controller creates the pod,
//! the real scheduler binds it to a KWOK node, and KWOK's stages (e2e/kwok-stages.yaml) run it.

use std::time::Duration;

use flowtel_e2e::{TEST_MANAGER, TestNamespace, client};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// A Job of one pod with `backoffLimit: 0`, whose pod carries the given simulation labels and annotations.
async fn create_job(
    ns: &str,
    client: &kube::Client,
    name: &str,
    labels: serde_json::Value,
    annotations: serde_json::Value,
) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let job = json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "busybox"}, {"name": "sidecar", "image": "busybox"}]
                }
            }
        }
    });
    jobs.patch(name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(job)).await.expect("job created");
}

/// Watches the Job's pods until one satisfies `done`, returning that pod as it was then.
async fn watch_pod_until(client: &kube::Client, ns: &str, job: &str, done: impl Fn(&Pod) -> bool) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let config = watcher::Config::default().labels(&format!("job-name={job}"));
    let stream = watcher(pods, config).applied_objects().try_filter(|p| futures::future::ready(done(p)));
    let mut stream = std::pin::pin!(stream);
    tokio::time::timeout(WAIT, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no pod of job {job} reached the expected state in {WAIT:?}"))
        .expect("watch ended")
        .expect("watch error")
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default()
}

fn exit_codes(p: &Pod) -> Vec<i32> {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().filter_map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code)).collect())
        .unwrap_or_default()
}

fn has_condition(p: &Pod, type_: &str) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

async fn job_condition(client: &kube::Client, ns: &str, name: &str, type_: &'static str) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let cond = move |j: Option<&Job>| {
        j.and_then(|j| j.status.as_ref()?.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
    };
    tokio::time::timeout(WAIT, kube::runtime::wait::await_condition(jobs, name, cond))
        .await
        .unwrap_or_else(|_| panic!("job {name} did not get {type_} in {WAIT:?}"))
        .expect("watch error");
}

#[tokio::test]
async fn a_jobs_pod_runs_to_succeeded() {
    let client = client().await.expect("client");
    let ns = TestNamespace::new(&client, "sim-success").await.expect("namespace");
    create_job(&ns.name, &client, "ok", json!({}), json!({"sim.flowtel.dev/duration": "1s"})).await;

    let pod = watch_pod_until(&client, &ns.name, "ok", |p| phase(p) == "Succeeded").await;
    assert_eq!(exit_codes(&pod), vec![0, 0]);
    assert!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some_and(|n| n.starts_with("kwok-node-")));
    job_condition(&client, &ns.name, "ok", "Complete").await;
}

#[tokio::test]
async fn pods_labelled_to_fail_end_failed_with_the_chosen_exit_code() {
    let client = client().await.expect("client");
    let ns = TestNamespace::new(&client, "sim-fail").await.expect("namespace");
    for code in [3, 42] {
        let name = format!("fail-{code}");
        create_job(
            &ns.name,
            &client,
            &name,
            json!({"sim.flowtel.dev/outcome": "fail"}),
            json!({"sim.flowtel.dev/exit-code": code.to_string(), "sim.flowtel.dev/container": "main"}),
        )
        .await;
        let pod = watch_pod_until(&client, &ns.name, &name, |p| phase(p) == "Failed").await;
        // Only the named container fails; the other one exits 0.
        assert_eq!(exit_codes(&pod), vec![code, 0], "containerStatuses of {name}");
        job_condition(&client, &ns.name, &name, "Failed").await;
    }
}

#[tokio::test]
async fn a_pod_labelled_for_disruption_gets_disruption_target_and_is_removed() {
    let client = client().await.expect("client");
    let ns = TestNamespace::new(&client, "sim-disrupt").await.expect("namespace");
    create_job(&ns.name, &client, "evicted", json!({"sim.flowtel.dev/outcome": "disrupt"}), json!({})).await;

    let pod = watch_pod_until(&client, &ns.name, "evicted", |p| has_condition(p, "DisruptionTarget")).await;
    assert_eq!(phase(&pod), "Failed");
    // The real Job controller counts it as a failure (no pod failure policy) and the pod goes away.
    job_condition(&client, &ns.name, "evicted", "Failed").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let name = pod.metadata.name.clone().unwrap_or_default();
    tokio::time::timeout(
        WAIT,
        kube::runtime::wait::await_condition(
            pods,
            &name,
            kube::runtime::conditions::is_deleted(pod.metadata.uid.as_deref().unwrap_or_default()),
        ),
    )
    .await
    .expect("disrupted pod removed in time")
    .expect("watch error");
}
