//! Helpers for flowtel's end-to-end tests, by concern: the local control plane and a namespace per test
//! (`cluster`), processes and cached binaries (`process`), the operator as a process (`operator`), the collector as
//! a test endpoint and its OTLP JSON output (`collector`), Helm (`helm`), the audit log (`audit`), the storage
//! provisioner (`storage`), plain HTTP (`http`), a cuttable apiserver path (`proxy`), Argo CD's health checks
//! (`argocd`), the data-path backends (`backends`), many `sync` processes at once (`sync_runs`) and the one
//! WorkflowRun builder (`runs`). Everything a test
//! uses is re-exported here.

pub mod argocd;
pub mod audit;
pub mod backends;
pub mod cluster;
pub mod collector;
pub mod helm;
pub mod http;
pub mod operator;
pub mod process;
pub mod proxy;
pub mod runs;
pub mod storage;
pub mod sync_runs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use argocd::argocd_health;
pub use audit::operator_writes;
pub use cluster::{
    TestNamespace, client, cluster_kubeconfig, install_crds, kubectl, kubectl_flowtel, service_account_token,
};
pub use collector::{Collector, attribute, otlp_documents};
pub use helm::{apply_chart_template, helm};
pub use http::{http_get, with_query};
pub use operator::{Operator, burst, simple_run};
pub use process::{Process, cached_binary, collector_bin, flowtel_binary, free_port, free_ports, wait_for_port};
pub use proxy::ApiserverProxy;
pub use runs::RunBuilder;
pub use storage::{STORAGE_CLASS, ensure_storage, provision_volumes};

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
