//! A laptop cluster's storage provisioner, for the local control plane (which has none).

use std::sync::OnceLock;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::cluster::client;
use crate::{HarnessError, TEST_MANAGER};

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
