//! The OpenBao step of a reconcile: connect with the installation's auth (or the operator's own
//! identity), prepare OpenBao for the KMS plugin (Transit key, rotation on request, policy,
//! AppRole) and keep the plugin's AppRole credentials Secret current. The idempotent OpenBao
//! calls themselves are in `prepare`; this module turns them into status and conditions.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kubebao_openbao::tokens::{TokenCache, TokenError};
use kubebao_openbao::{ClientConfig, Credentials, OpenBao, SecretString};

use crate::installation::controller::Ctx;
use crate::installation::prepare::{self, PrepareError};
use crate::installation::render::Context as RenderContext;
use crate::installation::render::installer_daemonset as installer;
use crate::installation::rollout::apply;
use crate::installation::rotation;
use crate::installation::types::{
    KubeBaoInstallation, KubeBaoInstallationSpec, KubeBaoInstallationStatus, SecretKeyRef,
};
use crate::installation::unix;
use crate::installation::verdict::Verdict;

/// Who an installation logs in to OpenBao as with `openbao.auth.kubernetes`: one cached token
/// per identity (a changed spec is a new identity, never the old token).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Login {
    address: String,
    namespace: Option<String>,
    mount: String,
    role: String,
    jwt_file: String,
}

impl Login {
    /// Kubernetes-auth credentials with the operator's ServiceAccount token, read now.
    async fn credentials(&self) -> Result<Credentials, String> {
        let jwt = tokio::fs::read_to_string(&self.jwt_file)
            .await
            .map_err(|e| {
                format!(
                    "cannot read the operator's ServiceAccount token {}: {e}",
                    self.jwt_file
                )
            })?;
        Ok(Credentials::Kubernetes {
            mount: self.mount.clone(),
            role: self.role.clone(),
            jwt: SecretString::new(jwt.trim()),
        })
    }
}

/// The installations' OpenBao tokens (renewal, re-login and revocation follow the shared rules
/// in `kubebao_openbao::tokens`).
pub type Logins = TokenCache<Login>;

/// An OpenBao client and the token to call it with.
pub struct Connection {
    /// Client for the installation's OpenBao.
    pub bao: OpenBao,
    /// Token to call it with.
    pub token: SecretString,
    /// The cached login the token came from, if any.
    login: Option<Login>,
}

impl Connection {
    /// After OpenBao refused this connection's token: a dead token is dropped (the next
    /// reconcile logs in afresh); a live one means the role's policy is too small.
    pub async fn denied(&self, ctx: &Ctx) {
        if let Some(login) = &self.login {
            let _ = ctx
                .logins
                .denied(login, &self.bao, &self.token, || login.credentials())
                .await;
        }
    }

    /// Forgets the cached login (the installation is gone) and revokes its token.
    pub async fn forget(self, ctx: &Ctx) {
        if let Some(login) = &self.login {
            ctx.logins.forget(login).await;
        }
    }
}

/// A connection to a prepared OpenBao.
pub struct Session {
    /// Client for the installation's OpenBao.
    pub bao: OpenBao,
    /// Token to call it with.
    pub token: SecretString,
    /// The KMS plugin's AppRole role_id.
    pub role_id: String,
}

/// How the OpenBao step ended.
pub enum Prepared {
    /// The KMS plugin is disabled: OpenBao needs nothing.
    NotNeeded,
    /// OpenBao is prepared.
    Ready(Session),
    /// Connecting or preparing failed (the verdict says why).
    Failed,
}

/// The OpenBao step: connects, prepares OpenBao, and records the outcome as `OpenBaoReady`
/// (and Stalled when only a change can fix it).
pub async fn prepare(
    ctx: &Ctx,
    obj: &KubeBaoInstallation,
    ca: &Option<String>,
    v: &mut Verdict,
    status: &mut KubeBaoInstallationStatus,
) -> Prepared {
    let spec = &obj.spec;
    if !spec.kms.enabled {
        v.part(
            "OpenBaoReady",
            true,
            "NotNeeded",
            "the KMS plugin is disabled; OpenBao needs no preparation",
        );
        return Prepared::NotNeeded;
    }
    let conn = match connect(ctx, spec, ca).await {
        Ok(conn) => conn,
        Err((transient, e)) => {
            let reason = if transient {
                "OpenBaoUnavailable"
            } else {
                "AuthFailed"
            };
            v.part("OpenBaoReady", false, reason, e.clone());
            if !transient {
                v.stall("AuthFailed", e);
            }
            return Prepared::Failed;
        }
    };
    match prepare_openbao(ctx, obj, &conn.bao, &conn.token, status).await {
        Ok(role_id) => {
            let message = format!(
                "Transit key {}/{} version {}, policy and AppRole in place",
                spec.kms.transit_mount,
                spec.kms.key_name,
                status.key_version.unwrap_or(0)
            );
            v.part("OpenBaoReady", true, "Prepared", message);
            Prepared::Ready(Session {
                bao: conn.bao,
                token: conn.token,
                role_id,
            })
        }
        Err(e) => {
            if matches!(&e, PrepareError::OpenBao(e) if e.is_permission_denied()) {
                conn.denied(ctx).await;
            }
            let transient = e.is_transient();
            let reason = if transient {
                "OpenBaoUnavailable"
            } else {
                "PrepareFailed"
            };
            v.part("OpenBaoReady", false, reason, e.to_string());
            if !transient {
                v.stall("PrepareFailed", e.to_string());
            }
            Prepared::Failed
        }
    }
}

/// Prepares OpenBao and handles rotation requests; fills key version, key_id and rotation
/// times in `status`. Returns the plugin's role_id.
async fn prepare_openbao(
    ctx: &Ctx,
    obj: &KubeBaoInstallation,
    bao: &OpenBao,
    token: &SecretString,
    status: &mut KubeBaoInstallationStatus,
) -> Result<String, PrepareError> {
    let kms = &obj.spec.kms;
    prepare::validate(kms)?;
    let key = prepare::ensure_transit_key(bao, token, kms).await?;
    let api: Api<KubeBaoInstallation> = Api::all(ctx.client.clone());
    let key =
        rotation::rotate_on_request(&ctx.rotations, &api, obj, (bao, token), key, status).await?;
    rotation::record_key(
        &ctx.rotations,
        &obj.name_any(),
        &kms.transit_mount,
        &key,
        status,
    );
    let policy = prepare::ensure_policy(bao, token, kms).await?;
    prepare::ensure_approle(bao, token, kms, &policy).await
}

/// A Secret reference outside the operator's namespace stalls the installation (only a spec
/// change fixes it); such a Secret is never read (see [`secret_key`]).
pub fn refuse_foreign_secrets(spec: &KubeBaoInstallationSpec, operator_ns: &str, v: &mut Verdict) {
    if let Err(e) = check_secret_refs(spec, operator_ns) {
        v.stall("CrossNamespaceSecret", e);
    }
}

/// Every Secret an installation names must be in the operator's own namespace: the
/// installation is cluster-scoped, and reading elsewhere would let whoever writes it have the
/// operator read (and send to the OpenBao address it names) another namespace's Secrets.
fn check_secret_refs(spec: &KubeBaoInstallationSpec, operator_ns: &str) -> Result<(), String> {
    let auth = spec.openbao.auth.as_ref();
    let refs = [
        ("openbao.caSecretRef", spec.openbao.ca_secret_ref.as_ref()),
        (
            "openbao.auth.tokenSecretRef",
            auth.and_then(|a| a.token_secret_ref.as_ref()),
        ),
    ];
    for (field, r) in refs {
        if let Some(r) = r {
            secret_namespace(field, r, operator_ns)?;
        }
    }
    Ok(())
}

/// The namespace `r` reads from: the operator's own; naming any other is refused.
fn secret_namespace<'a>(
    field: &str,
    r: &'a SecretKeyRef,
    operator_ns: &'a str,
) -> Result<&'a str, String> {
    match r.namespace.as_deref() {
        None => Ok(operator_ns),
        Some(ns) if ns == operator_ns => Ok(ns),
        Some(ns) => Err(format!(
            "{field} names Secret {ns}/{}, outside the operator's namespace {operator_ns:?}; an \
             installation reads Secrets only from there: move the Secret to {operator_ns:?} and \
             drop the namespace",
            r.name
        )),
    }
}

/// One key of a Secret in the operator's namespace, as text.
async fn secret_key(ctx: &Ctx, field: &str, r: &SecretKeyRef) -> Result<String, String> {
    let ns = secret_namespace(field, r, &ctx.operator.namespace)?;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let s = api
        .get_opt(&r.name)
        .await
        .map_err(|e| format!("cannot read Secret {ns}/{}: {e}", r.name))?
        .ok_or_else(|| format!("Secret {ns}/{} does not exist", r.name))?;
    let v = s
        .data
        .and_then(|d| d.get(&r.key).cloned())
        .ok_or_else(|| format!("Secret {ns}/{} has no key {:?}", r.name, r.key))?;
    String::from_utf8(v.0)
        .map_err(|_| format!("Secret {ns}/{} key {:?} is not UTF-8", r.name, r.key))
}

/// Resolves the CA bundle from `caBundle` or `caSecretRef`.
pub async fn ca_pem(ctx: &Ctx, spec: &KubeBaoInstallationSpec) -> Result<Option<String>, String> {
    if let Some(ca) = &spec.openbao.ca_bundle {
        return Ok(Some(ca.clone()));
    }
    match &spec.openbao.ca_secret_ref {
        Some(r) => secret_key(ctx, "openbao.caSecretRef", r).await.map(Some),
        None => Ok(None),
    }
}

/// The OpenBao client and token to prepare OpenBao with. On failure: whether retrying may
/// help, and what is wrong.
pub async fn connect(
    ctx: &Ctx,
    spec: &KubeBaoInstallationSpec,
    ca: &Option<String>,
) -> Result<Connection, (bool, String)> {
    let Some(auth) = &spec.openbao.auth else {
        let f = ctx.fallback.as_ref().ok_or((
            false,
            "openbao.auth is not set and the operator has no OpenBao identity of its own; set openbao.auth".to_string(),
        ))?;
        let token = (f.token)()
            .await
            .map_err(|e| (true, format!("the operator's OpenBao identity: {e}")))?;
        return Ok(Connection {
            bao: f.bao.clone(),
            token,
            login: None,
        });
    };
    let bao = OpenBao::new(&ClientConfig {
        address: spec.openbao.address.clone(),
        ca_pem: ca.as_ref().map(|c| c.as_bytes().to_vec()),
        namespace: spec.openbao.namespace.clone(),
        timeout: None,
        allow_plain_http: spec.openbao.allow_plain_http,
    })
    .map_err(|e| (false, format!("openbao: {e}")))?
    .with_jwt_audience(&ctx.operator.jwt_audience);
    if let Some(r) = &auth.token_secret_ref {
        let token = secret_key(ctx, "openbao.auth.tokenSecretRef", r)
            .await
            .map_err(|e| (false, e))?;
        return Ok(Connection {
            bao,
            token: SecretString::new(token.trim()),
            login: None,
        });
    }
    let k = auth.kubernetes.clone().unwrap_or_default();
    let login = Login {
        address: spec.openbao.address.clone(),
        namespace: spec.openbao.namespace.clone(),
        mount: k.mount,
        role: k.role,
        jwt_file: k.token_path,
    };
    let token = ctx
        .logins
        .token(&login, &bao, || login.credentials())
        .await
        .map_err(|e| match e {
            TokenError::Credentials(e) => (false, e),
            TokenError::Login(e) => (
                e.is_unavailable(),
                format!(
                    "OpenBao login as role {:?} at auth/{}: {e}",
                    login.role, login.mount
                ),
            ),
        })?;
    Ok(Connection {
        bao,
        token: token.secret,
        login: Some(login),
    })
}

/// When the secret_id in the credentials Secret expires (RFC 3339).
const EXPIRES_ANNOTATION: &str = "kubebao.io/secret-id-expires";

/// The expiry of the credentials in `current` when they can stay: same role_id, a secret_id,
/// and more than a third of its life left. `None` means issue a new secret_id.
fn kept_expiry(current: Option<&Secret>, role_id: &str, now_unix: i64, ttl: u64) -> Option<String> {
    let s = current?;
    let data = s.data.as_ref()?;
    let same_role = data.get("role-id").map(|v| v.0.as_slice()) == Some(role_id.as_bytes());
    let has_secret = data.get("secret-id").is_some_and(|v| !v.0.is_empty());
    let expires = s
        .annotations()
        .get(EXPIRES_ANNOTATION)
        .and_then(|t| unix(t))?;
    let fresh = !prepare::secret_id_needs_renewal(now_unix, expires, ttl);
    (same_role && has_secret && fresh).then(|| s.annotations()[EXPIRES_ANNOTATION].clone())
}

/// Keeps the plugin's AppRole credentials Secret current: a new secret_id when the role_id
/// changed, the Secret is missing, or a third of the secret_id's life is left.
pub async fn ensure_credentials(
    ctx: &Ctx,
    obj: &KubeBaoInstallation,
    rctx: &RenderContext,
    session: &Session,
    status: &mut KubeBaoInstallationStatus,
) -> Result<(), String> {
    let spec = &obj.spec;
    let secret_name = format!("{}/{}", spec.namespace, installer::CREDENTIALS_SECRET);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &spec.namespace);
    let current = api
        .get_opt(installer::CREDENTIALS_SECRET)
        .await
        .map_err(|e| format!("cannot read Secret {secret_name}: {e}"))?;
    let now_unix = Timestamp::now().as_second();
    let ttl = spec.kms.secret_id_ttl_seconds;
    if let Some(expires) = kept_expiry(current.as_ref(), &session.role_id, now_unix, ttl) {
        status.secret_id_expires = Some(expires);
        return Ok(());
    }
    let issued = prepare::issue_secret_id(&session.bao, &session.token, &spec.kms)
        .await
        .map_err(|e| e.to_string())?;
    let expires = Timestamp::from_second(now_unix + issued.ttl as i64)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let mut secret =
        installer::credentials(spec, rctx, &session.role_id, issued.secret_id.expose());
    let annotations = secret.metadata.annotations.get_or_insert_default();
    annotations.insert(EXPIRES_ANNOTATION.into(), expires.clone());
    annotations.insert("kubebao.io/secret-id-accessor".into(), issued.accessor);
    apply(&api, secret, obj)
        .await
        .map_err(|e| format!("cannot write Secret {secret_name}: {e}"))?;
    tracing::info!(installation = %obj.name_any(), expires = %expires, "issued a new AppRole secret_id for the KMS plugin");
    status.secret_id_expires = Some(expires);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::{counting_server, jwt_file, kube_client};
    use crate::installation::controller::Operator;
    use crate::installation::types::{KubeBaoInstallationStatus, OperatorAuth};
    use k8s_openapi::ByteString;
    use kube::runtime::events::{Recorder, Reporter};

    fn credentials(role_id: &str, secret_id: &str, expires: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.annotations = Some([(EXPIRES_ANNOTATION.into(), expires.into())].into());
        s.data = Some(
            [
                ("role-id".into(), ByteString(role_id.into())),
                ("secret-id".into(), ByteString(secret_id.into())),
            ]
            .into(),
        );
        s
    }

    #[test]
    fn credentials_are_kept_only_while_they_are_whole_current_and_fresh() {
        let expires = "2030-01-01T00:00:00Z";
        let at = unix(expires).unwrap();
        let ttl = 3600;
        let s = credentials("role", "sid", expires);
        // Most of its life left: kept, with its expiry.
        assert_eq!(
            kept_expiry(Some(&s), "role", at - 3000, ttl),
            Some(expires.to_string())
        );
        // Near its end, another role_id, no secret_id, or no Secret: a new one.
        assert_eq!(kept_expiry(Some(&s), "role", at - 60, ttl), None);
        assert_eq!(kept_expiry(Some(&s), "other", at - 3000, ttl), None);
        let empty = credentials("role", "", expires);
        assert_eq!(kept_expiry(Some(&empty), "role", at - 3000, ttl), None);
        assert_eq!(kept_expiry(None, "role", at - 3000, ttl), None);
    }

    /// An installation controller context whose Kubernetes API is `kube_url`.
    fn context(kube_url: &str) -> Ctx {
        let client = kube_client(kube_url);
        let reporter = Reporter {
            controller: "test".into(),
            instance: None,
        };
        let operator = Operator {
            namespace: "kubebao-system".into(),
            jwt_audience: "openbao".into(),
        };
        Ctx::new(
            client.clone(),
            operator,
            None,
            Recorder::new(client, reporter),
        )
    }

    fn spec(openbao: serde_json::Value) -> KubeBaoInstallationSpec {
        serde_json::from_value(serde_json::json!({"openbao": openbao})).unwrap()
    }

    fn secret_ref(namespace: Option<&str>) -> SecretKeyRef {
        SecretKeyRef {
            name: "openbao".into(),
            namespace: namespace.map(str::to_string),
            key: "value".into(),
        }
    }

    #[tokio::test]
    async fn a_secret_outside_the_operators_namespace_stalls_and_is_never_read() {
        let (kube_url, kube_requests) = counting_server().await;
        let ctx = context(&kube_url);
        let mut foreign = spec(serde_json::json!({"address": "https://bao.example:8200"}));
        foreign.openbao.ca_secret_ref = Some(secret_ref(Some("team-a")));
        let e = ca_pem(&ctx, &foreign).await.unwrap_err();
        assert!(
            e.contains("openbao.caSecretRef names Secret team-a/openbao, outside the operator's namespace \"kubebao-system\""),
            "{e}"
        );
        foreign.openbao.ca_secret_ref = None;
        foreign.openbao.auth = Some(OperatorAuth {
            kubernetes: None,
            token_secret_ref: Some(secret_ref(Some("kube-system"))),
        });
        let Err((transient, e)) = connect(&ctx, &foreign, &None).await else {
            panic!("a token Secret in kube-system was used");
        };
        assert!(
            !transient && e.contains("openbao.auth.tokenSecretRef"),
            "{e}"
        );
        assert_eq!(
            *kube_requests.lock().unwrap(),
            [] as [String; 0],
            "nothing read"
        );

        // The reconcile records it as Stalled, with a reason that names the cause.
        let mut v = Verdict::default();
        refuse_foreign_secrets(&foreign, "kubebao-system", &mut v);
        let mut status = KubeBaoInstallationStatus::default();
        assert!(!v.apply(&mut status, Some(1)));
        let stalled = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled")
            .unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", "CrossNamespaceSecret")
        );

        // The operator's namespace, named or by default, is read.
        for namespace in [Some("kubebao-system"), None] {
            let mut own = spec(serde_json::json!({"address": "https://bao.example:8200"}));
            own.openbao.ca_secret_ref = Some(secret_ref(namespace));
            let mut v = Verdict::default();
            refuse_foreign_secrets(&own, "kubebao-system", &mut v);
            let mut status = KubeBaoInstallationStatus::default();
            assert!(v.apply(&mut status, Some(1)), "{:?}", status.conditions);
            let e = ca_pem(&ctx, &own).await.unwrap_err();
            assert!(e.contains("kubebao-system/openbao does not exist"), "{e}");
        }
        assert_eq!(
            *kube_requests.lock().unwrap(),
            ["/api/v1/namespaces/kubebao-system/secrets/openbao"; 2]
        );
    }

    #[tokio::test]
    async fn an_installation_login_never_sends_a_token_for_the_api_server() {
        let (bao_url, bao_requests) = counting_server().await;
        let ctx = context("http://127.0.0.1:9");
        let dir = tempfile::tempdir().unwrap();
        let api_server = jwt_file(dir.path(), &["https://kubernetes.default.svc"]);
        let mut installation = spec(serde_json::json!({
            "address": bao_url,
            "allowPlainHTTP": true,
            "auth": {"kubernetes": {"role": "kubebao", "tokenPath": api_server}},
        }));
        let Err((transient, e)) = connect(&ctx, &installation, &None).await else {
            panic!("logged in with the API server's token");
        };
        assert!(!transient && e.contains("not only \"openbao\""), "{e}");
        assert_eq!(
            *bao_requests.lock().unwrap(),
            [] as [String; 0],
            "nothing reached OpenBao"
        );
        // The projected token for OpenBao's audience is sent (this fake refuses it).
        let projected = jwt_file(dir.path(), &["openbao"]);
        installation.openbao.auth = Some(
            serde_json::from_value(serde_json::json!(
                {"kubernetes": {"role": "kubebao", "tokenPath": projected}}
            ))
            .unwrap(),
        );
        assert!(connect(&ctx, &installation, &None).await.is_err());
        assert_eq!(*bao_requests.lock().unwrap(), ["/v1/auth/kubernetes/login"]);
    }
}
