//! Plumbing of the leased-credentials tests: PostgreSQL with password authentication, the
//! database and PKI engines, tenants, BaoSecret and audit helpers, and the simulated
//! Deployment-shaped consumer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kubebao_testbed::{Postgres, Testbed, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// PostgreSQL behind OpenBao's database engine (any database role).
pub async fn database(bed: &Testbed) -> Postgres {
    let pg = Postgres::start(bed.dir(), "postgres-leases").await;
    pg.database_engine(bed, &["*"]).await;
    pg
}

/// OpenBao's PKI engine at `pki/` with a root CA and a role `web` for `*.example.com`.
pub async fn pki_engine(bed: &Testbed) {
    let bao = bed.openbao();
    bao.enable_engine("pki", "pki", None).await;
    bao.root(
        Method::POST,
        "sys/mounts/pki/tune",
        Some(json!({"max_lease_ttl": "87600h"})),
    )
    .await;
    bao.root(
        Method::POST,
        "pki/root/generate/internal",
        Some(json!({"common_name": "kubebao-test-root", "ttl": "87600h"})),
    )
    .await;
    bao.root(
        Method::POST,
        "pki/roles/web",
        Some(
            json!({"allowed_domains": "example.com", "allow_subdomains": true,
                    "max_ttl": "1h", "not_before_duration": "1s"}),
        ),
    )
    .await;
}

/// The policy a tenant needs for leased credentials at `path`: read them, renew and revoke
/// their leases (scoped to that path).
pub fn engine_policy(path: &str) -> String {
    format!(
        "path \"{path}\" {{ capabilities = [\"read\"] }}\n\
         path \"sys/leases/renew/{path}/*\" {{ capabilities = [\"update\"] }}\n\
         path \"sys/leases/revoke/{path}/*\" {{ capabilities = [\"update\"] }}\n"
    )
}

/// A namespace whose `default` ServiceAccount logs in as role `<ns>` with `policy`.
pub async fn tenant(bed: &Testbed, prefix: &str, policy: &str) -> String {
    let ns = bed.namespace(prefix).await;
    let bao = bed.openbao();
    bao.root(
        Method::POST,
        &format!("sys/policies/acl/tenant-{ns}"),
        Some(json!({"policy": policy})),
    )
    .await;
    bao.root(
        Method::POST,
        &format!("auth/kubernetes/role/{ns}"),
        Some(json!({"bound_service_account_names": ["default"],
                    "bound_service_account_namespaces": [ns],
                    "token_policies": [format!("tenant-{ns}")]})),
    )
    .await;
    wait_for("the default ServiceAccount", WAIT, || async {
        bed.try_kubectl(&["-n", &ns, "get", "serviceaccount", "default"], "")
            .map(|_| ())
    })
    .await;
    ns
}

pub async fn baosecrets(bed: &Testbed, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kubebao.io", "v1alpha1", "BaoSecret");
    Api::namespaced_with(bed.client().await, ns, &ApiResource::from_gvk(&gvk))
}

pub fn apply_baosecret(bed: &Testbed, ns: &str, name: &str, spec: Value) {
    bed.apply(
        &json!({"apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret",
                "metadata": {"name": name, "namespace": ns}, "spec": spec})
        .to_string(),
    );
}

pub async fn status(api: &Api<DynamicObject>, name: &str) -> Value {
    api.get(name).await.expect("BaoSecret").data["status"].clone()
}

/// The Secret's value at `key`, as text.
pub async fn secret_text(bed: &Testbed, ns: &str, name: &str, key: &str) -> Option<String> {
    let api: Api<Secret> = Api::namespaced(bed.client().await, ns);
    let s = api.get_opt(name).await.expect("read Secret")?;
    let v = s.data?.get(key)?.0.clone();
    Some(String::from_utf8_lossy(&v).into_owned())
}

/// True while OpenBao knows lease `id` (looked up as root).
pub async fn lease_alive(bed: &Testbed, id: &str) -> bool {
    let bao = bed.openbao();
    bao.client()
        .request(
            Method::PUT,
            "sys/leases/lookup",
            Some(bao.root_token()),
            Some(&json!({"lease_id": id})),
        )
        .await
        .is_ok()
}

/// Audited requests for `path` with `operation` made as a ServiceAccount of `ns`.
pub fn audited(bed: &Testbed, ns: &str, path: &str, operation: &str) -> usize {
    bed.openbao()
        .audit()
        .filter(|r| {
            r.token_metadata
                .get("service_account_namespace")
                .map(String::as_str)
                == Some(ns)
        })
        .count(path, operation)
}

/// A Deployment with no replicas: its pod template annotation is how the operator restarts
/// the workload, and what the simulated consumer watches.
pub async fn deployment(bed: &Testbed, ns: &str, name: &str) {
    bed.apply(
        &json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
                         "template": {"metadata": {"labels": {"app": name}},
                                      "spec": {"containers": [{"name": "app", "image": "app"}]}}}})
        .to_string(),
    );
}

pub async fn restarted_at(api: &Api<Deployment>, name: &str) -> Option<String> {
    let d = api.get(name).await.ok()?;
    d.spec?
        .template
        .metadata?
        .annotations?
        .get("kubebao.io/restartedAt")
        .cloned()
}

/// What the simulated consumer saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub connections: u32,
    pub failures: Vec<String>,
    pub restarts: u32,
    pub users: BTreeSet<String>,
}

/// A Deployment-shaped consumer: reads the Secret when it "starts" and again whenever its
/// Deployment is restarted; meanwhile opens a new connection every ~200 ms with what it read.
pub async fn consumer(
    bed: &'static Testbed,
    pg: &'static Postgres,
    ns: String,
    stop: Arc<AtomicBool>,
) -> Seen {
    let deployments: Api<Deployment> = Api::namespaced(bed.client().await, &ns);
    let creds = || async {
        let user = secret_text(bed, &ns, "db", "username")
            .await
            .expect("username");
        let password = secret_text(bed, &ns, "db", "password")
            .await
            .expect("password");
        (user, password)
    };
    let mut seen = Seen::default();
    let mut started = restarted_at(&deployments, "app").await;
    let (mut user, mut password) = creds().await;
    seen.users.insert(user.clone());
    let mut last = Instant::now() - Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        let now = restarted_at(&deployments, "app").await;
        if now != started {
            started = now;
            (user, password) = creds().await;
            seen.restarts += 1;
            seen.users.insert(user.clone());
        }
        if last.elapsed() >= Duration::from_millis(200) {
            last = Instant::now();
            seen.connections += 1;
            if let Err(e) = pg.connect(&user, &password).await {
                seen.failures.push(format!("{user}: {e}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}
