//! Helm, built by `e2e/build-binaries helm`, against the local control plane.

use std::path::PathBuf;
use std::process::Command;

use crate::cluster::{cluster_kubeconfig, kubectl};
use crate::process::cached_binary;
use crate::{HarnessError, repo_root, run};

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
