//! ACL policies under `sys/policies/acl`.

use serde_json::{Value, json};

use crate::{Error, OpenBao, Result, SecretString};

/// How to write a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyWrite {
    /// Create only: fails if a policy of that name exists (check-and-set -1).
    CreateOnly,
    /// Overwrite whatever is there.
    Overwrite,
}

/// What a create-only write found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyWriteOutcome {
    /// The policy was written.
    Written,
    /// A policy of that name already existed; nothing was written.
    AlreadyExists,
}

impl OpenBao {
    /// Reads a policy's HCL, or None when it does not exist.
    pub async fn policy_read(&self, token: &SecretString, name: &str) -> Result<Option<String>> {
        match self.read(&format!("sys/policies/acl/{name}"), token).await {
            Ok(secret) => Ok(secret
                .data
                .and_then(|d| d.get("policy").and_then(Value::as_str).map(str::to_string))),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes a policy.
    pub async fn policy_write(
        &self,
        token: &SecretString,
        name: &str,
        hcl: &str,
        mode: PolicyWrite,
    ) -> Result<PolicyWriteOutcome> {
        let mut body = json!({"policy": hcl});
        if mode == PolicyWrite::CreateOnly {
            body["cas"] = json!(-1);
        }
        match self
            .write(&format!("sys/policies/acl/{name}"), token, &body)
            .await
        {
            Ok(_) => Ok(PolicyWriteOutcome::Written),
            Err(Error::Invalid { message, .. })
                if mode == PolicyWrite::CreateOnly && message.contains("check-and-set") =>
            {
                Ok(PolicyWriteOutcome::AlreadyExists)
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes a policy (no error if absent).
    pub async fn policy_delete(&self, token: &SecretString, name: &str) -> Result<()> {
        match self
            .delete(&format!("sys/policies/acl/{name}"), token)
            .await
        {
            Err(Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }
}
