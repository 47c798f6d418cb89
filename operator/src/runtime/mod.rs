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

/// An environment variable with a plain value.
pub fn env_var(name: &str, value: impl Into<String>) -> k8s_openapi::api::core::v1::EnvVar {
    k8s_openapi::api::core::v1::EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

/// An environment variable from the pod's own fields (the downward API), e.g. `metadata.name`.
pub fn env_from_field(name: &str, path: &str) -> k8s_openapi::api::core::v1::EnvVar {
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector};
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), api_version: None }),
            ..Default::default()
        }),
    }
}
