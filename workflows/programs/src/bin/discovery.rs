//! `discovery`: phone discovery. Searches the providers, deduplicates what they found and records the new phones
//! in `discovered_phones`.

use std::process::ExitCode;

use flowtel_telemetry::record_db_upsert;
use flowtel_workflows::{run, step};

const WORKFLOW: &str = "discovery";
const PROVIDERS: [&str; 3] = ["gsmarena", "phonedb", "vendor-feeds"];

#[tokio::main]
async fn main() -> ExitCode {
    run(WORKFLOW, |k| async move {
        let mut found = 0;
        for provider in PROVIDERS {
            found += step(WORKFLOW, "search_provider", async {
                k.external(WORKFLOW, "search_provider", &format!("GET {provider}/search")).await?;
                k.injected("search_provider", "record_new")?;
                Ok(k.items)
            })
            .await?;
        }
        let unique = step(WORKFLOW, "deduplicate", async {
            tokio::time::sleep(std::time::Duration::from_millis(k.step_ms)).await;
            tracing::info!(found, "deduplicated");
            k.injected("deduplicate", "record_new")?;
            Ok(found.div_ceil(2))
        })
        .await?;
        step(WORKFLOW, "record_new", async {
            let started = std::time::Instant::now();
            k.external(WORKFLOW, "record_new", "UPSERT discovered_phones").await?;
            record_db_upsert(WORKFLOW, "discovered_phones", unique as u64, started.elapsed().as_secs_f64() * 1000.0);
            k.injected("record_new", "record_new")
        })
        .await
    })
    .await
}
