//! Reading KubeBao's status conditions in tests: one condition, or a wait for one.

use std::time::Duration;

use kube::api::{Api, DynamicObject};

use crate::wait_for;

/// (status, reason, message) of condition `type_`, if the object reports it.
pub fn condition(obj: &DynamicObject, type_: &str) -> Option<(String, String, String)> {
    let c = obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?;
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    Some((s("status"), s("reason"), s("message")))
}

/// Waits up to a minute until `name` has condition `type_` = `status` with `reason`; returns
/// its message.
pub async fn wait_condition(
    api: &Api<DynamicObject>,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> String {
    wait_for(
        &format!("{name} to have {type_}={status} ({reason})"),
        Duration::from_secs(60),
        || async {
            let obj = api.get(name).await.map_err(|e| e.to_string())?;
            match condition(&obj, type_) {
                Some((s, r, m)) if s == status && r == reason => Ok(m),
                other => Err(format!(
                    "conditions now: {other:?}; status: {}",
                    obj.data["status"]
                )),
            }
        },
    )
    .await
}
