//! KV secrets engine, versions 1 and 2.

use serde_json::{Map, Value};

use crate::{Error, OpenBao, Result, SecretString};

/// A KV secret's data and (for KV v2) its version.
#[derive(Clone)]
pub struct KvSecret {
    /// The key/value pairs (secret values: never log them).
    pub data: Map<String, Value>,
    /// KV v2 version; 0 for KV v1.
    pub version: u64,
}

impl std::fmt::Debug for KvSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvSecret")
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .field("version", &self.version)
            .finish()
    }
}

/// KV v2 metadata: enough to know whether data changed without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvMetadata {
    /// The newest version.
    pub current_version: u64,
    /// When it was last updated (RFC 3339).
    pub updated_time: String,
}

impl OpenBao {
    /// Reads a KV v2 secret at `<mount>/data/<path>` (the latest, or `version`).
    pub async fn kv2_read(
        &self,
        token: &SecretString,
        mount: &str,
        path: &str,
        version: Option<u64>,
    ) -> Result<KvSecret> {
        let mut api = format!("{mount}/data/{path}");
        if let Some(v) = version {
            api.push_str(&format!("?version={v}"));
        }
        self.kv2_read_api_path(token, &api).await
    }

    /// Reads a KV v2 secret given its full API path (`secret/data/app`).
    pub async fn kv2_read_api_path(
        &self,
        token: &SecretString,
        api_path: &str,
    ) -> Result<KvSecret> {
        let secret = self.read(api_path, token).await?;
        let bad = |reason: &str| Error::BadResponse {
            path: api_path.into(),
            reason: reason.into(),
        };
        let outer = secret.data.ok_or_else(|| bad("no data"))?;
        // A deleted or destroyed version reads as data: null.
        let data = match outer.get("data") {
            Some(Value::Object(m)) => m.clone(),
            Some(Value::Null) => {
                return Err(Error::NotFound {
                    path: api_path.into(),
                });
            }
            _ => return Err(bad("no data.data object (is this a KV v2 mount?)")),
        };
        let version = outer
            .get("metadata")
            .and_then(|m| m.get("version"))
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no metadata.version"))?;
        Ok(KvSecret { data, version })
    }

    /// Reads KV v2 metadata at `<mount>/metadata/<path>`.
    pub async fn kv2_metadata(
        &self,
        token: &SecretString,
        mount: &str,
        path: &str,
    ) -> Result<KvMetadata> {
        let api = format!("{mount}/metadata/{path}");
        let secret = self.read(&api, token).await?;
        let data = secret.data.ok_or_else(|| Error::BadResponse {
            path: api.clone(),
            reason: "no data".into(),
        })?;
        Ok(KvMetadata {
            current_version: data
                .get("current_version")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            updated_time: data
                .get("updated_time")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into(),
        })
    }

    /// Writes a KV v2 secret; returns the new version.
    pub async fn kv2_write(
        &self,
        token: &SecretString,
        mount: &str,
        path: &str,
        data: &Map<String, Value>,
    ) -> Result<u64> {
        let api = format!("{mount}/data/{path}");
        let secret = self
            .write(&api, token, &serde_json::json!({ "data": data }))
            .await?;
        secret
            .data
            .and_then(|d| d.get("version").and_then(Value::as_u64))
            .ok_or_else(|| Error::BadResponse {
                path: api,
                reason: "no version in write response".into(),
            })
    }

    /// Reads a KV v1 secret (or any engine's plain `data`) at `path`.
    pub async fn kv1_read(&self, token: &SecretString, path: &str) -> Result<KvSecret> {
        let secret = self.read(path, token).await?;
        let data = secret
            .data
            .ok_or_else(|| Error::NotFound { path: path.into() })?;
        Ok(KvSecret { data, version: 0 })
    }
}
