//! End-to-end: the real `kubebao-operator` binary against the test bed's kube-apiserver,
//! kube-controller-manager (garbage collection) and OpenBao.
//!
//! Two operator replicas share one Lease for the whole file; the operator's OpenBao identity is
//! a token whose policy covers only `sys/policies/acl/*` and `auth/kubernetes/role/*` (no KV
//! access at all, so it cannot read tenant data even by mistake).

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PodTemplateSpec, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use kubebao_testbed::conditions::{condition, wait_condition};
use kubebao_testbed::{Audit, AuditedRequest, Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::{Mutex, OnceCell, RwLock};

const WAIT: Duration = Duration::from_secs(60);
const OPERATOR_POLICY: &str = r#"
path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "auth/kubernetes/role/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;

struct Operator {
    process: Component,
    metrics: String,
}

struct Setup {
    bed: &'static Testbed,
    operators: Mutex<Vec<Operator>>,
    /// Tests that count one object's OpenBao requests hold this for reading; the failover test
    /// holds it for writing, so its planned leader change never lands in a counting window (a
    /// new leader starts with an empty token cache and logs in once per identity).
    same_leader: RwLock<()>,
}

static SETUP: OnceCell<Setup> = OnceCell::const_new();

/// Runs kubectl; Ok(stdout) or Err(stderr).
fn start_operator(bed: &Testbed, n: usize, token_file: &std::path::Path) -> Operator {
    let port = free_port();
    let args: Vec<String> = [
        "--openbao-addr",
        bed.openbao().addr(),
        // The test bed's OpenBao listens on loopback over plain http.
        "--openbao-allow-plain-http",
        "--openbao-token-file",
        &token_file.display().to_string(),
        "--namespace",
        "kubebao-system",
        "--pod-name",
        &format!("operator-{n}"),
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
        process,
        metrics: format!("http://127.0.0.1:{port}/metrics"),
    }
}

async fn setup() -> &'static Setup {
    SETUP
        .get_or_init(|| async {
            let bed = Testbed::shared().await;
            bed.enable_kubernetes_auth().await;
            let bao = bed.openbao();
            bao.enable_engine("secret", "kv", Some(2)).await;
            bao.enable_engine("kv1", "kv", Some(1)).await;
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
            let mut operators = vec![
                start_operator(bed, 1, &token_file),
                start_operator(bed, 2, &token_file),
            ];
            for op in &mut operators {
                let ready = op.metrics.replace("/metrics", "/readyz");
                wait_for("the operator to be ready", WAIT, || {
                    op.process.assert_running();
                    let ready = ready.clone();
                    async move {
                        match reqwest::get(&ready).await {
                            Ok(r) if r.status().is_success() => Ok(()),
                            other => Err(format!("{other:?}")),
                        }
                    }
                })
                .await;
            }
            Setup {
                bed,
                operators: Mutex::new(operators),
                same_leader: RwLock::new(()),
            }
        })
        .await
}

fn gvk(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("kubebao.io", "v1alpha1", kind))
}

async fn baosecrets(bed: &Testbed, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(bed.client().await, ns, &gvk("BaoSecret"))
}

async fn baopolicies(bed: &Testbed) -> Api<DynamicObject> {
    Api::all_with(bed.client().await, &gvk("BaoPolicy"))
}

/// Waits for a Warning event with `reason` about the object `name` in namespace `ns` (events
/// about cluster-scoped objects land in `default`); returns its note.
async fn warning_event(bed: &Testbed, ns: &str, name: &str, reason: &str) -> String {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(bed.client().await, ns);
    wait_for(
        &format!("a Warning event {reason} about {name}"),
        WAIT,
        || async {
            let list = events
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
                .map(|e| e.note.clone().unwrap_or_default())
                .ok_or(format!("{} events, none matching", list.items.len()))
        },
    )
    .await
}

/// A namespace with a KV v2 secret at `secret/data/<ns>/app` and an OpenBao role named after
/// the namespace (the BaoSecret default) that may read it.
async fn tenant(bed: &Testbed, prefix: &str, data: Value) -> String {
    let ns = bed.namespace(prefix).await;
    let bao = bed.openbao();
    bao.root(
        Method::POST,
        &format!("secret/data/{ns}/app"),
        Some(json!({"data": data})),
    )
    .await;
    let policy = format!(
        "path \"secret/data/{ns}/*\" {{ capabilities = [\"read\"] }}\npath \"secret/metadata/{ns}/*\" {{ capabilities = [\"read\"] }}\npath \"kv1/{ns}/*\" {{ capabilities = [\"read\"] }}\n"
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
        Some(json!({"bound_service_account_names": ["default"], "bound_service_account_namespaces": [ns], "token_policies": [format!("tenant-{ns}")], "token_ttl": "1h"})),
    )
    .await;
    wait_for("the default ServiceAccount", WAIT, || async {
        bed.try_kubectl(&["-n", &ns, "get", "serviceaccount", "default"], "")
            .map(|_| ())
    })
    .await;
    ns
}

async fn secret_data(api: &Api<Secret>, name: &str, key: &str) -> Result<String, String> {
    let s = api.get(name).await.map_err(|e| e.to_string())?;
    let v = s
        .data
        .unwrap_or_default()
        .get(key)
        .cloned()
        .ok_or(format!("no key {key}"))?;
    Ok(String::from_utf8(v.0).unwrap())
}

async fn metric(url: &str, needle: &str) -> f64 {
    let text = reqwest::get(url)
        .await
        .map_err(|e| e.to_string())
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How often the operators' leader Lease has changed hands. Counting tests allow one-time
/// costs per change: a new leader starts with an empty token cache (a change the failover test
/// makes is kept out by `same_leader`; this covers a leader that lost its Lease under load).
async fn leader_changes(bed: &Testbed) -> i32 {
    // (Not there yet: the operators report ready before the first one takes the Lease.)
    Api::<Lease>::namespaced(bed.client().await, "kubebao-system")
        .get_opt("kubebao-operator")
        .await
        .expect("read the operators' leader Lease")
        .and_then(|l| l.spec?.lease_transitions)
        .unwrap_or(0)
}

/// Seconds between two audited requests.
fn seconds_between(first: &AuditedRequest, last: &AuditedRequest) -> f64 {
    last.time.duration_since(first.time).as_secs_f64()
}

/// Every request OpenBao audited for the tenant identity of namespace `ns` with role `ns` (the
/// BaoSecret default): its logins, and whatever its tokens were used for.
async fn tenant_requests(bed: &Testbed, audit: &Audit, ns: &str) -> Audit {
    let role = bed.openbao().audit_hash(ns).await;
    audit.filter(|r| {
        r.path == "auth/kubernetes/login" && r.data_field("role") == Some(role.as_str())
            || r.token_metadata
                .get("service_account_namespace")
                .map(String::as_str)
                == Some(ns)
    })
}

fn paths(audit: &Audit) -> Vec<String> {
    audit
        .requests
        .iter()
        .map(|r| format!("{} {} {:?}", r.operation, r.path, r.error))
        .collect()
}

#[tokio::test]
async fn seed_examples_work_as_written() {
    let setup = setup().await;
    let bed = setup.bed;
    let bao = bed.openbao();
    bao.root(
        Method::POST,
        "secret/data/myapp",
        Some(json!({"data": {"username": "app", "password": "seed-pass"}})),
    )
    .await;
    // The role the seed BaoSecret uses by default (its namespace's name), given by a BaoPolicy.
    bed.apply(
        r#"
apiVersion: kubebao.io/v1alpha1
kind: BaoPolicy
metadata:
  name: default-namespace-reader
spec:
  rules:
    - path: "secret/data/myapp"
      capabilities: [read]
    - path: "secret/metadata/myapp"
      capabilities: [read]
  roles:
    - name: default
      boundServiceAccountNames: [default]
      boundServiceAccountNamespaces: [default]
      tokenTTL: 1h
"#,
    );
    // The original plan's two examples, verbatim.
    bed.apply(
        r#"
apiVersion: kubebao.io/v1alpha1
kind: BaoPolicy
metadata:
  name: my-app-policy
spec:
  rules:
    - path: "secret/data/myapp/*"
      capabilities: [read, list]
"#,
    );
    bed.apply(
        r#"
apiVersion: kubebao.io/v1alpha1
kind: BaoSecret
metadata:
  name: my-app-secrets
spec:
  secretPath: "secret/data/myapp"
  target:
    name: my-app-secret
    namespace: default
  refreshInterval: 1h
"#,
    );
    let policies = baopolicies(bed).await;
    wait_condition(&policies, "my-app-policy", "Ready", "True", "Synced").await;
    let hcl = bao
        .root(Method::GET, "sys/policies/acl/my-app-policy", None)
        .await
        .unwrap()["data"]["policy"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        hcl.starts_with("# managed-by: kubebao.io BaoPolicy "),
        "{hcl}"
    );
    assert!(
        hcl.contains("path \"secret/data/myapp/*\" {\n  capabilities = [\"read\", \"list\"]\n}"),
        "{hcl}"
    );
    let role = bao
        .root(Method::GET, "auth/kubernetes/role/default", None)
        .await
        .unwrap();
    assert_eq!(
        role["data"]["token_policies"],
        json!(["default-namespace-reader"])
    );

    let bs = baosecrets(bed, "default").await;
    wait_condition(&bs, "my-app-secrets", "Ready", "True", "Synced").await;
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, "default");
    assert_eq!(
        secret_data(&secrets, "my-app-secret", "password")
            .await
            .unwrap(),
        "seed-pass"
    );
    let obj = bs.get("my-app-secrets").await.unwrap();
    assert_eq!(obj.data["status"]["kvVersion"], 1);
    let hash = obj.data["status"]["dataHash"].as_str().unwrap();
    assert!(hash.starts_with("hmac-sha256:") && !hash.contains("seed-pass"));
    let printed = bed
        .try_kubectl(&["-n", "default", "get", "bs", "my-app-secrets"], "")
        .unwrap();
    assert!(
        printed.contains("secret/data/myapp") && printed.contains("True"),
        "{printed}"
    );
}

#[tokio::test]
async fn refresh_writes_only_when_the_kv_version_changes() {
    let setup = setup().await;
    let _same_leader = setup.same_leader.read().await;
    let bed = setup.bed;
    let ns = tenant(bed, "refresh", json!({"user": "u", "pass": "v1"})).await;
    bed.apply(&format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {ns}}}
spec:
  replicas: 0
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: c, image: busybox}}]}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db, namespace: {ns}}}
spec:
  replicas: 0
  serviceName: db
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec: {{containers: [{{name: c, image: busybox}}]}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: agent, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: agent}}}}
  template:
    metadata: {{labels: {{app: agent}}}}
    # No node matches: the DaemonSet exists, no pod runs.
    spec: {{nodeSelector: {{no-such-node: "true"}}, containers: [{{name: c, image: busybox}}]}}
---
apiVersion: kubebao.io/v1alpha1
kind: BaoSecret
metadata: {{name: app, namespace: {ns}}}
spec:
  secretPath: secret/data/{ns}/app
  refreshInterval: 2s
  keys: [{{from: pass, to: password}}]
  target:
    name: app
    type: Opaque
    labels: {{team: a}}
    annotations: {{note: hi}}
  rolloutRestartTargets:
    - {{kind: Deployment, name: web}}
    - {{kind: StatefulSet, name: db}}
    - {{kind: DaemonSet, name: agent}}
"#
    ));
    let bs = baosecrets(bed, &ns).await;
    wait_condition(&bs, "app", "Ready", "True", "Synced").await;
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    let first = secrets.get("app").await.unwrap();
    assert_eq!(
        first.data.as_ref().unwrap().keys().collect::<Vec<_>>(),
        vec!["password"]
    );
    assert_eq!(first.metadata.labels.as_ref().unwrap()["team"], "a");
    assert_eq!(first.metadata.annotations.as_ref().unwrap()["note"], "hi");
    let deployments: Api<Deployment> = Api::namespaced(bed.client().await, &ns);
    let restarted = |d: Deployment| {
        d.spec
            .and_then(|s| s.template.metadata)
            .and_then(|m| m.annotations)
            .and_then(|a| a.get("kubebao.io/restartedAt").cloned())
    };
    assert_eq!(
        restarted(deployments.get("web").await.unwrap()),
        None,
        "first sync restarts nothing"
    );

    // Several refresh periods pass, counted where they happen: OpenBao's audit log, for this
    // BaoSecret's path and identity only. The first sync (login, data read, write) is done
    // before Ready, so before `mark`.
    let bao = bed.openbao();
    let metadata = format!("secret/metadata/{ns}/app");
    let data = format!("secret/data/{ns}/app");
    let changes_before = leader_changes(bed).await;
    let mark = bao.audit().len();
    let window = wait_for("three refresh checks of this BaoSecret", WAIT, || async {
        let window = bao.audit().since(mark);
        match window.count(&metadata, "read") {
            n if n >= 3 => Ok(window),
            n => Err(format!("{n} reads of {metadata}")),
        }
    })
    .await;
    let changes = usize::try_from(leader_changes(bed).await - changes_before).unwrap_or(0);
    let checks = window.filter(|r| r.path == metadata && r.operation == "read");
    let (earliest, latest) = (&checks.requests[0], &checks.requests[checks.len() - 1]);
    // Checks start at least one refresh interval (2 s) apart: N periods hold at most N+1.
    let periods = (seconds_between(earliest, latest) / 2.0).floor() as usize;
    assert!(
        checks.len() <= periods + 1 + changes,
        "{} metadata checks in {periods} refresh periods ({changes} leader changes)",
        checks.len()
    );
    assert_eq!(
        window.count(&data, "read"),
        0,
        "an unchanged KV version is never read again"
    );
    let ours = tenant_requests(bed, &window, &ns).await;
    let logins = ours.filter(|r| r.path == "auth/kubernetes/login");
    assert!(
        logins.len() <= changes,
        "the token is cached: {} logins for role {ns} ({changes} leader changes)",
        logins.len()
    );
    assert!(
        ours.requests
            .iter()
            .all(|r| r.path == metadata || r.path == "auth/kubernetes/login"),
        "this BaoSecret's identity asked only for its metadata: {:?}",
        paths(&ours)
    );
    // …and the unchanged Secret was never written again, the workload never restarted.
    let same = secrets.get("app").await.unwrap();
    assert_eq!(
        same.metadata.resource_version,
        first.metadata.resource_version
    );
    assert_eq!(restarted(deployments.get("web").await.unwrap()), None);

    bed.openbao()
        .root(
            Method::POST,
            &format!("secret/data/{ns}/app"),
            Some(json!({"data": {"user": "u", "pass": "v2"}})),
        )
        .await;
    wait_for("the Secret to hold v2", WAIT, || async {
        match secret_data(&secrets, "app", "password").await? {
            v if v == "v2" => Ok(()),
            v => Err(format!("still {} bytes of old data", v.len())),
        }
    })
    .await;
    wait_for("status kvVersion 2", WAIT, || async {
        let o = bs.get("app").await.map_err(|e| e.to_string())?;
        if o.data["status"]["kvVersion"] == 2 {
            Ok(())
        } else {
            Err(o.data["status"].to_string())
        }
    })
    .await;
    wait_for("the Deployment restarted", WAIT, || async {
        restarted(deployments.get("web").await.map_err(|e| e.to_string())?)
            .ok_or("no restartedAt".to_string())
    })
    .await;
    // Every kind of target restarts the same way (pod template annotation).
    let client = bed.client().await;
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client, &ns);
    let annotation = |t: Option<PodTemplateSpec>| {
        t.and_then(|t| t.metadata)
            .and_then(|m| m.annotations)
            .and_then(|a| a.get("kubebao.io/restartedAt").cloned())
    };
    wait_for("the StatefulSet restarted", WAIT, || async {
        let sts = statefulsets.get("db").await.map_err(|e| e.to_string())?;
        annotation(sts.spec.map(|s| s.template)).ok_or("no restartedAt".to_string())
    })
    .await;
    wait_for("the DaemonSet restarted", WAIT, || async {
        let ds = daemonsets.get("agent").await.map_err(|e| e.to_string())?;
        annotation(ds.spec.map(|s| s.template)).ok_or("no restartedAt".to_string())
    })
    .await;
}

#[tokio::test]
async fn deleted_or_edited_secret_is_restored() {
    let setup = setup().await;
    let bed = setup.bed;
    let ns = tenant(bed, "restore", json!({"pass": "good"})).await;
    bed.apply(
        &format!(
            "apiVersion: kubebao.io/v1alpha1\nkind: BaoSecret\nmetadata: {{name: app, namespace: {ns}}}\nspec: {{secretPath: secret/data/{ns}/app, target: {{name: app}}}}\n"
        ),
    );
    let bs = baosecrets(bed, &ns).await;
    wait_condition(&bs, "app", "Ready", "True", "Synced").await;
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    secrets
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"pass": "ZXZpbA=="}})),
        )
        .await
        .unwrap();
    wait_for("the edited Secret restored", WAIT, || async {
        match secret_data(&secrets, "app", "pass").await? {
            v if v == "good" => Ok(()),
            _ => Err("still edited".into()),
        }
    })
    .await;
    secrets
        .delete("app", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the deleted Secret recreated", WAIT, || async {
        match secret_data(&secrets, "app", "pass").await? {
            v if v == "good" => Ok(()),
            _ => Err("wrong data".into()),
        }
    })
    .await;
}

#[tokio::test]
async fn owner_secret_is_collected_and_orphan_secret_is_kept() {
    let setup = setup().await;
    let bed = setup.bed;
    let ns = tenant(bed, "policy", json!({"pass": "x"})).await;
    for (name, policy) in [("owned", "Owner"), ("orphan", "Orphan")] {
        bed.apply(
            &format!(
                "apiVersion: kubebao.io/v1alpha1\nkind: BaoSecret\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{secretPath: secret/data/{ns}/app, target: {{name: {name}, creationPolicy: {policy}}}}}\n"
            ),
        );
    }
    let bs = baosecrets(bed, &ns).await;
    wait_condition(&bs, "owned", "Ready", "True", "Synced").await;
    wait_condition(&bs, "orphan", "Ready", "True", "Synced").await;
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    let orphan = secrets.get("orphan").await.unwrap();
    assert!(orphan.metadata.owner_references.is_none());
    bs.delete("orphan", &DeleteParams::default()).await.unwrap();
    bs.delete("owned", &DeleteParams::default()).await.unwrap();
    wait_for("the owned Secret garbage-collected", WAIT, || async {
        match secrets.get_opt("owned").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        }
    })
    .await;
    // Only once the orphan BaoSecret is gone (any cleanup of the operator's done) does its
    // Secret's survival mean anything.
    wait_for("the orphan BaoSecret gone", WAIT, || async {
        match bs.get_opt("orphan").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        }
    })
    .await;
    assert_eq!(
        secret_data(&secrets, "orphan", "pass").await.unwrap(),
        "x",
        "orphan Secret kept"
    );
}

#[tokio::test]
async fn tenants_read_only_what_their_role_allows_and_only_into_their_namespace() {
    let setup = setup().await;
    let _same_leader = setup.same_leader.read().await;
    let bed = setup.bed;
    let bao = bed.openbao();
    let ns = tenant(bed, "tenant", json!({"pass": "x"})).await;
    let changes_before = leader_changes(bed).await;
    let mark = bao.audit().len();
    bao.root(
        Method::POST,
        "secret/data/other-team/db",
        Some(json!({"data": {"pass": "theirs"}})),
    )
    .await;
    bed.apply(
        &format!(
            "apiVersion: kubebao.io/v1alpha1\nkind: BaoSecret\nmetadata: {{name: steal, namespace: {ns}}}\nspec: {{secretPath: secret/data/other-team/db, target: {{name: steal}}}}\n---\napiVersion: kubebao.io/v1alpha1\nkind: BaoSecret\nmetadata: {{name: elsewhere, namespace: {ns}}}\nspec: {{secretPath: secret/data/{ns}/app, target: {{name: x, namespace: default}}}}\n"
        ),
    );
    let bs = baosecrets(bed, &ns).await;
    let message = wait_condition(&bs, "steal", "Stalled", "True", "PermissionDenied").await;
    assert!(
        message.contains(&format!("role \"{ns}\""))
            && message.contains("secret/data/other-team/db"),
        "{message}"
    );
    let ready = condition(&bs.get("steal").await.unwrap(), "Ready").unwrap();
    assert_eq!(
        (ready.0.as_str(), ready.1.as_str()),
        ("False", "PermissionDenied")
    );
    warning_event(bed, &ns, "steal", "PermissionDenied").await;
    // Backoff: every retry of the broken BaoSecret costs one OpenBao request (the denied read),
    // never a login plus a read. Counted in OpenBao's audit log for this BaoSecret's path and
    // identity: wait until a retry has happened, then look at everything the identity asked.
    let denied_path = "secret/data/other-team/db";
    let window = wait_for("a retry after backoff", WAIT, || async {
        let window = bao.audit().since(mark);
        match window.count(denied_path, "read") {
            n if n >= 2 => Ok(window),
            n => Err(format!("{n} reads of {denied_path}")),
        }
    })
    .await;
    let changes = usize::try_from(leader_changes(bed).await - changes_before).unwrap_or(0);
    let ours = tenant_requests(bed, &window, &ns).await;
    let reads = ours.filter(|r| r.path == denied_path);
    assert_eq!(
        reads.len(),
        window.count(denied_path, "read"),
        "every read of {denied_path} was made as this BaoSecret's identity"
    );
    let logins = ours.filter(|r| r.path == "auth/kubernetes/login");
    // After a 403 the operator may ask OpenBao once per 30 s whether the token itself is still
    // valid (a revoked token vs. a policy gap): allowed, and bounded.
    let checks = ours.filter(|r| r.path == "auth/token/lookup-self");
    assert_eq!(
        reads.len() + logins.len() + checks.len(),
        ours.len(),
        "this identity asked only to read {denied_path}, to log in and to check its token: {:?}",
        paths(&ours)
    );
    assert!(
        reads.requests.iter().all(|r| r.operation == "read"
            && r.error
                .as_deref()
                .is_some_and(|e| e.contains("permission denied"))),
        "every read was denied: {:?}",
        paths(&reads)
    );
    // One login, before the first read; a new leader (if the Lease changed hands) logs in
    // once more. Retries reuse the token.
    let first_read = reads.requests[0].time;
    assert!(
        logins.len() <= 1 + changes
            && logins
                .requests
                .iter()
                .filter(|l| l.time > first_read)
                .count()
                <= changes,
        "no login after the first ({changes} leader changes): {:?}",
        paths(&ours)
    );
    let span = seconds_between(&ours.requests[0], &ours.requests[ours.len() - 1]);
    assert!(
        checks.len() <= 1 + (span / 30.0).floor() as usize + changes,
        "at most one token check per 30 s: {} in {span:.0} s",
        checks.len()
    );
    // Retries wait: the first backoff step is 5 s (a new leader retries at once).
    let quick = reads
        .requests
        .windows(2)
        .filter(|w| seconds_between(&w[0], &w[1]) < 4.0)
        .count();
    assert!(
        quick <= changes,
        "{quick} retries came less than 4 s after the previous one"
    );
    let message = wait_condition(&bs, "elsewhere", "Stalled", "True", "CrossNamespaceTarget").await;
    assert!(message.contains("own namespace"), "{message}");
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    assert!(secrets.get_opt("steal").await.unwrap().is_none());
    let default: Api<Secret> = Api::namespaced(bed.client().await, "default");
    assert!(
        default.get_opt("x").await.unwrap().is_none(),
        "nothing written into another namespace"
    );
}

#[tokio::test]
async fn api_server_rejects_invalid_objects_with_readable_messages() {
    let setup = setup().await;
    let bed = setup.bed;
    let both = "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: both}\nspec:\n  hcl: 'path \"a\" { capabilities = [\"read\"] }'\n  rules: [{path: a, capabilities: [read]}]\n";
    let err = bed.try_kubectl(&["apply", "-f", "-"], both).unwrap_err();
    assert!(err.contains("set exactly one of rules or hcl"), "{err}");
    let injection = "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: evil}\nspec:\n  rules: [{path: \"secret/x\\\" {\\n capabilities = [\\\"sudo\\\"] }\\npath \\\"*\", capabilities: [read]}]\n";
    let err = bed
        .try_kubectl(&["apply", "-f", "-"], injection)
        .unwrap_err();
    assert!(
        err.contains("spec.rules[0].path") && err.contains("should match"),
        "{err}"
    );
    let bad_cap = "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: badcap}\nspec: {rules: [{path: a, capabilities: [root]}]}\n";
    let err = bed.try_kubectl(&["apply", "-f", "-"], bad_cap).unwrap_err();
    assert!(err.contains("Unsupported value: \"root\""), "{err}");
    let no_path = "apiVersion: kubebao.io/v1alpha1\nkind: BaoSecret\nmetadata: {name: nopath, namespace: default}\nspec: {target: {name: x, creationPolicy: Steal}}\n";
    let err = bed.try_kubectl(&["apply", "-f", "-"], no_path).unwrap_err();
    assert!(
        err.contains("spec.secretPath: Required value")
            && err.contains("Unsupported value: \"Steal\""),
        "{err}"
    );
    let explain = bed
        .try_kubectl(&["explain", "baosecret.spec.target.creationPolicy"], "")
        .unwrap();
    assert!(explain.contains("Who owns the Secret"), "{explain}");
}

#[tokio::test]
async fn baopolicy_lifecycle_is_reflected_in_openbao() {
    let setup = setup().await;
    let bed = setup.bed;
    let bao = bed.openbao();
    let read = |name: &'static str| async move {
        bao.client()
            .policy_read(bao.root_token(), name)
            .await
            .unwrap()
    };
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: life}\nspec:\n  rules: [{path: \"app/data/*\", capabilities: [read]}]\n  roles: [{name: life-role, boundServiceAccountNames: [app], boundServiceAccountNamespaces: [team-a], tokenTTL: 10m}]\n",
    );
    let policies = baopolicies(bed).await;
    wait_condition(&policies, "life", "Ready", "True", "Synced").await;
    assert!(read("life").await.unwrap().contains("path \"app/data/*\""));
    let role = bao
        .root(Method::GET, "auth/kubernetes/role/life-role", None)
        .await
        .unwrap();
    assert_eq!(role["data"]["token_ttl"], 600);

    // Update.
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: life}\nspec:\n  rules: [{path: \"app/data/*\", capabilities: [read, list]}]\n  roles: [{name: life-role, boundServiceAccountNames: [app], boundServiceAccountNamespaces: [team-a], tokenTTL: 10m}]\n",
    );
    wait_for("the update in OpenBao", WAIT, || async {
        let hcl = read("life").await.unwrap_or_default();
        if hcl.contains("[\"read\", \"list\"]") {
            Ok(())
        } else {
            Err(hcl)
        }
    })
    .await;
    // Drift: edited in OpenBao → restored at resync; deleted in OpenBao → recreated.
    bao.root(
        Method::POST,
        "sys/policies/acl/life",
        Some(json!({"policy": "path \"*\" { capabilities = [\"sudo\"] }"})),
    )
    .await;
    wait_for("the drift repaired", WAIT, || async {
        let hcl = read("life").await.unwrap_or_default();
        if hcl.contains("[\"read\", \"list\"]") {
            Ok(())
        } else {
            Err(hcl)
        }
    })
    .await;
    bao.root(Method::DELETE, "sys/policies/acl/life", None)
        .await;
    bao.root(Method::DELETE, "auth/kubernetes/role/life-role", None)
        .await;
    wait_for("the deleted policy and role recreated", WAIT, || async {
        let role = bao
            .client()
            .read("auth/kubernetes/role/life-role", bao.root_token())
            .await
            .map_err(|e| e.to_string())?;
        let hcl = read("life").await.ok_or("no policy")?;
        (hcl.contains("read") && role.data.is_some())
            .then_some(())
            .ok_or("not yet".to_string())
    })
    .await;
    // Delete: policy and role removed.
    policies
        .delete("life", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the policy removed", WAIT, || async {
        match read("life").await {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        }
    })
    .await;
    assert!(
        bao.client()
            .read("auth/kubernetes/role/life-role", bao.root_token())
            .await
            .unwrap_err()
            .is_not_found()
    );

    // Retain: the policy stays.
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: kept}\nspec: {deletionPolicy: Retain, hcl: 'path \"kept/*\" { capabilities = [\"read\"] }'}\n",
    );
    wait_condition(&policies, "kept", "Ready", "True", "Synced").await;
    policies
        .delete("kept", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the BaoPolicy gone", WAIT, || async {
        match policies.get_opt("kept").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        }
    })
    .await;
    assert!(read("kept").await.unwrap().contains("kept/*"));
}

#[tokio::test]
async fn baopolicy_never_takes_a_policy_it_does_not_own() {
    let setup = setup().await;
    let bed = setup.bed;
    let bao = bed.openbao();
    let foreign = "path \"foreign/*\" { capabilities = [\"read\"] }";
    bao.root(
        Method::POST,
        "sys/policies/acl/foreign",
        Some(json!({"policy": foreign})),
    )
    .await;
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: foreign}\nspec: {rules: [{path: \"mine/*\", capabilities: [read]}]}\n",
    );
    let policies = baopolicies(bed).await;
    let message = wait_condition(&policies, "foreign", "Stalled", "True", "NotOwned").await;
    assert!(message.contains("adopt"), "{message}");
    assert_eq!(
        bao.client()
            .policy_read(bao.root_token(), "foreign")
            .await
            .unwrap()
            .unwrap(),
        foreign
    );
    // Explicit adoption.
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: foreign}\nspec: {adopt: true, rules: [{path: \"mine/*\", capabilities: [read]}]}\n",
    );
    wait_condition(&policies, "foreign", "Ready", "True", "Synced").await;
    let hcl = bao
        .client()
        .policy_read(bao.root_token(), "foreign")
        .await
        .unwrap()
        .unwrap();
    assert!(
        hcl.starts_with("# managed-by: kubebao.io BaoPolicy ") && hcl.contains("mine/*"),
        "{hcl}"
    );

    // Two BaoPolicies, one OpenBao name: the later one reports Conflict and writes nothing.
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: first}\nspec: {name: shared, rules: [{path: \"first/*\", capabilities: [read]}]}\n",
    );
    wait_condition(&policies, "first", "Ready", "True", "Synced").await;
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: second}\nspec: {name: shared, rules: [{path: \"second/*\", capabilities: [read]}]}\n",
    );
    let message = wait_condition(&policies, "second", "Stalled", "True", "Conflict").await;
    assert!(message.contains("BaoPolicy first"), "{message}");
    // Deleting the loser leaves the winner's policy in place.
    policies
        .delete("second", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("second gone", WAIT, || async {
        match policies
            .get_opt("second")
            .await
            .map_err(|e| e.to_string())?
        {
            None => Ok(()),
            Some(_) => Err("still there".into()),
        }
    })
    .await;
    let hcl = bao
        .client()
        .policy_read(bao.root_token(), "shared")
        .await
        .unwrap()
        .unwrap();
    assert!(hcl.contains("first/*"), "{hcl}");
}

#[tokio::test]
async fn parameter_injection_is_refused_and_nothing_is_written() {
    let setup = setup().await;
    let bed = setup.bed;
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: sneaky}\nspec:\n  rules:\n    - path: ok/path\n      capabilities: [update]\n      allowedParameters: {ttl: [\"1h\\\"]\\n}\\npath \\\"sys/*\\\" {\\n capabilities = [\\\"sudo\\\"]\\n}\\n#\"]}\n",
    );
    let policies = baopolicies(bed).await;
    let message = wait_condition(&policies, "sneaky", "Stalled", "True", "InvalidRule").await;
    assert!(message.contains("allowed_parameters"), "{message}");
    let bao = bed.openbao();
    assert_eq!(
        bao.client()
            .policy_read(bao.root_token(), "sneaky")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn a_standby_replica_takes_over_when_the_leader_dies() {
    let setup = setup().await;
    let _leader_change = setup.same_leader.write().await;
    let bed = setup.bed;
    let mut operators = setup.operators.lock().await;
    let leader = wait_for("one leader among two replicas", WAIT, || {
        let urls: Vec<String> = operators.iter().map(|o| o.metrics.clone()).collect();
        async move {
            let mut leaders = Vec::new();
            for (i, u) in urls.iter().enumerate() {
                if metric(u, "kubebao_operator_leader ").await == 1.0 {
                    leaders.push(i);
                }
            }
            if leaders.len() == 1 {
                Ok(leaders[0])
            } else {
                Err(format!("leaders: {leaders:?}"))
            }
        }
    })
    .await;
    operators[leader].process.kill();
    let dead = operators.remove(leader);
    let survivor = operators[0].metrics.clone();
    drop(operators);
    drop(dead);
    wait_for("the standby to lead", WAIT, || async {
        if metric(&survivor, "kubebao_operator_leader ").await == 1.0 {
            Ok(())
        } else {
            Err("standby".into())
        }
    })
    .await;
    let ns = tenant(bed, "failover", json!({"pass": "after"})).await;
    bed.apply(
        &format!(
            "apiVersion: kubebao.io/v1alpha1\nkind: BaoSecret\nmetadata: {{name: app, namespace: {ns}}}\nspec: {{secretPath: secret/data/{ns}/app, target: {{name: app}}}}\n"
        ),
    );
    wait_condition(
        &baosecrets(bed, &ns).await,
        "app",
        "Ready",
        "True",
        "Synced",
    )
    .await;
}

#[tokio::test]
async fn kv_v1_secret_merges_into_an_existing_secret() {
    let setup = setup().await;
    let bed = setup.bed;
    let ns = tenant(bed, "kv1", json!({"unused": "x"})).await;
    bed.openbao()
        .root(
            Method::POST,
            &format!("kv1/{ns}/app"),
            Some(json!({"token": "from-kv1"})),
        )
        .await;
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    bed.apply(
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: existing, namespace: {ns}, annotations: {{kubebao.io/allow-merge-from: merged}}}}\nstringData: {{keep: mine}}\n---\napiVersion: kubebao.io/v1alpha1\nkind: BaoSecret\nmetadata: {{name: merged, namespace: {ns}}}\nspec: {{secretPath: kv1/{ns}/app, target: {{name: existing, creationPolicy: Merge}}}}\n"
        ),
    );
    let bs = baosecrets(bed, &ns).await;
    wait_condition(&bs, "merged", "Ready", "True", "Synced").await;
    assert_eq!(
        secret_data(&secrets, "existing", "token").await.unwrap(),
        "from-kv1"
    );
    assert_eq!(
        secret_data(&secrets, "existing", "keep").await.unwrap(),
        "mine",
        "other keys untouched"
    );
    let existing = secrets.get("existing").await.unwrap();
    assert!(
        existing.metadata.owner_references.is_none(),
        "Merge does not take ownership"
    );
    let status = &bs.get("merged").await.unwrap().data["status"];
    assert!(
        status.get("kvVersion").is_none(),
        "KV v1 has no version: {status}"
    );
}

#[tokio::test]
async fn one_malformed_object_does_not_stop_the_others() {
    let setup = setup().await;
    let bed = setup.bed;
    let ns = tenant(bed, "malformed", json!({"pass": "good"})).await;
    // Objects stored around the API server's validation, as under an older CRD schema: a number
    // where the operator expects a string, a string where it expects a list.
    let stored = |kind: &str, name: &str, namespace: Option<&str>, spec: Value| {
        let mut metadata = json!({
            "name": name, "uid": format!("00000000-0000-4000-8000-{:012}", free_port()),
            "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z",
        });
        if let Some(ns) = namespace {
            metadata["namespace"] = json!(ns);
        }
        json!({"apiVersion": "kubebao.io/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec})
            .to_string()
    };
    let policy_name = format!("{ns}-broken");
    bed.etcd()
        .put(
            &format!("/registry/kubebao.io/baosecrets/{ns}/broken"),
            stored(
                "BaoSecret",
                "broken",
                Some(&ns),
                json!({"secretPath": 42, "target": {"name": "broken"}}),
            )
            .as_bytes(),
        )
        .await;
    bed.etcd()
        .put(
            &format!("/registry/kubebao.io/baopolicies/{policy_name}"),
            stored("BaoPolicy", &policy_name, None, json!({"rules": "all"})).as_bytes(),
        )
        .await;

    // Each is reported as what it is, with what to do.
    let bs = baosecrets(bed, &ns).await;
    let message = wait_condition(&bs, "broken", "Stalled", "True", "InvalidObject").await;
    assert!(message.contains("invalid type: integer `42`"), "{message}");
    assert!(message.contains("kubectl edit"), "{message}");
    // The API server refuses even a status write for this one (its CEL rule cannot evaluate a
    // string as a list), so the Warning event is what tells the user.
    let policies = baopolicies(bed).await;
    let note = warning_event(bed, "default", &policy_name, "InvalidObject").await;
    assert!(note.contains("expected a sequence"), "{note}");

    // Objects created after them are reconciled as usual.
    bed.apply(
        &format!(
            "apiVersion: kubebao.io/v1alpha1\nkind: BaoSecret\nmetadata: {{name: app, namespace: {ns}}}\nspec: {{secretPath: secret/data/{ns}/app, target: {{name: app}}}}\n"
        ),
    );
    wait_condition(&bs, "app", "Ready", "True", "Synced").await;
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    assert_eq!(secret_data(&secrets, "app", "pass").await.unwrap(), "good");
    let good_policy = format!("{ns}-good");
    bed.apply(
        &format!(
            "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {{name: {good_policy}}}\nspec: {{rules: [{{path: \"secret/data/{ns}/*\", capabilities: [read]}}]}}\n"
        ),
    );
    wait_condition(&policies, &good_policy, "Ready", "True", "Synced").await;
    assert!(
        secrets.get_opt("broken").await.unwrap().is_none(),
        "nothing is written for the malformed BaoSecret"
    );

    // A malformed object can be deleted like any other.
    bs.delete("broken", &DeleteParams::default()).await.unwrap();
    policies
        .delete(&policy_name, &DeleteParams::default())
        .await
        .unwrap();
    policies
        .delete(&good_policy, &DeleteParams::default())
        .await
        .unwrap();
}
