//! Many processes of the `sync` workflow at once, each with its own run's environment (as flowtel injects it),
//! exporting to the data-path collectors; what they recorded, worked out from their seeded knobs; and Prometheus
//! checked against it. Shared by the data-path tests that count every point.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;

use crate::backends::{Backends, prometheus_query, sum};
use crate::flowtel_binary;

pub const WAIT: Duration = Duration::from_secs(120);
const ITEMS: u64 = 3;
const FLAKY_PERCENT: u64 = 10;
/// The SDK's retry policy in `flowtel_workflows::Knobs::external`.
const CALL_ATTEMPTS: u64 = 5;

fn workspace_binary(name: &str) -> PathBuf {
    flowtel_binary().expect("flowtel binary").with_file_name(name)
}

/// What one `sync` process records, worked out from its knobs the way `flowtel_workflows` draws them (fastrand seeded
/// by `WORKFLOW_SEED`: one draw per external call attempt, then one per uploaded image's size).
#[derive(Default)]
pub struct Recorded(pub BTreeMap<&'static str, f64>);

impl Recorded {
    pub fn add(&mut self, metric: &'static str, n: f64) {
        *self.0.entry(metric).or_default() += n;
    }

    pub fn of_sync(seed: u64) -> Self {
        let mut sim = Sim { rng: fastrand::Rng::with_seed(seed), r: Recorded::default() };
        // The steps of `sync`, in order; the first that fails ends the run.
        let ok = 'run: {
            let fetched = sim.call();
            if !sim.step(fetched) {
                break 'run false;
            }
            sim.r.add("spans", 1.0); // transform_phones (#[instrument])
            sim.step(true); // transform: no external call
            let upserted = sim.call();
            if upserted {
                sim.r.add("workflow_db_upsert", ITEMS as f64);
                sim.r.add("workflow_db_upsert_duration_ms_count", 1.0);
            }
            if !sim.step(upserted) {
                break 'run false;
            }
            let mut uploaded = true;
            for _ in 0..ITEMS {
                uploaded = sim.call();
                if !uploaded {
                    break;
                }
                sim.next(); // the image's simulated size
                sim.r.add("workflow_image_uploaded", 1.0);
                sim.r.add("workflow_image_size_bytes_count", 1.0);
            }
            sim.step(uploaded)
        };
        let mut r = sim.r;
        r.add("spans", 1.0); // the workflow's root span
        r.add("workflow_run_total", 1.0);
        r.add("workflow_run_status", 1.0);
        r.add("workflow_run_duration_ms_count", 1.0);
        r.add(if ok { "runs_succeeded" } else { "runs_failed" }, 1.0);
        r
    }
}

/// `sync` replayed: its random draws and what it records.
struct Sim {
    rng: fastrand::Rng,
    r: Recorded,
}

impl Sim {
    fn next(&mut self) -> u64 {
        self.rng.u64(..)
    }

    /// An external call: attempts until one passes or the policy's attempts are used; each failure but the last is
    /// a retry.
    fn call(&mut self) -> bool {
        self.r.add("spans", 1.0); // the call's span, around its attempts
        for attempt in 1..=CALL_ATTEMPTS {
            if self.next() % 100 >= FLAKY_PERCENT {
                return true;
            }
            if attempt < CALL_ATTEMPTS {
                self.r.add("workflow_retry_count", 1.0);
            }
        }
        false
    }

    fn step(&mut self, ok: bool) -> bool {
        self.r.add("spans", 1.0);
        self.r.add("workflow_step_status", 1.0);
        self.r.add("workflow_step_duration_ms_count", 1.0);
        self.r.add(if ok { "steps_succeeded" } else { "steps_failed" }, 1.0);
        ok
    }
}

/// The queries whose values must equal what was recorded, by the recorded key.
/// The series whose sums must equal what was recorded, by the recorded key.
const CHECKS: [(&str, &str); 13] = [
    ("workflow_run_total", "workflow_run_total{workflow_name=\"sync\"}"),
    ("workflow_run_status", "workflow_run_status{workflow_name=\"sync\"}"),
    ("runs_succeeded", "workflow_run_status{workflow_name=\"sync\",status=\"success\"}"),
    ("runs_failed", "workflow_run_status{workflow_name=\"sync\",status=\"failure\"}"),
    ("workflow_run_duration_ms_count", "workflow_run_duration_ms_count{workflow_name=\"sync\"}"),
    ("workflow_step_status", "workflow_step_status{workflow_name=\"sync\"}"),
    ("steps_succeeded", "workflow_step_status{workflow_name=\"sync\",status=\"success\"}"),
    ("workflow_step_duration_ms_count", "workflow_step_duration_ms_count{workflow_name=\"sync\"}"),
    ("workflow_retry_count", "workflow_retry_count{workflow_name=\"sync\"}"),
    ("workflow_image_uploaded", "workflow_image_uploaded{workflow_name=\"sync\"}"),
    ("workflow_image_size_bytes_count", "workflow_image_size_bytes_count{workflow_name=\"sync\"}"),
    ("workflow_db_upsert", "workflow_db_upsert{workflow_name=\"sync\"}"),
    ("workflow_db_upsert_duration_ms_count", "workflow_db_upsert_duration_ms_count{workflow_name=\"sync\"}"),
];

/// What the library's shutdown reports said it could not deliver, summed over processes: printed on the console by
/// its fallback (the endpoint was down), or dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Undelivered {
    /// Processes whose report was not empty.
    pub processes: u64,
    pub spans_to_console: u64,
    pub spans_dropped: u64,
    pub logs_to_console: u64,
    pub logs_dropped: u64,
    pub metric_points_to_console: u64,
}

impl Undelivered {
    /// Adds a process's `telemetry not exported: ShutdownReport { .. }` line, if it printed one.
    fn add_report(&mut self, stderr: &str) {
        let Some(report) = stderr.split("telemetry not exported: ").nth(1) else { return };
        let field = |name: &str| -> u64 {
            report
                .split(&format!("{name}: "))
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        self.processes += 1;
        self.spans_to_console += field("spans_to_console");
        self.spans_dropped += field("spans_dropped");
        self.logs_to_console += field("logs_to_console");
        self.logs_dropped += field("logs_dropped");
        self.metric_points_to_console += field("metric_points_to_console");
    }

    pub fn add(&mut self, other: &Undelivered) {
        self.processes += other.processes;
        self.spans_to_console += other.spans_to_console;
        self.spans_dropped += other.spans_dropped;
        self.logs_to_console += other.logs_to_console;
        self.logs_dropped += other.logs_dropped;
        self.metric_points_to_console += other.metric_points_to_console;
    }
}

/// Runs the `sync` processes `from..to` at once, each with its own run's environment (as flowtel injects it) and
/// the OTLP endpoint of collector replica `i % replicas` (what a Service's connection balancing gives a pod); every
/// process must deliver all its telemetry.
pub fn run_processes(backends: &Backends, from: u64, to: u64) -> Recorded {
    let (recorded, undelivered) = run_processes_on(&backends.collector_grpc, from, to);
    assert_eq!(undelivered, Undelivered::default(), "processes {from}..{to} lost telemetry");
    recorded
}

/// Runs the `sync` processes `from..to` at once against the collector gRPC `ports` (process `i` on
/// `ports[i % len]`): what they recorded, and what their shutdown reports say they could not deliver.
pub fn run_processes_on(ports: &[u16], from: u64, to: u64) -> (Recorded, Undelivered) {
    let children: Vec<_> = (from..to)
        .map(|i| {
            let port = ports[i as usize % ports.len()];
            Command::new(workspace_binary("sync"))
                .env_clear()
                .env("OTEL_SERVICE_NAME", "sync")
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}"))
                .env(
                    "OTEL_RESOURCE_ATTRIBUTES",
                    format!(
                        "service.version=1.0.0,workflow.name=sync,workflow.run_id=run-{i},workflow.attempt=1,\
                         k8s.namespace.name=concurrency,k8s.job.name=sync-{i}-1,k8s.pod.name=sync-{i}-1-pod"
                    ),
                )
                .env("TRACEPARENT", traceparent(i))
                // Outside an operator's count, the library records the run-level metrics too: all ten in play.
                .env("FLOWTEL_RUN_METRICS", "library")
                .env("WORKFLOW_ITEMS", ITEMS.to_string())
                .env("WORKFLOW_STEP_MS", "1")
                .env("WORKFLOW_FLAKY_PERCENT", FLAKY_PERCENT.to_string())
                .env("WORKFLOW_SEED", (i + 1).to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("sync")
        })
        .collect();
    let mut recorded = Recorded::default();
    let mut undelivered = Undelivered::default();
    for child in children {
        let out = child.wait_with_output().expect("sync ran");
        undelivered.add_report(&String::from_utf8_lossy(&out.stderr));
    }
    for i in from..to {
        for (metric, n) in Recorded::of_sync(i + 1).0 {
            recorded.add(metric, n);
        }
    }
    (recorded, undelivered)
}

/// The W3C traceparent process `i` runs under: its trace id is `trace_id(i)`.
pub fn traceparent(i: u64) -> String {
    format!("00-{}-{:016x}-01", trace_id(i), 0x5000 + i)
}

pub fn trace_id(i: u64) -> String {
    format!("{:032x}", 0xabc0_0000_0000u64 + i)
}

/// Each check's sum: of the series' latest samples (an instant query looks back five minutes), or, with
/// `within` (a PromQL range such as `1h`), of their last samples in that range: samples a queue delivered late
/// carry the time they were made.
pub async fn values(prom: &str, within: Option<&str>) -> BTreeMap<&'static str, f64> {
    let mut out = BTreeMap::new();
    for (key, selector) in CHECKS {
        let series = match within {
            None => selector.to_string(),
            Some(range) => format!("last_over_time({selector}[{range}])"),
        };
        out.insert(key, sum(&prometheus_query(prom, &format!("sum({series})")).await));
    }
    out
}

/// Each check's total over the last `range` with counter resets undone (a collector restarted starts its totals
/// from zero under the same series): per series, the value before each drop plus the last value, from the raw
/// samples.
pub async fn totals_across_resets(prom: &str, range: &str) -> BTreeMap<&'static str, f64> {
    let mut out = BTreeMap::new();
    for (key, selector) in CHECKS {
        let mut total = 0.0;
        for series in prometheus_query(prom, &format!("{selector}[{range}]")).await {
            let values: Vec<f64> =
                series["values"].as_array().into_iter().flatten().filter_map(|v| v[1].as_str()?.parse().ok()).collect();
            total += values.windows(2).filter(|w| w[1] < w[0]).map(|w| w[0]).sum::<f64>();
            total += values.last().copied().unwrap_or(0.0);
        }
        out.insert(key, total);
    }
    out
}

pub fn expected(recorded: &Recorded) -> BTreeMap<&'static str, f64> {
    CHECKS.iter().map(|(key, _)| (*key, recorded.0.get(key).copied().unwrap_or(0.0))).collect()
}

/// Series of the workflow's metrics in Prometheus.
pub async fn series(prom: &str) -> f64 {
    sum(&prometheus_query(prom, "count({__name__=~\"workflow_.+\", workflow_name=\"sync\"})").await)
}

/// Waits until Prometheus holds exactly `want`, then holds that through a quiet period of three aggregation
/// intervals (a late or repeated point would change it).
pub async fn exact(prom: &str, want: &BTreeMap<&'static str, f64>, within: Option<&str>) {
    let reached = Instant::now();
    let mut last = BTreeMap::new();
    let got = tokio::time::timeout(WAIT, async {
        loop {
            last = values(prom, within).await;
            if &last == want {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
    .await;
    assert!(got.is_ok(), "Prometheus never held what the processes recorded:\n want {want:?}\n got  {last:?}");
    println!("exact after {:.1} s: {want:?}", reached.elapsed().as_secs_f64());
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = values(prom, within).await;
        assert_eq!(&now, want, "changed during the quiet period");
    }
}

/// The Job's first container's environment, as the Job declares it (a test resolves it as the kubelet would with
/// `flowtel::pool::agent::resolve_env`, the code a WorkerPool's agent resolves a pooled run's with).
pub fn job_container_env(job: &Job) -> Vec<k8s_openapi::api::core::v1::EnvVar> {
    job.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
}
