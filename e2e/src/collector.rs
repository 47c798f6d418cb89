//! The real OpenTelemetry Collector as a test's OTLP endpoint, writing what it receives as OTLP JSON lines, and the
//! readers of those files.

use std::path::PathBuf;
use std::process::Command;

use crate::process::{Process, collector_bin, free_port, wait_for_port};
use crate::{HarnessError, repo_root, run};

/// The real OpenTelemetry Collector (built by `e2e/build-binaries collector`), receiving OTLP gRPC on a free
/// loopback port and writing what it receives as OTLP JSON lines into a fresh directory.
pub struct Collector {
    pub endpoint: String,
    pub dir: PathBuf,
    port: u16,
    bin: PathBuf,
    incarnation: u32,
    process: Option<Process>,
}

impl Collector {
    pub async fn start(test: &str) -> Result<Self, HarnessError> {
        run(Command::new(repo_root().join("e2e/build-binaries")).arg("collector"))?;
        let bin = collector_bin();
        let dir = std::env::temp_dir().join(format!("flowtel-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| HarnessError::Spawn { command: "mkdir".into(), source })?;
        let port = free_port();
        let mut collector =
            Self { endpoint: format!("http://127.0.0.1:{port}"), dir, port, bin, incarnation: 0, process: None };
        collector.spawn().await?;
        Ok(collector)
    }

    /// Starts incarnation `self.incarnation`, writing files of its own: the file exporter truncates its file on
    /// start, and what an earlier incarnation received must stay readable.
    async fn spawn(&mut self) -> Result<(), HarnessError> {
        let (d, n, port) = (self.dir.display(), self.incarnation, self.port);
        let config = format!(
            "receivers:\n  otlp:\n    protocols:\n      grpc: {{endpoint: 127.0.0.1:{port}}}\n\
             exporters:\n  file/traces: {{path: {d}/traces-{n}.json, flush_interval: 100ms}}\n  \
             file/metrics: {{path: {d}/metrics-{n}.json, flush_interval: 100ms}}\n\
             service:\n  telemetry:\n    metrics: {{level: none}}\n  pipelines:\n    \
             traces: {{receivers: [otlp], exporters: [file/traces]}}\n    \
             metrics: {{receivers: [otlp], exporters: [file/metrics]}}\n"
        );
        let config_path = self.dir.join(format!("config-{n}.yaml"));
        std::fs::write(&config_path, config)
            .map_err(|source| HarnessError::Spawn { command: "write".into(), source })?;
        let log = std::fs::File::create(self.dir.join(format!("collector-{n}.log")))
            .map_err(|source| HarnessError::Spawn { command: "log".into(), source })?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&config_path)
            .stdout(log.try_clone().map_err(|source| HarnessError::Spawn { command: "log".into(), source })?)
            .stderr(log)
            .spawn()
            .map_err(|source| HarnessError::Spawn { command: self.bin.display().to_string(), source })?;
        self.process = Some(Process { child });
        wait_for_port(self.port).await
    }

    /// SIGKILL: the endpoint refuses connections until `restart`.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.process = None;
        self.incarnation += 1;
        self.spawn().await
    }

    /// Everything the counter `name` counted for `workflow`, across operator processes and attribute sets: the
    /// largest value per series (start time and attributes) summed, which adds up delta points (each its own
    /// interval) and takes the latest of cumulative ones (a process' series).
    pub fn total_across_processes(&self, name: &str, workflow: &str) -> i64 {
        let mut latest = std::collections::BTreeMap::<(String, String), i64>::new();
        for doc in self.documents("metrics") {
            for rm in doc["resourceMetrics"].as_array().into_iter().flatten() {
                for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                    for m in sm["metrics"].as_array().into_iter().flatten().filter(|m| m["name"] == name) {
                        for p in m["sum"]["dataPoints"].as_array().into_iter().flatten() {
                            if attribute(p, "workflow_name").as_deref() == Some(workflow) {
                                let start = p["startTimeUnixNano"].as_str().unwrap_or_default().to_string();
                                let v = p["asInt"].as_str().and_then(|s| s.parse().ok()).unwrap_or_default();
                                let e = latest.entry((start, p["attributes"].to_string())).or_default();
                                *e = (*e).max(v);
                            }
                        }
                    }
                }
            }
        }
        latest.values().sum()
    }

    /// Every OTLP JSON document the collector wrote for `signal` (`traces` or `metrics`), across restarts.
    pub fn documents(&self, signal: &str) -> Vec<serde_json::Value> {
        (0..=self.incarnation)
            .flat_map(|n| {
                otlp_documents(
                    &std::fs::read_to_string(self.dir.join(format!("{signal}-{n}.json"))).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Every span received, flattened: the OTLP JSON span objects.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for doc in self.documents("traces") {
            for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    out.extend(ss["spans"].as_array().into_iter().flatten().cloned());
                }
            }
        }
        out
    }

    /// The latest data point of metric `name` whose attributes include all of `attrs`, with the metric object.
    pub fn latest_point(&self, name: &str, attrs: &[(&str, &str)]) -> Option<(serde_json::Value, serde_json::Value)> {
        let mut found = None;
        for doc in self.documents("metrics") {
            for rm in doc["resourceMetrics"].as_array().into_iter().flatten() {
                for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                    for m in sm["metrics"].as_array().into_iter().flatten().filter(|m| m["name"] == name) {
                        let points = ["sum", "histogram", "gauge"]
                            .iter()
                            .find_map(|k| m[*k]["dataPoints"].as_array())
                            .cloned()
                            .unwrap_or_default();
                        for p in points {
                            if attrs.iter().all(|(k, v)| attribute(&p, k).as_deref() == Some(*v)) {
                                found = Some((m.clone(), p));
                            }
                        }
                    }
                }
            }
        }
        found
    }
}

/// A string attribute of an OTLP JSON span or data point.
pub fn attribute(item: &serde_json::Value, key: &str) -> Option<String> {
    item["attributes"].as_array()?.iter().find(|a| a["key"] == key).and_then(|a| {
        let v = &a["value"];
        v["stringValue"].as_str().map(str::to_string).or_else(|| v["intValue"].as_str().map(str::to_string))
    })
}

/// The OTLP JSON documents of a collector's file output, one a line. A SIGKILL can cut a document short, or leave
/// it without its newline; a collector started again and appending to the same file then continues that line. A cut
/// document is skipped; every whole one is read.
pub fn otlp_documents(text: &str) -> Vec<serde_json::Value> {
    const STARTS: [&str; 3] = ["{\"resourceSpans\":", "{\"resourceMetrics\":", "{\"resourceLogs\":"];
    let next_start = |s: &str| STARTS.iter().filter_map(|p| s.get(1..)?.find(p)).min().map(|i| i + 1);
    let mut out = Vec::new();
    for line in text.lines() {
        let mut rest = line.trim_start();
        while !rest.is_empty() {
            let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<serde_json::Value>();
            match stream.next() {
                Some(Ok(document)) => {
                    out.push(document);
                    rest = rest[stream.byte_offset()..].trim_start();
                }
                _ => match next_start(rest) {
                    Some(i) => rest = &rest[i..],
                    None => break,
                },
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::otlp_documents;

    #[test]
    fn collector_output_is_read_across_a_kill_that_cut_a_line() {
        let whole = r#"{"resourceSpans":[{"resource":{"attributes":[]},"scopeSpans":[{"spans":[{"name":"a"}]}]}]}"#;
        let next = r#"{"resourceMetrics":[{"resource":{},"scopeMetrics":[]}]}"#;
        let cut = &whole[..40];
        // A whole document left without its newline, the next collector's on the same line; a cut one, likewise.
        let text = format!("{whole}\n{whole}{next}\n{cut}{next}\n{cut}");
        let docs = otlp_documents(&text);
        let kinds: Vec<bool> = docs.iter().map(|d| d.get("resourceSpans").is_some()).collect();
        assert_eq!(kinds, [true, true, false, false], "{docs:#?}");
    }
}
