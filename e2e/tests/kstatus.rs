//! What GitOps tools conclude from flowtel's status: kstatus (sigs.k8s.io/cli-utils, used by Flux and kpt), built from
//! its module (`e2e/kstatus/main.go`), reads real WorkflowRuns and TelemetryStacks from the real apiserver; so do
//! flowtel's Argo CD health checks (`manifests/argocd/`).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use flowtel_crds::{TelemetryStack, WorkflowRun};
use flowtel_e2e::{
    Collector, Operator, TEST_MANAGER, TestNamespace, argocd_health, cached_binary, client, ensure_storage,
    install_crds, kubectl, repo_root, run, simple_run,
};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

fn verdicts(namespace: &str) -> BTreeMap<String, String> {
    run(Command::new(repo_root().join("e2e/build-binaries")).arg("kstatus")).expect("kstatus-verdict built");
    let list =
        run(kubectl().args(["get", "workflowruns,telemetrystacks", "-n", namespace, "-o", "json"])).expect("list");
    let mut child = Command::new(cached_binary("kstatus-verdict", "KSTATUS_VERDICT"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("kstatus-verdict");
    child.stdin.take().expect("stdin").write_all(list.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("verdicts");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(n, v)| (n.to_string(), v.to_string())))
        .collect()
}

#[tokio::test]
async fn kstatus_reads_running_succeeded_failed_ready_and_degraded_the_way_gitops_needs() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    ensure_storage().expect("storage");
    let ns = TestNamespace::new(&client, "kstatus").await.expect("namespace");
    let collector = Collector::start("kstatus").await.expect("collector");
    let _operator = Operator::start(&ns.name, &collector.endpoint, &[]).await.expect("operator");
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let stacks: Api<TelemetryStack> = Api::namespaced(client.clone(), &ns.name);
    let apply = PatchParams::apply(TEST_MANAGER);

    let mut failing = simple_run("failed", "wf-kstatus", "1s");
    failing["spec"]["template"]["metadata"]["labels"] = json!({"sim.flowtel.dev/outcome": "fail"});
    for (name, run) in [
        ("succeeded", simple_run("succeeded", "wf-kstatus", "1s")),
        ("failed", failing),
        ("running", simple_run("running", "wf-kstatus", "10m")),
    ] {
        runs.patch(name, &apply, &Patch::Apply(&run)).await.expect("run");
    }
    let stack = |name: &str, spec: serde_json::Value| json!({"apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack", "metadata": {"name": name}, "spec": spec});
    stacks.patch("ready", &apply, &Patch::Apply(stack("ready", json!({})))).await.expect("stack");
    let refused = json!({"grafana": {"adminCredentialsSecretRef": {"name": "absent"}}});
    stacks.patch("degraded", &apply, &Patch::Apply(stack("degraded", refused))).await.expect("stack");

    let expected = BTreeMap::from([
        ("succeeded".to_string(), "Current".to_string()),
        ("failed".to_string(), "Failed".to_string()),
        ("running".to_string(), "InProgress".to_string()),
        ("ready".to_string(), "Current".to_string()),
        ("degraded".to_string(), "Failed".to_string()),
    ]);
    // The verdicts settle as the runs end and the stack rolls out.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = verdicts(&ns.name);
    while last != expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = verdicts(&ns.name);
    }
    assert_eq!(last, expected, "kstatus verdicts");

    // Argo CD, with flowtel's health checks, on the same live objects: Argo Workflows' mapping.
    let argocd = BTreeMap::from([
        ("succeeded", "Healthy"),
        ("failed", "Degraded"),
        ("running", "Progressing"),
        ("ready", "Healthy"),
        ("degraded", "Degraded"),
    ]);
    let list =
        run(kubectl().args(["get", "workflowruns,telemetrystacks", "-n", &ns.name, "-o", "json"])).expect("list");
    let list: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let mut seen = BTreeMap::new();
    for object in list["items"].as_array().expect("items") {
        let name = object["metadata"]["name"].as_str().expect("name");
        let (status, message) = argocd_health(object).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!message.is_empty(), "{name}: Argo CD shows a message");
        seen.insert(name, status);
    }
    let seen: BTreeMap<&str, &str> = seen.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(seen, argocd, "Argo CD health");
}
