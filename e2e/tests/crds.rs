//! The CRDs on the real apiserver: they install from the checked-in files and become Established, valid objects
//! are accepted and read back unchanged, and invalid ones are rejected with the offending field named.

use flowtel_e2e::{TEST_MANAGER, TestNamespace, client, install_crds};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

fn api(client: &kube::Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("flowtel.dev", "v1alpha1", kind);
    let plural = format!("{}s", kind.to_lowercase());
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk_with_plural(&gvk, &plural))
}

/// Creates or updates `obj` by server-side apply with strict field validation, as `kubectl apply
/// --server-side --validate=strict` does.
async fn apply(api: &Api<DynamicObject>, obj: &Value) -> Result<DynamicObject, kube::Error> {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let params = PatchParams::apply(TEST_MANAGER).force().validation_strict();
    api.patch(&name, &params, &Patch::Apply(obj)).await
}

/// Creates `obj` with a plain POST and `fieldValidation=Strict`, as `kubectl create --validate=strict` does.
/// (Server-side apply reports a type mismatch as a 500 from its typed-patch step; a create reports every schema
/// violation as 422 Invalid with causes.)
async fn create_strict(client: &kube::Client, ns: &str, kind: &str, obj: &Value) -> Result<DynamicObject, kube::Error> {
    let plural = format!("{}s", kind.to_lowercase());
    let url = format!("/apis/flowtel.dev/v1alpha1/namespaces/{ns}/{plural}?fieldValidation=Strict");
    let body = serde_json::to_vec(obj).expect("serializable");
    let req = http::Request::post(url).header("content-type", "application/json").body(body).expect("request");
    client.request::<DynamicObject>(req).await
}

/// A WorkflowRun with every field given, so the apiserver's defaulting changes nothing and the object reads back
/// exactly as sent.
fn valid_workflow_run(name: &str) -> Value {
    json!({
        "apiVersion": "flowtel.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": name},
        "spec": {
            "workflowName": "sync",
            "template": {
                "metadata": {"labels": {"app": "sync"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "main",
                        "image": "registry.example/sync:1.0",
                        "args": ["--once"],
                        "env": [{"name": "MODE", "value": "full"}],
                        "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}}
                    }]
                }
            },
            "telemetryStackRef": {"name": "stack"},
            "retry": {
                "limit": 2,
                "backoff": {"baseSeconds": 5, "factor": 2, "maxSeconds": 60},
                "permanentExitCodes": [42],
                "transientExitCodes": [3, 4],
                "disruptionLimit": 10
            },
            "activeDeadlineSeconds": 600,
            "ttlSecondsAfterFinished": 3600,
            "cancel": false
        }
    })
}

fn valid_telemetry_stack(name: &str) -> Value {
    json!({
        "apiVersion": "flowtel.dev/v1alpha1",
        "kind": "TelemetryStack",
        "metadata": {"name": name},
        "spec": {
            "collector": {
                "enabled": true, "image": "otel/opentelemetry-collector-contrib:0.165.1", "mode": "Deployment",
                "replicas": 2, "memoryLimitPercent": 75, "spikeLimitPercent": 20, "batchSize": 1000,
                "autoscaling": {"minReplicas": 2, "maxReplicas": 6, "targetCpuPercent": 70},
                "cardinalityGuard": {"attributes": ["phone_id"], "action": "Hash"},
                "resources": {"limits": {"memory": "1Gi"}}
            },
            "prometheus": {
                "enabled": true, "image": "prom/prometheus:v3.8.0", "replicas": 1, "retention": "30d",
                "storage": {"size": "20Gi"}
            },
            "tempo": {"enabled": false, "image": "grafana/tempo:2.9.0", "retention": "1h", "storage": {}},
            "loki": {"enabled": false, "image": "grafana/loki:3.6.0", "retention": "168h", "storage": {}},
            "grafana": {
                "enabled": true, "image": "grafana/grafana:12.3.0", "replicas": 1,
                "adminCredentialsSecretRef": {"name": "grafana-admin"}
            }
        }
    })
}

#[tokio::test]
async fn valid_objects_are_accepted_and_read_back_unchanged() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs installed and Established");
    let ns = TestNamespace::new(&client, "crd-valid").await.expect("namespace");

    for (kind, obj) in
        [("WorkflowRun", valid_workflow_run("run-1")), ("TelemetryStack", valid_telemetry_stack("stack"))]
    {
        let api = api(&client, &ns.name, kind);
        apply(&api, &obj).await.unwrap_or_else(|e| panic!("valid {kind} rejected: {e}"));
        let read = api.get(obj["metadata"]["name"].as_str().unwrap_or_default()).await.expect("read back");
        assert_eq!(read.data["spec"], obj["spec"], "{kind} spec changed between write and read");
    }

    // Typed round trip: what the apiserver stored deserializes into the Rust types.
    let runs: Api<flowtel_crds::WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let run = runs.get("run-1").await.expect("typed read");
    assert_eq!(run.spec.retry.permanent_exit_codes, vec![42]);
}

#[tokio::test]
async fn defaults_fill_a_minimal_workflow_run() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs installed and Established");
    let ns = TestNamespace::new(&client, "crd-defaults").await.expect("namespace");
    let api = api(&client, &ns.name, "WorkflowRun");
    let minimal = json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun", "metadata": {"name": "minimal"},
        "spec": {"workflowName": "sync", "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}}}
    });
    let stored = apply(&api, &minimal).await.expect("minimal run accepted");
    assert_eq!(stored.data["spec"]["retry"]["limit"], 0);
    assert_eq!(stored.data["spec"]["retry"]["disruptionLimit"], 10);
    assert_eq!(stored.data["spec"]["retry"]["backoff"], json!({"baseSeconds": 10, "factor": 2, "maxSeconds": 300}));
    assert_eq!(stored.data["spec"]["cancel"], false);

    let stacks = self::api(&client, &ns.name, "TelemetryStack");
    let empty = json!({"apiVersion": "flowtel.dev/v1alpha1", "kind": "TelemetryStack", "metadata": {"name": "s"},
        "spec": {}});
    let stored = apply(&stacks, &empty).await.expect("empty stack accepted");
    // The user's original system: memory limiter 75 %, batches of 1000, traces 1h, metrics 30d.
    assert_eq!(stored.data["spec"]["collector"]["memoryLimitPercent"], 75);
    assert_eq!(stored.data["spec"]["collector"]["batchSize"], 1000);
    assert_eq!(stored.data["spec"]["tempo"]["retention"], "1h");
    assert_eq!(stored.data["spec"]["prometheus"]["retention"], "30d");
}

/// One invalid object: `path` (a JSON pointer) set to `bad` (or removed when `None`), the field the apiserver
/// must name, and the value (or removal) that makes the same object valid again.
struct Invalid {
    what: &'static str,
    kind: &'static str,
    path: &'static str,
    bad: Option<Value>,
    field: &'static str,
    fixed: Option<Value>,
    /// Rejected while decoding (400, field named in the message) rather than by validation (422, field in causes).
    bad_request: bool,
}

fn set(obj: &mut Value, path: &str, value: Option<Value>) {
    let (parent, key) = path.rsplit_once('/').expect("pointer with a parent");
    let parent = obj.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent} in the object"));
    let map = parent.as_object_mut().expect("parent is an object");
    match value {
        Some(v) => {
            map.insert(key.to_string(), v);
        }
        None => {
            map.remove(key);
        }
    }
}

fn invalid_cases() -> Vec<Invalid> {
    vec![
        Invalid {
            what: "wrong type",
            kind: "WorkflowRun",
            path: "/spec/retry/limit",
            bad: Some(json!("three")),
            field: "spec.retry.limit",
            fixed: Some(json!(3)),
            bad_request: false,
        },
        Invalid {
            what: "negative retry limit",
            kind: "WorkflowRun",
            path: "/spec/retry/limit",
            bad: Some(json!(-1)),
            field: "spec.retry.limit",
            fixed: Some(json!(0)),
            bad_request: false,
        },
        Invalid {
            what: "missing required field",
            kind: "WorkflowRun",
            path: "/spec/workflowName",
            bad: None,
            field: "spec.workflowName",
            fixed: Some(json!("sync")),
            bad_request: false,
        },
        Invalid {
            what: "workflow name that is not a label value",
            kind: "WorkflowRun",
            path: "/spec/workflowName",
            bad: Some(json!("not a label!")),
            field: "spec.workflowName",
            fixed: Some(json!("not-a-label")),
            bad_request: false,
        },
        Invalid {
            what: "exit code out of range",
            kind: "WorkflowRun",
            path: "/spec/retry/permanentExitCodes",
            bad: Some(json!([42, 256])),
            field: "spec.retry.permanentExitCodes[1]",
            fixed: Some(json!([42, 255])),
            bad_request: false,
        },
        Invalid {
            what: "CEL: backoff max below base",
            kind: "WorkflowRun",
            path: "/spec/retry/backoff/maxSeconds",
            bad: Some(json!(1)),
            field: "spec.retry.backoff.maxSeconds",
            fixed: Some(json!(5)),
            bad_request: false,
        },
        Invalid {
            what: "CEL: an exit code both transient and permanent",
            kind: "WorkflowRun",
            path: "/spec/retry/transientExitCodes",
            bad: Some(json!([3, 42])),
            field: "spec.retry.transientExitCodes",
            fixed: Some(json!([3])),
            bad_request: false,
        },
        Invalid {
            what: "CEL: restartPolicy other than Never",
            kind: "WorkflowRun",
            path: "/spec/template/spec/restartPolicy",
            bad: Some(json!("OnFailure")),
            field: "spec.template.spec.restartPolicy",
            fixed: None,
            bad_request: false,
        },
        Invalid {
            what: "unknown field under fieldValidation=Strict",
            kind: "WorkflowRun",
            path: "/spec/retry/maxAttempts",
            bad: Some(json!(3)),
            field: "spec.retry.maxAttempts",
            fixed: None,
            bad_request: true,
        },
        Invalid {
            what: "unknown enum value",
            kind: "TelemetryStack",
            path: "/spec/collector/mode",
            bad: Some(json!("Sidecar")),
            field: "spec.collector.mode",
            fixed: Some(json!("DaemonSet")),
            bad_request: false,
        },
        Invalid {
            what: "CEL: spike limit not below the memory limit",
            kind: "TelemetryStack",
            path: "/spec/collector/spikeLimitPercent",
            bad: Some(json!(80)),
            field: "spec.collector.spikeLimitPercent",
            fixed: Some(json!(15)),
            bad_request: false,
        },
        Invalid {
            what: "retention that is not a duration",
            kind: "TelemetryStack",
            path: "/spec/prometheus/retention",
            bad: Some(json!("30 days")),
            field: "spec.prometheus.retention",
            fixed: Some(json!("720h")),
            bad_request: false,
        },
        Invalid {
            what: "CEL: autoscaling minimum above its maximum",
            kind: "TelemetryStack",
            path: "/spec/collector/autoscaling/minReplicas",
            bad: Some(json!(8)),
            field: "spec.collector.autoscaling.minReplicas",
            fixed: Some(json!(3)),
            bad_request: false,
        },
        Invalid {
            what: "CEL: Grafana with every datasource disabled",
            kind: "TelemetryStack",
            path: "/spec/prometheus/enabled",
            bad: Some(json!(false)),
            field: "spec.grafana.enabled",
            fixed: Some(json!(true)),
            bad_request: false,
        },
        Invalid {
            what: "CEL: tail sampling across several collector replicas",
            kind: "TelemetryStack",
            path: "/spec/collector/tailSampling",
            bad: Some(json!({"percent": 10})),
            field: "spec.collector.tailSampling",
            fixed: None,
            bad_request: false,
        },
        Invalid {
            what: "CEL: a persistent queue outside StatefulSet mode",
            kind: "TelemetryStack",
            path: "/spec/collector/persistentQueue",
            bad: Some(json!({"size": "1Gi"})),
            field: "spec.collector.persistentQueue",
            fixed: None,
            bad_request: false,
        },
        Invalid {
            what: "CEL: an external backend's API with no externalUrl",
            kind: "TelemetryStack",
            path: "/spec/loki/externalApi",
            bad: Some(json!("VictoriaLogs")),
            field: "spec.loki.externalUrl",
            fixed: None,
            bad_request: false,
        },
        Invalid {
            what: "CEL: a trace query URL with no externalUrl",
            kind: "TelemetryStack",
            path: "/spec/tempo/externalQueryUrl",
            bad: Some(json!("http://jaeger:16686")),
            field: "spec.tempo.externalUrl",
            fixed: None,
            bad_request: false,
        },
        Invalid {
            what: "replicas below minimum",
            kind: "TelemetryStack",
            path: "/spec/collector/replicas",
            bad: Some(json!(-2)),
            field: "spec.collector.replicas",
            fixed: Some(json!(3)),
            bad_request: false,
        },
    ]
}

/// The status fields the apiserver names in a rejection: `details.causes[].field`.
fn cause_fields(status: &kube::core::Status) -> Vec<String> {
    status.details.as_ref().map(|d| d.causes.iter().map(|c| c.field.clone()).collect()).unwrap_or_default()
}

#[tokio::test]
async fn invalid_objects_are_rejected_naming_the_field_and_accepted_once_fixed() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs installed and Established");
    let ns = TestNamespace::new(&client, "crd-invalid").await.expect("namespace");

    let cases = invalid_cases();
    assert_eq!(cases.len(), 19, "every invalid case is listed and runs");
    for (i, case) in cases.iter().enumerate() {
        let name = format!("invalid-{i}");
        let mut obj = match case.kind {
            "WorkflowRun" => valid_workflow_run(&name),
            _ => valid_telemetry_stack(&name),
        };
        set(&mut obj, case.path, case.bad.clone());
        match create_strict(&client, &ns.name, case.kind, &obj).await {
            // An unknown field fails decoding before validation: the apiserver answers 400 BadRequest naming the
            // field in its message, without causes (kube-apiserver 1.37 behaviour, for built-in kinds too).
            Err(kube::Error::Api(status)) if case.bad_request => {
                assert_eq!(status.code, 400, "{}: expected 400 BadRequest, got {status:?}", case.what);
                assert!(
                    status.message.contains(&format!("unknown field \"{}\"", case.field)),
                    "{}: message does not name {}: {}",
                    case.what,
                    case.field,
                    status.message
                );
            }
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{}: expected 422 Invalid, got {status:?}", case.what);
                let fields = cause_fields(&status);
                assert!(
                    fields.iter().any(|f| f == case.field),
                    "{}: causes name {fields:?}, expected {} (message: {})",
                    case.what,
                    case.field,
                    status.message
                );
            }
            Err(e) => panic!("{}: expected a 422 from the apiserver, got {e}", case.what),
            Ok(_) => panic!("{}: the invalid object was accepted", case.what),
        }

        set(&mut obj, case.path, case.fixed.clone());
        create_strict(&client, &ns.name, case.kind, &obj)
            .await
            .unwrap_or_else(|e| panic!("{}: the fixed object was rejected: {e}", case.what));
    }
}

#[tokio::test]
async fn cancel_cannot_be_taken_back() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs installed and Established");
    let ns = TestNamespace::new(&client, "crd-cancel").await.expect("namespace");
    let api = api(&client, &ns.name, "WorkflowRun");

    let mut obj = valid_workflow_run("cancelled");
    set(&mut obj, "/spec/cancel", Some(json!(true)));
    apply(&api, &obj).await.expect("a cancelled run is valid");

    set(&mut obj, "/spec/cancel", Some(json!(false)));
    match apply(&api, &obj).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422, got {status:?}");
            assert!(cause_fields(&status).iter().any(|f| f == "spec.cancel"), "{status:?}");
        }
        other => panic!("un-cancelling was not rejected: {other:?}"),
    }
}

#[tokio::test]
async fn crds_install_from_the_checked_in_files_and_become_established() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs installed and Established");
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for (name, short) in [("workflowruns.flowtel.dev", "wfr"), ("telemetrystacks.flowtel.dev", "tstack")] {
        let crd = crds.get(name).await.expect("CRD exists");
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            assert!(
                conditions.iter().any(|c| c.type_ == wanted && c.status == "True"),
                "{name}: {wanted} is not True: {conditions:?}"
            );
        }
        assert_eq!(crd.spec.names.short_names, Some(vec![short.to_string()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["flowtel".to_string()]));
    }
}

#[tokio::test]
async fn the_spec_is_immutable_except_cancel_and_ttl() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs installed and Established");
    let ns = TestNamespace::new(&client, "crd-immutable").await.expect("namespace");
    let api = api(&client, &ns.name, "WorkflowRun");
    let mut obj = valid_workflow_run("fixed");
    apply(&api, &obj).await.expect("created");

    for (path, value) in [
        ("/spec/workflowName", json!("other")),
        ("/spec/retry/limit", json!(5)),
        ("/spec/activeDeadlineSeconds", json!(60)),
    ] {
        let mut changed = obj.clone();
        set(&mut changed, path, Some(value));
        match apply(&api, &changed).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{path}: {status:?}");
                assert!(status.message.contains("immutable"), "{path}: {}", status.message);
            }
            other => panic!("{path}: changing it was not rejected: {other:?}"),
        }
    }
    let mut image = obj.clone();
    image["spec"]["template"]["spec"]["containers"][0]["image"] = json!("registry.example/sync:2.0");
    match apply(&api, &image).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "template: {status:?}");
            assert!(status.message.contains("immutable"), "template: {}", status.message);
        }
        other => panic!("the template is immutable, yet changing it gave {other:?}"),
    }

    set(&mut obj, "/spec/ttlSecondsAfterFinished", Some(json!(60)));
    apply(&api, &obj).await.expect("the TTL may change");
    set(&mut obj, "/spec/cancel", Some(json!(true)));
    apply(&api, &obj).await.expect("cancel may go to true");
}

#[tokio::test]
async fn every_example_manifest_is_accepted_by_the_apiserver() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs installed and Established");
    let ns = TestNamespace::new(&client, "crd-examples").await.expect("namespace");
    let dir = flowtel_e2e::repo_root().join("manifests/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("examples").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert_eq!(files.len(), 6, "hello, telemetrystack and the four workflows");
    for file in files {
        // `create` (not apply): the workflow examples use generateName, as a run per submission does.
        let out = flowtel_e2e::run(
            flowtel_e2e::kubectl().args(["create", "--dry-run=server", "-o", "name", "-n", &ns.name, "-f"]).arg(&file),
        );
        let name = out.unwrap_or_else(|e| panic!("{} refused: {e}", file.display()));
        assert!(name.contains("flowtel.dev"), "{}: {name}", file.display());
    }
}

#[tokio::test]
async fn every_gitops_overlay_is_accepted_by_the_apiserver_and_passes_flowtel_render_check() {
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs installed and Established");
    let ns = TestNamespace::new(&client, "crd-gitops").await.expect("namespace");
    let root = flowtel_e2e::repo_root();
    for overlay in ["laptop", "production"] {
        let dir = root.join("manifests/gitops/overlays").join(overlay);
        let built = flowtel_e2e::run(flowtel_e2e::kubectl().arg("kustomize").arg(&dir)).expect("kubectl kustomize");
        let file = std::env::temp_dir().join(format!("flowtel-gitops-{overlay}-{}.yaml", std::process::id()));
        std::fs::write(&file, &built).expect("write");
        let applied = flowtel_e2e::run(
            flowtel_e2e::kubectl()
                .args(["apply", "--server-side", "--dry-run=server", "-n", &ns.name, "-f"])
                .arg(&file),
        );
        let applied = applied.unwrap_or_else(|e| panic!("{overlay}: refused by the apiserver: {e}"));
        assert!(applied.contains("telemetrystack.flowtel.dev/telemetry"), "{overlay}: {applied}");
        let out = std::process::Command::new(flowtel_e2e::flowtel_binary().expect("flowtel"))
            .args(["render", "--check", "-f"])
            .arg(&file)
            .output()
            .expect("flowtel render");
        assert!(out.status.success(), "{overlay}: flowtel render --check: {}", String::from_utf8_lossy(&out.stderr));
    }
}
