//! The admin port: `/healthz` (the process serves), `/readyz` (every watch has synced) and `/metrics`
//! (Prometheus text format: the operator's own counters, export failures among them).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::telemetry::ExportStats;
use crate::workflow_run::ReconcileStats;

/// Errors of the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("admin server: {0}")]
    Serve(std::io::Error),
}

#[derive(Clone)]
pub struct AdminState {
    pub ready: Arc<AtomicBool>,
    pub reconcile: Arc<ReconcileStats>,
    pub export: Arc<ExportStats>,
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "syncing\n")
    }
}

/// The counters in Prometheus' text exposition format.
pub fn render_metrics(s: &AdminState) -> String {
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
    };
    let r = &s.reconcile;
    let e = &s.export;
    counter("flowtel_reconciles_total", "Completed WorkflowRun reconciles.", r.reconciles.load(Ordering::Relaxed));
    counter("flowtel_reconcile_errors_total", "Failed WorkflowRun reconciles.", r.errors.load(Ordering::Relaxed));
    counter("flowtel_status_writes_total", "WorkflowRun status writes.", r.status_writes.load(Ordering::Relaxed));
    counter("flowtel_telemetry_exported_total", "Run reports exported.", e.exported.load(Ordering::Relaxed));
    counter(
        "flowtel_telemetry_export_failures_total",
        "Run report exports that failed.",
        e.failed.load(Ordering::Relaxed),
    );
    counter(
        "flowtel_telemetry_dropped_total",
        "Run reports dropped after the export timeout.",
        e.dropped.load(Ordering::Relaxed),
    );
    counter(
        "flowtel_telemetry_queue_full_total",
        "Run reports refused by a full export queue.",
        e.queue_full.load(Ordering::Relaxed),
    );
    out
}

async fn metrics(State(s): State<AdminState>) -> String {
    render_metrics(&s)
}

pub async fn serve(addr: SocketAddr, state: AdminState) -> Result<(), AdminError> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| AdminError::Bind { addr, source })?;
    axum::serve(listener, app).await.map_err(AdminError::Serve)
}
