//! flowtel's API (group `flowtel.dev`, version `v1alpha1`): types only. The CRD manifests are generated from these
//! types (`flowtel crds`) and checked in under `crds/`.

pub mod telemetry_stack;
pub mod worker_pool;
pub mod workflow_run;

pub use telemetry_stack::{TelemetryStack, TelemetryStackSpec, TelemetryStackStatus};
pub use worker_pool::{WorkerPool, WorkerPoolSpec, WorkerPoolStatus};
pub use workflow_run::{WorkflowRun, WorkflowRunSpec, WorkflowRunStatus};

/// The API group of every flowtel resource.
pub const GROUP: &str = "flowtel.dev";
