//! The local cluster's volume provisioner as a process, for a real node (`e2e/cluster node up` starts it): the
//! default StorageClass, and a hostPath volume for every pending claim, its directory writable by the pod's
//! non-root user. Tests run the same provisioner in-process (`flowtel_e2e::ensure_storage`).

#[tokio::main]
async fn main() {
    let (ready, readiness) = std::sync::mpsc::channel();
    let provisioner = tokio::spawn(flowtel_e2e::provision_volumes(ready));
    match tokio::task::spawn_blocking(move || readiness.recv()).await {
        Ok(Ok(Ok(()))) => eprintln!("volumes: the StorageClass {} is in; binding claims", flowtel_e2e::STORAGE_CLASS),
        other => {
            eprintln!("volumes: could not start: {other:?}");
            std::process::exit(1);
        }
    }
    // The claim watch runs until the process is stopped.
    let _ = provisioner.await;
}
