use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flowtel::runtime::admin::AdminServer;
use flowtel::runtime::leader::{self, ElectionConfig, Elector};
use flowtel::runtime::rates::RunRates;
use flowtel::runtime::readiness::Readiness;
use flowtel::runtime::readiness::SyncTracker;
use flowtel::runtime::shards::Shard;
use flowtel::telemetry::{ExportConfig, ExportMetrics, Telemetry};
use flowtel::telemetry_stack;
use flowtel::workflow_run::report::{self, DEFAULT_DURATION_BOUNDARIES};
use flowtel::workflow_run::{self, ControllerMetrics, ControllerSettings, Scope, plan::Settings};
use prometheus_client::registry::Registry;

/// flowtel: batch workflows on Kubernetes with OpenTelemetry for every run.
#[derive(Parser)]
#[command(name = "flowtel", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CRDs (WorkflowRun, TelemetryStack, WorkerPool) as YAML.
    Crds {
        /// Write each CRD to its own file in this directory instead (the checked-in layout of crds/).
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
        /// Print the field reference (Markdown, docs/reference.md) instead.
        #[arg(long, conflicts_with = "out_dir")]
        reference: bool,
    },
    /// Run the operator.
    Run(Box<RunArgs>),
    /// Print, with no cluster, exactly the objects flowtel would apply for a TelemetryStack (YAML documents).
    Render {
        /// The TelemetryStack manifest (YAML), `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
        /// Also validate: the spec's rules and the collector configuration; exits non-zero naming the field.
        #[arg(long)]
        check: bool,
    },
    /// The worker agent of a WorkerPool's pod (the pool controller puts it in front of the pool's command): asks the
    /// leader for pooled runs' attempts and runs each as a fresh process of COMMAND.
    Worker {
        /// The leader's dispatch endpoint.
        #[arg(long, env = "FLOWTEL_DISPATCH_URL")]
        dispatch_url: String,
        /// `<namespace>/<pool>`.
        #[arg(long, env = "FLOWTEL_POOL")]
        pool: String,
        /// This worker's pod name (the downward API's metadata.name).
        #[arg(long, env = "POD_NAME")]
        pod_name: String,
        #[arg(long, env = "NODE_NAME", default_value = "")]
        node_name: String,
        /// The pod's ServiceAccount token, sent with every request (the pool controller projects one).
        #[arg(long, env = "FLOWTEL_TOKEN_FILE")]
        token_file: Option<std::path::PathBuf>,
        /// The pool's command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copies this binary to PATH (the init container of a WorkerPool's pods puts the agent in the workers this way:
    /// the flowtel image has no shell).
    InstallAgent { path: std::path::PathBuf },
    /// GET a URL over HTTP and exit 0 on a 2xx answer, else 1 (the chart's `helm test`: the image has no shell).
    Probe {
        /// e.g. http://flowtel-probe:8080/readyz
        url: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 10)]
        timeout_seconds: u64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// OTLP gRPC endpoint of the run telemetry of runs that reference no TelemetryStack (a run that does goes to its
    /// stack's collector), and their workloads' default. Without it, those runs say NoOtlpEndpoint once.
    #[arg(long, env = "FLOWTEL_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "FLOWTEL_NAMESPACE")]
    namespace: Option<String>,
    /// This process's shard, `<index>/<count>`: it owns the WorkflowRuns labelled flowtel.dev/shard=<index> (shard 0
    /// also those without the label or with another value) and their Jobs and pods; shard 0 alone runs the
    /// TelemetryStack controller. With a count above 1 the Lease is `<lease name>-shard-<index>`.
    #[arg(long, env = "FLOWTEL_SHARD", default_value = "0/1")]
    shard: Shard,
    /// Deadline of a run whose spec sets none, in seconds.
    #[arg(long, env = "FLOWTEL_DEFAULT_DEADLINE_SECONDS", default_value_t = 86_400)]
    default_deadline_seconds: i64,
    /// TTL of a finished run whose spec sets none, in seconds.
    #[arg(long, env = "FLOWTEL_DEFAULT_TTL_SECONDS", default_value_t = 3_600)]
    default_ttl_seconds: i64,
    /// Boundaries of workflow.run.duration_ms, comma-separated.
    #[arg(long, env = "FLOWTEL_DURATION_BUCKETS", value_delimiter = ',', default_values_t = DEFAULT_DURATION_BOUNDARIES)]
    duration_buckets: Vec<f64>,
    /// How long a started attempt waits for its end before status records it as Running: an attempt that ends
    /// sooner costs one status write instead of two (the run shows no phase meanwhile); pooled attempts too. 0
    /// records it before its Job is created or it is dispatched.
    #[arg(long, env = "FLOWTEL_RUNNING_STATUS_DELAY", default_value = "3s", value_parser = parse_duration)]
    running_status_delay: Duration,
    /// The write economy (`on`, the default): fewer status writes, reconciles and watch echoes for the same outcome
    /// of every run. `off` is the correctness reference: every change written when planned, every event reconciled.
    #[arg(long, env = "FLOWTEL_WRITE_ECONOMY", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    write_economy: bool,
    /// Reconciles running at once.
    #[arg(long, env = "FLOWTEL_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FLOWTEL_ADMIN_ADDR", default_value = "127.0.0.1:8080")]
    admin_addr: SocketAddr,
    /// How long a run's telemetry export is retried before it is dropped (and counted), in seconds.
    #[arg(long, env = "FLOWTEL_EXPORT_DROP_SECONDS", default_value_t = 30)]
    export_drop_seconds: u64,
    /// Timeout of one OTLP export, in seconds; also how long a stopping operator drains its export queue.
    #[arg(long, env = "FLOWTEL_EXPORT_TIMEOUT_SECONDS", default_value_t = 5)]
    export_timeout_seconds: u64,
    /// A file where the operator notes each report it exported, so that a restarted process does not export again
    /// the reports whose status it had no time to record (a container restart keeps an emptyDir; the chart mounts
    /// one). Without it, a kill re-counts the runs exported in the milliseconds before it.
    #[arg(long, env = "FLOWTEL_EXPORT_JOURNAL")]
    export_journal: Option<std::path::PathBuf>,
    /// Publish Normal Events too (attempt started or finished, run succeeded): each is an apiserver write, three
    /// per successful run. Warnings (failures, retries, cancels, telemetry trouble) are always published.
    #[arg(long, env = "FLOWTEL_NORMAL_EVENTS")]
    normal_events: bool,
    #[command(flatten)]
    election: ElectionArgs,
    #[command(flatten)]
    pools: PoolArgs,
}

/// Pooled execution (WorkerPools): off until a dispatch address is given.
#[derive(clap::Args)]
struct PoolArgs {
    /// Where the leader serves its workers (e.g. 0.0.0.0:8090). Without it, pooled runs fail with PoolingDisabled.
    #[arg(long, env = "FLOWTEL_DISPATCH_ADDR")]
    dispatch_addr: Option<SocketAddr>,
    /// The URL workers reach the dispatch address at (the chart's dispatch Service). Default: http://<dispatch-addr>.
    #[arg(long, env = "FLOWTEL_DISPATCH_URL")]
    dispatch_url: Option<String>,
    /// Serve a worker only with its pool's ServiceAccount token (TokenReview). `off` serves anyone who reaches the
    /// dispatch address: only for a network no one else reaches.
    #[arg(long, env = "FLOWTEL_DISPATCH_AUTH", default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set)]
    dispatch_auth: bool,
    /// The image a worker's init container copies the agent from (the operator's own image).
    #[arg(long, env = "FLOWTEL_AGENT_IMAGE", default_value = concat!("ghcr.io/flowtel/flowtel:", env!("CARGO_PKG_VERSION")))]
    agent_image: String,
}

/// With more than one replica, one leader reconciles and exports; the others are ready but idle.
#[derive(clap::Args)]
struct ElectionArgs {
    /// Elect a leader over a coordination.k8s.io Lease before reconciling.
    #[arg(long, env = "FLOWTEL_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the Lease (default: the pod's namespace, POD_NAMESPACE, else the watched namespace, else
    /// `default`).
    #[arg(long, env = "FLOWTEL_LEADER_ELECT_NAMESPACE")]
    leader_elect_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, env = "FLOWTEL_LEADER_ELECT_LEASE_NAME", default_value = "flowtel")]
    leader_elect_lease_name: String,
    /// How long a standby waits, after it last saw the Lease change, before taking it over.
    #[arg(long, env = "FLOWTEL_LEADER_ELECT_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    leader_elect_lease_duration: Duration,
    /// How long a leader keeps leading without a successful renewal; then it exits, before its Lease expires.
    #[arg(long, env = "FLOWTEL_LEADER_ELECT_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    leader_elect_renew_deadline: Duration,
    /// How often candidates try to take, and the leader to renew, the Lease.
    #[arg(long, env = "FLOWTEL_LEADER_ELECT_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    leader_elect_retry_period: Duration,
}

/// `15s`, `1m30s`, `500ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = text.parse().map_err(|e| format!("{text:?} is not a duration like 15s: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("{text:?} is negative"))
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{text:?} is neither on nor off")),
    }
}

/// SIGTERM (a rolling update) or Ctrl-C.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
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
    let mut registry = Registry::default();
    let readiness = Readiness::default();
    let (notify_tx, notify_rx) = tokio::sync::mpsc::unbounded_channel();
    let pool_wake_tx = notify_tx.clone();
    // Always started: a run's report goes to its TelemetryStack's collector, or to --otlp-endpoint. Without that
    // endpoint a run naming no stack says so once (NoOtlpEndpoint) and holds no finalizer; runs are never held up
    // by telemetry.
    let telemetry = Telemetry::start(
        &ExportConfig {
            endpoint: args.otlp_endpoint.clone(),
            export_timeout: Duration::from_secs(args.export_timeout_seconds),
            drop_after: Duration::from_secs(args.export_drop_seconds),
            histogram_boundaries: HashMap::from([(report::RUN_DURATION, args.duration_buckets.clone())]),
            queue_capacity: 10_000,
            journal: args.export_journal.clone(),
        },
        notify_tx,
        ExportMetrics::register(&mut registry),
        readiness.gate("export-worker", true),
    )?;
    let metrics = ControllerMetrics::register(&mut registry);
    let dispatch_metrics = flowtel::pool::dispatch::DispatchMetrics::register(&mut registry);
    let leading = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    registry.register(
        "flowtel_leader",
        "1 while this process reconciles (leads, or runs without election)",
        leading.clone(),
    );
    // Bound before anything starts: a port in use ends the process with an error instead of a silent operator.
    let admin = AdminServer::bind(args.admin_addr, readiness.clone(), registry).await?;
    tokio::spawn(async move {
        if let Err(e) = admin.serve().await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });
    tracing::info!(admin = %args.admin_addr, namespace = ?args.namespace, shard = %args.shard, "flowtel operator starting");
    let mut elector = match args.election.leader_elect {
        false => None,
        true => {
            let e = &args.election;
            let config = ElectionConfig {
                namespace: e
                    .leader_elect_namespace
                    .clone()
                    .or_else(|| std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty()))
                    .or_else(|| args.namespace.clone())
                    .unwrap_or_else(|| "default".into()),
                lease_name: args.shard.lease_name(&e.leader_elect_lease_name),
                identity: leader::identity(std::env::var("POD_NAME").ok().as_deref()),
                lease_duration: e.leader_elect_lease_duration,
                renew_deadline: e.leader_elect_renew_deadline,
                retry_period: e.leader_elect_retry_period,
            };
            Some(Elector::new(client.clone(), config)?)
        }
    };
    if let Some(elector) = elector.as_mut() {
        // A standby is ready (its gates so far are open) and idle: no watch, no write, until it leads.
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown_signal() => {
                tracing::info!("flowtel operator stopped before it led");
                return Ok(());
            }
        }
    }
    leading.set(1);
    let runs_synced = readiness.gate("workflowrun-watches-synced", false);
    // Pooled execution: the dispatcher lives with the leader (its queue is memory), and wakes runs through the same
    // channel as the exporter. A new leader waits the lease duration before declaring unclaimed attempts lost.
    let dispatcher = match args.pools.dispatch_addr {
        None => None,
        Some(addr) => {
            let dispatcher = flowtel::pool::dispatch::Dispatcher::new(
                pool_wake_tx,
                args.election.leader_elect_lease_duration,
                dispatch_metrics,
            );
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the dispatch address {addr}"))?;
            let local = listener.local_addr()?;
            tracing::info!(dispatch = %local, "serving workers");
            let serving = dispatcher.clone();
            let auth = args.pools.dispatch_auth.then(|| flowtel::pool::auth::Authenticator::new(client.clone()));
            let served_auth = auth.clone();
            tokio::spawn(async move {
                if let Err(e) = flowtel::pool::dispatch::serve(serving, served_auth, listener, shutdown_signal()).await
                {
                    tracing::error!(error = %e, "dispatch server stopped");
                }
            });
            let settings = flowtel::pool::controller::PoolSettings {
                agent_image: args.pools.agent_image.clone(),
                dispatch_url: args.pools.dispatch_url.clone().unwrap_or_else(|| format!("http://{local}")),
            };
            if args.shard.runs_cluster_wide_work() {
                let (load_tx, load_rx) = tokio::sync::mpsc::unbounded_channel();
                dispatcher.wake_pools(load_tx);
                tokio::spawn(flowtel::pool::controller::run(
                    client.clone(),
                    args.namespace.clone(),
                    dispatcher.clone(),
                    settings,
                    load_rx,
                    auth,
                ));
            }
            Some(dispatcher)
        }
    };

    let rates = RunRates::default();
    let stacks = args.shard.runs_cluster_wide_work().then(|| {
        let sync = SyncTracker::new(telemetry_stack::WATCHES, readiness.gate("telemetrystack-watches-synced", false));
        telemetry_stack::run(client.clone(), args.namespace.clone(), rates.clone(), sync, args.concurrency)
    });
    let stacks = async {
        if let Some(stacks) = stacks {
            stacks.await;
        }
    };
    let runs = workflow_run::run(
        client,
        telemetry.clone(),
        notify_rx,
        ControllerSettings {
            scope: Scope { namespace: args.namespace.clone(), shard: args.shard },
            settings: Settings {
                default_deadline_seconds: args.default_deadline_seconds,
                default_ttl_seconds: args.default_ttl_seconds,
                running_status_delay: jiff::SignedDuration::try_from(args.running_status_delay)?,
            },
            default_otlp_endpoint: args.otlp_endpoint,
            concurrency: args.concurrency,
            write_economy: args.write_economy,
            normal_events: args.normal_events,
            dispatcher,
        },
        metrics,
        runs_synced,
        rates,
    );
    // Each controller is its own task: a wake-up (a watch event, a reconcile's response) polls only its task's
    // streams, not the other controller's too, as one task joining both would. Both stop on SIGTERM; a panic in
    // either ends the process with an error at once (the pod restarts), never leaves it half working.
    let (stacks, runs) = (tokio::spawn(stacks), tokio::spawn(runs));
    let controllers = async { tokio::try_join!(stacks, runs).map(|_| ()).context("a controller task failed") };
    match elector.as_mut() {
        None => controllers.await?,
        Some(elector) => tokio::select! {
            ended = controllers => ended?,
            lost = elector.hold() => {
                // Exiting is the one way to be sure no reconcile still in flight writes after another leader starts
                // (the renew deadline is shorter than the lease duration); the pod restarts as a standby.
                tracing::error!(?lost, "leadership lost: exiting before another leader can start");
                std::process::exit(1);
            }
        },
    }
    // SIGTERM: what is queued is exported (bounded), so a rolling update loses no report that could still go out.
    let drain = Duration::from_secs(args.export_timeout_seconds);
    if !telemetry.shutdown(drain).await {
        tracing::warn!(seconds = drain.as_secs(), "the export queue was not drained in time");
    }
    if let Some(elector) = elector.as_mut() {
        elector.release().await;
    }
    tracing::info!("flowtel operator stopped");
    Ok(())
}

/// `flowtel render`: the stack's objects as flowtel would apply them, the generated admin Secret described (its
/// password is drawn when flowtel creates it).
fn render(file: &std::path::Path, check: bool) -> anyhow::Result<()> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the stack from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let mut stack: flowtel_crds::TelemetryStack =
        serde_yaml_ng::from_str(&text).with_context(|| format!("{} is not a TelemetryStack", file.display()))?;
    stack.metadata.namespace.get_or_insert_with(|| "default".into());
    let output = telemetry_stack::render(&stack, check).map_err(|errors| anyhow::anyhow!(errors.join("\n")))?;
    print!("{output}");
    Ok(())
}

/// One thread: the operator waits on the apiserver and the collector, and its CPU goes to decoding watch events.
/// Against the multi-threaded runtime it measured a quarter less CPU per run, every wake-up no longer crossing
/// threads (`BENCHMARKS.md`).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    if let Ok(point) = std::env::var("FLOWTEL_CRASH_AT") {
        let at = point.clone();
        fail::cfg_callback(point, move || {
            eprintln!("FLOWTEL_CRASH_AT={at}: aborting");
            std::process::abort();
        })
        .map_err(anyhow::Error::msg)?;
    }
    match Cli::parse().command {
        Command::Crds { reference: true, .. } => print!("{}", flowtel::crdgen::reference_markdown()),
        Command::Crds { out_dir: None, .. } => print!("{}", flowtel::crdgen::all_yaml()?),
        Command::Crds { out_dir: Some(dir), .. } => {
            for (file, crd) in flowtel::crdgen::all() {
                let path = dir.join(file);
                std::fs::write(&path, flowtel::crdgen::to_yaml(&crd)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Command::Run(args) => run(*args).await?,
        Command::Render { file, check } => render(&file, check)?,
        Command::Worker { dispatch_url, pool, pod_name, node_name, token_file, command } => {
            // stderr: the workload's stdout is the container's, and a log reader must tell the two apart.
            tracing_subscriber::fmt()
                .json()
                .with_writer(std::io::stderr)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
                )
                .init();
            let namespace = pool.split_once('/').map(|(ns, _)| ns.to_string()).unwrap_or_default();
            let config = flowtel::pool::agent::AgentConfig {
                dispatch_url,
                pool,
                pod_name,
                node_name,
                namespace,
                command,
                token_file,
            };
            flowtel::pool::agent::run(config, shutdown_signal()).await?;
        }
        Command::InstallAgent { path } => {
            let me = std::env::current_exe().context("finding this binary")?;
            std::fs::copy(&me, &path).with_context(|| format!("copying {} to {}", me.display(), path.display()))?;
        }
        Command::Probe { url, timeout_seconds } => probe(&url, std::time::Duration::from_secs(timeout_seconds)).await?,
    }
    Ok(())
}

/// Asks `url` until it answers 2xx or `timeout` passes: a Service created with the test pod may take a moment to
/// route (kube-proxy), so one refused connection is not yet an answer.
async fn probe(url: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    use http_body_util::Empty;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<hyper::body::Bytes>>();
    let uri: hyper::Uri = url.parse().with_context(|| format!("{url}: not a URL"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let answer = tokio::time::timeout_at(deadline, client.get(uri.clone())).await;
        let last = match answer {
            Ok(Ok(response)) if response.status().is_success() => {
                println!("{url}: {}", response.status());
                return Ok(());
            }
            Ok(Ok(response)) => anyhow::anyhow!("{url}: {}", response.status()),
            Ok(Err(e)) => anyhow::Error::new(e).context(format!("{url}: unreachable")),
            Err(_) => anyhow::anyhow!("{url}: no answer within {} s", timeout.as_secs()),
        };
        if tokio::time::Instant::now() + std::time::Duration::from_secs(1) >= deadline {
            return Err(last);
        }
        eprintln!("{last:#}; asking again");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
