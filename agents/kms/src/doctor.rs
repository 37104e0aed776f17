//! `kubebao-kms doctor`: checks the setup end to end and says what is wrong and how to fix it.

use kubebao_openbao::{OpenBao, SecretString, Session};
use reqwest::Method;
use serde_json::{Value, json};

use crate::config::Config;
use crate::plugin::KeySnapshot;

#[derive(Default)]
struct Report {
    failures: usize,
    warnings: usize,
}

impl Report {
    fn ok(&mut self, what: &str) {
        println!("[ok]   {what}");
    }
    fn warn(&mut self, what: &str, fix: &str) {
        self.warnings += 1;
        println!("[warn] {what}\n       fix: {fix}");
    }
    fn fail(&mut self, what: &str, fix: &str) {
        self.failures += 1;
        println!("[FAIL] {what}\n       fix: {fix}");
    }
}

/// Runs every check; returns the process exit code (0 when nothing failed).
pub async fn run(config: Config) -> i32 {
    let mut r = Report::default();
    check(&config, &mut r).await;
    println!("\n{} failure(s), {} warning(s)", r.failures, r.warnings);
    if r.failures > 0 { 1 } else { 0 }
}

/// Runs the checks in order; stops early when a failure makes the later ones pointless.
async fn check(config: &Config, r: &mut Report) {
    r.ok(&format!(
        "configuration parsed: OpenBao {}, key {}/{}, {}",
        config.openbao_addr,
        config.transit_mount,
        config.transit_key,
        config.credentials.describe()
    ));
    let Some(client) = connect(config, r).await else {
        return;
    };
    let Some(token) = log_in(config, &client, r).await else {
        return;
    };
    check_capabilities(config, &client, &token, r).await;
    check_transit_key(config, &client, &token, r).await;
}

/// The client, once OpenBao answers, is initialised and unsealed.
async fn connect(config: &Config, r: &mut Report) -> Option<OpenBao> {
    let client_config = match config.client_config() {
        Ok(c) => c,
        Err(e) => {
            r.fail(&e, "point --openbao-ca-file at a readable PEM file");
            return None;
        }
    };
    let client = match OpenBao::new(&client_config) {
        Ok(c) => c,
        Err(e) => {
            r.fail(&e.to_string(), "fix --openbao-addr or --openbao-ca-file");
            return None;
        }
    };
    match client.health().await {
        Err(e) => r.fail(
            &e.to_string(),
            "check that OpenBao runs and --openbao-addr is reachable from this host; for https, that --openbao-ca-file holds the CA that signed its certificate",
        ),
        Ok(h) if !h.initialized => r.fail(
            "OpenBao is not initialised",
            "initialise it: bao operator init",
        ),
        Ok(h) if h.sealed => r.fail(
            &format!("OpenBao {} is sealed", config.openbao_addr),
            "unseal it: bao operator unseal (the plugin recovers by itself afterwards)",
        ),
        Ok(h) => {
            r.ok(&format!(
                "OpenBao reachable, unsealed (version {})",
                h.version
            ));
            return Some(client);
        }
    }
    None
}

/// Logs in as the plugin would and reports the token's policies and TTL.
async fn log_in(config: &Config, client: &OpenBao, r: &mut Report) -> Option<SecretString> {
    if let Err(e) = config.credentials.load() {
        r.fail(
            &e.to_string(),
            "provide the credential files named by --token-file / --role-id-file / --secret-id-file / --jwt-file",
        );
        return None;
    }
    let session = Session::new(client.clone(), config.credentials.clone());
    let token = match session.token().await {
        Ok(t) => t,
        Err(e) => {
            r.fail(
                &format!("login failed ({}): {e}", config.credentials.describe()),
                "check the auth method, mount and role, and that the credentials are current (a secret_id may have expired or been used up)",
            );
            return None;
        }
    };
    match client.lookup_self(&token).await {
        Ok(auth) => {
            let ttl = auth.lease_duration;
            let msg = format!(
                "logged in: policies {:?}, TTL {}, renewable {}",
                auth.policies,
                if ttl == 0 {
                    "none".to_string()
                } else {
                    format!("{ttl}s")
                },
                auth.renewable
            );
            r.ok(&msg);
            if auth.policies.iter().any(|p| p == "root") {
                r.warn(
                    "the plugin uses a root token",
                    "give it a token with only the KubeBao KMS policy (see docs/kms.md)",
                );
            }
        }
        Err(e) => r.warn(
            &format!("cannot look up the token: {e}"),
            "allow auth/token/lookup-self (in OpenBao's default policy)",
        ),
    }
    Some(token)
}

/// Whether the token may encrypt, decrypt and read the key (sys/capabilities-self).
async fn check_capabilities(
    config: &Config,
    client: &OpenBao,
    token: &SecretString,
    r: &mut Report,
) {
    let (mount, key) = (&config.transit_mount, &config.transit_key);
    let needed = [
        (format!("{mount}/encrypt/{key}"), "update"),
        (format!("{mount}/decrypt/{key}"), "update"),
        (format!("{mount}/keys/{key}"), "read"),
    ];
    let paths: Vec<&str> = needed.iter().map(|(p, _)| p.as_str()).collect();
    let body = match client
        .request(
            Method::POST,
            "sys/capabilities-self",
            Some(token),
            Some(&json!({ "paths": paths })),
        )
        .await
    {
        Ok(Some(body)) => body,
        Ok(None) => return r.warn("sys/capabilities-self returned nothing", "check OpenBao"),
        Err(e) => {
            return r.warn(
                &format!("cannot check capabilities: {e}"),
                "allow sys/capabilities-self (in OpenBao's default policy)",
            );
        }
    };
    let data = body.get("data").unwrap_or(&body);
    for (path, cap) in &needed {
        let caps: Vec<&str> = data
            .get(path.as_str())
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if caps.contains(cap) || caps.contains(&"root") || caps.contains(&"sudo") {
            r.ok(&format!("token may {cap} {path}"));
        } else {
            r.fail(
                &format!("token may not {cap} {path} (has {caps:?})"),
                &format!(
                    "add to the plugin's policy: path \"{path}\" {{ capabilities = [\"{cap}\"] }}"
                ),
            );
        }
    }
}

/// Whether the Transit key exists and suits KMS (type, exportable, deletion).
async fn check_transit_key(
    config: &Config,
    client: &OpenBao,
    token: &SecretString,
    r: &mut Report,
) {
    let (mount, key) = (&config.transit_mount, &config.transit_key);
    let k = match client.transit_key(token, mount, key).await {
        Ok(k) => k,
        Err(e) if e.is_not_found() => return r.fail(
            &format!("Transit key {mount}/{key} does not exist (or Transit is not mounted at {mount})"),
            &format!(
                "create it: bao secrets enable -path={mount} transit; bao write -f {mount}/keys/{key} type=aes256-gcm96"
            ),
        ),
        Err(e) => return r.fail(
            &format!("cannot read Transit key {mount}/{key}: {e}"),
            &format!("allow read on {mount}/keys/{key} in the plugin's policy"),
        ),
    };
    match KeySnapshot::from_key(mount, &k) {
        Ok(s) => r.ok(&format!(
            "Transit key {mount}/{key}: type {}, latest version {}, decryptable from version {}, current key_id {}",
            k.key_type,
            k.latest_version,
            k.min_decryption_version.max(1),
            s.current_key_id
        )),
        Err(h) => r.fail(
            &h.healthz(),
            &format!("use a key of type aes256-gcm96: bao write -f {mount}/keys/<new name> type=aes256-gcm96"),
        ),
    }
    if !k.key_type.contains("gcm") && !k.key_type.contains("chacha") {
        r.warn(
            &format!(
                "key type {} is not an AEAD type; associated data is ignored",
                k.key_type
            ),
            "use aes256-gcm96 so ciphertexts are bound to their key_id",
        );
    }
    if k.exportable {
        r.warn(
            &format!("Transit key {mount}/{key} is exportable: its material can leave OpenBao"),
            "exportable cannot be turned off; create a new non-exportable key and migrate",
        );
    }
    if k.deletion_allowed {
        r.warn(
            &format!("Transit key {mount}/{key} allows deletion: deleting it makes every Secret unreadable"),
            &format!("bao write {mount}/keys/{key}/config deletion_allowed=false"),
        );
    }
}
