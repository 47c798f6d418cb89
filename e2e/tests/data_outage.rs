//! Black swans, measured: the trace and metric backends down for longer than the collector's default retry limit
//! (five minutes) while 1,000 runs export, the stack's persistent queue on; once they are back, nothing is lost:
//! Prometheus holds exactly what the processes recorded, and every run's whole trace is in the trace backend.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flowtel_e2e::backends::{self, Options};
use flowtel_e2e::eventually;
use flowtel_e2e::sync_runs::{Recorded, exact, expected, run_processes};

const RUNS: u64 = 1_000;
const WAVE: u64 = 50;

/// The outage: five and a half minutes by default (past the exporters' default `max_elapsed_time` of five);
/// `FLOWTEL_OUTAGE_SECONDS` shortens it for a quick local try.
fn outage() -> Duration {
    let seconds = std::env::var("FLOWTEL_OUTAGE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(330);
    Duration::from_secs(seconds)
}

/// Traces of `sync` in Jaeger: span count by trace id.
async fn traces(jaeger: &str) -> BTreeMap<String, usize> {
    backends::jaeger_traces(jaeger, "sync").await
}

#[tokio::test]
async fn backends_down_past_the_retry_limit_during_1000_runs_lose_nothing_with_the_persistent_queue() {
    let mut backends =
        backends::start_with("data-outage", Options { collectors: 1, persistent_queue: true, ..Options::default() })
            .await;
    let prom = backends.prometheus.clone();
    let jaeger = backends.jaeger_query.clone();

    backends.stop("prometheus");
    backends.stop("jaeger");
    let down = Instant::now();
    let mut all = Recorded::default();
    for wave in 0..RUNS / WAVE {
        for (metric, n) in run_processes(&backends, wave * WAVE, (wave + 1) * WAVE).0 {
            all.add(metric, n);
        }
    }
    println!("{RUNS} runs exported into the outage in {:.0} s", down.elapsed().as_secs_f64());
    tokio::time::sleep_until((down + outage()).into()).await;
    backends.restart("jaeger").await;
    backends.restart("prometheus").await;
    let back = Instant::now();
    println!("backends back after {:.0} s down", down.elapsed().as_secs_f64());

    exact(&prom, &expected(&all), Some("1h")).await;
    println!("metrics exact {:.0} s after the backends came back", back.elapsed().as_secs_f64());
    let want_spans = all.0["spans"] as usize;
    let stored = eventually("every run's whole trace in Jaeger", Duration::from_secs(180), async || {
        let t = traces(&jaeger).await;
        (t.len() as u64 >= RUNS && t.values().sum::<usize>() >= want_spans).then_some(t)
    })
    .await;
    println!("traces exact {:.0} s after the backends came back", back.elapsed().as_secs_f64());
    assert_eq!(stored.len() as u64, RUNS, "one trace per run");
    assert_eq!(stored.values().sum::<usize>(), want_spans, "every span of every run, once");
}
