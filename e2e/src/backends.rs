//! The data-path backends on loopback, for the tests that follow telemetry from a workload to where users query it:
//! real Prometheus (run with the configuration flowtel generates for a stack's Prometheus), Jaeger v2 (traces,
//! standing in for Tempo), VictoriaLogs (logs, standing in for Loki), and one or more replicas of the real collector
//! running the configuration flowtel's TelemetryStack builder generates, defaults included (the cardinality guard
//! on), with only its listening ports and backend addresses moved onto loopback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::{Process, cached_binary, collector_bin, flowtel_binary, free_ports, http_get, repo_root, run, with_query};

/// How the backends run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Collector replicas.
    pub collectors: usize,
    /// The collector's persistent sending queue on (mode StatefulSet, `persistentQueue`), on a directory per replica.
    pub persistent_queue: bool,
    /// The stack's `collector.tailSampling`, if on.
    pub tail_sampling: Option<&'static str>,
}

/// How to start one of the processes again.
struct Spawn {
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    /// The ports it listens on once up.
    ports: Vec<u16>,
}

/// The running backends; dropping it stops every process.
pub struct Backends {
    /// By name (`prometheus`, `jaeger`, `victorialogs`, `collector-<replica>`): how to start it, and the running
    /// process if it runs.
    processes: BTreeMap<String, (Spawn, Option<Process>)>,
    pub prometheus: String,
    pub jaeger_query: String,
    pub victorialogs: String,
    /// Each collector replica's OTLP gRPC port.
    pub collector_grpc: Vec<u16>,
    pub dir: PathBuf,
}

/// Spawns `bin` with its output appended to `log` and the extra environment `env`.
fn spawn(bin: &Path, args: &[String], env: &[(&str, &str)], log: &Path) -> Process {
    let file = std::fs::File::options().create(true).append(true).open(log).expect("log file");
    let child = Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    Process { child }
}

/// The objects `flowtel render` makes of a TelemetryStack (`stack`, as JSON), `--check` validating the collector's
/// configuration with the real collector.
pub fn render(dir: &Path, stack: &Value) -> Vec<Value> {
    let file = dir.join(format!("stack-{}.yaml", stack["metadata"]["name"].as_str().unwrap_or("stack")));
    std::fs::write(&file, serde_yaml_ng::to_string(stack).expect("yaml")).expect("write");
    let out = Command::new(flowtel_binary().expect("flowtel")).args(["render", "--check", "-f"]).arg(&file).output();
    let out = out.expect("flowtel render");
    assert!(out.status.success(), "flowtel render --check: {}", String::from_utf8_lossy(&out.stderr));
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    serde_yaml_ng::Deserializer::from_str(&rendered)
        .filter_map(|doc| <Value as serde::Deserialize>::deserialize(doc).ok())
        .collect()
}

/// The `data` entry `key` of the first rendered ConfigMap that has one.
pub fn config_entry(objects: &[Value], key: &str) -> String {
    objects.iter().find_map(|o| o["data"][key].as_str().map(str::to_string)).unwrap_or_else(|| panic!("no {key}"))
}

/// The collector configuration flowtel generates for a stack with the default collector settings whose backends
/// are these local ones; the replica's listening ports moved off the defaults by the stack's own override.
fn generated_collector_config(dir: &Path, ports: &BTreeMap<String, u16>, replica: usize, options: Options) -> String {
    let port = |what: &str| ports[&format!("{what}-{replica}")];
    let mut override_ = format!(
        "receivers:\n  otlp:\n    protocols:\n      grpc: {{endpoint: \"127.0.0.1:{}\"}}\n      http: {{endpoint: \"127.0.0.1:{}\"}}\n\
         extensions:\n  health_check: {{endpoint: \"127.0.0.1:{}\"}}\n\
         service:\n  telemetry:\n    metrics:\n      readers:\n        - pull:\n            exporter:\n              \
         prometheus: {{host: \"127.0.0.1\", port: {}}}\n",
        port("grpc"),
        port("http"),
        port("health"),
        port("metrics"),
    );
    let mut collector = json!({});
    if options.persistent_queue {
        let queue = dir.join(format!("queue-{replica}"));
        override_ = override_.replacen(
            "extensions:\n",
            &format!(
                "extensions:\n  file_storage/queue: {{directory: \"{}\", create_directory: true}}\n",
                queue.display()
            ),
            1,
        );
        collector = json!({"mode": "StatefulSet", "persistentQueue": {}});
    }
    if let Some(tail_sampling) = options.tail_sampling {
        collector["tailSampling"] = serde_json::from_str(tail_sampling).expect("tailSampling as JSON");
    }
    collector["configOverride"] = json!(override_);
    let stack = json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack",
        "metadata": {"name": format!("local-{replica}"), "namespace": "data-path"},
        "spec": {
            "collector": collector,
            "prometheus": {"enabled": false, "externalUrl": format!("http://127.0.0.1:{}", ports["prometheus"])},
            "tempo": {
                "enabled": false, "externalApi": "Jaeger",
                "externalUrl": format!("http://127.0.0.1:{}", ports["jaeger_otlp"]),
            },
            "loki": {
                "enabled": false, "externalApi": "VictoriaLogs",
                "externalUrl": format!("http://127.0.0.1:{}", ports["vlogs"]),
            },
            "grafana": {"enabled": false},
        }
    });
    config_entry(&render(dir, &stack), "collector.yaml")
}

/// The prometheus.yml flowtel generates for a stack's Prometheus.
fn generated_prometheus_config(dir: &Path) -> String {
    let stack = json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack",
        "metadata": {"name": "prometheus", "namespace": "data-path"}, "spec": {}
    });
    config_entry(&render(dir, &stack), "prometheus.yml")
}

/// Starts Prometheus, Jaeger, VictoriaLogs and `collectors` collector replicas (each its own process, named by
/// `HOSTNAME` as a pod is).
pub async fn start(test: &str, collectors: usize) -> Backends {
    start_with(test, Options { collectors, ..Options::default() }).await
}

pub async fn start_with(test: &str, options: Options) -> Backends {
    run(Command::new(repo_root().join("e2e/build-binaries")).arg("collector")).expect("collector built");
    run(Command::new(repo_root().join("e2e/build-binaries")).arg("backends")).expect("backends built");
    let dir = std::env::temp_dir().join(format!("flowtel-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut names: Vec<String> =
        ["prometheus", "jaeger_otlp", "jaeger_query", "jaeger_query_grpc", "vlogs"].map(String::from).to_vec();
    for replica in 0..options.collectors {
        names.extend(["grpc", "http", "health", "metrics"].map(|p| format!("{p}-{replica}")));
    }
    let ports: BTreeMap<String, u16> = names.iter().cloned().zip(free_ports(names.len())).collect();
    assert_eq!(ports.len(), names.len(), "a free port for each");
    let mut spawns = BTreeMap::new();

    let prometheus_yml = dir.join("prometheus.yml");
    std::fs::write(&prometheus_yml, generated_prometheus_config(&dir)).expect("write");
    spawns.insert(
        "prometheus".to_string(),
        Spawn {
            bin: cached_binary("prometheus", "PROMETHEUS_VERSION"),
            args: vec![
                format!("--config.file={}", prometheus_yml.display()),
                format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
                format!("--web.listen-address=127.0.0.1:{}", ports["prometheus"]),
                "--web.enable-otlp-receiver".into(),
                "--enable-feature=exemplar-storage".into(),
            ],
            env: Vec::new(),
            log: dir.join("prometheus.log"),
            ports: vec![ports["prometheus"]],
        },
    );

    let jaeger_yaml = format!(
        "service:\n  extensions: [jaeger_storage, jaeger_query]\n  pipelines:\n    traces:\n      receivers: [otlp]\n      \
         exporters: [jaeger_storage_exporter]\n  telemetry:\n    metrics:\n      level: none\n\
         extensions:\n  jaeger_storage:\n    backends:\n      memstore:\n        memory:\n          max_traces: 100000\n  \
         jaeger_query:\n    storage:\n      traces: memstore\n    http:\n      endpoint: \"127.0.0.1:{}\"\n    grpc:\n      \
         endpoint: \"127.0.0.1:{}\"\n\
         receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: \"127.0.0.1:{}\"\n\
         exporters:\n  jaeger_storage_exporter:\n    trace_storage: memstore\n",
        ports["jaeger_query"], ports["jaeger_query_grpc"], ports["jaeger_otlp"]
    );
    let jaeger_config = dir.join("jaeger.yaml");
    std::fs::write(&jaeger_config, jaeger_yaml).expect("write");
    spawns.insert(
        "jaeger".to_string(),
        Spawn {
            bin: cached_binary("jaeger", "JAEGER_VERSION"),
            args: vec![format!("--config={}", jaeger_config.display())],
            env: Vec::new(),
            log: dir.join("jaeger.log"),
            ports: vec![ports["jaeger_otlp"], ports["jaeger_query"]],
        },
    );

    spawns.insert(
        "victorialogs".to_string(),
        Spawn {
            bin: cached_binary("victoria-logs", "VICTORIALOGS_VERSION"),
            args: vec![
                format!("-httpListenAddr=127.0.0.1:{}", ports["vlogs"]),
                format!("-storageDataPath={}", dir.join("vlogs").display()),
            ],
            env: Vec::new(),
            log: dir.join("victorialogs.log"),
            ports: vec![ports["vlogs"]],
        },
    );

    for replica in 0..options.collectors {
        let config = dir.join(format!("collector-{replica}.yaml"));
        std::fs::write(&config, generated_collector_config(&dir, &ports, replica, options)).expect("write");
        let name = format!("collector-{replica}");
        spawns.insert(
            name.clone(),
            Spawn {
                bin: collector_bin(),
                args: vec![format!("--config={}", config.display())],
                env: vec![("HOSTNAME".into(), name.clone())],
                log: dir.join(format!("{name}.log")),
                ports: ["grpc", "http", "health", "metrics"].map(|p| ports[&format!("{p}-{replica}")]).to_vec(),
            },
        );
    }
    let mut backends = Backends {
        processes: spawns.into_iter().map(|(name, spawn)| (name, (spawn, None))).collect(),
        prometheus: format!("http://127.0.0.1:{}", ports["prometheus"]),
        jaeger_query: format!("http://127.0.0.1:{}", ports["jaeger_query"]),
        victorialogs: format!("http://127.0.0.1:{}", ports["vlogs"]),
        collector_grpc: (0..options.collectors).map(|r| ports[&format!("grpc-{r}")]).collect(),
        dir,
    };
    let names: Vec<String> = backends.processes.keys().cloned().collect();
    for name in names {
        backends.restart(&name).await;
    }
    backends
}

impl Backends {
    /// Kills the process `name` (SIGKILL): its ports refuse connections until `restart`.
    pub fn stop(&mut self, name: &str) {
        if let Some((_, process)) = self.processes.get_mut(name) {
            *process = None;
        }
    }

    /// Starts the process `name` (again, with its data directory and ports) and waits for its ports.
    pub async fn restart(&mut self, name: &str) {
        let dir = self.dir.clone();
        let (spawn, process) = self.processes.get_mut(name).unwrap_or_else(|| panic!("no process {name}"));
        *process = None;
        let env: Vec<(&str, &str)> = spawn.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        *process = Some(self::spawn(&spawn.bin, &spawn.args, &env, &spawn.log));
        for port in &spawn.ports {
            crate::wait_for_port(*port)
                .await
                .unwrap_or_else(|e| panic!("{name} on {port}: {e}; logs in {}", dir.display()));
        }
    }

    /// CPU seconds (user and system) the collector replicas have used so far, from /proc.
    pub fn collector_cpu_seconds(&self) -> f64 {
        // Clock ticks per second: 100 on Linux (USER_HZ).
        const TICKS: f64 = 100.0;
        self.processes
            .iter()
            .filter(|(name, _)| name.starts_with("collector-"))
            .filter_map(|(_, (_, p))| std::fs::read_to_string(format!("/proc/{}/stat", p.as_ref()?.child.id())).ok())
            .filter_map(|stat| {
                // Fields after the command's closing parenthesis; utime and stime are the 14th and 15th overall.
                let rest = stat.rsplit_once(')')?.1;
                let fields: Vec<&str> = rest.split_whitespace().collect();
                Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
            })
            .sum::<f64>()
            / TICKS
    }
}

/// Span count by trace id of `service`'s traces in Jaeger (`jaeger`: its query API) from the last two hours; ids as
/// 32 hex digits (Jaeger drops the leading zeros of an id whose high half is zero). Empty while Jaeger is not
/// answering.
pub async fn jaeger_traces(jaeger: &str, service: &str) -> BTreeMap<String, usize> {
    let url =
        with_query(&format!("{jaeger}/api/traces"), &[("service", service), ("limit", "5000"), ("lookback", "2h")]);
    let Some((200, body)) = http_get(&url).await else { return BTreeMap::new() };
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| Some((format!("{:0>32}", t["traceID"].as_str()?), t["spans"].as_array()?.len())))
        .collect()
}

/// The result vector of an instant PromQL query (empty when Prometheus is not answering yet).
pub async fn prometheus_query(base: &str, query: &str) -> Vec<Value> {
    let url = with_query(&format!("{base}/api/v1/query"), &[("query", query)]);
    let Some((200, body)) = http_get(&url).await else { return Vec::new() };
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The sum of a query's sample values.
pub fn sum(result: &[Value]) -> f64 {
    result.iter().filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok()).sum()
}

/// Waits (up to `wait`) until Prometheus holds `workflow_run_total` of `workflow` summed to at least `count`.
pub async fn await_run_total(prometheus: &str, workflow: &str, count: f64, wait: std::time::Duration) {
    let query = format!("sum(workflow_run_total{{workflow_name=\"{workflow}\"}})");
    crate::eventually(&format!("workflow_run_total of {workflow} reaching {count}"), wait, async || {
        (sum(&prometheus_query(prometheus, &query).await) >= count).then_some(())
    })
    .await;
}

/// Applies a TelemetryStack `name` in `namespace` whose collector is the external `endpoint` (one of these
/// backends' collectors), every other component off, and waits until its status publishes that endpoint: runs that
/// name it send it all their telemetry.
pub async fn external_stack(client: &kube::Client, namespace: &str, name: &str, endpoint: &str) {
    use flowtel_crds::TelemetryStack;
    use kube::api::{Api, Patch, PatchParams};
    let stack = json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack", "metadata": {"name": name},
        "spec": {
            "collector": {"enabled": false, "externalEndpoint": endpoint},
            "prometheus": {"enabled": false}, "tempo": {"enabled": false}, "loki": {"enabled": false},
            "grafana": {"enabled": false},
        }
    });
    let stacks: Api<TelemetryStack> = Api::namespaced(client.clone(), namespace);
    stacks.patch(name, &PatchParams::apply(crate::TEST_MANAGER), &Patch::Apply(&stack)).await.expect("stack");
    let serves = |s: Option<&TelemetryStack>| {
        s.and_then(|s| s.status.as_ref()).is_some_and(|s| s.endpoints.otlp_grpc.as_deref() == Some(endpoint))
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(90),
        kube::runtime::wait::await_condition(stacks, name, serves),
    )
    .await
    .expect("the stack serves its endpoint")
    .expect("watch");
}

/// The ten workflow metrics of the seed as Prometheus names them (a histogram by its buckets).
pub const WORKFLOW_METRICS: [&str; 10] = [
    "workflow_run_total",
    "workflow_run_duration_ms_bucket",
    "workflow_run_status",
    "workflow_step_duration_ms_bucket",
    "workflow_step_status",
    "workflow_retry_count",
    "workflow_image_uploaded",
    "workflow_image_size_bytes_bucket",
    "workflow_db_upsert",
    "workflow_db_upsert_duration_ms_bucket",
];

/// A run's trace as Jaeger returns it.
pub struct RunTrace {
    pub spans: Vec<Value>,
}

impl RunTrace {
    /// Waits (up to `wait`) until Jaeger holds trace `trace_id` with the run's span and the root span of workflow
    /// `workflow` (`workflow <name>`).
    pub async fn fetch(jaeger_query: &str, trace_id: &str, workflow: &str, wait: std::time::Duration) -> Self {
        let url = format!("{jaeger_query}/api/traces/{trace_id}");
        let root = format!("workflow {workflow}");
        let spans = crate::eventually(&format!("trace {trace_id} in Jaeger"), wait, async || {
            let (code, body) = http_get(&url).await?;
            let v: Value = serde_json::from_str(&body).ok()?;
            let spans = v["data"][0]["spans"].as_array().cloned().unwrap_or_default();
            let has = |name: &str| spans.iter().any(|s| s["operationName"] == name);
            (code == 200 && has("workflow.run") && has(&root)).then_some(spans)
        })
        .await;
        Self { spans }
    }

    /// The span named `name` (the first, if several).
    pub fn span(&self, name: &str) -> &Value {
        self.spans.iter().find(|s| s["operationName"] == name).unwrap_or_else(|| panic!("no span {name}"))
    }

    /// The span id of `span`'s parent.
    pub fn parent_of(span: &Value) -> Option<&str> {
        span["references"].as_array()?.iter().find(|r| r["refType"] == "CHILD_OF")?["spanID"].as_str()
    }

    /// The workflow's step spans (`step <name>`).
    pub fn steps(&self) -> Vec<&Value> {
        self.spans.iter().filter(|s| s["operationName"].as_str().is_some_and(|n| n.starts_with("step "))).collect()
    }

    /// Asserts the chain a run's trace must have: run → attempt → the workflow's root → each step.
    pub fn assert_run_attempt_workflow_steps(&self, workflow: &str) {
        let attempt = self.span("workflow.attempt");
        let root = self.span(&format!("workflow {workflow}"));
        assert_eq!(Self::parent_of(attempt), self.span("workflow.run")["spanID"].as_str(), "attempt under run");
        assert_eq!(Self::parent_of(root), attempt["spanID"].as_str(), "the workflow's root under the attempt");
        for step in self.steps() {
            assert_eq!(Self::parent_of(step), root["spanID"].as_str(), "{} under the root", step["operationName"]);
        }
    }
}
