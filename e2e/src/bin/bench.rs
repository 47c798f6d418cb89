//! Figures that are measured, not asserted: the operator's apiserver writes for one successful single-attempt run
//! (from the audit log) and the wall time of a burst of runs. Needs the cluster (`e2e/cluster up`) and the built
//! operator (`cargo build --workspace`):
//!
//!     cargo run -p flowtel-e2e --bin bench -- [RUNS]      (default 200)

use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_e2e::{
    Collector, Operator, TEST_MANAGER, TestNamespace, burst, client, install_crds, operator_writes, simple_run,
};
use kube::api::{Api, Patch, PatchParams};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let client = client().await?;
    install_crds(&client).await?;
    let collector = Collector::start("bench").await?;

    // One run, start to deletion by its TTL: every write the operator makes for it.
    let ns = TestNamespace::new(&client, "bench-writes").await?;
    let operator = Operator::start(&ns.name, &collector.endpoint, &[]).await?;
    let api: Api<WorkflowRun> = Api::namespaced(client.clone(), &ns.name);
    let mut run = simple_run("single", "bench", "1s");
    run["spec"]["ttlSecondsAfterFinished"] = 1.into();
    let created = api.patch("single", &PatchParams::apply(TEST_MANAGER), &Patch::Apply(&run)).await?;
    let uid = created.metadata.uid.clone().unwrap_or_default();
    let gone = kube::runtime::wait::await_condition(api, "single", kube::runtime::conditions::is_deleted(&uid));
    tokio::time::timeout(Duration::from_secs(120), gone).await??;
    tokio::time::sleep(Duration::from_secs(2)).await; // the audit log is written asynchronously
    let writes = operator_writes(&ns.name);
    let total: u64 = writes.iter().map(|(_, n)| n).sum();
    println!("operator writes for one successful single-attempt run, creation to TTL deletion: {total}");
    for (what, n) in &writes {
        println!("  {n:>3}  {what}");
    }
    println!("  (Events are not counted; reconciles: {:?})", operator.counter("flowtel_reconciles_total").await);
    drop(operator);

    let ns = TestNamespace::new(&client, "bench-burst").await?;
    let operator = Operator::start(&ns.name, &collector.endpoint, &[]).await?;
    let wall = burst(&client, &ns.name, "bench-burst", runs, Duration::from_secs(1200)).await?;
    println!(
        "burst of {runs} runs (pods run 1s): all terminal with telemetry exported in {:.1} s ({:.1} runs/s)",
        wall.as_secs_f64(),
        runs as f64 / wall.as_secs_f64()
    );
    println!(
        "  status writes: {:?}, reconciles: {:?}, export failures: {:?}",
        operator.counter("flowtel_status_writes_total").await,
        operator.counter("flowtel_reconciles_total").await,
        operator.counter("flowtel_telemetry_export_failures_total").await
    );
    Ok(())
}
