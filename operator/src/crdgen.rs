//! The CRD manifests, generated from the API types in `flowtel-crds`.

use flowtel_crds::{TelemetryStack, WorkerPool, WorkflowRun};
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
        ("flowtel.dev_workerpools.yaml", WorkerPool::crd()),
    ]
}

/// One CRD as the YAML document that is checked in.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, CrdGenError> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    serde_yaml_ng::to_string(crd).map_err(|source| CrdGenError::Yaml { name, source })
}

/// Every CRD as one multi-document YAML stream, as `flowtel crds` prints it.
pub fn all_yaml() -> Result<String, CrdGenError> {
    let docs = all().iter().map(|(_, crd)| to_yaml(crd)).collect::<Result<Vec<_>, _>>()?;
    Ok(docs.into_iter().map(|d| format!("---\n{d}")).collect())
}

/// Fields not expanded in the reference: Kubernetes' own types, documented upstream.
const UPSTREAM: [(&str, &str); 1] = [(
    "spec.template",
    "a core/v1 PodTemplateSpec (https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/pod-template-v1/)",
)];

/// `docs/reference.md`: every field of every CRD with its type, constraints and description, from the schemas.
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# CRD reference\n\nGenerated from the CRDs' schemas by `flowtel crds --reference` (a test fails when this page \
         drifts from them). Types and constraints are what the apiserver enforces at admission.\n",
    );
    for (_, crd) in all() {
        let kind = &crd.spec.names.kind;
        for version in &crd.spec.versions {
            let Some(schema) = version.schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()) else { continue };
            out.push_str(&format!("\n## {kind} ({}/{})\n", crd.spec.group, version.name));
            let Ok(schema) = serde_json::to_value(schema) else { continue };
            if let Some(d) = schema["description"].as_str() {
                out.push_str(&format!("\n{}\n", d.trim()));
            }
            for part in ["spec", "status"] {
                let Some(node) = schema["properties"].get(part) else { continue };
                out.push_str(&format!(
                    "\n### {part}\n\n| Field | Type | Constraints | Description |\n|---|---|---|---|\n"
                ));
                fields(node, part, &mut out);
            }
        }
    }
    out
}

fn fields(node: &serde_json::Value, path: &str, out: &mut String) {
    let Some(properties) = node["properties"].as_object() else { return };
    let required: Vec<&str> = node["required"].as_array().into_iter().flatten().filter_map(|r| r.as_str()).collect();
    for (name, field) in properties {
        let path = format!("{path}.{name}");
        let upstream = UPSTREAM.iter().find(|(p, _)| *p == path).map(|(_, what)| *what);
        let mut kind = field["type"].as_str().unwrap_or("object").to_string();
        if kind == "array" {
            kind = format!("[]{}", field["items"]["type"].as_str().unwrap_or("object"));
        }
        let mut constraints = Vec::new();
        if required.contains(&name.as_str()) {
            constraints.push("required".to_string());
        }
        for (key, label) in [
            ("default", "default"),
            ("minimum", "min"),
            ("maximum", "max"),
            ("minLength", "min length"),
            ("maxLength", "max length"),
            ("minItems", "min items"),
            ("maxItems", "max items"),
            ("pattern", "pattern"),
            ("enum", "one of"),
            ("format", "format"),
        ] {
            if let Some(v) = field.get(key) {
                let v = match v {
                    serde_json::Value::Array(a) if key == "enum" => {
                        a.iter().map(|x| x.as_str().map_or(x.to_string(), String::from)).collect::<Vec<_>>().join(", ")
                    }
                    serde_json::Value::String(s) => s.clone(),
                    // Bounds are f64 in the schema: 1, not 1.0.
                    serde_json::Value::Number(n) => match n.as_f64() {
                        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
                        _ => n.to_string(),
                    },
                    other => other.to_string(),
                };
                constraints.push(format!("{label} `{}`", v.replace('|', "\\|")));
            }
        }
        let description = upstream
            .map(String::from)
            .or_else(|| field["description"].as_str().map(String::from))
            .unwrap_or_default()
            .replace('\n', " ")
            .replace('|', "\\|");
        out.push_str(&format!("| `{path}` | {kind} | {} | {description} |\n", constraints.join("; ")));
        if upstream.is_some() {
            continue;
        }
        if field["type"] == "array" {
            fields(&field["items"], &format!("{path}[]"), out);
        } else {
            fields(field, &path, out);
        }
    }
}
