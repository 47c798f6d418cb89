//! The TelemetryStack controller end to end: the operator as its own process against the real control plane (KWOK
//! makes Deployment and StatefulSet pods ready; `ensure_storage` binds their claims), and the generated collector
//! configurations checked by the real collector's `validate`. Tests assert outcomes, never durations.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use flowtel_crds::TelemetryStack;
use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunPhase;
use flowtel_e2e::{
    Collector, Operator, TEST_MANAGER, TestNamespace, client, collector_bin, ensure_storage, eventually,
    flowtel_binary, install_crds, repo_root, simple_run,
};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const STACK_LABEL: &str = "flowtel.dev/stack";

struct Env {
    client: kube::Client,
    ns: TestNamespace,
    _collector: Collector,
    operator: Operator,
}

impl Env {
    async fn new(test: &str) -> Self {
        let client = client().await.expect("client");
        install_crds(&client).await.expect("CRDs");
        ensure_storage().expect("storage provisioner");
        let ns = TestNamespace::new(&client, test).await.expect("namespace");
        let collector = Collector::start(test).await.expect("collector");
        let operator = Operator::start_with_env(
            &ns.name,
            Some(&collector.endpoint),
            &[],
            &[("RUST_LOG", "info,kube_runtime=debug,flowtel=debug")],
        )
        .await
        .expect("operator");
        Self { client, ns, _collector: collector, operator }
    }

    fn api<K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>>(&self) -> Api<K> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    async fn apply_stack(&self, name: &str, spec: Value) -> TelemetryStack {
        let stack = json!({"apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack",
            "metadata": {"name": name}, "spec": spec});
        self.api::<TelemetryStack>()
            .patch(name, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(&stack))
            .await
            .expect("stack applied")
    }

    /// Waits until the stack satisfies `done`; panics with its status and the operator's log otherwise.
    async fn wait_stack(&self, name: &str, what: &str, done: impl Fn(&TelemetryStack) -> bool) -> TelemetryStack {
        let cond = move |s: Option<&TelemetryStack>| s.is_some_and(&done);
        match tokio::time::timeout(WAIT, await_condition(self.api(), name, cond)).await {
            Ok(Ok(Some(stack))) => stack,
            other => {
                let current = self.api::<TelemetryStack>().get_opt(name).await.ok().flatten().and_then(|s| s.status);
                panic!(
                    "stack {name}: {what} did not happen: {other:?}\nstatus: {current:#?}\noperator log: {}",
                    self.operator.log.display()
                )
            }
        }
    }

    async fn wait_ready(&self, name: &str, generation: i64) -> TelemetryStack {
        self.wait_stack(name, &format!("Ready at generation {generation}"), |s| {
            let status = s.status.as_ref();
            status.and_then(|st| st.observed_generation) == Some(generation)
                && condition(s, "Ready").is_some_and(|c| c.0 == "True")
        })
        .await
    }

    /// Names of this stack's objects of kind K (by the stack label).
    async fn names<K>(&self, stack: &str) -> BTreeSet<String>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let list = self.api::<K>().list(&ListParams::default().labels(&format!("{STACK_LABEL}={stack}"))).await;
        list.expect("list").items.iter().map(|o| o.name_any()).collect()
    }

    async fn config(&self, name: &str, key: &str) -> String {
        let cm = self.api::<ConfigMap>().get(name).await.expect("ConfigMap");
        cm.data.and_then(|d| d.get(key).cloned()).unwrap_or_default()
    }

    async fn warning_events(&self, stack: &str, reason: &str) -> usize {
        let events = self.api::<Event>().list(&ListParams::default()).await.expect("events");
        events
            .items
            .iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(stack) && e.reason.as_deref() == Some(reason))
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .count()
    }
}

fn condition(stack: &TelemetryStack, type_: &str) -> Option<(String, String, String)> {
    let c = stack.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn names(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn template_hash(annotations: Option<&std::collections::BTreeMap<String, String>>) -> String {
    annotations.and_then(|a| a.get("flowtel.dev/config-hash").cloned()).unwrap_or_default()
}

async fn deployment_template_hash(env: &Env, name: &str) -> String {
    let d = env.api::<Deployment>().get(name).await.expect("Deployment");
    template_hash(d.spec.template.metadata.and_then(|m| m.annotations).as_ref())
}

#[tokio::test]
async fn a_stack_waits_for_its_admin_secret_then_deploys_everything_and_starts_the_run_waiting_for_it() {
    let env = Env::new("stack-deploy").await;
    let ns = env.ns.name.clone();
    env.apply_stack("tel", json!({"grafana": {"adminCredentialsSecretRef": {"name": "grafana-login"}}})).await;

    // A missing admin Secret: Degraded naming the field, a Warning event, nothing applied.
    let degraded = env
        .wait_stack("tel", "Degraded AdminSecretNotFound", |s| {
            condition(s, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "AdminSecretNotFound")
        })
        .await;
    let (_, _, message) = condition(&degraded, "Degraded").expect("Degraded");
    assert!(message.contains("spec.grafana.adminCredentialsSecretRef"), "{message}");
    assert_eq!(condition(&degraded, "Ready").map(|c| c.0).as_deref(), Some("False"));
    eventually("a Warning event AdminSecretNotFound", WAIT, async || {
        (env.warning_events("tel", "AdminSecretNotFound").await == 1).then_some(())
    })
    .await;
    assert!(env.names::<ConfigMap>("tel").await.is_empty(), "nothing is applied while the stack is invalid");
    assert!(env.names::<Deployment>("tel").await.is_empty());

    // A run referencing the stack waits for it: Pending, no Job.
    let mut run = simple_run("waits", "sync", "1s");
    run["spec"]["telemetryStackRef"] = json!({"name": "tel"});
    let runs: Api<WorkflowRun> = env.api();
    runs.patch("waits", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await.expect("run");
    let waiting = |r: Option<&WorkflowRun>| {
        r.and_then(|r| r.status.as_ref()).is_some_and(|s| {
            s.phase == Some(WorkflowRunPhase::Pending)
                && s.conditions.iter().any(|c| c.type_ == "Succeeded" && c.reason == "TelemetryStackNotReady")
        })
    };
    tokio::time::timeout(WAIT, await_condition(runs.clone(), "waits", waiting))
        .await
        .expect("the run waits for the stack")
        .expect("watch");
    assert!(env.api::<Job>().list(&ListParams::default()).await.expect("jobs").items.is_empty());

    // The Secret appears: the stack rolls out, becomes Ready with every endpoint, and the run starts.
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "grafana-login"},
        "stringData": {"admin-user": "ops", "admin-password": "a-long-test-password"}});
    env.api::<Secret>()
        .patch("grafana-login", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&secret))
        .await
        .expect("secret");
    let ready = env.wait_ready("tel", 1).await;
    let status = ready.status.clone().expect("status");
    assert_eq!(condition(&ready, "Degraded").map(|c| (c.0, c.1)), Some(("False".into(), "AsExpected".into())));
    assert_eq!(condition(&ready, "Progressing").map(|c| c.0).as_deref(), Some("False"));
    let e = &status.endpoints;
    assert_eq!(e.otlp_grpc.as_deref(), Some(format!("http://tel-collector.{ns}.svc:4317").as_str()));
    assert_eq!(e.otlp_http.as_deref(), Some(format!("http://tel-collector.{ns}.svc:4318").as_str()));
    assert_eq!(e.prometheus.as_deref(), Some(format!("http://tel-prometheus.{ns}.svc:9090").as_str()));
    assert_eq!(e.tempo.as_deref(), Some(format!("http://tel-tempo.{ns}.svc:3200").as_str()));
    assert_eq!(e.loki.as_deref(), Some(format!("http://tel-loki.{ns}.svc:3100").as_str()));
    assert_eq!(e.grafana.as_deref(), Some(format!("http://tel-grafana.{ns}.svc:3000").as_str()));
    let c = &status.components;
    for (name, component) in [
        ("collector", &c.collector),
        ("prometheus", &c.prometheus),
        ("tempo", &c.tempo),
        ("loki", &c.loki),
        ("grafana", &c.grafana),
    ] {
        let component = component.as_ref().unwrap_or_else(|| panic!("{name} status"));
        assert!(component.ready && component.ready_replicas == 1 && component.replicas == 1, "{name}: {component:?}");
    }

    // Every object, and nothing else.
    assert_eq!(
        env.names::<ConfigMap>("tel").await,
        names(&[
            "tel-collector-config",
            "tel-grafana-dashboards",
            "tel-grafana-datasources",
            "tel-loki-config",
            "tel-prometheus-config",
            "tel-tempo-config"
        ])
    );
    let services = names(&["tel-collector", "tel-grafana", "tel-loki", "tel-prometheus", "tel-tempo"]);
    assert_eq!(env.names::<Service>("tel").await, services);
    assert_eq!(env.names::<Deployment>("tel").await, names(&["tel-collector", "tel-grafana"]));
    assert_eq!(env.names::<StatefulSet>("tel").await, names(&["tel-loki", "tel-prometheus", "tel-tempo"]));
    assert_eq!(env.names::<PodDisruptionBudget>("tel").await, names(&["tel-collector"]));
    assert!(env.names::<HorizontalPodAutoscaler>("tel").await.is_empty());
    assert!(env.names::<Secret>("tel").await.is_empty(), "the user's Secret is used, none is generated");
    let claims = env.api::<PersistentVolumeClaim>().list(&ListParams::default()).await.expect("claims");
    let bound: BTreeSet<String> = claims
        .items
        .iter()
        .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
        .map(|c| c.name_any())
        .collect();
    assert_eq!(bound, names(&["data-tel-loki-0", "data-tel-prometheus-0", "data-tel-tempo-0"]));
    let grafana = env.api::<Deployment>().get("tel-grafana").await.expect("grafana");
    let env_vars = grafana.spec.template.spec.map(|p| p.containers[0].env.clone().unwrap_or_default());
    let password = env_vars
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "GF_SECURITY_ADMIN_PASSWORD")
        .and_then(|v| v.value_from?.secret_key_ref);
    assert_eq!(password.map(|s| (s.name, s.key)), Some(("grafana-login".into(), "admin-password".into())));

    // The waiting run started once the stack was Ready, with the stack's collector as its endpoint.
    let done = |r: Option<&WorkflowRun>| {
        r.and_then(|r| r.status.as_ref()).is_some_and(|s| s.phase == Some(WorkflowRunPhase::Succeeded))
    };
    tokio::time::timeout(WAIT, await_condition(runs, "waits", done)).await.expect("the run succeeds").expect("watch");
    let job = env.api::<Job>().get("waits-1").await.expect("the run's Job");
    let endpoint = job
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers[0].env.clone())
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "OTEL_EXPORTER_OTLP_ENDPOINT")
        .and_then(|v| v.value);
    assert_eq!(endpoint, e.otlp_grpc.clone());
    // Each object was applied once: the many reconciles its workloads' status changes cause apply nothing.
    let writes: std::collections::BTreeMap<String, u64> = flowtel_e2e::operator_writes(&ns).into_iter().collect();
    for (write, count) in [
        ("patch configmaps", 6),
        ("patch services", 5),
        ("patch deployments", 2),
        ("patch statefulsets", 3),
        ("patch poddisruptionbudgets", 1),
    ] {
        assert_eq!(writes.get(write).copied(), Some(count), "{write}: {writes:?}");
    }
    let status_writes = writes.get("patch telemetrystacks/status").copied().unwrap_or_default();
    // Degraded, then at most two steps per component (created, ready) as the rollout goes: written on change only.
    assert!((2..=12).contains(&status_writes), "status written on change only: {writes:?}");
}

#[tokio::test]
async fn a_config_change_rolls_only_the_collector_and_a_broken_override_changes_nothing() {
    let env = Env::new("stack-roll").await;
    env.apply_stack("roll", json!({})).await;
    env.wait_ready("roll", 1).await;

    // The generated admin Secret: a random password, never in the operator's log.
    let secret = env.api::<Secret>().get("roll-grafana-admin").await.expect("generated admin Secret");
    let password = secret.data.and_then(|d| d.get("admin-password").cloned()).expect("admin-password").0;
    assert_eq!(password.len(), 48, "24 random bytes in hex");
    let log = std::fs::read_to_string(&env.operator.log).unwrap_or_default();
    assert!(!log.contains(&String::from_utf8_lossy(&password).to_string()), "the password is never logged");

    let generations = async || {
        let mut out = Vec::new();
        for name in ["roll-prometheus", "roll-tempo", "roll-loki"] {
            let s = env.api::<StatefulSet>().get(name).await.expect("StatefulSet");
            out.push((name, s.metadata.generation));
        }
        let g = env.api::<Deployment>().get("roll-grafana").await.expect("grafana");
        out.push(("roll-grafana", g.metadata.generation));
        out
    };
    let before = generations().await;
    let collector_hash = deployment_template_hash(&env, "roll-collector").await;

    env.apply_stack("roll", json!({"collector": {"batchSize": 500}})).await;
    env.wait_ready("roll", 2).await;
    assert!(env.config("roll-collector-config", "collector.yaml").await.contains("send_batch_size: 500"));
    let rolled = deployment_template_hash(&env, "roll-collector").await;
    assert_ne!(rolled, collector_hash, "the collector's pods roll");
    assert_eq!(generations().await, before, "no other workload changes");

    // A broken override: Degraded naming the field, a Warning event, the running collector untouched.
    let config_before = env.config("roll-collector-config", "collector.yaml").await;
    let broken = "service:\n  pipelines:\n    traces:\n      exporters: [otlp_grpc/nowhere]\n";
    env.apply_stack("roll", json!({"collector": {"batchSize": 500, "configOverride": broken}})).await;
    let degraded = env
        .wait_stack("roll", "Degraded InvalidCollectorConfig", |s| {
            condition(s, "Degraded").is_some_and(|c| c.0 == "True" && c.1 == "InvalidCollectorConfig")
        })
        .await;
    let (_, _, message) = condition(&degraded, "Degraded").expect("Degraded");
    assert!(message.contains("spec.collector.configOverride") && message.contains("otlp_grpc/nowhere"), "{message}");
    eventually("a Warning event InvalidCollectorConfig", WAIT, async || {
        (env.warning_events("roll", "InvalidCollectorConfig").await == 1).then_some(())
    })
    .await;
    assert_eq!(env.config("roll-collector-config", "collector.yaml").await, config_before);
    assert_eq!(deployment_template_hash(&env, "roll-collector").await, rolled);
    let endpoints = degraded.status.map(|s| s.endpoints).unwrap_or_default();
    assert!(endpoints.otlp_grpc.is_some(), "runs keep using the running collector");

    // Fixed: healthy again, at the new generation.
    env.apply_stack("roll", json!({"collector": {"batchSize": 500}})).await;
    let fixed = env.wait_ready("roll", 4).await;
    assert_eq!(condition(&fixed, "Degraded").map(|c| c.0).as_deref(), Some("False"));
}

#[tokio::test]
async fn scaling_follows_the_spec_through_the_autoscaler_replicas_and_mode() {
    let env = Env::new("stack-scale").await;
    // The collector alone, exporting metrics to a Prometheus run elsewhere.
    let base = json!({
        "prometheus": {"enabled": false, "externalUrl": "http://prometheus.monitoring.svc:9090"},
        "tempo": {"enabled": false}, "loki": {"enabled": false}, "grafana": {"enabled": false},
    });
    let with = |collector: Value| {
        let mut spec = base.clone();
        spec["collector"] = collector;
        spec
    };
    env.apply_stack("scale", with(json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 4}}))).await;
    let hpa = eventually("the collector's HPA", WAIT, async || {
        env.api::<HorizontalPodAutoscaler>().get_opt("scale-collector").await.ok().flatten()
    })
    .await;
    let spec = hpa.spec;
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 4));
    assert_eq!(spec.scale_target_ref.kind, "Deployment");
    // The HPA holds the minimum; the stack reports the replicas it sees.
    let scaled = env
        .wait_stack("scale", "2 collector replicas ready", |s| {
            s.status.as_ref().and_then(|st| st.components.collector.as_ref()).is_some_and(|c| c.ready_replicas == 2)
        })
        .await;
    assert_eq!(scaled.status.as_ref().and_then(|s| s.components.prometheus.as_ref()).map(|p| p.ready), Some(true));
    assert_eq!(env.names::<StatefulSet>("scale").await, BTreeSet::new());

    env.apply_stack("scale", with(json!({"replicas": 3}))).await;
    env.wait_stack("scale", "3 collector replicas ready", |s| {
        s.status.as_ref().and_then(|st| st.components.collector.as_ref()).is_some_and(|c| c.ready_replicas == 3)
    })
    .await;
    assert!(env.names::<HorizontalPodAutoscaler>("scale").await.is_empty(), "the HPA is pruned");
    let deployment = env.api::<Deployment>().get("scale-collector").await.expect("collector");
    assert_eq!(deployment.spec.replicas, Some(3));

    env.apply_stack("scale", with(json!({"mode": "StatefulSet", "replicas": 2}))).await;
    env.wait_ready("scale", 3).await;
    assert_eq!(env.names::<StatefulSet>("scale").await, names(&["scale-collector"]));
    eventually("the collector Deployment pruned", WAIT, async || {
        env.names::<Deployment>("scale").await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn disabling_loki_prunes_it_and_deleting_the_stack_removes_everything() {
    let env = Env::new("stack-prune").await;
    env.apply_stack("prune", json!({})).await;
    env.wait_ready("prune", 1).await;
    assert!(env.config("prune-collector-config", "collector.yaml").await.contains("otlp_http/loki"));

    env.apply_stack("prune", json!({"loki": {"enabled": false}})).await;
    let ready = env.wait_ready("prune", 2).await;
    let status = ready.status.expect("status");
    assert!(status.components.loki.is_none() && status.endpoints.loki.is_none());
    eventually("Loki's objects pruned", WAIT, async || {
        let gone = !env.names::<StatefulSet>("prune").await.contains("prune-loki")
            && !env.names::<Service>("prune").await.contains("prune-loki")
            && !env.names::<ConfigMap>("prune").await.contains("prune-loki-config");
        gone.then_some(())
    })
    .await;
    let collector = env.config("prune-collector-config", "collector.yaml").await;
    assert!(!collector.contains("loki") && !collector.contains("logs:"), "no logs pipeline:\n{collector}");
    let datasources = env.config("prune-grafana-datasources", "datasources.yaml").await;
    assert!(!datasources.contains("type: loki") && datasources.contains("type: tempo"), "{datasources}");

    env.api::<TelemetryStack>().delete("prune", &Default::default()).await.expect("delete");
    eventually("garbage collection of every object of the stack", WAIT, async || {
        let empty = env.names::<ConfigMap>("prune").await.is_empty()
            && env.names::<Service>("prune").await.is_empty()
            && env.names::<Deployment>("prune").await.is_empty()
            && env.names::<StatefulSet>("prune").await.is_empty()
            && env.names::<Secret>("prune").await.is_empty()
            && env.names::<PodDisruptionBudget>("prune").await.is_empty();
        empty.then_some(())
    })
    .await;
}

/// `flowtel render` of `stack` (YAML) with or without `--check`: (exit success, stdout, stderr).
fn render(stack: &str, check: bool) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("flowtel-render-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join(format!("{:x}.yaml", stack.len() * 31 + usize::from(check)));
    std::fs::write(&file, stack).expect("write");
    let mut cmd = Command::new(flowtel_binary().expect("flowtel binary"));
    cmd.arg("render").arg("-f").arg(&file);
    if check {
        cmd.arg("--check");
    }
    let out = cmd.output().expect("flowtel render");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The collector configuration among rendered objects.
fn collector_config(rendered: &str) -> Option<String> {
    serde_yaml_ng::Deserializer::from_str(rendered).find_map(|doc| {
        let v = <Value as serde::Deserialize>::deserialize(doc).ok()?;
        (v["kind"] == "ConfigMap").then(|| v["data"]["collector.yaml"].as_str().map(str::to_string)).flatten()
    })
}

/// `otelcol validate` of flowtel's collector build: (passed, its message).
fn otelcol_validate(config: &str) -> (bool, String) {
    let path = std::env::temp_dir().join(format!("flowtel-validate-{}.yaml", std::process::id()));
    std::fs::write(&path, config).expect("write");
    let out = Command::new(collector_bin()).arg("validate").arg(format!("--config={}", path.display())).output();
    let out = out.expect("otelcol validate");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn every_golden_collector_config_passes_otelcol_validate() {
    let status = Command::new(repo_root().join("e2e/build-binaries")).arg("collector").status().expect("build");
    assert!(status.success());
    let dir = repo_root().join("operator/src/telemetry_stack/testdata");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("testdata") {
        let path = entry.expect("entry").path();
        if !path.to_string_lossy().ends_with(".snap") {
            continue;
        }
        let text = snapshot_body(&std::fs::read_to_string(&path).expect("golden"));
        let config = collector_config(&text).unwrap_or_else(|| panic!("{}: no collector config", path.display()));
        let (ok, message) = otelcol_validate(&config);
        assert!(ok, "{}: otelcol validate refused it: {message}", path.display());
        checked += 1;
    }
    assert_eq!(checked, 5, "every golden stack has a collector");
}

/// The rendered objects of an insta snapshot file (`operator/src/telemetry_stack/testdata/<stack>.snap`): what
/// follows its `---`-fenced header.
fn snapshot_body(text: &str) -> String {
    text.strip_prefix("---\n")
        .and_then(|rest| rest.split_once("\n---\n"))
        .map_or_else(|| text.to_string(), |(_, body)| body.to_string())
}

/// Every object of every golden stack, as JSON.
fn golden_objects() -> Vec<(String, Value)> {
    let dir = repo_root().join("operator/src/telemetry_stack/testdata");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("testdata") {
        let path = entry.expect("entry").path();
        if !path.to_string_lossy().ends_with(".snap") {
            continue;
        }
        let text = snapshot_body(&std::fs::read_to_string(&path).expect("golden"));
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = <Value as serde::Deserialize>::deserialize(doc).expect("a YAML document");
            out.push((path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string(), value));
        }
    }
    out
}

#[test]
fn every_golden_prometheus_config_and_dashboard_query_passes_promtool() {
    let status = Command::new(repo_root().join("e2e/build-binaries")).arg("prometheus").status().expect("build");
    assert!(status.success());
    let promtool = flowtel_e2e::cached_binary("promtool", "PROMETHEUS_VERSION");
    let dir = std::env::temp_dir().join(format!("flowtel-promtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (mut configs, mut queries) = (0, 0);
    for (file, object) in golden_objects() {
        if let Some(config) = object["data"]["prometheus.yml"].as_str() {
            let path = dir.join("prometheus.yml");
            std::fs::write(&path, config).expect("write");
            let out = Command::new(&promtool).args(["check", "config"]).arg(&path).output().expect("promtool");
            assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stdout));
            configs += 1;
        }
        if let Some(dashboard) = object["data"]["workflow-runs.json"].as_str() {
            // Each query as a recording rule: `promtool check rules` parses it with Prometheus' own parser.
            let dashboard: Value = serde_json::from_str(dashboard).expect("dashboard JSON");
            let mut rules = Vec::new();
            for panel in dashboard["panels"].as_array().expect("panels") {
                for target in panel["targets"].as_array().expect("targets") {
                    let expr = target["expr"].as_str().expect("expr").replace("$__rate_interval", "5m");
                    rules.push(json!({"record": format!("flowtel:dashboard:{}", rules.len()), "expr": expr}));
                }
            }
            assert_eq!(rules.len(), 13, "{file}: every query");
            let path = dir.join("rules.yml");
            let doc = json!({"groups": [{"name": "dashboard", "rules": rules}]});
            std::fs::write(&path, serde_yaml_ng::to_string(&doc).expect("yaml")).expect("write");
            let out = Command::new(&promtool).args(["check", "rules"]).arg(&path).output().expect("promtool");
            assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
            queries += 1;
        }
    }
    // default, production, persistent-tail-sampling and override deploy Prometheus and Grafana.
    assert_eq!((configs, queries), (4, 4));
}

#[test]
fn flowtel_check_and_otelcol_validate_agree_on_every_override() {
    let status = Command::new(repo_root().join("e2e/build-binaries")).arg("collector").status().expect("build");
    assert!(status.success());
    // (what, override, valid)
    let cases = [
        ("a bigger batch timeout", "processors:\n  batch: {timeout: 5s}\n", true),
        (
            "an added file exporter",
            "exporters:\n  file/x: {path: /tmp/x.json}\nservice:\n  pipelines:\n    traces:\n      exporters: [otlp_grpc/tempo, file/x]\n",
            true,
        ),
        (
            "an exporter that is not configured",
            "service:\n  pipelines:\n    traces:\n      exporters: [otlp_grpc/nowhere]\n",
            false,
        ),
        (
            "a processor type the build lacks",
            "processors:\n  kafka_thing: {}\nservice:\n  pipelines:\n    traces:\n      processors: [kafka_thing]\n",
            false,
        ),
        (
            "a batch max below its size",
            "processors:\n  batch: {send_batch_size: 100, send_batch_max_size: 10}\n",
            false,
        ),
        ("an unknown batch setting", "processors:\n  batch: {sendbatchsize: 10}\n", false),
        ("a pipeline with no receiver", "service:\n  pipelines:\n    logs:\n      receivers: []\n", false),
        ("an extension not configured", "service:\n  extensions: [health_check, pprof]\n", false),
        ("a memory limiter with no limit", "processors:\n  memory_limiter: {limit_percentage: 0}\n", false),
    ];
    for (what, override_, valid) in cases {
        let stack = format!(
            "apiVersion: flowtel.dev/v1alpha1\nkind: TelemetryStack\nmetadata: {{name: s, namespace: ns}}\nspec:\n  collector:\n    configOverride: |\n{}",
            override_.lines().map(|l| format!("      {l}\n")).collect::<String>()
        );
        let (flowtel_ok, _, stderr) = render(&stack, true);
        let (rendered_ok, rendered, _) = render(&stack, false);
        assert!(rendered_ok, "{what}: render without --check prints the objects");
        let config = collector_config(&rendered).expect("collector config");
        let (otelcol_ok, message) = otelcol_validate(&config);
        assert_eq!(otelcol_ok, valid, "{what}: otelcol validate: {message}");
        assert_eq!(flowtel_ok, valid, "{what}: flowtel render --check: {stderr}");
        if !valid {
            assert!(stderr.contains("spec.collector.configOverride"), "{what}: names the field: {stderr}");
        }
    }
}
