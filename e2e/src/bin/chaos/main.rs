//! The chaos run: a steady stream of WorkflowRuns of mixed outcomes while the operator is SIGKILLed, the
//! kube-apiserver and etcd are restarted and the OpenTelemetry Collector is killed, then one table (and a JSON file)
//! of what survived: runs left unfinished, duplicate Jobs, Jobs left running, metrics counted twice or lost, spans
//! per run, export failures and the operator's writes per run. A measurement, not a test: figures are printed, not
//! asserted; the exit status is non-zero only when the harness itself failed.
//!
//! Needs the cluster and the debug build; `e2e/chaos` does both and runs this:
//!
//!     e2e/chaos [--runs 1000] [--seed N] [--out FILE.json] [--rate 20] [--faults-scale 1] [--settle-secs 180]
//!               [--economy on|off] [--pooled [--workers 64]]
//!
//! It restarts the control plane's etcd and kube-apiserver (`e2e/cluster restart`): anything else using the same
//! cluster sees those outages too.
//!
//! Its parts: the command line (`cli`), the workload and the fault journal (`workload`), the faults and the processes
//! they hit (`faults`), and the count of what survived (`report`); this file runs them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

mod cli;
mod faults;
mod report;
mod workload;

use cli::*;
use faults::*;
use report::*;
use workload::*;

type Error = Box<dyn std::error::Error + Send + Sync>;

type Result<T> = std::result::Result<T, Error>;

/// Field manager of what the chaos run writes (never the operator's `flowtel`).
const MANAGER: &str = "flowtel-chaos";

/// At most this many names are listed for any finding; the JSON file has the same lists.
const EXAMPLES: usize = 10;

/// A poisoned lock only means another task panicked while holding it; the data is still what we want to report.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything the run shares between its tasks.
struct Ctx {
    client: kube::Client,
    namespace: String,
    prefix: String,
    clock: Clock,
    journal: Journal,
    operator: Arc<Mutex<OperatorCtl>>,
    collector: Arc<Mutex<CollectorCtl>>,
    /// The pool's workers, in the pooled mode.
    workers: Option<Arc<Mutex<WorkersCtl>>>,
    /// Last `/metrics` sample per operator process: the counters are per process, so the totals are their sums.
    scraped: Arc<Mutex<BTreeMap<usize, BTreeMap<String, f64>>>>,
    /// Kept false while a fault task has the collector down on purpose, so the watchdog does not restart it.
    collector_down: Arc<AtomicBool>,
    runs: Api<DynamicObject>,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

/// Retries an idempotent request (server-side apply, merge patch) through control-plane outages: each try is
/// bounded, since with etcd down a request can hang for a long time.
async fn retry<T, F, Fut>(budget: Duration, mut f: F) -> std::result::Result<(T, u32), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, kube::Error>>,
{
    let deadline = Instant::now() + budget;
    let mut failures = 0;
    let mut pause = Duration::from_millis(250);
    loop {
        let error = match tokio::time::timeout(Duration::from_secs(10), f()).await {
            Ok(Ok(v)) => return Ok((v, failures)),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer in 10 s".to_string(),
        };
        failures += 1;
        if Instant::now() + pause > deadline {
            return Err(error);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

struct Submitted {
    name: String,
    ok: bool,
    retries: u32,
    error: Option<String>,
}

async fn submit(ctx: Arc<Ctx>, run: PlannedRun) -> Submitted {
    let workflow = format!("{}-{}", ctx.prefix, run.kind.name());
    let manifest = run.kind.manifest(&run.name, &workflow, ctx.workers.is_some());
    let params = PatchParams::apply(MANAGER).force();
    let api = ctx.runs.clone();
    let body = Patch::Apply(&manifest);
    let applied = retry(Duration::from_secs(120), || api.patch(&run.name, &params, &body)).await;
    let (mut retries, error) = match applied {
        Ok((_, failures)) => (failures, None),
        Err(e) => return Submitted { name: run.name, ok: false, retries: 0, error: Some(e) },
    };
    let mut error = error;
    if run.kind == Kind::Cancel {
        tokio::time::sleep(run.cancel_after).await;
        let patch = json!({"spec": {"cancel": true}});
        let (pp, body) = (PatchParams::default(), Patch::Merge(&patch));
        match retry(Duration::from_secs(120), || api.patch(&run.name, &pp, &body)).await {
            Ok((_, failures)) => retries += failures,
            Err(e) => {
                ctx.journal.record("harness", format!("cancel of {} not sent: {e}", run.name));
                error = Some(format!("cancel not sent: {e}"));
            }
        }
    }
    Submitted { name: run.name, ok: true, retries, error }
}

fn run_api(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("flowtel.dev", "v1alpha1", "WorkflowRun");
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk_with_plural(&gvk, "workflowruns"))
}

async fn list_runs(ctx: &Ctx) -> Result<Vec<RunView>> {
    let list = tokio::time::timeout(Duration::from_secs(30), ctx.runs.list(&ListParams::default()))
        .await
        .map_err(|_| "listing the runs took more than 30 s")??;
    Ok(list.items.iter().map(RunView::of).collect())
}

/// Waits until every submitted run is terminal with its telemetry exported, or the bound passes; never fails
/// early, since what is left unfinished is one of the figures.
async fn settle(ctx: &Ctx, submitted: usize, bound: Duration) -> Vec<RunView> {
    let deadline = Instant::now() + bound;
    let mut last_print = Instant::now();
    let mut last = Vec::new();
    loop {
        match list_runs(ctx).await {
            Ok(runs) => last = runs,
            Err(e) => eprintln!("[chaos {:7.1} s] listing runs: {e}", ctx.clock.secs()),
        }
        let done = last.iter().filter(|r| r.done()).count();
        if done >= submitted || Instant::now() > deadline {
            return last;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            eprintln!("[chaos {:7.1} s] {done}/{submitted} runs terminal with telemetry exported", ctx.clock.secs());
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Creates the namespace and waits for its default ServiceAccount (ServiceAccount admission rejects pods
/// without it).
async fn create_namespace(client: &kube::Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    api.patch(name, &PatchParams::apply(MANAGER), &Patch::Apply(ns)).await?;
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sa.get_opt("default").await?.is_none() {
        if Instant::now() > deadline {
            return Err(format!("no default ServiceAccount in {name} after 60 s").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Deletes the namespace while the operator still runs (it removes its finalizers from the runs); past a bound,
/// removes what finalizers remain itself so that nothing is left behind.
async fn delete_namespace(ctx: &Ctx) -> Value {
    let t0 = Instant::now();
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    let gone = || async { matches!(api.get_opt(&ctx.namespace).await, Ok(None)) };
    let dp = DeleteParams::background();
    if let Err(e) = retry(Duration::from_secs(60), || api.delete(&ctx.namespace, &dp)).await {
        return json!({"deleted": false, "error": e});
    }
    let mut forced = 0;
    while !gone().await {
        if t0.elapsed() > Duration::from_secs(60) && forced == 0 {
            let patch = json!({"metadata": {"finalizers": null}});
            for r in ctx.runs.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
                let name = r.metadata.name.clone().unwrap_or_default();
                if ctx.runs.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.is_ok() {
                    forced += 1;
                }
            }
            forced = forced.max(1);
        }
        if t0.elapsed() > Duration::from_secs(180) {
            return json!({"deleted": false, "error": "still terminating after 180 s", "finalizers_removed": forced});
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    json!({"deleted": true, "seconds": seconds, "finalizers_removed_by_harness": forced})
}

fn versions_env(key: &str) -> Result<String> {
    let path = flowtel_e2e::repo_root().join("e2e/versions.env");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
        .ok_or_else(|| format!("{key} is not in {}", path.display()).into())
}

fn collector_bin() -> Result<PathBuf> {
    let cache = std::env::var_os("FLOWTEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/flowtel"));
    let bin = cache.join("bin").join(format!(
        "otelcol-flowtel-{}-{}",
        versions_env("OTELCOL_VERSION")?,
        versions_env("OTELCOL_DIST_REVISION")?
    ));
    if !bin.exists() {
        return Err(format!("{} is missing (e2e/build-binaries collector)", bin.display()).into());
    }
    Ok(bin)
}

/// The collector's configuration: OTLP gRPC in on a fixed port, OTLP JSON lines out, appended so that a restarted
/// collector adds to what the killed one wrote.
fn collector_config(port: u16, dir: &Path) -> String {
    let d = dir.display();
    format!(
        "receivers:\n  otlp:\n    protocols:\n      grpc: {{endpoint: 127.0.0.1:{port}}}\n\
         exporters:\n  file/traces: {{path: {d}/traces.json, flush_interval: 100ms, append: true}}\n  \
         file/metrics: {{path: {d}/metrics.json, flush_interval: 100ms, append: true}}\n\
         service:\n  telemetry:\n    metrics: {{level: none}}\n  pipelines:\n    \
         traces: {{receivers: [otlp], exporters: [file/traces]}}\n    \
         metrics: {{receivers: [otlp], exporters: [file/metrics]}}\n"
    )
}

async fn chaos(
    ctx: Arc<Ctx>,
    args: &Args,
    rng: &mut Rng,
) -> Result<(BTreeMap<String, Kind>, Vec<Submitted>, Vec<RunView>)> {
    // The plan, all drawn up front so that the seed alone decides it.
    let planned: Vec<PlannedRun> = (0..args.runs)
        .map(|i| {
            let kind = Kind::pick(rng);
            let cancel_after = Duration::from_secs_f64(rng.range(3.0, 8.0));
            PlannedRun { name: format!("{}-{}-{i}", ctx.prefix, kind.name()), kind, cancel_after }
        })
        .collect();
    let plan: BTreeMap<String, Kind> = planned.iter().map(|p| (p.name.clone(), p.kind)).collect();
    let submit_secs = args.runs as f64 / args.rate;
    let window = submit_secs.max(20.0) + 15.0;
    let s = schedule(rng, window, args.faults_scale, args.pooled);
    eprintln!(
        "[chaos {:7.1} s] {} runs over {submit_secs:.0} s; faults over 3–{window:.0} s: {} operator kills, {} \
         control-plane restarts, {} collector kills, {} worker kills",
        ctx.clock.secs(),
        args.runs,
        s.operator_kills.len(),
        s.control_plane.len(),
        s.collector_kills.len(),
        s.worker_kills.len()
    );

    let start = ctx.clock.secs();
    let faults = vec![
        tokio::spawn(operator_faults(ctx.clone(), s.operator_kills.iter().map(|(t, d)| (start + t, *d)).collect())),
        tokio::spawn(control_plane_faults(ctx.clone(), s.control_plane.iter().map(|(t, c)| (start + t, *c)).collect())),
        tokio::spawn(collector_faults(ctx.clone(), s.collector_kills.iter().map(|(t, d)| (start + t, *d)).collect())),
        tokio::spawn(worker_faults(ctx.clone(), s.worker_kills.iter().map(|(t, w, d)| (start + t, *w, *d)).collect())),
    ];
    let mut submissions = Vec::with_capacity(planned.len());
    for (i, run) in planned.into_iter().enumerate() {
        tokio::time::sleep_until(ctx.clock.at(start + i as f64 / args.rate)).await;
        submissions.push(tokio::spawn(submit(ctx.clone(), run)));
    }
    for f in faults {
        f.await??;
    }
    let mut subs = Vec::with_capacity(submissions.len());
    for s in submissions {
        subs.push(s.await?);
    }
    ctx.journal.record("faults-over", format!("waiting up to {} s for every run to finish", args.settle.as_secs()));
    let runs = settle(&ctx, subs.iter().filter(|s| s.ok).count(), args.settle).await;
    ctx.journal.record("settled", format!("{} runs terminal and exported", runs.iter().filter(|r| r.done()).count()));
    Ok((plan, subs, runs))
}

#[tokio::main]
async fn main() {
    match main_inner().await {
        Ok(()) => {}
        Err(e) => {
            eprintln!("chaos: harness error: {e}");
            std::process::exit(2);
        }
    }
}

async fn main_inner() -> Result<()> {
    let args = parse_args();
    let t0 = Instant::now();
    let clock = Clock(t0);
    let mut rng = Rng::new(args.seed);
    // Unique per chaos run: names of the namespace, the runs and the workflows (the metrics' workflow_name).
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let prefix = format!("c{:06x}", stamp & 0xff_ffff);
    let namespace = format!("chaos-{prefix}");
    let dir = flowtel_e2e::repo_root().join("target/chaos").join(&prefix);
    std::fs::create_dir_all(&dir)?;

    let kubeconfig = flowtel_e2e::cluster_kubeconfig();
    let client = flowtel_e2e::client().await?;
    flowtel_e2e::install_crds(&client).await?;
    create_namespace(&client, &namespace).await?;
    let dispatch = args.pooled.map(|_| format!("127.0.0.1:{}", flowtel_e2e::free_port()));
    let workers = match (args.pooled, &dispatch) {
        (Some(n), Some(addr)) => {
            let pools = Api::<DynamicObject>::namespaced_with(
                client.clone(),
                &namespace,
                &ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk("flowtel.dev", "v1alpha1", "WorkerPool"),
                    "workerpools",
                ),
            );
            pools.patch(POOL, &PatchParams::apply(MANAGER), &Patch::Apply(pool_manifest())).await?;
            Some(Arc::new(Mutex::new(WorkersCtl {
                bin: dir.join("flowtel"),
                dispatch_url: format!("http://{addr}"),
                pool: format!("{namespace}/{POOL}"),
                token: flowtel_e2e::service_account_token(&namespace, "default").await,
                executions: dir.join("executions"),
                log: dir.join("workers.log"),
                slots: (0..n).map(|_| None).collect(),
                starts: 0,
            })))
        }
        _ => None,
    };

    let port = flowtel_e2e::free_port();
    let config = dir.join("collector.yaml");
    std::fs::write(&config, collector_config(port, &dir))?;
    let collector =
        CollectorCtl { bin: collector_bin()?, config, log: dir.join("collector.log"), port, current: None, starts: 0 };
    // A copy: the workspace may be rebuilt during the run, and every restart must run the same operator.
    let operator_bin = dir.join("flowtel");
    std::fs::copy(flowtel_e2e::flowtel_binary()?, &operator_bin)?;
    let operator = OperatorCtl {
        bin: operator_bin,
        kubeconfig: kubeconfig.clone(),
        namespace: namespace.clone(),
        otlp: format!("http://127.0.0.1:{port}"),
        log: dir.join("operator.log"),
        current: None,
        generation: 0,
        admin: String::new(),
        economy: args.economy.clone(),
        dispatch,
    };
    let ctx = Arc::new(Ctx {
        runs: run_api(&client, &namespace),
        client,
        namespace: namespace.clone(),
        prefix: prefix.clone(),
        clock,
        journal: Journal { clock, entries: Arc::default() },
        operator: Arc::new(Mutex::new(operator)),
        collector: Arc::new(Mutex::new(collector)),
        workers,
        scraped: Arc::default(),
        collector_down: Arc::new(AtomicBool::new(true)),
        kubeconfig,
        dir: dir.clone(),
    });
    eprintln!("chaos {prefix}: namespace {namespace}, seed {}, files in {}", args.seed, dir.display());

    let outcome = tokio::select! {
        r = measure(ctx.clone(), &args, &mut rng) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
    };
    // Cleanup whatever happened: the namespace first, while the operator still runs to release its finalizers.
    let cleanup = delete_namespace(&ctx).await;
    lock(&ctx.operator).kill();
    if let Some(workers) = &ctx.workers {
        lock(workers).kill_all();
    }
    lock(&ctx.collector).current = None;
    // The copy of the operator is large and the log names the build anyway.
    let _ = std::fs::remove_file(dir.join("flowtel"));
    let (mut result, table) = outcome?;
    result["cleanup"] = cleanup;
    result["wall_seconds"] = json!(t0.elapsed().as_secs());
    println!("{table}");
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&result)?)?;
    println!("wrote {} (operator log, collector output: {})", args.out.display(), dir.display());
    Ok(())
}

/// Runs the whole measurement: collector and operator up, the runs and the faults, the wait, the report.
async fn measure(ctx: Arc<Ctx>, args: &Args, rng: &mut Rng) -> Result<(Value, String)> {
    start_collector(&ctx).await?;
    let admin = {
        let mut op = lock(&ctx.operator);
        op.spawn(ctx.clock)?;
        op.admin.clone()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if admin_get(&admin, "/readyz").await.is_some() {
            break;
        }
        if Instant::now() > deadline {
            return Err(
                format!("the operator was not ready in 60 s; see {}", ctx.dir.join("operator.log").display()).into()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Some(workers) = &ctx.workers {
        let mut w = lock(workers);
        for slot in 0..w.slots.len() {
            w.spawn(slot)?;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let scraping = tokio::spawn(scraper(ctx.clone(), stop.clone()));

    let (plan, subs, runs) = chaos(ctx.clone(), args, rng).await?;
    // The collector flushes every 100 ms and the apiserver writes its audit log in batches; the last scrape needs
    // a second too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    scraping.await??;
    scrape_once(&ctx).await?;

    let mut result = report(&ctx, &plan, &subs, &runs).await?;
    let faults = lock(&ctx.journal.entries).clone();
    let header = format!(
        "chaos run {} (namespace {}, seed {}, economy {}, {} runs at {}/s{}): {} operator kills, {} control-plane \
         restarts, {} collector kills, {} worker kills, {:.0} s",
        ctx.prefix,
        ctx.namespace,
        args.seed,
        args.economy,
        args.runs,
        args.rate,
        args.pooled.map_or_else(String::new, |n| format!(", pooled on {n} workers")),
        ctx.journal.count("operator-kill"),
        ctx.journal.count("restart"),
        ctx.journal.count("collector-kill"),
        ctx.journal.count("worker-kill"),
        ctx.clock.secs(),
    );
    let table = table(&result, &ctx, &header);
    result["chaos"] = json!({
        "prefix": ctx.prefix, "namespace": ctx.namespace, "seed": args.seed, "runs": args.runs, "rate": args.rate,
        "faults_scale": args.faults_scale, "economy": args.economy, "pooled_workers": args.pooled,
        "files": ctx.dir, "faults": faults,
    });
    Ok((result, table))
}
