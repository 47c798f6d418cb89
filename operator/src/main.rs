use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flowtel::telemetry::{DEFAULT_DURATION_BOUNDARIES, ExportConfig, Telemetry};
use flowtel::workflow_run::{self, ControllerSettings, ReconcileStats, Scope, plan::Settings};

/// flowtel: batch workflows on Kubernetes with OpenTelemetry for every run.
#[derive(Parser)]
#[command(name = "flowtel", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CRDs (WorkflowRun, TelemetryStack) as YAML.
    Crds {
        /// Write each CRD to its own file in this directory instead (the checked-in layout of crds/).
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Run the operator.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// OTLP gRPC endpoint of the operator's own run telemetry, and the workloads' default when a run references
    /// no TelemetryStack.
    #[arg(long, env = "FLOWTEL_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "FLOWTEL_NAMESPACE")]
    namespace: Option<String>,
    /// Deadline of a run whose spec sets none, in seconds.
    #[arg(long, env = "FLOWTEL_DEFAULT_DEADLINE_SECONDS", default_value_t = 86_400)]
    default_deadline_seconds: i64,
    /// TTL of a finished run whose spec sets none, in seconds.
    #[arg(long, env = "FLOWTEL_DEFAULT_TTL_SECONDS", default_value_t = 3_600)]
    default_ttl_seconds: i64,
    /// Boundaries of workflow.run.duration_ms, comma-separated.
    #[arg(long, env = "FLOWTEL_DURATION_BUCKETS", value_delimiter = ',', default_values_t = DEFAULT_DURATION_BOUNDARIES)]
    duration_buckets: Vec<f64>,
    /// Reconciles running at once.
    #[arg(long, env = "FLOWTEL_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOWTEL_ADMIN_ADDR", default_value = "127.0.0.1:8080")]
    admin_addr: SocketAddr,
    /// How long a run's telemetry export is retried before it is dropped (and counted), in seconds.
    #[arg(long, env = "FLOWTEL_EXPORT_DROP_SECONDS", default_value_t = 30)]
    export_drop_seconds: u64,
    /// Timeout of one OTLP export, in seconds.
    #[arg(long, env = "FLOWTEL_EXPORT_TIMEOUT_SECONDS", default_value_t = 5)]
    export_timeout_seconds: u64,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let mut kube_config =
        kube::Config::infer().await.context("reading the Kubernetes config (KUBECONFIG or in-cluster)")?;
    // Names the operator in the apiserver's audit log, where its writes per run are counted.
    kube_config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(concat!("flowtel/", env!("CARGO_PKG_VERSION"))),
    ));
    let client = kube::Client::try_from(kube_config).context("building the Kubernetes client")?;
    let (notify_tx, notify_rx) = tokio::sync::mpsc::unbounded_channel();
    // Without an endpoint the operator still runs; its exports fail and are counted, runs are never held up.
    let export_endpoint = args.otlp_endpoint.clone().unwrap_or_else(|| "http://127.0.0.1:4317".into());
    let telemetry = Telemetry::start(
        &ExportConfig {
            endpoint: export_endpoint,
            export_timeout: Duration::from_secs(args.export_timeout_seconds),
            drop_after: Duration::from_secs(args.export_drop_seconds),
            duration_boundaries: args.duration_buckets.clone(),
            queue_capacity: 10_000,
        },
        notify_tx,
    )?;
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stats = Arc::new(ReconcileStats::default());
    let admin =
        flowtel::admin::AdminState { ready: ready.clone(), reconcile: stats.clone(), export: telemetry.stats.clone() };
    let admin_addr = args.admin_addr;
    tokio::spawn(async move {
        if let Err(e) = flowtel::admin::serve(admin_addr, admin).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });
    tracing::info!(admin = %args.admin_addr, namespace = ?args.namespace, "flowtel operator starting");
    workflow_run::run(
        client,
        telemetry,
        notify_rx,
        ControllerSettings {
            scope: Scope { namespace: args.namespace },
            settings: Settings {
                default_deadline_seconds: args.default_deadline_seconds,
                default_ttl_seconds: args.default_ttl_seconds,
            },
            default_otlp_endpoint: args.otlp_endpoint,
            concurrency: args.concurrency,
        },
        stats,
        ready,
    )
    .await;
    tracing::info!("flowtel operator stopped");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { out_dir: None } => print!("{}", flowtel::crdgen::all_yaml()?),
        Command::Crds { out_dir: Some(dir) } => {
            for (file, crd) in flowtel::crdgen::all() {
                let path = dir.join(file);
                std::fs::write(&path, flowtel::crdgen::to_yaml(&crd)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Command::Run(args) => run(args).await?,
    }
    Ok(())
}
