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

/// The conditions for `outcome`, reusing transition times from `previous` where the status did
/// not change.
pub fn conditions(
    previous: &[Condition],
    outcome: &Outcome,
    generation: Option<i64>,
) -> Vec<Condition> {
    let flag = |b: bool| if b { "True" } else { "False" };
    let (ready, reconciling, stalled) = match outcome {
        Outcome::Ready { .. } => (true, false, false),
        Outcome::Retrying { .. } => (false, true, false),
        Outcome::Stalled { .. } => (false, false, true),
    };
    let make = |type_: &str, status: bool, reason: &str, message: &str| {
        condition(previous, type_, flag(status), reason, message, generation)
    };
    let (reason, message) = (outcome.reason(), outcome.message());
    vec![
        make("Ready", ready, reason, message),
        make(
            "Reconciling",
            reconciling,
            if reconciling { reason } else { "Idle" },
            if reconciling { message } else { "" },
        ),
        make(
            "Stalled",
            stalled,
            if stalled { reason } else { "Idle" },
            if stalled { message } else { "" },
        ),
    ]
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
}
