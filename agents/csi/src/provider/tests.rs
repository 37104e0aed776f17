//! Mounts against a fake OpenBao and a fake Kubernetes API that count every request.

use super::*;
use crate::testing::{Bao, Kube, SharedBao, SharedKube, start_bao, start_kube};
use serde_json::json;

struct Bed {
    provider: Provider,
    bao: SharedBao,
    kube: SharedKube,
}

async fn bed(bao: Bao, kube: Kube) -> Bed {
    let (bao, address) = start_bao(bao).await;
    let (kube, client) = start_kube(kube).await;
    let settings = Settings {
        openbao_addr: Some(address),
        allow_plain_http: true,
        audience: "openbao".into(),
        ..Settings::default()
    };
    let provider = Provider::with_kube(
        settings,
        vec![7; 32],
        Arc::new(Metrics::new()),
        KubeClient::with_client(client),
    );
    Bed {
        provider,
        bao,
        kube,
    }
}

/// A pod as the driver describes it: namespace `shop`, ServiceAccount `web`.
struct Pod<'a> {
    name: &'a str,
    uid: &'a str,
    service_account: &'a str,
    token: Option<&'a str>,
}

const WEB: Pod<'static> = Pod {
    name: "web-0",
    uid: "uid-1",
    service_account: "web",
    token: Some("jwt-web"),
};

fn attributes(pod: &Pod, objects: &str, extra: Value) -> String {
    let mut a = json!({
        "roleName": "app",
        "objects": objects,
        "csi.storage.k8s.io/pod.name": pod.name,
        "csi.storage.k8s.io/pod.namespace": "shop",
        "csi.storage.k8s.io/pod.uid": pod.uid,
        "csi.storage.k8s.io/serviceAccount.name": pod.service_account,
    });
    if let Some(t) = pod.token {
        a["csi.storage.k8s.io/serviceAccount.tokens"] = json!(
            json!({"openbao": {"token": t, "expirationTimestamp": "2099-01-01T00:00:00Z"}})
                .to_string()
        );
    }
    for (k, v) in extra.as_object().unwrap() {
        a[k] = v.clone();
    }
    a.to_string()
}

const ONE: &str = "- {objectName: pw, secretPath: secret/data/app, secretKey: password}";

fn sa(name: &str) -> String {
    format!("system:serviceaccount:shop:{name}")
}

/// The fakes knowing pod web-0 (uid-1) with token jwt-web, and the OpenBao role accepting it.
fn known() -> (Bao, Kube) {
    let mut bao = Bao::default();
    let mut kube = Kube::default();
    for (jwt, user, uid) in [
        ("jwt-web", "web", "uid-1"),
        ("jwt-web-2", "web", "uid-2"),
        ("jwt-other", "other", "uid-9"),
    ] {
        bao.accepted_jwts.insert(jwt.into());
        kube.tokens.insert(jwt.into(), (sa(user), uid.into()));
    }
    bao.accepted_jwts.insert("minted-uid-2".into());
    kube.pods.insert(
        "uid-2".into(),
        ("shop".into(), "web-1".into(), "web".into()),
    );
    (bao, kube)
}

fn file(outcome: &MountOutcome, path: &str) -> Vec<u8> {
    outcome
        .response
        .files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| panic!("no file {path}"))
        .contents
        .clone()
}

#[tokio::test]
async fn a_cached_token_is_served_only_to_a_request_that_proves_the_identity() {
    let (bao, kube) = known();
    let b = bed(bao, kube).await;
    let first = b
        .provider
        .mount(&attributes(&WEB, ONE, json!({})), "420")
        .await;
    assert_eq!(first.unwrap().logins, 1);

    // The same claimed pod, namespace and ServiceAccount, without its token.
    let impostors = [
        (Some("forged"), "bad_token", "does not accept it"),
        (
            Some("jwt-other"),
            "bad_token",
            "system:serviceaccount:shop:other",
        ),
        (Some("jwt-web-2"), "bad_token", "bound to another pod"),
        (None, "no_token", "TokenRequest bound to pod"),
    ];
    for (token, code, why) in impostors {
        let pod = Pod { token, ..WEB };
        let err = b
            .provider
            .mount(&attributes(&pod, ONE, json!({})), "420")
            .await
            .err()
            .unwrap_or_else(|| panic!("{token:?} got the cached token"));
        assert_eq!(err.code(), code, "{token:?}: {err}");
        assert!(err.to_string().contains(why), "{token:?}: {err}");
        assert!(
            !err.to_string().contains("forged"),
            "the token leaked: {err}"
        );
    }
    {
        let bao = b.bao.lock().unwrap();
        assert_eq!((bao.logins, bao.reads), (1, 1), "impostors reached OpenBao");
    }

    // Another pod of the ServiceAccount proves itself (its own token, or the agent's
    // TokenRequest bound to it) and shares the identity's token: still one login.
    let second = Pod {
        name: "web-1",
        uid: "uid-2",
        token: Some("jwt-web-2"),
        ..WEB
    };
    let no_token = Pod {
        token: None,
        ..second
    };
    for pod in [&second, &no_token, &WEB] {
        let out = b
            .provider
            .mount(&attributes(pod, ONE, json!({})), "420")
            .await;
        assert_eq!(out.unwrap().logins, 0, "{}", pod.uid);
    }
    let reviews = b.kube.lock().unwrap().reviews;
    assert_eq!(
        reviews, 5,
        "one review per distinct token; a proven one is remembered"
    );
    b.provider
        .mount(&attributes(&WEB, ONE, json!({})), "420")
        .await
        .unwrap();
    assert_eq!(b.kube.lock().unwrap().reviews, reviews);
    assert_eq!(b.bao.lock().unwrap().logins, 1);
}

#[tokio::test]
async fn reads_of_one_mount_run_at_most_eight_at_a_time() {
    let (mut bao, kube) = known();
    bao.read_delay = Duration::from_millis(100);
    let b = bed(bao, kube).await;
    let objects: String = (0..30)
        .map(|i| {
            format!("- {{objectName: o{i}, secretPath: secret/data/s{i}, secretKey: password}}\n")
        })
        .collect();
    let out = b
        .provider
        .mount(&attributes(&WEB, &objects, json!({})), "420")
        .await
        .unwrap();
    assert_eq!(file(&out, "o29"), b"pw-secret/data/s29");
    let bao = b.bao.lock().unwrap();
    assert_eq!(bao.reads, 30);
    // Neither one by one (1) nor all at once (30).
    assert_eq!(bao.max_in_flight, MAX_READS_IN_FLIGHT as u32);
}

#[tokio::test]
async fn refused_parameters_reach_neither_openbao_nor_kubernetes() {
    let (bao, kube) = known();
    let b = bed(bao, kube).await;
    let long = "x".repeat(256);
    let names = [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "..data",
        "a/./b",
        "a//b",
        "a/",
        &long,
    ];
    let mut cases: Vec<(String, Value)> = names
        .iter()
        .map(|n| {
            let objects = format!("- {{objectName: {n:?}, secretPath: secret/data/app}}");
            (objects, json!({}))
        })
        .collect();
    let conflicts = [
        json!({"openbaoAddress": "https://a:8200", "vaultAddress": "https://b:8200"}),
        json!({"openbaoAuthMountPath": "a", "vaultKubernetesMountPath": "b"}),
        json!({"openbaoNamespace": "a", "vaultNamespace": "b"}),
    ];
    cases.extend(conflicts.into_iter().map(|c| (ONE.to_string(), c)));
    cases.push((
        "- {objectName: a, secretPath: secret/data/app, secretKey: password}\n- {objectName: a, secretPath: secret/data/b, secretKey: password}".into(),
        json!({}),
    ));
    cases.push((
        "- {objectName: d, secretPath: secret/data/app, secretKey: \"*\"}\n- {objectName: d/password, secretPath: secret/data/b, secretKey: password}".into(),
        json!({}),
    ));
    cases.push((
        "- {objectName: a, secretPath: secret/data/app, encoding: base64}".into(),
        json!({}),
    ));
    for (objects, extra) in &cases {
        let err = b
            .provider
            .mount(&attributes(&WEB, objects, extra.clone()), "420")
            .await
            .err()
            .unwrap_or_else(|| panic!("accepted: {objects} {extra}"));
        assert_eq!(err.code(), "bad_parameter", "{objects} {extra}: {err}");
    }
    assert_eq!(b.bao.lock().unwrap().requests, Vec::<String>::new());
    let kube = b.kube.lock().unwrap();
    assert_eq!((kube.reviews, kube.token_requests), (0, 0));
}

const DB: &str = "- {objectName: db/username, secretPath: database/creds/app, secretKey: username}";

async fn db_user(b: &Bed) -> Vec<u8> {
    let out = b
        .provider
        .mount(&attributes(&WEB, DB, json!({})), "420")
        .await
        .unwrap();
    file(&out, "db/username")
}

#[tokio::test]
async fn leases_are_renewed_in_the_background_and_kept() {
    let (mut bao, kube) = known();
    bao.lease_seconds = 6;
    let b = bed(bao, kube).await;
    let first = db_user(&b).await;
    // No Mount for longer than the lease: only the background renewals (due every 4 s) keep
    // it. The second one comes after the 6 s lease would have ended without them.
    let started = std::time::Instant::now();
    while b.bao.lock().unwrap().renewals < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no second background renewal within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() > Duration::from_secs(6),
        "renewed before the lease ended"
    );
    assert_eq!(db_user(&b).await, first, "the renewed lease is served");
    let bao = b.bao.lock().unwrap();
    assert_eq!(bao.reads, 1);
    assert_eq!(
        bao.lookups, 1,
        "served only after OpenBao confirmed the lease lives"
    );
}

#[tokio::test]
async fn a_lease_whose_renewal_fails_is_dropped_and_never_served_again() {
    let (mut bao, kube) = known();
    bao.lease_seconds = 3;
    bao.refuse_renewals = true;
    let b = bed(bao, kube).await;
    let first = db_user(&b).await;
    assert_eq!(b.provider.leases.len(), 1);
    // Due at 2 s; no Mount meanwhile.
    let start = std::time::Instant::now();
    while !b.provider.leases.is_empty() && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        b.provider.leases.is_empty(),
        "dropped when the renewal failed"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "dropped before its renewal"
    );
    assert_eq!(
        b.bao.lock().unwrap().renewals,
        1,
        "renewed in the background"
    );
    assert_ne!(db_user(&b).await, first, "fresh credentials");
    assert_eq!(b.bao.lock().unwrap().reads, 2);
}

#[tokio::test]
async fn a_revoked_lease_is_never_served_again() {
    let (mut bao, kube) = known();
    bao.lease_seconds = 3600;
    let b = bed(bao, kube).await;
    let first = db_user(&b).await;
    assert_eq!(db_user(&b).await, first, "kept while it lives");
    b.bao.lock().unwrap().leases.clear(); // revoked in OpenBao
    let after = db_user(&b).await;
    assert_ne!(after, first, "a revoked lease is not served");
    assert_eq!(db_user(&b).await, after, "the fresh lease is kept");
    assert_eq!(b.bao.lock().unwrap().reads, 2);
}

#[tokio::test]
async fn clients_for_addresses_sent_by_secret_provider_classes_are_bounded() {
    let (bao, kube) = known();
    let b = bed(bao, kube).await;
    for port in 10_000..10_100 {
        b.provider
            .client(&format!("http://127.0.0.1:{port}"), None, None)
            .unwrap();
    }
    assert_eq!(b.provider.clients.len(), MAX_CLIENTS);

    // Mounts naming ever new (unreachable) OpenBao addresses: the token cache entries made
    // with evicted clients go with them.
    for port in 20_000..20_100 {
        let address = format!("http://127.0.0.1:{port}");
        let attrs = attributes(&WEB, ONE, json!({ "openbaoAddress": address }));
        let err = b.provider.mount(&attrs, "420").await.err().unwrap();
        assert_eq!(err.code(), "openbao_unavailable", "{err}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        b.provider.identities.len() <= MAX_CLIENTS,
        "{} identities held",
        b.provider.identities.len()
    );
}

#[tokio::test]
async fn plain_http_needs_the_agents_flag() {
    let (bao, kube) = known();
    let mut b = bed(bao, kube).await;
    b.provider.settings.allow_plain_http = false;
    let err = b
        .provider
        .mount(
            &attributes(&WEB, ONE, json!({"openbaoAddress": "http://127.0.0.1:1"})),
            "420",
        )
        .await
        .err()
        .expect("plain http without the flag");
    assert!(
        err.to_string().contains("--openbao-allow-plain-http"),
        "{err}"
    );
    // A SecretProviderClass parameter cannot turn it on.
    let err = b
        .provider
        .mount(
            &attributes(
                &WEB,
                ONE,
                json!({"openbaoAddress": "http://127.0.0.1:1", "openbaoAllowPlainHttp": "true",
                       "allowPlainHttp": "true", "openbao-allow-plain-http": "true"}),
            ),
            "420",
        )
        .await
        .err()
        .expect("plain http from parameters");
    assert!(
        err.to_string().contains("--openbao-allow-plain-http"),
        "{err}"
    );
}
