//! `kubectl flowtel`: WorkflowRuns at the command line (a kubectl plugin: put this binary on PATH).

use clap::{Parser, Subcommand};
use flowtel::cli::Runs;
use flowtel_crds::workflow_run::WorkflowRunPhase;

/// WorkflowRuns at the command line: their attempts, logs, traces, reruns.
#[derive(Parser)]
#[command(name = "kubectl flowtel", version)]
struct Cli {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the namespace's runs (or one): phase, reason, attempts, age, duration.
    Get { run: Option<String> },
    /// A run in full: its attempts (exit codes, classifications), conditions and trace id.
    Describe { run: String },
    /// The logs of a run's attempt (the latest by default).
    Logs {
        run: String,
        /// The attempt's number (1 is the first).
        #[arg(long)]
        attempt: Option<i32>,
        /// Keep streaming while the attempt runs.
        #[arg(short, long)]
        follow: bool,
        /// The container, when the pod has several.
        #[arg(short, long)]
        container: Option<String>,
    },
    /// Run again: a new run from the same spec, labelled flowtel.dev/rerun-of=RUN.
    Rerun {
        run: String,
        /// The new run's name (default: generated from RUN's).
        #[arg(long)]
        name: Option<String>,
    },
    /// The run's trace id and where to open it (the stack's Grafana and trace backend).
    Trace {
        run: String,
        /// Grafana's URL as you reach it (e.g. http://localhost:3000 after a port-forward), instead of the stack's.
        #[arg(long)]
        grafana_url: Option<String>,
    },
    /// Follow a run until it is over; exits 0 when it Succeeded, 1 when it Failed.
    Watch { run: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let options = kube::config::KubeConfigOptions { context: cli.context.clone(), ..Default::default() };
    let config = kube::Config::from_kubeconfig(&options).await.or_else(|e| {
        // In a pod (no kubeconfig): its ServiceAccount.
        kube::Config::incluster().map_err(|_| e)
    })?;
    let namespace = cli.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let runs = Runs::new(kube::Client::try_from(config)?, &namespace);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Get { run } => runs.list(run.as_deref(), &mut out).await?,
        Command::Describe { run } => runs.describe(&run, &mut out).await?,
        Command::Logs { run, attempt, follow, container } => {
            drop(out);
            let mut out = std::io::stdout();
            runs.logs(&run, attempt, follow, container, &mut out).await?;
        }
        Command::Rerun { run, name } => {
            let created = runs.rerun(&run, name).await?;
            println!("workflowrun.flowtel.dev/{} created", kube::ResourceExt::name_any(&created));
        }
        Command::Trace { run, grafana_url } => runs.trace(&run, grafana_url.as_deref(), &mut out).await?,
        Command::Watch { run } => {
            let last = runs.watch(&run, &mut out).await?;
            let failed = last.status.and_then(|s| s.phase) == Some(WorkflowRunPhase::Failed);
            return Ok(if failed { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS });
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
