//! PostgreSQL for the benchmark's leased credentials: the test bed's Debian binaries, run as
//! the `postgres` user when the benchmark runs as root, behind OpenBao's database engine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kubebao_testbed::{Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::json;

/// The PostgreSQL superuser's password (OpenBao's database engine logs in with it).
const PG_PASSWORD: &str = "bench-superuser-pw";

/// A running PostgreSQL (stopped when dropped).
pub struct Postgres {
    _process: Component,
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

/// `program args` as the `postgres` user when running as root (PostgreSQL refuses root).
fn as_postgres(root: bool, program: PathBuf, args: Vec<String>) -> (PathBuf, Vec<String>) {
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

fn id(args: &[&str]) -> String {
    let out = std::process::Command::new("id")
        .args(args)
        .output()
        .expect("run id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Postgres {
    /// Starts PostgreSQL in a directory under `parent` (the test bed's: removed with it).
    pub async fn start(parent: &Path) -> Self {
        let bin = ["15", "16", "17"]
            .iter()
            .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
            .find(|p| p.join("postgres").exists())
            .expect("KUBEBAO_BENCH_DYNAMIC needs PostgreSQL: apt-get install postgresql");
        let dir = tempfile::tempdir_in(parent).expect("PostgreSQL directory");
        let root = id(&["-u"]) == "0";
        if root {
            let (uid, gid) = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
            std::os::unix::fs::chown(dir.path(), uid.parse().ok(), gid.parse().ok())
                .expect("chown the PostgreSQL directory");
        }
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, PG_PASSWORD).expect("write the password file");
        let data = dir.path().join("data").display().to_string();
        let initdb = [
            format!("--pgdata={data}"),
            "--username=postgres".into(),
            "--auth-local=trust".into(),
            "--auth-host=scram-sha-256".into(),
            format!("--pwfile={}", pwfile.display()),
            "--encoding=UTF8".into(),
        ];
        let (program, args) = as_postgres(root, bin.join("initdb"), initdb.to_vec());
        let out = std::process::Command::new(&program)
            .args(&args)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let socket = dir.path().display().to_string();
        let server = ["-D", &data, "-p", &port.to_string(), "-h", "127.0.0.1"];
        let mut server: Vec<String> = server.map(String::from).to_vec();
        server.extend(["-k", &socket, "-c", "fsync=off"].map(String::from));
        let (program, args) = as_postgres(root, bin.join("postgres"), server);
        let mut process = Component::start("postgres-bench", dir.path(), &program, &args);
        wait_for("PostgreSQL to listen", Duration::from_secs(60), || {
            process.assert_running();
            async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
        .await;
        Self {
            _process: process,
            port,
            dir,
            bin,
        }
    }

    /// How many roles OpenBao's database engine created that still exist (their names start
    /// with `v-`), asked as the superuser over the socket.
    pub async fn engine_roles(&self) -> usize {
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
            .args([
                "-tAc",
                "select count(*) from pg_roles where rolname like 'v-%'",
            ])
            .output()
            .await
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let count = String::from_utf8_lossy(&out.stdout);
        count.trim().parse().expect("a count")
    }

    /// OpenBao's database engine at `database/`, connected to this PostgreSQL as its
    /// superuser, with role `role` whose credentials live `ttl`, renewable up to `max_ttl`.
    pub async fn database_engine(&self, bed: &Testbed, role: &str, ttl: &str, max_ttl: &str) {
        let bao = bed.openbao();
        bao.enable_engine("database", "database", None).await;
        let url = format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        );
        let config = json!({
            "plugin_name": "postgresql-database-plugin", "connection_url": url,
            "username": "postgres", "password": PG_PASSWORD, "allowed_roles": [role],
        });
        bao.root(Method::POST, "database/config/pg", Some(config))
            .await;
        let create = "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';";
        let spec = json!({"db_name": "pg", "creation_statements": [create],
                          "default_ttl": ttl, "max_ttl": max_ttl});
        bao.root(Method::POST, &format!("database/roles/{role}"), Some(spec))
            .await;
    }
}
