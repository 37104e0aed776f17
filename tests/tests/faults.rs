//! Faults under load: the real KMS plugin serves Encrypt+Decrypt continuously while OpenBao
//! breaks, and recovers by itself. Each test prints `FIGURE fault:` lines (failed requests,
//! recovery time, objects lost) and asserts that nothing encrypted before the fault is lost.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kubebao_openbao::{OpenBao, SecretString};
use kubebao_proto::kms::key_management_service_client::KeyManagementServiceClient;
use kubebao_proto::kms::{DecryptRequest, EncryptRequest, EncryptResponse};
use kubebao_testbed::node_image::kubebao_binaries;
use kubebao_testbed::{
    Binaries, Component, OpenBaoCluster, OpenBaoServer, Pki, free_port, wait_for,
};
use reqwest::Method;
use serde_json::json;
use tonic::transport::Channel;

/// Longest outage the plugin may show after the active node dies. Failover is a raft election
/// (`performance_multiplier = 1`: ~1 s heartbeat timeout, randomised up to 2 s), the new active
/// node's post-unseal set-up (mounts, tokens: about a second), the forwarder noticing it
/// (100 ms) and the plugin's next request (2 s timeout each). That is under 10 s; 30 s leaves
/// room for this busy 2-core machine and is still well inside what an API server tolerates
/// (its KMS calls fail and retry; nothing is lost).
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// How long the load runs before the fault, and keeps running after the first success.
const STEADY: Duration = Duration::from_secs(3);
/// Pause after a failed round trip before the next (the failed count is then comparable).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest one Encrypt+Decrypt may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The KMS plugin's Transit key and a token with only the documented policy, in `dir`.
async fn transit_token(bao: &OpenBao, root: &SecretString, dir: &Path) -> PathBuf {
    let call = |method: Method, path: &'static str, body: serde_json::Value| async move {
        bao.request(method, path, Some(root), Some(&body))
            .await
            .unwrap_or_else(|e| panic!("OpenBao {path}: {e}"))
    };
    call(
        Method::POST,
        "sys/mounts/transit",
        json!({"type": "transit"}),
    )
    .await;
    call(
        Method::POST,
        "transit/keys/kubebao-kms",
        json!({"type": "aes256-gcm96"}),
    )
    .await;
    let policy = r#"path "transit/encrypt/kubebao-kms" { capabilities = ["update"] }
path "transit/decrypt/kubebao-kms" { capabilities = ["update"] }
path "transit/keys/kubebao-kms" { capabilities = ["read"] }
"#;
    call(
        Method::PUT,
        "sys/policies/acl/kubebao-kms",
        json!({"policy": policy}),
    )
    .await;
    let token = call(
        Method::POST,
        "auth/token/create",
        json!({"policies": ["kubebao-kms"], "ttl": "1h"}),
    )
    .await
    .expect("token response");
    let path = dir.join("kms-token");
    std::fs::write(
        &path,
        token["auth"]["client_token"].as_str().expect("token"),
    )
    .expect("write the token file");
    path
}

/// The real `kubebao-kms` pointed at `addr`; returns it once /readyz is ok, and its socket.
async fn start_plugin(
    bin_dir: &Path,
    dir: &Path,
    addr: &str,
    token: &Path,
) -> (Component, PathBuf) {
    let socket = dir.join("kms.sock");
    let http = format!("127.0.0.1:{}", free_port());
    let args = vec![
        format!("--socket={}", socket.display()),
        format!("--http-addr={http}"),
        format!("--openbao-addr={addr}"),
        "--openbao-allow-plain-http".into(),
        format!("--token-file={}", token.display()),
        "--probe-interval=1s".into(),
        "--log-level=info,kubebao_kms=debug".into(),
    ];
    let mut plugin = Component::start("kubebao-kms", dir, &bin_dir.join("kubebao-kms"), &args);
    let url = format!("http://{http}/readyz");
    wait_for(
        "the KMS plugin to be ready",
        Duration::from_secs(60),
        || {
            plugin.assert_running();
            let url = url.clone();
            async move {
                let resp = reqwest::get(&url).await.map_err(|e| e.to_string())?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(resp.text().await.unwrap_or_default())
                }
            }
        },
    )
    .await;
    (plugin, socket)
}

async fn grpc_client(socket: &Path) -> KeyManagementServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))
        .expect("socket endpoint")
        .connect()
        .await
        .expect("connect to the plugin socket");
    KeyManagementServiceClient::new(channel)
}

/// One Encrypt+Decrypt round trip as the load made it.
struct Outcome {
    started: Instant,
    finished: Instant,
    error: Option<String>,
}

/// What the load saw: every round trip, and every ciphertext made (with its plaintext).
#[derive(Default)]
struct Record {
    outcomes: Vec<Outcome>,
    stored: Vec<(Instant, Vec<u8>, EncryptResponse)>,
}

async fn round_trip(
    client: &mut KeyManagementServiceClient<Channel>,
    plaintext: &[u8],
) -> Result<EncryptResponse, String> {
    let sealed = client
        .encrypt(EncryptRequest {
            plaintext: plaintext.to_vec(),
            uid: "fault-load".into(),
        })
        .await
        .map_err(|e| format!("Encrypt: {e}"))?
        .into_inner();
    let opened = decrypt(client, &sealed).await?;
    if opened != plaintext {
        return Err("Decrypt returned other bytes than were encrypted".into());
    }
    Ok(sealed)
}

async fn decrypt(
    client: &mut KeyManagementServiceClient<Channel>,
    sealed: &EncryptResponse,
) -> Result<Vec<u8>, String> {
    Ok(client
        .decrypt(DecryptRequest {
            ciphertext: sealed.ciphertext.clone(),
            uid: "fault-load".into(),
            key_id: sealed.key_id.clone(),
            annotations: sealed.annotations.clone(),
        })
        .await
        .map_err(|e| format!("Decrypt: {e}"))?
        .into_inner()
        .plaintext)
}

/// Encrypt+Decrypt round trips, one after the other, until dropped.
struct Load {
    record: Arc<Mutex<Record>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(socket: &Path) -> Load {
        let mut client = grpc_client(socket).await;
        let record = Arc::new(Mutex::new(Record::default()));
        let shared = record.clone();
        let task = tokio::spawn(async move {
            for i in 0u64.. {
                let plaintext = format!("secret number {i}").into_bytes();
                let started = Instant::now();
                let result =
                    tokio::time::timeout(REQUEST_TIMEOUT, round_trip(&mut client, &plaintext))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer in {REQUEST_TIMEOUT:?}")));
                let finished = Instant::now();
                let failed = result.is_err();
                {
                    let mut record = shared.lock().expect("record lock");
                    let error = match result {
                        Ok(sealed) => {
                            record.stored.push((started, plaintext, sealed));
                            None
                        }
                        Err(e) => Some(e),
                    };
                    record.outcomes.push(Outcome {
                        started,
                        finished,
                        error,
                    });
                }
                if failed {
                    // A client retries after a pause, not in a tight loop.
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        });
        Load { record, task }
    }

    /// Runs the load for `STEADY`, applies `fault`, waits for the first round trip started
    /// after it to succeed, runs `STEADY` more, stops, and checks every ciphertext made still
    /// decrypts. Prints the FIGURE lines and returns the recovery time.
    async fn through<F: Future<Output = ()>>(
        self,
        socket: &Path,
        name: &str,
        fault: F,
    ) -> Duration {
        tokio::time::sleep(STEADY).await;
        let before = self.record.lock().expect("record lock").stored.len();
        assert!(before > 0, "the load made no ciphertext before the fault");
        let fault_at = Instant::now();
        fault.await;
        let repaired_at = Instant::now();
        let record = self.record.clone();
        // The first round trip that started after the fault began and succeeded once it was
        // over (for a crash, "over" is the kill itself: nothing is repaired by hand).
        let first_success = wait_for(
            &format!("the KMS plugin to serve again after {name}"),
            RECOVERY_BOUND * 2,
            || {
                let found = record
                    .lock()
                    .expect("record lock")
                    .outcomes
                    .iter()
                    .find(|o| {
                        o.started >= fault_at && o.finished >= repaired_at && o.error.is_none()
                    })
                    .map(|o| o.finished);
                async move { found.ok_or_else(|| "no success yet".to_string()) }
            },
        )
        .await;
        let recovery = first_success - repaired_at;
        let outage = first_success - fault_at;
        tokio::time::sleep(STEADY).await;
        self.task.abort();
        let record = std::mem::take(&mut *self.record.lock().expect("record lock"));
        let after_fault: Vec<&Outcome> = record
            .outcomes
            .iter()
            .filter(|o| o.finished >= fault_at)
            .collect();
        let failed: Vec<&Outcome> = after_fault
            .iter()
            .copied()
            .filter(|o| o.error.is_some())
            .collect();
        let mut client = grpc_client(socket).await;
        let mut lost = 0;
        for (_, plaintext, sealed) in &record.stored {
            if decrypt(&mut client, sealed).await.as_deref() != Ok(plaintext.as_slice()) {
                lost += 1;
            }
        }
        let made_before = record.stored.iter().filter(|(t, ..)| *t < fault_at).count();
        println!(
            "FIGURE fault: {name}: {} round trips after the fault, {} failed (first error: {})",
            after_fault.len(),
            failed.len(),
            failed
                .first()
                .and_then(|o| o.error.as_deref())
                .unwrap_or("none")
        );
        println!(
            "FIGURE fault: {name}: recovery {recovery:.2?} (first success after the fault was over), outage {outage:.2?} (from the fault's start)"
        );
        println!(
            "FIGURE fault: {name}: objects lost {lost} of {} ciphertexts ({made_before} made before the fault)",
            record.stored.len()
        );
        let longest = failed.iter().map(|o| o.finished - o.started).max();
        println!("FIGURE fault: {name}: longest failed round trip {longest:.2?}");
        assert_eq!(lost, 0, "{lost} ciphertexts no longer decrypt after {name}");
        assert!(
            recovery <= RECOVERY_BOUND,
            "the plugin took {recovery:?} to serve again after {name} (bound {RECOVERY_BOUND:?})"
        );
        recovery
    }
}

fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kubebao-faults-")
        .tempdir()
        .expect("temp dir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_plugin_recovers_when_the_active_openbao_node_dies() {
    let dir = work_dir();
    let bin_dir = kubebao_binaries(&dir.path().join("bin"));
    let cluster = OpenBaoCluster::start(&Binaries::locate(), dir.path(), 3).await;
    let token = transit_token(&cluster.client(), cluster.root_token(), dir.path()).await;
    let (_plugin, socket) = start_plugin(&bin_dir, dir.path(), cluster.addr(), &token).await;
    let load = Load::start(&socket).await;
    let active = cluster.active_node().await;
    load.through(&socket, "active OpenBao node SIGKILLed", async {
        cluster.kill(active).await;
    })
    .await;
    let now_active = cluster.active_node().await;
    assert_ne!(now_active, active, "a standby took over");

    // The killed node comes back as a standby and the cluster keeps serving through it.
    cluster.restart(active).await;
    assert_eq!(cluster.active_node().await, now_active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_plugin_recovers_when_openbao_is_sealed_and_when_it_restarts() {
    let dir = work_dir();
    let bin_dir = kubebao_binaries(&dir.path().join("bin"));
    let pki = Pki::generate(&dir.path().join("pki"));
    let bao = OpenBaoServer::start(&Binaries::locate(), &pki, dir.path()).await;
    let token = transit_token(&bao.client(), bao.root_token(), dir.path()).await;
    let (_plugin, socket) = start_plugin(&bin_dir, dir.path(), bao.addr(), &token).await;

    let load = Load::start(&socket).await;
    load.through(&socket, "OpenBao sealed for 2 s, then unsealed", async {
        bao.seal().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        bao.unseal().await;
    })
    .await;

    let load = Load::start(&socket).await;
    load.through(&socket, "OpenBao restarted", async {
        bao.restart().await;
    })
    .await;
}
