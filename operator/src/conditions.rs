//! One place that turns an outcome into `Ready` / `Reconciling` / `Stalled` conditions, keeping
//! `lastTransitionTime` when a condition's status did not flip (kstatus, Flux and Argo CD read
//! these).

use crate::api::Condition;

/// What a reconcile concluded, in kstatus terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything is as declared.
    Ready {
        /// CamelCase reason, e.g. `Synced`.
        reason: String,
        /// Detail.
        message: String,
    },
    /// Not done yet, retrying (OpenBao unreachable, sealed, …).
    Retrying {
        /// CamelCase reason.
        reason: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// Cannot progress until someone changes something (bad spec, permission, conflict).
    Stalled {
        /// CamelCase reason.
        reason: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl Outcome {
    /// True for [`Outcome::Ready`].
    pub fn is_ready(&self) -> bool {
        matches!(self, Outcome::Ready { .. })
    }
    /// The `result` label of the reconcile metrics: `ok` when ready, else the reason.
    pub fn result(&self) -> &str {
        if self.is_ready() { "ok" } else { self.reason() }
    }
    /// The reason label.
    pub fn reason(&self) -> &str {
        match self {
            Outcome::Ready { reason, .. }
            | Outcome::Retrying { reason, .. }
            | Outcome::Stalled { reason, .. } => reason,
        }
    }
    /// The message.
    pub fn message(&self) -> &str {
        match self {
            Outcome::Ready { message, .. }
            | Outcome::Retrying { message, .. }
            | Outcome::Stalled { message, .. } => message,
        }
    }
}

/// The current time as RFC 3339, in whole seconds (the format of Kubernetes timestamps).
pub fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .expect("round to seconds")
        .to_string()
}

/// One condition, keeping `lastTransitionTime` from `previous` when its status did not flip.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now);
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time,
        observed_generation: generation,
    }
}

/// Sets one condition in `conditions` (replacing one of the same type), keeping
/// `lastTransitionTime` while its status does not flip; the list stays sorted by type.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" };
    let updated = condition(conditions, type_, status, reason, message, generation);
    conditions.retain(|c| c.type_ != type_);
    conditions.push(updated);
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// The three kstatus condition types an [`Outcome`] sets.
const KSTATUS: [&str; 3] = ["Ready", "Reconciling", "Stalled"];

/// Sets `Ready`, `Reconciling` and `Stalled` in `conditions` for `outcome` (see [`set`]): the
/// two that do not apply are `False` with reason `Idle`.
pub fn set_outcome(conditions: &mut Vec<Condition>, outcome: &Outcome, generation: Option<i64>) {
    let (reason, message) = (outcome.reason(), outcome.message());
    let applies = [
        matches!(outcome, Outcome::Ready { .. }),
        matches!(outcome, Outcome::Retrying { .. }),
        matches!(outcome, Outcome::Stalled { .. }),
    ];
    for (type_, on) in KSTATUS.into_iter().zip(applies) {
        // Ready always carries the outcome's reason; the others only while they are True.
        let said = on || type_ == "Ready";
        let (reason, message) = if said {
            (reason, message)
        } else {
            ("Idle", "")
        };
        set(conditions, type_, on, reason, message, generation);
    }
}

/// The conditions for `outcome` (only `Ready`, `Reconciling` and `Stalled`), reusing transition
/// times from `previous` where the status did not change.
pub fn conditions(
    previous: &[Condition],
    outcome: &Outcome,
    generation: Option<i64>,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = previous
        .iter()
        .filter(|c| KSTATUS.contains(&c.type_.as_str()))
        .cloned()
        .collect();
    set_outcome(&mut out, outcome, generation);
    out
}

/// True when the Kubernetes API refused a request for good: the same request can never succeed
/// (400 BadRequest, 422 Invalid — an invalid or immutable field —, or too large, see
/// [`refused_as_too_large`]), so retrying it without a change only repeats the refusal.
/// Conflicts (409), throttling (429), server errors (5xx) and transport failures (timeouts,
/// connections) are transient.
pub fn refused_for_good(e: &kube::Error) -> bool {
    let kube::Error::Api(status) = e else {
        return false;
    };
    matches!(status.code, 400 | 422)
        || matches!(status.reason.as_str(), "BadRequest" | "Invalid")
        || refused_as_too_large(e)
}

/// True when the Kubernetes API refused a request as too large: 413 RequestEntityTooLarge, a
/// size limit ("Too long: may not be more than 1048576 bytes"), or etcd's "request is too large".
pub fn refused_as_too_large(e: &kube::Error) -> bool {
    let kube::Error::Api(status) = e else {
        return false;
    };
    let text = status.message.to_ascii_lowercase();
    status.code == 413
        || status.reason == "RequestEntityTooLarge"
        || text.contains("too long")
        || text.contains("too large")
}

/// What the API server said (its `Status` message), or the error itself when it said nothing.
pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        e => e.to_string(),
    }
}

/// True when `outcome` says something the `Ready` condition in `previous` does not (another
/// reason or message, or no `Ready` yet): worth an event.
pub fn ready_changed(previous: &[Condition], outcome: &Outcome) -> bool {
    previous
        .iter()
        .find(|c| c.type_ == "Ready")
        .is_none_or(|c| c.reason != outcome.reason() || c.message != outcome.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Outcome {
        Outcome::Ready {
            reason: "Synced".into(),
            message: "ok".into(),
        }
    }

    #[test]
    fn transition_time_is_kept_while_status_does_not_flip() {
        let mut first = conditions(&[], &ready(), Some(1));
        first[0].last_transition_time = "2000-01-01T00:00:00Z".into();
        let second = conditions(&first, &ready(), Some(2));
        assert_eq!(second[0].last_transition_time, "2000-01-01T00:00:00Z");
        let stalled = Outcome::Stalled {
            reason: "PermissionDenied".into(),
            message: "no".into(),
        };
        let third = conditions(&second, &stalled, Some(2));
        assert_ne!(third[0].last_transition_time, "2000-01-01T00:00:00Z");
        assert_eq!(third[0].status, "False");
        assert_eq!(third[2].status, "True");
        assert_eq!(third[2].reason, "PermissionDenied");
    }

    #[test]
    fn a_failing_object_says_reconciling_or_stalled() {
        let retry = Outcome::Retrying {
            reason: "OpenBaoUnavailable".into(),
            message: "down".into(),
        };
        let c = conditions(&[], &retry, None);
        assert_eq!(
            (c[0].status.as_str(), c[1].status.as_str()),
            ("False", "True")
        );
    }
    #[test]
    fn set_replaces_one_type_keeps_the_others_and_sorts() {
        let mut c = Vec::new();
        set(&mut c, "Ready", false, "RollingOut", "1/3", Some(1));
        set(&mut c, "KMSReady", true, "Installed", "ok", Some(1));
        c[1].last_transition_time = "2000-01-01T00:00:00Z".into();
        set(&mut c, "Ready", false, "RollingOut", "2/3", Some(2));
        let types: Vec<&str> = c.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["KMSReady", "Ready"]);
        assert_eq!(
            (c[1].message.as_str(), c[1].observed_generation),
            ("2/3", Some(2))
        );
        assert_eq!(c[1].last_transition_time, "2000-01-01T00:00:00Z");
        set(&mut c, "Ready", true, "Installed", "3/3", Some(2));
        assert_eq!(c[1].status, "True");
        assert_ne!(c[1].last_transition_time, "2000-01-01T00:00:00Z");
        assert_eq!(c[0].reason, "Installed");
    }

    #[test]
    fn outcome_conditions_are_the_three_kstatus_types_in_order() {
        let mut previous = Vec::new();
        set(&mut previous, "Old", true, "Gone", "", None);
        let c = conditions(&previous, &ready(), Some(4));
        let got: Vec<(&str, &str, &str)> = c
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str(), c.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("Ready", "True", "Synced"),
                ("Reconciling", "False", "Idle"),
                ("Stalled", "False", "Idle")
            ]
        );
        assert!(c.iter().all(|c| c.observed_generation == Some(4)));
    }

    fn api_error(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, reason)
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn api_errors_that_no_retry_can_fix_are_told_from_transient_ones() {
        let permanent = [
            api_error(
                422,
                "Invalid",
                "Secret \"s\" is invalid: data: Too long: may not be more than 1048576 bytes",
            ),
            api_error(
                422,
                "Invalid",
                "Secret \"s\" is invalid: type: Invalid value: \"b\": field is immutable",
            ),
            api_error(413, "RequestEntityTooLarge", "the request is too large"),
            api_error(400, "BadRequest", "the server rejected our request"),
            api_error(500, "InternalError", "etcdserver: request is too large"),
        ];
        for e in &permanent {
            assert!(refused_for_good(e), "{e}");
        }
        let too_large: Vec<bool> = permanent.iter().map(refused_as_too_large).collect();
        assert_eq!(too_large, [true, false, true, false, true]);
        let transient = [
            api_error(409, "Conflict", "the object has been modified"),
            api_error(429, "TooManyRequests", "slow down"),
            api_error(500, "InternalError", "etcd leader changed"),
            api_error(503, "ServiceUnavailable", "apiserver is shutting down"),
            api_error(
                504,
                "Timeout",
                "the server was unable to return a response in time",
            ),
            kube::Error::LinesCodecMaxLineLengthExceeded,
        ];
        for e in &transient {
            assert!(!refused_for_good(e) && !refused_as_too_large(e), "{e}");
        }
        assert_eq!(
            api_message(&permanent[1]),
            "Secret \"s\" is invalid: type: Invalid value: \"b\": field is immutable"
        );
    }

    #[test]
    fn an_event_is_worth_it_only_when_ready_says_something_new() {
        assert!(ready_changed(&[], &ready()));
        let c = conditions(&[], &ready(), None);
        assert!(!ready_changed(&c, &ready()));
        let other = Outcome::Ready {
            reason: "Synced".into(),
            message: "other".into(),
        };
        assert!(ready_changed(&c, &other));
    }
}
