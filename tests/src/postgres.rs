//! A real PostgreSQL for what needs a database behind OpenBao's database engine (tests and
//! benchmarks): Debian's binaries (`make testbed` installs them), run as the `postgres` user when
//! the caller is root (PostgreSQL refuses root), password (SCRAM) authentication over TCP, trust
//! over its own socket for the superuser's checks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::{Component, Testbed, free_port, wait_for};

/// The superuser's password (OpenBao's database engine logs in with it).
const SUPERUSER_PASSWORD: &str = "superuser-pw";

/// A running PostgreSQL (stopped when dropped; its directory lives under the caller's).
pub struct Postgres {
    _process: Component,
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

/// The output of `id args` (e.g. `-u postgres`).
fn id(args: &[&str]) -> String {
    let out = std::process::Command::new("id")
        .args(args)
        .output()
        .expect("run id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `program args`, as the `postgres` user when running as root (setpriv execs, so the test
/// bed's guard signals postgres itself).
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

impl Postgres {
    /// Starts PostgreSQL (process name `name`) in a directory under `parent`.
    pub async fn start(parent: &Path, name: &str) -> Postgres {
        let bin = ["15", "16", "17"]
            .iter()
            .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
            .find(|p| p.join("postgres").exists())
            .expect("PostgreSQL is missing: run `make testbed` (apt-get install postgresql)");
        let dir = tempfile::tempdir_in(parent).expect("PostgreSQL directory");
        let root = id(&["-u"]) == "0";
        if root {
            let (uid, gid) = (id(&["-u", "postgres"]), id(&["-g", "postgres"]));
            std::os::unix::fs::chown(dir.path(), uid.parse().ok(), gid.parse().ok())
                .expect("chown the PostgreSQL directory");
        }
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).expect("write the password file");
        let data = dir.path().join("data").display().to_string();
        let initdb = vec![
            format!("--pgdata={data}"),
            "--username=postgres".into(),
            "--auth-local=trust".into(),
            "--auth-host=scram-sha-256".into(),
            format!("--pwfile={}", pwfile.display()),
            "--encoding=UTF8".into(),
        ];
        let (program, args) = as_postgres(root, bin.join("initdb"), initdb);
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
        let mut process = Component::start(name, dir.path(), &program, &args);
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
        Postgres {
            _process: process,
            port,
            dir,
            bin,
        }
    }

    /// Opens a new connection over TCP as `user` with `password` and runs `select 1`.
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

    /// How many roles match the SQL `LIKE` `pattern` (as the superuser, over the socket).
    pub async fn roles_like(&self, pattern: &str) -> usize {
        let query = format!("select count(*) from pg_roles where rolname like '{pattern}'");
        let out = tokio::process::Command::new(self.bin.join("psql"))
            .args(["-h", &self.dir.path().display().to_string()])
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(["-d", "postgres", "-tAc", &query])
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

    /// True while PostgreSQL has a role named exactly `user`.
    pub async fn role_exists(&self, user: &str) -> bool {
        self.roles_like(&user.replace('%', "\\%").replace('_', "\\_"))
            .await
            > 0
    }

    /// OpenBao's database engine at `database/`, connection `pg` to this PostgreSQL as its
    /// superuser, for the database roles `allowed_roles` (`*`: any).
    pub async fn database_engine(&self, bed: &Testbed, allowed_roles: &[&str]) {
        let bao = bed.openbao();
        bao.enable_engine("database", "database", None).await;
        let url = format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        );
        let config = json!({
            "plugin_name": "postgresql-database-plugin", "connection_url": url,
            "username": "postgres", "password": SUPERUSER_PASSWORD, "allowed_roles": allowed_roles,
        });
        bao.root(Method::POST, "database/config/pg", Some(config))
            .await;
    }

    /// A database role `name` of connection `pg` whose credentials live `ttl`, renewable up to
    /// `max_ttl` (a login role valid until the lease ends).
    pub async fn database_role(&self, bed: &Testbed, name: &str, ttl: &str, max_ttl: &str) {
        let create = "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';";
        let spec = json!({"db_name": "pg", "creation_statements": [create],
                          "default_ttl": ttl, "max_ttl": max_ttl});
        bed.openbao()
            .root(Method::POST, &format!("database/roles/{name}"), Some(spec))
            .await;
    }
}
