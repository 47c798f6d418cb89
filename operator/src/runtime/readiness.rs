//! Readiness as a set of named gates: `/readyz` answers 200 only while every gate is open. A controller opens its
//! gate once its watches synced; a background worker closes its gate when it stops.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kube::runtime::watcher;

/// One condition of readiness (or of starting work: see `opened`).
#[derive(Clone, Debug)]
pub struct Gate {
    name: &'static str,
    open: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Gate {
    /// A gate no readiness reads: something else awaits it.
    pub fn standalone(name: &'static str) -> Self {
        Self { name, open: Arc::new(tokio::sync::watch::Sender::new(false)) }
    }

    pub fn set(&self, open: bool) {
        if self.open.send_replace(open) != open {
            tracing::info!(gate = self.name, open, "readiness changed");
        }
    }

    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }

    /// Returns once the gate is open (at once if it is).
    pub async fn opened(&self) {
        let mut rx = self.open.subscribe();
        // The sender lives in self: the wait cannot fail while we hold it.
        let _ = rx.wait_for(|open| *open).await;
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
        let gate = Gate { name, open: Arc::new(tokio::sync::watch::Sender::new(open)) };
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

    #[tokio::test]
    async fn a_standalone_gate_wakes_whoever_awaits_it() {
        let gate = Gate::standalone("children");
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.opened().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        gate.set(true);
        assert!(waiter.await.is_ok());
        // Opened already: returns at once.
        gate.opened().await;
    }
}
