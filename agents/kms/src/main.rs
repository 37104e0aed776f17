//! KubeBao: the KMS v2 plugin. kube-apiserver encrypts the data keys of every Secret it
//! stores through this plugin, with an OpenBao Transit key. See docs/kms.md.

mod config;
mod doctor;
mod envelope;
#[cfg(test)]
mod fake_openbao;
mod health;
mod metrics;
mod plugin;
mod server;

use std::io::IsTerminal as _;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat, Settings};

/// KubeBao KMS v2 plugin: kube-apiserver's key management through OpenBao Transit.
///
/// Every option is also read from the environment (KUBEBAO_KMS_<NAME>) and from a YAML file
/// (--config; keys are the long option names without the leading dashes, e.g. `openbao-addr:`).
/// Precedence: flag, environment, file, default.
#[derive(Parser, Debug)]
#[command(name = "kubebao-kms", version, about, long_about)]
struct Cli {
    /// YAML file with settings (same names as the flags, e.g. `transit-key: kubebao-kms`).
    #[arg(long, env = "KUBEBAO_KMS_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,

    #[command(flatten)]
    settings: Settings,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve KMS v2 on the socket (the default when no command is given).
    Serve,
    /// Check configuration, connectivity, seal state, the Transit key and the token's
    /// permissions; print what is wrong and how to fix it. Exits 1 on any failure.
    Doctor,
}

fn init_logs(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a pipe, a file or the kubelet's log
    // they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() {
    kubebao_openbao::install_crypto_provider();
    let cli = Cli::parse();
    let file = match &cli.config {
        None => Ok(Settings::default()),
        Some(path) => Settings::from_file(path),
    };
    let config = file.and_then(|f| Config::from_settings(cli.settings.over(f)));
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "kubebao-kms: invalid configuration:\n{e}\n\nRun kubebao-kms --help for every option."
            );
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kubebao-kms: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match cli.command.unwrap_or(Command::Serve) {
        Command::Doctor => runtime.block_on(doctor::run(config)),
        Command::Serve => {
            init_logs(&config);
            match runtime.block_on(server::serve(config)) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(error = %e, "kubebao-kms failed");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}
