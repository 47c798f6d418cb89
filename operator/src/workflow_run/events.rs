//! The run's Kubernetes Events: what a status write recorded, announced (Warnings always, Normal ones on request).

use flowtel_crds::WorkflowRun;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use super::context::Context;
use super::plan;
use crate::runtime::FIELD_MANAGER;

/// The longest object name whose Events the recorder can name: it names them `<name>.<16 hex digits>`, and an
/// Event's name is at most 253 characters.
const RECORDER_NAME_MAX: usize = 253 - 17;

pub async fn publish(ctx: &Context, run: &WorkflowRun, note: &plan::EventNote) {
    let type_ = if note.warning { EventType::Warning } else { EventType::Normal };
    let reference = run.object_ref(&());
    let result = if run.name_any().len() <= RECORDER_NAME_MAX {
        let event = Event {
            type_,
            reason: note.reason.into(),
            note: Some(note.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        ctx.recorder.publish(&event, &reference).await
    } else {
        publish_for_long_name(ctx, run, note, reference).await
    };
    // Visible: a refused Event (RBAC) must not pass unnoticed; an outage costs one line per event at most.
    if let Err(e) = result {
        tracing::warn!(error = %e, "publishing an event failed");
    }
}

/// The same Event, named by the apiserver from a prefix (the recorder's name would be too long).
async fn publish_for_long_name(
    ctx: &Context,
    run: &WorkflowRun,
    note: &plan::EventNote,
    reference: k8s_openapi::api::core::v1::ObjectReference,
) -> Result<(), kube::Error> {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    let namespace = run.namespace().unwrap_or_default();
    let prefix: String = run.name_any().chars().take(200).collect();
    let event = K8sEvent {
        metadata: ObjectMeta {
            // A trailing dash is the one separator a generateName may end with.
            generate_name: Some(format!("{}-", prefix.trim_end_matches(['-', '.']))),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        action: Some("Reconcile".into()),
        reason: Some(note.reason.into()),
        note: Some(note.note.clone()),
        type_: Some(if note.warning { "Warning" } else { "Normal" }.into()),
        event_time: Some(MicroTime(jiff::Timestamp::now())),
        regarding: Some(reference),
        reporting_controller: Some(FIELD_MANAGER.into()),
        reporting_instance: Some(FIELD_MANAGER.into()),
        ..K8sEvent::default()
    };
    let events: Api<K8sEvent> = Api::namespaced(ctx.client.clone(), &namespace);
    events.create(&PostParams::default(), &event).await.map(|_| ())
}
