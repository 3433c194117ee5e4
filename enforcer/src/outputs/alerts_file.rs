//! Where `--alerts` writes: JSON lines appended to a file (or stdout), as log shippers expect.
//! A rotated file (see [`crate::logfile`]) is noticed within a second and a new one started at
//! the same path; the shipper reads the moved file to its end, so no record is lost. Records that
//! cannot be written (a full disk) are counted, and said in the log once per failing spell
//! rather than once per record.

use std::{
    io::{self, BufWriter, Write},
    path::Path,
};

use prometheus_client::metrics::counter::Counter;

use crate::logfile::LogPath;

/// The alerts file (or stdout).
pub struct AlertsFile {
    writer: Box<dyn Write + Send>,
    /// The file's path; `None` for stdout.
    file: Option<LogPath>,
    /// Records not written; shared with the metrics.
    unwritten: Counter,
    /// Records lost since writing last worked; `Some` while failing.
    failing_since: Option<u64>,
}

impl AlertsFile {
    /// Opens `target` for appending, creating it if needed; `-` is stdout.
    pub fn open(target: &Path) -> io::Result<Self> {
        let (writer, file): (Box<dyn Write + Send>, _) = if target.as_os_str() == "-" {
            (Box::new(io::stdout()), None)
        } else {
            let (file, path) = LogPath::open(target)?;
            (Box::new(BufWriter::new(file)), Some(path))
        };
        Ok(Self {
            writer,
            file,
            unwritten: Counter::default(),
            failing_since: None,
        })
    }

    /// Counts records that could not be written in `counter` (the metrics' own).
    pub fn counting_in(mut self, counter: Counter) -> Self {
        counter.inc_by(self.unwritten.get());
        self.unwritten = counter;
        self
    }

    /// Records not written so far.
    #[cfg(test)]
    pub fn unwritten(&self) -> u64 {
        self.unwritten.get()
    }

    /// Appends `json`, one record encoded on one line, and the line's end.
    pub fn write(&mut self, json: &str) {
        // Success here may only mean buffered: a flush says whether writing works again.
        if let Err(error) = self
            .writer
            .write_all(json.as_bytes())
            .and_then(|()| self.writer.write_all(b"\n"))
        {
            self.unwritten.inc();
            if self.failing_since.is_none() {
                tracing::error!(
                    "writing alerts to {} failed: {error}; records are lost until it works again (counted in enforcer_alerts_unwritten_total)",
                    self.describe()
                );
            }
            *self.failing_since.get_or_insert(0) += 1;
        }
    }

    /// Hands what is buffered to the file.
    pub fn flush(&mut self) {
        // A failed flush keeps its data buffered for the next attempt: nothing is lost yet.
        if let Err(error) = self.writer.flush() {
            if self.failing_since.is_none() {
                tracing::error!("flushing alerts to {} failed: {error}", self.describe());
                self.failing_since = Some(0);
            }
        } else if let Some(lost) = self.failing_since.take() {
            tracing::warn!(lost, "writing alerts to {} works again", self.describe());
        }
    }

    /// Starts a new file if the one being written was moved or removed (rotated). What was
    /// buffered goes to the old file first, where the shipper will find it.
    pub fn follow_rotation(&mut self) {
        let Some(file) = &self.file else { return };
        if !file.was_rotated().unwrap_or(false) {
            return;
        }
        self.flush();
        let Some(file) = &mut self.file else { return };
        match file.reopen() {
            Ok(reopened) => {
                tracing::info!(
                    "alerts file {} was moved or removed (rotated): writing a new one",
                    file.path().display()
                );
                self.writer = Box::new(BufWriter::new(reopened));
            }
            Err(error) => tracing::error!(
                "alerts file {} was rotated, and a new one cannot be opened: {error}; still writing to the old one",
                file.path().display()
            ),
        }
    }

    fn describe(&self) -> String {
        self.file.as_ref().map_or_else(
            || "stdout".to_owned(),
            |file| file.path().display().to_string(),
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ScratchFile;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn a_rotated_file_is_followed_by_a_new_one_and_no_record_is_lost() {
        let (file, moved) = (
            ScratchFile::new("alerts.jsonl"),
            ScratchFile::new("alerts.1"),
        );
        let (path, rotated) = (&file.0, &moved.0);
        let mut alerts = AlertsFile::open(path).unwrap();
        alerts.write(&json!({ "n": 1 }).to_string());
        alerts.flush();
        std::fs::rename(path, rotated).unwrap();
        // Written after the rename, before the controller notices: still the old file's.
        alerts.write(&json!({ "n": 2 }).to_string());
        alerts.follow_rotation();
        alerts.write(&json!({ "n": 3 }).to_string());
        alerts.flush();

        assert_eq!(lines(rotated), [json!({ "n": 1 }), json!({ "n": 2 })]);
        assert_eq!(lines(path), [json!({ "n": 3 })]);
        assert_eq!(alerts.unwritten(), 0);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "a new alerts file is not world-readable");
    }

    #[test]
    fn a_removed_file_is_started_again() {
        let file = ScratchFile::new("alerts.jsonl");
        let path = &file.0;
        let mut alerts = AlertsFile::open(path).unwrap();
        alerts.write(&json!({ "n": 1 }).to_string());
        alerts.flush();
        std::fs::remove_file(path).unwrap();
        alerts.follow_rotation();
        alerts.write(&json!({ "n": 2 }).to_string());
        alerts.flush();
        assert_eq!(lines(path), [json!({ "n": 2 })]);
    }

    #[test]
    fn an_unchanged_file_is_kept_and_appended_to() {
        let file = ScratchFile::new("alerts.jsonl");
        let path = &file.0;
        std::fs::write(path, "{\"n\":0}\n").unwrap();
        let mut alerts = AlertsFile::open(path).unwrap();
        alerts.follow_rotation();
        alerts.write(&json!({ "n": 1 }).to_string());
        alerts.flush();
        assert_eq!(lines(path), [json!({ "n": 0 }), json!({ "n": 1 })]);
    }

    #[test]
    fn records_that_cannot_be_written_are_counted() {
        // /dev/full refuses every write with ENOSPC, like a full disk.
        let counter = Counter::default();
        let mut alerts = AlertsFile::open(Path::new("/dev/full"))
            .unwrap()
            .counting_in(counter.clone());
        let record = json!({ "padding": "x".repeat(1000) });
        for _ in 0..100 {
            alerts.write(&record.to_string());
            alerts.flush();
        }
        // The buffer holds what it can for a later attempt; everything beyond it is lost.
        let lost = counter.get();
        assert!(
            (90..=100).contains(&lost),
            "{lost} of 100 records counted as unwritten"
        );
    }
}
