//! The KubeBaoInstallation controller: prepare OpenBao → render → apply (server-side apply,
//! common labels, owner references) → status. Deletion runs a finalizer that asks the node
//! installers to remove their files, then deletes every object it created. It never deletes the
//! Transit key: Secrets in etcd are encrypted under it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use kubebao_openbao::{ClientConfig, Credentials, OpenBao, SecretString};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::installation::prepare::{self, PrepareError};
use crate::installation::render::installer_daemonset::{self as installer, Action as PlanAction};
use crate::installation::render::{self, Context as RenderContext, FIELD_MANAGER, csi_daemonset};
use crate::installation::types::{
    Condition, FINALIZER, KubeBaoInstallation, KubeBaoInstallationSpec, KubeBaoInstallationStatus,
    ROTATE_ANNOTATION, RewriteStatus, RolloutStatus,
};
use crate::lenient::{self, Lenient};

/// Fetches the operator's own OpenBao token (its leader-wide identity).
pub type TokenFn = Arc<dyn Fn() -> BoxFuture<'static, Result<SecretString, String>> + Send + Sync>;

/// The operator's own OpenBao connection, used when a KubeBaoInstallation names no auth.
#[derive(Clone)]
pub struct OperatorIdentity {
    /// Client for the operator's configured OpenBao address.
    pub bao: OpenBao,
    /// Returns a valid token.
    pub token: TokenFn,
}

/// Shared controller state.
pub struct Ctx {
    /// Kubernetes client.
    pub client: Client,
    /// The operator's identity, if it has one.
    pub fallback: Option<OperatorIdentity>,
    /// Tokens from `auth.kubernetes` logins, by installation name, until they near expiry.
    logins: Mutex<HashMap<String, (SecretString, Instant)>>,
    /// The last rotation request acted on, by installation name, with the key's latest version
    /// before it. Recorded before the rotate call, so a request whose answer was lost (timeout,
    /// failed status write, stale cached object) is recognised by the key having moved past that
    /// version: one request never rotates twice.
    rotated: Mutex<HashMap<String, (String, u64)>>,
    /// When each installation's current key_id was first seen (same reason as `rotated`).
    seen: Mutex<HashMap<String, (String, String)>>,
}

impl Ctx {
    /// A context for `client`.
    pub fn new(client: Client, fallback: Option<OperatorIdentity>) -> Self {
        Self {
            client,
            fallback,
            logins: Mutex::new(HashMap::new()),
            rotated: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
        }
    }
}

/// A reconcile failure that is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    fallback: Option<OperatorIdentity>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Arc::new(Ctx::new(client.clone(), fallback));
    let managed =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=kubebao-operator");
    Controller::new(
        Api::<Lenient<KubeBaoInstallation>>::all(client.clone()),
        watcher::Config::default(),
    )
    // Not `.owns()`: for a cluster-scoped owner it enqueues the owner under the child's
    // namespace, a different key than the main watch's, so one installation could be reconciled
    // twice at once (two rotations for one request, stale writes). Map to the cluster-scoped key.
    .watches(Api::<DaemonSet>::all(client), managed, owning_installations)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "KubeBaoInstallation controller event");
        }
    })
    .await;
}

/// The installations that own `ds`, keyed as the main watch keys them (no namespace).
fn owning_installations(ds: DaemonSet) -> Vec<ObjectRef<Lenient<KubeBaoInstallation>>> {
    ds.metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .filter(|o| {
            o.kind == KubeBaoInstallation::kind(&())
                && o.api_version == KubeBaoInstallation::api_version(&())
        })
        .map(|o| ObjectRef::new(&o.name))
        .collect()
}

fn error_policy(obj: Arc<Lenient<KubeBaoInstallation>>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(installation = %obj.name_any(), error = %e, "KubeBaoInstallation reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

fn unix(ts: &str) -> Option<i64> {
    ts.parse::<Timestamp>().ok().map(|t| t.as_second())
}

/// Sets a condition, keeping `lastTransitionTime` while its status does not flip.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" };
    let updated =
        crate::conditions::condition(conditions, type_, status, reason, message, generation);
    conditions.retain(|c| c.type_ != type_);
    conditions.push(updated);
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// What a reconcile concluded, per component.
#[derive(Default)]
struct Verdict {
    /// (condition type, ok, reason, message) for OpenBaoReady, KMSReady, CSIReady.
    parts: Vec<(&'static str, bool, String, String)>,
    /// A problem only a change can fix.
    stalled: Option<(String, String)>,
}

impl Verdict {
    fn part(&mut self, t: &'static str, ok: bool, reason: &str, message: impl Into<String>) {
        self.parts.push((t, ok, reason.into(), message.into()));
    }
    fn stall(&mut self, reason: &str, message: impl Into<String>) {
        if self.stalled.is_none() {
            self.stalled = Some((reason.into(), message.into()));
        }
    }
    /// Applies the verdict to the conditions, kstatus style.
    fn apply(self, status: &mut KubeBaoInstallationStatus, generation: Option<i64>) -> bool {
        let c = &mut status.conditions;
        for (t, ok, reason, message) in &self.parts {
            set_condition(c, t, *ok, reason, message, generation);
        }
        let failing: Vec<_> = self.parts.iter().filter(|p| !p.1).collect();
        let ready = failing.is_empty() && self.stalled.is_none();
        let (reason, message) = match (&self.stalled, failing.first()) {
            (Some((r, m)), _) => (r.clone(), m.clone()),
            (None, Some(p)) => (p.2.clone(), p.3.clone()),
            (None, None) => (
                "Installed".into(),
                "OpenBao is prepared and every component is installed".into(),
            ),
        };
        set_condition(c, "Ready", ready, &reason, &message, generation);
        let stalled = self.stalled.is_some();
        set_condition(
            c,
            "Stalled",
            stalled,
            if stalled { &reason } else { "Idle" },
            if stalled { &message } else { "" },
            generation,
        );
        let reconciling = !ready && !stalled;
        set_condition(
            c,
            "Reconciling",
            reconciling,
            if reconciling { &reason } else { "Idle" },
            if reconciling { &message } else { "" },
            generation,
        );
        ready
    }
}

async fn patch_status(
    api: &Api<KubeBaoInstallation>,
    name: &str,
    status: &KubeBaoInstallationStatus,
) -> Result<(), Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await?;
    Ok(())
}

/// Server-side applies `obj` (owned by `owner`) through `api`.
async fn apply<K>(api: &Api<K>, mut obj: K, owner: &KubeBaoInstallation) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    obj.meta_mut().owner_references = owner.controller_owner_ref(&()).map(|o| vec![o]);
    let name = obj.meta().name.clone().expect("rendered objects are named");
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
}

async fn delete_if_exists<K>(api: &Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn secret_key(
    client: &Client,
    default_ns: &str,
    r: &crate::installation::types::SecretKeyRef,
) -> Result<String, String> {
    let ns = r.namespace.as_deref().unwrap_or(default_ns);
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
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
async fn ca_pem(client: &Client, spec: &KubeBaoInstallationSpec) -> Result<Option<String>, String> {
    if let Some(ca) = &spec.openbao.ca_bundle {
        return Ok(Some(ca.clone()));
    }
    match &spec.openbao.ca_secret_ref {
        Some(r) => secret_key(client, &spec.namespace, r).await.map(Some),
        None => Ok(None),
    }
}

/// The OpenBao client and token to prepare OpenBao with.
async fn connect(
    ctx: &Ctx,
    name: &str,
    spec: &KubeBaoInstallationSpec,
    ca: &Option<String>,
) -> Result<(OpenBao, SecretString), (bool, String)> {
    let client_for_spec = || {
        OpenBao::new(&ClientConfig {
            address: spec.openbao.address.clone(),
            ca_pem: ca.as_ref().map(|c| c.as_bytes().to_vec()),
            namespace: spec.openbao.namespace.clone(),
            timeout: None,
        })
        .map_err(|e| (false, format!("openbao: {e}")))
    };
    match &spec.openbao.auth {
        None => {
            let f = ctx.fallback.as_ref().ok_or((
                false,
                "openbao.auth is not set and the operator has no OpenBao identity of its own; set openbao.auth".to_string(),
            ))?;
            let token = (f.token)()
                .await
                .map_err(|e| (true, format!("the operator's OpenBao identity: {e}")))?;
            Ok((f.bao.clone(), token))
        }
        Some(auth) => {
            let bao = client_for_spec()?;
            if let Some(r) = &auth.token_secret_ref {
                let token = secret_key(&ctx.client, &spec.namespace, r)
                    .await
                    .map_err(|e| (false, e))?;
                return Ok((bao, SecretString::new(token.trim())));
            }
            let k = auth.kubernetes.clone().unwrap_or_default();
            if let Some((t, until)) = ctx.logins.lock().expect("logins").get(name).cloned()
                && Instant::now() < until
            {
                return Ok((bao, t));
            }
            let jwt = std::fs::read_to_string(&k.token_path).map_err(|e| {
                (
                    false,
                    format!(
                        "cannot read the operator's ServiceAccount token {}: {e}",
                        k.token_path
                    ),
                )
            })?;
            let login = bao
                .login(&Credentials::Kubernetes {
                    mount: k.mount.clone(),
                    role: k.role.clone(),
                    jwt: SecretString::new(jwt.trim()),
                })
                .await
                .map_err(|e| {
                    (
                        e.is_unavailable(),
                        format!(
                            "OpenBao login as role {:?} at auth/{}: {e}",
                            k.role, k.mount
                        ),
                    )
                })?;
            let keep = Duration::from_secs(login.lease_duration.max(60) * 2 / 3);
            ctx.logins.lock().expect("logins").insert(
                name.to_string(),
                (login.client_token.clone(), Instant::now() + keep),
            );
            Ok((bao, login.client_token))
        }
    }
}

fn random_key() -> Vec<u8> {
    use std::io::Read as _;
    let mut key = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .expect("read /dev/urandom");
    key
}

const EXPIRES_ANNOTATION: &str = "kubebao.io/secret-id-expires";

/// Keeps the plugin's AppRole credentials Secret current: a new secret_id when the role_id
/// changed, the Secret is missing, or a third of the secret_id's life is left.
async fn ensure_credentials(
    ctx: &Ctx,
    obj: &KubeBaoInstallation,
    rctx: &RenderContext,
    bao: &OpenBao,
    token: &SecretString,
    role_id: &str,
    status: &mut KubeBaoInstallationStatus,
) -> Result<(), String> {
    let spec = &obj.spec;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &spec.namespace);
    let current = api
        .get_opt(installer::CREDENTIALS_SECRET)
        .await
        .map_err(|e| {
            format!(
                "cannot read Secret {}/{}: {e}",
                spec.namespace,
                installer::CREDENTIALS_SECRET
            )
        })?;
    let now_unix = Timestamp::now().as_second();
    let keep = current.as_ref().and_then(|s| {
        let data = s.data.as_ref()?;
        let same_role = data.get("role-id").map(|v| v.0.as_slice()) == Some(role_id.as_bytes());
        let has_secret = data.get("secret-id").is_some_and(|v| !v.0.is_empty());
        let expires = s
            .annotations()
            .get(EXPIRES_ANNOTATION)
            .and_then(|t| unix(t))?;
        let fresh =
            !prepare::secret_id_needs_renewal(now_unix, expires, spec.kms.secret_id_ttl_seconds);
        (same_role && has_secret && fresh).then(|| s.annotations()[EXPIRES_ANNOTATION].clone())
    });
    if let Some(expires) = keep {
        status.secret_id_expires = Some(expires);
        return Ok(());
    }
    let issued = prepare::issue_secret_id(bao, token, &spec.kms)
        .await
        .map_err(|e| e.to_string())?;
    let expires = Timestamp::from_second(now_unix + issued.ttl as i64)
        .map(|t| t.to_string())
        .unwrap_or_default();
    let mut secret = installer::credentials(spec, rctx, role_id, issued.secret_id.expose());
    secret
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(EXPIRES_ANNOTATION.into(), expires.clone());
    secret
        .metadata
        .annotations
        .get_or_insert_default()
        .insert("kubebao.io/secret-id-accessor".into(), issued.accessor);
    apply(&api, secret, obj).await.map_err(|e| {
        format!(
            "cannot write Secret {}/{}: {e}",
            spec.namespace,
            installer::CREDENTIALS_SECRET
        )
    })?;
    tracing::info!(installation = %obj.name_any(), expires = %expires, "issued a new AppRole secret_id for the KMS plugin");
    status.secret_id_expires = Some(expires);
    Ok(())
}

fn rollout(ds: Option<&DaemonSet>, hash: &str) -> RolloutStatus {
    let st = ds.and_then(|d| d.status.clone()).unwrap_or_default();
    let fresh = ds
        .and_then(|d| Some(d.status.as_ref()?.observed_generation? >= d.metadata.generation?))
        .unwrap_or(false);
    let desired = st.desired_number_scheduled;
    let ready = if fresh {
        st.updated_number_scheduled
            .unwrap_or(0)
            .min(st.number_ready)
    } else {
        0
    };
    RolloutStatus {
        config_hash: hash.into(),
        desired,
        ready,
        summary: format!("{ready}/{desired}"),
    }
}

fn rollout_condition(v: &mut Verdict, t: &'static str, r: &RolloutStatus, what: &str) {
    if r.desired == 0 {
        v.part(
            t,
            false,
            "NoNodes",
            format!("no node matches the {what} placement (nodeSelector/tolerations)"),
        );
    } else if r.ready < r.desired {
        v.part(
            t,
            false,
            "RollingOut",
            format!(
                "{what}: {}/{} nodes run the current configuration",
                r.ready, r.desired
            ),
        );
    } else {
        v.part(
            t,
            true,
            "Installed",
            format!("{what}: installed on {}/{} nodes", r.ready, r.desired),
        );
    }
}

/// Reconciles one KubeBaoInstallation.
pub async fn reconcile(
    obj: Arc<Lenient<KubeBaoInstallation>>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    match lenient::parsed(&ctx.client, &obj).await? {
        Some(o) => reconcile_valid(o, ctx).await,
        None => Ok(Action::await_change()),
    }
}

async fn reconcile_valid(obj: Arc<KubeBaoInstallation>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let name = obj.name_any();
    let api: Api<KubeBaoInstallation> = Api::all(ctx.client.clone());
    let generation = obj.metadata.generation;
    let mut status = obj.status.clone().unwrap_or_default();

    if obj.metadata.deletion_timestamp.is_some() {
        return cleanup(&obj, &ctx, &api, status).await;
    }

    // One per cluster: the oldest wins; the others say why they do nothing.
    let all = Api::<Lenient<KubeBaoInstallation>>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?;
    let winner = all
        .items
        .iter()
        .filter(|o| {
            o.meta().deletion_timestamp.is_none() || o.finalizers().iter().any(|f| f == FINALIZER)
        })
        .min_by_key(|o| {
            (
                o.meta().creation_timestamp.clone().map(|t| t.0),
                o.name_any(),
            )
        })
        .map(|o| o.name_any());
    if winner.as_deref() != Some(name.as_str()) {
        let mut v = Verdict::default();
        let other = winner.unwrap_or_default();
        v.stall("Conflict", format!("KubeBaoInstallation {other:?} already installs KubeBao in this cluster; only one takes effect. Delete this one or {other:?}"));
        v.apply(&mut status, generation);
        status.observed_generation = generation;
        patch_status(&api, &name, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }

    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = obj.finalizers().to_vec();
        finalizers.push(FINALIZER.into());
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
        )
        .await?;
    }

    let spec = &obj.spec;
    let mut v = Verdict::default();
    let ca = match ca_pem(&ctx.client, spec).await {
        Ok(ca) => ca,
        Err(e) => {
            v.stall("CABundleMissing", e);
            None
        }
    };
    let rctx = RenderContext {
        instance: name.clone(),
        ca_pem: ca.clone(),
    };
    let mut requeue = Duration::from_secs(300);

    // 1. OpenBao.
    let mut role_id = None;
    let mut session = None;
    if spec.kms.enabled {
        match connect(&ctx, &name, spec, &ca).await {
            Err((transient, e)) => {
                v.part(
                    "OpenBaoReady",
                    false,
                    if transient {
                        "OpenBaoUnavailable"
                    } else {
                        "AuthFailed"
                    },
                    e.clone(),
                );
                if !transient {
                    v.stall("AuthFailed", e);
                }
                requeue = Duration::from_secs(30);
            }
            Ok((bao, token)) => {
                match prepare_openbao(&ctx, &obj, &bao, &token, &mut status).await {
                    Ok(id) => {
                        role_id = Some(id);
                        session = Some((bao, token));
                        v.part(
                            "OpenBaoReady",
                            true,
                            "Prepared",
                            format!(
                                "Transit key {}/{} version {}, policy and AppRole in place",
                                spec.kms.transit_mount,
                                spec.kms.key_name,
                                status.key_version.unwrap_or(0)
                            ),
                        );
                    }
                    Err(e) => {
                        let transient = e.is_transient();
                        v.part(
                            "OpenBaoReady",
                            false,
                            if transient {
                                "OpenBaoUnavailable"
                            } else {
                                "PrepareFailed"
                            },
                            e.to_string(),
                        );
                        if !transient {
                            v.stall("PrepareFailed", e.to_string());
                        }
                        requeue = Duration::from_secs(30);
                    }
                }
            }
        }
    } else {
        v.part(
            "OpenBaoReady",
            true,
            "NotNeeded",
            "the KMS plugin is disabled; OpenBao needs no preparation",
        );
    }

    // 2. KMS: credentials, bundle, installer DaemonSet.
    let ns = spec.namespace.clone();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
    let sas: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
    if spec.kms.enabled {
        if let (Some(role_id), Some((bao, token))) = (&role_id, &session)
            && let Err(e) =
                ensure_credentials(&ctx, &obj, &rctx, bao, token, role_id, &mut status).await
        {
            v.part("KMSReady", false, "CredentialsFailed", e);
        }
        let bundle = installer::bundle(spec, &rctx, PlanAction::Install);
        let hash = installer::bundle_hash(&bundle);
        apply(&sas, installer::service_account(spec, &rctx), &obj).await?;
        apply(&cms, installer::config_map(spec, &rctx, bundle), &obj).await?;
        let ds = apply(&dss, installer::daemonset(spec, &rctx, &hash), &obj).await?;
        let r = rollout(Some(&ds), &hash);
        if !v.parts.iter().any(|p| p.0 == "KMSReady") {
            if role_id.is_none() {
                v.part(
                    "KMSReady",
                    false,
                    "WaitingForOpenBao",
                    "the plugin's credentials need OpenBao to be prepared first",
                );
            } else {
                rollout_condition(&mut v, "KMSReady", &r, "KMS node installer");
            }
        }
        status.kms = Some(r);
    } else {
        delete_if_exists(&dss, installer::NAME).await?;
        delete_if_exists(&cms, installer::NAME).await?;
        delete_if_exists(&sas, installer::NAME).await?;
        status.kms = None;
        v.part("KMSReady", true, "Disabled", "the KMS plugin is disabled");
    }

    // 3. CSI provider.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let crs: Api<ClusterRole> = Api::all(ctx.client.clone());
    let crbs: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());
    if spec.csi.enabled {
        apply(&sas, csi_daemonset::service_account(spec, &rctx), &obj).await?;
        apply(&crs, csi_daemonset::cluster_role(spec, &rctx), &obj).await?;
        apply(
            &crbs,
            csi_daemonset::cluster_role_binding(spec, &rctx),
            &obj,
        )
        .await?;
        apply(&cms, csi_daemonset::config_map(spec, &rctx), &obj).await?;
        if secrets
            .get_opt(csi_daemonset::VERSION_KEY_SECRET)
            .await?
            .is_none()
        {
            let mut s = csi_daemonset::version_key_secret(spec, &rctx, &random_key());
            s.metadata.owner_references = obj.controller_owner_ref(&()).map(|o| vec![o]);
            match secrets.create(&PostParams::default(), &s).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        let ds = apply(&dss, csi_daemonset::daemonset(spec, &rctx), &obj).await?;
        let r = rollout(Some(&ds), &csi_daemonset::config_hash(spec, &rctx));
        rollout_condition(&mut v, "CSIReady", &r, "CSI provider");
        status.csi = Some(r);
    } else {
        delete_if_exists(&dss, csi_daemonset::NAME).await?;
        delete_if_exists(&cms, csi_daemonset::NAME).await?;
        delete_if_exists(&secrets, csi_daemonset::VERSION_KEY_SECRET).await?;
        delete_if_exists(&sas, csi_daemonset::NAME).await?;
        delete_if_exists(&crbs, csi_daemonset::NAME).await?;
        delete_if_exists(&crs, csi_daemonset::NAME).await?;
        status.csi = None;
        v.part("CSIReady", true, "Disabled", "the CSI provider is disabled");
    }

    // 4. Rewrite after rotation.
    if spec.kms.enabled
        && spec.kms.rewrite_after_rotation
        && let Some(next) = rewrite_step(&ctx, spec, &mut status).await?
    {
        requeue = requeue.min(next);
    }

    v.apply(&mut status, generation);
    status.observed_generation = generation;
    patch_status(&api, &name, &status).await?;
    Ok(Action::requeue(requeue))
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
    let mut key = prepare::ensure_transit_key(bao, token, kms).await?;
    let name = obj.name_any();
    let attempted = ctx.rotated.lock().expect("rotated").get(&name).cloned();
    let (acted, rotate_from) = rotation_plan(
        obj.annotations().get(ROTATE_ANNOTATION).map(String::as_str),
        status.last_rotate_request.as_deref(),
        attempted.as_ref(),
        key.latest_version,
    );
    status.last_rotate_request = acted;
    if let Some(before) = rotate_from {
        let request = obj.annotations()[ROTATE_ANNOTATION].clone();
        ctx.rotated
            .lock()
            .expect("rotated")
            .insert(name.clone(), (request.clone(), before));
        bao.transit_rotate(token, &kms.transit_mount, &kms.key_name)
            .await?;
        key = bao
            .transit_key(token, &kms.transit_mount, &kms.key_name)
            .await?;
        tracing::info!(installation = %name, version = key.latest_version, "rotated the Transit key on request");
        status.last_rotate_request = Some(request);
    }
    let key_id = prepare::current_key_id(&kms.transit_mount, &key);
    if let Some(id) = &key_id {
        let mut seen = ctx.seen.lock().expect("seen");
        let since = match seen.get(&name) {
            Some((k, t)) if k == id => t.clone(),
            _ if status.key_id.as_ref() == Some(id) => status
                .key_id_since
                .clone()
                .unwrap_or_else(crate::conditions::now),
            _ => crate::conditions::now(),
        };
        seen.insert(name.clone(), (id.clone(), since.clone()));
        status.key_id_since = Some(since);
    }
    status.key_id = key_id;
    status.key_version = Some(key.latest_version);
    status.last_rotation = key
        .versions
        .iter()
        .find(|v| v.version == key.latest_version && v.version > 1)
        .map(|v| v.created.clone());
    let policy = prepare::ensure_policy(bao, token, kms).await?;
    prepare::ensure_approle(bao, token, kms, &policy).await
}

/// Which `kubebao.io/rotate` request counts as acted on, and — when the current one has not
/// been — the key version to rotate from. `attempted` is the last request this operator tried,
/// with the key's latest version before it: once the key has moved past that version the
/// request is done, even if OpenBao's answer or the status write was lost.
fn rotation_plan(
    request: Option<&str>,
    acted: Option<&str>,
    attempted: Option<&(String, u64)>,
    latest: u64,
) -> (Option<String>, Option<u64>) {
    let acted = match attempted {
        Some((r, before)) if latest > *before => Some(r.clone()),
        _ => acted.map(str::to_string),
    };
    let rotate_from = match request {
        Some(r) if acted.as_deref() != Some(r) => Some(match attempted {
            // Tried before and the key has not moved: the same request, from the same version.
            Some((tried, before)) if tried == r => *before,
            _ => latest,
        }),
        _ => None,
    };
    (acted, rotate_from)
}

/// One batch of the rewrite: no-op updates of Secrets (kube-apiserver re-encrypts a Secret
/// stored under an old key_id on its next write), rate-limited. Returns when to come back.
async fn rewrite_step(
    ctx: &Ctx,
    spec: &KubeBaoInstallationSpec,
    status: &mut KubeBaoInstallationStatus,
) -> Result<Option<Duration>, Error> {
    let Some(key_id) = status.key_id.clone() else {
        return Ok(None);
    };
    let rotated = status.key_version.unwrap_or(1) > 1;
    let current = status.rewrite.as_ref().is_some_and(|r| r.key_id == key_id);
    if !rotated || (current && status.rewrite.as_ref().is_some_and(|r| r.complete)) {
        return Ok(None);
    }
    let since = status.key_id_since.as_deref().and_then(unix).unwrap_or(0);
    let wait = since + spec.kms.rewrite_delay_seconds as i64 - Timestamp::now().as_second();
    if wait > 0 {
        return Ok(Some(Duration::from_secs(wait as u64)));
    }
    let api: Api<Secret> = Api::all(ctx.client.clone());
    let mut all = api.list_metadata(&ListParams::default()).await?.items;
    all.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let mut r = if current {
        status.rewrite.clone().expect("current")
    } else {
        RewriteStatus {
            key_id,
            total: all.len() as u64,
            ..Default::default()
        }
    };
    let rate = spec.kms.rewrite_per_second.max(1) as u64;
    let batch = rate * 5;
    let start = r.done.min(all.len() as u64) as usize;
    let end = (start + batch as usize).min(all.len());
    let pause = Duration::from_millis(1000 / rate);
    for m in &all[start..end] {
        let (Some(ns), Some(name)) = (&m.metadata.namespace, &m.metadata.name) else {
            continue;
        };
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let mut ok = false;
        for _ in 0..3 {
            match api.get_opt(name).await? {
                None => {
                    ok = true;
                    break;
                }
                Some(s) => match api.replace(name, &PostParams::default(), &s).await {
                    Ok(_) => {
                        ok = true;
                        break;
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => continue,
                    Err(e) => {
                        tracing::warn!(secret = %format!("{ns}/{name}"), error = %e, "rewrite failed");
                        break;
                    }
                },
            }
        }
        if !ok {
            r.failed += 1;
        }
        r.done += 1;
        tokio::time::sleep(pause).await;
    }
    r.total = r.total.max(r.done);
    r.complete = end >= all.len();
    status.rewrite = Some(r.clone());
    Ok((!r.complete).then_some(Duration::from_millis(10)))
}

/// Deletion: tell the installers to uninstall, wait for them (bounded), delete the objects,
/// remove the plugin's AppRole role and policy, drop the finalizer. The Transit key stays.
async fn cleanup(
    obj: &KubeBaoInstallation,
    ctx: &Ctx,
    api: &Api<KubeBaoInstallation>,
    mut status: KubeBaoInstallationStatus,
) -> Result<Action, Error> {
    let name = obj.name_any();
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let spec = &obj.spec;
    let ns = spec.namespace.clone();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let dss: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
    let sas: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let crs: Api<ClusterRole> = Api::all(ctx.client.clone());
    let crbs: Api<ClusterRoleBinding> = Api::all(ctx.client.clone());

    if let Some(ds) = dss.get_opt(installer::NAME).await? {
        let ca = ca_pem(&ctx.client, spec).await.ok().flatten();
        let rctx = RenderContext {
            instance: name.clone(),
            ca_pem: ca,
        };
        let bundle = installer::bundle(spec, &rctx, PlanAction::Uninstall);
        let hash = installer::bundle_hash(&bundle);
        let started = match status.uninstall_started.clone() {
            Some(s) => s,
            None => {
                apply(&cms, installer::config_map(spec, &rctx, bundle), obj).await?;
                apply(&dss, installer::daemonset(spec, &rctx, &hash), obj).await?;
                let s = crate::conditions::now();
                status.uninstall_started = Some(s.clone());
                let mut v = Verdict::default();
                v.part(
                    "KMSReady",
                    false,
                    "Uninstalling",
                    "node installers are removing the KMS plugin's files",
                );
                v.apply(&mut status, obj.metadata.generation);
                patch_status(api, &name, &status).await?;
                s
            }
        };
        let r = rollout(Some(&ds), &hash);
        let done = ds
            .spec
            .as_ref()
            .and_then(|s| {
                s.template
                    .metadata
                    .as_ref()?
                    .annotations
                    .as_ref()?
                    .get(render::CONFIG_HASH_ANNOTATION)
                    .cloned()
            })
            .as_deref()
            == Some(hash.as_str())
            && r.ready >= r.desired;
        let elapsed = Timestamp::now().as_second() - unix(&started).unwrap_or(0);
        if !done && elapsed < spec.kms.uninstall_grace_seconds as i64 {
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        if !done {
            tracing::warn!(installation = %name, "node installers did not all confirm the uninstall within the grace period; deleting anyway");
        }
    }

    for n in [installer::NAME, csi_daemonset::NAME] {
        delete_if_exists(&dss, n).await?;
        delete_if_exists(&cms, n).await?;
        delete_if_exists(&sas, n).await?;
    }
    delete_if_exists(&secrets, installer::CREDENTIALS_SECRET).await?;
    delete_if_exists(&secrets, csi_daemonset::VERSION_KEY_SECRET).await?;
    delete_if_exists(&crbs, csi_daemonset::NAME).await?;
    delete_if_exists(&crs, csi_daemonset::NAME).await?;

    // The AppRole role and policy go (revoking every secret_id); the Transit key never does.
    if spec.kms.enabled {
        let ca = ca_pem(&ctx.client, spec).await.ok().flatten();
        match connect(ctx, &name, spec, &ca).await {
            Ok((bao, token)) => {
                let role = prepare::plugin_role_name(&spec.kms);
                let path = format!("auth/{}/role/{role}", spec.kms.approle_mount);
                if let Err(e) = bao.delete(&path, &token).await
                    && !e.is_not_found()
                {
                    tracing::warn!(installation = %name, error = %e, "cannot remove the plugin's AppRole role; remove {path} by hand");
                }
                if let Err(e) = bao.policy_delete(&token, &role).await {
                    tracing::warn!(installation = %name, error = %e, "cannot remove the plugin's policy; remove it by hand");
                }
            }
            Err((_, e)) => {
                tracing::warn!(installation = %name, error = %e, "cannot reach OpenBao to remove the plugin's AppRole and policy")
            }
        }
    }

    let finalizers: Vec<String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
    )
    .await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owned_daemonset_wakes_its_installation_under_the_same_key_as_the_main_watch() {
        let mut inst = KubeBaoInstallation::new(
            "kubebao",
            serde_json::from_value(json!({"openbao": {"address": "https://bao:8200"}})).unwrap(),
        );
        inst.metadata.uid = Some("u1".into());
        let ds = DaemonSet {
            metadata: kube::api::ObjectMeta {
                name: Some("kubebao-installer".into()),
                namespace: Some("kube-system".into()),
                owner_references: inst.controller_owner_ref(&()).map(|o| vec![o]),
                ..Default::default()
            },
            ..Default::default()
        };
        // The same key, so the controller never runs two reconciles of one installation at once.
        assert_eq!(
            owning_installations(ds),
            vec![ObjectRef::from_obj(&Lenient::Valid(inst))]
        );
    }

    #[test]
    fn one_rotate_request_rotates_once_even_when_the_answer_is_lost() {
        let r1 = Some("r1");
        // No request, or one already acted on: nothing to do.
        assert_eq!(rotation_plan(None, None, None, 1), (None, None));
        assert_eq!(rotation_plan(r1, r1, None, 2), (Some("r1".into()), None));
        // A new request rotates from the key's current version.
        assert_eq!(rotation_plan(r1, None, None, 1), (None, Some(1)));
        // The rotate call's answer was lost, but the key moved: done, no second rotation.
        let tried = ("r1".to_string(), 1);
        assert_eq!(
            rotation_plan(r1, None, Some(&tried), 2),
            (Some("r1".into()), None)
        );
        // The call failed and the key did not move: try the same request again.
        assert_eq!(rotation_plan(r1, None, Some(&tried), 1), (None, Some(1)));
        // A newer request after that one rotates again, from the new version.
        assert_eq!(
            rotation_plan(Some("r2"), r1, Some(&tried), 2),
            (Some("r1".into()), Some(2))
        );
    }

    #[test]
    fn transition_time_is_kept_while_a_condition_does_not_flip() {
        let mut c = Vec::new();
        set_condition(&mut c, "Ready", false, "RollingOut", "1/3", Some(1));
        c[0].last_transition_time = "2000-01-01T00:00:00Z".into();
        set_condition(&mut c, "Ready", false, "RollingOut", "2/3", Some(1));
        assert_eq!(c[0].last_transition_time, "2000-01-01T00:00:00Z");
        assert_eq!(c[0].message, "2/3");
        set_condition(&mut c, "Ready", true, "Installed", "3/3", Some(1));
        assert_ne!(c[0].last_transition_time, "2000-01-01T00:00:00Z");
    }

    #[test]
    fn a_failing_component_makes_the_installation_reconciling_not_ready() {
        let mut s = KubeBaoInstallationStatus::default();
        let mut v = Verdict::default();
        v.part("OpenBaoReady", true, "Prepared", "ok");
        v.part("KMSReady", false, "RollingOut", "1/3");
        assert!(!v.apply(&mut s, Some(2)));
        let get = |t: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == t)
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(get("Ready"), "False");
        assert_eq!(get("Reconciling"), "True");
        assert_eq!(get("Stalled"), "False");
    }

    #[test]
    fn a_stall_says_stalled_not_reconciling() {
        let mut s = KubeBaoInstallationStatus::default();
        let mut v = Verdict::default();
        v.stall("Conflict", "another one");
        assert!(!v.apply(&mut s, Some(1)));
        let get = |t: &str| s.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(get("Stalled").status, "True");
        assert_eq!(get("Stalled").reason, "Conflict");
        assert_eq!(get("Reconciling").status, "False");
    }
}
