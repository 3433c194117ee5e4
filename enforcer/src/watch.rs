//! Noticing policy changes: inotify on the directory that holds the policy, so that in-place
//! writes, editors' rename-over saves and the atomic `..data` symlink swap of a Kubernetes
//! ConfigMap mount are all seen. Any event there makes the controller look again; it reloads
//! only if what it compiles differs from what is live.

use std::{path::Path, time::Instant};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Keeps the watch alive; dropping it stops it.
pub struct PolicyWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Watches what `policy` (a file or a directory) depends on; sends the time of each change.
pub fn watch(policy: &Path, changes: mpsc::UnboundedSender<Instant>) -> notify::Result<PolicyWatch> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) if !event.kind.is_access() => {
            let _ = changes.send(Instant::now());
        }
        Ok(_) => {}
        Err(error) => tracing::warn!("policy watch: {error}"),
    })?;
    let directory = if policy.is_dir() {
        policy.to_owned()
    } else {
        policy.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned()
    };
    watcher.watch(&directory, RecursiveMode::NonRecursive)?;
    // The directory a symlinked policy resolves into (a ConfigMap's `..data` target) changes
    // too; the swap itself shows in `directory`, edits inside the target here.
    if let Ok(target) = policy.canonicalize() {
        let target_directory = if target.is_dir() { target } else { target.parent().map(Path::to_owned).unwrap_or(target) };
        if target_directory != directory {
            let _ = watcher.watch(&target_directory, RecursiveMode::NonRecursive);
        }
    }
    Ok(PolicyWatch { _watcher: watcher })
}
