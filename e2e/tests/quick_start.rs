//! The README's "Try it in 5 minutes", command by command as written, on the local control plane: a new user's
//! first run must reach Succeeded. KWOK plays the pods, so the operator the chart deploys never runs its image here:
//! an operator process, as the chart configures it, watches the quick start's namespace in its place.

use std::process::{Command, Stdio};
use std::time::Duration;

use flowtel_crds::WorkflowRun;
use flowtel_crds::workflow_run::WorkflowRunPhase;
use flowtel_e2e::{
    Collector, Operator, client, cluster_kubeconfig, ensure_storage, eventually, helm, install_crds, repo_root,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

/// The quick start's namespaces: fixed, as the README writes them.
const NAMESPACES: [&str; 2] = ["flowtel", "workflows"];

/// The shell commands of the README's quick start block, continuation lines joined, comments dropped.
fn quick_start() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme.split("## Try it in 5 minutes").nth(1).expect("the quick start section");
    let block = section.split("```sh\n").nth(1).and_then(|b| b.split("```").next()).expect("its commands");
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let line = line.split("  #").next().unwrap_or_default().trim_end();
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    commands.push(current.split_whitespace().collect::<Vec<_>>().join(" "));
                }
                current.clear();
            }
        }
    }
    commands
}

/// A PATH where `kubectl` and `helm` are the local control plane's.
fn tools_path() -> String {
    let dir = std::env::temp_dir().join(format!("flowtel-quick-start-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubectl = cluster_kubeconfig().parent().expect("state").join("bin/kubectl");
    let helm_bin = helm().get_program().to_owned();
    for (name, target) in [("kubectl", kubectl.into_os_string()), ("helm", helm_bin)] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link).expect("symlink");
    }
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default())
}

fn shell(command: &str, path: &str) -> Command {
    let mut cmd = helm();
    cmd.env("PATH", path);
    let mut sh = Command::new("bash");
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            sh.env(k, v);
        }
    }
    sh.arg("-c").arg(command).current_dir(repo_root());
    sh
}

/// Removes what a quick start left (this test's, or one that failed before).
async fn clean(client: &kube::Client, path: &str) {
    let _ = shell("helm uninstall flowtel --namespace flowtel --wait", path).output();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in NAMESPACES {
        // Runs keep their telemetry finalizer once no operator is left to export them: let them go.
        let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), ns);
        for run in runs.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default() {
            let release = serde_json::json!({"metadata": {"finalizers": null}});
            let _ = runs.patch(&run.name_any(), &PatchParams::default(), &Patch::Merge(&release)).await;
        }
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
    eventually("the quick start's namespaces gone", Duration::from_secs(120), async || {
        let left = namespaces.list(&ListParams::default()).await.ok()?.items;
        left.iter().all(|n| !NAMESPACES.contains(&n.metadata.name.as_deref().unwrap_or_default())).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_readmes_quick_start_runs_a_workflow_to_succeeded() {
    let commands = quick_start();
    assert_eq!(commands.len(), 5, "the quick start as the README writes it: {commands:#?}");
    let client = client().await.expect("client");
    install_crds(&client).await.expect("CRDs");
    ensure_storage().expect("storage");
    let path = tools_path();
    clean(&client, &path).await;

    // The watch (`kubectl get wfr -w`) runs in the background; the others one after another.
    let (watch, steps): (Vec<&String>, Vec<&String>) = commands.iter().partition(|c| c.ends_with(" -w"));
    let mut watch = shell(watch.first().expect("the watch"), &path).stdout(Stdio::piped()).spawn().expect("watch");
    let mut operator = None;
    for step in steps {
        let out = shell(step, &path).output().expect("a step");
        assert!(out.status.success(), "{step}: {}", String::from_utf8_lossy(&out.stderr));
        if step.starts_with("kubectl create namespace") {
            // In place of the chart's pod (KWOK's never runs the image): the operator, watching the runs' namespace.
            let collector = Collector::start("quick-start").await.expect("collector");
            operator =
                Some((Operator::start("workflows", &collector.endpoint, &[]).await.expect("operator"), collector));
        }
    }
    assert!(operator.is_some(), "the quick start creates the runs' namespace");

    // What the user watches: the run's line reaching Succeeded.
    let stdout = watch.stdout.take().expect("piped");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut watched = Vec::new();
    while !watched.iter().any(|l: &String| l.starts_with("sync-") && l.contains("Succeeded")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match seen.recv_timeout(left) {
            Ok(line) => watched.push(line),
            Err(_) => panic!("`kubectl get wfr -n workflows -w` never showed the run Succeeded: {watched:#?}"),
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let runs: Api<WorkflowRun> = Api::namespaced(client.clone(), "workflows");
    let run = runs.list(&ListParams::default()).await.expect("runs").items.into_iter().next().expect("the run");
    assert_eq!(run.status.and_then(|s| s.phase), Some(WorkflowRunPhase::Succeeded));
    drop(operator);
    clean(&client, &path).await;
}
