//! Calls to any secrets engine (`method` + arguments), and the leases of what they issue,
//! renewed and revoked by lease id in the URL so a policy can allow it for one engine path only.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::{OpenBao, Result, Secret, SecretString};

/// `path` with `args` as an encoded query string (a GET request's arguments). Values that are
/// not strings are sent as their JSON text.
pub fn with_query(path: &str, args: &Map<String, Value>) -> String {
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

impl OpenBao {
    /// Calls a secrets engine at `path`: GET with `args` as query parameters, any other method
    /// with `args` as the JSON body. The answer may carry a lease (`lease_id`).
    pub async fn engine_call(
        &self,
        token: &SecretString,
        method: Method,
        path: &str,
        args: &Map<String, Value>,
    ) -> Result<Secret> {
        if method == Method::GET {
            return self
                .call(method, &with_query(path, args), Some(token), None)
                .await;
        }
        let body = Value::Object(args.clone());
        self.call(method, path, Some(token), Some(&body)).await
    }

    /// `sys/leases/renew/<lease_id>`: extends a lease by `increment` (OpenBao grants less when
    /// the lease's max TTL is near). The lease id is in the URL, so a policy can allow it for
    /// one engine path (`sys/leases/renew/database/creds/app/*`), not for every lease.
    pub async fn renew_lease_scoped(
        &self,
        token: &SecretString,
        lease_id: &str,
        increment: Duration,
    ) -> Result<Secret> {
        let path = format!("sys/leases/renew/{lease_id}");
        let body = json!({"increment": increment.as_secs()});
        self.call(Method::PUT, &path, Some(token), Some(&body))
            .await
    }

    /// `sys/leases/revoke/<lease_id>`: revokes a lease at once (the engine removes the
    /// credentials, e.g. drops the database user). A lease OpenBao no longer knows is not an
    /// error. Scoped by path like [`OpenBao::renew_lease_scoped`].
    pub async fn revoke_lease_scoped(&self, token: &SecretString, lease_id: &str) -> Result<()> {
        let path = format!("sys/leases/revoke/{lease_id}");
        self.request(Method::PUT, &path, Some(token), None)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
