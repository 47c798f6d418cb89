//! The TelemetryStack controller.

pub mod build;
