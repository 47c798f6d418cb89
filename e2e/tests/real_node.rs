//! The install journey on a real node (`e2e/cluster node up`: a real kubelet, containerd and runc, the CNI bridge,
//! kube-proxy, CoreDNS), with flowtel's images built here (`e2e/images`): `helm install` of the chart → the operator
//! pod Ready and leading → a TelemetryStack whose collector and Prometheus run as real pods (claims bound), with
//! Jaeger and VictoriaLogs as its trace and log backends → a WorkflowRun of the `sync` image naming that stack → its
//! container runs with the injected environment and reaches the collector by the Service's DNS name → its trace,
//! its metrics and its logs queried back from those pods.
//!
//! The KWOK nodes are cordoned for the test (so that every pod lands on the real node) and uncordoned after; this
//! binary's one test runs alone, as cargo runs test binaries one after another.

use std::process::Command;
use std::time::{Duration, Instant};

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunPhase;
use flowtel_e2e::backends::{RunTrace, prometheus_query, sum};
use flowtel_e2e::{TEST_MANAGER, TestNamespace, client, eventually, helm, http_get, kubectl, repo_root, run};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(180);

fn cluster(args: &[&str]) -> Command {
    let mut cmd = Command::new(repo_root().join("e2e/cluster"));
    cmd.args(args);
    cmd
}

/// The real node for the test's span; the KWOK nodes cordoned meanwhile.
struct RealNode;

impl RealNode {
    fn up() -> Self {
        // The node's volume provisioner is this package's `volumes` binary (cargo built it for this test).
        run(cluster(&["node", "up"]).env("FLOWTEL_VOLUMES_BIN", env!("CARGO_BIN_EXE_volumes"))).expect("node up");
        let node = RealNode;
        run(kubectl().args(["cordon", "-l", "type=kwok"])).expect("cordon the KWOK nodes");
        node
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        let _ = run(kubectl().args(["uncordon", "-l", "type=kwok"]));
        if std::env::var_os("FLOWTEL_KEEP_REAL_NODE").is_none() {
            let _ = run(&mut cluster(&["node", "down"]));
        }
    }
}

fn image(index: usize) -> String {
    let out = Command::new(repo_root().join("e2e/images")).arg("names").output().expect("e2e/images names");
    String::from_utf8_lossy(&out.stdout).lines().nth(index).expect("an image name").to_string()
}

/// `http://<cluster IP>:<port>` of a Service (the host reaches cluster IPs through kube-proxy's rules).
async fn service_url(services: &Api<Service>, name: &str, port: u16) -> String {
    let ip = eventually(&format!("Service {name}"), WAIT, async || {
        services.get_opt(name).await.ok().flatten().and_then(|s| s.spec?.cluster_ip)
    })
    .await;
    format!("http://{ip}:{port}")
}

fn apply(namespace: &str, manifest: &Value) {
    let mut child = kubectl()
        .args(["apply", "--server-side", "--field-manager", TEST_MANAGER, "-n", namespace, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl apply");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(manifest.to_string().as_bytes()).expect("write");
    let out = child.wait_with_output().expect("kubectl apply");
    assert!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
}

/// Jaeger v2 (traces, in memory) and VictoriaLogs (logs), the Apache-2.0 backends built here, as Deployments and
/// Services: what the stack's collector exports to in place of Tempo and Loki.
fn backends(namespace: &str) {
    let jaeger_config = "service:\n  extensions: [jaeger_storage, jaeger_query]\n  pipelines:\n    traces:\n      \
        receivers: [otlp]\n      exporters: [jaeger_storage_exporter]\n  telemetry:\n    metrics:\n      level: none\n\
        extensions:\n  jaeger_storage:\n    backends:\n      memstore:\n        memory:\n          max_traces: 10000\n  \
        jaeger_query:\n    storage:\n      traces: memstore\n    http:\n      endpoint: 0.0.0.0:16686\n\
        receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 0.0.0.0:4318\n\
        exporters:\n  jaeger_storage_exporter:\n    trace_storage: memstore\n";
    apply(
        namespace,
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "jaeger"}, "data": {"jaeger.yaml": jaeger_config}}),
    );
    let locked_down = json!({
        "runAsNonRoot": true, "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}
    });
    for (name, image, args, ports, volume) in [
        ("jaeger", image(3), json!(["--config=/etc/jaeger/jaeger.yaml"]), json!([4318, 16686]), "config"),
        ("victorialogs", image(4), json!(["-storageDataPath=/data", "-httpListenAddr=:9428"]), json!([9428]), "data"),
    ] {
        let mounts = if volume == "config" {
            json!([{"name": "config", "mountPath": "/etc/jaeger"}])
        } else {
            json!([{"name": "data", "mountPath": "/data"}])
        };
        let volumes = if volume == "config" {
            json!([{"name": "config", "configMap": {"name": "jaeger"}}])
        } else {
            json!([{"name": "data", "emptyDir": {}}])
        };
        let container_ports: Vec<Value> =
            ports.as_array().expect("ports").iter().map(|p| json!({"containerPort": p})).collect();
        apply(
            namespace,
            &json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                "spec": {
                    "selector": {"matchLabels": {"app": name}},
                    "template": {
                        "metadata": {"labels": {"app": name}},
                        "spec": {"containers": [{
                            "name": name, "image": image, "imagePullPolicy": "Never", "args": args,
                            "ports": container_ports, "securityContext": locked_down, "volumeMounts": mounts,
                        }], "volumes": volumes}
                    }
                }
            }),
        );
        let service_ports: Vec<Value> =
            ports.as_array().expect("ports").iter().map(|p| json!({"name": format!("p{p}"), "port": p})).collect();
        apply(
            namespace,
            &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                    "spec": {"selector": {"app": name}, "ports": service_ports}}),
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_to_a_traced_run_on_a_real_node() {
    let started = Instant::now();
    let _node = RealNode::up();
    let node_up = started.elapsed();
    let client = client().await.expect("client");
    let ns = TestNamespace::new(&client, "journey").await.expect("namespace");
    backends(&ns.name);

    // 1. helm install, with the image built here (never pulled: the node has it).
    let install_started = Instant::now();
    let install = helm()
        .args(["install", "flowtel", &repo_root().join("charts/flowtel").display().to_string()])
        .args(["--namespace", &ns.name, "--set", &format!("watchNamespace={}", ns.name)])
        .args(["--set", "image.pullPolicy=Never", "--set", "aggregatedRoles=false"])
        .args(["--set-string", "nodeSelector.flowtel\\.dev/real-node=true", "--wait", "--timeout", "180s"])
        .output()
        .expect("helm install");
    assert!(install.status.success(), "helm install: {}", String::from_utf8_lossy(&install.stderr));
    // `helm test`: a pod of the same image asks the operator's /readyz through a Service (`flowtel probe`).
    let test = helm().args(["test", "flowtel", "--namespace", &ns.name, "--logs", "--timeout", "120s"]).output();
    let test = test.expect("helm test");
    let said = String::from_utf8_lossy(&test.stdout);
    assert!(test.status.success(), "helm test: {said}{}", String::from_utf8_lossy(&test.stderr));
    assert!(said.contains("/readyz: 200 OK"), "the probe's answer in the test pod's log: {said}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let operator = first_pod(&pods, "app.kubernetes.io/name=flowtel", "the operator pod").await;
    let operator_name = operator.metadata.name.clone().expect("name");
    let operator_status = operator.status.clone().expect("status");
    assert_eq!(operator.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("flowtel-real-node"));
    assert!(
        operator_status
            .container_statuses
            .iter()
            .flatten()
            .all(|c| c.ready && c.state.as_ref().is_some_and(|s| s.running.is_some())),
        "the operator container runs and is ready (/readyz): {operator_status:?}"
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    eventually("the operator pod holds the Lease", WAIT, async || {
        let lease = leases.get_opt("flowtel").await.ok().flatten()?;
        lease.spec?.holder_identity?.starts_with(&format!("{operator_name}_")).then_some(())
    })
    .await;

    // 2. A TelemetryStack: the collector and Prometheus as real pods (Prometheus' claim bound by the provisioner),
    // Jaeger and VictoriaLogs behind it; Grafana, Tempo and Loki have no image built here.
    let stack = json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack", "metadata": {"name": "team"},
        "spec": {
            "collector": {"image": image(1)},
            "prometheus": {"image": image(2), "storage": {"size": "1Gi"}},
            "tempo": {
                "enabled": false, "externalApi": "Jaeger",
                "externalUrl": format!("http://jaeger.{}.svc:4318", ns.name),
                "externalQueryUrl": format!("http://jaeger.{}.svc:16686", ns.name),
            },
            "loki": {
                "enabled": false, "externalApi": "VictoriaLogs",
                "externalUrl": format!("http://victorialogs.{}.svc:9428", ns.name),
            },
            "grafana": {"enabled": false},
        }
    });
    apply(&ns.name, &stack);
    let stacks: Api<flowtel_crds::TelemetryStack> = Api::namespaced(client.clone(), &ns.name);
    eventually("the TelemetryStack Ready", WAIT, async || {
        let s = stacks.get_opt("team").await.ok().flatten()?;
        s.status?.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
    })
    .await;

    // 3. A WorkflowRun of the sync image naming the stack: a real container, its telemetry through the Service.
    let workflow_run = json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "sync-1"},
        "spec": {
            "workflowName": "sync",
            "telemetryStackRef": {"name": "team"},
            "template": {"spec": {"containers": [{
                "name": "main", "image": image(0), "imagePullPolicy": "Never", "command": ["/usr/local/bin/sync"],
                // Seed 1 with 40 % flaky calls retries some (six retries; workflow.retry.count has points) and succeeds.
                "env": [
                    {"name": "WORKFLOW_ITEMS", "value": "3"}, {"name": "WORKFLOW_STEP_MS", "value": "20"},
                    {"name": "WORKFLOW_FLAKY_PERCENT", "value": "40"}, {"name": "WORKFLOW_SEED", "value": "1"},
                    // Its logs on the console too, for `kubectl flowtel logs` (they also go to the stack).
                    {"name": "WORKFLOW_CONSOLE", "value": "1"},
                ],
            }]}}
        }
    });
    apply(&ns.name, &workflow_run);
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let trace_id = eventually("the run Succeeded with its telemetry exported", WAIT, async || {
        let r = runs.get_opt("sync-1").await.ok().flatten()?;
        let s = r.status?;
        assert_ne!(s.phase, Some(WorkflowRunPhase::Failed), "the run failed: {:?}", s.attempts);
        (s.phase == Some(WorkflowRunPhase::Succeeded) && s.telemetry.is_some_and(|t| t.finished)).then_some(s.trace_id?)
    })
    .await;

    // The container got the stack's collector by its Service's DNS name (it resolved: the data below arrived).
    let pod = first_pod(&pods, "job-name=sync-1-1", "the attempt's pod").await;
    assert_eq!(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("flowtel-real-node"));
    let endpoint = pod.spec.as_ref().and_then(|s| {
        s.containers[0].env.as_ref()?.iter().find(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT")?.value.clone()
    });
    assert_eq!(endpoint, Some(format!("http://team-collector.{}.svc:4317", ns.name)));

    // 4. Its trace in Jaeger: run → attempt → workflow → steps.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let jaeger = service_url(&services, "jaeger", 16686).await;
    RunTrace::fetch(&jaeger, &trace_id, "sync", WAIT).await.assert_run_attempt_workflow_steps("sync");

    // 4b. The same workflow pooled: a WorkerPool of the sync image on this node (the agent copied in from the flowtel
    // image by its init container, the pod's token projected), a run executed by one of its workers, which asks the
    // leader through the dispatch Service; its trace joined the same way.
    let worker_env = json!([
        {"name": "WORKFLOW_ITEMS", "value": "3"}, {"name": "WORKFLOW_STEP_MS", "value": "20"},
        {"name": "WORKFLOW_FLAKY_PERCENT", "value": "40"}, {"name": "WORKFLOW_CONSOLE", "value": "1"},
    ]);
    let pool = json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "sync-pool"},
        "spec": {
            "template": {"spec": {"containers": [{
                "name": "main", "image": image(0), "imagePullPolicy": "Never", "command": ["/usr/local/bin/sync"],
                "env": worker_env,
            }]}},
            "allowedEnv": ["WORKFLOW_SEED"],
            "replicas": {"min": 1, "max": 1}
        }
    });
    apply(&ns.name, &pool);
    let pooled = json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "sync-pooled"},
        "spec": {"workflowName": "sync", "telemetryStackRef": {"name": "team"},
            "pool": {"name": "sync-pool", "env": [{"name": "WORKFLOW_SEED", "value": "1"}]}}
    });
    apply(&ns.name, &pooled);
    let (pooled_trace, worker) = eventually("the pooled run Succeeded with its telemetry exported", WAIT, async || {
        let s = runs.get_opt("sync-pooled").await.ok().flatten()?.status?;
        assert_ne!(s.phase, Some(WorkflowRunPhase::Failed), "the pooled run failed: {:?}", s.attempts);
        let done = s.phase == Some(WorkflowRunPhase::Succeeded) && s.telemetry.is_some_and(|t| t.finished);
        done.then_some((s.trace_id?, s.attempts.last()?.pod_name.clone()?))
    })
    .await;
    assert!(worker.starts_with("sync-pool-workers-"), "run by a worker pod: {worker}");
    let worker_pod = first_pod(&pods, "flowtel.dev/pool=sync-pool", "the pool's worker pod").await;
    assert_eq!(worker_pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), Some("flowtel-real-node"));
    RunTrace::fetch(&jaeger, &pooled_trace, "sync", WAIT).await.assert_run_attempt_workflow_steps("sync");

    // 5. The ten metrics in the stack's Prometheus.
    let prometheus = service_url(&services, "team-prometheus", 9090).await;
    for metric in flowtel_e2e::backends::WORKFLOW_METRICS {
        eventually(&format!("{metric} in the stack's Prometheus"), WAIT, async || {
            let r = prometheus_query(&prometheus, &format!("{metric}{{workflow_name=\"sync\"}}")).await;
            (!r.is_empty()).then_some(())
        })
        .await;
    }
    // The Job-mode run and the pooled one, each counted once.
    let runs_counted = eventually("both runs counted", WAIT, async || {
        let n = sum(&prometheus_query(&prometheus, "sum(workflow_run_total{workflow_name=\"sync\"})").await);
        (n >= 2.0).then_some(n)
    })
    .await;
    assert_eq!(runs_counted, 2.0);

    // 6. Its logs in VictoriaLogs, with the run's trace id.
    let victorialogs = service_url(&services, "victorialogs", 9428).await;
    eventually("the workflow's logs in VictoriaLogs", WAIT, async || {
        let url = flowtel_e2e::with_query(
            &format!("{victorialogs}/select/logsql/query"),
            &[("query", &format!("trace_id:{trace_id}"))],
        );
        let (code, body) = http_get(&url).await?;
        (code == 200 && body.contains("workflow started")).then_some(())
    })
    .await;
    let first_traced_run = install_started.elapsed();

    // 7. `kubectl flowtel`: the attempt's logs from the real kubelet, and the trace's page in the stack's backend.
    let (ok, logs, stderr) = flowtel_e2e::kubectl_flowtel(&ns.name, &["logs", "sync-1"]);
    assert!(ok && logs.contains("workflow started"), "kubectl flowtel logs: {stderr}\n{logs}");
    let (ok, same, _) = flowtel_e2e::kubectl_flowtel(&ns.name, &["logs", "sync-1", "--attempt", "1"]);
    assert!(ok && same == logs, "the only attempt is the latest");
    // A pooled run's lines, from its worker's log, without the agent's marks or its own lines.
    let (ok, pooled_logs, stderr) = flowtel_e2e::kubectl_flowtel(&ns.name, &["logs", "sync-pooled"]);
    assert!(ok && pooled_logs.contains("workflow started"), "kubectl flowtel logs (pooled): {stderr}\n{pooled_logs}");
    assert!(!pooled_logs.contains("[sync-pooled-1]"), "the agent's marks are not shown: {pooled_logs}");
    let (ok, links, stderr) = flowtel_e2e::kubectl_flowtel(&ns.name, &["trace", "sync-1"]);
    assert!(ok, "kubectl flowtel trace: {stderr}");
    let jaeger_page = format!("jaeger  http://jaeger.{}.svc:16686/trace/{trace_id}", ns.name);
    assert_eq!(links, format!("trace   {trace_id}\n{jaeger_page}\n"));

    // Load on the collector pod: 200 more `sync` processes (on the host, 20 at a time) exporting to its cluster IP.
    let collector_ip = service_url(&services, "team-collector", 4317).await;
    let sync = flowtel_e2e::flowtel_binary().expect("flowtel").with_file_name("sync");
    let load_started = Instant::now();
    for wave in 0..10 {
        let children: Vec<_> = (0..20)
            .map(|i| {
                Command::new(&sync)
                    .env_clear()
                    .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector_ip)
                    .env("OTEL_RESOURCE_ATTRIBUTES", format!("workflow.run_id=load-{wave}-{i}"))
                    .env("WORKFLOW_ITEMS", "5")
                    .env("WORKFLOW_STEP_MS", "1")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("sync")
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().expect("sync");
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && !log.contains("otel-fallback"), "sync under load: {log}");
        }
    }
    let load_seconds = load_started.elapsed().as_secs_f64();

    // Memory, from the containers' cgroups on this node: the operator's, and the collector's against its limit.
    let operator_memory = container_memory(&operator);
    let collector =
        first_pod(&pods, "app.kubernetes.io/name=collector,flowtel.dev/stack=team", "the collector pod").await;
    let collector_memory = container_memory(&collector);
    // The memory limiter read the container's real limit (cgroup), so its percentages are of that limit. Read with
    // `kubectl logs`: through the apiserver to the real kubelet.
    let collector_name = collector.metadata.name.clone().expect("name");
    let collector_log = run(kubectl().args(["logs", "-n", &ns.name, &collector_name])).expect("kubectl logs");
    let total = format!("\"total_memory_mib\": {}", collector_memory.limit_mib);
    assert!(collector_log.contains(&total), "the memory limiter sees the container's limit ({total}): {collector_log}");
    println!("journey: namespace {}; Jaeger {jaeger}, Prometheus {prometheus}, VictoriaLogs {victorialogs}", ns.name);
    println!("journey: the run's trace: {jaeger}/api/traces/{trace_id}");
    println!(
        "journey: node up {:.1} s; helm install → first traced run {:.1} s; operator {operator_memory}; \
         collector after 200 more runs in {load_seconds:.1} s: {collector_memory}",
        node_up.as_secs_f64(),
        first_traced_run.as_secs_f64()
    );
}

/// The first pod with these labels.
async fn first_pod(pods: &Api<Pod>, labels: &str, what: &str) -> Pod {
    let list = pods.list(&ListParams::default().labels(labels)).await.expect("pods");
    list.items.into_iter().next().unwrap_or_else(|| panic!("{what} ({labels})"))
}

/// A container's memory, from its cgroup (v1, cgroupfs driver), in MiB.
struct Memory {
    rss_mib: f64,
    peak_mib: f64,
    limit_mib: u64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rss {:.1} MiB, peak {:.1} MiB, limit {} MiB", self.rss_mib, self.peak_mib, self.limit_mib)
    }
}

/// The memory of a pod's first container.
fn container_memory(pod: &Pod) -> Memory {
    let uid = pod.metadata.uid.clone().expect("uid");
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref()?.first()?.container_id.clone())
        .and_then(|id| id.strip_prefix("containerd://").map(str::to_string))
        .expect("container id");
    let root = std::path::Path::new("/sys/fs/cgroup/memory/kubepods");
    let dir = ["", "burstable", "besteffort"]
        .iter()
        .map(|qos| root.join(qos).join(format!("pod{uid}")).join(&id))
        .find(|d| d.exists())
        .unwrap_or_else(|| panic!("the memory cgroup of {id}"));
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let number = |text: &str| text.trim().parse::<u64>().unwrap_or_default();
    let rss = read("memory.stat").lines().find_map(|l| l.strip_prefix("total_rss ").map(number)).unwrap_or_default();
    Memory {
        rss_mib: rss as f64 / 1048576.0,
        peak_mib: number(&read("memory.max_usage_in_bytes")) as f64 / 1048576.0,
        limit_mib: number(&read("memory.limit_in_bytes")) / 1048576,
    }
}
