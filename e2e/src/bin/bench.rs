//! The throughput bench (`e2e/bench`): flowtel side by side with bare Jobs on the local control plane, in one run.
//! Figures are printed and written as JSON, never asserted. Stages:
//!
//! 1. bare Jobs (the pod template flowtel's Jobs get, a 1 s simulated pod) offered open loop at rising rates; a rate
//!    is sustained when every Job completes and none waits more than `--max-lag` beyond its pod → the ceiling;
//! 2. WorkflowRuns at the same rates (to one step past the Jobs' ceiling), the operator (release build) exporting to
//!    the real collector, installed as the chart installs it with an endpoint (the telemetry finalizer added at
//!    admission) → sustained runs/s and the ratio;
//! 3. latency at flowtel's highest sustained rate, from the bench's own watches: run created → Job seen, pod
//!    terminal → run terminal;
//! 4. API cost from the audit log: the operator's requests per run by verb and resource (Events and GETs
//!    included: a GET is an uncached read), and every client's writes per run, flowtel vs bare Jobs;
//! 5. the operator's CPU per 1,000 runs and its RSS, then RSS with 10k and 50k finished runs retained, fitted;
//! 6. telemetry: spans and metric points per run at the collector, reports dropped;
//! 7. shards, 1 vs 2: one step at flowtel's highest sustained rate (or `--shard-rate`) with two operators
//!    (`--shard 0/2`, `--shard 1/2`), runs labelled flowtel.dev/shard alternately, beside stage 2's step at that rate;
//! 8. with `--floor R` only: the floor, the least any operator that keeps runs in a custom resource could cost. The
//!    bench itself, with no operator, creates each run and at once its Job (a copy of a Job stage 2's operator
//!    built: the injected environment, the owner reference) and writes the run's status once (a copy of a real
//!    terminal status, one merge patch) when it sees the pod end. The bench's own watches of runs, Jobs and pods stand
//!    in for an operator's. Rates of `--rates` from R up → the floor's ceiling, and its ratio to the bare Jobs'.
//!
//! ```text
//! e2e/bench [--rates 10,20,30,40,50,60,80] [--step-seconds 40] [--retained 10000,50000] [--shard-rate R]
//!           [--floor R] [--out target/bench.json]
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowtel_crds::WorkflowRun;
use flowtel_e2e::{Collector, Operator, TEST_MANAGER, TestNamespace, client, cluster_kubeconfig, install_crds};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

const POD_SECONDS: f64 = 1.0;
/// The bench stops by itself within 15 minutes: every stage checks this budget, and the cleanup has the rest.
const BUDGET: Duration = Duration::from_secs(12 * 60);
/// How long the cleanup waits for the operators to let the runs go before it removes the finalizers itself.
const CLEANUP: Duration = Duration::from_secs(60);

/// e2e/bench: bare Jobs, then WorkflowRuns with the same pod, at rising offered rates (see the header above).
#[derive(clap::Parser)]
#[command(name = "e2e/bench")]
struct Cli {
    /// Offered rates in runs per second, one step each, lowest first.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0])]
    rates: Vec<f64>,
    /// How long each rate is offered.
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..))]
    step_seconds: u64,
    /// A step keeps up when its last run ends within this lag of its offered time.
    #[arg(long, default_value_t = 5)]
    max_lag_seconds: u64,
    /// Runs kept in the cluster for the retained-objects stage, one stage each.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [10_000, 50_000])]
    retained: Vec<usize>,
    /// Also offer this rate to two operator shards.
    #[arg(long)]
    shard_rate: Option<f64>,
    /// Offer the floor (a run kept with no operator) from this rate up.
    #[arg(long = "floor")]
    floor_from: Option<f64>,
    /// Worker processes of the pooled stage (runs naming a WorkerPool, each a 1 s process on a warm worker); 0
    /// skips the stage.
    #[arg(long, default_value_t = 128)]
    pooled_workers: usize,
    /// Only the pooled stage (no bare-Job ceiling, so no ratio): for measuring a change to pooled execution.
    #[arg(long)]
    pooled_only: bool,
    /// Where the figures go, as JSON.
    #[arg(long, default_value = "target/bench.json")]
    out: std::path::PathBuf,
}

struct Args {
    rates: Vec<f64>,
    step: Duration,
    max_lag: Duration,
    retained: Vec<usize>,
    shard_rate: Option<f64>,
    floor_from: Option<f64>,
    pooled_workers: usize,
    pooled_only: bool,
    out: std::path::PathBuf,
}

/// The command line; a malformed or unknown flag ends the bench with clap's message naming it.
fn args() -> Args {
    let cli = <Cli as clap::Parser>::parse();
    if let Some(bad) =
        cli.rates.iter().chain(&cli.shard_rate).chain(&cli.floor_from).find(|r| !(r.is_finite() && **r > 0.0))
    {
        <Cli as clap::CommandFactory>::command()
            .error(clap::error::ErrorKind::ValueValidation, format!("a rate must be a positive number, got {bad}"))
            .exit();
    }
    Args {
        rates: cli.rates,
        step: Duration::from_secs(cli.step_seconds),
        max_lag: Duration::from_secs(cli.max_lag_seconds),
        retained: cli.retained,
        shard_rate: cli.shard_rate,
        floor_from: cli.floor_from,
        pooled_workers: cli.pooled_workers,
        pooled_only: cli.pooled_only,
        out: cli.out,
    }
}

/// When the bench saw each object's milestones (its own clock, from its own watches).
#[derive(Default)]
struct Timeline {
    created: HashMap<String, Instant>,
    job_seen: HashMap<String, Instant>,
    pod_done: HashMap<String, Instant>,
    done: HashMap<String, Instant>,
    failed_creates: usize,
    /// Pooled runs have no Job: their start is the attempt's, as status records it (when the leader dispatched it;
    /// a short run's start is written with its end).
    started_from_status: bool,
}

type Shared = Arc<Mutex<Timeline>>;

fn lock(t: &Shared) -> std::sync::MutexGuard<'_, Timeline> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

fn template(workflow: &str) -> Value {
    json!({
        "metadata": {"annotations": {"sim.flowtel.dev/duration": "1s"}, "labels": {"bench.flowtel.dev/workflow": workflow}},
        "spec": {"containers": [{"name": "main", "image": "registry.example/app:1.0"}]}
    })
}

fn bare_job(name: &str) -> Job {
    let mut pod = template("bare");
    pod["spec"]["restartPolicy"] = json!("Never");
    serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        // What flowtel's attempt Jobs set: no retries by the Job, the pod template as given.
        "spec": {"backoffLimit": 0, "template": pod}
    }))
    .expect("a valid Job")
}

fn workflow_run(name: &str) -> WorkflowRun {
    flowtel_e2e::RunBuilder::new(name, "bench").runs_for("1s").label("bench.flowtel.dev/workflow", "flowtel").build()
}

const SHARD_LABEL: &str = "flowtel.dev/shard";

/// What a step offers: bare Jobs, or WorkflowRuns spread over `shards` (labelled round robin when more than one), or
/// the floor: each run created together with its Job (`job`, shaped as flowtel's operator built it), both by the
/// bench, with no operator.
#[derive(Clone)]
enum Load {
    Jobs,
    Runs { shards: u32 },
    Floor { job: Arc<Job> },
    Pooled { pool: String },
}

/// Calls `seen` with every object of kind K in `ns` as the watch delivers it. A watch error (an apiserver hiccup) is
/// skipped, not the end: the backoff reconnects and the watch goes on.
fn on_each<K>(client: &kube::Client, ns: &str, mut seen: impl FnMut(K) + Send + 'static)
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    tokio::spawn(async move {
        let mut s = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
        while let Some(ev) = s.next().await {
            if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = ev {
                seen(o);
            }
        }
    });
}

/// The run an attempt-1 Job or its pod belongs to (flowtel names that Job `<run>-1`).
fn run_of(job_name: &str) -> String {
    job_name.strip_suffix("-1").unwrap_or(job_name).to_string()
}

/// What the floor's stand-in for an operator does when a run's pod has ended: the run's one status write.
type OnPodEnd = Arc<dyn Fn(String) + Send + Sync>;

/// Records Jobs (bare: their completion; flowtel: when each run's Job appeared), pods' ends and runs' ends; calls
/// `on_pod_end` with a run's name the first time its pod is seen ended.
fn watch_all(client: &kube::Client, ns: &str, timeline: &Shared, flowtel: bool, on_pod_end: Option<OnPodEnd>) {
    let t = timeline.clone();
    on_each(client, ns, move |j: Job| {
        let now = Instant::now();
        let name = j.metadata.name.clone().unwrap_or_default();
        let ended = j.status.as_ref().is_some_and(|s| s.succeeded.unwrap_or(0) > 0 || s.failed.unwrap_or(0) > 0);
        let mut t = lock(&t);
        if flowtel {
            t.job_seen.entry(run_of(&name)).or_insert(now);
        } else if ended {
            t.done.entry(name).or_insert(now);
        }
    });
    // Pods are watched in both stages, so that the bench's own load on the apiserver is the same for both.
    let t = timeline.clone();
    on_each(client, ns, move |p: Pod| {
        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            let job = p.metadata.labels.as_ref().and_then(|l| l.get("job-name")).cloned().unwrap_or_default();
            let run = run_of(&job);
            let first = match lock(&t).pod_done.entry(run.clone()) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Instant::now());
                    true
                }
                std::collections::hash_map::Entry::Occupied(_) => false,
            };
            if let Some(hook) = on_pod_end.as_ref().filter(|_| first) {
                hook(run);
            }
        }
    });
    if flowtel {
        let t = timeline.clone();
        on_each(client, ns, move |r: WorkflowRun| {
            let name = r.metadata.name.clone().unwrap_or_default();
            let mut t = lock(&t);
            let attempt_start = r.status.as_ref().and_then(|s| s.attempts.first()?.start_time.clone());
            if t.started_from_status
                && let Some(start) = attempt_start
            {
                // The wall clock's start on the monotonic clock the bench's create times are on.
                let now_ms = std::time::SystemTime::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_millis());
                let start_ms = u128::try_from(start.0.as_millisecond()).unwrap_or_default();
                let ago = Duration::from_millis(u64::try_from(now_ms.saturating_sub(start_ms)).unwrap_or_default());
                let at = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
                t.job_seen.entry(name.clone()).or_insert(at);
            }
            if r.status.as_ref().and_then(|s| s.completion_time.as_ref()).is_some() {
                t.done.entry(name).or_insert_with(Instant::now);
            }
        });
    }
}

/// Offers `rate` objects a second for `step`, open loop (a create never waits for an earlier one); returns names.
async fn offer(
    client: &kube::Client,
    ns: &str,
    prefix: &str,
    rate: f64,
    step: Duration,
    t: &Shared,
    load: &Load,
) -> Vec<String> {
    let count = (rate * step.as_secs_f64()).round() as usize;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut names = Vec::with_capacity(count);
    for i in 0..count {
        ticker.tick().await;
        let name = format!("{prefix}-{i}");
        lock(t).created.insert(name.clone(), Instant::now());
        names.push(name.clone());
        let (client, ns, t, load) = (client.clone(), ns.to_string(), t.clone(), load.clone());
        tokio::spawn(async move {
            let pp = PostParams { field_manager: Some(TEST_MANAGER.into()), ..PostParams::default() };
            let ok = match load {
                Load::Runs { shards } => {
                    let mut run = workflow_run(&name);
                    if shards > 1 {
                        run.metadata.labels = Some([(SHARD_LABEL.into(), (i as u32 % shards).to_string())].into());
                    }
                    Api::<WorkflowRun>::namespaced(client, &ns).create(&pp, &run).await.is_ok()
                }
                Load::Jobs => Api::<Job>::namespaced(client, &ns).create(&pp, &bare_job(&name)).await.is_ok(),
                Load::Floor { job } => floor_create(&client, &ns, &name, &job, &pp).await.is_some(),
                Load::Pooled { pool } => {
                    let mut run = workflow_run(&name);
                    run.spec.template = Arc::default();
                    run.spec.pool = Some(flowtel_crds::workflow_run::PoolRun { name: pool, args: vec![], env: vec![] });
                    Api::<WorkflowRun>::namespaced(client, &ns).create(&pp, &run).await.is_ok()
                }
            };
            if !ok {
                lock(&t).failed_creates += 1;
            }
        });
    }
    names
}

/// Pooled runs at rising rates: a WorkerPool whose command is a 1 s `sleep`, `a.pooled_workers` agents (host
/// processes standing in for its pods, which KWOK only simulates), the operator serving them; the ceiling against
/// bare Jobs', created → running (the attempt's start in status: the leader dispatching it) and the dispatcher's
/// wait for a worker, and every client's apiserver writes per run from the audit log.
async fn pooled_stage(
    client: &kube::Client,
    a: &Args,
    collector: &str,
    bare_ceiling: f64,
    deadline: Instant,
) -> Result<Value, Box<dyn std::error::Error>> {
    let ns = TestNamespace::new(client, "bench-pooled").await?;
    let policy = admit_with_finalizer(&ns.name, collector)?;
    finalizer_policy_in_force(client, &ns.name).await;
    let pool: flowtel_crds::WorkerPool = serde_json::from_value(json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "sleep"},
        "spec": {"template": {"spec": {"containers": [{"name": "main", "image": "registry.example/app:1.0", "command": ["/bin/sleep", "1"]}]}},
                 "replicas": {"min": 1, "max": 1}}
    }))?;
    let pp = PostParams { field_manager: Some(TEST_MANAGER.into()), ..PostParams::default() };
    Api::<flowtel_crds::WorkerPool>::namespaced(client.clone(), &ns.name).create(&pp, &pool).await?;
    let t: Shared = Arc::default();
    lock(&t).started_from_status = true;
    watch_all(client, &ns.name, &t, true, None);
    let dispatch = format!("127.0.0.1:{}", flowtel_e2e::free_port());
    let log = log_filter();
    let operator = Operator::start_with_env(
        &ns.name,
        Some(collector),
        &["--concurrency", "32", "--dispatch-addr", &dispatch],
        &[("RUST_LOG", &log)],
    )
    .await?;
    let pool_key = format!("{}/sleep", ns.name);
    let token = flowtel_e2e::service_account_token(&ns.name, "default").await;
    let workers: Vec<flowtel_e2e::Process> = (0..a.pooled_workers)
        .map(|i| {
            let child = std::process::Command::new(flowtel_e2e::flowtel_binary().expect("flowtel"))
                .args(["worker", "--dispatch-url", &format!("http://{dispatch}"), "--pool", &pool_key])
                .args(["--pod-name", &format!("sleep-w-{i}"), "--token-file"])
                .arg(&token)
                .args(["--", "/bin/sleep", "1"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("a worker agent");
            flowtel_e2e::Process { child }
        })
        .collect();
    println!("pooled runs ({} workers):", workers.len());
    let pid = operator.pid().unwrap_or_default();
    let sweep_spec = Sweep {
        ns: &ns.name,
        prefix: "p",
        kind: "pooled",
        load: Load::Pooled { pool: "sleep".into() },
        past: f64::INFINITY,
        cpu_of: Some(pid),
        dispatcher: Some(&operator),
    };
    let cpu_before = control_plane_cpu();
    let (operator_before, workers_before) = (cpu_seconds(pid), workers_cpu(&workers));
    let (steps, _) = sweep(client, sweep_spec, a.rates.iter().copied(), a, &t, deadline).await;
    let runs_offered: usize = steps.iter().map(|s| s.offered).sum();
    let mut cpu =
        cpu_per_object(&cpu_before, &control_plane_cpu(), runs_offered, Some(cpu_seconds(pid) - operator_before));
    cpu["workers"] = json!((workers_cpu(&workers) - workers_before) * 1000.0 / runs_offered.max(1) as f64);
    print_cpu("pooled run", &cpu);
    let ceiling = steps.iter().filter(|s| s.sustained).map(|s| s.rate).fold(0.0, f64::max);
    let ratio = if bare_ceiling > 0.0 { ceiling / bare_ceiling } else { f64::NAN };
    println!("ceiling: bare Jobs {bare_ceiling}/s, pooled {ceiling}/s: {ratio:.2}x");
    // Created → running at every sustained rate (the issue's bound is at 1.5× the bare Jobs' ceiling).
    let latencies: Vec<Value> = steps
        .iter()
        .filter(|s| s.sustained)
        .map(|s| {
            let t = lock(&t);
            let started: Vec<f64> = s
                .names
                .iter()
                .filter_map(|n| Some(t.job_seen.get(n)?.duration_since(*t.created.get(n)?).as_secs_f64()))
                .collect();
            json!({"rate": s.rate, "created_to_running_p50_s": percentile(started.clone(), 50.0),
                "created_to_running_p99_s": percentile(started, 99.0), "dispatch_wait_p99_s": s.dispatch_wait_p99})
        })
        .collect();
    for l in &latencies {
        println!(
            "latency at {}/s: run created → running p50 {:.3} s p99 {:.3} s; dispatched → on a worker p99 ≤ {} s",
            l["rate"],
            l["created_to_running_p50_s"].as_f64().unwrap_or(f64::NAN),
            l["created_to_running_p99_s"].as_f64().unwrap_or(f64::NAN),
            l["dispatch_wait_p99_s"]
        );
    }
    let latency = latencies.last().cloned();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let audited = audit(&ns.name);
    let runs: usize = steps.iter().map(|s| s.offered).sum();
    let writes: u64 = audited.iter().filter(|((_, v, _), _)| is_write(v)).map(|(_, n)| n).sum();
    let writes_per_run = writes as f64 / runs.max(1) as f64;
    println!("pooled: apiserver writes per run, all clients {writes_per_run:.2}");
    for ((ours, verb, resource), n) in audited.iter().filter(|((_, v, _), _)| is_write(v)) {
        println!(
            "           {} {verb} {resource}: {:.2} per run",
            if *ours { "flowtel" } else { "others " },
            *n as f64 / runs.max(1) as f64
        );
    }
    drop(workers);
    drop(operator);
    drop(policy);
    Ok(json!({"steps": steps.iter().map(step_json).collect::<Vec<_>>(), "ceiling": ceiling,
        "ratio_to_bare_jobs": ratio, "latency": latency, "latency_by_rate": latencies,
        "apiserver_writes_per_run": writes_per_run, "cpu_ms_per_run": cpu,
        "workers": a.pooled_workers}))
}

/// The floor's create: the run, then at once its Job, owned by it, as an operator that needed no watch event to
/// start it would.
async fn floor_create(client: &kube::Client, ns: &str, name: &str, shape: &Job, pp: &PostParams) -> Option<Job> {
    let run = Api::<WorkflowRun>::namespaced(client.clone(), ns).create(pp, &workflow_run(name)).await.ok()?;
    let mut job = shape.clone();
    job.metadata.name = Some(format!("{name}-1"));
    if let Some(labels) = job.metadata.labels.as_mut() {
        labels.insert("flowtel.dev/run".into(), name.into());
    }
    for owner in job.metadata.owner_references.iter_mut().flatten() {
        owner.name = name.into();
        owner.uid = run.metadata.uid.clone()?;
    }
    Api::<Job>::namespaced(client.clone(), ns).create(pp, &job).await.ok()
}

/// A Job flowtel's operator built, made creatable again: no identity, status or fields the apiserver derives from
/// its uid (the selector and the pod labels that carry it).
fn floor_shape(built: &Job) -> Option<Job> {
    let mut v = serde_json::to_value(built).ok()?;
    let meta = &v["metadata"];
    v["metadata"] = json!({"labels": meta["labels"], "annotations": meta["annotations"], "ownerReferences": meta["ownerReferences"]});
    v.as_object_mut()?.remove("status");
    let spec = v["spec"].as_object_mut()?;
    spec.remove("selector");
    spec.remove("manualSelector");
    if let Some(labels) = v["spec"]["template"]["metadata"]["labels"].as_object_mut() {
        for derived in
            ["controller-uid", "batch.kubernetes.io/controller-uid", "job-name", "batch.kubernetes.io/job-name"]
        {
            labels.remove(derived);
        }
    }
    serde_json::from_value(v).ok()
}

/// Stage 8: the floor at rates from `from` up (to one step past the bare Jobs' ceiling). Returns its namespace, kept
/// until the bench cleans up (deleting it now would load the stages after), and its report.
async fn floor(
    client: &kube::Client,
    job: Job,
    status: &Value,
    from: f64,
    bare_ceiling: f64,
    a: &Args,
    deadline: Instant,
) -> Result<(TestNamespace, Value), Box<dyn std::error::Error>> {
    println!("floor: waited {:.0} s for the control plane to go idle", settle().await.as_secs_f64());
    let ns = TestNamespace::new(client, "bench-floor").await?;
    let t: Shared = Arc::default();
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let body = Arc::new(json!({"status": status}));
    let write_status: OnPodEnd = Arc::new(move |run| {
        let (runs, body) = (runs.clone(), body.clone());
        tokio::spawn(async move {
            if runs.patch_status(&run, &PatchParams::default(), &Patch::Merge(&*body)).await.is_err() {
                eprintln!("floor: the status write of {run} failed");
            }
        });
    });
    watch_all(client, &ns.name, &t, true, Some(write_status));
    let before = control_plane_cpu();
    println!("floor (no operator: the bench creates each run and its Job, and writes the run's status once):");
    let floor = Sweep {
        ns: &ns.name,
        prefix: "f",
        kind: "floor",
        load: Load::Floor { job: Arc::new(job) },
        past: bare_ceiling,
        cpu_of: None,
        dispatcher: None,
    };
    let rates = a.rates.iter().copied().filter(|r| *r >= from);
    let (steps, _) = sweep(client, floor, rates, a, &t, deadline).await;
    let count: usize = steps.iter().map(|s| s.offered).sum();
    let cpu = cpu_per_object(&before, &control_plane_cpu(), count, None);
    print_cpu("floor run", &cpu);
    let ceiling = steps.iter().filter(|s| s.sustained).map(|s| s.rate).fold(0.0, f64::max);
    let ratio = if bare_ceiling > 0.0 { ceiling / bare_ceiling } else { f64::NAN };
    println!("floor ceiling {ceiling}/s: {ratio:.2}x the bare Jobs'");
    let audited = audit(&ns.name);
    let writes: u64 = audited.iter().filter(|((_, v, _), _)| is_write(v)).map(|(_, n)| n).sum();
    let writes_per_run = writes as f64 / count.max(1) as f64;
    println!("floor: apiserver writes per run {writes_per_run:.2}");
    let report = json!({"steps": steps.iter().map(step_json).collect::<Vec<_>>(), "ceiling_per_s": ceiling,
        "ratio_to_bare_jobs": ratio, "cpu_ms_per_object": cpu, "apiserver_writes_per_run": writes_per_run});
    Ok((ns, report))
}

/// One stage's rising rates: what it offers and where it stops.
struct Sweep<'a> {
    ns: &'a str,
    /// The objects of step i are named `<prefix><i>-<n>`; the steps are printed as `kind`.
    prefix: &'a str,
    kind: &'a str,
    load: Load,
    /// The last rate offered is the first one above this (flowtel's stages: one step past the bare Jobs' ceiling).
    past: f64,
    /// The process whose CPU each step reports (the operator), if any.
    cpu_of: Option<u32>,
    /// The operator whose dispatch wait each step reports (pooled runs).
    dispatcher: Option<&'a Operator>,
}

/// Offers the sweep's load at each of `rates` in turn, until a rate is not sustained, one above `past` was offered,
/// or `deadline` passed. Returns the steps and, beside each, the CPU seconds `cpu_of` spent over it (0 without one).
async fn sweep(
    client: &kube::Client,
    sweep: Sweep<'_>,
    rates: impl IntoIterator<Item = f64>,
    a: &Args,
    t: &Shared,
    deadline: Instant,
) -> (Vec<StepResult>, Vec<f64>) {
    let cpu = || sweep.cpu_of.map_or(0.0, cpu_seconds);
    let (mut steps, mut cpu_per_step) = (Vec::new(), Vec::new());
    for (i, rate) in rates.into_iter().enumerate() {
        let cpu_at_start = cpu();
        let waits_at_start = match sweep.dispatcher {
            Some(operator) => dispatch_waits(operator).await,
            None => vec![],
        };
        let mut s = step(client, sweep.ns, &format!("{}{i}", sweep.prefix), rate, a, t, sweep.load.clone()).await;
        let spent = cpu() - cpu_at_start;
        if let Some(operator) = sweep.dispatcher {
            s.dispatch_wait_p99 = bucket_percentile(&waits_at_start, &dispatch_waits(operator).await, 99.0);
        }
        print_step(sweep.kind, &s);
        if sweep.cpu_of.is_some() {
            // An overloaded step costs more per run (runs outlast --running-status-delay, retries): each step's own.
            println!("           operator CPU {:.2} s per 1,000 runs", spent * 1000.0 / s.completed.max(1) as f64);
        }
        let stop = !s.sustained || rate > sweep.past;
        steps.push(s);
        cpu_per_step.push(spent);
        if stop || Instant::now() > deadline {
            break;
        }
    }
    (steps, cpu_per_step)
}

/// The operator's `flowtel_pool_wait_seconds` histogram: (bucket bound, cumulative count).
async fn dispatch_waits(operator: &Operator) -> Vec<(f64, f64)> {
    use prometheus_parse::{Scrape, Value};
    let Some((_, body)) = operator.get("/metrics").await else { return vec![] };
    let Ok(scrape) = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))) else { return vec![] };
    scrape
        .samples
        .into_iter()
        .filter(|s| s.metric == "flowtel_pool_wait_seconds")
        .find_map(|s| match s.value {
            Value::Histogram(h) => Some(h.iter().map(|b| (b.less_than, b.count)).collect()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The bound of the bucket holding the p-th percentile of what a histogram observed between two scrapes.
fn bucket_percentile(before: &[(f64, f64)], after: &[(f64, f64)], p: f64) -> Option<f64> {
    let earlier = |bound: f64| before.iter().find(|(b, _)| *b == bound).map_or(0.0, |(_, n)| *n);
    let observed: Vec<(f64, f64)> = after.iter().map(|(bound, n)| (*bound, n - earlier(*bound))).collect();
    let total = observed.iter().map(|(_, n)| *n).fold(0.0, f64::max);
    (total > 0.0).then_some(())?;
    observed.iter().find(|(_, n)| *n >= total * p / 100.0).map(|(bound, _)| *bound)
}

fn percentile(mut v: Vec<f64>, p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v.get(i).copied()
}

struct StepResult {
    rate: f64,
    offered: usize,
    completed: usize,
    sustained: bool,
    completions_per_s: f64,
    lag_p50: Option<f64>,
    lag_p99: Option<f64>,
    lag_max: Option<f64>,
    names: Vec<String>,
    /// Pooled: the operator's dispatch → worker wait p99 over the step (its `flowtel_pool_wait_seconds` bucket).
    dispatch_wait_p99: Option<f64>,
}

async fn step(
    client: &kube::Client,
    ns: &str,
    prefix: &str,
    rate: f64,
    a: &Args,
    t: &Shared,
    load: Load,
) -> StepResult {
    let names = offer(client, ns, prefix, rate, a.step, t, &load).await;
    let drain_until = Instant::now() + a.max_lag + Duration::from_secs_f64(POD_SECONDS);
    loop {
        let finished = {
            let t = lock(t);
            names.iter().filter(|n| t.done.contains_key(*n)).count()
        };
        if finished == names.len() || Instant::now() > drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t = lock(t);
    let lags: Vec<f64> =
        names.iter().filter_map(|n| Some(t.done.get(n)?.duration_since(*t.created.get(n)?).as_secs_f64())).collect();
    let first = names.first().and_then(|n| t.created.get(n)).copied();
    let last_done = names.iter().filter_map(|n| t.done.get(n)).max().copied();
    let span = match (first, last_done) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => f64::INFINITY,
    };
    let completed = lags.len();
    let lag_max = lags.iter().copied().fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let sustained = completed == names.len() && lag_max.is_some_and(|m| m <= POD_SECONDS + a.max_lag.as_secs_f64());
    StepResult {
        rate,
        offered: names.len(),
        completed,
        sustained,
        completions_per_s: completed as f64 / span,
        lag_p50: percentile(lags.clone(), 50.0),
        lag_p99: percentile(lags.clone(), 99.0),
        lag_max,
        names,
        dispatch_wait_p99: None,
    }
}

fn step_json(s: &StepResult) -> Value {
    json!({"rate": s.rate, "offered": s.offered, "completed": s.completed, "sustained": s.sustained,
        "completions_per_s": s.completions_per_s, "lag_p50_s": s.lag_p50, "lag_p99_s": s.lag_p99, "lag_max_s": s.lag_max,
        "dispatch_wait_p99_s": s.dispatch_wait_p99})
}

fn print_step(kind: &str, s: &StepResult) {
    println!(
        "  {kind:<8} {:>5.0}/s offered {:>5}  completed {:>5}  {:>6.1}/s  lag p50 {:>5.2}s p99 {:>5.2}s max {:>5.2}s  {}",
        s.rate,
        s.offered,
        s.completed,
        s.completions_per_s,
        s.lag_p50.unwrap_or(f64::NAN),
        s.lag_p99.unwrap_or(f64::NAN),
        s.lag_max.unwrap_or(f64::NAN),
        if s.sustained { "sustained" } else { "NOT sustained" }
    );
}

/// Audit entries (writes, and GETs) in `ns`: (user agent is flowtel's, verb, resource[/subresource]) → count.
fn audit(ns: &str) -> BTreeMap<(bool, String, String), u64> {
    let mut counts = BTreeMap::new();
    for e in flowtel_e2e::audit::audit_entries(&flowtel_e2e::audit::audit_logs(), ns) {
        let sub = e.subresource.as_deref().map(|s| format!("/{s}")).unwrap_or_default();
        *counts.entry((e.by_operator, e.verb.clone(), format!("{}{sub}", e.resource))).or_insert(0) += 1;
    }
    counts
}

fn is_write(verb: &str) -> bool {
    matches!(verb, "create" | "update" | "patch" | "delete" | "deletecollection")
}

/// CPU seconds of the worker agents (with the processes they ran and waited for).
fn workers_cpu(workers: &[flowtel_e2e::Process]) -> f64 {
    workers.iter().map(|w| cpu_seconds_with_children(w.child.id())).sum()
}

/// utime + stime of `pid` and of its waited-for children, in seconds.
fn cpu_seconds_with_children(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or_default();
    (ticks(11) + ticks(12) + ticks(13) + ticks(14)) / 100.0
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or_default();
    // Fields 14 and 15 of stat; after "comm) " the state is field 3, so index 11 and 12. USER_HZ is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

const COMPONENTS: [&str; 5] = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"];

/// CPU seconds used so far by each control-plane component (pids from the cluster's pid files).
fn control_plane_cpu() -> Vec<f64> {
    let pids = cluster_kubeconfig().parent().map(|d| d.join("pids")).unwrap_or_default();
    COMPONENTS
        .iter()
        .map(|c| {
            let pid = std::fs::read_to_string(pids.join(c)).ok().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
            cpu_seconds(pid)
        })
        .collect()
}

/// Waits (at most `SETTLE_MAX`) until the control plane is near idle: an overloaded step leaves a backlog (garbage
/// collection, pods' finalizers) that would load the next stage. Returns how long it waited.
async fn settle() -> Duration {
    // Idle, this control plane uses about 0.03 of a core; a backlog keeps it near 2.
    const IDLE_CORES: f64 = 0.2;
    const WINDOW: Duration = Duration::from_secs(2);
    const SETTLE_MAX: Duration = Duration::from_secs(90);
    let began = Instant::now();
    let total = || control_plane_cpu().iter().sum::<f64>();
    let mut last = total();
    while began.elapsed() < SETTLE_MAX {
        tokio::time::sleep(WINDOW).await;
        let now = total();
        let cores = (now - last) / WINDOW.as_secs_f64();
        last = now;
        if cores < IDLE_CORES {
            break;
        }
    }
    began.elapsed()
}

/// CPU milliseconds per object of each component (and the operator, when given) between two samples.
fn cpu_per_object(before: &[f64], after: &[f64], objects: usize, operator: Option<f64>) -> Value {
    let mut out = serde_json::Map::new();
    for ((c, b), a) in COMPONENTS.iter().zip(before).zip(after) {
        // A component restarted in between (a new pid) has no meaningful difference: null, not a negative figure.
        let ms = (a >= b).then(|| (a - b) * 1000.0 / objects.max(1) as f64);
        out.insert((*c).into(), json!(ms));
    }
    if let Some(o) = operator {
        out.insert("flowtel".into(), json!(o * 1000.0 / objects.max(1) as f64));
    }
    Value::Object(out)
}

fn print_cpu(what: &str, v: &Value) {
    let parts: Vec<String> = v
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, ms)| format!("{k} {:.1}", ms.as_f64().unwrap_or(f64::NAN)))
        .collect();
    println!("CPU ms per {what}: {}", parts.join(", "));
}

/// (VmRSS, VmHWM) of `pid`, in MiB.
/// One unlabelled sample of the operator's `/metrics` (NaN when it cannot be read).
async fn operator_sample(operator: &Operator, name: &str) -> f64 {
    let Some((_, body)) = operator.get("/metrics").await else { return f64::NAN };
    flowtel_e2e::operator::unlabelled_samples(&body).get(name).copied().unwrap_or(f64::NAN)
}

fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or_default()
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// Creates finished runs `from..to` in `ns` (created, then given the status a real finished run got), 64 at once.
async fn retain(client: &kube::Client, ns: &str, from: usize, to: usize, status: &Value, deadline: Instant) -> usize {
    let api: Api<WorkflowRun> = Api::namespaced(client.clone(), ns);
    let pp = PostParams { field_manager: Some(TEST_MANAGER.into()), ..PostParams::default() };
    let made = futures::stream::iter(from..to)
        .map(|i| {
            let (api, pp) = (api.clone(), pp.clone());
            let status = json!({"status": status});
            async move {
                if Instant::now() > deadline {
                    return false;
                }
                let name = format!("kept-{i}");
                api.create(&pp, &workflow_run(&name)).await.is_ok()
                    && api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await.is_ok()
            }
        })
        .buffer_unordered(64)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    from + made
}

/// The operators' log filter: the chart's default (`operator.logLevel`), not the tests' (which add kube-runtime's
/// debug logs), unless `FLOWTEL_OPERATOR_LOG` says otherwise.
fn log_filter() -> String {
    std::env::var("FLOWTEL_OPERATOR_LOG").unwrap_or_else(|_| "info".into())
}

/// Starts an operator for `ns` and waits until it has reconciled every one of `count` runs once.
async fn rss_with(ns: &str, endpoint: &str, count: usize) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let log = log_filter();
    let operator = Operator::start_with_env(ns, Some(endpoint), &[], &[("RUST_LOG", &log)]).await?;
    let started = Instant::now();
    while operator.counter("flowtel_reconciles_total").await.unwrap_or(0) < count as u64
        && started.elapsed() < Duration::from_secs(180)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pid = operator.pid().unwrap_or_default();
    Ok((memory_mib(pid).0, cpu_seconds(pid)))
}

/// Applies the chart's finalizer policy (`operator.finalizerAtAdmission`, on whenever the operator exports) for
/// `ns`, as an install that watches it would; returns the rendered file, to delete it afterwards.
fn admit_with_finalizer(ns: &str, endpoint: &str) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let set = format!("operator.otlpEndpoint={endpoint},watchNamespace={ns}");
    Ok(flowtel_e2e::apply_chart_template(ns, &set, "templates/telemetry-finalizer-policy.yaml")?)
}

/// Waits (bounded) until a dry-run create in `ns` comes back with the finalizer: the policy is in force.
async fn finalizer_policy_in_force(client: &kube::Client, ns: &str) -> bool {
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), ns);
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    for _ in 0..100 {
        if let Ok(run) = runs.create(&dry_run, &workflow_run("probe")).await
            && run.metadata.finalizers.unwrap_or_default().iter().any(|f| f == "flowtel.dev/telemetry")
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Stage 7's second half: two operators, each owning every other run, kept until the bench cleans up.
struct TwoShards {
    ns: TestNamespace,
    operators: Vec<Operator>,
    step: StepResult,
    /// Per shard: CPU seconds over the step, RSS at its end (MiB).
    usage: Vec<(f64, f64)>,
    policy: std::path::PathBuf,
}

async fn two_shards(
    client: &kube::Client,
    endpoint: &str,
    rate: f64,
    a: &Args,
) -> Result<TwoShards, Box<dyn std::error::Error>> {
    let ns = TestNamespace::new(client, "bench-shards").await?;
    let policy = admit_with_finalizer(&ns.name, endpoint)?;
    finalizer_policy_in_force(client, &ns.name).await;
    let t: Shared = Arc::default();
    watch_all(client, &ns.name, &t, true, None);
    let mut operators = Vec::new();
    let log = log_filter();
    let env = [("RUST_LOG", log.as_str())];
    for index in 0..2 {
        let shard = format!("{index}/2");
        let extra = ["--concurrency", "32", "--shard", shard.as_str()];
        operators
            .push(Operator::start_tagged(&ns.name, &format!("-shard-{index}"), Some(endpoint), &extra, &env).await?);
    }
    let pids: Vec<u32> = operators.iter().map(|o| o.pid().unwrap_or_default()).collect();
    let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let step = step(client, &ns.name, "s", rate, a, &t, Load::Runs { shards: 2 }).await;
    let usage = pids.iter().zip(&before).map(|(p, b)| (cpu_seconds(*p) - b, memory_mib(*p).0)).collect();
    Ok(TwoShards { ns, operators, step, usage, policy })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args();
    let began = Instant::now();
    let deadline = began + BUDGET;
    let client = client().await?;
    install_crds(&client).await?;
    let collector = Collector::start("bench").await?;
    let mut report = serde_json::Map::new();
    if a.pooled_only {
        let pooled = pooled_stage(&client, &a, &collector.endpoint, 0.0, deadline).await?;
        report.insert("pooled".into(), pooled);
        std::fs::write(&a.out, serde_json::to_string_pretty(&Value::Object(report))?)?;
        return Ok(());
    }
    println!(
        "flowtel bench: rates {:?}/s, {} s a step, a 1 s pod; budget {} min",
        a.rates,
        a.step.as_secs(),
        BUDGET.as_secs() / 60
    );

    // 1. Bare Jobs.
    let bare_ns = TestNamespace::new(&client, "bench-jobs").await?;
    let bare_t: Shared = Arc::default();
    watch_all(&client, &bare_ns.name, &bare_t, false, None);
    let bare_cpu_before = control_plane_cpu();
    println!("bare Jobs:");
    let bare = Sweep {
        ns: &bare_ns.name,
        prefix: "j",
        kind: "Jobs",
        load: Load::Jobs,
        past: f64::INFINITY,
        cpu_of: None,
        dispatcher: None,
    };
    let (bare_steps, _) = sweep(&client, bare, a.rates.iter().copied(), &a, &bare_t, deadline).await;
    let bare_ceiling = bare_steps.iter().filter(|s| s.sustained).map(|s| s.rate).fold(0.0, f64::max);
    let bare_count: usize = bare_steps.iter().map(|s| s.offered).sum();
    let bare_cpu = cpu_per_object(&bare_cpu_before, &control_plane_cpu(), bare_count, None);

    // 2. WorkflowRuns, the operator exporting to the collector. Each stage starts on a control plane at rest: an
    // overloaded step leaves a backlog (pods to start and end, garbage to collect) that would load the next stage.
    println!("WorkflowRuns: waited {:.0} s for the control plane to go idle", settle().await.as_secs_f64());
    let ns = TestNamespace::new(&client, "bench-flowtel").await?;
    // As the chart installs flowtel with an endpoint: the finalizer comes with the create.
    let policy = admit_with_finalizer(&ns.name, &collector.endpoint)?;
    let admitted = finalizer_policy_in_force(&client, &ns.name).await;
    println!("finalizer added at admission: {admitted}");
    let t: Shared = Arc::default();
    watch_all(&client, &ns.name, &t, true, None);
    let log = log_filter();
    let operator =
        Operator::start_with_env(&ns.name, Some(&collector.endpoint), &["--concurrency", "32"], &[("RUST_LOG", &log)])
            .await?;
    let pid = operator.pid().unwrap_or_default();
    let cpu_before = cpu_seconds(pid);
    let flowtel_cpu_before = control_plane_cpu();
    println!("WorkflowRuns:");
    let runs = Sweep {
        ns: &ns.name,
        prefix: "r",
        kind: "flowtel",
        load: Load::Runs { shards: 1 },
        past: bare_ceiling,
        cpu_of: Some(pid),
        dispatcher: None,
    };
    // The operator's CPU over each step (its runs' tails included): stage 7's one-shard figure.
    let (steps, step_cpu) = sweep(&client, runs, a.rates.iter().copied(), &a, &t, deadline).await;
    // Every run terminal with its telemetry recorded before the costs are read.
    let runs_api: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let total_runs: usize = steps.iter().map(|s| s.offered).sum();
    let settle_until = Instant::now() + Duration::from_secs(60);
    let mut finished = 0;
    while Instant::now() < settle_until {
        let list = runs_api.list(&Default::default()).await?.items;
        finished = list
            .iter()
            .filter(|r| r.status.as_ref().and_then(|s| s.telemetry.as_ref()).is_some_and(|t| t.finished))
            .count();
        if finished >= total_runs {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let cpu = cpu_seconds(pid) - cpu_before;
    let reconciles = operator_sample(&operator, "flowtel_reconciles_total").await;
    let reconcile_seconds = operator_sample(&operator, "flowtel_reconcile_duration_seconds_sum").await;
    let flowtel_cpu = cpu_per_object(&flowtel_cpu_before, &control_plane_cpu(), finished, Some(cpu));
    print_cpu("bare Job", &bare_cpu);
    print_cpu("WorkflowRun", &flowtel_cpu);
    let (rss, hwm) = memory_mib(pid);
    let flowtel_ceiling = steps.iter().filter(|s| s.sustained).map(|s| s.rate).fold(0.0, f64::max);
    let ratio = if bare_ceiling > 0.0 { flowtel_ceiling / bare_ceiling } else { f64::NAN };
    println!("ceiling: bare Jobs {bare_ceiling}/s, flowtel {flowtel_ceiling}/s: {ratio:.2}x");
    // A refused create (the apiserver down or throttling) is an offered object that never completes.
    let refused = (lock(&bare_t).failed_creates, lock(&t).failed_creates);
    if refused != (0, 0) {
        println!("creates refused: bare Jobs {}, WorkflowRuns {}", refused.0, refused.1);
    }

    // 3. Latency at flowtel's highest sustained rate.
    let latency = steps.iter().rev().find(|s| s.sustained).map(|s| {
        let t = lock(&t);
        let to_job: Vec<f64> = s
            .names
            .iter()
            .filter_map(|n| Some(t.job_seen.get(n)?.duration_since(*t.created.get(n)?).as_secs_f64()))
            .collect();
        let to_end: Vec<f64> = s
            .names
            .iter()
            .filter_map(|n| Some(t.done.get(n)?.duration_since(*t.pod_done.get(n)?).as_secs_f64()))
            .collect();
        json!({"rate": s.rate,
            "created_to_job_p50_s": percentile(to_job.clone(), 50.0), "created_to_job_p99_s": percentile(to_job, 99.0),
            "pod_terminal_to_run_terminal_p50_s": percentile(to_end.clone(), 50.0),
            "pod_terminal_to_run_terminal_p99_s": percentile(to_end, 99.0)})
    });
    if let Some(l) = &latency {
        println!(
            "latency at {}/s: run created → Job seen p50 {:.3} s p99 {:.3} s; pod terminal → run terminal p50 {:.3} s p99 {:.3} s",
            l["rate"],
            l["created_to_job_p50_s"].as_f64().unwrap_or(f64::NAN),
            l["created_to_job_p99_s"].as_f64().unwrap_or(f64::NAN),
            l["pod_terminal_to_run_terminal_p50_s"].as_f64().unwrap_or(f64::NAN),
            l["pod_terminal_to_run_terminal_p99_s"].as_f64().unwrap_or(f64::NAN)
        );
    }

    // 3b. Pooled runs: the same 1 s of work as a process on a warm worker, through the leader's dispatcher.
    let pooled_report = if a.pooled_workers > 0 && Instant::now() < deadline {
        println!("pooled runs: waited {:.0} s for the control plane to go idle", settle().await.as_secs_f64());
        pooled_stage(&client, &a, &collector.endpoint, bare_ceiling, deadline).await?
    } else {
        Value::Null
    };

    // 4. API cost, from the audit log (written asynchronously: give it a moment).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let flowtel_audit = audit(&ns.name);
    let bare_audit = audit(&bare_ns.name);
    let per = |n: u64, of: usize| if of == 0 { f64::NAN } else { n as f64 / of as f64 };
    let mut operator_requests = serde_json::Map::new();
    println!("operator requests per finished run ({finished} runs):");
    for ((ours, verb, resource), n) in &flowtel_audit {
        if *ours {
            println!("  {:>6.2}  {verb} {resource}", per(*n, finished));
            operator_requests.insert(format!("{verb} {resource}"), json!(per(*n, finished)));
        }
    }
    let sum = |m: &BTreeMap<(bool, String, String), u64>, f: &dyn Fn(bool, &str, &str) -> bool| -> u64 {
        m.iter().filter(|((o, v, r), _)| f(*o, v, r)).map(|(_, n)| n).sum()
    };
    let operator_writes = sum(&flowtel_audit, &|o, v, _| o && is_write(v));
    let operator_events = sum(&flowtel_audit, &|o, v, r| o && is_write(v) && r == "events");
    let uncached_reads = sum(&flowtel_audit, &|o, v, _| o && v == "get");
    let all_writes_flowtel = sum(&flowtel_audit, &|_, v, _| is_write(v));
    let all_writes_bare = sum(&bare_audit, &|_, v, _| is_write(v));
    println!(
        "operator writes per run {:.2} (Events {:.2}); uncached reads {uncached_reads}; apiserver writes per run: flowtel {:.2}, bare Job {:.2}",
        per(operator_writes, finished),
        per(operator_events, finished),
        per(all_writes_flowtel, finished),
        per(all_writes_bare, bare_count)
    );

    // 5. CPU and memory.
    let cpu_per_1000 = per((cpu * 1000.0) as u64, finished);
    let reconciles_per_run = reconciles / finished as f64;
    let reconcile_ms_per_run = reconcile_seconds * 1000.0 / finished as f64;
    println!(
        "reconciles per run {reconciles_per_run:.2}, reconcile wall time per run {reconcile_ms_per_run:.2} ms (the rest of the CPU is watches, the HTTP client and export)"
    );
    println!(
        "operator CPU {cpu:.2} s for {finished} runs: {cpu_per_1000:.2} s per 1,000 runs; RSS {rss:.1} MiB (peak {hwm:.1})"
    );

    // 6. Telemetry at the collector.
    let spans = collector.spans().len();
    let points: usize = collector
        .documents("metrics")
        .iter()
        .flat_map(|d| d["resourceMetrics"].as_array().cloned().unwrap_or_default())
        .flat_map(|rm| rm["scopeMetrics"].as_array().cloned().unwrap_or_default())
        .flat_map(|sm| sm["metrics"].as_array().cloned().unwrap_or_default())
        .map(|m| {
            ["sum", "histogram", "gauge"]
                .iter()
                .map(|k| m[*k]["dataPoints"].as_array().map_or(0, Vec::len))
                .sum::<usize>()
        })
        .sum();
    let dropped = operator.counter("flowtel_telemetry_dropped_total").await.unwrap_or_default();
    let queue_full = operator.counter("flowtel_telemetry_queue_full_total").await.unwrap_or_default();
    println!(
        "telemetry per run: {:.2} spans, {:.2} metric points; dropped {dropped}, queue full {queue_full}",
        per(spans as u64, finished),
        per(points as u64, finished)
    );
    let status_template = runs_api
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .find_map(|r| r.status.filter(|s| s.telemetry.as_ref().is_some_and(|t| t.finished)));

    // 8 (opt-in), before stage 7 so that the shards' namespace is not being emptied under it.
    let mut floor_report = Value::Null;
    let mut floor_ns = None;
    if let Some(from) = a.floor_from {
        let built = Api::<Job>::namespaced(client.clone(), &ns.name).list(&ListParams::default().limit(1)).await?;
        let status = status_template.as_ref().map(|s| serde_json::to_value(s).unwrap_or_default());
        match (built.items.first().and_then(floor_shape), status) {
            (Some(job), Some(status)) => {
                let (kept, report) = floor(&client, job, &status, from, bare_ceiling, &a, deadline).await?;
                (floor_ns, floor_report) = (Some(kept), report);
            }
            _ => println!("floor: skipped, stage 2 left no Job or finished run to copy"),
        }
    }

    // 7. Shards, 1 vs 2: stage 2's step at the rate, beside the same step shared by two operators.
    let shard_rate = a.shard_rate.unwrap_or(if flowtel_ceiling > 0.0 { flowtel_ceiling } else { a.rates[0] });
    let one_shard = steps.iter().zip(&step_cpu).find(|(s, _)| s.rate == shard_rate);
    let mut shards_report = Value::Null;
    let mut sharded = None;
    if floor_ns.is_some() {
        println!("shards: waited {:.0} s for the control plane to go idle", settle().await.as_secs_f64());
    }
    if Instant::now() + a.step * 2 < deadline {
        let two = two_shards(&client, &collector.endpoint, shard_rate, &a).await?;
        let per_1000 = |cpu: f64, runs: usize| cpu * 1000.0 / runs.max(1) as f64;
        println!("shards, 1 vs 2, at {shard_rate}/s:");
        let one_json = one_shard.map(|(s, cpu)| {
            print_step("1 shard", s);
            println!("           operator CPU {:.2} s per 1,000 runs; RSS {rss:.1} MiB", per_1000(*cpu, s.completed));
            json!({"step": step_json(s), "cpu_s_per_1000_runs": per_1000(*cpu, s.completed), "rss_mib": rss})
        });
        print_step("2 shards", &two.step);
        // Runs are labelled round robin: shard k owns the runs with an index of k modulo 2.
        let owned = |k: usize| two.step.names.len() / 2 + usize::from(k < two.step.names.len() % 2);
        let together: f64 = two.usage.iter().map(|(cpu, _)| cpu).sum();
        let per_shard: Vec<Value> = two
            .usage
            .iter()
            .enumerate()
            .map(|(k, (cpu, rss))| {
                println!(
                    "           shard {k}: {} runs, CPU {:.2} s per 1,000 of them; RSS {rss:.1} MiB",
                    owned(k),
                    per_1000(*cpu, owned(k))
                );
                json!({"runs": owned(k), "cpu_s_per_1000_own_runs": per_1000(*cpu, owned(k)), "rss_mib": rss})
            })
            .collect();
        println!("           both: CPU {:.2} s per 1,000 runs", per_1000(together, two.step.completed));
        shards_report = json!({"rate": shard_rate, "one": one_json,
            "two": {"step": step_json(&two.step), "per_shard": per_shard,
                "cpu_s_per_1000_runs_together": per_1000(together, two.step.completed)}});
        sharded = Some(two);
    } else {
        println!("shards: skipped, the budget is spent");
    }

    // 5b. RSS with finished runs retained (no operator while they are created, so none is started).
    let mut retained = Vec::new();
    if let Some(status) = status_template.map(|s| serde_json::to_value(s).unwrap_or_default()) {
        let kept = TestNamespace::new(&client, "bench-retained").await?;
        let mut have = 0;
        for target in &a.retained {
            let t0 = Instant::now();
            have = retain(&client, &kept.name, have, *target, &status, deadline).await;
            let created_s = t0.elapsed().as_secs_f64();
            let (rss, cpu) = rss_with(&kept.name, &collector.endpoint, have).await?;
            let writes: u64 = audit(&kept.name).iter().filter(|((o, v, _), _)| *o && is_write(v)).map(|(_, n)| n).sum();
            println!(
                "retained {have} finished runs (created in {created_s:.0} s): RSS {rss:.1} MiB, startup CPU {cpu:.2} s, operator writes {writes}"
            );
            retained.push((have, rss));
            if Instant::now() > deadline {
                break;
            }
        }
    }
    let fit = match retained.as_slice() {
        [.., (n1, r1), (n2, r2)] if n2 > n1 => {
            let per_object_kib = (r2 - r1) * 1024.0 / (*n2 - *n1) as f64;
            let base = r1 - per_object_kib * *n1 as f64 / 1024.0;
            println!("fit: {base:.1} MiB + {per_object_kib:.2} KiB per retained run");
            Some(json!({"base_mib": base, "per_object_kib": per_object_kib}))
        }
        _ => None,
    };

    report.insert("date_unix_seconds".into(), json!(unix_now()));
    report.insert("bare_jobs".into(), json!(bare_steps.iter().map(step_json).collect::<Vec<_>>()));
    let flowtel_steps = steps.iter().zip(&step_cpu).map(|(s, cpu)| {
        let mut j = step_json(s);
        j["operator_cpu_s_per_1000_runs"] = json!(cpu * 1000.0 / s.completed.max(1) as f64);
        j
    });
    report.insert("workflow_runs".into(), json!(flowtel_steps.collect::<Vec<_>>()));
    report
        .insert("ceiling_per_s".into(), json!({"bare_jobs": bare_ceiling, "flowtel": flowtel_ceiling, "ratio": ratio}));
    report.insert("latency".into(), latency.unwrap_or(Value::Null));
    report.insert("cpu_ms_per_object".into(), json!({"bare_job": bare_cpu, "workflow_run": flowtel_cpu}));
    report.insert("operator_requests_per_run".into(), Value::Object(operator_requests));
    report.insert(
        "writes_per_run".into(),
        json!({"operator": per(operator_writes, finished), "operator_events": per(operator_events, finished),
            "uncached_reads": uncached_reads, "apiserver_flowtel": per(all_writes_flowtel, finished),
            "apiserver_bare_job": per(all_writes_bare, bare_count)}),
    );
    report.insert(
        "operator".into(),
        json!({"cpu_s_per_1000_runs": cpu_per_1000, "rss_mib": rss, "peak_rss_mib": hwm,
        "reconciles_per_run": reconciles_per_run, "reconcile_ms_per_run": reconcile_ms_per_run,
        "retained": retained.iter().map(|(n, r)| json!({"runs": n, "rss_mib": r})).collect::<Vec<_>>(), "fit": fit}),
    );
    report.insert("shards".into(), shards_report);
    report.insert("floor".into(), floor_report);
    report.insert("pooled".into(), pooled_report);
    report.insert(
        "telemetry_per_run".into(),
        json!({"spans": per(spans as u64, finished), "metric_points": per(points as u64, finished),
        "dropped": dropped, "queue_full": queue_full}),
    );
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&Value::Object(report))?)?;
    println!("written {} in {:.0} s; cleaning up", a.out.display(), began.elapsed().as_secs_f64());
    // The runs hold flowtel's finalizer until their telemetry is out: their operator lets them go as the namespace
    // is deleted, then stops.
    drop((ns, floor_ns));
    let sharded_runs = sharded.as_ref().map(|two| Api::<WorkflowRun>::namespaced(client.clone(), &two.ns.name));
    let mut policies = vec![policy];
    let sharded = sharded.map(|two| {
        drop(two.ns);
        policies.push(two.policy);
        two.operators
    });
    let gone_until = Instant::now() + CLEANUP;
    for api in std::iter::once(&runs_api).chain(sharded_runs.as_ref()) {
        while Instant::now() < gone_until && api.list(&Default::default()).await.is_ok_and(|l| !l.items.is_empty()) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Not all gone in time (a long run leaves thousands, one finalizer patch each): what is left goes now, so
        // that no namespace is left terminating.
        let left = api.list(&Default::default()).await.map(|l| l.items).unwrap_or_default();
        if !left.is_empty() {
            println!("{} runs still held by their finalizer: removing it", left.len());
            let release = json!({"metadata": {"finalizers": null}});
            futures::stream::iter(left)
                .for_each_concurrent(64, |run| {
                    let (api, release) = (api.clone(), &release);
                    async move {
                        let _ = api.patch(&run.name_any(), &PatchParams::default(), &Patch::Merge(release)).await;
                    }
                })
                .await;
        }
    }
    drop((operator, sharded));
    for policy in policies {
        let _ = flowtel_e2e::run(flowtel_e2e::kubectl().args(["delete", "--ignore-not-found", "-f"]).arg(&policy));
    }
    Ok(())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
