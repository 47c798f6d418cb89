//! `kubectl flowtel`: WorkflowRuns at the command line, as `argo` does for Workflows. A kubectl plugin (the
//! `kubectl-flowtel` binary on PATH); it reads and writes only what a user's own kubeconfig may.
//!
//! The commands fetch, then print with the pure functions of `print.rs` (unit-tested).

pub mod print;

use std::collections::BTreeMap;

use flowtel_crds::workflow_run::WorkflowRunSpec;
use flowtel_crds::{TelemetryStack, WorkflowRun};
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};

use crate::pool::protocol::{log_end, log_prefix};
use crate::runtime::names::shorten;
use crate::workflow_run::job::{ATTEMPT_LABEL, RUN_LABEL};
use crate::workflow_run::plan;

/// On a run made by `rerun`: the run it repeats.
pub const RERUN_OF_LABEL: &str = "flowtel.dev/rerun-of";

/// Errors of one command, each naming what it could not do.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("reading WorkflowRun {name}: {source}")]
    ReadRun { name: String, source: kube::Error },
    #[error("listing WorkflowRuns: {0}")]
    ListRuns(#[source] kube::Error),
    #[error("WorkflowRun {name} not found in namespace {namespace}")]
    RunNotFound { name: String, namespace: String },
    #[error("WorkflowRun {run} has no attempt {attempt} (attempts kept: {kept})")]
    NoAttempt { run: String, attempt: i32, kept: String },
    #[error("WorkflowRun {run} has not started an attempt yet")]
    NotStarted { run: String },
    #[error("finding the pod of attempt {attempt}: {source}")]
    ListPods { attempt: i32, source: kube::Error },
    #[error("attempt {attempt} of {run} has no pod (deleted with its Job, or never created)")]
    NoPod { run: String, attempt: i32 },
    #[error("reading the logs of pod {pod}: {source}")]
    Logs { pod: String, source: kube::Error },
    #[error("reading the logs of pod {pod}: {source}")]
    LogStream { pod: String, source: std::io::Error },
    #[error("creating the rerun of {run}: {source}")]
    CreateRerun { run: String, source: kube::Error },
    #[error("reading TelemetryStack {name}: {source}")]
    ReadStack { name: String, source: kube::Error },
    #[error("WorkflowRun {run} has no trace id yet (status.traceId is written with its first status)")]
    NoTraceId { run: String },
    #[error("watching WorkflowRun {name}: {source}")]
    Watch { name: String, source: kube::runtime::watcher::Error },
    #[error("WorkflowRun {name} was deleted")]
    Deleted { name: String },
    #[error("writing the output: {0}")]
    Write(#[from] std::io::Error),
}

/// The runs of a namespace, or one run.
pub struct Runs {
    pub api: Api<WorkflowRun>,
    pub client: Client,
    pub namespace: String,
}

impl Runs {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self { api: Api::namespaced(client.clone(), namespace), client, namespace: namespace.to_string() }
    }

    pub async fn get(&self, name: &str) -> Result<WorkflowRun, CliError> {
        self.api
            .get_opt(name)
            .await
            .map_err(|source| CliError::ReadRun { name: name.into(), source })?
            .ok_or_else(|| CliError::RunNotFound { name: name.into(), namespace: self.namespace.clone() })
    }

    /// `get [RUN]`: one run, or every run of the namespace, as a table.
    pub async fn list(&self, name: Option<&str>, out: &mut impl std::io::Write) -> Result<(), CliError> {
        let runs = match name {
            Some(name) => vec![self.get(name).await?],
            None => self.api.list(&ListParams::default()).await.map_err(CliError::ListRuns)?.items,
        };
        out.write_all(print::table(&runs, jiff::Timestamp::now()).as_bytes())?;
        Ok(())
    }

    /// `describe RUN`: the run, its attempts (exit codes, classifications), conditions and trace id.
    pub async fn describe(&self, name: &str, out: &mut impl std::io::Write) -> Result<(), CliError> {
        let run = self.get(name).await?;
        out.write_all(print::describe(&run, jiff::Timestamp::now()).as_bytes())?;
        Ok(())
    }

    /// `logs RUN [--attempt N] [-f]`: the logs of an attempt's pod (the latest attempt by default); a pooled attempt's
    /// lines from its worker's log.
    pub async fn logs(
        &self,
        name: &str,
        attempt: Option<i32>,
        follow: bool,
        container: Option<String>,
        out: &mut (impl std::io::Write + Send),
    ) -> Result<(), CliError> {
        let run = self.get(name).await?;
        let status = run.status.clone().unwrap_or_default();
        let number = match attempt {
            Some(n) => n,
            None => status.attempts.last().map(|a| a.number).ok_or(CliError::NotStarted { run: name.into() })?,
        };
        let recorded = status.attempts.iter().find(|a| a.number == number);
        if recorded.is_none() && status.attempt_count.is_none_or(|count| number < 1 || number > count) {
            let kept = status.attempts.iter().map(|a| a.number.to_string()).collect::<Vec<_>>().join(", ");
            return Err(CliError::NoAttempt { run: name.into(), attempt: number, kept });
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        if run.spec.pool.is_some() {
            let attempt = recorded.ok_or_else(|| CliError::NoPod { run: name.into(), attempt: number })?;
            return self.pooled_logs(&pods, name, attempt, follow, container, out).await;
        }
        // The pod the status recorded; else (an attempt still running) the attempt's pods by label, newest first.
        let pod = match recorded.and_then(|a| a.pod_name.clone()) {
            Some(pod) => pod,
            None => {
                let selector = format!("{RUN_LABEL}={},{ATTEMPT_LABEL}={number}", shorten(name, 63));
                let mut found = pods
                    .list(&ListParams::default().labels(&selector))
                    .await
                    .map_err(|source| CliError::ListPods { attempt: number, source })?
                    .items;
                found.sort_by_key(|p| p.metadata.creation_timestamp.clone());
                found.pop().map(|p| p.name_any()).ok_or(CliError::NoPod { run: name.into(), attempt: number })?
            }
        };
        let params = LogParams { follow, container, ..LogParams::default() };
        let stream = pods.log_stream(&pod, &params).await.map_err(|source| match &source {
            kube::Error::Api(s) if s.code == 404 => CliError::NoPod { run: name.into(), attempt: number },
            _ => CliError::Logs { pod: pod.clone(), source },
        })?;
        let mut lines = stream.lines();
        while let Some(line) =
            lines.try_next().await.map_err(|source| CliError::LogStream { pod: pod.clone(), source })?
        {
            writeln!(out, "{line}")?;
        }
        Ok(())
    }

    /// A pooled attempt's lines in its worker's log (the agent marks them, `pool::protocol::log_prefix`), up to its
    /// end; the worker's own lines and other attempts' are left out.
    async fn pooled_logs(
        &self,
        pods: &Api<Pod>,
        run: &str,
        attempt: &flowtel_crds::workflow_run::AttemptStatus,
        follow: bool,
        container: Option<String>,
        out: &mut (impl std::io::Write + Send),
    ) -> Result<(), CliError> {
        let no_pod = || CliError::NoPod { run: run.into(), attempt: attempt.number };
        let pod = attempt.pod_name.clone().ok_or_else(no_pod)?;
        // From a second before the attempt started: a worker's log holds every run it has executed.
        let since_time = attempt.start_time.as_ref().map(|t| t.0 - jiff::SignedDuration::from_secs(1));
        let params = LogParams { follow, container, since_time, ..LogParams::default() };
        let stream = pods.log_stream(&pod, &params).await.map_err(|source| match &source {
            kube::Error::Api(s) if s.code == 404 => no_pod(),
            _ => CliError::Logs { pod: pod.clone(), source },
        })?;
        let (prefix, end) = (log_prefix(&attempt.job_name), log_end(&attempt.job_name));
        let mut lines = stream.lines();
        while let Some(line) =
            lines.try_next().await.map_err(|source| CliError::LogStream { pod: pod.clone(), source })?
        {
            if line == end {
                break;
            }
            if let Some(output) = line.strip_prefix(&prefix) {
                writeln!(out, "{output}")?;
            }
        }
        Ok(())
    }

    /// `rerun RUN`: a new run from the same spec (never cancelled), labelled with the run it repeats.
    pub async fn rerun(&self, name: &str, new_name: Option<String>) -> Result<WorkflowRun, CliError> {
        let run = self.get(name).await?;
        let rerun = rerun_of(&run, new_name);
        self.api
            .create(&PostParams::default(), &rerun)
            .await
            .map_err(|source| CliError::CreateRerun { run: name.into(), source })
    }

    /// `trace RUN`: the run's trace id and where to open it: the stack's Grafana (or `grafana_url`), and the trace
    /// backend's own page.
    pub async fn trace(
        &self,
        name: &str,
        grafana_url: Option<&str>,
        out: &mut impl std::io::Write,
    ) -> Result<(), CliError> {
        let run = self.get(name).await?;
        let trace_id =
            run.status.as_ref().and_then(|s| s.trace_id.clone()).ok_or(CliError::NoTraceId { run: name.into() })?;
        let stack = match &run.spec.telemetry_stack_ref {
            Some(r) => {
                let stacks: Api<TelemetryStack> = Api::namespaced(self.client.clone(), &self.namespace);
                stacks.get_opt(&r.name).await.map_err(|source| CliError::ReadStack { name: r.name.clone(), source })?
            }
            None => None,
        };
        out.write_all(print::trace_links(&trace_id, stack.as_ref(), grafana_url).as_bytes())?;
        Ok(())
    }

    /// `watch RUN`: a line per change of phase, attempt or reason until the run is over; returns its last copy.
    pub async fn watch(&self, name: &str, out: &mut impl std::io::Write) -> Result<WorkflowRun, CliError> {
        let mut last = String::new();
        let mut changes = std::pin::pin!(kube::runtime::watcher::watch_object(self.api.clone(), name));
        while let Some(event) = changes.next().await {
            let event = event.map_err(|source| CliError::Watch { name: name.into(), source })?;
            let Some(run) = event else { return Err(CliError::Deleted { name: name.into() }) };
            let line = print::watch_line(&run, jiff::Timestamp::now());
            if line != last {
                writeln!(out, "{line}")?;
                out.flush()?;
                last = line;
            }
            if run.status.as_ref().is_some_and(plan::is_terminal) {
                return Ok(run);
            }
        }
        Err(CliError::Deleted { name: name.into() })
    }
}

/// Pure: the run `rerun` creates from `run`: its spec (not cancelled), labels and annotations a user gave it
/// (not kubectl's last-applied copy), `rerun-of` naming `run`; named `name`, or generated from the run's name.
pub fn rerun_of(run: &WorkflowRun, name: Option<String>) -> WorkflowRun {
    let mut labels: BTreeMap<String, String> = run.labels().clone();
    labels.insert(RERUN_OF_LABEL.into(), shorten(&run.name_any(), 63));
    let mut annotations = run.annotations().clone();
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    let generate_name = name.is_none().then(|| format!("{}-", shorten(&run.name_any(), 52)));
    let spec = WorkflowRunSpec { cancel: false, ..run.spec.clone() };
    WorkflowRun {
        metadata: ObjectMeta {
            name,
            generate_name,
            namespace: run.namespace(),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}
