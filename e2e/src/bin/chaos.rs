//! The chaos run: a steady stream of WorkflowRuns of mixed outcomes while the operator is SIGKILLed, the
//! kube-apiserver and etcd are restarted and the OpenTelemetry Collector is killed, then one table (and a JSON file)
//! of what survived: runs left unfinished, duplicate Jobs, Jobs left running, metrics counted twice or lost, spans
//! per run, export failures and the operator's writes per run. A measurement, not a test: figures are printed, not
//! asserted; the exit status is non-zero only when the harness itself failed.
//!
//! Needs the cluster and the debug build; `e2e/chaos` does both and runs this:
//!
//!     e2e/chaos [--runs 1000] [--seed N] [--out FILE.json] [--rate 20] [--faults-scale 1] [--settle-secs 180]
//!
//! It restarts the control plane's etcd and kube-apiserver (`e2e/cluster restart`): anything else using the same
//! cluster sees those outages too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::io::{Read, Write};
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

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

/// Field manager of what the chaos run writes (never the operator's `flowtel`).
const MANAGER: &str = "flowtel-chaos";
/// At most this many names are listed for any finding; the JSON file has the same lists.
const EXAMPLES: usize = 10;

/// e2e/chaos: WorkflowRuns of mixed outcomes while the operator, the control plane and the collector fail (see the
/// header above).
#[derive(clap::Parser)]
#[command(name = "e2e/chaos")]
struct Cli {
    /// Runs submitted.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Seed of the workload mix and the fault schedule (default: the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the result goes, as JSON (default: target/chaos.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Runs submitted per second.
    #[arg(long, default_value_t = 20.0, value_parser = positive)]
    rate: f64,
    /// Scales the faults (1: 10 operator kills, 2 apiserver and 1 etcd restarts, 2 collector kills).
    #[arg(long, default_value_t = 1.0, value_parser = not_negative)]
    faults_scale: f64,
    /// How long to wait for every run to finish after the faults.
    #[arg(long, default_value_t = 180)]
    settle_secs: u64,
}

fn positive(value: &str) -> std::result::Result<f64, String> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("must be a positive number, got {value}")),
    }
}

fn not_negative(value: &str) -> std::result::Result<f64, String> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("must be a number not below 0, got {value}")),
    }
}

struct Args {
    runs: usize,
    seed: u64,
    out: PathBuf,
    rate: f64,
    faults_scale: f64,
    settle: Duration,
}

/// The command line; a malformed or unknown flag ends the run with clap's message naming it.
fn parse_args() -> Args {
    let cli = <Cli as clap::Parser>::parse();
    Args {
        runs: cli.runs as usize,
        seed: cli
            .seed
            .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)),
        out: cli.out.unwrap_or_else(|| flowtel_e2e::repo_root().join("target/chaos.json")),
        rate: cli.rate,
        faults_scale: cli.faults_scale,
        settle: Duration::from_secs(cli.settle_secs),
    }
}

/// Seeded, so one seed gives the same workload mix and fault schedule (not the same system timing).
struct Rng(fastrand::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    fn next_u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0.f64()
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
}

/// What a run is made to do, through the KWOK simulation labels and annotations (README, "Simulated pods").
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Success,
    FailOnce,
    Fail,
    DisruptOnce,
    Cancel,
    Deadline,
}

impl Kind {
    const ALL: [Kind; 6] = [Kind::Success, Kind::FailOnce, Kind::Fail, Kind::DisruptOnce, Kind::Cancel, Kind::Deadline];

    fn name(self) -> &'static str {
        match self {
            Kind::Success => "success",
            Kind::FailOnce => "fail-once",
            Kind::Fail => "fail",
            Kind::DisruptOnce => "disrupt-once",
            Kind::Cancel => "cancel",
            Kind::Deadline => "deadline",
        }
    }

    /// Share of the mix: mostly plain successes, as in production, with every failure path well represented.
    fn weight(self) -> f64 {
        match self {
            Kind::Success => 0.40,
            Kind::FailOnce | Kind::DisruptOnce => 0.15,
            Kind::Fail | Kind::Cancel | Kind::Deadline => 0.10,
        }
    }

    fn pick(rng: &mut Rng) -> Kind {
        let mut x = rng.unit();
        for kind in Kind::ALL {
            x -= kind.weight();
            if x < 0.0 {
                return kind;
            }
        }
        Kind::Success
    }

    /// The phase, `Succeeded` condition reason and attempt count a correct operator ends the run with, whatever
    /// the faults (a cancelled run may end before its first attempt, so its count is not checked).
    fn expected(self) -> (&'static str, &'static str, Option<i64>) {
        match self {
            Kind::Success => ("Succeeded", "Succeeded", Some(1)),
            Kind::FailOnce | Kind::DisruptOnce => ("Succeeded", "Succeeded", Some(2)),
            Kind::Fail => ("Failed", "PermanentFailure", Some(1)),
            Kind::Cancel => ("Failed", "Cancelled", None),
            Kind::Deadline => ("Failed", "DeadlineExceeded", Some(1)),
        }
    }

    fn manifest(self, name: &str, workflow: &str) -> Value {
        let (outcome, duration, spec) = match self {
            Kind::Success => (None, "1s", json!({})),
            Kind::FailOnce => (
                Some("fail-once"),
                "1s",
                json!({"retry": {"limit": 2, "backoff": {"baseSeconds": 1, "factor": 2, "maxSeconds": 10}}}),
            ),
            // A retry budget the permanent exit code must not use: a misclassification shows as extra attempts.
            Kind::Fail => (Some("fail"), "1s", json!({"retry": {"limit": 2, "permanentExitCodes": [42]}})),
            Kind::DisruptOnce => (Some("disrupt-once"), "1s", json!({"retry": {"limit": 0}})),
            Kind::Cancel => (None, "1h", json!({})),
            Kind::Deadline => (None, "1h", json!({"activeDeadlineSeconds": 5})),
        };
        let labels = outcome.map_or_else(|| json!({}), |o| json!({"sim.flowtel.dev/outcome": o}));
        let mut annotations = json!({"sim.flowtel.dev/duration": duration});
        if self == Kind::Fail {
            annotations["sim.flowtel.dev/exit-code"] = json!("42");
        }
        let mut run = json!({
            "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
            "spec": {
                "workflowName": workflow,
                "template": {
                    "metadata": {"labels": labels, "annotations": annotations},
                    "spec": {"containers": [{"name": "main", "image": "registry.example/chaos:1.0"}]}
                }
            }
        });
        if let (Some(dst), Some(src)) = (run["spec"].as_object_mut(), spec.as_object()) {
            dst.extend(src.clone());
        }
        run
    }
}

/// One planned run: its kind, and for a cancel, how long after its submission the cancel is sent.
struct PlannedRun {
    name: String,
    kind: Kind,
    cancel_after: Duration,
}

/// Seconds since the chaos run started, for every recorded event.
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }

    fn at(&self, secs: f64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.0 + Duration::from_secs_f64(secs.max(0.0)))
    }
}

/// The faults injected (and anything the harness saw go down by itself), with their times.
#[derive(Clone)]
struct Journal {
    clock: Clock,
    entries: Arc<Mutex<Vec<Value>>>,
}

impl Journal {
    fn record(&self, kind: &str, detail: impl Into<String>) {
        let at = self.clock.secs();
        let detail = detail.into();
        eprintln!("[chaos {at:7.1} s] {kind}: {detail}");
        lock(&self.entries).push(json!({"at_s": (at * 10.0).round() / 10.0, "kind": kind, "detail": detail}));
    }

    /// When the last entry of `kind` was recorded, in seconds.
    fn at(&self, kind: &str) -> Option<f64> {
        lock(&self.entries).iter().rev().find(|e| e["kind"] == kind).and_then(|e| e["at_s"].as_f64())
    }

    fn count(&self, kind: &str) -> usize {
        lock(&self.entries).iter().filter(|e| e["kind"] == kind).count()
    }
}

/// A poisoned lock only means another task panicked while holding it; the data is still what we want to report.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child process of ours, SIGKILLed when dropped, so that a harness error leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn append_log(path: &Path, banner: &str) -> Result<std::fs::File> {
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(log, "==== chaos: {banner} ====")?;
    Ok(log)
}

/// The operator, one process at a time; each process is a new generation with its own admin port (a killed
/// process's port is not reused, so a scrape can never read the next process by mistake).
struct OperatorCtl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    namespace: String,
    otlp: String,
    log: PathBuf,
    current: Option<Proc>,
    generation: usize,
    admin: String,
}

impl OperatorCtl {
    fn spawn(&mut self, clock: Clock) -> Result<()> {
        self.generation += 1;
        self.admin = format!("127.0.0.1:{}", flowtel_e2e::free_port());
        let log = append_log(&self.log, &format!("operator process {} at {:.1} s", self.generation, clock.secs()))?;
        let child = Command::new(&self.bin)
            .args(["run", "--namespace", &self.namespace, "--otlp-endpoint", &self.otlp])
            .args(["--admin-addr", &self.admin, "--concurrency", "32"])
            // As the chart runs it: the journal on the pod's emptyDir outlives each killed process.
            .arg("--export-journal")
            .arg(self.log.with_file_name("exports.journal"))
            .env("KUBECONFIG", &self.kubeconfig)
            // The operator's log filter; FLOWTEL_CHAOS_RUST_LOG widens it (e.g. `info,kube_runtime=debug`).
            .env("RUST_LOG", std::env::var("FLOWTEL_CHAOS_RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        self.current = Some(Proc(child));
        Ok(())
    }

    /// SIGKILL, as a crash would; false when no process ran.
    fn kill(&mut self) -> bool {
        self.current.take().is_some()
    }

    /// The exit status of a process that ended without being killed by us.
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.current.as_mut().and_then(|p| p.0.try_wait().ok().flatten())?;
        self.current = None;
        Some(status)
    }
}

/// The real OpenTelemetry Collector on one fixed port, appending to files that outlive its restarts.
struct CollectorCtl {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    current: Option<Proc>,
    starts: usize,
}

impl CollectorCtl {
    fn spawn(&mut self, clock: Clock) -> Result<()> {
        self.starts += 1;
        let log = append_log(&self.log, &format!("collector process {} at {:.1} s", self.starts, clock.secs()))?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        self.current = Some(Proc(child));
        Ok(())
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.current.as_mut().and_then(|p| p.0.try_wait().ok().flatten())?;
        self.current = None;
        Some(status)
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

async fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !port_open(port) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// A plain HTTP/1.1 GET (the admin port needs nothing more); the body on a 200.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    if buf.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Unlabelled samples of the Prometheus text format (the operator's counters have no labels). Any counter may be
/// missing or renamed: whatever is there is kept.
fn parse_counters(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?;
            let value = parts.next()?.parse().ok()?;
            (!name.contains('{')).then(|| (name.to_string(), value))
        })
        .collect()
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
    let manifest = run.kind.manifest(&run.name, &workflow);
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

/// `n` times in [lo, hi], sorted, at least `gap` apart when that fits (rejection sampling, then even spacing).
fn spread(rng: &mut Rng, n: usize, lo: f64, hi: f64, gap: f64) -> Vec<f64> {
    for _ in 0..1000 {
        let mut times: Vec<f64> = (0..n).map(|_| rng.range(lo, hi)).collect();
        times.sort_by(f64::total_cmp);
        if times.windows(2).all(|w| w[1] - w[0] >= gap) {
            return times;
        }
    }
    (0..n).map(|i| lo + (hi - lo) * (i as f64 + 0.5) / n as f64).collect()
}

/// How many faults of a kind: the scaled count, but at least one of each kind when faults are on at all.
fn scaled(count: f64, scale: f64) -> usize {
    if scale <= 0.0 { 0 } else { ((count * scale).round() as usize).max(1) }
}

struct Schedule {
    operator_kills: Vec<(f64, f64)>,
    control_plane: Vec<(f64, &'static str)>,
    collector_kills: Vec<(f64, f64)>,
}

fn schedule(rng: &mut Rng, window: f64, scale: f64) -> Schedule {
    // From a few seconds in (the first runs are in flight) to a bit after the last submission.
    let (lo, hi) = (3.0, window);
    let operator_kills = spread(rng, scaled(10.0, scale), lo, hi, 4.0)
        .into_iter()
        .map(|t| (t, if rng.unit() < 0.3 { 0.0 } else { rng.range(0.5, 3.0) }))
        .collect();
    let mut which: Vec<&'static str> = std::iter::repeat_n("kube-apiserver", scaled(2.0, scale))
        .chain(std::iter::repeat_n("etcd", scaled(1.0, scale)))
        .collect();
    for i in (1..which.len()).rev() {
        which.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let control_plane = spread(rng, which.len(), lo, hi, 12.0).into_iter().zip(which).collect();
    let collector_kills =
        spread(rng, scaled(2.0, scale), lo, hi, 10.0).into_iter().map(|t| (t, rng.range(2.0, 6.0))).collect();
    Schedule { operator_kills, control_plane, collector_kills }
}

async fn operator_faults(ctx: Arc<Ctx>, kills: Vec<(f64, f64)>) -> Result<()> {
    for (at, delay) in kills {
        tokio::time::sleep_until(ctx.clock.at(at)).await;
        let generation = {
            let mut op = lock(&ctx.operator);
            let had = op.kill();
            if !had {
                ctx.journal.record("harness", "operator kill: no process was running");
                continue;
            }
            op.generation
        };
        ctx.journal.record("operator-kill", format!("process {generation} SIGKILLed; restart in {delay:.1} s"));
        tokio::time::sleep(Duration::from_secs_f64(delay)).await;
        let mut op = lock(&ctx.operator);
        if op.current.is_none() {
            op.spawn(ctx.clock)?;
            ctx.journal.record("operator-start", format!("process {} started", op.generation));
        }
    }
    Ok(())
}

async fn control_plane_faults(ctx: Arc<Ctx>, restarts: Vec<(f64, &'static str)>) -> Result<()> {
    let script = flowtel_e2e::repo_root().join("e2e/cluster");
    for (at, component) in restarts {
        tokio::time::sleep_until(ctx.clock.at(at)).await;
        ctx.journal.record("restart-begin", component);
        let t0 = Instant::now();
        let out = tokio::process::Command::new(&script).args(["restart", component]).output().await?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(format!("`e2e/cluster restart {component}` failed ({}):\n{stderr}", out.status).into());
        }
        ctx.journal.record("restart", format!("{component} healthy again after {:.1} s", t0.elapsed().as_secs_f64()));
    }
    Ok(())
}

async fn collector_faults(ctx: Arc<Ctx>, kills: Vec<(f64, f64)>) -> Result<()> {
    for (at, down) in kills {
        tokio::time::sleep_until(ctx.clock.at(at)).await;
        ctx.collector_down.store(true, Ordering::SeqCst);
        lock(&ctx.collector).current = None;
        ctx.journal.record("collector-kill", format!("SIGKILLed; down for {down:.1} s"));
        tokio::time::sleep(Duration::from_secs_f64(down)).await;
        let port = {
            let mut c = lock(&ctx.collector);
            c.spawn(ctx.clock)?;
            c.port
        };
        if !wait_port(port, Duration::from_secs(30)).await {
            return Err(format!("the collector did not listen on {port} again; see {}", ctx.dir.display()).into());
        }
        ctx.collector_down.store(false, Ordering::SeqCst);
        ctx.journal.record("collector-start", "listening again");
    }
    Ok(())
}

/// Every second: the operator's `/metrics` (the last sample per process is what the process counted), and a
/// watchdog that notices a process ending by itself, records it and starts a new one so the run goes on.
async fn scraper(ctx: Arc<Ctx>, stop: Arc<AtomicBool>) -> Result<()> {
    while !stop.load(Ordering::SeqCst) {
        scrape_once(&ctx).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

async fn scrape_once(ctx: &Ctx) -> Result<()> {
    let (generation, admin) = {
        let mut op = lock(&ctx.operator);
        if let Some(status) = op.exited() {
            ctx.journal.record("operator-exit", format!("process {} ended by itself ({status})", op.generation));
            op.spawn(ctx.clock)?;
            ctx.journal.record("operator-start", format!("process {} started", op.generation));
        }
        (op.generation, op.admin.clone())
    };
    if !ctx.collector_down.load(Ordering::SeqCst) {
        let mut c = lock(&ctx.collector);
        if let Some(status) = c.exited() {
            ctx.journal.record("collector-exit", format!("ended by itself ({status}); starting it again"));
            c.spawn(ctx.clock)?;
        }
    }
    let body = tokio::task::spawn_blocking(move || http_get(&admin, "/metrics")).await?;
    if let Some(body) = body {
        lock(&ctx.scraped).insert(generation, parse_counters(&body));
    }
    Ok(())
}

fn run_api(client: &kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("flowtel.dev", "v1alpha1", "WorkflowRun");
    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk_with_plural(&gvk, "workflowruns"))
}

/// A run as the report needs it, read as JSON so that the harness does not break when the API types change.
#[derive(Clone)]
struct RunView {
    name: String,
    uid: String,
    phase: String,
    reason: String,
    attempts: i64,
    finished: bool,
    dropped: bool,
}

impl RunView {
    fn of(o: &DynamicObject) -> Self {
        let status = &o.data["status"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let reason = status["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Succeeded"))
            .map(|c| text(&c["reason"]))
            .unwrap_or_default();
        Self {
            name: o.metadata.name.clone().unwrap_or_default(),
            uid: o.metadata.uid.clone().unwrap_or_default(),
            phase: text(&status["phase"]),
            reason,
            attempts: status["attemptCount"].as_i64().unwrap_or_default(),
            finished: status["telemetry"]["finished"].as_bool().unwrap_or(false),
            dropped: status["telemetry"]["dropped"].as_bool().unwrap_or(false),
        }
    }

    fn terminal(&self) -> bool {
        self.phase == "Succeeded" || self.phase == "Failed"
    }

    fn done(&self) -> bool {
        self.terminal() && self.finished
    }

    /// The `status` label `workflow.run.status` should carry for this run.
    fn status_label(&self) -> &'static str {
        match (self.phase.as_str(), self.reason.as_str()) {
            ("Succeeded", _) => "success",
            (_, "Cancelled") => "cancelled",
            _ => "failure",
        }
    }
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

/// The OTLP documents of a collector output file that every collector process appended to.
fn json_lines(path: &Path) -> Vec<Value> {
    flowtel_e2e::otlp_documents(&std::fs::read_to_string(path).unwrap_or_default())
}

fn attr(item: &Value, key: &str) -> Option<String> {
    item["attributes"].as_array()?.iter().find(|a| a["key"] == key).and_then(|a| {
        let v = &a["value"];
        v["stringValue"].as_str().map(str::to_string).or_else(|| v["intValue"].as_str().map(str::to_string))
    })
}

/// Sum over operator processes of each counter series `(metric, workflow_name, status)`: the largest value per
/// process (resource `service.instance.id`) and start time, added up. That is the latest of a cumulative series and
/// every point of a delta one (each delta point has its own start time).
fn counters_across_processes(dir: &Path, prefix: &str) -> BTreeMap<(String, String, String), i64> {
    let mut latest = BTreeMap::<(String, String, String, String, String), i64>::new();
    for doc in json_lines(&dir.join("metrics.json")) {
        for rm in doc["resourceMetrics"].as_array().into_iter().flatten() {
            let instance = attr(&rm["resource"], "service.instance.id").unwrap_or_default();
            for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                for m in sm["metrics"].as_array().into_iter().flatten() {
                    let name = m["name"].as_str().unwrap_or_default();
                    if !matches!(name, "workflow.run.total" | "workflow.run.status" | "workflow.retry.count") {
                        continue;
                    }
                    for p in m["sum"]["dataPoints"].as_array().into_iter().flatten() {
                        let Some(workflow) = attr(p, "workflow_name").filter(|w| w.starts_with(prefix)) else {
                            continue;
                        };
                        let status = attr(p, "status").unwrap_or_default();
                        let start = p["startTimeUnixNano"].as_str().unwrap_or_default().to_string();
                        let value = p["asInt"].as_str().and_then(|s| s.parse().ok()).unwrap_or_default();
                        let key = (name.to_string(), workflow, status, instance.clone(), start);
                        let e = latest.entry(key).or_default();
                        *e = (*e).max(value);
                    }
                }
            }
        }
    }
    let mut sums = BTreeMap::new();
    for ((name, workflow, status, _, _), v) in latest {
        *sums.entry((name, workflow, status)).or_default() += v;
    }
    sums
}

#[derive(Default)]
struct SpanCounts {
    /// workflow.run spans received, duplicates included.
    run_raw: usize,
    /// Distinct workflow.run span ids per run UID.
    run_ids: BTreeMap<String, BTreeSet<String>>,
    /// Distinct workflow.attempt span ids per run UID.
    attempt_ids: BTreeMap<String, BTreeSet<String>>,
}

fn spans(dir: &Path, uids: &BTreeSet<String>) -> SpanCounts {
    let mut out = SpanCounts::default();
    for doc in json_lines(&dir.join("traces.json")) {
        for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                for s in ss["spans"].as_array().into_iter().flatten() {
                    let Some(uid) = attr(s, "workflow.run_id").filter(|u| uids.contains(u)) else { continue };
                    let id = s["spanId"].as_str().unwrap_or_default().to_string();
                    if s["name"] == "workflow.run" {
                        out.run_raw += 1;
                        out.run_ids.entry(uid).or_default().insert(id);
                    } else if s["name"] == "workflow.attempt" {
                        out.attempt_ids.entry(uid).or_default().insert(id);
                    }
                }
            }
        }
    }
    out
}

/// The run a Job belongs to: Job names are `<run>-<attempt>`.
fn run_of_job(job: &str) -> (&str, Option<i64>) {
    match job.rsplit_once('-') {
        Some((run, n)) if n.chars().all(|c| c.is_ascii_digit()) => (run, n.parse().ok()),
        _ => (job, None),
    }
}

#[derive(Default)]
struct AuditCounts {
    /// Successful creations (HTTP 201, by create or by server-side apply) per Job name.
    job_creates: BTreeMap<String, u32>,
    /// The operator's writes (Events apart) per run, Jobs counted with their run.
    writes_by_run: BTreeMap<String, u64>,
    writes_by_request: BTreeMap<String, u64>,
    writes_by_code: BTreeMap<i64, u64>,
    writes: u64,
    events: u64,
    conflicts: u64,
    errors: u64,
}

/// Counts the operator's requests in one namespace from the apiserver's audit log (and its rotated files).
fn audit(logs: &Path, namespace: &str) -> Result<AuditCounts> {
    let mut out = AuditCounts::default();
    for e in flowtel_e2e::audit::audit_entries(logs, namespace) {
        if e.resource == "jobs" && e.subresource.is_none() && e.code == 201 {
            *out.job_creates.entry(e.name.clone()).or_default() += 1;
        }
        if !e.by_operator || !e.is_write() {
            continue;
        }
        if e.resource == "events" {
            out.events += 1;
            continue;
        }
        out.writes += 1;
        *out.writes_by_code.entry(e.code).or_default() += 1;
        match e.code {
            409 => out.conflicts += 1,
            200..=299 => {}
            _ => out.errors += 1,
        }
        *out.writes_by_request.entry(e.request()).or_default() += 1;
        let run = if e.resource == "jobs" { run_of_job(&e.name).0 } else { e.name.as_str() };
        *out.writes_by_run.entry(run.to_string()).or_default() += 1;
    }
    Ok(out)
}

/// Ended, or ending: the Job controller starts no pod for a Job once it set FailureTarget or SuccessCriteriaMet.
fn job_finished(job: &Job) -> bool {
    const ENDS: [&str; 4] = ["Complete", "Failed", "FailureTarget", "SuccessCriteriaMet"];
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| ENDS.contains(&c.type_.as_str()) && c.status == "True"))
}

/// Whether a Job not marked ended may still run something: a pod active or terminating, or none counted yet (it may
/// still start one). A Job whose one pod was counted failed or succeeded and that has none left runs nothing, even
/// if the Job controller has not marked it (seen after apiserver restarts: `failed: 1`, no condition, for minutes).
fn job_may_run(job: &Job) -> bool {
    let Some(s) = job.status.as_ref() else { return true };
    let live = s.active.unwrap_or(0) + s.terminating.unwrap_or(0);
    let counted = s.failed.unwrap_or(0) + s.succeeded.unwrap_or(0);
    live > 0 || counted == 0
}

/// The run a Job belongs to: its label, else its name.
fn run_of_labelled_job(job: &Job) -> String {
    let name = job.metadata.name.clone().unwrap_or_default();
    job.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("flowtel.dev/run").cloned())
        .unwrap_or_else(|| run_of_job(&name).0.to_string())
}

/// How long the Job controller gets to mark the Jobs of finished runs ended. Its own writes fail while the apiserver
/// restarts, and it retries them with a backoff of up to a minute: a Job whose disrupted pod is long gone can lack
/// its Failed condition for that long. Flowtel's part is not to leave a Job running, which a Job still unmarked
/// after this bound shows.
const JOBS_SETTLE: Duration = Duration::from_secs(90);

/// Lists the Jobs until no Job of a finished run is unmarked and may still run (or `JOBS_SETTLE` passed); returns
/// them, with how many were so at the first look.
async fn jobs_at_rest(api: &Api<Job>, finished_runs: &BTreeSet<&str>) -> Result<(Vec<Job>, usize)> {
    let unmarked = |jobs: &[Job]| {
        jobs.iter()
            .filter(|j| {
                finished_runs.contains(run_of_labelled_job(j).as_str())
                    && j.metadata.deletion_timestamp.is_none()
                    && !job_finished(j)
                    && job_may_run(j)
            })
            .count()
    };
    let until = Instant::now() + JOBS_SETTLE;
    let mut first = None;
    loop {
        let jobs = tokio::time::timeout(Duration::from_secs(30), api.list(&ListParams::default()))
            .await
            .map_err(|_| "listing the Jobs took more than 30 s")??
            .items;
        let now_unmarked = unmarked(&jobs);
        let first = *first.get_or_insert(now_unmarked);
        if now_unmarked == 0 || Instant::now() > until {
            return Ok((jobs, first));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn examples<I: IntoIterator<Item = String>>(names: I) -> Vec<String> {
    names.into_iter().take(EXAMPLES).collect()
}

/// Builds the report from the final state: the runs, the Jobs, the audit log, the collector's files and the
/// operator's scraped counters.
async fn report(ctx: &Ctx, plan: &BTreeMap<String, Kind>, subs: &[Submitted], runs: &[RunView]) -> Result<Value> {
    let ours: Vec<&RunView> = runs.iter().filter(|r| plan.contains_key(&r.name)).collect();
    let submitted = subs.iter().filter(|s| s.ok).count();
    let terminal: Vec<&RunView> = ours.iter().copied().filter(|r| r.done()).collect();
    let terminal_names: BTreeSet<&str> = terminal.iter().map(|r| r.name.as_str()).collect();
    let not_terminal: Vec<String> = {
        let seen: BTreeMap<&str, &RunView> = ours.iter().map(|r| (r.name.as_str(), *r)).collect();
        subs.iter()
            .filter(|s| s.ok && !seen.get(s.name.as_str()).is_some_and(|r| r.done()))
            .map(|s| match seen.get(s.name.as_str()) {
                Some(r) => {
                    format!("{} ({}, finished={})", r.name, if r.phase.is_empty() { "-" } else { &r.phase }, r.finished)
                }
                None => format!("{} (missing)", s.name),
            })
            .collect()
    };
    let mut by_phase = BTreeMap::<String, usize>::new();
    let mut by_reason = BTreeMap::<String, usize>::new();
    let mut by_label = BTreeMap::<&str, i64>::new();
    for r in &terminal {
        *by_phase.entry(r.phase.clone()).or_default() += 1;
        *by_reason.entry(r.reason.clone()).or_default() += 1;
        *by_label.entry(r.status_label()).or_default() += 1;
    }
    let mut by_kind = BTreeMap::<&str, Value>::new();
    let mut mismatched = Vec::new();
    for kind in Kind::ALL {
        let of_kind: Vec<&&RunView> = terminal.iter().filter(|r| plan.get(&r.name) == Some(&kind)).collect();
        let (phase, reason, attempts) = kind.expected();
        let odd: Vec<&&RunView> = of_kind
            .iter()
            .copied()
            .filter(|r| r.phase != phase || r.reason != reason || attempts.is_some_and(|a| a != r.attempts))
            .collect();
        mismatched.extend(
            odd.iter()
                .map(|r| format!("{} ({}: {}/{}, {} attempts)", r.name, kind.name(), r.phase, r.reason, r.attempts)),
        );
        by_kind.insert(
            kind.name(),
            json!({
                "submitted": plan.values().filter(|k| **k == kind).count(),
                "terminal": of_kind.len(),
                "as_expected": of_kind.len() - odd.len(),
                "expected": {"phase": phase, "reason": reason, "attempts": attempts},
            }),
        );
    }

    // Jobs: duplicates by name (audit), more Jobs than attempts, Jobs still running for a finished run.
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let (jobs, unmarked_at_first) = jobs_at_rest(&jobs, &terminal_names).await?;
    let logs = ctx.kubeconfig.parent().map(|d| d.join("logs")).unwrap_or_default();
    let audit = audit(&logs, &ctx.namespace)?;
    let created_twice: Vec<String> =
        audit.job_creates.iter().filter(|(_, n)| **n > 1).map(|(name, n)| format!("{name} ({n}×)")).collect();
    let mut created_per_run = BTreeMap::<&str, usize>::new();
    for name in audit.job_creates.keys() {
        *created_per_run.entry(run_of_job(name).0).or_default() += 1;
    }
    let mut present_per_run = BTreeMap::<String, usize>::new();
    let mut left_running = Vec::new();
    let mut unmarked_idle = Vec::new();
    for job in &jobs {
        let name = job.metadata.name.clone().unwrap_or_default();
        let run = run_of_labelled_job(job);
        *present_per_run.entry(run.clone()).or_default() += 1;
        if terminal_names.contains(run.as_str()) && job.metadata.deletion_timestamp.is_none() && !job_finished(job) {
            // What the Job controller last wrote, to tell a Job still running from one it never marked.
            let status = serde_json::to_string(&job.status).unwrap_or_default();
            let attempts = terminal.iter().find(|r| r.name == run).map(|r| r.attempts).unwrap_or_default();
            let example = format!("{name} (its run: {attempts} attempts) {status}");
            if job_may_run(job) {
                left_running.push(example);
            } else {
                unmarked_idle.push(example);
            }
        }
    }
    let extra_jobs: Vec<String> = terminal
        .iter()
        .filter_map(|r| {
            let created = created_per_run.get(r.name.as_str()).copied().unwrap_or_default();
            let present = present_per_run.get(&r.name).copied().unwrap_or_default();
            let attempts = usize::try_from(r.attempts).unwrap_or_default();
            (created > attempts || present > attempts)
                .then(|| format!("{} ({} attempts, {created} created, {present} present)", r.name, r.attempts))
        })
        .collect();

    // Metrics, summed across operator processes.
    let sums = counters_across_processes(&ctx.dir, &ctx.prefix);
    let metric = |name: &str, status: Option<&str>| -> i64 {
        sums.iter().filter(|((n, _, s), _)| n == name && status.is_none_or(|st| s == st)).map(|(_, v)| *v).sum()
    };
    let run_total = metric("workflow.run.total", None);
    let run_status = metric("workflow.run.status", None);
    let status_by_label: BTreeMap<&str, Value> = ["success", "failure", "cancelled"]
        .into_iter()
        .map(|l| {
            let got = metric("workflow.run.status", Some(l));
            let want = by_label.get(l).copied().unwrap_or_default();
            (l, json!({"exported": got, "terminal_runs": want, "difference": got - want}))
        })
        .collect();

    // Spans, deduplicated by span id.
    let uids: BTreeSet<String> = ours.iter().map(|r| r.uid.clone()).collect();
    let span_counts = spans(&ctx.dir, &uids);
    let unique_run_spans: usize = span_counts.run_ids.values().map(BTreeSet::len).sum();
    let no_span: Vec<String> = terminal
        .iter()
        .filter(|r| span_counts.run_ids.get(&r.uid).is_none_or(BTreeSet::is_empty))
        .map(|r| format!("{}{}", r.name, if r.dropped { " (telemetry dropped)" } else { "" }))
        .collect();
    let several_ids: Vec<String> = terminal
        .iter()
        .filter(|r| span_counts.run_ids.get(&r.uid).is_some_and(|s| s.len() > 1))
        .map(|r| r.name.clone())
        .collect();
    let attempt_span_mismatch: Vec<String> = terminal
        .iter()
        .filter(|r| span_counts.run_ids.get(&r.uid).is_some_and(|s| !s.is_empty()))
        .filter_map(|r| {
            let n = span_counts.attempt_ids.get(&r.uid).map_or(0, BTreeSet::len);
            let want = usize::try_from(r.attempts.min(32)).unwrap_or_default();
            (n != want).then(|| format!("{} ({n} attempt spans, {} attempts)", r.name, r.attempts))
        })
        .collect();

    // The operator's own counters, summed over its processes.
    let mut counters = BTreeMap::<String, f64>::new();
    for sample in lock(&ctx.scraped).values() {
        for (k, v) in sample {
            *counters.entry(k.clone()).or_default() += v;
        }
    }
    let (processes, scraped) = (lock(&ctx.operator).generation, lock(&ctx.scraped).len());

    let submit_failed =
        subs.iter().filter(|s| !s.ok).map(|s| format!("{}: {}", s.name, s.error.clone().unwrap_or_default()));
    let harness_errors =
        subs.iter().filter(|s| s.ok).filter_map(|s| s.error.clone().map(|e| format!("{}: {e}", s.name)));
    let terminal_count = terminal.len();
    let per_run = |n: u64| if terminal_count == 0 { 0.0 } else { n as f64 / terminal_count as f64 };
    let busiest = audit.writes_by_run.iter().filter(|(r, _)| plan.contains_key(*r)).max_by_key(|(_, n)| **n);
    Ok(json!({
        "runs": {
            "submitted": submitted,
            "submit_failed": examples(submit_failed),
            "submit_retries": subs.iter().map(|s| u64::from(s.retries)).sum::<u64>(),
            "harness_errors": examples(harness_errors),
            "terminal": terminal_count,
            "by_phase": by_phase,
            "by_reason": by_reason,
            "by_kind": by_kind,
            "outcome_differs": mismatched.len(),
            "outcome_differs_examples": examples(mismatched),
            "not_terminal": not_terminal.len(),
            "not_terminal_examples": examples(not_terminal),
            "telemetry_dropped": terminal.iter().filter(|r| r.dropped).count(),
        },
        "jobs": {
            "created": audit.job_creates.len(),
            "names_created_more_than_once": created_twice.len(),
            "names_created_more_than_once_examples": examples(created_twice),
            "runs_with_more_jobs_than_attempts": extra_jobs.len(),
            "runs_with_more_jobs_than_attempts_examples": examples(extra_jobs),
            "left_running_by_finished_runs": left_running.len(),
            "not_yet_marked_ended_at_first_look": unmarked_at_first,
            "never_marked_ended_with_no_pod_left": unmarked_idle.len(),
            "never_marked_ended_with_no_pod_left_examples": examples(unmarked_idle),
            "left_running_examples": examples(left_running),
        },
        "metrics": {
            "workflow.run.total": {
                "exported": run_total, "terminal_runs": terminal_count, "difference": run_total - terminal_count as i64
            },
            "workflow.run.status": {
                "exported": run_status, "terminal_runs": terminal_count,
                "difference": run_status - terminal_count as i64, "by_status": status_by_label
            },
            "workflow.retry.count": metric("workflow.retry.count", None),
        },
        "spans": {
            "workflow_run_raw": span_counts.run_raw,
            "workflow_run_unique": unique_run_spans,
            "raw_duplicates": span_counts.run_raw.saturating_sub(unique_run_spans),
            "terminal_runs_without_span": no_span.len(),
            "terminal_runs_without_span_examples": examples(no_span),
            "runs_with_several_span_ids": several_ids.len(),
            "runs_with_several_span_ids_examples": examples(several_ids),
            "runs_whose_attempt_spans_differ_from_attempts": attempt_span_mismatch.len(),
            "attempt_span_examples": examples(attempt_span_mismatch),
        },
        "operator": {
            "processes": processes,
            "processes_scraped": scraped,
            "counters_summed": counters,
        },
        "writes": {
            "total": audit.writes,
            "per_terminal_run": (per_run(audit.writes) * 100.0).round() / 100.0,
            "busiest_run": busiest.map(|(r, n)| json!({"run": r, "writes": n})),
            "by_request": audit.writes_by_request,
            "conflicts_409": audit.conflicts,
            "by_code": audit.writes_by_code,
            "other_errors": audit.errors,
            "events": audit.events,
            "events_per_terminal_run": (per_run(audit.events) * 100.0).round() / 100.0,
        },
    }))
}

/// The one table: each figure with its goal, where there is one.
fn table(r: &Value, ctx: &Ctx, header: &str) -> String {
    let mut t = String::new();
    let mut row = |what: &str, value: String, goal: &str| {
        let _ = writeln!(t, "{what:<58} {value:>14}   {goal}");
    };
    let n = |v: &Value| v.as_i64().map_or_else(|| v.to_string(), |x| x.to_string());
    let signed = |v: &Value| v.as_i64().map_or_else(|| v.to_string(), |x| format!("{x:+}"));
    let kills = ctx.journal.count("operator-kill");
    let exits = ctx.journal.count("operator-exit");
    row("runs submitted", n(&r["runs"]["submitted"]), "");
    row("runs terminal with telemetry exported", n(&r["runs"]["terminal"]), "all");
    for (map, label) in [("by_phase", "phase"), ("by_reason", "Succeeded condition reason")] {
        for (k, v) in r["runs"][map].as_object().into_iter().flatten() {
            row(&format!("  {label} {}", if k.is_empty() { "-" } else { k }), n(v), "");
        }
    }
    let kinds: Vec<String> = r["runs"]["by_kind"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} {}/{}", n(&v["as_expected"]), n(&v["submitted"])))
        .collect();
    row("  as expected per kind (terminal & right outcome / submitted)", String::new(), "");
    for chunk in kinds.chunks(3) {
        row(&format!("    {}", chunk.join(", ")), String::new(), "");
    }
    row("runs whose outcome or attempts differ from their kind", n(&r["runs"]["outcome_differs"]), "0");
    row("runs not terminal after the bound", n(&r["runs"]["not_terminal"]), "0");
    let at = |kind: &str| ctx.journal.at(kind).map_or_else(|| "-".to_string(), |t| format!("{t:.0} s"));
    row("  faults ended at / the wait for the runs ended at", format!("{} / {}", at("faults-over"), at("settled")), "");
    row("runs with telemetry dropped", n(&r["runs"]["telemetry_dropped"]), "0");
    row("Job names created more than once (audit: 201s)", n(&r["jobs"]["names_created_more_than_once"]), "0");
    row(
        "runs with more Jobs than attempts (created or present)",
        n(&r["jobs"]["runs_with_more_jobs_than_attempts"]),
        "0",
    );
    row(
        "Jobs of finished runs unmarked, may run (first look)",
        n(&r["jobs"]["not_yet_marked_ended_at_first_look"]),
        "",
    );
    row(
        "Jobs of finished runs never marked, no pod left (Job controller)",
        n(&r["jobs"]["never_marked_ended_with_no_pod_left"]),
        "",
    );
    row("Jobs left running by finished runs (after up to 90 s)", n(&r["jobs"]["left_running_by_finished_runs"]), "0");
    let m = &r["metrics"];
    let worst = format!("0, at worst +1 per kill ({})", kills + exits);
    row("workflow.run.total (all processes) - terminal runs", signed(&m["workflow.run.total"]["difference"]), &worst);
    row("workflow.run.status (all processes) - terminal runs", signed(&m["workflow.run.status"]["difference"]), &worst);
    for (k, v) in m["workflow.run.status"]["by_status"].as_object().into_iter().flatten() {
        row(
            &format!("  status={k}: exported - terminal"),
            format!("{} - {}", n(&v["exported"]), n(&v["terminal_runs"])),
            "",
        );
    }
    let s = &r["spans"];
    row("terminal runs without a workflow.run span", n(&s["terminal_runs_without_span"]), "0");
    row("runs with more than one workflow.run span id", n(&s["runs_with_several_span_ids"]), "0");
    row("workflow.run spans received twice (same span id)", n(&s["raw_duplicates"]), "few (re-export after a kill)");
    row(
        "runs whose attempt spans differ from their attempts",
        n(&s["runs_whose_attempt_spans_differ_from_attempts"]),
        "0",
    );
    let op = &r["operator"];
    row("operator processes (kills by the harness)", format!("{} ({kills})", n(&op["processes"])), "");
    row("operator exits not caused by the harness", exits.to_string(), "0");
    let c = &op["counters_summed"];
    for (name, label) in [
        ("flowtel_telemetry_export_failures_total", "export failures (/metrics: last scrape per process, sum)"),
        ("flowtel_telemetry_dropped_total", "telemetry dropped (/metrics: last scrape per process, sum)"),
        ("flowtel_status_writes_total", "status writes (/metrics: last scrape per process, sum)"),
    ] {
        row(label, c.get(name).map_or_else(|| "missing".to_string(), |v| v.to_string()), "");
    }
    let w = &r["writes"];
    row("operator writes per terminal run (audit, Events apart)", w["per_terminal_run"].to_string(), "");
    row(
        "  total / 409 conflicts / other errors",
        format!("{} / {} / {}", n(&w["total"]), n(&w["conflicts_409"]), n(&w["other_errors"])),
        "",
    );
    row("operator Events per terminal run", w["events_per_terminal_run"].to_string(), "");
    let width = 90;
    format!("{header}\n{}\n{:<58} {:>14}   goal\n{t}{}", "-".repeat(width), "", "value", "-".repeat(width))
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
    let s = schedule(rng, window, args.faults_scale);
    eprintln!(
        "[chaos {:7.1} s] {} runs over {submit_secs:.0} s; faults over 3–{window:.0} s: {} operator kills, {} \
         control-plane restarts, {} collector kills",
        ctx.clock.secs(),
        args.runs,
        s.operator_kills.len(),
        s.control_plane.len(),
        s.collector_kills.len()
    );

    let start = ctx.clock.secs();
    let faults = vec![
        tokio::spawn(operator_faults(ctx.clone(), s.operator_kills.iter().map(|(t, d)| (start + t, *d)).collect())),
        tokio::spawn(control_plane_faults(ctx.clone(), s.control_plane.iter().map(|(t, c)| (start + t, *c)).collect())),
        tokio::spawn(collector_faults(ctx.clone(), s.collector_kills.iter().map(|(t, d)| (start + t, *d)).collect())),
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
    let port = {
        let mut c = lock(&ctx.collector);
        c.spawn(ctx.clock)?;
        c.port
    };
    if !wait_port(port, Duration::from_secs(30)).await {
        return Err(format!("the collector did not listen on {port}; see {}", ctx.dir.display()).into());
    }
    ctx.collector_down.store(false, Ordering::SeqCst);
    let admin = {
        let mut op = lock(&ctx.operator);
        op.spawn(ctx.clock)?;
        op.admin.clone()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = admin.clone();
        if tokio::task::spawn_blocking(move || http_get(&a, "/readyz")).await?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            return Err(
                format!("the operator was not ready in 60 s; see {}", ctx.dir.join("operator.log").display()).into()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
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
        "chaos run {} (namespace {}, seed {}, {} runs at {}/s): {} operator kills, {} control-plane restarts, \
         {} collector kills, {:.0} s",
        ctx.prefix,
        ctx.namespace,
        args.seed,
        args.runs,
        args.rate,
        ctx.journal.count("operator-kill"),
        ctx.journal.count("restart"),
        ctx.journal.count("collector-kill"),
        ctx.clock.secs(),
    );
    let table = table(&result, &ctx, &header);
    result["chaos"] = json!({
        "prefix": ctx.prefix, "namespace": ctx.namespace, "seed": args.seed, "runs": args.runs, "rate": args.rate,
        "faults_scale": args.faults_scale, "files": ctx.dir, "faults": faults,
    });
    Ok((result, table))
}
