//! The harness's processes: free ports, a child killed when dropped, the binaries `e2e/build-binaries` caches and
//! the workspace's own `flowtel`.

use std::path::PathBuf;
use std::time::Duration;

use crate::{HarnessError, repo_root};

/// A free TCP port on loopback (bound and released; good enough for a test's own processes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// `n` distinct free TCP ports on loopback: all bound at once, then released (ports taken one at a time may repeat).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n).filter_map(|_| std::net::TcpListener::bind("127.0.0.1:0").ok()).collect();
    listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect()
}

/// A child process killed when dropped.
pub struct Process {
    pub child: std::process::Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        kill_tree(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The parent of every live process, from /proc.
fn parents() -> Vec<(u32, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After "comm) ": state, then the parent's pid.
            let ppid = stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// `pid` and every process descended from it.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let parents = parents();
    let mut tree = vec![pid];
    let mut i = 0;
    while let Some(&parent) = tree.get(i) {
        tree.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

/// SIGKILLs `pid` and everything it started, as a pod's deletion with no grace ends all of a pod's processes
/// (a worker agent runs each attempt in a process group of its own). Stopped first, so that none forks or is
/// re-parented in between.
pub fn kill_tree(pid: u32) {
    let signal = |sig: &str, pids: &[u32]| {
        let _ = std::process::Command::new("kill")
            .arg(sig)
            .args(pids.iter().map(u32::to_string))
            .stderr(std::process::Stdio::null())
            .status();
    };
    let tree = process_tree(pid);
    signal("-STOP", &tree);
    let mut tree_now = process_tree(pid);
    tree_now.extend(tree);
    signal("-KILL", &tree_now);
}

pub(crate) fn versions_env(key: &str) -> Option<String> {
    let text = std::fs::read_to_string(repo_root().join("e2e/versions.env")).ok()?;
    text.lines().find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
}

fn cache_bin() -> PathBuf {
    let cache = std::env::var_os("FLOWTEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/flowtel"));
    cache.join("bin")
}

/// A binary e2e/build-binaries caches as `<name>-<version>`, the version read from `e2e/versions.env`.
pub fn cached_binary(name: &str, version_key: &str) -> PathBuf {
    cache_bin().join(format!("{name}-{}", versions_env(version_key).unwrap_or_default()))
}

/// The collector e2e/build-binaries builds: named by release and component-list revision.
pub fn collector_bin() -> PathBuf {
    let version = versions_env("OTELCOL_VERSION").unwrap_or_default();
    let revision = versions_env("OTELCOL_DIST_REVISION").unwrap_or_default();
    cache_bin().join(format!("otelcol-flowtel-{version}-{revision}"))
}

/// Waits (bounded) until something accepts connections on the loopback port.
pub async fn wait_for_port(port: u16) -> Result<(), HarnessError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            return Err(HarnessError::Timeout(format!("port {port} to accept connections")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The `flowtel` binary of this workspace. `cargo test --workspace` builds it (the operator's own integration tests
/// need it); a nested `cargo build` here would wait forever on the lock the running `cargo test` holds.
pub fn flowtel_binary() -> Result<PathBuf, HarnessError> {
    let exe =
        std::env::current_exe().map_err(|source| HarnessError::Spawn { command: "current_exe".into(), source })?;
    // A test runs from target/<profile>/deps/, a bench binary from target/<profile>/: flowtel is in the latter.
    let bin = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("flowtel"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("target/debug/flowtel"));
    if !bin.exists() {
        return Err(HarnessError::Missing(format!(
            "the operator binary {} (run the suite with `cargo test --workspace`, or `cargo build -p flowtel-operator`)",
            bin.display()
        )));
    }
    Ok(bin)
}
