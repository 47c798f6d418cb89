//! The flowtel operator.

pub mod admin;
pub mod crdgen;
pub mod telemetry;
pub mod workflow_run;
