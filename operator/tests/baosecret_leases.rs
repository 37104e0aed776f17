//! BaoSecrets fed by secrets engines that issue credentials: leased database credentials
//! (PostgreSQL through OpenBao's database engine) and PKI certificates. The real
//! `kubebao-operator` binary, under the chart's RBAC, against the test bed's kube-apiserver and
//! OpenBao; PostgreSQL from Debian's packages with password authentication, so an expired or
//! revoked credential really fails to connect.
//!
//! The tests share one operator; the one that kills and restarts it runs alone (`GATE`).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject};
use kubebao_testbed::Postgres;
use kubebao_testbed::conditions::wait_condition;
use kubebao_testbed::{Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::json;
use tokio::sync::{Mutex, OnceCell, RwLock};

#[path = "baosecret_leases/support.rs"]
mod support;

use support::*;

const WAIT: Duration = Duration::from_secs(60);
/// The operator's own OpenBao policy: policies and roles only, no secrets engine at all.
const OPERATOR_POLICY: &str = r#"
path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "auth/kubernetes/role/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;
/// The operator's namespace (its `--namespace`, where the chart's RBAC is bound).
const OPERATOR_NS: &str = "kubebao-leases";

struct Setup {
    bed: &'static Testbed,
    /// The operator and its metrics port.
    operator: Mutex<(Component, u16)>,
    token_file: PathBuf,
    pg: Postgres,
}

static SETUP: OnceCell<Setup> = OnceCell::const_new();
/// Held for reading by every test; the restart test holds it for writing.
static GATE: RwLock<()> = RwLock::const_new(());

async fn setup() -> &'static Setup {
    SETUP
        .get_or_init(|| async {
            let bed = Testbed::shared().await;
            bed.enable_kubernetes_auth().await;
            let bao = bed.openbao();
            bao.root(
                Method::POST,
                "sys/policies/acl/kubebao-operator",
                Some(json!({"policy": OPERATOR_POLICY})),
            )
            .await;
            let token = bao
                .root(
                    Method::POST,
                    "auth/token/create",
                    Some(json!({"policies": ["kubebao-operator"], "ttl": "2h"})),
                )
                .await
                .expect("token response")["auth"]["client_token"]
                .as_str()
                .expect("token")
                .to_string();
            let token_file = bed.dir().join("leases-operator-token");
            std::fs::write(&token_file, token).unwrap();
            let pg = database(bed).await;
            pki_engine(bed).await;
            bed.install_crds();
            let operator = start_operator(bed, &token_file).await;
            Setup {
                bed,
                operator: Mutex::new(operator),
                token_file,
                pg,
            }
        })
        .await
}

/// Kills the operator (SIGKILL, as a crash would) and starts it again, ready.
async fn restart_operator(setup: &Setup) {
    let mut operator = setup.operator.lock().await;
    operator.0.kill();
    *operator = start_operator(setup.bed, &setup.token_file).await;
}

/// The operator's expiry gauge for BaoSecret `ns/name` and `what` (`lease`, `certificate`).
async fn expiry_metric(setup: &Setup, ns: &str, name: &str, what: &str) -> Option<i64> {
    let port = setup.operator.lock().await.1;
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let series = format!(
        "kubebao_operator_expiry_timestamp_seconds{{kind=\"BaoSecret\",namespace=\"{ns}\",name=\"{name}\",what=\"{what}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

/// The operator as the chart's ServiceAccount, ready.
async fn start_operator(bed: &Testbed, token_file: &Path) -> (Component, u16) {
    let port = free_port();
    let args: Vec<String> = [
        "--openbao-addr",
        bed.openbao().addr(),
        "--openbao-allow-plain-http",
        "--openbao-token-file",
        token_file.to_str().unwrap(),
        "--namespace",
        OPERATOR_NS,
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--leader-elect",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let kubeconfig = bed.operator_kubeconfig(OPERATOR_NS).display().to_string();
    let mut operator = Component::start_with_env(
        "kubebao-operator-leases",
        bed.dir(),
        &PathBuf::from(env!("CARGO_BIN_EXE_kubebao-operator")),
        &args,
        &[("KUBECONFIG", &kubeconfig)],
    );
    let ready = format!("http://127.0.0.1:{port}/readyz");
    wait_for("the operator to be ready", WAIT, || {
        operator.assert_running();
        let ready = ready.clone();
        async move {
            match reqwest::get(&ready).await {
                Ok(r) if r.status().is_success() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    (operator, port)
}

#[tokio::test]
async fn leased_credentials_are_renewed_and_replaced_with_overlap_so_no_connection_fails() {
    let setup = setup().await;
    let _shared = GATE.read().await;
    let bed = setup.bed;
    setup.pg.database_role(bed, "short", "20s", "40s").await;
    let ns = tenant(bed, "leases", &engine_policy("database/creds/short")).await;
    deployment(bed, &ns, "app").await;
    apply_baosecret(
        bed,
        &ns,
        "db",
        json!({"sources": [{"name": "db", "engine": {"path": "database/creds/short"}}],
               "target": {"name": "db"},
               "rolloutRestartTargets": [{"kind": "Deployment", "name": "app"}],
               "rotation": {"revokeAfter": "3s"}}),
    );
    let api = baosecrets(bed, &ns).await;
    wait_condition(&api, "db", "Ready", "True", "Synced").await;
    let first = status(&api, "db").await;
    let lease = &first["leases"][0];
    assert_eq!(lease["source"], "db");
    for field in [
        "leaseId",
        "issueTime",
        "expiryTime",
        "renewTime",
        "requestHash",
    ] {
        assert!(lease[field].is_string(), "{field}: {first}");
    }
    let finalizers = api
        .get("db")
        .await
        .unwrap()
        .metadata
        .finalizers
        .unwrap_or_default();
    assert_eq!(finalizers, ["kubebao.io/revoke-leases"]);

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(consumer(bed, &setup.pg, ns.clone(), stop.clone()));
    let ids = watch_replacements(&api, "db", 2).await;
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.await.unwrap();
    eprintln!(
        "consumer: {} connections, {} failed, {} restarts, {} users; {} leases",
        seen.connections,
        seen.failures.len(),
        seen.restarts,
        seen.users.len(),
        ids.len()
    );
    assert!(
        seen.failures.is_empty(),
        "failed connections: {:?}",
        seen.failures
    );
    assert!(seen.connections >= 100, "{seen:?}");
    assert!(seen.restarts >= 2 && seen.users.len() >= 3, "{seen:?}");
    assert_revoked_by_request(bed, &ns, &ids, 40).await;
    let current = secret_text(bed, &ns, "db", "username").await.unwrap();
    for user in seen.users.iter().filter(|u| **u != current) {
        assert!(
            !setup.pg.role_exists(user).await,
            "database user {user} still exists"
        );
    }
    assert!(setup.pg.role_exists(&current).await);
    api.delete("db", &DeleteParams::default()).await.unwrap();
}

/// Each lease `name`'s status showed (with its issue time), until `replacements` were made
/// and every replaced lease revoked.
async fn watch_replacements(
    api: &Api<DynamicObject>,
    name: &str,
    replacements: usize,
) -> Vec<(String, Timestamp)> {
    let ids: RefCell<Vec<(String, Timestamp)>> = RefCell::default();
    let what = format!("{replacements} replacements, their old leases revoked");
    wait_for(&what, Duration::from_secs(180), || async {
        let s = status(api, name).await;
        let lease = &s["leases"][0];
        let mut ids = ids.borrow_mut();
        if let (Some(id), Some(issued)) = (lease["leaseId"].as_str(), lease["issueTime"].as_str())
            && ids.last().map(|(i, _)| i.as_str()) != Some(id)
        {
            ids.push((id.to_string(), issued.parse().unwrap()));
        }
        let owed = s["revocations"].as_array().map_or(0, Vec::len);
        match (ids.len(), owed) {
            (n, 0) if n > replacements => Ok(()),
            other => Err(format!("leases seen, revocations owed: {other:?}")),
        }
    })
    .await;
    ids.into_inner()
}

/// Every lease but the last was renewed, then revoked by request (once) before its max TTL
/// `max_ttl` (not left to expire); the tenant of `ns` made only a few requests per lease.
async fn assert_revoked_by_request(
    bed: &Testbed,
    ns: &str,
    ids: &[(String, Timestamp)],
    max_ttl: i64,
) {
    let audit = bed.openbao().audit();
    assert!(audit.count(&format!("sys/leases/renew/{}", ids[0].0), "update") >= 1);
    for (old, issued) in &ids[..ids.len() - 1] {
        let revoked =
            audit.filter(|r| r.path == format!("sys/leases/revoke/{old}") && r.error.is_none());
        assert_eq!(revoked.len(), 1, "{old} revoked once");
        let lived = revoked.requests[0].time.as_second() - issued.as_second();
        assert!(
            lived < max_ttl,
            "{old} revoked {lived} s after it was issued"
        );
        assert!(!lease_alive(bed, old).await, "{old} still alive");
    }
    // A few requests per lease (read, renewals, revocation), no loop.
    let tenant = audit.filter(|r| {
        r.token_metadata
            .get("service_account_namespace")
            .is_some_and(|n| n == ns)
    });
    let paths: BTreeSet<&str> = tenant
        .requests
        .iter()
        .map(|r| r.path.rsplit_once('/').map_or(r.path.as_str(), |(p, _)| p))
        .collect();
    eprintln!(
        "{} requests as the tenant for {} leases: {paths:?}",
        tenant.len(),
        ids.len()
    );
    assert!(tenant.len() <= 8 * ids.len(), "{paths:?}");
}

#[tokio::test]
async fn deleting_a_baosecret_revokes_every_lease_it_holds() {
    let setup = setup().await;
    let _shared = GATE.read().await;
    let bed = setup.bed;
    // The examples are accepted as written.
    for example in [
        include_str!("../../examples/baosecret-database.yaml"),
        include_str!("../../examples/baosecret-certificate.yaml"),
    ] {
        bed.try_kubectl(&["apply", "--dry-run=server", "-f", "-"], example)
            .expect("the example is accepted");
    }
    setup.pg.database_role(bed, "long", "1h", "2h").await;
    let ns = tenant(bed, "leasedel", &engine_policy("database/creds/long")).await;
    apply_baosecret(
        bed,
        &ns,
        "two",
        json!({"sources": [{"name": "one", "engine": {"path": "database/creds/long"}},
                           {"name": "two", "engine": {"path": "database/creds/long", "method": "GET"}}],
               "target": {"name": "two"},
               "template": {"data": {"one": "{{ one.username }}", "two": "{{ two.username }}"}}}),
    );
    let api = baosecrets(bed, &ns).await;
    wait_condition(&api, "two", "Ready", "True", "Synced").await;
    let s = status(&api, "two").await;
    let ids: Vec<String> = s["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["leaseId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    let users = [
        secret_text(bed, &ns, "two", "one").await.unwrap(),
        secret_text(bed, &ns, "two", "two").await.unwrap(),
    ];
    for user in &users {
        assert!(setup.pg.role_exists(user).await);
    }
    let earliest = s["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["expiryTime"]
                .as_str()
                .unwrap()
                .parse::<Timestamp>()
                .unwrap()
                .as_second()
        })
        .min();
    assert_eq!(expiry_metric(setup, &ns, "two", "lease").await, earliest);
    api.delete("two", &DeleteParams::default()).await.unwrap();
    wait_for("the BaoSecret to be gone", WAIT, || async {
        match api.get_opt("two").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(o) => Err(format!("finalizers {:?}", o.metadata.finalizers)),
        }
    })
    .await;
    for id in &ids {
        assert!(!lease_alive(bed, id).await, "{id} still alive");
    }
    let left = bed
        .openbao()
        .client()
        .request(
            Method::from_bytes(b"LIST").unwrap(),
            "sys/leases/lookup/database/creds/long/",
            Some(bed.openbao().root_token()),
            None,
        )
        .await;
    assert!(
        matches!(left, Err(ref e) if e.is_not_found()),
        "leases left: {left:?}"
    );
    for user in &users {
        assert!(!setup.pg.role_exists(user).await, "{user} still exists");
    }
}

/// The certificate's serial number as the status records it.
async fn serial(api: &Api<DynamicObject>, name: &str) -> Option<String> {
    status(api, name).await["certificates"][0]["serialNumber"]
        .as_str()
        .map(String::from)
}

#[tokio::test]
async fn a_certificate_is_issued_once_and_renewed_once_past_its_share_of_life() {
    let setup = setup().await;
    let _shared = GATE.read().await;
    let bed = setup.bed;
    let ns = tenant(
        bed,
        "cert",
        "path \"pki/issue/web\" { capabilities = [\"update\"] }\n",
    )
    .await;
    apply_baosecret(
        bed,
        &ns,
        "tls",
        json!({"sources": [{"name": "tls", "certificate": {"path": "pki/issue/web",
                  "commonName": "tls.example.com", "altNames": ["www.example.com"], "ttl": "40s"}}],
               "target": {"name": "tls"}, "refreshInterval": "2s",
               "rotation": {"renewAtPercent": 50}}),
    );
    let api = baosecrets(bed, &ns).await;
    wait_condition(&api, "tls", "Ready", "True", "Synced").await;
    assert_tls_secret(bed, &ns, "tls").await;
    let issue = "pki/issue/web";
    let first = serial(&api, "tls").await.expect("serial");
    let record = status(&api, "tls").await["certificates"][0].clone();
    let at = |k: &str| record[k].as_str().unwrap().parse::<Timestamp>().unwrap();
    assert_eq!(
        at("notAfter").as_second() - at("notBefore").as_second(),
        41,
        "{record}"
    );
    assert_eq!(
        at("renewTime").as_second() - at("notBefore").as_second(),
        20
    );
    let issued = audited(bed, &ns, issue, "update");
    let not_after = Some(at("notAfter").as_second());
    assert_eq!(
        expiry_metric(setup, &ns, "tls", "certificate").await,
        not_after
    );

    // Within its life: refreshes (every 2 s), a spec change and a deleted Secret issue nothing.
    disturb(bed, &ns, &api, "tls").await;
    assert_eq!(serial(&api, "tls").await.unwrap(), first);
    assert!(
        Timestamp::now() < at("renewTime"),
        "the test ran too slowly"
    );
    assert_eq!(
        audited(bed, &ns, issue, "update"),
        issued,
        "nothing issued within the lifetime"
    );

    // Past half its life: exactly one new certificate.
    wait_for("the renewal", WAIT, || async {
        match serial(&api, "tls").await {
            Some(s) if s != first => Ok(()),
            other => Err(format!("serial {other:?}")),
        }
    })
    .await;
    // Two more checks after the renewal: neither issues again.
    refreshes(&api, "tls", 3).await;
    assert_eq!(audited(bed, &ns, issue, "update"), issued + 1);
    api.delete("tls", &DeleteParams::default()).await.unwrap();
}

/// Secret `name` is a `kubernetes.io/tls` Secret whose `ca.crt` is the PKI mount's root.
async fn assert_tls_secret(bed: &Testbed, ns: &str, name: &str) {
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, ns);
    let written = secrets.get(name).await.unwrap();
    assert_eq!(written.type_.as_deref(), Some("kubernetes.io/tls"));
    let keys: Vec<&String> = written.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
    let root = bed
        .openbao()
        .root(Method::GET, "pki/cert/ca", None)
        .await
        .unwrap();
    let ca = secret_text(bed, ns, name, "ca.crt").await.unwrap();
    assert_eq!(
        ca.trim(),
        root["data"]["certificate"].as_str().unwrap().trim()
    );
    let crt = secret_text(bed, ns, name, "tls.crt").await.unwrap();
    assert_eq!(
        crt.matches("BEGIN CERTIFICATE").count(),
        1,
        "no root in tls.crt"
    );
}

/// Waits until BaoSecret `name` has been checked `n` times (n distinct `nextRefreshTime`s seen).
async fn refreshes(api: &Api<DynamicObject>, name: &str, n: usize) {
    let seen: RefCell<BTreeSet<String>> = RefCell::default();
    wait_for(&format!("{n} refreshes"), WAIT, || async {
        let next = status(api, name).await["nextRefreshTime"].to_string();
        let mut seen = seen.borrow_mut();
        seen.insert(next);
        (seen.len() >= n).then_some(()).ok_or("not yet".to_string())
    })
    .await;
}

/// Makes BaoSecret `name` reconcile in every way short of a renewal: three refreshes, a spec
/// change (a label for its Secret), and its Secret deleted (restored).
async fn disturb(bed: &Testbed, ns: &str, api: &Api<DynamicObject>, name: &str) {
    refreshes(api, name, 3).await;
    let label = r#"{"spec":{"target":{"labels":{"tier":"web"}}}}"#;
    bed.kubectl(&[
        "-n",
        ns,
        "patch",
        "baosecret",
        name,
        "--type=merge",
        "-p",
        label,
    ]);
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, ns);
    secrets
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the Secret restored with its label", WAIT, || async {
        let s = secrets
            .get_opt(name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("gone")?;
        let labels = s.metadata.labels.unwrap_or_default();
        (labels.get("tier").map(String::as_str) == Some("web"))
            .then_some(())
            .ok_or("no label yet".to_string())
    })
    .await;
}

/// Waits until BaoSecret `name` replaced its lease and owes the old one a revocation (with a
/// time); returns the old lease's id and the current one's.
async fn owed_revocation(api: &Api<DynamicObject>, name: &str) -> (String, String) {
    let what = "a replaced lease owed a revocation";
    let owed = wait_for(what, Duration::from_secs(90), || async {
        let s = status(api, name).await;
        match s["revocations"][0]["revokeTime"].as_str() {
            Some(_) => Ok(s),
            None => Err(format!("status {s}")),
        }
    })
    .await;
    let id = |v: &serde_json::Value| v["leaseId"].as_str().unwrap().to_string();
    (id(&owed["revocations"][0]), id(&owed["leases"][0]))
}

/// The operator killed (SIGKILL) while a replaced lease waits for its revocation, and while a
/// certificate is mid-life: the restarted operator issues nothing new, renews the current
/// lease, and carries out the revocation it owes.
#[tokio::test]
async fn a_restarted_operator_resumes_leases_and_certificates_without_issuing_anew() {
    let setup = setup().await;
    let _alone = GATE.write().await;
    let bed = setup.bed;
    setup.pg.database_role(bed, "resume", "30s", "60s").await;
    let policy = engine_policy("database/creds/resume")
        + "path \"pki/issue/web\" { capabilities = [\"update\"] }\n";
    let ns = tenant(bed, "resume", &policy).await;
    apply_baosecret(
        bed,
        &ns,
        "db",
        json!({"sources": [{"name": "db", "engine": {"path": "database/creds/resume"}}],
               "target": {"name": "db"}, "rotation": {"revokeAfter": "15s"}}),
    );
    let api = baosecrets(bed, &ns).await;
    wait_condition(&api, "db", "Ready", "True", "Synced").await;
    // The first replacement (at ~40 s, when a renewal meets the 60 s max TTL).
    let (old, current) = owed_revocation(&api, "db").await;
    apply_baosecret(
        bed,
        &ns,
        "tls",
        json!({"sources": [{"name": "tls", "certificate": {"path": "pki/issue/web",
                  "commonName": "resume.example.com", "ttl": "60s"}}],
               "target": {"name": "tls"}, "refreshInterval": "2s",
               "rotation": {"renewAtPercent": 50}}),
    );
    wait_condition(&api, "tls", "Ready", "True", "Synced").await;
    let cert = serial(&api, "tls").await.unwrap();
    let (creds, issues) = (
        audited(bed, &ns, "database/creds/resume", "read"),
        audited(bed, &ns, "pki/issue/web", "update"),
    );
    let password = secret_text(bed, &ns, "db", "password").await;

    restart_operator(setup).await;

    let mark = bed.openbao().audit().len();
    wait_for("the owed revocation", WAIT, || async {
        let s = status(&api, "db").await;
        (s["revocations"].as_array().is_none_or(Vec::is_empty) && !lease_alive(bed, &old).await)
            .then_some(())
            .ok_or(format!("status {s}"))
    })
    .await;
    let revoked = bed.openbao().audit().since(mark);
    assert_eq!(
        revoked.count(&format!("sys/leases/revoke/{old}"), "update"),
        1,
        "revoked, not expired"
    );
    wait_for("a renewal of the current lease", WAIT, || async {
        let n = bed
            .openbao()
            .audit()
            .since(mark)
            .count(&format!("sys/leases/renew/{current}"), "update");
        (n >= 1).then_some(()).ok_or("not yet".to_string())
    })
    .await;
    assert_eq!(
        audited(bed, &ns, "database/creds/resume", "read"),
        creds,
        "no new credentials"
    );
    assert_eq!(
        audited(bed, &ns, "pki/issue/web", "update"),
        issues,
        "no new certificate"
    );
    assert_eq!(secret_text(bed, &ns, "db", "password").await, password);
    assert_eq!(
        status(&api, "db").await["leases"][0]["leaseId"],
        current.as_str()
    );
    assert_eq!(serial(&api, "tls").await.unwrap(), cert);
    for name in ["db", "tls"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
}
