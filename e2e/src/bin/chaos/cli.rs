//! The command line.

use super::*;

/// e2e/chaos: WorkflowRuns of mixed outcomes while the operator, the control plane and the collector fail (see the
/// header above).
#[derive(clap::Parser)]
#[command(name = "e2e/chaos")]
pub(crate) struct Cli {
    /// Runs submitted.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) runs: u64,
    /// Seed of the workload mix and the fault schedule (default: the clock).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Where the result goes, as JSON (default: target/chaos.json).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Runs submitted per second.
    #[arg(long, default_value_t = 20.0, value_parser = positive)]
    pub(crate) rate: f64,
    /// Scales the faults (1: 10 operator kills, 2 apiserver and 1 etcd restarts, 2 collector kills).
    #[arg(long, default_value_t = 1.0, value_parser = not_negative)]
    pub(crate) faults_scale: f64,
    /// How long to wait for every run to finish after the faults.
    #[arg(long, default_value_t = 180)]
    pub(crate) settle_secs: u64,
    /// The operator's write economy (`--write-economy`): `off` is the correctness reference whose outcomes the
    /// default run must equal.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub(crate) economy: String,
    /// Pooled execution: every run names a WorkerPool whose workers (`--workers` agents, host processes standing in
    /// for its pods) run each kind as a process; the schedule also kills workers, as pods deleted with no grace.
    #[arg(long)]
    pub(crate) pooled: bool,
    /// Worker agents of the pooled mode.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=512))]
    pub(crate) workers: u64,
}

pub(crate) fn positive(value: &str) -> std::result::Result<f64, String> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("must be a positive number, got {value}")),
    }
}

pub(crate) fn not_negative(value: &str) -> std::result::Result<f64, String> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("must be a number not below 0, got {value}")),
    }
}

pub(crate) struct Args {
    pub(crate) runs: usize,
    pub(crate) seed: u64,
    pub(crate) out: PathBuf,
    pub(crate) rate: f64,
    pub(crate) faults_scale: f64,
    pub(crate) settle: Duration,
    pub(crate) economy: String,
    /// Worker agents when the runs are pooled.
    pub(crate) pooled: Option<usize>,
}

/// The command line; a malformed or unknown flag ends the run with clap's message naming it.
pub(crate) fn parse_args() -> Args {
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
        economy: cli.economy,
        pooled: cli.pooled.then_some(cli.workers as usize),
    }
}
