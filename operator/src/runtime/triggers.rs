//! Which watch events of a child kind may trigger a reconcile: only those that change what the reconcile reads of
//! it. A pod changes five or six times on its way to its end and a Job four or five (scheduling, readiness,
//! counters, finalizers), and most of those changes cannot change a plan; each would cost a reconcile. The cache
//! still takes every event: this decides only which ones wake the owner. The same holds for the watch events of an
//! object's own writes (`OwnWrites`).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use kube::Resource;
use kube::runtime::watcher;

use crate::runtime::expiring::ExpiringMap;

/// What of an object its owner's reconcile reads, as a hash. Two states with one signature plan alike.
pub type Signature<K> = fn(&K, &mut DefaultHasher);

/// Keeps the last signature of each object and passes an event on when the object is new, gone, or its
/// signature moved. A (re)list passes everything: objects may have changed or gone while the watch was down.
/// With `quiet_births`, a new object passes only when `births` says it must or it is being deleted: a child its
/// owner's reconcile created is known to it, and its creation's event would wake the owner for nothing.
pub struct Changes<K> {
    signature: Signature<K>,
    births: fn(&K) -> bool,
    seen: HashMap<(Option<String>, String), u64>,
    /// Pass every event (the filter off).
    all: bool,
}

impl<K: Resource> Changes<K> {
    pub fn new(signature: Signature<K>) -> Self {
        Self::quiet_births(signature, |_| true)
    }

    pub fn quiet_births(signature: Signature<K>, births: fn(&K) -> bool) -> Self {
        Self { signature, births, seen: HashMap::new(), all: false }
    }

    /// Passes every event: the reference against which the filter is checked.
    pub fn passing_all(signature: Signature<K>) -> Self {
        Self { all: true, ..Self::new(signature) }
    }

    /// Whether this event may change a plan (a watch error always passes, for the controller to see).
    pub fn pass(&mut self, event: &Result<watcher::Event<K>, watcher::Error>) -> bool {
        let Ok(event) = event else { return true };
        if self.all {
            return true;
        }
        match event {
            watcher::Event::Apply(o) => {
                let signature = self.sign(o);
                match self.seen.insert(key(o), signature) {
                    Some(seen) => seen != signature,
                    None => o.meta().deletion_timestamp.is_some() || (self.births)(o),
                }
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

/// An object's own writes, as its watch events and its cached copy meet them. Each write's event would cost a
/// reconcile that finds nothing to do (three or four per WorkflowRun), so:
/// - while an object's reconcile runs (`busy`), its events are held: the echo of a write often arrives before the
///   write's response. When the reconcile finishes it says which versions it wrote and whether the last one needs
///   another look; a held event of someone else's write, or of a last write that needs a look, makes it look
///   again at once, and the echoes still to come of writes that need none are held back when they come;
/// - until the cache has caught up with a write, a reconcile gets the written copy instead of the cached one
///   (`newest`): the export worker's notification or a child's event can outrun the echo.
///
/// Any other event passes, a (re)list too. resourceVersions are opaque (API conventions): they are only compared for
/// equality, and the order comes from the watch, which delivers an object's versions in the order they were written,
/// so a cached copy is behind ours exactly until the event of our version has gone by.
pub struct OwnWrites<K> {
    /// Events held while the object's reconcile runs: object UID → the versions they carried.
    busy: Mutex<HashMap<String, Vec<String>>>,
    /// Versions of our writes whose events, still to come, will not wake the object.
    echoes: ExpiringMap<(String, String), ()>,
    /// The last copy this process wrote of each object, until the watch delivers that version.
    latest: ExpiringMap<String, Arc<K>>,
}

/// An object's reconcile in progress (`OwnWrites::busy`). Dropped unfinished (an error, a cancelled reconcile), what
/// it held is left to the retry.
pub struct Busy<'a, K> {
    own: &'a OwnWrites<K>,
    uid: String,
}

/// An object's UID and its resourceVersion.
fn version_of<K: Resource>(o: &K) -> Option<(&str, &str)> {
    Some((o.meta().uid.as_deref()?, o.meta().resource_version.as_deref()?))
}

impl<K: Resource> OwnWrites<K> {
    /// What never meets its event (a watch restarted in between: the relist passes) is forgotten after `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self { busy: Mutex::new(HashMap::new()), echoes: ExpiringMap::new(ttl), latest: ExpiringMap::new(ttl) }
    }

    /// The object's events are held until the returned reconcile finishes.
    pub fn busy(&self, uid: String) -> Busy<'_, K> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner()).insert(uid.clone(), Vec::new());
        Busy { own: self, uid }
    }

    /// A copy of ours, as the apiserver answered the write. Its echo may have outrun the answer: then the cache has
    /// it already (or a newer one), and the copy must not stand in for the cache, or a later change by someone
    /// else (a deletion) would be read as this older copy.
    pub fn wrote(&self, copy: Arc<K>) {
        let Some((uid, version)) = version_of(copy.as_ref()) else { return };
        let echoed = self
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .is_some_and(|held| held.iter().any(|v| v == version));
        if echoed {
            self.latest.take(&uid.to_string());
        } else {
            self.latest.insert(uid.to_string(), copy.clone());
        }
    }

    /// The cached copy, or the one we wrote since when the cache has not caught up with it yet (ours is kept only
    /// until the watch delivers its version, so while it is kept the cache is behind it).
    pub fn newest(&self, cached: Arc<K>) -> Arc<K> {
        let Some((uid, _)) = version_of(cached.as_ref()) else { return cached };
        self.latest.get(&uid.to_string()).unwrap_or(cached)
    }

    /// Whether the event may wake its object: not while its reconcile runs, nor when it is an echo held back.
    pub fn pass(&self, event: &Result<watcher::Event<K>, watcher::Error>) -> bool {
        let Ok(event) = event else { return true };
        let (watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o)) = event else {
            return true;
        };
        let Some((uid, version)) = version_of(o) else { return true };
        let (uid, version) = (uid.to_string(), version.to_string());
        // A relist shows the object as it is now: whatever we wrote is in it, or the watch brings it next.
        let caught_up = self.latest.get(&uid).and_then(|ours| version_of(ours.as_ref()).map(|(_, v)| v == version));
        if caught_up == Some(true) || !matches!(event, watcher::Event::Apply(_)) {
            self.latest.take(&uid);
        }
        let watcher::Event::Apply(_) = event else { return true };
        if let Some(held) = self.busy.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&uid) {
            held.push(version);
            return false;
        }
        self.echoes.take(&(uid, version)).is_none()
    }
}

impl<K> Busy<'_, K> {
    /// The reconcile wrote `ours` (in order); `look_at_last` when the last of them needs another look. Returns
    /// whether the object must be looked at again now: an event it held was someone else's, or was the last write's
    /// while that needs a look.
    pub fn finish(self, ours: &[String], look_at_last: bool) -> bool {
        let held = self.own.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.uid).unwrap_or_default();
        let last = ours.last().filter(|_| look_at_last);
        let look_again = held.iter().any(|v| !ours.contains(v) || Some(v) == last);
        for version in ours.iter().filter(|v| !held.contains(v) && Some(*v) != last) {
            self.own.echoes.insert((self.uid.clone(), version.clone()), ());
        }
        look_again
    }
}

impl<K> Drop for Busy<'_, K> {
    fn drop(&mut self) {
        self.own.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.uid);
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
    fn with_quiet_births_a_new_object_wakes_its_owner_only_when_it_must() {
        let ended = |pod: &Pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded");
        let mut changes = Changes::quiet_births(phase_only, ended);
        let mut pass = |e: watcher::Event<Pod>| changes.pass(&Ok(e));
        assert!(!pass(watcher::Event::Apply(pod("u1", "Pending", "1"))), "created: its owner knows");
        assert!(pass(watcher::Event::Apply(pod("u1", "Succeeded", "2"))), "ended");
        assert!(pass(watcher::Event::Apply(pod("u2", "Succeeded", "3"))), "first seen ended");
        let mut deleting = pod("u3", "Running", "4");
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        assert!(pass(watcher::Event::Apply(deleting)), "first seen being deleted");
        assert!(pass(watcher::Event::InitApply(pod("u4", "Pending", "5"))), "a relist passes everything");
    }

    fn versions(v: &[&str]) -> Vec<String> {
        v.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn the_echoes_of_own_writes_wake_nothing_unless_the_last_needs_a_look() {
        let own = OwnWrites::new(Duration::from_secs(60));
        let event = |uid: &str, version: &str| Ok(watcher::Event::Apply(pod(uid, "Running", version)));
        // Two writes (7, 8); the echo of 7 comes while the reconcile runs, 8's after; 8 needs no look.
        let busy = own.busy("u1".into());
        assert!(!own.pass(&event("u1", "7")), "held while its reconcile runs");
        assert!(own.pass(&event("u2", "7")), "another object");
        assert!(!busy.finish(&versions(&["7", "8"]), false), "only our own echo was held");
        assert!(!own.pass(&event("u1", "8")), "the echo still to come is held back");
        assert!(own.pass(&event("u1", "8")), "once");
        // Someone else's write (9) lands during the reconcile, which writes 10.
        let busy = own.busy("u1".into());
        assert!(!own.pass(&event("u1", "9")));
        assert!(busy.finish(&versions(&["10"]), false), "someone else's change: look again now");
        assert!(!own.pass(&event("u1", "10")));
        // The last write needs a look: its echo, held already, makes the object look again; still to come, it passes.
        let busy = own.busy("u1".into());
        assert!(!own.pass(&event("u1", "11")));
        assert!(busy.finish(&versions(&["11"]), true));
        let busy = own.busy("u1".into());
        assert!(!busy.finish(&versions(&["12", "13"]), true), "nothing held yet");
        assert!(!own.pass(&event("u1", "12")), "superseded by 13");
        assert!(own.pass(&event("u1", "13")), "wakes the object");
        // A reconcile dropped unfinished holds nothing afterwards.
        drop(own.busy("u1".into()));
        assert!(own.pass(&event("u1", "14")));
        let busy = own.busy("u1".into());
        assert!(!busy.finish(&versions(&["15"]), false));
        assert!(own.pass(&Ok(watcher::Event::InitApply(pod("u1", "Running", "15")))), "a relist passes");
        assert!(own.pass(&Ok(watcher::Event::Delete(pod("u1", "Running", "15")))), "a deletion passes");
    }

    #[test]
    fn a_reconcile_gets_the_copy_written_last_until_the_cache_has_it() {
        let own = OwnWrites::new(Duration::from_secs(60));
        let cached = |version: &str| std::sync::Arc::new(pod("u1", "Running", version));
        assert_eq!(own.newest(cached("3")).metadata.resource_version.as_deref(), Some("3"), "nothing written");
        own.wrote(cached("5"));
        assert_eq!(own.newest(cached("3")).metadata.resource_version.as_deref(), Some("5"), "ours is newer");
        // Versions are compared for equality only: "10" sorts before "5" as text, and means nothing as a number.
        assert!(own.pass(&Ok(watcher::Event::Apply(pod("u1", "Running", "4")))));
        assert_eq!(own.newest(cached("4")).metadata.resource_version.as_deref(), Some("5"), "not caught up yet");
        assert!(own.pass(&Ok(watcher::Event::Apply(pod("u1", "Running", "5")))));
        assert!(own.latest.get(&"u1".to_string()).is_none(), "forgotten once the watch delivered it");
        own.wrote(cached("7"));
        assert!(own.pass(&Ok(watcher::Event::Delete(pod("u1", "Running", "6")))));
        assert!(own.latest.get(&"u1".to_string()).is_none(), "and once the object is gone");
        own.wrote(cached("9"));
        assert!(own.pass(&Ok(watcher::Event::InitApply(pod("u1", "Running", "10")))));
        assert_eq!(own.newest(cached("10")).metadata.resource_version.as_deref(), Some("10"), "a relist is current");
    }

    #[test]
    fn an_echo_that_outruns_its_write_leaves_the_cache_in_charge() {
        let own = OwnWrites::new(Duration::from_secs(60));
        let cached = |version: &str| std::sync::Arc::new(pod("u1", "Running", version));
        // The write's echo (5) arrives before the write's answer, while the reconcile runs.
        let busy = own.busy("u1".into());
        assert!(!own.pass(&Ok(watcher::Event::Apply(pod("u1", "Running", "5")))));
        own.wrote(cached("5"));
        assert!(!busy.finish(&versions(&["5"]), false));
        // Someone deletes the object (6): the reconcile it wakes must read the deletion, not our older copy.
        let mut deleting = pod("u1", "Running", "6");
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        assert!(own.pass(&Ok(watcher::Event::Apply(deleting.clone()))));
        let read = own.newest(std::sync::Arc::new(deleting));
        assert_eq!(read.metadata.resource_version.as_deref(), Some("6"));
        assert!(read.metadata.deletion_timestamp.is_some());
    }

    #[test]
    fn a_watch_error_passes() {
        let mut changes = Changes::new(|_: &ConfigMap, _| {});
        assert!(changes.pass(&Err(watcher::Error::NoResourceVersion)));
    }
}
