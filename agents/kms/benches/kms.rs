//! KMS plugin benchmark on the real test bed (not a test; run it by hand):
//!
//!   cargo bench -p kubebao-kms --bench kms
//!
//! Env: KUBEBAO_BENCH_OPS (operations per measurement, default 2000),
//! KUBEBAO_BENCH_SECRETS (Secrets for the cold-start LIST, default 10000; 0 skips it).
//!
//! 1. Encrypt/Decrypt through the plugin (gRPC over its unix socket) against direct Transit
//!    calls made with the same OpenBao client library, same key version and associated data,
//!    in the same run, at concurrency 1 and 32 → p50/p99, throughput and the ratio.
//! 2. Status p99.
//! 3. API server cold start: N Secrets stored with KubeBao KMS vs N stored as plaintext
//!    (identity); restart kube-apiserver, time the first full LIST; count the Decrypt calls
//!    the plugin served during restart + LIST.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Agent, metric};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, PostParams};
use kubebao_openbao::{ClientConfig, OpenBao, SecretString};
use kubebao_proto::kms::{DecryptRequest, EncryptRequest, StatusRequest};
use kubebao_testbed::{Testbed, TestbedOptions};

struct Stats {
    mean: Duration,
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:>8.3} ms  p99 {:>8.3} ms  {:>8.0} ops/s",
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.per_sec
        )
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Runs `ops` calls of `op` spread over `concurrency` tasks.
async fn measure<F, Fut>(ops: usize, concurrency: usize, op: Arc<F>) -> Samples
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let op = op.clone();
            let n = ops / concurrency + usize::from(i < ops % concurrency);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    op().await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(ops);
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    Samples {
        latencies: all,
        wall: started.elapsed(),
    }
}

/// Latencies and wall time of one or more measurement rounds.
#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Samples {
    fn add(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.wall += other.wall;
    }
    fn stats(mut self) -> Stats {
        self.latencies.sort();
        Stats {
            mean: self.latencies.iter().sum::<Duration>() / self.latencies.len() as u32,
            p50: pct(&self.latencies, 0.5),
            p99: pct(&self.latencies, 0.99),
            per_sec: self.latencies.len() as f64 / self.wall.as_secs_f64(),
        }
    }
}

/// Measures the direct and plugin paths in alternating rounds, so load from other processes
/// on the machine hits both alike.
async fn compare<D, DF, P, PF>(
    ops: usize,
    concurrency: usize,
    direct: D,
    plugin: P,
) -> (Stats, Stats)
where
    D: Fn() -> DF + Send + Sync + 'static,
    DF: Future<Output = ()> + Send,
    P: Fn() -> PF + Send + Sync + 'static,
    PF: Future<Output = ()> + Send,
{
    const ROUNDS: usize = 5;
    let (direct, plugin) = (Arc::new(direct), Arc::new(plugin));
    let (mut d, mut p) = (Samples::default(), Samples::default());
    for _ in 0..ROUNDS {
        d.add(measure(ops / ROUNDS, concurrency, direct.clone()).await);
        p.add(measure(ops / ROUNDS, concurrency, plugin.clone()).await);
    }
    (d.stats(), p.stats())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    kubebao_openbao::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let ops = env_usize("KUBEBAO_BENCH_OPS", 2000);
    let secrets = env_usize("KUBEBAO_BENCH_SECRETS", 10_000);
    let bed = Testbed::start(TestbedOptions {
        controller_manager: false,
        openbao: true,
    })
    .await;
    let bao = bed.openbao();
    let dir = bed.dir();
    common::transit_key(bao, "transit", "kubebao-kms", "kubebao-kms").await;
    let token_path = common::token_file(bao, dir, "bench.token", &["kubebao-kms"]).await;
    let token = SecretString::new(std::fs::read_to_string(&token_path).unwrap().trim());
    let agent = Agent::start(
        "kubebao-kms",
        dir,
        &[
            format!("--openbao-addr={}", bao.addr()),
            "--openbao-allow-plain-http".into(),
            format!("--token-file={}", token_path.display()),
            // Per-request debug lines would be measured too; production runs at info.
            "--log-level=info".into(),
        ],
    )
    .await;
    let kms = agent.client().await;

    // The same client library and settings the plugin uses.
    let direct = OpenBao::new(&ClientConfig {
        address: bao.addr().to_string(),
        timeout: Some(Duration::from_secs(5)),
        allow_plain_http: true,
        ..Default::default()
    })
    .unwrap();
    let seed = [42u8; 32];
    let ad = b"kubebao-kms/aad/v1\0kb1-00000000000000000000000000000000\0".to_vec();
    let sample = {
        let mut kms = kms.clone();
        kms.encrypt(EncryptRequest {
            plaintext: seed.to_vec(),
            uid: "bench".into(),
        })
        .await
        .expect("encrypt")
        .into_inner()
    };
    let direct_ct = direct
        .transit_encrypt(&token, "transit", "kubebao-kms", &seed, Some(1), Some(&ad))
        .await
        .expect("direct encrypt");

    println!(
        "\nKubeBao KMS plugin vs direct Transit ({ops} ops each; plain HTTP to OpenBao on loopback)"
    );
    println!("{:-<100}", "");
    let mut rows = Vec::new();
    let mut breakdown = None;
    for concurrency in [1usize, 32] {
        // Warm-up both paths.
        for _ in 0..50 {
            let mut k = kms.clone();
            k.encrypt(EncryptRequest {
                plaintext: seed.to_vec(),
                uid: String::new(),
            })
            .await
            .unwrap();
        }
        let (d_enc, p_enc) = {
            let (direct, token, ad) = (direct.clone(), token.clone(), ad.clone());
            let kms = kms.clone();
            compare(
                ops,
                concurrency,
                move || {
                    let (direct, token, ad) = (direct.clone(), token.clone(), ad.clone());
                    async move {
                        direct
                            .transit_encrypt(
                                &token,
                                "transit",
                                "kubebao-kms",
                                &seed,
                                Some(1),
                                Some(&ad),
                            )
                            .await
                            .expect("direct encrypt");
                    }
                },
                move || {
                    let mut kms = kms.clone();
                    async move {
                        kms.encrypt(EncryptRequest {
                            plaintext: seed.to_vec(),
                            uid: String::new(),
                        })
                        .await
                        .expect("plugin encrypt");
                    }
                },
            )
            .await
        };
        let (d_dec, p_dec) = {
            let (direct, token, ad, ct) =
                (direct.clone(), token.clone(), ad.clone(), direct_ct.clone());
            let (kms, sample) = (kms.clone(), sample.clone());
            compare(
                ops,
                concurrency,
                move || {
                    let (direct, token, ad, ct) =
                        (direct.clone(), token.clone(), ad.clone(), ct.clone());
                    async move {
                        direct
                            .transit_decrypt(&token, "transit", "kubebao-kms", &ct, Some(&ad))
                            .await
                            .expect("direct decrypt");
                    }
                },
                move || {
                    let mut kms = kms.clone();
                    let req = DecryptRequest {
                        ciphertext: sample.ciphertext.clone(),
                        uid: String::new(),
                        key_id: sample.key_id.clone(),
                        annotations: sample.annotations.clone(),
                    };
                    async move {
                        kms.decrypt(req).await.expect("plugin decrypt");
                    }
                },
            )
            .await
        };
        for (name, d, p) in [("Encrypt", &d_enc, &p_enc), ("Decrypt", &d_dec, &p_dec)] {
            println!("{name} c={concurrency:<2} direct  {d}");
            println!("{name} c={concurrency:<2} plugin  {p}");
            let row = format!(
                "| {name} | {concurrency} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {:.2} | {:.2} |",
                d.p50.as_secs_f64() * 1e3,
                p.p50.as_secs_f64() * 1e3,
                d.p99.as_secs_f64() * 1e3,
                p.p99.as_secs_f64() * 1e3,
                d.per_sec,
                p.per_sec,
                p.p50.as_secs_f64() / d.p50.as_secs_f64(),
                d.per_sec / p.per_sec,
            );
            rows.push(row);
        }
        if concurrency == 1 {
            let means = [(d_enc.mean, p_enc.mean), (d_dec.mean, p_dec.mean)];
            breakdown = Some(plugin_breakdown(&agent.http, means).await);
        }
    }
    let status = {
        let kms = kms.clone();
        measure(
            ops * 2,
            1,
            Arc::new(move || {
                let mut kms = kms.clone();
                async move {
                    kms.status(StatusRequest {}).await.expect("status");
                }
            }),
        )
        .await
        .stats()
    };
    println!("Status  c=1  plugin  {status}");
    println!("\nMarkdown (latencies in ms):");
    println!(
        "| call | concurrency | direct p50 | plugin p50 | direct p99 | plugin p99 | direct ops/s | plugin ops/s | p50 ratio | throughput ratio (direct/plugin) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!(
        "| Status | 1 | – | {:.3} | – | {:.3} | – | {:.0} | – | – |",
        status.p50.as_secs_f64() * 1e3,
        status.p99.as_secs_f64() * 1e3,
        status.per_sec
    );
    println!("\nInside the plugin at concurrency 1 (means, ms):");
    println!(
        "| call | direct call | plugin call | plugin's handler | OpenBao call in the handler | plugin's own work | gRPC transport |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in breakdown.expect("measured at concurrency 1") {
        println!("{r}");
    }

    if secrets > 0 {
        cold_start(&bed, &agent, secrets).await;
    }
}

async fn create_secrets(api: &Api<Secret>, n: usize) {
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let s = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(format!("s-{i:05}")),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(
                        "value".to_string(),
                        ByteString(format!("secret-value-{i}").into_bytes()),
                    )])),
                    ..Default::default()
                };
                api.create(&PostParams::default(), &s)
                    .await
                    .expect("create");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    println!(
        "  created {n} Secrets in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

async fn timed_list(bed: &Testbed, ns: &str, n: usize) -> Duration {
    let api: Api<Secret> = Api::namespaced(bed.client().await, ns);
    let started = Instant::now();
    let list = api.list(&ListParams::default()).await.expect("list");
    let took = started.elapsed();
    assert_eq!(list.items.len(), n, "LIST returned every Secret");
    took
}

async fn decrypts(agent: &Agent) -> f64 {
    metric(
        &agent.metrics().await,
        r#"kubebao_kms_requests_total{method="Decrypt",code="OK"}"#,
    )
    .unwrap_or(0.0)
}

async fn cold_start(bed: &Testbed, agent: &Agent, n: usize) {
    println!("\nAPI server cold start: first full LIST of {n} Secrets after a restart");
    let config = bed.dir().join("bench-encryption.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources: [secrets]\n    providers:\n      - kms:\n          apiVersion: v2\n          name: kubebao\n          endpoint: unix://{}\n          timeout: 3s\n      - identity: {{}}\n",
            agent.socket.display()
        ),
    )
    .unwrap();
    // Phase 1, identity: N plaintext Secrets, API server without encryption. (The API server
    // lists every Secret at start-up for its own informers, so the phases must not overlap:
    // an identity-only API server cannot start with KMS-encrypted Secrets in etcd.)
    let plain_ns = bed.namespace("plain").await;
    let plain: Api<Secret> = Api::namespaced(bed.client().await, &plain_ns);
    create_secrets(&plain, n).await;
    let mut identity = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        bed.restart_apiserver(None).await;
        let ready = t.elapsed();
        identity.push((ready, timed_list(bed, &plain_ns, n).await));
    }
    let plain: Api<Secret> = Api::namespaced(bed.client().await, &plain_ns);
    plain
        .delete_collection(&Default::default(), &ListParams::default())
        .await
        .expect("delete plaintext Secrets");
    // Phase 2, KubeBao KMS: N encrypted Secrets.
    bed.restart_apiserver(Some(&config)).await;
    let kms_ns = bed.namespace("kms").await;
    create_secrets(&Api::namespaced(bed.client().await, &kms_ns), n).await;
    let mut kms = Vec::new();
    let mut decrypt_calls = Vec::new();
    for _ in 0..3 {
        let before = decrypts(agent).await;
        let t = Instant::now();
        bed.restart_apiserver(Some(&config)).await;
        let ready = t.elapsed();
        kms.push((ready, timed_list(bed, &kms_ns, n).await));
        decrypt_calls.push(decrypts(agent).await - before);
    }
    identity.sort();
    kms.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = |v: &[(Duration, Duration)], f: fn(&(Duration, Duration)) -> Duration| {
        let mut x: Vec<Duration> = v.iter().map(f).collect();
        x.sort();
        x[x.len() / 2]
    };
    let (ir, il) = (median(&identity, |x| x.0), median(&identity, |x| x.1));
    let (kr, kl) = (median(&kms, |x| x.0), median(&kms, |x| x.1));
    println!(
        "  restart to /readyz (median of 3): identity {:.0} ms, KubeBao KMS {:.0} ms, ratio {:.2}",
        ms(ir),
        ms(kr),
        kr.as_secs_f64() / ir.as_secs_f64()
    );
    println!(
        "  first full LIST after restart (median of 3): identity {:.0} ms, KubeBao KMS {:.0} ms, ratio {:.2}",
        ms(il),
        ms(kl),
        kl.as_secs_f64() / il.as_secs_f64()
    );
    println!("  all runs (restart, LIST): identity {identity:?}, kms {kms:?}");
    println!("  Decrypt calls served per restart + LIST: {decrypt_calls:?}");
}

/// Where a plugin call's time goes (means, ms): the benchmark's direct call and plugin call
/// (`means`, Encrypt then Decrypt), and from the plugin's own /metrics its gRPC handler and the
/// OpenBao call inside it. Plugin call minus handler is the gRPC transport.
async fn plugin_breakdown(http: &str, means: [(Duration, Duration); 2]) -> [String; 2] {
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    // `name{labels}` → mean of `name_sum{labels}` / `name_count{labels}`, in ms.
    let mean = |series: &str| {
        let (name, labels) = series.split_once('{').expect("series with labels");
        let value = |suffix: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(&format!("{name}{suffix}{{{labels} ")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        value("_sum") / value("_count") * 1e3
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let [enc, dec] = means;
    [("Encrypt", "encrypt", enc), ("Decrypt", "decrypt", dec)].map(
        |(method, op, (direct, plugin))| {
            let handler = mean(&format!(
                "kubebao_kms_request_duration_seconds{{method=\"{method}\"}}"
            ));
            let inner = mean(&format!(
                "kubebao_kms_openbao_request_duration_seconds{{operation=\"{op}\",outcome=\"ok\"}}"
            ));
            format!(
                "| {method} | {:.3} | {:.3} | {handler:.3} | {inner:.3} | {:.3} | {:.3} |",
                ms(direct),
                ms(plugin),
                handler - inner,
                ms(plugin) - handler,
            )
        },
    )
}
