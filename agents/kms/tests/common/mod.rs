//! Shared set-up for the KMS end-to-end tests: a Transit key, a least-privilege policy,
//! credentials, the plugin process and a gRPC client over its socket.
#![allow(dead_code)]

pub use kubebao_testbed::free_port;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kubebao_proto::kms::key_management_service_client::KeyManagementServiceClient;
use kubebao_proto::kms::{EncryptRequest, EncryptResponse, StatusRequest, StatusResponse};
use kubebao_testbed::{Component, OpenBaoServer, wait_for};
use reqwest::Method;
use serde_json::json;
use tonic::transport::Channel;

/// The plugin's policy: exactly what docs/kms.md documents.
pub fn policy_hcl(mount: &str, key: &str) -> String {
    format!(
        r#"path "{mount}/encrypt/{key}" {{ capabilities = ["update"] }}
path "{mount}/decrypt/{key}" {{ capabilities = ["update"] }}
path "{mount}/keys/{key}" {{ capabilities = ["read"] }}
"#
    )
}

/// Mounts Transit at `mount`, creates `key` (aes256-gcm96) and the plugin policy `policy`.
pub async fn transit_key(bao: &OpenBaoServer, mount: &str, key: &str, policy: &str) {
    bao.enable_engine(mount, "transit", None).await;
    bao.root(
        Method::POST,
        &format!("{mount}/keys/{key}"),
        Some(json!({"type": "aes256-gcm96"})),
    )
    .await;
    bao.root(
        Method::PUT,
        &format!("sys/policies/acl/{policy}"),
        Some(json!({"policy": policy_hcl(mount, key)})),
    )
    .await;
}

/// A token with only `policies` (plus OpenBao's default policy), written to `<dir>/<name>`.
pub async fn token_file(bao: &OpenBaoServer, dir: &Path, name: &str, policies: &[&str]) -> PathBuf {
    let resp = bao
        .root(
            Method::POST,
            "auth/token/create",
            Some(json!({"policies": policies, "ttl": "1h", "renewable": true})),
        )
        .await
        .expect("token response");
    let token = resp["auth"]["client_token"].as_str().expect("token");
    let path = dir.join(name);
    std::fs::write(&path, token).expect("write token file");
    path
}

/// Enables AppRole at `mount` with a role whose tokens live `ttl` (max `max_ttl`); writes the
/// role_id and secret_id files and returns their paths.
pub async fn approle_files(
    bao: &OpenBaoServer,
    dir: &Path,
    mount: &str,
    policy: &str,
    ttl: &str,
    max_ttl: &str,
) -> (PathBuf, PathBuf) {
    bao.enable_auth(mount, "approle").await;
    bao.root(
        Method::POST,
        &format!("auth/{mount}/role/kms"),
        Some(json!({"token_policies": [policy], "token_ttl": ttl, "token_max_ttl": max_ttl})),
    )
    .await;
    let role_id = bao
        .root(Method::GET, &format!("auth/{mount}/role/kms/role-id"), None)
        .await
        .expect("role-id");
    let secret_id = bao
        .root(
            Method::POST,
            &format!("auth/{mount}/role/kms/secret-id"),
            None,
        )
        .await
        .expect("secret-id");
    let rid = dir.join(format!("{mount}-role-id"));
    let sid = dir.join(format!("{mount}-secret-id"));
    std::fs::write(&rid, role_id["data"]["role_id"].as_str().expect("role_id")).unwrap();
    std::fs::write(
        &sid,
        secret_id["data"]["secret_id"].as_str().expect("secret_id"),
    )
    .unwrap();
    (rid, sid)
}

/// A running plugin.
pub struct Agent {
    pub process: Component,
    pub socket: PathBuf,
    pub http: String,
}

impl Agent {
    /// Starts `kubebao-kms` with `args` plus socket/http/probe flags; waits until it is ready.
    pub async fn start(name: &str, dir: &Path, args: &[String]) -> Agent {
        let agent = Self::launch(name, dir, args);
        agent.wait_ready().await;
        agent
    }

    /// Starts without waiting.
    pub fn launch(name: &str, dir: &Path, args: &[String]) -> Agent {
        Self::launch_at(name, dir, &dir.join(format!("{name}.sock")), args)
    }

    /// Starts without waiting, on a given socket path.
    pub fn launch_at(name: &str, dir: &Path, socket: &Path, args: &[String]) -> Agent {
        let socket = socket.to_path_buf();
        let http = format!("127.0.0.1:{}", free_port());
        let mut all = vec![
            format!("--socket={}", socket.display()),
            format!("--http-addr={http}"),
        ];
        if !args.iter().any(|a| a.starts_with("--probe-interval")) {
            all.push("--probe-interval=1s".into());
        }
        if !args.iter().any(|a| a.starts_with("--log-level")) {
            all.push("--log-level=info,kubebao_kms=debug,kubebao_openbao=debug".into());
        }
        all.extend(args.iter().cloned());
        let process = Component::start(
            name,
            dir,
            Path::new(env!("CARGO_BIN_EXE_kubebao-kms")),
            &all,
        );
        Agent {
            process,
            socket,
            http,
        }
    }

    /// Waits for /readyz to say ok.
    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.http);
        let socket = self.socket.clone();
        wait_for(
            "the KMS plugin to be ready",
            Duration::from_secs(30),
            || {
                let (url, socket) = (url.clone(), socket.clone());
                async move {
                    if !socket.exists() {
                        return Err("no socket yet".into());
                    }
                    let resp = reqwest::get(&url).await.map_err(|e| e.to_string())?;
                    let status = resp.status();
                    let body = resp.text().await.unwrap_or_default();
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(body)
                    }
                }
            },
        )
        .await;
    }

    /// A gRPC client over the socket.
    pub async fn client(&self) -> KeyManagementServiceClient<Channel> {
        grpc_client(&self.socket).await
    }

    /// GET `path` on the plugin's HTTP endpoint: status code and body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        let resp = reqwest::get(format!("http://{}{path}", self.http))
            .await
            .expect("HTTP endpoint");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("HTTP body"))
    }

    /// The /metrics text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }
}

/// A KMS v2 client over a unix socket.
pub async fn grpc_client(socket: &Path) -> KeyManagementServiceClient<Channel> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .expect("connect to the plugin socket");
    KeyManagementServiceClient::new(channel)
}

/// Status over gRPC.
pub async fn status(client: &mut KeyManagementServiceClient<Channel>) -> StatusResponse {
    client
        .status(StatusRequest {})
        .await
        .expect("Status")
        .into_inner()
}

/// Encrypt over gRPC.
pub async fn encrypt(
    client: &mut KeyManagementServiceClient<Channel>,
    plaintext: &[u8],
) -> Result<EncryptResponse, tonic::Status> {
    client
        .encrypt(EncryptRequest {
            plaintext: plaintext.to_vec(),
            uid: "test".into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Reads a metric sample's value (first line starting with `prefix`).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
