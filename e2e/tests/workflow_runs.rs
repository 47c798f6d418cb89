//! The WorkflowRun controller end to end: the operator as its own process against the real control plane (KWOK
//! simulates the pods), exporting over loopback gRPC to the real OpenTelemetry Collector, whose file output the
//! tests read. Tests assert outcomes, never durations.

use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::{AttemptClassification, WorkflowRunPhase};
use flowtel_e2e::{Collector, Operator, TEST_MANAGER, TestNamespace, attribute, client, eventually, install_crds};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

struct Env {
    client: kube::Client,
    ns: TestNamespace,
    collector: Collector,
    operator: Operator,
}

impl Env {
    async fn new(test: &str, extra: &[&str]) -> Self {
        let client = client().await.expect("client");
        install_crds(&client).await.expect("CRDs");
        let ns = TestNamespace::new(&client, test).await.expect("namespace");
        let collector = Collector::start(test).await.expect("collector");
        let operator = Operator::start(&ns.name, &collector.endpoint, extra).await.expect("operator");
        Self { client, ns, collector, operator }
    }

    fn runs(&self) -> Api<WorkflowRun> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    async fn submit(&self, run: Value) -> WorkflowRun {
        let name = run["metadata"]["name"].as_str().unwrap_or_default().to_string();
        self.runs().patch(&name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await.expect("run submitted")
    }

    /// Waits until the run satisfies `done`; panics with the run's status otherwise.
    async fn wait(&self, name: &str, what: &str, done: impl Fn(&WorkflowRun) -> bool) -> WorkflowRun {
        let cond = move |r: Option<&WorkflowRun>| r.is_some_and(&done);
        match tokio::time::timeout(WAIT, await_condition(self.runs(), name, cond)).await {
            Ok(Ok(Some(run))) => run,
            other => {
                let current = self.runs().get_opt(name).await.ok().flatten().and_then(|r| r.status);
                panic!(
                    "run {name}: {what} did not happen: {other:?}\nstatus: {current:#?}\noperator log: {}",
                    self.operator.log.display()
                )
            }
        }
    }

    async fn wait_exported(&self, name: &str) -> WorkflowRun {
        self.wait(name, "terminal telemetry exported", |r| {
            r.status.as_ref().and_then(|s| s.telemetry.as_ref()).is_some_and(|t| t.finished)
        })
        .await
    }

    async fn jobs_of(&self, run: &str) -> Vec<Job> {
        let lp = ListParams::default().labels(&format!("flowtel.dev/run={run}"));
        self.jobs().list(&lp).await.expect("list jobs").items
    }

    /// The latest point of a metric, waiting (bounded) for the collector's file output to show it.
    async fn point(&self, name: &str, attrs: &[(&str, &str)]) -> Option<(Value, Value)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let found = self.collector.latest_point(name, attrs);
            if found.is_some() || tokio::time::Instant::now() > deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Spans of one trace, waiting (bounded) until at least `count` arrived.
    async fn spans(&self, trace_id: &str, count: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let spans: Vec<Value> = self.collector.spans().into_iter().filter(|s| s["traceId"] == trace_id).collect();
            if spans.len() >= count || tokio::time::Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A run from the one builder; `extra_spec` (JSON) overrides spec fields, for the inputs a typed spec cannot hold.
fn run_json(name: &str, workflow: &str, labels: Value, annotations: Value, extra_spec: Value) -> Value {
    let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let mut run = flowtel_e2e::RunBuilder::new(name, workflow).image("registry.example/app:2.1");
    for (k, v) in labels.as_object().into_iter().flatten() {
        run = run.label(k, &text(v));
    }
    for (k, v) in annotations.as_object().into_iter().flatten() {
        run = run.annotation(k, &text(v));
    }
    let mut run = run.json();
    if let (Some(spec), Some(extra)) = (run["spec"].as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    run
}

fn phase(r: &WorkflowRun) -> Option<WorkflowRunPhase> {
    r.status.as_ref().and_then(|s| s.phase)
}

fn condition_reason(r: &WorkflowRun, type_: &str) -> Option<String> {
    r.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).map(|c| c.reason.clone())
}

fn condition_message(r: &WorkflowRun, type_: &str) -> String {
    let condition = r.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
    condition.map(|c| c.message.clone()).unwrap_or_default()
}

fn env_of(job: &Job) -> Vec<(String, Option<String>)> {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect()
}

fn env_value(env: &[(String, Option<String>)], name: &str) -> Option<String> {
    env.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.clone())
}

fn counter_value(point: &Value) -> i64 {
    point["asInt"].as_str().and_then(|s| s.parse().ok()).unwrap_or_default()
}

#[tokio::test]
async fn a_successful_run_injects_otel_and_reports_spans_and_metrics() {
    // Its start recorded before its Job (`--running-status-delay 0`): the write per run the default saves is here.
    let env = Env::new("wfr-success", &["--running-status-delay", "0s"]).await;
    let mut run = run_json("ok", "wf-success", json!({}), json!({"sim.flowtel.dev/duration": "1s"}), json!({}));
    // The user's own variables: one wins over flowtel's, one is merged key by key.
    run["spec"]["template"]["spec"]["containers"][0]["env"] = json!([
        {"name": "MODE", "value": "full"},
        {"name": "OTEL_PROPAGATORS", "value": "tracecontext"},
        {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "team=data,workflow.name=user-value"}
    ]);
    let submitted = env.submit(run).await;
    let uid = submitted.metadata.uid.clone().unwrap_or_default();
    let done = env.wait_exported("ok").await;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Succeeded));
    assert_eq!(condition_reason(&done, "Succeeded").as_deref(), Some("Succeeded"));
    assert_eq!(status.attempt_count, Some(1));
    assert_eq!(status.observed_generation, done.metadata.generation);
    let trace_id = status.trace_id.clone().expect("traceId");

    // The Job: one per attempt, labelled, owned, with the environment injected.
    let jobs = env.jobs_of("ok").await;
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job.metadata.name.as_deref(), Some("ok-1"));
    let labels = job.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("app.kubernetes.io/managed-by").map(String::as_str), Some("flowtel"));
    assert_eq!(labels.get("flowtel.dev/workflow").map(String::as_str), Some("wf-success"));
    assert_eq!(labels.get("flowtel.dev/attempt").map(String::as_str), Some("1"));
    assert_eq!(job.spec.as_ref().and_then(|s| s.backoff_limit), Some(0));
    let owner = job.metadata.owner_references.clone().unwrap_or_default();
    assert!(owner.iter().any(|o| o.uid == uid && o.controller == Some(true)));
    let job_env = env_of(job);
    assert_eq!(env_value(&job_env, "MODE").as_deref(), Some("full"));
    assert_eq!(env_value(&job_env, "OTEL_SERVICE_NAME").as_deref(), Some("wf-success"));
    assert_eq!(env_value(&job_env, "OTEL_PROPAGATORS").as_deref(), Some("tracecontext"), "the user's value wins");
    assert_eq!(env_value(&job_env, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(), Some(env.collector.endpoint.as_str()));
    let attrs = env_value(&job_env, "OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    assert!(attrs.starts_with("team=data,workflow.name=user-value,"), "{attrs}");
    assert!(attrs.contains(&format!("workflow.run_id={uid}")), "{attrs}");
    assert!(attrs.contains("k8s.pod.name=$(OTEL_RESOURCE_ATTRIBUTES_POD_NAME)"), "{attrs}");
    assert_eq!(job_env.last().map(|(n, _)| n.as_str()), Some("OTEL_RESOURCE_ATTRIBUTES"));
    let traceparent = env_value(&job_env, "TRACEPARENT").unwrap_or_default();
    assert!(traceparent.starts_with(&format!("00-{trace_id}-")), "{traceparent}");

    // Spans: one workflow.run, one attempt child whose id is the workload's TRACEPARENT parent.
    let spans = env.spans(&trace_id, 2).await;
    let run_spans: Vec<&Value> = spans.iter().filter(|s| s["name"] == "workflow.run").collect();
    assert_eq!(run_spans.len(), 1, "{spans:#?}");
    let run_span = run_spans[0];
    assert_eq!(attribute(run_span, "workflow.run_id").as_deref(), Some(uid.as_str()));
    let attempt = spans.iter().find(|s| s["name"] == "workflow.attempt").expect("attempt span");
    assert_eq!(attempt["parentSpanId"], run_span["spanId"]);
    assert_eq!(attribute(attempt, "workflow.attempt").as_deref(), Some("1"));
    assert!(traceparent.contains(attempt["spanId"].as_str().unwrap_or("?")), "TRACEPARENT names the attempt span");
    // Span times are the times status recorded, not the time of export.
    let start_ns = status.start_time.map(|t| t.0.as_nanosecond()).unwrap_or_default();
    assert_eq!(run_span["startTimeUnixNano"].as_str().and_then(|s| s.parse::<i128>().ok()), Some(start_ns));

    // Metrics: names, labels and bucket boundaries exactly as the user's spec.
    let (_, total) = env.point("workflow.run.total", &[("workflow_name", "wf-success")]).await.expect("run.total");
    assert_eq!(counter_value(&total), 1);
    let (_, st) = env
        .point("workflow.run.status", &[("workflow_name", "wf-success"), ("status", "success")])
        .await
        .expect("run.status");
    assert_eq!(counter_value(&st), 1);
    let (metric, hist) =
        env.point("workflow.run.duration_ms", &[("workflow_name", "wf-success")]).await.expect("duration");
    assert_eq!(metric["unit"], "ms");
    let bounds: Vec<f64> = hist["explicitBounds"].as_array().into_iter().flatten().filter_map(Value::as_f64).collect();
    assert_eq!(bounds, [5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0]);
    assert_eq!(hist["count"], "1");

    // What the run cost the apiserver, creation to exported telemetry: the finalizer, the attempt recorded, its
    // Job, and one terminal write that records the export too; no Event (Normal Events are opt-in).
    let writes = settled_operator_writes(&env.ns.name).await;
    let expected = [("create jobs", 1), ("patch workflowruns", 1), ("patch workflowruns/status", 2)];
    let expected: Vec<(String, u64)> = expected.iter().map(|(w, n)| (w.to_string(), *n)).collect();
    assert_eq!(writes, expected, "4 writes for a successful run");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &env.ns.name);
    let events = events.list(&ListParams::default()).await.expect("events").items;
    assert!(events.iter().all(|e| e.reporting_controller.as_deref() != Some("flowtel")), "no Event: {events:#?}");
}

/// The chart's MutatingAdmissionPolicy, rendered for one watched namespace: the telemetry finalizer is on each run as
/// it is created there (and nowhere else); and a run that ends within `--running-status-delay` has its start and
/// end recorded in one status write: 2 writes per successful run.
#[tokio::test]
async fn with_the_charts_finalizer_policy_and_a_short_run_a_run_costs_2_writes() {
    let env = Env::new("wfr-admitted-finalizer", &["--running-status-delay", "1m"]).await;
    let release = format!("fin-{}", &env.ns.name[env.ns.name.len().saturating_sub(5)..]);
    let set = format!("operator.otlpEndpoint={},watchNamespace={}", env.collector.endpoint, env.ns.name);
    let file = flowtel_e2e::apply_chart_template(&release, &set, "templates/telemetry-finalizer-policy.yaml")
        .expect("the policy");
    let finalizers = |r: &WorkflowRun| r.metadata.finalizers.clone().unwrap_or_default();
    // In force once a dry-run create comes back with the finalizer (policies reach admission asynchronously).
    let probe = json!({"apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "probe"},
        "spec": {"workflowName": "wf-probe", "template": {"spec": {"containers": [{"name": "main", "image": "app"}]}}}});
    let probe: WorkflowRun = serde_json::from_value(probe).expect("probe");
    let dry_run = kube::api::PostParams { dry_run: true, ..Default::default() };
    eventually("the policy in force", WAIT, async || {
        let created = env.runs().create(&dry_run, &probe).await.ok()?;
        finalizers(&created).contains(&"flowtel.dev/telemetry".to_string()).then_some(())
    })
    .await;
    // Another namespace is not this operator's: its runs are created as they are.
    let elsewhere = TestNamespace::new(&env.client, "wfr-no-finalizer").await.expect("namespace");
    let other: Api<WorkflowRun> = Api::namespaced(env.client.clone(), &elsewhere.name);
    assert_eq!(finalizers(&other.create(&dry_run, &probe).await.expect("dry run")), Vec::<String>::new());

    let run = run_json("admitted", "wf-admitted", json!({}), json!({"sim.flowtel.dev/duration": "1s"}), json!({}));
    let submitted = env.submit(run).await;
    assert_eq!(finalizers(&submitted), ["flowtel.dev/telemetry"], "added at creation");
    let done = env.wait_exported("admitted").await;
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Succeeded));
    let writes = settled_operator_writes(&env.ns.name).await;
    let expected: Vec<(String, u64)> =
        [("create jobs", 1), ("patch workflowruns/status", 1)].iter().map(|(w, n)| (w.to_string(), *n)).collect();
    assert_eq!(writes, expected, "2 writes: no finalizer patch, start and end in one status write");
    // The attempt, recorded after its Job, starts when the Job says it did, and so does the run.
    let status = done.status.clone().unwrap_or_default();
    let job = env.jobs().get("admitted-1").await.expect("the attempt's Job");
    let started = job.metadata.annotations.unwrap_or_default().get("flowtel.dev/started-at").cloned();
    let recorded = status.attempts.first().and_then(|a| a.start_time.as_ref()).map(|t| t.0.to_string());
    assert_eq!(recorded, started);
    assert_eq!(status.start_time.map(|t| t.0.to_string()), started);
    assert_eq!(status.attempt_count, Some(1));
    // Deleted, the run goes: its report is out, so the operator lets go of the finalizer it did not add.
    env.runs().delete("admitted", &Default::default()).await.expect("delete");
    eventually("the run gone", WAIT, async || env.runs().get_opt("admitted").await.ok()?.is_none().then_some(())).await;
    flowtel_e2e::run(flowtel_e2e::kubectl().args(["delete", "--ignore-not-found", "-f"]).arg(&file)).expect("removed");
}

#[tokio::test]
async fn a_transient_failure_is_retried_after_backoff_and_counted() {
    let env = Env::new("wfr-transient", &[]).await;
    let run = run_json(
        "flaky",
        "wf-transient",
        json!({"sim.flowtel.dev/outcome": "fail-once"}),
        json!({"sim.flowtel.dev/exit-code": "3"}),
        json!({"retry": {"limit": 2, "backoff": {"baseSeconds": 1, "factor": 2, "maxSeconds": 10}}}),
    );
    env.submit(run).await;
    let retrying = env.wait("flaky", "Retrying", |r| phase(r) == Some(WorkflowRunPhase::Retrying)).await;
    assert!(retrying.status.as_ref().and_then(|s| s.next_attempt_time.as_ref()).is_some());
    let done = env.wait_exported("flaky").await;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Succeeded));
    assert_eq!(status.attempt_count, Some(2));
    assert_eq!(status.attempts[0].classification, Some(AttemptClassification::Transient));
    assert_eq!(status.attempts[0].exit_code, Some(3));
    assert_eq!(env.jobs_of("flaky").await.len(), 2, "exactly one Job per attempt");
    let (_, retries) = env
        .point("workflow.retry.count", &[("workflow_name", "wf-transient"), ("step_name", "main")])
        .await
        .expect("retry.count");
    assert_eq!(counter_value(&retries), 1);
    let spans = env.spans(status.trace_id.as_deref().unwrap_or_default(), 3).await;
    assert_eq!(spans.iter().filter(|s| s["name"] == "workflow.attempt").count(), 2);
    let failed = spans.iter().find(|s| attribute(s, "workflow.attempt").as_deref() == Some("1")).expect("attempt 1");
    assert_eq!(failed["events"][0]["name"], "attempt.failed");
}

#[tokio::test]
async fn a_permanent_failure_is_not_retried() {
    let env = Env::new("wfr-permanent", &[]).await;
    let run = run_json(
        "broken",
        "wf-permanent",
        json!({"sim.flowtel.dev/outcome": "fail"}),
        json!({"sim.flowtel.dev/exit-code": "42"}),
        json!({"retry": {"limit": 3, "permanentExitCodes": [42]}}),
    );
    env.submit(run).await;
    let done = env.wait_exported("broken").await;
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Failed));
    assert_eq!(condition_reason(&done, "Succeeded").as_deref(), Some("PermanentFailure"));
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(status.attempt_count, Some(1));
    assert_eq!(status.attempts[0].classification, Some(AttemptClassification::Permanent));
    assert_eq!(env.jobs_of("broken").await.len(), 1);
    let (_, st) = env
        .point("workflow.run.status", &[("workflow_name", "wf-permanent"), ("status", "failure")])
        .await
        .expect("run.status failure");
    assert_eq!(counter_value(&st), 1);
}

#[tokio::test]
async fn a_disruption_gets_a_new_attempt_without_using_the_budget() {
    let env = Env::new("wfr-disruption", &[]).await;
    let run = run_json(
        "evicted",
        "wf-disruption",
        json!({"sim.flowtel.dev/outcome": "disrupt-once"}),
        json!({}),
        json!({"retry": {"limit": 0}}),
    );
    env.submit(run).await;
    let done = env.wait_exported("evicted").await;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Succeeded), "{status:#?}");
    assert_eq!(status.attempt_count, Some(2));
    assert_eq!(status.attempts[0].classification, Some(AttemptClassification::Disruption));
    assert_eq!(status.disruptions, Some(1));
    assert_eq!(status.transient_failures, Some(0));
    // The run's terminal metrics reached the collector (they go in the same export as a retry count would)...
    let (_, st) = env
        .point("workflow.run.status", &[("workflow_name", "wf-disruption"), ("status", "success")])
        .await
        .expect("run.status");
    assert_eq!(counter_value(&st), 1);
    // ...and no retry came with them.
    assert!(
        env.collector.latest_point("workflow.retry.count", &[("workflow_name", "wf-disruption")]).is_none(),
        "a disruption is not a retry"
    );
}

#[tokio::test]
async fn the_deadline_ends_a_run_that_runs_too_long() {
    let env = Env::new("wfr-deadline", &[]).await;
    let run = run_json(
        "slow",
        "wf-deadline",
        json!({}),
        json!({"sim.flowtel.dev/duration": "1h"}),
        json!({"activeDeadlineSeconds": 3}),
    );
    env.submit(run).await;
    let done = env.wait_exported("slow").await;
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Failed));
    assert_eq!(condition_reason(&done, "Succeeded").as_deref(), Some("DeadlineExceeded"));
}

#[tokio::test]
async fn cancel_stops_the_active_job_and_ends_the_run_cancelled() {
    let env = Env::new("wfr-cancel", &[]).await;
    let run = run_json("long", "wf-cancel", json!({}), json!({"sim.flowtel.dev/duration": "1h"}), json!({}));
    env.submit(run).await;
    env.wait("long", "Running", |r| phase(r) == Some(WorkflowRunPhase::Running)).await;
    let patch = json!({"spec": {"cancel": true}});
    env.runs().patch("long", &PatchParams::default(), &Patch::Merge(&patch)).await.expect("cancel");
    let done = env.wait_exported("long").await;
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Failed));
    assert_eq!(condition_reason(&done, "Succeeded").as_deref(), Some("Cancelled"));
    let jobs = Api::<Job>::namespaced(env.client.clone(), &env.ns.name);
    let gone =
        await_condition(jobs, "long-1", |j: Option<&Job>| j.is_none_or(|j| j.metadata.deletion_timestamp.is_some()));
    tokio::time::timeout(WAIT, gone).await.expect("active Job deleted").expect("watch");
    let (_, st) = env
        .point("workflow.run.status", &[("workflow_name", "wf-cancel"), ("status", "cancelled")])
        .await
        .expect("run.status cancelled");
    assert_eq!(counter_value(&st), 1);
}

#[tokio::test]
async fn ttl_deletes_the_run_only_after_its_telemetry_was_exported() {
    let env = Env::new("wfr-ttl", &[]).await;
    let run = run_json("brief", "wf-ttl", json!({}), json!({}), json!({"ttlSecondsAfterFinished": 1}));
    let submitted = env.submit(run).await;
    let uid = submitted.metadata.uid.clone().unwrap_or_default();
    let gone = await_condition(env.runs(), "brief", kube::runtime::conditions::is_deleted(&uid));
    tokio::time::timeout(WAIT, gone).await.expect("run deleted by its TTL").expect("watch");
    let spans: Vec<Value> = env
        .collector
        .spans()
        .into_iter()
        .filter(|s| s["name"] == "workflow.run" && attribute(s, "workflow.run_id").as_deref() == Some(uid.as_str()))
        .collect();
    assert_eq!(spans.len(), 1, "the run's span was exported before the run went");
}

#[tokio::test]
async fn a_collector_that_never_answers_does_not_hold_runs_up() {
    // Accepts connections and never answers: the worst kind of endpoint.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let _hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten().take(64) {
            held.push(s);
        }
    });
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "wfr-blackhole").await.expect("namespace");
    let operator =
        Operator::start(&ns.name, &endpoint, &["--export-timeout-seconds", "1", "--export-drop-seconds", "4"])
            .await
            .expect("operator");
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let run = run_json("unheard", "wf-blackhole", json!({}), json!({}), json!({}));
    runs.patch("unheard", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await.expect("submit");
    let finished = await_condition(runs.clone(), "unheard", |r: Option<&WorkflowRun>| {
        r.and_then(|r| r.status.as_ref()?.telemetry.as_ref()).is_some_and(|t| t.finished)
    });
    let done = tokio::time::timeout(WAIT, finished).await.expect("run finished").expect("watch").expect("run");
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Succeeded), "the workload is never stopped by telemetry");
    assert!(done.status.as_ref().and_then(|s| s.telemetry.as_ref()).is_some_and(|t| t.dropped));
    assert_eq!(condition_reason(&done, "TelemetryDegraded").as_deref(), Some("TelemetryDropped"));
    assert!(operator.counter("flowtel_telemetry_export_failures_total").await.unwrap_or_default() >= 1);
    assert!(operator.counter("flowtel_telemetry_dropped_total").await.unwrap_or_default() >= 1);
}

#[tokio::test]
async fn an_operator_killed_during_backoff_resumes_without_duplicates() {
    let mut env = Env::new("wfr-restart", &[]).await;
    let run = run_json(
        "resumed",
        "wf-restart",
        json!({"sim.flowtel.dev/outcome": "fail-once"}),
        json!({}),
        json!({"retry": {"limit": 1, "backoff": {"baseSeconds": 4, "factor": 1, "maxSeconds": 4}}}),
    );
    env.submit(run).await;
    env.wait("resumed", "Retrying", |r| phase(r) == Some(WorkflowRunPhase::Retrying)).await;
    env.operator.kill();
    env.operator.restart().await.expect("operator restarted");
    let done = env.wait_exported("resumed").await;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Succeeded));
    assert_eq!(env.jobs_of("resumed").await.len(), 2, "exactly one Job per attempt");
    let spans = env.spans(status.trace_id.as_deref().unwrap_or_default(), 3).await;
    assert_eq!(spans.iter().filter(|s| s["name"] == "workflow.run").count(), 1, "one workflow.run span per run");
    assert_eq!(spans.iter().filter(|s| s["name"] == "workflow.attempt").count(), 2);
}

#[tokio::test]
async fn a_burst_of_200_runs_all_end_and_each_is_counted_once() {
    let env = Env::new("wfr-burst", &["--concurrency", "32"]).await;
    flowtel_e2e::burst(&env.client, &env.ns.name, "wf-burst", 200, Duration::from_secs(600)).await.expect("burst");
    let runs = env.runs().list(&ListParams::default()).await.expect("list").items;
    assert_eq!(runs.len(), 200);
    assert!(runs.iter().all(|r| phase(r) == Some(WorkflowRunPhase::Succeeded)));
    // Delta points, one per export batch: what they add up to, held through a quiet period.
    for metric in ["workflow.run.total", "workflow.run.status"] {
        eventually(&format!("{metric} for all 200 runs"), Duration::from_secs(30), async || {
            (env.collector.total_across_processes(metric, "wf-burst") >= 200).then_some(())
        })
        .await;
        hold_equal(metric, 200, || env.collector.total_across_processes(metric, "wf-burst")).await;
    }
    let run_ids: std::collections::BTreeSet<String> = runs.iter().filter_map(|r| r.metadata.uid.clone()).collect();
    let spans: Vec<Value> = env
        .collector
        .spans()
        .into_iter()
        .filter(|s| s["name"] == "workflow.run")
        .filter(|s| attribute(s, "workflow.run_id").is_some_and(|id| run_ids.contains(&id)))
        .collect();
    assert_eq!(spans.len(), 200, "exactly one workflow.run span per run");
}

#[tokio::test]
async fn bad_references_and_rejected_templates_are_reported_never_lost() {
    let env = Env::new("wfr-bad-input", &[]).await;
    // A TelemetryStack that does not exist: the run waits for it, Pending, naming the stack, with no Job, rather than
    // sending its telemetry anywhere else.
    let run =
        run_json("no-stack", "wf-bad-input", json!({}), json!({}), json!({"telemetryStackRef": {"name": "missing"}}));
    env.submit(run).await;
    let waiting = |r: Option<&WorkflowRun>| {
        r.and_then(|r| r.status.as_ref()).is_some_and(|s| {
            s.phase == Some(WorkflowRunPhase::Pending)
                && s.conditions.iter().any(|c| c.type_ == "Succeeded" && c.reason == "TelemetryStackNotFound")
        })
    };
    let waits = tokio::time::timeout(WAIT, await_condition(env.runs(), "no-stack", waiting))
        .await
        .expect("the run waits for its stack")
        .expect("watch")
        .expect("the run");
    let message = condition_message(&waits, "Succeeded");
    assert!(message.contains("spec.telemetryStackRef") && message.contains("missing"), "{message}");
    assert_eq!(condition_reason(&waits, "TelemetryDegraded").as_deref(), Some("TelemetryStackNotFound"));

    // A template the apiserver rejects as a Job (a container name that is not a DNS label): the run fails once,
    // naming the reason, instead of retrying forever.
    let mut run = run_json("bad-template", "wf-bad-input", json!({}), json!({}), json!({}));
    run["spec"]["template"]["spec"]["containers"][0]["name"] = json!("Not_A_DNS_Label");
    env.submit(run).await;
    let done = env.wait_exported("bad-template").await;
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Failed));
    assert_eq!(condition_reason(&done, "Succeeded").as_deref(), Some("JobRejected"));
    let message = condition_message(&done, "Succeeded");
    assert!(message.contains("spec.template"), "{message}");
    assert!(env.jobs_of("bad-template").await.is_empty());
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &env.ns.name);
    let warnings = events.list(&ListParams::default()).await.expect("events").items;
    let warned = |reason: &str| {
        warnings.iter().any(|e| e.reason.as_deref() == Some(reason) && e.type_.as_deref() == Some("Warning"))
    };
    assert!(warned("JobRejected"));
    assert!(warned("TelemetryDegraded"), "a missing TelemetryStack is a Warning event too");
    // Still waiting after the other run went its whole way: no Job, no attempt.
    assert!(env.jobs_of("no-stack").await.is_empty());
    let still = env.runs().get("no-stack").await.expect("run");
    assert_eq!(phase(&still), Some(WorkflowRunPhase::Pending));
    assert!(still.status.as_ref().is_some_and(|s| s.attempts.is_empty()));
}

#[tokio::test]
async fn a_restarted_operator_does_not_write_to_finished_runs() {
    let mut env = Env::new("wfr-idle-restart", &[]).await;
    env.submit(run_json("finished", "wf-idle", json!({}), json!({}), json!({}))).await;
    let done = env.wait_exported("finished").await;
    let version = done.metadata.resource_version.clone();
    env.operator.restart().await.expect("restart");
    // Once the new process has reconciled the run, its resourceVersion must not have moved.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.operator.counter("flowtel_reconciles_total").await.unwrap_or_default() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the restarted operator never reconciled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = env.runs().get("finished").await.expect("run");
    assert_eq!(after.metadata.resource_version, version);
    assert_eq!(env.operator.counter("flowtel_status_writes_total").await, Some(0));
}

/// A duplicate export would follow within this: a restarted operator re-exports within milliseconds of its
/// first reconcile, and the collector writes its file every 100 ms.
const QUIET: Duration = Duration::from_secs(3);

/// Asserts that `value()` equals `expected` now and keeps equal through a quiet period.
async fn hold_equal<T: PartialEq + std::fmt::Debug>(what: &str, expected: T, value: impl Fn() -> T) {
    let until = tokio::time::Instant::now() + QUIET;
    while tokio::time::Instant::now() < until {
        assert_eq!(value(), expected, "{what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_crash_at_any_named_point_never_double_counts() {
    // `after-export`: the report went out and the process died before the status recorded it; the export journal
    // (as the chart configures it, on an emptyDir that outlives the process) keeps the restarted one from sending it
    // again.
    // `after-job-create` twice: with the attempt recorded before its Job (delay 0), and with the Job alone (the
    // restarted process takes the attempt from it).
    let points = [
        ("after-job-create", "0s"),
        ("after-job-create", "1m"),
        ("after-export", "3s"),
        ("after-terminal-status", "3s"),
        ("during-backoff", "3s"),
    ];
    for (point, delay) in points {
        let client = client().await.expect("client");
        install_crds(&client).await.expect("CRDs");
        let ns = TestNamespace::new(&client, &format!("wfr-crash-{point}-{delay}")).await.expect("namespace");
        let collector = Collector::start(&format!("crash-{point}-{delay}")).await.expect("collector");
        let journal = std::env::temp_dir().join(format!("flowtel-journal-{}", ns.name));
        let journal = journal.display().to_string();
        let extra = ["--export-journal", journal.as_str(), "--running-status-delay", delay];
        let what = format!("{point}, running status delay {delay}");
        let mut operator =
            Operator::start_with_env(&ns.name, Some(&collector.endpoint), &extra, &[("FLOWTEL_CRASH_AT", point)])
                .await
                .expect("operator");
        let workflow = format!("wf-crash-{point}-{delay}");
        let labels =
            if point == "during-backoff" { json!({"sim.flowtel.dev/outcome": "fail-once"}) } else { json!({}) };
        let run = run_json(
            "crashy",
            &workflow,
            labels,
            json!({}),
            json!({"retry": {"limit": 1, "backoff": {"baseSeconds": 2, "factor": 1, "maxSeconds": 2}}}),
        );
        let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
        runs.patch("crashy", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await.expect("submit");
        assert!(operator.wait_exit(WAIT).await, "{what}: the operator did not reach its crash point");
        operator.restart().await.expect("restart");
        let finished = await_condition(runs.clone(), "crashy", |r: Option<&WorkflowRun>| {
            r.and_then(|r| r.status.as_ref()?.telemetry.as_ref()).is_some_and(|t| t.finished)
        });
        let done = tokio::time::timeout(WAIT, finished).await.expect("finished").expect("watch").expect("run");
        assert_eq!(phase(&done), Some(WorkflowRunPhase::Succeeded), "{what}");
        let status = done.status.clone().unwrap_or_default();
        let attempts = status.attempt_count.unwrap_or_default();
        let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
        let job_count = jobs.list(&ListParams::default()).await.expect("jobs").items.len();
        assert_eq!(job_count, usize::try_from(attempts).unwrap_or_default(), "{what}: one Job per attempt");
        let trace_id = status.trace_id.clone().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let run_spans = loop {
            let n =
                collector.spans().iter().filter(|s| s["traceId"] == trace_id && s["name"] == "workflow.run").count();
            if n >= 1 || tokio::time::Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(run_spans, 1, "{what}: one workflow.run span");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while collector.total_across_processes("workflow.run.status", &workflow) < 1 {
            assert!(tokio::time::Instant::now() < deadline, "{what}: workflow.run.status never arrived");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        hold_equal(&format!("{what}: counted once"), 1, || {
            collector.total_across_processes("workflow.run.status", &workflow)
        })
        .await;
        assert_eq!(collector.total_across_processes("workflow.run.total", &workflow), 1, "{what}: started once");
    }
}

#[tokio::test]
async fn deleting_a_running_run_ends_it_cancelled_and_reports_it_before_it_goes() {
    let env = Env::new("wfr-delete", &[]).await;
    let submitted = env
        .submit(run_json("doomed", "wf-delete", json!({}), json!({"sim.flowtel.dev/duration": "1h"}), json!({})))
        .await;
    let uid = submitted.metadata.uid.clone().unwrap_or_default();
    env.wait("doomed", "Running", |r| phase(r) == Some(WorkflowRunPhase::Running)).await;
    env.runs().delete("doomed", &kube::api::DeleteParams::default()).await.expect("delete");
    let gone = await_condition(env.runs(), "doomed", kube::runtime::conditions::is_deleted(&uid));
    tokio::time::timeout(WAIT, gone).await.expect("run deleted").expect("watch");
    let (_, st) = env
        .point("workflow.run.status", &[("workflow_name", "wf-delete"), ("status", "cancelled")])
        .await
        .expect("the deleted run was reported, as cancelled");
    assert_eq!(counter_value(&st), 1);
}

fn exported(r: &WorkflowRun) -> bool {
    r.status.as_ref().and_then(|s| s.telemetry.as_ref()).is_some_and(|t| t.finished)
}

/// The operator's writes in the namespace, once the audit log stopped growing for a quiet period.
async fn settled_operator_writes(namespace: &str) -> Vec<(String, u64)> {
    let mut last = flowtel_e2e::operator_writes(namespace);
    let mut since = tokio::time::Instant::now();
    while since.elapsed() < QUIET {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = flowtel_e2e::operator_writes(namespace);
        if now != last {
            last = now;
            since = tokio::time::Instant::now();
        }
    }
    last
}

#[tokio::test]
/// The counts a kill can never break: nothing lost, no Job twice, one span id per run. A kill may count again the
/// runs whose report was exported in the milliseconds before it and not yet recorded (their number depends on
/// where the kill lands: `e2e/chaos` measures it); the named crash points, outside that window, count exactly once.
async fn an_operator_killed_during_a_burst_loses_no_run_and_creates_no_job_twice() {
    const RUNS: usize = 60;
    const KILLS: usize = 3;
    let mut env = Env::new("wfr-kills", &["--concurrency", "32"]).await;
    for i in 0..RUNS {
        env.submit(flowtel_e2e::simple_run(&format!("k-{i}"), "wf-kills", "1s")).await;
    }
    // Kills at three points of the burst: while runs start, while they run, while they finish.
    for (kill, wanted) in [(1, RUNS / 6), (2, RUNS / 2), (3, RUNS * 5 / 6)] {
        eventually(&format!("{wanted} runs started before kill {kill}"), WAIT, async || {
            let runs = env.runs().list(&ListParams::default()).await.ok()?.items;
            let started = runs.iter().filter(|r| r.status.as_ref().is_some_and(|s| s.start_time.is_some())).count();
            (started >= wanted).then_some(())
        })
        .await;
        env.operator.kill();
        env.operator.restart().await.expect("operator restarted");
    }
    let runs = eventually("every run terminal and exported", Duration::from_secs(300), async || {
        let runs = env.runs().list(&ListParams::default()).await.ok()?.items;
        (runs.len() == RUNS && runs.iter().all(exported)).then_some(runs)
    })
    .await;
    assert!(runs.iter().all(|r| phase(r) == Some(WorkflowRunPhase::Succeeded)));
    let jobs = env.jobs().list(&ListParams::default()).await.expect("jobs").items;
    assert_eq!(jobs.len(), RUNS, "one Job per run: none created twice");
    // Both counters reached the collector for every run: nothing lost.
    for metric in ["workflow.run.status", "workflow.run.total"] {
        let total = eventually(&format!("{metric} for every run"), Duration::from_secs(30), async || {
            let n = env.collector.total_across_processes(metric, "wf-kills");
            (n >= RUNS as i64).then_some(n)
        })
        .await;
        println!("{metric}: {total} for {RUNS} runs and {KILLS} kills");
    }
    let uids: std::collections::BTreeSet<String> = runs.iter().filter_map(|r| r.metadata.uid.clone()).collect();
    let span_ids: std::collections::BTreeSet<(String, String)> = env
        .collector
        .spans()
        .into_iter()
        .filter(|s| s["name"] == "workflow.run")
        .filter_map(|s| Some((attribute(&s, "workflow.run_id")?, s["spanId"].as_str()?.to_string())))
        .filter(|(uid, _)| uids.contains(uid))
        .collect();
    assert_eq!(span_ids.len(), RUNS, "one workflow.run span id per run");
}

#[tokio::test]
async fn a_collector_outage_adds_no_writes_and_flips_telemetry_degraded_once() {
    const RUNS: usize = 10;
    // Nothing listens there: every export is refused at once.
    let endpoint = format!("http://127.0.0.1:{}", flowtel_e2e::free_port());
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "wfr-outage").await.expect("namespace");
    let operator = Operator::start(&ns.name, &endpoint, &["--export-drop-seconds", "6"]).await.expect("operator");
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    for i in 0..RUNS {
        let run = flowtel_e2e::simple_run(&format!("o-{i}"), "wf-outage", "1s");
        runs.patch(&format!("o-{i}"), &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await.expect("submit");
    }
    let done = eventually("every run terminal, its telemetry dropped", Duration::from_secs(120), async || {
        let list = runs.list(&ListParams::default()).await.ok()?.items;
        (list.len() == RUNS && list.iter().all(exported)).then_some(list)
    })
    .await;
    for r in &done {
        assert_eq!(phase(r), Some(WorkflowRunPhase::Succeeded), "telemetry never holds a run up");
        assert!(r.status.as_ref().and_then(|s| s.telemetry.as_ref()).is_some_and(|t| t.dropped));
        assert_eq!(condition_reason(r, "TelemetryDegraded").as_deref(), Some("TelemetryDropped"));
    }
    let writes = settled_operator_writes(&ns.name).await;
    let total: u64 = writes.iter().map(|(_, n)| n).sum();
    assert!(total <= 5 * RUNS as u64, "{total} operator writes for {RUNS} runs: {writes:?}");
    // One Warning per run: the condition flipped once and stayed degraded.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns.name);
    let events = events.list(&ListParams::default()).await.expect("events").items;
    for r in &done {
        let name = r.metadata.name.clone().unwrap_or_default();
        let degraded: Vec<_> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("TelemetryDegraded"))
            .filter(|e| e.regarding.as_ref().and_then(|o| o.name.as_deref()) == Some(name.as_str()))
            .collect();
        assert_eq!(degraded.len(), 1, "{name}: {degraded:#?}");
        assert!(degraded[0].series.is_none(), "{name}: repeated: {:?}", degraded[0].series);
    }
    assert!(operator.counter("flowtel_telemetry_dropped_total").await.unwrap_or_default() >= RUNS as u64);
}

#[tokio::test]
async fn without_an_endpoint_runs_say_so_once_and_hold_no_finalizer() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "wfr-no-endpoint").await.expect("namespace");
    let _operator = Operator::start_with_env(&ns.name, None, &[], &[]).await.expect("operator");
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let run = run_json("quiet", "wf-no-endpoint", json!({}), json!({}), json!({"ttlSecondsAfterFinished": 3}));
    let created = runs.patch("quiet", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await.expect("submit");
    let uid = created.metadata.uid.clone().unwrap_or_default();
    let done = await_condition(runs.clone(), "quiet", |r: Option<&WorkflowRun>| {
        r.is_some_and(|r| r.status.as_ref().and_then(|s| s.completion_time.as_ref()).is_some())
    });
    let done = tokio::time::timeout(WAIT, done).await.expect("run finished").expect("watch").expect("run");
    assert_eq!(phase(&done), Some(WorkflowRunPhase::Succeeded));
    assert_eq!(condition_reason(&done, "TelemetryDegraded").as_deref(), Some("NoOtlpEndpoint"));
    assert!(done.metadata.finalizers.as_deref().unwrap_or_default().is_empty(), "no finalizer is held");
    // The TTL does not wait for telemetry that is never exported.
    let gone = await_condition(runs, "quiet", kube::runtime::conditions::is_deleted(&uid));
    tokio::time::timeout(WAIT, gone).await.expect("run deleted by its TTL").expect("watch");
    let writes = settled_operator_writes(&ns.name).await;
    assert!(!writes.iter().any(|(what, _)| what == "patch workflowruns"), "no finalizer patch: {writes:?}");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns.name);
    let events = events.list(&ListParams::default()).await.expect("events").items;
    let said = events.iter().filter(|e| e.reason.as_deref() == Some("TelemetryDegraded")).count();
    assert_eq!(said, 1, "NoOtlpEndpoint is said once");
}

#[tokio::test]
async fn retry_and_disruption_limits_above_the_attempts_kept_are_enforced() {
    let env = Env::new("wfr-limits", &[]).await;
    let backoff = json!({"baseSeconds": 1, "factor": 1, "maxSeconds": 1});
    env.submit(run_json(
        "always-fails",
        "wf-limits",
        json!({"sim.flowtel.dev/outcome": "fail"}),
        json!({"sim.flowtel.dev/duration": "100ms"}),
        json!({"retry": {"limit": 40, "backoff": backoff}}),
    ))
    .await;
    env.submit(run_json(
        "always-evicted",
        "wf-limits",
        json!({"sim.flowtel.dev/outcome": "disrupt"}),
        json!({"sim.flowtel.dev/duration": "100ms"}),
        json!({"retry": {"limit": 0, "disruptionLimit": 40}}),
    ))
    .await;
    for (name, reason) in [("always-fails", "RetryLimitExceeded"), ("always-evicted", "DisruptionLimitExceeded")] {
        let done = tokio::time::timeout(Duration::from_secs(400), env.wait_exported(name)).await.expect(name);
        let status = done.status.clone().unwrap_or_default();
        assert_eq!(condition_reason(&done, "Succeeded").as_deref(), Some(reason), "{name}");
        assert_eq!(status.attempt_count, Some(41), "{name}: 40 retries, 41 attempts");
        assert_eq!(status.attempts.len(), 32, "{name}: status keeps the last 32");
        assert_eq!(env.jobs_of(name).await.len(), 41, "{name}: one Job per attempt");
    }
}

#[tokio::test]
async fn a_taken_admin_port_ends_the_operator_with_an_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let bin = flowtel_e2e::flowtel_binary().expect("operator binary");
    let run = tokio::process::Command::new(bin)
        .args(["run", "--namespace", "default", "--admin-addr", &addr])
        .env("KUBECONFIG", flowtel_e2e::cluster_kubeconfig())
        .output();
    let out = tokio::time::timeout(WAIT, run).await.expect("the operator exited").expect("ran");
    assert!(!out.status.success(), "exit status {}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen on") && stderr.contains(&addr), "{stderr}");
}

#[tokio::test]
async fn sigterm_stops_the_operator_cleanly() {
    let mut env = Env::new("wfr-sigterm", &[]).await;
    env.submit(run_json("last", "wf-sigterm", json!({}), json!({}), json!({}))).await;
    env.wait_exported("last").await;
    let status = env.operator.terminate(WAIT).await.expect("the operator exited on SIGTERM");
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(&env.operator.log).unwrap_or_default();
    assert!(log.contains("flowtel operator stopped"), "{log}");
}

#[tokio::test]
async fn runs_at_the_schemas_edges_end_with_a_reason_and_an_event_beside_a_healthy_run() {
    // Normal Events too: every run, the succeeded ones included, is named by an Event.
    let env = Env::new("wfr-edges", &["--normal-events"]).await;
    let plain = || run_json("x", "wf-edges", json!({}), json!({}), json!({}));
    // 50 containers, each given the injected environment.
    let mut many = plain();
    many["metadata"]["name"] = json!("fifty-containers");
    many["spec"]["template"]["spec"]["containers"] =
        (0..50).map(|i| json!({"name": format!("c{i}"), "image": "registry.example/app:2.1"})).collect();
    // A 512 KiB environment value: the run, its Job and its pod each carry it.
    let mut big = plain();
    big["metadata"]["name"] = json!("big-env");
    big["spec"]["template"]["spec"]["containers"][0]["env"] =
        json!([{"name": "BLOB", "value": "x".repeat(512 * 1024)}]);
    // A name at the length limit (253): the Job's name and labels are shortened, the Events still named.
    let long_name = format!("long-{}", "n".repeat(248));
    let mut long = plain();
    long["metadata"]["name"] = json!(long_name);
    // A template the Job API rejects (a container name that is not a DNS label).
    let mut rejected = plain();
    rejected["metadata"]["name"] = json!("rejected");
    rejected["spec"]["template"]["spec"]["containers"][0]["name"] = json!("Not_A_DNS_Label");
    let mut healthy = plain();
    healthy["metadata"]["name"] = json!("healthy");
    for run in [many, big, long, rejected, healthy] {
        env.submit(run).await;
    }
    let expected = [
        ("fifty-containers", "Succeeded"),
        ("big-env", "Succeeded"),
        (long_name.as_str(), "Succeeded"),
        ("rejected", "JobRejected"),
        ("healthy", "Succeeded"),
    ];
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), &env.ns.name);
    for (name, reason) in expected {
        let done = env.wait_exported(name).await;
        assert_eq!(condition_reason(&done, "Succeeded").as_deref(), Some(reason), "{name}");
        let what = format!("an Event about {name}");
        eventually(&what, Duration::from_secs(30), async || {
            let list = events.list(&ListParams::default()).await.ok()?.items;
            list.iter()
                .any(|e| e.regarding.as_ref().and_then(|o| o.name.as_deref()) == Some(name) && e.reason.is_some())
                .then_some(())
        })
        .await;
    }
    let long_jobs = env.jobs().list(&ListParams::default()).await.expect("jobs").items;
    assert!(long_jobs.iter().all(|j| j.metadata.name.as_ref().is_some_and(|n| n.len() <= 63)));
    assert_eq!(env.operator.get("/readyz").await.map(|(code, _)| code), Some(200), "still reconciling");
    let (_, metrics) = env.operator.get("/metrics").await.expect("/metrics");
    assert!(metrics.contains("flowtel_reconciles_total"), "{metrics}");
    assert!(!metrics.contains("flowtel_reconcile_errors_total{"), "no reconcile failed: {metrics}");
}
