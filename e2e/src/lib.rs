//! Helpers for flowtel's end-to-end tests: a real control plane on loopback (`e2e/cluster`), the CRDs installed
//! from the checked-in files, and a namespace per test.

pub mod backends;
pub mod sync_runs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use serde_json::json;

/// Field manager of every object the tests write.
pub const TEST_MANAGER: &str = "flowtel-e2e";

/// Errors of the test harness itself (not of the system under test).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: std::io::Error },
    #[error("cannot read the kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error("kube: {0}")]
    Kube(#[from] kube::Error),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("{0} is missing")]
    Missing(String),
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Runs a command, returning its stdout, or an error carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<String, HarnessError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| HarnessError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts the control plane (or reuses the running one) once per test process; returns the admin kubeconfig path.
/// A missing Go toolchain or a failed build is a test failure with the script's message, never a skip.
pub fn cluster_kubeconfig() -> PathBuf {
    static KUBECONFIG: OnceLock<PathBuf> = OnceLock::new();
    KUBECONFIG
        .get_or_init(|| {
            let script = repo_root().join("e2e/cluster");
            if let Err(e) = run(Command::new(&script).arg("up")) {
                panic!("the local control plane did not come up: {e}");
            }
            let env = run(Command::new(&script).arg("env")).unwrap_or_else(|e| panic!("{e}"));
            let path = env
                .split_whitespace()
                .find_map(|w| w.strip_prefix("KUBECONFIG="))
                .unwrap_or_else(|| panic!("`e2e/cluster env` printed no KUBECONFIG: {env}"));
            PathBuf::from(path)
        })
        .clone()
}

/// The kubectl binary the cluster script built, with the admin kubeconfig.
pub fn kubectl() -> Command {
    let kubeconfig = cluster_kubeconfig();
    let bin = kubeconfig.parent().map(|d| d.join("bin/kubectl")).unwrap_or_default();
    let mut cmd = Command::new(bin);
    cmd.arg("--kubeconfig").arg(kubeconfig);
    cmd
}

/// A client for the local control plane.
pub async fn client() -> Result<Client, HarnessError> {
    let path = cluster_kubeconfig();
    let kubeconfig =
        Kubeconfig::read_from(&path).map_err(|source| HarnessError::Kubeconfig { path: path.clone(), source })?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| HarnessError::Kubeconfig { path, source })?;
    Ok(Client::try_from(config)?)
}

/// Installs the checked-in CRDs the documented way (`kubectl apply --server-side -f crds/`) and waits until both
/// are Established.
pub async fn install_crds(client: &Client) -> Result<(), HarnessError> {
    static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    INSTALLED
        .get_or_try_init(|| async {
            let crds_dir = repo_root().join("crds");
            run(kubectl().args(["apply", "--server-side", "--force-conflicts", "-f"]).arg(&crds_dir))?;
            let api: Api<CustomResourceDefinition> = Api::all(client.clone());
            for name in ["workflowruns.flowtel.dev", "telemetrystacks.flowtel.dev"] {
                let established = await_condition(api.clone(), name, conditions::is_crd_established());
                tokio::time::timeout(Duration::from_secs(30), established)
                    .await
                    .map_err(|_| HarnessError::Timeout(format!("CRD {name} Established")))?
                    .map_err(|e| HarnessError::Timeout(format!("CRD {name} Established: {e}")))?;
            }
            Ok(())
        })
        .await
        .map(|_| ())
}

/// A fresh namespace for one test, named after it; deleted when dropped (the delete is sent before the drop
/// returns, so a test's end never leaks it; the namespace's contents go in the background).
pub struct TestNamespace {
    pub name: String,
    client: Client,
}

impl TestNamespace {
    pub async fn new(client: &Client, test: &str) -> Result<Self, HarnessError> {
        let suffix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() % 100_000)
            .unwrap_or_default();
        let name = format!("{}-{suffix}", test.replace('_', "-"));
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        api.patch(&name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(ns)).await?;
        // Pods need the namespace's default ServiceAccount (ServiceAccount admission is on).
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &name);
        let ready = await_condition(sa, "default", |o: Option<&_>| o.is_some());
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .map_err(|_| HarnessError::Timeout(format!("default ServiceAccount in {name}")))?
            .map_err(|e| HarnessError::Timeout(format!("default ServiceAccount in {name}: {e}")))?;
        Ok(Self { name, client: client.clone() })
    }
}

impl TestNamespace {
    /// The client the namespace was made with.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Kept for a look around (`e2e/demo --real`).
        if std::env::var_os("FLOWTEL_KEEP_NAMESPACE").is_some() {
            return;
        }
        // A task spawned here would die with the test's runtime before it ran: delete synchronously instead.
        let _ = run(kubectl().args(["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"]));
    }
}

/// A free TCP port on loopback (bound and released; good enough for a test's own processes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// `n` distinct free TCP ports on loopback: all bound at once, then released (ports taken one at a time may repeat).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n).filter_map(|_| std::net::TcpListener::bind("127.0.0.1:0").ok()).collect();
    listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect()
}

/// A child process killed when dropped.
pub struct Process {
    pub child: std::process::Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real OpenTelemetry Collector (built by `e2e/build-binaries collector`), receiving OTLP gRPC on a free
/// loopback port and writing what it receives as OTLP JSON lines into a fresh directory.
pub struct Collector {
    pub endpoint: String,
    pub dir: PathBuf,
    port: u16,
    bin: PathBuf,
    incarnation: u32,
    process: Option<Process>,
}

fn versions_env(key: &str) -> Option<String> {
    let text = std::fs::read_to_string(repo_root().join("e2e/versions.env")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
}

fn cache_bin() -> PathBuf {
    let cache = std::env::var_os("FLOWTEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/flowtel"));
    cache.join("bin")
}

/// A binary e2e/build-binaries caches as `<name>-<version>`, the version read from `e2e/versions.env`.
pub fn cached_binary(name: &str, version_key: &str) -> PathBuf {
    cache_bin().join(format!("{name}-{}", versions_env(version_key).unwrap_or_default()))
}

/// Helm, built from its Go module on first use, talking to the local control plane, its state under the temp dir.
pub fn helm() -> Command {
    run(Command::new(repo_root().join("e2e/build-binaries")).arg("helm")).expect("helm built");
    let mut cmd = Command::new(cached_binary("helm", "HELM_VERSION"));
    cmd.env("KUBECONFIG", cluster_kubeconfig())
        .env("HELM_CACHE_HOME", std::env::temp_dir().join("flowtel-helm/cache"))
        .env("HELM_CONFIG_HOME", std::env::temp_dir().join("flowtel-helm/config"))
        .env("HELM_DATA_HOME", std::env::temp_dir().join("flowtel-helm/data"));
    cmd
}

/// Renders one template of the chart (`charts/flowtel`, release `release`, `--set set`) as Helm would for the local
/// control plane (v1.37, which serves MutatingAdmissionPolicy) and applies it server-side; returns the rendered file,
/// to delete what it made afterwards.
pub fn apply_chart_template(release: &str, set: &str, template: &str) -> Result<PathBuf, HarnessError> {
    let chart = repo_root().join("charts/flowtel").display().to_string();
    let mut helm = helm();
    helm.args(["template", release, &chart, "--kube-version", "1.37.2", "--set", set, "--show-only", template])
        .args(["--api-versions", "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy"]);
    let rendered = run(&mut helm)?;
    let name = template.rsplit('/').next().unwrap_or(template);
    let file = std::env::temp_dir().join(format!("flowtel-chart-{release}-{name}"));
    std::fs::write(&file, rendered).map_err(|source| HarnessError::Spawn { command: "write".into(), source })?;
    run(kubectl().args(["apply", "--server-side", "-f"]).arg(&file))?;
    Ok(file)
}

/// The collector e2e/build-binaries builds: named by release and component-list revision.
pub fn collector_bin() -> PathBuf {
    let version = versions_env("OTELCOL_VERSION").unwrap_or_default();
    let revision = versions_env("OTELCOL_DIST_REVISION").unwrap_or_default();
    cache_bin().join(format!("otelcol-flowtel-{version}-{revision}"))
}

impl Collector {
    pub async fn start(test: &str) -> Result<Self, HarnessError> {
        run(Command::new(repo_root().join("e2e/build-binaries")).arg("collector"))?;
        let bin = collector_bin();
        let dir = std::env::temp_dir().join(format!("flowtel-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| HarnessError::Spawn { command: "mkdir".into(), source })?;
        let port = free_port();
        let mut collector =
            Self { endpoint: format!("http://127.0.0.1:{port}"), dir, port, bin, incarnation: 0, process: None };
        collector.spawn().await?;
        Ok(collector)
    }

    /// Starts incarnation `self.incarnation`, writing files of its own: the file exporter truncates its file on
    /// start, and what an earlier incarnation received must stay readable.
    async fn spawn(&mut self) -> Result<(), HarnessError> {
        let (d, n, port) = (self.dir.display(), self.incarnation, self.port);
        let config = format!(
            "receivers:\n  otlp:\n    protocols:\n      grpc: {{endpoint: 127.0.0.1:{port}}}\n\
             exporters:\n  file/traces: {{path: {d}/traces-{n}.json, flush_interval: 100ms}}\n  \
             file/metrics: {{path: {d}/metrics-{n}.json, flush_interval: 100ms}}\n\
             service:\n  telemetry:\n    metrics: {{level: none}}\n  pipelines:\n    \
             traces: {{receivers: [otlp], exporters: [file/traces]}}\n    \
             metrics: {{receivers: [otlp], exporters: [file/metrics]}}\n"
        );
        let config_path = self.dir.join(format!("config-{n}.yaml"));
        std::fs::write(&config_path, config)
            .map_err(|source| HarnessError::Spawn { command: "write".into(), source })?;
        let log = std::fs::File::create(self.dir.join(format!("collector-{n}.log")))
            .map_err(|source| HarnessError::Spawn { command: "log".into(), source })?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&config_path)
            .stdout(log.try_clone().map_err(|source| HarnessError::Spawn { command: "log".into(), source })?)
            .stderr(log)
            .spawn()
            .map_err(|source| HarnessError::Spawn { command: self.bin.display().to_string(), source })?;
        self.process = Some(Process { child });
        wait_for_port(self.port).await
    }

    /// SIGKILL: the endpoint refuses connections until `restart`.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.process = None;
        self.incarnation += 1;
        self.spawn().await
    }

    /// Everything the counter `name` counted for `workflow`, across operator processes and attribute sets: the
    /// largest value per series (start time and attributes) summed, which adds up delta points (each its own
    /// interval) and takes the latest of cumulative ones (a process' series).
    pub fn total_across_processes(&self, name: &str, workflow: &str) -> i64 {
        let mut latest = std::collections::BTreeMap::<(String, String), i64>::new();
        for doc in self.documents("metrics") {
            for rm in doc["resourceMetrics"].as_array().into_iter().flatten() {
                for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                    for m in sm["metrics"].as_array().into_iter().flatten().filter(|m| m["name"] == name) {
                        for p in m["sum"]["dataPoints"].as_array().into_iter().flatten() {
                            if attribute(p, "workflow_name").as_deref() == Some(workflow) {
                                let start = p["startTimeUnixNano"].as_str().unwrap_or_default().to_string();
                                let v = p["asInt"].as_str().and_then(|s| s.parse().ok()).unwrap_or_default();
                                let e = latest.entry((start, p["attributes"].to_string())).or_default();
                                *e = (*e).max(v);
                            }
                        }
                    }
                }
            }
        }
        latest.values().sum()
    }

    /// Every OTLP JSON document the collector wrote for `signal` (`traces` or `metrics`), across restarts.
    pub fn documents(&self, signal: &str) -> Vec<serde_json::Value> {
        (0..=self.incarnation)
            .flat_map(|n| {
                otlp_documents(
                    &std::fs::read_to_string(self.dir.join(format!("{signal}-{n}.json"))).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Every span received, flattened: the OTLP JSON span objects.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for doc in self.documents("traces") {
            for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    out.extend(ss["spans"].as_array().into_iter().flatten().cloned());
                }
            }
        }
        out
    }

    /// The latest data point of metric `name` whose attributes include all of `attrs`, with the metric object.
    pub fn latest_point(&self, name: &str, attrs: &[(&str, &str)]) -> Option<(serde_json::Value, serde_json::Value)> {
        let mut found = None;
        for doc in self.documents("metrics") {
            for rm in doc["resourceMetrics"].as_array().into_iter().flatten() {
                for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                    for m in sm["metrics"].as_array().into_iter().flatten().filter(|m| m["name"] == name) {
                        let points = ["sum", "histogram", "gauge"]
                            .iter()
                            .find_map(|k| m[*k]["dataPoints"].as_array())
                            .cloned()
                            .unwrap_or_default();
                        for p in points {
                            if attrs.iter().all(|(k, v)| attribute(&p, k).as_deref() == Some(*v)) {
                                found = Some((m.clone(), p));
                            }
                        }
                    }
                }
            }
        }
        found
    }
}

/// A string attribute of an OTLP JSON span or data point.
pub fn attribute(item: &serde_json::Value, key: &str) -> Option<String> {
    item["attributes"].as_array()?.iter().find(|a| a["key"] == key).and_then(|a| {
        let v = &a["value"];
        v["stringValue"].as_str().map(str::to_string).or_else(|| v["intValue"].as_str().map(str::to_string))
    })
}

/// Waits (bounded) until something accepts connections on the loopback port.
pub async fn wait_for_port(port: u16) -> Result<(), HarnessError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            return Err(HarnessError::Timeout(format!("port {port} to accept connections")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The `flowtel` binary of this workspace. `cargo test --workspace` builds it (the operator's own integration tests
/// need it); a nested `cargo build` here would wait forever on the lock the running `cargo test` holds.
pub fn flowtel_binary() -> Result<PathBuf, HarnessError> {
    let exe =
        std::env::current_exe().map_err(|source| HarnessError::Spawn { command: "current_exe".into(), source })?;
    // A test runs from target/<profile>/deps/, a bench binary from target/<profile>/: flowtel is in the latter.
    let bin = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("flowtel"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("target/debug/flowtel"));
    if !bin.exists() {
        return Err(HarnessError::Missing(format!(
            "the operator binary {} (run the suite with `cargo test --workspace`, or `cargo build -p flowtel-operator`)",
            bin.display()
        )));
    }
    Ok(bin)
}

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
        body.lines().find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
    }
}

/// A WorkflowRun whose pod KWOK completes after `duration`.
pub fn simple_run(name: &str, workflow: &str, duration: &str) -> serde_json::Value {
    json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": name},
        "spec": {
            "workflowName": workflow,
            "template": {
                "metadata": {"annotations": {"sim.flowtel.dev/duration": duration}},
                "spec": {"containers": [{"name": "main", "image": "registry.example/app:1.0"}]}
            }
        }
    })
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

/// Write requests (not Events) the operator (user agent `flowtel/…`) sent for objects in `namespace`, from the
/// apiserver's audit log, by verb and resource.
pub fn operator_writes(namespace: &str) -> Vec<(String, u64)> {
    let log = cluster_kubeconfig().parent().map(|d| d.join("logs/audit.log")).unwrap_or_default();
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let ours = e["userAgent"].as_str().is_some_and(|ua| ua.starts_with("flowtel/"));
        let object = &e["objectRef"];
        let write = matches!(e["verb"].as_str(), Some("create" | "update" | "patch" | "delete" | "deletecollection"));
        if !ours
            || !write
            || e["stage"] != "ResponseComplete"
            || object["namespace"] != namespace
            || object["resource"] == "events"
        {
            continue;
        }
        let sub = object["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
        let key =
            format!("{} {}{}", e["verb"].as_str().unwrap_or("?"), object["resource"].as_str().unwrap_or("?"), sub);
        *counts.entry(key).or_default() += 1;
    }
    counts.into_iter().collect()
}

/// The OTLP JSON documents of a collector's file output, one a line. A SIGKILL can cut a document short, or leave
/// it without its newline; a collector started again and appending to the same file then continues that line. A cut
/// document is skipped; every whole one is read.
pub fn otlp_documents(text: &str) -> Vec<serde_json::Value> {
    const STARTS: [&str; 3] = ["{\"resourceSpans\":", "{\"resourceMetrics\":", "{\"resourceLogs\":"];
    let next_start = |s: &str| STARTS.iter().filter_map(|p| s.get(1..)?.find(p)).min().map(|i| i + 1);
    let mut out = Vec::new();
    for line in text.lines() {
        let mut rest = line.trim_start();
        while !rest.is_empty() {
            let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
            match stream.next() {
                Some(Ok(document)) => {
                    out.push(document);
                    rest = rest[stream.byte_offset()..].trim_start();
                }
                _ => match next_start(rest) {
                    Some(i) => rest = &rest[i..],
                    None => break,
                },
            }
        }
    }
    out
}

/// Polls `check` (bounded by `timeout`) until it returns Some; panics naming `what` otherwise.
pub async fn eventually<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what} did not happen within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The default StorageClass of the local control plane, as a laptop cluster has one.
pub const STORAGE_CLASS: &str = "flowtel-e2e";

/// What a laptop cluster's storage provisioner does, for the local control plane (which has none): a default
/// StorageClass, and a hostPath PersistentVolume, pre-bound to its claim, for every claim left pending. The
/// kube-controller-manager's binder then binds them, so StatefulSets with volume claims become ready. Started
/// once per test process, on a thread and runtime of its own (a test's runtime ends with the test).
pub fn ensure_storage() -> Result<(), HarnessError> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                runtime.block_on(provision_volumes(ready_tx));
            });
            ready_rx.recv().unwrap_or_else(|e| Err(e.to_string()))
        })
        .clone()
        .map_err(|e| HarnessError::Timeout(format!("the storage provisioner: {e}")))
}

/// The provisioner itself (also run as a process: `src/bin/volumes.rs`, started by `e2e/cluster node up`): applies
/// the default StorageClass, says so on `ready`, then binds pending claims until the process ends.
pub async fn provision_volumes(ready: std::sync::mpsc::Sender<Result<(), String>>) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
    use k8s_openapi::api::storage::v1::StorageClass;
    use kube::runtime::{WatchStreamExt, watcher};
    let client = match client().await {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let classes: Api<StorageClass> = Api::all(client.clone());
    let class = json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": "flowtel.dev/e2e-hostpath",
        "reclaimPolicy": "Retain",
        "volumeBindingMode": "Immediate",
    });
    let applied = classes.patch(STORAGE_CLASS, &PatchParams::apply(TEST_MANAGER).force(), &Patch::Apply(class)).await;
    let _ = ready.send(applied.map(|_| ()).map_err(|e| e.to_string()));
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    watcher(claims, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .for_each(|claim| {
            let volumes = volumes.clone();
            async move {
                let Ok(claim) = claim else { return };
                let (Some(spec), Some(uid), Some(ns), Some(name)) = (
                    claim.spec.as_ref(),
                    claim.metadata.uid.as_ref(),
                    claim.metadata.namespace.as_ref(),
                    claim.metadata.name.as_ref(),
                ) else {
                    return;
                };
                if spec.volume_name.is_some() {
                    return;
                }
                let size = spec
                    .resources
                    .as_ref()
                    .and_then(|r| r.requests.as_ref()?.get("storage").cloned())
                    .map_or_else(|| "1Gi".to_string(), |q| q.0);
                let pv_name = format!("pv-{uid}");
                // On a real node the directory is the volume: writable by the pod's non-root user, as a provisioner's
                // fresh volume is (hostPath volumes get no fsGroup ownership change).
                let path = format!("/tmp/flowtel-e2e-pv/{uid}");
                if std::fs::create_dir_all(&path).is_ok() {
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777));
                }
                let pv = json!({
                    "apiVersion": "v1", "kind": "PersistentVolume",
                    "metadata": {"name": pv_name, "labels": {"flowtel.dev/e2e": "true"}},
                    "spec": {
                        "capacity": {"storage": size},
                        "accessModes": spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                        "storageClassName": spec.storage_class_name.clone().unwrap_or_else(|| STORAGE_CLASS.into()),
                        "persistentVolumeReclaimPolicy": "Retain",
                        "hostPath": {"path": path},
                        "claimRef": {"namespace": ns, "name": name, "uid": uid},
                    }
                });
                let _ = volumes.patch(&pv_name, &PatchParams::apply(TEST_MANAGER), &Patch::Apply(pv)).await;
            }
        })
        .await;
}

/// GET `url` (plain HTTP on loopback): the status and the body, None when nothing answered within 10 s.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<hyper::body::Bytes>>();
    let uri: hyper::Uri = url.parse().ok()?;
    let exchange = async {
        let response = client.get(uri).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.ok()?
}

/// `base?key=value&...` with the values URL-encoded.
pub fn with_query(base: &str, params: &[(&str, &str)]) -> String {
    let query: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
    format!("{base}?{query}")
}

/// A TCP forwarder to the apiserver that can be cut, so that one process (and only that one) loses the apiserver:
/// a network partition, while the control plane itself stays up.
pub struct ApiserverProxy {
    /// A kubeconfig like the cluster's, through the proxy.
    pub kubeconfig: PathBuf,
    accept: tokio::task::JoinHandle<()>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl ApiserverProxy {
    pub async fn start(name: &str) -> Result<Self, HarnessError> {
        let original = std::fs::read_to_string(cluster_kubeconfig())
            .map_err(|source| HarnessError::Spawn { command: "read kubeconfig".into(), source })?;
        let server = original
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: https://"))
            .ok_or_else(|| HarnessError::Timeout("a server in the kubeconfig".into()))?
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| HarnessError::Spawn { command: "proxy listen".into(), source })?;
        let port =
            listener.local_addr().map_err(|source| HarnessError::Spawn { command: "proxy".into(), source })?.port();
        // The apiserver's certificate names 127.0.0.1, not a port: the same kubeconfig works through the proxy.
        let kubeconfig = std::env::temp_dir().join(format!("flowtel-proxy-{name}.kubeconfig"));
        std::fs::write(&kubeconfig, original.replace(&server, &format!("127.0.0.1:{port}")))
            .map_err(|source| HarnessError::Spawn { command: "write kubeconfig".into(), source })?;
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tracked = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let server = server.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&server).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap_or_else(|e| e.into_inner()).push(task.abort_handle());
            }
        });
        Ok(Self { kubeconfig, accept, connections })
    }

    /// Drops every connection and stops listening: from now on the apiserver is unreachable through the proxy.
    pub fn cut(&self) {
        self.accept.abort();
        for c in self.connections.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            c.abort();
        }
    }
}

impl Drop for ApiserverProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// What Argo CD concludes about `object` with flowtel's health check for its kind
/// (`manifests/argocd/flowtel.dev/<Kind>/health.lua`): its (status, message), as Argo CD runs it (the object as the
/// global `obj`, the script's returned table).
pub fn argocd_health(object: &serde_json::Value) -> Result<(String, String), String> {
    use mlua::LuaSerdeExt;
    let kind = object["kind"].as_str().ok_or("the object has no kind")?;
    let path = repo_root().join(format!("manifests/argocd/flowtel.dev/{kind}/health.lua"));
    let script = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let lua = mlua::Lua::new();
    let obj = lua.to_value(object).map_err(|e| e.to_string())?;
    lua.globals().set("obj", obj).map_err(|e| e.to_string())?;
    let hs: mlua::Table = lua.load(&script).set_name(path.display().to_string()).eval().map_err(|e| e.to_string())?;
    let status: String = hs.get("status").map_err(|e| format!("status: {e}"))?;
    let message: String = hs.get("message").map_err(|e| format!("message: {e}"))?;
    Ok((status, message))
}

#[cfg(test)]
mod tests {
    use super::otlp_documents;

    #[test]
    fn collector_output_is_read_across_a_kill_that_cut_a_line() {
        let whole = r#"{"resourceSpans":[{"resource":{"attributes":[]},"scopeSpans":[{"spans":[{"name":"a"}]}]}]}"#;
        let next = r#"{"resourceMetrics":[{"resource":{},"scopeMetrics":[]}]}"#;
        let cut = &whole[..40];
        // A whole document left without its newline, the next collector's on the same line; a cut one, likewise.
        let text = format!("{whole}\n{whole}{next}\n{cut}{next}\n{cut}");
        let docs = otlp_documents(&text);
        let kinds: Vec<bool> = docs.iter().map(|d| d.get("resourceSpans").is_some()).collect();
        assert_eq!(kinds, [true, true, false, false], "{docs:#?}");
    }
}
