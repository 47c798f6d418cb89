//! flowtel's images, built here with a real engine (podman) by `e2e/images` from the repository's Dockerfile and
//! the binaries built on this machine, and run as containers: non-root, read-only root filesystem, no capabilities.

use std::process::{Command, Output};

use flowtel_e2e::repo_root;

fn images_script() -> Command {
    Command::new(repo_root().join("e2e/images"))
}

fn podman(args: &[&str]) -> Output {
    images_script().arg("podman").args(args).output().expect("podman runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The image names `e2e/images` builds, in its order: flowtel, collector, Prometheus, Jaeger, VictoriaLogs.
fn names() -> Vec<String> {
    let out = images_script().arg("names").output().expect("e2e/images names");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// One build at a time: builds share the base images and prune the layers they leave.
static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn build(what: &str) {
    let _one = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let out = images_script().args(["build", what]).output().expect("e2e/images build");
    assert!(out.status.success(), "e2e/images build {what}: {}", text(&out));
}

fn inspect(image: &str, format: &str) -> String {
    let out = podman(&["image", "inspect", "--format", format, image]);
    assert!(out.status.success(), "podman image inspect {image}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn locked_down_run(image: &str, extra: &[&str], args: &[&str]) -> Output {
    let mut all =
        vec!["run", "--rm", "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--network=none"];
    all.extend_from_slice(extra);
    all.push(image);
    all.extend_from_slice(args);
    podman(&all)
}

#[test]
fn the_flowtel_image_runs_non_root_on_a_read_only_root_and_answers_version() {
    build("flowtel");
    let image = &names()[0];
    let version = env!("CARGO_PKG_VERSION");
    assert!(image.ends_with(&format!(":{version}")), "{image} is tagged with the crate's version");
    assert_eq!(inspect(image, "{{.Config.User}}"), "65532:65532", "the image's user is distroless' nonroot");

    let out = locked_down_run(image, &[], &["--version"]);
    assert!(out.status.success(), "flowtel --version in the container: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("flowtel {version}"));

    // A workflow from the same image runs to success on the read-only root (no endpoint: the console fallback).
    let out = locked_down_run(image, &["--entrypoint=/usr/local/bin/sync", "--env=WORKFLOW_STEP_MS=1"], &[]);
    assert!(out.status.success(), "sync in the container: {}", text(&out));
    assert!(text(&out).contains("workflow started"), "{}", text(&out));

    // The user a running container's process has, seen from the host (not only what the image declares).
    let name = format!("flowtel-image-test-{}", std::process::id());
    let started = podman(&[
        "run",
        "-d",
        "--name",
        &name,
        "--read-only",
        "--network=none",
        "--entrypoint=/usr/local/bin/sync",
        "--env=WORKFLOW_STEP_MS=60000",
        image,
    ]);
    assert!(started.status.success(), "{}", text(&started));
    let top = podman(&["top", &name, "user", "huser", "comm"]);
    let _ = podman(&["rm", "-f", "-t", "0", &name]);
    assert!(top.status.success(), "podman top: {}", text(&top));
    let top = String::from_utf8_lossy(&top.stdout).into_owned();
    let process = top.lines().find(|l| l.contains("sync")).unwrap_or_else(|| panic!("the workflow process: {top}"));
    let fields: Vec<&str> = process.split_whitespace().collect();
    // In the container, the image's `nonroot` user; on the host, uid 65532 (no user namespace remaps it).
    assert_eq!(fields[..2], ["nonroot", "65532"], "container user and host uid: {top}");

    println!("image {image}: {} bytes", inspect(image, "{{.Size}}"));
}

#[test]
fn the_component_images_run_non_root_on_a_read_only_root() {
    build("components");
    let names = names();
    for (image, args, expect) in [
        (&names[1], &["components"][..], "otlp"),
        (&names[2], &["--version"][..], "prometheus, version"),
        (&names[3], &["version"][..], "gitVersion"),
        (&names[4], &["-help"][..], "storageDataPath"),
    ] {
        assert_eq!(inspect(image, "{{.Config.User}}"), "65532:65532", "{image}");
        let out = locked_down_run(image, &[], args);
        assert!(out.status.success(), "{image} {args:?}: {}", text(&out));
        assert!(text(&out).contains(expect), "{image} {args:?} prints {expect:?}: {}", text(&out));
        println!("image {image}: {} bytes", inspect(image, "{{.Size}}"));
    }
}
