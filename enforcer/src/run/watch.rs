//! Noticing policy changes: inotify on the directory that holds the policy, so that in-place
//! writes, editors' rename-over saves and the atomic `..data` symlink swap of a Kubernetes
//! ConfigMap mount are all seen. Only the policy's own entries count — its file (or `*.toml`
//! files of a policy directory) and ConfigMap `..` entries — so logs or alerts kept beside the
//! policy do not set off reloads. Only events that end a change count: a file closed after
//! writing, a rename, a removal, a symlink made. A write in progress (the truncation that opens
//! `>` or `fs::write`, each chunk after it) is not one: reading the file then would install
//! whatever part of it was written. The controller reloads only if what it compiles differs
//! from what is live.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    path::{Path, PathBuf},
    time::Instant,
};

use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, CreateKind, ModifyKind},
};
use tokio::sync::mpsc;

/// Keeps the watch alive; dropping it stops it.
pub struct PolicyWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Which changed paths concern the policy.
struct Relevance {
    /// A directory of `*.toml` files, rather than one file.
    directory: bool,
    /// Names the policy file goes by: its own and its symlink target's.
    names: BTreeSet<OsString>,
}

impl Relevance {
    fn concerns(&self, path: &Path) -> bool {
        let Some(name) = path.file_name() else {
            return false;
        };
        // ConfigMap volumes swap `..data` (and write `..data_tmp`, `..<timestamp>`).
        if name.as_encoded_bytes().starts_with(b"..") {
            return true;
        }
        if self.directory {
            return path
                .extension()
                .is_some_and(|extension| extension == "toml");
        }
        self.names.contains(name)
    }
}

/// Whether an event ends a change to `path`: after it, the file holds what its writer meant.
fn ends_a_change(kind: &EventKind, path: &Path) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(_))
        | EventKind::Remove(_) => true,
        // A new regular file is empty until written and closed; a symlink is whole at once.
        EventKind::Create(CreateKind::File) => path.is_symlink(),
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Access(_) => false,
        // Events notify cannot classify (a queue overflow among them): look again.
        EventKind::Any | EventKind::Other => true,
    }
}

/// Watches what `policy` (a file or a directory) depends on; sends the time of each change.
pub fn watch(
    policy: &Path,
    changes: mpsc::UnboundedSender<Instant>,
) -> notify::Result<PolicyWatch> {
    let directory = policy.is_dir();
    let canonical = policy.canonicalize().ok();
    let mut names: BTreeSet<OsString> = policy
        .file_name()
        .map(ToOwned::to_owned)
        .into_iter()
        .collect();
    names.extend(
        canonical
            .as_deref()
            .and_then(Path::file_name)
            .map(ToOwned::to_owned),
    );
    let relevance = Relevance { directory, names };
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(event)
                if event.need_rescan()
                    || event.paths.iter().any(|path| {
                        relevance.concerns(path) && ends_a_change(&event.kind, path)
                    }) =>
            {
                let _ = changes.send(Instant::now());
            }
            Ok(_) => {}
            Err(error) => tracing::warn!("policy watch: {error}"),
        })?;
    let watched: PathBuf = if directory {
        policy.to_owned()
    } else {
        policy
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned()
    };
    watcher.watch(&watched, RecursiveMode::NonRecursive)?;
    // The directory a symlinked policy resolves into (a ConfigMap's `..data` target) changes
    // too; the swap itself shows in `watched`, edits inside the target here.
    if let Some(target) = canonical {
        let target_directory = if target.is_dir() {
            target
        } else {
            target.parent().map(Path::to_owned).unwrap_or(target)
        };
        if target_directory != watched {
            let _ = watcher.watch(&target_directory, RecursiveMode::NonRecursive);
        }
    }
    Ok(PolicyWatch { _watcher: watcher })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_policys_own_entries_count() {
        let file = Relevance {
            directory: false,
            names: BTreeSet::from([OsString::from("policy.toml")]),
        };
        assert!(file.concerns(Path::new("/etc/enforcer/policy.toml")));
        assert!(file.concerns(Path::new("/etc/enforcer/..data")));
        assert!(file.concerns(Path::new("/etc/enforcer/..data_tmp")));
        assert!(
            !file.concerns(Path::new("/etc/enforcer/audit.jsonl")),
            "a log beside the policy"
        );
        assert!(!file.concerns(Path::new("/etc/enforcer/other.toml")));
        let directory = Relevance {
            directory: true,
            names: BTreeSet::new(),
        };
        assert!(directory.concerns(Path::new("/etc/enforcer/20-db.toml")));
        assert!(!directory.concerns(Path::new("/etc/enforcer/alerts.jsonl")));
    }

    #[test]
    fn a_write_counts_when_it_is_finished_not_while_it_is_under_way() {
        use notify::event::{DataChange, MetadataKind, RemoveKind, RenameMode};
        let policy = Path::new("/nonexistent/policy.toml");
        let written = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert!(
            !ends_a_change(&written, policy),
            "truncated or partly written"
        );
        assert!(
            !ends_a_change(&EventKind::Create(CreateKind::File), policy),
            "created empty"
        );
        assert!(!ends_a_change(
            &EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            policy
        ));
        assert!(!ends_a_change(
            &EventKind::Access(AccessKind::Open(notify::event::AccessMode::Any)),
            policy
        ));
        assert!(ends_a_change(
            &EventKind::Access(AccessKind::Close(AccessMode::Write)),
            policy
        ));
        assert!(
            ends_a_change(&EventKind::Modify(ModifyKind::Name(RenameMode::To)), policy),
            "saved by rename, or a ConfigMap swap"
        );
        assert!(ends_a_change(&EventKind::Remove(RemoveKind::File), policy));
        let scratch = crate::ScratchFile::new("policy-link.toml");
        std::os::unix::fs::symlink("/etc/hostname", &scratch.0).unwrap();
        assert!(
            ends_a_change(&EventKind::Create(CreateKind::File), &scratch.0),
            "a symlink made"
        );
    }
}
