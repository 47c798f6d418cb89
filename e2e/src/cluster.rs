//! The local control plane (`e2e/cluster`): its kubeconfig, kubectl and a client, the CRDs installed from the
//! checked-in files, and a namespace per test.

use std::path::PathBuf;
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

use crate::{HarnessError, TEST_MANAGER, repo_root, run};

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

/// A token of ServiceAccount `account` in `namespace` (`kubectl create token`), in a file, as a pod's projected
/// token would be: what a WorkerPool's worker presents to the dispatcher. Waits for the account to exist (the
/// controller-manager creates `default` in a new namespace).
pub async fn service_account_token(namespace: &str, account: &str) -> std::path::PathBuf {
    let token = crate::eventually(&format!("a token of {namespace}/{account}"), Duration::from_secs(30), async || {
        let out = kubectl().args(["create", "token", account, "-n", namespace, "--duration", "2h"]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
    .await;
    let path = std::env::temp_dir().join(format!("flowtel-token-{namespace}-{account}-{}", std::process::id()));
    std::fs::write(&path, token).expect("writing the token");
    path
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
            for name in ["workflowruns.flowtel.dev", "telemetrystacks.flowtel.dev", "workerpools.flowtel.dev"] {
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

/// `kubectl flowtel ARGS -n NAMESPACE`, the plugin on PATH; (success, stdout, stderr).
pub fn kubectl_flowtel(namespace: &str, args: &[&str]) -> (bool, String, String) {
    let plugin_dir = crate::flowtel_binary().expect("flowtel").parent().expect("dir").to_path_buf();
    assert!(plugin_dir.join("kubectl-flowtel").exists(), "kubectl-flowtel is built beside flowtel");
    let kubeconfig = cluster_kubeconfig();
    let kubectl = kubeconfig.parent().expect("state").join("bin/kubectl");
    let path = format!("{}:{}", plugin_dir.display(), std::env::var("PATH").unwrap_or_default());
    // kubectl refuses flags before a plugin's name: the kubeconfig comes from the environment.
    let out = Command::new(kubectl)
        .env("KUBECONFIG", &kubeconfig)
        .env("PATH", path)
        .arg("flowtel")
        .args(args)
        .args(["-n", namespace])
        .output()
        .expect("kubectl flowtel");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
