//! What the controllers share and none of them owns: readiness, the admin port, operator metrics, leader election,
//! trace ids, shards.
//! Nothing here knows a controller.

pub mod admin;
pub mod conditions;
pub mod expiring;
pub mod ids;
pub mod leader;
pub mod names;
pub mod rates;
pub mod readiness;
pub mod shards;
pub mod slim;
pub mod triggers;

/// The label on every object flowtel creates (Jobs, a stack's objects): the operator's caches select by it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "flowtel";

/// The field manager of everything flowtel writes (server-side apply and status).
pub const FIELD_MANAGER: &str = "flowtel";
