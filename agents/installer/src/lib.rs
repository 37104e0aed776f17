//! The KubeBao node installer: copies the files the operator rendered (KMS static-pod manifest,
//! `EncryptionConfiguration`, KMS agent config, AppRole credentials) from a mounted
//! ConfigMap/Secret onto the host, atomically, and removes them again on uninstall.
//!
//! The operator decides *what* goes *where* in a [`Plan`] (`plan.json` in the bundle); this crate
//! only checks that every destination is an absolute path without `..`, writes each file
//! (temp file, fsync, rename, fsync of the directory), and records what it wrote in a state file
//! so that `uninstall` removes exactly those files and nothing else.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Name of the plan inside the bundle directory.
pub const PLAN_FILE: &str = "plan.json";

/// What the installer should do with the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Write every file of the plan.
    #[default]
    Install,
    /// Remove every file recorded in the state file, except those the plan keeps.
    Uninstall,
}

/// Where a file's content comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The bundle directory (a ConfigMap mount).
    #[default]
    Config,
    /// The secrets directory (a Secret mount); such files are written 0600.
    Secret,
}

/// One file to place on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFile {
    /// Key (file name) in the bundle or secrets directory.
    pub name: String,
    /// Which directory `name` is read from.
    #[serde(default)]
    pub source: Source,
    /// Absolute destination path on the host (below the host root inside the container).
    pub path: String,
    /// File mode, e.g. 0o644; secrets are always written 0o600 whatever this says.
    pub mode: u32,
}

/// The operator's instructions to every installer pod (`plan.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Install or uninstall.
    #[serde(default)]
    pub action: Action,
    /// Absolute host path of the state file (what was installed, and its hash).
    pub state_path: String,
    /// Files in the order they are written (the static-pod manifest last, so the kubelet never
    /// starts the plugin before its config and credentials exist); removed in reverse order.
    pub files: Vec<PlannedFile>,
    /// On uninstall: files written (or left) in place instead of removed, e.g. an
    /// `identity`-only EncryptionConfiguration that kube-apiserver's flag still points at.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<PlannedFile>,
}

/// What the installer wrote, kept on the host so `uninstall` knows what to remove.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Content hash of the installed set (see [`content_hash`]).
    pub hash: String,
    /// Host paths written, in install order, with the SHA-256 of each file.
    pub files: Vec<InstalledFile>,
}

/// One installed file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledFile {
    /// Absolute host path.
    pub path: String,
    /// SHA-256 of the content, hex.
    pub sha256: String,
}

/// What an `apply` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Files were installed (or already up to date); the content hash of the set.
    Installed {
        /// Content hash of the installed set.
        hash: String,
        /// How many files were actually (re)written.
        written: usize,
    },
    /// Files recorded in the state were removed.
    Uninstalled {
        /// How many files were removed.
        removed: usize,
        /// How many files the plan keeps in place.
        kept: usize,
    },
}

/// An installer failure, naming the file and what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plan could not be read or parsed.
    #[error("cannot read the plan {path}: {reason}; is the operator's ConfigMap mounted there?")]
    Plan {
        /// Plan path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A destination is not an absolute, normal path.
    #[error(
        "refusing destination {0:?}: it must be an absolute path without '..' (plan written by the operator is malformed)"
    )]
    BadPath(String),
    /// A source file named in the plan is missing.
    #[error("the plan names {name} but {path} cannot be read: {reason}")]
    Source {
        /// Key in the bundle.
        name: String,
        /// Path tried.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Writing or removing a host file failed.
    #[error(
        "cannot {op} {path}: {reason}; check the hostPath mount and that the installer runs as root"
    )]
    Host {
        /// write / remove / create directory.
        op: &'static str,
        /// Path inside the container.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Reads `plan.json` from the bundle directory.
pub fn read_plan(bundle: &Path) -> Result<Plan, Error> {
    let path = bundle.join(PLAN_FILE);
    let text = fs::read(&path).map_err(|e| Error::Plan {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    serde_json::from_slice(&text).map_err(|e| Error::Plan {
        path,
        reason: e.to_string(),
    })
}

/// Maps an absolute host path below `host_root`, refusing relative paths and `..`.
pub fn host_path(host_root: &Path, path: &str) -> Result<PathBuf, Error> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::BadPath(path.into()));
    }
    let mut out = host_root.to_path_buf();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            _ => return Err(Error::BadPath(path.into())),
        }
    }
    if out == host_root {
        return Err(Error::BadPath(path.into()));
    }
    Ok(out)
}

/// The content hash of a set of files: SHA-256 over each destination path, mode and content, in
/// plan order. Equal plans and contents give equal hashes on every node.
pub fn content_hash(files: &[(String, u32, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    for (path, mode, content) in files {
        h.update(path.as_bytes());
        h.update([0]);
        h.update(mode.to_be_bytes());
        h.update((content.len() as u64).to_be_bytes());
        h.update(content);
    }
    hex::encode(h.finalize())
}

/// Loads every file's content, with the mode it will get.
fn load(
    files: &[PlannedFile],
    bundle: &Path,
    secrets: &Path,
) -> Result<Vec<(String, u32, Vec<u8>)>, Error> {
    files
        .iter()
        .map(|f| {
            let dir = match f.source {
                Source::Config => bundle,
                Source::Secret => secrets,
            };
            let src = dir.join(&f.name);
            if f.name.contains('/') || f.name.starts_with('.') {
                return Err(Error::Source {
                    name: f.name.clone(),
                    path: src,
                    reason: "names must be plain file names".into(),
                });
            }
            let content = fs::read(&src).map_err(|e| Error::Source {
                name: f.name.clone(),
                path: src.clone(),
                reason: e.to_string(),
            })?;
            let mode = match f.source {
                Source::Secret => 0o600,
                Source::Config => f.mode & 0o777,
            };
            Ok((f.path.clone(), mode, content))
        })
        .collect()
}

/// The content hash the plan would install now (used to notice a changed bundle).
pub fn planned_hash(bundle: &Path, secrets: &Path) -> Result<String, Error> {
    let plan = read_plan(bundle)?;
    let files = match plan.action {
        Action::Install => &plan.files,
        Action::Uninstall => &plan.keep,
    };
    Ok(content_hash(&load(files, bundle, secrets)?))
}

fn host_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::Host {
        op,
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Writes `content` to `dest` atomically: a temp file in the same directory, fsync, rename,
/// fsync of the directory. Returns false (and writes nothing) when the file already has this
/// content and mode, so an unchanged plan never touches the kubelet's manifest directory.
pub fn write_atomic(dest: &Path, content: &[u8], mode: u32) -> Result<bool, Error> {
    if let (Ok(old), Ok(meta)) = (fs::read(dest), fs::metadata(dest))
        && old == content
        && meta.permissions().mode() & 0o777 == mode
    {
        return Ok(false);
    }
    let dir = dest
        .parent()
        .ok_or_else(|| Error::BadPath(dest.display().to_string()))?;
    fs::create_dir_all(dir).map_err(host_err("create directory", dir))?;
    let file_name = dest
        .file_name()
        .ok_or_else(|| Error::BadPath(dest.display().to_string()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.kubebao-tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        // Created with the final mode, so a secret is never readable by others, even briefly.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)?;
        File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(host_err("write", dest)(e));
    }
    Ok(true)
}

/// Reads the state file, if any.
pub fn read_state(state: &Path) -> Option<State> {
    serde_json::from_slice(&fs::read(state).ok()?).ok()
}

/// Installs every planned file below `host_root`, then records them in the state file. Files
/// installed before but no longer in the plan are removed.
pub fn install(
    plan: &Plan,
    bundle: &Path,
    secrets: &Path,
    host_root: &Path,
) -> Result<Outcome, Error> {
    let (hash, written, _) = place(&plan.files, &plan.state_path, bundle, secrets, host_root)?;
    Ok(Outcome::Installed { hash, written })
}

/// Writes `files` below `host_root` and records them in the state file at `state`, removing
/// what an older plan installed and these files do not include. Returns the content hash, how
/// many files were written and how many were removed.
fn place(
    files: &[PlannedFile],
    state: &str,
    bundle: &Path,
    secrets: &Path,
    host_root: &Path,
) -> Result<(String, usize, usize), Error> {
    let contents = load(files, bundle, secrets)?;
    let state_path = host_path(host_root, state)?;
    let dests = contents
        .iter()
        .map(|(p, _, _)| host_path(host_root, p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut written = 0;
    let mut installed = Vec::new();
    for ((path, mode, content), dest) in contents.iter().zip(&dests) {
        if write_atomic(dest, content, *mode)? {
            written += 1;
        }
        installed.push(InstalledFile {
            path: path.clone(),
            sha256: hex::encode(Sha256::digest(content)),
        });
    }
    // Remove what an older plan installed and this one no longer wants.
    let mut removed = 0;
    if let Some(old) = read_state(&state_path) {
        for f in old.files.iter().rev() {
            if !contents.iter().any(|(p, _, _)| p == &f.path)
                && remove(&host_path(host_root, &f.path)?)?
            {
                removed += 1;
            }
        }
    }
    let hash = content_hash(&contents);
    let state = State {
        hash: hash.clone(),
        files: installed,
    };
    let json = serde_json::to_vec_pretty(&state).expect("state serialises");
    write_atomic(&state_path, &json, 0o600)?;
    Ok((hash, written, removed))
}

fn remove(path: &Path) -> Result<bool, Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(host_err("remove", path)(e)),
    }
}

/// Removes every file recorded in the state file (in reverse install order: the static-pod
/// manifest first), then the state file itself. Files it did not install are never touched.
pub fn uninstall(state_path: &str, host_root: &Path) -> Result<Outcome, Error> {
    let state_file = host_path(host_root, state_path)?;
    let mut removed = 0;
    if let Some(state) = read_state(&state_file) {
        for f in state.files.iter().rev() {
            if remove(&host_path(host_root, &f.path)?)? {
                removed += 1;
            }
        }
    }
    remove(&state_file)?;
    Ok(Outcome::Uninstalled { removed, kept: 0 })
}

/// Uninstalls, keeping the plan's `keep` files: every other recorded file is removed (the
/// static-pod manifest first) and the kept ones written; with nothing kept, the state file goes
/// too (see [`uninstall`]).
pub fn uninstall_keeping(
    plan: &Plan,
    bundle: &Path,
    secrets: &Path,
    host_root: &Path,
) -> Result<Outcome, Error> {
    if plan.keep.is_empty() {
        return uninstall(&plan.state_path, host_root);
    }
    let (_, _, removed) = place(&plan.keep, &plan.state_path, bundle, secrets, host_root)?;
    Ok(Outcome::Uninstalled {
        removed,
        kept: plan.keep.len(),
    })
}

/// Applies the bundle's plan: install or uninstall.
pub fn apply(bundle: &Path, secrets: &Path, host_root: &Path) -> Result<Outcome, Error> {
    let plan = read_plan(bundle)?;
    match plan.action {
        Action::Install => install(&plan, bundle, secrets, host_root),
        Action::Uninstall => uninstall_keeping(&plan, bundle, secrets, host_root),
    }
}

/// A summary of the host state for `/readyz` and logs: path → sha256.
pub fn installed_files(state: &State) -> BTreeMap<String, String> {
    state
        .files
        .iter()
        .map(|f| (f.path.clone(), f.sha256.clone()))
        .collect()
}

#[cfg(test)]
mod tests;
