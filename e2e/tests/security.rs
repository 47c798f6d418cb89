//! The trust boundary, on the real apiserver: runs in namespaces that enforce Pod Security and quotas, everything
//! flowtel ships admitted under "restricted", who may do what through the aggregated roles, the optional admission
//! policy, and secrets that never show.

use std::process::Command;
use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunPhase;
use flowtel_e2e::{
    Collector, Operator, TEST_MANAGER, TestNamespace, client, ensure_storage, eventually, flowtel_binary, install_crds,
    kubectl, repo_root, run, simple_run,
};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

fn label_namespace(ns: &str, labels: &[&str]) {
    run(kubectl().args(["label", "namespace", ns, "--overwrite"]).args(labels)).expect("label");
}

fn condition(r: &WorkflowRun, type_: &str) -> Option<(String, String)> {
    let c = r.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.reason.clone(), c.message.clone()))
}

fn phase(r: &WorkflowRun) -> Option<WorkflowRunPhase> {
    r.status.as_ref().and_then(|s| s.phase)
}

/// A pod template that meets Pod Security "restricted".
fn restricted(mut run: Value) -> Value {
    run["spec"]["template"]["spec"]["securityContext"] =
        json!({"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}});
    run["spec"]["template"]["spec"]["containers"][0]["securityContext"] =
        json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    run
}

#[tokio::test]
async fn a_pod_that_pod_security_forbids_fails_the_run_at_once_with_the_apiservers_message() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "sec-pss").await.expect("namespace");
    label_namespace(&ns.name, &["pod-security.kubernetes.io/enforce=restricted"]);
    let collector = Collector::start("sec-pss").await.expect("collector");
    let _operator = Operator::start(&ns.name, &collector.endpoint, &[]).await.expect("operator");
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let apply = PatchParams::apply(TEST_MANAGER);
    runs.patch("plain", &apply, &Patch::Apply(simple_run("plain", "wf-pss", "1s"))).await.expect("run");
    let compliant = restricted(simple_run("compliant", "wf-pss", "1s"));
    runs.patch("compliant", &apply, &Patch::Apply(compliant)).await.expect("run");

    let failed = eventually("the forbidden run Failed", WAIT, async || {
        let r = runs.get("plain").await.ok()?;
        (phase(&r) == Some(WorkflowRunPhase::Failed)).then_some(r)
    })
    .await;
    let (reason, message) = condition(&failed, "Succeeded").expect("Succeeded condition");
    assert_eq!(reason, "PodForbidden");
    assert!(message.contains("violates PodSecurity \"restricted:latest\""), "the apiserver's message: {message}");
    let (stalled, _) = condition(&failed, "Stalled").expect("Stalled");
    assert_eq!(stalled, "PodForbidden");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns.name);
    eventually("a Warning event PodForbidden", WAIT, async || {
        let list = events.list(&Default::default()).await.ok()?.items;
        list.iter()
            .any(|e| e.reason.as_deref() == Some("PodForbidden") && e.type_.as_deref() == Some("Warning"))
            .then_some(())
    })
    .await;
    // The attempt's Job, which would retry the pod forever, is gone.
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client.clone(), &ns.name);
    eventually("the forbidden run's Job deleted", WAIT, async || {
        jobs.get_opt("plain-1").await.ok()?.is_none_or(|j| j.metadata.deletion_timestamp.is_some()).then_some(())
    })
    .await;
    // Beside it, a template that meets the level runs to the end.
    eventually("the compliant run Succeeded", WAIT, async || {
        (phase(&runs.get("compliant").await.ok()?) == Some(WorkflowRunPhase::Succeeded)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_pod_refused_for_quota_waits_pending_and_proceeds_when_the_quota_frees() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "sec-quota").await.expect("namespace");
    let quota = |pods: &str| {
        json!({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "pods"},
            "spec": {"hard": {"pods": pods}}})
    };
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> = Api::namespaced(client.clone(), &ns.name);
    let apply = PatchParams::apply(TEST_MANAGER).force();
    quotas.patch("pods", &apply, &Patch::Apply(quota("0"))).await.expect("quota");
    // The quota controller has computed usage once the status carries it; before, admission refuses everything.
    eventually("the quota's usage computed", WAIT, async || {
        quotas.get("pods").await.ok()?.status?.used.filter(|u| u.contains_key("pods")).map(|_| ())
    })
    .await;
    let collector = Collector::start("sec-quota").await.expect("collector");
    let _operator = Operator::start(&ns.name, &collector.endpoint, &[]).await.expect("operator");
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    runs.patch("waits", &apply, &Patch::Apply(simple_run("waits", "wf-quota", "1s"))).await.expect("run");
    let pending = eventually("the run pending for its quota", WAIT, async || {
        let r = runs.get("waits").await.ok()?;
        (condition(&r, "Succeeded")?.0 == "PodCreationFailed").then_some(r)
    })
    .await;
    assert_eq!(phase(&pending), Some(WorkflowRunPhase::Pending));
    let (_, message) = condition(&pending, "Succeeded").unwrap_or_default();
    assert!(message.contains("exceeded quota"), "the apiserver's message: {message}");
    quotas.patch("pods", &apply, &Patch::Apply(quota("10"))).await.expect("quota raised");
    eventually("the run Succeeded once the quota freed", Duration::from_secs(180), async || {
        (phase(&runs.get("waits").await.ok()?) == Some(WorkflowRunPhase::Succeeded)).then_some(())
    })
    .await;
}

/// Pods from a manifest's pod template, as the controllers that own them would create them.
fn pods_of(doc: &Value) -> Vec<(String, Value)> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let name = doc["metadata"]["name"].as_str().or(doc["metadata"]["generateName"].as_str()).unwrap_or("x");
    let template = match kind {
        "WorkflowRun" | "Deployment" | "StatefulSet" | "DaemonSet" => &doc["spec"]["template"],
        _ => return Vec::new(),
    };
    let mut spec = template["spec"].clone();
    // What admission checks is the pod's security; the ServiceAccount and claims need not exist for a dry run.
    if let Some(o) = spec.as_object_mut() {
        o.remove("serviceAccountName");
    }
    for claim in doc["spec"]["volumeClaimTemplates"].as_array().into_iter().flatten() {
        let claim_name = claim["metadata"]["name"].clone();
        let mut volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
        volumes.push(json!({"name": claim_name, "persistentVolumeClaim": {"claimName": claim_name}}));
        spec["volumes"] = json!(volumes);
    }
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{}-{}", kind.to_lowercase(), name.trim_end_matches('-'))}, "spec": spec});
    vec![(format!("{kind} {name}"), pod)]
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---").filter_map(|d| serde_yaml_ng::from_str::<Value>(d).ok()).filter(|d| d.is_object()).collect()
}

#[tokio::test]
async fn every_pod_flowtel_ships_or_creates_by_default_is_admitted_under_restricted() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "sec-restricted").await.expect("namespace");
    label_namespace(&ns.name, &["pod-security.kubernetes.io/enforce=restricted"]);
    let root = repo_root();
    let mut pods = Vec::new();
    // The example runs and stacks.
    for entry in std::fs::read_dir(root.join("manifests/examples")).expect("examples").flatten() {
        let text = std::fs::read_to_string(entry.path()).expect("example");
        for doc in documents(&text) {
            if doc["kind"] == "TelemetryStack" {
                // What the operator creates for it.
                let out =
                    run(Command::new(flowtel_binary().expect("flowtel")).args(["render", "-f"]).arg(entry.path()))
                        .expect("render");
                pods.extend(documents(&out).iter().flat_map(pods_of));
            }
            pods.extend(pods_of(&doc));
        }
    }
    // The operator's own pod, as the chart deploys it (production values too).
    let helm = flowtel_e2e::cached_binary("helm", "HELM_VERSION");
    for values in [None, Some("charts/flowtel/ci/production-values.yaml")] {
        let mut cmd = Command::new(&helm);
        cmd.args(["template", "flowtel"]).arg(root.join("charts/flowtel")).args(["--kube-version", "1.37.2"]);
        if let Some(v) = values {
            cmd.arg("-f").arg(root.join(v));
        }
        pods.extend(documents(&run(&mut cmd).expect("helm template")).iter().flat_map(pods_of));
    }
    assert!(
        pods.len() >= 12,
        "runs, stack components and the operator: {:?}",
        pods.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    let file = std::env::temp_dir().join(format!("flowtel-restricted-{}.json", ns.name));
    for (what, pod) in &pods {
        // No ServiceAccount token where the pod never calls the API: only the operator needs one.
        let automount = pod["spec"]["automountServiceAccountToken"].as_bool();
        if what.starts_with("Deployment flowtel") {
            assert_ne!(automount, Some(false), "{what}: the operator needs its token");
        } else {
            assert_eq!(automount, Some(false), "{what}: no ServiceAccount token");
        }
        std::fs::write(&file, pod.to_string()).expect("write");
        let out = run(kubectl().args(["create", "--dry-run=server", "-n", &ns.name, "-f"]).arg(&file));
        assert!(out.is_ok(), "{what} refused under restricted: {out:?}");
    }
    // The check can fail: a template that sets no securityContext is refused.
    let plain = pods_of(&simple_run("plain", "wf", "1s")).remove(0).1;
    std::fs::write(&file, plain.to_string()).expect("write");
    let refused = run(kubectl().args(["create", "--dry-run=server", "-n", &ns.name, "-f"]).arg(&file));
    assert!(format!("{refused:?}").contains("violates PodSecurity"), "{refused:?}");
}

fn kubectl_as(user: &str, ns: &str, args: &[&str]) -> Result<String, String> {
    run(kubectl().args(["--as", user, "-n", ns]).args(args)).map_err(|e| e.to_string())
}

#[tokio::test]
async fn namespace_editors_run_and_cancel_workflow_runs_and_viewers_only_read_them() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "sec-roles").await.expect("namespace");
    let root = repo_root();
    let helm = flowtel_e2e::cached_binary("helm", "HELM_VERSION");
    // A release of its own: the roles are cluster-wide, and the chart tests install releases named flowtel.
    let roles = run(Command::new(&helm).args(["template", "sec-roles"]).arg(root.join("charts/flowtel")).args([
        "--kube-version",
        "1.37.2",
        "--show-only",
        "templates/aggregated-roles.yaml",
    ]))
    .expect("the aggregated roles");
    let file = std::env::temp_dir().join(format!("flowtel-roles-{}.yaml", ns.name));
    std::fs::write(&file, &roles).expect("write");
    run(kubectl().args(["apply", "--server-side", "-f"]).arg(&file)).expect("apply roles");
    for (user, role) in [("alice", "edit"), ("bob", "view")] {
        run(kubectl().args(["create", "rolebinding", user, "-n", &ns.name, "--clusterrole", role, "--user", user]))
            .expect("rolebinding");
    }
    // The built-in roles pick the kinds up once the aggregation controller has run.
    eventually("edit carries workflowruns", WAIT, async || {
        kubectl_as("alice", &ns.name, &["auth", "can-i", "create", "workflowruns.flowtel.dev"]).ok().map(|_| ())
    })
    .await;
    let run_file = std::env::temp_dir().join(format!("flowtel-roles-run-{}.json", ns.name));
    std::fs::write(&run_file, simple_run("by-alice", "wf-roles", "1s").to_string()).expect("write");
    let path = run_file.display().to_string();
    kubectl_as("alice", &ns.name, &["create", "-f", &path]).expect("an editor creates a run");
    kubectl_as("alice", &ns.name, &["patch", "wfr", "by-alice", "--type=merge", "-p", r#"{"spec":{"cancel":true}}"#])
        .expect("an editor cancels a run");
    kubectl_as("alice", &ns.name, &["get", "telemetrystacks"]).expect("an editor lists stacks");
    eventually("view carries workflowruns", WAIT, async || {
        kubectl_as("bob", &ns.name, &["get", "wfr", "by-alice"]).ok().map(|_| ())
    })
    .await;
    kubectl_as("bob", &ns.name, &["get", "wfr", "by-alice", "-o", "jsonpath={.status}"])
        .expect("a viewer reads status");
    let created = kubectl_as("bob", &ns.name, &["create", "-f", &path]);
    assert!(created.as_ref().is_err_and(|e| e.contains("Forbidden") || e.contains("forbidden")), "{created:?}");
    let cancelled = kubectl_as(
        "bob",
        &ns.name,
        &["patch", "wfr", "by-alice", "--type=merge", "-p", r#"{"spec":{"cancel":false}}"#],
    );
    assert!(cancelled.is_err_and(|e| e.contains("forbidden")), "a viewer cannot cancel");
    let _ = run(kubectl().args(["delete", "-f"]).arg(&file));
    for user in ["alice", "bob"] {
        let status =
            kubectl_as(user, &ns.name, &["auth", "can-i", "patch", "workflowruns.flowtel.dev", "--subresource=status"]);
        assert!(status.is_err(), "{user}: no user role writes a run's status: {status:?}");
    }
}

#[tokio::test]
async fn the_admission_policy_refuses_privileged_host_and_unlisted_service_account_templates() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "sec-policy").await.expect("namespace");
    let policy = repo_root().join("manifests/policy/workflowrun-restrictions.yaml");
    run(kubectl().args(["apply", "--server-side", "-f"]).arg(&policy)).expect("the policy");
    let allow = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "flowtel-run-policy"},
        "data": {"allowedServiceAccounts": "default,workflow-runner"}});
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    cms.patch("flowtel-run-policy", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(allow)).await.expect("allow-list");
    label_namespace(&ns.name, &["flowtel.dev/run-policy=enforced"]);
    let file = std::env::temp_dir().join(format!("flowtel-policy-{}.json", ns.name));
    let dry_run = |run_json: &Value| {
        std::fs::write(&file, run_json.to_string()).expect("write");
        run(kubectl().args(["create", "--dry-run=server", "-n", &ns.name, "-f"]).arg(&file)).map_err(|e| e.to_string())
    };
    let base = || simple_run("candidate", "wf-policy", "1s");
    let mut privileged = base();
    privileged["spec"]["template"]["spec"]["containers"][0]["securityContext"] = json!({"privileged": true});
    let mut privileged_init = base();
    privileged_init["spec"]["template"]["spec"]["initContainers"] =
        json!([{"name": "init", "image": "busybox", "securityContext": {"privileged": true}}]);
    let mut host_network = base();
    host_network["spec"]["template"]["spec"]["hostNetwork"] = json!(true);
    let mut host_pid = base();
    host_pid["spec"]["template"]["spec"]["hostPID"] = json!(true);
    let mut host_path = base();
    host_path["spec"]["template"]["spec"]["volumes"] = json!([{"name": "root", "hostPath": {"path": "/"}}]);
    let mut unlisted = base();
    unlisted["spec"]["template"]["spec"]["serviceAccountName"] = json!("cluster-admin-sa");
    let mut listed = base();
    listed["spec"]["template"]["spec"]["serviceAccountName"] = json!("workflow-runner");
    // The policy is in force once a known-bad run is refused (policies reach admission asynchronously).
    eventually("the policy in force", WAIT, async || dry_run(&privileged).is_err().then_some(())).await;
    for (what, candidate, named) in [
        ("a privileged container", &privileged, "privileged"),
        ("a privileged init container", &privileged_init, "privileged"),
        ("hostNetwork", &host_network, "host namespaces"),
        ("hostPID", &host_pid, "host namespaces"),
        ("a hostPath volume", &host_path, "hostPath"),
        ("an unlisted ServiceAccount", &unlisted, "cluster-admin-sa"),
    ] {
        let err = dry_run(candidate).expect_err(what);
        assert!(err.contains(named), "{what}: the refusal names it: {err}");
    }
    dry_run(&base()).expect("a plain run on the default ServiceAccount passes");
    dry_run(&listed).expect("a listed ServiceAccount passes");
}

#[tokio::test]
async fn secrets_never_appear_in_logs_events_status_or_render() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    ensure_storage().expect("storage");
    let ns = TestNamespace::new(&client, "sec-secrets").await.expect("namespace");
    let collector = Collector::start("sec-secrets").await.expect("collector");
    // Every level, every module: whatever the operator could print, it prints here.
    let operator = Operator::start_with_env(&ns.name, Some(&collector.endpoint), &[], &[("RUST_LOG", "trace")])
        .await
        .expect("operator");
    const SECRET: &str = "s3cr3t-flowtel-9d2c7e";
    let mut with_secret = simple_run("holds-a-secret", "wf-secrets", "1s");
    with_secret["spec"]["template"]["spec"]["containers"][0]["env"] = json!([{"name": "API_TOKEN", "value": SECRET}]);
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let apply = PatchParams::apply(TEST_MANAGER);
    runs.patch("holds-a-secret", &apply, &Patch::Apply(&with_secret)).await.expect("run");
    let stack = json!({"apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack", "metadata": {"name": "tel"},
        "spec": {}});
    let stacks: Api<flowtel_crds::TelemetryStack> = Api::namespaced(client.clone(), &ns.name);
    stacks.patch("tel", &apply, &Patch::Apply(&stack)).await.expect("stack");
    eventually("the run exported", WAIT, async || {
        let r = runs.get("holds-a-secret").await.ok()?;
        r.status?.telemetry.filter(|t| t.finished).map(|_| ())
    })
    .await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns.name);
    let password = eventually("the generated admin password", WAIT, async || {
        let list = secrets.list(&Default::default()).await.ok()?.items;
        let generated = list.iter().find(|s| s.metadata.name.as_deref().is_some_and(|n| n.contains("grafana")))?;
        let bytes = generated.data.as_ref()?.values().find(|v| v.0.len() >= 16)?;
        String::from_utf8(bytes.0.clone()).ok()
    })
    .await;
    eventually("the stack reconciled", WAIT, async || {
        let s = stacks.get("tel").await.ok()?.status?;
        s.conditions.iter().any(|c| c.type_ == "Ready").then_some(())
    })
    .await;
    let log = std::fs::read_to_string(&operator.log).expect("log");
    assert!(log.len() > 10_000, "the trace-level log has content ({} bytes)", log.len());
    let events = run(kubectl().args(["get", "events", "-n", &ns.name, "-o", "json"])).expect("events");
    let run_status = serde_json::to_string(&runs.get("holds-a-secret").await.expect("run").status).expect("json");
    let stack_status = serde_json::to_string(&stacks.get("tel").await.expect("stack").status).expect("json");
    let stack_file = std::env::temp_dir().join(format!("flowtel-secret-stack-{}.json", ns.name));
    std::fs::write(&stack_file, stack.to_string()).expect("write");
    let rendered =
        run(Command::new(flowtel_binary().expect("flowtel")).args(["render", "-f"]).arg(&stack_file)).expect("render");
    assert!(rendered.contains("kind: Secret"), "render describes the generated Secret");
    for (value, what) in [(SECRET, "a template env value"), (password.as_str(), "the Grafana admin password")] {
        assert!(!log.contains(value), "{what} in the operator's log");
        assert!(!events.contains(value), "{what} in an Event");
        assert!(!run_status.contains(value) && !stack_status.contains(value), "{what} in a status");
        assert!(!rendered.contains(value), "{what} in flowtel render");
    }
}
