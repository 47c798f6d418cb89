//! flowtel's Argo CD health checks (`manifests/argocd/`) against their fixtures, in Argo CD's own test layout
//! (`health_test.yaml` beside each `health.lua`), run on Lua 5.1 as Argo CD runs them; and the `argocd-cm` patch
//! users apply carries exactly those scripts. The same checks read live objects in `kstatus.rs`.

use flowtel_e2e::{argocd_health, repo_root};

fn yaml(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_fixture_gets_the_health_its_test_file_names() {
    let mut checked = Vec::new();
    for kind in ["WorkflowRun", "TelemetryStack"] {
        let dir = repo_root().join("manifests/argocd/flowtel.dev").join(kind);
        let tests = yaml(&dir.join("health_test.yaml"));
        let cases = tests["tests"].as_array().expect("tests");
        for case in cases {
            let input = case["inputPath"].as_str().expect("inputPath");
            let object = yaml(&dir.join(input));
            let (status, message) = argocd_health(&object).unwrap_or_else(|e| panic!("{kind} {input}: {e}"));
            assert_eq!(status, case["healthStatus"]["status"].as_str().expect("status"), "{kind} {input}");
            assert_eq!(message, case["healthStatus"]["message"].as_str().expect("message"), "{kind} {input}");
            checked.push(format!("{kind} {status}"));
        }
    }
    // Every verdict Argo CD needs is covered for both kinds.
    for needed in ["Progressing", "Healthy", "Degraded"] {
        for kind in ["WorkflowRun", "TelemetryStack"] {
            assert!(checked.contains(&format!("{kind} {needed}")), "a {kind} fixture that is {needed}");
        }
    }
}

#[test]
fn the_argocd_cm_patch_carries_exactly_the_tested_scripts() {
    let root = repo_root().join("manifests/argocd");
    let cm = yaml(&root.join("argocd-cm.yaml"));
    for kind in ["WorkflowRun", "TelemetryStack"] {
        let script = std::fs::read_to_string(root.join(format!("flowtel.dev/{kind}/health.lua"))).expect("script");
        let key = format!("resource.customizations.health.flowtel.dev_{kind}");
        assert_eq!(cm["data"][&key].as_str(), Some(script.as_str()), "{key} in argocd-cm.yaml");
    }
}

#[test]
fn a_broken_object_is_progressing_not_an_error() {
    // Argo CD shows a script error as the resource's health: an object with no status must not raise one.
    let bare = serde_json::json!({"apiVersion": "flowtel.dev/v1alpha1", "kind": "WorkflowRun",
        "metadata": {"name": "x"}, "status": {"conditions": []}});
    let (status, _) = argocd_health(&bare).expect("no error");
    assert_eq!(status, "Progressing");
}
