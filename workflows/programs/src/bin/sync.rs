//! `sync`: database synchronisation. Fetches phones from the source, transforms them, upserts them into
//! `processed_phones` and uploads their images.

use std::process::ExitCode;

use flowtel_telemetry::{record_db_upsert, record_image_upload};
use flowtel_workflows::{run, step};

const WORKFLOW: &str = "sync";

#[tokio::main]
async fn main() -> ExitCode {
    run(WORKFLOW, |k| async move {
        step(WORKFLOW, "fetch_source", async {
            k.external(WORKFLOW, "fetch_source", "GET source/phones").await?;
            k.injected("fetch_source", "upload_images")
        })
        .await?;
        step(WORKFLOW, "transform", async {
            transform_phones(k.items, k.step_ms).await;
            k.injected("transform", "upload_images")
        })
        .await?;
        step(WORKFLOW, "upsert_phones", async {
            let started = std::time::Instant::now();
            k.external(WORKFLOW, "upsert_phones", "UPSERT processed_phones").await?;
            record_db_upsert(WORKFLOW, "processed_phones", k.items as u64, started.elapsed().as_secs_f64() * 1000.0);
            k.injected("upsert_phones", "upload_images")
        })
        .await?;
        step(WORKFLOW, "upload_images", async {
            for i in 0..k.items {
                let phone = format!("phone_{i}");
                k.external(WORKFLOW, "upload_images", "PUT images").await?;
                record_image_upload(WORKFLOW, &phone, 100_000 + k.next() % 4_000_000);
            }
            k.injected("upload_images", "upload_images")
        })
        .await
    })
    .await
}

/// Plain `tracing` instrumentation: exported as a span of the run's trace, under the step.
#[tracing::instrument]
async fn transform_phones(phones: usize, step_ms: u64) {
    tokio::time::sleep(std::time::Duration::from_millis(step_ms)).await;
    tracing::info!(phones, "transformed");
}
