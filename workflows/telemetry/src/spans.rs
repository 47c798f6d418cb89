//! Spans (`startSpan`, `endSpan`, `traceAsyncFunction`): children of the current span, else of the attempt span
//! flowtel named in `TRACEPARENT`, so a workflow's spans join the run's trace.

use std::future::Future;

use opentelemetry::trace::{FutureExt, Span, SpanContext, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

/// Span kinds, as the user's library names them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpanKind {
    #[default]
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl From<SpanKind> for opentelemetry::trace::SpanKind {
    fn from(k: SpanKind) -> Self {
        match k {
            SpanKind::Internal => Self::Internal,
            SpanKind::Server => Self::Server,
            SpanKind::Client => Self::Client,
            SpanKind::Producer => Self::Producer,
            SpanKind::Consumer => Self::Consumer,
        }
    }
}

/// A span's kind and attributes (`workflow.name`, `workflow.run_id`, `step.name`, `phone.id`, ...).
#[derive(Clone, Debug, Default)]
pub struct SpanOptions {
    pub kind: SpanKind,
    pub attributes: Vec<KeyValue>,
}

impl SpanOptions {
    pub fn new(kind: SpanKind) -> Self {
        Self { kind, attributes: Vec::new() }
    }

    pub fn attribute(mut self, key: &'static str, value: impl Into<opentelemetry::Value>) -> Self {
        self.attributes.push(KeyValue::new(key, value));
        self
    }
}

/// How a span ended.
#[derive(Debug)]
pub enum Outcome<'a> {
    Success,
    /// The error is recorded as an `exception` event and the span's status is Error.
    Failure(&'a (dyn std::error::Error + 'static)),
}

/// A started span. Held directly (not inside a `Context`, whose span sits behind a mutex): children and log
/// records reach it through [`WorkflowSpan::context`], which carries its ids.
pub struct WorkflowSpan {
    span: Option<opentelemetry_sdk::trace::Span>,
    parent: Context,
    span_context: SpanContext,
}

impl WorkflowSpan {
    /// The context to run the span's work in (`fut.with_context(span.context())`), so children and log records
    /// carry its ids.
    pub fn context(&self) -> Context {
        if self.span.is_none() {
            return self.parent.clone();
        }
        self.parent.with_remote_span_context(self.span_context.clone())
    }

    pub fn set_attribute(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(span) = &mut self.span {
            span.set_attribute(KeyValue::new(key, value));
        }
    }

    /// The span's trace id (hex), for logs and tests.
    pub fn trace_id(&self) -> String {
        self.span_context.trace_id().to_string()
    }
}

/// Starts a span: a child of the current context's span, else of the workflow's parent (`TRACEPARENT`).
/// Before `initialize_telemetry` it is a span that records nothing.
pub fn start_span(name: impl Into<std::borrow::Cow<'static, str>>, options: SpanOptions) -> WorkflowSpan {
    let current = Context::current();
    let Some(g) = crate::global() else {
        let span_context = current.span().span_context().clone();
        return WorkflowSpan { span: None, parent: current, span_context };
    };
    start_with(&g.tracer, current, &g.parent, name, options)
}

/// A span of `tracer`: a child of `current`'s span, else of `workflow_parent`.
fn start_with(
    tracer: &opentelemetry_sdk::trace::Tracer,
    current: Context,
    workflow_parent: &Context,
    name: impl Into<std::borrow::Cow<'static, str>>,
    options: SpanOptions,
) -> WorkflowSpan {
    let parent = if current.has_active_span() { current } else { workflow_parent.clone() };
    let span = tracer
        .span_builder(name)
        .with_kind(options.kind.into())
        .with_attributes(options.attributes)
        .start_with_context(tracer, &parent);
    let span_context = span.span_context().clone();
    WorkflowSpan { span: Some(span), parent, span_context }
}

/// Ends a span with success or failure (`endSpan(span, 'success' | 'failure', error)`); a failure records the error
/// as an event and sets the span's status to Error. Also sets `step.status`.
pub fn end_span(mut span: WorkflowSpan, outcome: Outcome<'_>) {
    let Some(s) = span.span.as_mut() else { return };
    match outcome {
        Outcome::Success => {
            s.set_attribute(KeyValue::new("step.status", "success"));
            s.set_status(Status::Ok);
        }
        Outcome::Failure(error) => {
            let class = crate::classify_error(error);
            s.set_attribute(KeyValue::new("step.status", "failure"));
            s.record_error(error);
            s.set_attribute(KeyValue::new("error.type", class.kind.as_str()));
            s.set_status(Status::error(error.to_string()));
        }
    }
    s.end();
    if let Some(g) = crate::global() {
        g.counts.span_ended();
    }
}

/// Runs `work` inside a span (`traceAsyncFunction`): its children and logs carry the span's ids; the span ends with
/// the result's outcome.
pub async fn trace_async<T, E, Fut>(
    name: impl Into<std::borrow::Cow<'static, str>>,
    options: SpanOptions,
    work: Fut,
) -> Result<T, E>
where
    E: std::error::Error + 'static,
    Fut: Future<Output = Result<T, E>>,
{
    let span = start_span(name, options);
    let result = work.with_context(span.context()).await;
    match &result {
        Ok(_) => end_span(span, Outcome::Success),
        Err(e) => end_span(span, Outcome::Failure(e)),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

    #[test]
    fn the_workflow_root_has_the_remote_attempt_as_parent_and_its_children_a_local_one() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let tracer = provider.tracer("test");
        let mut options = crate::TelemetryOptions::new("sync");
        options.env = [("TRACEPARENT".to_string(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into())]
            .into_iter()
            .collect();
        let attempt = options.parent_context();

        let root = start_with(&tracer, Context::new(), &attempt, "workflow sync", SpanOptions::default());
        let step = start_with(&tracer, root.context(), &attempt, "step fetch", SpanOptions::default());
        let root_id = root.span_context.span_id();
        end_span(step, Outcome::Success);
        end_span(root, Outcome::Success);

        let spans = exporter.get_finished_spans().expect("spans");
        let by_name = |n: &str| spans.iter().find(|s| s.name == n).cloned().expect(n);
        let (root, step) = (by_name("workflow sync"), by_name("step fetch"));
        assert_eq!(root.span_context.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(root.parent_span_id.to_string(), "b7ad6b7169203331");
        assert!(root.parent_span_is_remote, "the attempt's span is another process'");
        assert_eq!(step.parent_span_id, root_id);
        assert!(!step.parent_span_is_remote, "a parent in this process is local");
        assert_eq!(step.span_context.trace_id(), root.span_context.trace_id());
    }
}
