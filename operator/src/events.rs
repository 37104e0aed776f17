//! One way to publish a Kubernetes Event about a KubeBao object, for all three CRDs.

use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};

/// Longest note published: Events are for people, and the API server refuses huge ones.
const MAX_NOTE: usize = 1000;

/// Publishes an event about `obj`. Failing to publish is logged, never fatal: an event is a
/// courtesy to the reader, the status is the record.
pub async fn publish<K: Resource<DynamicType = ()>>(
    recorder: &Recorder,
    obj: &K,
    warning: bool,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note.chars().take(MAX_NOTE).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(object = %obj.name_any(), error = %e, "cannot publish event");
    }
}
