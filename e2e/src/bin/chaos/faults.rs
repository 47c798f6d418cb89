//! The faults and the processes they hit: the operator and the collector as processes, the schedule, the fault tasks
//! and the `/metrics` scraper.

use super::*;

/// A child process of ours, SIGKILLed when dropped, so that a harness error leaves nothing running.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn append_log(path: &Path, banner: &str) -> Result<std::fs::File> {
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(log, "==== chaos: {banner} ====")?;
    Ok(log)
}

/// The operator, one process at a time; each process is a new generation with its own admin port (a killed
/// process's port is not reused, so a scrape can never read the next process by mistake).
pub(crate) struct OperatorCtl {
    pub(crate) bin: PathBuf,
    pub(crate) kubeconfig: PathBuf,
    pub(crate) namespace: String,
    pub(crate) otlp: String,
    pub(crate) log: PathBuf,
    pub(crate) current: Option<Proc>,
    pub(crate) generation: usize,
    pub(crate) admin: String,
    pub(crate) economy: String,
    /// The dispatcher's address in the pooled mode: fixed, as a Service's, so that workers find every process.
    pub(crate) dispatch: Option<String>,
}

impl OperatorCtl {
    pub(crate) fn spawn(&mut self, clock: Clock) -> Result<()> {
        self.generation += 1;
        self.admin = format!("127.0.0.1:{}", flowtel_e2e::free_port());
        let log = append_log(&self.log, &format!("operator process {} at {:.1} s", self.generation, clock.secs()))?;
        let child = Command::new(&self.bin)
            .args(["run", "--namespace", &self.namespace, "--otlp-endpoint", &self.otlp])
            .args(["--admin-addr", &self.admin, "--concurrency", "32", "--write-economy", &self.economy])
            .args(self.dispatch.iter().flat_map(|addr| ["--dispatch-addr", addr.as_str()]))
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
    pub(crate) fn kill(&mut self) -> bool {
        self.current.take().is_some()
    }

    /// The exit status of a process that ended without being killed by us.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        ended(&mut self.current)
    }
}

/// The exit status of `current` if it ended by itself (and then it is gone).
fn ended(current: &mut Option<Proc>) -> Option<ExitStatus> {
    let status = current.as_mut().and_then(|p| p.0.try_wait().ok().flatten())?;
    *current = None;
    Some(status)
}

/// The pool's workers: `flowtel worker` agents, host processes standing in for the pool's pods (KWOK's pods run
/// nothing). A killed worker is replaced by a new one with a new name, as a Deployment replaces a pod.
pub(crate) struct WorkersCtl {
    pub(crate) bin: PathBuf,
    pub(crate) dispatch_url: String,
    /// `<namespace>/<pool>`.
    pub(crate) pool: String,
    pub(crate) token: PathBuf,
    pub(crate) executions: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) slots: Vec<Option<Proc>>,
    pub(crate) starts: usize,
}

impl WorkersCtl {
    pub(crate) fn spawn(&mut self, slot: usize) -> Result<()> {
        self.starts += 1;
        let name = format!("chaos-w-{slot}-{}", self.starts);
        let log = append_log(&self.log, &format!("worker {name}"))?;
        let child = Command::new(&self.bin)
            .args(["worker", "--dispatch-url", &self.dispatch_url, "--pool", &self.pool, "--pod-name", &name])
            .args(["--node-name", "kwok-node-0", "--token-file"])
            .arg(&self.token)
            .arg("--")
            .args(["/bin/sh", "-c", POOL_SCRIPT, "chaos-worker"])
            .env("CHAOS_EXECUTIONS", &self.executions)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        self.slots[slot] = Some(Proc(child));
        Ok(())
    }

    /// SIGKILL to the worker and everything it runs; false when the slot was empty.
    pub(crate) fn kill(&mut self, slot: usize) -> bool {
        let Some(mut worker) = self.slots[slot].take() else { return false };
        flowtel_e2e::process::kill_tree(worker.0.id());
        let _ = worker.0.wait();
        true
    }

    /// The slots whose worker ended by itself (and are empty now).
    pub(crate) fn exited(&mut self) -> Vec<usize> {
        (0..self.slots.len()).filter(|slot| ended(&mut self.slots[*slot]).is_some()).collect()
    }

    pub(crate) fn kill_all(&mut self) {
        for slot in 0..self.slots.len() {
            self.kill(slot);
        }
    }
}

/// The real OpenTelemetry Collector on one fixed port, appending to files that outlive its restarts.
pub(crate) struct CollectorCtl {
    pub(crate) bin: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) port: u16,
    pub(crate) current: Option<Proc>,
    pub(crate) starts: usize,
}

impl CollectorCtl {
    pub(crate) fn spawn(&mut self, clock: Clock) -> Result<()> {
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

    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        ended(&mut self.current)
    }
}

pub(crate) fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

pub(crate) async fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !port_open(port) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// Starts the collector (again) and waits until it listens, up to 30 s.
pub(crate) async fn start_collector(ctx: &Ctx) -> Result<()> {
    let port = {
        let mut c = lock(&ctx.collector);
        c.spawn(ctx.clock)?;
        c.port
    };
    if !wait_port(port, Duration::from_secs(30)).await {
        return Err(format!("the collector did not listen on {port}; see {}", ctx.dir.display()).into());
    }
    ctx.collector_down.store(false, Ordering::SeqCst);
    Ok(())
}

/// The operator's admin endpoint `path`: the body on a 200.
pub(crate) async fn admin_get(admin: &str, path: &str) -> Option<String> {
    let (code, body) = flowtel_e2e::http_get(&format!("http://{admin}{path}")).await?;
    (code == 200).then_some(body)
}

/// `n` times in [lo, hi], sorted, at least `gap` apart when that fits (rejection sampling, then even spacing).
pub(crate) fn spread(rng: &mut Rng, n: usize, lo: f64, hi: f64, gap: f64) -> Vec<f64> {
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
pub(crate) fn scaled(count: f64, scale: f64) -> usize {
    if scale <= 0.0 { 0 } else { ((count * scale).round() as usize).max(1) }
}

pub(crate) struct Schedule {
    pub(crate) operator_kills: Vec<(f64, f64)>,
    pub(crate) control_plane: Vec<(f64, &'static str)>,
    pub(crate) collector_kills: Vec<(f64, f64)>,
    /// (when, which worker slot, how long until its replacement starts); pooled mode only.
    pub(crate) worker_kills: Vec<(f64, usize, f64)>,
}

/// The schedule, with worker kills when there are `workers` (drawn last: a seed gives the same other faults in both
/// modes).
pub(crate) fn schedule(rng: &mut Rng, window: f64, scale: f64, workers: Option<usize>) -> Schedule {
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
    let worker_kills = match workers {
        Some(n) if n > 0 => spread(rng, scaled(10.0, scale), lo, hi, 2.0)
            .into_iter()
            .map(|t| (t, (rng.next_u64() % n as u64) as usize, rng.range(1.0, 5.0)))
            .collect(),
        _ => vec![],
    };
    Schedule { operator_kills, control_plane, collector_kills, worker_kills }
}

pub(crate) async fn worker_faults(ctx: Arc<Ctx>, kills: Vec<(f64, usize, f64)>) -> Result<()> {
    let Some(workers) = ctx.workers.clone() else { return Ok(()) };
    for (at, slot, delay) in kills {
        tokio::time::sleep_until(ctx.clock.at(at)).await;
        if !lock(&workers).kill(slot) {
            ctx.journal.record("harness", format!("worker kill: slot {slot} was empty"));
            continue;
        }
        ctx.journal.record("worker-kill", format!("worker slot {slot} SIGKILLed; replaced in {delay:.1} s"));
        tokio::time::sleep(Duration::from_secs_f64(delay)).await;
        let mut w = lock(&workers);
        if w.slots[slot].is_none() {
            w.spawn(slot)?;
        }
    }
    Ok(())
}

pub(crate) async fn operator_faults(ctx: Arc<Ctx>, kills: Vec<(f64, f64)>) -> Result<()> {
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

pub(crate) async fn control_plane_faults(ctx: Arc<Ctx>, restarts: Vec<(f64, &'static str)>) -> Result<()> {
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

pub(crate) async fn collector_faults(ctx: Arc<Ctx>, kills: Vec<(f64, f64)>) -> Result<()> {
    for (at, down) in kills {
        tokio::time::sleep_until(ctx.clock.at(at)).await;
        ctx.collector_down.store(true, Ordering::SeqCst);
        lock(&ctx.collector).current = None;
        ctx.journal.record("collector-kill", format!("SIGKILLed; down for {down:.1} s"));
        tokio::time::sleep(Duration::from_secs_f64(down)).await;
        start_collector(&ctx).await?;
        ctx.journal.record("collector-start", "listening again");
    }
    Ok(())
}

/// Every second: the operator's `/metrics` (the last sample per process is what the process counted), and a
/// watchdog that notices a process ending by itself, records it and starts a new one so the run goes on.
pub(crate) async fn scraper(ctx: Arc<Ctx>, stop: Arc<AtomicBool>) -> Result<()> {
    while !stop.load(Ordering::SeqCst) {
        scrape_once(&ctx).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}

pub(crate) async fn scrape_once(ctx: &Ctx) -> Result<()> {
    let (generation, admin) = {
        let mut op = lock(&ctx.operator);
        if let Some(status) = op.exited() {
            ctx.journal.record("operator-exit", format!("process {} ended by itself ({status})", op.generation));
            op.spawn(ctx.clock)?;
            ctx.journal.record("operator-start", format!("process {} started", op.generation));
        }
        (op.generation, op.admin.clone())
    };
    if let Some(workers) = &ctx.workers {
        let mut w = lock(workers);
        for slot in w.exited() {
            // A disrupt-once run's first attempt ends its worker; the Deployment would start another pod.
            ctx.journal.record("worker-exit", format!("worker slot {slot} ended; replaced"));
            w.spawn(slot)?;
        }
    }
    if !ctx.collector_down.load(Ordering::SeqCst) {
        let mut c = lock(&ctx.collector);
        if let Some(status) = c.exited() {
            ctx.journal.record("collector-exit", format!("ended by itself ({status}); starting it again"));
            c.spawn(ctx.clock)?;
        }
    }
    let body = admin_get(&admin, "/metrics").await;
    if let Some(body) = body {
        lock(&ctx.scraped).insert(generation, flowtel_e2e::operator::unlabelled_samples(&body));
    }
    Ok(())
}
