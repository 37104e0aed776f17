//! The unix socket both agents serve their contract on: private (0600) from the first moment,
//! never stealing a socket another process still serves.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Something accepts connections on the path: another agent is running.
    #[error("another process is serving on {0}; stop it first or choose another socket path")]
    InUse(PathBuf),
    /// The path exists and is not a socket; we never remove such a file.
    #[error(
        "{0} exists and is not a socket; refusing to remove it (remove it yourself or choose another path)"
    )]
    NotASocket(PathBuf),
    /// A file system call failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SocketError + use<> {
    let path = path.to_path_buf();
    move |source| SocketError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Binds `path` with mode 0600. Creates the directory; replaces a stale socket (nothing
/// accepts on it: a crashed agent's leftover) but never a live one or a non-socket. The socket
/// is bound under a temporary name, restricted, then renamed into place, so it is never
/// reachable with a wider mode.
pub fn bind_private(path: &Path) -> Result<UnixListener, SocketError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io("create the socket directory", dir))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.into()));
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            return Err(SocketError::InUse(path.into()));
        }
        Ok(_) => {
            tracing::info!(socket = %path.display(), "removing stale socket (nothing listens on it)");
            std::fs::remove_file(path).map_err(io("remove the stale socket", path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", path)(e)),
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io("listen on", path))?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("set up the socket", path)(e));
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn socket_is_private_live_ones_kept_stale_ones_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/agent.sock");
        let live = bind_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind_private(&path), Err(SocketError::InUse(_))));
        drop(live);
        bind_private(&path).expect("a stale socket is replaced");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            bind_private(&file),
            Err(SocketError::NotASocket(_))
        ));
        assert!(file.exists(), "a non-socket is never removed");
    }
}
