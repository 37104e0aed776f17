//! Operator benchmark on the test bed (not a test): N BaoSecrets over N KV v2 paths.
//!
//! Run: `cargo bench -p kubebao-operator --bench baosecrets` (N=1000; `KUBEBAO_BENCH_N=200` for a
//! quicker run). Reports, side by side with a baseline measured in the same run:
//! - time from apply until all Ready, against the bare work (N KV reads with one token and N
//!   Secret writes from one client, same concurrency) → ratio;
//! - operator RSS (VmRSS) at steady state;
//! - OpenBao requests and Secret writes during one refresh interval with nothing changed.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use kubebao_openbao::SecretString;
use kubebao_testbed::{Component, Testbed, TestbedOptions, free_port, wait_for};
use reqwest::Method;
use serde_json::json;

const CONCURRENCY: usize = 32;
const REFRESH: &str = "30s";

async fn metric(url: &str, prefix: &str) -> f64 {
    let Ok(resp) = reqwest::get(url).await else {
        return f64::NAN;
    };
    resp.text()
        .await
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("KUBEBAO_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let bed = Testbed::start(TestbedOptions::default()).await;
    bed.enable_kubernetes_auth().await;
    let bao = bed.openbao();
    bao.enable_engine("secret", "kv", Some(2)).await;
    let ns = bed.namespace("bench").await;
    let policy = format!(
        "path \"secret/data/{ns}/*\" {{ capabilities = [\"read\"] }}\npath \"secret/metadata/{ns}/*\" {{ capabilities = [\"read\"] }}\n"
    );
    bao.root(
        Method::POST,
        "sys/policies/acl/bench",
        Some(json!({"policy": policy})),
    )
    .await;
    bao.root(Method::POST, &format!("auth/kubernetes/role/{ns}"), Some(json!({"bound_service_account_names": ["default"], "bound_service_account_namespaces": [ns], "token_policies": ["bench"], "token_ttl": "1h"}))).await;
    bao.root(Method::POST, "sys/policies/acl/kubebao-operator", Some(json!({"policy": "path \"sys/policies/acl/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\"] }"}))).await;
    let token = bao
        .root(
            Method::POST,
            "auth/token/create",
            Some(json!({"policies": ["kubebao-operator"], "ttl": "2h"})),
        )
        .await
        .unwrap()["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let token_file = bed.dir().join("operator-token");
    std::fs::write(&token_file, token).unwrap();

    let client = bao.client();
    let root = bao.root_token().clone();
    stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (client, root, ns) = (client.clone(), root.clone(), ns.clone());
            async move {
                let data = json!({"user": format!("u{i}"), "pass": format!("p{i}")})
                    .as_object()
                    .unwrap()
                    .clone();
                client
                    .kv2_write(&root, "secret", &format!("{ns}/s{i}"), &data)
                    .await
                    .expect("kv write");
            }
        })
        .await;
    bed.service_account(&ns, "default").await;
    let kube = bed.client().await;

    // Baseline: the bare work the operator must do, from one process with one token.
    let reader = bao.client();
    let sa_token = bed
        .service_account_token(&ns, "default", "openbao", 3600)
        .await;
    let auth = reader
        .login(&kubebao_openbao::Credentials::Kubernetes {
            mount: "kubernetes".into(),
            role: ns.clone(),
            jwt: SecretString::new(sa_token),
        })
        .await
        .expect("login");
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), &ns);
    let start = Instant::now();
    stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (reader, token, secrets, ns) = (
                reader.clone(),
                auth.client_token.clone(),
                secrets.clone(),
                ns.clone(),
            );
            async move {
                let kv = reader
                    .kv2_read_api_path(&token, &format!("secret/data/{ns}/s{i}"))
                    .await
                    .expect("read");
                let secret = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(format!("baseline-{i}")),
                        ..Default::default()
                    },
                    string_data: Some(
                        kv.data
                            .iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect(),
                    ),
                    ..Default::default()
                };
                secrets
                    .create(&PostParams::default(), &secret)
                    .await
                    .expect("create");
            }
        })
        .await;
    let baseline = start.elapsed();
    secrets
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .expect("delete baseline");

    // The operator.
    bed.install_crds();
    let _ = bed.kubectl(&["create", "namespace", "kubebao-system"]);
    let port = free_port();
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let args: Vec<String> = [
        "--openbao-addr",
        bao.addr(),
        // The test bed's OpenBao listens on loopback over plain http.
        "--openbao-allow-plain-http",
        "--openbao-token-file",
        &token_file.display().to_string(),
        "--namespace",
        "kubebao-system",
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--leader-elect",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let kubeconfig = bed.kubeconfig().display().to_string();
    let mut operator = Component::start_with_env(
        "kubebao-operator",
        bed.dir(),
        &PathBuf::from(env!("CARGO_BIN_EXE_kubebao-operator")),
        &args,
        &[("KUBECONFIG", &kubeconfig), ("RUST_LOG", "warn")],
    );
    wait_for("operator metrics", Duration::from_secs(60), || {
        operator.assert_running();
        let m = metrics.clone();
        async move {
            if metric(&m, "kubebao_operator_leader ").await == 1.0 {
                Ok(())
            } else {
                Err("not started".into())
            }
        }
    })
    .await;
    let idle_rss = rss_kib(operator.pid().unwrap());

    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "kubebao.io",
        "v1alpha1",
        "BaoSecret",
    ));
    let api: Api<DynamicObject> = Api::namespaced_with(kube.clone(), &ns, &ar);
    let start = Instant::now();
    stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (api, ns) = (api.clone(), ns.clone());
            async move {
                let obj: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret",
                    "metadata": {"name": format!("s{i}")},
                    "spec": {"secretPath": format!("secret/data/{ns}/s{i}"), "refreshInterval": REFRESH, "target": {"name": format!("s{i}")}}
                }))
                .unwrap();
                api.create(&PostParams::default(), &obj).await.expect("create BaoSecret");
            }
        })
        .await;
    let applied = start.elapsed();
    let ready_count = || async {
        api.list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|o| {
                        o.data["status"]["conditions"].as_array().is_some_and(|c| {
                            c.iter()
                                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                        })
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    wait_for("all BaoSecrets Ready", Duration::from_secs(600), || async {
        let r = ready_count().await;
        if r == n {
            Ok(())
        } else {
            Err(format!("{r}/{n} Ready"))
        }
    })
    .await;
    let all_ready = start.elapsed();
    let pid = operator.pid().unwrap();
    let ready_rss = rss_kib(pid);

    // One refresh interval with nothing changed, measured as a fixed window of exactly that
    // length (a measurement window, not a wait for a condition): every BaoSecret is due once.
    let window = Duration::from_secs(30);
    let ops = ["login", "kv_metadata", "kv_read"];
    let requests =
        |m: String| async move { metric(&m, "kubebao_operator_openbao_requests_total").await };
    let writes =
        |m: String| async move { metric(&m, "kubebao_operator_secret_writes_total").await };
    let by_op = |m: String| async move {
        let mut v = Vec::new();
        for op in ops {
            v.push(
                metric(
                    &m,
                    &format!("kubebao_operator_openbao_requests_total{{op=\"{op}\""),
                )
                .await,
            );
        }
        v
    };
    let (r0, w0, o0) = (
        requests(metrics.clone()).await,
        writes(metrics.clone()).await,
        by_op(metrics.clone()).await,
    );
    tokio::time::sleep(window).await;
    let (r1, w1, o1) = (
        requests(metrics.clone()).await,
        writes(metrics.clone()).await,
        by_op(metrics.clone()).await,
    );
    let breakdown: Vec<String> = ops
        .iter()
        .zip(o0.iter().zip(o1.iter()))
        .map(|(op, (a, b))| format!("{op} {}", b - a))
        .collect();
    let steady_rss = rss_kib(pid);
    operator.stop();

    println!(
        "operator benchmark, N = {n} BaoSecrets over {n} KV v2 paths (debug build, test bed on this machine)"
    );
    println!(
        "  baseline (N KV reads + N Secret creates, one client, concurrency {CONCURRENCY}): {:.2} s",
        baseline.as_secs_f64()
    );
    println!(
        "  operator: apply took {:.2} s; all Ready after {:.2} s → ratio to baseline {:.2}x",
        applied.as_secs_f64(),
        all_ready.as_secs_f64(),
        all_ready.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "  operator RSS: idle {:.1} MiB, all Ready {:.1} MiB, after a refresh cycle {:.1} MiB",
        idle_rss as f64 / 1024.0,
        ready_rss as f64 / 1024.0,
        steady_rss as f64 / 1024.0
    );
    println!(
        "  one refresh interval ({REFRESH}) with nothing changed: {} OpenBao requests ({:.2} per BaoSecret; {}), {} Secret writes",
        r1 - r0,
        (r1 - r0) / n as f64,
        breakdown.join(", "),
        w1 - w0
    );
}
