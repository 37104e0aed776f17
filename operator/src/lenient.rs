//! One malformed object must not stop the others.
//!
//! kube-runtime deserializes a whole LIST into typed objects; one stored object that does not
//! fit the Rust type (stored under an older CRD schema, or written around the API server)
//! fails the list, and the watch retries forever with nothing reconciled. Controllers
//! therefore watch `Lenient<K>`: it always deserializes, keeping the metadata and the error when
//! the object does not parse, and the controller reports that object as Stalled.
//!
//! Likewise a reconcile that panics (a bug, whatever input caused it) is caught by [`guarded`]
//! and reported on that object alone, so no object can stop a controller for all the others.

use std::fmt::Debug;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use kube::runtime::controller::Action;

use kube::Resource;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Recorder, Reporter};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
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
    let message = format!(
        "the stored {kind} does not match its schema ({error}); it was written without validation, e.g. under an older CRD version. Fix it with kubectl edit or re-apply it; nothing is done with it until then"
    );
    tracing::warn!(kind = %kind, name = ?meta.name, namespace = ?meta.namespace, error, "object does not parse; reported as Stalled");
    report(client, obj, previous, "InvalidObject", message).await?;
    Ok(None)
}

/// Runs one `reconcile` of `obj`. A panic is caught and reported on `obj` alone (Stalled, reason
/// `ReconcilePanicked`, and a Warning event), and the object is retried after 5 minutes: the
/// controller goes on with every other object.
pub async fn guarded<K, E>(
    client: &kube::Client,
    obj: &Lenient<K>,
    reconcile: impl Future<Output = Result<Action, E>>,
) -> Result<Action, E>
where
    K: Resource<DynamicType = ()> + Clone + Serialize,
{
    let panic = match AssertUnwindSafe(reconcile).catch_unwind().await {
        Ok(result) => return result,
        Err(panic) => panic_message(panic.as_ref()),
    };
    let kind = K::kind(&());
    tracing::error!(kind = %kind, name = ?obj.meta().name, namespace = ?obj.meta().namespace, panic, "reconcile panicked; reported on the object, the controller goes on");
    let message = format!(
        "the operator hit a bug while reconciling this {kind} ({panic}); it is retried every 5 minutes and no other object is affected. Please report it with this message"
    );
    let previous = match obj {
        Lenient::Valid(k) => serde_json::to_value(k)
            .ok()
            .and_then(|v| v.pointer("/status/conditions").cloned())
            .and_then(|c| serde_json::from_value(c).ok())
            .unwrap_or_default(),
        Lenient::Invalid { conditions, .. } => conditions.clone(),
    };
    if let Err(e) = report(client, obj, &previous, "ReconcilePanicked", message).await {
        tracing::warn!(error = %e, "cannot report the panic on the object");
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The text of a panic payload, cut to a readable length.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    text.chars().take(300).collect()
}

/// Reports `obj` as Stalled with `reason` and `message`: a Warning event and (a merge patch of)
/// its status conditions, unless they say so already.
async fn report<K>(
    client: &kube::Client,
    obj: &Lenient<K>,
    previous: &[Condition],
    reason: &str,
    message: String,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone,
{
    let meta = obj.meta();
    let name = meta.name.clone().unwrap_or_default();
    let outcome = Outcome::Stalled {
        reason: reason.into(),
        message: message.clone(),
    };
    let new = conditions(previous, &outcome, meta.generation);
    if new == previous {
        return Ok(());
    }
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "kubebao-operator".into(),
            instance: None,
        },
    );
    crate::events::publish(&recorder, obj, true, reason, message).await;
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
        Ok(_) => Ok(()),
        // Refused by the schema's own rules: the event above is all that can be said.
        Err(kube::Error::Api(e)) if e.code == 422 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::BaoSecret;

    #[test]
    fn a_panic_payload_is_read_as_text() {
        let caught = std::panic::catch_unwind(|| panic!("overflow in {}", "refresh")).unwrap_err();
        assert_eq!(panic_message(caught.as_ref()), "overflow in refresh");
        let caught = std::panic::catch_unwind(|| std::panic::panic_any(7)).unwrap_err();
        assert_eq!(panic_message(caught.as_ref()), "a panic without a message");
    }

    /// A panicking reconcile never reaches the controller's stream: `guarded` turns it into a
    /// retry (the report itself fails here, as there is no API server, and is only logged).
    #[tokio::test]
    async fn a_panicking_reconcile_is_contained() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let obj: Lenient<BaoSecret> = serde_json::from_value(json!({
            "apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret",
            "metadata": {"name": "boom", "namespace": "team"},
            "spec": {"secretPath": "secret/data/team/app", "target": {"name": "x"}}
        }))
        .unwrap();
        let result: Result<Action, kube::Error> = guarded(&client, &obj, async {
            if obj.meta().name.is_some() {
                panic!("bug");
            }
            Ok(Action::await_change())
        })
        .await;
        assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
        let fine: Result<Action, kube::Error> =
            guarded(&client, &obj, async { Ok(Action::await_change()) }).await;
        assert_eq!(fine.unwrap(), Action::await_change());
    }

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
