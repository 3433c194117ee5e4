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
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

/// Permissions of the files the controller creates (alerts, audit log, edge baseline).
pub const CREATE_MODE: u32 = 0o640;

/// Opens `path` for appending, creating it with [`CREATE_MODE`] if needed. A symlink at `path`
/// is refused (someone who can write the directory could point it at a file of the system's),
/// and a regular file that exists gets [`CREATE_MODE`], whatever mode it had.
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = File::options()
        .create(true)
        .append(true)
        .mode(CREATE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|error| {
            if error.raw_os_error() == Some(libc::ELOOP) {
                io::Error::other(format!(
                    "{} is a symbolic link; enforcer writes only to files it can open directly",
                    path.display()
                ))
            } else {
                error
            }
        })?;
    // Only a regular file: a device (`/dev/null`) or a FIFO is the system's, not ours.
    let metadata = file.metadata()?;
    if metadata.is_file() && metadata.mode() & 0o7777 != CREATE_MODE {
        file.set_permissions(std::fs::Permissions::from_mode(CREATE_MODE))?;
    }
    Ok(file)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScratchFile;

    #[test]
    fn a_symlink_in_place_of_the_file_is_refused() {
        let target = ScratchFile::new("symlink-target");
        std::fs::write(&target.0, "not enforcer's\n").unwrap();
        let link = ScratchFile::new("symlink");
        std::os::unix::fs::symlink(&target.0, &link.0).unwrap();
        let error = open_append(&link.0).unwrap_err();
        assert!(error.to_string().contains("is a symbolic link"), "{error}");
        assert_eq!(
            std::fs::read_to_string(&target.0).unwrap(),
            "not enforcer's\n"
        );
    }

    #[test]
    fn a_file_that_exists_gets_the_documented_mode() {
        let file = ScratchFile::new("loose-mode");
        std::fs::write(&file.0, "").unwrap();
        std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(0o666)).unwrap();
        open_append(&file.0).unwrap();
        let mode = std::fs::metadata(&file.0).unwrap().mode() & 0o7777;
        assert_eq!(mode, CREATE_MODE, "mode {mode:o}");
    }
}
