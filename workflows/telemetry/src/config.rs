//! What telemetry is configured from: explicit options, then what flowtel injects into the Job.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// Who counts the run-level metrics (`workflow.run.total`, `workflow.run.status`, `workflow.run.duration_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMetrics {
    /// The flowtel operator does (exactly once per run across its restarts, and across the workload's retried
    /// attempts): the library records none of them.
    Operator,
    /// The library does, in `record_workflow_run` (a workflow run outside flowtel).
    Library,
}

/// Options of `initialize_telemetry`, as in the user's original `initializeTelemetry`.
#[derive(Clone, Debug)]
pub struct TelemetryOptions {
    /// `service.name`; `OTEL_SERVICE_NAME` (which flowtel sets to the workflow name) wins when set.
    pub service_name: String,
    pub service_version: String,
    /// `deployment.environment`.
    pub environment: String,
    /// OTLP gRPC endpoint; `OTEL_EXPORTER_OTLP_ENDPOINT` when None. Neither: console only.
    pub otlp_endpoint: Option<String>,
    /// Also print spans and logs on the console.
    pub console_exporter: bool,
    /// Who counts run-level metrics; None: the operator when flowtel injected the run (`workflow.run_id` in
    /// `OTEL_RESOURCE_ATTRIBUTES`), else the library. `FLOWTEL_RUN_METRICS=operator|library` overrides.
    pub run_metrics: Option<RunMetrics>,
    /// Bound of each signal's export queue; what does not fit is dropped and counted, never waited for.
    pub queue_size: usize,
    /// Timeout of one export.
    pub export_timeout: std::time::Duration,
    /// The environment to read (`std::env::vars()` by default; tests pass their own).
    pub env: HashMap<String, String>,
    /// On SIGTERM, flush what was recorded and exit with 143 (true by default). False leaves SIGTERM to the program,
    /// which then calls `shutdown` itself.
    pub exit_on_sigterm: bool,
}

impl TelemetryOptions {
    /// Options for `service_name`, reading the process environment.
    pub fn new(service_name: &str) -> Self {
        Self {
            service_name: service_name.into(),
            service_version: env!("CARGO_PKG_VERSION").into(),
            environment: "production".into(),
            otlp_endpoint: None,
            console_exporter: false,
            run_metrics: None,
            queue_size: 2048,
            export_timeout: std::time::Duration::from_secs(5),
            env: std::env::vars().collect(),
            exit_on_sigterm: true,
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// The service name: `OTEL_SERVICE_NAME`, else the option.
    pub fn service(&self) -> String {
        self.var("OTEL_SERVICE_NAME").unwrap_or(&self.service_name).to_string()
    }

    /// The endpoint: the option, else `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> Option<String> {
        self.otlp_endpoint.clone().or_else(|| self.var("OTEL_EXPORTER_OTLP_ENDPOINT").map(str::to_string))
    }

    /// `service.version`: the one in `OTEL_RESOURCE_ATTRIBUTES` (flowtel injects the workflow's) wins over the
    /// option, as `OTEL_SERVICE_NAME` wins over the service name.
    pub fn version(&self) -> String {
        self.resource_attributes()
            .into_iter()
            .find(|(k, _)| k == "service.version")
            .map_or_else(|| self.service_version.clone(), |(_, v)| v)
    }

    /// `OTEL_RESOURCE_ATTRIBUTES` as pairs (the `$(VAR)` references Kubernetes expands are already expanded).
    pub fn resource_attributes(&self) -> Vec<(String, String)> {
        crate::resource_attributes::parse(self.var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default())
    }

    /// The run id flowtel injected (`workflow.run_id`), if any.
    pub fn run_id(&self) -> Option<String> {
        self.resource_attributes().into_iter().find(|(k, _)| k == "workflow.run_id").map(|(_, v)| v)
    }

    pub fn run_metrics(&self) -> RunMetrics {
        match self.var("FLOWTEL_RUN_METRICS") {
            Some("operator") => return RunMetrics::Operator,
            Some("library") => return RunMetrics::Library,
            _ => {}
        }
        self.run_metrics.unwrap_or(if self.run_id().is_some() { RunMetrics::Operator } else { RunMetrics::Library })
    }

    /// The context named by `TRACEPARENT` (and `TRACESTATE`), or an empty one.
    pub fn parent_context(&self) -> Context {
        let mut carrier = HashMap::new();
        for (var, key) in [("TRACEPARENT", "traceparent"), ("TRACESTATE", "tracestate")] {
            if let Some(v) = self.var(var) {
                carrier.insert(key.to_string(), v.to_string());
            }
        }
        TraceContextPropagator::new().extract(&carrier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    fn with_env(vars: &[(&str, &str)]) -> TelemetryOptions {
        let mut o = TelemetryOptions::new("sync");
        o.env = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        o
    }

    #[test]
    fn what_flowtel_injects_is_read() {
        let o = with_env(&[
            ("OTEL_SERVICE_NAME", "wf-sync"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_RESOURCE_ATTRIBUTES", "workflow.name=sync,workflow.run_id=abc-123,k8s.pod.name=p"),
            ("TRACEPARENT", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ]);
        assert_eq!(o.service(), "wf-sync");
        assert_eq!(o.endpoint().as_deref(), Some("http://collector:4317"));
        assert_eq!(o.run_id().as_deref(), Some("abc-123"));
        assert_eq!(o.version(), env!("CARGO_PKG_VERSION"), "no injected version: the option's");
        assert_eq!(o.run_metrics(), RunMetrics::Operator, "flowtel counts the run");
        let parent = o.parent_context();
        let sc = parent.span().span_context().clone();
        assert_eq!(sc.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(sc.span_id().to_string(), "b7ad6b7169203331");
        assert!(sc.is_remote() && sc.is_sampled());
    }

    #[test]
    fn outside_flowtel_the_library_counts_runs_and_the_options_win() {
        let mut o = with_env(&[]);
        assert_eq!(o.run_metrics(), RunMetrics::Library);
        assert_eq!(o.service(), "sync");
        assert!(o.endpoint().is_none());
        assert!(!o.parent_context().span().span_context().is_valid());
        o.otlp_endpoint = Some("http://mine:4317".into());
        assert_eq!(o.endpoint().as_deref(), Some("http://mine:4317"));
        let forced = with_env(&[("FLOWTEL_RUN_METRICS", "library"), ("OTEL_RESOURCE_ATTRIBUTES", "workflow.run_id=x")]);
        assert_eq!(forced.run_metrics(), RunMetrics::Library);
        let versioned = with_env(&[("OTEL_RESOURCE_ATTRIBUTES", "service.version=2.4.1,workflow.name=sync")]);
        assert_eq!(versioned.version(), "2.4.1", "the injected version wins");
    }

    #[test]
    fn a_malformed_traceparent_starts_a_new_trace() {
        let o = with_env(&[("TRACEPARENT", "not-a-traceparent")]);
        assert!(!o.parent_context().span().span_context().is_valid());
    }
}
