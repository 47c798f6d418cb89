//! What the controllers share and none of them owns: readiness, the admin port, operator metrics, trace ids.
//! Nothing here knows a controller.

pub mod admin;
pub mod expiring;
pub mod ids;
pub mod names;
pub mod readiness;
