//! The CRD manifests, generated from the API types in `flowtel-crds`.

use flowtel_crds::{TelemetryStack, WorkflowRun};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Errors while rendering the CRDs.
#[derive(Debug, thiserror::Error)]
pub enum CrdGenError {
    #[error("cannot render CRD {name} as YAML: {source}")]
    Yaml { name: String, source: serde_yaml_ng::Error },
}

/// Every CRD flowtel installs, with the file name it is checked in under in `crds/`.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("flowtel.dev_workflowruns.yaml", WorkflowRun::crd()),
        ("flowtel.dev_telemetrystacks.yaml", TelemetryStack::crd()),
    ]
}

/// One CRD as the YAML document that is checked in.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, CrdGenError> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    serde_yaml_ng::to_string(crd).map_err(|source| CrdGenError::Yaml { name, source })
}

/// Both CRDs as one multi-document YAML stream, as `flowtel crds` prints it.
pub fn all_yaml() -> Result<String, CrdGenError> {
    let docs = all().iter().map(|(_, crd)| to_yaml(crd)).collect::<Result<Vec<_>, _>>()?;
    Ok(docs.into_iter().map(|d| format!("---\n{d}")).collect())
}
