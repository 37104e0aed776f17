//! Why the plugin cannot serve right now, as Status `healthz` and /readyz say it: each reason
//! names what is wrong and what to do. Also the one rule that tells a dead token (a
//! credentials problem) from a policy that lacks a capability.

use kubebao_openbao::{CredentialSource, Error as BaoError};

/// Why the plugin is not healthy (Status `healthz` shows the message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// All good.
    Ok,
    /// No probe has finished yet.
    Starting,
    /// OpenBao cannot be reached.
    Unreachable(String),
    /// OpenBao is sealed.
    Sealed(String),
    /// The key does not exist.
    KeyMissing(String),
    /// The key exists but cannot serve KMS.
    KeyUnusable(String),
    /// The token is valid but its policy lacks a capability.
    PermissionDenied(String),
    /// The token expired or was revoked, and no valid one could be had (see [`token_refused`]).
    TokenInvalid(String),
    /// No token: the credentials could not be read or the login failed otherwise.
    NoToken(String),
    /// Anything else.
    Error(String),
}

impl Health {
    /// The text Status returns.
    pub fn healthz(&self) -> String {
        match self {
            Health::Ok => "ok".into(),
            Health::Starting => "starting: the first key probe has not finished".into(),
            Health::Unreachable(m) => format!("unreachable: {m}"),
            Health::Sealed(m) => format!("sealed: {m}"),
            Health::KeyMissing(m) => format!("key missing: {m}"),
            Health::KeyUnusable(m) => format!("key unusable: {m}"),
            Health::PermissionDenied(m) => format!(
                "permission denied by policy: {m}; add the capability to the plugin's policy (kubebao-kms doctor names it)"
            ),
            Health::TokenInvalid(m) => format!("credentials: {m}"),
            Health::NoToken(m) => format!("no token: {m}"),
            Health::Error(m) => format!("error: {m}"),
        }
    }

    /// The reason for an OpenBao error; `source` and `logged_in_before` word the message of
    /// a refused token.
    pub fn from_error(e: &BaoError, source: &CredentialSource, logged_in_before: bool) -> Health {
        let m = e.to_string();
        match e {
            _ if token_refused(e) => {
                Health::TokenInvalid(credentials_problem(e, source, logged_in_before))
            }
            BaoError::Unreachable { .. } => Health::Unreachable(m),
            BaoError::Sealed { .. } => Health::Sealed(m),
            // The client is built before serving: only the credential files fail like this.
            BaoError::Config(_) => Health::NoToken(m),
            _ if on_auth_path(e) => Health::NoToken(m),
            BaoError::PermissionDenied { .. } => Health::PermissionDenied(m),
            BaoError::NotFound { .. } => Health::KeyMissing(m),
            _ => Health::Error(m),
        }
    }
}

/// True for an error of a login or token call: OpenBao keeps `auth/` for auth methods, so no
/// Transit path starts with it.
fn on_auth_path(e: &BaoError) -> bool {
    let path = match e {
        BaoError::PermissionDenied { path, .. }
        | BaoError::NotFound { path }
        | BaoError::Invalid { path, .. }
        | BaoError::Server { path, .. }
        | BaoError::BadResponse { path, .. } => path,
        BaoError::Unreachable { .. } | BaoError::Sealed { .. } | BaoError::Config(_) => {
            return false;
        }
    };
    path.starts_with("auth/")
}

/// True when OpenBao refused the plugin's token itself rather than a capability on a path.
///
/// The session decides this (kubebao_openbao's token rules): on a 403 it asks `lookup-self`
/// whether the token is dead; a live token hands back the original 403 (on the Transit path:
/// a policy gap), a dead one is replaced by a login, and when that login is refused too the
/// error is the login's (`auth/token/lookup-self` for a token file, `auth/<mount>/login`).
pub fn token_refused(e: &BaoError) -> bool {
    e.is_permission_denied() && on_auth_path(e)
}

/// "the plugin's OpenBao token is no longer valid: …" with what OpenBao said and the fix for
/// this credential source.
pub fn credentials_problem(
    e: &BaoError,
    source: &CredentialSource,
    logged_in_before: bool,
) -> String {
    let refused = match e {
        BaoError::PermissionDenied { path, message } => {
            format!("OpenBao refused {path} ({message})")
        }
        other => other.to_string(),
    };
    let what = if logged_in_before {
        "the plugin's OpenBao token is no longer valid"
    } else {
        "the plugin has no valid OpenBao token"
    };
    let fix = match source {
        CredentialSource::TokenFile(p) => format!(
            "the token expired or was revoked: write a valid token to {} (re-read at the next attempt)",
            p.display()
        ),
        CredentialSource::AppRoleFiles { secret_id_file, .. } => format!(
            "an AppRole login was refused: write a current secret_id to {}",
            secret_id_file.display()
        ),
        CredentialSource::KubernetesJwtFile { role, jwt_file, .. }
        | CredentialSource::JwtFile { role, jwt_file, .. } => format!(
            "a login as role {role:?} was refused: check the role and that {} holds a current token",
            jwt_file.display()
        ),
        CredentialSource::Static(_) => {
            "the token expired or was revoked: restart the plugin with valid credentials".into()
        }
    };
    format!("{what}: {refused}; {fix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn a_refused_token_is_a_credentials_problem_and_a_policy_gap_is_not() {
        let source = CredentialSource::TokenFile(PathBuf::from("/etc/kms/token"));
        let dead = BaoError::PermissionDenied {
            path: "auth/token/lookup-self".into(),
            message: "permission denied".into(),
        };
        let h = Health::from_error(&dead, &source, true);
        let text = h.healthz();
        assert!(
            text.starts_with("credentials: the plugin's OpenBao token is no longer valid: "),
            "{text}"
        );
        assert!(text.contains("/etc/kms/token"), "{text}");
        assert!(!text.contains("by policy"), "{text}");
        let policy = BaoError::PermissionDenied {
            path: "transit/decrypt/kms".into(),
            message: "permission denied".into(),
        };
        let text = Health::from_error(&policy, &source, true).healthz();
        assert!(text.starts_with("permission denied by policy: "), "{text}");
        assert!(!token_refused(&policy));
        let login = BaoError::PermissionDenied {
            path: "auth/approle/login".into(),
            message: "invalid role or secret ID".into(),
        };
        let approle = CredentialSource::AppRoleFiles {
            mount: "approle".into(),
            role_id_file: "/r".into(),
            secret_id_file: "/s".into(),
        };
        let text = Health::from_error(&login, &approle, false).healthz();
        assert!(
            text.contains("the plugin has no valid OpenBao token") && text.contains("/s"),
            "{text}"
        );
    }
}
