//! Mount latency and OpenBao requests per Mount, on the real test bed, against a baseline
//! measured in the same run: the bare OpenBao calls a provider cannot avoid (Kubernetes login
//! + the reads, in parallel, over the same HTTP client), made directly from this process.
//!
//! Run: `cargo bench -p kubebao-csi --bench mount` (needs `make testbed`).
//! Knobs: `KUBEBAO_BENCH_COLD` (cold samples per case, default 40), `KUBEBAO_BENCH_WARM`
//! (warm samples per case, default 200).
//!
//! vault-csi-provider is not compared here: `go install github.com/hashicorp/vault-csi-provider@latest`
//! is refused by the Go module proxy reachable from this machine (403), see docs/csi.md.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::future::join_all;
use kubebao_openbao::{Credentials, OpenBao, SecretString};
use kubebao_proto::csi::MountRequest;
use kubebao_proto::csi::csi_driver_provider_client::CsiDriverProviderClient;
use kubebao_testbed::{Component, Testbed, TestbedOptions, free_port, wait_for};
use reqwest::Method;
use serde_json::json;
use tonic::transport::Channel;

const NAMESPACE: &str = "bench";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn objects_yaml(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "- objectName: s{i}\n  secretPath: secret/data/bench/s{i}\n  secretKey: password\n"
            )
        })
        .collect()
}

fn attributes(objects: &str, sa: &str, pod_uid: &str, token: &str) -> String {
    let mut attrs = BTreeMap::new();
    attrs.insert("roleName", "bench".to_string());
    attrs.insert("objects", objects.to_string());
    attrs.insert("secretProviderClass", "bench".to_string());
    attrs.insert("csi.storage.k8s.io/pod.name", format!("pod-{sa}"));
    attrs.insert("csi.storage.k8s.io/pod.namespace", NAMESPACE.to_string());
    attrs.insert("csi.storage.k8s.io/pod.uid", pod_uid.to_string());
    attrs.insert("csi.storage.k8s.io/serviceAccount.name", sa.to_string());
    attrs.insert(
        "csi.storage.k8s.io/serviceAccount.tokens",
        json!({"openbao": {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}})
            .to_string(),
    );
    serde_json::to_string(&attrs).unwrap()
}

struct Stats {
    p50: Duration,
    p99: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

async fn metric_sum(url: &str, prefix: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn mount(client: &mut CsiDriverProviderClient<Channel>, attrs: &str) -> Duration {
    let start = Instant::now();
    let resp = client
        .mount(MountRequest {
            attributes: attrs.to_string(),
            secrets: "{}".into(),
            target_path: "/tmp/x".into(),
            permission: "420".into(),
            current_object_version: vec![],
        })
        .await
        .expect("mount");
    let elapsed = start.elapsed();
    assert!(!resp.into_inner().object_version.is_empty());
    elapsed
}

async fn baseline(bao: &OpenBao, jwt: Option<&str>, token: &SecretString, n: usize) -> Duration {
    let start = Instant::now();
    let token = match jwt {
        Some(jwt) => {
            bao.login(&Credentials::Kubernetes {
                mount: "kubernetes".into(),
                role: "bench".into(),
                jwt: SecretString::new(jwt),
            })
            .await
            .expect("baseline login")
            .client_token
        }
        None => token.clone(),
    };
    let reads = (0..n).map(|i| {
        let path = format!("secret/data/bench/s{i}");
        let token = token.clone();
        async move { bao.read(&path, &token).await.expect("baseline read") }
    });
    join_all(reads).await;
    start.elapsed()
}

#[tokio::main]
async fn main() {
    let cold_n = env_usize("KUBEBAO_BENCH_COLD", 40);
    let warm_n = env_usize("KUBEBAO_BENCH_WARM", 200);
    let bed = Testbed::start(TestbedOptions {
        controller_manager: false,
        openbao: true,
    })
    .await;
    bed.enable_kubernetes_auth().await;
    let bao = bed.openbao();
    bao.enable_engine("secret", "kv", Some(2)).await;
    for i in 0..10 {
        bao.root(
            Method::POST,
            &format!("secret/data/bench/s{i}"),
            Some(json!({"data": {"password": format!("value-{i}")}})),
        )
        .await;
    }
    bao.root(
        Method::PUT,
        "sys/policies/acl/bench",
        Some(json!({"policy": "path \"secret/data/bench/*\" { capabilities = [\"read\"] }"})),
    )
    .await;
    bao.root(
        Method::POST,
        "auth/kubernetes/role/bench",
        Some(json!({"bound_service_account_names": ["*"], "bound_service_account_namespaces": [NAMESPACE],
                    "audience": "openbao", "token_policies": ["bench"], "token_ttl": "1h"})),
    )
    .await;
    let kube = bed.client().await;
    let ns_api: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(kube);
    ns_api
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).unwrap(),
        )
        .await
        .unwrap();
    // One ServiceAccount per cold sample (a new identity = a login), for the agent and the baseline.
    let identities = cold_n * 2 + 1;
    let mut tokens = Vec::new();
    for i in 0..identities * 2 {
        let sa = format!("sa-{i}");
        bed.service_account(NAMESPACE, &sa).await;
        tokens.push((
            sa.clone(),
            bed.service_account_token(NAMESPACE, &sa, "openbao", 3600)
                .await,
        ));
    }

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    let port = free_port();
    let providers = dir.path().join("providers");
    let mut agent = Component::start(
        "kubebao-csi",
        dir.path(),
        Path::new(env!("CARGO_BIN_EXE_kubebao-csi")),
        &[
            format!("--provider-dir={}", providers.display()),
            format!("--openbao-addr={}", bao.addr()),
            // The test bed's OpenBao listens on plain http on loopback.
            "--openbao-allow-plain-http".into(),
            format!("--kubeconfig={}", bed.kubeconfig().display()),
            "--audience=openbao".into(),
            format!("--object-version-key-file={}", key.display()),
            format!("--listen=127.0.0.1:{port}"),
        ],
    );
    let socket = providers.join("kubebao.sock");
    let endpoint = format!("unix://{}", socket.display());
    let channel = wait_for("kubebao-csi", Duration::from_secs(30), || {
        agent.assert_running();
        let endpoint = endpoint.clone();
        async move {
            tonic::transport::Endpoint::try_from(endpoint)
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    let mut client = CsiDriverProviderClient::new(channel);
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let direct = bao.client();

    println!("kubebao-csi Mount benchmark (debug build; OpenBao and kube-apiserver on loopback)");
    println!(
        "{:<22} {:>12} {:>12} {:>14} {:>14} {:>8}",
        "case", "agent p50", "agent p99", "baseline p50", "baseline p99", "ratio"
    );
    let mut next = 0;
    for n in [1usize, 10] {
        let objects = objects_yaml(n);
        // Cold: a new identity each time (TokenReview + login + reads).
        let mut agent_cold = Vec::new();
        let mut base_cold = Vec::new();
        let mut first_requests = Vec::new();
        for _ in 0..cold_n {
            let (sa, jwt) = &tokens[next];
            next += 1;
            let attrs = attributes(&objects, sa, &format!("uid-{sa}"), jwt);
            let before = metric_sum(&metrics, "kubebao_csi_openbao_requests_total").await;
            agent_cold.push(mount(&mut client, &attrs).await);
            first_requests
                .push(metric_sum(&metrics, "kubebao_csi_openbao_requests_total").await - before);
            let (_, jwt) = &tokens[next];
            next += 1;
            base_cold.push(baseline(&direct, Some(jwt), &SecretString::default(), n).await);
        }
        let (sa, jwt) = &tokens[next];
        next += 1;
        let attrs = attributes(&objects, sa, &format!("uid-{sa}"), jwt);
        mount(&mut client, &attrs).await;
        let logins_before = metric_sum(&metrics, "kubebao_csi_logins_total").await;
        let requests_before = metric_sum(&metrics, "kubebao_csi_openbao_requests_total").await;
        let mut agent_warm = Vec::new();
        for _ in 0..warm_n {
            agent_warm.push(mount(&mut client, &attrs).await);
        }
        let repeat_requests = (metric_sum(&metrics, "kubebao_csi_openbao_requests_total").await
            - requests_before)
            / warm_n as f64;
        let warm_logins = metric_sum(&metrics, "kubebao_csi_logins_total").await - logins_before;
        let token = direct
            .login(&Credentials::Kubernetes {
                mount: "kubernetes".into(),
                role: "bench".into(),
                jwt: SecretString::new(jwt.clone()),
            })
            .await
            .unwrap()
            .client_token;
        let mut base_warm = Vec::new();
        for _ in 0..warm_n {
            base_warm.push(baseline(&direct, None, &token, n).await);
        }
        for (case, a, b) in [
            (
                format!("{n} object(s), cold"),
                stats(agent_cold),
                stats(base_cold),
            ),
            (
                format!("{n} object(s), warm"),
                stats(agent_warm),
                stats(base_warm),
            ),
        ] {
            println!(
                "{:<22} {:>12} {:>12} {:>14} {:>14} {:>7.2}x",
                case,
                ms(a.p50),
                ms(a.p99),
                ms(b.p50),
                ms(b.p99),
                a.p50.as_secs_f64() / b.p50.as_secs_f64()
            );
        }
        let first = first_requests.iter().sum::<f64>() / first_requests.len() as f64;
        println!(
            "  {n} object(s): OpenBao requests per first Mount {first:.1} (baseline {}), per repeated Mount {repeat_requests:.1} (baseline {n}); logins during {warm_n} warm Mounts: {warm_logins}",
            n + 1
        );
    }
    // The floor of any provider on this machine: one empty gRPC round trip over the socket.
    let mut floor = Vec::new();
    for _ in 0..warm_n {
        let start = Instant::now();
        client
            .version(kubebao_proto::csi::VersionRequest::default())
            .await
            .expect("version");
        floor.push(start.elapsed());
    }
    let floor = stats(floor);
    println!(
        "gRPC round trip over the socket (Version): p50 {}, p99 {}",
        ms(floor.p50),
        ms(floor.p99)
    );
    println!(
        "vault-csi-provider: not compared (the Go module proxy refuses github.com/hashicorp/vault-csi-provider here)"
    );
    drop(agent);
}
