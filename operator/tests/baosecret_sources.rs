//! BaoSecrets with several sources, templates and their own OpenBao namespace: the real
//! `kubebao-operator` binary (one process, no leader election) against the test bed's
//! kube-apiserver and OpenBao (which has namespaces: `sys/namespaces/<name>`).
//!
//! Each test uses a namespace of its own: a tenant whose OpenBao role (named after the
//! namespace, bound to its `default` ServiceAccount) may read `secret/data/<ns>/*` and its
//! metadata.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kubebao_openbao::{ClientConfig, OpenBao};
use kubebao_testbed::conditions::wait_condition;
use kubebao_testbed::{Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

const WAIT: Duration = Duration::from_secs(60);
/// The operator's own OpenBao policy: policies and roles only, no secrets engine at all.
const OPERATOR_POLICY: &str = r#"
path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "auth/kubernetes/role/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;
/// A value no status, condition or event may ever show.
const PASSWORD: &str = "pa55 w0rd:SECRET";

struct Setup {
    bed: &'static Testbed,
    _operator: Component,
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
            let token_file = bed.dir().join("sources-operator-token");
            std::fs::write(&token_file, token).unwrap();
            bed.install_crds();
            let _ = bed.try_kubectl(&["create", "namespace", "kubebao-system"], "");
            let operator = start_operator(bed, &token_file).await;
            Setup {
                bed,
                _operator: operator,
            }
        })
        .await
}

/// The operator, ready.
async fn start_operator(bed: &Testbed, token_file: &std::path::Path) -> Component {
    let port = free_port();
    let args: Vec<String> = [
        "--openbao-addr",
        bed.openbao().addr(),
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
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let kubeconfig = bed
        .operator_kubeconfig("kubebao-system")
        .display()
        .to_string();
    let mut operator = Component::start_with_env(
        "kubebao-operator-sources",
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
    operator
}

async fn baosecrets(bed: &Testbed, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kubebao.io", "v1alpha1", "BaoSecret");
    Api::namespaced_with(bed.client().await, ns, &ApiResource::from_gvk(&gvk))
}

fn apply_baosecret(bed: &Testbed, ns: &str, name: &str, spec: Value) {
    bed.apply(
        &json!({"apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret",
                "metadata": {"name": name, "namespace": ns}, "spec": spec})
        .to_string(),
    );
}

async fn secret(bed: &Testbed, ns: &str, name: &str) -> Option<Secret> {
    let api: Api<Secret> = Api::namespaced(bed.client().await, ns);
    api.get_opt(name).await.expect("read Secret")
}

/// The Secret's data as text, by key.
fn text(secret: &Secret) -> Vec<(String, String)> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect()
}

/// Writes KV v2 data at `secret/data/<path>` in the root namespace.
async fn write_kv(bed: &Testbed, path: &str, data: Value) {
    bed.openbao()
        .root(
            Method::POST,
            &format!("secret/data/{path}"),
            Some(json!({ "data": data })),
        )
        .await;
}

/// A namespace whose `default` ServiceAccount may read `secret/*/<ns>/*` as role `<ns>`.
async fn tenant(bed: &Testbed, prefix: &str) -> String {
    let ns = bed.namespace(prefix).await;
    let bao = bed.openbao();
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

/// Two KV sources `db` and `cache` for tenant `ns`.
async fn two_sources(bed: &Testbed, ns: &str, cache: Value) -> Value {
    write_kv(
        bed,
        &format!("{ns}/db"),
        json!({"user": "app", "password": PASSWORD, "host": "db.local"}),
    )
    .await;
    write_kv(bed, &format!("{ns}/cache"), cache).await;
    json!([
        {"name": "db", "secretPath": format!("secret/data/{ns}/db")},
        {"name": "cache", "secretPath": format!("secret/data/{ns}/cache")}
    ])
}

#[tokio::test]
async fn two_sources_and_a_template_build_one_secret_that_follows_changes() {
    let bed = setup().await.bed;
    let ns = tenant(bed, "dsn").await;
    let sources = two_sources(bed, &ns, json!({"url": "redis://cache:6379"})).await;
    let dsn = "postgres://{{ db.user }}:{{ db.password | urlencode }}@{{ db.host }}/app";
    apply_baosecret(
        bed,
        &ns,
        "app",
        json!({"sources": sources, "refreshInterval": "2s", "target": {"name": "app"},
               "template": {"data": {"dsn": dsn, "redis": "{{ cache.url }}"}}}),
    );
    let bs = baosecrets(bed, &ns).await;
    let message = wait_condition(&bs, "app", "Ready", "True", "Synced").await;
    assert!(message.contains("2 sources"), "{message}");
    let written = secret(bed, &ns, "app").await.expect("the Secret");
    assert_eq!(
        text(&written),
        [
            (
                "dsn".to_string(),
                "postgres://app:pa55%20w0rd%3ASECRET@db.local/app".to_string()
            ),
            ("redis".to_string(), "redis://cache:6379".to_string()),
        ]
    );
    // What was read, never a value.
    let status = bs.get("app").await.unwrap().data["status"].clone();
    assert_eq!(
        status["sources"],
        json!([
            {"name": "db", "path": format!("secret/data/{ns}/db"), "version": 1},
            {"name": "cache", "path": format!("secret/data/{ns}/cache"), "version": 1}
        ])
    );
    let next = status["nextRefreshTime"].as_str().expect("nextRefreshTime");
    next.parse::<k8s_openapi::jiff::Timestamp>()
        .expect("nextRefreshTime is RFC 3339");
    assert!(status.get("kvVersion").is_none(), "{status}");
    assert!(!status.to_string().contains("SECRET"), "{status}");

    // One source changes: the next refresh rewrites the Secret.
    write_kv(
        bed,
        &format!("{ns}/db"),
        json!({"user": "app", "password": "rotated", "host": "db.local"}),
    )
    .await;
    wait_for("the rotated password in the Secret", WAIT, || async {
        let s = secret(bed, &ns, "app").await.ok_or("no Secret")?;
        let dsn = text(&s).into_iter().find(|(k, _)| k == "dsn");
        match dsn {
            Some((_, v)) if v == "postgres://app:rotated@db.local/app" => Ok(()),
            other => Err(format!("dsn now {other:?}")),
        }
    })
    .await;
    wait_for("status.sources to show db version 2", WAIT, || async {
        let status = bs.get("app").await.map_err(|e| e.to_string())?.data["status"].clone();
        match status["sources"][0]["version"].as_u64() {
            Some(2) => Ok(()),
            other => Err(format!("db version {other:?}")),
        }
    })
    .await;
    assert_eq!(text(&secret(bed, &ns, "app").await.unwrap()).len(), 2);

    // Unchanged sources cost one metadata read each per refresh, and no data read.
    let bao = bed.openbao();
    let (db_meta, db_data) = (
        format!("secret/metadata/{ns}/db"),
        format!("secret/data/{ns}/db"),
    );
    let mark = bao.audit().len();
    let window = wait_for("two more refreshes", WAIT, || async {
        let window = bao.audit().since(mark);
        match window.count(&db_meta, "read") {
            n if n >= 2 => Ok(window),
            n => Err(format!("{n} reads of {db_meta}")),
        }
    })
    .await;
    assert_eq!(window.count(&db_data, "read"), 0, "no data read");
    assert_eq!(
        window.count(&format!("secret/data/{ns}/cache"), "read"),
        0,
        "no data read"
    );
}

#[tokio::test]
async fn a_template_error_names_the_key_and_line_and_writes_nothing() {
    let bed = setup().await.bed;
    let ns = tenant(bed, "tmplerr").await;
    let sources = two_sources(bed, &ns, json!({"url": "redis://cache:6379"})).await;
    let template = "user={{ db.user }}\npass={{ db.pasword }}\n";
    apply_baosecret(
        bed,
        &ns,
        "broken",
        json!({"sources": sources, "target": {"name": "broken"},
               "template": {"data": {"config": template, "plain": "{{ db.password }}"}}}),
    );
    let bs = baosecrets(bed, &ns).await;
    let message = wait_condition(&bs, "broken", "Stalled", "True", "TemplateError").await;
    assert!(
        message.starts_with("spec.template.data[\"config\"] line 2: undefined value"),
        "{message}"
    );
    assert!(message.contains("db.pasword is not defined"), "{message}");
    assert!(!message.contains("SECRET"), "{message}");
    let status = bs.get("broken").await.unwrap().data["status"].clone();
    assert!(!status.to_string().contains("SECRET"), "{status}");
    assert!(
        secret(bed, &ns, "broken").await.is_none(),
        "nothing written"
    );
    // The Warning event says the same, and no value either.
    let events = bed.kubectl(&["-n", &ns, "get", "events", "-o", "json"]);
    assert!(events.contains("TemplateError"), "{events}");
    assert!(!events.contains("SECRET"), "{events}");
}

#[tokio::test]
async fn a_key_in_two_sources_without_a_template_is_a_conflict() {
    let bed = setup().await.bed;
    let ns = tenant(bed, "conflict").await;
    let sources = two_sources(bed, &ns, json!({"password": "other-SECRET"})).await;
    apply_baosecret(
        bed,
        &ns,
        "merged",
        json!({"sources": sources, "target": {"name": "merged"}}),
    );
    let bs = baosecrets(bed, &ns).await;
    let message = wait_condition(&bs, "merged", "Stalled", "True", "KeyConflict").await;
    assert!(
        message.contains("key \"password\" is in sources \"db\" and \"cache\""),
        "{message}"
    );
    assert!(
        message.contains("spec.keys") && message.contains("spec.template"),
        "{message}"
    );
    assert!(!message.contains("SECRET"), "{message}");
    assert!(
        secret(bed, &ns, "merged").await.is_none(),
        "nothing written"
    );
}

/// A client for OpenBao namespace `namespace` (set-up as root).
fn in_namespace(bed: &Testbed, namespace: &str) -> OpenBao {
    OpenBao::new(&ClientConfig {
        address: bed.openbao().addr().to_string(),
        namespace: Some(namespace.to_string()),
        allow_plain_http: true,
        ..Default::default()
    })
    .expect("OpenBao client")
}

/// OpenBao namespace `name` with its own Kubernetes auth (at `kubernetes`) and KV v2 (at
/// `secret`), holding `secret/data/app`; role `reader` there may read it, bound to the
/// `default` ServiceAccount of Kubernetes namespace `reader_ns` only.
async fn openbao_namespace(bed: &Testbed, name: &str, reader_ns: &str) {
    let bao = bed.openbao();
    let root = bao.root_token();
    bao.root(
        Method::POST,
        &format!("sys/namespaces/{name}"),
        Some(json!({})),
    )
    .await;
    let inside = in_namespace(bed, name);
    let call = |path: &'static str, body: Value| {
        let inside = inside.clone();
        async move {
            inside
                .request(Method::POST, path, Some(root), Some(&body))
                .await
                .unwrap_or_else(|e| panic!("OpenBao namespace {path}: {e}"))
        }
    };
    call("sys/auth/kubernetes", json!({"type": "kubernetes"})).await;
    let reviewer = bed
        .service_account_token(
            "kube-system",
            "openbao-token-reviewer",
            "https://kubernetes.default.svc",
            86400,
        )
        .await;
    call(
        "auth/kubernetes/config",
        json!({"kubernetes_host": bed.apiserver_url(), "kubernetes_ca_cert": bed.pki().ca_pem(),
               "token_reviewer_jwt": reviewer, "disable_local_ca_jwt": true}),
    )
    .await;
    call(
        "sys/mounts/secret",
        json!({"type": "kv", "options": {"version": "2"}}),
    )
    .await;
    wait_for("the namespace's KV v2 mount", WAIT, || async {
        inside
            .read("secret/config", root)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    call(
        "secret/data/app",
        json!({"data": {"password": "only-in-team-a"}}),
    )
    .await;
    call(
        "sys/policies/acl/reader",
        json!({"policy": "path \"secret/data/app\" { capabilities = [\"read\"] }\npath \"secret/metadata/app\" { capabilities = [\"read\"] }\n"}),
    )
    .await;
    let role = json!({"bound_service_account_names": ["default"],
                      "bound_service_account_namespaces": [reader_ns], "token_policies": ["reader"]});
    call("auth/kubernetes/role/reader", role).await;
}

#[tokio::test]
async fn a_baosecret_reads_and_logs_in_inside_its_openbao_namespace() {
    let bed = setup().await.bed;
    let ns = tenant(bed, "team-a").await;
    let other = tenant(bed, "intruder").await;
    openbao_namespace(bed, "team-a", &ns).await;
    // The path and the role exist only inside OpenBao namespace team-a.
    let spec = json!({"secretPath": "secret/data/app", "openbaoNamespace": "team-a",
                      "role": "reader", "target": {"name": "app"}});
    apply_baosecret(bed, &ns, "app", spec.clone());
    let bs = baosecrets(bed, &ns).await;
    wait_condition(&bs, "app", "Ready", "True", "Synced").await;
    let written = secret(bed, &ns, "app").await.expect("the Secret");
    assert_eq!(
        text(&written),
        [("password".to_string(), "only-in-team-a".to_string())]
    );
    // Another Kubernetes namespace naming the same OpenBao namespace and role: the role is
    // not bound to it, so the login is refused there and nothing is written.
    apply_baosecret(bed, &other, "app", spec);
    let theirs = baosecrets(bed, &other).await;
    let message = wait_condition(&theirs, "app", "Stalled", "True", "LoginDenied").await;
    assert!(
        message.contains("role \"reader\"")
            && message.contains(&format!("{other}/default"))
            && message.contains("OpenBao namespace \"team-a\""),
        "{message}"
    );
    assert!(
        message.contains("bound to this ServiceAccount and namespace"),
        "{message}"
    );
    assert!(
        secret(bed, &other, "app").await.is_none(),
        "nothing written"
    );
}

#[tokio::test]
async fn the_api_server_refuses_sources_and_templates_it_cannot_sync() {
    let bed = setup().await.bed;
    let cases = [
        ("{target: {name: x}}", "spec.secretPath: Required value"),
        (
            "{secretPath: secret/data/a, sources: [{name: a, secretPath: secret/data/a}], target: {name: x}}",
            "must validate one and only one schema (oneOf)",
        ),
        (
            "{secretPath: secret/data/a, keys: [{from: a}], template: {data: {a: b}}, target: {name: x}}",
            "set keys or template, not both",
        ),
        (
            "{sources: [{name: a, secretPath: secret/data/a}], kvVersion: 2, target: {name: x}}",
            "with sources, set kvVersion in each source",
        ),
        (
            "{sources: [{name: a}], target: {name: x}}",
            "spec.sources[0]: Invalid value: a source needs secretPath",
        ),
        (
            "{sources: [{name: a, secretPath: secret/data/a}, {name: a, secretPath: secret/data/b}], target: {name: x}}",
            "two sources have the same name",
        ),
        (
            "{sources: [{name: Db, secretPath: secret/data/a}], target: {name: x}}",
            "spec.sources[0].name",
        ),
        (
            "{secretPath: secret/data/a, template: {data: {'../x': b}}, target: {name: x}}",
            "a template key must be a valid Secret key",
        ),
        (
            "{secretPath: secret/data/a, openbaoNamespace: 'team-a/../root', target: {name: x}}",
            "spec.openbaoNamespace",
        ),
    ];
    for (spec, expected) in cases {
        let yaml = format!(
            "apiVersion: kubebao.io/v1alpha1\nkind: BaoSecret\nmetadata: {{name: refused, namespace: default}}\nspec: {spec}\n"
        );
        let e = bed
            .try_kubectl(&["apply", "--dry-run=server", "-f", "-"], &yaml)
            .expect_err(spec);
        assert!(e.contains(expected), "{spec}: {e}");
    }
    // The example (keys such as `config.json` and `DATABASE_URL`) is accepted as written.
    let example = include_str!("../../examples/baosecret-template.yaml");
    bed.try_kubectl(&["apply", "--dry-run=server", "-f", "-"], example)
        .expect("examples/baosecret-template.yaml is accepted");
}
