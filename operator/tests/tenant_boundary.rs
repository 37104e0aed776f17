//! Tests as an attacker: every way a tenant (someone who may create BaoSecrets in one namespace,
//! or a BaoPolicy author) could try to cross its boundary, each asserted refused with a clear
//! condition and NOTHING written (no Secret created or changed, no OpenBao policy or role
//! changed, no request made with someone else's identity).
//!
//! Values the API server refuses are also written straight into etcd (as under an older CRD, or
//! by anyone who can write around the API server): the operator must refuse them by itself.
//! One operator process (no leader election) against the test bed.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind};
use kubebao_testbed::{Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::{Mutex, OnceCell};

const WAIT: Duration = Duration::from_secs(60);
/// The operator's own OpenBao policy: policies and roles only, no secrets engine at all.
const OPERATOR_POLICY: &str = r#"
path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "auth/kubernetes/role/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;

struct Setup {
    bed: &'static Testbed,
    operator: Mutex<Component>,
    health: String,
}

static SETUP: OnceCell<Setup> = OnceCell::const_new();

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
            // The operator's own Kubernetes-auth role, as a real install has it.
            bao.root(
                Method::POST,
                "auth/kubernetes/role/kubebao-operator",
                Some(json!({"bound_service_account_names": ["kubebao-operator"], "bound_service_account_namespaces": ["kubebao-system"], "token_policies": ["kubebao-operator"]})),
            )
            .await;
            let token = bao
                .root(
                    Method::POST,
                    "auth/token/create",
                    Some(json!({"policies": ["kubebao-operator"], "ttl": "1h"})),
                )
                .await
                .expect("token response")["auth"]["client_token"]
                .as_str()
                .expect("token")
                .to_string();
            let token_file = bed.dir().join("boundary-operator-token");
            std::fs::write(&token_file, token).unwrap();
            bed.install_crds();
            let _ = bed.try_kubectl(&["create", "namespace", "kubebao-system"], "");
            let port = free_port();
            let args: Vec<String> = [
                "--openbao-addr",
                bao.addr(),
                // The test bed's OpenBao listens on loopback over plain http.
                "--openbao-allow-plain-http",
                "--openbao-token-file",
                token_file.to_str().unwrap(),
                "--namespace",
                "kubebao-system",
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--leader-elect",
                "false",
                "--policy-resync",
                "2s",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let kubeconfig = bed.operator_kubeconfig("kubebao-system").display().to_string();
            let mut operator = Component::start_with_env(
                "kubebao-operator-boundary",
                bed.dir(),
                &PathBuf::from(env!("CARGO_BIN_EXE_kubebao-operator")),
                &args,
                &[("KUBECONFIG", &kubeconfig)],
            );
            let ready = format!("http://127.0.0.1:{port}/readyz");
            wait_for("the operator to be ready", WAIT, || {
                operator.assert_running();
                let ready = ready.clone();
                async move {
                    match reqwest::get(&ready).await {
                        Ok(r) if r.status().is_success() => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                }
            })
            .await;
            Setup {
                bed,
                operator: Mutex::new(operator),
                health: format!("http://127.0.0.1:{port}/healthz"),
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

/// Waits until `name` is Stalled with `reason`; returns the message.
async fn refused(api: &Api<DynamicObject>, name: &str, reason: &str) -> String {
    wait_for(&format!("{name} Stalled ({reason})"), WAIT, || async {
        let obj = api.get(name).await.map_err(|e| e.to_string())?;
        let conditions = obj.data["status"]["conditions"].as_array().cloned();
        let stalled = conditions.iter().flatten().find(|c| c["type"] == "Stalled");
        match stalled {
            Some(c) if c["status"] == "True" && c["reason"] == reason => {
                Ok(c["message"].as_str().unwrap_or_default().to_string())
            }
            _ => Err(format!("status now: {}", obj.data["status"])),
        }
    })
    .await
}

/// Waits until `name` is Ready.
async fn ready(api: &Api<DynamicObject>, name: &str) {
    wait_for(&format!("{name} Ready"), WAIT, || async {
        let obj = api.get(name).await.map_err(|e| e.to_string())?;
        let conditions = obj.data["status"]["conditions"].as_array().cloned();
        match conditions.iter().flatten().find(|c| c["type"] == "Ready") {
            Some(c) if c["status"] == "True" => Ok(()),
            _ => Err(format!("status now: {}", obj.data["status"])),
        }
    })
    .await
}

/// A namespace with a KV v2 secret at `secret/data/<ns>/app` and an OpenBao role named after
/// the namespace, bound to its `default` ServiceAccount, that may read `secret/*/<ns>/*`.
async fn tenant(bed: &Testbed, prefix: &str) -> String {
    let ns = bed.namespace(prefix).await;
    let bao = bed.openbao();
    bao.root(
        Method::POST,
        &format!("secret/data/{ns}/app"),
        Some(json!({"data": {"pass": format!("{ns}-pass")}})),
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
        Some(json!({"bound_service_account_names": ["default"], "bound_service_account_namespaces": [ns], "token_policies": [format!("tenant-{ns}")]})),
    )
    .await;
    wait_for("the default ServiceAccount", WAIT, || async {
        bed.try_kubectl(&["-n", &ns, "get", "serviceaccount", "default"], "")
            .map(|_| ())
    })
    .await;
    ns
}

/// Writes an object straight into etcd, around the API server's validation.
async fn store_around_the_api_server(
    bed: &Testbed,
    kind: &str,
    name: &str,
    ns: Option<&str>,
    spec: Value,
) {
    let plural = match kind {
        "BaoPolicy" => "baopolicies",
        _ => "baosecrets",
    };
    let mut metadata = json!({
        "name": name, "uid": format!("00000000-0000-4000-8000-{:012}", free_port()),
        "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z",
    });
    let key = match ns {
        Some(ns) => {
            metadata["namespace"] = json!(ns);
            format!("/registry/kubebao.io/{plural}/{ns}/{name}")
        }
        None => format!("/registry/kubebao.io/{plural}/{name}"),
    };
    let object = json!({"apiVersion": "kubebao.io/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec});
    bed.etcd().put(&key, object.to_string().as_bytes()).await;
}

/// `kubectl apply` must fail; returns the API server's message.
fn api_server_refuses(bed: &Testbed, yaml: &str) -> String {
    bed.try_kubectl(&["apply", "-f", "-"], yaml)
        .expect_err("the API server must refuse this object")
}

fn baosecret(ns: &str, name: &str, spec: Value) -> String {
    json!({"apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret",
           "metadata": {"name": name, "namespace": ns}, "spec": spec})
    .to_string()
}

async fn secret(bed: &Testbed, ns: &str, name: &str) -> Option<Secret> {
    let api: Api<Secret> = Api::namespaced(bed.client().await, ns);
    api.get_opt(name).await.expect("read Secret")
}

/// The role as OpenBao holds it (`None`: no such role).
async fn role(bed: &Testbed, name: &str) -> Option<Value> {
    let bao = bed.openbao();
    bao.client()
        .read(&format!("auth/kubernetes/role/{name}"), bao.root_token())
        .await
        .ok()
        .and_then(|s| s.data)
        .map(|d| json!(d))
}

async fn policy_text(bed: &Testbed, name: &str) -> Option<String> {
    let bao = bed.openbao();
    bao.client()
        .policy_read(bao.root_token(), name)
        .await
        .expect("read policy")
}

#[tokio::test]
async fn a_tenant_never_reaches_another_namespace() {
    let setup = setup().await;
    let bed = setup.bed;
    let ns = tenant(bed, "attacker").await;
    let victim = tenant(bed, "victim").await;
    let bs = baosecrets(bed, &ns).await;
    let mut crossings = 0;

    // 1. Writing into another namespace.
    bed.apply(&baosecret(
        &ns,
        "elsewhere",
        json!({"secretPath": format!("secret/data/{ns}/app"), "target": {"name": "stolen", "namespace": victim}}),
    ));
    let m = refused(&bs, "elsewhere", "CrossNamespaceTarget").await;
    assert!(m.contains("own namespace"), "{m}");
    crossings += 1;

    // 2. Reading another team's path: OpenBao refuses the tenant's own identity.
    bed.apply(&baosecret(
        &ns,
        "their-path",
        json!({"secretPath": format!("secret/data/{victim}/app"), "target": {"name": "their-path"}}),
    ));
    let m = refused(&bs, "their-path", "PermissionDenied").await;
    assert!(m.contains(&format!("secret/data/{victim}/app")), "{m}");
    crossings += 1;

    // 3. Logging in as another team's role: bound to their namespace only.
    bed.apply(&baosecret(
        &ns,
        "their-role",
        json!({"secretPath": format!("secret/data/{victim}/app"), "role": victim, "target": {"name": "their-role"}}),
    ));
    refused(&bs, "their-role", "LoginDenied").await;
    crossings += 1;

    // 4. Using another namespace's ServiceAccount: refused by the schema, and by the operator
    //    when written around it.
    for (name, sa) in [
        ("their-sa", format!("{victim}/default")),
        (
            "their-sa-2",
            format!("system:serviceaccount:{victim}:default"),
        ),
    ] {
        let spec = json!({"secretPath": format!("secret/data/{ns}/app"), "serviceAccountName": sa, "target": {"name": name}});
        let e = api_server_refuses(bed, &baosecret(&ns, name, spec.clone()));
        assert!(
            e.contains("spec.serviceAccountName") && e.contains("should match"),
            "{e}"
        );
        store_around_the_api_server(bed, "BaoSecret", name, Some(&ns), spec).await;
        let m = refused(&bs, name, "InvalidSpec").await;
        assert!(m.starts_with("spec.serviceAccountName "), "{m}");
        crossings += 1;
    }

    // 5. Path traversal towards OpenBao's system paths.
    let traversal = "secret/data/../../sys/policies/acl/kubebao-operator";
    let spec = json!({"secretPath": traversal, "target": {"name": "traversal"}});
    let e = api_server_refuses(bed, &baosecret(&ns, "traversal", spec.clone()));
    assert!(
        e.contains("spec.secretPath") && e.contains("should match"),
        "{e}"
    );
    store_around_the_api_server(bed, "BaoSecret", "traversal", Some(&ns), spec).await;
    let m = refused(&bs, "traversal", "InvalidSpec").await;
    assert!(
        m.contains("spec.secretPath") && m.contains("\"..\" segment"),
        "{m}"
    );
    let spec = json!({"secretPath": format!("secret/data/{ns}/app"), "authMount": "../../sys/policies/acl/x", "target": {"name": "mount-traversal"}});
    store_around_the_api_server(bed, "BaoSecret", "mount-traversal", Some(&ns), spec).await;
    let m = refused(&bs, "mount-traversal", "InvalidSpec").await;
    assert!(m.starts_with("spec.authMount "), "{m}");
    crossings += 2;

    // Nothing was written, anywhere, and no tenant identity ever reached a system path.
    for name in [
        "stolen",
        "their-path",
        "their-role",
        "their-sa",
        "their-sa-2",
        "traversal",
        "mount-traversal",
    ] {
        assert!(secret(bed, &ns, name).await.is_none(), "{name} written");
        assert!(secret(bed, &victim, name).await.is_none(), "{name} written");
    }
    let sys_by_tenant = bed.openbao().audit().filter(|r| {
        r.path.starts_with("sys/") && r.token_metadata.contains_key("service_account_namespace")
    });
    assert!(
        sys_by_tenant.is_empty(),
        "a tenant identity reached {:?}",
        sys_by_tenant
            .requests
            .iter()
            .map(|r| &r.path)
            .collect::<Vec<_>>()
    );
    println!("namespace crossings tried and refused: {crossings}");
}

#[tokio::test]
async fn a_tenant_never_takes_a_secret_it_did_not_create() {
    let setup = setup().await;
    let bed = setup.bed;
    let ns = tenant(bed, "merge").await;
    let bs = baosecrets(bed, &ns).await;
    let mut crossings = 0;
    bed.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: theirs, namespace: {ns}}}\nstringData: {{pass: original}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: someone-else, namespace: {ns}, annotations: {{kubebao.io/allow-merge-from: other}}}}\nstringData: {{pass: original}}\n"
    ));
    let theirs = secret(bed, &ns, "theirs").await.unwrap();
    let someone_else = secret(bed, &ns, "someone-else").await.unwrap();

    // 1. Merging into a Secret that does not opt in, or opts in for another BaoSecret.
    for target in ["theirs", "someone-else"] {
        let name = format!("merge-{target}");
        bed.apply(&baosecret(
            &ns,
            &name,
            json!({"secretPath": format!("secret/data/{ns}/app"), "target": {"name": target, "creationPolicy": "Merge"}}),
        ));
        let m = refused(&bs, &name, "MergeNotAllowed").await;
        assert!(
            m.contains(&format!(
                "kubectl annotate secret {target} kubebao.io/allow-merge-from={name}"
            )),
            "{m}"
        );
        crossings += 1;
    }
    // 2. Taking it over as Owner or Orphan.
    for policy in ["Owner", "Orphan"] {
        let name = format!("take-{}", policy.to_lowercase());
        bed.apply(&baosecret(
            &ns,
            &name,
            json!({"secretPath": format!("secret/data/{ns}/app"), "target": {"name": "theirs", "creationPolicy": policy}}),
        ));
        refused(&bs, &name, "TargetExists").await;
        crossings += 1;
    }
    // 3. A Secret type that makes Kubernetes mint a ServiceAccount token: refused by the schema
    //    and, written around it, by the operator; and merging into an existing token Secret is
    //    refused even when that Secret opts in.
    let spec = json!({"secretPath": format!("secret/data/{ns}/app"), "target": {"name": "minted", "type": "kubernetes.io/service-account-token", "annotations": {"kubernetes.io/service-account.name": "default"}}});
    let e = api_server_refuses(bed, &baosecret(&ns, "minted", spec.clone()));
    assert!(
        e.contains("target.type may not be a type Kubernetes acts on"),
        "{e}"
    );
    store_around_the_api_server(bed, "BaoSecret", "minted", Some(&ns), spec).await;
    let m = refused(&bs, "minted", "ForbiddenTargetType").await;
    assert!(m.starts_with("spec.target.type "), "{m}");
    let bootstrap = json!({"secretPath": format!("secret/data/{ns}/app"), "target": {"name": "bootstrap", "type": "bootstrap.kubernetes.io/token"}});
    store_around_the_api_server(bed, "BaoSecret", "bootstrap", Some(&ns), bootstrap).await;
    refused(&bs, "bootstrap", "ForbiddenTargetType").await;
    bed.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: sa-token, namespace: {ns}, annotations: {{kubernetes.io/service-account.name: default, kubebao.io/allow-merge-from: into-token}}}}\ntype: kubernetes.io/service-account-token\n"
    ));
    let token_secret = wait_for("the token controller to fill the Secret", WAIT, || async {
        match secret(bed, &ns, "sa-token").await {
            Some(s) if s.data.as_ref().is_some_and(|d| d.contains_key("token")) => Ok(s),
            _ => Err("not yet".to_string()),
        }
    })
    .await;
    bed.apply(&baosecret(
        &ns,
        "into-token",
        json!({"secretPath": format!("secret/data/{ns}/app"), "target": {"name": "sa-token", "creationPolicy": "Merge"}}),
    ));
    refused(&bs, "into-token", "ForbiddenTargetType").await;
    crossings += 3;

    // Nothing written: the existing Secrets are as they were, no new one exists.
    for (name, was) in [
        ("theirs", &theirs),
        ("someone-else", &someone_else),
        ("sa-token", &token_secret),
    ] {
        let now = secret(bed, &ns, name).await.unwrap();
        assert_eq!(
            now.metadata.resource_version, was.metadata.resource_version,
            "{name} changed"
        );
    }
    assert!(secret(bed, &ns, "minted").await.is_none());
    assert!(secret(bed, &ns, "bootstrap").await.is_none());

    // The opt-in works: the Secret's owner names this BaoSecret, and only the managed keys move.
    bed.kubectl(&[
        "-n",
        &ns,
        "annotate",
        "secret",
        "theirs",
        "kubebao.io/allow-merge-from=merge-theirs",
    ]);
    ready(&bs, "merge-theirs").await;
    let merged = secret(bed, &ns, "theirs").await.unwrap();
    assert_eq!(
        merged.data.unwrap()["pass"].0,
        format!("{ns}-pass").into_bytes()
    );
    println!("Secret crossings tried and refused: {crossings}");
}

#[tokio::test]
async fn a_tenant_never_reads_as_the_operator() {
    let setup = setup().await;
    let bed = setup.bed;
    let ns = tenant(bed, "deputy").await;
    let bs = baosecrets(bed, &ns).await;
    let mark = bed.openbao().audit().len();
    // The operator's own OpenBao role, from a tenant's ServiceAccount.
    bed.apply(&baosecret(
        &ns,
        "as-operator",
        json!({"secretPath": format!("secret/data/{ns}/app"), "role": "kubebao-operator", "target": {"name": "as-operator"}}),
    ));
    let m = refused(&bs, "as-operator", "LoginDenied").await;
    assert!(m.contains("kubebao-operator"), "{m}");
    // The operator's ServiceAccount name, in the tenant's namespace: that is not the operator.
    bed.apply(&baosecret(
        &ns,
        "operator-sa",
        json!({"secretPath": format!("secret/data/{ns}/app"), "serviceAccountName": "kubebao-operator", "target": {"name": "operator-sa"}}),
    ));
    refused(&bs, "operator-sa", "ServiceAccountNotFound").await;
    // A good one next to them reads as the tenant, never as the operator.
    bed.apply(&baosecret(
        &ns,
        "own",
        json!({"secretPath": format!("secret/data/{ns}/app"), "target": {"name": "own"}}),
    ));
    ready(&bs, "own").await;
    for name in ["as-operator", "operator-sa"] {
        assert!(secret(bed, &ns, name).await.is_none(), "{name} written");
    }
    let window = bed.openbao().audit().since(mark);
    let kv_by_operator = window.filter(|r| {
        r.path.starts_with("secret/") && r.token_policies.iter().any(|p| p == "kubebao-operator")
    });
    assert!(
        kv_by_operator.is_empty(),
        "KV read with the operator's identity: {:?}",
        kv_by_operator
            .requests
            .iter()
            .map(|r| &r.path)
            .collect::<Vec<_>>()
    );
    println!("operator-identity crossings tried and refused: 2");
}

#[tokio::test]
async fn a_baopolicy_never_overwrites_or_deletes_a_role_it_does_not_own() {
    let setup = setup().await;
    let bed = setup.bed;
    let bao = bed.openbao();
    let policies = baopolicies(bed).await;
    let victim = tenant(bed, "role-victim").await;
    let victim_role = role(bed, &victim).await.expect("victim role");
    let operator_role = role(bed, "kubebao-operator").await.expect("operator role");
    let mut crossings = 0;
    let bp = |name: &str, roles: Value| {
        json!({"apiVersion": "kubebao.io/v1alpha1", "kind": "BaoPolicy", "metadata": {"name": name},
               "spec": {"rules": [{"path": "secret/data/grab/*", "capabilities": ["read"]}], "roles": roles}})
        .to_string()
    };
    let grab = |role: &str| json!([{"name": role, "boundServiceAccountNames": ["default"], "boundServiceAccountNamespaces": ["*"]}]);

    // 1. Overwriting another team's role and the operator's own role.
    for (name, target) in [
        ("grab-victim", victim.as_str()),
        ("grab-operator", "kubebao-operator"),
    ] {
        bed.apply(&bp(name, grab(target)));
        let m = refused(&policies, name, "NotOwned").await;
        assert!(
            m.contains(&format!("auth/kubernetes/role/{target}")) && m.contains("adopt: true"),
            "{m}"
        );
        assert_eq!(
            policy_text(bed, name).await,
            None,
            "{name}: nothing written, not even the policy"
        );
        crossings += 1;
    }
    // 2. A role path outside the auth mount: refused by the schema and by the operator.
    let spec_roles = json!([{"name": "x", "mount": "../../sys/policies/acl", "boundServiceAccountNames": ["a"], "boundServiceAccountNamespaces": ["b"]}]);
    let e = api_server_refuses(bed, &bp("mount-escape", spec_roles.clone()));
    assert!(
        e.contains("spec.roles[0].mount") && e.contains("should match"),
        "{e}"
    );
    store_around_the_api_server(
        bed,
        "BaoPolicy",
        "mount-escape",
        None,
        json!({"rules": [{"path": "a/*", "capabilities": ["read"]}], "roles": spec_roles}),
    )
    .await;
    let m = refused(&policies, "mount-escape", "InvalidSpec").await;
    assert!(m.starts_with("spec.roles[0].mount "), "{m}");
    assert_eq!(policy_text(bed, "mount-escape").await, None);
    crossings += 1;

    // 3. A role another BaoPolicy manages.
    bed.apply(&bp("first-owner", grab("boundary-shared")));
    ready(&policies, "first-owner").await;
    let shared = role(bed, "boundary-shared").await.unwrap();
    bed.apply(&bp("second-owner", grab("boundary-shared")));
    let m = refused(&policies, "second-owner", "Conflict").await;
    assert!(m.contains("BaoPolicy first-owner"), "{m}");
    assert_eq!(role(bed, "boundary-shared").await.unwrap(), shared);
    crossings += 1;

    // 4. A role it created but that was taken over since is never deleted: not when dropped
    //    from the spec, not when the BaoPolicy goes.
    bed.apply(&bp("leaver", grab("boundary-taken")));
    ready(&policies, "leaver").await;
    bao.root(
        Method::POST,
        "auth/kubernetes/role/boundary-taken",
        Some(json!({"bound_service_account_names": ["app"], "bound_service_account_namespaces": ["prod"], "token_policies": ["prod-app"]})),
    )
    .await;
    bed.apply(&bp("leaver", json!([])));
    wait_for("the BaoPolicy to drop the role", WAIT, || async {
        let o = policies.get("leaver").await.map_err(|e| e.to_string())?;
        match o.data["status"]["roles"].as_array() {
            Some(r) if !r.is_empty() => Err(format!("{r:?}")),
            _ => Ok(()),
        }
    })
    .await;
    policies
        .delete("leaver", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("leaver gone", WAIT, || async {
        match policies
            .get_opt("leaver")
            .await
            .map_err(|e| e.to_string())?
        {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
    let taken = role(bed, "boundary-taken")
        .await
        .expect("the taken-over role is kept");
    assert_eq!(taken["token_policies"], json!(["prod-app"]));
    crossings += 1;

    // The refused ones changed nothing in OpenBao.
    assert_eq!(role(bed, &victim).await.unwrap(), victim_role);
    assert_eq!(role(bed, "kubebao-operator").await.unwrap(), operator_role);

    // Explicit adoption works, and an adopted role is then owned (deleted with the BaoPolicy).
    let mut adopt = grab(&victim);
    adopt[0]["adopt"] = json!(true);
    bed.apply(&bp("grab-victim", adopt));
    ready(&policies, "grab-victim").await;
    assert_eq!(
        role(bed, &victim).await.unwrap()["token_policies"],
        json!(["grab-victim"])
    );
    let hcl = policy_text(bed, "grab-victim").await.unwrap();
    assert!(
        hcl.lines()
            .next()
            .unwrap()
            .ends_with(&format!(" roles=kubernetes/{victim}")),
        "{hcl}"
    );
    for name in [
        "grab-victim",
        "grab-operator",
        "first-owner",
        "second-owner",
    ] {
        policies
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    wait_for(
        "the adopted role deleted with its BaoPolicy",
        WAIT,
        || async {
            match role(bed, &victim).await {
                None => Ok(()),
                Some(r) => Err(r.to_string()),
            }
        },
    )
    .await;
    assert_eq!(role(bed, "kubebao-operator").await.unwrap(), operator_role);
    println!("role crossings tried and refused: {crossings}");
}

#[tokio::test]
async fn no_stored_value_stops_a_controller() {
    let setup = setup().await;
    let bed = setup.bed;
    let ns = tenant(bed, "overflow").await;
    let bs = baosecrets(bed, &ns).await;
    // Once a panic in the reconcile: a duration too large for any clock. The schema refuses
    // it; written around the schema, it is this object's problem alone.
    let spec = json!({"secretPath": format!("secret/data/{ns}/app"), "refreshInterval": "99999999999999999999h", "target": {"name": "overflow"}});
    let e = api_server_refuses(bed, &baosecret(&ns, "overflow", spec.clone()));
    assert!(e.contains("spec.refreshInterval"), "{e}");
    store_around_the_api_server(bed, "BaoSecret", "overflow", Some(&ns), spec).await;
    let m = refused(&bs, "overflow", "InvalidSpec").await;
    assert!(m.contains("refreshInterval"), "{m}");
    let ttl = json!({"rules": [{"path": "a/*", "capabilities": ["read"]}], "roles": [{"name": format!("{ns}-ttl"), "tokenTTL": "99999999999999999999h", "boundServiceAccountNames": ["a"], "boundServiceAccountNamespaces": ["b"]}]});
    store_around_the_api_server(bed, "BaoPolicy", &format!("{ns}-ttl"), None, ttl).await;
    let m = refused(&baopolicies(bed).await, &format!("{ns}-ttl"), "InvalidSpec").await;
    assert!(m.starts_with("spec.roles[0].tokenTTL"), "{m}");
    // The controllers go on: a new object syncs, the process runs and says it is healthy.
    bed.apply(&baosecret(
        &ns,
        "after",
        json!({"secretPath": format!("secret/data/{ns}/app"), "target": {"name": "after"}}),
    ));
    ready(&bs, "after").await;
    setup.operator.lock().await.assert_running();
    let health = reqwest::get(&setup.health).await.unwrap();
    assert!(health.status().is_success());
    assert!(secret(bed, &ns, "overflow").await.is_none());
    baopolicies(bed)
        .await
        .delete(&format!("{ns}-ttl"), &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn namespace_roles_grant_baosecrets_but_never_openbao_power() {
    let setup = setup().await;
    let bed = setup.bed;
    let ns = bed.namespace("rbac").await;
    // The chart's aggregated ClusterRoles, as installed.
    let out = std::process::Command::new(&bed.binaries().helm)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "template",
            "kubebao",
            "charts/kubebao",
            "--namespace",
            "kubebao",
            "--kube-version",
            "1.35.4",
        ])
        .args(["--show-only", "templates/rbac-user-roles.yaml"])
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bed.apply(&String::from_utf8(out.stdout).unwrap());
    bed.apply(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: alice-edit, namespace: {ns}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}}\nsubjects: [{{kind: User, name: alice, apiGroup: rbac.authorization.k8s.io}}]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: bob-view, namespace: {ns}}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}\nsubjects: [{{kind: User, name: bob, apiGroup: rbac.authorization.k8s.io}}]\n"
    ));
    // `resource` may end in `/status`: asked as the subresource.
    let can = |user: &str, verb: &str, resource: &str| {
        let (resource, sub) = resource.split_once('/').unwrap_or((resource, ""));
        let sub = format!("--subresource={sub}");
        let mut args = vec!["auth", "can-i", "--as", user, "-n", &ns, verb, resource];
        if !sub.ends_with('=') {
            args.push(&sub);
        }
        // `can-i` exits non-zero for "no": both answers are on stdout or stderr.
        bed.try_kubectl(&args, "")
            .map(|out| out.trim() == "yes")
            .unwrap_or(false)
    };
    wait_for("the roles aggregated into edit and view", WAIT, || async {
        (can("alice", "create", "baosecrets.kubebao.io")
            && can("bob", "list", "baosecrets.kubebao.io"))
        .then_some(())
        .ok_or("not yet".to_string())
    })
    .await;
    let mut crossings = 0;
    for (user, verb, resource) in [
        ("alice", "create", "baopolicies.kubebao.io"),
        ("alice", "update", "baopolicies.kubebao.io"),
        ("alice", "create", "kubebaoinstallations.kubebao.io"),
        ("alice", "update", "baosecrets.kubebao.io/status"),
        ("bob", "create", "baosecrets.kubebao.io"),
        ("bob", "delete", "baosecrets.kubebao.io"),
        ("bob", "get", "baopolicies.kubebao.io"),
        ("bob", "get", "secrets"),
    ] {
        assert!(!can(user, verb, resource), "{user} may {verb} {resource}");
        crossings += 1;
    }
    assert!(can("alice", "delete", "baosecrets.kubebao.io"));
    assert!(can("bob", "watch", "baosecrets.kubebao.io"));
    println!("RBAC crossings tried and refused: {crossings}");
}
