//! OpenBao as users run it in production: a raft cluster of three `bao server` processes on
//! loopback, initialised once and all unsealed, with one stable address in front.
//!
//! There is no load balancer on loopback, so the harness runs a small TCP forwarder: every new
//! connection goes to the node that is active right now, as a Kubernetes Service whose
//! readiness is "active" would (the OpenBao Helm chart's `openbao-active` Service). A monitor
//! polls each node's `sys/health` every 100 ms to know which one that is; while no node is
//! active (an election after a crash) new connections are closed at once, so clients see the
//! outage as "unreachable" and retry. Standbys would forward requests themselves, but the
//! forwarder keeps the picture simple: clients never meet a standby or a redirect.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kubebao_openbao::{ClientConfig, OpenBao, SecretString};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::{Binaries, Component, wait_for};

/// How often the forwarder's monitor asks every node whether it is active.
const MONITOR_INTERVAL: Duration = Duration::from_millis(100);

/// One `bao server` of the cluster.
struct HaNode {
    name: String,
    addr: String,
    socket: SocketAddr,
    config: PathBuf,
    process: Mutex<Option<Component>>,
}

/// A running OpenBao raft cluster (see the module docs).
pub struct OpenBaoCluster {
    bao: PathBuf,
    dir: PathBuf,
    nodes: Vec<HaNode>,
    root_token: SecretString,
    unseal_key: String,
    addr: String,
    active: Arc<std::sync::Mutex<Option<usize>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for OpenBaoCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenBaoCluster")
            .field("addr", &self.addr)
            .field(
                "nodes",
                &self.nodes.iter().map(|n| &n.addr).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Drop for OpenBaoCluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A plain-HTTP client for `addr` (the cluster listens on loopback only).
fn client_for(addr: &str) -> OpenBao {
    OpenBao::new(&ClientConfig {
        address: addr.to_string(),
        // Generous: init, unseal and raft joins are slow on a busy 2-core machine, and a
        // timed-out init cannot be retried (its keys would be lost).
        timeout: Some(Duration::from_secs(60)),
        allow_plain_http: true,
        ..Default::default()
    })
    .expect("OpenBao client")
}

/// The config file of node `name`: raft storage in its own directory, its own API and cluster
/// ports. `performance_multiplier = 1` is what OpenBao recommends for production raft (fast
/// elections); the default (5) is tuned for slow development machines.
fn node_config(dir: &Path, name: &str, api_port: u16, cluster_port: u16) -> String {
    format!(
        r#"storage "raft" {{
  path = "{data}"
  node_id = "{name}"
  performance_multiplier = 1
}}
cluster_addr = "https://127.0.0.1:{cluster_port}"
api_addr = "http://127.0.0.1:{api_port}"
listener "tcp" {{
  address = "127.0.0.1:{api_port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
ui = false
log_level = "warn"
"#,
        data = dir.join("data").display(),
    )
}

impl OpenBaoCluster {
    /// Starts `size` nodes in `<dir>/openbao-ha`, initialises the first (one unseal key),
    /// joins the others to it over raft, unseals all, and starts the forwarder.
    pub async fn start(bins: &Binaries, dir: &Path, size: usize) -> Self {
        assert!(size >= 1, "a cluster needs at least one node");
        kubebao_openbao::install_crypto_provider();
        let dir = dir.join("openbao-ha");
        let nodes = (0..size)
            .map(|i| {
                let name = format!("bao-{i}");
                let node_dir = dir.join(&name);
                std::fs::create_dir_all(node_dir.join("data")).expect("OpenBao node dir");
                let (api_port, cluster_port) =
                    (crate::testbed::free_port(), crate::testbed::free_port());
                let config = node_dir.join("config.hcl");
                std::fs::write(
                    &config,
                    node_config(&node_dir, &name, api_port, cluster_port),
                )
                .expect("write OpenBao node config");
                HaNode {
                    name,
                    addr: format!("http://127.0.0.1:{api_port}"),
                    socket: SocketAddr::from(([127, 0, 0, 1], api_port)),
                    config,
                    process: Mutex::new(None),
                }
            })
            .collect();
        let mut cluster = Self {
            bao: bins.bao.clone(),
            dir,
            nodes,
            root_token: SecretString::default(),
            unseal_key: String::new(),
            addr: String::new(),
            active: Default::default(),
            tasks: Vec::new(),
        };
        for i in 0..size {
            cluster.launch(i).await;
        }
        let init = client_for(&cluster.nodes[0].addr)
            .request(
                Method::PUT,
                "sys/init",
                None,
                Some(&json!({"secret_shares": 1, "secret_threshold": 1})),
            )
            .await
            .expect("initialise OpenBao")
            .expect("init response");
        cluster.unseal_key = init["keys_base64"][0]
            .as_str()
            .expect("unseal key")
            .to_string();
        cluster.root_token = SecretString::new(init["root_token"].as_str().expect("root token"));
        cluster.unseal(0).await;
        cluster
            .wait_until(0, "active", |h| !h.sealed && !h.standby)
            .await;
        for i in 1..size {
            cluster.join(i).await;
        }
        cluster.wait_for_voters().await;
        cluster.start_forwarder().await;
        cluster
    }

    /// Starts node `i`'s process and waits until it answers `sys/health`.
    async fn launch(&self, i: usize) {
        let node = &self.nodes[i];
        let args = vec![
            "server".to_string(),
            format!("-config={}", node.config.display()),
        ];
        let node_dir = node.config.parent().expect("node dir");
        let mut component = Component::start(&node.name, node_dir, &self.bao, &args);
        let client = client_for(&node.addr);
        wait_for(
            &format!("OpenBao {} to listen", node.name),
            Duration::from_secs(60),
            || {
                component.assert_running();
                let client = client.clone();
                async move { client.health().await.map(|_| ()).map_err(|e| e.to_string()) }
            },
        )
        .await;
        *node.process.lock().await = Some(component);
    }

    /// Joins node `i` (new, uninitialised) to the raft cluster through the first node, then
    /// unseals it (with Shamir seals, a joining node answers the leader's challenge with the
    /// unseal key) and waits until it is a standby.
    async fn join(&self, i: usize) {
        let client = client_for(&self.nodes[i].addr);
        let leader = self.nodes[0].addr.clone();
        let resp = client
            .request(
                Method::POST,
                "sys/storage/raft/join",
                None,
                Some(&json!({"leader_api_addr": leader})),
            )
            .await
            .unwrap_or_else(|e| panic!("join {} to the raft cluster: {e}", self.nodes[i].name))
            .unwrap_or(Value::Null);
        assert_eq!(
            resp["joined"],
            json!(true),
            "{} did not join: {resp}",
            self.nodes[i].name
        );
        self.unseal(i).await;
        self.wait_until(i, "a standby", |h| !h.sealed && h.standby)
            .await;
    }

    /// Waits until every node votes in raft: autopilot adds joined nodes as non-voters and
    /// promotes them once they have been healthy for `server_stabilization_time` (10 s); before
    /// that, losing the leader leaves no quorum and no election.
    async fn wait_for_voters(&self) {
        let client = client_for(&self.nodes[0].addr);
        let size = self.nodes.len();
        wait_for(
            "every OpenBao node to be a raft voter",
            Duration::from_secs(90),
            || {
                let client = client.clone();
                async move {
                    let config = client
                        .request(
                            Method::GET,
                            "sys/storage/raft/configuration",
                            Some(&self.root_token),
                            None,
                        )
                        .await
                        .map_err(|e| e.to_string())?
                        .unwrap_or(Value::Null);
                    let servers = config
                        .pointer("/data/config/servers")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let voters = servers.iter().filter(|s| s["voter"] == json!(true)).count();
                    if voters == size {
                        Ok(())
                    } else {
                        Err(format!("{voters} of {size} voters: {servers:?}"))
                    }
                }
            },
        )
        .await;
    }

    /// Sends the unseal key to node `i` (it may need more time to finish unsealing: see
    /// `wait_until`).
    async fn unseal(&self, i: usize) {
        let client = client_for(&self.nodes[i].addr);
        wait_for(
            &format!("OpenBao {} to take the unseal key", self.nodes[i].name),
            Duration::from_secs(60),
            || {
                let client = client.clone();
                async move {
                    client
                        .request(
                            Method::PUT,
                            "sys/unseal",
                            None,
                            Some(&json!({"key": self.unseal_key})),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            },
        )
        .await;
    }

    /// Waits (60 s at most) until node `i`'s health satisfies `ok`.
    async fn wait_until(
        &self,
        i: usize,
        what: &str,
        ok: impl Fn(&kubebao_openbao::Health) -> bool,
    ) {
        let client = client_for(&self.nodes[i].addr);
        let ok = &ok;
        wait_for(
            &format!("OpenBao {} to be {what}", self.nodes[i].name),
            Duration::from_secs(60),
            || {
                let client = client.clone();
                async move {
                    let h = client.health().await.map_err(|e| e.to_string())?;
                    if ok(&h) {
                        Ok(())
                    } else {
                        Err(format!("{h:?}"))
                    }
                }
            },
        )
        .await;
    }

    /// Starts the monitor and the forwarder (see the module docs).
    async fn start_forwarder(&mut self) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OpenBao cluster's forwarder");
        self.addr = format!(
            "http://{}",
            listener.local_addr().expect("forwarder address")
        );
        let sockets: Vec<SocketAddr> = self.nodes.iter().map(|n| n.socket).collect();
        let clients: Vec<OpenBao> = self.nodes.iter().map(|n| probe_client(&n.addr)).collect();
        let active = self.active.clone();
        self.tasks.push(tokio::spawn(async move {
            loop {
                let mut found = None;
                for (i, client) in clients.iter().enumerate() {
                    if client.health().await.is_ok_and(|h| !h.sealed && !h.standby) {
                        found = Some(i);
                        break;
                    }
                }
                *active.lock().expect("active node lock") = found;
                tokio::time::sleep(MONITOR_INTERVAL).await;
            }
        }));
        let active = self.active.clone();
        self.tasks.push(tokio::spawn(async move {
            while let Ok((mut downstream, _)) = listener.accept().await {
                let target = active.lock().expect("active node lock").map(|i| sockets[i]);
                // No active node: drop the connection, as a Service without ready endpoints.
                let Some(target) = target else { continue };
                tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                    }
                });
            }
        }));
        let client = self.client();
        wait_for(
            "the cluster's forwarder to reach the active node",
            Duration::from_secs(30),
            || {
                let client = client.clone();
                async move {
                    let h = client.health().await.map_err(|e| e.to_string())?;
                    if !h.standby && !h.sealed {
                        Ok(())
                    } else {
                        Err(format!("{h:?}"))
                    }
                }
            },
        )
        .await;
    }

    /// The address users point at (the forwarder, always to the active node), e.g.
    /// `http://127.0.0.1:40123`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// How many nodes the cluster has.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`'s own plain-HTTP address.
    pub fn node_addr(&self, i: usize) -> &str {
        &self.nodes[i].addr
    }

    /// A client for node `i` alone (its health, its own view of the cluster).
    pub fn node_client(&self, i: usize) -> OpenBao {
        client_for(&self.nodes[i].addr)
    }

    /// The root token.
    pub fn root_token(&self) -> &SecretString {
        &self.root_token
    }

    /// A client for the cluster's address.
    pub fn client(&self) -> OpenBao {
        client_for(&self.addr)
    }

    /// The directory holding every node's config, data and log (`bao-<i>/bao-<i>.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Calls the cluster's API as root; panics with OpenBao's error on failure (set-up only).
    pub async fn root(&self, method: Method, path: &str, body: Option<Value>) -> Option<Value> {
        self.client()
            .request(method, path, Some(&self.root_token), body.as_ref())
            .await
            .unwrap_or_else(|e| panic!("OpenBao cluster {path}: {e}"))
    }

    /// The active node, waiting (60 s at most) until there is one the forwarder knows of.
    pub async fn active_node(&self) -> usize {
        let active = self.active.clone();
        wait_for("an active OpenBao node", Duration::from_secs(60), || {
            let found = *active.lock().expect("active node lock");
            async move { found.ok_or_else(|| "no node is active".to_string()) }
        })
        .await
    }

    /// Kills node `i` at once (SIGKILL), as a crash would.
    pub async fn kill(&self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.lock().await.take() {
            p.kill();
        }
    }

    /// Stops node `i` gracefully (SIGTERM: an active node steps down first).
    pub async fn stop(&self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.lock().await.take() {
            p.stop();
        }
    }

    /// Starts node `i` again on the same ports and storage (stopping it first if it runs),
    /// unseals it and waits until it is back in the cluster (active or standby).
    pub async fn restart(&self, i: usize) {
        self.stop(i).await;
        self.launch(i).await;
        self.unseal(i).await;
        self.wait_until(i, "unsealed", |h| !h.sealed).await;
    }
}

/// A client for the monitor: a short timeout, so a hung node does not stall it.
fn probe_client(addr: &str) -> OpenBao {
    OpenBao::new(&ClientConfig {
        address: addr.to_string(),
        timeout: Some(Duration::from_millis(500)),
        allow_plain_http: true,
        ..Default::default()
    })
    .expect("OpenBao probe client")
}
