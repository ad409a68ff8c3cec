//! Hot reload: watches the config file's directory (editors and config
//! management replace files by rename, which a watch on the file itself
//! misses) and takes SIGHUP. After a short debounce the file is loaded and
//! checked like at start-up. A valid config is sent whole to the rest of
//! the daemon; an invalid one is logged and published on `status`, and the
//! running config stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::metrics::{Metrics, ReloadResult};
use crate::mqtt::StatusBoard;

/// Editors write a file in several steps; wait for them to finish.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Why the config cannot be watched. The daemon runs on without reload.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// inotify refused the watch.
    #[error("{path}: cannot watch for config changes: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// notify's error.
        source: notify::Error,
    },
    /// The SIGHUP handler cannot be installed.
    #[error("cannot handle SIGHUP: {0}")]
    Signal(std::io::Error),
}

/// Whether a file event concerns the config file.
fn concerns(event: &notify::Event, file: &Path) -> bool {
    !event.kind.is_access()
        && event
            .paths
            .iter()
            .any(|p| p.file_name() == file.file_name())
}

/// Watches `path` and sends each new valid config on `configs`, counting
/// each outcome in `metrics`. Returns only if watching cannot start.
pub async fn run(
    path: PathBuf,
    configs: watch::Sender<Arc<Config>>,
    status: Arc<StatusBoard>,
    metrics: Arc<Metrics>,
) -> Result<(), ReloadError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let (tx, mut changes) = mpsc::unbounded_channel();
    let file = path.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| concerns(&e, &file)) {
            let _ = tx.send("file change");
        }
    })
    .map_err(|source| ReloadError::Watch {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(|source| ReloadError::Watch {
            path: dir.clone(),
            source,
        })?;
    let mut hangup = signal(SignalKind::hangup()).map_err(ReloadError::Signal)?;
    status.set_config_error(None);
    loop {
        let why = tokio::select! {
            c = changes.recv() => match c { Some(c) => c, None => return Ok(()) },
            _ = hangup.recv() => "SIGHUP",
        };
        tokio::time::sleep(DEBOUNCE).await;
        while changes.try_recv().is_ok() {}
        // Off the async thread: a large file takes a while to parse.
        let file = path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&file))
            .await
            .unwrap_or_else(|e| {
                Err(crate::config::ConfigError::Read {
                    path: path.clone(),
                    source: std::io::Error::other(e),
                })
            });
        match loaded {
            Ok(new) => {
                let changed = **configs.borrow() != new;
                if changed {
                    log::info!("{}: reloaded ({why})", path.display());
                }
                // SIGHUP applies the file even when its text is the same:
                // a model file fixed in place after a failed load is then
                // loaded again.
                if changed || why == "SIGHUP" {
                    configs.send_replace(Arc::new(new));
                }
                metrics.count_reload(if changed {
                    ReloadResult::Applied
                } else {
                    ReloadResult::Unchanged
                });
                status.set_config_error(None);
            }
            Err(e) => {
                log::error!("{e}; keeping the running configuration");
                metrics.count_reload(ReloadResult::Rejected);
                status.set_config_error(Some(&e.to_string()));
            }
        }
    }
}
