//! Long-running processes (the controller) in a namespace, with their logs.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::POLL;

/// A daemon process in a namespace, with its stderr kept in a file. Killed on drop; `on_drop`
/// runs after that (for example to unload what it pinned).
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl Daemon {
    /// Spawns `command` with stderr to `log` and waits until the log contains `ready` (an error
    /// carrying the log if the process exits first or `timeout` passes).
    pub fn spawn(
        mut command: Command,
        log: PathBuf,
        ready: &str,
        timeout: Duration,
    ) -> io::Result<Self> {
        let log_file = File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()?;
        let mut daemon = Self {
            child: Some(child),
            log,
            on_drop: None,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if daemon.log_text().contains(ready) {
                return Ok(daemon);
            }
            if let Some(status) = daemon
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                return Err(io::Error::other(format!(
                    "exited ({status}) before \"{ready}\":\n{}",
                    daemon.log_text()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "no \"{ready}\" after {timeout:?}:\n{}",
                    daemon.log_text()
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Starts `command`, an `enforcer run` pinning under `pins`, and waits until it enforces.
    /// Dropping it kills the controller, then `enforcer unload` (the `enforcer` binary) removes
    /// what it left in the kernel.
    pub fn spawn_enforcer(
        command: Command,
        enforcer: &Path,
        pins: &Path,
        log: PathBuf,
        timeout: Duration,
    ) -> io::Result<Self> {
        let (enforcer, pins) = (enforcer.to_owned(), pins.to_owned());
        Ok(
            Self::spawn(command, log, "enforcing", timeout)?.on_drop(move || {
                let _ = Command::new(enforcer)
                    .args(["unload", "--pin-path"])
                    .arg(pins)
                    .output();
            }),
        )
    }

    pub fn on_drop(mut self, cleanup: impl FnOnce() + Send + 'static) -> Self {
        self.on_drop = Some(Box::new(cleanup));
        self
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| io::Error::other("daemon already reaped"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .map_err(io::Error::from)
    }

    /// Waits for the daemon to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<std::process::ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| io::Error::other("daemon already reaped"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("still running after {timeout:?}")));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log_text().contains(text) {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "no \"{text}\" after {timeout:?}:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Asked to stop first, so it can clean up after itself; killed if it does not.
        if self.signal(nix::sys::signal::Signal::SIGTERM).is_ok()
            && self.wait(Duration::from_secs(3)).is_ok()
        {
            self.child = None;
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(cleanup) = self.on_drop.take() {
            cleanup();
        }
    }
}
