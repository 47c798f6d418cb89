//! Which cached Jobs and pods belong to which run. The reflector stores have no secondary index, and scanning every
//! Job and pod on each reconcile would cost in proportion to the cluster rather than to the run.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use kube::runtime::watcher;

type Key = (String, String);

#[derive(Default)]
struct Inner {
    live: HashMap<Key, BTreeSet<String>>,
    /// The relist in progress (between `Init` and `InitDone`).
    staging: Option<HashMap<Key, BTreeSet<String>>>,
}

/// Object names by (namespace, run name), kept from the watch events of one kind.
#[derive(Clone, Default)]
pub struct RunIndex {
    inner: Arc<Mutex<Inner>>,
}

fn insert(map: &mut HashMap<Key, BTreeSet<String>>, key: Key, name: String) {
    map.entry(key).or_default().insert(name);
}

impl RunIndex {
    /// A watch-event observer that keeps the index; `key` names the run an object belongs to.
    pub fn observe<K>(
        &self,
        key: impl Fn(&K) -> Option<(Key, String)> + Send + 'static,
    ) -> impl FnMut(&Result<watcher::Event<K>, watcher::Error>) + Send + 'static
    where
        K: Send + 'static,
    {
        let inner = self.inner.clone();
        move |event| {
            let Ok(event) = event else { return };
            let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
            match event {
                watcher::Event::Apply(obj) => {
                    if let Some((k, name)) = key(obj) {
                        insert(&mut inner.live, k, name);
                    }
                }
                watcher::Event::Delete(obj) => {
                    if let Some((k, name)) = key(obj)
                        && let Some(names) = inner.live.get_mut(&k)
                    {
                        names.remove(&name);
                        if names.is_empty() {
                            inner.live.remove(&k);
                        }
                    }
                }
                watcher::Event::Init => inner.staging = Some(HashMap::new()),
                watcher::Event::InitApply(obj) => {
                    if let (Some((k, name)), Some(staging)) = (key(obj), inner.staging.as_mut()) {
                        insert(staging, k, name);
                    }
                }
                watcher::Event::InitDone => {
                    if let Some(staging) = inner.staging.take() {
                        inner.live = staging;
                    }
                }
            }
        }
    }

    /// Names of the objects of run `run` in `namespace`.
    pub fn names(&self, namespace: &str, run: &str) -> Vec<String> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .live
            .get(&(namespace.to_string(), run.to_string()))
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_applies_deletes_and_relists() {
        let index = RunIndex::default();
        let key = |o: &(&str, &str)| Some((("ns".to_string(), o.0.to_string()), o.1.to_string()));
        let mut observe = index.observe(key);
        observe(&Ok(watcher::Event::Apply(("run", "a"))));
        observe(&Ok(watcher::Event::Apply(("run", "b"))));
        observe(&Ok(watcher::Event::Delete(("run", "a"))));
        assert_eq!(index.names("ns", "run"), ["b"]);
        observe(&Ok(watcher::Event::Init));
        observe(&Ok(watcher::Event::InitApply(("run", "c"))));
        assert_eq!(index.names("ns", "run"), ["b"], "a relist shows only once done");
        observe(&Ok(watcher::Event::InitDone));
        assert_eq!(index.names("ns", "run"), ["c"]);
    }
}
