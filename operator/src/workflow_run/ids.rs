//! Trace and span ids derived from the run's UID, so that an operator restart (or a second export attempt)
//! produces the same ids and the workload's `TRACEPARENT` always names the span flowtel reports.

use opentelemetry::trace::{SpanId, TraceId};
use sha2::{Digest, Sha256};

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize().into()
}

/// The run's trace id: 128 bits of SHA-256 over its UID.
pub fn trace_id(run_uid: &str) -> TraceId {
    let d = digest(&["flowtel.dev/trace", run_uid]);
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    TraceId::from_bytes(id)
}

/// The `workflow.run` span's id.
pub fn run_span_id(run_uid: &str) -> SpanId {
    span_id(&["flowtel.dev/run", run_uid])
}

/// The span id of attempt `attempt` (from 1) of the run.
pub fn attempt_span_id(run_uid: &str, attempt: i32) -> SpanId {
    span_id(&["flowtel.dev/attempt", run_uid, &attempt.to_string()])
}

fn span_id(parts: &[&str]) -> SpanId {
    let d = digest(parts);
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    SpanId::from_bytes(id)
}

/// W3C `traceparent` naming the attempt's span as parent, sampled.
pub fn traceparent(run_uid: &str, attempt: i32) -> String {
    format!("00-{}-{}-01", trace_id(run_uid), attempt_span_id(run_uid, attempt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let uid = "4f1c7a52-9a0e-4b8e-9d63-1f0b8a7c2e11";
        assert_eq!(trace_id(uid), trace_id(uid));
        assert_ne!(trace_id(uid), trace_id("another"));
        assert_ne!(attempt_span_id(uid, 1), attempt_span_id(uid, 2));
        assert_ne!(run_span_id(uid), attempt_span_id(uid, 1));
        let tp = traceparent(uid, 2);
        assert_eq!(tp.len(), 55);
        assert!(tp.starts_with(&format!("00-{}-", trace_id(uid))));
        assert!(tp.ends_with("-01"));
    }
}
