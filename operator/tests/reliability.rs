//! Reliability, end to end: the real `kubebao-operator` binary (two replicas sharing one Lease)
//! against the test bed's kube-apiserver, kube-controller-manager and OpenBao.
//!
//! - A sync Kubernetes will never accept (too large, a refused write) is said once (Stalled,
//!   one Warning event) and not retried in a loop.
//! - A Secret whose label someone removed is still recognised by its owner reference.
//! - What the operator holds per object is forgotten when the objects go (tenant tokens revoked).
//! - `/readyz` says whether OpenBao answers as the operator's identity; `/healthz` does not.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kubebao_testbed::conditions::{condition, wait_condition};
use kubebao_testbed::{Audit, Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::{OnceCell, RwLock};

const WAIT: Duration = Duration::from_secs(60);
const OPERATOR_POLICY: &str = r#"
path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "auth/kubernetes/role/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;

struct Operator {
    _process: Component,
    /// `http://127.0.0.1:<port>` (the metrics and probe server).
    base: String,
}

struct Setup {
    bed: &'static Testbed,
    operators: Vec<Operator>,
    /// Tests that count or that stop OpenBao hold this for writing; the others for reading.
    alone: RwLock<()>,
}

static SETUP: OnceCell<Setup> = OnceCell::const_new();

fn start_operator(bed: &Testbed, n: usize, token_file: &std::path::Path) -> Operator {
    let port = free_port();
    let args: Vec<String> = [
        "--openbao-addr",
        bed.openbao().addr(),
        "--openbao-allow-plain-http",
        "--openbao-token-file",
        &token_file.display().to_string(),
        "--namespace",
        "kubebao-system",
        "--pod-name",
        &format!("reliable-operator-{n}"),
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
        "--lease-duration",
        "4s",
        "--policy-resync",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let kubeconfig = bed
        .operator_kubeconfig("kubebao-system")
        .display()
        .to_string();
    let process = Component::start_with_env(
        &format!("kubebao-operator-{n}"),
        bed.dir(),
        &PathBuf::from(env!("CARGO_BIN_EXE_kubebao-operator")),
        &args,
        &[("KUBECONFIG", &kubeconfig)],
    );
    Operator {
        _process: process,
        base: format!("http://127.0.0.1:{port}"),
    }
}

async fn setup() -> &'static Setup {
    SETUP
        .get_or_init(|| async {
            let bed = Testbed::shared().await;
            bed.enable_kubernetes_auth().await;
            let bao = bed.openbao();
            bao.enable_engine("secret", "kv", Some(2)).await;
            bao.root(
                Method::POST,
                "sys/policies/acl/kubebao-operator",
                Some(json!({"policy": OPERATOR_POLICY})),
            )
            .await;
            let token = bao
                .root(
                    Method::POST,
                    "auth/token/create",
                    Some(json!({"policies": ["kubebao-operator"], "ttl": "1h", "renewable": true})),
                )
                .await
                .expect("token response")["auth"]["client_token"]
                .as_str()
                .expect("token")
                .to_string();
            let token_file = bed.dir().join("operator-token");
            std::fs::write(&token_file, token).unwrap();
            bed.install_crds();
            let _ = bed.try_kubectl(&["create", "namespace", "kubebao-system"], "");
            let operators = vec![
                start_operator(bed, 1, &token_file),
                start_operator(bed, 2, &token_file),
            ];
            for op in &operators {
                wait_for("the operator to be ready", WAIT, || async {
                    match probe(op, "readyz").await {
                        (200, _) => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                })
                .await;
            }
            Setup {
                bed,
                operators,
                alone: RwLock::new(()),
            }
        })
        .await
}

/// `/readyz` or `/healthz` of `op`: status code and body (0 when it does not answer).
async fn probe(op: &Operator, path: &str) -> (u16, String) {
    match reqwest::get(format!("{}/{path}", op.base)).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// The sum over both replicas of the metric lines starting with `needle`.
async fn metric(setup: &Setup, needle: &str) -> f64 {
    let mut sum = 0.0;
    for op in &setup.operators {
        let text = reqwest::get(format!("{}/metrics", op.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        sum += text
            .lines()
            .filter(|l| l.starts_with(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    sum
}

/// Entries in the per-object cache `cache`, over both replicas (a standby holds none).
async fn cached(setup: &Setup, cache: &str) -> f64 {
    metric(
        setup,
        &format!("kubebao_operator_cached_objects{{cache=\"{cache}\"}} "),
    )
    .await
}

fn gvk(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("kubebao.io", "v1alpha1", kind))
}

async fn baosecrets(bed: &Testbed, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(bed.client().await, ns, &gvk("BaoSecret"))
}

/// The Warning events with `reason` about `name` in `ns`: (how many Event objects, how many
/// times they were said in all, counting each series).
async fn warnings(bed: &Testbed, ns: &str, name: &str, reason: &str) -> (usize, i32) {
    let events: Api<Event> = Api::namespaced(bed.client().await, ns);
    let list = events.list(&Default::default()).await.unwrap();
    let matching: Vec<&Event> = list
        .items
        .iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect();
    let said = matching
        .iter()
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum();
    (matching.len(), said)
}

/// A namespace with a KV v2 secret at `secret/data/<ns>/app` holding `data`, and an OpenBao
/// role named after the namespace that ServiceAccounts `accounts` may log in as, reading
/// `secret/data/<ns>/*`.
async fn tenant(bed: &Testbed, prefix: &str, data: Value, accounts: &[&str]) -> String {
    let ns = bed.namespace(prefix).await;
    let bao = bed.openbao();
    bao.root(
        Method::POST,
        &format!("secret/data/{ns}/app"),
        Some(json!({"data": data})),
    )
    .await;
    let policy = format!(
        "path \"secret/data/{ns}/*\" {{ capabilities = [\"read\"] }}\npath \"secret/metadata/{ns}/*\" {{ capabilities = [\"read\"] }}\n"
    );
    bao.root(
        Method::POST,
        &format!("sys/policies/acl/tenant-{ns}"),
        Some(json!({"policy": policy})),
    )
    .await;
    bao.root(
        Method::POST,
        &format!("auth/kubernetes/role/{ns}"),
        Some(json!({"bound_service_account_names": accounts, "bound_service_account_namespaces": [ns], "token_policies": [format!("tenant-{ns}")], "token_ttl": "1h"})),
    )
    .await;
    for account in accounts {
        if *account != "default" {
            bed.service_account(&ns, account).await;
        }
    }
    wait_for("the default ServiceAccount", WAIT, || async {
        bed.try_kubectl(&["-n", &ns, "get", "serviceaccount", "default"], "")
            .map(|_| ())
    })
    .await;
    ns
}

/// Every request made with a token of a tenant of namespace `ns`.
fn tenant_requests(audit: &Audit, ns: &str) -> Audit {
    audit.filter(|r| {
        r.token_metadata
            .get("service_account_namespace")
            .map(String::as_str)
            == Some(ns)
    })
}

fn baosecret(ns: &str, name: &str, spec: Value) -> String {
    json!({
        "apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    })
    .to_string()
}

#[tokio::test]
async fn data_too_large_for_a_secret_is_stalled_once_and_not_retried_in_a_loop() {
    let setup = setup().await;
    let _alone = setup.alone.write().await;
    let bed = setup.bed;
    let ns = tenant(bed, "big", json!({"small": "ok"}), &["default"]).await;
    // OpenBao's raft storage holds at most 1 MiB per entry, so the Secrets grow past 1 MiB
    // by copying one 600 KiB value twice, or by merging it into a Secret holding as much.
    let blob = "x".repeat(600 * 1024);
    let path = format!("secret/data/{ns}/big");
    bed.openbao()
        .root(Method::POST, &path, Some(json!({"data": {"blob": blob}})))
        .await;
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    let existing: Secret = serde_json::from_value(json!({
        "metadata": {"name": "merged", "annotations": {"kubebao.io/allow-merge-from": "merged"}},
        "stringData": {"own": blob},
    }))
    .unwrap();
    secrets
        .create(&Default::default(), &existing)
        .await
        .unwrap();
    let mark = bed.openbao().audit().len();
    let reconciles =
        "kubebao_operator_reconciles_total{kind=\"BaoSecret\",result=\"SecretTooLarge\"} ";
    let before = metric(setup, reconciles).await;
    // Even a 2 s refresh does not turn a refusal into a loop.
    let twice = json!([{"from": "blob", "to": "a"}, {"from": "blob", "to": "b"}]);
    let doubled = json!({"secretPath": path, "refreshInterval": "2s", "keys": twice,
        "target": {"name": "doubled"}});
    let merged = json!({"secretPath": path, "refreshInterval": "2s",
        "target": {"name": "merged", "creationPolicy": "Merge"}});
    bed.apply(&baosecret(&ns, "doubled", doubled));
    bed.apply(&baosecret(&ns, "merged", merged));
    let bs = baosecrets(bed, &ns).await;
    // Refused before it is sent, naming the size…
    let message = wait_condition(&bs, "doubled", "Stalled", "True", "SecretTooLarge").await;
    let size = 2 * (1 + blob.len());
    assert!(
        message.contains(&format!("is {size} bytes")) && message.contains("at most 1048576 bytes"),
        "{message}"
    );
    // …or refused by the API server (with the Secret's own keys), naming the sizes.
    let message = wait_condition(&bs, "merged", "Stalled", "True", "SecretTooLarge").await;
    assert!(
        message.contains("Too long: may not be more than 1048576 bytes")
            && message.contains(&format!("writes {} bytes", 4 + blob.len())),
        "{message}"
    );
    // A window to watch for retries that must not happen (an absence has no condition to wait
    // for): with the old hot retry loop there were several within seconds.
    tokio::time::sleep(Duration::from_secs(20)).await;
    // One read of the data each, one reconcile each, one Warning said once; nothing written.
    let reads = tenant_requests(&bed.openbao().audit().since(mark), &ns);
    assert_eq!(reads.count(&path, "read"), 2, "{:?}", reads.requests);
    assert_eq!(metric(setup, reconciles).await - before, 2.0);
    for name in ["doubled", "merged"] {
        assert_eq!(
            warnings(bed, &ns, name, "SecretTooLarge").await,
            (1, 1),
            "{name}"
        );
    }
    assert!(secrets.get_opt("doubled").await.unwrap().is_none());
    let kept = secrets
        .get("merged")
        .await
        .unwrap()
        .data
        .unwrap_or_default();
    assert_eq!(kept.keys().collect::<Vec<_>>(), ["own"]);
    // A spec change is tried at once: one copy fits.
    bs.patch(
        "doubled",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"keys": [{"from": "blob", "to": "a"}]}})),
    )
    .await
    .unwrap();
    wait_condition(&bs, "doubled", "Ready", "True", "Synced").await;
}

#[tokio::test]
async fn a_write_kubernetes_refuses_for_good_is_stalled_until_the_spec_changes() {
    let setup = setup().await;
    let _alone = setup.alone.write().await;
    let bed = setup.bed;
    let ns = tenant(bed, "immutable", json!({"pass": "x"}), &["default"]).await;
    let spec = json!({"secretPath": format!("secret/data/{ns}/app"), "refreshInterval": "2s",
        "target": {"name": "typed", "type": "example.com/first"}});
    bed.apply(&baosecret(&ns, "typed", spec));
    let bs = baosecrets(bed, &ns).await;
    wait_condition(&bs, "typed", "Ready", "True", "Synced").await;
    // A Secret's type cannot change: the API server refuses the write (422) every time.
    let retype = |type_: &str| json!({"spec": {"target": {"type": type_}}});
    let params = PatchParams::default();
    bs.patch(
        "typed",
        &params,
        &Patch::Merge(retype("example.com/second")),
    )
    .await
    .unwrap();
    let message = wait_condition(&bs, "typed", "Stalled", "True", "SecretRejected").await;
    assert!(message.contains("field is immutable"), "{message}");
    let mark = bed.openbao().audit().len();
    // A window to watch for retries that must not happen (an absence has no condition).
    tokio::time::sleep(Duration::from_secs(15)).await;
    let since = tenant_requests(&bed.openbao().audit().since(mark), &ns);
    assert!(since.is_empty(), "retried: {:?}", since.requests);
    assert_eq!(warnings(bed, &ns, "typed", "SecretRejected").await, (1, 1));
    bs.patch("typed", &params, &Patch::Merge(retype("example.com/first")))
        .await
        .unwrap();
    wait_condition(&bs, "typed", "Ready", "True", "Synced").await;
}

/// The value of the BaoSecret label on Secret `name`, if any.
async fn label(secrets: &Api<Secret>, name: &str) -> Option<String> {
    let secret = secrets.get(name).await.unwrap();
    secret.metadata.labels?.get("kubebao.io/baosecret").cloned()
}

#[tokio::test]
async fn a_secret_whose_label_was_removed_is_recognised_by_its_owner_reference() {
    let setup = setup().await;
    let _shared = setup.alone.read().await;
    let bed = setup.bed;
    let ns = tenant(bed, "unlabelled", json!({"pass": "x"}), &["default"]).await;
    let path = format!("secret/data/{ns}/app");
    for (name, policy) in [("owned", "Owner"), ("orphan", "Orphan")] {
        let spec = json!({"secretPath": path, "target": {"name": name, "creationPolicy": policy}});
        bed.apply(&baosecret(&ns, name, spec));
    }
    let bs = baosecrets(bed, &ns).await;
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    for name in ["owned", "orphan"] {
        wait_condition(&bs, name, "Ready", "True", "Synced").await;
        assert_eq!(label(&secrets, name).await.as_deref(), Some(name));
        bed.kubectl(&["-n", &ns, "label", "secret", name, "kubebao.io/baosecret-"]);
    }
    // Owned (ownerReference to this BaoSecret's uid): still its own, the label restored.
    wait_for("the label restored", WAIT, || async {
        match label(&secrets, "owned").await {
            Some(l) if l == "owned" => Ok(()),
            other => Err(format!("label now {other:?}")),
        }
    })
    .await;
    let obj = bs.get("owned").await.unwrap();
    assert_eq!(
        condition(&obj, "Ready").map(|c| (c.0, c.1)),
        Some(("True".into(), "Synced".into()))
    );
    // Orphan (no label, no ownerReference): refused as any Secret it did not create.
    let message = wait_condition(&bs, "orphan", "Stalled", "True", "TargetExists").await;
    assert!(
        message.contains("not managed by this BaoSecret"),
        "{message}"
    );
    assert_eq!(label(&secrets, "orphan").await, None);
}

#[tokio::test]
async fn what_the_operator_holds_per_object_is_forgotten_when_the_objects_go() {
    let setup = setup().await;
    let _alone = setup.alone.write().await;
    let bed = setup.bed;
    let accounts = ["sa-0", "sa-1", "sa-2", "sa-3", "sa-4"];
    let ns = tenant(bed, "prune", json!({"pass": "x"}), &accounts).await;
    let caches = ["last_checks", "failure_counts", "tenant_tokens"];
    let mut baseline = Vec::new();
    for cache in caches {
        baseline.push(cached(setup, cache).await);
    }
    let mark = bed.openbao().audit().len();
    // 40 that sync and 10 that fail (no such secret: retried with backoff), over 5 identities.
    let mut docs = Vec::new();
    for i in 0..50 {
        let path = if i < 40 { "app" } else { "missing" };
        let spec = json!({"secretPath": format!("secret/data/{ns}/{path}"),
            "serviceAccountName": accounts[i % 5], "target": {"name": format!("s-{i}")}});
        docs.push(baosecret(&ns, &format!("bs-{i}"), spec));
    }
    // 5 BaoPolicies claiming a policy name an older BaoPolicy has (older by creation, then
    // by name): Stalled, retried.
    let policy = |name: String| {
        json!({"apiVersion": "kubebao.io/v1alpha1", "kind": "BaoPolicy",
            "metadata": {"name": name}, "spec": {"name": format!("shared-{ns}"),
            "rules": [{"path": format!("secret/data/{ns}/*"), "capabilities": ["read"]}]}})
        .to_string()
    };
    docs.push(policy(format!("{ns}-a-first")));
    bed.apply(&docs.join("\n---\n"));
    let bs = baosecrets(bed, &ns).await;
    let policies: Api<DynamicObject> = Api::all_with(bed.client().await, &gvk("BaoPolicy"));
    wait_condition(
        &policies,
        &format!("{ns}-a-first"),
        "Ready",
        "True",
        "Synced",
    )
    .await;
    let dups: Vec<String> = (0..5).map(|i| policy(format!("{ns}-b-dup-{i}"))).collect();
    bed.apply(&dups.join("\n---\n"));
    for i in 0..50 {
        match i < 40 {
            true => wait_condition(&bs, &format!("bs-{i}"), "Ready", "True", "Synced").await,
            false => {
                wait_condition(&bs, &format!("bs-{i}"), "Stalled", "True", "SecretNotFound").await
            }
        };
    }
    for i in 0..5 {
        wait_condition(
            &policies,
            &format!("{ns}-b-dup-{i}"),
            "Stalled",
            "True",
            "Conflict",
        )
        .await;
    }
    let grown = [40.0, 15.0, 5.0];
    for ((cache, base), more) in caches.iter().zip(&baseline).zip(grown) {
        assert_eq!(cached(setup, cache).await, base + more, "{cache}");
    }
    bed.kubectl(&["-n", &ns, "delete", "baosecrets", "--all", "--wait=false"]);
    let mut names = vec![format!("{ns}-a-first")];
    names.extend((0..5).map(|i| format!("{ns}-b-dup-{i}")));
    let mut delete = vec!["delete", "baopolicy", "--wait=false"];
    delete.extend(names.iter().map(String::as_str));
    bed.kubectl(&delete);
    for (cache, base) in caches.iter().zip(&baseline) {
        wait_for(&format!("{cache} back to {base}"), WAIT, || async {
            match cached(setup, cache).await {
                n if n == *base => Ok(()),
                n => Err(format!("{n}")),
            }
        })
        .await;
    }
    // Each of the 5 identities' tokens was revoked once no BaoSecret used it.
    let audit = tenant_requests(&bed.openbao().audit().since(mark), &ns);
    assert_eq!(
        audit.count("auth/token/revoke-self", "update"),
        5,
        "{:?}",
        audit.requests.len()
    );
}

#[tokio::test]
async fn readyz_fails_while_openbao_is_down_and_recovers_healthz_stays_ok() {
    let setup = setup().await;
    let _alone = setup.alone.write().await;
    let bed = setup.bed;
    let mut roles = Vec::new();
    for op in &setup.operators {
        let (status, body) = wait_for("ready", WAIT, || async {
            match probe(op, "readyz").await {
                (200, body) if body.contains("answers as the operator's identity") => {
                    Ok((200, body))
                }
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        assert_eq!(status, 200);
        roles.push(body.starts_with("ok: leading"));
    }
    roles.sort();
    assert_eq!(roles, [false, true], "one leader, one ready standby");
    bed.openbao().stop().await;
    for op in &setup.operators {
        let body = wait_for("/readyz to fail", WAIT, || async {
            match probe(op, "readyz").await {
                (503, body) => Ok(body),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        assert!(
            body.contains("does not answer as the operator's identity"),
            "{body}"
        );
        // Not a reason to restart the operator.
        assert_eq!(probe(op, "healthz").await, (200, "ok".to_string()));
    }
    bed.openbao().restart().await;
    for op in &setup.operators {
        wait_for("/readyz to recover", WAIT, || async {
            match probe(op, "readyz").await {
                (200, body) if body.starts_with("ok: ") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
}
