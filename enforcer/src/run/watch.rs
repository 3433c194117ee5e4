//! Noticing policy changes: inotify on the directory that holds the policy, so that in-place
//! writes, editors' rename-over saves and the atomic `..data` symlink swap of a Kubernetes
//! ConfigMap mount are all seen. Only the policy's own entries count — its file (or `*.toml`
//! files of a policy directory) and ConfigMap `..` entries — so logs or alerts kept beside the
//! policy do not set off reloads. Only events that end a change count: a file closed after
//! writing, a rename, a removal, a symlink made. A write in progress (the truncation that opens
//! `>` or `fs::write`, each chunk after it) is not one: reading the file then would install
//! whatever part of it was written. The controller reloads only if what it compiles differs
//! from what is live.
//!
//! The watch asks the kernel for those events alone ([`ENDS_OF_CHANGES`]). A watch for every
//! kind (`IN_MODIFY`, `IN_OPEN`: what the `notify` crate asks for, whatever it is told) woke
//! this process once a write of any file beside the policy: under a flood, the alerts file's
//! writes were 13% of the machine's samples.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    io,
    path::{Path, PathBuf},
    time::Instant,
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
    task::JoinHandle,
};

/// Keeps the watch alive; dropping it stops it.
pub struct PolicyWatch {
    reader: JoinHandle<()>,
}

impl Drop for PolicyWatch {
    fn drop(&mut self) {
        self.reader.abort();
    }
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

/// The events a watched directory reports: those that can end a change (see
/// [`ends_a_change`]).
const ENDS_OF_CHANGES: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE)
    .union(WatchMask::CREATE);

/// Whether an event ends a change to `path`: after it, the file holds what its writer meant.
fn ends_a_change(mask: EventMask, path: &Path) -> bool {
    if mask.intersects(
        EventMask::CLOSE_WRITE | EventMask::MOVED_FROM | EventMask::MOVED_TO | EventMask::DELETE,
    ) {
        return true;
    }
    // A new regular file is empty until written and closed; a symlink is whole at once.
    mask.contains(EventMask::CREATE) && path.is_symlink()
}

/// The directories watched, by watch descriptor: an event names its entry within one.
type Watched = Vec<(WatchDescriptor, PathBuf)>;

/// Watches what `policy` (a file or a directory) depends on; sends the time of each change.
/// Runs on the current tokio runtime.
pub fn watch(policy: &Path, changes: mpsc::UnboundedSender<Instant>) -> io::Result<PolicyWatch> {
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
    let inotify = Inotify::init()?;
    let watched_directory: PathBuf = if directory {
        policy.to_owned()
    } else {
        policy
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned()
    };
    let mut watched: Watched = vec![(
        inotify.watches().add(&watched_directory, ENDS_OF_CHANGES)?,
        watched_directory.clone(),
    )];
    // The directory a symlinked policy resolves into (a ConfigMap's `..data` target) changes
    // too; the swap itself shows in the policy's directory, edits inside the target here.
    if let Some(target) = canonical {
        let target_directory = if target.is_dir() {
            target
        } else {
            target.parent().map(Path::to_owned).unwrap_or(target)
        };
        if target_directory != watched_directory
            && let Ok(descriptor) = inotify.watches().add(&target_directory, ENDS_OF_CHANGES)
        {
            watched.push((descriptor, target_directory));
        }
    }
    // SAFETY: the descriptor is the inotify instance's own, open until the instance is
    // dropped (with the `AsyncFd`), and `as_raw_fd` always gives that one.
    let inotify = unsafe { AsyncFd::register_with_interest(inotify, Interest::READABLE) }?;
    let reader = tokio::spawn(read_changes(inotify, watched, relevance, changes));
    Ok(PolicyWatch { reader })
}

/// Sends the time of each batch of events that changed the policy, until the receiver is gone.
async fn read_changes(
    mut inotify: AsyncFd<Inotify>,
    watched: Watched,
    relevance: Relevance,
    changes: mpsc::UnboundedSender<Instant>,
) {
    let mut buffer = [0u8; 4096];
    loop {
        let mut ready = match inotify.readable_mut().await {
            Ok(ready) => ready,
            Err(error) => return tracing::warn!("policy watch: {error}"),
        };
        let changed = ready.try_io(|inotify| {
            let mut events = inotify.get_mut().read_events(&mut buffer)?;
            Ok(events.any(|event| changes_the_policy(&event, &watched, &relevance)))
        });
        match changed {
            Ok(Ok(true)) => {
                if changes.send(Instant::now()).is_err() {
                    return;
                }
            }
            // Events about other entries; or nothing to read after all, and `try_io` waits for
            // the next readiness.
            Ok(Ok(false)) | Err(_) => {}
            Ok(Err(error)) => return tracing::warn!("policy watch: {error}"),
        }
    }
}

/// Whether `event` changed the policy. An overflowed queue lost events: look again.
fn changes_the_policy(
    event: &inotify::Event<&std::ffi::OsStr>,
    watched: &Watched,
    relevance: &Relevance,
) -> bool {
    if event.mask.contains(EventMask::Q_OVERFLOW) {
        return true;
    }
    let (Some(name), Some((_, directory))) = (
        event.name,
        watched
            .iter()
            .find(|(descriptor, _)| *descriptor == event.wd),
    ) else {
        return false;
    };
    let path = directory.join(name);
    relevance.concerns(&path) && ends_a_change(event.mask, &path)
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
        let policy = Path::new("/nonexistent/policy.toml");
        assert!(
            !ends_a_change(EventMask::MODIFY, policy),
            "truncated or partly written"
        );
        assert!(!ends_a_change(EventMask::CREATE, policy), "created empty");
        assert!(!ends_a_change(EventMask::ATTRIB, policy));
        assert!(!ends_a_change(EventMask::OPEN, policy));
        assert!(ends_a_change(EventMask::CLOSE_WRITE, policy));
        assert!(
            ends_a_change(EventMask::MOVED_TO, policy),
            "saved by rename, or a ConfigMap swap"
        );
        assert!(ends_a_change(EventMask::DELETE, policy));
        let scratch = crate::ScratchFile::new("policy-link.toml");
        std::os::unix::fs::symlink("/etc/hostname", &scratch.0).unwrap();
        assert!(
            ends_a_change(EventMask::CREATE, &scratch.0),
            "a symlink made"
        );
    }

    /// The kernel is asked only for what can end a change: writes beside the policy (an alerts
    /// file) wake nothing.
    #[test]
    fn the_watch_asks_for_no_event_that_cannot_end_a_change() {
        assert!(!ENDS_OF_CHANGES.intersects(
            WatchMask::MODIFY | WatchMask::OPEN | WatchMask::ACCESS | WatchMask::ATTRIB
        ));
        for kind in [
            EventMask::CLOSE_WRITE,
            EventMask::MOVED_FROM,
            EventMask::MOVED_TO,
            EventMask::DELETE,
        ] {
            assert!(ends_a_change(kind, Path::new("/nonexistent/policy.toml")));
        }
    }
}
