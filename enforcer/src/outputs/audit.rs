//! The tamper-evident audit log (DESIGN §7): JSON lines, each carrying the SHA-256 of the line
//! before it, so that changing, removing, inserting or reordering a line breaks the chain that
//! `enforcer audit-verify` walks. The end of the log is anchored outside it: the heartbeat sends
//! the chain head to the SIEM, so a log cut at its end is noticed there.
//!
//! A rotated log (see [`crate::logfile`]) goes on in a new file whose first line chains to the
//! last line of the moved one; `audit-verify OLD NEW` checks the pieces as one chain.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use crate::logfile::LogPath;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An append-only, hash-chained log file.
pub struct AuditLog {
    log: LogPath,
    file: File,
    head: String,
    next_seq: u64,
}

impl AuditLog {
    /// Opens (or creates) the log and continues its chain from the last line.
    pub fn open(path: &Path) -> io::Result<Self> {
        let (head, next_seq) = match last_complete_line(path)? {
            Some(line) => {
                let seq = serde_json::from_str::<Value>(&line)
                    .ok()
                    .and_then(|record| record["seq"].as_u64())
                    .unwrap_or(0);
                (sha256_hex(line.as_bytes()), seq + 1)
            }
            None => (GENESIS.to_owned(), 0),
        };
        let (file, log) = LogPath::open(path)?;
        Ok(Self {
            log,
            file,
            head,
            next_seq,
        })
    }

    pub fn path(&self) -> &Path {
        self.log.path()
    }

    /// SHA-256 of the last line written: what the next line will carry as `prev_hash`.
    pub fn head(&self) -> &str {
        &self.head
    }

    /// Appends a record: `fields` plus `seq`, `time` and `prev_hash`. Written and flushed
    /// before returning, so a crash never loses an acknowledged record.
    pub fn append(&mut self, kind: &str, fields: Value) -> io::Result<()> {
        if self.log.was_rotated()? {
            self.file = self.log.reopen()?;
            tracing::info!(
                "audit log {} was moved or removed (rotated): its chain goes on in a new file",
                self.log.path().display()
            );
        }
        let mut record = Map::new();
        record.insert("seq".to_owned(), Value::from(self.next_seq));
        record.insert(
            "time".to_owned(),
            Value::from(crate::outputs::alert::rfc3339(std::time::SystemTime::now())),
        );
        record.insert("kind".to_owned(), Value::from(kind));
        if let Value::Object(fields) = fields {
            record.extend(fields);
        }
        record.insert("prev_hash".to_owned(), Value::from(self.head.clone()));
        let line = serde_json::to_string(&Value::Object(record)).map_err(io::Error::other)?;
        let length_before = self.file.metadata()?.len();
        let written = self
            .file
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| self.file.flush());
        if let Err(error) = written {
            // A full disk takes part of a line: cut it off, so the log ends at the last whole
            // record and its chain still verifies (and goes on from there once there is room).
            if let Err(cut) = self.file.set_len(length_before) {
                tracing::error!(
                    "audit log {}: a record was written in part and could not be cut off ({cut}): the chain breaks there",
                    self.log.path().display()
                );
            }
            return Err(error);
        }
        self.head = sha256_hex(line.as_bytes());
        self.next_seq += 1;
        Ok(())
    }
}

/// The last complete line of the log at `path`, if any. A line cut short (no newline: the
/// machine stopped while writing it) is removed: it is no record, and the chain goes on from
/// the line before it.
fn last_complete_line(path: &Path) -> io::Result<Option<String>> {
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut last: Option<String> = None;
    let mut complete_length = 0;
    let mut reader = BufReader::new(&file);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        if !line.ends_with('\n') {
            tracing::warn!(
                "audit log {} ends in a line cut short ({} bytes); removed, the chain goes on from the line before",
                path.display(),
                line.len()
            );
            file.set_len(complete_length)?;
            break;
        }
        complete_length += line.len() as u64;
        let record = line.trim_end();
        if !record.is_empty() {
            last = Some(record.to_owned());
        }
        line.clear();
    }
    Ok(last)
}

/// What `audit-verify` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verification {
    /// Every line chains to the one before; `head` is the last line's hash.
    Intact { records: usize, head: String },
    /// The chain breaks at `line` (1-based) of `path`.
    Broken {
        path: PathBuf,
        line: usize,
        problem: String,
    },
}

/// Walks the chain of the log at `paths`: one file, or the pieces of a rotated log, oldest
/// first. The first line of the first piece must start the chain.
pub fn verify(paths: &[PathBuf]) -> io::Result<Verification> {
    let mut expected_prev = GENESIS.to_owned();
    let mut expected_seq: Option<u64> = None;
    let mut records = 0;
    for (piece, path) in paths.iter().enumerate() {
        let reader = BufReader::new(File::open(path)?);
        let broken = |line: usize, problem: String| Verification::Broken {
            path: path.clone(),
            line,
            problem,
        };
        for (index, line) in reader.lines().enumerate() {
            let line = line?;
            let number = index + 1;
            let record: Value = match serde_json::from_str(&line) {
                Ok(record) => record,
                Err(error) => {
                    return Ok(broken(number, format!("not a JSON record ({error})")));
                }
            };
            let prev = record["prev_hash"].as_str().unwrap_or_default();
            if prev != expected_prev {
                let problem = match (piece, index) {
                    (0, 0) => "the first record does not start the chain: records before it were removed (or it continues a rotated log: give the earlier files first)".to_owned(),
                    (_, 0) => "the first record does not continue the file before it: a file is missing between them, or out of order".to_owned(),
                    _ => format!(
                        "prev_hash does not match line {index}: a line was changed, removed, inserted or reordered"
                    ),
                };
                return Ok(broken(number, problem));
            }
            let seq = record["seq"].as_u64();
            if let (Some(expected), Some(seq)) = (expected_seq, seq)
                && seq != expected
            {
                return Ok(broken(
                    number,
                    format!("seq {seq} where {expected} was due"),
                ));
            }
            expected_seq = seq.map(|seq| seq + 1);
            expected_prev = sha256_hex(line.as_bytes());
            records += 1;
        }
    }
    Ok(Verification::Intact {
        records,
        head: expected_prev,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn written_log(records: usize) -> (crate::ScratchFile, Vec<String>) {
        let scratch = crate::ScratchFile::new("audit.jsonl");
        let mut log = AuditLog::open(&scratch.0).unwrap();
        for index in 0..records {
            log.append("policy_load", json!({ "generation": index }))
                .unwrap();
        }
        let lines = std::fs::read_to_string(&scratch.0)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        (scratch, lines)
    }

    fn verify_lines(path: &Path, lines: &[String]) -> Verification {
        std::fs::write(
            path,
            lines
                .iter()
                .map(|line| format!("{line}\n"))
                .collect::<String>(),
        )
        .unwrap();
        verify(&[path.to_owned()]).unwrap()
    }

    #[test]
    fn a_line_cut_short_is_removed_when_the_log_is_opened_again() {
        let (scratch, lines) = written_log(2);
        let path = &scratch.0;
        let mut file = OpenOptions::new().append(true).open(path).unwrap();
        file.write_all(&lines[1].as_bytes()[..40]).unwrap();
        let mut log = AuditLog::open(path).unwrap();
        assert_eq!(log.head(), sha256_hex(lines[1].as_bytes()));
        log.append("policy_load", json!({})).unwrap();
        assert!(matches!(
            verify(std::slice::from_ref(path)).unwrap(),
            Verification::Intact { records: 3, .. }
        ));
    }

    #[test]
    fn an_untouched_log_verifies_and_reopening_continues_the_chain() {
        let (scratch, lines) = written_log(3);
        let path = &scratch.0;
        let Verification::Intact { records: 3, head } = verify(std::slice::from_ref(path)).unwrap()
        else {
            panic!("intact log refused")
        };
        assert_eq!(head, sha256_hex(lines[2].as_bytes()));
        let mut log = AuditLog::open(path).unwrap();
        assert_eq!(log.head(), head);
        log.append("policy_load", json!({})).unwrap();
        assert!(matches!(
            verify(std::slice::from_ref(path)).unwrap(),
            Verification::Intact { records: 4, .. }
        ));
        let last: Value = serde_json::from_str(
            std::fs::read_to_string(path)
                .unwrap()
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(last["seq"], 3);
    }

    #[test]
    fn any_line_changed_removed_inserted_or_reordered_is_found() {
        let (scratch, lines) = written_log(4);
        let path = &scratch.0;
        let mut changed = lines.clone();
        changed[1] = changed[1].replace("\"generation\":1", "\"generation\":7");
        assert!(
            matches!(
                verify_lines(path, &changed),
                Verification::Broken { line: 3, .. }
            ),
            "changed line 2"
        );
        let mut removed = lines.clone();
        removed.remove(1);
        assert!(
            matches!(
                verify_lines(path, &removed),
                Verification::Broken { line: 2, .. }
            ),
            "removed line 2"
        );
        let mut inserted = lines.clone();
        inserted.insert(2, lines[1].clone());
        assert!(
            matches!(
                verify_lines(path, &inserted),
                Verification::Broken { line: 3, .. }
            ),
            "inserted a copy"
        );
        let mut reordered = lines.clone();
        reordered.swap(1, 2);
        assert!(
            matches!(
                verify_lines(path, &reordered),
                Verification::Broken { line: 2, .. }
            ),
            "swapped 2 and 3"
        );
        let truncated_start = lines[1..].to_vec();
        assert!(
            matches!(
                verify_lines(path, &truncated_start),
                Verification::Broken { line: 1, .. }
            ),
            "cut at the start"
        );
    }

    #[test]
    fn a_rotated_log_goes_on_in_a_new_file_and_verifies_as_one_chain_with_the_old() {
        let (current, moved) = (
            crate::ScratchFile::new("audit.jsonl"),
            crate::ScratchFile::new("audit.1"),
        );
        let mut log = AuditLog::open(&current.0).unwrap();
        log.append("policy_load", json!({ "generation": 1 }))
            .unwrap();
        std::fs::rename(&current.0, &moved.0).unwrap();
        log.append("policy_load", json!({ "generation": 2 }))
            .unwrap();
        log.append("policy_load", json!({ "generation": 3 }))
            .unwrap();

        let pieces = [moved.0.clone(), current.0.clone()];
        assert!(matches!(
            verify(&pieces).unwrap(),
            Verification::Intact { records: 3, ref head } if head == log.head()
        ));
        assert_eq!(
            std::fs::read_to_string(&current.0).unwrap().lines().count(),
            2,
            "the new file holds what came after the rotation"
        );
        let Verification::Broken { path, line: 1, .. } =
            verify(std::slice::from_ref(&current.0)).unwrap()
        else {
            panic!("the newer piece alone does not start the chain")
        };
        assert_eq!(path, current.0);
        assert!(
            matches!(
                verify(&[current.0.clone(), moved.0.clone()]).unwrap(),
                Verification::Broken { line: 1, .. }
            ),
            "pieces out of order"
        );
    }
}
