//! Entries that leave a fixed time after they joined, in the order they joined: O(1) amortized, no scans. For what
//! only matters for a while: cache lag and a create's watch event still to come (`ExpiringMap`, locked), and the
//! export ledger's outcomes (`Expiring`, under the ledger's own lock).

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The entries, and when each key joined, oldest first. Not locked.
pub struct Expiring<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<(Instant, K)>,
}

impl<K, V> Default for Expiring<K, V> {
    fn default() -> Self {
        Self { map: HashMap::new(), order: VecDeque::new() }
    }
}

impl<K: Hash + Eq + Clone, V> Expiring<K, V> {
    /// Drops the entries that joined `keep` ago or longer.
    pub fn expire(&mut self, keep: Duration) {
        while self.order.front().is_some_and(|(at, _)| at.elapsed() >= keep) {
            if let Some((_, key)) = self.order.pop_front() {
                self.map.remove(&key);
            }
        }
    }

    /// Inserts or replaces; a new key joins at `at` (callers insert in time order: a recalled entry at its age), a
    /// replaced entry keeps the time it joined.
    pub fn insert_at(&mut self, key: K, value: V, at: Instant) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back((at, key));
        }
    }

    /// Removes and returns the entry (its place in the order stays until it expires: a key removed and inserted
    /// again may leave early).
    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.map.remove(key)
    }

    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.map.get(key)
    }

    pub fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.map.get_mut(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter()
    }
}

/// An `Expiring` map with a fixed time to live, shared behind a lock.
pub struct ExpiringMap<K, V> {
    ttl: Duration,
    inner: Mutex<Expiring<K, V>>,
}

impl<K: Hash + Eq + Clone, V: Clone> ExpiringMap<K, V> {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, inner: Mutex::new(Expiring::default()) }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Expiring<K, V>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.expire(self.ttl);
        inner
    }

    /// Inserts or replaces; a replaced entry keeps its original expiry.
    pub fn insert(&self, key: K, value: V) {
        self.entries().insert_at(key, value, Instant::now());
    }

    /// Removes and returns the entry.
    pub fn take(&self, key: &K) -> Option<V> {
        self.entries().remove(key)
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.entries().get(key).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_leave_after_the_ttl() {
        let map = ExpiringMap::new(Duration::from_millis(30));
        map.insert("a", 1);
        map.insert("a", 2);
        assert_eq!(map.get(&"a"), Some(2));
        assert_eq!(map.get(&"b"), None);
        map.insert("c", 3);
        assert_eq!((map.take(&"c"), map.get(&"c")), (Some(3), None));
        let later = Instant::now() + Duration::from_millis(30);
        while Instant::now() < later {
            std::hint::spin_loop();
        }
        assert_eq!(map.get(&"a"), None);
    }

    #[test]
    fn entries_leave_in_the_order_they_joined_at_the_time_given() {
        let mut entries = Expiring::default();
        let now = Instant::now();
        entries.insert_at("old", 1, now - Duration::from_secs(100));
        entries.insert_at("new", 2, now);
        entries.expire(Duration::from_secs(50));
        assert_eq!((entries.get("old"), entries.get("new")), (None, Some(&2)));
    }
}
