//! What the live generation's numbers stand for, kept in a file beside the pins
//! (`/run/enforcer/<pin directory name>.names.json`). Records judged under a generation name its
//! rules by number; a controller started after another died adopts that generation, and reads
//! this file to name the records still queued from it, and those the kernel judges until the
//! new controller's first generation is in, by their rule ids rather than by number.
//!
//! The file is written after each switch, off the reload path, on a thread of its own that
//! writes only the newest generation it has been given, by rename so that a reader never sees
//! half a file. It is trusted only for the generation and policy hash it says it describes.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
};

use enforcer_common::identity::IdentityInfo;
use serde::{Deserialize, Serialize};

use crate::compile::{Names, RuleInfo};

#[derive(Serialize, Deserialize)]
struct Stored {
    generation: u32,
    policy_sha256: String,
    rules: Vec<(u32, RuleInfo)>,
    /// Identity number, name, flags.
    identities: Vec<(u32, String, u32)>,
}

impl Stored {
    fn of(generation: u32, policy_hash: &[u8; 32], names: &Names) -> Self {
        Self {
            generation,
            policy_sha256: hex::encode(policy_hash),
            rules: names
                .rules
                .iter()
                .map(|(number, info)| (*number, RuleInfo::clone(info)))
                .collect(),
            identities: names
                .identities
                .iter()
                .map(|(number, (name, info))| (*number, name.clone(), info.flags))
                .collect(),
        }
    }

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

/// Writes the live generation's names to the file, in the background.
pub struct NamesWriter {
    queue: mpsc::Sender<(u32, [u8; 32], Arc<Names>)>,
}

impl NamesWriter {
    pub fn start(path: PathBuf) -> Self {
        let (queue, pending) = mpsc::channel::<(u32, [u8; 32], Arc<Names>)>();
        std::thread::Builder::new()
            .name("names-file".to_owned())
            .spawn(move || {
                while let Ok(mut newest) = pending.recv() {
                    // Only the newest matters: skip what a quicker reload already replaced.
                    while let Ok(newer) = pending.try_recv() {
                        newest = newer;
                    }
                    let (generation, hash, names) = newest;
                    if let Err(error) = write(&path, &Stored::of(generation, &hash, &names)) {
                        tracing::warn!(
                            "cannot keep the rule names in {}: {error}; a restarted controller will name this generation's rules by number",
                            path.display()
                        );
                    }
                }
            })
            .expect("spawning a thread");
        Self { queue }
    }

    /// Stores `names` as those of `generation`, now live.
    pub fn record(&self, generation: u32, policy_hash: [u8; 32], names: Arc<Names>) {
        let _ = self.queue.send((generation, policy_hash, names));
    }
}

fn write(path: &Path, stored: &Stored) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = path.with_extension("json.partial");
    std::fs::write(
        &partial,
        serde_json::to_vec(stored).map_err(io::Error::other)?,
    )?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScratchFile;

    fn names() -> Names {
        let rule = RuleInfo {
            id: "fe-api".to_owned(),
            kind: crate::policy::RuleKind::Allow,
            from: "frontend".to_owned(),
            to: "api".to_owned(),
            ports: "8080/tcp".to_owned(),
            max_new_per_sec: Some(10),
        };
        let frontend = IdentityInfo {
            identity: 300,
            flags: 1,
        };
        Names {
            rules: [(17, Arc::new(rule))].into(),
            identities: [(300, ("frontend".to_owned(), frontend))].into(),
        }
    }

    #[test]
    fn names_read_back_for_the_generation_and_policy_they_were_written_for_only() {
        let file = ScratchFile::new("names.json");
        let hash = [7; 32];
        write(&file.0, &Stored::of(4, &hash, &names())).unwrap();

        let read_back = read(&file.0, 4, &hash).expect("the same generation and policy");
        assert_eq!(read_back.rule_id(17), "fe-api");
        assert_eq!(read_back.rules[&17], names().rules[&17]);
        assert_eq!(read_back.identity_name(300), "frontend");
        assert_eq!(read_back.identity_info(300), names().identity_info(300));
        assert!(read(&file.0, 5, &hash).is_none(), "another generation");
        assert!(read(&file.0, 4, &[8; 32]).is_none(), "another policy");
        assert!(read(Path::new("/nonexistent/names.json"), 4, &hash).is_none());
    }

    #[test]
    fn the_writer_leaves_the_newest_generation_in_the_file() {
        let file = ScratchFile::new("names-writer.json");
        let writer = NamesWriter::start(file.0.clone());
        let names = Arc::new(names());
        for generation in 1..=20 {
            writer.record(generation, [1; 32], names.clone());
        }
        let written = enforcer_testbed::eventually(std::time::Duration::from_secs(5), || {
            read(&file.0, 20, &[1; 32]).is_some()
        });
        assert!(written, "generation 20's names were written");
    }
}
