//! The apiserver's audit log (`e2e/cluster` writes it, JSON, rotated at 200 MB), read for the requests about one
//! namespace's objects: the one reader the tests, the bench and the chaos run share.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::cluster::cluster_kubeconfig;

/// One completed request about an object, from the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub verb: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub name: String,
    /// The HTTP status code of the answer.
    pub code: i64,
    /// Sent by the operator (user agent `flowtel/…`).
    pub by_operator: bool,
}

impl AuditEntry {
    pub fn is_write(&self) -> bool {
        matches!(self.verb.as_str(), "create" | "update" | "patch" | "delete" | "deletecollection")
    }

    /// `verb resource[/subresource]`, e.g. `patch workflowruns/status`.
    pub fn request(&self) -> String {
        let sub = self.subresource.as_deref().map(|s| format!("/{s}")).unwrap_or_default();
        format!("{} {}{sub}", self.verb, self.resource)
    }
}

/// The local control plane's log directory, where `audit.log` and its rotated files are.
pub fn audit_logs() -> PathBuf {
    cluster_kubeconfig().parent().map(|d| d.join("logs")).unwrap_or_default()
}

/// Every completed request about objects in `namespace`, from the audit log in `logs` and its rotated files (oldest
/// first: a rotated file is named `audit-<time>.log`, which sorts before `audit.log`).
pub fn audit_entries(logs: &Path, namespace: &str) -> Vec<AuditEntry> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(logs)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with("audit") && name.ends_with(".log")
        })
        .collect();
    files.sort();
    let needle = format!("\"namespace\":\"{namespace}\"");
    let mut out = Vec::new();
    for path in files {
        let Ok(file) = std::fs::File::open(&path) else { continue };
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            // Most lines are about other namespaces: skipped before parsing.
            if !line.contains(&needle) {
                continue;
            }
            let Ok(e) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            let object = &e["objectRef"];
            if e["stage"] != "ResponseComplete" || object["namespace"] != namespace {
                continue;
            }
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
            out.push(AuditEntry {
                verb: text(&e["verb"]),
                resource: text(&object["resource"]),
                subresource: object["subresource"].as_str().map(str::to_string),
                name: text(&object["name"]),
                code: e["responseStatus"]["code"].as_i64().unwrap_or_default(),
                by_operator: e["userAgent"].as_str().is_some_and(|ua| ua.starts_with("flowtel/")),
            });
        }
    }
    out
}

/// Write requests (not Events) the operator sent for objects in `namespace`, by verb and resource.
pub fn operator_writes(namespace: &str) -> Vec<(String, u64)> {
    let mut counts = std::collections::BTreeMap::<String, u64>::new();
    for e in audit_entries(&audit_logs(), namespace) {
        if e.by_operator && e.is_write() && e.resource != "events" {
            *counts.entry(e.request()).or_default() += 1;
        }
    }
    counts.into_iter().collect()
}
