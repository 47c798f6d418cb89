//! `docs/` held to the repository: every repository path a page names exists, every flag of a `flowtel` command line
//! is one that `flowtel <command> --help` lists, and every Helm value a page names is a key of the chart's
//! `values.yaml`. A renamed flag, value or file fails here, not in a reader's terminal.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use flowtel_e2e::{flowtel_binary, repo_root};

/// What a page writes as code: inline `spans` and fenced blocks' lines.
fn code_of(page: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in page.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            out.push(line.to_string());
            continue;
        }
        out.extend(line.split('`').skip(1).step_by(2).map(str::to_string));
    }
    out
}

/// Repository paths in `code`: words under one of the repository's top-level directories.
fn paths_in(code: &str) -> Vec<String> {
    const ROOTS: [&str; 7] = ["charts/", "manifests/", "docs/", "crds/", "operator/", "e2e/", "workflows/"];
    code.split(|c: char| c.is_whitespace() || matches!(c, '`' | '(' | ')' | '"' | '\'' | ',' | '='))
        .filter(|w| ROOTS.iter().any(|r| w.starts_with(r)))
        .filter(|w| !w.contains(['<', '*', '…', '{', '$']))
        .map(|w| w.trim_end_matches(['.', ':', ';']).to_string())
        .collect()
}

/// The long flags `flowtel <command> --help` lists.
fn flags_of(command: &str) -> BTreeSet<String> {
    help_flags("flowtel", command)
}

/// The long flags `<binary> <command> --help` lists (a binary built beside `flowtel`).
fn help_flags(binary: &str, command: &str) -> BTreeSet<String> {
    let bin = flowtel_binary().expect("flowtel").with_file_name(binary);
    let out = Command::new(bin).args([command, "--help"]).output().expect("help");
    assert!(out.status.success(), "{binary} {command} --help");
    String::from_utf8_lossy(&out.stdout)
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches(['.', ':']).to_string())
        .collect()
}

/// Whether `key` (dotted) is a key of `values`.
fn has_value(values: &serde_json::Value, key: &str) -> bool {
    key.split('.').try_fold(values, |v, k| v.get(k)).is_some()
}

#[test]
fn every_path_flag_and_value_the_docs_name_exists() {
    let root = repo_root();
    let values: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root.join("charts/flowtel/values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    let commands = ["run", "render", "crds"];
    let flags: Vec<(&str, BTreeSet<String>)> = commands.iter().map(|c| (*c, flags_of(c))).collect();
    let plugin_commands = ["get", "describe", "logs", "rerun", "trace", "watch"];
    let plugin_flags: Vec<(&str, BTreeSet<String>)> =
        plugin_commands.iter().map(|c| (*c, help_flags("kubectl-flowtel", c))).collect();
    let mut pages: Vec<_> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .chain([root.join("README.md"), root.join("charts/flowtel/README.md")])
        .collect();
    pages.sort();
    let (mut problems, mut checked) = (Vec::new(), 0);
    for page in &pages {
        let name = page.strip_prefix(&root).unwrap_or(page).display().to_string();
        for code in code_of(&std::fs::read_to_string(page).expect("page")) {
            for path in paths_in(&code) {
                checked += 1;
                if !Path::new(&root).join(&path).exists() {
                    problems.push(format!("{name}: no such file: {path}"));
                }
            }
            // A `flowtel <command>` or `kubectl flowtel <command>` line's flags (after a pipe too).
            for segment in code.split('|') {
                let words: Vec<&str> = segment.split_whitespace().collect();
                let Some(at) = words.iter().position(|w| *w == "flowtel" || w.ends_with("/flowtel")) else { continue };
                let plugin = at > 0 && words[at - 1] == "kubectl";
                let table = if plugin { &plugin_flags } else { &flags };
                let Some((command, known)) = words.get(at + 1).and_then(|c| table.iter().find(|(n, _)| n == c)) else {
                    if let Some(word) = words.get(at + 1).filter(|w| plugin && !w.starts_with('-')) {
                        problems.push(format!("{name}: `kubectl flowtel` has no command {word}"));
                    }
                    continue;
                };
                for flag in words[at + 2..].iter().filter(|w| w.starts_with("--")) {
                    let flag = flag.split('=').next().unwrap_or(flag);
                    checked += 1;
                    if !known.contains(flag) {
                        problems.push(format!("{name}: `flowtel {command}` has no {flag}"));
                    }
                }
            }
            // A flag named on its own in the page of flowtel's flags (other pages name other tools' flags too).
            let lone = code.trim();
            let flag_page = name.ends_with("operations.md");
            if flag_page && lone.starts_with("--") && lone.len() > 3 && !lone.contains(char::is_whitespace) {
                let flag = lone.split('=').next().unwrap_or(lone);
                checked += 1;
                if !flags.iter().any(|(_, known)| known.contains(flag)) {
                    problems.push(format!("{name}: no flowtel command has {flag}"));
                }
            }
            // Helm values: `--set key=…` and the chart's dotted keys named on their own.
            let words: Vec<&str> = code.split_whitespace().collect();
            for pair in words.windows(2).filter(|w| w[0] == "--set") {
                for assignment in pair[1].split(',') {
                    let key = assignment.split('=').next().unwrap_or_default();
                    checked += 1;
                    if !has_value(&values, key) {
                        problems.push(format!("{name}: values.yaml has no {key}"));
                    }
                }
            }
            let chart_roots = ["operator.", "metrics.", "leaderElection.", "serviceAccount.", "image."];
            let key = code.trim();
            if chart_roots.iter().any(|r| key.starts_with(r)) && !key.contains(char::is_whitespace) {
                checked += 1;
                if !has_value(&values, key) {
                    problems.push(format!("{name}: values.yaml has no {key}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The check looked at something: the pages name dozens of paths, flags and values.
    assert!(checked > 50, "only {checked} names checked in {pages:?}");
}

#[test]
fn the_docs_check_finds_what_does_not_exist() {
    assert_eq!(paths_in("kubectl apply -f manifests/nowhere.yaml."), ["manifests/nowhere.yaml"]);
    assert!(!Path::new(&repo_root()).join("manifests/nowhere.yaml").exists());
    assert!(flags_of("run").contains("--write-economy"));
    assert!(!flags_of("run").contains("--no-such-flag"));
    let values = serde_json::json!({"operator": {"exportTimeoutSeconds": 5}});
    assert!(has_value(&values, "operator.exportTimeoutSeconds") && !has_value(&values, "operator.exportTimeout"));
    assert_eq!(code_of("a `x` b\n```sh\nflowtel run --y\n```\n"), ["x", "flowtel run --y"]);
}
