//! Runs started per second, by the TelemetryStack they report to: the WorkflowRun controller counts, the
//! TelemetryStack controller reads (it raises a collector's HPA minimum from it). Neither knows the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The window the rate is averaged over, in one-second buckets.
const WINDOW_SECONDS: usize = 60;

struct Window {
    /// Starts per second, indexed by second modulo the window; `stamps` says which second a bucket holds.
    counts: [u32; WINDOW_SECONDS],
    stamps: [u64; WINDOW_SECONDS],
}

impl Default for Window {
    fn default() -> Self {
        Self { counts: [0; WINDOW_SECONDS], stamps: [0; WINDOW_SECONDS] }
    }
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct RunRates {
    origin: Instant,
    windows: Arc<Mutex<HashMap<(String, String), Window>>>,
}

impl Default for RunRates {
    fn default() -> Self {
        Self { origin: Instant::now(), windows: Arc::default() }
    }
}

impl RunRates {
    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_secs()
    }

    /// One run referencing stack `name` in `namespace` started at `at`.
    pub fn record(&self, namespace: &str, name: &str, at: Instant) {
        let second = self.second(at);
        let slot = (second % WINDOW_SECONDS as u64) as usize;
        let mut windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let w = windows.entry((namespace.to_string(), name.to_string())).or_default();
        if w.stamps[slot] != second {
            w.stamps[slot] = second;
            w.counts[slot] = 0;
        }
        w.counts[slot] += 1;
    }

    /// Runs per second over the last minute up to `now`.
    pub fn per_second(&self, namespace: &str, name: &str, now: Instant) -> f64 {
        let now = self.second(now);
        let windows = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = windows.get(&(namespace.to_string(), name.to_string())) else { return 0.0 };
        let recent: u32 = (0..WINDOW_SECONDS)
            .filter(|&i| w.stamps[i] + (WINDOW_SECONDS as u64) > now && w.stamps[i] <= now)
            .map(|i| w.counts[i])
            .sum();
        f64::from(recent) / WINDOW_SECONDS as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_rate_is_the_last_minutes_starts_over_sixty_seconds() {
        let rates = RunRates::default();
        let t0 = rates.origin;
        for i in 0..120 {
            rates.record("ns", "stack", t0 + Duration::from_millis(i * 250));
        }
        assert_eq!(rates.per_second("ns", "stack", t0 + Duration::from_secs(30)), 2.0);
        assert_eq!(rates.per_second("ns", "other", t0 + Duration::from_secs(30)), 0.0);
        // A minute after the last start, none of them counts any more.
        assert_eq!(rates.per_second("ns", "stack", t0 + Duration::from_secs(90)), 0.0);
    }
}
