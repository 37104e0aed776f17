//! One malformed object must not stop the others.
//!
//! kube-runtime deserializes a whole LIST into typed objects; one stored object that does not
//! fit the Rust type (stored under an older CRD schema, or written around the API server)
//! fails the list, and the watch retries forever with nothing reconciled. Controllers
//! therefore watch `Lenient<K>`: it always deserializes, keeping the metadata and the error when
//! the object does not parse, and the controller reports that object as Stalled.

use std::fmt::Debug;
use std::sync::Arc;

use kube::Resource;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::json;

use crate::api::Condition;
use crate::conditions::{Outcome, conditions};

/// A watched object: parsed, or its metadata and why it does not parse.
#[derive(Clone, Debug)]
pub enum Lenient<K> {
    /// The object as the controller expects it.
    Valid(K),
    /// An object that does not fit `K`.
    Invalid {
        /// Its metadata (name, namespace, generation, finalizers).
        meta: Box<ObjectMeta>,
        /// The deserialization error.
        error: String,
        /// Its status conditions, if they could be read.
        conditions: Vec<Condition>,
    },
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        match K::deserialize(&value) {
            Ok(k) => Ok(Lenient::Valid(k)),
            Err(e) => {
                let meta = value
                    .get("metadata")
                    .and_then(|m| ObjectMeta::deserialize(m).ok())
                    .unwrap_or_default();
                let conditions = value
                    .pointer("/status/conditions")
                    .cloned()
                    .and_then(|c| serde_json::from_value(c).ok())
                    .unwrap_or_default();
                Ok(Lenient::Invalid {
                    meta: Box::new(meta),
                    error: e.to_string(),
                    conditions,
                })
            }
        }
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> std::borrow::Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> std::borrow::Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        match self {
            Lenient::Valid(k) => k.meta(),
            Lenient::Invalid { meta, .. } => meta,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Lenient::Valid(k) => k.meta_mut(),
            Lenient::Invalid { meta, .. } => meta,
        }
    }
}

/// The parsed object, or `None` once an object that does not parse has been reported: as Stalled
/// (reason `InvalidObject`) and with a Warning event saying what is wrong and what to do. The API
/// server refuses even a status write for some such objects (a CEL rule cannot evaluate on the
/// wrong type); the event still tells the user. Nothing else is done with the object until it is
/// fixed, so callers return `Action::await_change()` on `None`.
pub async fn parsed<K>(
    client: &kube::Client,
    obj: &Lenient<K>,
) -> Result<Option<Arc<K>>, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let (meta, error, previous) = match obj {
        Lenient::Valid(k) => return Ok(Some(Arc::new(k.clone()))),
        Lenient::Invalid {
            meta,
            error,
            conditions,
        } => (meta, error, conditions),
    };
    let kind = K::kind(&());
    let name = meta.name.clone().unwrap_or_default();
    let message = format!(
        "the stored {kind} does not match its schema ({error}); it was written without validation, e.g. under an older CRD version. Fix it with kubectl edit or re-apply it; nothing is done with it until then"
    );
    let outcome = Outcome::Stalled {
        reason: "InvalidObject".into(),
        message: message.clone(),
    };
    let new = conditions(previous, &outcome, meta.generation);
    if &new == previous {
        return Ok(None);
    }
    tracing::warn!(kind = %kind, name = %name, namespace = ?meta.namespace, error, "object does not parse; reported as Stalled");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kubebao-operator".into(),
            instance: None,
        },
    );
    let event = Event {
        type_: EventType::Warning,
        reason: "InvalidObject".into(),
        note: Some(message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(name = %name, error = %e, "cannot publish event");
    }
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match &meta.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    // A merge patch of conditions only: the rest of the status may not parse either.
    let patch = json!({"status": {"observedGeneration": meta.generation, "conditions": new}});
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(None),
        // Refused by the schema's own rules: the event above is all that can be said.
        Err(kube::Error::Api(e)) if e.code == 422 => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BaoSecret;

    #[test]
    fn an_object_that_does_not_parse_keeps_its_metadata_and_the_reason() {
        let broken = json!({
            "apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret",
            "metadata": {"name": "broken", "namespace": "team", "generation": 3},
            "spec": {"secretPath": 42, "target": {"name": "x"}},
            "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "Old",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
        });
        match serde_json::from_value::<Lenient<BaoSecret>>(broken).unwrap() {
            Lenient::Invalid {
                meta,
                error,
                conditions,
            } => {
                assert_eq!(meta.name.as_deref(), Some("broken"));
                assert_eq!(meta.generation, Some(3));
                assert!(error.contains("invalid type: integer `42`"), "{error}");
                assert_eq!(conditions[0].reason, "Old");
            }
            Lenient::Valid(_) => panic!("a numeric secretPath must not parse"),
        }
        let good = json!({
            "apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret",
            "metadata": {"name": "good", "namespace": "team"},
            "spec": {"secretPath": "secret/data/team/app", "target": {"name": "x"}}
        });
        let parsed = serde_json::from_value::<Lenient<BaoSecret>>(good).unwrap();
        assert!(
            matches!(&parsed, Lenient::Valid(b) if b.spec.secret_path == "secret/data/team/app")
        );
        assert_eq!(parsed.meta().name.as_deref(), Some("good"));
        assert_eq!(Lenient::<BaoSecret>::kind(&()), "BaoSecret");
    }
}
