//! The workload: seeded randomness, the kinds of runs and their manifests, the clock and the fault journal.

use super::*;

/// Seeded, so one seed gives the same workload mix and fault schedule (not the same system timing).
pub(crate) struct Rng(pub(crate) fastrand::Rng);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        self.0.f64()
    }

    pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
}

/// What a run is made to do, through the KWOK simulation labels and annotations (docs/development.md, "Simulated pods").
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(crate) enum Kind {
    Success,
    FailOnce,
    Fail,
    DisruptOnce,
    Cancel,
    Deadline,
}

impl Kind {
    pub(crate) const ALL: [Kind; 6] =
        [Kind::Success, Kind::FailOnce, Kind::Fail, Kind::DisruptOnce, Kind::Cancel, Kind::Deadline];

    pub(crate) fn name(self) -> &'static str {
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
    pub(crate) fn weight(self) -> f64 {
        match self {
            Kind::Success => 0.40,
            Kind::FailOnce | Kind::DisruptOnce => 0.15,
            Kind::Fail | Kind::Cancel | Kind::Deadline => 0.10,
        }
    }

    pub(crate) fn pick(rng: &mut Rng) -> Kind {
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
    pub(crate) fn expected(self) -> (&'static str, &'static str, Option<i64>) {
        match self {
            Kind::Success => ("Succeeded", "Succeeded", Some(1)),
            Kind::FailOnce | Kind::DisruptOnce => ("Succeeded", "Succeeded", Some(2)),
            Kind::Fail => ("Failed", "PermanentFailure", Some(1)),
            Kind::Cancel => ("Failed", "Cancelled", None),
            Kind::Deadline => ("Failed", "DeadlineExceeded", Some(1)),
        }
    }

    /// The run: a Job of a pod KWOK plays out, or, when `pooled`, a process of the pool's command (`POOL_SCRIPT`)
    /// told its kind and run by its arguments. The retry policy and deadline are the same in both modes.
    pub(crate) fn manifest(self, name: &str, workflow: &str, pooled: bool) -> Value {
        use flowtel_crds::workflow_run::{Backoff, RetryPolicy};
        use flowtel_e2e::runs::{SIM_EXIT_CODE, SIM_OUTCOME};
        let mut run = flowtel_e2e::RunBuilder::new(name, workflow).image("registry.example/chaos:1.0");
        if pooled {
            run = run.pool(POOL, &[self.name(), name]);
        }
        let retry = |limit| RetryPolicy { limit, ..RetryPolicy::default() };
        let run = match self {
            Kind::Success => run.runs_for("1s"),
            Kind::FailOnce => run
                .runs_for("1s")
                .label(SIM_OUTCOME, "fail-once")
                .retry(RetryPolicy { backoff: Backoff { base_seconds: 1, factor: 2, max_seconds: 10 }, ..retry(2) }),
            // A retry budget the permanent exit code must not use: a misclassification shows as extra attempts.
            Kind::Fail => run
                .runs_for("1s")
                .label(SIM_OUTCOME, "fail")
                .annotation(SIM_EXIT_CODE, "42")
                .retry(RetryPolicy { permanent_exit_codes: vec![42], ..retry(2) }),
            Kind::DisruptOnce => run.runs_for("1s").label(SIM_OUTCOME, "disrupt-once").retry(retry(0)),
            Kind::Cancel => run.runs_for("1h"),
            Kind::Deadline => run.runs_for("1h").deadline_seconds(5),
        };
        run.json()
    }
}

/// The WorkerPool of the pooled mode.
pub(crate) const POOL: &str = "chaos";

/// The pool's one command, `sh -c POOL_SCRIPT chaos-worker KIND RUN`: each kind as a process. Every execution
/// appends `RUN ATTEMPT PID` to `$CHAOS_EXECUTIONS` (a variable of the workers' own, not the run's), its attempt from
/// the resource attributes flowtel injects. fail-once fails, and disrupt-once kills its worker and itself (a pod
/// deleted mid-run), in the first execution that gets that far (a marker file beside the list): a worker killed by
/// the schedule before then only adds a disrupted attempt, as it does to the other kinds.
pub(crate) const POOL_SCRIPT: &str = r#"attempt=$(printf %s "$OTEL_RESOURCE_ATTRIBUTES" | tr , '\n' | sed -n 's/^workflow.attempt=//p')
echo "$2 $attempt $$" >> "$CHAOS_EXECUTIONS"
marker="$CHAOS_EXECUTIONS.$2"
case "$1" in
success) sleep 1 ;;
fail-once) sleep 1; if [ ! -e "$marker" ]; then : > "$marker"; exit 3; fi ;;
fail) sleep 1; exit 42 ;;
disrupt-once) sleep 0.5; if [ ! -e "$marker" ]; then : > "$marker"; kill -KILL "$PPID" 0; fi; sleep 0.5 ;;
*) sleep 3600 ;;
esac"#;

/// The WorkerPool: the script above as its command, arguments allowed (the kind and the run), a one-pod
/// Deployment that KWOK simulates (the real workers are the harness's agents).
pub(crate) fn pool_manifest() -> Value {
    json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": POOL},
        "spec": {
            "template": {"spec": {"containers": [{"name": "main", "image": "registry.example/chaos:1.0",
                "command": ["/bin/sh", "-c", POOL_SCRIPT, "chaos-worker"]}]}},
            "allowArgs": true,
            "replicas": {"min": 1, "max": 1}
        }
    })
}

/// One planned run: its kind, and for a cancel, how long after its submission the cancel is sent.
pub(crate) struct PlannedRun {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) cancel_after: Duration,
}

/// Seconds since the chaos run started, for every recorded event.
#[derive(Clone, Copy)]
pub(crate) struct Clock(pub(crate) Instant);

impl Clock {
    pub(crate) fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }

    pub(crate) fn at(&self, secs: f64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.0 + Duration::from_secs_f64(secs.max(0.0)))
    }
}

/// The faults injected (and anything the harness saw go down by itself), with their times.
#[derive(Clone)]
pub(crate) struct Journal {
    pub(crate) clock: Clock,
    pub(crate) entries: Arc<Mutex<Vec<Value>>>,
}

impl Journal {
    pub(crate) fn record(&self, kind: &str, detail: impl Into<String>) {
        let at = self.clock.secs();
        let detail = detail.into();
        eprintln!("[chaos {at:7.1} s] {kind}: {detail}");
        lock(&self.entries).push(json!({"at_s": (at * 10.0).round() / 10.0, "kind": kind, "detail": detail}));
    }

    /// When the last entry of `kind` was recorded, in seconds.
    pub(crate) fn at(&self, kind: &str) -> Option<f64> {
        lock(&self.entries).iter().rev().find(|e| e["kind"] == kind).and_then(|e| e["at_s"].as_f64())
    }

    pub(crate) fn count(&self, kind: &str) -> usize {
        lock(&self.entries).iter().filter(|e| e["kind"] == kind).count()
    }
}
