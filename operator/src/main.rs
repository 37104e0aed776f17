//! KubeBao: The operator. Turns `BaoSecret` and `BaoPolicy` objects into Kubernetes Secrets and
//! OpenBao policies. See docs/operator.md.

mod api;
mod baopolicy;
mod baosecret;
mod conditions;
mod context;
mod events;
mod hcl;
mod identity;
mod installation;
mod leader;
mod lenient;
mod metrics;
mod openbao_path;
mod server;
mod tenant;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kubebao_openbao::duration::Bounds;
use kubebao_openbao::{ClientConfig, OpenBao};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::api::BaoPolicy;
use crate::context::{Context, Settings};
use crate::identity::{Identity, IdentitySource};
use crate::leader::{LeaderLease, LeaseConfig};
use crate::lenient::Lenient;
use crate::metrics::Metrics;
use crate::tenant::TenantTokens;

#[derive(Parser, Debug)]
#[command(
    name = "kubebao-operator",
    version,
    about = "KubeBao operator: BaoSecret and BaoPolicy controllers"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print every CRD as YAML (what crds/kubebao.io.yaml holds).
    Crd,
    /// Run the controllers (the default).
    Run,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// OpenBao address.
    #[arg(
        long,
        env = "KUBEBAO_OPENBAO_ADDR",
        default_value = "https://openbao.openbao:8200"
    )]
    openbao_addr: String,
    /// PEM CA bundle for OpenBao's certificate.
    #[arg(long, env = "KUBEBAO_OPENBAO_CA_FILE")]
    openbao_ca_file: Option<PathBuf>,
    /// OpenBao namespace.
    #[arg(long, env = "KUBEBAO_OPENBAO_NAMESPACE")]
    openbao_namespace: Option<String>,
    /// Allow plain http:// to an OpenBao on a loopback address (tests, a local dev server). Never for a remote address.
    #[arg(long, env = "KUBEBAO_OPENBAO_ALLOW_PLAIN_HTTP")]
    openbao_allow_plain_http: bool,
    /// The operator's own identity, option 1: OpenBao Kubernetes-auth role for its ServiceAccount.
    #[arg(long, env = "KUBEBAO_OPERATOR_ROLE")]
    operator_role: Option<String>,
    /// Projected ServiceAccount token file used with --operator-role (and by installations'
    /// `auth.kubernetes`); its only audience must be --operator-jwt-audience.
    #[arg(
        long,
        env = "KUBEBAO_OPERATOR_JWT_FILE",
        default_value = "/var/run/secrets/openbao/token"
    )]
    operator_jwt_file: PathBuf,
    /// The audience of the operator's projected token: a token for any other audience (such as
    /// the Kubernetes API server's) is never sent to OpenBao.
    #[arg(long, env = "KUBEBAO_OPERATOR_JWT_AUDIENCE", default_value = "openbao")]
    operator_jwt_audience: String,
    /// Option 2: an OpenBao token in a file.
    #[arg(long, env = "KUBEBAO_OPENBAO_TOKEN_FILE")]
    openbao_token_file: Option<PathBuf>,
    /// Option 3 (bootstrap): an OpenBao token in a Secret `<namespace>/<name>`, key `token`.
    #[arg(long, env = "KUBEBAO_OPENBAO_TOKEN_SECRET")]
    openbao_token_secret: Option<String>,
    /// Kubernetes auth mount (operator login and BaoSecret default).
    #[arg(long, env = "KUBEBAO_AUTH_MOUNT", default_value = "kubernetes")]
    auth_mount: String,
    /// Default audience of BaoSecret ServiceAccount tokens.
    #[arg(long, env = "KUBEBAO_TOKEN_AUDIENCE", default_value = "openbao")]
    token_audience: String,
    /// The operator's namespace (Lease, hash key Secret).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kubebao-system")]
    namespace: String,
    /// This replica's name (Lease holder).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// File with the key of the status data hash; default: Secret kubebao-operator-hash-key in --namespace (created if absent).
    #[arg(long, env = "KUBEBAO_HASH_KEY_FILE")]
    hash_key_file: Option<PathBuf>,
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, env = "KUBEBAO_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Leader election (disable only with a single replica).
    #[arg(long, env = "KUBEBAO_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Lease name.
    #[arg(long, default_value = "kubebao-operator")]
    lease_name: String,
    /// Lease duration (a dead leader is replaced after at most this).
    #[arg(long, default_value = "15s", value_parser = duration)]
    lease_duration: Duration,
    /// Reconciles running at once per controller (bounds API and OpenBao connections).
    #[arg(long, env = "KUBEBAO_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// How often BaoPolicies are compared with OpenBao (drift repair).
    #[arg(long, default_value = "5m", value_parser = duration)]
    policy_resync: Duration,
}

/// A duration flag: from a second to a day.
fn duration(s: &str) -> Result<Duration, String> {
    let bounds = Bounds::new(Duration::from_secs(1), Duration::from_secs(86400));
    kubebao_openbao::duration::parse(s, bounds).map_err(|e| e.to_string())
}

/// A controller the operator runs while it leads.
type ControllerFn = fn(Arc<Context>, &RunArgs, watch::Receiver<bool>) -> BoxFuture<'static, ()>;

/// Every controller, started in this order.
const CONTROLLERS: &[(&str, ControllerFn)] = &[
    ("BaoSecret", run_baosecrets),
    ("BaoPolicy", run_baopolicies),
    ("KubeBaoInstallation", run_installations),
];

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn run_baosecrets(
    ctx: Arc<Context>,
    _: &RunArgs,
    stop: watch::Receiver<bool>,
) -> BoxFuture<'static, ()> {
    Box::pin(baosecret::run(ctx, stopped(stop)))
}

fn run_installations(
    ctx: Arc<Context>,
    args: &RunArgs,
    stop: watch::Receiver<bool>,
) -> BoxFuture<'static, ()> {
    let operator = installation::controller::Operator {
        namespace: args.namespace.clone(),
        jwt_audience: args.operator_jwt_audience.clone(),
    };
    let id = ctx.clone();
    let token: installation::controller::TokenFn = Arc::new(move || {
        let id = id.clone();
        Box::pin(async move { id.identity.token().await.map_err(|e| e.to_string()) })
    });
    let identity = installation::controller::OperatorIdentity {
        bao: ctx.bao.clone(),
        token,
    };
    Box::pin(installation::controller::run(
        ctx.client.clone(),
        operator,
        Some(identity),
        ctx.recorder.clone(),
        ctx.metrics.clone(),
        stopped(stop),
    ))
}

fn run_baopolicies(
    ctx: Arc<Context>,
    _: &RunArgs,
    stop: watch::Receiver<bool>,
) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        Controller::new(Api::<Lenient<BaoPolicy>>::all(ctx.client.clone()), watcher::Config::default())
            .graceful_shutdown_on(stopped(stop))
            .run(baopolicy::reconcile, |bp, e, ctx: Arc<Context>| {
                tracing::warn!(baopolicy = %kube::ResourceExt::name_any(&*bp), error = %e, "BaoPolicy reconcile failed; retrying");
                Action::requeue(ctx.backoff(&format!("BaoPolicy/{}", kube::ResourceExt::name_any(&*bp))))
            }, ctx)
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "BaoPolicy controller event");
                }
            })
            .await;
    })
}

async fn hash_key(client: &kube::Client, args: &RunArgs) -> Result<Vec<u8>, String> {
    if let Some(path) = &args.hash_key_file {
        return std::fs::read(path)
            .map_err(|e| format!("cannot read --hash-key-file {}: {e}", path.display()));
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let name = "kubebao-operator-hash-key";
    loop {
        if let Some(s) = api
            .get_opt(name)
            .await
            .map_err(|e| format!("cannot read Secret {}/{name}: {e}", args.namespace))?
        {
            if let Some(k) = s.data.and_then(|d| d.get("key").cloned()) {
                return Ok(k.0);
            }
            return Err(format!("Secret {}/{name} has no key `key`", args.namespace));
        }
        let mut key = vec![0u8; 32];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some([("key".to_string(), ByteString(key))].into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                return Err(format!(
                    "cannot create Secret {}/{name}: {e}",
                    args.namespace
                ));
            }
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// A Kubernetes client from the in-cluster config or KUBECONFIG.
async fn kube_client() -> Result<kube::Client, String> {
    kube::Client::try_default().await.map_err(|e| {
        format!("cannot build a Kubernetes client (in-cluster config or KUBECONFIG): {e}")
    })
}

/// The OpenBao client (no token) for --openbao-addr, its CA and namespace.
fn openbao_client(args: &RunArgs) -> Result<OpenBao, String> {
    let ca_pem = match &args.openbao_ca_file {
        Some(p) => Some(
            std::fs::read(p)
                .map_err(|e| format!("cannot read --openbao-ca-file {}: {e}", p.display()))?,
        ),
        None => None,
    };
    OpenBao::new(&ClientConfig {
        address: args.openbao_addr.clone(),
        ca_pem,
        namespace: args.openbao_namespace.clone(),
        timeout: None,
        allow_plain_http: args.openbao_allow_plain_http,
    })
    .map_err(|e| e.to_string())
}

/// Where the operator's own OpenBao identity comes from: a token file, a token Secret, or a
/// Kubernetes-auth login, in that order of precedence.
fn identity_source(args: &RunArgs) -> Result<IdentitySource, String> {
    if let Some(path) = &args.openbao_token_file {
        Ok(IdentitySource::TokenFile(path.clone()))
    } else if let Some(s) = &args.openbao_token_secret {
        let (namespace, name) = s
            .split_once('/')
            .ok_or_else(|| format!("--openbao-token-secret {s:?} must be <namespace>/<name>"))?;
        Ok(IdentitySource::TokenSecret {
            namespace: namespace.into(),
            name: name.into(),
        })
    } else if let Some(role) = &args.operator_role {
        Ok(IdentitySource::Kubernetes {
            mount: args.auth_mount.clone(),
            role: role.clone(),
            jwt_file: args.operator_jwt_file.clone(),
            audience: args.operator_jwt_audience.clone(),
        })
    } else {
        Err("no OpenBao identity for the operator: set --operator-role, --openbao-token-file or --openbao-token-secret".into())
    }
}

/// This replica's name: the pod name, else `<hostname>-<pid>`.
fn holder_name(args: &RunArgs) -> String {
    args.pod_name.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim(),
            std::process::id()
        )
    })
}

/// What every controller shares (fetches or creates the status hash key).
async fn shared_context(
    args: &RunArgs,
    client: kube::Client,
    bao: OpenBao,
    source: IdentitySource,
    holder: &str,
    metrics: Arc<Metrics>,
) -> Result<Arc<Context>, String> {
    Ok(Arc::new(Context {
        identity: Identity::new(bao.clone(), client.clone(), source),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "kubebao-operator".into(),
                instance: Some(holder.to_string()),
            },
        ),
        hash_key: hash_key(&client, args).await?,
        client,
        bao,
        tenants: TenantTokens::new(metrics.clone()),
        metrics,
        settings: Settings {
            auth_mount: args.auth_mount.clone(),
            token_audience: args.token_audience.clone(),
            policy_resync: args.policy_resync,
            concurrency: args.concurrency,
        },
        failures: Default::default(),
        checks: Default::default(),
    }))
}

/// The leader Lease, unless leader election is off.
fn leader_lease(args: &RunArgs, client: &kube::Client, holder: &str) -> Option<LeaderLease> {
    args.leader_elect.then(|| {
        LeaderLease::new(
            client.clone(),
            LeaseConfig {
                namespace: args.namespace.clone(),
                name: args.lease_name.clone(),
                holder: holder.to_string(),
                duration: args.lease_duration,
            },
        )
    })
}

/// How a controller's task ended: its name, and the panic message if it panicked.
type Stopped = (&'static str, Option<String>);

/// Starts a controller on its own task; a panic is caught and reported as its end.
fn spawn_controller(tasks: &mut JoinSet<Stopped>, name: &'static str, run: BoxFuture<'static, ()>) {
    tasks.spawn(async move {
        let panic = AssertUnwindSafe(run).catch_unwind().await.err();
        (name, panic.map(|p| lenient::panic_message(p.as_ref())))
    });
}

/// Waits for `signal` (Ok), the Lease lost (Err) or any controller ending (Err: a controller
/// only ends when told to, so one that stops on its own, or panics, means this process no
/// longer does its work and must exit to be restarted).
async fn supervise(
    tasks: &mut JoinSet<Stopped>,
    signal: impl Future<Output = ()>,
    lost: impl Future<Output = ()>,
) -> Result<(), String> {
    let ended = async {
        match tasks.join_next().await {
            Some(Ok((name, None))) => format!("controller {name} stopped on its own"),
            Some(Ok((name, Some(panic)))) => format!("controller {name} panicked: {panic}"),
            Some(Err(e)) => format!("a controller's task failed: {e}"),
            None => futures::future::pending().await,
        }
    };
    tokio::select! {
        _ = signal => { tracing::info!("shutting down"); Ok(()) }
        _ = lost => Err("lost the leader Lease; exiting so a fresh start can contend again".to_string()),
        why = ended => Err(format!("{why}; exiting so Kubernetes restarts the operator")),
    }
}

/// Runs every controller while this replica leads: until `signal` (Ok), the Lease is lost or a
/// controller ends (Err). Then stops them (at once when the Lease is lost, else waiting up to
/// 10 s) and releases the Lease on a clean stop.
async fn lead(
    ctx: &Arc<Context>,
    args: &RunArgs,
    lease: &Option<LeaderLease>,
    stop_tx: &watch::Sender<bool>,
    signal: impl Future<Output = ()>,
) -> Result<(), String> {
    if let Some(lease) = lease {
        // Every reconcile checks this before each step (see `leader::while_leading`).
        leader::guard_reconciles(lease.leadership());
    }
    ctx.metrics.leader.set(1);
    let mut tasks = JoinSet::new();
    for (name, start) in CONTROLLERS {
        tracing::info!(controller = name, "starting controller");
        spawn_controller(
            &mut tasks,
            name,
            start(ctx.clone(), args, stop_tx.subscribe()),
        );
    }
    let lost = async {
        match lease {
            Some(l) => {
                let why = l.hold().await;
                tracing::error!(reason = %why, "no longer the leader: stopping the controllers");
            }
            None => futures::future::pending().await,
        }
    };
    let result = supervise(&mut tasks, signal, lost).await;
    ctx.metrics.leader.set(0);
    let _ = stop_tx.send(true);
    if !leader::leading() {
        // Another replica may lead already: nothing is left to finish (reconciles are inert).
        tasks.abort_all();
    }
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    if let (Some(lease), Ok(())) = (lease, &result) {
        lease.release().await;
    }
    result
}

async fn run(args: RunArgs) -> Result<(), String> {
    let client = kube_client().await?;
    let bao = openbao_client(&args)?;
    let source = identity_source(&args)?;
    let holder = holder_name(&args);
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Health and metrics answer from the start; /readyz once the shared context is built.
    let health = server::Health::default();
    let probes = server::Probes {
        metrics: metrics.clone(),
        ready: ready.clone(),
        health: health.clone(),
    };
    let server = tokio::spawn(server::serve(args.metrics_addr, probes, stopped(stop_rx)));
    let ctx = shared_context(&args, client.clone(), bao, source, &holder, metrics).await?;
    // Ready also means the operator's own OpenBao identity answers (server::Health).
    health.ready_with(ctx.ready_check());
    ready.store(true, Ordering::SeqCst);

    let lease = leader_lease(&args, &client, &holder);
    let mut signal = Box::pin(shutdown_signal());
    if let Some(lease) = &lease {
        tracing::info!(holder = %holder, "waiting for the leader Lease");
        tokio::select! {
            _ = lease.acquire() => {},
            _ = &mut signal => {
                let _ = stop_tx.send(true);
                let _ = server.await;
                return Ok(());
            }
        }
        tracing::info!(holder = %holder, "leading: starting controllers");
    }
    let result = lead(&ctx, &args, &lease, &stop_tx, signal).await;
    if let Err(why) = &result {
        health.fail(why);
    }
    let _ = server.await;
    result
}

#[tokio::main]
async fn main() {
    kubebao_openbao::install_crypto_provider();
    let cli = Cli::parse();
    if let Some(Command::Crd) = cli.command {
        print!("{}", api::all_yaml());
        return;
    }
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client=warn,kube_runtime=warn".into()),
        )
        .init();
    if let Err(e) = run(cli.run).await {
        tracing::error!(error = %e, "operator stopped");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_needs_the_flag_and_the_projected_openbao_token_is_the_default() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["kubebao-operator", "--openbao-addr=http://127.0.0.1:8200"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).unwrap().run
        };
        let args = parse(&["--operator-role=kubebao"]);
        let e = openbao_client(&args).unwrap_err();
        assert!(e.contains("--openbao-allow-plain-http"), "{e}");
        assert!(openbao_client(&parse(&["--openbao-allow-plain-http"])).is_ok());
        match identity_source(&args).unwrap() {
            IdentitySource::Kubernetes {
                jwt_file, audience, ..
            } => {
                assert_eq!(jwt_file, PathBuf::from("/var/run/secrets/openbao/token"));
                assert_eq!(audience, "openbao");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A controller that panics or stops on its own ends the supervision with an error naming
    /// it (the process then fails /healthz and exits non-zero); a signal ends it cleanly.
    #[tokio::test]
    async fn a_controller_that_ends_stops_the_process() {
        let pending = || futures::future::pending::<()>();
        let mut tasks = JoinSet::new();
        spawn_controller(&mut tasks, "Idle", Box::pin(pending()));
        spawn_controller(
            &mut tasks,
            "BaoSecret",
            Box::pin(async { panic!("Duration overflow") }),
        );
        let why = supervise(&mut tasks, pending(), pending())
            .await
            .unwrap_err();
        assert!(
            why.starts_with("controller BaoSecret panicked: Duration overflow;"),
            "{why}"
        );
        let mut tasks = JoinSet::new();
        spawn_controller(&mut tasks, "BaoPolicy", Box::pin(async {}));
        let why = supervise(&mut tasks, pending(), pending())
            .await
            .unwrap_err();
        assert!(
            why.contains("controller BaoPolicy stopped on its own"),
            "{why}"
        );
        let mut tasks = JoinSet::new();
        spawn_controller(&mut tasks, "Idle", Box::pin(pending()));
        assert_eq!(supervise(&mut tasks, async {}, pending()).await, Ok(()));
    }
}
