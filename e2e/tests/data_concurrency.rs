//! Every point counted under concurrency and replicas: many processes of one workflow at once, each with its own
//! run's environment, export to two replicas of the real collector running flowtel's generated configuration for a
//! default stack (the cardinality guard on), and the real Prometheus, with the configuration flowtel generates for
//! it, must hold exactly what the processes recorded, with series bounded by label values rather than by runs.

use flowtel_e2e::backends::{self, prometheus_query};
use flowtel_e2e::eventually;
use flowtel_e2e::sync_runs::{WAIT, exact, expected, run_processes, series};

#[tokio::test]
async fn fifty_processes_at_once_through_two_collector_replicas_are_counted_exactly_and_series_stay_bounded() {
    let backends = backends::start("data-concurrency", 2).await;
    let prom = backends.prometheus.as_str();
    eventually("Prometheus answering", WAIT, async || {
        flowtel_e2e::http_get(&format!("{prom}/-/ready")).await.filter(|(code, _)| *code == 200)
    })
    .await;

    let first = run_processes(&backends, 0, 50);
    let want = expected(&first);
    assert!(want["workflow_retry_count"] > 0.0, "the knobs make retries: {want:?}");
    exact(prom, &want, None).await;
    let series_after_50 = series(prom).await;

    // 450 more: the totals grow exactly, the series do not (label values, not runs or processes).
    let mut all = first;
    let cpu_before = backends.collector_cpu_seconds();
    // Waves of 50 by default; FLOWTEL_WAVE_SIZE=450 runs them all at once (the figure in BENCHMARKS.md).
    let wave: u64 = std::env::var("FLOWTEL_WAVE_SIZE").ok().and_then(|w| w.parse().ok()).unwrap_or(50).max(1);
    let mut from = 50;
    while from < 500 {
        let to = (from + wave).min(500);
        for (metric, n) in run_processes(&backends, from, to).0 {
            all.add(metric, n);
        }
        from = to;
    }
    exact(prom, &expected(&all), None).await;
    let cpu = backends.collector_cpu_seconds() - cpu_before;
    println!(
        "collector CPU (both replicas, 450 runs and a 30 s quiet period): {cpu:.2} s, {:.2} s per 1,000 runs",
        cpu / 0.45
    );
    let series_after_500 = series(prom).await;
    println!("series: {series_after_50} after 50 runs, {series_after_500} after 500");
    assert!(series_after_50 > 0.0);
    assert!(
        series_after_500 <= 1.1 * series_after_50,
        "series grew with runs: {series_after_50} after 50, {series_after_500} after 500"
    );
    // The guard is on by default: no series carries phone_id.
    let with_phone = prometheus_query(prom, "count({__name__=~\"workflow_image_.+\", phone_id!=\"\"})").await;
    assert!(with_phone.is_empty(), "phone_id reached Prometheus: {with_phone:?}");
}
