//! The flowtel operator.

pub mod cli;
pub mod crdgen;
pub mod pool;
pub mod runtime;
pub mod telemetry;
pub mod telemetry_stack;
pub mod workflow_run;
