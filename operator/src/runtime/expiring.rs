//! A set whose members leave a fixed time after they joined, in insertion order: O(1) amortized, no scans.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The members, and when each joined, oldest first.
type Members<T> = (HashSet<T>, VecDeque<(Instant, T)>);

pub struct ExpiringSet<T> {
    ttl: Duration,
    inner: Mutex<Members<T>>,
}

impl<T: Hash + Eq + Clone> ExpiringSet<T> {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, inner: Mutex::default() }
    }

    fn expire(ttl: Duration, (set, order): &mut Members<T>) {
        while order.front().is_some_and(|(at, _)| at.elapsed() >= ttl) {
            if let Some((_, item)) = order.pop_front() {
                set.remove(&item);
            }
        }
    }

    pub fn insert(&self, item: T) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(self.ttl, &mut inner);
        if inner.0.insert(item.clone()) {
            inner.1.push_back((Instant::now(), item));
        }
    }

    pub fn contains(&self, item: &T) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(self.ttl, &mut inner);
        inner.0.contains(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_leave_after_the_ttl() {
        let set = ExpiringSet::new(Duration::from_millis(30));
        set.insert("a");
        assert!(set.contains(&"a"));
        assert!(!set.contains(&"b"));
        let later = Instant::now() + Duration::from_millis(30);
        while Instant::now() < later {
            std::hint::spin_loop();
        }
        assert!(!set.contains(&"a"));
    }
}
