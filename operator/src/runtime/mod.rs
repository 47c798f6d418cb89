//! What the controllers share and none of them owns: readiness, the admin port, operator metrics, trace ids.
//! Nothing here knows a controller.

pub mod admin;
pub mod conditions;
pub mod expiring;
pub mod ids;
pub mod names;
pub mod rates;
pub mod readiness;

/// The field manager of everything flowtel writes (server-side apply and status).
pub const FIELD_MANAGER: &str = "flowtel";
