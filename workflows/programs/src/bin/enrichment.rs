//! `enrichment`: AI enrichment. Loads the phones to enrich, asks the model about each (with retries of transient
//! failures) and stores the results in `enriched_phones`.

use std::process::ExitCode;

use flowtel_telemetry::record_db_upsert;
use flowtel_workflows::{run, step};

const WORKFLOW: &str = "enrichment";

#[tokio::main]
async fn main() -> ExitCode {
    run(WORKFLOW, |k| async move {
        step(WORKFLOW, "load_pending", async {
            k.external(WORKFLOW, "load_pending", "SELECT pending phones").await?;
            k.injected("load_pending", "store_results")
        })
        .await?;
        step(WORKFLOW, "enrich", async {
            for i in 0..k.items {
                k.external(WORKFLOW, "enrich", &format!("POST model/enrich phone_{i}")).await?;
            }
            tracing::info!(phones = k.items, "enriched");
            k.injected("enrich", "store_results")
        })
        .await?;
        step(WORKFLOW, "store_results", async {
            let started = std::time::Instant::now();
            k.external(WORKFLOW, "store_results", "UPSERT enriched_phones").await?;
            record_db_upsert(WORKFLOW, "enriched_phones", k.items as u64, started.elapsed().as_secs_f64() * 1000.0);
            k.injected("store_results", "store_results")
        })
        .await
    })
    .await
}
