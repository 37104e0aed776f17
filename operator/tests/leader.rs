//! End-to-end: leader election that cannot split. Two `kubebao-operator` replicas, each with
//! its own OpenBao token (so OpenBao's audit log tells who did what) and logging every
//! Kubernetes request it makes, run a BaoPolicy and a KubeBaoInstallation. The leader is frozen
//! (SIGSTOP) past its lease; the standby takes over and acts on changes made meanwhile (a policy
//! edit, a key rotation request). The old leader, resumed (SIGCONT), must not reconcile
//! anything: not one OpenBao request with its token, no Kubernetes write, the key rotated
//! exactly once, and it exits to restart as a candidate.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kubebao_testbed::{Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const NS: &str = "kubebao-system";
const LEASE_SECONDS: u64 = 4;

struct Operator {
    name: String,
    process: Component,
    metrics: String,
    /// Its token as OpenBao's audit log shows it (HMAC).
    token_hash: String,
}

/// Starts replica `n` with its own root-policy token (the installation prepares OpenBao).
async fn start_operator(bed: &Testbed, n: usize) -> Operator {
    let bao = bed.openbao();
    let token = bao
        .root(
            Method::POST,
            "auth/token/create",
            Some(
                json!({"policies": ["root"], "ttl": "1h", "display_name": format!("operator-{n}")}),
            ),
        )
        .await
        .expect("token response")["auth"]["client_token"]
        .as_str()
        .expect("token")
        .to_string();
    let token_file = bed.dir().join(format!("leader-operator-{n}-token"));
    std::fs::write(&token_file, &token).unwrap();
    let port = free_port();
    let name = format!("operator-{n}");
    let args: Vec<String> = vec![
        format!("--openbao-addr={}", bao.addr()),
        // The test bed's OpenBao listens on loopback over plain http.
        "--openbao-allow-plain-http".into(),
        format!("--openbao-token-file={}", token_file.display()),
        format!("--namespace={NS}"),
        format!("--pod-name={name}"),
        format!("--metrics-addr=127.0.0.1:{port}"),
        format!("--lease-duration={LEASE_SECONDS}s"),
        "--policy-resync=2s".into(),
    ];
    let kubeconfig = bed.operator_kubeconfig(NS).display().to_string();
    let mut process = Component::start_with_env(
        &format!("kubebao-operator-leader-{n}"),
        bed.dir(),
        &PathBuf::from(env!("CARGO_BIN_EXE_kubebao-operator")),
        &args,
        &[
            ("KUBECONFIG", &kubeconfig),
            // Every Kubernetes request, for `writes` (a debug event per request).
            (
                "RUST_LOG",
                "info,kube_client=warn,kube_runtime=warn,kube_client::client::builder=debug",
            ),
        ],
    );
    let ready = format!("http://127.0.0.1:{port}/readyz");
    wait_for("the operator to be ready", WAIT, || {
        process.assert_running();
        let ready = ready.clone();
        async move {
            match reqwest::get(&ready).await {
                Ok(r) if r.status().is_success() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    Operator {
        name,
        process,
        metrics: format!("http://127.0.0.1:{port}/metrics"),
        token_hash: bao.audit_hash(&token).await,
    }
}

/// `kubebao_operator_leader` of one replica (it must not be frozen).
async fn leader_metric(op: &Operator) -> Result<f64, String> {
    let text = reqwest::get(&op.metrics)
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    text.lines()
        .find(|l| l.starts_with("kubebao_operator_leader "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .ok_or_else(|| "no kubebao_operator_leader metric".into())
}

async fn lease_holder(bed: &Testbed) -> Option<String> {
    Api::<Lease>::namespaced(bed.client().await, NS)
        .get_opt("kubebao-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// The Kubernetes writes (`METHOD url`) an operator's log shows, its Lease aside.
fn writes(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "requesting")
        .filter_map(|v| {
            let method = v["span"]["http.method"].as_str()?;
            let url = v["span"]["http.url"].as_str()?;
            (method != "GET" && !url.contains("/leases/")).then(|| format!("{method} {url}"))
        })
        .collect()
}

/// Makes a request now and waits until OpenBao's audit log shows it, so requests that reached
/// OpenBao before it are logged too (a barrier, not a guess at how long they take).
async fn audit_barrier(bao: &kubebao_testbed::OpenBaoServer, name: &str) {
    let path = format!("cubbyhole/barrier-{name}");
    // The read's answer (not found) does not matter: OpenBao audits every request.
    let _ = bao.client().read(&path, bao.root_token()).await;
    wait_for("the audit log to show the barrier request", WAIT, || {
        let seen = bao.audit().requests.iter().any(|r| r.path == path);
        async move {
            if seen {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        }
    })
    .await;
}

/// When an operator's log last shows a Kubernetes write, its Lease aside.
fn last_write_at(log: &str) -> Option<Timestamp> {
    log.lines()
        .rev()
        .filter(|l| !writes(l).is_empty())
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["timestamp"].as_str()?.parse().ok())
}

fn api(client: kube::Client, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kubebao.io", "v1alpha1", kind);
    Api::all_with(client, &ApiResource::from_gvk(&gvk))
}

/// Waits until `name` of `kind` has a status for which `check` says Ok.
async fn wait_status<T>(
    bed: &Testbed,
    kind: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> Option<T>,
) -> T {
    let api = api(bed.client().await, kind);
    wait_for(what, WAIT, || {
        let api = api.clone();
        let check = &check;
        async move {
            let status = api.get(name).await.map_err(|e| e.to_string())?.data["status"].clone();
            check(&status).ok_or_else(|| status.to_string())
        }
    })
    .await
}

fn ready(status: &Value, condition: &str) -> bool {
    status["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == condition && c["status"] == "True")
    })
}

/// A stopped process, resumed when dropped (also when the test fails while it is frozen).
struct Frozen(u32);

impl Frozen {
    fn new(pid: u32) -> Self {
        signal("-STOP", pid);
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(sig: &str, pid: u32) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}

#[tokio::test]
async fn a_leader_frozen_past_its_lease_does_nothing_once_resumed() {
    let bed = Testbed::shared().await;
    let bao = bed.openbao();
    let client = bed.client().await;
    bed.install_crds();
    let _ = bed.try_kubectl(&["create", "namespace", NS], "");
    bed.register_node("cp-1", &[], true).await;

    let mut operators = vec![start_operator(bed, 1).await, start_operator(bed, 2).await];
    let leader = wait_for("one leader among two replicas", WAIT, || {
        let ops = &operators;
        async move {
            let mut leaders = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                if leader_metric(op).await? == 1.0 {
                    leaders.push(i);
                }
            }
            match leaders[..] {
                [one] => Ok(one),
                _ => Err(format!("leaders: {leaders:?}")),
            }
        }
    })
    .await;
    let standby = 1 - leader;

    // Work for both controllers: a BaoPolicy (resynced every 2 s) and an installation.
    bed.apply("apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: split}\nspec:\n  rules: [{path: before/*, capabilities: [read]}]\n");
    let host = tempfile::Builder::new()
        .prefix("kb-leader-")
        .tempdir_in("/tmp")
        .unwrap();
    let h = host.path();
    let cr = json!({
        "apiVersion": "kubebao.io/v1alpha1",
        "kind": "KubeBaoInstallation",
        "metadata": {"name": "kubebao"},
        "spec": {
            "openbao": {
                "address": bao.tls_addr(),
                "caBundle": String::from_utf8(bao.ca_pem().to_vec()).unwrap(),
            },
            "kms": {
                "manifestDir": h.join("manifests"), "configDir": h.join("etc-kubebao"),
                "socketPath": h.join("run/kms.sock"), "healthPort": free_port(),
                "tolerations": [{"operator": "Exists"}],
            },
            "csi": {"providerDir": h.join("providers")},
        }
    });
    let installations = api(client.clone(), "KubeBaoInstallation");
    let obj: DynamicObject = serde_json::from_value(cr).unwrap();
    installations
        .create(&PostParams::default(), &obj)
        .await
        .expect("create KubeBaoInstallation");
    wait_status(bed, "BaoPolicy", "split", "BaoPolicy Ready", |s| {
        ready(s, "Ready").then_some(())
    })
    .await;
    wait_status(bed, "KubeBaoInstallation", "kubebao", "OpenBaoReady", |s| {
        (ready(s, "OpenBaoReady") && s["keyVersion"] == 1).then_some(())
    })
    .await;
    let by = |op: &Operator| {
        let hash = op.token_hash.clone();
        move |r: &kubebao_testbed::AuditedRequest| r.client_token.as_deref() == Some(hash.as_str())
    };
    assert!(
        !bao.audit().filter(by(&operators[leader])).is_empty(),
        "the leader worked with its own token before the freeze"
    );

    // Freeze the leader between reconcile steps: a request already handed to the network when
    // the process stops lands on resume, and no leader election can call it back (only a
    // fencing token could); what this test proves is that no NEW step runs after the resume.
    let log_path = operators[leader].process.log_path().to_path_buf();
    wait_for(
        "the leader to be between steps (no write for 2 s)",
        WAIT,
        || {
            let last = last_write_at(&std::fs::read_to_string(&log_path).unwrap_or_default());
            async move {
                let quiet = last.map_or(Duration::MAX, |t| {
                    Timestamp::now().duration_since(t).unsigned_abs()
                });
                if quiet >= Duration::from_secs(2) {
                    Ok(())
                } else {
                    Err(format!("last write {quiet:?} ago"))
                }
            }
        },
    )
    .await;
    // Freeze; once its in-flight requests have landed, mark the audit log.
    let pid = operators[leader].process.pid().expect("the leader's pid");
    let frozen_at = std::time::Instant::now();
    let frozen = Frozen::new(pid);
    audit_barrier(bao, "frozen").await;
    let mark = bao.audit().len();

    // The standby takes over (by its own clock, after the lease duration unchanged).
    let new_leader = operators[standby].name.clone();
    wait_for("the standby to take the Lease", WAIT, || async {
        match lease_holder(bed).await {
            Some(h) if h == new_leader => Ok(()),
            other => Err(format!("holder {other:?}")),
        }
    })
    .await;
    wait_for("the standby to lead", WAIT, || async {
        match leader_metric(&operators[standby]).await? {
            1.0 => Ok(()),
            m => Err(format!("kubebao_operator_leader {m}")),
        }
    })
    .await;
    assert!(
        frozen_at.elapsed() >= Duration::from_secs(LEASE_SECONDS - 1),
        // (less a renew period: the last renewal came up to that before the freeze)
        "the standby waited for the lease to lapse by its own clock ({:?})",
        frozen_at.elapsed()
    );

    // While the old leader is frozen: a policy edit and a rotation request, for the new one.
    let policies = api(client.clone(), "BaoPolicy");
    let edit = json!({"spec": {"rules": [{"path": "after/*", "capabilities": ["read"]}]}});
    policies
        .patch("split", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .expect("edit the BaoPolicy");
    let rotate = json!({"metadata": {"annotations": {"kubebao.io/rotate": "r1"}}});
    installations
        .patch("kubebao", &PatchParams::default(), &Patch::Merge(&rotate))
        .await
        .expect("request a rotation");
    wait_status(bed, "KubeBaoInstallation", "kubebao", "the rotation", |s| {
        (s["keyVersion"] == 2 && s["lastRotateRequest"] == "r1").then_some(())
    })
    .await;
    wait_for("the policy edit in OpenBao", WAIT, || async {
        match bao.client().policy_read(bao.root_token(), "split").await {
            Ok(Some(hcl)) if hcl.contains("after/*") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Resume the old leader past its lease: it sees the gap by its monotonic clock at once,
    // reconciles nothing and exits to restart as a candidate.
    let old = &mut operators[leader].process;
    let resumed_at = std::fs::metadata(old.log_path()).unwrap().len() as usize;
    drop(frozen);
    wait_for("the old leader to exit", WAIT, || {
        let running = old.is_running();
        async move {
            if running {
                Err("running".to_string())
            } else {
                Ok(())
            }
        }
    })
    .await;
    let log = std::fs::read_to_string(old.log_path()).unwrap();
    let (before, after) = log.split_at(resumed_at);
    assert!(
        !writes(before).is_empty(),
        "the leader wrote before the freeze (and logged it)"
    );
    assert!(after.contains("no longer the leader"), "{after}");
    assert_eq!(
        writes(after),
        Vec::<String>::new(),
        "Kubernetes writes after the resume"
    );
    // Every request the old leader sent has reached the audit log before ours.
    audit_barrier(bao, "exited").await;

    let since = bao.audit().since(mark);
    let old_leader = since
        .filter(by(&operators[leader]))
        // Its own token's upkeep is not leader work.
        .filter(|r| !r.path.starts_with("auth/token/"));
    assert!(
        old_leader.is_empty(),
        "the old leader made OpenBao requests after the freeze: {:?}",
        old_leader
            .requests
            .iter()
            .map(|r| format!("{} {}", r.operation, r.path))
            .collect::<Vec<_>>()
    );
    assert!(
        since
            .filter(by(&operators[standby]))
            .count("sys/policies/acl/split", "update")
            >= 1,
        "the new leader wrote the edited policy"
    );
    let key = bao
        .client()
        .transit_key(bao.root_token(), "transit", "kubebao-kms")
        .await
        .expect("the Transit key");
    assert_eq!(key.latest_version, 2, "one rotation request, one rotation");
    assert_eq!(
        lease_holder(bed).await.as_deref(),
        Some(new_leader.as_str())
    );
    assert_eq!(leader_metric(&operators[standby]).await, Ok(1.0));
    drop(host);
}
