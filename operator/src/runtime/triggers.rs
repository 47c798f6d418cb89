//! Which watch events of a child kind may trigger a reconcile: only those that change what the reconcile reads of
//! it. A pod changes five or six times on its way to its end and a Job four or five (scheduling, readiness,
//! counters, finalizers), and most of those changes cannot change a plan; each would cost a reconcile. The cache
//! still takes every event: this decides only which ones wake the owner. The same holds for the watch events of an
//! object's own writes (`OwnWrites`).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use std::time::Duration;

use kube::Resource;
use kube::runtime::watcher;

use crate::runtime::expiring::ExpiringMap;

/// What of an object its owner's reconcile reads, as a hash. Two states with one signature plan alike.
pub type Signature<K> = fn(&K, &mut DefaultHasher);

/// Keeps the last signature of each object and passes an event on when the object is new, gone, or its
/// signature moved. A (re)list passes everything: objects may have changed or gone while the watch was down.
pub struct Changes<K> {
    signature: Signature<K>,
    seen: HashMap<(Option<String>, String), u64>,
}

impl<K: Resource> Changes<K> {
    pub fn new(signature: Signature<K>) -> Self {
        Self { signature, seen: HashMap::new() }
    }

    /// Whether this event may change a plan (a watch error always passes, for the controller to see).
    pub fn pass(&mut self, event: &Result<watcher::Event<K>, watcher::Error>) -> bool {
        let Ok(event) = event else { return true };
        match event {
            watcher::Event::Apply(o) => {
                let signature = self.sign(o);
                self.seen.insert(key(o), signature) != Some(signature)
            }
            watcher::Event::InitApply(o) => {
                let signature = self.sign(o);
                self.seen.insert(key(o), signature);
                true
            }
            watcher::Event::Delete(o) => {
                self.seen.remove(&key(o));
                true
            }
            watcher::Event::Init => {
                self.seen.clear();
                true
            }
            watcher::Event::InitDone => true,
        }
    }

    /// The kind's signature, with what every reconcile reads of any object: which object it is (a new one under
    /// an old name is new) and whether it is being deleted.
    fn sign(&self, o: &K) -> u64 {
        let mut h = DefaultHasher::new();
        o.meta().uid.hash(&mut h);
        o.meta().deletion_timestamp.is_some().hash(&mut h);
        (self.signature)(o, &mut h);
        h.finish()
    }
}

/// The versions of objects this process wrote, whose watch events need not wake them: each would cost a reconcile
/// that finds nothing to do (three or four per WorkflowRun). A write's version is held back from the moment it is
/// written (its event often arrives before the reconcile that wrote it ends); that reconcile then decides, and
/// withdraws the version of a copy that needs another look. Any other event passes, a (re)list too.
pub struct OwnWrites {
    versions: ExpiringMap<(String, u64), ()>,
}

impl OwnWrites {
    /// Versions whose event never comes (a watch restarted in between: the relist passes) leave after `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self { versions: ExpiringMap::new(ttl) }
    }

    /// The event of this version of the object (by UID) will not wake it.
    pub fn hold(&self, uid: String, resource_version: u64) {
        self.versions.insert((uid, resource_version), ());
    }

    /// The event of this version will wake the object after all; false when it came already and was held back
    /// (then the object needs another look now, and the cache has that version).
    pub fn release(&self, uid: String, resource_version: u64) -> bool {
        self.versions.take(&(uid, resource_version)).is_some()
    }

    /// Whether the event may wake its object: not when it is a held write of ours.
    pub fn pass<K: Resource>(&self, event: &Result<watcher::Event<K>, watcher::Error>) -> bool {
        let Ok(watcher::Event::Apply(o)) = event else { return true };
        let (Some(uid), Some(version)) = (o.meta().uid.clone(), o.meta().resource_version.as_deref()) else {
            return true;
        };
        version.parse().map_or(true, |version| self.versions.take(&(uid, version)).is_none())
    }
}

fn key<K: Resource>(o: &K) -> (Option<String>, String) {
    (o.meta().namespace.clone(), o.meta().name.clone().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn phase_only(pod: &Pod, h: &mut DefaultHasher) {
        pod.status.as_ref().and_then(|s| s.phase.as_deref()).hash(h);
    }

    fn pod(uid: &str, phase: &str, resource_version: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some(uid.into()),
                resource_version: Some(resource_version.into()),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus { phase: Some(phase.into()), ..PodStatus::default() }),
            ..Pod::default()
        }
    }

    #[test]
    fn passes_new_changed_deleted_and_relisted_objects_and_nothing_else() {
        let mut changes = Changes::new(phase_only);
        let mut pass = |e: watcher::Event<Pod>| changes.pass(&Ok(e));
        assert!(pass(watcher::Event::Apply(pod("u1", "Pending", "1"))), "a new pod");
        assert!(!pass(watcher::Event::Apply(pod("u1", "Pending", "2"))), "a change the signature ignores");
        assert!(pass(watcher::Event::Apply(pod("u1", "Running", "3"))), "a change it reads");
        let mut deleting = pod("u1", "Running", "4");
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        assert!(pass(watcher::Event::Apply(deleting.clone())), "being deleted");
        assert!(pass(watcher::Event::Delete(deleting)), "gone");
        assert!(pass(watcher::Event::Apply(pod("u2", "Running", "5"))), "a new pod under the old name");
        assert!(pass(watcher::Event::Init));
        assert!(pass(watcher::Event::InitApply(pod("u2", "Running", "5"))), "a relist passes everything");
        assert!(pass(watcher::Event::InitDone));
        assert!(!pass(watcher::Event::Apply(pod("u2", "Running", "6"))), "and remembers what it listed");
    }

    #[test]
    fn only_held_versions_of_own_writes_are_held_back_once() {
        let own = OwnWrites::new(Duration::from_secs(60));
        own.hold("u1".into(), 7);
        let event = |uid: &str, version: &str| Ok(watcher::Event::Apply(pod(uid, "Running", version)));
        assert!(own.pass(&event("u1", "6")), "an older version: someone's, or ours not held");
        assert!(own.pass(&event("u2", "7")), "another object");
        assert!(!own.pass(&event("u1", "7")), "the held echo");
        assert!(own.pass(&event("u1", "7")), "held back once only");
        assert!(!own.release("u1".into(), 7), "released after it came: the caller looks again itself");
        own.hold("u1".into(), 8);
        assert!(own.release("u1".into(), 8), "released before it came");
        assert!(own.pass(&event("u1", "8")), "so it passes");
        own.hold("u1".into(), 9);
        assert!(own.pass(&Ok(watcher::Event::InitApply(pod("u1", "Running", "9")))), "a relist passes");
        assert!(own.pass(&Ok(watcher::Event::Delete(pod("u1", "Running", "9")))), "a deletion passes");
    }

    #[test]
    fn a_watch_error_passes() {
        let mut changes = Changes::new(|_: &ConfigMap, _| {});
        assert!(changes.pass(&Err(watcher::Error::NoResourceVersion)));
    }
}
