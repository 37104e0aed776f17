//! What one BaoSecret sync reads and writes, decided without I/O: from the spec, the last check
//! (in memory), the observed target Secret and, after the read, the data from OpenBao. The
//! steps in `steps.rs` carry it out.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use sha2::Sha256;

use super::leases::Settings;
use super::sources::{self, Kind, SINGLE, Source};
use super::template::{self, TemplateError};
use super::{KEYS_ANNOTATION, LABEL, MERGE_ANNOTATION};
use crate::api::baosecret::{BaoSecretSpec, MAX_TEMPLATE_KEYS, MAX_TEMPLATE_TEXT, SourceStatus};
use crate::api::checks::{self, TargetTypeError};
use crate::api::{BaoSecret, BaoSecretStatus, CreationPolicy};
use crate::conditions::Outcome;
use crate::openbao_path::{self, Shape};
use kubebao_openbao::duration::{self, Bounds};

/// How often OpenBao is checked when the spec does not say.
const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);

/// The last successful check of one BaoSecret (in memory: a restart costs one read each).
#[derive(Clone, Debug)]
pub struct Check {
    /// When it was made.
    pub at: Instant,
    /// The BaoSecret's uid (a re-created BaoSecret starts afresh).
    pub uid: String,
    /// The BaoSecret's generation that was synced.
    pub generation: Option<i64>,
    /// Data hash written (see [`data_hash`]).
    pub hash: String,
    /// What each source held (name, path, KV v2 version).
    pub sources: Vec<SourceStatus>,
    /// The role may not read KV metadata: read data directly.
    pub metadata_denied: bool,
    /// resourceVersion of the Secret as last written or verified by us.
    pub secret_rv: Option<String>,
}

/// A failed sync: `stalled` when only a change by someone can fix it, else retried.
pub fn failed(stalled: bool, reason: &str, message: impl Into<String>) -> Outcome {
    let (reason, message) = (reason.to_string(), message.into());
    if stalled {
        Outcome::Stalled { reason, message }
    } else {
        Outcome::Retrying { reason, message }
    }
}

/// Most bytes of data (keys and values) in one Kubernetes Secret (the API server's limit).
pub const MAX_SECRET_BYTES: usize = 1024 * 1024;

/// How long a sync that Kubernetes will never accept waits before it is tried again, unless
/// the spec or the target Secret changes first (each attempt reads the data from OpenBao).
pub const REJECTED_RETRY: Duration = Duration::from_secs(3600);

/// Why a sync failed, and whether retrying soon could help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The condition to report.
    pub outcome: Outcome,
    /// Kubernetes will never accept what the sync would write as it is: said once (Stalled),
    /// tried again only on a change or after [`REJECTED_RETRY`], never in a backoff loop.
    pub permanent: bool,
}

impl From<Outcome> for Failure {
    fn from(outcome: Outcome) -> Self {
        Failure {
            outcome,
            permanent: false,
        }
    }
}

/// A sync Kubernetes will never accept as it is (too large, an invalid key, a rejected write):
/// only a change of the spec or of the data in OpenBao can fix it.
pub fn rejected(reason: &str, message: impl Into<String>) -> Failure {
    Failure {
        outcome: failed(true, reason, message),
        permanent: true,
    }
}

/// The size of Secret data as Kubernetes counts it: keys and values.
pub fn data_size(data: &BTreeMap<String, Vec<u8>>) -> usize {
    data.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Refuses data no Kubernetes Secret can hold (more than [`MAX_SECRET_BYTES`]), before it is
/// sent; the message names the size.
pub fn check_size(target: &str, data: &BTreeMap<String, Vec<u8>>) -> Result<(), Failure> {
    let size = data_size(data);
    if size <= MAX_SECRET_BYTES {
        return Ok(());
    }
    Err(rejected(
        "SecretTooLarge",
        format!(
            "the data for Secret {target} is {size} bytes (keys and values) and a Kubernetes Secret holds at most {MAX_SECRET_BYTES} bytes (1 MiB); select fewer keys with spec.keys, or keep large files out of OpenBao KV"
        ),
    ))
}

/// The parts of a BaoSecret's spec that are checked before anything is read.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncSpec {
    /// How often OpenBao is checked.
    pub refresh: Duration,
    /// What is read, in the spec's order (`secretPath`: one source named [`SINGLE`]).
    pub sources: Vec<Source>,
    /// When issued credentials are replaced and revoked (`spec.rotation`).
    pub rotation: Settings,
}

/// Checks every spec field a sync uses before anything is read or written: the target's
/// namespace and type, every name, `refreshInterval`, the sources and the templates. Each
/// refusal names the field (the CRD schema refuses the same values; this covers objects
/// written around it).
pub fn sync_spec(spec: &BaoSecretSpec, ns: &str) -> Result<SyncSpec, Outcome> {
    if let Some(target_ns) = &spec.target.namespace
        && target_ns != ns
    {
        return Err(failed(
            true,
            "CrossNamespaceTarget",
            format!(
                "target.namespace {target_ns:?} is not this BaoSecret's namespace {ns:?}; a BaoSecret writes only into its own namespace (remove target.namespace or create the BaoSecret in {target_ns:?})"
            ),
        ));
    }
    check_names(spec).map_err(|m| failed(true, "InvalidSpec", m))?;
    if let Some(type_) = &spec.target.type_ {
        checks::target_type("spec.target.type", type_).map_err(|e| match e {
            TargetTypeError::Forbidden(m) => failed(true, "ForbiddenTargetType", m),
            TargetTypeError::Invalid(m) => failed(true, "InvalidSpec", m),
        })?;
    }
    let refresh = refresh_interval(spec.refresh_interval.as_deref())?;
    let sources = sources::sources(spec).map_err(|m| failed(true, "InvalidSpec", m))?;
    check_keys(spec, &sources).map_err(|m| failed(true, "InvalidSpec", m))?;
    check_template(spec)?;
    let rotation =
        Settings::from_spec(spec.rotation.as_ref()).map_err(|m| failed(true, "InvalidSpec", m))?;
    Ok(SyncSpec {
        refresh,
        sources,
        rotation,
    })
}

/// `keys` and `template`: not both; each `keys[].source` one of the sources.
fn check_keys(spec: &BaoSecretSpec, sources: &[Source]) -> Result<(), String> {
    if spec.keys.is_some() && spec.template.is_some() {
        return Err(
            "spec.keys and spec.template are both set: a template names its own values, so set one of them"
                .into(),
        );
    }
    for (i, k) in spec.keys.iter().flatten().enumerate() {
        if let Some(name) = &k.source
            && !sources.iter().any(|s| &s.name == name)
        {
            let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
            return Err(format!(
                "spec.keys[{i}].source {name:?} is not one of the sources {names:?}"
            ));
        }
    }
    Ok(())
}

/// `template.data`: Secret keys, bounded texts, and every text parses (a syntax error is a
/// `TemplateError` before anything is read).
fn check_template(spec: &BaoSecretSpec) -> Result<(), Outcome> {
    let Some(t) = &spec.template else {
        return Ok(());
    };
    let invalid = |m: String| failed(true, "InvalidSpec", m);
    if t.data.is_empty() || t.data.len() > MAX_TEMPLATE_KEYS {
        return Err(invalid(format!(
            "spec.template.data holds {} keys: give between 1 and {MAX_TEMPLATE_KEYS}",
            t.data.len()
        )));
    }
    for (key, text) in &t.data {
        checks::secret_key("spec.template.data key", key).map_err(invalid)?;
        if text.len() > MAX_TEMPLATE_TEXT {
            return Err(invalid(format!(
                "spec.template.data[{key:?}] is {} bytes long: at most {MAX_TEMPLATE_TEXT}",
                text.len()
            )));
        }
    }
    template::check(&t.data).map_err(|e| match e {
        TemplateError::Failed(m) | TemplateError::TooLarge(m) => failed(true, "TemplateError", m),
    })
}

/// The names in `spec`: Kubernetes names, Secret keys, OpenBao role and mount.
fn check_names(spec: &BaoSecretSpec) -> Result<(), String> {
    checks::kube_name("spec.target.name", &spec.target.name)?;
    if let Some(sa) = &spec.service_account_name {
        checks::kube_name("spec.serviceAccountName", sa)?;
    }
    if let Some(role) = &spec.role {
        openbao_path::check("spec.role", role, Shape::Name).map_err(|e| e.to_string())?;
    }
    if let Some(mount) = &spec.auth_mount {
        openbao_path::check("spec.authMount", mount, Shape::Path).map_err(|e| e.to_string())?;
    }
    if let Some(ns) = &spec.openbao_namespace {
        openbao_path::check("spec.openbaoNamespace", ns, Shape::Path).map_err(|e| e.to_string())?;
    }
    for (i, t) in spec.rollout_restart_targets.iter().flatten().enumerate() {
        checks::kube_name(&format!("spec.rolloutRestartTargets[{i}].name"), &t.name)?;
    }
    for (i, k) in spec.keys.iter().flatten().enumerate() {
        if let Some(to) = &k.to {
            checks::secret_key(&format!("spec.keys[{i}].to"), to)?;
        }
    }
    Ok(())
}

/// `refreshInterval`: one hour when unset, at least one second.
pub fn refresh_interval(spec: Option<&str>) -> Result<Duration, Outcome> {
    let Some(s) = spec else {
        return Ok(DEFAULT_REFRESH);
    };
    duration::parse(s, REFRESH_BOUNDS)
        .map_err(|e| failed(true, "InvalidSpec", format!("refreshInterval: {e}")))
}

/// `refreshInterval`: at least a second (OpenBao's load), at most a year.
const REFRESH_BOUNDS: Bounds =
    Bounds::new(Duration::from_secs(1), Duration::from_secs(8760 * 3600));

/// HMAC-SHA256 of sorted key/value pairs.
pub fn data_hash(key: &[u8], data: &BTreeMap<String, Vec<u8>>) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for (k, v) in data {
        mac.update(&(k.len() as u64).to_be_bytes());
        mac.update(k.as_bytes());
        mac.update(&(v.len() as u64).to_be_bytes());
        mac.update(v);
    }
    format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
}

/// The keys of `secret` this operator manages (see [`KEYS_ANNOTATION`]); a missing key gets
/// a value no real data has, so its hash differs.
fn managed_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let keys: Vec<&str> = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(KEYS_ANNOTATION))
        .map(|k| k.split(',').filter(|k| !k.is_empty()).collect())
        .unwrap_or_default();
    let data = secret.data.clone().unwrap_or_default();
    keys.into_iter()
        .map(|k| {
            (
                k.to_string(),
                data.get(k)
                    .map(|b| b.0.clone())
                    .unwrap_or_else(|| b"\0missing".to_vec()),
            )
        })
        .collect()
}

/// The target Secret as observed before a sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The metadata cache shows the resourceVersion we last wrote or verified: not read.
    Unchanged {
        /// That resourceVersion.
        rv: Option<String>,
    },
    /// Read from the API: there is no such Secret.
    Missing,
    /// Read from the API.
    Found {
        /// The BaoSecret named by its [`LABEL`], if any.
        owner: Option<String>,
        /// The uids of the BaoSecrets in its ownerReferences (set by `creationPolicy: Owner`).
        owned_by: Vec<String>,
        /// The BaoSecrets its [`MERGE_ANNOTATION`] allows to merge into it.
        merge_from: Vec<String>,
        /// Its type.
        type_: Option<String>,
        /// Hash of the keys it says we manage.
        hash: String,
        /// Its resourceVersion.
        rv: Option<String>,
    },
}

impl Target {
    /// The target as read from the API (`None`: not found).
    pub fn read(secret: Option<&Secret>, hash_key: &[u8]) -> Target {
        match secret {
            None => Target::Missing,
            Some(s) => Target::Found {
                owner: s.labels().get(LABEL).cloned(),
                owned_by: s
                    .owner_references()
                    .iter()
                    .filter(|o| o.kind == "BaoSecret" && o.api_version.starts_with("kubebao.io/"))
                    .map(|o| o.uid.clone())
                    .collect(),
                merge_from: s
                    .annotations()
                    .get(MERGE_ANNOTATION)
                    .map(|list| {
                        list.split(',')
                            .map(|n| n.trim().to_string())
                            .filter(|n| !n.is_empty())
                            .collect()
                    })
                    .unwrap_or_default(),
                type_: s.type_.clone(),
                hash: data_hash(hash_key, &managed_data(s)),
                rv: s.resource_version(),
            },
        }
    }
}

/// True when the cached resourceVersion is the one we last wrote or verified: no API read.
pub fn unchanged(last: Option<&Check>, cached_rv: Option<&str>) -> bool {
    cached_rv.is_some() && last.and_then(|c| c.secret_rv.as_deref()) == cached_rv
}

/// True when `target` is this BaoSecret's own Secret: it carries the [`LABEL`] naming it, or
/// (label removed by someone) an ownerReference to it.
fn is_mine(bs: &BaoSecret, target: &Target) -> bool {
    let Target::Found {
        owner, owned_by, ..
    } = target
    else {
        return false;
    };
    owner.as_deref() == Some(bs.name_any().as_str())
        || bs.uid().is_some_and(|uid| owned_by.contains(&uid))
}

/// Refuses a Secret this BaoSecret may not write. Creating a BaoSecret must not give more than
/// creating the Secret would: someone else's Secret is taken over only when it opts in itself
/// (annotation [`MERGE_ANNOTATION`] naming this BaoSecret, with `Merge`), and never one whose
/// type makes Kubernetes act on it.
fn may_write(bs: &BaoSecret, target: &Target) -> Result<(), Outcome> {
    let policy = bs.spec.target.creation_policy;
    let name = &bs.spec.target.name;
    let me = bs.name_any();
    let Target::Found {
        merge_from, type_, ..
    } = target
    else {
        return match (target, policy) {
            (Target::Missing, CreationPolicy::Merge) => Err(failed(
                false,
                "TargetNotFound",
                format!(
                    "creationPolicy Merge needs an existing Secret {name}; create it or use Owner"
                ),
            )),
            _ => Ok(()),
        };
    };
    if let Some(type_) = type_
        && let Err(TargetTypeError::Forbidden(m)) =
            checks::target_type(&format!("the type of Secret {name}"), type_)
    {
        return Err(failed(true, "ForbiddenTargetType", m));
    }
    match policy {
        CreationPolicy::Merge if !merge_from.contains(&me) => Err(failed(
            true,
            "MergeNotAllowed",
            format!(
                "Secret {name} does not allow BaoSecret {me} to merge into it; whoever may edit that Secret can allow it: kubectl annotate secret {name} {MERGE_ANNOTATION}={me}"
            ),
        )),
        CreationPolicy::Merge => Ok(()),
        _ if !is_mine(bs, target) => Err(failed(
            true,
            "TargetExists",
            format!(
                "Secret {name} exists and is not managed by this BaoSecret; delete it, rename the target, or use creationPolicy: Merge with the annotation {MERGE_ANNOTATION}={me} on the Secret"
            ),
        )),
        _ => Ok(()),
    }
}

/// What a successful sync did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synced {
    /// What the Secret's data was built from (each source's name, path, KV v2 version).
    pub sources: Vec<SourceStatus>,
    /// Data hash.
    pub hash: String,
    /// The Secret was written.
    pub wrote: bool,
    /// OpenBao was asked (false: the last check is recent enough).
    pub checked: bool,
    /// When to check again.
    pub next: Duration,
}

/// The first thing to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Checked within the refresh interval and nothing changed: no OpenBao request.
    UpToDate(Synced),
    /// Ask OpenBao for every source's KV v2 metadata (stopping at the first new version);
    /// read the data only if a version moved.
    CheckMetadata {
        /// API paths of the metadata, in the sources' order.
        paths: Vec<String>,
    },
    /// Read the data.
    ReadData,
}

/// What is known before OpenBao answers, and what to remember afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Data hash of the last check, else of the status.
    pub known_hash: Option<String>,
    /// Each source with the KV version of the last check, else of the status.
    pub known: Vec<SourceStatus>,
    /// The Secret holds what we last wrote and the spec's generation was synced already.
    pub settled: bool,
    /// The role may not read KV metadata.
    pub metadata_denied: bool,
    /// The Secret's resourceVersion as observed (or written, once written).
    pub secret_rv: Option<String>,
    /// How often OpenBao is checked.
    pub refresh: Duration,
    /// The sources whose KV v2 metadata is checked (indices into `known`), in order.
    pub metadata_of: Vec<usize>,
    uid: String,
    generation: Option<i64>,
}

/// Decides what to ask OpenBao, if anything, for `bs` as of `now`. `held` names the engine
/// sources that hold a lease: like certificates, they are not read at a refresh (reading
/// would issue new credentials); an engine source without a lease is read every time.
pub fn plan(
    bs: &BaoSecret,
    last: Option<&Check>,
    target: &Target,
    spec: &SyncSpec,
    now: Instant,
    held: &dyn Fn(&str) -> bool,
) -> Result<(Decision, Plan), Outcome> {
    may_write(bs, target)?;
    let status = bs.status.clone().unwrap_or_default();
    let generation = bs.metadata.generation;
    let known_hash = last.map(|c| c.hash.clone()).or(status.data_hash.clone());
    let generation_current = match last {
        Some(c) => c.generation == generation,
        None => status.observed_generation == generation,
    };
    // A Secret whose label was removed is rewritten (the write restores the label).
    let labelled = |owner: &Option<String>| owner.as_deref() == Some(bs.name_any().as_str());
    let (intact, secret_rv) = match target {
        Target::Unchanged { rv } => (true, rv.clone()),
        Target::Missing => (false, None),
        Target::Found {
            hash, rv, owner, ..
        } => (
            Some(hash) == known_hash.as_ref() && labelled(owner),
            rv.clone(),
        ),
    };
    // Every read source on KV v2: metadata first. A KV v1 source has none, so its data is
    // read, as is an engine source without a lease.
    let mut metadata_of = Vec::new();
    let mut metadata = Some(Vec::new());
    for (i, s) in spec.sources.iter().enumerate() {
        match &s.kind {
            Kind::Kv(kv) => match (&kv.metadata_path, metadata.as_mut()) {
                (Some(path), Some(paths)) => {
                    paths.push(path.clone());
                    metadata_of.push(i);
                }
                _ => metadata = None,
            },
            Kind::Engine(_) if !held(&s.name) => metadata = None,
            Kind::Engine(_) | Kind::Certificate(_) => {}
        }
    }
    let plan = Plan {
        known: known_sources(spec, last, &status),
        known_hash,
        settled: intact && generation_current,
        metadata_denied: last.is_some_and(|c| c.metadata_denied),
        secret_rv,
        refresh: spec.refresh,
        metadata_of,
        uid: bs.uid().unwrap_or_default(),
        generation,
    };
    let decision = match (last, metadata) {
        (Some(c), _) if plan.settled && now.saturating_duration_since(c.at) < plan.refresh => {
            Decision::UpToDate(Synced {
                sources: c.sources.clone(),
                hash: c.hash.clone(),
                wrote: false,
                checked: false,
                next: plan.refresh - now.saturating_duration_since(c.at),
            })
        }
        (_, Some(paths)) if plan.settled && !plan.metadata_denied => {
            Decision::CheckMetadata { paths }
        }
        _ => Decision::ReadData,
    };
    Ok((decision, plan))
}

/// Each source of `spec` with the KV version the Secret holds: from the last check, else from
/// the status (`status.sources`, or `kvVersion` as an operator before sources wrote it). A
/// source whose path changed has none.
fn known_sources(
    spec: &SyncSpec,
    last: Option<&Check>,
    status: &BaoSecretStatus,
) -> Vec<SourceStatus> {
    let held = last.map_or(&status.sources, |c| &c.sources);
    spec.sources
        .iter()
        .map(|s| {
            let path = s.path();
            let version = match held.iter().find(|h| h.name == s.name && h.path == path) {
                Some(h) => h.version,
                None if last.is_none() && held.is_empty() && s.name == SINGLE => status.kv_version,
                None => None,
            };
            SourceStatus {
                name: s.name.clone(),
                path: path.to_string(),
                version,
            }
        })
        .collect()
}

/// What the KV v2 metadata said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metadata {
    /// The current version (if the answer had one).
    Version(Option<u64>),
    /// The role may not read metadata.
    Denied,
}

/// What to do with data read from OpenBao.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WritePlan {
    /// Write the Secret.
    pub write: bool,
    /// Restart the rollout targets.
    pub restart: bool,
}

impl Plan {
    /// True when `metadata` of the `i`th metadata path shows the version the Secret holds
    /// (check the next one); false when the data must be read.
    pub fn current(&self, i: usize, metadata: Metadata) -> bool {
        let known = self
            .metadata_of
            .get(i)
            .and_then(|&s| self.known.get(s))
            .and_then(|s| s.version);
        matches!(metadata, Metadata::Version(Some(v)) if known == Some(v))
    }

    /// After the sources' metadata (in order, up to the first not [`Plan::current`]): `Some`
    /// when every source is at the version the Secret holds (no data read), `None` to read the
    /// data. A denied role reads data directly from then on (one request per source and
    /// refresh).
    pub fn after_metadata(&mut self, metadata: &[Metadata]) -> Option<Synced> {
        if metadata.contains(&Metadata::Denied) {
            self.metadata_denied = true;
            return None;
        }
        let all_current = metadata.len() == self.metadata_of.len()
            && metadata
                .iter()
                .enumerate()
                .all(|(i, m)| self.current(i, *m));
        all_current.then(|| Synced {
            sources: self.known.clone(),
            hash: self.known_hash.clone().unwrap_or_default(),
            wrote: false,
            checked: true,
            next: self.refresh,
        })
    }

    /// After reading data with hash `hash`: write unless the Secret already holds it; restart
    /// workloads only when the data changed from a known previous hash.
    pub fn write_plan(&self, hash: &str) -> WritePlan {
        let same = self.known_hash.as_deref() == Some(hash);
        WritePlan {
            write: !(self.settled && same),
            restart: self.known_hash.is_some() && !same,
        }
    }

    /// The check to remember after a sync that ended with `synced`, made at `at`.
    pub fn check(&self, synced: &Synced, at: Instant) -> Check {
        Check {
            at,
            uid: self.uid.clone(),
            generation: self.generation,
            hash: synced.hash.clone(),
            sources: synced.sources.clone(),
            metadata_denied: self.metadata_denied,
            secret_rv: self.secret_rv.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
