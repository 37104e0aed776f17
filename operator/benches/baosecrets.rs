//! Operator benchmark on the test bed (not a test): N BaoSecrets over N KV v2 paths, spread
//! over tenants as on a real cluster, measured against the scale goals (PASS/FAIL).
//!
//! Run: `cargo bench -p kubebao-operator --bench baosecrets` (bench profile: the operator and
//! this benchmark are release builds; N = 1000). `KUBEBAO_BENCH_N=10000` for the scale goals,
//! `=200` for a quick run. `KUBEBAO_BENCH_REFRESH_SECS` sets the refresh interval (default 30 s
//! per 1,000 BaoSecrets: the same refresh rate at every N). The operator's own variables
//! (`KUBEBAO_CONCURRENCY`, `RUST_LOG`) pass through.
//!
//! `KUBEBAO_BENCH_DYNAMIC=<M>` (default 0) adds M BaoSecrets with leased credentials: one
//! engine source each, `database/creds/bench` on a PostgreSQL from the test bed's Debian
//! binaries (leases 1 h, renewable to 24 h: nothing is renewed or replaced during the run),
//! spread over the same tenants. Reported for them: time to Ready, leases created (audit log),
//! OpenBao requests in the refresh interval, and after every BaoSecret is deleted at the end,
//! leases left unrevoked and PostgreSQL roles left.
//!
//! Layout: one tenant per 100 BaoSecrets, each with its own namespace, ServiceAccount `app`,
//! OpenBao policy (its own KV paths and their metadata) and Kubernetes-auth role (named after
//! the namespace: the BaoSecret default). Reports:
//! - time from apply until all Ready, against the bare work measured in the same run (per
//!   tenant a TokenRequest and a login, then N KV reads and N Secret creates from one client
//!   at the same concurrency) → ratio;
//! - operator memory (VmRSS; VmHWM = peak): idle, all Ready, after a refresh interval;
//! - one refresh interval with nothing changed: OpenBao requests (OpenBao's audit log and the
//!   operator's metric), Secret writes, API server requests;
//! - CPU seconds of every process in each phase: where the time goes.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, ObjectMeta,
    PostParams,
};
use kubebao_openbao::{Credentials, SecretString};
use kubebao_testbed::{Component, Testbed, TestbedOptions, free_port, wait_for};
use reqwest::Method;
use serde_json::json;
use support::leases::{self, Deletion, Issued};
use support::{Memory, Scrape, mib};

/// Requests in flight while setting up and in the baseline (the operator has its own bound).
const CONCURRENCY: usize = 32;
/// BaoSecrets per tenant namespace.
const PER_TENANT: usize = 100;
/// The ServiceAccount each tenant's BaoSecrets read OpenBao as.
const TENANT_SA: &str = "app";
/// Goal: every BaoSecret Ready this long after the apply started.
const READY_GOAL: Duration = Duration::from_secs(300);
/// Goal: operator RSS at steady state below this.
const RSS_GOAL_MIB: f64 = 128.0;

/// Which tenant and KV path each BaoSecret has.
struct Layout {
    n: usize,
    /// BaoSecrets with leased credentials (`KUBEBAO_BENCH_DYNAMIC`).
    m: usize,
    tenants: Vec<String>,
}

impl Layout {
    /// BaoSecret `i`: namespace and name (also its Secret's name and its KV path's last segment).
    fn item(&self, i: usize) -> (&str, String) {
        (&self.tenants[i / PER_TENANT], format!("s{i}"))
    }

    /// Leased-credentials BaoSecret `j`: namespace (round robin over the tenants) and name.
    fn dynamic(&self, j: usize) -> (&str, String) {
        (&self.tenants[j % self.tenants.len()], format!("d{j}"))
    }

    /// Every BaoSecret.
    fn total(&self) -> usize {
        self.n + self.m
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let n: usize = env_or("KUBEBAO_BENCH_N", 1000);
    let m: usize = env_or("KUBEBAO_BENCH_DYNAMIC", 0);
    let default_refresh = 30 * (n + m).div_ceil(1000).max(1) as u64;
    let refresh = Duration::from_secs(env_or("KUBEBAO_BENCH_REFRESH_SECS", default_refresh));
    let bed = Testbed::start(TestbedOptions::default()).await;
    let kube = bed.client().await;
    eprintln!("test bed in {}", bed.dir().display());

    let started = Instant::now();
    let layout = Layout {
        n,
        m,
        tenants: tenants(&bed, n.div_ceil(PER_TENANT).max(1), m > 0).await,
    };
    write_kv(&bed, &layout).await;
    let pg = match m {
        0 => None,
        _ => Some(leases::database(&bed).await),
    };
    let setup = started.elapsed();
    eprintln!("set-up took {:.1} s", setup.as_secs_f64());
    let baseline = baseline(&bed, &kube, &layout).await;
    eprintln!("baseline took {:.1} s", baseline.as_secs_f64());

    let (mut operator, metrics) = start_operator(&bed).await;
    let pid = operator.pid().expect("operator pid");
    let processes = support::processes(bed.dir(), pid);
    let idle = support::memory(pid);
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "kubebao.io",
        "v1alpha1",
        "BaoSecret",
    ));
    let total = layout.total();
    let log = bed.openbao().audit_log().to_path_buf();
    let (start, applied_mark) = (Instant::now(), support::audit_mark(&log));
    let cpu_start = support::cpu_snapshot(&processes);
    let watch = support::ReadyWatch::start(Api::all_with(kube.clone(), &ar), total, m, start);
    apply(&kube, &ar, &layout, refresh).await;
    let applied = start.elapsed();
    eprintln!("apply took {:.1} s", applied.as_secs_f64());
    let timeout = READY_GOAL * 2 + Duration::from_millis(60 * total as u64);
    let [(marks, ready), dynamic_ready] = watch.wait(total, timeout).await;
    let cpu_ready = support::cpu_snapshot(&processes);
    let at_ready = support::memory(pid);
    let issued_at_ready = Issued::count(&log, applied_mark, support::audit_mark(&log));
    eprintln!("{ready}/{total} Ready; measuring one refresh interval ({refresh:?})");

    let window_start = k8s_openapi::jiff::Timestamp::now();
    let window = refresh_window(&bed, &kube, &metrics, &layout, refresh, &processes).await;
    let steady = support::memory(pid);
    let dynamic = match &pg {
        Some(pg) => Some(Dynamic {
            ready: dynamic_ready,
            checked: leases::checked_since(&kube, &ar, window_start, refresh).await,
            issued_at_ready,
            roles_before_deletion: pg.roles_like("v-%").await,
            leases_before_deletion: leases::leases_listed(&bed).await,
            deletion: leases::delete_all(&bed, &kube, &ar, &layout.tenants, pg, total).await,
            issued: Issued::count(&log, applied_mark, support::audit_mark(&log)),
        }),
        None => None,
    };
    operator.stop();

    let bench = Figures {
        n,
        m,
        tenants: layout.tenants.len(),
        refresh,
        setup,
        baseline,
        applied,
        marks,
        ready,
        cpu_ready: support::cpu_used(&processes, &cpu_start, &cpu_ready),
        memory: [idle, at_ready, steady],
        window,
        dynamic,
    };
    bench.print();
}

/// One tenant per `PER_TENANT` BaoSecrets: namespace, ServiceAccount, policy, role.
/// With `leased`, the policy also allows the leased credentials, and the role's tokens live
/// as long as the leases can.
async fn tenants(bed: &Testbed, count: usize, leased: bool) -> Vec<String> {
    bed.enable_kubernetes_auth().await;
    bed.openbao().enable_engine("secret", "kv", Some(2)).await;
    stream::iter(0..count)
        .map(|_| tenant(bed, leased))
        .buffered(8)
        .collect()
        .await
}

async fn tenant(bed: &Testbed, leased: bool) -> String {
    let ns = bed.namespace("bench").await;
    bed.service_account(&ns, TENANT_SA).await;
    let bao = bed.openbao();
    let mut policy = format!(
        "path \"secret/data/{ns}/*\" {{ capabilities = [\"read\"] }}\npath \"secret/metadata/{ns}/*\" {{ capabilities = [\"read\"] }}\n"
    );
    if leased {
        policy.push_str(&leases::policy());
    }
    let body = json!({"policy": policy});
    bao.root(Method::POST, &format!("sys/policies/acl/{ns}"), Some(body))
        .await;
    let mut role = json!({
        "bound_service_account_names": [TENANT_SA],
        "bound_service_account_namespaces": [ns],
        "token_policies": [ns],
        "token_ttl": "1h",
    });
    if leased {
        role["token_max_ttl"] = json!(leases::MAX_TTL);
    }
    bao.root(
        Method::POST,
        &format!("auth/kubernetes/role/{ns}"),
        Some(role),
    )
    .await;
    ns
}

/// The N KV v2 secrets, written as root.
async fn write_kv(bed: &Testbed, layout: &Layout) {
    let (client, root) = (bed.openbao().client(), bed.openbao().root_token());
    stream::iter(0..layout.n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let client = client.clone();
            let (ns, name) = layout.item(i);
            async move {
                let data = json!({"user": format!("u{i}"), "pass": format!("p{i}")});
                let data = data.as_object().expect("object").clone();
                client
                    .kv2_write(root, "secret", &format!("{ns}/{name}"), &data)
                    .await
                    .expect("kv write");
            }
        })
        .await;
}

/// A tenant's OpenBao token: TokenRequest for its ServiceAccount, then a Kubernetes-auth login.
async fn login(kube: &kube::Client, bao: &kubebao_openbao::OpenBao, ns: &str) -> SecretString {
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec!["openbao".into()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let jwt = Api::<ServiceAccount>::namespaced(kube.clone(), ns)
        .create_token_request(TENANT_SA, &PostParams::default(), &req)
        .await
        .expect("TokenRequest")
        .status
        .expect("token")
        .token;
    let credentials = Credentials::Kubernetes {
        mount: "kubernetes".into(),
        role: ns.into(),
        jwt: SecretString::new(jwt),
    };
    bao.login(&credentials).await.expect("login").client_token
}

/// The bare work, timed: a login per tenant, then N KV reads and N Secret creates from one
/// client. Its Secrets are deleted afterwards.
async fn baseline(bed: &Testbed, kube: &kube::Client, layout: &Layout) -> Duration {
    let reader = bed.openbao().client();
    let start = Instant::now();
    let tokens: HashMap<&str, SecretString> = stream::iter(&layout.tenants)
        .map(|ns| async { (ns.as_str(), login(kube, &reader, ns).await) })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    stream::iter(0..layout.n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (ns, name) = layout.item(i);
            let (reader, token) = (&reader, &tokens[ns]);
            async move {
                let kv = reader
                    .kv2_read_api_path(token, &format!("secret/data/{ns}/{name}"))
                    .await
                    .expect("read");
                let data = kv.data.iter();
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("baseline-{name}")),
                        labels: Some([("bench".to_string(), "baseline".to_string())].into()),
                        ..Default::default()
                    },
                    string_data: Some(
                        data.map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().into()))
                            .collect(),
                    ),
                    ..Default::default()
                };
                Api::<Secret>::namespaced(kube.clone(), ns)
                    .create(&PostParams::default(), &secret)
                    .await
                    .expect("create");
            }
        })
        .await;
    let took = start.elapsed();
    let only_baseline = ListParams::default().labels("bench=baseline");
    stream::iter(&layout.tenants)
        .for_each_concurrent(8, |ns| {
            let only_baseline = &only_baseline;
            async move {
                Api::<Secret>::namespaced(kube.clone(), ns)
                    .delete_collection(&DeleteParams::default(), only_baseline)
                    .await
                    .expect("delete baseline Secrets");
            }
        })
        .await;
    took
}

/// Starts the operator (own token, no leader election) and waits until it leads: the
/// component and its metrics URL.
async fn start_operator(bed: &Testbed) -> (Component, String) {
    let bao = bed.openbao();
    let policy = "path \"sys/policies/acl/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\"] }";
    bao.root(
        Method::POST,
        "sys/policies/acl/kubebao-operator",
        Some(json!({"policy": policy})),
    )
    .await;
    let token = bao
        .root(
            Method::POST,
            "auth/token/create",
            Some(json!({"policies": ["kubebao-operator"], "ttl": "4h"})),
        )
        .await
        .expect("token")["auth"]["client_token"]
        .as_str()
        .expect("client token")
        .to_string();
    let token_file = bed.dir().join("operator-token");
    std::fs::write(&token_file, token).expect("write the operator token");
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
    let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let mut operator = Component::start_with_env(
        "kubebao-operator",
        bed.dir(),
        &PathBuf::from(env!("CARGO_BIN_EXE_kubebao-operator")),
        &args,
        &[("KUBECONFIG", &kubeconfig), ("RUST_LOG", &log)],
    );
    wait_for("operator metrics", Duration::from_secs(60), || {
        operator.assert_running();
        let m = metrics.clone();
        async move {
            match Scrape::http(&m).await.sum("kubebao_operator_leader", &[]) {
                1.0 => Ok(()),
                _ => Err("not leading yet".into()),
            }
        }
    })
    .await;
    (operator, metrics)
}

/// Creates the N KV BaoSecrets, then the M with leased credentials.
async fn apply(kube: &kube::Client, ar: &ApiResource, layout: &Layout, refresh: Duration) {
    let refresh = format!("{}s", refresh.as_secs());
    stream::iter(0..layout.total())
        .for_each_concurrent(CONCURRENCY, |i| {
            let mut spec = json!({
                "serviceAccountName": TENANT_SA,
                "refreshInterval": refresh,
            });
            let (ns, name) = if i < layout.n {
                let (ns, name) = layout.item(i);
                spec["secretPath"] = json!(format!("secret/data/{ns}/{name}"));
                (ns, name)
            } else {
                spec["sources"] = json!([{"name": "db", "engine": {"path": leases::CREDS}}]);
                layout.dynamic(i - layout.n)
            };
            spec["target"] = json!({"name": name});
            let api: Api<DynamicObject> = Api::namespaced_with(kube.clone(), ns, ar);
            let obj = json!({
                "apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret",
                "metadata": {"name": name},
                "spec": spec,
            });
            async move {
                let obj: DynamicObject = serde_json::from_value(obj).expect("BaoSecret");
                api.create(&PostParams::default(), &obj)
                    .await
                    .expect("create BaoSecret");
            }
        })
        .await;
}

/// What one refresh interval with nothing changed cost.
struct Window {
    /// Operator metric: OpenBao requests, in total and by (op, result).
    requests: f64,
    by_op: Vec<(Vec<String>, f64)>,
    /// Operator metric: Secret writes.
    writes: f64,
    /// OpenBao's audit log: the requests in the window.
    audit: Checks,
    /// API server requests by (verb, resource, subresource).
    api: Vec<(Vec<String>, f64)>,
    /// CPU used by each process, and by all together (seconds).
    cpu: (String, f64),
}

/// Measures exactly one refresh interval (a measurement window, not a wait for a condition):
/// every BaoSecret is due once in it. The audit log is read a little longer (a tenth of the
/// interval) to tell a check that came a little late from one that never came.
async fn refresh_window(
    bed: &Testbed,
    kube: &kube::Client,
    metrics: &str,
    layout: &Layout,
    refresh: Duration,
    processes: &[(String, u32)],
) -> Window {
    let log = bed.openbao().audit_log().to_path_buf();
    let ops = ["op", "result"];
    let api = ["verb", "resource", "subresource"];
    let (m0, a0) = (Scrape::http(metrics).await, Scrape::apiserver(kube).await);
    let (start, cpu0) = (support::audit_mark(&log), support::cpu_snapshot(processes));
    tokio::time::sleep(refresh).await;
    let (end, cpu1) = (support::audit_mark(&log), support::cpu_snapshot(processes));
    let (m1, a1) = (Scrape::http(metrics).await, Scrape::apiserver(kube).await);
    tokio::time::sleep(refresh / 10).await;
    let after = support::audit_mark(&log);
    let requests = "kubebao_operator_openbao_requests_total";
    let writes = "kubebao_operator_secret_writes_total";
    let sorted = |d: std::collections::BTreeMap<Vec<String>, f64>| {
        let mut v: Vec<_> = d.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    };
    let api = support::delta(
        &a0.by("apiserver_request_total", &api),
        &a1.by("apiserver_request_total", &api),
    );
    Window {
        requests: m1.sum(requests, &[]) - m0.sum(requests, &[]),
        by_op: sorted(support::delta(
            &m0.by(requests, &ops),
            &m1.by(requests, &ops),
        )),
        writes: m1.sum(writes, &[]) - m0.sum(writes, &[]),
        audit: Checks::count(
            layout,
            &support::audited_between(&log, start, end),
            &support::audited_between(&log, end, after),
        ),
        api: sorted(api)
            .into_iter()
            .filter(|(k, _)| !k[1].is_empty())
            .collect(),
        cpu: support::cpu_used(processes, &cpu0, &cpu1),
    }
}

/// OpenBao requests in the window, from its audit log.
#[derive(Default)]
struct Checks {
    total: usize,
    metadata: usize,
    data: usize,
    logins: usize,
    /// Leased credentials: engine reads and lease renewals or revocations.
    engine: usize,
    other: usize,
    /// BaoSecrets whose metadata was read once, twice or more.
    once: usize,
    more: usize,
    /// BaoSecrets not read in the window: read soon after it (late), or not at all.
    late: usize,
    missed: usize,
}

impl Checks {
    fn count(layout: &Layout, window: &[support::Audited], after: &[support::Audited]) -> Self {
        let mut c = Checks {
            total: window.len(),
            ..Default::default()
        };
        let mut reads: HashMap<&str, usize> = HashMap::new();
        for r in window {
            let p = r.path.as_str();
            if p.starts_with("secret/metadata/") {
                c.metadata += 1;
                *reads.entry(p).or_default() += 1;
            } else if p.starts_with("secret/data/") {
                c.data += 1;
            } else if p.starts_with("auth/") && p.ends_with("/login") {
                c.logins += 1;
            } else if leases::is_engine_request(p) {
                c.engine += 1;
            } else {
                c.other += 1;
            }
        }
        let soon: std::collections::HashSet<&str> = after.iter().map(|r| r.path.as_str()).collect();
        for i in 0..layout.n {
            let (ns, name) = layout.item(i);
            let path = format!("secret/metadata/{ns}/{name}");
            match reads.get(path.as_str()).copied().unwrap_or(0) {
                0 if soon.contains(path.as_str()) => c.late += 1,
                0 => c.missed += 1,
                1 => c.once += 1,
                _ => c.more += 1,
            }
        }
        c
    }

    /// Exactly one metadata read per KV BaoSecret: none twice, none skipped (a check that
    /// came less than a tenth of the interval late counts), and nothing else (the leased
    /// credentials' requests are judged on their own).
    fn exactly_one(&self) -> bool {
        self.data + self.logins + self.other + self.more + self.missed == 0
    }
}

/// Everything measured, printed with the goals.
struct Figures {
    n: usize,
    m: usize,
    tenants: usize,
    refresh: Duration,
    setup: Duration,
    baseline: Duration,
    applied: Duration,
    marks: Vec<(usize, Duration)>,
    ready: usize,
    cpu_ready: (String, f64),
    /// Idle, all Ready, after the refresh window.
    memory: [Memory; 3],
    window: Window,
    /// With `KUBEBAO_BENCH_DYNAMIC`.
    dynamic: Option<Dynamic>,
}

/// What the BaoSecrets with leased credentials cost.
struct Dynamic {
    /// Their own Ready marks and count.
    ready: support::Readiness,
    /// Checked in the refresh interval (`status.nextRefreshTime` moved).
    checked: usize,
    /// Engine reads from the apply until all were Ready, and over the whole run.
    issued_at_ready: Issued,
    issued: Issued,
    /// PostgreSQL roles the engine created, and leases OpenBao lists, after the refresh
    /// interval (before the deletion).
    roles_before_deletion: usize,
    leases_before_deletion: Result<usize, String>,
    deletion: Deletion,
}

impl Figures {
    fn print(&self) {
        let n = self.n;
        let build = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        let leased = match self.m {
            0 => String::new(),
            m => format!(
                " + M = {m} with leased credentials (one engine source each, {}, lease ttl {}, max {})",
                leases::CREDS,
                leases::TTL,
                leases::MAX_TTL
            ),
        };
        println!(
            "operator benchmark, N = {n} BaoSecrets over {n} KV v2 paths{leased} in {} tenant namespaces ({build} build, test bed on this machine)",
            self.tenants
        );
        println!(
            "  set-up (namespaces, ServiceAccounts, policies, roles, N KV writes): {:.1} s",
            self.setup.as_secs_f64()
        );
        println!(
            "  baseline (a login per tenant, N KV reads + N Secret creates, one client, concurrency {CONCURRENCY}): {:.2} s",
            self.baseline.as_secs_f64()
        );
        let marks: Vec<String> = self
            .marks
            .iter()
            .map(|(p, t)| format!("{p} % {:.1} s", t.as_secs_f64()))
            .collect();
        let ratio = self.all_ready().map_or("n/a".into(), |t| {
            format!("{:.1}x", t.as_secs_f64() / self.baseline.as_secs_f64())
        });
        println!(
            "  operator: apply took {:.1} s ({:.0} creates/s); Ready: {} → ratio to baseline {ratio}",
            self.applied.as_secs_f64(),
            (n + self.m) as f64 / self.applied.as_secs_f64(),
            marks.join(", "),
        );
        println!(
            "  CPU from apply to all Ready: {:.1} s in all: {}",
            self.cpu_ready.1, self.cpu_ready.0
        );
        let [idle, ready, steady] = self.memory;
        println!(
            "  operator memory: idle {:.1} MiB, all Ready {:.1} MiB, after a refresh interval {:.1} MiB; peak (VmHWM) {:.1} MiB",
            mib(idle.rss),
            mib(ready.rss),
            mib(steady.rss),
            mib(steady.peak)
        );
        self.print_window();
        if let Some(d) = &self.dynamic {
            d.print(self.m, self.window.audit.engine);
        }
        self.print_goals();
        if let Some(d) = &self.dynamic {
            d.print_goals(self.m, self.window.audit.engine);
        }
    }

    fn all_ready(&self) -> Option<Duration> {
        self.marks.iter().find(|(p, _)| *p == 100).map(|m| m.1)
    }

    fn print_window(&self) {
        let (n, w, a) = (self.n + self.m, &self.window, &self.window.audit);
        let secs = self.refresh.as_secs();
        println!(
            "  one refresh interval ({secs} s, {:.0} checks/s) with nothing changed:",
            n as f64 / secs as f64
        );
        let by_op: Vec<String> = w
            .by_op
            .iter()
            .map(|(k, v)| format!("{} {v}", k.join("/")))
            .collect();
        println!(
            "    operator metric: {} OpenBao requests ({:.3} per BaoSecret: {}), {} Secret writes",
            w.requests,
            w.requests / n as f64,
            by_op.join(", "),
            w.writes
        );
        println!(
            "    OpenBao audit log: {} requests ({:.3} per BaoSecret): {} metadata reads, {} data reads, {} logins, {} leased credentials, {} other",
            a.total,
            a.total as f64 / n as f64,
            a.metadata,
            a.data,
            a.logins,
            a.engine,
            a.other,
        );
        println!(
            "    BaoSecrets checked once {}, twice or more {}, not in the window but within {} s after it {}, not at all {}",
            a.once,
            a.more,
            secs / 10,
            a.late,
            a.missed
        );
        let api_total: f64 = w.api.iter().map(|(_, v)| v).sum();
        let api: Vec<String> = w
            .api
            .iter()
            .take(8)
            .map(|(k, v)| {
                let what: Vec<&str> = k
                    .iter()
                    .map(String::as_str)
                    .filter(|s| !s.is_empty())
                    .collect();
                format!("{} {v}", what.join(" "))
            })
            .collect();
        println!(
            "    API server (every client; the benchmark is idle): {api_total} requests ({:.2} per BaoSecret): {}",
            api_total / n as f64,
            api.join(", ")
        );
        let per_check = w.cpu.1 / n as f64;
        println!(
            "    CPU: {:.1} s in all = {:.1} ms per check (so at most ~{:.0} checks/s on {} cores): {}",
            w.cpu.1,
            per_check * 1000.0,
            cores() / per_check,
            cores(),
            w.cpu.0
        );
    }

    fn print_goals(&self) {
        let (n, a) = (self.n + self.m, &self.window.audit);
        let all = self.all_ready();
        let ready_ok = self.ready == n && all.is_some_and(|t| t <= READY_GOAL);
        println!("  goals:");
        println!(
            "    {} all {n} Ready within {} s: {}",
            verdict(ready_ok),
            READY_GOAL.as_secs(),
            all.map_or(format!("{}/{n} Ready", self.ready), |t| format!(
                "{:.1} s",
                t.as_secs_f64()
            ))
        );
        let steady = self.memory[2];
        println!(
            "    {} operator RSS under {RSS_GOAL_MIB} MiB at steady state: {:.1} MiB (peak {:.1} MiB)",
            verdict(mib(steady.rss) < RSS_GOAL_MIB && steady.rss > 0),
            mib(steady.rss),
            mib(steady.peak)
        );
        println!(
            "    {} one OpenBao request per KV BaoSecret per refresh, nothing changed: {} of {} checked exactly once ({} a little late), {} other requests",
            verdict(a.exactly_one()),
            a.once + a.late,
            self.n,
            a.late,
            a.data + a.logins + a.other
        );
        println!(
            "    {} no Secret writes when nothing changed: {}",
            verdict(self.window.writes == 0.0),
            self.window.writes
        );
    }
}

/// CPU cores of this machine.
fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// PASS or FAIL.
fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// Ready marks as "10 % 1.2 s, …".
fn marks_text(marks: &[(usize, Duration)]) -> String {
    let marks: Vec<String> = marks
        .iter()
        .map(|(p, t)| format!("{p} % {:.1} s", t.as_secs_f64()))
        .collect();
    marks.join(", ")
}

impl Dynamic {
    fn all_ready(&self) -> Option<Duration> {
        self.ready.0.iter().find(|(p, _)| *p == 100).map(|m| m.1)
    }

    /// `engine`: their OpenBao requests in the refresh interval.
    fn print(&self, m: usize, engine: usize) {
        let d = &self.deletion;
        println!("  leased credentials ({m} BaoSecrets):");
        println!(
            "    Ready (these alone): {}; leases created until then {} ({} refused)",
            marks_text(&self.ready.0),
            self.issued_at_ready.leases(),
            self.issued_at_ready.failed,
        );
        println!(
            "    before deleting: OpenBao lists {} leases under {}, PostgreSQL has {} roles from the engine",
            match &self.leases_before_deletion {
                Ok(n) => n.to_string(),
                Err(e) => format!("? ({e})"),
            },
            leases::CREDS,
            self.roles_before_deletion
        );
        println!(
            "    one refresh interval with nothing changed: {} of {m} checked in it (or up to a tenth of it late), {engine} OpenBao requests for them ({:.3} per BaoSecret)",
            self.checked,
            engine as f64 / m as f64
        );
        println!(
            "    deleting every BaoSecret: {} in {}; {} revocations ({} refused); leases left {}, PostgreSQL roles left {}",
            if d.remaining == 0 {
                "all gone"
            } else {
                "NOT all gone"
            },
            format_args!("{:.1} s", d.took.as_secs_f64()),
            d.revocations,
            d.revocations_failed,
            d.leases_left_text(),
            d.roles_left
        );
        println!(
            "    over the whole run: {} leases created ({} refused)",
            self.issued.leases(),
            self.issued.failed
        );
    }

    fn print_goals(&self, m: usize, engine: usize) {
        let d = &self.deletion;
        println!(
            "    {} all {m} with leased credentials Ready within {} s: {}",
            verdict(self.ready.1 == m && self.all_ready().is_some_and(|t| t <= READY_GOAL)),
            READY_GOAL.as_secs(),
            self.all_ready()
                .map_or(format!("{}/{m} Ready", self.ready.1), |t| format!(
                    "{:.1} s",
                    t.as_secs_f64()
                ))
        );
        println!(
            "    {} one lease per BaoSecret with leased credentials: {} leases created for {m}",
            verdict(self.issued.leases() == m),
            self.issued.leases()
        );
        println!(
            "    {} no OpenBao request for leased credentials within their TTL, nothing changed: {engine}",
            verdict(engine == 0)
        );
        println!(
            "    {} every lease revoked when its BaoSecret is deleted: {} left",
            verdict(d.leases_left == Ok(0) && d.remaining == 0),
            d.leases_left_text()
        );
        println!(
            "    {} no PostgreSQL role left after deletion: {}",
            verdict(d.roles_left == 0),
            d.roles_left
        );
    }
}
