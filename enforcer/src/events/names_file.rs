//! What the live generation's numbers stand for, kept in a file beside the pins
//! (`/run/enforcer/<pin directory name>.names.json`). Records judged under a generation name its
//! rules by number; a controller started after another died adopts that generation, and reads
//! this file to name the records still queued from it, and those the kernel judges until the
//! new controller's first generation is in, by their rule ids rather than by number.
//!
//! The file is written after a switch, off the reload path, on a thread of its own that writes
//! the newest generation it has been given once reloads pause for half a second, by rename so
//! that a reader never sees half a file. It is trusted only for the generation and policy hash
//! it says it describes: a controller killed within that half second leaves the file of the
//! generation before, and its successor names the last generation's rules by number.

use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
};

use enforcer_common::identity::IdentityInfo;
use serde::{Deserialize, Serialize};

use crate::compile::{Names, RuleInfo};

/// The file, as read.
#[derive(Deserialize)]
struct Stored {
    generation: u32,
    policy_sha256: String,
    rules: Vec<(u32, RuleInfo)>,
    /// Identity number, name, flags.
    identities: Vec<(u32, String, u32)>,
}

/// The file, as written: the same fields, serialized straight from the shared names (a
/// 100 000-rule policy's names are tens of megabytes when copied).
#[derive(Serialize)]
struct StoredView<'a> {
    generation: u32,
    policy_sha256: String,
    rules: RulesView<'a>,
    identities: IdentitiesView<'a>,
}

struct RulesView<'a>(&'a Names);
struct IdentitiesView<'a>(&'a Names);

impl Serialize for RulesView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.rules.iter().map(|(number, info)| (number, &**info)))
    }
}

impl Serialize for IdentitiesView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.0
                .identities
                .iter()
                .map(|(number, (name, info))| (number, name, info.flags)),
        )
    }
}

impl<'a> StoredView<'a> {
    fn of(generation: u32, policy_hash: &[u8; 32], names: &'a Names) -> Self {
        Self {
            generation,
            policy_sha256: hex::encode(policy_hash),
            rules: RulesView(names),
            identities: IdentitiesView(names),
        }
    }
}

impl Stored {
    fn into_names(self) -> Names {
        Names {
            rules: self
                .rules
                .into_iter()
                .map(|(number, info)| (number, Arc::new(info)))
                .collect(),
            identities: self
                .identities
                .into_iter()
                .map(|(identity, name, flags)| (identity, (name, IdentityInfo { identity, flags })))
                .collect::<BTreeMap<_, _>>(),
        }
    }
}

/// The names a previous controller stored at `path` for `generation` with `policy_hash`; `None`
/// when there is no such file or it describes another generation.
pub fn read(path: &Path, generation: u32, policy_hash: &[u8; 32]) -> Option<Names> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) => {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!("cannot read {}: {error}", path.display());
            }
            return None;
        }
    };
    let stored: Stored = match serde_json::from_slice(&text) {
        Ok(stored) => stored,
        Err(error) => {
            tracing::warn!("ignoring {}: {error}", path.display());
            return None;
        }
    };
    if stored.generation != generation || stored.policy_sha256 != hex::encode(policy_hash) {
        tracing::info!(
            "{} describes generation {}, not the live {generation}: not used",
            path.display(),
            stored.generation
        );
        return None;
    }
    Some(stored.into_names())
}

/// How long reloads must pause before the newest generation's names are written.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// A generation now live: its number, policy hash and names.
type Live = (u32, [u8; 32], Arc<Names>);

/// Writes the live generation's names to the file, in the background.
pub struct NamesWriter {
    queue: Option<mpsc::Sender<Live>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NamesWriter {
    pub fn start(path: PathBuf) -> Self {
        let (queue, pending) = mpsc::channel::<Live>();
        let thread = std::thread::Builder::new()
            .name("names-file".to_owned())
            .spawn(move || {
                while let Ok(mut newest) = pending.recv() {
                    // Only the newest matters, once reloads pause: writing a large policy's
                    // names takes CPU a reload in a burst of them would rather have.
                    while let Ok(newer) = pending.recv_timeout(SETTLE) {
                        newest = newer;
                    }
                    let (generation, hash, names) = newest;
                    if let Err(error) = write(&path, &StoredView::of(generation, &hash, &names)) {
                        tracing::warn!(
                            "cannot keep the rule names in {}: {error}; a restarted controller will name this generation's rules by number",
                            path.display()
                        );
                    }
                }
            })
            .expect("spawning a thread");
        Self {
            queue: Some(queue),
            thread: Some(thread),
        }
    }

    /// Stores `names` as those of `generation`, now live.
    pub fn record(&self, generation: u32, policy_hash: [u8; 32], names: Arc<Names>) {
        if let Some(queue) = &self.queue {
            let _ = queue.send((generation, policy_hash, names));
        }
    }

    /// Writes what is pending now, and stops: at shutdown, before an `unload` removes the file.
    pub fn finish(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write(path: &Path, stored: &StoredView) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("json.partial");
    // Rule names and ids describe the policy: root's only.
    let file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    let mut file = io::BufWriter::new(file);
    serde_json::to_writer(&mut file, stored).map_err(io::Error::other)?;
    file.into_inner().map_err(io::IntoInnerError::into_error)?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScratchFile;

    fn names() -> Names {
        let rule = RuleInfo {
            id: "fe-api".into(),
            kind: crate::policy::RuleKind::Allow,
            from: "frontend".into(),
            to: "api".into(),
            ports: "8080/tcp".into(),
            max_new_per_sec: Some(10),
        };
        let frontend = IdentityInfo {
            identity: 300,
            flags: 1,
        };
        Names {
            rules: [(17u32, Arc::new(rule))].into_iter().collect(),
            identities: [(300, ("frontend".to_owned(), frontend))].into(),
        }
    }

    #[test]
    fn names_read_back_for_the_generation_and_policy_they_were_written_for_only() {
        let file = ScratchFile::new("names.json");
        let hash = [7; 32];
        let written = names();
        write(&file.0, &StoredView::of(4, &hash, &written)).unwrap();

        let read_back = read(&file.0, 4, &hash).expect("the same generation and policy");
        assert_eq!(read_back.rule_id(17), "fe-api");
        assert_eq!(read_back.rules[&17], written.rules[&17]);
        assert_eq!(read_back.identity_name(300), "frontend");
        assert_eq!(read_back.identity_info(300), written.identity_info(300));
        assert!(read(&file.0, 5, &hash).is_none(), "another generation");
        assert!(read(&file.0, 4, &[8; 32]).is_none(), "another policy");
        assert!(read(Path::new("/nonexistent/names.json"), 4, &hash).is_none());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file.0).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the policy's rule names are root's only");
    }

    #[test]
    fn the_writer_leaves_the_newest_generation_in_the_file() {
        let file = ScratchFile::new("names-writer.json");
        let mut writer = NamesWriter::start(file.0.clone());
        let names = Arc::new(names());
        writer.record(1, [1; 32], names.clone());
        let settled = enforcer_testbed::eventually(std::time::Duration::from_secs(5), || {
            read(&file.0, 1, &[1; 32]).is_some()
        });
        assert!(
            settled,
            "generation 1's names were written once reloads paused"
        );
        for generation in 2..=20 {
            writer.record(generation, [1; 32], names.clone());
        }
        // At shutdown, what is pending is written before the writer stops.
        writer.finish();
        assert!(read(&file.0, 20, &[1; 32]).is_some());
    }
}
