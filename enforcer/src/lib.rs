//! The enforcer controller: policy language, compilation to the datapath's maps, loading and
//! pinning the eBPF programs, and the event pipeline. The `enforcer` binary is a thin CLI over
//! this library; integration tests use it directly too.

pub mod cli;
pub mod cni;
pub mod compile;
pub mod datapath;
mod detect;
pub mod endpoints;
pub mod events;
pub mod fleet;
mod locks;
/// Files the controller appends to (outputs and the detectors' baseline share it).
mod logfile;
pub mod outputs;
pub mod policy;
mod run;
/// The build script's stack check of the eBPF programs, compiled here for its unit tests.
#[cfg(test)]
#[path = "../build/stack_depth.rs"]
mod stack_depth;

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
