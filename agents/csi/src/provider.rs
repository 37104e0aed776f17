//! One Mount: parse, prove and log in as the pod, fetch each distinct secret once (at most
//! `MAX_READS_IN_FLIGHT` at a time), render files and versions.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kubebao_openbao::{ClientConfig, Error as BaoError, OpenBao, SecretString};
use kubebao_proto::csi::{File, MountResponse, ObjectVersion};
use prost::Message;
use serde_json::{Map, Value};

use crate::bounded::BoundedMap;
use crate::error::{MountError, Who};
use crate::identity::{Identities, IdentityKey, KubeClient, MAX_IDENTITIES};
use crate::leases::{LeaseKey, Leases};
use crate::metrics::Metrics;
use crate::params::{self, FetchMethod, MountParams, RequestKey};
use crate::render::{self, Versioner};

/// Most OpenBao reads one Mount has in flight: parallel enough for a many-object
/// SecretProviderClass, without one Mount opening dozens of connections at once.
pub const MAX_READS_IN_FLIGHT: usize = 8;
/// Most OpenBao clients (distinct address, CA file, namespace) kept. Each holds its TLS roots
/// and connection pool (about 100 KiB with the system roots), and the identities whose tokens
/// were made with an evicted client are forgotten with it, so SecretProviderClasses naming
/// ever new addresses cannot grow the agent.
const MAX_CLIENTS: usize = 64;

/// Agent-wide settings (flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// OpenBao address when the SecretProviderClass names none.
    pub openbao_addr: Option<String>,
    /// CA bundle file when the SecretProviderClass names none.
    pub openbao_ca_cert: Option<PathBuf>,
    /// OpenBao namespace when the SecretProviderClass names none.
    pub openbao_namespace: Option<String>,
    /// Plain http:// to a loopback OpenBao is allowed (the agent's flag only: a
    /// SecretProviderClass cannot turn it on).
    pub allow_plain_http: bool,
    /// Kubernetes auth mount when the SecretProviderClass names none.
    pub auth_mount: String,
    /// Token audience when the SecretProviderClass names none ("" = the API server's default).
    pub audience: String,
    /// Kubeconfig for TokenRequests and TokenReviews (else in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// Lifetime asked for in TokenRequests.
    pub token_request_seconds: i64,
    /// Largest encoded MountResponse.
    pub max_response_bytes: usize,
    /// Per-request timeout to OpenBao.
    pub openbao_timeout: Duration,
}

impl Default for Settings {
    /// The flags' defaults.
    fn default() -> Self {
        Self {
            openbao_addr: None,
            openbao_ca_cert: None,
            openbao_namespace: None,
            allow_plain_http: false,
            auth_mount: "kubernetes".into(),
            audience: String::new(),
            kubeconfig: None,
            token_request_seconds: 600,
            max_response_bytes: 4 * 1024 * 1024,
            openbao_timeout: Duration::from_secs(10),
        }
    }
}

/// One OpenBao client per (address, CA file, namespace).
type ClientKey = (String, Option<String>, Option<String>);

/// The provider: caches and settings shared by every Mount.
pub struct Provider {
    settings: Settings,
    identities: Identities,
    leases: Leases,
    clients: BoundedMap<ClientKey, OpenBao>,
    /// The client each identity's token is held with (the token cache keeps that client).
    client_of: BoundedMap<IdentityKey, ClientKey>,
    versioner: Versioner,
    metrics: Arc<Metrics>,
}

/// What one Mount did, for logs and the caller.
pub struct MountOutcome {
    /// The response.
    pub response: MountResponse,
    /// Logins performed.
    pub logins: u32,
}

impl Provider {
    /// A provider with empty caches, reaching Kubernetes through `settings.kubeconfig`.
    pub fn new(settings: Settings, version_key: Vec<u8>, metrics: Arc<Metrics>) -> Self {
        let kube = KubeClient::new(settings.kubeconfig.clone());
        Self::with_kube(settings, version_key, metrics, kube)
    }

    /// A provider with empty caches, reaching Kubernetes through `kube`.
    pub fn with_kube(
        settings: Settings,
        version_key: Vec<u8>,
        metrics: Arc<Metrics>,
        kube: KubeClient,
    ) -> Self {
        let identities = Identities::new(kube, settings.token_request_seconds, metrics.clone());
        Self {
            settings,
            identities,
            leases: Leases::new(metrics.clone()),
            clients: BoundedMap::new(MAX_CLIENTS, usize::MAX),
            client_of: BoundedMap::new(MAX_IDENTITIES, usize::MAX),
            versioner: Versioner::new(version_key),
            metrics,
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The client for the agent's default OpenBao (`--openbao-addr`), if one is set; Err when
    /// the flags do not make a usable client (checked at start).
    pub fn default_client(&self) -> Option<Result<OpenBao, MountError>> {
        let address = self.settings.openbao_addr.as_deref()?;
        let ca = self
            .settings
            .openbao_ca_cert
            .as_ref()
            .map(|p| p.display().to_string());
        let namespace = self.settings.openbao_namespace.as_deref();
        Some(self.client(address, ca.as_deref(), namespace))
    }

    fn client(
        &self,
        address: &str,
        ca_path: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<OpenBao, MountError> {
        let key = (
            address.to_string(),
            ca_path.map(str::to_string),
            namespace.map(str::to_string),
        );
        if let Some(c) = self.clients.get(&key) {
            return Ok(c);
        }
        let ca_pem = match ca_path {
            Some(p) => Some(std::fs::read(p).map_err(|e| MountError::BadParameter {
                name: "openbaoCACertPath".into(),
                reason: format!("cannot read {p} on the node: {e}"),
            })?),
            None => None,
        };
        let client = OpenBao::new(&ClientConfig {
            address: address.to_string(),
            ca_pem,
            namespace: namespace.map(str::to_string),
            timeout: Some(self.settings.openbao_timeout),
            allow_plain_http: self.settings.allow_plain_http,
        })
        .map_err(|e| MountError::BadParameter {
            name: "openbaoAddress".into(),
            reason: e.to_string(),
        })?;
        for (evicted, _) in self.clients.insert(key, client.clone(), 1) {
            let mut gone = Vec::new();
            self.client_of.retain(|identity, k| {
                let keep = *k != evicted;
                if !keep {
                    gone.push(identity.clone());
                }
                keep
            });
            self.identities.forget(gone);
        }
        Ok(client)
    }

    /// Serves one Mount request.
    pub async fn mount(
        &self,
        attributes: &str,
        permission: &str,
    ) -> Result<MountOutcome, MountError> {
        let params = params::parse(attributes, permission)?;
        let login = self.login_for(&params)?;
        let who = Who {
            role: params.role.clone(),
            namespace: params.pod.namespace.clone(),
            service_account: params.pod.service_account.clone(),
        };
        // Each distinct (path, method, args) once, whatever the number of objects using it.
        let mut requests: BTreeMap<RequestKey, Vec<usize>> = BTreeMap::new();
        for (i, o) in params.objects.iter().enumerate() {
            requests.entry(o.request_key().clone()).or_default().push(i);
        }
        let (results, logins) = self.fetch_as_pod(&login, &params, &requests).await?;
        let data = secret_data(results, &requests, &params, &who)?;
        let response = self.respond(&params, &data)?;
        Ok(MountOutcome { response, logins })
    }

    /// Where and as whom a Mount logs in: the SecretProviderClass's settings over the agent's.
    fn login_for(&self, params: &MountParams) -> Result<PodLogin, MountError> {
        let address = params
            .address
            .clone()
            .or_else(|| self.settings.openbao_addr.clone())
            .ok_or_else(|| MountError::BadParameter {
                name: "openbaoAddress".into(),
                reason: "not set, and the agent has no default (--openbao-addr)".into(),
            })?;
        let ca_path = params.ca_cert_path.clone().or_else(|| {
            self.settings
                .openbao_ca_cert
                .as_ref()
                .map(|p| p.display().to_string())
        });
        let namespace = params
            .namespace
            .clone()
            .or_else(|| self.settings.openbao_namespace.clone());
        let client = self.client(&address, ca_path.as_deref(), namespace.as_deref())?;
        let client_key = (address.clone(), ca_path, namespace.clone());
        let identity = IdentityKey {
            address,
            openbao_namespace: namespace.unwrap_or_default(),
            auth_mount: params
                .auth_mount
                .clone()
                .unwrap_or_else(|| self.settings.auth_mount.clone()),
            role: params.role.clone(),
            namespace: params.pod.namespace.clone(),
            service_account: params.pod.service_account.clone(),
        };
        let audience = params
            .audience
            .clone()
            .unwrap_or_else(|| self.settings.audience.clone());
        self.client_of.insert(identity.clone(), client_key, 1);
        Ok(PodLogin {
            client,
            identity,
            audience,
        })
    }

    /// Fetches every request as the pod; returns the results and the logins it took.
    async fn fetch_as_pod(
        &self,
        login: &PodLogin,
        params: &MountParams,
        requests: &BTreeMap<RequestKey, Vec<usize>>,
    ) -> Result<(Fetched, u32), MountError> {
        let (client, identity, pod) = (&login.client, &login.identity, &params.pod);
        let pod_token = self
            .identities
            .token(identity, client, pod, &login.audience)
            .await?;
        let mut logins = u32::from(!pod_token.cached);
        let mut results = self
            .fetch_all(client, &pod_token.token, identity, params, requests)
            .await;
        let denied: BTreeMap<RequestKey, Vec<usize>> = results
            .iter()
            .filter(|(_, r)| matches!(r, Err(e) if e.is_permission_denied()))
            .map(|(k, _)| (k.clone(), requests[k].clone()))
            .collect();
        // A cached token that OpenBao now refuses: when it is dead (revoked, expired), a fresh
        // login replaces it and the refused requests are retried once; a live token means the
        // policy lacks the path, and the 403 stands.
        if pod_token.cached
            && !denied.is_empty()
            && let Some(fresh) = self
                .identities
                .denied(identity, client, pod, &login.audience, &pod_token.token)
                .await?
        {
            logins += u32::from(!fresh.cached);
            let again = self
                .fetch_all(client, &fresh.token, identity, params, &denied)
                .await;
            results.extend(again);
        }
        Ok((results, logins))
    }

    /// Renders every object and checks the response size (as it grows, so a Mount whose
    /// files are too large stops at the limit instead of rendering everything first).
    fn respond(
        &self,
        params: &MountParams,
        data: &HashMap<RequestKey, Map<String, Value>>,
    ) -> Result<MountResponse, MountError> {
        let limit = self.settings.max_response_bytes;
        let mut response = MountResponse::default();
        let mut bytes = 0;
        for o in params.objects.iter() {
            let files = render::render(o, &data[o.request_key()], params.default_mode)?;
            bytes += files
                .iter()
                .map(|f| f.contents.len() + f.path.len())
                .sum::<usize>();
            if bytes > limit {
                return Err(MountError::TooLarge { bytes, limit });
            }
            response.object_version.push(ObjectVersion {
                id: o.name.clone(),
                version: self.versioner.version(&o.name, &files),
            });
            response.files.extend(files.into_iter().map(|f| File {
                path: f.path,
                mode: f.mode as i32,
                contents: f.contents,
            }));
        }
        let bytes = response.encoded_len();
        if bytes > limit {
            return Err(MountError::TooLarge { bytes, limit });
        }
        Ok(response)
    }

    /// Fetches `requests`, at most `MAX_READS_IN_FLIGHT` at a time.
    async fn fetch_all(
        &self,
        client: &OpenBao,
        token: &SecretString,
        identity: &IdentityKey,
        params: &MountParams,
        requests: &BTreeMap<RequestKey, Vec<usize>>,
    ) -> Fetched {
        let fetches: Vec<_> = requests
            .iter()
            .map(|(key, objects)| {
                let args = &params.objects[objects[0]].args;
                let lease_key = LeaseKey {
                    pod_uid: params.pod.uid.clone(),
                    identity: identity.clone(),
                    request: key.clone(),
                };
                self.fetch(client, token, key, args, lease_key)
            })
            .collect();
        futures::stream::iter(fetches)
            .buffer_unordered(MAX_READS_IN_FLIGHT)
            .collect()
            .await
    }

    /// One distinct request, with its key (an `async fn`, so the futures `fetch_all` buffers
    /// have one lifetime).
    async fn fetch(
        &self,
        client: &OpenBao,
        token: &SecretString,
        key: &RequestKey,
        args: &Map<String, Value>,
        lease_key: LeaseKey,
    ) -> (RequestKey, Result<Map<String, Value>, BaoError>) {
        let result = self
            .fetch_fresh_or_kept(client, token, key, args, lease_key)
            .await;
        (key.clone(), result)
    }

    /// The pod's kept lease while it lives, else OpenBao.
    async fn fetch_fresh_or_kept(
        &self,
        client: &OpenBao,
        token: &SecretString,
        key: &RequestKey,
        args: &Map<String, Value>,
        lease_key: LeaseKey,
    ) -> Result<Map<String, Value>, BaoError> {
        if let Some(data) = self.leases.serve(client, token, &lease_key).await? {
            return Ok(data);
        }
        let (path, body) = match key.method {
            FetchMethod::Get => (kubebao_openbao::with_query(&key.path, args), None),
            _ => (key.path.clone(), Some(Value::Object(args.clone()))),
        };
        self.metrics.openbao(match key.method {
            FetchMethod::Get => "read",
            _ => "write",
        });
        let mut secret = client
            .call(key.method.http(), &path, Some(token), body.as_ref())
            .await?;
        let data = secret.data.take().ok_or_else(|| BaoError::NotFound {
            path: key.path.clone(),
        })?;
        self.leases.keep(lease_key, client, token, &secret, &data);
        Ok(data)
    }
}

/// Each distinct request's data, or why OpenBao refused it.
type Fetched = BTreeMap<RequestKey, Result<Map<String, Value>, BaoError>>;

/// Where and as whom one Mount logs in.
struct PodLogin {
    client: OpenBao,
    identity: IdentityKey,
    audience: String,
}

/// Each request's data, or the first failure said in terms of the objects that needed it.
fn secret_data(
    results: Fetched,
    requests: &BTreeMap<RequestKey, Vec<usize>>,
    params: &MountParams,
    who: &Who,
) -> Result<HashMap<RequestKey, Map<String, Value>>, MountError> {
    let mut data = HashMap::new();
    for (key, result) in results {
        let objects: Vec<String> = requests[&key]
            .iter()
            .map(|&i| params.objects[i].name.clone())
            .collect();
        let d = result.map_err(|e| classify(e, who, objects.clone()))?;
        let d = render::secret_data(&key.path, d).map_err(|deleted| MountError::NotFound {
            path: format!(
                "{} (its latest KV version is deleted or destroyed)",
                deleted.path
            ),
            objects,
        })?;
        data.insert(key, d);
    }
    Ok(data)
}

/// OpenBao's errors, said in terms of the Mount.
fn classify(e: BaoError, who: &Who, objects: Vec<String>) -> MountError {
    match e {
        BaoError::PermissionDenied { path, message } => MountError::PermissionDenied {
            path,
            who: Box::new(who.clone()),
            objects,
            message,
        },
        BaoError::NotFound { path } => MountError::NotFound { path, objects },
        e if e.is_unavailable() => MountError::Unavailable(e),
        source => MountError::OpenBao { objects, source },
    }
}

#[cfg(test)]
mod tests;
