//! Plumbing of the leased-credentials tests: PostgreSQL with password authentication, the
//! database and PKI engines, tenants, BaoSecret and audit helpers, and the simulated
//! Deployment-shaped consumer.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kubebao_testbed::{Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// The PostgreSQL superuser's password (OpenBao's database engine logs in with it).
pub const PG_PASSWORD: &str = "superuser-pw";

/// PostgreSQL with password (SCRAM) authentication over TCP and trust over its socket, run as
/// the `postgres` user when the tests run as root.
pub struct Postgres {
    _process: Component,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

pub fn as_postgres(root: bool, program: PathBuf, args: Vec<String>) -> (PathBuf, Vec<String>) {
    if !root {
        return (program, args);
    }
    let mut a: Vec<String> = [
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ]
    .map(String::from)
    .to_vec();
    a.push(program.display().to_string());
    a.extend(args);
    (PathBuf::from("setpriv"), a)
}

/// PostgreSQL in a directory under `parent` (the test bed's: removed with it).
pub async fn postgres(parent: &Path) -> Postgres {
    let bin = ["15", "16", "17"]
        .iter()
        .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
        .find(|p| p.join("postgres").exists())
        .expect(
            "PostgreSQL is needed for the leased-credentials tests: apt-get install postgresql",
        );
    let dir = tempfile::tempdir_in(parent).unwrap();
    let id = |args: &[&str]| {
        let out = std::process::Command::new("id")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let root = id(&["-u"]) == "0";
    if root {
        let (uid, gid) = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
        std::os::unix::fs::chown(dir.path(), uid.parse().ok(), gid.parse().ok()).unwrap();
    }
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, PG_PASSWORD).unwrap();
    let (program, args) = as_postgres(
        root,
        bin.join("initdb"),
        vec![
            format!("--pgdata={}", dir.path().join("data").display()),
            "--username=postgres".into(),
            "--auth-local=trust".into(),
            "--auth-host=scram-sha-256".into(),
            format!("--pwfile={}", pwfile.display()),
            "--encoding=UTF8".into(),
        ],
    );
    let out = std::process::Command::new(&program)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let (program, args) = as_postgres(
        root,
        bin.join("postgres"),
        [
            "-D",
            &dir.path().join("data").display().to_string(),
            "-p",
            &port.to_string(),
            "-h",
            "127.0.0.1",
            "-k",
            &dir.path().display().to_string(),
            "-c",
            "fsync=off",
        ]
        .map(String::from)
        .to_vec(),
    );
    let mut process = Component::start("postgres-leases", dir.path(), &program, &args);
    wait_for("PostgreSQL to listen", WAIT, || {
        process.assert_running();
        async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    Postgres {
        _process: process,
        port,
        dir,
        bin,
    }
}

impl Postgres {
    /// Opens a new connection over TCP as `user` with `password` and runs one query.
    pub async fn connect(&self, user: &str, password: &str) -> Result<(), String> {
        let out = tokio::process::Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", user])
            .args(["-d", "postgres", "-tAc", "select 1"])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .await
            .map_err(|e| e.to_string())?;
        match String::from_utf8_lossy(&out.stdout).trim() {
            "1" if out.status.success() => Ok(()),
            _ => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        }
    }

    /// True while PostgreSQL has a role named `user` (as the superuser, over the socket).
    pub async fn role_exists(&self, user: &str) -> bool {
        let query = format!("select count(*) from pg_roles where rolname = '{user}'");
        let out = tokio::process::Command::new(self.bin.join("psql"))
            .args(["-h", &self.dir.path().display().to_string()])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-tAc", &query])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }
}

/// OpenBao's database engine at `database/`, connected to PostgreSQL as its superuser.
pub async fn database_engine(bed: &Testbed, port: u16) {
    let bao = bed.openbao();
    bao.enable_engine("database", "database", None).await;
    let url = format!(
        "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{port}/postgres?sslmode=disable"
    );
    bao.root(
        Method::POST,
        "database/config/pg",
        Some(json!({
            "plugin_name": "postgresql-database-plugin", "connection_url": url,
            "username": "postgres", "password": PG_PASSWORD, "allowed_roles": ["*"],
        })),
    )
    .await;
}

/// A database role `name` whose credentials live `ttl`, renewable up to `max_ttl`.
pub async fn db_role(bed: &Testbed, name: &str, ttl: &str, max_ttl: &str) {
    let create =
        "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';";
    bed.openbao()
        .root(
            Method::POST,
            &format!("database/roles/{name}"),
            Some(json!({"db_name": "pg", "creation_statements": [create],
                        "default_ttl": ttl, "max_ttl": max_ttl})),
        )
        .await;
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
