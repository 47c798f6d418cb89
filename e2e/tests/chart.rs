//! The Helm chart (`charts/flowtel`) with real Helm built from its Go module: lint, template, the rendered objects
//! accepted by the real apiserver, install and upgrade; its CRDs, versions and image held to the rest of the repo.

use flowtel_e2e::{TestNamespace, client, cluster_kubeconfig, helm, install_crds, kubectl, repo_root, run};

fn chart() -> String {
    repo_root().join("charts/flowtel").display().to_string()
}

/// `helm template` with extra arguments: Ok(rendered) or Err(stderr).
fn template(args: &[&str]) -> Result<String, String> {
    // Offline, Helm assumes Kubernetes v1.20 and only the API versions it was built with; the local control plane
    // runs v1.37, which serves MutatingAdmissionPolicy (a `helm install` asks the cluster).
    let out = helm()
        .args(["template", "flowtel", &chart(), "--kube-version", "1.37.2"])
        .args(["--api-versions", "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy"])
        .args(args)
        .output()
        .expect("helm template");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn the_charts_crds_are_the_same_bytes_as_crds() {
    let root = repo_root();
    for file in ["flowtel.dev_workflowruns.yaml", "flowtel.dev_telemetrystacks.yaml"] {
        let ours = std::fs::read(root.join("crds").join(file)).expect("crds/");
        let chart = std::fs::read(root.join("charts/flowtel/crds").join(file)).expect("chart crds/");
        assert!(
            ours == chart,
            "charts/flowtel/crds/{file} differs from crds/{file}: cp crds/*.yaml charts/flowtel/crds/"
        );
    }
}

#[test]
fn versions_and_the_image_agree_across_chart_dockerfile_and_crate() {
    let root = repo_root();
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
        .expect("workspace version")
        .to_string();
    let chart = std::fs::read_to_string(root.join("charts/flowtel/Chart.yaml")).expect("Chart.yaml");
    assert!(chart.contains(&format!("version: {version}\n")), "Chart.yaml version is the crate's {version}");
    assert!(chart.contains(&format!("appVersion: \"{version}\"")), "Chart.yaml appVersion is the crate's {version}");
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains("cargo build --release --locked"), "the image builds with the locked dependencies");
    assert!(dockerfile.contains(&format!("org.opencontainers.image.version=\"{version}\"")));
    assert!(dockerfile.contains(&format!("ghcr.io/flowtel/flowtel:{version}")), "the Dockerfile names the image");
    let values = std::fs::read_to_string(root.join("charts/flowtel/values.yaml")).expect("values.yaml");
    assert!(values.contains("repository: ghcr.io/flowtel/flowtel\n"), "the chart's default image is the Dockerfile's");
    for bin in ["flowtel", "sync", "discovery", "enrichment", "oset"] {
        assert!(dockerfile.contains(&format!("target/release/{bin}")), "the image carries {bin}");
    }
}

#[test]
fn the_chart_lints_strictly_and_a_wrong_value_fails_naming_it() {
    let out = helm().args(["lint", "--strict", &chart()]).output().expect("helm lint");
    assert!(out.status.success(), "helm lint --strict: {}", String::from_utf8_lossy(&out.stdout));
    for (set, named) in [
        ("replicas=11", "replicas"),
        ("shards=0", "shards"),
        ("shards=257", "shards"),
        ("leaderElection.enabled=false,replicas=2", "leaderElection"),
        ("leaderElection.leaseDuration=1m", "leaseDuration"),
        ("operator.concurrency=0", "concurrency"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("watchNamespace=Not_A_Namespace", "watchNamespace"),
        ("operator.otlpEndpoint=collector:4317", "otlpEndpoint"),
        ("unknownKey=1", "unknownKey"),
    ] {
        let err = template(&["--set", set]).expect_err(set);
        assert!(err.contains(named), "--set {set}: the error names {named}: {err}");
    }
}

#[tokio::test]
async fn the_rendered_chart_is_accepted_and_installs_and_upgrades() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "chart").await.expect("namespace");
    let production = repo_root().join("charts/flowtel/ci/production-values.yaml").display().to_string();
    for (what, args) in [
        ("default values", vec!["--namespace", ns.name.as_str()]),
        ("production values", vec!["--namespace", ns.name.as_str(), "-f", production.as_str()]),
        ("two shards", vec!["--namespace", ns.name.as_str(), "-f", production.as_str(), "--set", "shards=2"]),
    ] {
        let rendered = template(&args).unwrap_or_else(|e| panic!("{what}: {e}"));
        let file = std::env::temp_dir().join(format!("flowtel-chart-{}.yaml", std::process::id()));
        std::fs::write(&file, &rendered).expect("write");
        // The production values watch namespace `workflows`, which need not exist for a dry run of cluster objects;
        // namespaced objects go to the test's namespace.
        let rendered = rendered.replace("namespace: workflows", &format!("namespace: {}", ns.name));
        std::fs::write(&file, &rendered).expect("write");
        let out = run(kubectl().args(["apply", "--server-side", "--dry-run=server", "-f"]).arg(&file));
        let out = out.unwrap_or_else(|e| panic!("{what}: the apiserver refused the rendered chart: {e}"));
        for kind in ["serviceaccount", "deployment.apps", "role.rbac.authorization.k8s.io/flowtel-leader-election"] {
            assert!(out.contains(kind), "{what}: {kind} applied: {out}");
        }
        // Two replicas: a standby, kept through a drain.
        let production = what != "default values";
        assert_eq!(out.contains("poddisruptionbudget.policy/flowtel"), production, "{what}: {out}");
        // Shards: a Deployment each, told its shard, and the policy that keeps a run's shard label fixed.
        let sharded = what == "two shards";
        for object in [
            "deployment.apps/flowtel-shard-0",
            "deployment.apps/flowtel-shard-1",
            "poddisruptionbudget.policy/flowtel-shard-1",
            "validatingadmissionpolicy.admissionregistration.k8s.io/flowtel-shard-label",
        ] {
            assert_eq!(out.contains(object), sharded, "{what}: {object}: {out}");
        }
        assert_eq!(rendered.contains("--shard=1/2"), sharded, "{what}");
        // An OTLP endpoint (the production values): the finalizer is added at admission, in the watched namespace.
        let policy = "mutatingadmissionpolicy.admissionregistration.k8s.io/flowtel-telemetry-finalizer";
        assert_eq!(out.contains(policy), production, "{what}: {out}");
    }
    // Install, then upgrade with a changed value: revision 2, the Deployment follows.
    let release = format!("flowtel-{}", &ns.name[ns.name.len().saturating_sub(5)..]);
    let install = helm()
        .args(["install", &release, &chart(), "--namespace", &ns.name, "--set", &format!("watchNamespace={}", ns.name)])
        .args(["--wait", "--timeout", "90s"])
        .output()
        .expect("helm install");
    assert!(install.status.success(), "helm install: {}", String::from_utf8_lossy(&install.stderr));
    let upgrade = helm()
        .args(["upgrade", &release, &chart(), "--namespace", &ns.name, "--reuse-values"])
        .args(["--set", "operator.concurrency=32", "--wait", "--timeout", "90s"])
        .output()
        .expect("helm upgrade");
    assert!(upgrade.status.success(), "helm upgrade: {}", String::from_utf8_lossy(&upgrade.stderr));
    let args = run(kubectl().args([
        "get",
        "deployment",
        "-n",
        &ns.name,
        "-l",
        &format!("app.kubernetes.io/instance={release}"),
        "-o",
        "jsonpath={.items[0].spec.template.spec.containers[0].args}",
    ]))
    .expect("deployment");
    assert!(args.contains("--concurrency=32") && args.contains(&format!("--namespace={}", ns.name)), "{args}");
    let history = helm().args(["history", &release, "--namespace", &ns.name, "-o", "json"]).output().expect("history");
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).expect("history JSON");
    assert_eq!(history.as_array().map(Vec::len), Some(2), "install and upgrade: {history}");
    let uninstall = helm().args(["uninstall", &release, "--namespace", &ns.name]).output().expect("uninstall");
    assert!(uninstall.status.success());
}

/// A kubeconfig for the local control plane that authenticates with `token` (and nothing else).
fn token_kubeconfig(token: &str, path: &std::path::Path) {
    let admin: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(cluster_kubeconfig()).expect("kubeconfig")).expect("yaml");
    let cluster = admin["clusters"][0]["cluster"].clone();
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": "flowtel", "user": {"token": token}}],
        "contexts": [{"name": "flowtel", "context": {"cluster": "local", "user": "flowtel"}}],
        "current-context": "flowtel",
    });
    std::fs::write(path, serde_yaml_ng::to_string(&config).expect("yaml")).expect("write");
}

/// The RBAC the chart grants is enough: the operator, authenticated as the chart's ServiceAccount (a token from the
/// TokenRequest API), runs a WorkflowRun to Succeeded with its telemetry exported and a TelemetryStack to Ready,
/// and is never refused.
#[tokio::test]
async fn the_operator_runs_on_the_charts_service_account_without_a_403() {
    use flowtel_crds::{TelemetryStack, WorkflowRun};
    use flowtel_e2e::{Collector, Operator, TEST_MANAGER, ensure_storage, eventually, simple_run};
    use kube::api::{Api, Patch, PatchParams};
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    ensure_storage().expect("storage");
    let ns = TestNamespace::new(&client, "chart-rbac").await.expect("namespace");
    let release = "flowtel";
    let install = helm()
        .args(["install", release, &chart(), "--namespace", &ns.name, "--set", &format!("watchNamespace={}", ns.name)])
        .output()
        .expect("helm install");
    assert!(install.status.success(), "helm install: {}", String::from_utf8_lossy(&install.stderr));
    let token = run(kubectl().args(["create", "token", release, "-n", &ns.name, "--duration", "1h"])).expect("token");
    let kubeconfig = std::env::temp_dir().join(format!("flowtel-sa-{}.kubeconfig", ns.name));
    token_kubeconfig(token.trim(), &kubeconfig);
    let collector = Collector::start("chart-rbac").await.expect("collector");
    // As the chart runs it: electing a leader over a Lease in the release's namespace (the chart's Role there).
    let operator = Operator::start_with_env(
        &ns.name,
        Some(&collector.endpoint),
        &["--leader-elect", "--leader-elect-namespace", &ns.name, "--leader-elect-lease-name", release],
        &[("KUBECONFIG", kubeconfig.to_str().expect("path"))],
    )
    .await
    .expect("the operator starts and syncs its watches as the ServiceAccount");

    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    runs.patch("rbac", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(simple_run("rbac", "wf-rbac", "1s")))
        .await
        .expect("run");
    let stacks: Api<TelemetryStack> = Api::namespaced(client.clone(), &ns.name);
    let stack = serde_json::json!({"apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack",
        "metadata": {"name": "rbac"}, "spec": {}});
    stacks.patch("rbac", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(stack)).await.expect("stack");
    eventually("the run Succeeded with its telemetry exported", std::time::Duration::from_secs(90), async || {
        let r = runs.get("rbac").await.ok()?;
        let s = r.status?;
        (s.telemetry.is_some_and(|t| t.finished) && s.phase.map(|p| format!("{p:?}")).as_deref() == Some("Succeeded"))
            .then_some(())
    })
    .await;
    eventually("the stack Ready", std::time::Duration::from_secs(90), async || {
        let s = stacks.get("rbac").await.ok()?.status?;
        s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;
    let lease: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = lease.get(release).await.expect("the Lease").spec.and_then(|s| s.holder_identity);
    assert!(holder.is_some(), "the operator holds the chart's Lease");
    // A refused request reads "... is forbidden: User ... cannot ..." (the Forbidden status), whatever logs it.
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(!log.to_lowercase().contains("forbidden"), "the operator was refused; log: {}", operator.log.display());
    let uninstall = helm().args(["uninstall", release, "--namespace", &ns.name]).output().expect("uninstall");
    assert!(uninstall.status.success());
}
