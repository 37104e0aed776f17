//! Installing the two components from their rendered objects: server-side apply with an owner
//! reference (the KMS node installer's ServiceAccount, bundle and DaemonSet; the CSI provider's
//! RBAC, config, object-version key and DaemonSet), removing them when disabled, and reading
//! each DaemonSet's rollout into the status and its KMSReady / CSIReady condition.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::installation::controller::{Ctx, Error};
use crate::installation::openbao::{self, Prepared};
use crate::installation::render::encryption_config::Providers;
use crate::installation::render::installer_daemonset::{self as installer, Action as PlanAction};
use crate::installation::render::{Context as RenderContext, FIELD_MANAGER, csi_daemonset};
use crate::installation::types::{KubeBaoInstallation, KubeBaoInstallationStatus, RolloutStatus};
use crate::installation::verdict::Verdict;
use crate::installation::{migration, uninstall};

/// The APIs of every kind of object an installation creates, in its namespace.
pub struct Objects {
    /// ConfigMaps.
    pub cms: Api<ConfigMap>,
    /// DaemonSets.
    pub dss: Api<DaemonSet>,
    /// ServiceAccounts.
    pub sas: Api<ServiceAccount>,
    /// Secrets.
    pub secrets: Api<Secret>,
    /// ClusterRoles.
    pub crs: Api<ClusterRole>,
    /// ClusterRoleBindings.
    pub crbs: Api<ClusterRoleBinding>,
}

impl Objects {
    /// The APIs for objects in `ns` (and the cluster-scoped RBAC).
    pub fn new(client: &Client, ns: &str) -> Self {
        Self {
            cms: Api::namespaced(client.clone(), ns),
            dss: Api::namespaced(client.clone(), ns),
            sas: Api::namespaced(client.clone(), ns),
            secrets: Api::namespaced(client.clone(), ns),
            crs: Api::all(client.clone()),
            crbs: Api::all(client.clone()),
        }
    }
}

/// Server-side applies `obj` (owned by `owner`) through `api`.
pub async fn apply<K>(
    api: &Api<K>,
    mut obj: K,
    owner: &KubeBaoInstallation,
) -> Result<K, kube::Error>
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

/// Deletes `name` (in the background); true when it existed.
pub async fn delete_if_exists<K>(api: &Api<K>, name: &str) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// How far a DaemonSet running configuration `hash` has rolled out. Nodes count as ready only
/// once the DaemonSet controller has seen its latest spec.
pub fn rollout(ds: Option<&DaemonSet>, hash: &str) -> RolloutStatus {
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

/// The condition `t` for rollout `r` of component `what`.
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

/// The KMS step: the plugin's credentials, the install bundle and the node installer
/// DaemonSet; or their removal when the plugin is disabled (the controller keeps it enabled
/// while kube-apiserver may still need it, see `migration`).
pub async fn kms(
    ctx: &Ctx,
    obj: &KubeBaoInstallation,
    rctx: &RenderContext,
    prepared: &Prepared,
    v: &mut Verdict,
    status: &mut KubeBaoInstallationStatus,
) -> Result<(), Error> {
    let spec = &obj.spec;
    let o = Objects::new(&ctx.client, &spec.namespace);
    if !spec.kms.enabled {
        return disable_kms(ctx, obj, &o, v, status).await;
    }
    if let Prepared::Ready(session) = prepared
        && let Err(e) = openbao::ensure_credentials(ctx, obj, rctx, session, status).await
    {
        v.part("KMSReady", false, "CredentialsFailed", e);
    }
    let providers = migration::providers(spec, status);
    let bundle = installer::bundle(spec, rctx, PlanAction::Install, providers);
    let hash = installer::bundle_hash(&bundle);
    apply(&o.sas, installer::service_account(spec, rctx), obj).await?;
    apply(&o.cms, installer::config_map(spec, rctx, bundle), obj).await?;
    let ds = apply(&o.dss, installer::daemonset(spec, rctx, &hash), obj).await?;
    let r = rollout(Some(&ds), &hash);
    if r.ready > 0 && providers != Providers::IdentityOnly {
        // A node confirmed an EncryptionConfiguration that reads through the plugin.
        status.kms_config_installed = true;
    }
    if !v.has("KMSReady") {
        if matches!(prepared, Prepared::Ready(_)) {
            rollout_condition(v, "KMSReady", &r, "KMS node installer");
        } else {
            v.part(
                "KMSReady",
                false,
                "WaitingForOpenBao",
                "the plugin's credentials need OpenBao to be prepared first",
            );
        }
    }
    status.kms = Some(r);
    Ok(())
}

/// The plugin is disabled (and not in use): the node installers remove its files if they ever
/// installed them, then its objects go.
async fn disable_kms(
    ctx: &Ctx,
    obj: &KubeBaoInstallation,
    o: &Objects,
    v: &mut Verdict,
    status: &mut KubeBaoInstallationStatus,
) -> Result<(), Error> {
    if status.kms_config_installed
        && let Some(ds) = o.dss.get_opt(installer::NAME).await?
        && !uninstall::nodes_uninstalled(obj, ctx, o, &ds, status).await?
    {
        v.part(
            "KMSReady",
            false,
            "Uninstalling",
            "node installers are removing the KMS plugin's files",
        );
        return Ok(());
    }
    remove_kms(o).await?;
    status.kms = None;
    status.kms_config_installed = false;
    status.uninstall_started = None;
    v.part("KMSReady", true, "Disabled", "the KMS plugin is disabled");
    Ok(())
}

/// Removes the KMS node installer (its DaemonSet, bundle and ServiceAccount).
pub async fn remove_kms(o: &Objects) -> Result<(), kube::Error> {
    delete_if_exists(&o.dss, installer::NAME).await?;
    delete_if_exists(&o.cms, installer::NAME).await?;
    delete_if_exists(&o.sas, installer::NAME).await?;
    Ok(())
}

/// The CSI step: the provider's RBAC, config, object-version key and DaemonSet; or their
/// removal when the provider is disabled.
pub async fn csi(
    ctx: &Ctx,
    obj: &KubeBaoInstallation,
    rctx: &RenderContext,
    v: &mut Verdict,
    status: &mut KubeBaoInstallationStatus,
) -> Result<(), Error> {
    let spec = &obj.spec;
    let o = Objects::new(&ctx.client, &spec.namespace);
    if !spec.csi.enabled {
        remove_csi(&o).await?;
        status.csi = None;
        v.part("CSIReady", true, "Disabled", "the CSI provider is disabled");
        return Ok(());
    }
    apply(&o.sas, csi_daemonset::service_account(spec, rctx), obj).await?;
    apply(&o.crs, csi_daemonset::cluster_role(spec, rctx), obj).await?;
    let binding = csi_daemonset::cluster_role_binding(spec, rctx);
    apply(&o.crbs, binding, obj).await?;
    apply(&o.cms, csi_daemonset::config_map(spec, rctx), obj).await?;
    ensure_version_key(&o, obj, rctx).await?;
    let ds = apply(&o.dss, csi_daemonset::daemonset(spec, rctx), obj).await?;
    let r = rollout(Some(&ds), &csi_daemonset::config_hash(spec, rctx));
    rollout_condition(v, "CSIReady", &r, "CSI provider");
    status.csi = Some(r);
    Ok(())
}

/// Creates the CSI provider's object-version key once; never replaces it (the provider's
/// published versions are derived from it).
async fn ensure_version_key(
    o: &Objects,
    obj: &KubeBaoInstallation,
    rctx: &RenderContext,
) -> Result<(), kube::Error> {
    if o.secrets
        .get_opt(csi_daemonset::VERSION_KEY_SECRET)
        .await?
        .is_some()
    {
        return Ok(());
    }
    let mut s = csi_daemonset::version_key_secret(&obj.spec, rctx, &random_key());
    s.metadata.owner_references = obj.controller_owner_ref(&()).map(|o| vec![o]);
    match o.secrets.create(&PostParams::default(), &s).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the CSI provider (its DaemonSet, config, object-version key, ServiceAccount and RBAC).
pub async fn remove_csi(o: &Objects) -> Result<(), kube::Error> {
    delete_if_exists(&o.dss, csi_daemonset::NAME).await?;
    delete_if_exists(&o.cms, csi_daemonset::NAME).await?;
    delete_if_exists(&o.secrets, csi_daemonset::VERSION_KEY_SECRET).await?;
    delete_if_exists(&o.sas, csi_daemonset::NAME).await?;
    delete_if_exists(&o.crbs, csi_daemonset::NAME).await?;
    delete_if_exists(&o.crs, csi_daemonset::NAME).await?;
    Ok(())
}

/// 32 random bytes.
fn random_key() -> Vec<u8> {
    use std::io::Read as _;
    let mut key = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .expect("read /dev/urandom");
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DaemonSetStatus;

    fn ds(generation: i64, observed: i64, desired: i32, updated: i32, ready: i32) -> DaemonSet {
        let mut d = DaemonSet::default();
        d.metadata.generation = Some(generation);
        d.status = Some(DaemonSetStatus {
            observed_generation: Some(observed),
            desired_number_scheduled: desired,
            updated_number_scheduled: Some(updated),
            number_ready: ready,
            ..Default::default()
        });
        d
    }

    #[test]
    fn only_updated_and_ready_nodes_of_a_seen_spec_count() {
        assert_eq!(rollout(Some(&ds(2, 2, 3, 2, 3)), "h").summary, "2/3");
        assert_eq!(rollout(Some(&ds(2, 2, 3, 3, 1)), "h").summary, "1/3");
        // The DaemonSet controller has not seen the new spec yet: nothing counts.
        assert_eq!(rollout(Some(&ds(3, 2, 3, 3, 3)), "h").summary, "0/3");
        assert_eq!(rollout(None, "h").summary, "0/0");
    }

    #[test]
    fn a_rollout_says_no_nodes_rolling_out_or_installed() {
        let reason = |desired, ready| {
            let mut s = KubeBaoInstallationStatus::default();
            let mut v = Verdict::default();
            let r = RolloutStatus {
                desired,
                ready,
                ..Default::default()
            };
            rollout_condition(&mut v, "CSIReady", &r, "CSI provider");
            v.apply(&mut s, None);
            let c = s.conditions.iter().find(|c| c.type_ == "CSIReady").unwrap();
            (c.status.clone(), c.reason.clone())
        };
        assert_eq!(reason(0, 0), ("False".into(), "NoNodes".into()));
        assert_eq!(reason(3, 1), ("False".into(), "RollingOut".into()));
        assert_eq!(reason(3, 3), ("True".into(), "Installed".into()));
    }
}
