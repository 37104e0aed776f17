//! `kubebao-installer`: places the operator's rendered files on a control-plane host.
//!
//! `run` is the DaemonSet mode: apply the plan, report the outcome on `/readyz`, and re-apply
//! whenever the mounted bundle changes (the kubelet refreshes ConfigMap/Secret mounts, e.g. when
//! the operator renews the AppRole secret_id). Stopping the pod never removes files: only a plan
//! with `"action": "uninstall"` (or the `uninstall` command) does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, Subcommand};
use kubebao_installer::{Outcome, apply, planned_hash, uninstall};

#[derive(Parser, Debug)]
#[command(name = "kubebao-installer", version, about = "KubeBao node installer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct Paths {
    /// Directory holding plan.json and the non-secret files (the mounted ConfigMap).
    #[arg(
        long,
        env = "KUBEBAO_BUNDLE",
        default_value = "/etc/kubebao-installer/bundle"
    )]
    bundle: PathBuf,
    /// Directory holding the secret files (the mounted Secret).
    #[arg(
        long,
        env = "KUBEBAO_SECRETS",
        default_value = "/etc/kubebao-installer/secrets"
    )]
    secrets: PathBuf,
    /// Where the host's file system is mounted; plan paths are resolved below it.
    #[arg(long, env = "KUBEBAO_HOST_ROOT", default_value = "/host")]
    host_root: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the plan, serve /readyz, and re-apply when the bundle changes (DaemonSet mode).
    Run {
        #[command(flatten)]
        paths: Paths,
        /// Address for /healthz and /readyz.
        #[arg(long, env = "KUBEBAO_LISTEN", default_value = "0.0.0.0:9879")]
        listen: SocketAddr,
        /// How often to check the bundle for changes, in seconds.
        #[arg(long, default_value_t = 10)]
        interval: u64,
    },
    /// Apply the plan once and exit.
    Install {
        #[command(flatten)]
        paths: Paths,
    },
    /// Remove every file recorded in the state file and exit.
    Uninstall {
        /// Where the host's file system is mounted.
        #[arg(long, env = "KUBEBAO_HOST_ROOT", default_value = "/host")]
        host_root: PathBuf,
        /// Absolute host path of the state file.
        #[arg(long, default_value = "/etc/kubebao/installer-state.json")]
        state: String,
    },
    /// Print the content hash the plan would install.
    Hash {
        #[command(flatten)]
        paths: Paths,
    },
}

/// The last outcome, shown on /readyz.
type Report = Arc<Mutex<Result<String, String>>>;

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Installed { hash, written } => format!("installed hash={hash} written={written}"),
        Outcome::Uninstalled { removed, kept } => {
            format!("uninstalled removed={removed} kept={kept}")
        }
    }
}

fn apply_and_report(paths: &Paths, report: &Report) {
    let result = apply(&paths.bundle, &paths.secrets, &paths.host_root);
    let line = match &result {
        Ok(outcome) => {
            let line = describe(outcome);
            // The hash on stdout is the installer's record of what it installed.
            println!("{line}");
            tracing::info!(%line, "applied the plan");
            Ok(line)
        }
        Err(e) => {
            tracing::error!(error = %e, "could not apply the plan; retrying");
            Err(e.to_string())
        }
    };
    *report.lock().expect("report lock") = line;
}

async fn run(paths: Paths, listen: SocketAddr, interval: Duration) -> std::io::Result<()> {
    let report: Report = Arc::new(Mutex::new(Err("not applied yet".into())));
    apply_and_report(&paths, &report);
    let r = report.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    match &*r.lock().expect("report lock") {
                        Ok(line) => (StatusCode::OK, line.clone()),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.clone()),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "serving /healthz and /readyz");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let mut last = planned_hash(&paths.bundle, &paths.secrets).ok();
    let mut tick = tokio::time::interval(interval);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        let now = planned_hash(&paths.bundle, &paths.secrets).ok();
        let failed = report.lock().expect("report lock").is_err();
        if now != last || failed {
            apply_and_report(&paths, &report);
            last = now;
        }
    }
    server.abort();
    Ok(())
}

fn exit_on(result: Result<Outcome, kubebao_installer::Error>) -> std::process::ExitCode {
    match result {
        Ok(o) => {
            println!("{}", describe(&o));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kubebao-installer: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run {
            paths,
            listen,
            interval,
        } => match run(paths, listen, Duration::from_secs(interval.max(1))).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kubebao-installer: cannot serve on {listen}: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Install { paths } => {
            exit_on(apply(&paths.bundle, &paths.secrets, &paths.host_root))
        }
        Command::Uninstall { host_root, state } => {
            exit_on(uninstall(&state, Path::new(&host_root)))
        }
        Command::Hash { paths } => match planned_hash(&paths.bundle, &paths.secrets) {
            Ok(h) => {
                println!("{h}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("kubebao-installer: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}
