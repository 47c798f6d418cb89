//! Black swans, measured: the collector killed (SIGKILL) in the middle of a burst of `sync` processes and started
//! again five seconds later, with the stack's persistent queue on. What the processes recorded is accounted for:
//! stored in the backends, printed on the console by the library's fallback (counted in each process's shutdown
//! report, which goes to the pod's log), or lost with what the killed collector held in memory before its queue:
//! spans of at most one batch (1 s), metric totals of at most one `interval` (10 s). Nothing is stored twice, and
//! every run after the restart is whole and counted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowtel_e2e::backends::{self, Options};
use flowtel_e2e::eventually;
use flowtel_e2e::sync_runs::{Recorded, Undelivered, expected, run_processes_on, totals_across_resets, trace_id};

const WAVE: u64 = 50;
/// Waves started after the restart before the burst ends.
const WAVES_AFTER: u64 = 3;
/// How long the collector stays down.
const DOWN: Duration = Duration::from_secs(5);
/// What the collector holds in memory before its persistent queue: one batch (the stack's default `batchSize`).
const BATCH: usize = 1000;

/// Traces of `sync` in Jaeger: span count by trace id.
async fn traces(jaeger: &str) -> BTreeMap<String, usize> {
    backends::jaeger_traces(jaeger, "sync").await
}

/// One wave of the burst: its first process, whether it started after the restart, what it recorded and what its
/// processes reported undelivered.
struct Wave {
    from: u64,
    after_restart: bool,
    recorded: Recorded,
    undelivered: Undelivered,
}

#[tokio::test]
async fn the_collector_killed_mid_burst_loses_only_what_it_held_and_never_stores_twice() {
    let mut backends =
        backends::start_with("data-kill", Options { collectors: 1, persistent_queue: true, ..Options::default() })
            .await;
    let prom = backends.prometheus.clone();
    let jaeger = backends.jaeger_query.clone();

    // The burst: waves of 50 processes, one after another, until WAVES_AFTER waves have started after the restart.
    let restarted = Arc::new(AtomicBool::new(false));
    let waves_after = Arc::new(AtomicU64::new(0));
    let burst = {
        let (ports, restarted, waves_after) = (backends.collector_grpc.clone(), restarted.clone(), waves_after.clone());
        std::thread::spawn(move || {
            let mut waves = Vec::new();
            for wave in 0.. {
                let after_restart = restarted.load(Ordering::SeqCst);
                if after_restart && waves_after.fetch_add(1, Ordering::SeqCst) >= WAVES_AFTER {
                    break;
                }
                let from = wave * WAVE;
                let (recorded, undelivered) = run_processes_on(&ports, from, from + WAVE);
                waves.push(Wave { from, after_restart, recorded, undelivered });
            }
            waves
        })
    };
    eventually("the burst's first traces in Jaeger", Duration::from_secs(60), async || {
        (!traces(&jaeger).await.is_empty()).then_some(())
    })
    .await;
    backends.stop("collector-0");
    // The outage itself, not a synchronisation: processes meanwhile find the endpoint refusing.
    tokio::time::sleep(DOWN).await;
    backends.restart("collector-0").await;
    restarted.store(true, Ordering::SeqCst);
    let waves = tokio::task::spawn_blocking(move || burst.join().expect("the burst")).await.expect("join");

    let mut recorded = Recorded::default();
    let mut undelivered = Undelivered::default();
    for wave in &waves {
        for (metric, n) in &wave.recorded.0 {
            recorded.add(metric, *n);
        }
        undelivered.add(&wave.undelivered);
    }
    let during: Vec<&Wave> = waves.iter().filter(|w| !w.after_restart).collect();
    let after: Vec<&Wave> = waves.iter().filter(|w| w.after_restart).collect();
    assert_eq!(after.len() as u64, WAVES_AFTER, "waves after the restart");
    assert!(undelivered.spans_to_console > 0, "the kill met the burst: some process found the collector down");
    assert_eq!(undelivered.spans_dropped + undelivered.logs_dropped, 0, "the fallback prints, never drops");

    // Traces: settled once Jaeger's count holds through a quiet period.
    let mut stored = traces(&jaeger).await;
    let mut unchanged_since = Instant::now();
    let settle = Instant::now();
    while unchanged_since.elapsed() < Duration::from_secs(20) {
        assert!(settle.elapsed() < Duration::from_secs(240), "Jaeger's traces never settled");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = traces(&jaeger).await;
        if now != stored {
            stored = now;
            unchanged_since = Instant::now();
        }
    }
    let runs = waves.len() as u64 * WAVE;
    for wave in &waves {
        let whole = (wave.from..wave.from + WAVE)
            .filter(|&i| stored.get(&trace_id(i)).copied() == Some(Recorded::of_sync(i + 1).0["spans"] as usize))
            .count();
        let any = (wave.from..wave.from + WAVE).filter(|&i| stored.contains_key(&trace_id(i))).count();
        println!(
            "wave from {} (after the restart: {}): {whole} traces whole, {any} stored, {} spans on the console",
            wave.from, wave.after_restart, wave.undelivered.spans_to_console
        );
    }
    for i in 0..runs {
        let want = Recorded::of_sync(i + 1).0["spans"] as usize;
        let got = stored.get(&trace_id(i)).copied().unwrap_or(0);
        assert!(got <= want, "run {i}: {got} spans stored of {want}: a span stored twice");
    }
    for wave in &after {
        for i in wave.from..wave.from + WAVE {
            let want = Recorded::of_sync(i + 1).0["spans"] as usize;
            assert_eq!(stored.get(&trace_id(i)).copied(), Some(want), "run {i}, after the restart: its whole trace");
        }
    }
    let spans_recorded = recorded.0["spans"] as usize;
    let spans_stored: usize = stored.values().sum();
    let spans_console = undelivered.spans_to_console as usize;
    assert!(spans_stored <= spans_recorded, "stored twice");
    // An export cut by the kill after the collector queued it is both stored and printed (at least once): the
    // console's copy is then not a loss, so the difference is floored at zero.
    let spans_lost = spans_recorded.saturating_sub(spans_stored + spans_console);
    assert!(spans_lost <= BATCH, "{spans_lost} spans lost: more than the one batch the collector held");

    // Metrics: never counted twice; every point of the runs after the restart counted.
    let mut after_restart = Recorded::default();
    for wave in &after {
        for (metric, n) in &wave.recorded.0 {
            after_restart.add(metric, *n);
        }
    }
    let (want, floor) = (expected(&recorded), expected(&after_restart));
    let totals = eventually("the runs after the restart counted in Prometheus", Duration::from_secs(120), async || {
        let t = totals_across_resets(&prom, "1h").await;
        floor.iter().all(|(k, v)| t.get(k).is_some_and(|got| got >= v)).then_some(t)
    })
    .await;
    for (metric, got) in &totals {
        assert!(*got <= want[metric], "{metric}: {got} stored of {} recorded: counted twice", want[metric]);
    }

    println!(
        "collector killed mid-burst ({} runs: {} before the restart, {} after; down {} s):",
        runs,
        during.len() as u64 * WAVE,
        after.len() as u64 * WAVE,
        DOWN.as_secs()
    );
    println!(
        "  spans: {spans_recorded} recorded, {spans_stored} stored, {spans_console} on the console (fallback, in {} \
         processes' reports), {spans_lost} lost in the collector",
        undelivered.processes
    );
    println!("  metric points on the console: {}", undelivered.metric_points_to_console);
    for (metric, got) in &totals {
        println!("  {metric}: {} recorded, {got} stored ({} not stored)", want[metric], want[metric] - got);
    }
}
