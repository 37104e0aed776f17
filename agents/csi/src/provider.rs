//! One Mount: parse, log in as the pod, fetch each distinct secret once (in parallel), render
//! files and versions.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use kubebao_openbao::{ClientConfig, Error as BaoError, OpenBao, SecretString};
use kubebao_proto::csi::{File, MountResponse, ObjectVersion};
use prost::Message;
use serde_json::{Map, Value};

use crate::error::{MountError, Who};
use crate::identity::{Identities, IdentityKey, KubeClient};
use crate::metrics::Metrics;
use crate::params::{self, FetchMethod, MountParams, RequestKey};
use crate::render::{self, Versioner};

/// Agent-wide settings (flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// OpenBao address when the SecretProviderClass names none.
    pub openbao_addr: Option<String>,
    /// CA bundle file when the SecretProviderClass names none.
    pub openbao_ca_cert: Option<PathBuf>,
    /// OpenBao namespace when the SecretProviderClass names none.
    pub openbao_namespace: Option<String>,
    /// Kubernetes auth mount when the SecretProviderClass names none.
    pub auth_mount: String,
    /// Token audience when the SecretProviderClass names none ("" = the API server's default).
    pub audience: String,
    /// Kubeconfig for TokenRequests (else in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// Lifetime asked for in TokenRequests.
    pub token_request_seconds: i64,
    /// Largest encoded MountResponse.
    pub max_response_bytes: usize,
    /// Per-request timeout to OpenBao.
    pub openbao_timeout: Duration,
}

/// One OpenBao client per (address, CA file, namespace).
type ClientKey = (String, Option<String>, Option<String>);

/// The provider: caches and settings shared by every Mount.
pub struct Provider {
    settings: Settings,
    identities: Identities,
    leases: Leases,
    clients: StdMutex<HashMap<ClientKey, OpenBao>>,
    versioner: Versioner,
    metrics: Arc<Metrics>,
}

/// A dynamic secret kept for one pod while its lease is valid.
#[derive(Clone)]
struct LeaseEntry {
    data: Map<String, Value>,
    lease_id: String,
    lease_duration: Duration,
    renewable: bool,
    expires_at: Instant,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct LeaseKey {
    pod_uid: String,
    identity: IdentityKey,
    request: RequestKey,
}

#[derive(Default)]
struct Leases {
    map: StdMutex<HashMap<LeaseKey, LeaseEntry>>,
}

impl Leases {
    fn get(&self, key: &LeaseKey) -> Option<LeaseEntry> {
        self.map.lock().expect("lease lock").get(key).cloned()
    }
    fn put(&self, key: LeaseKey, entry: LeaseEntry) {
        let mut map = self.map.lock().expect("lease lock");
        let now = Instant::now();
        map.retain(|_, e| e.expires_at > now);
        map.insert(key, entry);
    }
    fn remove(&self, key: &LeaseKey) {
        self.map.lock().expect("lease lock").remove(key);
    }
}

/// What one Mount did, for logs and the caller.
pub struct MountOutcome {
    /// The response.
    pub response: MountResponse,
    /// Logins performed.
    pub logins: u32,
}

impl Provider {
    /// A provider with empty caches.
    pub fn new(settings: Settings, version_key: Vec<u8>, metrics: Arc<Metrics>) -> Self {
        let identities = Identities::new(
            KubeClient::new(settings.kubeconfig.clone()),
            settings.token_request_seconds,
            metrics.clone(),
        );
        Self {
            settings,
            identities,
            leases: Leases::default(),
            clients: StdMutex::new(HashMap::new()),
            versioner: Versioner::new(version_key),
            metrics,
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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
        if let Some(c) = self.clients.lock().expect("clients lock").get(&key) {
            return Ok(c.clone());
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
        })
        .map_err(|e| MountError::BadParameter {
            name: "openbaoAddress".into(),
            reason: e.to_string(),
        })?;
        self.clients
            .lock()
            .expect("clients lock")
            .insert(key, client.clone());
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
            requests.entry(o.request_key()).or_default().push(i);
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
            .fetch_all(client, &pod_token.token, identity, params, requests.keys())
            .await;
        let denied: Vec<RequestKey> = results
            .iter()
            .filter(|(_, r)| matches!(r, Err(e) if e.is_permission_denied()))
            .map(|(k, _)| k.clone())
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
                .fetch_all(client, &fresh.token, identity, params, denied.iter())
                .await;
            results.extend(again);
        }
        Ok((results, logins))
    }

    /// Renders every object and checks the response size.
    fn respond(
        &self,
        params: &MountParams,
        data: &HashMap<RequestKey, Map<String, Value>>,
    ) -> Result<MountResponse, MountError> {
        let mut response = MountResponse::default();
        for o in &params.objects {
            let files = render::render(o, &data[&o.request_key()], params.default_mode)?;
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
        if bytes > self.settings.max_response_bytes {
            return Err(MountError::TooLarge {
                bytes,
                limit: self.settings.max_response_bytes,
            });
        }
        Ok(response)
    }

    async fn fetch_all<'a>(
        &self,
        client: &OpenBao,
        token: &SecretString,
        identity: &IdentityKey,
        params: &MountParams,
        keys: impl Iterator<Item = &'a RequestKey>,
    ) -> Fetched {
        let futures = keys.map(|key| async move {
            let args = params
                .objects
                .iter()
                .find(|o| &o.request_key() == key)
                .map(|o| o.args.clone())
                .unwrap_or_default();
            let lease_key = LeaseKey {
                pod_uid: params.pod.uid.clone(),
                identity: identity.clone(),
                request: key.clone(),
            };
            let r = self.fetch(client, token, key, &args, lease_key).await;
            (key.clone(), r)
        });
        futures::future::join_all(futures)
            .await
            .into_iter()
            .collect()
    }

    /// One distinct request: from the pod's lease cache while its lease is valid, else OpenBao.
    async fn fetch(
        &self,
        client: &OpenBao,
        token: &SecretString,
        key: &RequestKey,
        args: &Map<String, Value>,
        lease_key: LeaseKey,
    ) -> Result<Map<String, Value>, BaoError> {
        if let Some(entry) = self.leases.get(&lease_key) {
            let now = Instant::now();
            let remaining = entry.expires_at.saturating_duration_since(now);
            // Keep using a lease until the last tenth of its life (at least 10 s).
            let floor = (entry.lease_duration / 10).max(Duration::from_secs(10));
            if entry.renewable && remaining < entry.lease_duration / 2 {
                self.metrics.openbao("renew");
                match client
                    .renew_lease(token, &entry.lease_id, entry.lease_duration)
                    .await
                {
                    Ok(s) if s.lease_duration > 0 => {
                        Metrics::count(&self.metrics.lease_cache, "renewed");
                        let mut renewed = entry.clone();
                        renewed.lease_duration = Duration::from_secs(s.lease_duration);
                        renewed.expires_at = now + renewed.lease_duration;
                        self.leases.put(lease_key, renewed);
                        return Ok(entry.data);
                    }
                    Ok(_) | Err(_) if remaining > floor => {
                        // Not renewed (max TTL reached, or OpenBao busy): still valid for a while.
                        Metrics::count(&self.metrics.lease_cache, "hit");
                        return Ok(entry.data);
                    }
                    _ => {}
                }
            } else if remaining > floor {
                Metrics::count(&self.metrics.lease_cache, "hit");
                return Ok(entry.data);
            }
            self.leases.remove(&lease_key);
        }
        let (path, body) = match key.method {
            FetchMethod::Get => (with_query(&key.path, args), None),
            _ => (key.path.clone(), Some(Value::Object(args.clone()))),
        };
        self.metrics.openbao(match key.method {
            FetchMethod::Get => "read",
            _ => "write",
        });
        let secret = client
            .call(key.method.http(), &path, Some(token), body.as_ref())
            .await?;
        let data = secret.data.ok_or_else(|| BaoError::NotFound {
            path: key.path.clone(),
        })?;
        if !secret.lease_id.is_empty() && secret.lease_duration > 0 {
            Metrics::count(&self.metrics.lease_cache, "miss");
            let lease_duration = Duration::from_secs(secret.lease_duration);
            self.leases.put(
                lease_key,
                LeaseEntry {
                    data: data.clone(),
                    lease_id: secret.lease_id,
                    lease_duration,
                    renewable: secret.renewable,
                    expires_at: Instant::now() + lease_duration,
                },
            );
        }
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

/// `path?k=v&…` with each part percent-encoded (GET `secretArgs`).
fn with_query(path: &str, args: &Map<String, Value>) -> String {
    if args.is_empty() {
        return path.to_string();
    }
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let query: Vec<String> = args
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("{}={}", enc(k), enc(&v))
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn get_arguments_become_an_encoded_query() {
        let args = json!({"version": 2, "name": "a b&c"});
        assert_eq!(
            with_query("secret/data/x", args.as_object().unwrap()),
            "secret/data/x?name=a%20b%26c&version=2"
        );
        assert_eq!(with_query("kv/x", &Map::new()), "kv/x");
    }
}
