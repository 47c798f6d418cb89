//! The flowtel operator.

pub mod crdgen;
