//! The mocked-apiserver tier: whole reconciles against a `tower-test` mock of the apiserver (as kube-rs'
//! controller-rs does), each scenario scripting the apiserver's answers and asserting the exact requests the
//! reconcile made, in order, and that it made no other. No control plane: these run in `cargo test` in
//! milliseconds. What the real apiserver does with the requests is the end-to-end tests' business.

use std::sync::Arc;
use std::time::Duration;

use flowtel_crds::WorkflowRun;
use http::{Request, Response};
use k8s_openapi::api::batch::v1::Job;
use kube::client::Body;
use kube::runtime::controller::Action as ControllerAction;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use super::economy::Economy;
use super::index::RunIndex;
use super::metrics::ControllerMetrics;
use super::plan::Settings;
use super::reconcile::{Context, FINALIZER, reconcile};
use crate::runtime::rates::RunRates;
use crate::runtime::readiness::Gate;
use crate::telemetry::{ExportConfig, ExportMetrics, Telemetry};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const RUNS: &str = "/apis/flowtel.dev/v1alpha1/namespaces/ns/workflowruns";
const JOBS: &str = "/apis/batch/v1/namespaces/ns/jobs";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";

/// The apiserver's answer (status code, body) to a request's body.
type Answer = Box<dyn Fn(&Value) -> (u16, Value) + Send>;

/// One request the reconcile must make, and the apiserver's answer to it.
struct Step {
    method: &'static str,
    path: String,
    answer: Answer,
}

fn step(
    method: &'static str,
    path: impl Into<String>,
    answer: impl Fn(&Value) -> (u16, Value) + Send + 'static,
) -> Step {
    Step { method, path: path.into(), answer: Box::new(answer) }
}

/// The apiserver's error Status.
fn status_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
           "reason": reason, "code": code})
}

/// A status write's answer: the run with the applied status, at a newer resourceVersion.
fn status_written(run: &WorkflowRun) -> impl Fn(&Value) -> (u16, Value) + Send + 'static {
    let stored = serde_json::to_value(run).expect("run");
    move |applied: &Value| {
        let mut written = stored.clone();
        written["status"] = applied["status"].clone();
        written["metadata"]["resourceVersion"] = json!("2");
        (200, written)
    }
}

fn created(body: &Value) -> (u16, Value) {
    (201, body.clone())
}

/// The requests the reconcile made, as `METHOD path` lines, and the bodies it sent; the requests beyond the script.
#[derive(Debug, Default)]
struct Seen {
    requests: Vec<String>,
    bodies: Vec<Value>,
    unscripted: Vec<String>,
}

type Shared = std::sync::Arc<std::sync::Mutex<Seen>>;

fn lock(seen: &Shared) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|e| e.into_inner())
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, code: u16, answer: &Value) {
    let response = Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(answer).expect("answer")))
        .expect("response");
    send.send_response(response);
}

/// Serves `steps` in order, then answers anything more with a 500 and notes it. A request that is not the next
/// step's fails the scenario.
async fn apiserver(mut handle: Handle, steps: Vec<Step>, seen: Shared) {
    for step in steps {
        let Some((request, send)) = handle.next_request().await else { return };
        let line = format!("{} {}", request.method(), request.uri().path());
        let so_far = {
            let mut seen = lock(&seen);
            seen.requests.push(line.clone());
            seen.requests.clone()
        };
        assert_eq!(line, format!("{} {}", step.method, step.path), "request {} (so far: {so_far:?})", so_far.len());
        let bytes = request.into_body().collect_bytes().await.expect("request body");
        let body: Value =
            if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("JSON body") };
        let (code, answer) = (step.answer)(&body);
        lock(&seen).bodies.push(body);
        respond(send, code, &answer);
    }
    while let Some((request, send)) = handle.next_request().await {
        lock(&seen).unscripted.push(format!("{} {}", request.method(), request.uri().path()));
        respond(send, 500, &status_error(500, "InternalError", "not in the scenario's script"));
    }
}

struct Scenario {
    ctx: Arc<Context>,
    handle: Handle,
    registry: Registry,
}

fn settings() -> Settings {
    Settings {
        default_deadline_seconds: 3600,
        default_ttl_seconds: 600,
        running_status_delay: jiff::SignedDuration::ZERO,
    }
}

/// A reconcile's context over the mock, with `jobs` in the Job cache, the workload's endpoint set (no stack, so no
/// degradation), and `telemetry` for the run's own reports.
fn scenario(
    jobs: Vec<Job>,
    telemetry: impl FnOnce(&mut Registry) -> Telemetry<reflector::ObjectRef<WorkflowRun>>,
) -> Scenario {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "ns");
    let (job_store, mut job_writer) = reflector::store::<Job>();
    let job_index = RunIndex::default();
    let mut index = job_index.observe(|job: &Job| {
        let owner = super::job::owning_run(job)?;
        Some(((job.namespace()?, owner.name.clone()), job.name_any()))
    });
    for job in jobs {
        let event = watcher::Event::Apply(job);
        job_writer.apply_watcher_event(&event);
        index(&Ok(event));
    }
    let mut registry = Registry::default();
    let telemetry = telemetry(&mut registry);
    let ctx = Arc::new(Context {
        client: client.clone(),
        jobs: job_store,
        pods: empty_store(),
        stacks: empty_store(),
        pools: empty_store(),
        dispatcher: None,
        job_index,
        pod_index: RunIndex::default(),
        telemetry,
        rates: RunRates::default(),
        settings: settings(),
        default_otlp_endpoint: Some("http://collector.ns.svc:4317".into()),
        normal_events: false,
        recorder: Recorder::new(client, Reporter { controller: "flowtel".into(), instance: None }),
        metrics: ControllerMetrics::register(&mut registry),
        economy: Economy::new(true),
        api_answered: std::sync::Mutex::new(None),
    });
    Scenario { ctx, handle, registry }
}

fn empty_store<K>() -> Store<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    reflector::store().0
}

fn no_exports(_: &mut Registry) -> Telemetry<reflector::ObjectRef<WorkflowRun>> {
    Telemetry::disabled()
}

/// The run's reports exported to `endpoint` (its metrics registered in `registry`).
fn exports_to(endpoint: &str) -> impl FnOnce(&mut Registry) -> Telemetry<reflector::ObjectRef<WorkflowRun>> {
    let endpoint = endpoint.to_string();
    move |registry: &mut Registry| {
        let config = ExportConfig {
            endpoint: Some(endpoint),
            export_timeout: Duration::from_secs(1),
            drop_after: Duration::from_secs(300),
            histogram_boundaries: Default::default(),
            queue_capacity: 64,
            journal: None,
        };
        let (notify, _) = tokio::sync::mpsc::unbounded_channel();
        Telemetry::start(&config, notify, ExportMetrics::register(registry), Gate::standalone("export-worker"))
            .expect("exporter")
    }
}

fn new_run(finalizers: &[&str]) -> WorkflowRun {
    serde_json::from_value(json!({
        "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun",
        "metadata": {"name": "r", "namespace": "ns", "uid": "u", "generation": 1, "resourceVersion": "1",
                     "finalizers": finalizers},
        "spec": {"workflowName": "w", "template": {"spec": {"containers": [{"name": "main", "image": "x"}]}}}
    }))
    .expect("run")
}

fn job_owned_by(uid: &str) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "r-1", "namespace": "ns", "uid": "j", "ownerReferences": [{
               "apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun", "name": "r", "uid": uid,
               "controller": true}]}})
}

/// Runs one reconcile of `run` against `steps`; returns its result, the requests it made, and the metrics text.
async fn reconcile_against(
    scenario: Scenario,
    run: WorkflowRun,
    steps: Vec<Step>,
) -> (Result<ControllerAction, String>, Seen, String) {
    let Scenario { ctx, handle, registry } = scenario;
    let scripted = steps.len();
    let seen = Shared::default();
    let server = tokio::spawn(apiserver(handle, steps, seen.clone()));
    let result = tokio::time::timeout(Duration::from_secs(20), reconcile(Arc::new(run), ctx))
        .await
        .unwrap_or_else(|_| panic!("the reconcile ends (requests so far: {:?})", lock(&seen)))
        .map_err(|e| e.to_string());
    // A failed assertion in the server is the scenario's failure; otherwise it is still serving.
    if server.is_finished() {
        server.await.expect("the scripted apiserver");
    } else {
        server.abort();
    }
    let seen = std::mem::take(&mut *lock(&seen));
    assert_eq!(seen.requests.len(), scripted, "every scripted request made: {seen:?}");
    assert!(seen.unscripted.is_empty(), "requests beyond the script: {seen:?}");
    let mut metrics = String::new();
    prometheus_client::encoding::text::encode(&mut metrics, &registry).expect("metrics");
    (result, seen, metrics)
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == type_)).unwrap_or(&Value::Null)
}

#[tokio::test]
async fn a_job_the_apiserver_rejects_ends_the_run_with_its_words() {
    let run = new_run(&[]);
    let steps = vec![
        step("PATCH", format!("{RUNS}/r/status"), status_written(&run)),
        step("POST", JOBS, |_| (422, status_error(422, "Invalid", "Job.batch \"r-1\" is invalid: spec.template: bad"))),
        step("PATCH", format!("{RUNS}/r/status"), status_written(&run)),
        step("POST", EVENTS, created),
    ];
    let (result, seen, _) = reconcile_against(scenario(vec![], no_exports), run, steps).await;
    assert!(result.is_ok(), "{result:?}");
    let first = &seen.bodies[0]["status"];
    assert_eq!(first["phase"], "Running", "the attempt is recorded before its Job is created");
    assert_eq!(first["attempts"][0]["jobName"], "r-1");
    let ended = &seen.bodies[2]["status"];
    assert_eq!(ended["phase"], "Failed");
    let ready = condition(ended, "Succeeded");
    assert_eq!(ready["reason"], "JobRejected", "{ended}");
    assert!(ready["message"].as_str().unwrap_or_default().contains("spec.template: bad"), "{ended}");
    assert_eq!(seen.bodies[3]["reason"], "JobRejected");
    assert_eq!(seen.bodies[3]["type"], "Warning");
}

#[tokio::test]
async fn a_job_name_taken_by_someone_else_ends_the_run_and_is_never_taken_over() {
    let run = new_run(&[]);
    let steps = vec![
        step("PATCH", format!("{RUNS}/r/status"), status_written(&run)),
        step("POST", JOBS, |_| (409, status_error(409, "AlreadyExists", "jobs.batch \"r-1\" already exists"))),
        step("GET", format!("{JOBS}/r-1"), |_| (200, job_owned_by("someone-else"))),
        step("PATCH", format!("{RUNS}/r/status"), status_written(&run)),
        step("POST", EVENTS, created),
    ];
    let (result, seen, _) = reconcile_against(scenario(vec![], no_exports), run, steps).await;
    assert!(result.is_ok(), "{result:?}");
    let ended = &seen.bodies[3]["status"];
    assert_eq!(ended["phase"], "Failed");
    assert_eq!(condition(ended, "Succeeded")["reason"], "JobNameConflict", "{ended}");
}

#[tokio::test]
async fn a_job_of_ours_that_the_cache_has_not_shown_yet_is_kept_and_not_created_again() {
    let run = new_run(&[]);
    let steps = vec![
        step("PATCH", format!("{RUNS}/r/status"), status_written(&run)),
        step("POST", JOBS, |_| (409, status_error(409, "AlreadyExists", "jobs.batch \"r-1\" already exists"))),
        step("GET", format!("{JOBS}/r-1"), |_| (200, job_owned_by("u"))),
    ];
    let (result, seen, _) = reconcile_against(scenario(vec![], no_exports), run, steps).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(seen.bodies[0]["status"]["phase"], "Running");
}

#[tokio::test]
async fn a_job_already_gone_when_a_cancelled_run_deletes_it_is_no_error() {
    let mut run = new_run(&[]);
    run.spec.cancel = true;
    let started = jiff::Timestamp::now();
    run.status = Some(
        serde_json::from_value(json!({
            "phase": "Running", "startTime": started.to_string(),
            "attempts": [{"number": 1, "jobName": "r-1", "startTime": started.to_string()}],
        }))
        .expect("status"),
    );
    let mut cached: Job = serde_json::from_value(job_owned_by("u")).expect("job");
    cached.status = Some(serde_json::from_value(json!({"active": 1})).expect("job status"));
    // Deletions go first: a crash after one is planned again, and never leaves a Job running.
    let steps = vec![
        step("DELETE", format!("{JOBS}/r-1"), |_| (404, status_error(404, "NotFound", "jobs.batch \"r-1\" not found"))),
        step("PATCH", format!("{RUNS}/r/status"), status_written(&run)),
        step("POST", EVENTS, created),
    ];
    let (result, seen, _) = reconcile_against(scenario(vec![cached], no_exports), run, steps).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(seen.bodies[1]["status"]["phase"], "Failed", "the cancellation is recorded after the delete");
    assert_eq!(condition(&seen.bodies[1]["status"], "Succeeded")["reason"], "Cancelled");
    assert_eq!((&seen.bodies[2]["type"], &seen.bodies[2]["reason"]), (&json!("Warning"), &json!("Cancelled")));
}

#[tokio::test]
async fn a_finalizer_patch_that_meets_a_newer_copy_stops_and_looks_again_soon() {
    let run = new_run(&[]);
    let steps = vec![step("PATCH", format!("{RUNS}/r"), |_| {
        (
            409,
            status_error(
                409,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version",
            ),
        )
    })];
    let (result, seen, _) = reconcile_against(scenario(vec![], exports_to("http://127.0.0.1:1")), run, steps).await;
    assert_eq!(result, Ok(ControllerAction::requeue(Duration::from_secs(1))));
    let patch = &seen.bodies[0]["metadata"];
    assert_eq!(patch["finalizers"], json!([FINALIZER]));
    assert_eq!(patch["resourceVersion"], "1", "the patch is conditional on the copy it read");
}

#[tokio::test]
async fn a_status_write_the_apiserver_refuses_fails_the_reconcile_and_counts_the_error() {
    let run = new_run(&[]);
    let steps = vec![step("PATCH", format!("{RUNS}/r/status"), |_| {
        (409, status_error(409, "Conflict", "Apply failed with 1 conflict: conflict with \"kubectl\""))
    })];
    let (result, _, metrics) = reconcile_against(scenario(vec![], no_exports), run, steps).await;
    assert!(result.as_ref().is_err_and(|e| e.contains("conflict")), "{result:?}");
    assert!(metrics.contains("flowtel_reconcile_errors_total{error=\"api\"} 1"), "{metrics}");
    assert!(metrics.contains("flowtel_status_writes_total 0"), "{metrics}");
    assert!(metrics.contains("flowtel_reconciles_total 1"), "{metrics}");
}

#[tokio::test]
async fn a_finished_run_whose_export_fails_is_retried_and_the_failure_counted() {
    let mut run = new_run(&[FINALIZER]);
    let at = jiff::Timestamp::now().to_string();
    run.status = Some(
        serde_json::from_value(json!({
            "phase": "Succeeded", "startTime": at, "completionTime": at,
            "attempts": [{"number": 1, "jobName": "r-1", "startTime": at, "endTime": at, "exitCode": 0}],
            "telemetry": {"started": true, "finished": false},
        }))
        .expect("status"),
    );
    // The quorum read that shows the apiserver can record what is exported, then nothing: the export fails.
    let run_metadata = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                              "metadata": {"name": "r", "namespace": "ns", "uid": "u", "resourceVersion": "1"}});
    // (The stored status has no conditions yet, so the verdict is written; a run with them would carry it along.)
    let steps = vec![
        step("GET", format!("{RUNS}/r"), move |_| (200, run_metadata.clone())),
        step("PATCH", format!("{RUNS}/r/status"), status_written(&run)),
        step("POST", EVENTS, created),
    ];
    let (result, seen, metrics) =
        reconcile_against(scenario(vec![], exports_to("http://127.0.0.1:1")), run, steps).await;
    let recorded = &seen.bodies[1]["status"];
    assert_eq!(recorded["telemetry"]["finished"], false, "not recorded as exported: {recorded}");
    assert_eq!(condition(recorded, "TelemetryDegraded")["reason"], "ExportFailed", "{recorded}");
    assert_eq!(seen.bodies[2]["type"], "Warning", "the failure is announced: {}", seen.bodies[2]);
    assert!(
        matches!(&result, Ok(action) if *action != ControllerAction::await_change()),
        "looked at again: {result:?}"
    );
    assert!(metrics.contains("flowtel_telemetry_export_failures_total 1"), "{metrics}");
    assert!(metrics.contains("flowtel_telemetry_exported_total 0"), "{metrics}");
}
