//! KubeBao: The Secrets Store CSI provider (`kubebao-csi`).

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kubebao_csi::metrics::Metrics;
use kubebao_csi::provider::{Provider, Settings};
use kubebao_csi::server::{self, Health};

/// Serves the Secrets Store CSI driver's provider API for OpenBao.
#[derive(Parser, Debug)]
#[command(name = "kubebao-csi", version, about)]
struct Args {
    /// Directory the driver looks for provider sockets in (the socket is <dir>/kubebao.sock);
    /// some distributions use /etc/kubernetes/secrets-store-csi-providers.
    #[arg(
        long,
        env = "KUBEBAO_CSI_PROVIDER_DIR",
        default_value = "/var/run/secrets-store-csi-providers"
    )]
    provider_dir: PathBuf,
    /// OpenBao address used when a SecretProviderClass sets none (else BAO_ADDR).
    #[arg(long, env = "KUBEBAO_CSI_OPENBAO_ADDR")]
    openbao_addr: Option<String>,
    /// CA bundle (PEM) for OpenBao's certificate, when a SecretProviderClass sets none.
    #[arg(long, env = "KUBEBAO_CSI_OPENBAO_CA_CERT")]
    openbao_ca_cert: Option<PathBuf>,
    /// Allow plain http:// to an OpenBao on a loopback address (tests, a local dev server).
    /// Never for a remote address.
    #[arg(long, env = "KUBEBAO_OPENBAO_ALLOW_PLAIN_HTTP")]
    openbao_allow_plain_http: bool,
    /// OpenBao namespace, when a SecretProviderClass sets none.
    #[arg(long, env = "KUBEBAO_CSI_OPENBAO_NAMESPACE")]
    openbao_namespace: Option<String>,
    /// Kubernetes auth mount path, when a SecretProviderClass sets none.
    #[arg(long, env = "KUBEBAO_CSI_AUTH_MOUNT", default_value = "kubernetes")]
    auth_mount: String,
    /// ServiceAccount token audience, when a SecretProviderClass sets none ("" = the API server's default).
    #[arg(long, env = "KUBEBAO_CSI_AUDIENCE", default_value = "")]
    audience: String,
    /// Kubeconfig for TokenRequests and TokenReviews (default: in-cluster config).
    #[arg(long, env = "KUBEBAO_CSI_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Lifetime of the pod tokens the agent requests when the driver sends none.
    #[arg(long, default_value_t = 600)]
    token_request_seconds: i64,
    /// File holding the key (≥ 16 bytes) that object versions are HMACed with; without it a
    /// random key is made per process (versions then change once per restart).
    #[arg(long, env = "KUBEBAO_CSI_OBJECT_VERSION_KEY_FILE")]
    object_version_key_file: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "KUBEBAO_CSI_LISTEN", default_value = "127.0.0.1:8788")]
    listen: SocketAddr,
    /// Largest MountResponse, in bytes (the driver's default gRPC limit is 4 MiB).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_response_bytes: usize,
    /// Timeout of each OpenBao request, in seconds.
    #[arg(long, default_value_t = 10)]
    openbao_timeout_seconds: u64,
    /// Log format: text or json.
    #[arg(long, env = "KUBEBAO_CSI_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

fn version_key(args: &Args) -> Result<Vec<u8>, String> {
    match &args.object_version_key_file {
        Some(path) => {
            let key = std::fs::read(path)
                .map_err(|e| format!("--object-version-key-file {}: {e}", path.display()))?;
            if key.len() < 16 {
                return Err(format!(
                    "--object-version-key-file {}: the key has {} bytes, at least 16 are needed",
                    path.display(),
                    key.len()
                ));
            }
            Ok(key)
        }
        None => {
            let mut key = vec![0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut key))
                .map_err(|e| format!("cannot read /dev/urandom for a version key: {e}"))?;
            tracing::warn!(
                "no --object-version-key-file: using a random key, so object versions change once \
                 after every restart (the driver then rewrites unchanged files once)"
            );
            Ok(key)
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    kubebao_openbao::install_crypto_provider();
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if args.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let key = version_key(&args)?;
    let openbao_addr = args
        .openbao_addr
        .clone()
        .or_else(|| std::env::var("BAO_ADDR").ok())
        .filter(|a| !a.is_empty());
    let metrics = Arc::new(Metrics::new());
    let settings = Settings {
        openbao_addr,
        openbao_ca_cert: args.openbao_ca_cert.clone(),
        openbao_namespace: args.openbao_namespace.clone(),
        allow_plain_http: args.openbao_allow_plain_http,
        auth_mount: args.auth_mount.trim_matches('/').to_string(),
        audience: args.audience.clone(),
        kubeconfig: args.kubeconfig.clone(),
        token_request_seconds: args.token_request_seconds,
        max_response_bytes: args.max_response_bytes,
        openbao_timeout: Duration::from_secs(args.openbao_timeout_seconds),
    };
    let provider = Arc::new(Provider::new(settings, key, metrics.clone()));
    // A default address the flags cannot use (plain http elsewhere than loopback, a bad CA
    // file) is reported now, not at the first Mount.
    let default_openbao = provider
        .default_client()
        .transpose()
        .map_err(|e| format!("--openbao-addr: {e}"))?;

    let http = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {} for /metrics: {e}", args.listen))?;
    let (listener, socket) = server::bind_socket(&args.provider_dir)
        .map_err(|e| format!("cannot serve on {}: {e}", args.provider_dir.display()))?;
    tracing::info!(
        socket = %socket.display(),
        http = %args.listen,
        version = env!("CARGO_PKG_VERSION"),
        "kubebao-csi serving"
    );
    let health = Arc::new(Health::new(socket.clone(), default_openbao));
    let router = server::http_router(metrics, health.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http, router).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    server::serve_grpc(
        listener,
        socket,
        provider,
        health,
        shutdown_signal(),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| format!("gRPC server: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
}
