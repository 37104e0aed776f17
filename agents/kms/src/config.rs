//! Configuration: command-line flags, `KUBEBAO_KMS_*` environment variables and a YAML file,
//! in that order of precedence, then defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kubebao_openbao::duration::{self, Bounds};
use kubebao_openbao::{ClientConfig, CredentialSource};

/// Every setting, as flags/env (clap) and as YAML file keys (kebab-case, same names).
#[derive(clap::Args, serde::Deserialize, Clone, Debug, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Unix socket the KMS v2 gRPC service listens on (created with mode 0600).
    /// [default: /var/run/kubebao/kms.sock]
    #[arg(long, env = "KUBEBAO_KMS_SOCKET", global = true)]
    pub socket: Option<PathBuf>,

    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    /// Keep it on loopback. [default: 127.0.0.1:8787]
    #[arg(long, env = "KUBEBAO_KMS_HTTP_ADDR", global = true)]
    pub http_addr: Option<String>,

    /// OpenBao address, e.g. https://openbao.example:8200 (required).
    #[arg(long, env = "KUBEBAO_KMS_OPENBAO_ADDR", global = true)]
    pub openbao_addr: Option<String>,

    /// PEM file with the CA that signs OpenBao's TLS certificate (replaces the system roots).
    #[arg(long, env = "KUBEBAO_KMS_OPENBAO_CA_FILE", global = true)]
    pub openbao_ca_file: Option<PathBuf>,

    /// Allow plain http:// to an OpenBao on a loopback address (tests, a local dev server).
    /// Never for a remote address. (Environment: KUBEBAO_OPENBAO_ALLOW_PLAIN_HTTP, the same
    /// name in every KubeBao binary.)
    #[arg(
        long,
        env = "KUBEBAO_OPENBAO_ALLOW_PLAIN_HTTP",
        global = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub openbao_allow_plain_http: Option<bool>,

    /// OpenBao namespace (sent as X-Vault-Namespace), if any.
    #[arg(long, env = "KUBEBAO_KMS_OPENBAO_NAMESPACE", global = true)]
    pub openbao_namespace: Option<String>,

    /// Timeout for one OpenBao request, e.g. 2s or 500ms. Keep it below the API server's
    /// KMS timeout. [default: 2s; the API server's default KMS timeout is 3s]
    #[arg(long, env = "KUBEBAO_KMS_OPENBAO_TIMEOUT", global = true)]
    pub openbao_timeout: Option<String>,

    /// Transit secrets engine mount path. [default: transit]
    #[arg(long, env = "KUBEBAO_KMS_TRANSIT_MOUNT", global = true)]
    pub transit_mount: Option<String>,

    /// Transit key name (type must support encryption, e.g. aes256-gcm96). [default: kubebao-kms]
    #[arg(long, env = "KUBEBAO_KMS_TRANSIT_KEY", global = true)]
    pub transit_key: Option<String>,

    /// Extra context mixed into the associated data of every encryption, e.g. the cluster
    /// name, so a ciphertext copied to another cluster sharing the key does not decrypt there.
    /// Changing it makes existing data unreadable. [default: empty]
    #[arg(long, env = "KUBEBAO_KMS_AAD_CONTEXT", global = true)]
    pub aad_context: Option<String>,

    /// How often the key snapshot and health are refreshed from OpenBao, e.g. 10s.
    /// A rotation shows up in Status within this interval. [default: 10s]
    #[arg(long, env = "KUBEBAO_KMS_PROBE_INTERVAL", global = true)]
    pub probe_interval: Option<String>,

    /// Auth method: token, approle, kubernetes or jwt. [default: token]
    #[arg(long, env = "KUBEBAO_KMS_AUTH_METHOD", global = true)]
    pub auth_method: Option<String>,

    /// Auth mount path. [default: the method name]
    #[arg(long, env = "KUBEBAO_KMS_AUTH_MOUNT", global = true)]
    pub auth_mount: Option<String>,

    /// File holding an OpenBao token (auth method token). Re-read when it changes.
    #[arg(long, env = "KUBEBAO_KMS_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,

    /// File holding the AppRole role_id (auth method approle).
    #[arg(long, env = "KUBEBAO_KMS_ROLE_ID_FILE", global = true)]
    pub role_id_file: Option<PathBuf>,

    /// File holding the AppRole secret_id (auth method approle). Re-read on every login.
    #[arg(long, env = "KUBEBAO_KMS_SECRET_ID_FILE", global = true)]
    pub secret_id_file: Option<PathBuf>,

    /// OpenBao role for kubernetes or jwt auth.
    #[arg(long, env = "KUBEBAO_KMS_AUTH_ROLE", global = true)]
    pub auth_role: Option<String>,

    /// File holding the JWT for kubernetes or jwt auth (e.g. a projected ServiceAccount
    /// token). Re-read on every login.
    #[arg(long, env = "KUBEBAO_KMS_JWT_FILE", global = true)]
    pub jwt_file: Option<PathBuf>,

    /// Log format: text or json. [default: text]
    #[arg(long, env = "KUBEBAO_KMS_LOG_FORMAT", global = true)]
    pub log_format: Option<String>,

    /// Log filter, e.g. info or kubebao_kms=debug. [default: info]
    #[arg(long, env = "KUBEBAO_KMS_LOG_LEVEL", global = true)]
    pub log_level: Option<String>,
}

macro_rules! merge_fields {
    ($a:ident, $b:ident, $($f:ident),*) => {
        Settings { $($f: $a.$f.or($b.$f)),* }
    };
}

impl Settings {
    /// Flags/env (`self`) over the file's values.
    pub fn over(self, file: Settings) -> Settings {
        let (a, b) = (self, file);
        merge_fields!(
            a,
            b,
            socket,
            http_addr,
            openbao_addr,
            openbao_ca_file,
            openbao_allow_plain_http,
            openbao_namespace,
            openbao_timeout,
            transit_mount,
            transit_key,
            aad_context,
            probe_interval,
            auth_method,
            auth_mount,
            token_file,
            role_id_file,
            secret_id_file,
            auth_role,
            jwt_file,
            log_format,
            log_level
        )
    }

    /// Reads a YAML settings file.
    pub fn from_file(path: &Path) -> Result<Settings, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        Self::from_yaml(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// Parses YAML settings (unknown keys are errors, so typos do not pass silently).
    pub fn from_yaml(text: &str) -> Result<Settings, String> {
        if text.trim().is_empty() {
            return Ok(Settings::default());
        }
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// gRPC socket path.
    pub socket: PathBuf,
    /// Metrics/health listen address.
    pub http_addr: SocketAddr,
    /// OpenBao address.
    pub openbao_addr: String,
    /// CA file (path kept for doctor messages).
    pub openbao_ca_file: Option<PathBuf>,
    /// Plain http:// allowed to a loopback OpenBao.
    pub openbao_allow_plain_http: bool,
    /// OpenBao namespace.
    pub openbao_namespace: Option<String>,
    /// Per-request timeout.
    pub openbao_timeout: Duration,
    /// Transit mount.
    pub transit_mount: String,
    /// Transit key.
    pub transit_key: String,
    /// Associated-data context.
    pub aad_context: String,
    /// Probe interval.
    pub probe_interval: Duration,
    /// Where credentials come from.
    pub credentials: CredentialSource,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
}

/// Bounds of the plugin's durations (`--openbao-timeout`, `--probe-interval`): more than
/// nothing, at most a year. A bare number means seconds.
pub const DURATION_BOUNDS: Bounds =
    Bounds::new(Duration::from_millis(1), Duration::from_secs(86_400 * 365));

/// A name safe to put into an OpenBao path segment (mounts may contain `/`).
fn check_path_name(what: &str, value: &str, allow_slash: bool) -> Result<(), String> {
    let ok = !value.is_empty()
        && !value.starts_with('/')
        && !value.ends_with('/')
        && !value
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || (allow_slash && c == '/'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {value:?} is not a valid name (letters, digits, - _ .{})",
            if allow_slash {
                " and / between parts"
            } else {
                ""
            }
        ))
    }
}

/// Problems found while validating, reported all at once.
type Problems = Vec<String>;

fn duration_setting(
    problems: &mut Problems,
    flag: &str,
    value: Option<String>,
    default: Duration,
) -> Duration {
    match value {
        None => default,
        Some(v) => duration::parse(&v, DURATION_BOUNDS).unwrap_or_else(|e| {
            problems.push(format!("--{flag}: {e}"));
            default
        }),
    }
}

fn http_addr_setting(problems: &mut Problems, value: Option<String>) -> SocketAddr {
    let http_addr = value.unwrap_or_else(|| "127.0.0.1:8787".into());
    http_addr.parse().unwrap_or_else(|_| {
        problems.push(format!(
            "--http-addr {http_addr:?} is not an address like 127.0.0.1:8787"
        ));
        SocketAddr::from(([127, 0, 0, 1], 8787))
    })
}

fn openbao_addr_setting(problems: &mut Problems, value: Option<String>) -> String {
    match value {
        Some(a) if a.starts_with("http://") || a.starts_with("https://") => a,
        Some(a) => {
            problems.push(format!(
                "--openbao-addr {a:?} must start with http:// or https://"
            ));
            a
        }
        None => {
            problems.push(
                "--openbao-addr (KUBEBAO_KMS_OPENBAO_ADDR) is required, e.g. https://openbao:8200"
                    .into(),
            );
            String::new()
        }
    }
}

fn path_name_setting(
    problems: &mut Problems,
    flag: &str,
    value: Option<String>,
    default: &str,
    allow_slash: bool,
) -> String {
    let value = value.unwrap_or_else(|| default.into());
    if let Err(e) = check_path_name(flag, &value, allow_slash) {
        problems.push(e);
    }
    value
}

/// The credential source for `--auth-method` and the files and role it needs.
fn credentials_setting(problems: &mut Problems, s: &mut Settings) -> CredentialSource {
    let method = s.auth_method.take().unwrap_or_else(|| "token".into());
    let mount = path_name_setting(problems, "--auth-mount", s.auth_mount.take(), &method, true);
    let mut need = |flag: &str, v: Option<PathBuf>| {
        v.unwrap_or_else(|| {
            problems.push(format!("--auth-method {method} needs --{flag}"));
            PathBuf::new()
        })
    };
    match method.as_str() {
        "token" => CredentialSource::TokenFile(need("token-file", s.token_file.take())),
        "approle" => CredentialSource::AppRoleFiles {
            mount,
            role_id_file: need("role-id-file", s.role_id_file.take()),
            secret_id_file: need("secret-id-file", s.secret_id_file.take()),
        },
        "kubernetes" | "jwt" => {
            let jwt_file = need("jwt-file", s.jwt_file.take());
            let role = s.auth_role.take().unwrap_or_else(|| {
                problems.push(format!("--auth-method {method} needs --auth-role"));
                String::new()
            });
            if method == "kubernetes" {
                CredentialSource::KubernetesJwtFile {
                    mount,
                    role,
                    jwt_file,
                }
            } else {
                CredentialSource::JwtFile {
                    mount,
                    role,
                    jwt_file,
                }
            }
        }
        other => {
            problems.push(format!(
                "--auth-method {other:?} is not one of token, approle, kubernetes, jwt"
            ));
            CredentialSource::TokenFile(PathBuf::new())
        }
    }
}

fn log_format_setting(problems: &mut Problems, value: Option<&str>) -> LogFormat {
    match value {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.push(format!("--log-format {other:?} is not text or json"));
            LogFormat::Text
        }
    }
}

impl Config {
    /// Validates merged settings and fills defaults; the error lists every problem found.
    pub fn from_settings(mut s: Settings) -> Result<Config, String> {
        let mut problems = Problems::new();
        let p = &mut problems;
        let openbao_timeout = duration_setting(
            p,
            "openbao-timeout",
            s.openbao_timeout.take(),
            Duration::from_secs(2),
        );
        let probe_interval = duration_setting(
            p,
            "probe-interval",
            s.probe_interval.take(),
            Duration::from_secs(10),
        );
        let http_addr = http_addr_setting(p, s.http_addr.take());
        let openbao_addr = openbao_addr_setting(p, s.openbao_addr.take());
        let transit_mount = path_name_setting(
            p,
            "--transit-mount",
            s.transit_mount.take(),
            "transit",
            true,
        );
        let transit_key = path_name_setting(
            p,
            "--transit-key",
            s.transit_key.take(),
            "kubebao-kms",
            false,
        );
        let credentials = credentials_setting(p, &mut s);
        let log_format = log_format_setting(p, s.log_format.as_deref());
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        Ok(Config {
            socket: s
                .socket
                .unwrap_or_else(|| PathBuf::from("/var/run/kubebao/kms.sock")),
            http_addr,
            openbao_addr,
            openbao_ca_file: s.openbao_ca_file,
            openbao_allow_plain_http: s.openbao_allow_plain_http.unwrap_or(false),
            openbao_namespace: s.openbao_namespace.filter(|n| !n.is_empty()),
            openbao_timeout,
            transit_mount,
            transit_key,
            aad_context: s.aad_context.unwrap_or_default(),
            probe_interval,
            credentials,
            log_format,
            log_level: s.log_level.unwrap_or_else(|| "info".into()),
        })
    }

    /// The OpenBao client configuration (reads the CA file).
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let ca_pem = match &self.openbao_ca_file {
            None => None,
            Some(p) => Some(
                std::fs::read(p)
                    .map_err(|e| format!("cannot read --openbao-ca-file {}: {e}", p.display()))?,
            ),
        };
        Ok(ClientConfig {
            address: self.openbao_addr.clone(),
            ca_pem,
            namespace: self.openbao_namespace.clone(),
            timeout: Some(self.openbao_timeout),
            allow_plain_http: self.openbao_allow_plain_http,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_file_fills_what_flags_leave_unset() {
        let file = Settings::from_yaml(
            "openbao-addr: https://bao:8200\ntransit-key: k1\nauth-method: approle\n\
             role-id-file: /r\nsecret-id-file: /s\nprobe-interval: 2s\n",
        )
        .unwrap();
        let flags = Settings {
            transit_key: Some("from-flag".into()),
            ..Default::default()
        };
        let cfg = Config::from_settings(flags.over(file)).unwrap();
        assert_eq!(cfg.transit_key, "from-flag");
        assert_eq!(cfg.openbao_addr, "https://bao:8200");
        assert_eq!(cfg.probe_interval, Duration::from_secs(2));
        assert_eq!(cfg.transit_mount, "transit");
        assert_eq!(cfg.socket, PathBuf::from("/var/run/kubebao/kms.sock"));
        assert!(matches!(
            cfg.credentials,
            CredentialSource::AppRoleFiles { ref mount, .. } if mount == "approle"
        ));
    }

    #[test]
    fn plain_http_is_a_bare_flag_or_a_file_key_and_reaches_the_client() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            settings: Settings,
            #[arg()]
            command: Option<String>,
        }
        let parse = |args: &[&str]| {
            let cli = <Cli as clap::Parser>::try_parse_from(
                [
                    "kubebao-kms",
                    "--openbao-addr=http://127.0.0.1:8200",
                    "--token-file=/t",
                ]
                .iter()
                .chain(args),
            )
            .unwrap();
            (cli.settings, cli.command)
        };
        let (flag, command) = parse(&["--openbao-allow-plain-http", "doctor"]);
        assert_eq!(flag.openbao_allow_plain_http, Some(true));
        assert_eq!(
            command.as_deref(),
            Some("doctor"),
            "the flag takes no value"
        );
        let (off, _) = parse(&["--openbao-allow-plain-http=false"]);
        assert_eq!(off.openbao_allow_plain_http, Some(false));
        let (unset, _) = parse(&[]);
        assert_eq!(unset.openbao_allow_plain_http, None);

        let cfg = Config::from_settings(unset.clone()).unwrap();
        let client = cfg.client_config().unwrap();
        assert!(!client.allow_plain_http);
        let refused = kubebao_openbao::OpenBao::new(&client)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--openbao-allow-plain-http"), "{refused}");
        let file = Settings::from_yaml("openbao-allow-plain-http: true\n").unwrap();
        let cfg = Config::from_settings(unset.over(file)).unwrap();
        let client = cfg.client_config().unwrap();
        assert!(client.allow_plain_http);
        kubebao_openbao::OpenBao::new(&client).expect("loopback http with the flag");
        let cfg = Config::from_settings(flag).unwrap();
        assert!(cfg.client_config().unwrap().allow_plain_http);
    }

    #[test]
    fn unknown_yaml_keys_are_refused() {
        let err = Settings::from_yaml("openbao-adr: x\n").unwrap_err();
        assert!(err.contains("openbao-adr"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = Config::from_settings(Settings {
            auth_method: Some("kubernetes".into()),
            transit_key: Some("../x".into()),
            probe_interval: Some("ten".into()),
            ..Default::default()
        })
        .unwrap_err();
        for needle in [
            "--openbao-addr",
            "--jwt-file",
            "--auth-role",
            "--transit-key",
            "--probe-interval",
        ] {
            assert!(err.contains(needle), "missing {needle} in {err}");
        }
    }

    #[test]
    fn durations_parse_with_units() {
        let parse = |t: &str| duration::parse(t, DURATION_BOUNDS);
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("8760h").unwrap(), Duration::from_secs(86_400 * 365));
        assert!(parse("0s").is_err());
        assert!(parse("5 parsecs").is_err());
        assert!(parse("8761h").is_err(), "more than a year");
        let err = Config::from_settings(Settings {
            openbao_addr: Some("https://bao:8200".into()),
            token_file: Some("/t".into()),
            openbao_timeout: Some("99999999999999999999h".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(
            err,
            "--openbao-timeout: \"99999999999999999999h\" is not a duration between 1ms and 8760h: \
             use a number with a unit, e.g. 500ms, 30s, 5m, 1h30m"
        );
    }
}
