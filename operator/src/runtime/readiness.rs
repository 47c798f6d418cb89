//! Readiness as a set of named gates: `/readyz` answers 200 only while every gate is open. A controller opens its
//! gate once its watches synced; a background worker closes its gate when it stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use kube::runtime::watcher;

/// One condition of readiness.
#[derive(Clone, Debug)]
pub struct Gate {
    name: &'static str,
    open: Arc<AtomicBool>,
}

impl Gate {
    pub fn set(&self, open: bool) {
        if self.open.swap(open, Ordering::SeqCst) != open {
            tracing::info!(gate = self.name, open, "readiness changed");
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }
}

/// Every gate of the process.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    gates: Arc<std::sync::Mutex<Vec<Gate>>>,
}

impl Readiness {
    /// A new gate, open or closed.
    pub fn gate(&self, name: &'static str, open: bool) -> Gate {
        let gate = Gate { name, open: Arc::new(AtomicBool::new(open)) };
        self.gates.lock().unwrap_or_else(|e| e.into_inner()).push(gate.clone());
        gate
    }

    /// The names of the closed gates; empty when ready.
    pub fn closed(&self) -> Vec<&'static str> {
        self.gates.lock().unwrap_or_else(|e| e.into_inner()).iter().filter(|g| !g.is_open()).map(|g| g.name).collect()
    }
}

/// Opens `gate` once every watch it tracks delivered its initial list. (Awaiting `Store::wait_until_ready` beside
/// the controller, which awaits the same store, could miss the wake-up; the watch events themselves cannot.)
pub struct SyncTracker {
    pending: Arc<AtomicUsize>,
    gate: Gate,
}

impl SyncTracker {
    pub fn new(watches: usize, gate: Gate) -> Self {
        Self { pending: Arc::new(watches.into()), gate }
    }

    /// An observer for one watch's events.
    pub fn watch<K>(&self, what: &'static str) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + use<K> {
        let pending = self.pending.clone();
        let gate = self.gate.clone();
        let mut synced = false;
        move |event| {
            if !synced && matches!(event, Ok(watcher::Event::InitDone)) {
                synced = true;
                tracing::info!(watch = what, "watch synced");
                if pending.fetch_sub(1, Ordering::SeqCst) == 1 {
                    gate.set(true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_gate_is_open() {
        let readiness = Readiness::default();
        let watches = readiness.gate("watches", false);
        let worker = readiness.gate("export-worker", true);
        assert_eq!(readiness.closed(), ["watches"]);
        let tracker = SyncTracker::new(2, watches);
        let mut a = tracker.watch::<()>("a");
        let mut b = tracker.watch::<()>("b");
        a(&Ok(watcher::Event::InitDone));
        a(&Ok(watcher::Event::InitDone));
        assert_eq!(readiness.closed(), ["watches"], "one watch synced twice is still one watch");
        b(&Ok(watcher::Event::InitDone));
        assert!(readiness.closed().is_empty());
        worker.set(false);
        assert_eq!(readiness.closed(), ["export-worker"]);
    }
}
