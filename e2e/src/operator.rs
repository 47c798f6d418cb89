//! The operator as its own process (`flowtel run`), and runs submitted to it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use crate::cluster::cluster_kubeconfig;
use crate::process::{Process, flowtel_binary, free_port};
use crate::{HarnessError, TEST_MANAGER};

/// The operator, as its own process, watching one namespace.
pub struct Operator {
    pub admin: String,
    pub log: PathBuf,
    process: Option<Process>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Operator {
    /// Starts `flowtel run` for `namespace`, exporting to `otlp_endpoint`, and waits until it is ready.
    pub async fn start(namespace: &str, otlp_endpoint: &str, extra: &[&str]) -> Result<Self, HarnessError> {
        Self::start_with_env(namespace, Some(otlp_endpoint), extra, &[]).await
    }

    /// As `start`, with no OTLP endpoint or with extra environment (e.g. `FLOWTEL_CRASH_AT`), the environment kept
    /// only until the next `restart`.
    pub async fn start_with_env(
        namespace: &str,
        otlp_endpoint: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, HarnessError> {
        Self::start_tagged(namespace, "", otlp_endpoint, extra, env).await
    }

    /// As `start_with_env`, one of several operators for one namespace (leader election): `tag` names its log.
    pub async fn start_tagged(
        namespace: &str,
        tag: &str,
        otlp_endpoint: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, HarnessError> {
        let admin = format!("127.0.0.1:{}", free_port());
        let mut args =
            vec!["run".to_string(), "--namespace".into(), namespace.into(), "--admin-addr".into(), admin.clone()];
        if let Some(endpoint) = otlp_endpoint {
            args.extend(["--otlp-endpoint".to_string(), endpoint.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = std::env::temp_dir().join(format!("flowtel-operator-{namespace}{tag}.log"));
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut op = Self { admin, log, process: None, args, env };
        op.spawn().await?;
        Ok(op)
    }

    async fn spawn(&mut self) -> Result<(), HarnessError> {
        let bin = flowtel_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| HarnessError::Spawn { command: "log".into(), source })?;
        let child = Command::new(&bin)
            .args(&self.args)
            .env("KUBECONFIG", cluster_kubeconfig())
            // FLOWTEL_OPERATOR_LOG overrides the filter (e.g. `flowtel::workflow_run::reconcile=debug` logs each
            // reconcile with what triggered it).
            .env("RUST_LOG", std::env::var("FLOWTEL_OPERATOR_LOG").unwrap_or_else(|_| "info,kube_runtime=debug".into()))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().map_err(|source| HarnessError::Spawn { command: "log".into(), source })?)
            .stderr(log)
            .spawn()
            .map_err(|source| HarnessError::Spawn { command: bin.display().to_string(), source })?;
        self.process = Some(Process { child });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.get("/readyz").await.map(|(code, _)| code) != Some(200) {
            if let Some(Ok(Some(status))) = self.process.as_mut().map(|p| p.child.try_wait()) {
                return Err(HarnessError::Command {
                    command: format!("flowtel {}", self.args.join(" ")),
                    status: status.to_string(),
                    stderr: std::fs::read_to_string(&self.log).unwrap_or_default(),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HarnessError::Timeout(format!("operator /readyz (log: {})", self.log.display())));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// SIGTERM, as a rolling update would, and waits (bounded) for the exit; returns the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let p = self.process.as_mut()?;
        let pid = p.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.child.id())
    }

    /// The exit status, once the process has exited by itself.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut().and_then(|p| p.child.try_wait().ok().flatten())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Starts it again with the same arguments (without the extra environment).
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.process = None;
        self.env.clear();
        self.spawn().await
    }

    /// Waits (bounded) until the process exited by itself, as at a crash point.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while let Some(p) = self.process.as_mut() {
            if matches!(p.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// A plain HTTP GET on the admin port: (status code, body).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(&self.admin).await.ok()?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.admin);
            s.write_all(request.as_bytes()).await.ok()?;
            let mut buf = String::new();
            s.read_to_string(&mut buf).await.ok()?;
            Some(buf)
        };
        let buf = tokio::time::timeout(Duration::from_secs(5), exchange).await.ok()??;
        let code = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((code, body))
    }

    /// A counter (or any unlabelled sample) from `/metrics`.
    pub async fn counter(&self, name: &str) -> Option<u64> {
        let (_, body) = self.get("/metrics").await?;
        // Counters are whole numbers; the cast only drops a fraction a counter never has.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        unlabelled_samples(&body).get(name).map(|v| *v as u64)
    }
}

/// The unlabelled samples of a Prometheus text exposition, by name as exposed (a counter's `_total`, a histogram's
/// `_sum` and `_count`), parsed by `prometheus-parse`.
pub fn unlabelled_samples(body: &str) -> std::collections::BTreeMap<String, f64> {
    use prometheus_parse::{Scrape, Value};
    let Ok(scrape) = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))) else { return Default::default() };
    scrape
        .samples
        .into_iter()
        .filter(|s| s.labels.is_empty())
        .filter_map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some((s.metric, v)),
            Value::Histogram(_) | Value::Summary(_) => None,
        })
        .collect()
}

/// A WorkflowRun whose pod KWOK completes after `duration`.
pub fn simple_run(name: &str, workflow: &str, duration: &str) -> serde_json::Value {
    crate::runs::RunBuilder::new(name, workflow).runs_for(duration).json()
}

/// Submits `count` runs at once into `namespace` and waits (up to `timeout`) until every one is terminal with its
/// telemetry exported. Returns the wall time from the first submission to the last such run.
pub async fn burst(
    client: &Client,
    namespace: &str,
    workflow: &str,
    count: usize,
    timeout: Duration,
) -> Result<Duration, HarnessError> {
    use flowtel_crds::WorkflowRun;
    use futures::StreamExt;
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), namespace);
    let started = std::time::Instant::now();
    let submissions = (0..count).map(|i| {
        let runs = runs.clone();
        let run = simple_run(&format!("burst-{i}"), workflow, "1s");
        async move { runs.patch(&format!("burst-{i}"), &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await }
    });
    let results: Vec<_> = futures::stream::iter(submissions).buffer_unordered(32).collect().await;
    for r in results {
        r?;
    }
    let done = |r: &WorkflowRun| r.status.as_ref().and_then(|s| s.telemetry.as_ref()).is_some_and(|t| t.finished);
    let stream = kube::runtime::watcher(runs, kube::runtime::watcher::Config::default());
    let mut store = kube::runtime::reflector::store::Writer::<WorkflowRun>::default();
    let reader = store.as_reader();
    let mut stream = std::pin::pin!(stream);
    let wait = async {
        while let Some(event) = stream.next().await {
            if let Ok(event) = event {
                store.apply_watcher_event(&event);
                let state = reader.state();
                if state.len() >= count && state.iter().all(|r| done(r)) {
                    return Ok(started.elapsed());
                }
            }
        }
        Err(HarnessError::Timeout("the burst's watch ended".into()))
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| {
        let finished = reader.state().iter().filter(|r| done(r)).count();
        HarnessError::Timeout(format!("{count} runs terminal and exported ({finished} were)"))
    })?
}

#[cfg(test)]
mod tests {
    #[test]
    fn unlabelled_samples_of_the_operators_openmetrics_text() {
        let body = "# HELP flowtel_reconciles Reconciles.\n# TYPE flowtel_reconciles counter\n\
                    flowtel_reconciles_total 12\n\
                    # TYPE flowtel_reconcile_errors counter\nflowtel_reconcile_errors_total{error=\"api\"} 1\n\
                    # TYPE flowtel_reconcile_duration_seconds histogram\n\
                    flowtel_reconcile_duration_seconds_sum 0.5\nflowtel_reconcile_duration_seconds_count 12\n\
                    flowtel_reconcile_duration_seconds_bucket{le=\"0.1\"} 11\n\
                    flowtel_reconcile_duration_seconds_bucket{le=\"+Inf\"} 12\n# EOF\n";
        let samples = super::unlabelled_samples(body);
        let expected = [
            ("flowtel_reconcile_duration_seconds_count", 12.0),
            ("flowtel_reconcile_duration_seconds_sum", 0.5),
            ("flowtel_reconciles_total", 12.0),
        ];
        assert_eq!(samples, expected.into_iter().map(|(k, v)| (k.to_string(), v)).collect());
    }
}
