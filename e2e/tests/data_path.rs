//! The data path end to end, with real components on loopback: a WorkflowRun on the real control plane, the
//! operator exporting its run telemetry, a workflow binary run with exactly the environment flowtel put into the
//! run's Job, the real collector running the configuration flowtel's own TelemetryStack builder generates (its
//! exporters pointed at local backends), and what lands queried back from Prometheus (metrics), Jaeger v2 (traces,
//! standing in for Tempo) and VictoriaLogs (logs, standing in for Loki).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunPhase;
use flowtel_e2e::backends::{self, RunTrace, prometheus_query, sum};
use flowtel_e2e::sync_runs::job_container_env;
use flowtel_e2e::{
    Collector, Operator, TEST_MANAGER, TestNamespace, client, eventually, flowtel_binary, http_get, install_crds,
    simple_run, with_query,
};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const DURATION_LE: [f64; 11] = [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// A workspace binary beside the test (cargo builds the workflows for their own integration test).
fn workspace_binary(name: &str) -> PathBuf {
    let flowtel = flowtel_binary().expect("flowtel binary");
    flowtel.with_file_name(name)
}

#[tokio::test]
async fn a_workflow_run_lands_in_prometheus_jaeger_and_victorialogs_joined_to_its_trace() {
    let backends = backends::start("data-path", 1).await;
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "data-path").await.expect("namespace");
    // The operator's default endpoint is another real collector; the runs name the team's TelemetryStack, whose
    // collector (external to the cluster here) feeds the backends: everything of a run must land there, and nothing
    // at the default.
    let default_collector = Collector::start("data-path-default").await.expect("the default collector");
    let _operator = Operator::start(&ns.name, &default_collector.endpoint, &[]).await.expect("operator");
    let endpoint = format!("http://127.0.0.1:{}", backends.collector_grpc[0]);
    backends::external_stack(&client, &ns.name, "team", &endpoint).await;
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);

    // Two runs of `sync` (rate() needs two samples), each workflow process run with its Job's environment.
    let mut trace_ids = Vec::new();
    for name in ["sync-1", "sync-2"] {
        let mut run = simple_run(name, "sync", "2s");
        run["spec"]["telemetryStackRef"] = json!({"name": "team"});
        runs.patch(name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await.expect("run");
        let job_name = format!("{name}-1");
        let job = eventually("the run's Job", WAIT, async || jobs.get_opt(&job_name).await.ok().flatten()).await;
        let env = job_environment(&job, &format!("{job_name}-pod"));
        let output = Command::new(workspace_binary("sync"))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("WORKFLOW_ITEMS", "3")
            .env("WORKFLOW_STEP_MS", "5")
            .env("WORKFLOW_FLAKY_PERCENT", "40")
            .env("WORKFLOW_SEED", if name == "sync-1" { "1" } else { "11" })
            .output()
            .expect("the sync workflow");
        assert!(output.status.success(), "sync: {}", String::from_utf8_lossy(&output.stderr));
        let done = |r: Option<&WorkflowRun>| {
            r.and_then(|r| r.status.as_ref()).is_some_and(|s| {
                s.phase == Some(WorkflowRunPhase::Succeeded) && s.telemetry.as_ref().is_some_and(|t| t.finished)
            })
        };
        let run = tokio::time::timeout(WAIT, await_condition(runs.clone(), name, done)).await.expect("run done");
        let trace_id = run.expect("watch").and_then(|r| r.status?.trace_id).expect("status.traceId");
        assert!(env.iter().any(|(k, v)| k == "TRACEPARENT" && v.contains(&trace_id)), "the Job names the run's trace");
        trace_ids.push(trace_id);
        // The stack's collector forwards each series' total once per interval: the next run waits until this
        // one's count is stored, so that the two land in two samples (rate() needs two).
        backends::await_run_total(&backends.prometheus, "sync", trace_ids.len() as f64, WAIT).await;
    }
    let prom = backends.prometheus.as_str();

    // Run-level metrics from the operator, counted once per run; the workflow (under flowtel) counted none.
    let total = eventually("workflow_run_total for both runs", WAIT, async || {
        let r = prometheus_query(prom, "sum(workflow_run_total{workflow_name=\"sync\"})").await;
        (sum(&r) >= 2.0).then(|| sum(&r))
    })
    .await;
    assert_eq!(total, 2.0, "each run counted once");
    let status =
        sum(&prometheus_query(prom, "sum(workflow_run_status{workflow_name=\"sync\",status=\"success\"})").await);
    assert_eq!(status, 2.0);

    // The ten metrics, with their labels.
    let expected: [(&str, &[&str]); 10] = [
        ("workflow_run_total", &["workflow_name"]),
        ("workflow_run_duration_ms_bucket", &["workflow_name", "le"]),
        ("workflow_run_status", &["workflow_name", "status"]),
        ("workflow_step_duration_ms_bucket", &["workflow_name", "step_name", "le"]),
        ("workflow_step_status", &["workflow_name", "step_name", "status"]),
        ("workflow_retry_count", &["workflow_name", "step_name"]),
        ("workflow_image_uploaded", &["workflow_name"]),
        ("workflow_image_size_bytes_bucket", &["workflow_name", "le"]),
        ("workflow_db_upsert", &["workflow_name", "table_name"]),
        ("workflow_db_upsert_duration_ms_bucket", &["workflow_name", "table_name", "le"]),
    ];
    for (metric, labels) in expected {
        let series = eventually(&format!("{metric} in Prometheus"), WAIT, async || {
            let r = prometheus_query(prom, &format!("{metric}{{workflow_name=\"sync\"}}")).await;
            (!r.is_empty()).then_some(r)
        })
        .await;
        for s in &series {
            let metric_labels = s["metric"].as_object().expect("labels");
            for label in labels {
                assert!(metric_labels.contains_key(*label), "{metric} lacks {label}: {s}");
            }
        }
    }
    // Exactly the user's bucket boundaries.
    for metric in
        ["workflow_run_duration_ms_bucket", "workflow_step_duration_ms_bucket", "workflow_db_upsert_duration_ms_bucket"]
    {
        let series = prometheus_query(prom, &format!("{metric}{{workflow_name=\"sync\"}}")).await;
        let le: BTreeSet<String> =
            series.iter().filter_map(|s| s["metric"]["le"].as_str().map(str::to_string)).collect();
        let mut expected: BTreeSet<String> = DURATION_LE.iter().map(|b| b.to_string()).collect();
        expected.insert("+Inf".into());
        let normalised: BTreeSet<String> = le
            .iter()
            .map(|l| if l == "+Inf" { l.clone() } else { l.parse::<f64>().map(|f| f.to_string()).unwrap_or_default() })
            .collect();
        assert_eq!(normalised, expected, "{metric} boundaries");
    }

    // Jaeger: the run's trace holds the operator's run and attempt spans and the workflow's spans beneath.
    for trace_id in &trace_ids {
        let trace = RunTrace::fetch(&backends.jaeger_query, trace_id, "sync", WAIT).await;
        trace.assert_run_attempt_workflow_steps("sync");
        assert_eq!(trace.steps().len(), 4, "fetch_source, transform, upsert_phones, upload_images");
        let instrumented = trace.span("transform_phones");
        let transform = trace.span("step transform");
        assert_eq!(RunTrace::parent_of(instrumented), transform["spanID"].as_str(), "#[instrument] under its step");
    }

    // VictoriaLogs: the workflow's log records carry the run's trace id.
    for trace_id in &trace_ids {
        let url = with_query(
            &format!("{}/select/logsql/query", backends.victorialogs),
            &[("query", &format!("trace_id:{trace_id}"))],
        );
        // VictoriaLogs makes records searchable batch by batch, so wait for the one looked for, not for any.
        let started =
            eventually(&format!("\"workflow started\" of trace {trace_id} in VictoriaLogs"), WAIT, async || {
                let (code, body) = http_get(&url).await?;
                let lines: Vec<Value> = body.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
                let started =
                    lines.into_iter().find(|l| l["_msg"].as_str().is_some_and(|m| m.contains("workflow started")));
                if code == 200 { started } else { None }
            })
            .await;
        assert_eq!(started["trace_id"].as_str(), Some(trace_id.as_str()), "{started:?}");
    }

    // Every query of the built-in dashboard returns data from this Prometheus.
    let dashboard_stack = backends.dir.join("dashboard-stack.yaml");
    std::fs::write(
        &dashboard_stack,
        "apiVersion: flowtel.dev/v1alpha1\nkind: TelemetryStack\nmetadata: {name: d, namespace: n}\nspec: {}\n",
    )
    .expect("write");
    let out = Command::new(flowtel_binary().expect("flowtel"))
        .args(["render", "-f"])
        .arg(&dashboard_stack)
        .output()
        .expect("render");
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    let dashboard: Value = serde_yaml_ng::Deserializer::from_str(&rendered)
        .find_map(|doc| {
            let v = <Value as serde::Deserialize>::deserialize(doc).ok()?;
            serde_json::from_str(v["data"]["workflow-runs.json"].as_str()?).ok()
        })
        .expect("the dashboard");
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr").replace("$__rate_interval", "10m");
            eventually(&format!("data for {} ({expr})", panel["title"]), WAIT, async || {
                (!prometheus_query(prom, &expr).await.is_empty()).then_some(())
            })
            .await;
            checked += 1;
        }
    }
    assert_eq!(checked, 13, "every dashboard query");

    // Everything above arrived through the team's stack; the default endpoint received nothing of these runs.
    for signal in ["traces", "metrics", "logs"] {
        assert!(default_collector.documents(signal).is_empty(), "{signal} reached the operator's default endpoint");
    }
}

/// The Job's container environment as its pod's process sees it (the kubelet's resolution, as the agent does it).
fn job_environment(job: &k8s_openapi::api::batch::v1::Job, pod_name: &str) -> Vec<(String, String)> {
    let namespace = job.metadata.namespace.clone().unwrap_or_default();
    flowtel::pool::agent::resolve_env(&job_container_env(job), pod_name, "kwok-node-0", &namespace)
}
