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
    let parent = if current.has_active_span() { current } else { g.parent.clone() };
    let span = g
        .tracer
        .span_builder(name)
        .with_kind(options.kind.into())
        .with_attributes(options.attributes)
        .start_with_context(&g.tracer, &parent);
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
