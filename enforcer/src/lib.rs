//! The enforcer controller: policy language, compilation to the datapath's maps, loading and
//! pinning the eBPF programs, and the event pipeline. The `enforcer` binary is a thin CLI over
//! this library; integration tests use it directly too.

pub mod alert;
pub mod alerts_file;
pub mod audit;
pub mod baseline;
pub mod bpf_sys;
pub mod cli;
pub mod compile;
pub mod detect;
pub mod diff;
pub mod events;
pub mod host;
pub mod identity;
pub mod kernel;
pub mod loader;
pub mod logfile;
pub mod maps;
pub mod metrics;
pub mod names_file;
pub mod observe;
pub mod policy;
pub mod run;
pub mod syslog;
pub mod tc_netlink;
pub mod watch;

/// A file path of a unit test's own under the temp directory, removed when dropped.
#[cfg(test)]
pub(crate) struct ScratchFile(pub std::path::PathBuf);

#[cfg(test)]
impl ScratchFile {
    pub(crate) fn new(name: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(std::env::temp_dir().join(format!(
            "enforcer-test-{}-{unique}-{name}",
            std::process::id()
        )))
    }
}

#[cfg(test)]
impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
