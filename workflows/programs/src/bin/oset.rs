//! `oset`: truth correction. Loads the truth set, compares it with the catalogue, writes the corrections to
//! `phone_corrections` and re-uploads the images of corrected phones.

use std::process::ExitCode;

use flowtel_telemetry::{record_db_upsert, record_image_upload};
use flowtel_workflows::{run, step};

const WORKFLOW: &str = "oset";

#[tokio::main]
async fn main() -> ExitCode {
    run(WORKFLOW, |k| async move {
        step(WORKFLOW, "load_truth", async {
            k.external(WORKFLOW, "load_truth", "GET truth-set").await?;
            k.injected("load_truth", "reupload_images")
        })
        .await?;
        let corrections = step(WORKFLOW, "compare", async {
            tokio::time::sleep(std::time::Duration::from_millis(k.step_ms)).await;
            let corrections = (k.items / 2).max(1);
            tracing::info!(corrections, "compared with the catalogue");
            k.injected("compare", "reupload_images")?;
            Ok(corrections)
        })
        .await?;
        step(WORKFLOW, "apply_corrections", async {
            let started = std::time::Instant::now();
            k.external(WORKFLOW, "apply_corrections", "UPSERT phone_corrections").await?;
            record_db_upsert(
                WORKFLOW,
                "phone_corrections",
                corrections as u64,
                started.elapsed().as_secs_f64() * 1000.0,
            );
            k.injected("apply_corrections", "reupload_images")
        })
        .await?;
        step(WORKFLOW, "reupload_images", async {
            for i in 0..corrections {
                k.external(WORKFLOW, "reupload_images", "PUT images").await?;
                record_image_upload(WORKFLOW, &format!("phone_{i}"), 50_000 + k.next() % 2_000_000);
            }
            k.injected("reupload_images", "reupload_images")
        })
        .await
    })
    .await
}
