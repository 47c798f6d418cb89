//! Pooled execution on the real control plane: WorkflowRuns naming a WorkerPool, executed by worker agents (real
//! `flowtel worker` processes, standing in for the pool's pods, which KWOK only simulates) that the operator's
//! dispatcher hands attempts to. The telemetry of a pooled run is a Job run's (the data-path test's checks), and
//! its faults end as a Job's would: a worker killed mid-run is a disruption retried on another worker, a hanging
//! process ends at the deadline and is killed, and what the pool does not allow never runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use flowtel_crds::workflow_run::{AttemptClassification, WorkflowRunPhase};
use flowtel_crds::{WorkerPool, WorkflowRun};
use flowtel_e2e::backends::{self, RunTrace, WORKFLOW_METRICS, prometheus_query, sum};
use flowtel_e2e::{
    Collector, Operator, Process, TEST_MANAGER, TestNamespace, client, eventually, flowtel_binary, free_port,
    install_crds, service_account_token,
};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// A worker agent as a pool's pod would run it (a pod's processes die with it: `kill_tree`).
fn worker(dispatch: &str, pool: &str, name: &str, token: &Path, command: &[&str], env: &[(&str, &str)]) -> Process {
    let child = Command::new(flowtel_binary().expect("flowtel"))
        .args(["worker", "--dispatch-url", dispatch, "--pool", pool, "--pod-name", name, "--node-name", "kwok-node-0"])
        .arg("--token-file")
        .arg(token)
        .arg("--")
        .args(command)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(std::env::temp_dir().join(format!("flowtel-worker-{name}.log"))).expect("log"))
        .spawn()
        .expect("the worker agent");
    Process { child }
}

/// Kills a worker and everything it started, as a pod's deletion with no grace would.
fn kill_pod(worker: &Process) {
    let tree = flowtel_e2e::process::process_tree(worker.child.id());
    assert!(tree.len() > 1, "the worker runs its attempt: {tree:?}");
    flowtel_e2e::process::kill_tree(worker.child.id());
}

/// Live processes whose environment holds `var` (`NAME=value`): what is left of a run's attempt.
fn processes_with_env(var: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == var.as_bytes()))
        })
        .collect()
}

async fn apply(client: &kube::Client, ns: &str, object: Value) {
    let name = object["metadata"]["name"].as_str().expect("name").to_string();
    match object["kind"].as_str() {
        Some("WorkerPool") => {
            let api: Api<WorkerPool> = Api::namespaced(client.clone(), ns);
            api.patch(&name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&object)).await.expect("pool");
        }
        _ => {
            let api: Api<WorkflowRun> = Api::namespaced(client.clone(), ns);
            api.patch(&name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&object)).await.expect("run");
        }
    }
}

fn pool(name: &str, command: &[&str], allowed_env: &[&str]) -> Value {
    json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": name},
        "spec": {
            "template": {"spec": {"containers": [{"name": "main", "image": "registry.example/sync:1.0", "command": command}]}},
            "allowedEnv": allowed_env,
            "replicas": {"min": 2, "max": 2}
        }
    })
}

fn pooled_run(name: &str, workflow: &str, pool: &str, env: &[(&str, &str)]) -> Value {
    let env: Vec<Value> = env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect();
    json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
        "spec": {"workflowName": workflow, "pool": {"name": pool, "env": env}, "retry": {"limit": 1, "backoff": {"baseSeconds": 0}}}
    })
}

async fn finished(runs: &Api<WorkflowRun>, name: &str) -> WorkflowRun {
    eventually(&format!("run {name} finished"), WAIT, async || {
        let run = runs.get_opt(name).await.ok().flatten()?;
        let status = run.status.as_ref()?;
        let done = matches!(status.phase, Some(WorkflowRunPhase::Succeeded | WorkflowRunPhase::Failed));
        done.then_some(run)
    })
    .await
}

fn workspace_binary(name: &str) -> PathBuf {
    flowtel_binary().expect("flowtel").with_file_name(name)
}

#[tokio::test]
async fn a_pooled_run_lands_the_same_trace_and_the_ten_metrics_as_a_job_run() {
    let backends = backends::start("pooled-data-path", 1).await;
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "pooled-data").await.expect("namespace");
    let default_collector = Collector::start("pooled-data-default").await.expect("the default collector");
    let dispatch_port = free_port();
    let dispatch_addr = format!("127.0.0.1:{dispatch_port}");
    let _operator = Operator::start(&ns.name, &default_collector.endpoint, &["--dispatch-addr", &dispatch_addr])
        .await
        .expect("operator");
    let endpoint = format!("http://127.0.0.1:{}", backends.collector_grpc[0]);
    backends::external_stack(&client, &ns.name, "team", &endpoint).await;
    let sync = workspace_binary("sync");
    let sync = sync.to_str().expect("path");
    apply(&client, &ns.name, pool("sync", &[sync], &["WORKFLOW_SEED"])).await;
    // The pool container's own environment, which every run's process inherits.
    let pool_env = [("WORKFLOW_ITEMS", "3"), ("WORKFLOW_STEP_MS", "5"), ("WORKFLOW_FLAKY_PERCENT", "40")];
    let url = format!("http://{dispatch_addr}");
    let pool_key = format!("{}/sync", ns.name);
    let token = service_account_token(&ns.name, "default").await;
    let _workers = [
        worker(&url, &pool_key, "sync-w-a", &token, &[sync], &pool_env),
        worker(&url, &pool_key, "sync-w-b", &token, &[sync], &pool_env),
    ];

    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let mut trace_ids = Vec::new();
    for (name, seed) in [("sync-1", "1"), ("sync-2", "11")] {
        let mut run = pooled_run(name, "sync", "sync", &[("WORKFLOW_SEED", seed)]);
        run["spec"]["telemetryStackRef"] = json!({"name": "team"});
        apply(&client, &ns.name, run).await;
        let run = finished(&runs, name).await;
        let status = run.status.expect("status");
        assert_eq!(status.phase, Some(WorkflowRunPhase::Succeeded), "{status:?}");
        let attempt = &status.attempts[0];
        assert!(attempt.pod_name.as_deref().is_some_and(|p| p.starts_with("sync-w-")), "run by a worker: {attempt:?}");
        trace_ids.push(status.trace_id.expect("traceId"));
        backends::await_run_total(&backends.prometheus, "sync", trace_ids.len() as f64, WAIT).await;
    }
    let prom = backends.prometheus.as_str();
    let total = sum(&prometheus_query(prom, "sum(workflow_run_total{workflow_name=\"sync\"})").await);
    assert_eq!(total, 2.0, "each run counted once");
    for metric in WORKFLOW_METRICS {
        eventually(&format!("{metric} in Prometheus"), WAIT, async || {
            let r = prometheus_query(prom, &format!("{metric}{{workflow_name=\"sync\"}}")).await;
            (!r.is_empty()).then_some(())
        })
        .await;
    }
    for trace_id in &trace_ids {
        RunTrace::fetch(&backends.jaeger_query, trace_id, "sync", WAIT).await.assert_run_attempt_workflow_steps("sync");
    }
    for signal in ["traces", "metrics", "logs"] {
        assert!(default_collector.documents(signal).is_empty(), "{signal} reached the operator's default endpoint");
    }
}

/// The marks the pool's command leaves, one line per process: its TRACEPARENT, worker and pid.
fn marks(file: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines().map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
}

#[tokio::test]
async fn pooled_faults_end_as_a_jobs_would_and_refused_runs_never_execute() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, "pooled-faults").await.expect("namespace");
    let collector = Collector::start("pooled-faults").await.expect("collector");
    let dispatch_addr = format!("127.0.0.1:{}", free_port());
    let _operator =
        Operator::start(&ns.name, &collector.endpoint, &["--dispatch-addr", &dispatch_addr]).await.expect("operator");
    let dir = std::env::temp_dir().join(format!("flowtel-pooled-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let marks_file = dir.join("marks");
    _ = std::fs::remove_file(&marks_file);
    let script = "echo \"$RUN $TRACEPARENT $OTEL_RESOURCE_ATTRIBUTES_POD_NAME $$\" >> \"$MARKS\"; sleep \"${SLEEP:-0}\"; exit \"${EXIT:-0}\"";
    let command = ["/bin/sh", "-c", script];
    apply(&client, &ns.name, pool("shell", &command, &["RUN", "SLEEP", "EXIT"])).await;
    let url = format!("http://{dispatch_addr}");
    let pool_key = format!("{}/shell", ns.name);
    let env = [("MARKS", marks_file.to_str().expect("path"))];
    let token = service_account_token(&ns.name, "default").await;
    let worker_a = worker(&url, &pool_key, "shell-w-a", &token, &command, &env);
    let worker_b = worker(&url, &pool_key, "shell-w-b", &token, &command, &env);
    // A pod of another identity in the pool's namespace, and one with no token, are never served a run.
    flowtel_e2e::run(flowtel_e2e::kubectl().args(["create", "serviceaccount", "intruder", "-n", &ns.name]))
        .expect("sa");
    let intruder_token = service_account_token(&ns.name, "intruder").await;
    let _intruder = worker(&url, &pool_key, "shell-w-intruder", &intruder_token, &command, &env);
    let _anonymous = worker(&url, &pool_key, "shell-w-anonymous", Path::new("/nonexistent"), &command, &env);
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);

    // What the pool does not allow, or a pool that does not exist: refused, naming the field; nothing runs.
    apply(&client, &ns.name, pooled_run("not-allowed", "shell", "shell", &[("PATH", "/evil")])).await;
    apply(&client, &ns.name, pooled_run("no-pool", "shell", "missing", &[])).await;
    for (name, reason, field) in
        [("not-allowed", "NotAllowedByPool", "spec.pool.env[0].name"), ("no-pool", "PoolNotFound", "spec.pool.name")]
    {
        let status = finished(&runs, name).await.status.expect("status");
        assert_eq!(status.phase, Some(WorkflowRunPhase::Failed));
        let condition = status.conditions.iter().find(|c| c.type_ == "Succeeded").expect("Succeeded");
        assert_eq!(condition.reason, reason);
        assert!(condition.message.starts_with(field), "{}", condition.message);
    }

    // An exit code classifies as a Job's: 3 is transient, retried once, and the retry succeeds... or fails again.
    apply(&client, &ns.name, pooled_run("exits-3", "shell", "shell", &[("RUN", "exits-3"), ("EXIT", "3")])).await;
    let status = finished(&runs, "exits-3").await.status.expect("status");
    assert_eq!(status.phase, Some(WorkflowRunPhase::Failed));
    let exits: Vec<Option<i32>> = status.attempts.iter().map(|a| a.exit_code).collect();
    assert_eq!(exits, [Some(3), Some(3)], "two attempts, each exit 3");
    assert_eq!(
        status.conditions.iter().find(|c| c.type_ == "Succeeded").map(|c| c.reason.as_str()),
        Some("RetryLimitExceeded")
    );

    // A worker killed mid-run: the attempt is a disruption, run again on the other worker, outside the retry budget.
    apply(&client, &ns.name, pooled_run("killed", "shell", "shell", &[("RUN", "killed"), ("SLEEP", "6")])).await;
    let first = eventually("the run's process started", WAIT, async || {
        marks(&marks_file).into_iter().find(|m| m[0] == "killed")
    })
    .await;
    let victim = if first[2] == "shell-w-a" { &worker_a } else { &worker_b };
    kill_pod(victim);
    let status = finished(&runs, "killed").await.status.expect("status");
    assert_eq!(status.phase, Some(WorkflowRunPhase::Succeeded), "{status:?}");
    let classes: Vec<Option<AttemptClassification>> = status.attempts.iter().map(|a| a.classification).collect();
    assert_eq!(classes, [Some(AttemptClassification::Disruption), Some(AttemptClassification::Succeeded)]);
    assert_eq!(status.disruptions, Some(1));
    let executions: Vec<Vec<String>> = marks(&marks_file).into_iter().filter(|m| m[0] == "killed").collect();
    assert_eq!(executions.len(), 2, "executed once per attempt: {executions:?}");
    assert_ne!(executions[0][1], executions[1][1], "each attempt its own span: {executions:?}");
    assert_ne!(executions[0][2], executions[1][2], "the retry ran on the other worker");

    // A process that hangs: the deadline ends the run and the process.
    let mut hang = pooled_run("hangs", "shell", "shell", &[("RUN", "hangs"), ("SLEEP", "600")]);
    hang["spec"]["activeDeadlineSeconds"] = json!(5);
    apply(&client, &ns.name, hang).await;
    let status = finished(&runs, "hangs").await.status.expect("status");
    assert_eq!(
        status.conditions.iter().find(|c| c.type_ == "Succeeded").map(|c| c.reason.as_str()),
        Some("DeadlineExceeded")
    );
    let hung = marks(&marks_file).into_iter().find(|m| m[0] == "hangs").expect("it ran");
    let proc = PathBuf::from(format!("/proc/{}", hung[3]));
    eventually("the hanging process killed", Duration::from_secs(30), async || (!proc.exists()).then_some(())).await;
    // And what it started (the shell's `sleep`): nothing of the run outlives it on the worker.
    eventually("nothing of the hanging run left", Duration::from_secs(30), async || {
        processes_with_env("RUN=hangs").is_empty().then_some(())
    })
    .await;

    // The pool's status: its size, and its queue (empty now, every run over).
    let pools: Api<WorkerPool> = Api::namespaced(client.clone(), &ns.name);
    eventually("the pool's status with its size and an empty queue", WAIT, async || {
        let s = pools.get_opt("shell").await.ok().flatten()?.status?;
        (s.replicas == Some(2) && s.queued == Some(0) && s.busy == Some(0)).then_some(())
    })
    .await;

    // Refused runs never executed, and only the pool's own identity executed any.
    let all = marks(&marks_file);
    assert!(all.iter().all(|m| m[0] == "exits-3" || m[0] == "killed" || m[0] == "hangs"), "{all:?}");
    assert!(all.iter().all(|m| m[2] == "shell-w-a" || m[2] == "shell-w-b"), "{all:?}");
}

/// The operator killed while pooled runs execute and wait, their starts written (as they are once
/// `--running-status-delay` has passed): the running ones are adopted from their workers' reports, the queued ones
/// (recorded, never started) are declared lost after the fence and run as their next attempt. Every run succeeds,
/// each executed exactly once.
#[tokio::test]
async fn the_operator_killed_mid_run_neither_loses_a_pooled_run_nor_runs_one_twice() {
    operator_killed_mid_run("pooled-kill", "0s", true).await;
}

/// The same kill before any start is written (within `--running-status-delay`, where a short run's start and end go
/// in one write): the new leader hands out no unwritten attempt of a run it found at its start. It adopts the running
/// ones from their workers' reports; the queued ones, which the old leader may have handed out to a worker that died
/// with it, are lost after the fence and run as their next attempt, never as the same one again.
#[tokio::test]
async fn the_operator_killed_before_the_starts_are_written_neither_loses_a_pooled_run_nor_runs_one_twice() {
    operator_killed_mid_run("pooled-kill-unwritten", "1m", false).await;
}

/// Six runs on two workers (two running, four queued), the operator SIGKILLed and restarted once their starts are
/// written (`written`) or before any is: each run succeeds, executed once, with at most one disruption.
async fn operator_killed_mid_run(tag: &str, running_status_delay: &str, written: bool) {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    let ns = TestNamespace::new(&client, tag).await.expect("namespace");
    let collector = Collector::start(tag).await.expect("collector");
    let dispatch_addr = format!("127.0.0.1:{}", free_port());
    let extra = ["--dispatch-addr", &dispatch_addr, "--running-status-delay", running_status_delay];
    let mut operator = Operator::start(&ns.name, &collector.endpoint, &extra).await.expect("operator");
    let dir = std::env::temp_dir().join(format!("flowtel-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let marks_file = dir.join("marks");
    _ = std::fs::remove_file(&marks_file);
    let script = "echo \"$RUN $TRACEPARENT $OTEL_RESOURCE_ATTRIBUTES_POD_NAME $$\" >> \"$MARKS\"; sleep 3";
    let command = ["/bin/sh", "-c", script];
    apply(&client, &ns.name, pool("shell", &command, &["RUN"])).await;
    let url = format!("http://{dispatch_addr}");
    let pool_key = format!("{}/shell", ns.name);
    let env = [("MARKS", marks_file.to_str().expect("path"))];
    let token = service_account_token(&ns.name, "default").await;
    let _workers = [
        worker(&url, &pool_key, "shell-w-a", &token, &command, &env),
        worker(&url, &pool_key, "shell-w-b", &token, &command, &env),
    ];
    let names: Vec<String> = (0..6).map(|i| format!("run-{i}")).collect();
    for name in &names {
        apply(&client, &ns.name, pooled_run(name, "shell", "shell", &[("RUN", name)])).await;
    }
    // Two running (two workers), four queued: then the crash, once the starts are written (or, with the long
    // delay, while none is).
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let written = if written { names.len() } else { 0 };
    eventually("two runs executing and the starts written as expected", WAIT, async || {
        let started = marks(&marks_file).len();
        let list = runs.list(&Default::default()).await.ok()?.items;
        let recorded = list.iter().filter(|r| r.status.as_ref().is_some_and(|s| !s.attempts.is_empty())).count();
        (started == 2 && recorded == written).then_some(())
    })
    .await;
    operator.kill();
    operator.restart().await.expect("the operator again");

    for name in &names {
        let status = finished(&runs, name).await.status.expect("status");
        assert_eq!(status.phase, Some(WorkflowRunPhase::Succeeded), "{name}: {status:?}");
        let executions: Vec<Vec<String>> = marks(&marks_file).into_iter().filter(|m| m[0] == *name).collect();
        assert_eq!(executions.len(), 1, "{name} executed once: {executions:?}, {:?}", status.attempts);
        // The attempt that ran is the one that succeeded: its span is the one the process was given.
        let succeeded = status.attempts.last().expect("attempt");
        assert_eq!(succeeded.classification, Some(AttemptClassification::Succeeded));
        let uid = runs.get(name).await.expect("run").metadata.uid.expect("uid");
        let traceparent = flowtel::runtime::ids::traceparent(&uid, succeeded.number);
        assert_eq!(executions[0][1], traceparent, "{name}: the succeeded attempt is the one that executed");
        let disrupted =
            status.attempts.iter().filter(|a| a.classification == Some(AttemptClassification::Disruption)).count();
        assert!(disrupted <= 1, "{name}: at most the attempt queued at the crash is lost: {status:?}");
    }
}
