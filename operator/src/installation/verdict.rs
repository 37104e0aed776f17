//! What one reconcile concluded: a condition per component (OpenBaoReady, KMSReady, CSIReady)
//! folded into Ready / Reconciling / Stalled, kstatus style, so tools that read kstatus (Flux,
//! Argo CD, `kubectl wait`) see one answer.

use crate::conditions::Outcome;
use crate::installation::types::KubeBaoInstallationStatus;

/// What a reconcile concluded, per component.
#[derive(Default)]
pub struct Verdict {
    /// (condition type, ok, reason, message) for OpenBaoReady, KMSReady, CSIReady.
    parts: Vec<(&'static str, bool, String, String)>,
    /// A problem only a change can fix.
    stalled: Option<(String, String)>,
}

impl Verdict {
    /// Records one component's condition.
    pub fn part(&mut self, t: &'static str, ok: bool, reason: &str, message: impl Into<String>) {
        self.parts.push((t, ok, reason.into(), message.into()));
    }

    /// Records a problem only a change can fix; the first one recorded is the one reported.
    pub fn stall(&mut self, reason: &str, message: impl Into<String>) {
        if self.stalled.is_none() {
            self.stalled = Some((reason.into(), message.into()));
        }
    }

    /// True when a condition of type `t` was already recorded.
    pub fn has(&self, t: &str) -> bool {
        self.parts.iter().any(|p| p.0 == t)
    }

    /// Applies the verdict to the conditions, kstatus style. Returns whether the installation
    /// is Ready.
    pub fn apply(self, status: &mut KubeBaoInstallationStatus, generation: Option<i64>) -> bool {
        let c = &mut status.conditions;
        for (t, ok, reason, message) in &self.parts {
            crate::conditions::set(c, t, *ok, reason, message, generation);
        }
        let failing: Vec<_> = self.parts.iter().filter(|p| !p.1).collect();
        let ready = failing.is_empty() && self.stalled.is_none();
        let (reason, message) = match (&self.stalled, failing.first()) {
            (Some((r, m)), _) => (r.clone(), m.clone()),
            (None, Some(p)) => (p.2.clone(), p.3.clone()),
            (None, None) => (
                "Installed".into(),
                "OpenBao is prepared and every component is installed".into(),
            ),
        };
        let outcome = match (ready, self.stalled.is_some()) {
            (true, _) => Outcome::Ready { reason, message },
            (false, true) => Outcome::Stalled { reason, message },
            (false, false) => Outcome::Retrying { reason, message },
        };
        crate::conditions::set_outcome(c, &outcome, generation);
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_is_kept_while_a_condition_does_not_flip() {
        let mut c = Vec::new();
        crate::conditions::set(&mut c, "Ready", false, "RollingOut", "1/3", Some(1));
        c[0].last_transition_time = "2000-01-01T00:00:00Z".into();
        crate::conditions::set(&mut c, "Ready", false, "RollingOut", "2/3", Some(1));
        assert_eq!(c[0].last_transition_time, "2000-01-01T00:00:00Z");
        assert_eq!(c[0].message, "2/3");
        crate::conditions::set(&mut c, "Ready", true, "Installed", "3/3", Some(1));
        assert_ne!(c[0].last_transition_time, "2000-01-01T00:00:00Z");
    }

    #[test]
    fn a_failing_component_makes_the_installation_reconciling_not_ready() {
        let mut s = KubeBaoInstallationStatus::default();
        let mut v = Verdict::default();
        v.part("OpenBaoReady", true, "Prepared", "ok");
        v.part("KMSReady", false, "RollingOut", "1/3");
        assert!(!v.apply(&mut s, Some(2)));
        let get = |t: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == t)
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(get("Ready"), "False");
        assert_eq!(get("Reconciling"), "True");
        assert_eq!(get("Stalled"), "False");
    }

    #[test]
    fn a_stall_says_stalled_not_reconciling() {
        let mut s = KubeBaoInstallationStatus::default();
        let mut v = Verdict::default();
        v.stall("Conflict", "another one");
        assert!(!v.apply(&mut s, Some(1)));
        let get = |t: &str| s.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(get("Stalled").status, "True");
        assert_eq!(get("Stalled").reason, "Conflict");
        assert_eq!(get("Reconciling").status, "False");
    }

    #[test]
    fn every_component_ready_makes_the_installation_ready() {
        let mut s = KubeBaoInstallationStatus::default();
        let mut v = Verdict::default();
        v.part("OpenBaoReady", true, "Prepared", "ok");
        v.part("KMSReady", true, "Installed", "3/3");
        assert!(v.has("KMSReady") && !v.has("CSIReady"));
        assert!(v.apply(&mut s, Some(1)));
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Installed")
        );
    }
}
