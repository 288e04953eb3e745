//! Hot reload: watches `router.toml` and the plugins folder (debounced) and
//! applies what changed.
//!
//! - A changed `.wasm` of a configured plugin is compiled off the event path and
//!   swapped in; a broken one leaves the running version serving, with the
//!   error in the plugin's status and the log. A new file loads; a deleted file
//!   stops its plugin once its in-flight events finish (its queue keeps what
//!   arrives until the file is back).
//! - A changed `router.toml` is loaded and validated whole; a valid one is
//!   applied live, an invalid one is refused and the running configuration
//!   stays.
//!
//! Only changes count: reads (a load opens the file it loads) are ignored, a
//! `.wasm` whose content is the version already serving is not reloaded, and
//! `router.toml` is reloaded when its content changes, however that happens: an
//! editor's rename, or Kubernetes swapping a ConfigMap volume's `..data`
//! symlink (the folder is watched as named, not where its symlinks lead).
//!
//! The watcher stops when the returned [`Watcher`] is dropped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use crossbeam_channel::RecvTimeoutError;
use notify::{EventKind, RecursiveMode, Watcher as _};

use crate::appliance::Appliance;
use crate::config::RouterConfig;

/// How long the file system must be quiet before a change is applied.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// A running watcher. Dropping it stops watching and waits for the thread
/// that applies changes to end, so that the appliance it holds is let go of
/// by the time the drop returns (a restart in the same folder can open its
/// state store again at once).
pub struct Watcher {
    watcher: Option<notify::RecommendedWatcher>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Dropping the notify watcher drops the sender, which ends the thread.
        self.watcher.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the watcher thread panicked");
        }
    }
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// Starts watching `config_path` (its folder, since editors replace files by
/// renaming) and the configured plugins folder.
pub fn start(appliance: Appliance, config_path: &Path) -> anyhow::Result<Watcher> {
    // As named: a ConfigMap's router.toml is a symlink into a folder that the
    // next update deletes, so neither the file nor its target may be watched.
    let config_file =
        std::path::absolute(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    let config_dir = config_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let plugins_dir = canonical(&appliance.config().plugins_dir);
    // What the running configuration was read from, taken before anything is
    // watched: a change from here on is a change.
    let config_seen = content_hash(&config_file);
    let (tx, rx) = crossbeam_channel::unbounded::<PathBuf>();
    let mut watcher =
        notify::recommended_watcher(move |result: notify::Result<notify::Event>| match result {
            Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
            Ok(event) => {
                for path in event.paths {
                    let _ = tx.send(path);
                }
            }
            Err(e) => tracing::warn!(error = %e, "file watcher error"),
        })
        .context("cannot start the file watcher")?;
    watcher
        .watch(&config_dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", config_dir.display()))?;
    if plugins_dir != config_dir {
        std::fs::create_dir_all(&plugins_dir)
            .with_context(|| format!("cannot create {}", plugins_dir.display()))?;
        watcher
            .watch(&plugins_dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", plugins_dir.display()))?;
    }
    // Dropping the watcher drops the sender, which ends this thread.
    let thread = std::thread::Builder::new()
        .name("switchboard-watch".into())
        .spawn(move || debounce(&rx, &appliance, &config_file, &config_dir, config_seen))
        .context("cannot start the watcher thread")?;
    tracing::info!(config = %config_path.display(), plugins = %plugins_dir.display(), "watching for changes");
    Ok(Watcher {
        watcher: Some(watcher),
        thread: Some(thread),
    })
}

/// Collects changed paths until the file system has been quiet for
/// [`DEBOUNCE`], then applies them.
fn debounce(
    rx: &crossbeam_channel::Receiver<PathBuf>,
    appliance: &Appliance,
    config_file: &Path,
    config_dir: &Path,
    mut config_seen: Option<[u8; 32]>,
) {
    while let Ok(first) = rx.recv() {
        let mut paths = BTreeSet::from([first]);
        loop {
            match rx.recv_timeout(DEBOUNCE) {
                Ok(path) => {
                    paths.insert(path);
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // Anything in the config's folder may be the config changing (a rename,
        // a symlink swap): reload when its content did.
        if paths.iter().any(|p| p.parent() == Some(config_dir)) {
            let now = content_hash(config_file);
            if now != config_seen {
                config_seen = now;
                reload_config(appliance, config_file);
            }
        }
        for path in paths {
            on_change(appliance, &path);
        }
    }
}

/// A hash of the file's content as a read sees it (through symlinks); `None`
/// when it cannot be read.
fn content_hash(path: &Path) -> Option<[u8; 32]> {
    use sha2::Digest as _;
    std::fs::read(path)
        .ok()
        .map(|bytes| sha2::Sha256::digest(&bytes).into())
}

fn on_change(appliance: &Appliance, path: &Path) {
    let path = canonical(path);
    if path.extension().is_none_or(|e| e != "wasm") {
        return;
    }
    let Some(plugin) = appliance
        .statuses()
        .into_iter()
        .find(|s| canonical(&s.file) == path)
        .map(|s| s.name)
    else {
        tracing::info!(file = %path.display(), "a .wasm no plugin in router.toml uses; add it there to run it");
        return;
    };
    if path.exists() {
        if appliance.is_serving_file(&plugin, &path) {
            return;
        }
        match appliance.reload_plugin(&plugin) {
            Ok(()) => tracing::info!(plugin, "plugin reloaded"),
            Err(e) => {
                tracing::error!(plugin, error = %e, "new version refused; the previous one keeps serving")
            }
        }
    } else {
        appliance.plugin_file_removed(&plugin);
    }
}

fn reload_config(appliance: &Appliance, config_file: &Path) {
    match RouterConfig::load(config_file) {
        Ok(config) => match appliance.apply(config) {
            Ok(()) => {
                tracing::info!("router.toml applied");
                appliance.config_reloaded(true);
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "router.toml refused; the running configuration stays");
                appliance.set_config_error(Some(format!("{e:#}")));
                appliance.config_reloaded(false);
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "router.toml refused; the running configuration stays");
            appliance.set_config_error(Some(e.to_string()));
            appliance.config_reloaded(false);
        }
    }
}
