//! The admin port: `/healthz` (the process serves), `/readyz` (every readiness gate is open) and `/metrics`
//! (the operator's own metrics, OpenMetrics text from one `prometheus_client` registry).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

use super::readiness::Readiness;

/// Errors of the admin server.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("admin server: {0}")]
    Serve(std::io::Error),
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    registry: Arc<Registry>,
}

async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    let closed = s.readiness.closed();
    if closed.is_empty() {
        (StatusCode::OK, "ok\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", closed.join(", ")))
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, [(header::CONTENT_TYPE, "text/plain")], e.to_string()),
    }
}

/// The admin server, bound: binding fails here, before the operator starts, so a taken port ends the process.
pub struct AdminServer {
    listener: tokio::net::TcpListener,
    app: Router,
}

impl AdminServer {
    pub async fn bind(addr: SocketAddr, readiness: Readiness, registry: Registry) -> Result<Self, AdminError> {
        let state = AdminState { readiness, registry: Arc::new(registry) };
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            // The Kubernetes name of the same check, for the chart's liveness probe.
            .route("/livez", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Self { listener, app })
    }

    pub async fn serve(self) -> Result<(), AdminError> {
        axum::serve(self.listener, self.app).await.map_err(AdminError::Serve)
    }
}
