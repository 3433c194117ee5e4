//! cgroup v2 directories made for a test, and commands run in them.

use std::{
    fs::{self, File},
    io,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

use crate::{Netns, eventually, unique_id};

/// A cgroup v2 directory made for a test, removed on drop (after its processes exited).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<test bed id>-<name>`.
    pub fn create(name: &str) -> io::Result<Self> {
        let root = cgroup2_root().ok_or_else(|| io::Error::other("cgroup v2 is not mounted"))?;
        let path = root.join(format!("{}-{name}", unique_id()));
        fs::create_dir(&path)?;
        Ok(Self { path })
    }

    /// Creates a cgroup below this one (dropped before it, when declared after it).
    pub fn child(&self, name: &str) -> io::Result<Self> {
        let path = self.path.join(name);
        fs::create_dir(&path)?;
        Ok(Self { path })
    }

    /// The cgroup's id, as `bpf_skb_cgroup_id` reports it: its directory's inode number.
    pub fn id(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(fs::metadata(&self.path)?.ino())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The directory can only go once empty: wait briefly for exiting processes.
        let removed = eventually(Duration::from_secs(5), || {
            fs::remove_dir(&self.path).is_ok()
        });
        if !removed {
            eprintln!("testbed: could not remove cgroup {}", self.path.display());
        }
    }
}

/// Where cgroup v2 is mounted.
pub fn cgroup2_root() -> Option<PathBuf> {
    fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
}

impl Netns {
    /// A command that runs inside the namespace and inside `cgroup` (joined after fork, so every
    /// socket it opens belongs to the cgroup).
    pub fn command_in_cgroup(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        cgroup: &Cgroup,
    ) -> io::Result<Command> {
        let handle = self.handle()?;
        let procs = File::options()
            .write(true)
            .open(cgroup.path.join("cgroup.procs"))?;
        let mut command = Command::new(program);
        // SAFETY: write and setns are async-signal-safe; both files stay open in the parent.
        unsafe {
            command.pre_exec(move || {
                use std::os::fd::AsRawFd as _;
                // Writing 0 moves the writing process itself.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                setns(&handle, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
        Ok(command)
    }
}
