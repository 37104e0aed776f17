//! What can go wrong talking to OpenBao, in terms a user can act on.

/// Result of an OpenBao call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An OpenBao call failed. Messages name the path and the cause, never a secret value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server could not be reached (connection refused, DNS, TLS, timeout).
    #[error("OpenBao at {addr} is unreachable: {reason}; check the address, network and CA bundle")]
    Unreachable {
        /// The server address.
        addr: String,
        /// The transport error, without request bodies.
        reason: String,
    },
    /// The server is sealed (or not initialised) and cannot serve requests.
    #[error("OpenBao at {addr} is sealed; unseal it (bao operator unseal) and requests resume")]
    Sealed {
        /// The server address.
        addr: String,
    },
    /// 403: the token lacks a capability on the path, or is expired or revoked.
    #[error("permission denied on {path}: {message}")]
    PermissionDenied {
        /// The API path.
        path: String,
        /// OpenBao's error text.
        message: String,
    },
    /// 404: nothing at the path (or the engine is not mounted there).
    #[error("nothing found at {path}; check the path and that the secrets engine is mounted there")]
    NotFound {
        /// The API path.
        path: String,
    },
    /// 400 and other 4xx: OpenBao refused the request as given.
    #[error("OpenBao refused the request to {path} ({status}): {message}")]
    Invalid {
        /// The API path.
        path: String,
        /// HTTP status.
        status: u16,
        /// OpenBao's error text.
        message: String,
    },
    /// 5xx other than sealed.
    #[error("OpenBao failed the request to {path} ({status}): {message}")]
    Server {
        /// The API path.
        path: String,
        /// HTTP status.
        status: u16,
        /// OpenBao's error text.
        message: String,
    },
    /// The response did not have the shape the API documents.
    #[error("unexpected response from OpenBao for {path}: {reason}")]
    BadResponse {
        /// The API path.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// Local configuration problem (bad CA file, bad address).
    #[error("OpenBao client configuration: {0}")]
    Config(String),
}

impl Error {
    /// True when retrying later may succeed (OpenBao down, sealed, or failing).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. } | Error::Sealed { .. } | Error::Server { .. }
        )
    }
    /// True for 403.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, Error::PermissionDenied { .. })
    }
    /// True for 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
    /// A copy, for errors remembered and handed out again (a failed login during its backoff).
    /// `Error` is not `Clone` on purpose: copies are made only where an error is remembered.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Unreachable { addr, reason } => Error::Unreachable {
                addr: addr.clone(),
                reason: reason.clone(),
            },
            Error::Sealed { addr } => Error::Sealed { addr: addr.clone() },
            Error::PermissionDenied { path, message } => Error::PermissionDenied {
                path: path.clone(),
                message: message.clone(),
            },
            Error::NotFound { path } => Error::NotFound { path: path.clone() },
            Error::Invalid {
                path,
                status,
                message,
            } => Error::Invalid {
                path: path.clone(),
                status: *status,
                message: message.clone(),
            },
            Error::Server {
                path,
                status,
                message,
            } => Error::Server {
                path: path.clone(),
                status: *status,
                message: message.clone(),
            },
            Error::BadResponse { path, reason } => Error::BadResponse {
                path: path.clone(),
                reason: reason.clone(),
            },
            Error::Config(m) => Error::Config(m.clone()),
        }
    }

    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Unreachable { .. } => "unreachable",
            Error::Sealed { .. } => "sealed",
            Error::PermissionDenied { .. } => "permission_denied",
            Error::NotFound { .. } => "not_found",
            Error::Invalid { .. } => "invalid",
            Error::Server { .. } => "server",
            Error::BadResponse { .. } => "bad_response",
            Error::Config(_) => "config",
        }
    }
}
