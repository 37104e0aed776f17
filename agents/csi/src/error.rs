//! Why a Mount failed, in words a pod's owner can act on, with a short stable code.
//!
//! The driver shows a gRPC error's message in the pod's events, while a `MountResponse.error.code`
//! only becomes "mount request failed with provider error code X". So a failed Mount is a gRPC
//! status whose message starts with the short code (`[permission_denied] …`); the code is also
//! sent as the `kubebao-error-code` metadata entry and labels the mounts metric.

use kubebao_openbao::Error as BaoError;

/// Who the Mount logged in as, for error messages.
#[derive(Debug, Clone)]
pub struct Who {
    /// OpenBao role.
    pub role: String,
    /// Pod namespace.
    pub namespace: String,
    /// ServiceAccount name.
    pub service_account: String,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "role {:?} as {}/{}",
            self.role, self.namespace, self.service_account
        )
    }
}

/// A failed Mount. Messages never hold secret values or tokens.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A parameter is missing or malformed.
    #[error("parameter {name}: {reason}")]
    BadParameter {
        /// The parameter (e.g. `objects[1].secretKey`).
        name: String,
        /// What is wrong and what to write instead.
        reason: String,
    },
    /// OpenBao sealed, unreachable or failing.
    #[error("{0}")]
    Unavailable(BaoError),
    /// Kubernetes auth refused the login.
    #[error(
        "OpenBao login refused for {who} at auth/{mount}: {message}; check that the role exists and \
         binds this ServiceAccount and namespace (bound_service_account_names/namespaces) and the token audience"
    )]
    LoginRefused {
        /// Who tried.
        who: Who,
        /// Auth mount.
        mount: String,
        /// OpenBao's reason.
        message: String,
    },
    /// No ServiceAccount token could be had for the pod.
    #[error(
        "no ServiceAccount token for {namespace}/{service_account} (audience {audience:?}): {reason}"
    )]
    NoToken {
        /// Pod namespace.
        namespace: String,
        /// ServiceAccount.
        service_account: String,
        /// Audience wanted.
        audience: String,
        /// Why.
        reason: String,
    },
    /// The ServiceAccount token the request carries does not prove the pod's identity.
    #[error(
        "the ServiceAccount token sent for pod {namespace}/{pod} does not prove that it runs as \
         {namespace}/{service_account}: {reason}; the driver must send the pod's own token \
         (CSIDriver tokenRequests)"
    )]
    BadToken {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        pod: String,
        /// The ServiceAccount the request claims.
        service_account: String,
        /// What the Kubernetes API said instead (never the token).
        reason: String,
    },
    /// Too many Mounts at once: the agent bounds its memory.
    #[error(
        "the agent is already serving {in_flight} Mounts with {waiting} more waiting; this one is \
         refused so memory stays bounded, and the driver retries it"
    )]
    Busy {
        /// Mounts being served.
        in_flight: usize,
        /// Mounts waiting.
        waiting: usize,
    },
    /// The pod's token may not read the path.
    #[error(
        "permission denied on {path} for {who} (objects {objects:?}): {message}; grant the role's policy \
         the needed capability on this path"
    )]
    PermissionDenied {
        /// API path.
        path: String,
        /// Who read.
        who: Box<Who>,
        /// Objects that needed the path.
        objects: Vec<String>,
        /// OpenBao's reason.
        message: String,
    },
    /// Nothing at the path.
    #[error(
        "nothing at {path} (objects {objects:?}); check secretPath (KV v2 paths read as <mount>/data/<name>) \
         and that the engine is mounted"
    )]
    NotFound {
        /// API path.
        path: String,
        /// Objects that needed the path.
        objects: Vec<String>,
    },
    /// The secret has no such key.
    #[error("object {object:?}: key {key:?} not found at {path}; keys there: {available:?}")]
    KeyNotFound {
        /// Object name.
        object: String,
        /// API path.
        path: String,
        /// The key asked for.
        key: String,
        /// The keys that exist (names only).
        available: Vec<String>,
    },
    /// A value could not be turned into file contents.
    #[error("object {object:?}: {reason}")]
    BadValue {
        /// Object name.
        object: String,
        /// Why (never the value).
        reason: String,
    },
    /// OpenBao refused the request as given or answered oddly.
    #[error("objects {objects:?}: {source}")]
    OpenBao {
        /// Objects that needed the call.
        objects: Vec<String>,
        /// The error.
        source: BaoError,
    },
    /// The files would exceed what the driver accepts.
    #[error(
        "the response would be {bytes} bytes, more than the driver accepts ({limit}); mount fewer or smaller objects"
    )]
    TooLarge {
        /// Encoded size.
        bytes: usize,
        /// Limit.
        limit: usize,
    },
}

impl MountError {
    /// Short, stable code (metric label, `kubebao-error-code`, message prefix).
    pub fn code(&self) -> &'static str {
        match self {
            MountError::BadParameter { .. } => "bad_parameter",
            MountError::Unavailable(BaoError::Sealed { .. }) => "openbao_sealed",
            MountError::Unavailable(_) => "openbao_unavailable",
            MountError::LoginRefused { .. } => "login_refused",
            MountError::NoToken { .. } => "no_token",
            MountError::BadToken { .. } => "bad_token",
            MountError::Busy { .. } => "busy",
            MountError::PermissionDenied { .. } => "permission_denied",
            MountError::NotFound { .. } => "not_found",
            MountError::KeyNotFound { .. } => "key_not_found",
            MountError::BadValue { .. } => "bad_value",
            MountError::OpenBao { .. } => "openbao_error",
            MountError::TooLarge { .. } => "too_large",
        }
    }

    /// The gRPC status code. `Unavailable` makes the driver retry (up to 3 times), so it is
    /// used only where a retry may help.
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            MountError::BadParameter { .. } | MountError::BadValue { .. } => {
                tonic::Code::InvalidArgument
            }
            MountError::Unavailable(_) | MountError::Busy { .. } => tonic::Code::Unavailable,
            MountError::BadToken { .. } => tonic::Code::Unauthenticated,
            MountError::LoginRefused { .. } => tonic::Code::Unauthenticated,
            MountError::NoToken { .. } => tonic::Code::FailedPrecondition,
            MountError::PermissionDenied { .. } => tonic::Code::PermissionDenied,
            MountError::NotFound { .. } | MountError::KeyNotFound { .. } => tonic::Code::NotFound,
            MountError::OpenBao { .. } => tonic::Code::FailedPrecondition,
            MountError::TooLarge { .. } => tonic::Code::ResourceExhausted,
        }
    }

    /// The gRPC status the driver receives.
    pub fn to_status(&self) -> tonic::Status {
        let mut status = tonic::Status::new(self.grpc_code(), format!("[{}] {self}", self.code()));
        if let Ok(v) = self.code().parse() {
            status.metadata_mut().insert("kubebao-error-code", v);
        }
        status
    }
}
