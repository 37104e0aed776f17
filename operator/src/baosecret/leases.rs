//! The credentials a BaoSecret holds (engine leases, certificates) and the replaced leases it
//! still owes a revocation, as its status records them, and when each needs work: renewal,
//! replacement, revocation. Decided without I/O from the status and the clock (whole seconds
//! since the epoch), so a restarted operator resumes where the last one stopped; no time it
//! schedules is in the past.
//!
//! - A lease is renewed at 2/3 of each grant, asking for the duration it was first granted.
//! - Its end is known once a renewal grants less than asked (its max TTL is near), when it
//!   cannot be renewed, when a renewal fails, or when the token that created it is no longer
//!   kept alive (a lease dies with its token). It is replaced `replace_before` ahead of that
//!   end (default: a third of its duration, at least `revokeAfter` + 30 s).
//! - A replaced lease is revoked `revokeAfter` after the new credentials were written and the
//!   workloads restarted, or dropped unrevoked once it has ended anyway.
//! - A certificate is replaced at `renewAtPercent` of its lifetime (notBefore to notAfter).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::api::BaoSecretStatus;
use crate::api::baosecret::{CertificateStatus, LeaseStatus, RevocationStatus, Rotation};
use kubebao_openbao::duration::{self, Bounds};

/// Seconds since the Unix epoch.
pub type Secs = i64;

/// Default grace before a replaced lease is revoked.
const DEFAULT_REVOKE_AFTER: Duration = Duration::from_secs(300);
/// `revokeAfter`: at least a second, at most a day.
const REVOKE_AFTER: Bounds = Bounds::new(Duration::from_secs(1), Duration::from_secs(24 * 3600));
/// `replaceBefore`: at least a second, at most a year.
const REPLACE_BEFORE: Bounds =
    Bounds::new(Duration::from_secs(1), Duration::from_secs(8760 * 3600));
/// The default lead over the end of a lease beyond `revokeAfter`: time to read, write and
/// restart before the grace starts.
const LEAD_MARGIN: Secs = 30;
/// Default share of a certificate's lifetime after which it is replaced.
const DEFAULT_RENEW_AT_PERCENT: u8 = 67;

/// `spec.rotation`, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Grace before a replaced lease is revoked, in seconds.
    pub revoke_after: Secs,
    /// Lead over a lease's end, in seconds (None: the default, see [`Settings::lead`]).
    pub replace_before: Option<Secs>,
    /// Share of a certificate's lifetime after which it is replaced, in percent.
    pub renew_at_percent: u8,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            revoke_after: DEFAULT_REVOKE_AFTER.as_secs() as Secs,
            replace_before: None,
            renew_at_percent: DEFAULT_RENEW_AT_PERCENT,
        }
    }
}

impl Settings {
    /// `spec.rotation`, checked; the message names the field.
    pub fn from_spec(rotation: Option<&Rotation>) -> Result<Settings, String> {
        let mut s = Settings::default();
        let Some(r) = rotation else {
            return Ok(s);
        };
        let secs = |field: &str, text: &str, bounds: Bounds| {
            duration::parse(text, bounds)
                .map(|d| d.as_secs().min(Secs::MAX as u64) as Secs)
                .map_err(|e| format!("spec.rotation.{field}: {e}"))
        };
        if let Some(t) = &r.revoke_after {
            s.revoke_after = secs("revokeAfter", t, REVOKE_AFTER)?;
        }
        if let Some(t) = &r.replace_before {
            s.replace_before = Some(secs("replaceBefore", t, REPLACE_BEFORE)?);
        }
        if let Some(p) = r.renew_at_percent {
            if !(10..=95).contains(&p) {
                return Err(format!(
                    "spec.rotation.renewAtPercent {p} is not between 10 and 95"
                ));
            }
            s.renew_at_percent = p;
        }
        Ok(s)
    }

    /// How long before its end a lease of `duration` seconds is replaced.
    pub fn lead(&self, duration: Secs) -> Secs {
        self.replace_before.unwrap_or_else(|| {
            (self.revoke_after.saturating_add(LEAD_MARGIN)).max(duration.max(0) / 3)
        })
    }
}

/// A status time (RFC 3339) as seconds; None when absent or not a time.
pub fn parse(time: Option<&str>) -> Option<Secs> {
    time?.parse::<Timestamp>().ok().map(|t| t.as_second())
}

/// Seconds as a status time (RFC 3339, whole seconds); out of range clamps to the nearest
/// time jiff can write.
pub fn format(at: Secs) -> String {
    let at = at.clamp(
        Timestamp::MIN.as_second() + 1,
        Timestamp::MAX.as_second() - 1,
    );
    Timestamp::from_second(at)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_string()
}

/// Now, in seconds.
pub fn now() -> Secs {
    Timestamp::now().as_second()
}

/// A duration in whole seconds, saturating.
pub fn secs(d: Duration) -> Secs {
    Secs::try_from(d.as_secs()).unwrap_or(Secs::MAX)
}

/// What a BaoSecret holds, as its status records it; changed by a sync and written back to
/// the status whether the sync succeeded or not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Book {
    /// The lease each engine source holds.
    pub leases: Vec<LeaseStatus>,
    /// The certificate each certificate source holds.
    pub certificates: Vec<CertificateStatus>,
    /// Replaced leases still to be revoked.
    pub revocations: Vec<RevocationStatus>,
    /// When the token that created held leases is due for renewal (the tenant token cache
    /// renews it when it is used): a sync then keeps it alive. Not in the status.
    pub token_upkeep: Option<Secs>,
}

impl Book {
    /// What `status` records.
    pub fn from_status(status: &BaoSecretStatus) -> Book {
        Book {
            leases: status.leases.clone(),
            certificates: status.certificates.clone(),
            revocations: status.revocations.clone(),
            token_upkeep: None,
        }
    }

    /// Records the book in `status`.
    pub fn record(&self, status: &mut BaoSecretStatus) {
        status.leases = self.leases.clone();
        status.certificates = self.certificates.clone();
        status.revocations = self.revocations.clone();
    }

    /// True while a lease is held or owed a revocation (the BaoSecret's finalizer stays).
    pub fn holds_leases(&self) -> bool {
        !self.leases.is_empty() || !self.revocations.is_empty()
    }

    /// The lease of `source`.
    pub fn lease(&self, source: &str) -> Option<&LeaseStatus> {
        self.leases.iter().find(|l| l.source == source)
    }

    /// The certificate of `source`.
    pub fn certificate(&self, source: &str) -> Option<&CertificateStatus> {
        self.certificates.iter().find(|c| c.source == source)
    }

    /// Replaces `source`'s lease with `lease` (None: drops it); the old one is owed a
    /// revocation once the new credentials are written.
    pub fn set_lease(&mut self, source: &str, lease: Option<LeaseStatus>) {
        if let Some(i) = self.leases.iter().position(|l| l.source == source) {
            let old = self.leases.remove(i);
            if lease.as_ref().is_none_or(|l| l.lease_id != old.lease_id) {
                self.revocations.push(retire(&old));
            }
        }
        self.leases.extend(lease);
    }

    /// Replaces `source`'s certificate with `certificate` (None: drops it). A replaced
    /// certificate is not revoked: it expires on its own.
    pub fn set_certificate(&mut self, source: &str, certificate: Option<CertificateStatus>) {
        self.certificates.retain(|c| c.source != source);
        self.certificates.extend(certificate);
    }

    /// True while a revocation waits for the new credentials to be written.
    pub fn write_pending(&self) -> bool {
        self.revocations.iter().any(|r| r.revoke_time.is_none())
    }

    /// The earliest time after `now` that something needs work (see [`next_work`]).
    pub fn next_work(&self, now: Secs) -> Option<Secs> {
        let work = next_work(&self.leases, &self.certificates, &self.revocations, now);
        [work, self.token_upkeep.filter(|t| *t > now)]
            .into_iter()
            .flatten()
            .min()
    }

    /// The earliest end of a held lease's current grant, and the earliest `notAfter` of a
    /// held certificate (for the expiry metric).
    pub fn expiries(&self) -> (Option<Secs>, Option<Secs>) {
        let leases = self
            .leases
            .iter()
            .filter_map(|l| parse(Some(&l.expiry_time)));
        let certificates = self
            .certificates
            .iter()
            .filter_map(|c| parse(Some(&c.not_after)));
        (leases.min(), certificates.min())
    }
}

/// What a held lease needs now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseWork {
    /// Nothing before its next time.
    None,
    /// Extend it (`sys/leases/renew`).
    Renew,
    /// Read new credentials and retire it (its end is near, or it has ended).
    Replace,
}

/// A fresh lease record for `source`, read at `now` with a grant of `granted` seconds.
pub fn issued(
    source: &str,
    lease_id: &str,
    granted: Secs,
    renewable: bool,
    now: Secs,
) -> LeaseStatus {
    LeaseStatus {
        source: source.to_string(),
        lease_id: lease_id.to_string(),
        renewable,
        duration_seconds: granted.max(0) as u64,
        issue_time: format(now),
        expiry_time: format(now.saturating_add(granted.max(0))),
        max_expiry_time: (!renewable).then(|| format(now.saturating_add(granted.max(0)))),
        ..Default::default()
    }
}

/// The time `l` ends for good, as far as known: its max expiry, and the expiry of its token
/// when that token is no longer kept alive (`token_alive` false).
pub fn end(l: &LeaseStatus, token_alive: bool) -> Option<Secs> {
    let max = parse(l.max_expiry_time.as_deref());
    let token = (!token_alive)
        .then(|| parse(l.token_expiry_time.as_deref()))
        .flatten();
    match (max, token) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sets `l`'s next renewal and replacement as of `now` (never before `now`).
pub fn schedule(l: &mut LeaseStatus, token_alive: bool, settings: &Settings, now: Secs) {
    let expiry = parse(Some(&l.expiry_time)).unwrap_or(now);
    let renew = l.renewable && l.max_expiry_time.is_none() && expiry > now;
    // Keep a renewal time already set (a reconcile between renewals must not push it back).
    let set = parse(l.renew_time.as_deref()).filter(|t| *t <= expiry);
    l.renew_time = renew.then(|| {
        let at = set.unwrap_or_else(|| now.saturating_add(expiry.saturating_sub(now) * 2 / 3));
        format(at.max(now))
    });
    let lead = settings.lead(Secs::try_from(l.duration_seconds).unwrap_or(Secs::MAX));
    l.replace_time = end(l, token_alive).map(|end| format(end.saturating_sub(lead).max(now)));
}

/// What `l` needs at `now`.
pub fn work(l: &LeaseStatus, now: Secs) -> LeaseWork {
    let expiry = parse(Some(&l.expiry_time));
    let replace = parse(l.replace_time.as_deref());
    if expiry.is_none_or(|e| e <= now) || replace.is_some_and(|r| r <= now) {
        return LeaseWork::Replace;
    }
    match parse(l.renew_time.as_deref()) {
        Some(r) if r <= now => LeaseWork::Renew,
        _ => LeaseWork::None,
    }
}

/// Records a renewal of `l` at `now` that granted `granted` seconds: a grant below what was
/// asked means the max TTL is reached, so the end is known.
pub fn renewed(l: &mut LeaseStatus, granted: Secs, now: Secs) {
    let expiry = now.saturating_add(granted.max(0));
    l.expiry_time = format(expiry);
    l.renew_time = None;
    let asked = Secs::try_from(l.duration_seconds).unwrap_or(Secs::MAX);
    if granted < asked {
        l.max_expiry_time = Some(format(expiry));
    }
}

/// Records that `l` cannot be renewed (the renewal was refused): it ends at its expiry.
pub fn renewal_refused(l: &mut LeaseStatus) {
    l.renew_time = None;
    l.max_expiry_time = Some(l.expiry_time.clone());
}

/// `l`, replaced: a revocation owed once the new credentials are written.
pub fn retire(l: &LeaseStatus) -> RevocationStatus {
    RevocationStatus {
        source: l.source.clone(),
        lease_id: l.lease_id.clone(),
        revoke_time: None,
        expiry_time: l.expiry_time.clone(),
    }
}

/// The new credentials are written and the workloads restarted at `now`: every revocation
/// waiting for that is due after the grace (or when its lease ends anyway, if sooner).
pub fn written(revocations: &mut [RevocationStatus], settings: &Settings, now: Secs) {
    for r in revocations.iter_mut().filter(|r| r.revoke_time.is_none()) {
        let at = now.saturating_add(settings.revoke_after);
        let at = parse(Some(&r.expiry_time)).map_or(at, |e| at.min(e));
        r.revoke_time = Some(format(at.max(now)));
    }
}

/// What a revocation needs at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevocationWork {
    /// Not yet (its grace runs, or the new credentials are not written yet).
    Wait,
    /// Revoke it now.
    Revoke,
    /// Its lease has ended anyway: drop it without a request.
    Drop,
}

/// What `r` needs at `now`.
pub fn revocation_work(r: &RevocationStatus, now: Secs) -> RevocationWork {
    if parse(Some(&r.expiry_time)).is_none_or(|e| e <= now) {
        return RevocationWork::Drop;
    }
    match parse(r.revoke_time.as_deref()) {
        Some(t) if t <= now => RevocationWork::Revoke,
        _ => RevocationWork::Wait,
    }
}

/// When a certificate valid from `not_before` to `not_after` is replaced: at `percent` of its
/// lifetime (never before `now`).
pub fn certificate_renewal(not_before: Secs, not_after: Secs, percent: u8, now: Secs) -> Secs {
    let life = i128::from(not_after.saturating_sub(not_before).max(0));
    let at = i128::from(not_before) + life * i128::from(percent.min(100)) / 100;
    (Secs::try_from(at).unwrap_or(not_after)).max(now)
}

/// True when `c` is due for replacement at `now` (its renewal time passed, or it expired).
pub fn certificate_due(c: &CertificateStatus, now: Secs) -> bool {
    let renew = parse(Some(&c.renew_time));
    let not_after = parse(Some(&c.not_after));
    renew.is_none_or(|t| t <= now) || not_after.is_none_or(|t| t <= now)
}

/// The earliest time after `now` that any of these needs work (renewal, replacement,
/// revocation, or a certificate's renewal). Work already due is done by the sync that sees
/// it, or retried with that sync's backoff; it never makes a busy loop.
pub fn next_work(
    leases: &[LeaseStatus],
    certificates: &[CertificateStatus],
    revocations: &[RevocationStatus],
    now: Secs,
) -> Option<Secs> {
    let lease_times = leases.iter().flat_map(|l| {
        [
            parse(l.renew_time.as_deref()),
            parse(l.replace_time.as_deref()),
            parse(Some(&l.expiry_time)),
        ]
    });
    let revocation_times = revocations
        .iter()
        .flat_map(|r| [parse(r.revoke_time.as_deref()), parse(Some(&r.expiry_time))]);
    let certificate_times = certificates.iter().map(|c| parse(Some(&c.renew_time)));
    lease_times
        .chain(revocation_times)
        .chain(certificate_times)
        .flatten()
        .filter(|t| *t > now)
        .min()
}

/// True when `l`'s lease id is an OpenBao path under `path` (a status edited by hand cannot
/// make the operator renew or revoke someone else's lease).
pub fn lease_id_ok(l: &LeaseStatus, path: &str) -> bool {
    crate::openbao_path::check("lease id", &l.lease_id, crate::openbao_path::Shape::Path).is_ok()
        && l.lease_id.starts_with(&format!("{path}/"))
}

/// The path a lease id sits under (without its own id).
pub fn parent(lease_id: &str) -> &str {
    lease_id.rsplit_once('/').map_or(lease_id, |(p, _)| p)
}

#[cfg(test)]
mod tests;
