//! The runtime fallback when the collector stays down (the user's "circuit breaker" and "console export when OTLP
//! is unavailable"), one breaker per signal: after a signal's export fails, its breaker opens and that signal's
//! exports go to the console (the pod's log, which the cluster keeps) at once, without touching the network, until a
//! cool-down has passed; then one export tries the endpoint again (half-open), and its success closes the breaker.
//! Per signal, because an endpoint may take metrics and refuse logs (a collector without a logs pipeline).
//!
//! Why: a workflow never waits on a dead endpoint more than once. Without the breaker every batch, and the final
//! flush of each signal, waits for its own connection failure or export timeout; with it, a shutdown while the
//! endpoint is known down costs no network wait at all. Nothing is lost silently either way: what the endpoint
//! refused, or what was never sent to it, is printed as one `otel-fallback` line per span, log record or metric point.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry_sdk::logs::SdkLogRecord;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::trace::SpanData;

/// How long the breaker stays open before one export tries the endpoint again.
pub(crate) const COOL_DOWN: Duration = Duration::from_secs(30);

/// Closed: exports go to the endpoint. Open until an instant: they go to the console.
#[derive(Debug)]
pub(crate) struct Breaker {
    open_until: Mutex<Option<Instant>>,
    cool_down: Duration,
}

impl Breaker {
    pub(crate) fn new(cool_down: Duration) -> Self {
        Self { open_until: Mutex::new(None), cool_down }
    }

    /// Whether an export may try the endpoint at `now`. Once the cool-down has passed, one caller is let through
    /// (half-open) and the others stay on the console until its outcome is known.
    pub(crate) fn try_endpoint(&self, now: Instant) -> bool {
        let mut open_until = self.open_until.lock().unwrap_or_else(|e| e.into_inner());
        match *open_until {
            None => true,
            Some(until) if now >= until => {
                *open_until = Some(now + self.cool_down);
                true
            }
            Some(_) => false,
        }
    }

    /// An export's outcome: a failure opens the breaker for the cool-down, a success closes it.
    pub(crate) fn record(&self, succeeded: bool, now: Instant) {
        let mut open_until = self.open_until.lock().unwrap_or_else(|e| e.into_inner());
        *open_until = if succeeded { None } else { Some(now + self.cool_down) };
    }

    #[cfg(test)]
    fn is_open(&self, now: Instant) -> bool {
        self.open_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|until| now < until)
    }
}

fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

fn attributes<'a>(kvs: impl Iterator<Item = &'a KeyValue>) -> String {
    kvs.map(|kv| format!(" {}={}", kv.key, kv.value)).collect()
}

pub(crate) fn span_line(span: &SpanData) -> String {
    let duration = span.end_time.duration_since(span.start_time).unwrap_or_default();
    format!(
        "otel-fallback span name={:?} trace_id={} span_id={} parent_span_id={} start_unix_nano={} duration_ms={:.3} status={:?}{}",
        span.name,
        span.span_context.trace_id(),
        span.span_context.span_id(),
        span.parent_span_id,
        unix_nanos(span.start_time),
        duration.as_secs_f64() * 1000.0,
        span.status,
        attributes(span.attributes.iter()),
    )
}

pub(crate) fn log_line(record: &SdkLogRecord) -> String {
    let ids =
        record.trace_context().map(|c| format!(" trace_id={} span_id={}", c.trace_id, c.span_id)).unwrap_or_default();
    let attrs: String = record.attributes_iter().map(|(k, v)| format!(" {k}={v:?}")).collect();
    format!(
        "otel-fallback log time_unix_nano={} severity={}{} body={:?}{}",
        record.timestamp().or(record.observed_timestamp()).map_or(0, unix_nanos),
        record.severity_text().unwrap_or(""),
        ids,
        record.body().map(|b| format!("{b:?}")).unwrap_or_default(),
        attrs,
    )
}

fn points<T: std::fmt::Debug + Copy>(name: &str, data: &MetricData<T>, lines: &mut Vec<String>) {
    match data {
        MetricData::Sum(sum) => lines.extend(sum.data_points().map(|p| {
            format!(
                "otel-fallback metric name={name} kind=sum temporality={:?} value={:?}{}",
                sum.temporality(),
                p.value(),
                attributes(p.attributes())
            )
        })),
        MetricData::Gauge(gauge) => lines.extend(gauge.data_points().map(|p| {
            format!("otel-fallback metric name={name} kind=gauge value={:?}{}", p.value(), attributes(p.attributes()))
        })),
        MetricData::Histogram(histogram) => lines.extend(histogram.data_points().map(|p| {
            let bounds: Vec<f64> = p.bounds().collect();
            let counts: Vec<u64> = p.bucket_counts().collect();
            format!(
                "otel-fallback metric name={name} kind=histogram temporality={:?} count={} sum={:?} bounds={bounds:?} bucket_counts={counts:?}{}",
                histogram.temporality(),
                p.count(),
                p.sum(),
                attributes(p.attributes())
            )
        })),
        MetricData::ExponentialHistogram(histogram) => lines.extend(histogram.data_points().map(|p| {
            format!(
                "otel-fallback metric name={name} kind=exponential_histogram count={} sum={:?}{}",
                p.count(),
                p.sum(),
                attributes(p.attributes())
            )
        })),
    }
}

/// One line per metric point.
pub(crate) fn metric_lines(metrics: &ResourceMetrics) -> Vec<String> {
    let mut lines = Vec::new();
    for scope in metrics.scope_metrics() {
        for metric in scope.metrics() {
            match metric.data() {
                AggregatedMetrics::F64(data) => points(metric.name(), data, &mut lines),
                AggregatedMetrics::U64(data) => points(metric.name(), data, &mut lines),
                AggregatedMetrics::I64(data) => points(metric.name(), data, &mut lines),
            }
        }
    }
    lines
}

/// Writes the lines to stderr in one write (lines of concurrent exports never interleave mid-line).
pub(crate) fn print(lines: &[String]) {
    if lines.is_empty() {
        return;
    }
    let mut text = lines.join("\n");
    text.push('\n');
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_opens_the_breaker_until_the_cool_down_then_one_export_tries_again() {
        let breaker = Breaker::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert!(breaker.try_endpoint(t0), "closed at first");
        breaker.record(false, t0);
        assert!(breaker.is_open(t0));
        assert!(!breaker.try_endpoint(t0 + Duration::from_secs(29)), "open during the cool-down");
        // Half-open: one export goes, the next waits for its outcome.
        assert!(breaker.try_endpoint(t0 + Duration::from_secs(30)));
        assert!(!breaker.try_endpoint(t0 + Duration::from_secs(31)));
        breaker.record(true, t0 + Duration::from_secs(31));
        assert!(!breaker.is_open(t0 + Duration::from_secs(31)));
        assert!(breaker.try_endpoint(t0 + Duration::from_secs(31)), "a success closes it");
    }

    #[test]
    fn a_failed_half_open_try_opens_it_for_another_cool_down() {
        let breaker = Breaker::new(Duration::from_secs(30));
        let t0 = Instant::now();
        breaker.record(false, t0);
        assert!(breaker.try_endpoint(t0 + Duration::from_secs(30)));
        breaker.record(false, t0 + Duration::from_secs(35));
        assert!(!breaker.try_endpoint(t0 + Duration::from_secs(64)));
        assert!(breaker.try_endpoint(t0 + Duration::from_secs(65)));
    }
}
