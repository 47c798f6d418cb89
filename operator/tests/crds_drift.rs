//! The checked-in CRD manifests are exactly what the built binary prints: regenerate them with
//! `cargo run -p flowtel-operator -- crds --out-dir crds` after changing the API types.

use std::path::Path;
use std::process::Command;

#[test]
fn checked_in_crds_match_flowtel_crds_output() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowtel")).arg("crds").output().expect("run flowtel crds");
    assert!(out.status.success(), "flowtel crds failed: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).expect("utf-8");

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut checked_in = String::new();
    for file in ["flowtel.dev_workflowruns.yaml", "flowtel.dev_telemetrystacks.yaml", "flowtel.dev_workerpools.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("reading crds/{file}: {e}"));
        checked_in.push_str("---\n");
        checked_in.push_str(&text);
    }
    if printed != checked_in {
        let first_diff = printed.lines().zip(checked_in.lines()).position(|(a, b)| a != b);
        panic!(
            "crds/ drifted from `flowtel crds` (first differing line: {first_diff:?}); regenerate with \
             `cargo run -p flowtel-operator -- crds --out-dir crds`"
        );
    }
}

#[test]
fn the_field_reference_matches_the_schemas() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowtel")).args(["crds", "--reference"]).output().expect("run");
    assert!(out.status.success(), "flowtel crds --reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference.md");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if printed != checked_in {
        let first_diff = printed.lines().zip(checked_in.lines()).position(|(a, b)| a != b);
        panic!(
            "docs/reference.md drifted from the CRDs (first differing line: {first_diff:?}); regenerate with \
             `cargo run -p flowtel-operator -- crds --reference > docs/reference.md`"
        );
    }
}
