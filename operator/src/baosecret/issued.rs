//! The credentials a BaoSecret issues (`engine` leases, `certificate`s), through one sync:
//! renewals and revocations that are due, new credentials when the old ones near their end,
//! and the data of every such source for the Secret — from memory when this process issued
//! it, else issued anew (with overlap: the old lease is revoked only after the grace).
//!
//! Order of writes, so that a crash anywhere leaves nothing unaccounted: the finalizer before
//! the first engine call; the status (new lease, old one owed a revocation) before the Secret;
//! the revocation time only once the Secret holds the new credentials and the workloads were
//! restarted.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kubebao_openbao::{Error as BaoError, SecretString};
use reqwest::Method;
use serde_json::{Map, Value};

use super::certificate;
use super::data::Read;
use super::finalizer;
use super::held::{Held, HeldSource, Record};
use super::leases::{
    self, Book, LeaseWork, RevocationWork, Secs, Settings, format, lease_id_ok, parent, secs,
};
use super::plan::{Failure, SyncSpec, failed};
use super::sources::{CertificateRequest, EngineRequest, Kind, Source, request_hash};
use super::steps::{openbao_outcome, read_kv_source, tenant_denied};
use crate::api::BaoSecret;
use crate::api::baosecret::{EngineMethod, LeaseStatus, RevocationStatus, SourceStatus};
use crate::conditions::Outcome;
use crate::context::Context;
use crate::openbao_path::{self, Shape};
use crate::tenant::TenantIdentity;

/// How long a renewal or revocation waits after OpenBao was unavailable.
const RETRY: Secs = 10;
/// How long a revocation OpenBao refused waits before it is tried again (until the lease
/// ends anyway): a policy gap costs one request per interval, not a busy loop.
const REFUSED_RETRY: Secs = 300;

/// One sync's view of what its BaoSecret issues.
pub struct Issuer<'a> {
    ctx: &'a Context,
    store: &'a Held,
    bs: &'a BaoSecret,
    key: &'a str,
    uid: String,
    who: &'a TenantIdentity,
    settings: Settings,
    /// What this process holds for the BaoSecret (data of the current records only).
    held: HashMap<String, HeldSource>,
    /// Sources whose credentials are replaced in this sync.
    replace: HashSet<String>,
    /// A certificate source without a certificate.
    missing: bool,
    /// Something issued that the status does not record yet.
    unsaved: bool,
    finalizer_set: bool,
    now: Secs,
}

impl<'a> Issuer<'a> {
    /// The issuer for `bs` (at `key`, read as `who`), with `book` brought in line with the
    /// spec and with what this process holds.
    pub fn new(
        ctx: &'a Context,
        store: &'a Held,
        bs: &'a BaoSecret,
        key: &'a str,
        who: &'a TenantIdentity,
        spec: &SyncSpec,
        book: &mut Book,
    ) -> Self {
        let uid = bs.uid().unwrap_or_default();
        let mut me = Issuer {
            held: store.sources(key, &uid),
            ctx,
            store,
            bs,
            key,
            uid,
            who,
            settings: spec.rotation,
            replace: HashSet::new(),
            missing: false,
            unsaved: false,
            finalizer_set: finalizer::is_set(bs),
            now: leases::now(),
        };
        me.adopt(book);
        me.match_spec(book, spec);
        me.track_tokens(book);
        me
    }

    /// Takes in credentials this process issued but could not record yet (the status write
    /// failed), and forgets held data the status has moved past.
    fn adopt(&mut self, book: &mut Book) {
        let newer = |held: &str, recorded: Option<&str>| {
            recorded.is_none_or(|r| leases::parse(Some(held)) > leases::parse(Some(r)))
        };
        let mut stale = Vec::new();
        for (name, h) in &self.held {
            match &h.record {
                Record::Lease(l) => match book.lease(name) {
                    Some(b) if b.lease_id == l.lease_id => {}
                    b if newer(&l.issue_time, b.map(|b| b.issue_time.as_str())) => {
                        book.set_lease(name, Some(l.clone()));
                        self.unsaved = true;
                    }
                    _ => stale.push(name.clone()),
                },
                Record::Certificate(c) => match book.certificate(name) {
                    Some(b) if b.serial_number == c.serial_number => {}
                    b if newer(&c.not_before, b.map(|b| b.not_before.as_str())) => {
                        book.set_certificate(name, Some(c.clone()));
                        self.unsaved = true;
                    }
                    _ => stale.push(name.clone()),
                },
            }
        }
        for name in stale {
            self.held.remove(&name);
        }
        let current = |name: &str, h: &HeldSource| match &h.record {
            Record::Lease(l) => book.lease(name).is_some_and(|b| b.lease_id == l.lease_id),
            Record::Certificate(c) => book
                .certificate(name)
                .is_some_and(|b| b.serial_number == c.serial_number),
        };
        self.store.retain_sources(self.key, current);
    }

    /// Drops records of sources the spec no longer has (a lease is owed a revocation), and
    /// marks for replacement those whose request changed (who asks, or what).
    fn match_spec(&mut self, book: &mut Book, spec: &SyncSpec) {
        let kinds: HashMap<&str, &Source> =
            spec.sources.iter().map(|s| (s.name.as_str(), s)).collect();
        for l in book.leases.clone() {
            match kinds.get(l.source.as_str()).map(|s| (&s.kind, *s)) {
                Some((Kind::Engine(_), s)) => {
                    if l.request_hash != request_hash(&self.ctx.hash_key, self.who, s)
                        || !lease_id_ok(&l, s.path())
                    {
                        self.replace.insert(l.source.clone());
                    }
                }
                _ => book.set_lease(&l.source, None),
            }
        }
        let percent = self.settings.renew_at_percent;
        for c in &mut book.certificates {
            let (nb, na) = (
                leases::parse(Some(&c.not_before)),
                leases::parse(Some(&c.not_after)),
            );
            if let (Some(nb), Some(na)) = (nb, na) {
                c.renew_time = format(leases::certificate_renewal(nb, na, percent, self.now));
            }
        }
        for c in book.certificates.clone() {
            match kinds.get(c.source.as_str()).map(|s| (&s.kind, *s)) {
                Some((Kind::Certificate(_), s))
                    if c.request_hash != request_hash(&self.ctx.hash_key, self.who, s) =>
                {
                    self.replace.insert(c.source.clone());
                }
                Some((Kind::Certificate(_), _)) => {}
                _ => book.set_certificate(&c.source, None),
            }
        }
        self.missing = spec
            .sources
            .iter()
            .any(|s| matches!(s.kind, Kind::Certificate(_)) && book.certificate(&s.name).is_none());
    }

    /// Notes how long the token that created each held lease lives on (while the tenant
    /// token cache keeps it alive), and schedules each lease's renewal and replacement.
    fn track_tokens(&self, book: &mut Book) {
        let now = self.now;
        let tenants = &self.ctx.tenants;
        let mut upkeep: Option<Secs> = None;
        for l in &mut book.leases {
            let alive = self
                .held
                .get(&l.source)
                .filter(|h| h.record.id() == l.lease_id)
                .and_then(|h| Some((&h.who, h.creator.as_ref()?)))
                .and_then(|(who, token)| Some((who, tenants.remaining(who, token)?)));
            if let Some((who, left)) = alive {
                if left != Duration::MAX {
                    let expiry = now.saturating_add(secs(left));
                    let seen = leases::parse(l.token_expiry_time.as_deref());
                    if seen.is_none_or(|t| t.abs_diff(expiry) > 5) {
                        l.token_expiry_time = Some(format(expiry));
                    }
                }
                if let Some(due) = tenants.upkeep_in(who) {
                    let at = now.saturating_add(secs(due));
                    upkeep = Some(upkeep.map_or(at, |u| u.min(at)));
                }
            }
            leases::schedule(l, alive.is_some(), &self.settings, now);
        }
        book.token_upkeep = upkeep;
    }

    /// True when `name` is an engine source holding a lease (not read at a refresh).
    pub fn holds_lease(book: &Book, name: &str) -> bool {
        book.lease(name).is_some()
    }

    /// True when something needs OpenBao now (beyond the refresh of KV sources).
    pub fn due(&self, book: &Book) -> bool {
        let now = self.now;
        self.unsaved
            || self.missing
            || !self.replace.is_empty()
            || book.write_pending()
            || book.token_upkeep.is_some_and(|t| t <= now)
            || book
                .leases
                .iter()
                .any(|l| leases::work(l, now) != LeaseWork::None)
            || book
                .revocations
                .iter()
                .any(|r| leases::revocation_work(r, now) != RevocationWork::Wait)
            || book
                .certificates
                .iter()
                .any(|c| leases::certificate_due(c, now))
    }

    /// True when the Secret must be built again whatever the KV sources say: credentials to
    /// replace or record, or a write that replaced leases wait for.
    pub fn must_rebuild(&self, book: &Book) -> bool {
        self.unsaved || self.missing || !self.replace.is_empty() || book.write_pending()
    }

    /// Calls `f` with `token`; after a 403 on a token that turns out dead, once more with a
    /// fresh one. Returns the result and the token it was had with.
    async fn call<T, F, Fut>(
        &self,
        token: &SecretString,
        f: F,
    ) -> Result<(T, SecretString), BaoError>
    where
        F: Fn(SecretString) -> Fut,
        Fut: Future<Output = Result<T, BaoError>>,
    {
        match f(token.clone()).await {
            Err(e) if e.is_permission_denied() => {
                match tenant_denied(self.ctx, self.who, token).await {
                    Ok(Some(fresh)) => f(fresh.clone()).await.map(|t| (t, fresh)),
                    _ => Err(e),
                }
            }
            other => other.map(|t| (t, token.clone())),
        }
    }

    /// Renews leases that are due and revokes replaced ones whose grace is over; marks for
    /// replacement what nears its end. Fails only when OpenBao is unavailable.
    pub async fn upkeep(&mut self, book: &mut Book, token: &SecretString) -> Result<(), Outcome> {
        for i in 0..book.leases.len() {
            match leases::work(&book.leases[i], self.now) {
                LeaseWork::Renew => self.renew(&mut book.leases[i], token).await?,
                LeaseWork::Replace => {
                    self.replace.insert(book.leases[i].source.clone());
                }
                LeaseWork::None => {}
            }
        }
        for l in &mut book.leases {
            let alive = self.alive(l);
            leases::schedule(l, alive, &self.settings, self.now);
            if leases::work(l, self.now) == LeaseWork::Replace {
                self.replace.insert(l.source.clone());
            }
        }
        for c in &book.certificates {
            if leases::certificate_due(c, self.now) {
                self.replace.insert(c.source.clone());
            }
        }
        let mut kept = Vec::with_capacity(book.revocations.len());
        for mut r in std::mem::take(&mut book.revocations) {
            match leases::revocation_work(&r, self.now) {
                RevocationWork::Drop => {}
                RevocationWork::Wait => kept.push(r),
                RevocationWork::Revoke => {
                    if !self.revoke(&mut r, token).await? {
                        kept.push(r);
                    }
                }
            }
        }
        book.revocations = kept;
        Ok(())
    }

    /// True while the token that created `l` is kept alive by the tenant token cache.
    fn alive(&self, l: &LeaseStatus) -> bool {
        self.held
            .get(&l.source)
            .filter(|h| h.record.id() == l.lease_id)
            .and_then(|h| Some((&h.who, h.creator.as_ref()?)))
            .is_some_and(|(who, t)| self.ctx.tenants.remaining(who, t).is_some())
    }

    /// Renews `l` (asking for its first grant). A refusal makes its end known (it is replaced
    /// before it); only an unavailable OpenBao fails the sync.
    async fn renew(&self, l: &mut LeaseStatus, token: &SecretString) -> Result<(), Outcome> {
        let asked = Duration::from_secs(l.duration_seconds);
        let bao = self.who.client(&self.ctx.bao);
        let id = l.lease_id.clone();
        let renewed = self
            .call(token, |t| {
                let (bao, id) = (bao.clone(), id.clone());
                async move { bao.renew_lease_scoped(&t, &id, asked).await }
            })
            .await;
        match self.ctx.metrics.openbao("renew_lease", renewed) {
            Ok((answer, _)) => {
                let granted = Secs::try_from(answer.lease_duration).unwrap_or(Secs::MAX);
                leases::renewed(l, granted, leases::now());
                Ok(())
            }
            Err(e) if e.is_unavailable() => {
                l.renew_time = Some(format(self.now.saturating_add(RETRY)));
                Err(failed(false, "OpenBaoUnavailable", e.to_string()))
            }
            Err(e) => {
                leases::renewal_refused(l);
                if !e.is_permission_denied() {
                    // 400 "lease not found": it was revoked or expired; replace it now.
                    l.max_expiry_time = Some(format(self.now));
                }
                let note = format!(
                    "cannot renew lease {} of source {}: {e}; new credentials replace it before it ends (grant the role's policy update on sys/leases/renew/{}/*)",
                    l.lease_id,
                    l.source,
                    parent(&l.lease_id)
                );
                self.ctx
                    .event(self.bs, true, "LeaseRenewalFailed", note)
                    .await;
                Ok(())
            }
        }
    }

    /// Revokes the replaced lease `r`: true when it is gone. A refusal is retried a little
    /// later until the lease ends anyway; only an unavailable OpenBao fails the sync.
    async fn revoke(
        &self,
        r: &mut RevocationStatus,
        token: &SecretString,
    ) -> Result<bool, Outcome> {
        if openbao_path::check("lease id", &r.lease_id, Shape::Path).is_err() {
            tracing::warn!(baosecret = %self.key, lease = %r.lease_id, "not revoking a lease id that is not an OpenBao path");
            return Ok(true);
        }
        let bao = self.who.client(&self.ctx.bao);
        let id = r.lease_id.clone();
        let revoked = self
            .call(token, |t| {
                let (bao, id) = (bao.clone(), id.clone());
                async move { bao.revoke_lease_scoped(&t, &id).await }
            })
            .await;
        match self.ctx.metrics.openbao("revoke_lease", revoked) {
            Ok(_) => Ok(true),
            Err(e) if e.is_unavailable() => {
                r.revoke_time = Some(format(self.now.saturating_add(RETRY)));
                Err(failed(false, "OpenBaoUnavailable", e.to_string()))
            }
            Err(e) => {
                r.revoke_time = Some(format(self.now.saturating_add(REFUSED_RETRY)));
                tracing::warn!(baosecret = %self.key, lease = %r.lease_id, error = %e, "cannot revoke a replaced lease; retrying until it ends");
                Ok(false)
            }
        }
    }

    /// Every source's data, in the spec's order, and what it was built from: KV sources read,
    /// issued credentials from memory when current, else issued now.
    pub async fn read_all(
        &mut self,
        book: &mut Book,
        token: &SecretString,
        sources: &[Source],
    ) -> Result<(Vec<Read>, Vec<SourceStatus>), Outcome> {
        let mut read = Vec::with_capacity(sources.len());
        let mut status = Vec::with_capacity(sources.len());
        for source in sources {
            let (data, version) = match &source.kind {
                Kind::Kv(kv) => {
                    let (data, version) = read_kv_source(self.ctx, token, kv, self.who).await?;
                    (data, version)
                }
                Kind::Engine(req) => (self.engine_data(book, token, source, req).await?, None),
                Kind::Certificate(req) => {
                    (self.certificate_data(book, token, source, req).await?, None)
                }
            };
            status.push(SourceStatus {
                name: source.name.clone(),
                path: source.path().to_string(),
                version,
            });
            read.push((source.name.clone(), data));
        }
        Ok((read, status))
    }

    /// The data held for `name` when it is still current and not being replaced.
    fn current(&self, name: &str, id: Option<&str>) -> Option<Map<String, Value>> {
        let h = self.held.get(name)?;
        (!self.replace.contains(name) && Some(h.record.id()) == id).then(|| h.data.as_ref().clone())
    }

    /// An engine source's data: the held lease's, else a new call.
    async fn engine_data(
        &mut self,
        book: &mut Book,
        token: &SecretString,
        source: &Source,
        req: &EngineRequest,
    ) -> Result<Map<String, Value>, Outcome> {
        let id = book.lease(&source.name).map(|l| l.lease_id.as_str());
        if let Some(data) = self.current(&source.name, id) {
            return Ok(data);
        }
        self.ensure_finalizer().await?;
        let method = match req.method {
            EngineMethod::Get => Method::GET,
            EngineMethod::Put => Method::PUT,
            EngineMethod::Post => Method::POST,
        };
        let bao = self.who.client(&self.ctx.bao);
        let called = self
            .call(token, |t| {
                let (bao, method) = (bao.clone(), method.clone());
                async move { bao.engine_call(&t, method, &req.path, &req.args).await }
            })
            .await;
        let (answer, creator) = self
            .ctx
            .metrics
            .openbao("engine_call", called)
            .map_err(|e| openbao_outcome(&e, self.who, &req.path))?;
        let data = answer.data.clone().unwrap_or_default();
        if answer.lease_id.is_empty() || answer.lease_duration == 0 {
            book.set_lease(&source.name, None);
            return Ok(data);
        }
        let lease = self.record_lease(source, &answer, &creator)?;
        self.keep(source, &data, Some(creator), Record::Lease(lease.clone()));
        let replaced = book.lease(&source.name).is_some();
        book.set_lease(&source.name, Some(lease.clone()));
        self.announce_issue(&source.name, &lease.lease_id, replaced)
            .await;
        Ok(data)
    }

    /// The record of a lease just read for `source` with `creator`.
    fn record_lease(
        &self,
        source: &Source,
        answer: &kubebao_openbao::Secret,
        creator: &SecretString,
    ) -> Result<LeaseStatus, Outcome> {
        let now = leases::now();
        let granted = Secs::try_from(answer.lease_duration).unwrap_or(Secs::MAX);
        let mut l = leases::issued(
            &source.name,
            &answer.lease_id,
            granted,
            answer.renewable,
            now,
        );
        l.request_hash = request_hash(&self.ctx.hash_key, self.who, source);
        if !lease_id_ok(&l, source.path()) {
            return Err(failed(
                true,
                "OpenBaoError",
                format!(
                    "OpenBao answered {} with lease {:?}, which is not under that path; KubeBao renews and revokes only leases under the path it read",
                    source.path(),
                    l.lease_id
                ),
            ));
        }
        if let Some(left) = self.ctx.tenants.remaining(self.who, creator)
            && left != Duration::MAX
        {
            l.token_expiry_time = Some(format(now.saturating_add(secs(left))));
        }
        leases::schedule(&mut l, true, &self.settings, now);
        Ok(l)
    }

    /// A certificate source's data: the held certificate's, else a new one.
    async fn certificate_data(
        &mut self,
        book: &mut Book,
        token: &SecretString,
        source: &Source,
        req: &CertificateRequest,
    ) -> Result<Map<String, Value>, Outcome> {
        let id = book
            .certificate(&source.name)
            .map(|c| c.serial_number.as_str());
        if let Some(data) = self.current(&source.name, id) {
            return Ok(data);
        }
        let body = certificate::request_body(req);
        let bao = self.who.client(&self.ctx.bao);
        let called = self
            .call(token, |t| {
                let (bao, body) = (bao.clone(), body.clone());
                async move { bao.engine_call(&t, Method::POST, &req.path, &body).await }
            })
            .await;
        let (answer, _) = self
            .ctx
            .metrics
            .openbao("issue_certificate", called)
            .map_err(|e| openbao_outcome(&e, self.who, &req.path))?;
        let percent = self.settings.renew_at_percent;
        let hash = request_hash(&self.ctx.hash_key, self.who, source);
        let issued = certificate::from_answer(
            &source.name,
            answer.data.as_ref().unwrap_or(&Map::new()),
            percent,
            leases::now(),
            hash,
        )
        .map_err(|m| {
            failed(
                true,
                "OpenBaoError",
                format!(
                    "{} answered a certificate KubeBao cannot use: {m}",
                    req.path
                ),
            )
        })?;
        self.keep(
            source,
            &issued.data,
            None,
            Record::Certificate(issued.status.clone()),
        );
        let replaced = book.certificate(&source.name).is_some();
        let serial = issued.status.serial_number.clone();
        book.set_certificate(&source.name, Some(issued.status));
        self.announce_issue(&source.name, &serial, replaced).await;
        Ok(issued.data)
    }

    /// Holds what was just issued for `source` in memory, to be recorded in the status.
    fn keep(
        &mut self,
        source: &Source,
        data: &Map<String, Value>,
        creator: Option<SecretString>,
        record: Record,
    ) {
        let held = HeldSource {
            who: self.who.clone(),
            data: Arc::new(data.clone()),
            creator,
            record,
        };
        self.store
            .keep(self.key, &self.uid, &source.name, held.clone());
        self.held.insert(source.name.clone(), held);
        self.replace.remove(&source.name);
        self.unsaved = true;
    }

    /// A Normal event for credentials issued to replace others (a first issue is in the
    /// status already).
    async fn announce_issue(&self, source: &str, id: &str, replaced: bool) {
        if !replaced {
            return;
        }
        let note = format!(
            "source {source}: new credentials issued ({id}); the Secret is written and the rollout targets restarted before the old ones go"
        );
        self.ctx
            .event(self.bs, false, "CredentialsReplaced", note)
            .await;
    }

    /// Adds the finalizer (before the first engine call: every lease is then revoked when the
    /// BaoSecret is deleted).
    async fn ensure_finalizer(&mut self) -> Result<(), Outcome> {
        if self.finalizer_set {
            return Ok(());
        }
        finalizer::add(self.ctx, self.bs).await.map_err(|e| {
            failed(
                false,
                "KubernetesError",
                format!("cannot add the finalizer {}: {e}", finalizer::FINALIZER),
            )
        })?;
        self.finalizer_set = true;
        Ok(())
    }

    /// Records what was issued in the status before the Secret is written (a crash then
    /// still leaves every lease known: renewed, or revoked).
    pub async fn save(&mut self, book: &Book, ns: &str) -> Result<(), Failure> {
        if !self.unsaved {
            return Ok(());
        }
        let mut status = self.bs.status.clone().unwrap_or_default();
        book.record(&mut status);
        super::write_status(self.ctx, self.bs, ns, &status)
            .await
            .map_err(|e| {
                failed(
                    false,
                    "StatusWriteFailed",
                    format!("cannot record the issued credentials in the status: {e}"),
                )
            })?;
        self.unsaved = false;
        Ok(())
    }

    /// The Secret holds the new credentials and the workloads were restarted: the grace of
    /// every replaced lease starts now.
    pub fn written(&self, book: &mut Book) {
        leases::written(&mut book.revocations, &self.settings, leases::now());
    }
}
