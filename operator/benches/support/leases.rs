//! The benchmark's leased credentials (`KUBEBAO_BENCH_DYNAMIC`): the database engine on
//! PostgreSQL, the tenants' policy for it, leases counted in OpenBao's audit log, and the
//! deletion of every BaoSecret at the end (leases and PostgreSQL roles left).

use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams};
use kubebao_openbao::Error;
use kubebao_testbed::{Postgres, Testbed};
use reqwest::Method;

/// The database engine's role every leased-credentials BaoSecret reads.
const ROLE: &str = "bench";
/// Where the credentials are read (the engine source's `path`).
pub const CREDS: &str = "database/creds/bench";
/// Lease duration: longer than the run, so nothing is renewed during it.
pub const TTL: &str = "1h";
/// How long a lease can be renewed (also the tenants' `token_max_ttl`).
pub const MAX_TTL: &str = "24h";

/// PostgreSQL behind OpenBao's database engine with the role `bench`.
pub async fn database(bed: &Testbed) -> Postgres {
    let pg = Postgres::start(bed.dir(), "postgres-bench").await;
    pg.database_engine(bed, &[ROLE]).await;
    pg.database_role(bed, ROLE, TTL, MAX_TTL).await;
    pg
}

/// What a tenant's policy adds for the leased credentials: read them, renew and revoke their
/// leases (scoped to this one path).
pub fn policy() -> String {
    format!(
        "path \"{CREDS}\" {{ capabilities = [\"read\"] }}\n\
         path \"sys/leases/renew/{CREDS}/*\" {{ capabilities = [\"update\"] }}\n\
         path \"sys/leases/revoke/{CREDS}/*\" {{ capabilities = [\"update\"] }}\n"
    )
}

/// A request for leased credentials: an engine read or a lease renewal or revocation.
pub fn is_engine_request(path: &str) -> bool {
    path.starts_with("database/") || path.starts_with("sys/leases/")
}

/// Engine reads (`read` of `database/creds/*`) in part of the audit log.
#[derive(Clone, Copy, Debug, Default)]
pub struct Issued {
    /// Reads made.
    pub requests: usize,
    /// Reads OpenBao answered with an error.
    pub failed: usize,
}

impl Issued {
    /// Counts between two audit-log marks.
    pub fn count(log: &Path, from: u64, to: u64) -> Self {
        let mut c = Self::default();
        let reads = super::audit_entries(log, from, to);
        let reads = reads
            .iter()
            .filter(|e| e.path.starts_with("database/creds/") && e.operation == "read");
        for e in reads {
            match e.response {
                false => c.requests += 1,
                true if e.failed => c.failed += 1,
                true => {}
            }
        }
        c
    }

    /// Leases created: the reads that succeeded.
    pub fn leases(&self) -> usize {
        self.requests.saturating_sub(self.failed)
    }
}

/// What deleting every BaoSecret left behind.
#[derive(Debug)]
pub struct Deletion {
    /// From the delete requests until none was left (or the wait gave up).
    pub took: Duration,
    /// BaoSecrets still there when the wait ended.
    pub remaining: usize,
    /// Lease revocations OpenBao saw meanwhile, and how many it refused.
    pub revocations: usize,
    pub revocations_failed: usize,
    /// Leases OpenBao still lists under the credentials' path (as root), or why unknown.
    pub leases_left: Result<usize, String>,
    /// PostgreSQL roles the engine created that still exist.
    pub roles_left: usize,
}

impl Deletion {
    /// The leases left, for printing.
    pub fn leases_left_text(&self) -> String {
        match &self.leases_left {
            Ok(n) => n.to_string(),
            Err(e) => format!("unknown ({e})"),
        }
    }
}

/// Deletes every BaoSecret in `tenants` (the operator still running), waits until none is
/// left (their finalizers revoke the leases), then asks OpenBao and PostgreSQL what is left.
pub async fn delete_all(
    bed: &Testbed,
    kube: &kube::Client,
    ar: &ApiResource,
    tenants: &[String],
    pg: &Postgres,
    total: usize,
) -> Deletion {
    let log = bed.openbao().audit_log().to_path_buf();
    let (start, mark) = (Instant::now(), super::audit_mark(&log));
    eprintln!("deleting every BaoSecret");
    stream::iter(tenants)
        .for_each_concurrent(8, |ns| async move {
            Api::<DynamicObject>::namespaced_with(kube.clone(), ns, ar)
                .delete_collection(&DeleteParams::default(), &ListParams::default())
                .await
                .expect("delete BaoSecrets");
        })
        .await;
    let all: Api<DynamicObject> = Api::all_with(kube.clone(), ar);
    let deadline = start + Duration::from_secs(120) + Duration::from_millis(20 * total as u64);
    let any = ListParams::default().limit(1);
    while Instant::now() < deadline && !matches!(all.list(&any).await, Ok(l) if l.items.is_empty())
    {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let took = start.elapsed();
    let remaining = all
        .list(&ListParams::default())
        .await
        .map_or(total, |l| l.items.len());
    let revokes = super::audit_entries(&log, mark, super::audit_mark(&log));
    let revokes = revokes
        .iter()
        .filter(|e| e.path.starts_with("sys/leases/revoke/"));
    let (requests, responses): (Vec<_>, Vec<_>) = revokes.partition(|e| !e.response);
    Deletion {
        took,
        remaining,
        revocations: requests.len(),
        revocations_failed: responses.iter().filter(|e| e.failed).count(),
        leases_left: leases_listed(bed).await,
        roles_left: pg.roles_like("v-%").await,
    }
}

/// Leases OpenBao holds under the credentials' path: `LIST sys/leases/lookup/<CREDS>/` as
/// root, none (404) or how many.
pub async fn leases_listed(bed: &Testbed) -> Result<usize, String> {
    let bao = bed.openbao();
    let list = Method::from_bytes(b"LIST").expect("LIST method");
    let path = format!("sys/leases/lookup/{CREDS}/");
    match bao
        .client()
        .request(list, &path, Some(bao.root_token()), None)
        .await
    {
        Ok(body) => Ok(body
            .and_then(|b| b["data"]["keys"].as_array().map(Vec::len))
            .unwrap_or(0)),
        Err(Error::NotFound { .. }) => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}

/// BaoSecrets with an engine source that were checked at or after `since`: their
/// `status.nextRefreshTime` (set at each check to the check's time plus the refresh
/// interval, rounded to the second) is at least `since + refresh - 1 s`.
pub async fn checked_since(
    kube: &kube::Client,
    ar: &ApiResource,
    since: Timestamp,
    refresh: Duration,
) -> usize {
    let from = since + refresh - Duration::from_secs(1);
    let all: Api<DynamicObject> = Api::all_with(kube.clone(), ar);
    let list = all
        .list(&ListParams::default())
        .await
        .expect("list BaoSecrets");
    list.items
        .iter()
        .filter(|o| o.data["spec"]["sources"][0].get("engine").is_some())
        .filter_map(|o| o.data["status"]["nextRefreshTime"].as_str())
        .filter_map(|t| t.parse::<Timestamp>().ok())
        .filter(|t| *t >= from)
        .count()
}
