//! A map whose entries leave a fixed time after they were first inserted, in insertion order: O(1) amortized, no
//! scans. For what only matters for a while (cache lag, a create's watch event still to come).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The entries, and when each key joined, oldest first.
type Entries<K, V> = (HashMap<K, V>, VecDeque<(Instant, K)>);

pub struct ExpiringMap<K, V> {
    ttl: Duration,
    inner: Mutex<Entries<K, V>>,
}

impl<K: Hash + Eq + Clone, V: Clone> ExpiringMap<K, V> {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, inner: Mutex::new((HashMap::new(), VecDeque::new())) }
    }

    fn expire(ttl: Duration, (map, order): &mut Entries<K, V>) {
        while order.front().is_some_and(|(at, _)| at.elapsed() >= ttl) {
            if let Some((_, key)) = order.pop_front() {
                map.remove(&key);
            }
        }
    }

    /// Inserts or replaces; a replaced entry keeps its original expiry.
    pub fn insert(&self, key: K, value: V) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(self.ttl, &mut inner);
        if inner.0.insert(key.clone(), value).is_none() {
            inner.1.push_back((Instant::now(), key));
        }
    }

    /// Removes and returns the entry (its place in the expiry order stays until it expires: a key taken and
    /// inserted again may leave early).
    pub fn take(&self, key: &K) -> Option<V> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(self.ttl, &mut inner);
        inner.0.remove(key)
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(self.ttl, &mut inner);
        inner.0.get(key).cloned()
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
}
