//! Files the controller appends to (alerts, audit log) and log rotation. logrotate's default
//! moves the file away (or removes it) and expects the writer to start a new one at the same
//! path; the writer notices because the path no longer names the inode it has open.
//! `copytruncate` rotation needs nothing: the files are opened in append mode.
//!
//! Files the controller creates are readable by its group only ([`CREATE_MODE`]): flow records
//! and audit entries map which services talk to which, which is no one else's business. A log
//! shipper reads them as root or through the group (Debian's `adm` convention).

use std::{
    fs::File,
    io,
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// Permissions of the files the controller creates (alerts, audit log, edge baseline).
pub const CREATE_MODE: u32 = 0o640;

/// Opens `path` for appending, creating it with [`CREATE_MODE`] if needed.
pub fn open_append(path: &Path) -> io::Result<File> {
    File::options()
        .create(true)
        .append(true)
        .mode(CREATE_MODE)
        .open(path)
}

/// Where an open log file lives, and which file it was when opened.
#[derive(Debug)]
pub struct LogPath {
    path: PathBuf,
    /// Device and inode: a rotation puts another inode at the same path.
    inode: (u64, u64),
}

impl LogPath {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: &Path) -> io::Result<(File, Self)> {
        let file = open_append(path)?;
        let metadata = file.metadata()?;
        Ok((
            file,
            Self {
                path: path.to_owned(),
                inode: (metadata.dev(), metadata.ino()),
            },
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was moved or removed since it was opened (rotated).
    pub fn was_rotated(&self) -> io::Result<bool> {
        match std::fs::metadata(&self.path) {
            Ok(metadata) => Ok((metadata.dev(), metadata.ino()) != self.inode),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(error) => Err(error),
        }
    }

    /// A new file at the same path, once [`was_rotated`](Self::was_rotated) said so.
    pub fn reopen(&mut self) -> io::Result<File> {
        let (file, reopened) = Self::open(&self.path)?;
        *self = reopened;
        Ok(file)
    }
}
