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
    for file in ["flowtel.dev_workflowruns.yaml", "flowtel.dev_telemetrystacks.yaml", "flowtel.dev_workerpools.yaml"] {
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
    // Offline, as a user runs it first: Helm's built-in Kubernetes version satisfies the chart's kubeVersion.
    let out = helm().args(["template", "flowtel", &chart()]).output().expect("helm template");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
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
    let _uninstall = Uninstall { release, namespace: ns.name.clone() };
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
    // A stack naming the user's admin Secret, absent: found missing without reading Secrets (a dry-run create).
    let byo = serde_json::json!({"apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack",
        "metadata": {"name": "byo"}, "spec": {"grafana": {"adminCredentialsSecretRef": {"name": "byo-login"}}}});
    stacks.patch("byo", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(byo)).await.expect("stack");
    eventually("the stack naming a missing Secret Degraded", std::time::Duration::from_secs(60), async || {
        let s = stacks.get("byo").await.ok()?.status?;
        s.conditions.iter().any(|c| c.type_ == "Degraded" && c.reason == "AdminSecretNotFound").then_some(())
    })
    .await;
    let login = serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "byo-login"},
        "stringData": {"admin-user": "ops", "admin-password": "a-long-test-password"}});
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns.name);
    secrets.patch("byo-login", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(login)).await.expect("secret");
    eventually("the run Succeeded with its telemetry exported", std::time::Duration::from_secs(90), async || {
        let r = runs.get("rbac").await.ok()?;
        let s = r.status?;
        (s.telemetry.is_some_and(|t| t.finished) && s.phase.map(|p| format!("{p:?}")).as_deref() == Some("Succeeded"))
            .then_some(())
    })
    .await;
    for name in ["rbac", "byo"] {
        eventually(&format!("the stack {name} Ready"), std::time::Duration::from_secs(90), async || {
            let s = stacks.get(name).await.ok()?.status?;
            s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
        })
        .await;
    }
    let generated = secrets.get("rbac-grafana-admin").await.expect("the generated admin Secret");
    assert!(generated.data.is_some_and(|d| d.contains_key("admin-password")), "created by the operator");
    // Grafana turned off: its generated Secret is pruned by name (never listed).
    let off = serde_json::json!({"apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack",
        "metadata": {"name": "rbac"}, "spec": {"grafana": {"enabled": false}}});
    stacks.patch("rbac", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(off)).await.expect("stack");
    eventually("the generated Secret pruned", std::time::Duration::from_secs(60), async || {
        secrets.get_opt("rbac-grafana-admin").await.ok()?.is_none().then_some(())
    })
    .await;
    let lease: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = lease.get(release).await.expect("the Lease").spec.and_then(|s| s.holder_identity);
    assert!(holder.is_some(), "the operator holds the chart's Lease");
    // A refused request reads "... is forbidden: User ... cannot ..." (the Forbidden status), whatever logs it.
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(!log.to_lowercase().contains("forbidden"), "the operator was refused; log: {}", operator.log.display());
}

/// Uninstalls a release when dropped, so a failed test leaves no cluster-scoped ClusterRole behind to refuse the
/// next install ("exists and cannot be imported into the current release").
struct Uninstall<'a> {
    release: &'a str,
    namespace: String,
}

impl Drop for Uninstall<'_> {
    fn drop(&mut self) {
        let uninstall = helm().args(["uninstall", self.release, "--namespace", &self.namespace]).output();
        if !std::thread::panicking() {
            assert!(uninstall.is_ok_and(|o| o.status.success()), "helm uninstall");
        }
    }
}

/// The rendered chart's documents of `kind`.
fn documents(rendered: &str, kind: &str) -> Vec<serde_json::Value> {
    rendered
        .split("\n---")
        .filter_map(|d| serde_yaml_ng::from_str::<serde_json::Value>(d).ok())
        .filter(|d| d["kind"] == kind)
        .collect()
}

#[test]
fn the_charts_knobs_reach_the_operator_and_its_alerts_pass_promtool() {
    // Buckets from a file: `--set` reads 2.5 as a string.
    let values = std::env::temp_dir().join(format!("flowtel-chart-values-{}.yaml", std::process::id()));
    std::fs::write(&values, "operator: {durationBuckets: [10, 2500.5]}\n").expect("values");
    let rendered = template(&[
        "-f",
        &values.display().to_string(),
        "--set",
        "operator.exportTimeoutSeconds=7,operator.writeEconomy=false",
        "--set",
        "extraArgs={--normal-events},extraEnv[0].name=X,extraEnv[0].value=y,priorityClassName=high",
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true,podSecurityContext.runAsUser=null",
    ])
    .expect("template");
    let deployment = &documents(&rendered, "Deployment")[0];
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"].as_array().expect("args").iter().filter_map(|a| a.as_str()).collect();
    for flag in ["--export-timeout-seconds=7", "--write-economy=off", "--duration-buckets=10,2500.5", "--normal-events"]
    {
        assert!(args.contains(&flag), "{flag} in {args:?}");
    }
    assert_eq!(container["env"].as_array().expect("env").last().expect("env")["name"], "X");
    assert_eq!(pod["priorityClassName"], "high");
    assert!(pod["securityContext"].get("runAsUser").is_none(), "OpenShift assigns its own UID");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let services: Vec<String> = documents(&rendered, "Service")
        .iter()
        .filter_map(|s| s["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(services, ["flowtel-dispatch", "flowtel-metrics"], "the dispatch and metrics Services");
    for flag in ["--dispatch-addr=0.0.0.0:8090", "--dispatch-url=http://flowtel-dispatch.default.svc:8090"] {
        assert!(args.contains(&flag), "{flag} in {args:?}");
    }
    assert_eq!(documents(&rendered, "ServiceMonitor").len(), 1);
    // The alerts' expressions through Prometheus' own parser.
    let rule = &documents(&rendered, "PrometheusRule")[0];
    let status = std::process::Command::new(repo_root().join("e2e/build-binaries")).arg("prometheus").status();
    assert!(status.expect("build").success());
    let promtool = flowtel_e2e::cached_binary("promtool", "PROMETHEUS_VERSION");
    let path = std::env::temp_dir().join(format!("flowtel-chart-rules-{}.yml", std::process::id()));
    std::fs::write(&path, serde_yaml_ng::to_string(&rule["spec"]).expect("yaml")).expect("write");
    let out = std::process::Command::new(&promtool).args(["check", "rules"]).arg(&path).output().expect("promtool");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("4 rules found"), "{}", String::from_utf8_lossy(&out.stdout));
}

/// Secrets are never read: in either scope, no rule of the operator's grants get, list or watch on them (a list
/// returns every Secret's data), and none grants `*`.
#[test]
fn the_operator_may_create_and_delete_secrets_but_never_read_them() {
    for args in [&[][..], &["--set", "watchNamespace=team-a"][..]] {
        let rendered = template(args).expect("rendered");
        let roles: Vec<_> =
            documents(&rendered, "ClusterRole").into_iter().chain(documents(&rendered, "Role")).collect();
        let operator_role = roles.iter().find(|r| r["metadata"]["name"] == "flowtel" && r["rules"].is_array());
        let rules = operator_role.expect("the operator's role")["rules"].as_array().cloned().unwrap_or_default();
        let on_secrets: Vec<String> = rules
            .iter()
            .filter(|r| r["resources"].as_array().is_some_and(|rs| rs.iter().any(|x| x == "secrets" || x == "*")))
            .flat_map(|r| r["verbs"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        assert_eq!(on_secrets, ["create", "delete"], "{args:?}");
    }
}

/// The values table of the chart's README, generated from values.yaml (defaults) and values.schema.json (types and
/// descriptions), as helm-docs would: every key, nested ones dotted.
fn values_table(values: &serde_json::Value, schema: &serde_json::Value) -> Result<String, String> {
    fn rows(
        value: &serde_json::Value,
        schema: &serde_json::Value,
        key: &str,
        out: &mut Vec<String>,
    ) -> Result<(), String> {
        let description = schema["description"].as_str().ok_or(format!("{key}: no description in the schema"))?;
        let kind = match &schema["type"] {
            serde_json::Value::String(t) => t.clone(),
            serde_json::Value::Array(ts) => ts.iter().filter_map(|t| t.as_str()).collect::<Vec<_>>().join(" or "),
            _ => String::new(),
        };
        let nested = value.as_object().filter(|o| !o.is_empty() && schema["properties"].is_object());
        let default = match nested {
            Some(_) => String::new(),
            None => format!("`{}`", serde_json::to_string(value).map_err(|e| e.to_string())?),
        };
        out.push(format!("| `{key}` | {kind} | {default} | {} |", description.replace('|', "\\|")));
        for (k, v) in nested.into_iter().flatten() {
            rows(v, &schema["properties"][k], &format!("{key}.{k}"), out)?;
        }
        Ok(())
    }
    let mut out = vec!["| Key | Type | Default | Description |".to_string(), "|---|---|---|---|".to_string()];
    for (k, v) in values.as_object().ok_or("values.yaml is a mapping")? {
        if schema["properties"][k].is_null() {
            return Err(format!("{k}: not in the schema"));
        }
        rows(v, &schema["properties"][k], k, &mut out)?;
    }
    Ok(out.join("\n") + "\n")
}

/// charts/flowtel/README.md lists every value with its default and description, generated: a drift fails here with
/// both tables; `FLOWTEL_UPDATE_CHART_README=1` rewrites the generated part.
#[test]
fn the_chart_readme_lists_every_value_as_the_schema_describes_it() {
    const START: &str = "<!-- values: generated by e2e/tests/chart.rs, FLOWTEL_UPDATE_CHART_README=1 -->\n";
    const END: &str = "<!-- end of values -->";
    let dir = std::path::Path::new(&chart()).to_path_buf();
    let values: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("values.yaml")).expect("values")).expect("yaml");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("values.schema.json")).expect("schema")).expect("json");
    let table = values_table(&values, &schema).unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join("README.md");
    let readme = std::fs::read_to_string(&path).expect("charts/flowtel/README.md");
    let start = readme.find(START).expect("the values marker") + START.len();
    let end = readme[start..].find(END).expect("the end marker") + start;
    if readme[start..end] != table {
        if std::env::var_os("FLOWTEL_UPDATE_CHART_README").is_some() {
            std::fs::write(&path, format!("{}{table}{}", &readme[..start], &readme[end..])).expect("write");
        } else {
            panic!(
                "charts/flowtel/README.md is out of date (FLOWTEL_UPDATE_CHART_README=1 rewrites it)\n--- checked in\n{}\n--- generated\n{table}",
                &readme[start..end]
            );
        }
    }
}

#[test]
fn the_values_table_needs_a_description_for_every_key() {
    let values = serde_json::json!({"a": {"b": 1}});
    let schema = serde_json::json!({"properties": {"a": {"type": "object", "description": "A.",
        "properties": {"b": {"type": "integer"}}}}});
    assert_eq!(values_table(&values, &schema), Err("a.b: no description in the schema".into()));
    let schema = serde_json::json!({"properties": {"a": {"type": "object", "description": "A.",
        "properties": {"b": {"type": "integer", "description": "B | b."}}}}});
    assert_eq!(
        values_table(&values, &schema).as_deref(),
        Ok(
            "| Key | Type | Default | Description |\n|---|---|---|---|\n| `a` | object |  | A. |\n| `a.b` | integer | `1` | B \\| b. |\n"
        )
    );
}
