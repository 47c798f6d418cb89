//! A cuttable TCP path to the apiserver: a network partition of one process.

use std::path::PathBuf;

use crate::HarnessError;
use crate::cluster::cluster_kubeconfig;

/// A TCP forwarder to the apiserver that can be cut, so that one process (and only that one) loses the apiserver:
/// a network partition, while the control plane itself stays up.
pub struct ApiserverProxy {
    /// A kubeconfig like the cluster's, through the proxy.
    pub kubeconfig: PathBuf,
    accept: tokio::task::JoinHandle<()>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl ApiserverProxy {
    pub async fn start(name: &str) -> Result<Self, HarnessError> {
        let original = std::fs::read_to_string(cluster_kubeconfig())
            .map_err(|source| HarnessError::Spawn { command: "read kubeconfig".into(), source })?;
        let server = original
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: https://"))
            .ok_or_else(|| HarnessError::Timeout("a server in the kubeconfig".into()))?
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| HarnessError::Spawn { command: "proxy listen".into(), source })?;
        let port =
            listener.local_addr().map_err(|source| HarnessError::Spawn { command: "proxy".into(), source })?.port();
        // The apiserver's certificate names 127.0.0.1, not a port: the same kubeconfig works through the proxy.
        let kubeconfig = std::env::temp_dir().join(format!("flowtel-proxy-{name}.kubeconfig"));
        std::fs::write(&kubeconfig, original.replace(&server, &format!("127.0.0.1:{port}")))
            .map_err(|source| HarnessError::Spawn { command: "write kubeconfig".into(), source })?;
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tracked = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let server = server.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&server).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tracked.lock().unwrap_or_else(|e| e.into_inner()).push(task.abort_handle());
            }
        });
        Ok(Self { kubeconfig, accept, connections })
    }

    /// Drops every connection and stops listening: from now on the apiserver is unreachable through the proxy.
    pub fn cut(&self) {
        self.accept.abort();
        for c in self.connections.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            c.abort();
        }
    }
}

impl Drop for ApiserverProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
